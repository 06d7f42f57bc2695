// src/drivers/restart.ts: how a restart command's outcome is judged (real processes).

import test from 'ava';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { NomadClient, type NomadJob } from '../src/drivers/nomad.js';
import { restartNomadJob, restartSystemdUnit, runRestartCommand } from '../src/drivers/restart.js';
import { startFakeNomad } from './helpers/fake-nomad.js';

// Budget for commands and API calls that finish by themselves (true, a shell script, the fake Nomad):
// milliseconds on an idle machine, but process starts take 5-20x longer under the suite's load and 5 s
// was tight. Only a hang costs it, and the tests about the timeout set their own, so it is a hang guard.
const FINISHES_MS = 30_000;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

test('exit code 0 is success; anything else fails with the tail of stderr in the message', async (t) => {
  const ok = await runRestartCommand(['true'], FINISHES_MS);
  t.true(ok.ok);
  t.is(ok.exitCode, 0);
  const bad = await runRestartCommand(['sh', '-c', 'echo first >&2; echo "no such unit" >&2; exit 3'], FINISHES_MS);
  t.false(bad.ok);
  t.is(bad.exitCode, 3);
  t.regex(bad.message, /exit code 3: first \| no such unit/);
});

test('a command that leaves a daemon holding its stderr is judged by its own exit, not by the pipe', async (t) => {
  // The child (sleep) inherits stderr and outlives the command by far: a runner that waited for the pipe
  // would hit the 30 s timeout (not ok, timedOut) long before the 60 s sleep ends. The timeout is generous
  // so that a slow `sh` start on a loaded machine is no failure; the elapsed bound is a hang guard.
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'polydev-restart-'));
  const pidFile = path.join(dir, 'sleep.pid');
  t.teardown(() => {
    try {
      const pid = Number(fs.readFileSync(pidFile, 'utf8').trim());
      if (Number.isInteger(pid) && pid > 1) process.kill(pid, 'SIGKILL'); // the sleep we left behind, by PID
    } catch {
      /* gone or never started */
    }
    fs.rmSync(dir, { recursive: true, force: true });
  });
  const started = Date.now();
  const r = await runRestartCommand(['sh', '-c', `sleep 60 & echo $! > ${pidFile}; echo started >&2; exit 0`], FINISHES_MS);
  t.true(r.ok, r.message);
  t.false(r.timedOut);
  t.true(Date.now() - started < FINISHES_MS, 'did not wait for the daemonised child');
});

test('a command past its timeout is killed and fails; a missing program fails with its error', async (t) => {
  const slow = await runRestartCommand(['sleep', '30'], 300);
  t.false(slow.ok);
  t.true(slow.timedOut);
  t.regex(slow.message, /killed after 300 ms/);
  const missing = await runRestartCommand(['/nonexistent/restart-me'], FINISHES_MS); // not about the timeout
  t.false(missing.ok);
  t.regex(missing.message, /ENOENT/);
});

test('systemdUnit runs `systemctl restart UNIT` (argument vector, no shell)', async (t) => {
  // No systemd runs here: a systemctl of the test's own on PATH records what it was asked.
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'polydev-systemctl-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const record = path.join(dir, 'argv');
  fs.writeFileSync(path.join(dir, 'systemctl'), `#!/bin/sh\nprintf '%s\\n' "$@" > ${record}\n`, { mode: 0o755 });
  const oldPath = process.env.PATH;
  process.env.PATH = `${dir}:${oldPath}`;
  t.teardown(() => {
    process.env.PATH = oldPath;
  });
  const r = await restartSystemdUnit('coturn.service', FINISHES_MS);
  t.true(r.ok, r.message);
  t.deepEqual(fs.readFileSync(record, 'utf8').trim().split('\n'), ['restart', 'coturn.service']);
});

// remediation.nomadJob, against the fake Nomad API (test/helpers/fake-nomad.ts).

const coturnJob = (id: string, image = 'coturn:4.6'): NomadJob => ({
  ID: id,
  Type: 'service',
  TaskGroups: [{ Name: 'turn', Count: 1, Tasks: [{ Name: 'coturn', Driver: 'docker', Config: { image } }] }],
});

// Polled waits for the fake Nomad's allocations (running 20 ms after registration on an idle machine);
// the deadline is a hang guard: 100 polls of 20 ms were tight under load, and a wait that works costs
// only its time.
const ALLOC_WAIT_MS = 30_000;

async function running(client: NomadClient, id: string): Promise<string> {
  for (const deadline = Date.now() + ALLOC_WAIT_MS; Date.now() < deadline; ) {
    const a = (await client.jobAllocations(id)).items.find((x) => x.ClientStatus === 'running');
    if (a) return a.ID;
    await sleep(20);
  }
  throw new Error(`job ${id} never ran`);
}

test('restartNomadJob restarts the running allocation in place (same allocation, one more task restart)', async (t) => {
  const fake = await startFakeNomad(t, { token: 'tok-1' });
  const client = new NomadClient({ address: fake.address, token: 'tok-1' });
  await client.registerJob(coturnJob('coturn'));
  const alloc = await running(client, 'coturn');
  const out = await restartNomadJob(client, 'coturn', FINISHES_MS);
  t.true(out.ok, out.message);
  t.regex(out.message, new RegExp(`restarted allocation ${alloc.slice(0, 8)} of Nomad job coturn`));
  const after = await client.readAllocation(alloc);
  t.is(after.ClientStatus, 'running');
  t.is(after.TaskStates?.['coturn']?.Restarts, 1);
  t.true(fake.requests.some((r) => r.method === 'POST' && r.path === `/v1/client/allocation/${alloc}/restart`));
});

test('restartNomadJob fails clearly: no running allocation, unknown job, refused token, a hung API', async (t) => {
  const fake = await startFakeNomad(t, { token: 'tok-2', failImages: ['broken:1'] });
  const client = new NomadClient({ address: fake.address, token: 'tok-2', retries: 0 });
  await client.registerJob(coturnJob('dead', 'broken:1'));
  for (const deadline = Date.now() + ALLOC_WAIT_MS; Date.now() < deadline && !(await client.jobAllocations('dead')).items.some((a) => a.ClientStatus === 'failed'); ) {
    await sleep(20);
  }
  const none = await restartNomadJob(client, 'dead', FINISHES_MS);
  t.false(none.ok);
  t.regex(none.message, /has no running allocation to restart \([0-9a-f]{8} failed\)/);

  const unknown = await restartNomadJob(client, 'nope', FINISHES_MS);
  t.false(unknown.ok);
  t.is(unknown.message, 'Nomad job nope has no running allocation to restart');

  const refused = await restartNomadJob(new NomadClient({ address: fake.address, token: 'wrong-secret' }), 'dead', FINISHES_MS);
  t.false(refused.ok);
  t.regex(refused.message, /403/);
  t.false(refused.message.includes('wrong-secret'));

  fake.delayMs = 2_000;
  const slow = await restartNomadJob(client, 'dead', 300);
  t.false(slow.ok);
  t.true(slow.timedOut);
});
