// WarmPool on the process engine (real child processes, no Docker): what counts as drift.
// A claim, a release or an expiry is the pool doing its job; a warm process that someone
// kills is drift, repaired under driftPolicy correct and left alone under warn.

import test from 'ava';
import { ProcessEngine } from '../src/drivers/process.js';
import { installationId, listClaims } from '../src/state/pools.js';
import { metricValue, waitFor } from './helpers/e2e-env.js';
import { poolEnv, type PoolEnv } from './helpers/warmpool-env.js';

const pool = (name: string, claim: Record<string, unknown> = {}) => ({
  name,
  engine: 'process' as const,
  command: ['sleep', '300'],
  size: 2,
  maxSize: 4,
  claim,
});

/** Stops the daemon, then removes what is left of this installation's processes. */
async function cleanup(p: PoolEnv, owner: string, runDir: string): Promise<void> {
  await p.daemon.stop();
  const engine = new ProcessEngine({ runDir });
  for (const c of await engine.list(owner)) await engine.remove(c.id);
}

function driftEvents(p: PoolEnv, name: string) {
  return p.daemon.store.listEvents({ kind: 'WarmPool', name }).filter((e) => e.reason === 'DriftDetected');
}

test('claims, releases and expiries refill the pool without counting as drift; a killed warm process is drift, repaired', async (t) => {
  const p = await poolEnv(t, undefined, [pool('work')]);
  const owner = installationId(p.daemon.store);
  t.teardown(() => cleanup(p, owner, `${p.env.dir}/run`));
  await p.waitWarm('work', 2);
  const a = await p.api.claim('work', { userId: 'u1' });
  t.is(a.status, 201, JSON.stringify(a.body));
  await p.waitWarm('work', 2);
  const b = await p.api.claim('work', { userId: 'u2', ttlSeconds: 1 });
  t.is(b.status, 201);
  await p.waitWarm('work', 2);
  t.is((await p.api.release(a.body.claimId)).status, 200);
  // Hang guards here and below (60 s): each wait is a reconcile plus process starts or kills, which
  // take many times longer on a loaded machine.
  await waitFor('released and expired claims cleaned up', () => p.members('work').length === 2, 60_000);
  t.deepEqual(driftEvents(p, 'work'), [], 'claim work is not drift');
  // Ready and idle before the kill: a run still cleaning up would take the death as its own work.
  await p.waitWarm('work', 2);

  const victim = p.members('work').find((m) => m.state === 'warm')!;
  const pid = Number(victim.containerId!.split(':')[1]);
  process.kill(-pid, 'SIGKILL');
  await waitFor('replacement', () => {
    const m = p.members('work');
    return m.length === 2 && m.every((x) => x.state === 'warm' && x.containerId !== victim.containerId);
  }, 60_000);
  await waitFor('drift evented', () => driftEvents(p, 'work').length === 1, 30_000);
  const metrics = await (await fetch(`${p.api.base}/metrics`)).text();
  t.is(metricValue(metrics, 'polydev_drift_total', { kind: 'WarmPool' }), 1);
});

test('driftPolicy warn: claims still refill; a killed warm process is reported and left alone', async (t) => {
  const p = await poolEnv(t, undefined, [{ ...pool('careful'), driftPolicy: 'warn' }]);
  const owner = installationId(p.daemon.store);
  t.teardown(() => cleanup(p, owner, `${p.env.dir}/run`));
  await p.waitWarm('careful', 2);
  const a = await p.api.claim('careful', { userId: 'u1' });
  t.is(a.status, 201);
  await p.waitWarm('careful', 2);
  t.is(p.members('careful').filter((m) => m.state === 'claimed').length, 1);

  const victim = p.members('careful').find((m) => m.state === 'warm')!;
  process.kill(-Number(victim.containerId!.split(':')[1]), 'SIGKILL');
  // Hang guard: the death is noticed by the engine's watch (or the resync) and a reconcile.
  await waitFor('Drifted', () => p.daemon.store.getResource('WarmPool', 'careful')?.status?.phase === 'Drifted', 60_000);
  t.true(p.members('careful').some((m) => m.slot === victim.slot), 'left alone: the dead one is not replaced');
  t.is(driftEvents(p, 'careful').length, 1);
});

// Claims that arrive together are committed together (group commit); each must still stand alone.
test('a burst of claims committed together: per-user limits hold inside one group, and one failing claim fails alone', async (t) => {
  const p = await poolEnv(t, undefined, [{ ...pool('group', { maxPerUser: 3 }), size: 6, maxSize: 6 }]);
  const owner = installationId(p.daemon.store);
  t.teardown(() => cleanup(p, owner, `${p.env.dir}/run`));
  await p.waitWarm('group', 6);

  // The daemon's connection leaves WAL checkpoints to the worker thread (they stalled commits).
  t.is(p.daemon.store.db.pragma('wal_autocheckpoint', { simple: true }), 0);
  // A real SQLite error for one user's claim, on the daemon's own connection only.
  p.daemon.store.db.exec(`CREATE TEMP TRIGGER refuse_boom BEFORE INSERT ON claims WHEN NEW.user_id = 'boom'
    BEGIN SELECT RAISE(ABORT, 'refused by the test trigger'); END`);
  const users = ['greedy', 'greedy', 'greedy', 'greedy', 'greedy', 'boom', 'other'];
  // Called in one synchronous loop, these seven claims share one commit.
  const settled = await Promise.allSettled(users.map((userId) => p.daemon.claims.claim('group', { userId })));
  const outcome = (i: number) => {
    const s = settled[i]!;
    return s.status === 'fulfilled' ? 'ok' : ((s.reason as { code?: string }).code ?? String(s.reason));
  };
  t.deepEqual(users.map((_, i) => outcome(i)), ['ok', 'ok', 'ok', 'TOO_MANY_REQUESTS', 'TOO_MANY_REQUESTS', 'SQLITE_CONSTRAINT_TRIGGER', 'ok'],
    'maxPerUser 3 holds inside one group; the claim that hit the error fails, and only that one');
  const served = settled.flatMap((s) => (s.status === 'fulfilled' ? [s.value] : []));

  const open = listClaims(p.daemon.store, { pool: 'group', state: 'open' });
  t.deepEqual(open.map((c) => c.userId).sort(), ['greedy', 'greedy', 'greedy', 'other']);
  t.is(new Set(open.map((c) => c.slot)).size, 4, 'four claims, four containers');
  t.is(p.members('group').filter((m) => m.state === 'claimed').length, 4, 'nothing of the failed claim was written');
  t.false(listClaims(p.daemon.store, { pool: 'group' }).some((c) => c.userId === 'boom'));

  // Latencies are written in batches; a read through the API sees them.
  for (const c of served) {
    const got = await p.api.request('GET', `/api/v1/claims/${c.claimId}`);
    t.is(got.body.status.latencyMs, c.latencyMs);
  }
  // Through HTTP too: one more for `other`, and the user at the limit is still refused.
  t.is((await p.api.claim('group', { userId: 'other' })).status, 201);
  t.is((await p.api.claim('group', { userId: 'greedy' })).status, 429);
  p.daemon.store.db.exec('DROP TRIGGER refuse_boom');
});
