// manifests/nomad/: the job files parse, register against the fake Nomad API, and the warm
// container template is exactly what the nomad engine renders.

import test from 'ava';
import fs from 'node:fs';
import path from 'node:path';
import { SECRETS_DIR } from '../src/controllers/warmpool/engine.js';
import { NomadClient, type NomadJob } from '../src/drivers/nomad.js';
import { renderNomadJob } from '../src/drivers/nomad-engine.js';
import { startFakeNomad } from './helpers/fake-nomad.js';
import { DOCKER_DEFAULT_ALLOW_CAPS, DRIVER_SPECS, decodeHclJson } from './helpers/nomad-driver-config.js';
import { WARM_TEMPLATE_SPEC } from './helpers/nomad-templates.js';
import { REPO_ROOT } from './helpers/unit-fixtures.js';

const DIR = path.join(REPO_ROOT, 'manifests', 'nomad');
const FILES = ['warm-container.json', 'runtime-container.json', 'browser-vm.json', 'polydev-reconciler.json'];

/** Polls fn until it gives a value; the deadline is a hang guard only. */
async function waitFor<T>(fn: () => Promise<T | undefined>, timeoutMs = 30_000): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error('waitFor: timed out');
    await new Promise((r) => setTimeout(r, 10));
  }
}

function load(file: string): NomadJob {
  const doc = JSON.parse(fs.readFileSync(path.join(DIR, file), 'utf8')) as { Job?: NomadJob };
  if (!doc.Job) throw new Error(`${file}: no top-level Job`);
  return doc.Job;
}

test('every role has a job file, and nothing else is in the folder but its README', (t) => {
  t.deepEqual(fs.readdirSync(DIR).sort(), [...FILES, 'README.md'].sort());
});

test('warm-container.json is what the nomad engine registers for its spec', (t) => {
  t.deepEqual(load('warm-container.json'), JSON.parse(JSON.stringify(renderNomadJob(WARM_TEMPLATE_SPEC, { datacenters: ['*'] }))));
});

// Issue 14 rows 1–2: Nomad checks driver Config only on the client, so this is the only place a
// wrong type shows before a real cluster fails every allocation.
test('every task Config in every job file decodes against its driver\'s declared spec (docker, qemu: Nomad v1.7.3)', (t) => {
  for (const file of FILES) {
    for (const g of load(file).TaskGroups) {
      for (const task of g.Tasks) {
        const spec = DRIVER_SPECS[task.Driver];
        t.truthy(spec, `${file}: driver ${task.Driver} has a transcribed spec`);
        t.deepEqual(decodeHclJson(task.Config ?? {}, spec!), [], `${file}: task ${task.Name}`);
      }
    }
  }
});

test('row 2: browser-vm.json maps only ports of the task\'s own network (qemu 1.7/1.8 forwards no group ports)', (t) => {
  const group = load('browser-vm.json').TaskGroups[0]!;
  const task = group.Tasks[0]!;
  const taskPorts = (task.Resources?.Networks?.[0]?.DynamicPorts ?? []).map((p) => p.Label).sort();
  const mapped = ((task.Config?.port_map ?? []) as Array<Record<string, number>>).flatMap((m) => Object.keys(m)).sort();
  t.deepEqual(mapped, ['control', 'webrtc']);
  t.deepEqual(taskPorts, mapped);
  t.deepEqual(group.Networks ?? [], [], 'a group network would give the VM ports nothing forwards to');
});

test('the runtime roles keep credentials on a tmpfs and run without Nomad restarts under a user', (t) => {
  for (const file of ['warm-container.json', 'runtime-container.json']) {
    const group = load(file).TaskGroups[0]!;
    t.deepEqual(group.ReschedulePolicy, { Attempts: 0, Unlimited: false }, file);
    const mounts = (group.Tasks[0]!.Config?.mount ?? []) as Array<{ type: string; target: string; tmpfs_options: { mode: number } }>;
    const secrets = mounts.find((m) => m.target === SECRETS_DIR);
    t.is(secrets?.type, 'tmpfs', file);
    t.is(secrets?.tmpfs_options.mode, 0o700, file);
  }
});

/** Whether everything in `sent` is in `back` (a real agent adds defaults to what it stores). */
function within(sent: unknown, back: unknown): boolean {
  if (Array.isArray(sent)) return Array.isArray(back) && back.length === sent.length && sent.every((x, i) => within(x, back[i]));
  if (sent && typeof sent === 'object') {
    if (!back || typeof back !== 'object') return false;
    return Object.entries(sent).every(([k, v]) => within(v, (back as Record<string, unknown>)[k]));
  }
  return sent === back;
}

// Issue 14 row 16: a real GET /v1/job/:id has Nomad's defaults filled in, so only "what was sent
// is in what is read back" holds against a real agent (and against the fake, which fills some).
test('every job file registers against the Nomad API (fake) and reads back with what was sent in it', async (t) => {
  // polydev-reconciler.json adds NET_ADMIN: the nodes' docker plugin must allow it (manifests/nomad/README.md).
  const fake = await startFakeNomad(t, { dockerAllowCaps: [...DOCKER_DEFAULT_ALLOW_CAPS, 'NET_ADMIN'] });
  const client = new NomadClient({ address: fake.address });
  for (const file of FILES) {
    const job = load(file);
    t.truthy(job.ID, file);
    for (const g of job.TaskGroups) for (const task of g.Tasks) t.truthy(task.Resources?.CPU && task.Resources.MemoryMB, `${file}: ${task.Name} declares CPU and memory`);
    await client.registerJob(job, { enforceIndex: 0 });
    const back = await client.readJob(job.ID);
    t.true(within(job.TaskGroups, back.TaskGroups), `${file}: ${JSON.stringify(back.TaskGroups)}`);
    t.deepEqual(back.Meta, job.Meta, file);
    t.like(back.TaskGroups[0]!.Tasks[0]!, { LogConfig: { MaxFiles: 10, MaxFileSizeMB: 10 } }, `${file}: defaults filled in`);
  }
  // And a client runs every placed one (a parameterized job places nothing until dispatched).
  for (const file of FILES) {
    const job = load(file);
    if (job.ParameterizedJob) continue;
    const alloc = await waitFor(async () => (await client.jobAllocations(job.ID)).items.find((a) => a.ClientStatus !== 'pending'));
    t.is(alloc.ClientStatus, 'running', `${file}: ${JSON.stringify(alloc.TaskStates)}`);
  }
});
