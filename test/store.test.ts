// The SQLite store (src/state/store.ts, migrations.ts, lease.ts) on real database files.

import test from 'ava';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import Database from 'better-sqlite3';
import { Lease, LeaseHeldError, SqliteLeaderElector } from '../src/state/lease.js';
import { MIGRATIONS } from '../src/state/migrations.js';
import { Store } from '../src/state/store.js';
import type { Change } from '../src/state/types.js';
import { requireCurrentBuild } from './helpers/build.js';
import { openStore, REPO_ROOT, tempDir, within } from './helpers/unit-fixtures.js';

const spec = (n: number) => ({ userId: `u${n}`, sourceIP: `10.0.0.${n}` });

// ---- WAL checkpoints off the hot path ---------------------------------------------

const walPages = (file: string) => Math.floor((fs.existsSync(`${file}-wal`) ? fs.statSync(`${file}-wal`).size : 0) / 4096);

test('background checkpoints: commits never checkpoint, a worker thread copies the log back, close leaves it empty', async (t) => {
  const { store, file } = openStore(t);
  const results: Array<{ log: number; checkpointed: number }> = [];
  const errors: string[] = [];
  const cp = store.checkpointInBackground({ intervalMs: 3_600_000, onError: (m) => errors.push(m), onCheckpoint: (r) => results.push(r) })!;
  t.true(cp.running);
  t.is(store.db.pragma('wal_autocheckpoint', { simple: true }), 0, 'the connection no longer checkpoints on commit');
  // Well past SQLite's 1000-page threshold: with auto-checkpoints the log would have been rewound.
  const big = 'x'.repeat(3000);
  for (let i = 0; i < 1500; i++) store.upsertResource({ kind: 'ProxyPort', name: `p${i}`, spec: { ...spec(1), note: big }, source: 'apply' });
  t.true(walPages(file) > 1000, `${walPages(file)} pages in the log`);
  cp.checkpointNow();
  await within((async () => {
    while (!results.some((r) => r.log > 1000 && r.checkpointed === r.log)) await new Promise((r) => setTimeout(r, 20));
  })(), 60_000, 'a full checkpoint by the worker'); // hang guard: a worker thread's start and a 6 MB checkpoint, on a loaded machine
  // The next commit starts the log over: it does not keep growing.
  store.upsertResource({ kind: 'ProxyPort', name: 'after', spec: spec(2), source: 'apply' });
  const db = new Database(file, { readonly: true });
  t.is((db.prepare('SELECT count(*) AS n FROM resources').get() as { n: number }).n, 1501, 'everything is readable from another connection');
  db.close();
  t.deepEqual(errors, []);
  store.close();
  t.is(walPages(file), 0, 'close checkpoints what is left and truncates the log');
  const again = new Store(file);
  t.is(again.listKeys().length, 1501);
  again.close();
});

test('background checkpoints: a worker that cannot start gives the connection its auto-checkpoints back, and says why', async (t) => {
  const { store } = openStore(t);
  const { BackgroundCheckpointer } = await import('../src/state/checkpointer.js');
  const errors: string[] = [];
  const cp = new BackgroundCheckpointer(store.db, store.file, { intervalMs: 1000, onError: (m) => errors.push(m) }, '/nonexistent/better-sqlite3');
  await within((async () => {
    while (errors.length === 0) await new Promise((r) => setTimeout(r, 20));
  })(), 60_000, 'the worker failure'); // hang guard
  t.regex(errors[0]!, /nonexistent/);
  t.false(cp.running);
  t.is(store.db.pragma('wal_autocheckpoint', { simple: true }), 1000);
});

// ---- file, journal and migrations ------------------------------------------------

test('the database is in WAL mode and its files are readable by the owner only (0600)', (t) => {
  const { store, file } = openStore(t);
  t.is(store.db.pragma('journal_mode', { simple: true }), 'wal');
  store.upsertResource({ kind: 'ProxyPort', name: 'a', spec: spec(1), source: 'apply' });
  t.is(fs.statSync(file).mode & 0o777, 0o600);
  // After a write in WAL mode both side files exist, and they must be as private as the database.
  for (const extra of ['-wal', '-shm']) {
    t.true(fs.existsSync(file + extra), `${extra} file exists`);
    t.is(fs.statSync(file + extra).mode & 0o777, 0o600, `${extra} file mode`);
  }
  // A second connection (another process would do the same) sees WAL too: it is persistent.
  const other = new Database(file, { readonly: true });
  t.teardown(() => other.close());
  t.is(other.pragma('journal_mode', { simple: true }), 'wal');
});

test('an existing database file with loose permissions is tightened to 0600 on open', (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'loose.db');
  fs.writeFileSync(file, '');
  fs.chmodSync(file, 0o666);
  const store = new Store(file);
  t.teardown(() => store.close());
  t.is(fs.statSync(file).mode & 0o777, 0o600);
});

test('migrations are recorded in schema_migrations and reopening does not apply them again', (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'state.db');
  const first = new Store(file);
  const rows1 = first.db.prepare('SELECT version, name, applied_at FROM schema_migrations ORDER BY version').all() as Array<{
    version: number;
    name: string;
    applied_at: string;
  }>;
  t.deepEqual(
    rows1.map((r) => [r.version, r.name]),
    MIGRATIONS.map((m) => [m.version, m.name]),
  );
  first.upsertResource({ kind: 'ProxyPort', name: 'keep', spec: spec(1), source: 'apply' });
  first.close();

  const second = new Store(file);
  t.teardown(() => second.close());
  const rows2 = second.db.prepare('SELECT version, name, applied_at FROM schema_migrations ORDER BY version').all();
  t.deepEqual(rows2, rows1, 'the same rows, same applied_at: nothing re-applied');
  t.truthy(second.getResource('ProxyPort', 'keep'), 'data survives a reopen');
});

test('a database whose schema is newer than this build is refused and left untouched', (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'state.db');
  const s = new Store(file);
  const newer = Math.max(...MIGRATIONS.map((m) => m.version)) + 1;
  s.db.prepare('INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)').run(newer, 'from-the-future', 'x');
  s.close();
  const err = t.throws(() => new Store(file));
  t.regex(err!.message, new RegExp(`schema version ${newer} is newer than this build`));
  const raw = new Database(file, { readonly: true });
  t.teardown(() => raw.close());
  t.is((raw.prepare('SELECT count(*) AS n FROM schema_migrations').get() as { n: number }).n, MIGRATIONS.length + 1);
});

// ---- resources ----------------------------------------------------------------

test('generation moves only on spec changes; labels, annotations and source move resourceVersion only', (t) => {
  const { store } = openStore(t);
  const a = store.upsertResource({ kind: 'ProxyPort', name: 'a', spec: spec(1), source: 'apply', labels: { team: 'x' } });
  t.true(a.created);
  t.is(a.resource.metadata.generation, 1);
  const rv1 = a.resource.metadata.resourceVersion;

  const same = store.upsertResource({ kind: 'ProxyPort', name: 'a', spec: { sourceIP: '10.0.0.1', userId: 'u1' }, source: 'apply', labels: { team: 'x' } });
  t.false(same.specChanged, 'key order does not make a spec change');
  t.false(same.metaChanged);
  t.is(same.resource.metadata.generation, 1);
  t.is(same.resource.metadata.resourceVersion, rv1, 'a no-op write does not move resourceVersion');

  const relabeled = store.upsertResource({ kind: 'ProxyPort', name: 'a', spec: spec(1), source: 'apply', labels: { team: 'y' } });
  t.false(relabeled.specChanged);
  t.true(relabeled.metaChanged);
  t.is(relabeled.resource.metadata.generation, 1);
  t.true(relabeled.resource.metadata.resourceVersion > rv1);
  t.deepEqual(relabeled.resource.metadata.labels, { team: 'y' });

  const annotated = store.upsertResource({
    kind: 'ProxyPort', name: 'a', spec: spec(1), source: 'api', labels: { team: 'y' }, annotations: { note: 'n' },
  });
  t.is(annotated.resource.metadata.generation, 1);
  t.true(annotated.resource.metadata.resourceVersion > relabeled.resource.metadata.resourceVersion);

  const changed = store.upsertResource({ kind: 'ProxyPort', name: 'a', spec: spec(2), source: 'api', labels: { team: 'y' }, annotations: { note: 'n' } });
  t.true(changed.specChanged);
  t.is(changed.resource.metadata.generation, 2);
  t.is(store.getResource('ProxyPort', 'a')!.metadata.generation, 2);
  t.is(store.getResource('ProxyPort', 'a')!.metadata.uid, a.resource.metadata.uid, 'uid is stable across updates');
});

test('requestDeletion sets deletionTimestamp once; a later upsert clears it; removeResource deletes everything but events', (t) => {
  const { store } = openStore(t);
  store.upsertResource({ kind: 'ProxyPort', name: 'a', spec: spec(1), source: 'apply' });
  store.setStatus('ProxyPort', 'a', { phase: 'Ready', conditions: [] });
  store.setSnapshot('ProxyPort', 'a', { value: 'Ready' });
  store.setBackoff('ProxyPort', 'a', 2, Date.now() + 1000, 'boom');
  store.recordEvent({ kind: 'ProxyPort', name: 'a', type: 'Normal', reason: 'Created', message: 'made' });

  t.true(store.requestDeletion('ProxyPort', 'a'));
  const marked = store.getResource('ProxyPort', 'a')!;
  t.truthy(marked.metadata.deletionTimestamp);
  const seq = store.latestChangeSeq();
  t.true(store.requestDeletion('ProxyPort', 'a'), 'asking again still reports the resource exists');
  t.is(store.latestChangeSeq(), seq, 'a repeated deletion request records no change');
  t.false(store.requestDeletion('ProxyPort', 'missing'));

  const revived = store.upsertResource({ kind: 'ProxyPort', name: 'a', spec: spec(1), source: 'apply' });
  t.true(revived.metaChanged);
  t.is(revived.resource.metadata.deletionTimestamp, undefined);
  t.is(revived.resource.metadata.generation, 1);

  t.true(store.removeResource('ProxyPort', 'a'));
  t.is(store.getResource('ProxyPort', 'a'), undefined);
  t.is(store.getStatus('ProxyPort', 'a'), undefined);
  t.is(store.getSnapshot('ProxyPort', 'a'), undefined);
  t.is(store.getBackoff('ProxyPort', 'a'), undefined);
  t.is(store.listEvents({ kind: 'ProxyPort', name: 'a' }).length, 1, 'events age out, they are not deleted with the resource');
  t.false(store.removeResource('ProxyPort', 'a'));
});

test('setStatus writes only when the status differs', (t) => {
  const { store } = openStore(t);
  store.upsertResource({ kind: 'ProxyPort', name: 'a', spec: spec(1), source: 'apply' });
  const st = { phase: 'Ready', observedGeneration: 1, conditions: [] };
  t.true(store.setStatus('ProxyPort', 'a', st));
  t.false(store.setStatus('ProxyPort', 'a', { ...st }));
  t.true(store.setStatus('ProxyPort', 'a', { ...st, phase: 'Drifted' }));
  t.is(store.getResource('ProxyPort', 'a')!.status!.phase, 'Drifted');
  t.deepEqual(store.phaseCounts(), [{ kind: 'ProxyPort', phase: 'Drifted', n: 1 }]);
});

// ---- events -------------------------------------------------------------------

test('a repeat of the latest event of a resource bumps its count instead of adding a row', (t) => {
  const { store } = openStore(t);
  const e = { kind: 'ProxyPool', name: 'p', type: 'Warning' as const, reason: 'Drift', message: '3 rules missing' };
  store.recordEvent(e);
  store.recordEvent(e);
  store.recordEvent(e);
  let events = store.listEvents({ kind: 'ProxyPool', name: 'p' });
  t.is(events.length, 1);
  t.is(events[0]!.count, 3);
  t.true(events[0]!.lastTimestamp >= events[0]!.firstTimestamp);

  store.recordEvent({ ...e, message: '1 rule missing' });
  store.recordEvent({ ...e, type: 'Normal' });
  // Another resource's identical event is its own row.
  store.recordEvent({ ...e, name: 'q' });
  events = store.listEvents({ kind: 'ProxyPool', name: 'p' });
  t.deepEqual(events.map((x) => [x.type, x.message, x.count]), [
    ['Warning', '3 rules missing', 3],
    ['Warning', '1 rule missing', 1],
    ['Normal', '3 rules missing', 1],
  ]);
  t.is(store.listEvents({ name: 'q' }).length, 1);
});

test('event retention keeps at most retention + 100 events and always the newest', (t) => {
  const { store } = openStore(t, { eventRetention: 50 });
  for (let i = 0; i < 500; i++) {
    store.recordEvent({ kind: 'ProxyPort', name: `p${i % 7}`, type: 'Normal', reason: 'Tick', message: `event ${i}` });
  }
  const total = (store.db.prepare('SELECT count(*) AS n FROM events').get() as { n: number }).n;
  t.true(total >= 50, `${total} events kept`);
  t.true(total <= 150, `${total} events kept`);
  const all = store.listEvents({ limit: 1000 });
  t.is(all.length, total);
  t.is(all[all.length - 1]!.message, 'event 499', 'the newest event is kept');
  const kept = new Set(all.map((e) => Number(e.message.split(' ')[1])));
  for (let i = 500 - 50; i < 500; i++) t.true(kept.has(i), `event ${i} (one of the newest 50) is kept`);
});

// ---- change feed and transactions -----------------------------------------------

test('the change feed has strictly increasing seqs and changesSince returns exactly what came later', (t) => {
  const { store } = openStore(t);
  const heard: Change[] = [];
  store.on('change', (c: Change) => heard.push(c));
  t.is(store.latestChangeSeq(), 0);
  store.upsertResource({ kind: 'ProxyPort', name: 'a', spec: spec(1), source: 'apply' });
  store.upsertResource({ kind: 'ProxyPort', name: 'b', spec: spec(2), source: 'apply' });
  const mid = store.latestChangeSeq();
  store.upsertResource({ kind: 'ProxyPort', name: 'a', spec: spec(3), source: 'apply' });
  store.requestDeletion('ProxyPort', 'b');
  store.removeResource('ProxyPort', 'b');

  const all = store.changesSince(0);
  t.deepEqual(all.map((c) => [c.kind, c.name, c.op]), [
    ['ProxyPort', 'a', 'upsert'],
    ['ProxyPort', 'b', 'upsert'],
    ['ProxyPort', 'a', 'upsert'],
    ['ProxyPort', 'b', 'delete-requested'],
    ['ProxyPort', 'b', 'deleted'],
  ]);
  for (let i = 1; i < all.length; i++) t.true(all[i]!.seq > all[i - 1]!.seq);
  t.deepEqual(store.changesSince(mid), all.slice(2));
  t.deepEqual(store.changesSince(store.latestChangeSeq()), []);
  t.deepEqual(store.changesSince(0, 2), all.slice(0, 2), 'limit is honoured');
  t.deepEqual(heard, all, 'listeners heard the same changes, in order');
  t.is(store.getResource('ProxyPort', 'a')!.metadata.resourceVersion, all[2]!.seq, 'resourceVersion is the change seq');
});

test('another connection (the CLI in another process) sees changes through changesSince', (t) => {
  const { store, file } = openStore(t);
  const from = store.latestChangeSeq();
  const cliStore = new Store(file);
  t.teardown(() => cliStore.close());
  cliStore.upsertResource({ kind: 'ProxyPort', name: 'x', spec: spec(9), source: 'apply' });
  t.deepEqual(store.changesSince(from).map((c) => c.name), ['x']);
});

test('change listeners fire only after the outermost commit', (t) => {
  const { store } = openStore(t);
  const heard: string[] = [];
  store.on('change', (c: Change) => heard.push(c.name));
  store.transaction(() => {
    store.upsertResource({ kind: 'ProxyPort', name: 'a', spec: spec(1), source: 'apply' });
    store.upsertResource({ kind: 'ProxyPort', name: 'b', spec: spec(2), source: 'apply' });
    t.deepEqual(heard, [], 'nothing is heard inside the transaction');
  });
  t.deepEqual(heard, ['a', 'b']);
});

test('a transaction that throws leaves nothing behind and fires no change events', (t) => {
  const { store } = openStore(t);
  const heard: Change[] = [];
  store.on('change', (c: Change) => heard.push(c));
  const boom = new Error('boom');
  const err = t.throws(() =>
    store.transaction(() => {
      store.upsertResource({ kind: 'ProxyPort', name: 'a', spec: spec(1), source: 'apply' });
      store.upsertResource({ kind: 'ProxyPort', name: 'b', spec: spec(2), source: 'apply' });
      store.recordEvent({ kind: 'ProxyPort', name: 'a', type: 'Normal', reason: 'Created', message: 'x' });
      throw boom;
    }),
  );
  t.is(err, boom);
  t.deepEqual(store.listKeys(), []);
  t.deepEqual(store.changesSince(0), []);
  t.is(store.listEvents().length, 0);
  t.deepEqual(heard, []);
  // The store still works afterwards and its listeners hear only the new change.
  store.upsertResource({ kind: 'ProxyPort', name: 'c', spec: spec(3), source: 'apply' });
  t.deepEqual(heard.map((c) => c.name), ['c']);
});

// BUG: Store.transaction keeps the Change objects queued by a nested transaction (a savepoint)
// that threw, when the outer transaction catches the error and commits: listeners hear a change
// that was rolled back, with a seq that SQLite then hands out again to the next real change.
test('a nested transaction that is rolled back (caught by the outer one) fires no change events', (t) => {
  const { store } = openStore(t);
  const heard: Change[] = [];
  store.on('change', (c: Change) => heard.push(c));
  store.transaction(() => {
    store.upsertResource({ kind: 'ProxyPort', name: 'kept', spec: spec(1), source: 'apply' });
    t.throws(() =>
      store.transaction(() => {
        store.upsertResource({ kind: 'ProxyPort', name: 'rolled-back', spec: spec(2), source: 'apply' });
        throw new Error('refused');
      }),
    );
  });
  t.deepEqual(store.listKeys().map((k) => k.name), ['kept']);
  t.deepEqual(store.changesSince(0).map((c) => c.name), ['kept']);
  t.deepEqual(heard.map((c) => c.name), ['kept'], 'listeners must not hear the rolled-back change');
  store.upsertResource({ kind: 'ProxyPort', name: 'later', spec: spec(3), source: 'apply' });
  const seqs = heard.map((c) => c.seq);
  t.is(new Set(seqs).size, seqs.length, 'no seq is heard twice');
});

// ---- backoff and snapshots ---------------------------------------------------------

test('backoff rows and snapshots round-trip', (t) => {
  const { store } = openStore(t);
  t.is(store.getBackoff('ProxyPool', 'p'), undefined);
  store.setBackoff('ProxyPool', 'p', 1, 1000, 'first');
  store.setBackoff('ProxyPool', 'p', 2, 2000, 'second');
  t.deepEqual(store.getBackoff('ProxyPool', 'p'), { failures: 2, nextAttemptAt: 2000, lastError: 'second' });
  t.deepEqual(store.listBackoff(), [{ kind: 'ProxyPool', name: 'p', failures: 2, nextAttemptAt: 2000 }]);
  store.clearBackoff('ProxyPool', 'p');
  t.is(store.getBackoff('ProxyPool', 'p'), undefined);

  store.setSnapshot('ProxyPool', 'p', { value: 'Ready', context: { failures: 0 } });
  store.setSnapshot('ProxyPool', 'p', { value: 'Drifted', context: { failures: 1 } });
  t.deepEqual(store.getSnapshot('ProxyPool', 'p'), { value: 'Drifted', context: { failures: 1 } });
});

// ---- lease: one daemon per database ---------------------------------------------

test('a second lease on the same database file is refused with a message naming the holder pid', (t) => {
  const { store, file } = openStore(t);
  const first = new Lease(store);
  first.acquire();
  t.teardown(() => first.release());

  const other = new Store(file);
  t.teardown(() => other.close());
  const second = new Lease(other);
  const err = t.throws(() => second.acquire(), { instanceOf: LeaseHeldError });
  t.true(err!.message.includes(`pid ${process.pid}`), err!.message);
  t.true(err!.message.includes(os.hostname()), err!.message);
  t.true(err!.message.includes(file), 'the message names the database file');
  t.is((err as LeaseHeldError).holder.pid, process.pid);

  // Once released, another daemon gets it.
  first.release();
  t.notThrows(() => second.acquire());
  t.teardown(() => second.release());
  const row = other.db.prepare('SELECT holder, pid FROM leases WHERE name = ?').get('daemon') as { holder: string; pid: number };
  t.is(row.holder, second.holder);
  t.throws(() => new Lease(store).acquire(), { instanceOf: LeaseHeldError }, 'and now the first one is refused');
});

test('a lease whose holder died on this host is taken over at once', async (t) => {
  const { store, file } = openStore(t);
  // A real process takes the lease and exits without releasing it (a crash). It runs the compiled
  // build (dist/, see helpers/build.ts), not the sources through tsx: a tsx start costs some 4 s of
  // CPU, which a loaded machine can ill afford.
  requireCurrentBuild();
  const script = `
    import { Store } from './dist/src/state/store.js';
    import { Lease } from './dist/src/state/lease.js';
    const s = new Store(${JSON.stringify(file)});
    new Lease(s).acquire();
    s.close();
    process.stdout.write(String(process.pid));
    process.exit(0);
  `;
  const child = spawn(process.execPath, ['--input-type=module', '-e', script], {
    cwd: REPO_ROOT,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const code = await within(new Promise<number | null>((resolve) => child.on('close', resolve)), 60_000, 'the lease holder exiting');
  t.is(code, 0, stderr);
  const deadPid = Number(stdout);
  const row = store.db.prepare('SELECT pid, renewed_at FROM leases WHERE name = ?').get('daemon') as { pid: number; renewed_at: number };
  t.is(row.pid, deadPid, 'the crashed holder left its lease behind');
  // Judged with a 2-minute ttl (not the default 15 s): the takeover below must be owed to the dead
  // pid, not to an expiry that a slow child exit on a loaded machine could let happen first.
  const TTL_MS = 120_000;
  t.true(row.renewed_at + TTL_MS > Date.now(), 'and it has not expired yet');

  const lease = new Lease(store, 'daemon', TTL_MS);
  t.notThrows(() => lease.acquire());
  t.teardown(() => lease.release());
  const now = store.db.prepare('SELECT pid, holder FROM leases WHERE name = ?').get('daemon') as { pid: number; holder: string };
  t.deepEqual(now, { pid: process.pid, holder: lease.holder });
});

test('a lease whose holder is dead but not reaped yet (a zombie) is taken over at once', async (t) => {
  const { store } = openStore(t);
  // `sleep 0.2` is the child of a process that never waits for it (sh execs into `sleep 60`): once
  // it ends it stays a zombie, for which kill(pid, 0) still succeeds.
  const parent = spawn('sh', ['-c', 'sleep 0.2 & echo $!; exec sleep 60'], { stdio: ['ignore', 'pipe', 'ignore'] });
  t.teardown(() => parent.kill('SIGKILL'));
  const pid = Number(await within(new Promise<string>((resolve) => parent.stdout.once('data', (d: Buffer) => resolve(d.toString()))), 30_000, 'the child pid'));
  const state = () => {
    try {
      const stat = fs.readFileSync(`/proc/${pid}/stat`, 'latin1');
      return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
    } catch {
      return 'gone';
    }
  };
  await within((async () => {
    while (state() !== 'Z') await new Promise((r) => setTimeout(r, 20));
  })(), 30_000, 'the child to be a zombie');
  t.notThrows(() => process.kill(pid, 0), 'kill(pid, 0) alone would call it alive');
  // The row as a holder on this host writes it (the host identity read off a lease of our own).
  const probe = new Lease(store, 'probe', 120_000);
  probe.acquire();
  const { hostname } = store.db.prepare('SELECT hostname FROM leases WHERE name = ?').get('probe') as { hostname: string };
  probe.release();
  store.db
    .prepare('INSERT INTO leases (name, holder, pid, hostname, acquired_at, renewed_at) VALUES (?, ?, ?, ?, ?, ?)')
    .run('daemon', 'crashed', pid, hostname, new Date().toISOString(), Date.now());
  const lease = new Lease(store, 'daemon', 120_000);
  t.notThrows(() => lease.acquire());
  t.teardown(() => lease.release());
  t.is((store.db.prepare('SELECT holder FROM leases WHERE name = ?').get('daemon') as { holder: string }).holder, lease.holder);
});

test('an expired lease is taken over even when its holder looks alive', (t) => {
  const { store } = openStore(t);
  // pid 1 is always alive; another host's pid cannot be checked at all: only expiry counts.
  store.db
    .prepare('INSERT INTO leases (name, holder, pid, hostname, acquired_at, renewed_at) VALUES (?, ?, ?, ?, ?, ?)')
    .run('daemon', 'someone', 1, 'other-host', new Date().toISOString(), Date.now() - 60_000);
  const lease = new Lease(store, 'daemon', 15_000);
  t.notThrows(() => lease.acquire());
  t.teardown(() => lease.release());

  store.db
    .prepare('INSERT INTO leases (name, holder, pid, hostname, acquired_at, renewed_at) VALUES (?, ?, ?, ?, ?, ?)')
    .run('other', 'someone', 1, 'other-host', new Date().toISOString(), Date.now());
  const err = t.throws(() => new Lease(store, 'other').acquire(), { instanceOf: LeaseHeldError });
  t.regex(err!.message, /pid 1 on other-host/);
});

test('a holder whose lease was taken over learns it on renew and does not touch the new holder\'s lease', (t) => {
  const { store, file } = openStore(t);
  let lost = 0;
  const a = new Lease(store, 'daemon', 15_000, () => lost++);
  a.acquire();
  t.teardown(() => a.release());
  t.true(a.renew(), 'renewing a lease we hold succeeds');
  t.is(lost, 0);

  // A stalled holder: its lease expired (as if it had been stopped for longer than the ttl).
  store.db.prepare('UPDATE leases SET renewed_at = ? WHERE name = ?').run(Date.now() - 60_000, 'daemon');
  const other = new Store(file);
  t.teardown(() => other.close());
  const b = new Lease(other, 'daemon', 15_000);
  t.notThrows(() => b.acquire());
  t.teardown(() => b.release());

  t.false(a.renew(), 'the old holder finds out');
  t.is(lost, 1, 'and is told once');
  a.release();
  const row = store.db.prepare('SELECT holder FROM leases WHERE name = ?').get('daemon') as { holder: string } | undefined;
  t.is(row?.holder, b.holder, "the old holder's release leaves the new holder's lease alone");
});

test('leader election on the database: one leads, a hung leader is replaced after leaseDuration and learns it lost', async (t) => {
  const { store, file } = openStore(t);
  const other = new Store(file);
  t.teardown(() => other.close());
  // Scaled up from 1200/800/100: both electors share one event loop, and on a loaded machine a
  // stall of a second let the standby take the renewing leader's lease (or the leader miss its
  // renew deadline) for real. The relations under test are the same.
  const timings = { leaseDurationMs: 4000, renewDeadlineMs: 2500, retryPeriodMs: 200 };
  const waits: string[] = [];
  const a = new SqliteLeaderElector(store, { name: 'leader', identity: 'a', ...timings });
  const b = new SqliteLeaderElector(other, { name: 'leader', identity: 'b', ...timings, onWaiting: (h) => waits.push(h.holder) });
  let aLost = 0;
  a.onLost(() => aLost++);
  const stop = new AbortController();
  t.teardown(() => stop.abort());
  await a.acquire(stop.signal);
  t.true(a.isLeader());
  let bLeads = false;
  const bCampaign = b.acquire(stop.signal).then(() => (bLeads = true));
  await new Promise((r) => setTimeout(r, timings.leaseDurationMs + 500));
  t.false(bLeads, 'a renewing leader keeps the lease past leaseDuration');
  t.deepEqual(waits, ['a'], 'the standby reports whom it waits for, once');
  t.deepEqual((await b.holder())?.identity, 'a');

  // A hangs: its renewals stop (as a stopped process's would) without releasing.
  (a as unknown as { lease: { stopRenewing(): void } }).lease.stopRenewing();
  // Measured from A's last renewal as the database has it (not from when the test stopped the
  // renewals: on a loaded machine the last one may lie well before that).
  const lastRenewal = (await a.holder())!.renewedAt.getTime();
  await bCampaign;
  const waited = Date.now() - lastRenewal;
  t.true(b.isLeader());
  t.true(waited >= timings.leaseDurationMs, `B waited out the lease (${waited} ms after A's last renewal)`);
  t.is((await a.holder())?.identity, 'b');

  // Before it learns anything, A already may not act: its last renewal is older than renewDeadline.
  t.false(a.isLeader(), 'a leader that has not renewed within renewDeadline does not count as leading');
  t.is(aLost, 0);
  // A wakes up: its next renewal finds the lease taken and says so once; its release leaves B's lease alone.
  t.false((a as unknown as { lease: { renew(): boolean } }).lease.renew());
  t.is(aLost, 1);
  t.false(a.isLeader());
  await a.release();
  t.is((await b.holder())?.identity, 'b');

  // A clean release hands over at the next retry.
  const c = new SqliteLeaderElector(store, { name: 'leader', identity: 'c', ...timings });
  const cCampaign = c.acquire(stop.signal);
  await b.release();
  const releasedAt = Date.now();
  await cCampaign;
  // Bounded by the lease, the wait a release spares (was 1 s of wall clock, which a loaded machine outlasts).
  t.true(Date.now() - releasedAt < timings.leaseDurationMs, `no need to wait out the lease after a release (${Date.now() - releasedAt} ms)`);
  await c.release();

  // Abort ends a campaign with an AbortError.
  await a.acquire(stop.signal);
  const d = new SqliteLeaderElector(other, { name: 'leader', identity: 'd', ...timings });
  const ac = new AbortController();
  const pending = d.acquire(ac.signal);
  ac.abort();
  await t.throwsAsync(pending, { name: 'AbortError' });
  await a.release();
});
