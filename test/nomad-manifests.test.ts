// manifests/nomad/: the job files parse, register against the fake Nomad API, and the warm
// container template is exactly what the nomad engine renders.

import test from 'ava';
import fs from 'node:fs';
import path from 'node:path';
import { SECRETS_DIR } from '../src/controllers/warmpool/engine.js';
import { NomadClient, type NomadJob } from '../src/drivers/nomad.js';
import { renderNomadJob } from '../src/drivers/nomad-engine.js';
import { startFakeNomad } from './helpers/fake-nomad.js';
import { WARM_TEMPLATE_SPEC } from './helpers/nomad-templates.js';
import { REPO_ROOT } from './helpers/unit-fixtures.js';

const DIR = path.join(REPO_ROOT, 'manifests', 'nomad');
const FILES = ['warm-container.json', 'runtime-container.json', 'browser-vm.json', 'polydev-reconciler.json'];

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

test('every job file registers against the Nomad API (fake) and reads back as sent', async (t) => {
  const fake = await startFakeNomad(t);
  const client = new NomadClient({ address: fake.address });
  for (const file of FILES) {
    const job = load(file);
    t.truthy(job.ID, file);
    for (const g of job.TaskGroups) for (const task of g.Tasks) t.truthy(task.Resources?.CPU && task.Resources.MemoryMB, `${file}: ${task.Name} declares CPU and memory`);
    await client.registerJob(job, { enforceIndex: 0 });
    const back = await client.readJob(job.ID);
    t.deepEqual(back.TaskGroups, job.TaskGroups, file);
    t.deepEqual(back.Meta, job.Meta, file);
  }
});
