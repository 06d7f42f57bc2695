// Where the nomad engine, the client and the fake Nomad must agree with a real Nomad 1.7.3
// agent (issue 14: each test names its row). The Nomad behaviour each test relies on is cited in
// test/helpers/fake-nomad.ts and test/helpers/nomad-driver-config.ts (file and version).

import test from 'ava';
import { EngineError, LABELS, type ContainerSpec, type EngineEvent } from '../src/controllers/warmpool/engine.js';
import { EVENT_STREAM_IDLE_TIMEOUT_MS, MAX_BLOCKING_WAIT_MS, NOMAD_EVENT_HEARTBEAT_MS, NomadClient, NomadError, type NomadEvent, type NomadJob } from '../src/drivers/nomad.js';
import { NomadEngine, failureReason, renderNomadJob } from '../src/drivers/nomad-engine.js';
import { DOCKER_TASK_CONFIG_SPEC, decodeHclJson, driverConfigError } from './helpers/nomad-driver-config.js';
import { blockingWaitMs, startFakeNomad } from './helpers/fake-nomad.js';
import { WARM_TEMPLATE_SPEC } from './helpers/nomad-templates.js';

/** Polls fn until it gives a value; the deadline is a hang guard only. */
async function waitFor<T>(fn: () => Promise<T | undefined | false> | T | undefined | false, timeoutMs = 30_000): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v !== undefined && v !== false) return v;
    if (Date.now() > end) throw new Error('waitFor: timed out');
    await new Promise((r) => setTimeout(r, 10));
  }
}

function dockerJob(id: string, config: Record<string, unknown>): NomadJob {
  return {
    ID: id,
    Name: id,
    Type: 'service',
    Datacenters: ['*'],
    TaskGroups: [{ Name: 'g', Count: 1, Tasks: [{ Name: 't', Driver: 'docker', Config: config, Resources: { CPU: 100, MemoryMB: 64 } }] }],
  };
}

// ---- row 1 ---------------------------------------------------------------------------------

test('row 1: the docker driver spec (drivers/docker/config.go, v1.7.3) refuses labels as an object with go-cty\'s words', (t) => {
  const labels = { 'polydev.ai/pool': 'openai' };
  t.deepEqual(decodeHclJson({ image: 'x', labels }, DOCKER_TASK_CONFIG_SPEC), [
    'Incorrect attribute value type: Inappropriate value for attribute "labels": list of map of string required.',
  ]);
  t.deepEqual(decodeHclJson({ image: 'x', labels: [labels] }, DOCKER_TASK_CONFIG_SPEC), []);
  t.is(
    driverConfigError('docker', { image: 'x', labels }),
    '2 errors occurred:\n\t* failed to parse config: \n\t* Incorrect attribute value type: Inappropriate value for attribute "labels": list of map of string required.\n\n',
  );
  // Other mistakes the client would refuse as well: a missing image, an unknown key, a wrong element.
  t.deepEqual(decodeHclJson({ lables: [labels], ports: ['http', 1, { a: 1 }] }, DOCKER_TASK_CONFIG_SPEC), [
    'Invalid label: No argument or block type is named "lables". Did you mean "labels"?',
    'Incorrect attribute value type: Inappropriate value for attribute "ports": element 2: string required.',
    'Missing required argument: The argument "image" is required, but no definition was found.',
  ]);
  t.deepEqual(decodeHclJson({ image: 'x', mount: [{ type: 'tmpfs', tmpfs_options: { size: 'big' } }] }, DOCKER_TASK_CONFIG_SPEC), [
    'Incorrect attribute value type: Inappropriate value for attribute "size": a number is required.',
  ]);
});

test('row 1: every rendered warm container decodes (with and without ports, command, args, devices); labels are a list of one map', (t) => {
  const { ports: _p, command: _c, args: _a, ...bare } = WARM_TEMPLATE_SPEC;
  const variants: ContainerSpec[] = [
    WARM_TEMPLATE_SPEC,
    bare,
    { ...WARM_TEMPLATE_SPEC, resources: { cpuMHz: 2000, memoryMB: 4096, devices: [{ name: 'nvidia/gpu', count: 1 }] } },
    { ...WARM_TEMPLATE_SPEC, ports: [{ name: 'http', containerPort: 8080 }, { name: 'debug', containerPort: 9229 }] },
  ];
  for (const spec of variants) {
    const config = renderNomadJob(spec, { datacenters: ['*'] }).TaskGroups[0]!.Tasks[0]!.Config;
    t.deepEqual(decodeHclJson(JSON.parse(JSON.stringify(config)), DOCKER_TASK_CONFIG_SPEC), []);
    t.deepEqual(config?.labels, [{ ...WARM_TEMPLATE_SPEC.labels }]);
  }
});

test('row 1: registration accepts a Config that does not decode, and the allocation then fails with a "Failed Validation" event', async (t) => {
  const nomad = await startFakeNomad(t);
  const client = new NomadClient({ address: nomad.address });
  await client.registerJob(dockerJob('bad-labels', { image: 'busybox', labels: { a: 'b' } }), { enforceIndex: 0 });
  const alloc = await waitFor(async () => (await client.jobAllocations('bad-labels')).items.find((a) => a.ClientStatus === 'failed'));
  const events = alloc.TaskStates?.t?.Events ?? [];
  const validation = events.find((e) => e.Type === 'Failed Validation');
  t.regex(validation?.ValidationError ?? '', /Inappropriate value for attribute "labels": list of map of string required/);
  t.is(events.at(-1)?.Type, 'Not Restarting');
  t.is(events.at(-1)?.DisplayMessage, 'Error was unrecoverable');
  t.regex(failureReason(events, alloc.ClientStatus), /list of map of string required/);
});

test('row 1: failureReason reads the ValidationError, not the "Not Restarting" event after it', (t) => {
  const why = '2 errors occurred:\n\t* failed to parse config: \n\t* Incorrect attribute value type: Inappropriate value for attribute "labels": list of map of string required.\n\n';
  const reason = failureReason(
    [
      { Type: 'Received', Time: 1, DisplayMessage: 'Task received by client' },
      { Type: 'Failed Validation', Time: 2, DisplayMessage: why, ValidationError: why },
      { Type: 'Not Restarting', Time: 3, DisplayMessage: 'Policy allows no restarts', FailsTask: true },
    ],
    'failed',
  );
  t.is(reason, '2 errors occurred: failed to parse config: Incorrect attribute value type: Inappropriate value for attribute "labels": list of map of string required.');
});

test('row 1: the engine starts a warm container on a fake that decodes driver Config like a client', async (t) => {
  const nomad = await startFakeNomad(t);
  const engine = new NomadEngine({ client: new NomadClient({ address: nomad.address }), datacenters: ['*'], startTimeoutMs: 20_000 });
  t.teardown(() => engine.close());
  const c = await engine.start(WARM_TEMPLATE_SPEC);
  t.is(c.state, 'running');
});

// ---- rows 2 and 3 ----------------------------------------------------------------------------

test('row 2: qemu port_map as an object fails the allocation; as a list of one map over task ports it runs', async (t) => {
  const nomad = await startFakeNomad(t);
  const client = new NomadClient({ address: nomad.address });
  const vm = (id: string, portMap: unknown, taskNetwork: boolean): NomadJob => ({
    ID: id,
    Datacenters: ['*'],
    TaskGroups: [
      {
        Name: 'vm',
        Count: 1,
        Tasks: [
          {
            Name: 'browser',
            Driver: 'qemu',
            Config: { image_path: 'local/vm.qcow2', port_map: portMap },
            Resources: { CPU: 100, MemoryMB: 64, ...(taskNetwork ? { Networks: [{ DynamicPorts: [{ Label: 'webrtc' }] }] } : {}) },
          },
        ],
      },
    ],
  });
  await client.registerJob(vm('vm-object', { webrtc: 8443 }, true));
  await client.registerJob(vm('vm-list', [{ webrtc: 8443 }], true));
  await client.registerJob(vm('vm-unknown-label', [{ control: 9222 }], true));
  const outcome = (id: string) => waitFor(async () => (await client.jobAllocations(id)).items.find((a) => a.ClientStatus !== 'pending'));
  const asObject = await outcome('vm-object');
  t.is(asObject.ClientStatus, 'failed');
  t.regex(failureReason(asObject.TaskStates?.browser?.Events ?? [], 'failed'), /"port_map": list of map of number required/);
  t.is((await outcome('vm-list')).ClientStatus, 'running');
  const unknown = await outcome('vm-unknown-label');
  t.is(failureReason(unknown.TaskStates?.browser?.Events ?? [], 'failed'), 'Unknown port label "control"');
});

test('row 3: cap_add outside the docker plugin\'s allow_caps fails the task with the driver\'s words', async (t) => {
  const nomad = await startFakeNomad(t);
  const client = new NomadClient({ address: nomad.address });
  await client.registerJob(dockerJob('caps', { image: 'polydev-reconciler:latest', cap_add: ['NET_ADMIN', 'chown'] }));
  const alloc = await waitFor(async () => (await client.jobAllocations('caps')).items.find((a) => a.ClientStatus !== 'pending'));
  t.is(alloc.ClientStatus, 'failed');
  t.regex(
    failureReason(alloc.TaskStates?.t?.Events ?? [], 'failed'),
    /^Failed to create container configuration for image "polydev-reconciler:latest" \("sha256:[0-9a-f]{64}"\): driver does not allow the following capabilities: net_admin$/,
  );
});

// ---- rows 5, 6, 14 ---------------------------------------------------------------------------

/** Every event a raw stream of the fake delivers, for asserting on what Nomad sends. */
function collect(client: NomadClient, topics: string[]): { events: NomadEvent[]; stop(): void } {
  const events: NomadEvent[] = [];
  const s = client.eventStream(topics, (b) => events.push(...b.events));
  return { events, stop: () => s.stop() };
}

const OWNER = WARM_TEMPLATE_SPEC.labels[LABELS.owner]!;

function warmSpec(pool: string, slot: string): ContainerSpec {
  return { ...WARM_TEMPLATE_SPEC, pool, slot, name: `polydev-${pool}-${slot}`, labels: { ...WARM_TEMPLATE_SPEC.labels, [LABELS.pool]: pool, [LABELS.slot]: slot } };
}

test('row 6: allocation events carry no job, and the engine still names the pool of a job it has not cached', async (t) => {
  const nomad = await startFakeNomad(t);
  const client = new NomadClient({ address: nomad.address });
  const raw = collect(client, ['Allocation']);
  t.teardown(() => raw.stop());
  const engine = new NomadEngine({ client, datacenters: ['*'] });
  t.teardown(() => engine.close());
  const seen: EngineEvent[] = [];
  engine.watch(OWNER, (e) => seen.push(e));
  // Registered behind the engine's back (another replica, or before a restart): not in its cache.
  const job = renderNomadJob(warmSpec('my-pool', 'abc123'), { datacenters: ['*'] });
  await client.registerJob(job, { enforceIndex: 0 });
  const started = await waitFor(() => seen.find((e) => e.id === job.ID && e.type === 'start'));
  t.is(started.pool, 'my-pool');
  t.true(raw.events.length > 0);
  for (const e of raw.events) t.is((e.Payload.Allocation as { Job?: unknown }).Job, null, 'nomad/state/events.go drops the job');
});

for (const nomadVersion of ['1.7.3', '1.7.5'] as const) {
  test(`row 5: a purge on Nomad ${nomadVersion} ${nomadVersion === '1.7.3' ? 'emits no Job event' : 'emits JobDeregistered'}, and the engine reports the container gone either way`, async (t) => {
    const nomad = await startFakeNomad(t, { nomadVersion });
    const client = new NomadClient({ address: nomad.address });
    const engine = new NomadEngine({ client, datacenters: ['*'], startTimeoutMs: 20_000 });
    t.teardown(() => engine.close());
    const c = await engine.start(warmSpec('openai', 'def456'));
    const raw = collect(client, ['Job', 'Allocation']);
    t.teardown(() => raw.stop());
    const seen: EngineEvent[] = [];
    engine.watch(OWNER, (e) => seen.push(e));
    const { meta } = await client.listJobs();
    // Someone else purges it (an operator's `nomad job stop -purge`): the engine did not ask for it.
    await client.deregisterJob(c.id, { purge: true });
    const gone = await waitFor(() => seen.find((e) => e.id === c.id && (e.type === 'die' || e.type === 'destroy')));
    t.is(gone.pool, 'openai');
    await waitFor(() => raw.events.find((e) => e.Topic === 'Allocation' && e.Index > meta.index && (e.Payload.Allocation as { ClientStatus: string }).ClientStatus === 'complete'));
    const jobEvents = raw.events.filter((e) => e.Topic === 'Job' && e.Index > meta.index);
    t.deepEqual(jobEvents.map((e) => e.Type), nomadVersion === '1.7.3' ? [] : ['JobDeregistered']);
    t.deepEqual(await engine.list(OWNER), []);
  });
}

test('row 14: DELETE of an unknown job is 200 with an empty EvalID; the engine\'s remove is quiet about it', async (t) => {
  const nomad = await startFakeNomad(t);
  const client = new NomadClient({ address: nomad.address });
  t.deepEqual(await client.deregisterJob('never-registered', { purge: true }), { evalId: '' });
  const engine = new NomadEngine({ client, datacenters: ['*'] });
  await t.notThrowsAsync(engine.remove('polydev-x-never-registered'));
});

test('row 16: a purge answers before the allocations stop: their "stop" comes at a later index than the deregistration', async (t) => {
  const nomad = await startFakeNomad(t);
  const client = new NomadClient({ address: nomad.address });
  await client.registerJob(dockerJob('purged', { image: 'busybox' }));
  await waitFor(async () => (await client.jobAllocations('purged')).items.find((a) => a.ClientStatus === 'running'));
  const raw = collect(client, ['Allocation']);
  t.teardown(() => raw.stop());
  const { meta } = await client.listJobs();
  await client.deregisterJob('purged', { purge: true });
  const after = nomad.index;
  const stop = await waitFor(() => raw.events.find((e) => e.Index > meta.index && (e.Payload.Allocation as { DesiredStatus: string }).DesiredStatus === 'stop'));
  t.true(stop.Index > after, `stop at ${stop.Index}, the deregistration answered at ${after}`);
  t.is(stop.Type, 'PlanResult');
});

// ---- row 9 -----------------------------------------------------------------------------------

test('row 9: an invalid job is HTTP 500 "N errors occurred"; the client does not retry it and the engine does not call Nomad unavailable', async (t) => {
  const nomad = await startFakeNomad(t);
  const client = new NomadClient({ address: nomad.address, retryBaseMs: 1 });
  const bad = { ...dockerJob('has a space', { image: 'busybox' }), Priority: 200 };
  const err = await t.throwsAsync(client.registerJob(bad));
  t.true(err instanceof NomadError);
  t.is((err as NomadError).code, 'Invalid');
  t.is((err as NomadError).status, 500);
  t.is((err as NomadError).message, 'POST /v1/jobs: HTTP 500: Nomad refused it as invalid: 2 errors occurred: Job ID contains a space job priority must be between [1, 100]');
  t.is(nomad.requests.filter((r) => r.method === 'POST' && r.path === '/v1/jobs').length, 1, 'not retried');

  const engine = new NomadEngine({ client, datacenters: ['*'] });
  const startErr = await t.throwsAsync(engine.start(warmSpec('bad pool', 'abc')));
  t.true(startErr instanceof EngineError);
  t.is((startErr as EngineError).reason, 'StartFailed');
  t.regex(startErr!.message, /Job ID contains a space/);
});

// ---- row 8 -----------------------------------------------------------------------------------

test('row 8: the event stream refuses a token without read-job with HTTP 500 "Permission denied": Forbidden, reported once, not reconnected', async (t) => {
  const nomad = await startFakeNomad(t, { tokens: { 'limited-token-1': ['list-jobs', 'submit-job'] } });
  const client = new NomadClient({ address: nomad.address, token: 'limited-token-1', retryBaseMs: 1 });
  const errors: Error[] = [];
  const s = client.eventStream(['Job'], () => undefined, { onError: (e) => errors.push(e) });
  t.teardown(() => s.stop());
  const err = await waitFor(() => errors[0]);
  t.true(err instanceof NomadError);
  t.is((err as NomadError).code, 'Forbidden');
  t.is((err as NomadError).status, 500);
  // A reconnect would come within milliseconds (retryBaseMs 1): a few round trips later there is none.
  for (let i = 0; i < 5; i++) await client.listJobs();
  t.is(nomad.requests.filter((r) => r.path === '/v1/event/stream').length, 1);
  t.is(errors.length, 1);
  // Without a token it is 403, as everywhere.
  const anonymous = new NomadClient({ address: nomad.address });
  const errs2: Error[] = [];
  const s2 = anonymous.eventStream(['Job'], () => undefined, { onError: (e) => errs2.push(e) });
  t.teardown(() => s2.stop());
  t.is(((await waitFor(() => errs2[0])) as NomadError).status, 403);

  // The engine names the capability and does not call it EngineUnavailable.
  const engine = new NomadEngine({ client, datacenters: ['*'] });
  t.teardown(() => engine.close());
  const engineErrs: Error[] = [];
  engine.watch(OWNER, () => undefined, (e) => engineErrs.push(e));
  const e = await waitFor(() => engineErrs[0]);
  t.true(e instanceof EngineError);
  t.is((e as EngineError).reason, 'EngineError');
  t.regex(e.message, /permission denied.*read-job/);
});

// ---- row 7 -----------------------------------------------------------------------------------

test('row 7: alloc exec refusals come after the upgrade as close frames 1008/1011 with the reason, and map to NotFound, BadRequest, Forbidden', async (t) => {
  const nomad = await startFakeNomad(t, { token: 'mgmt-token-1', tokens: { 'no-exec-token': ['read-job', 'list-jobs', 'submit-job'] } });
  const client = new NomadClient({ address: nomad.address, token: 'mgmt-token-1' });
  await client.registerJob(dockerJob('exec-failed', { image: 'busybox', labels: { not: 'a list' } }));
  const failed = await waitFor(async () => (await client.jobAllocations('exec-failed')).items.find((a) => a.ClientStatus === 'failed'));

  const unknown = await t.throwsAsync(client.execAllocation('00000000-0000-4000-8000-000000000000', ['true'], { task: 't' }));
  t.is((unknown as NomadError).code, 'NotFound');
  t.regex(unknown!.message, /\(1008 Unknown allocation "00000000-0000-4000-8000-000000000000"\)/);

  const terminal = await t.throwsAsync(client.execAllocation(failed.ID, ['true'], { task: 't' }));
  t.is((terminal as NomadError).code, 'BadRequest');
  t.regex(terminal!.message, new RegExp(`\\(1008 exec not possible, client status of allocation ${failed.ID} is failed\\)`));

  const noExec = new NomadClient({ address: nomad.address, token: 'no-exec-token' });
  const forbidden = await t.throwsAsync(noExec.execAllocation(failed.ID, ['true'], { task: 't' }));
  t.is((forbidden as NomadError).code, 'Forbidden');
  t.regex(forbidden!.message, /\(1011 Permission denied\)/);
});

// ---- row 4 -----------------------------------------------------------------------------------

test('row 4: Nomad heartbeats every 30 s and at once on connect; the client waits 2.5 heartbeats before it calls a stream dead', async (t) => {
  t.is(NOMAD_EVENT_HEARTBEAT_MS, 30_000);
  t.true(EVENT_STREAM_IDLE_TIMEOUT_MS >= 2 * NOMAD_EVENT_HEARTBEAT_MS, `idle timeout ${EVENT_STREAM_IDLE_TIMEOUT_MS} ms`);
  const nomad = await startFakeNomad(t);
  t.is(nomad.heartbeatMs, NOMAD_EVENT_HEARTBEAT_MS, 'the fake heartbeats like Nomad unless a test asks otherwise');
  const client = new NomadClient({ address: nomad.address });
  let heartbeats = 0;
  const s = client.eventStream(['Job'], () => undefined, { onHeartbeat: () => heartbeats++ });
  t.teardown(() => s.stop());
  await waitFor(() => heartbeats > 0);
  t.pass('the first heartbeat comes on connect, not after an interval');
});

// ---- row 10 ----------------------------------------------------------------------------------

test('row 10: Nomad replaces a lost allocation despite Attempts 0; the engine calls the container dead and never follows the replacement', async (t) => {
  const nomad = await startFakeNomad(t);
  const client = new NomadClient({ address: nomad.address });
  const engine = new NomadEngine({ client, datacenters: ['*'], startTimeoutMs: 20_000 });
  t.teardown(() => engine.close());
  const spec = warmSpec('openai', 'a1b2c3');
  const c = await engine.start(spec);
  const [first] = (await client.jobAllocations(c.id)).items;
  const seen: EngineEvent[] = [];
  engine.watch(OWNER, (e) => seen.push(e));
  const [replacement] = await nomad.loseNode();
  t.truthy(replacement);
  // The replacement runs, on another node, at another port.
  const next = await waitFor(async () => {
    const a = await client.readAllocation(replacement!);
    return a.ClientStatus === 'running' ? a : undefined;
  });
  t.is(next.PreviousAllocation, first!.ID);
  t.not(next.NodeName, first!.NodeName);
  await waitFor(() => seen.find((e) => e.id === c.id && e.type === 'die'));
  const [observed] = await engine.list(OWNER);
  t.is(observed?.state, 'dead');
  t.deepEqual(observed?.ports, c.ports, 'the address and ports are still the first allocation\'s');
  const err = await t.throwsAsync(engine.inject(c.id, { env: { API_KEY: 'k' } }));
  t.regex(err!.message, /lost \(its node is down\).*the container is gone/);
  // Once Nomad has garbage-collected the lost allocation, a daemon that starts afresh (cold
  // cache) still knows the replacement for one: by its PreviousAllocation.
  nomad.collectGarbage(first!.ID);
  const fresh = new NomadEngine({ client, datacenters: ['*'] });
  t.teardown(() => fresh.close());
  const [again] = await fresh.list(OWNER);
  t.is(again?.state, 'dead');
});

// ---- row 13 ----------------------------------------------------------------------------------

test('row 13: a blocking query holds at most 300 s (also the default), plus a jitter of up to wait/16', (t) => {
  t.is(blockingWaitMs('20m', () => 0), 300_000);
  t.is(blockingWaitMs(null, () => 0), 300_000);
  t.is(blockingWaitMs('16s', () => 0), 16_000);
  t.is(blockingWaitMs('16s', () => 0.999_999), 16_999);
  t.is(blockingWaitMs('10m', () => 0.999_999), 300_000 + 18_749);
  t.is(MAX_BLOCKING_WAIT_MS, 300_000);
});
