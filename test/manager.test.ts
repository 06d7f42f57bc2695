import test from 'ava';
import { silentLogger } from '../src/observability/logger.js';
import { Metrics } from '../src/observability/metrics.js';
import type { SimpleController } from '../src/runtime/controller.js';
import { Manager } from '../src/runtime/manager.js';
import { openStore } from './helpers/unit-fixtures.js';

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
