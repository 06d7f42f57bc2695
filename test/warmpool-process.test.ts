// WarmPool on the process engine (real child processes, no Docker): what counts as drift.
// A claim, a release or an expiry is the pool doing its job; a warm process that someone
// kills is drift, repaired under driftPolicy correct and left alone under warn.

import test from 'ava';
import { ProcessEngine } from '../src/drivers/process.js';
import { installationId } from '../src/state/pools.js';
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
  await waitFor('released and expired claims cleaned up', () => p.members('work').length === 2, 20_000);
  t.deepEqual(driftEvents(p, 'work'), [], 'claim work is not drift');

  const victim = p.members('work').find((m) => m.state === 'warm')!;
  const pid = Number(victim.containerId!.split(':')[1]);
  process.kill(-pid, 'SIGKILL');
  await waitFor('replacement', () => {
    const m = p.members('work');
    return m.length === 2 && m.every((x) => x.state === 'warm' && x.containerId !== victim.containerId);
  }, 20_000);
  await waitFor('drift evented', () => driftEvents(p, 'work').length === 1, 10_000);
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
  await waitFor('Drifted', () => p.daemon.store.getResource('WarmPool', 'careful')?.status?.phase === 'Drifted', 20_000);
  t.true(p.members('careful').some((m) => m.slot === victim.slot), 'left alone: the dead one is not replaced');
  t.is(driftEvents(p, 'careful').length, 1);
});
