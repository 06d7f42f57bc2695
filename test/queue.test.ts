// The work queue (src/runtime/queue.ts): de-duplication, one worker per key, delays, backoff.

import test from 'ava';
import { backoffDelay, DEFAULT_BACKOFF, ItemExponentialBackoff, WorkQueue } from '../src/runtime/queue.js';
import { eventually, within } from './helpers/unit-fixtures.js';

/** get() that must resolve soon (a queued key is handed out at once). */
const next = (q: WorkQueue, ms = 1000) => within(q.get(), ms, 'get() resolving');

/** True if get() has not resolved by the time every pending timer of `ms` has had its chance. */
async function stillWaiting(p: Promise<unknown>, ms = 30): Promise<boolean> {
  let settled = false;
  void p.then(() => (settled = true));
  await new Promise((r) => setTimeout(r, ms));
  return !settled;
}

test('a key added 100 times while queued is handed out once', async (t) => {
  const q = new WorkQueue();
  t.teardown(() => q.shutDown());
  for (let i = 0; i < 100; i++) q.add('ProxyPool/a');
  t.is(q.depth, 1);
  t.is(await next(q), 'ProxyPool/a');
  t.is(q.depth, 0);
  t.is(q.busy, 1);
  q.done('ProxyPool/a');
  t.is(q.depth, 0, 'nothing was queued again');
  t.is(q.busy, 0);
  const waiting = q.get();
  t.true(await stillWaiting(waiting), 'no second copy of the key is handed out');
  q.shutDown();
  t.is(await waiting, undefined);
});

test('keys come out in the order they were first added', async (t) => {
  const q = new WorkQueue();
  t.teardown(() => q.shutDown());
  for (const k of ['a', 'b', 'a', 'c', 'b']) q.add(k);
  t.is(q.depth, 3);
  const got = [await next(q), await next(q), await next(q)];
  t.deepEqual(got, ['a', 'b', 'c']);
});

test('a key added while it is being processed is handed out again only after done', async (t) => {
  const q = new WorkQueue();
  t.teardown(() => q.shutDown());
  q.add('k');
  t.is(await next(q), 'k');
  q.add('k');
  q.add('k');
  t.is(q.depth, 0, 'not queued while a worker has it');
  const second = q.get();
  t.true(await stillWaiting(second), 'a second worker does not get the key while the first has it');
  q.done('k');
  t.is(await within(second, 1000, 'the key coming back after done'), 'k');
  q.done('k');
  t.is(q.depth, 0, 'the repeated adds collapsed into one more run');
  t.is(q.busy, 0);
});

test('a waiting worker gets a key the moment it is added', async (t) => {
  const q = new WorkQueue();
  t.teardown(() => q.shutDown());
  const waiting = q.get();
  q.add('x');
  t.is(await within(waiting, 1000, 'the waiting get()'), 'x');
  t.is(q.busy, 1);
  t.is(q.depth, 0);
});

test('4 workers over random adds: never two workers on one key, and every add is followed by a run', async (t) => {
  const q = new WorkQueue();
  t.teardown(() => q.shutDown());
  const keys = ['a', 'b', 'c', 'd', 'e'];
  const active = new Map<string, number>();
  const maxActive = new Map<string, number>();
  let clock = 0;
  const lastAdd = new Map<string, number>();
  const lastStart = new Map<string, number>();
  let runs = 0;
  let seed = 42;
  const rand = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);

  const worker = async () => {
    for (;;) {
      const key = await q.get();
      if (key === undefined) return;
      runs++;
      lastStart.set(key, ++clock);
      const n = (active.get(key) ?? 0) + 1;
      active.set(key, n);
      maxActive.set(key, Math.max(maxActive.get(key) ?? 0, n));
      // Simulated work: yields to the producer and other workers for a random while.
      const hops = Math.floor(rand() * 4);
      for (let i = 0; i < hops; i++) await new Promise((r) => setImmediate(r));
      active.set(key, active.get(key)! - 1);
      q.done(key);
    }
  };
  const workers = [worker(), worker(), worker(), worker()];

  for (let i = 0; i < 2000; i++) {
    const key = keys[Math.floor(rand() * keys.length)]!;
    lastAdd.set(key, ++clock);
    q.add(key);
    if (rand() < 0.5) await new Promise((r) => setImmediate(r));
  }
  await eventually(() => q.depth === 0 && q.busy === 0, 'the queue to drain');
  q.shutDown();
  await within(Promise.all(workers), 1000, 'workers stopping after shutDown');

  for (const k of keys) {
    t.is(maxActive.get(k), 1, `key ${k} was processed by at most one worker at a time`);
    t.true(lastStart.get(k)! > lastAdd.get(k)!, `key ${k} ran after its last add`);
  }
  t.true(runs < 2000, `${runs} runs for 2000 adds: duplicates were collapsed`);
  t.true(runs >= keys.length);
});

test('addAfter hands the key out after the delay, not before', async (t) => {
  const q = new WorkQueue();
  t.teardown(() => q.shutDown());
  const started = Date.now();
  q.addAfter('k', 80);
  t.is(q.delayed, 1);
  t.is(q.depth, 0);
  const key = await within(q.get(), 2000, 'the delayed key');
  const elapsed = Date.now() - started;
  t.is(key, 'k');
  t.true(elapsed >= 75, `handed out after ${elapsed} ms`);
  t.is(q.delayed, 0);
});

test('addAfter: the earlier of two pending adds wins, and add() wins over both', async (t) => {
  const q = new WorkQueue();
  t.teardown(() => q.shutDown());

  // A later deadline does not postpone an earlier one...
  let started = Date.now();
  q.addAfter('a', 50);
  q.addAfter('a', 60_000);
  t.is(q.delayed, 1);
  t.is(await within(q.get(), 5000, 'a at the earlier deadline'), 'a');
  t.true(Date.now() - started < 30_000);
  q.done('a');

  // ...and an earlier one replaces a later one.
  started = Date.now();
  q.addAfter('b', 60_000);
  q.addAfter('b', 50);
  t.is(q.delayed, 1);
  t.is(await within(q.get(), 5000, 'b at the earlier deadline'), 'b');
  t.true(Date.now() - started < 30_000);
  q.done('b');

  // An immediate add cancels the pending delay: no second run later.
  q.addAfter('c', 40);
  q.add('c');
  t.is(q.delayed, 0);
  t.is(q.depth, 1);
  t.is(await next(q), 'c');
  q.done('c');
  const after = q.get();
  t.true(await stillWaiting(after, 120), 'the cancelled timer does not add c again');

  // A key already queued ignores addAfter.
  q.add('d');
  t.is(await within(after, 1000, 'd'), 'd');
  q.add('e');
  q.addAfter('e', 10);
  t.is(q.delayed, 0);
  t.is(q.depth, 1);
});

test('addAfter with a zero or negative delay is an add', async (t) => {
  const q = new WorkQueue();
  t.teardown(() => q.shutDown());
  q.addAfter('now', 0);
  q.addAfter('also-now', -5);
  t.is(q.depth, 2);
  t.is(q.delayed, 0);
});

test('backoffDelay doubles from 200 ms and is capped at 5 minutes', (t) => {
  t.deepEqual(DEFAULT_BACKOFF, { baseMs: 200, capMs: 300_000 });
  t.is(backoffDelay(1), 200);
  t.is(backoffDelay(2), 400);
  t.is(backoffDelay(3), 800);
  t.is(backoffDelay(4), 1600);
  t.is(backoffDelay(11), 204_800);
  t.is(backoffDelay(12), 300_000);
  t.is(backoffDelay(13), 300_000);
  t.is(backoffDelay(1000), 300_000, 'no overflow to Infinity');
  t.is(backoffDelay(0), 200, 'zero failures is still the base delay');
  for (let f = 1; f < 40; f++) t.true(backoffDelay(f + 1) >= backoffDelay(f), `monotonic at ${f}`);
  t.is(backoffDelay(3, { baseMs: 5, capMs: 1_000_000 }), 20);
});

test('shutDown resolves waiting get() calls with undefined and stops accepting keys', async (t) => {
  const q = new WorkQueue();
  const a = q.get();
  const b = q.get();
  q.addAfter('later', 10);
  q.shutDown();
  t.deepEqual(await within(Promise.all([a, b]), 1000, 'waiting gets resolving'), [undefined, undefined]);
  t.true(q.isShuttingDown());
  t.is(q.delayed, 0, 'pending delays are cancelled');
  q.add('x');
  q.addAfter('y', 1);
  t.is(q.depth, 0);
  t.is(await within(q.get(), 1000, 'get after shutdown'), undefined);
});

test('hooks report depth and adds', async (t) => {
  const depths: number[] = [];
  let adds = 0;
  const q = new WorkQueue({ onDepth: (d) => depths.push(d), onAdd: () => adds++ });
  t.teardown(() => q.shutDown());
  q.add('a');
  q.add('a');
  q.add('b');
  t.is(adds, 2, 'a duplicate add is not counted');
  t.deepEqual(depths, [1, 2]);
  await next(q);
  t.is(depths[depths.length - 1], 1);
});

// ---- failure backoff (addRateLimited / retryNow) -------------------------------------------

test('a key waiting out a backoff is not run by add(), however often; retryNow runs it at once', async (t) => {
  const q = new WorkQueue();
  t.teardown(() => q.shutDown());
  q.add('WarmPool/openai');
  t.is(await next(q), 'WarmPool/openai');
  q.addRateLimited('WarmPool/openai', 60_000);
  q.done('WarmPool/openai');
  // The burst: containers dying while dockerd shuts down, one event each.
  for (let i = 0; i < 100; i++) q.add('WarmPool/openai');
  t.true(q.isBackingOff('WarmPool/openai'));
  t.is(q.depth, 0, 'every add was absorbed by the backoff');
  t.is(q.delayed, 1, 'the one retry, when the backoff ends');
  const waiting = q.get();
  t.true(await stillWaiting(waiting, 100));
  q.retryNow('WarmPool/openai');
  t.is(await within(waiting, 1000, 'the key after retryNow'), 'WarmPool/openai');
  t.false(q.isBackingOff('WarmPool/openai'));
  t.is(q.delayed, 0, 'the backoff timer is gone: no second run later');
});

test('the backoff ends by itself: the key runs once, however many adds it absorbed', async (t) => {
  const q = new WorkQueue();
  t.teardown(() => q.shutDown());
  q.addRateLimited('k', 40);
  for (let i = 0; i < 10; i++) q.add('k');
  t.is(await within(q.get(), 5000, 'k after its backoff'), 'k');
  q.done('k');
  t.true(await stillWaiting(q.get(), 120), 'k is not handed out a second time');
});

test('an event during the failing run is absorbed too: the run does not repeat at once', async (t) => {
  const q = new WorkQueue();
  t.teardown(() => q.shutDown());
  q.add('k');
  t.is(await next(q), 'k');
  q.add('k'); // arrives while the worker has the key: would normally mean one more run after done
  q.addRateLimited('k', 60_000); // the run failed
  q.done('k');
  t.is(q.depth, 0);
  t.true(q.isBackingOff('k'));
});

test('retryNow while the key is being processed: the run in flight fails, and the key still runs again right after it', async (t) => {
  const q = new WorkQueue();
  t.teardown(() => q.shutDown());
  q.add('k');
  t.is(await next(q), 'k');
  q.retryNow('k'); // the engine came back while this run (started before) was failing
  q.addRateLimited('k', 60_000);
  t.false(q.isBackingOff('k'), 'the failure of a run that started before the cause went away starts no backoff');
  q.done('k');
  t.is(q.depth, 1);
  t.is(await next(q), 'k');
  q.addRateLimited('k', 60_000);
  q.done('k');
  t.true(q.isBackingOff('k'), 'the next failure backs off as usual');
});

test('addAfter (a requeueAfter) does not cut a backoff short; add() cuts a requeueAfter short', async (t) => {
  const q = new WorkQueue();
  t.teardown(() => q.shutDown());
  q.addAfter('ok', 60_000);
  q.add('ok');
  t.is(q.depth, 1);
  t.is(q.delayed, 0);
  t.is(await next(q), 'ok');
  q.addRateLimited('failing', 60_000);
  q.addAfter('failing', 10);
  t.true(await stillWaiting(q.get(), 100), 'no run at the requeueAfter');
  t.true(q.isBackingOff('failing'));
});

test('backoffs by an injected clock: a late timer does not hold a key past its deadline', (t) => {
  let now = 1_000_000;
  const q = new WorkQueue({}, () => now);
  t.teardown(() => q.shutDown());
  const table: Array<[at: number, expectQueued: boolean]> = [
    [1_000_000, false],
    [1_000_500, false],
    [1_000_999, false],
    [1_001_000, true], // the deadline: the event loop stalled and the timer has not fired yet
  ];
  q.addRateLimited('k', 1000);
  t.is(q.backoffEnds('k'), 1_001_000);
  for (const [at, expectQueued] of table) {
    now = at;
    q.add('k');
    t.is(q.depth === 1, expectQueued, `add at +${at - 1_000_000} ms`);
  }
  t.is(q.delayed, 0, 'the stale timer is cancelled, so the key does not run twice');
  t.is(q.backoffEnds('k'), undefined);
});

test('ItemExponentialBackoff: controller-runtime\'s per-item rate limiter', (t) => {
  const r = new ItemExponentialBackoff({ baseMs: 5, capMs: 1000 });
  const table: Array<[op: 'when' | 'forget', key: string, want: number]> = [
    ['when', 'a', 5],
    ['when', 'a', 10],
    ['when', 'b', 5], // per item
    ['when', 'a', 20],
    ['forget', 'a', 0],
    ['when', 'a', 5], // forgotten: from the base again
    ['when', 'b', 10],
  ];
  for (const [op, key, want] of table) {
    if (op === 'when') t.is(r.when(key), want, `${op} ${key}`);
    else {
      r.forget(key);
      t.is(r.numRequeues(key), want);
    }
  }
  for (let i = 0; i < 20; i++) r.when('c');
  t.is(r.when('c'), 1000, 'capped');
  t.is(r.numRequeues('c'), 21);
});
