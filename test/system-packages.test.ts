// scripts/system-packages.sh: what `npm start` and `npm test` run first (prestart, pretest) and what
// .ci/run runs, so that a fresh Debian/Ubuntu machine needs nothing but the README's two commands.
// On this machine every package is installed (the real dpkg says so); the missing-package paths use
// a dpkg-query and an apt-get of the test's own, first on PATH, that record what they were asked.
// The real proof, a fresh root filesystem, is in the closing note of issue 13.

import test, { type ExecutionContext } from 'ava';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { REPO_ROOT } from './helpers/unit-fixtures.js';

const SCRIPT = path.join(REPO_ROOT, 'scripts', 'system-packages.sh');
/** Resolved on the real PATH: the runs below get PATHs of their own. */
const which = (tool: string): string => spawnSync('sh', ['-c', `command -v ${tool}`], { encoding: 'utf8' }).stdout.trim();
const SH = which('sh');
const SETPRIV = which('setpriv');
const TEST_PACKAGES = 'iptables iproute2 tinyproxy procps docker.io busybox-static coturn openssl prometheus prometheus-alertmanager chromium systemd'.split(' ');

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

function run(args: string[], env: NodeJS.ProcessEnv = {}, user?: string, script = SCRIPT): Run {
  const base = { ...process.env, ...env };
  delete base.POLYDEV_SKIP_SYSTEM_PACKAGES;
  if (env.POLYDEV_SKIP_SYSTEM_PACKAGES) base.POLYDEV_SKIP_SYSTEM_PACKAGES = env.POLYDEV_SKIP_SYSTEM_PACKAGES;
  const argv = user ? [SETPRIV, `--reuid=${user}`, `--regid=${user}`, '--clear-groups', SH, script, ...args] : [SH, script, ...args];
  const r = spawnSync(argv[0]!, argv.slice(1), { env: base, encoding: 'utf8', timeout: 120_000 });
  if (r.error) throw r.error;
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** A bin dir first on PATH: dpkg-query says `missing` are not installed, apt-get logs its arguments. */
function fakeTools(t: ExecutionContext, missing: string[], opts: { withKubectl?: boolean; aptFails?: boolean } = {}): { env: NodeJS.ProcessEnv; aptLog: string; policy: string } {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'polydev-syspkg-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const bin = path.join(dir, 'bin');
  fs.mkdirSync(bin);
  const aptLog = path.join(dir, 'apt.log');
  const policy = path.join(dir, 'policy-rc.d');
  const write = (name: string, body: string) => fs.writeFileSync(path.join(bin, name), `#!/bin/sh\n${body}\n`, { mode: 0o755 });
  write('dpkg-query', `for p in ${missing.join(' ')}; do [ "$3" = "$p" ] && exit 1; done; printf 'install ok installed'`);
  // Records each call and whether the policy that keeps services from starting was there meanwhile.
  write('apt-get', `echo "$* policy=$([ -x '${policy}' ] && '${policy}'; echo $?)" >> '${aptLog}'; ${opts.aptFails ? 'echo "E: Unable to locate package" >&2; exit 100' : 'exit 0'}`);
  if (opts.withKubectl !== false) write('kubectl', 'exit 0');
  // PATH is this dir alone: the machine's own tools the script uses are linked in, its kubectl is not.
  linkTools(bin);
  return { env: { PATH: bin, POLYDEV_POLICY_RC_D: policy }, aptLog, policy };
}

/** Links the few tools the script runs (besides the package managers) into dir. */
function linkTools(dir: string): void {
  for (const tool of ['sh', 'grep', 'id', 'mktemp', 'rm', 'tail', 'chmod']) {
    fs.symlinkSync(which(tool), path.join(dir, tool));
  }
}

test('on this machine everything is installed: silent, exit 0, for both commands', (t) => {
  for (const what of ['start', 'test']) {
    const r = run([what]);
    t.is(r.code, 0, r.stderr);
    t.is(r.stdout + r.stderr, '', what);
  }
  const check = run(['test', '--check']);
  t.is(check.code, 0, check.stderr);
});

test('usage errors exit 2', (t) => {
  for (const args of [[], ['deploy'], ['test', '--force'], ['test', '--check', 'x']]) {
    const r = run(args);
    t.is(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
    t.regex(r.stderr, /^usage: /);
  }
});

test('--check names exactly the missing packages and the one command, and installs nothing', (t) => {
  const f = fakeTools(t, ['coturn', 'chromium'], { withKubectl: false });
  const r = run(['test', '--check'], f.env);
  t.is(r.code, 1);
  t.is(
    r.stderr.trim(),
    'polydev-reconciler: missing for npm test: coturn chromium kubernetes-client (install: apt-get update && apt-get install -y --no-install-recommends coturn chromium kubernetes-client)',
  );
  t.false(fs.existsSync(f.aptLog), 'apt-get was not run');
});

test('as root: installs exactly the missing packages, with services kept from starting, and removes its policy-rc.d', (t) => {
  const f = fakeTools(t, ['tinyproxy', 'prometheus']);
  const r = run(['test'], f.env);
  t.is(r.code, 0, r.stderr);
  t.regex(r.stderr, /installing the system packages npm test needs: tinyproxy prometheus/);
  const calls = fs.readFileSync(f.aptLog, 'utf8').trim().split('\n');
  t.deepEqual(calls, ['update -qq policy=101', 'install -y -qq --no-install-recommends tinyproxy prometheus policy=101'], 'policy-rc.d refused services during both calls');
  t.false(fs.existsSync(f.policy), 'the policy-rc.d it created is gone');
});

test('as root: an existing policy-rc.d is left as it was', (t) => {
  const f = fakeTools(t, ['prometheus']);
  fs.writeFileSync(f.policy, '#!/bin/sh\nexit 104\n', { mode: 0o755 });
  const r = run(['start'], { ...f.env });
  t.is(r.code, 0, r.stderr);
  t.false(fs.existsSync(f.aptLog), 'start does not need prometheus');
  const r2 = run(['test'], f.env);
  t.is(r2.code, 0, r2.stderr);
  t.regex(fs.readFileSync(f.aptLog, 'utf8'), /install -y -qq --no-install-recommends prometheus policy=104/);
  t.is(fs.readFileSync(f.policy, 'utf8'), '#!/bin/sh\nexit 104\n');
});

test('a failing apt-get: its last lines, then one line with the command to run by hand; exit 1', (t) => {
  const f = fakeTools(t, ['coturn'], { aptFails: true });
  const r = run(['test'], f.env);
  t.is(r.code, 1);
  t.regex(r.stderr, /E: Unable to locate package/);
  t.regex(r.stderr.trim().split('\n').at(-1)!, /^polydev-reconciler: installing coturn failed .*run it by hand: apt-get update && apt-get install -y --no-install-recommends coturn$/);
  t.false(fs.existsSync(f.policy));
});

test('not root: the packages and the command, one clear line each, exit 1, nothing run', (t) => {
  const f = fakeTools(t, ['docker.io']);
  const dir = path.dirname(f.aptLog);
  fs.chmodSync(dir, 0o755);
  // A copy the unprivileged user can read (a checkout under /root is not readable to it).
  const script = path.join(dir, 'system-packages.sh');
  fs.copyFileSync(SCRIPT, script);
  fs.chmodSync(script, 0o644);
  const r = run(['test'], f.env, '65534', script);
  t.is(r.code, 1, r.stderr);
  t.deepEqual(r.stderr.trim().split('\n'), [
    'polydev-reconciler: npm test needs root (iptables, network namespaces) and these packages: docker.io',
    'polydev-reconciler: run as root: apt-get update && apt-get install -y --no-install-recommends docker.io',
  ]);
  t.false(fs.existsSync(f.aptLog));
});

test('no dpkg at all: the package list and how to go on; POLYDEV_SKIP_SYSTEM_PACKAGES=1 skips the check', (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'polydev-syspkg-nodpkg-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  // A PATH with sh and the few tools the script uses, but no dpkg-query.
  linkTools(dir);
  const r = run(['test'], { PATH: dir });
  t.is(r.code, 1);
  t.regex(r.stderr, new RegExp(`needs these Debian/Ubuntu packages \\(or their equivalents\\): ${TEST_PACKAGES.join(' ').replace(/\./g, '\\.')}\\.`));
  t.regex(r.stderr, /POLYDEV_SKIP_SYSTEM_PACKAGES=1/);
  const skipped = run(['test'], { PATH: dir, POLYDEV_SKIP_SYSTEM_PACKAGES: '1' });
  t.is(skipped.code, 0);
  t.is(skipped.stderr, '');
});

test('npm start and npm test run it first, and .ci/run uses the same script', (t) => {
  const pkg = JSON.parse(fs.readFileSync(path.join(REPO_ROOT, 'package.json'), 'utf8')) as { scripts: Record<string, string> };
  t.is(pkg.scripts.prestart, 'sh scripts/system-packages.sh start');
  t.is(pkg.scripts.pretest, 'sh scripts/system-packages.sh test');
  t.regex(fs.readFileSync(path.join(REPO_ROOT, '.ci', 'run'), 'utf8'), /^\$SUDO sh scripts\/system-packages\.sh test$/m);
});
