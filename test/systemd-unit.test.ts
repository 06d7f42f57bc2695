// The systemd unit (manifests/systemd/) and scripts/install-host.sh, checked with systemd's own
// tools offline (there is no running systemd here):
// - `systemd-analyze verify` parses the unit and its drop-ins like the manager would and checks
//   that ExecStart's binary exists. It exits 0 on unknown keys and unparsable values (it only
//   warns), so "passes" here means exit 0 AND nothing on stderr; broken copies prove both halves.
//   --man=no (no man pages needed), --generators=no (nothing of this host's is run);
//   drop-ins come from SYSTEMD_UNIT_PATH=<dir>: (the trailing colon keeps the default paths, where
//   the targets the unit names live).
// - `systemd-analyze security --offline=true` (systemd >= 250) scores the unit's sandboxing from
//   the file alone; the exposure must stay below 3.0 (systemd's "OK"), and a weakened copy must not.
// - install-host.sh into a temporary DESTDIR: what it lays out, that the installed app runs, that a
//   second run keeps the operator's config, that --dry-run touches nothing.

import test from 'ava';
import { existsSync } from 'node:fs';
import { appendFile, mkdir, mkdtemp, readFile, readdir, rm, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { runCommand, type RunResult } from './helpers/image-rootfs.js';

const REPO = fileURLToPath(new URL('..', import.meta.url));
const UNIT = path.join(REPO, 'manifests/systemd/polydev-reconciler.service');
const DROPINS = path.join(REPO, 'manifests/systemd/polydev-reconciler.service.d');
const INSTALL = path.join(REPO, 'scripts/install-host.sh');
const ANALYZE = '/usr/bin/systemd-analyze';
const NAME = 'polydev-reconciler.service';
/** systemd's "OK" band ends at 3.9; ours must stay well inside it. */
const MAX_EXPOSURE = 3.0;

let work = '';
/** The DESTDIR install shared by the tests below (made once: it compiles src/). */
let destdir = '';
let install: RunResult | undefined;

const analyzeEnv = (unitDir?: string): NodeJS.ProcessEnv => ({
  ...process.env,
  SYSTEMD_LOG_COLOR: '0',
  SYSTEMD_PAGER: '',
  ...(unitDir ? { SYSTEMD_UNIT_PATH: `${unitDir}:` } : {}),
});

/** verify FILE (a path) or NAME (looked up in unitDir); ok = exit 0 with no warnings. */
async function verify(unit: string, unitDir?: string): Promise<RunResult & { ok: boolean }> {
  const r = await runCommand(ANALYZE, ['verify', '--man=no', '--generators=no', unit], { env: analyzeEnv(unitDir), cwd: work });
  return { ...r, ok: r.code === 0 && r.stderr.trim() === '' };
}

async function security(unit: string, unitDir?: string): Promise<{ code: number; exposure: number; text: string }> {
  const r = await runCommand(ANALYZE, ['security', '--offline=true', '--threshold=30', '--no-pager', unit], { env: analyzeEnv(unitDir), cwd: work });
  const m = /Overall exposure level for \S+: (\d+(?:\.\d+)?)/.exec(r.stdout);
  return { code: r.code, exposure: m ? Number(m[1]) : NaN, text: r.stdout + r.stderr };
}

/** The unit as key → values (a key may repeat), per section. Comments and blank lines dropped. */
function parseUnit(text: string): Map<string, Map<string, string[]>> {
  const out = new Map<string, Map<string, string[]>>();
  let section = '';
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (!line || line.startsWith('#') || line.startsWith(';')) continue;
    const sec = /^\[(.+)\]$/.exec(line);
    if (sec) {
      section = sec[1]!;
      if (!out.has(section)) out.set(section, new Map());
      continue;
    }
    const eq = line.indexOf('=');
    const key = line.slice(0, eq);
    const m = out.get(section)!;
    m.set(key, [...(m.get(key) ?? []), line.slice(eq + 1)]);
  }
  return out;
}

/** A copy of the unit with `edit` applied, written to a directory of its own. */
async function brokenCopy(tag: string, edit: (s: string) => string): Promise<string> {
  const dir = path.join(work, `broken-${tag}`);
  await mkdir(dir, { recursive: true });
  const file = path.join(dir, NAME);
  const text = await readFile(UNIT, 'utf8');
  const edited = edit(text);
  if (edited === text) throw new Error(`edit ${tag} changed nothing`);
  await writeFile(file, edited);
  return file;
}

test.before(async (t) => {
  // A hang guard above ava's 120 s default (the install compiles src/, a minute or more on a loaded
  // machine); the install's own 300 s timeout ends it first.
  t.timeout(360_000);
  work = await mkdtemp(path.join(os.tmpdir(), 'pd-systemd-'));
  destdir = path.join(work, 'root');
  install = await runCommand('bash', [INSTALL, '--destdir', destdir, '--docker=yes', '--iptables-legacy=yes', '--node', process.execPath], { timeoutMs: 300_000 });
});

test.after.always(async () => {
  if (work) await rm(work, { recursive: true, force: true });
});

test('the unit passes systemd-analyze verify without a warning', async (t) => {
  // ExecStart names /usr/bin/node; verify needs it to exist. The installed copy (below) names this
  // test's node, so that one is checked everywhere.
  if (!existsSync('/usr/bin/node')) {
    t.log('no /usr/bin/node here: the repository copy is checked through the installed one only');
    t.pass();
    return;
  }
  const r = await verify(UNIT);
  t.true(r.ok, `exit ${r.code}: ${r.stderr}`);
});

test('broken copies fail the check', async (t) => {
  const cases: Array<[string, (s: string) => string, RegExp]> = [
    ['unknown-key', (s) => s.replace('Restart=on-failure', 'Restart=on-failure\nRestartOnTuesdays=yes'), /Unknown key/],
    ['bad-value', (s) => s.replace('Restart=on-failure', 'Restart=sometimes'), /restart specifier/i],
    ['missing-binary', (s) => s.replace(/^ExecStart=\S+/m, 'ExecStart=/nonexistent/node'), /not executable|No such file/],
    ['no-execstart', (s) => s.replace(/^ExecStart=.*$/m, ''), /no ExecStart/],
    ['bad-section', (s) => s.replace('[Service]', '[Servise]'), /Unknown section/],
  ];
  for (const [tag, edit, why] of cases) {
    const r = await verify(await brokenCopy(tag, edit));
    t.false(r.ok, `${tag}: passed verify`);
    t.regex(r.stderr, why, tag);
  }
  // The missing binary is also a non-zero exit, not just a warning.
  t.not((await verify(await brokenCopy('missing-binary-2', (s) => s.replace(/^ExecStart=\S+/m, 'ExecStart=/nonexistent/node')))).code, 0);
});

test('the unit: polydev user, CAP_NET_ADMIN only, restart on failure, sandboxed', async (t) => {
  const u = parseUnit(await readFile(UNIT, 'utf8'));
  const unit = u.get('Unit')!;
  const svc = u.get('Service')!;
  const one = (k: string): string | undefined => {
    const v = svc.get(k);
    t.true(!v || v.length === 1, `${k} set ${v?.length} times`);
    return v?.[0];
  };
  t.is(one('User'), 'polydev');
  t.is(one('Group'), 'polydev');
  t.is(one('AmbientCapabilities'), 'CAP_NET_ADMIN');
  t.is(one('CapabilityBoundingSet'), 'CAP_NET_ADMIN');
  t.is(one('Restart'), 'on-failure');
  t.is(one('ProtectSystem'), 'strict');
  t.is(one('NoNewPrivileges'), 'yes');
  t.is(one('StateDirectory'), 'polydev');
  for (const k of ['PrivateTmp', 'ProtectHome', 'ProtectKernelModules', 'ProtectKernelTunables', 'ProtectControlGroups', 'LockPersonality', 'RestrictSUIDSGID', 'RestrictRealtime']) {
    t.is(one(k), 'yes', k);
  }
  t.deepEqual(one('RestrictAddressFamilies')?.split(/\s+/).sort(), ['AF_INET', 'AF_INET6', 'AF_NETLINK', 'AF_UNIX']);
  t.is(one('SystemCallFilter'), '@system-service');
  t.is(svc.get('MemoryDenyWriteExecute'), undefined, 'V8 needs W+X memory');
  t.true(unit.get('After')!.join(' ').split(/\s+/).includes('network-online.target'));
  t.true(unit.get('Wants')!.join(' ').split(/\s+/).includes('network-online.target'));
  t.deepEqual(u.get('Install')!.get('WantedBy'), ['multi-user.target']);
  // ExecStart runs the compiled daemon with the config in /etc/polydev.
  const exec = one('ExecStart')!.split(/\s+/);
  t.is(exec[0], '/usr/bin/node');
  t.true(exec.includes('/opt/polydev-reconciler/dist/src/main.js'));
  t.deepEqual(exec.slice(exec.indexOf('/opt/polydev-reconciler/dist/src/main.js') + 1), ['run', '--config', '/etc/polydev/polydev-reconciler.yaml']);
  t.true(existsSync(path.join(REPO, 'src/main.ts')), 'dist/src/main.js is built from src/main.ts');
  // ExecReload only if the daemon handles a reload signal.
  const sources = await readSources(path.join(REPO, 'src'));
  const reloads = /['"]SIGHUP['"]/.test(sources);
  t.is(svc.has('ExecReload'), reloads, reloads ? 'the daemon handles SIGHUP: the unit needs ExecReload' : 'the daemon has no reload signal: no ExecReload');

  // The drop-ins.
  const docker = parseUnit(await readFile(path.join(DROPINS, 'docker.conf'), 'utf8')).get('Service')!;
  t.deepEqual(docker.get('SupplementaryGroups'), ['docker']);
  const legacy = parseUnit(await readFile(path.join(DROPINS, 'iptables-legacy.conf'), 'utf8')).get('Service')!;
  t.deepEqual(legacy.get('AmbientCapabilities'), ['CAP_NET_RAW']);
  t.deepEqual(legacy.get('CapabilityBoundingSet'), ['CAP_NET_RAW']);
  t.regex(legacy.get('Environment')!.join(' '), /XTABLES_LOCKFILE=\/run\/polydev-reconciler\//);
});

async function readSources(dir: string): Promise<string> {
  let out = '';
  for (const e of await readdir(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) out += await readSources(p);
    else if (e.name.endsWith('.ts')) out += await readFile(p, 'utf8');
  }
  return out;
}

test('systemd-analyze security --offline: exposure below 3.0, and a weakened copy is not', async (t) => {
  const r = await security(UNIT);
  t.log(`exposure ${r.exposure}`);
  t.is(r.code, 0, r.text.slice(-2000));
  t.true(r.exposure < MAX_EXPOSURE, `exposure ${r.exposure}`);
  // systemd's own reading of the file (not our parser): a static non-root user, no new privileges.
  for (const want of [/✓ User=\/DynamicUser=/, /✓ NoNewPrivileges=/, /✓ ProtectSystem=/, /✓ CapabilityBoundingSet=~CAP_SYS_ADMIN/, /✓ RestrictAddressFamilies=~AF_PACKET/]) {
    t.regex(r.text, want);
  }
  t.regex(r.text, /✗ CapabilityBoundingSet=~CAP_NET_ADMIN/, 'NET_ADMIN is the one capability it keeps');

  const weak = await brokenCopy('weak', (s) =>
    s
      .split('\n')
      .filter((l) => !/^(User|Group|CapabilityBoundingSet|AmbientCapabilities|NoNewPrivileges|ProtectSystem|SystemCallFilter|RestrictAddressFamilies)=/.test(l))
      .join('\n'),
  );
  const w = await security(weak);
  t.true(w.exposure >= MAX_EXPOSURE, `weakened exposure ${w.exposure}`);
  t.not(w.code, 0, 'the threshold check fails for the weakened unit');
});

test('install-host.sh --destdir lays out the app, config, unit and drop-ins', async (t) => {
  t.is(install?.code, 0, `${install?.stdout}\n${install?.stderr}`);
  const app = path.join(destdir, 'opt/polydev-reconciler');
  for (const f of ['package.json', 'package-lock.json', 'bin/polydev-reconciler.js', 'dist/src/main.js', 'dist/src/desired/kinds.js', 'crds/proxypool.yaml', 'manifests/examples/proxy.yaml', 'node_modules/better-sqlite3/build/Release/better_sqlite3.node', 'node_modules/fastify/package.json']) {
    t.true(existsSync(path.join(app, f)), f);
  }
  // Production dependencies only; no tests, no sources, no leftovers of the swap.
  for (const f of ['node_modules/typescript', 'node_modules/ava', 'node_modules/tsx', 'dist/test', 'dist/bench', 'src', 'test', 'node_modules/better-sqlite3/deps']) {
    t.false(existsSync(path.join(app, f)), f);
  }
  t.deepEqual((await readdir(path.join(destdir, 'opt'))).sort(), ['polydev-reconciler']);

  const etc = path.join(destdir, 'etc/polydev');
  t.is((await stat(etc)).mode & 0o777, 0o750);
  t.is((await stat(path.join(etc, 'desired.d'))).mode & 0o777, 0o750);
  t.is((await stat(path.join(etc, 'polydev-reconciler.yaml'))).mode & 0o777, 0o640);
  t.is((await stat(path.join(etc, 'api-token'))).mode & 0o777, 0o640);
  t.regex(await readFile(path.join(etc, 'api-token'), 'utf8'), /^[0-9a-f]{64}\n$/);
  const cfg = await readFile(path.join(etc, 'polydev-reconciler.yaml'), 'utf8');
  t.regex(cfg, /^database: \/var\/lib\/polydev\/polydev\.db$/m);
  t.regex(cfg, /^desiredStateDir: \/etc\/polydev\/desired\.d$/m);
  t.regex(cfg, /^apiTokenFile: \/etc\/polydev\/api-token$/m);

  // The installed unit runs this node, and is otherwise the repository's.
  const unitDir = path.join(destdir, 'etc/systemd/system');
  const installed = await readFile(path.join(unitDir, NAME), 'utf8');
  const repo = await readFile(UNIT, 'utf8');
  t.is(installed, repo.replace(/^ExecStart=\/usr\/bin\/node /m, `ExecStart=${process.execPath} `));
  t.deepEqual((await readdir(path.join(unitDir, `${NAME}.d`))).sort(), ['docker.conf', 'iptables-legacy.conf']);

  // systemd reads the installed unit with both drop-ins, by name, without a warning.
  const v = await verify(NAME, unitDir);
  t.true(v.ok, `exit ${v.code}: ${v.stderr}`);
  const s = await security(NAME, unitDir);
  t.regex(s.text, /✗ SupplementaryGroups=/, 'the docker drop-in was read');
  t.regex(s.text, /✗ CapabilityBoundingSet=~CAP_NET_\(BIND_SERVICE\|BROADCAST\|RAW\)/, 'the legacy drop-in was read');
  t.true(s.exposure < MAX_EXPOSURE, `exposure with drop-ins ${s.exposure}`);
});

test('the installed app runs: validate and run --once with the installed config', async (t) => {
  t.timeout(300_000); // a hang guard above ava's 120 s default: two commands of up to 120 s each
  t.is(install?.code, 0);
  const main = path.join(destdir, 'opt/polydev-reconciler/dist/src/main.js');
  const etc = path.join(destdir, 'etc/polydev');
  const val = await runCommand(process.execPath, [main, 'validate', '-f', path.join(destdir, 'opt/polydev-reconciler/manifests/examples')]);
  t.is(val.code, 0, val.stdout + val.stderr);
  // The config's absolute paths point into / ; the environment moves them into the temp root.
  const state = path.join(work, 'state');
  await mkdir(state, { recursive: true });
  const once = await runCommand(process.execPath, ['--max-semi-space-size=2', main, 'run', '--once', '--config', path.join(etc, 'polydev-reconciler.yaml')], {
    env: {
      ...process.env,
      POLYDEV_DATABASE: path.join(state, 'polydev.db'),
      POLYDEV_DESIRED_STATE_DIR: path.join(etc, 'desired.d'),
      POLYDEV_API_TOKEN_FILE: path.join(etc, 'api-token'),
      POLYDEV_LISTEN: '127.0.0.1:0',
      // Generous (was 20 s): this checks that the installed app runs, not how fast; a loaded machine
      // slows the start and the pass many times over. Below the command's own timeout.
      POLYDEV_ONCE_TIMEOUT: '60s',
    },
    timeoutMs: 120_000,
  });
  t.is(once.code, 0, once.stdout + once.stderr.slice(-2000));
  t.true(existsSync(path.join(state, 'polydev.db')));
});

test('install-host.sh: a second run keeps the config and token; --dry-run changes nothing', async (t) => {
  // A hang guard above ava's 120 s default: two installs that compile src/ (97 s together on a
  // loaded 2-core machine, with nothing else of this file left to report meanwhile); the commands'
  // own timeouts (300 + 300 + 120 + 30 s) end first.
  t.timeout(800_000);
  // Its own DESTDIR: the other tests read the shared one.
  const root = path.join(work, 'root2');
  const args = [INSTALL, '--destdir', root, '--docker=yes', '--iptables-legacy=no', '--node', process.execPath];
  const first = await runCommand('bash', args, { timeoutMs: 300_000 });
  t.is(first.code, 0, first.stderr);
  const cfgFile = path.join(root, 'etc/polydev/polydev-reconciler.yaml');
  await appendFile(cfgFile, 'logLevel: debug\n');
  const cfg = await readFile(cfgFile, 'utf8');
  const token = await readFile(path.join(root, 'etc/polydev/api-token'), 'utf8');

  const second = await runCommand('bash', [INSTALL, '--destdir', root, '--docker=no', '--iptables-legacy=no', '--node', process.execPath], { timeoutMs: 300_000 });
  t.is(second.code, 0, second.stderr);
  t.regex(second.stdout, /polydev-reconciler\.yaml exists: kept/);
  t.is(await readFile(cfgFile, 'utf8'), cfg);
  t.is(await readFile(path.join(root, 'etc/polydev/api-token'), 'utf8'), token);
  t.deepEqual(await readdir(path.join(root, `etc/systemd/system/${NAME}.d`)), [], '--docker=no removed the drop-in');
  t.deepEqual(await readdir(path.join(root, 'opt')), ['polydev-reconciler']);
  t.true(existsSync(path.join(root, 'opt/polydev-reconciler/dist/src/main.js')));

  const dry = path.join(work, 'dry');
  const d = await runCommand('bash', [INSTALL, '--destdir', dry, '--dry-run', '--node', process.execPath], { timeoutMs: 120_000 });
  t.is(d.code, 0, d.stderr);
  t.false(existsSync(dry), '--dry-run created the DESTDIR');
  t.regex(d.stdout, /^\+ install .*polydev-reconciler\.service/m);
  t.regex(d.stdout, /^\+ .*\/tsc -p /m);

  const bad = await runCommand('bash', [INSTALL, '--destdir', dry, '--frobnicate'], { timeoutMs: 30_000 });
  t.is(bad.code, 1);
  t.regex(bad.stderr, /unknown argument: --frobnicate/);
});
