// Engine outages (src/controllers/warmpool/engine-availability.ts): one warning when an outage
// starts, one info line when it ends, debug in between; a down engine is probed until it answers.
// The real engine's side (dockerd stopped and started again) is in warmpool-engine-outage.test.ts.

import test from 'ava';
import { EngineAvailability, type EngineOutage } from '../src/controllers/warmpool/engine-availability.js';
import { EngineError, type EngineName } from '../src/controllers/warmpool/engine.js';
import { eventually } from './helpers/unit-fixtures.js';
import { capturingLogger } from './helpers/log-capture.js';



const unreachable = (detail: string) =>
  new EngineError('EngineUnavailable', `Docker engine at unix:///var/run/docker.sock is not reachable: ${detail}`);

function tracker(t: import('ava').ExecutionContext, ping: () => Promise<void>, probeMs = 3_600_000) {
  const { logger, lines } = capturingLogger();
  const ups: Array<[EngineName, EngineOutage | undefined]> = [];
  const downs: EngineName[] = [];
  const a = new EngineAvailability({
    logger,
    probeMs,
    poolsOn: (engine) => (engine === 'docker' ? ['openai', 'anthropic', 'google'] : []),
    ping,
    onUp: (engine, outage) => ups.push([engine, outage]),
    onDown: (engine) => downs.push(engine),
  });
  t.teardown(() => a.stop());
  return { a, lines, ups, downs };
}

test('an outage is logged once however many failures report it (pools, stream, retries); its end once at info', (t) => {
  const { a, lines, ups, downs } = tracker(t, async () => undefined);
  t.true(a.markDown('docker', unreachable('connect ENOENT /var/run/docker.sock'), 'pool openai'));
  // Every pool's retries, and the event stream, during the same outage.
  for (let i = 0; i < 36; i++) {
    const pool = ['openai', 'anthropic', 'google'][i % 3]!;
    t.false(a.markDown('docker', unreachable(i % 2 ? 'connect ENOENT /var/run/docker.sock' : 'connect ECONNREFUSED'), `pool ${pool}`));
  }
  t.false(a.markDown('docker', unreachable('closed the event stream'), 'event stream'));
  t.true(a.isDown('docker'));
  t.is(a.outage('docker')?.failures, 38);

  const warnings = lines.filter((l) => l.level === 'warn');
  t.is(warnings.length, 1, 'one warning for the outage');
  t.is(
    warnings[0]!.message,
    'Docker engine at unix:///var/run/docker.sock is not reachable: connect ENOENT /var/run/docker.sock; pools openai, anthropic, google wait for it',
  );
  t.is(warnings[0]!.engine, 'docker');
  t.is(warnings[0]!.cause, 'EngineUnavailable');
  t.is(lines.filter((l) => l.level === 'debug').length, 37, 'the repeats are debug');
  t.deepEqual(downs, ['docker'], 'onDown once');

  t.true(a.markUp('docker', 'pool openai'));
  t.false(a.markUp('docker', 'pool anthropic'), 'the end is announced once');
  const infos = lines.filter((l) => l.level === 'info');
  t.is(infos.length, 1);
  t.regex(infos[0]!.message, /^the docker engine is reachable again after [\d.]+ s; retrying pools openai, anthropic, google now$/);
  t.is(ups.length, 1);
  t.is(ups[0]![1]?.failures, 38);

  // A new outage is a new cause: warned again.
  t.true(a.markDown('docker', unreachable('connect ENOENT'), 'pool google'));
  t.is(lines.filter((l) => l.level === 'warn').length, 2);
});

test('a markUp for an engine that was never down is silent and calls nothing', (t) => {
  const { a, lines, ups } = tracker(t, async () => undefined);
  t.false(a.markUp('docker', 'pool openai'));
  t.deepEqual(lines, []);
  t.deepEqual(ups, []);
});

test('a down engine is pinged every probeMs until it answers; the pings that fail are debug', async (t) => {
  let pings = 0;
  const { a, lines, ups } = tracker(t, async () => {
    pings++;
    if (pings < 4) throw unreachable('connect ENOENT');
  }, 5);
  a.markDown('docker', unreachable('connect ENOENT'), 'event stream');
  await eventually(() => ups.length === 1, 'the probe finding the engine back');
  t.is(pings, 4, 'three failed probes, then the one that answered; none after');
  t.false(a.isDown('docker'));
  t.is(lines.filter((l) => l.level === 'warn').length, 1);
  t.is(lines.filter((l) => l.level === 'debug' && l.via === 'ping').length, 3);
  t.is(lines.filter((l) => l.level === 'info' && l.via === 'ping').length, 1);
  await new Promise((r) => setTimeout(r, 50));
  t.is(pings, 4, 'no probing while the engine is up');
});

test('check() at start: an engine that answers retries its pools; one that does not starts an outage', async (t) => {
  const up = tracker(t, async () => undefined);
  await up.a.check('docker');
  t.deepEqual(up.ups, [['docker', undefined]]);
  t.deepEqual(up.lines, [], 'nothing to report: the pools are just retried');

  const down = tracker(t, async () => {
    throw unreachable('connect ENOENT');
  });
  await down.a.check('docker');
  t.deepEqual(down.ups, []);
  t.true(down.a.isDown('docker'));
  t.is(down.lines.filter((l) => l.level === 'warn').length, 1);
});
