// Where the nomad engine, the client and the fake Nomad must agree with a real Nomad 1.7.3
// agent (issue 14: each test names its row). The Nomad behaviour each test relies on is cited in
// test/helpers/fake-nomad.ts and test/helpers/nomad-driver-config.ts (file and version).

import test from 'ava';
import { NomadClient, type NomadJob } from '../src/drivers/nomad.js';
import { NomadEngine, failureReason, renderNomadJob } from '../src/drivers/nomad-engine.js';
import { DOCKER_TASK_CONFIG_SPEC, decodeHclJson, driverConfigError } from './helpers/nomad-driver-config.js';
import { startFakeNomad } from './helpers/fake-nomad.js';
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

test('row 1: the rendered warm container decodes; labels are a list of one map', (t) => {
  const job = renderNomadJob(WARM_TEMPLATE_SPEC, { datacenters: ['*'] });
  const config = job.TaskGroups[0]!.Tasks[0]!.Config;
  t.deepEqual(decodeHclJson(JSON.parse(JSON.stringify(config)), DOCKER_TASK_CONFIG_SPEC), []);
  t.true(Array.isArray(config?.labels));
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
