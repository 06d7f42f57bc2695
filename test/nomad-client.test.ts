// Nomad HTTP API client (src/drivers/nomad.ts) against the in-memory fake in
// test/helpers/fake-nomad.ts (a real Nomad agent cannot run here).

import test from 'ava';
import net from 'node:net';

import { NomadClient, NomadError, type NomadEvent, type NomadJob } from '../src/drivers/nomad.js';
import { startFakeNomad } from './helpers/fake-nomad.js';

function job(id: string, opts: { count?: number; image?: string; meta?: Record<string, string> } = {}): NomadJob {
  return {
    ID: id,
    Name: id,
    Type: 'service',
    Datacenters: ['dc1'],
    Meta: opts.meta ?? { owner: 'polydev' },
    TaskGroups: [
      {
        Name: 'web',
        Count: opts.count ?? 1,
        Meta: null,
        Networks: [{ Mode: 'host', DynamicPorts: [{ Label: 'http', To: 8080 }] }],
        Tasks: [
          {
            Name: 'server',
            Driver: 'docker',
            Config: { image: opts.image ?? 'nginx:1.27', ports: ['http'] },
            Env: { GREETING: 'hi' },
            Meta: null,
            Resources: { CPU: 200, MemoryMB: 128, MemoryMaxMB: 256, Devices: [{ Name: 'nvidia/gpu', Count: 0 }] },
          },
        ],
      },
    ],
  };
}

/** Polls fn until it gives a value. The deadline is a hang guard (a passing wait costs only its own time), generous for a loaded machine. */
async function waitFor<T>(fn: () => Promise<T | undefined> | T | undefined, timeoutMs = 30_000): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v !== undefined && v !== false) return v;
    if (Date.now() > end) throw new Error('waitFor: timed out');
    await new Promise((r) => setTimeout(r, 10));
  }
}

async function rejects(p: Promise<unknown>): Promise<NomadError> {
  try {
    await p;
  } catch (e) {
    if (e instanceof NomadError) return e;
    throw e;
  }
  throw new Error('expected a NomadError, got success');
}

test('register, read, allocations reach running with a readable address', async (t) => {
  const nomad = await startFakeNomad(t);
  const c = new NomadClient({ address: nomad.address });
  const r = await c.registerJob(job('web-1', { count: 2 }));
  t.true(r.jobModifyIndex > 0);
  t.regex(r.evalId, /^[0-9a-f-]{36}$/);

  const j = await c.readJob('web-1');
  t.is(j.ID, 'web-1');
  t.is(j.JobModifyIndex, r.jobModifyIndex);
  t.is(j.TaskGroups[0]!.Tasks[0]!.Resources?.MemoryMaxMB, 256);
  t.deepEqual(j.Meta, { owner: 'polydev' });

  const first = await c.jobAllocations('web-1');
  t.is(first.items.length, 2);
  t.true(first.meta.index > 0);
  t.is(first.meta.knownLeader, true);

  const running = await waitFor(async () => {
    const { items } = await c.jobAllocations('web-1');
    return items.every((a) => a.ClientStatus === 'running') ? items : undefined;
  });
  t.is(running.length, 2);
  t.is(running[0]!.TaskStates?.server?.State, 'running');

  const alloc = await c.readAllocation(running[0]!.ID);
  t.is(alloc.JobID, 'web-1');
  t.is(alloc.TaskGroup, 'web');
  const port = alloc.AllocatedResources?.Shared?.Ports?.find((p) => p.Label === 'http');
  t.truthy(port);
  t.is(port!.HostIP, '127.0.0.1');
  t.true(port!.Value > 0);
  t.is(port!.To, 8080);
  t.is((await c.readJob('web-1')).Status, 'running');
});

test('CAS: stale enforceIndex → Conflict and nothing changes', async (t) => {
  const nomad = await startFakeNomad(t);
  const c = new NomadClient({ address: nomad.address, retryBaseMs: 1 });
  const r1 = await c.registerJob(job('cas'));
  const r2 = await c.registerJob(job('cas', { meta: { v: '2' } }), { enforceIndex: r1.jobModifyIndex });
  t.true(r2.jobModifyIndex > r1.jobModifyIndex);
  await waitFor(async () => ((await c.readJob('cas')).Status === 'running' ? true : undefined));

  const before = nomad.index;
  const posts = nomad.requests.filter((r) => r.method === 'POST').length;
  const err = await rejects(c.registerJob(job('cas', { meta: { v: '3' } }), { enforceIndex: r1.jobModifyIndex }));
  t.is(err.code, 'Conflict');
  t.is(err.status, 500);
  t.regex(err.message, new RegExp(`conflicting job modify index: ${r2.jobModifyIndex}`));
  t.is(nomad.requests.filter((r) => r.method === 'POST').length, posts + 1, 'a CAS failure is not retried');
  t.is(nomad.index, before);
  const j = await c.readJob('cas');
  t.deepEqual(j.Meta, { v: '2' });
  t.is(j.JobModifyIndex, r2.jobModifyIndex);

  // enforceIndex 0 means "must not exist yet".
  const e0 = await rejects(c.registerJob(job('cas'), { enforceIndex: 0 }));
  t.is(e0.code, 'Conflict');
  await c.registerJob(job('cas-new'), { enforceIndex: 0 });
  t.is((await c.readJob('cas-new')).ID, 'cas-new');
});

test('listJobs follows pagination and filters by prefix', async (t) => {
  const nomad = await startFakeNomad(t);
  const c = new NomadClient({ address: nomad.address });
  for (let i = 0; i < 25; i++) await c.registerJob(job(`svc-${String(i).padStart(2, '0')}`));
  for (let i = 0; i < 3; i++) await c.registerJob(job(`other-${i}`));

  const before = nomad.requests.length;
  const all = await c.listJobs('svc-', { perPage: 10 });
  t.is(nomad.requests.length - before, 3, 'three pages');
  t.is(all.items.length, 25);
  t.deepEqual(
    all.items.map((j) => j.ID),
    Array.from({ length: 25 }, (_, i) => `svc-${String(i).padStart(2, '0')}`),
  );
  t.true(nomad.requests.slice(before).some((r) => r.url.includes('next_token=svc-10')));
  t.true(all.meta.index > 1 && all.meta.index <= nomad.index, `X-Nomad-Index ${all.meta.index}`);

  const others = await c.listJobs('other-');
  t.deepEqual(others.items.map((j) => j.ID).sort(), ['other-0', 'other-1', 'other-2']);
  t.is((await c.listJobs()).items.length, 28);
  t.is((await c.listJobs('nope')).items.length, 0);
});

test('blocking query returns early on a change, and after wait with no change', async (t) => {
  const nomad = await startFakeNomad(t);
  const c = new NomadClient({ address: nomad.address });
  await c.registerJob(job('a'));
  await waitFor(async () => ((await c.readJob('a')).Status === 'running' ? true : undefined));
  const first = await c.listJobs();
  const idx = first.meta.index;

  // No change: returns after ~wait with the same index.
  const t0 = Date.now();
  const idle = await c.listJobs(undefined, { index: idx, waitMs: 300 });
  const elapsed = Date.now() - t0;
  t.true(elapsed >= 250, `returned after ${elapsed} ms`);
  // No upper bound on the wall clock (it measured the machine's load): a server that held the query
  // past its wait would make the client time out (10 s + wait) and reject, failing the test.
  t.is(idle.meta.index, idx);
  t.true(nomad.requests.some((r) => r.url.includes(`index=${idx}`) && r.url.includes('wait=300ms')));

  // A change: returns well before the (long) wait with a higher index.
  // The wait is 60 s and "well before" is under half of it: room for a loaded machine, while a
  // query that ignored the change would still only return after the whole wait.
  const t1 = Date.now();
  const pending = c.listJobs(undefined, { index: idx, waitMs: 60_000 });
  setTimeout(() => void c.registerJob(job('b')), 100);
  const changed = await pending;
  t.true(Date.now() - t1 < 30_000, `returned after ${Date.now() - t1} ms`);
  t.true(changed.meta.index > idx);
  t.deepEqual(changed.items.map((j) => j.ID).sort(), ['a', 'b']);

  // Allocations of a job block the same way (on the allocs table index, as in Nomad).
  await waitFor(async () => ((await c.readJob('b')).Status === 'running' ? true : undefined));
  const allocs = await c.jobAllocations('b');
  const idle2 = await c.jobAllocations('b', { index: allocs.meta.index, waitMs: 200 });
  t.is(idle2.meta.index, allocs.meta.index);
  setTimeout(() => void c.registerJob(job('c')), 100);
  const next = await c.jobAllocations('b', { index: allocs.meta.index, waitMs: 20_000 });
  t.true(next.meta.index > allocs.meta.index);

  // Abort a blocking query.
  const ac = new AbortController();
  const p = c.listJobs(undefined, { index: changed.meta.index + 1000, waitMs: 20_000, signal: ac.signal });
  setTimeout(() => ac.abort(), 50);
  const e = await t.throwsAsync(p);
  t.is(e?.name, 'AbortError');
});

test('ACL: missing or wrong token → Forbidden, token not leaked; right token works', async (t) => {
  const secret = 's3cr3t-token-7f1e2d';
  const nomad = await startFakeNomad(t, { token: secret });
  const none = new NomadClient({ address: nomad.address });
  const e1 = await rejects(none.listJobs());
  t.is(e1.code, 'Forbidden');
  t.is(e1.status, 403);
  t.regex(e1.message, /Permission denied/);

  const wrongToken = 'wrong-token-abcdef';
  const wrong = new NomadClient({ address: nomad.address, token: wrongToken });
  const e2 = await rejects(wrong.registerJob(job('x')));
  t.is(e2.code, 'Forbidden');
  t.false(e2.message.includes(wrongToken));
  t.false((e2.stack ?? '').includes(wrongToken));
  t.is(nomad.requests.filter((r) => r.method === 'POST').length, 1, '4xx is not retried');

  const right = new NomadClient({ address: nomad.address, token: secret });
  await right.registerJob(job('x'));
  t.is((await right.readJob('x')).ID, 'x');
  // Errors for other reasons do not carry the token either.
  const e3 = await rejects(right.readJob('missing'));
  t.false(e3.message.includes(secret));
});

test('404 → NotFound', async (t) => {
  const nomad = await startFakeNomad(t);
  const c = new NomadClient({ address: nomad.address });
  const e = await rejects(c.readJob('nope'));
  t.is(e.code, 'NotFound');
  t.is(e.status, 404);
  t.regex(e.message, /job not found/);
  t.is((await rejects(c.readAllocation('00000000-0000-0000-0000-000000000000'))).code, 'NotFound');
  t.is(nomad.requests.length, 2, 'not retried');
});

test('500 twice then success is retried; beyond retries → ServerError', async (t) => {
  const nomad = await startFakeNomad(t);
  const c = new NomadClient({ address: nomad.address, retries: 3, retryBaseMs: 5 });
  await c.registerJob(job('r'));
  nomad.failNext(500, 2);
  const n0 = nomad.requests.length;
  t.is((await c.readJob('r')).ID, 'r');
  t.is(nomad.requests.length - n0, 3);

  nomad.failNext(503, 10);
  const n1 = nomad.requests.length;
  const e = await rejects(c.readJob('r'));
  t.is(e.code, 'ServerError');
  t.is(e.status, 503);
  t.is(nomad.requests.length - n1, 4, '1 try + 3 retries');
});

test('connection refused → Unavailable (after retries)', async (t) => {
  const srv = net.createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as net.AddressInfo).port;
  await new Promise<void>((r) => srv.close(() => r()));
  const c = new NomadClient({ address: `http://127.0.0.1:${port}`, token: 'tok-should-not-leak', retries: 2, retryBaseMs: 5 });
  const e = await rejects(c.listJobs());
  t.is(e.code, 'Unavailable');
  t.regex(e.message, /ECONNREFUSED/);
  t.false(e.message.includes('tok-should-not-leak'));
});

test('slow response beyond timeoutMs → Timeout', async (t) => {
  const nomad = await startFakeNomad(t);
  const c = new NomadClient({ address: nomad.address, timeoutMs: 150 });
  nomad.delayMs = 1_000;
  const t0 = Date.now();
  const e = await rejects(c.readJob('whatever'));
  // Timeout, not the NotFound that the answer (after 1 s) would have brought: the client gave up
  // before it. (A wall-clock bound of 900 ms here measured only the machine's load.)
  t.is(e.code, 'Timeout');
  t.regex(e.message, /within 150 ms/);
  t.log(`gave up after ${Date.now() - t0} ms`);
  nomad.delayMs = 0;
  // The same client still works afterwards: it gets the server's answer (NotFound). Its 150 ms
  // timeout is short for a loaded machine even with the answer at once, so a Timeout is tried
  // again (until a deadline that is a hang guard); a client left broken by the first timeout
  // never gets the answer.
  const deadline = Date.now() + 30_000;
  let after: NomadError;
  for (;;) {
    after = await rejects(c.readJob('whatever'));
    if (after.code !== 'Timeout' || Date.now() > deadline) break;
  }
  t.is(after.code, 'NotFound');
});

test('event stream: job + allocation events, heartbeats, reconnect resumes without loss or duplicates', async (t) => {
  const nomad = await startFakeNomad(t, { heartbeatMs: 100 });
  const c = new NomadClient({ address: nomad.address, retryBaseMs: 20 });
  const batches: Array<{ index: number; events: NomadEvent[] }> = [];
  let heartbeats = 0;
  const errors: Error[] = [];
  const sub = c.eventStream(['Job:*', 'Allocation'], (b) => batches.push(b), {
    index: 1,
    onHeartbeat: () => heartbeats++,
    onError: (e) => errors.push(e),
  });
  t.teardown(() => sub.stop());
  await waitFor(() => nomad.openStreams === 1 || undefined);

  await c.registerJob(job('ev-1'));
  await waitFor(() => batches.some((b) => b.events.some((e) => e.Type === 'AllocationUpdated')) || undefined);
  await waitFor(() => heartbeats >= 2 || undefined);
  t.true(batches.every((b) => b.events.length > 0), 'heartbeats are not delivered as batches');

  const jobEv = batches.flatMap((b) => b.events).find((e) => e.Topic === 'Job');
  t.is(jobEv?.Type, 'JobRegistered');
  t.is(jobEv?.Key, 'ev-1');
  t.is((jobEv?.Payload.Job as NomadJob | undefined)?.ID, 'ev-1');
  t.true(batches.flatMap((b) => b.events).some((e) => e.Topic === 'Allocation' && e.Type === 'PlanResult'));

  // Cut the stream, write while it is down, and check it resumes from the last index.
  const lastBefore = batches.at(-1)!.index;
  nomad.dropStreams();
  await c.registerJob(job('ev-2'));
  await c.registerJob(job('ev-3'));
  await waitFor(() =>
    batches.some((b) => b.events.some((e) => e.Topic === 'Job' && e.Key === 'ev-3')) &&
    batches.filter((b) => b.events.some((e) => e.Type === 'AllocationUpdated')).length >= 3
      ? true
      : undefined,
  );
  t.true(errors.length >= 1, 'the drop was reported');
  const streamConnects = nomad.requests.filter((r) => r.path === '/v1/event/stream');
  t.true(streamConnects.length >= 2);
  t.true(streamConnects.slice(1).some((r) => r.url.includes(`index=${lastBefore}`)), 'resumed from the last index');

  const indexes = batches.map((b) => b.index);
  t.deepEqual(indexes, [...new Set(indexes)].sort((a, b) => a - b), 'no duplicates, increasing');
  const jobKeys = batches.flatMap((b) => b.events).filter((e) => e.Topic === 'Job').map((e) => e.Key);
  t.deepEqual(jobKeys, ['ev-1', 'ev-2', 'ev-3']);
  // Every write that produced a Job/Allocation event is seen exactly once.
  t.is(batches.length, 6, '3 registrations + 3 "running" updates');

  sub.stop();
  await waitFor(() => nomad.openStreams === 0 || undefined);
  const n = nomad.requests.length;
  await new Promise((r) => setTimeout(r, 150));
  t.is(nomad.requests.length, n, 'no reconnect after stop');
});

test('event stream topic filter: only the requested job', async (t) => {
  const nomad = await startFakeNomad(t, { heartbeatMs: 100 });
  const c = new NomadClient({ address: nomad.address });
  const events: NomadEvent[] = [];
  const sub = c.eventStream(['Job:wanted'], (b) => events.push(...b.events));
  t.teardown(() => sub.stop());
  await waitFor(() => nomad.openStreams === 1 || undefined);
  await c.registerJob(job('unwanted'));
  await c.registerJob(job('wanted'));
  await waitFor(() => events.length >= 1 || undefined);
  await new Promise((r) => setTimeout(r, 100));
  t.deepEqual(events.map((e) => `${e.Topic}/${e.Key}`), ['Job/wanted']);
});

test('deregister with purge stops allocations and removes the job', async (t) => {
  const nomad = await startFakeNomad(t);
  const c = new NomadClient({ address: nomad.address });
  await c.registerJob(job('gone', { count: 2 }));
  await waitFor(async () => ((await c.jobAllocations('gone')).items.every((a) => a.ClientStatus === 'running') ? true : undefined));

  const keep = await c.registerJob(job('kept'));
  const d = await c.deregisterJob('kept');
  t.regex(d.evalId, /^[0-9a-f-]{36}$/);
  const kept = await c.readJob('kept');
  t.true(kept.Stop);
  t.true((kept.JobModifyIndex ?? 0) > keep.jobModifyIndex);

  await c.deregisterJob('gone', { purge: true });
  t.true(nomad.requests.some((r) => r.method === 'DELETE' && r.url.includes('purge=true')));
  t.is((await rejects(c.readJob('gone'))).code, 'NotFound');
  // The allocations stop afterwards, when the deregistration's evaluation is processed (issue 14 row 16).
  const items = await waitFor(async () => {
    const r = (await c.jobAllocations('gone')).items;
    return r.every((a) => a.ClientStatus === 'complete') ? r : undefined;
  });
  t.is(items.length, 2);
  for (const a of items) t.is(a.DesiredStatus, 'stop');
  // nomad/job_endpoint.go (v1.7.3): deregistering an unknown job is no error, and makes no evaluation.
  t.deepEqual(await c.deregisterJob('gone'), { evalId: '' });
});

test('restartAllocation restarts the task', async (t) => {
  const nomad = await startFakeNomad(t);
  const c = new NomadClient({ address: nomad.address });
  await c.registerJob(job('rs'));
  const [a] = await waitFor(async () => {
    const { items } = await c.jobAllocations('rs');
    return items[0]?.ClientStatus === 'running' ? items : undefined;
  });
  await c.restartAllocation(a!.ID, 'server');
  await c.restartAllocation(a!.ID);
  const after = await c.readAllocation(a!.ID);
  t.is(after.TaskStates?.server?.Restarts, 2);
  t.true((after.TaskStates?.server?.Events ?? []).some((e) => e.Type === 'Restart Signaled'));
  const call = nomad.requests.find((r) => r.path === `/v1/client/allocation/${a!.ID}/restart`);
  t.is(call?.method, 'POST');
  t.is((await rejects(c.restartAllocation('00000000-0000-0000-0000-00000000dead'))).code, 'NotFound');
});

test('an allocation of a failing image ends "failed" with the reason in TaskStates', async (t) => {
  const nomad = await startFakeNomad(t, { failImages: ['ghcr.io/acme/broken:1'] });
  const c = new NomadClient({ address: nomad.address });
  await c.registerJob(job('bad', { image: 'ghcr.io/acme/broken:1' }));
  const [a] = await waitFor(async () => {
    const { items } = await c.jobAllocations('bad');
    return items[0] && items[0].ClientStatus !== 'pending' ? items : undefined;
  });
  t.is(a!.ClientStatus, 'failed');
  const st = a!.TaskStates?.server;
  t.is(st?.State, 'dead');
  t.true(st?.Failed);
  const reason = (st?.Events ?? []).find((e) => e.Type === 'Driver Failure');
  t.regex(reason?.DisplayMessage ?? '', /ghcr\.io\/acme\/broken:1/);
  t.regex(reason?.DriverError ?? '', /manifest unknown/);
});

test('event stream: no index replays the buffer; a future index delivers nothing old', async (t) => {
  const nomad = await startFakeNomad(t, { heartbeatMs: 100 });
  const c = new NomadClient({ address: nomad.address });
  await c.registerJob(job('hist'));
  await waitFor(async () => ((await c.readJob('hist')).Status === 'running' ? true : undefined));

  const replayed: NomadEvent[] = [];
  const s1 = c.eventStream(['Job'], (b) => replayed.push(...b.events));
  t.teardown(() => s1.stop());
  await waitFor(() => replayed.length >= 1 || undefined);
  t.is(replayed[0]!.Key, 'hist');
  t.is(replayed[0]!.Type, 'JobRegistered');

  // Nomad re-sends its newest batch when asked for an index past it; the client drops it.
  const fresh: Array<{ index: number; events: NomadEvent[] }> = [];
  let beats = 0;
  const from = nomad.index + 1;
  const s2 = c.eventStream(['*'], (b) => fresh.push(b), { index: from, onHeartbeat: () => beats++ });
  t.teardown(() => s2.stop());
  await waitFor(() => beats >= 2 || undefined);
  t.is(fresh.length, 0);
  await c.registerJob(job('later'));
  await waitFor(() => fresh.length >= 1 || undefined);
  t.true(fresh.every((b) => b.index >= from));
  t.is(fresh[0]!.events.find((e) => e.Topic === 'Job')?.Key, 'later');
});
