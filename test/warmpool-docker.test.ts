// WarmPool and claims against a real dockerd (Debian docker.io) that this file starts, with a
// busybox image imported locally. Each test runs its own daemon (own database, so its own
// owner label) against the shared dockerd; every container is removed when the file ends.

import anyTest, { type TestFn } from 'ava';
import fs from 'node:fs';
import { LABELS } from '../src/controllers/warmpool/engine.js';
import { getClaim, installationId, listClaims } from '../src/state/pools.js';
import { startDockerd, type Dockerd } from './helpers/dockerd.js';
import { DEFAULT_BACKOFF } from '../src/runtime/queue.js';
import { metricValue, sleep, waitFor } from './helpers/e2e-env.js';
import { poolEnv, type PoolEnv } from './helpers/warmpool-env.js';

const test = anyTest as TestFn<{ dockerd: Dockerd }>;

test.before(async (t) => {
  t.context.dockerd = await startDockerd({ name: 'warmpool' });
});
test.after.always(async (t) => {
  await t.context.dockerd?.stop();
});

interface Inspect {
  Id: string;
  Name: string;
  State: { Running: boolean; Status: string };
  Config: { Labels: Record<string, string> };
  HostConfig: { Memory: number; CpuQuota: number };
}

async function containersOf(dockerd: Dockerd, owner: string): Promise<Array<{ Id: string; Names: string[]; State: string; Labels: Record<string, string> }>> {
  const filters = encodeURIComponent(JSON.stringify({ label: [`${LABELS.owner}=${owner}`] }));
  const res = await dockerd.request('GET', `/containers/json?all=1&filters=${filters}`);
  return res.json as Array<{ Id: string; Names: string[]; State: string; Labels: Record<string, string> }>;
}

async function inspect(dockerd: Dockerd, id: string): Promise<Inspect | undefined> {
  const res = await dockerd.request('GET', `/containers/${id}/json`);
  return res.status === 200 ? (res.json as Inspect) : undefined;
}

async function execOut(dockerd: Dockerd, id: string, cmd: string[]): Promise<string> {
  // 30 s rather than the client's 10 s default exec timeout: a hang guard for a loaded dockerd.
  const r = await dockerd.client.exec(id, cmd, { timeoutMs: 30_000 });
  return r.stdout.toString();
}

const owner = (p: PoolEnv) => installationId(p.daemon.store);

test.serial('a pool converges to size warm containers, labelled and limited as declared', async (t) => {
  const { dockerd } = t.context;
  const p = await poolEnv(t, dockerd, [
    { name: 'openai', image: dockerd.image, size: 3, maxSize: 5, resources: { cpuMHz: 500, memoryMB: 256 }, idleResources: { cpuMHz: 100, memoryMB: 64 } },
  ]);
  await p.waitWarm('openai', 3);
  const list = await containersOf(dockerd, owner(p));
  t.is(list.length, 3);
  for (const c of list) {
    t.is(c.State, 'running');
    t.is(c.Labels[LABELS.managedBy], 'polydev-reconciler');
    t.is(c.Labels[LABELS.pool], 'openai');
    t.is(c.Labels[LABELS.provider], 'openai');
    t.regex(c.Labels[LABELS.specHash] ?? '', /^[0-9a-f]{12}$/);
    t.false(LABELS.claim in c.Labels);
    const info = (await inspect(dockerd, c.Id))!;
    t.is(info.HostConfig.Memory, 64 * 1024 * 1024, 'warm containers run with idleResources');
    t.is(info.HostConfig.CpuQuota, 10_000);
  }
  const status = p.daemon.store.getResource('WarmPool', 'openai')!.status!;
  t.is(status.warm, 3);
  t.is(status.claimed, 0);
  t.is(status.conditions.find((c) => c.type === 'Ready')?.status, 'True');
  const metrics = await (await fetch(`${p.api.base}/metrics`)).text();
  t.is(metricValue(metrics, 'polydev_warm_pool_containers', { pool: 'openai', state: 'warm' }), 3);
  t.true((metricValue(metrics, 'polydev_engine_operations_total', { engine: 'docker', op: 'start', result: 'success' }) ?? 0) >= 3);
});

test.serial('a warm claim binds at once, raises resources, and the pool refills', async (t) => {
  const { dockerd } = t.context;
  const p = await poolEnv(t, dockerd, [
    { name: 'anthropic', image: dockerd.image, size: 2, maxSize: 4, resources: { cpuMHz: 500, memoryMB: 256 }, idleResources: { cpuMHz: 100, memoryMB: 64 } },
  ]);
  await p.waitWarm('anthropic', 2);
  const warmIds = new Set(p.members('anthropic').map((m) => m.containerId));
  const res = await p.api.claim('anthropic', { userId: 'alice' });
  t.is(res.status, 201, JSON.stringify(res.body));
  t.true(res.body.warm);
  t.true(warmIds.has(res.body.container.id), 'a warm container was handed out');
  t.true(res.body.latencyMs >= 0);
  t.regex(res.body.claimId, /^[0-9a-f-]{36}$/);
  const info = (await inspect(dockerd, res.body.container.id))!;
  t.is(info.HostConfig.Memory, 256 * 1024 * 1024, 'claimed container has the full resources');
  t.is(info.HostConfig.CpuQuota, 50_000);
  // Refilled: 2 warm again plus the claimed one (hang guard: a container start on a loaded dockerd).
  await p.waitWarm('anthropic', 2, 60_000);
  t.is(p.members('anthropic').filter((m) => m.state === 'claimed').length, 1);
  const claim = getClaim(p.daemon.store, res.body.claimId)!;
  t.is(claim.state, 'bound');
  t.is(claim.userId, 'alice');
  t.is(claim.containerId, res.body.container.id);
  const stats = await p.api.stats('anthropic');
  t.is(stats.status, 200);
  t.is(stats.body.claimed, 1);
  t.is(stats.body.claimsServed, 1);
  t.is(stats.body.warmHitRatio, 1);
  t.true(typeof stats.body.claimLatencyMs.p99 === 'number');
});

test.serial('claims: cold start below maxSize, 503 with Retry-After at maxSize, 429 past maxPerUser', async (t) => {
  const { dockerd } = t.context;
  const p = await poolEnv(t, dockerd, [{ name: 'google', image: dockerd.image, size: 0, maxSize: 2, claim: { maxPerUser: 1 } }]);
  await waitFor('pool Ready', () => p.daemon.store.getResource('WarmPool', 'google')?.status?.phase === 'Ready', 30_000);
  const cold = await p.api.claim('google', { userId: 'u1' });
  t.is(cold.status, 201, JSON.stringify(cold.body));
  t.false(cold.body.warm);
  const listed = await containersOf(dockerd, owner(p));
  t.is(listed.find((c) => c.Id === cold.body.container.id)?.Labels[LABELS.claim], cold.body.claimId, 'a cold-started container carries the claim label');

  const again = await p.api.claim('google', { userId: 'u1' });
  t.is(again.status, 429);
  t.is(again.body.error.code, 'TOO_MANY_REQUESTS');

  t.is((await p.api.claim('google', { userId: 'u2' })).status, 201);
  const full = await p.api.claim('google', { userId: 'u3' });
  t.is(full.status, 503);
  t.is(full.body.error.code, 'POOL_EXHAUSTED');
  t.truthy(full.headers.get('retry-after'));
  t.is((await containersOf(dockerd, owner(p))).length, 2, 'never more than maxSize');
  const metrics = await (await fetch(`${p.api.base}/metrics`)).text();
  t.is(metricValue(metrics, 'polydev_claims_total', { pool: 'google', result: 'cold' }), 2);
  t.is(metricValue(metrics, 'polydev_claims_total', { pool: 'google', result: 'exhausted' }), 1);
  t.is(metricValue(metrics, 'polydev_claims_total', { pool: 'google', result: 'too_many' }), 1);
});

test.serial('200 concurrent claims: no container goes to two claims, never above maxSize', async (t) => {
  // Its hang guards (90 + 90 + 60 s) add up past ava's 120 s without a test result; under load a
  // healthy run of 12 + 20 container starts and removals may need more than 120 s.
  t.timeout(300_000);
  const { dockerd } = t.context;
  const p = await poolEnv(t, dockerd, [{ name: 'burst', image: dockerd.image, size: 12, maxSize: 20 }]);
  await p.waitWarm('burst', 12, 90_000);
  const results = await Promise.all(Array.from({ length: 200 }, (_, i) => p.api.claim('burst', { userId: `user-${i}` })));
  const ok = results.filter((r) => r.status === 201);
  const refused = results.filter((r) => r.status === 503);
  t.is(ok.length + refused.length, 200, `unexpected statuses: ${[...new Set(results.map((r) => r.status))].join(',')}`);
  // Every warm one is served; the rest of maxSize goes to cold starts or to refills that were
  // already starting (a claim never waits for a refill: it is 503 at maxSize).
  t.true(ok.filter((r) => r.body.warm).length >= 12, 'the warm ones went first');
  t.true(ok.length <= 20);
  const total = p.members('burst').length;
  t.true(total <= 20, `${total} members`);
  const ids = ok.map((r) => r.body.container.id);
  t.is(new Set(ids).size, ids.length, 'no container given to two claims');
  t.true(refused.every((r) => r.body.error.code === 'POOL_EXHAUSTED'));
  const open = listClaims(p.daemon.store, { pool: 'burst', state: 'open' });
  t.is(open.length, ok.length);
  t.is(new Set(open.map((c) => c.slot)).size, ok.length);
  t.true((await containersOf(dockerd, owner(p))).length <= 20);
  // Releasing them all brings the pool back to size warm, and leaves nothing else behind.
  await Promise.all(ok.map((r) => p.api.release(r.body.claimId)));
  await p.waitWarm('burst', 12, 90_000);
  await waitFor('released containers removed', async () => (await containersOf(dockerd, owner(p))).length === 12, 60_000);
});

test.serial('credentials are injected as 0600 files on a tmpfs and never stored, logged or evented', async (t) => {
  const { dockerd } = t.context;
  const logged: string[] = [];
  const { createLogger } = await import('../src/observability/logger.js');
  const { Writable } = await import('node:stream');
  const logger = createLogger('debug', new Writable({ write: (chunk: Buffer, _enc, done) => { logged.push(chunk.toString()); done(); } }));
  const p = await poolEnv(t, dockerd, [{ name: 'creds', image: dockerd.image, size: 1, maxSize: 3 }], { daemon: { logger } });
  await p.waitWarm('creds', 1);
  const secret = 'sk-live-9f8e7d6c5b4a39281706';
  const res = await p.api.claim('creds', {
    userId: 'bob',
    env: { OPENAI_API_KEY: secret },
    files: { 'codex/auth.json': `{"token":"${secret}"}` },
  });
  t.is(res.status, 201, JSON.stringify(res.body));
  const id = res.body.container.id as string;
  t.is(await execOut(dockerd, id, ['cat', '/run/polydev/env']), `OPENAI_API_KEY=${secret}\n`);
  t.is(await execOut(dockerd, id, ['cat', '/run/polydev/files/codex/auth.json']), `{"token":"${secret}"}`);
  t.is((await execOut(dockerd, id, ['stat', '-c', '%a', '/run/polydev/env', '/run/polydev/files/codex/auth.json'])).trim(), '600\n600');
  t.regex(await execOut(dockerd, id, ['sh', '-c', 'grep " /run/polydev " /proc/mounts']), /^tmpfs \/run\/polydev tmpfs/);
  // A bad path is refused before anything happens.
  const bad = await p.api.claim('creds', { userId: 'bob', files: { '../etc/passwd': 'x' } });
  t.is(bad.status, 400);
  t.is((await p.api.release(res.body.claimId)).status, 200);

  await p.daemon.stop();
  for (const file of fs.readdirSync(p.env.dir)) {
    if (!file.startsWith('polydev.db')) continue;
    t.false(fs.readFileSync(`${p.env.dir}/${file}`).includes(secret), `${file} must not hold the secret`);
  }
  t.false(logged.some((l) => l.includes(secret)), 'the secret reached the log');
  // Who claimed and released what is logged at info, for the operator.
  const entries = logged.map((l) => JSON.parse(l) as Record<string, unknown>);
  t.like(entries.find((e) => e['message'] === 'claim granted'), { level: 'info', resource: 'WarmPool/creds', user: 'bob', claim: res.body.claimId, warm: true });
  t.like(entries.find((e) => e['message'] === 'claim released'), { level: 'info', resource: 'WarmPool/creds', user: 'bob', claim: res.body.claimId });
});

test.serial('release destroys by default; recycle wipes the workspace and returns the container warm', async (t) => {
  const { dockerd } = t.context;
  const p = await poolEnv(t, dockerd, [
    { name: 'destroy', image: dockerd.image, size: 1, maxSize: 3 },
    // /workspace, a folder of the test image's own, never /tmp: a container runtime that failed to
    // isolate (seen with dockerd in a chroot) would run the wipe against the host's /tmp.
    { name: 'recycle', image: dockerd.image, size: 2, maxSize: 2, claim: { onRelease: 'recycle', workspaceDir: '/workspace' } },
  ]);
  await p.waitWarm('destroy', 1);
  await p.waitWarm('recycle', 2);
  const d = await p.api.claim('destroy', { userId: 'u' });
  t.is(d.status, 201);
  const rel = await p.api.release(d.body.claimId);
  t.is(rel.status, 200);
  t.is(rel.body.status.phase, 'Released');
  // Hang guard: a dockerd removal under load (the reconciler's, after the release).
  await waitFor('destroyed container gone', async () => (await inspect(dockerd, d.body.container.id)) === undefined, 60_000);
  t.is((await p.api.release(d.body.claimId)).status, 200, 'releasing twice is harmless');
  t.is((await p.api.release('no-such-claim')).status, 404);

  // Recycle: with maxSize = size the pool cannot refill while the claim is open, so the
  // released container is wanted back, wiped.
  const r = await p.api.claim('recycle', { userId: 'u', files: { token: 'abc' } });
  t.is(r.status, 201);
  const rid = r.body.container.id as string;
  await dockerd.client.exec(rid, ['sh', '-c', 'echo work > /workspace/project.txt'], { timeoutMs: 30_000 });
  t.is((await execOut(dockerd, rid, ['ls', '-A', '/workspace'])).trim(), 'project.txt');
  t.is((await p.api.release(r.body.claimId)).status, 200);
  // Hang guard: a wipe (docker exec) and a restart on a loaded dockerd.
  await waitFor('recycled container warm again', () => p.members('recycle').some((m) => m.containerId === rid && m.state === 'warm'), 60_000);
  t.is(await execOut(dockerd, rid, ['ls', '-A', '/workspace']), '', 'workspace wiped');
  t.is(await execOut(dockerd, rid, ['ls', '-A', '/run/polydev']), '', 'credentials wiped');
});

test.serial('a warm container that dies is replaced at once (Docker events), long before a resync', async (t) => {
  const { dockerd } = t.context;
  const p = await poolEnv(t, dockerd, [{ name: 'events', image: dockerd.image, size: 2, maxSize: 3 }], { config: { resyncInterval: '10m' } });
  await p.waitWarm('events', 2);
  const victim = p.members('events')[0]!;
  const killedAt = Date.now();
  t.is((await dockerd.request('POST', `/containers/${victim.containerId}/kill`)).status, 204);
  // The replacement (a container start on a loaded dockerd) is waited for up to 60 s: still ten
  // times sooner than the 10 min resync, and nothing else reconciles this pool (no claims, no
  // idleTimeout, so no requeue): only the die event can have brought it.
  await waitFor('replacement warm', () => {
    const m = p.members('events');
    return m.length === 2 && m.every((x) => x.state === 'warm' && x.containerId !== victim.containerId);
  }, 60_000);
  t.true(Date.now() - killedAt < 60_000, 'replaced long before the 10 min resync');
  await waitFor('dead container removed', async () => (await inspect(dockerd, victim.containerId!)) === undefined, 60_000);
});

test.serial('expired claims are released by the reconciler and leave no container', async (t) => {
  const { dockerd } = t.context;
  const p = await poolEnv(t, dockerd, [{ name: 'ttl', image: dockerd.image, size: 1, maxSize: 3 }]);
  await p.waitWarm('ttl', 1);
  const res = await p.api.claim('ttl', { userId: 'u', ttlSeconds: 1 });
  t.is(res.status, 201);
  // Hang guards: the expiry reconcile is requeued for the expiry time (1 s), then a dockerd removal.
  await waitFor('claim expired', () => getClaim(p.daemon.store, res.body.claimId)?.state === 'expired', 60_000);
  await waitFor('container removed', async () => (await inspect(dockerd, res.body.container.id)) === undefined, 60_000);
  const events = p.daemon.store.listEvents({ kind: 'WarmPool', name: 'ttl' });
  t.true(events.some((e) => e.reason === 'ClaimExpired' && e.message.includes(res.body.claimId)));
});

test.serial('a spec change rolls warm containers (never below size - 1 warm) and leaves claimed ones alone', async (t) => {
  // Hang guards of 60 + 60 + 90 s: past ava's 120 s without a test result when dockerd is slow.
  t.timeout(300_000);
  const { dockerd } = t.context;
  const pool = { name: 'roll', image: dockerd.image, size: 3, maxSize: 4 };
  const p = await poolEnv(t, dockerd, [pool]);
  await p.waitWarm('roll', 3);
  const claimed = await p.api.claim('roll', { userId: 'u' });
  t.is(claimed.status, 201);
  await p.waitWarm('roll', 3);
  const before = new Set(p.members('roll').filter((m) => m.state === 'warm').map((m) => m.containerId));
  let minWarm = Infinity;
  let sampling = true;
  // (Under load the sampler runs less often and may miss a short dip: that can only make this
  // pass falsely, never fail it.)
  const sampler = (async () => {
    while (sampling) {
      minWarm = Math.min(minWarm, p.members('roll').filter((m) => m.state === 'warm').length);
      await sleep(5);
    }
  })();
  p.setPools([{ ...pool, env: { ROLLED: '1' } }]);
  await waitFor('rolled', () => {
    const warm = p.members('roll').filter((m) => m.state === 'warm');
    return warm.length === 3 && warm.every((m) => !before.has(m.containerId)) && p.daemon.store.getResource('WarmPool', 'roll')?.status?.phase === 'Ready';
  }, 90_000);
  sampling = false;
  await sampler;
  t.true(minWarm >= 2, `warm dipped to ${minWarm}`);
  t.truthy(await inspect(dockerd, claimed.body.container.id), 'the claimed container survived the roll');
  t.is(getClaim(p.daemon.store, claimed.body.claimId)?.state, 'bound');
  t.true((await containersOf(dockerd, owner(p))).length <= 4);
});

test.serial('a missing image is ImageNotFound with backoff (no tight loop), and recovers by itself once the image exists', async (t) => {
  // The recovery wait alone may take up to 120 s (ava's limit without a test result).
  t.timeout(300_000);
  const { dockerd } = t.context;
  const image = `polydev-test/later:${process.pid}`;
  const p = await poolEnv(t, dockerd, [{ name: 'noimage', image, size: 1, maxSize: 2 }]);
  await waitFor('ImageNotFound condition', () => {
    const ready = p.daemon.store.getResource('WarmPool', 'noimage')?.status?.conditions.find((c) => c.type === 'Ready');
    return ready?.reason === 'ImageNotFound';
  }, 30_000);
  const events = p.daemon.store.listEvents({ kind: 'WarmPool', name: 'noimage' });
  t.true(events.some((e) => e.reason === 'ImageNotFound' && e.message.includes(image)));
  const metrics = async () => (await (await fetch(`${p.api.base}/metrics`)).text());
  const startsAt = async () => metricValue(await metrics(), 'polydev_engine_operations_total', { engine: 'docker', op: 'start', result: 'error' }) ?? 0;
  const t0 = Date.now();
  const a = await startsAt();
  await sleep(2000);
  const b = await startsAt();
  // The window is what the clock says it was (a stalled event loop stretches the 2 s). Even counted
  // from the first failure, backoff retries (base 200 ms, doubling) fit floor(log2(w / base + 1)) times
  // into w ms, plus one in flight: 4 for 2 s, 5 for 6 s; a tight loop would make hundreds.
  const windowMs = Date.now() - t0;
  const allowed = Math.floor(Math.log2(windowMs / DEFAULT_BACKOFF.baseMs + 1)) + 1;
  t.true(b - a <= allowed, `backoff: ${b - a} failed starts in ${windowMs} ms (at most ${allowed} with backoff)`);
  t.is((await containersOf(dockerd, owner(p))).length, 0, 'nothing left behind by failed starts');
  const claim = await p.api.claim('noimage', { userId: 'u' });
  t.is(claim.status, 502);
  t.is(claim.body.error.code, 'IMAGE_NOT_FOUND');

  const { importBusyboxImage } = await import('./helpers/dockerd.js');
  await importBusyboxImage(dockerd.socketPath, image);
  // Recovery comes from the backoff retry (or the next resync), without anyone touching the pool.
  await p.waitWarm('noimage', 1, 120_000);
  t.pass();
});

test.serial('a bad command is StartFailed; an unreachable engine is EngineUnavailable', async (t) => {
  const { dockerd } = t.context;
  const p = await poolEnv(t, dockerd, [{ name: 'badcmd', image: dockerd.image, command: ['/no/such/binary'], size: 1, maxSize: 1 }]);
  // Hang guards: a create, a failed start and its removal on a loaded dockerd.
  await waitFor('StartFailed', () => p.daemon.store.getResource('WarmPool', 'badcmd')?.status?.conditions.find((c) => c.type === 'Ready')?.reason === 'StartFailed', 60_000);
  // A retry may be between its create and the removal of the failed container: wait it out.
  await waitFor('nothing left behind', async () => (await containersOf(dockerd, owner(p))).length === 0, 60_000);

  const q = await poolEnv(t, undefined, [{ name: 'nodocker', image: dockerd.image, size: 1, maxSize: 1 }], {
    config: { docker: { socket: `${t.context.dockerd.dir}/missing.sock`, network: 'none' } },
  });
  await waitFor('EngineUnavailable', () => {
    const ready = q.daemon.store.getResource('WarmPool', 'nodocker')?.status?.conditions.find((c) => c.type === 'Ready');
    return ready?.reason === 'EngineUnavailable' && ready.message.includes('missing.sock');
  }, 30_000);
  const claim = await q.api.claim('nodocker', { userId: 'u' });
  t.is(claim.status, 503);
  t.is(claim.body.error.code, 'ENGINE_UNAVAILABLE');
});

test.serial('containers the daemon does not own are never touched; a deleted pool leaves nothing behind', async (t) => {
  const { dockerd } = t.context;
  const foreign = await dockerd.request('POST', '/containers/create?name=foreign-' + process.pid, {
    Image: dockerd.image,
    Cmd: ['sleep', '1000'],
    Labels: { [LABELS.managedBy]: 'polydev-reconciler', [LABELS.owner]: 'someone-else', [LABELS.pool]: 'gone', [LABELS.slot]: 'x' },
    HostConfig: { NetworkMode: 'none' },
  });
  t.is(foreign.status, 201);
  const foreignId = (foreign.json as { Id: string }).Id;
  await dockerd.request('POST', `/containers/${foreignId}/start`);
  const keep = { name: 'keep', image: dockerd.image, size: 0, maxSize: 1 };
  const p = await poolEnv(t, dockerd, [{ name: 'temp', image: dockerd.image, size: 2, maxSize: 2 }, keep]);
  await p.waitWarm('temp', 2);
  // One of two pools leaves the directory (within maxPrune): it is deleted with its containers.
  p.setPools([keep]);
  // Hang guard: the deletion removes two containers on a loaded dockerd first.
  await waitFor('pool deleted', () => p.daemon.store.getResource('WarmPool', 'temp') === undefined, 60_000);
  t.is((await containersOf(dockerd, owner(p))).length, 0);
  const info = await inspect(dockerd, foreignId);
  t.true(info?.State.Running, 'a container owned by another installation survived');
  await dockerd.request('DELETE', `/containers/${foreignId}?force=1`);
});
