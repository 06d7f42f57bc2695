// A Docker engine outage against a real dockerd (Debian docker.io) that this file starts, stops
// and starts again: a burst of events does not drive a failing pool to Degraded, the outage is
// logged once, and the pool is retried as soon as dockerd answers again, not when its backoff
// ends. Every daemon here runs with a 10-minute base backoff (far longer than any wait in this
// file), so a pool that recovers within a test was retried because the engine came back and for
// no other reason: neither a backoff timer nor a resync (which respects backoff) explains it.

import anyTest, { type TestFn } from 'ava';
import { listMembers } from '../src/state/pools.js';
import type { Store } from '../src/state/store.js';
import { startDockerd, type Dockerd } from './helpers/dockerd.js';
import { startDaemon, waitFor } from './helpers/e2e-env.js';
import { poolEnv } from './helpers/warmpool-env.js';
import { capturingLogger } from './helpers/log-capture.js';

const test = anyTest as TestFn<{ dockerd: Dockerd }>;

test.before(async (t) => {
  t.context.dockerd = await startDockerd({ name: 'outage' });
});
test.after.always(async (t) => {
  await t.context.dockerd?.stop();
});

/** A backoff no test here outlives (see the top of the file). */
const LONG_BACKOFF = { backoff: { baseMs: 10 * 60_000, capMs: 60 * 60_000 } };
/** PID 1 that ends on SIGTERM: dockerd's shutdown does not wait out a stop timeout per container. */
const QUICK_EXIT = ['sh', '-c', 'trap "exit 0" TERM; while :; do sleep 1; done'];



const readyOf = (store: Store, pool: string) => store.getResource('WarmPool', pool)?.status?.conditions.find((c) => c.type === 'Ready');
const engineFailure = (store: Store, pool: string) => {
  const ready = readyOf(store, pool);
  return ready?.status === 'False' && ready.reason === 'EngineUnavailable' ? ready : undefined;
};

test.serial('a dockerd outage: events do not make the pool Degraded, it is warned about once, and the pool is retried as soon as dockerd is back', async (t) => {
  t.timeout(300_000); // hang guard: dockerd stop and start on a loaded machine, and the waits below
  const { dockerd } = t.context;
  const { logger, lines } = capturingLogger();
  const p = await poolEnv(t, dockerd, [{ name: 'outage', image: dockerd.image, command: QUICK_EXIT, size: 2, maxSize: 3 }], {
    daemon: { logger, retries: LONG_BACKOFF },
  });
  const { store, manager } = p.daemon;
  await p.waitWarm('outage', 2, 120_000);
  const beforeOutage = lines.length;

  await dockerd.stopEngine();
  // The event stream breaks: the outage starts, and every pool of the engine is run once to show it.
  const failure = await waitFor('the pool to fail with EngineUnavailable', () => engineFailure(store, 'outage'), 60_000).catch((err) => {
    t.log(JSON.stringify(lines.slice(beforeOutage), null, 1));
    throw err;
  });
  t.regex(failure.message, new RegExp(`Docker engine at unix://${dockerd.socketPath}`));
  await waitFor('the failed run to settle', () => manager.queue.busy === 0 && manager.queue.depth === 0, 30_000);

  // One or two failures so far: a run caught in dockerd's shutdown may have failed with
  // StartFailed first (the engine's outage then re-ran it at once, to show EngineUnavailable).
  const failuresBefore = store.getBackoff('WarmPool', 'outage')!.failures;
  t.true(failuresBefore <= 2, `${failuresBefore} failures`);
  // A burst of events, through the same door Docker events take (ctx.enqueue).
  for (let i = 0; i < 100; i++) manager.context.enqueue('WarmPool', 'outage');
  t.is(manager.queue.depth + manager.queue.busy, 0, 'every event was absorbed by the backoff');
  t.true(manager.queue.isBackingOff('WarmPool/outage'));
  t.is(store.getBackoff('WarmPool', 'outage')?.failures, failuresBefore, 'no failure counted for the events');
  t.is(store.getResource('WarmPool', 'outage')?.status?.phase, 'Backoff', 'not Degraded');

  // Meanwhile the engine is probed: several failed pings, each logged at debug only.
  await waitFor('three failed probes of the engine', () => lines.slice(beforeOutage).filter((l) => l.level === 'debug' && l.via === 'ping').length >= 3, 30_000);
  t.is(store.getBackoff('WarmPool', 'outage')?.failures, failuresBefore, 'probes are not pool runs');
  const outageLines = lines.slice(beforeOutage);
  // (A start refused by dockerd while it shut down, if a run was caught in it, is a failure of
  // its own, logged as such: only the engine's unreachability is counted here.)
  const warnings = outageLines.filter((l) => (l.level === 'warn' || l.level === 'error') && /not reachable|EngineUnavailable/.test(`${l.message} ${String(l.event)} ${String(l.cause)}`));
  t.is(warnings.length, 1, `one warning for the whole outage, got: ${JSON.stringify(warnings)}`);
  t.regex(warnings[0]!.message, /; pool outage waits for it$/);
  t.is(warnings[0]!.engine, 'docker');
  t.true(outageLines.some((l) => l.level === 'debug' && l.resource === 'WarmPool/outage' && l.event === 'EngineUnavailable'), 'the pool\'s own failure is logged at debug');

  // dockerd comes back. Only the engine coming back can explain a retry within the waits below.
  await dockerd.startEngine();
  const engineReadyAt = Date.now();
  await waitFor('the pool status to say it is retrying (or to be Ready)', () => {
    const ready = readyOf(store, 'outage');
    return ready?.status === 'True' || ready?.message.startsWith('retrying now: the docker engine is reachable again');
  }, 60_000);
  const statusChangedAt = Date.now();
  t.log(`the pool's status changed ${statusChangedAt - engineReadyAt} ms after dockerd answered /_ping (goal: within 2 s; the engine is probed every 500 ms)`);
  await waitFor('2 warm containers again', () => {
    const warm = listMembers(store, 'outage').filter((m) => m.state === 'warm').length;
    return warm === 2 && store.getResource('WarmPool', 'outage')?.status?.phase === 'Ready';
  }, 120_000);

  const events = store.listEvents({ kind: 'WarmPool', name: 'outage' });
  t.true(
    events.some((e) => e.reason === 'Retrying' && /^retrying now: the docker engine is reachable again \(instead of in \d+m(\d+s)?\)$/.test(e.message)),
    JSON.stringify(events.map((e) => [e.reason, e.message])),
  );
  t.true(
    events.some((e) => e.reason === 'Converged' && new RegExp(`recovered after ${failuresBefore} failed attempt\\(s\\)`).test(e.message)),
    JSON.stringify(events.map((e) => [e.reason, e.message, e.count])),
  );
  const infos = lines.slice(beforeOutage).filter((l) => l.level === 'info' && /^the docker engine is reachable again after [\d.]+ s; retrying pool outage now$/.test(l.message));
  t.is(infos.length, 1, 'the end of the outage is logged once');
  t.is(store.getBackoff('WarmPool', 'outage'), undefined);
});

test.serial('a daemon restarted after the engine was fixed retries the pools that failed for it at once, not after their stored backoff', async (t) => {
  t.timeout(300_000);
  const { dockerd } = t.context;
  await dockerd.stopEngine();
  const first = capturingLogger();
  const p = await poolEnv(t, dockerd, [{ name: 'fixed', image: dockerd.image, command: QUICK_EXIT, size: 1, maxSize: 1 }], {
    daemon: { logger: first.logger, retries: LONG_BACKOFF },
  });
  await waitFor('EngineUnavailable', () => engineFailure(p.daemon.store, 'fixed'), 60_000);
  await waitFor('the failed run to settle', () => p.daemon.manager.queue.busy === 0, 30_000);
  const stored = p.daemon.store.getBackoff('WarmPool', 'fixed');
  t.truthy(stored);
  t.true(stored!.nextAttemptAt > Date.now() + 5 * 60_000, 'a restart would wait this out');
  await p.daemon.stop();

  await dockerd.startEngine();
  const second = capturingLogger();
  const daemon = await startDaemon(t, p.cfgFile, { logger: second.logger, retries: LONG_BACKOFF });
  await waitFor('the pool Ready with 1 warm container', () => {
    const warm = listMembers(daemon.store, 'fixed').filter((m) => m.state === 'warm').length;
    return warm === 1 && daemon.store.getResource('WarmPool', 'fixed')?.status?.phase === 'Ready';
  }, 120_000);
  const events = daemon.store.listEvents({ kind: 'WarmPool', name: 'fixed' });
  t.true(events.some((e) => e.reason === 'Retrying' && e.message.startsWith('retrying now: the docker engine is reachable again')), JSON.stringify(events.map((e) => [e.reason, e.message])));
});

test.serial('four pools and no Docker engine: one warning for the engine, however many retries; the pools\' failures at debug', async (t) => {
  t.timeout(180_000);
  const { logger, lines } = capturingLogger();
  const pools = ['openai', 'anthropic', 'google', 'mistral'];
  // The default backoff (200 ms doubling): each pool retries several times within seconds.
  const p = await poolEnv(t, undefined, pools.map((name) => ({ name, image: 'polydev-test/none:1', size: 1, maxSize: 1 })), {
    config: { docker: { socket: `${t.context.dockerd.dir}/no-such-docker.sock`, network: 'none' } },
    daemon: { logger },
  });
  const { store } = p.daemon;
  await waitFor('every pool to have failed 4 times', () => pools.every((name) => (store.getBackoff('WarmPool', name)?.failures ?? 0) >= 4), 60_000);
  const failures = pools.reduce((n, name) => n + store.getBackoff('WarmPool', name)!.failures, 0);
  const engineWarnings = lines.filter((l) => (l.level === 'warn' || l.level === 'error') && /not reachable|EngineUnavailable|event stream/.test(`${l.message} ${String(l.event)} ${String(l.cause)}`));
  t.is(engineWarnings.length, 1, `${failures} pool failures, warnings: ${JSON.stringify(engineWarnings)}`);
  t.regex(engineWarnings[0]!.message, /no-such-docker\.sock is not reachable: connect ENOENT .*; pools .+ wait for it$/);
  for (const name of pools) t.true(engineWarnings[0]!.message.includes(name), name);
  const poolFailureLines = lines.filter((l) => l.event === 'EngineUnavailable');
  t.true(poolFailureLines.length >= 16);
  t.true(poolFailureLines.every((l) => l.level === 'debug'), 'every pool failure is logged at debug');
  // The events still count every failure, for `describe`.
  for (const name of pools) t.true((store.listEvents({ kind: 'WarmPool', name }).find((e) => e.reason === 'EngineUnavailable')?.count ?? 0) >= 4, name);
});
