// WarmPool with engine nomad, end to end: the daemon drives a fake Nomad HTTP API
// (test/helpers/fake-nomad.ts, no real Nomad can run here) whose "client" runs every task as a
// real container on a private dockerd, so claims reach real containers through the
// allocation's address and dynamic port, and credentials are written through Nomad's
// allocation exec WebSocket.

import anyTest, { type TestFn } from 'ava';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import YAML from 'yaml';
import { runCli } from '../src/cli/main.js';
import { EngineError, LABELS } from '../src/controllers/warmpool/engine.js';
import { NomadClient, type NomadJob } from '../src/drivers/nomad.js';
import { NomadEngine, nomadJobPrefix } from '../src/drivers/nomad-engine.js';
import { WARM_TEMPLATE_SPEC } from './helpers/nomad-templates.js';
import { getClaim, installationId } from '../src/state/pools.js';
import { startDockerd, type Dockerd } from './helpers/dockerd.js';
import { startFakeNomad, type FakeNomad } from './helpers/fake-nomad.js';
import { sleep, waitFor } from './helpers/e2e-env.js';
import { poolEnv, warmPoolDoc, type PoolEnv, type WarmPoolOptions } from './helpers/warmpool-env.js';

const test = anyTest as TestFn<{ dockerd: Dockerd }>;

test.before(async (t) => {
  t.context.dockerd = await startDockerd({ name: 'nomad' });
});
test.after.always(async (t) => {
  await t.context.dockerd?.stop();
});

/** busybox httpd on the port Nomad gives the task, serving the secrets directory (so a test can read what was injected). */
const HTTPD = ['sh', '-c', 'exec httpd -f -p "$NOMAD_PORT_http" -h /run/polydev'];

function pool(dockerd: Dockerd, o: Partial<WarmPoolOptions> & { name: string }): WarmPoolOptions {
  return {
    engine: 'nomad',
    image: dockerd.image,
    command: HTTPD,
    ports: [{ name: 'http', containerPort: 8080 }],
    size: 2,
    maxSize: 4,
    ...o,
  };
}

async function nomadEnv(
  t: import('ava').ExecutionContext<{ dockerd: Dockerd }>,
  pools: WarmPoolOptions[],
  fakeOpts: Parameters<typeof startFakeNomad>[1] = {},
  nomadConfig: Record<string, unknown> = {},
): Promise<{ p: PoolEnv; fake: FakeNomad; client: NomadClient; jobs: () => Promise<NomadJob[]> }> {
  const fake = await startFakeNomad(t, { docker: t.context.dockerd.client, heartbeatMs: 500, ...fakeOpts });
  // startTimeout bounds every container start (placement and the fake client's docker create and
  // start): a start that takes longer fails as AllocationFailed. On a loaded dockerd a healthy start
  // can take many seconds, and no test here is about this limit: 60 s.
  const p = await poolEnv(t, undefined, pools, { config: { nomad: { address: fake.address, startTimeout: '60s', ...nomadConfig } } });
  const client = new NomadClient({ address: fake.address, ...(fakeOpts.token ? { token: fakeOpts.token } : {}) });
  const jobs = async () => {
    const { items } = await client.listJobs(nomadJobPrefix(installationId(p.daemon.store)), { meta: true });
    const live = items.filter((j) => !j.Stop);
    return Promise.all(live.map((j) => client.readJob(j.ID)));
  };
  return { p, fake, client, jobs };
}

/**
 * GET from a task's container. A container counts as running once it started, which is before its
 * httpd listens: refused connections are retried (a loaded machine widens that gap from
 * milliseconds to seconds), up to a hang guard of 30 s.
 */
async function httpGet(url: string): Promise<{ status: number; text: string }> {
  const end = Date.now() + 30_000;
  for (;;) {
    try {
      const res = await fetch(url, { signal: AbortSignal.timeout(10_000) });
      return { status: res.status, text: await res.text() };
    } catch (err) {
      if (Date.now() > end) throw err;
      await sleep(200);
    }
  }
}

test.serial('a nomad pool converges: one job per container, rendered from the spec, each a real running container', async (t) => {
  const { dockerd } = t.context;
  const { p, fake, jobs } = await nomadEnv(t, [
    pool(dockerd, { name: 'openai', resources: { cpuMHz: 500, memoryMB: 128, memoryMaxMB: 256 }, env: { PROVIDER_REGION: 'eu' } }),
  ]);
  await p.waitWarm('openai', 2);
  const list = await jobs();
  t.is(list.length, 2);
  const owner = installationId(p.daemon.store);
  const members = p.members('openai');
  for (const job of list) {
    t.true(job.ID.startsWith(`polydev-${owner}-openai-`));
    t.is(job.Type, 'service');
    t.is(job.Meta?.[LABELS.managedBy], 'polydev-reconciler');
    t.is(job.Meta?.[LABELS.owner], owner);
    t.is(job.Meta?.[LABELS.pool], 'openai');
    t.regex(job.Meta?.[LABELS.specHash] ?? '', /^[0-9a-f]{12}$/);
    const group = job.TaskGroups[0]!;
    t.is(group.Count, 1, 'one allocation per job');
    t.deepEqual(group.ReschedulePolicy, { Attempts: 0, Unlimited: false }, 'Nomad never moves a container under a claim');
    t.deepEqual(group.Networks?.[0]?.DynamicPorts, [{ Label: 'http', To: 8080 }]);
    const task = group.Tasks[0]!;
    t.is(task.Driver, 'docker');
    t.is(task.Config?.image, dockerd.image);
    t.deepEqual(task.Config?.entrypoint, HTTPD);
    t.deepEqual(task.Env, { PROVIDER_REGION: 'eu' });
    t.is(task.Resources?.CPU, 500);
    t.is(task.Resources?.MemoryMB, 128);
    t.is(task.Resources?.MemoryMaxMB, 256);
    const m = members.find((x) => x.containerId === job.ID);
    t.truthy(m, `job ${job.ID} is a member`);
    t.is(m!.address, '127.0.0.1');
    t.true((m!.ports?.http ?? 0) > 0, 'the dynamic port is recorded');
    // The real container answers on the allocation's address and port.
    const res = await httpGet(`http://${m!.address}:${m!.ports!.http}/`);
    t.true(res.status === 404 || res.status === 403 || res.status === 200, `httpd answered ${res.status}`);
  }
  t.true(fake.requests.some((r) => r.path === '/v1/event/stream'), 'the engine follows the event stream');
});

test.serial('a claim returns the allocation address and port; credentials reach the real container through alloc exec; release deregisters', async (t) => {
  const { dockerd } = t.context;
  const { p, fake, jobs } = await nomadEnv(t, [pool(dockerd, { name: 'anthropic', size: 1, maxSize: 3 })]);
  await p.waitWarm('anthropic', 1);
  const res = await p.api.claim('anthropic', { userId: 'u1', env: { API_KEY: 'sk-test-nomad-123' }, files: { 'config/token.json': '{"t":1}' } });
  t.is(res.status, 201, JSON.stringify(res.body));
  const c = res.body.container as { id: string; address: string; ports: { http: number } };
  t.is(c.address, '127.0.0.1');
  t.true(c.ports.http > 0);
  t.true(fake.requests.some((r) => /^\/v1\/client\/allocation\/[^/]+\/exec$/.test(r.path)), 'written through the exec API');
  const env = await httpGet(`http://${c.address}:${c.ports.http}/env`);
  t.is(env.status, 200);
  t.is(env.text, 'API_KEY=sk-test-nomad-123\n');
  const file = await httpGet(`http://${c.address}:${c.ports.http}/files/config/token.json`);
  t.is(file.text, '{"t":1}');
  const claimId = res.body.claimId as string;
  t.deepEqual(getClaim(p.daemon.store, claimId)?.ports, c.ports);
  // The pool refills beside the claimed container.
  await p.waitWarm('anthropic', 1);
  t.is((await jobs()).length, 2);

  t.is((await p.api.release(claimId)).status, 200);
  // Hang guard: a reconcile and the deregistration.
  await waitFor('the claimed job is deregistered', async () => !(await jobs()).some((j) => j.ID === c.id), 60_000);
  // Deregistering stops the allocation's container afterwards (asynchronously, as Nomad's client
  // does; the fake removes it from dockerd after answering), so wait for it to stop serving.
  await waitFor(
    'the released container no longer serves',
    () => fetch(`http://${c.address}:${c.ports.http}/`, { signal: AbortSignal.timeout(2_000) }).then(() => false, () => true),
    60_000,
    200,
  );
});

test.serial('a container that dies is replaced, its claim fails, and a dropped event stream is resumed', async (t) => {
  const { dockerd } = t.context;
  const { p, fake, jobs } = await nomadEnv(t, [pool(dockerd, { name: 'google', size: 2, maxSize: 4 })]);
  await p.waitWarm('google', 2);
  const claim = await p.api.claim('google', { userId: 'u1' });
  t.is(claim.status, 201);
  await p.waitWarm('google', 2);
  fake.dropStreams();
  const victim = claim.body.container.id as string;
  const allocs = await new NomadClient({ address: fake.address }).jobAllocations(victim);
  const cid = fake.containerOf(allocs.items[0]!.ID);
  t.truthy(cid);
  await dockerd.request('POST', `/containers/${cid}/kill`);
  await waitFor(
    'the dead container replaced and its claim failed',
    async () => getClaim(p.daemon.store, claim.body.claimId)?.state === 'failed' && !(await jobs()).some((j) => j.ID === victim),
    60_000, // hang guard: exit noticed by the fake's poll, the stream reconnected, a reconcile, a deregistration
  );
  await p.waitWarm('google', 2);
  t.regex(getClaim(p.daemon.store, claim.body.claimId)!.reason ?? '', /dead|exited/);
  t.true(fake.openStreams >= 1, 'the event stream reconnected');
});

test.serial('a node that goes down: Nomad replaces the claimed allocation elsewhere, the claim fails loudly and the pool refills (issue 14 row 10)', async (t) => {
  const { dockerd } = t.context;
  const { p, fake, jobs } = await nomadEnv(t, [pool(dockerd, { name: 'mistral', size: 1, maxSize: 3 })]);
  await p.waitWarm('mistral', 1);
  const claim = await p.api.claim('mistral', { userId: 'u1', env: { API_KEY: 'sk-lost-1' } });
  t.is(claim.status, 201, JSON.stringify(claim.body));
  await p.waitWarm('mistral', 1);
  const victim = claim.body.container.id as string;
  await fake.loseNode();
  await waitFor(
    'the claim failed and the replaced job deregistered',
    async () => getClaim(p.daemon.store, claim.body.claimId)?.state === 'failed' && !(await jobs()).some((j) => j.ID === victim),
    60_000, // hang guard: the lost and replacement events, a reconcile, a deregistration
  );
  t.regex(getClaim(p.daemon.store, claim.body.claimId)!.reason ?? '', /dead/);
  await p.waitWarm('mistral', 1);
});

test.serial('an allocation restart gives the task a new container: what the old one wrote outside its mounts is gone (issue 14 row 12)', async (t) => {
  const { dockerd } = t.context;
  const fake = await startFakeNomad(t, { docker: dockerd.client });
  const client = new NomadClient({ address: fake.address });
  await client.registerJob({
    ID: 'restarted',
    Datacenters: ['*'],
    TaskGroups: [{ Name: 'g', Count: 1, Tasks: [{ Name: 't', Driver: 'docker', Config: { image: dockerd.image, entrypoint: ['sleep', '3600'] }, Resources: { CPU: 100, MemoryMB: 64 } }] }],
  });
  const alloc = await waitFor('running', async () => (await client.jobAllocations('restarted')).items.find((a) => a.ClientStatus === 'running'), 60_000);
  const before = fake.containerOf(alloc.ID);
  t.is((await client.execAllocation(alloc.ID, ['sh', '-c', 'echo kept > /marker'], { task: 't' })).exitCode, 0);
  t.is((await client.execAllocation(alloc.ID, ['cat', '/marker'], { task: 't' })).exitCode, 0);
  await client.restartAllocation(alloc.ID, 't');
  const after = await client.readAllocation(alloc.ID);
  t.is(after.TaskStates?.t?.Restarts, 1);
  t.not(fake.containerOf(alloc.ID), before, 'a new container');
  const r = await client.execAllocation(alloc.ID, ['cat', '/marker'], { task: 't' });
  t.not(r.exitCode, 0, 'the writable layer did not survive');
});

test.serial('with To set the task sees NOMAD_PORT_<label> = To and listens there; the host port forwards to it (issue 14 row 15)', async (t) => {
  const { dockerd } = t.context;
  const fake = await startFakeNomad(t, { docker: dockerd.client });
  const client = new NomadClient({ address: fake.address });
  await client.registerJob({
    ID: 'ported',
    Datacenters: ['*'],
    TaskGroups: [
      {
        Name: 'g',
        Count: 1,
        Networks: [{ DynamicPorts: [{ Label: 'http', To: 8080 }] }],
        Tasks: [{ Name: 't', Driver: 'docker', Config: { image: dockerd.image, entrypoint: ['sh', '-c', 'exec httpd -f -p "$NOMAD_PORT_http" -h /'], ports: ['http'] }, Resources: { CPU: 100, MemoryMB: 64 } }],
      },
    ],
  });
  const stub = await waitFor('running', async () => (await client.jobAllocations('ported')).items.find((a) => a.ClientStatus === 'running'), 60_000);
  const alloc = await client.readAllocation(stub.ID);
  const port = alloc.AllocatedResources!.Shared!.Ports!.find((p) => p.Label === 'http')!;
  t.is(port.To, 8080);
  t.not(port.Value, 8080);
  const env = await client.execAllocation(alloc.ID, ['sh', '-c', 'echo "$NOMAD_PORT_http $NOMAD_HOST_PORT_http $NOMAD_ADDR_http"'], { task: 't' });
  t.is(env.stdout.toString().trim(), `8080 ${port.Value} ${port.HostIP}:${port.Value}`);
  const res = await httpGet(`http://${port.HostIP}:${port.Value}/`);
  t.true(res.status === 404 || res.status === 403 || res.status === 200, `httpd answered ${res.status}`);
});

test.serial('recycle restarts the allocation, which needs alloc-lifecycle: a token without it is refused with the capability named, with it the container runs again (issue 14 row 11)', async (t) => {
  const { dockerd } = t.context;
  const fake = await startFakeNomad(t, {
    docker: dockerd.client,
    tokens: {
      'no-lifecycle-token': ['submit-job', 'read-job', 'list-jobs', 'alloc-exec'],
      'full-token': ['submit-job', 'read-job', 'list-jobs', 'alloc-exec', 'alloc-lifecycle'],
    },
  });
  const spec = { ...WARM_TEMPLATE_SPEC, image: dockerd.image, command: ['sleep', '3600'], args: [] };
  const engine = (token: string) => new NomadEngine({ client: new NomadClient({ address: fake.address, token }), datacenters: ['*'], startTimeoutMs: 60_000 });
  const limited = engine('no-lifecycle-token');
  t.teardown(() => limited.close());
  const c = await limited.start(spec);
  const err = await t.throwsAsync(limited.recycle(c, '/tmp/workspace'));
  t.true(err instanceof EngineError);
  t.regex(err!.message, /permission denied.*alloc-lifecycle/);
  const full = engine('full-token');
  t.teardown(() => full.close());
  const again = await full.recycle(c, '/tmp/workspace');
  t.is(again.state, 'running');
});

test.serial('an image Nomad cannot pull: AllocationFailed with Nomad\'s reason, and no job is left behind', async (t) => {
  const { dockerd } = t.context;
  const { p, jobs } = await nomadEnv(t, [pool(dockerd, { name: 'broken', image: 'polydev-test/missing:1', size: 1, maxSize: 1 })]);
  const status = await waitFor(
    'AllocationFailed',
    () => {
      const st = p.daemon.store.getResource('WarmPool', 'broken')?.status;
      return st?.conditions.find((c) => c.reason === 'AllocationFailed') ? st : undefined;
    },
    60_000, // hang guard: a register, a failed docker create and a reconcile on a loaded machine
  );
  const cond = status.conditions.find((c) => c.reason === 'AllocationFailed')!;
  t.regex(cond.message ?? '', /Failed to pull `polydev-test\/missing:1`/);
  t.is(status.phase === 'Ready', false);
  await waitFor('no job left', async () => (await jobs()).length === 0, 60_000); // hang guard
});

test.serial('a GPU pool renders Nomad Devices; a claim runs while the node has a GPU and fails as not placed when none is free', async (t) => {
  const { dockerd } = t.context;
  const { p, jobs } = await nomadEnv(
    t,
    [pool(dockerd, { name: 'gpu-workers', size: 0, maxSize: 2, resources: { cpuMHz: 1000, memoryMB: 64, devices: [{ name: 'nvidia/gpu', count: 1 }] } })],
    { devices: { 'nvidia/gpu': 1 } },
    // The second claim is never placed and fails when this passes, so it is not 60 s. But the first
    // claim's container must start within it too (a docker create and start through the fake, which
    // can take seconds on a loaded dockerd; 2 s was too tight): 20 s.
    { startTimeout: '20s' },
  );
  await waitFor('pool ready', () => p.daemon.store.getResource('WarmPool', 'gpu-workers')?.status?.phase === 'Ready', 60_000);
  const first = await p.api.claim('gpu-workers', { userId: 'u1' });
  t.is(first.status, 201, JSON.stringify(first.body));
  const [job] = await jobs();
  t.deepEqual(job!.TaskGroups[0]!.Tasks[0]!.Resources?.Devices, [{ Name: 'nvidia/gpu', Count: 1 }]);
  const second = await p.api.claim('gpu-workers', { userId: 'u2' });
  t.not(second.status, 201);
  t.regex(JSON.stringify(second.body), /not placed|no allocation running/);
  await waitFor('the unplaced job is deregistered', async () => (await jobs()).length === 1, 60_000); // hang guard
});

test.serial('Nomad unreachable is EngineUnavailable; a wrong ACL token says 403 and never leaks the token', async (t) => {
  const { dockerd } = t.context;
  const fake = await startFakeNomad(t, { token: 'right-token-000' });
  const p = await poolEnv(t, undefined, [pool(dockerd, { name: 'nomadless', size: 1, maxSize: 1 })], {
    config: { nomad: { address: 'http://127.0.0.1:1', startTimeout: '2s' } },
  });
  const down = await waitFor(
    'EngineUnavailable',
    () => p.daemon.store.getResource('WarmPool', 'nomadless')?.status?.conditions.find((c) => c.reason === 'EngineUnavailable'),
    60_000, // hang guard: the first reconcile after the daemon started
  );
  t.regex(down.message ?? '', /Nomad/);

  const tokenFile = path.join(p.env.dir, 'nomad-token');
  fs.writeFileSync(tokenFile, 'wrong-token-999\n', { mode: 0o600 });
  const q = await poolEnv(t, undefined, [pool(dockerd, { name: 'forbidden', size: 1, maxSize: 1 })], {
    config: { nomad: { address: fake.address, tokenFile, startTimeout: '2s' } },
  });
  const refused = await waitFor(
    'a 403 condition',
    () => q.daemon.store.getResource('WarmPool', 'forbidden')?.status?.conditions.find((c) => /403/.test(c.message ?? '')),
    60_000, // hang guard: the first reconcile after the daemon started
  );
  t.regex(refused.message ?? '', /ACL token/);
  t.false(JSON.stringify(q.daemon.store.getResource('WarmPool', 'forbidden')).includes('wrong-token-999'));
});

test.serial('a steady-state resync of a pool costs one job list, not one call per container', async (t) => {
  const { dockerd } = t.context;
  const { p, fake } = await nomadEnv(t, [pool(dockerd, { name: 'steady', size: 6, maxSize: 6 })]);
  await p.waitWarm('steady', 6);
  await sleep(700); // at least one heartbeat: the stream is known to deliver
  // Settle first, so what is counted below is the steady state: a start caches its job without Nomad's
  // ModifyIndex (-1), so the next job list re-reads every started job once. That list usually comes
  // from the reconcile the start events bring, but a loaded machine may deliver them after waitWarm
  // passed (or after the sleep). This reconcile does the re-reads now; a late event after it costs
  // at most one more job list (allowed below), never a per-job read.
  p.daemon.manager.context.enqueue('WarmPool', 'steady');
  await p.waitWarm('steady', 6);
  const before = fake.requests.length;
  for (let i = 0; i < 3; i++) {
    p.daemon.manager.context.enqueue('WarmPool', 'steady');
    await p.waitWarm('steady', 6);
  }
  const calls = fake.requests.slice(before).filter((r) => r.path !== '/v1/event/stream');
  const lists = calls.filter((r) => r.path === '/v1/jobs').length;
  t.true(lists >= 3 && lists <= 4, `job lists: ${lists}`);
  t.deepEqual(
    calls.filter((r) => r.path !== '/v1/jobs').map((r) => r.path),
    [],
    'no per-job or per-allocation reads in steady state',
  );
});

test.serial('`plan warmpool` shows the starts a reconcile would make and the Nomad job each registers, and registers nothing', async (t) => {
  const { dockerd } = t.context;
  const fake = await startFakeNomad(t, { docker: dockerd.client });
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pd-plan-nomad-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const cfg = path.join(dir, 'config.yaml');
  fs.writeFileSync(cfg, YAML.stringify({ database: path.join(dir, 'state.db'), nomad: { address: fake.address } }));
  const poolFile = path.join(dir, 'pool.yaml');
  fs.writeFileSync(poolFile, YAML.stringify(warmPoolDoc(pool(dockerd, { name: 'planned', size: 2, maxSize: 2 }))));
  const run = async (args: string[]) => {
    const out: string[] = [];
    const code = await runCli(['--config', cfg, ...args], { out: (s) => out.push(s), err: (s) => out.push(s) });
    return { code, text: out.join('\n') };
  };
  t.is((await run(['apply', '-f', poolFile])).code, 0);
  const before = fake.requests.filter((r) => r.method === 'POST').length;
  const plan = await run(['plan', 'warmpool', 'planned']);
  t.is(plan.code, 1, plan.text);
  t.regex(plan.text, /WarmPool\/planned: 2 change\(s\)/);
  // Identical actions are grouped, counted: one line, not one per container.
  t.regex(plan.text, /^  start 2 warm containers$/m);
  t.notRegex(plan.text, /start a warm container/);
  const json = plan.text.slice(plan.text.indexOf('{')).split('\n').map((l) => l.replace(/^ {4}/, '')).join('\n');
  const job = (JSON.parse(json) as { Job: NomadJob }).Job;
  t.is(job.TaskGroups[0]!.Tasks[0]!.Config?.image, dockerd.image);
  t.deepEqual(job.TaskGroups[0]!.Networks?.[0]?.DynamicPorts, [{ Label: 'http', To: 8080 }]);
  t.is(fake.requests.filter((r) => r.method === 'POST').length, before, 'plan registers nothing');
  t.is((await run(['plan', 'warmpool', 'nope'])).code, 1);
});
