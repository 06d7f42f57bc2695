import test from 'ava';
import { silentLogger } from '../src/observability/logger.js';
import { Metrics } from '../src/observability/metrics.js';
import type { DegradedPolicy } from '../src/runtime/convergence-machine.js';
import type { Controller, ConvergingController, SimpleController } from '../src/runtime/controller.js';
import { Manager } from '../src/runtime/manager.js';
import type { Store } from '../src/state/store.js';
import { eventually, openStore } from './helpers/unit-fixtures.js';
import { capturingLogger } from './helpers/log-capture.js';

function manager(t: import('ava').ExecutionContext, controllers: SimpleController[] = []) {
  const { store } = openStore(t);
  const m = new Manager({ store, logger: silentLogger(), metrics: new Metrics({ processMetrics: false }), controllers, workers: 1, resyncIntervalMs: 3_600_000 });
  t.teardown(() => m.stop(100));
  return { store, m };
}

test('resync queues every key except those waiting out a stored backoff', (t) => {
  const { store, m } = manager(t);
  for (const name of ['a', 'b', 'c']) store.upsertResource({ kind: 'WarmPool', name, spec: {}, source: 'apply' });
  store.setBackoff('WarmPool', 'b', 7, Date.now() + 5 * 60_000, 'still failing');
  store.setBackoff('WarmPool', 'c', 3, Date.now() - 1, 'deadline passed');
  m.resync();
  t.is(m.queue.depth, 2, 'a and c are queued; b keeps its 5-minute backoff');
});

test('a real change cuts a backoff short (only resync respects it)', async (t) => {
  const seen: string[] = [];
  const { store, m } = manager(t, [{ kind: 'WarmPool', reconcile: async (name) => void seen.push(name) }]);
  store.upsertResource({ kind: 'WarmPool', name: 'b', spec: {}, source: 'apply' });
  store.setBackoff('WarmPool', 'b', 7, Date.now() + 5 * 60_000, 'still failing');
  m.start();
  const deadline = Date.now() + 1000;
  while (!seen.includes('b') && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
  t.deepEqual(seen, [], 'start honours the stored deadline');
  store.upsertResource({ kind: 'WarmPool', name: 'b', spec: { changed: true }, source: 'apply' });
  const deadline2 = Date.now() + 30_000; // hang guard: the loop ends as soon as b has run
  while (!seen.includes('b') && Date.now() < deadline2) await new Promise((r) => setTimeout(r, 10));
  t.deepEqual(seen, ['b']);
});

test('mayAct: while the lease is not provably ours nothing is reconciled; the key waits and runs once it is', async (t) => {
  const { store } = openStore(t);
  const seen: string[] = [];
  let mayAct = false;
  const m = new Manager({
    store, logger: silentLogger(), metrics: new Metrics({ processMetrics: false }), workers: 1, resyncIntervalMs: 3_600_000,
    controllers: [{ kind: 'WarmPool', reconcile: async (name) => void seen.push(name) }],
    mayAct: () => mayAct,
  });
  t.teardown(() => m.stop(100));
  store.upsertResource({ kind: 'WarmPool', name: 'a', spec: {}, source: 'apply' });
  m.start();
  await new Promise((r) => setTimeout(r, 1500));
  t.deepEqual(seen, [], 'a stalled leader acts on nothing');
  mayAct = true;
  const deadline = Date.now() + 30_000; // hang guard: the loop ends as soon as a has run
  while (!seen.includes('a') && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
  t.deepEqual(seen, ['a'], 'the key was kept, and runs once the lease is fresh again');
});

// ---- failures: backoff by time, retry when the cause goes, one log line per failure -----------



interface Script {
  /** The error observe() throws, or undefined to succeed. */
  error: string | undefined;
  observes: number;
}

/** A converging kind whose observation fails with whatever the script says: the manager's side of failures, nothing else. */
function scriptedController(script: Script): ConvergingController<{ generation: number }, Record<string, never>, string> {
  return {
    kind: 'WarmPool',
    desired: (r) => ({ generation: r.metadata.generation }),
    driftPolicy: () => 'correct',
    observe: async () => {
      script.observes++;
      if (script.error !== undefined) throw new Error(script.error);
      return {};
    },
    plan: () => [],
    describe: (a) => a,
    execute: async () => undefined,
    teardown: async () => undefined,
  };
}

function failingManager(
  t: import('ava').ExecutionContext,
  script: Script,
  opts: { degraded?: DegradedPolicy; controllers?: Controller[] } = {},
) {
  const { store } = openStore(t);
  const { logger, lines } = capturingLogger();
  const m = new Manager({
    store, logger, metrics: new Metrics({ processMetrics: false }), workers: 1, resyncIntervalMs: 3_600_000,
    controllers: opts.controllers ?? [scriptedController(script)],
    // A backoff far longer than any test: whatever runs a failing key again is not its timer.
    backoff: { baseMs: 600_000, capMs: 3_600_000 },
    ...(opts.degraded ? { degraded: opts.degraded } : {}),
  });
  t.teardown(() => m.stop(100));
  return { store, m, lines };
}

const readyOf = (store: Store, name: string) => store.getStatus('WarmPool', name)?.conditions.find((c) => c.type === 'Ready');
const idle = (m: Manager) => m.queue.depth === 0 && m.queue.busy === 0;

test('a burst of events does not re-run a failing key: one failure per backoff window, Backoff and not Degraded', async (t) => {
  const script: Script = { error: 'Docker engine at unix:///var/run/docker.sock is not reachable: connect ENOENT', observes: 0 };
  const { store, m } = failingManager(t, script);
  store.upsertResource({ kind: 'WarmPool', name: 'openai', spec: {}, source: 'apply' });
  m.start();
  await eventually(() => store.getStatus('WarmPool', 'openai')?.phase === 'Backoff' && idle(m), 'the first failure');
  t.is(script.observes, 1);
  // Events, as the engine watch delivers them (every container of the pool dying at once).
  for (let i = 0; i < 200; i++) m.context.enqueue('WarmPool', 'openai');
  t.true(idle(m), 'every event was absorbed by the backoff: nothing queued, nothing running');
  m.resync();
  t.true(idle(m), 'resync respects the backoff too');
  for (let i = 0; i < 5; i++) await new Promise((r) => setImmediate(r));
  t.is(script.observes, 1, 'no second run');
  t.is(store.getBackoff('WarmPool', 'openai')?.failures, 1, 'one failure counted, not 201');
  t.is(store.getStatus('WarmPool', 'openai')?.phase, 'Backoff');
  // The status says when the retry comes, as a delay and as a time (a delay alone goes stale).
  const ready = readyOf(store, 'openai')!;
  t.regex(ready.message, /not reachable: connect ENOENT \(next retry in (10m|9m59s), at \d{4}-\d\d-\d\dT[\d:.]+Z\)$/);
  const at = Date.parse(/, at ([^)]+)\)$/.exec(ready.message)![1]!);
  t.is(at, store.getBackoff('WarmPool', 'openai')!.nextAttemptAt, 'the time in the message is the deadline the queue keeps');
  t.is(m.queue.backoffEnds('WarmPool/openai'), at);
});

test('Degraded takes both the count and the time: failures counted by time, not by how often something asked', async (t) => {
  const script: Script = { error: 'down', observes: 0 };
  const { store, m } = failingManager(t, script, { degraded: { afterFailures: 3, afterMs: 60 * 60_000 } });
  store.upsertResource({ kind: 'WarmPool', name: 'p', spec: {}, source: 'apply' });
  m.start();
  await eventually(() => script.observes === 1 && idle(m), 'the first failure');
  // Each backoff ending (here: by hand, not fresh) is one more failure; a count of 6 is not an hour.
  for (let i = 2; i <= 6; i++) {
    m.queue.retryNow('WarmPool/p');
    await eventually(() => script.observes === i && idle(m), `failure ${i}`);
  }
  t.is(store.getStatus('WarmPool', 'p')?.phase, 'Backoff');
  t.is(store.getBackoff('WarmPool', 'p')?.failures, 6);
  const snapshot = store.getSnapshot('WarmPool', 'p') as { context: { failingSince: number } };
  t.true(typeof snapshot.context.failingSince === 'number', 'the streak start is persisted with the snapshot');
});

test('retryNow: the status says "retrying now" at once, the backoff is gone, and the run starts a new streak', async (t) => {
  const script: Script = { error: 'connect ENOENT', observes: 0 };
  const { store, m } = failingManager(t, script, { degraded: { afterFailures: 2, afterMs: 0 } });
  store.upsertResource({ kind: 'WarmPool', name: 'p', spec: {}, source: 'apply' });
  m.start();
  await eventually(() => script.observes === 1 && idle(m), 'the first failure');
  m.queue.retryNow('WarmPool/p'); // the backoff ending, not a cause going away
  await eventually(() => store.getStatus('WarmPool', 'p')?.phase === 'Degraded' && idle(m), 'Degraded');
  t.regex(store.getStatus('WarmPool', 'p')!.conditions.find((c) => c.type === 'Degraded')!.message, /^connect ENOENT \(failing since .+Z, 2 attempt\(s\)\)$/);

  // The cause goes away; the engine may still be failing for a moment.
  m.queue.shutDown(); // hold the run back: what the status says before it settles is the point
  m.retryNow('WarmPool', 'p', 'the docker engine is reachable again');
  t.regex(readyOf(store, 'p')!.message, /^retrying now: the docker engine is reachable again; the last attempt failed: connect ENOENT$/);
  t.is(readyOf(store, 'p')!.reason, 'Degraded', 'the reason stays that of the last run until a run settles');
  t.is(store.getBackoff('WarmPool', 'p'), undefined, 'a restart now would not wait out the old backoff');
  const retrying = store.listEvents({ kind: 'WarmPool', name: 'p' }).find((e) => e.reason === 'Retrying');
  t.truthy(retrying);
  t.regex(retrying!.message, /^retrying now: the docker engine is reachable again \(instead of in \d+m(\d+s)?\)$/);
});

test('after retryNow the failure count starts over: a failure is Backoff (1), not Degraded; success reports the recovery', async (t) => {
  const script: Script = { error: 'connect ENOENT', observes: 0 };
  const { store, m, lines } = failingManager(t, script, { degraded: { afterFailures: 2, afterMs: 0 } });
  store.upsertResource({ kind: 'WarmPool', name: 'p', spec: {}, source: 'apply' });
  m.start();
  await eventually(() => script.observes === 1 && idle(m), 'the first failure');
  m.queue.retryNow('WarmPool/p');
  await eventually(() => store.getStatus('WarmPool', 'p')?.phase === 'Degraded' && idle(m), 'Degraded');

  m.retryNow('WarmPool', 'p', 'the engine is back');
  await eventually(() => script.observes === 3 && idle(m), 'the retry');
  t.is(store.getStatus('WarmPool', 'p')?.phase, 'Backoff', 'one failure of a new streak');
  t.is(store.getBackoff('WarmPool', 'p')?.failures, 1);

  script.error = undefined;
  m.retryNow('WarmPool', 'p', 'the engine is back');
  await eventually(() => store.getStatus('WarmPool', 'p')?.phase === 'Ready' && idle(m), 'Ready');
  t.is(store.getBackoff('WarmPool', 'p'), undefined);
  const converged = store.listEvents({ kind: 'WarmPool', name: 'p' }).find((e) => e.reason === 'Converged');
  t.regex(converged!.message, /^WarmPool p is converged, recovered after 1 failed attempt\(s\) over [\d.]+(ms|s)$/);
  t.true(lines.some((l) => l.level === 'info' && l.message === converged!.message), 'the recovery is logged at info');
});

test('the same failure repeated by retries is logged once as a warning; a new failure warns again; the rest is debug', async (t) => {
  const script: Script = { error: 'connect ENOENT /var/run/docker.sock', observes: 0 };
  const { store, m, lines } = failingManager(t, script);
  store.upsertResource({ kind: 'WarmPool', name: 'p', spec: {}, source: 'apply' });
  m.start();
  await eventually(() => script.observes === 1 && idle(m), 'the first failure');
  for (let i = 2; i <= 6; i++) {
    m.queue.retryNow('WarmPool/p');
    await eventually(() => script.observes === i && idle(m), `retry ${i}`);
  }
  const about = (needle: string) => lines.filter((l) => l.resource === 'WarmPool/p' && l.message.includes(needle));
  t.deepEqual(about('ENOENT').map((l) => l.level), ['warn', 'debug', 'debug', 'debug', 'debug', 'debug'], 'six failures, one warning');
  t.is(store.listEvents({ kind: 'WarmPool', name: 'p' }).find((e) => e.reason === 'SyncFailed')?.count, 6, 'the event still counts every one');

  script.error = 'connect ECONNREFUSED /var/run/docker.sock';
  m.queue.retryNow('WarmPool/p');
  await eventually(() => script.observes === 7 && idle(m), 'a different failure');
  t.deepEqual(about('ECONNREFUSED').map((l) => l.level), ['warn'], 'a change of failure is logged at once');
});

test('a failing key is retried at once for a new spec (fresh count), not for a label change', async (t) => {
  const script: Script = { error: 'down', observes: 0 };
  const { store, m } = failingManager(t, script);
  store.upsertResource({ kind: 'WarmPool', name: 'p', spec: { size: 1 }, source: 'apply' });
  m.start();
  await eventually(() => script.observes === 1 && idle(m), 'the first failure');
  m.queue.retryNow('WarmPool/p');
  await eventually(() => script.observes === 2 && idle(m), 'the second failure');
  t.is(store.getBackoff('WarmPool', 'p')?.failures, 2);

  store.upsertResource({ kind: 'WarmPool', name: 'p', spec: { size: 1 }, labels: { team: 'a' }, source: 'apply' });
  t.true(idle(m), 'a label change is no new cause: the key keeps waiting');
  t.true(m.queue.isBackingOff('WarmPool/p'));

  store.upsertResource({ kind: 'WarmPool', name: 'p', spec: { size: 2 }, source: 'apply' });
  await eventually(() => script.observes === 3 && idle(m), 'the retry for the new spec');
  t.is(store.getBackoff('WarmPool', 'p')?.failures, 1, 'the new spec starts a new streak');
  t.true(store.listEvents({ kind: 'WarmPool', name: 'p' }).some((e) => e.reason === 'Retrying' && e.message.startsWith('retrying now: its spec changed (generation 2)')));
});

test('start: a stored backoff holds against events; one whose spec changed while the daemon was down is retried at once', async (t) => {
  const script: Script = { error: 'down', observes: 0 };
  const seen: string[] = [];
  const controller = scriptedController(script);
  const observe = controller.observe;
  controller.observe = async (d) => {
    seen.push(String(d.generation));
    return observe(d);
  };
  const { store, m } = failingManager(t, script, { controllers: [controller] });
  store.upsertResource({ kind: 'WarmPool', name: 'same', spec: { size: 1 }, source: 'apply' });
  store.upsertResource({ kind: 'WarmPool', name: 'edited', spec: { size: 1 }, source: 'apply' });
  store.upsertResource({ kind: 'WarmPool', name: 'edited', spec: { size: 2 }, source: 'apply' }); // generation 2
  for (const name of ['same', 'edited']) {
    store.setStatus('WarmPool', name, { phase: 'Backoff', conditions: [], observedGeneration: 1 });
    store.setBackoff('WarmPool', name, 7, Date.now() + 30 * 60_000, 'down');
  }
  m.start();
  await eventually(() => seen.length === 1 && idle(m), 'the edited pool');
  t.deepEqual(seen, ['2'], 'only the pool whose spec changed ran');
  m.context.enqueue('WarmPool', 'same');
  t.true(idle(m));
  t.true(m.queue.isBackingOff('WarmPool/same'));
  t.is(store.getBackoff('WarmPool', 'edited')?.failures, 1, 'and it started a new streak');
});

test('a simple controller that keeps failing backs off exponentially, and logs the same error once', async (t) => {
  let runs = 0;
  const simple: SimpleController = {
    kind: 'TurnServer',
    reconcile: async () => {
      runs++;
      throw new Error('cannot read /etc/turn/secret: EACCES');
    },
  };
  const { store, m, lines } = failingManager(t, { error: undefined, observes: 0 }, { controllers: [simple] });
  store.upsertResource({ kind: 'TurnServer', name: 'turn', spec: {}, source: 'apply' });
  m.start();
  await eventually(() => runs === 1 && idle(m), 'the first failure');
  const first = m.queue.backoffEnds('TurnServer/turn')! - Date.now();
  m.context.enqueue('TurnServer', 'turn');
  t.true(idle(m), 'the event waits for the backoff');
  m.queue.retryNow('TurnServer/turn');
  await eventually(() => runs === 2 && idle(m), 'the second failure');
  const second = m.queue.backoffEnds('TurnServer/turn')! - Date.now();
  t.true(first <= 600_000 && second > 600_000, `the delay doubles (${first} then ${second} ms)`);
  t.deepEqual(lines.filter((l) => l.message === 'reconcile failed').map((l) => l.level), ['error', 'debug']);
});

