// Port allocation (src/state/allocations.ts) and the API path that uses it
// (src/controllers/proxyport/service.ts), including concurrent and cross-process allocation.

import test from 'ava';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { AdmissionError } from '../src/desired/apply.js';
import { ADMISSIONS } from '../src/controllers/registry.js';
import { applyPath } from '../src/desired/apply.js';
import { ensureUserPort, InvalidInputError, removeUserPort } from '../src/controllers/proxyport/service.js';
import { boundAllocationOf, listAllocations, PortAllocationError, PortAllocator, releasePort, type PortRange } from '../src/state/allocations.js';
import type { Store } from '../src/state/store.js';
import { requireCurrentBuild } from './helpers/build.js';
import { openStore, poolYaml, REPO_ROOT, tempDir, validator, within, writeFiles } from './helpers/unit-fixtures.js';

const HOUR = 3_600_000;
const RANGE: PortRange = { min: 10001, max: 10010 };

function allocator(store: Store, opts: { range?: PortRange; cooldownMs?: number; now?: Date; pool?: string } = {}): PortAllocator {
  return new PortAllocator(store, opts.pool ?? 'default', opts.range ?? RANGE, opts.cooldownMs ?? HOUR, opts.now ?? new Date());
}

/** Allocates in one store transaction, as the admission does. */
function alloc(store: Store, a: PortAllocator, userId: string, port?: number): { port: number; created: boolean } {
  return store.transaction(() => a.allocate(userId, userId, port));
}

function code(fn: () => unknown): string | undefined {
  try {
    fn();
  } catch (err) {
    if (err instanceof PortAllocationError) return err.code;
    throw err;
  }
  return undefined;
}

function seedPool(t: import('ava').ExecutionContext, store: Store, opts: Parameters<typeof poolYaml>[1] = {}): void {
  const dir = tempDir(t);
  writeFiles(dir, { 'pool.yaml': poolYaml('default', opts) });
  const r = applyPath(store, validator(), ADMISSIONS, dir);
  if (!r.ok) throw new Error(JSON.stringify(r.problems));
}

// ---- PortAllocator ---------------------------------------------------------------

test('ports come from the bottom of the range, one per user, and a user asking again gets the same one', (t) => {
  const { store } = openStore(t);
  const a = allocator(store);
  t.deepEqual(alloc(store, a, 'alice'), { port: 10001, created: true });
  t.deepEqual(alloc(store, a, 'bob'), { port: 10002, created: true });
  t.deepEqual(alloc(store, a, 'carol'), { port: 10003, created: true });
  t.deepEqual(alloc(store, a, 'alice'), { port: 10001, created: false });
  // A fresh allocator (the next transaction) reads the table again.
  const b = allocator(store);
  t.deepEqual(alloc(store, b, 'bob'), { port: 10002, created: false });
  t.deepEqual(alloc(store, b, 'dave'), { port: 10004, created: true });
  const all = listAllocations(store, 'default');
  t.deepEqual(all.map((x) => [x.userId, x.port, x.state]), [
    ['alice', 10001, 'bound'],
    ['bob', 10002, 'bound'],
    ['carol', 10003, 'bound'],
    ['dave', 10004, 'bound'],
  ]);
});

test('an explicit port is honoured; a free gap below is still used next', (t) => {
  const { store } = openStore(t);
  const a = allocator(store);
  t.deepEqual(alloc(store, a, 'alice', 10005), { port: 10005, created: true });
  t.is(alloc(store, a, 'bob').port, 10001);
  t.is(allocator(store).allocate('carol', 'carol').port, 10002);
  t.is(code(() => alloc(store, allocator(store), 'dave', 10005)), 'PORT_TAKEN');
});

test('PORT_TAKEN, PORT_OUT_OF_RANGE and USER_HAS_PORT', (t) => {
  const { store } = openStore(t);
  const a = allocator(store);
  alloc(store, a, 'alice', 10003);
  const taken = t.throws(() => alloc(store, a, 'bob', 10003), { instanceOf: PortAllocationError });
  t.is((taken as PortAllocationError).code, 'PORT_TAKEN');
  t.regex(taken!.message, /port 10003 is already held by user alice/);

  for (const port of [10000, 10011, 80, 10001.5]) {
    t.is(code(() => alloc(store, a, 'bob', port)), 'PORT_OUT_OF_RANGE', String(port));
  }
  t.is(code(() => alloc(store, a, 'alice', 10004)), 'USER_HAS_PORT', 'a user cannot switch ports without removing the old one');
  t.is(code(() => alloc(store, allocator(store, { pool: 'other', range: { min: 20001, max: 20010 } }), 'alice')), 'USER_HAS_PORT', 'one port per user across pools');
  t.is(listAllocations(store).length, 1, 'failed allocations wrote nothing');
});

test('POOL_EXHAUSTED once every port of a tiny range is bound or cooling down', (t) => {
  const { store } = openStore(t);
  const range = { min: 10001, max: 10003 };
  const a = allocator(store, { range });
  alloc(store, a, 'u1');
  alloc(store, a, 'u2');
  alloc(store, a, 'u3');
  t.is(code(() => alloc(store, a, 'u4')), 'POOL_EXHAUSTED');
  releasePort(store, 'u2');
  t.is(code(() => alloc(store, allocator(store, { range }), 'u4')), 'POOL_EXHAUSTED', 'a cooling port is not free');
  const err = t.throws(() => alloc(store, allocator(store, { range }), 'u4'));
  t.regex(err!.message, /no free port left in 10001-10003 for user u4/);
});

test('a released port cools down: nobody else gets it, its previous user does', (t) => {
  const { store } = openStore(t);
  alloc(store, allocator(store), 'alice');
  alloc(store, allocator(store), 'bob');
  const releasedAt = new Date();
  t.is(store.transaction(() => releasePort(store, 'alice', undefined, releasedAt)), 10001);
  t.is(releasePort(store, 'alice'), undefined, 'releasing twice is a no-op');
  t.is(boundAllocationOf(store, 'alice'), undefined);
  t.deepEqual(listAllocations(store).map((x) => [x.port, x.userId, x.state]), [
    [10001, 'alice', 'cooldown'],
    [10002, 'bob', 'bound'],
  ]);

  const soon = new Date(releasedAt.getTime() + HOUR - 1000);
  const explicit = t.throws(() => alloc(store, allocator(store, { now: soon }), 'carol', 10001), { instanceOf: PortAllocationError });
  t.is((explicit as PortAllocationError).code, 'PORT_COOLING_DOWN');
  t.regex(explicit!.message, /released by user alice .* cools down until/);
  t.is(alloc(store, allocator(store, { now: soon }), 'carol').port, 10003, 'the allocator skips the cooling port');

  t.deepEqual(alloc(store, allocator(store, { now: soon }), 'alice'), { port: 10001, created: true }, 'alice gets her old port back');
  t.is(boundAllocationOf(store, 'alice')!.port, 10001);
});

test('releasing with a resource name releases only a binding held by that ProxyPort', (t) => {
  const { store } = openStore(t);
  store.transaction(() => allocator(store).allocate('alice', 'alice-new'));
  t.is(releasePort(store, 'alice', 'alice-old'), undefined, 'an old ProxyPort of the user does not release the new one\'s port');
  t.is(boundAllocationOf(store, 'alice')!.port, 10001);
  t.is(releasePort(store, 'alice', 'alice-new'), 10001);
  t.is(boundAllocationOf(store, 'alice'), undefined);
});

test('the previous user may also ask for the cooling port explicitly', (t) => {
  const { store } = openStore(t);
  alloc(store, allocator(store), 'alice', 10007);
  releasePort(store, 'alice');
  t.deepEqual(alloc(store, allocator(store), 'alice', 10007), { port: 10007, created: true });
});

test('after the cooldown the port is free for anyone again', (t) => {
  const { store } = openStore(t);
  alloc(store, allocator(store), 'alice');
  const releasedAt = new Date();
  releasePort(store, 'alice', undefined, releasedAt);
  const later = new Date(releasedAt.getTime() + HOUR);
  t.deepEqual(alloc(store, allocator(store, { now: later }), 'bob'), { port: 10001, created: true }, 'the lowest port is free again');
  const row = listAllocations(store).find((x) => x.port === 10001)!;
  t.is(row.userId, 'bob');
  t.is(row.state, 'bound');
  t.is(row.releasedAt, null);
  // And now alice, who comes back later, gets a new port.
  t.is(alloc(store, allocator(store, { now: later }), 'alice').port, 10002);
});

test('an explicit request for a cooled-down port succeeds after the cooldown', (t) => {
  const { store } = openStore(t);
  alloc(store, allocator(store), 'alice', 10009);
  const releasedAt = new Date();
  releasePort(store, 'alice', undefined, releasedAt);
  t.is(code(() => alloc(store, allocator(store, { now: new Date(releasedAt.getTime() + 10) }), 'bob', 10009)), 'PORT_COOLING_DOWN');
  t.deepEqual(alloc(store, allocator(store, { now: new Date(releasedAt.getTime() + HOUR + 1) }), 'bob', 10009), { port: 10009, created: true });
});

// ---- ensureUserPort (the API and `proxyport add`) ------------------------------------

test('ensureUserPort is idempotent per user and validates its input', (t) => {
  const { store } = openStore(t);
  seedPool(t, store, { min: 11000, max: 11999 });
  const v = validator();
  const first = ensureUserPort(store, v, { userId: 'alice', sourceIP: '10.0.0.1' });
  t.true(first.created);
  t.is(first.port, 11000);
  t.is(first.resource.metadata.name, 'alice');
  t.is(first.resource.source, 'api');
  const again = ensureUserPort(store, v, { userId: 'alice', sourceIP: '10.0.0.1' });
  t.false(again.created);
  t.is(again.port, 11000);
  t.is(again.resource.metadata.generation, 1);

  // A new address moves the user's rule; the port stays.
  const moved = ensureUserPort(store, v, { userId: 'alice', sourceIP: '10.0.0.77' });
  t.is(moved.port, 11000);
  t.is(moved.resource.metadata.generation, 2);

  // A userId that is not a DNS label gets a stable digest name.
  const odd = ensureUserPort(store, v, { userId: 'Some.User@example', sourceIP: '10.0.0.2' });
  t.regex(odd.resource.metadata.name, /^u-[0-9a-f]{16}$/);
  t.is(ensureUserPort(store, v, { userId: 'Some.User@example', sourceIP: '10.0.0.2' }).resource.metadata.name, odd.resource.metadata.name);

  const bad = t.throws(() => ensureUserPort(store, v, { userId: 'x; iptables -F', sourceIP: '1.2.3.4; reboot', port: '80' }), { instanceOf: InvalidInputError });
  t.deepEqual([...new Set((bad as InvalidInputError).problems.map((p) => p.field))].sort(), ['spec.port', 'spec.sourceIP', 'spec.userId']);

  const sameSource = t.throws(() => ensureUserPort(store, v, { userId: 'mallory', sourceIP: '10.0.0.2' }), { instanceOf: AdmissionError });
  t.is((sameSource as AdmissionError).code, 'SOURCE_IN_USE');

  const noPool = t.throws(() => ensureUserPort(store, v, { userId: 'zed', sourceIP: '10.0.0.9', pool: 'nope' }), { instanceOf: AdmissionError });
  t.is((noPool as AdmissionError).code, 'POOL_NOT_FOUND');
  t.is(store.listResources('ProxyPort').length, 2, 'refused requests stored nothing');
});

test('a removed user port is being deleted: asking again is refused until it is gone', (t) => {
  const { store } = openStore(t);
  seedPool(t, store);
  const v = validator();
  ensureUserPort(store, v, { userId: 'alice', sourceIP: '10.0.0.1' });
  const removed = removeUserPort(store, 'alice');
  t.is(removed!.metadata.name, 'alice');
  t.truthy(store.getResource('ProxyPort', 'alice')!.metadata.deletionTimestamp);
  t.is(removeUserPort(store, 'nobody'), undefined);
  const err = t.throws(() => ensureUserPort(store, v, { userId: 'alice', sourceIP: '10.0.0.1' }), { instanceOf: AdmissionError });
  t.is((err as AdmissionError).code, 'DELETING');
});

test('200 concurrent ensureUserPort calls for distinct users get 200 distinct ports', async (t) => {
  const { store } = openStore(t);
  seedPool(t, store);
  const v = validator();
  const results = await Promise.all(
    Array.from({ length: 200 }, async (_, i) => {
      await Promise.resolve();
      return ensureUserPort(store, v, { userId: `user-${i}`, sourceIP: `10.1.${Math.floor(i / 250)}.${(i % 250) + 1}` });
    }),
  );
  const ports = results.map((r) => r.port);
  t.is(new Set(ports).size, 200);
  t.true(ports.every((p) => p >= 10001 && p <= 10200), 'the lowest 200 ports');
  const stored = listAllocations(store, 'default');
  t.is(stored.length, 200);
  t.is(new Set(stored.map((a) => a.port)).size, 200);
  t.is(new Set(stored.map((a) => a.userId)).size, 200);
  for (const r of results) t.is(boundAllocationOf(store, r.resource.spec.userId)!.port, r.port);
});

test('4 processes allocating 50 users each against one database get 200 distinct ports, no SQLITE_BUSY', async (t) => {
  const { store, file } = openStore(t);
  seedPool(t, store);
  // The workers run compiled (dist/, see helpers/build.ts), not through tsx: four tsx starts cost
  // some 16 s of CPU, which on a loaded 2-core machine was load for every other test.
  requireCurrentBuild();
  const workerSource = path.join(REPO_ROOT, 'test', 'helpers', 'unit-allocate-worker.ts');
  const worker = path.join(REPO_ROOT, 'dist', 'test', 'helpers', 'unit-allocate-worker.js');
  if (!fs.existsSync(worker) || fs.statSync(worker).mtimeMs < fs.statSync(workerSource).mtimeMs) {
    throw new Error(`${worker} is missing or older than ${workerSource}: run \`npm run build\` (npm test compiles before it tests)`);
  }
  const children = [0, 1, 2, 3].map((w) => {
    const child = spawn(process.execPath, [worker, file, `w${w}`, '50', String(100 + w)], {
      cwd: REPO_ROOT,
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    t.teardown(() => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const ready = new Promise<void>((resolve, reject) => {
      const check = () => (stdout.startsWith('ready\n') ? resolve() : undefined);
      child.stdout.on('data', check);
      child.on('close', (c) => reject(new Error(`worker ${w} exited ${c} before it was ready: ${stderr}`)));
    });
    const done = new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) =>
      child.on('close', (c) => resolve({ code: c, stdout, stderr })),
    );
    return { child, ready, done };
  });
  await within(Promise.all(children.map((c) => c.ready)), 60_000, 'all workers ready');
  for (const c of children) c.child.stdin.end('go\n');
  const outs = await within(Promise.all(children.map((c) => c.done)), 90_000, 'all workers finished');

  const ports: number[] = [];
  const errors: string[] = [];
  for (const [i, o] of outs.entries()) {
    t.is(o.code, 0, `worker ${i}: ${o.stderr}`);
    const line = o.stdout.split('\n').find((l) => l.startsWith('{'));
    t.truthy(line, `worker ${i} printed its result: ${o.stdout} ${o.stderr}`);
    const parsed = JSON.parse(line!) as { ports: Array<{ port: number }>; errors: string[] };
    ports.push(...parsed.ports.map((p) => p.port));
    errors.push(...parsed.errors);
  }
  t.deepEqual(errors, [], 'no allocation failed (no SQLITE_BUSY)');
  t.is(ports.length, 200);
  t.is(new Set(ports).size, 200, 'every port is distinct');
  const stored = listAllocations(store, 'default');
  t.is(stored.length, 200);
  t.deepEqual(stored.map((a) => a.port), Array.from({ length: 200 }, (_, i) => 10001 + i), 'and they are the lowest 200 ports');
  t.is(store.listResources('ProxyPort').length, 200);
});
