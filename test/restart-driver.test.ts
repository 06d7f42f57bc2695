// src/drivers/restart.ts: how a restart command's outcome is judged (real processes).

import test from 'ava';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { restartSystemdUnit, runRestartCommand } from '../src/drivers/restart.js';

test('exit code 0 is success; anything else fails with the tail of stderr in the message', async (t) => {
  const ok = await runRestartCommand(['true'], 5_000);
  t.true(ok.ok);
  t.is(ok.exitCode, 0);
  const bad = await runRestartCommand(['sh', '-c', 'echo first >&2; echo "no such unit" >&2; exit 3'], 5_000);
  t.false(bad.ok);
  t.is(bad.exitCode, 3);
  t.regex(bad.message, /exit code 3: first \| no such unit/);
});

test('a command that leaves a daemon holding its stderr is judged by its own exit, not by the pipe', async (t) => {
  // The child (sleep) inherits stderr and outlives the command by far.
  const started = Date.now();
  const r = await runRestartCommand(['sh', '-c', 'sleep 30 & echo started >&2; exit 0'], 10_000);
  t.true(r.ok, r.message);
  t.true(Date.now() - started < 5_000, 'did not wait for the daemonised child');
});

test('a command past its timeout is killed and fails; a missing program fails with its error', async (t) => {
  const slow = await runRestartCommand(['sleep', '30'], 300);
  t.false(slow.ok);
  t.true(slow.timedOut);
  t.regex(slow.message, /killed after 300 ms/);
  const missing = await runRestartCommand(['/nonexistent/restart-me'], 1_000);
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
  const r = await restartSystemdUnit('coturn.service', 5_000);
  t.true(r.ok, r.message);
  t.deepEqual(fs.readFileSync(record, 'utf8').trim().split('\n'), ['restart', 'coturn.service']);
});
