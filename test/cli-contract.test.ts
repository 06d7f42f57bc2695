// What scripts and users rely on from the CLI (issue 13): where the config comes from, that a read
// never leaves an empty database behind, exit codes and messages (no `-:0:0:` placeholders),
// validate running apply's checks, run --once failing when its desired state is rejected, plan
// output (grouped actions, TurnServer). The compiled program runs as a child process, from a
// directory other than the checkout unless a test says otherwise, with no POLYDEV_* inherited.

import test, { type ExecutionContext } from 'ava';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import YAML from 'yaml';
import { ETC_CONFIG } from '../src/cli/config-file.js';
import { requireCurrentBuild } from './helpers/build.js';
import { BIN, EXAMPLE_USERS, REPO, e2eEnv, manifest, portDoc } from './helpers/e2e-env.js';
import { trackChild, untrackChild } from './helpers/reaper.js';
import { tempDir } from './helpers/unit-fixtures.js';

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

function cleanEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('POLYDEV_')) env[k] = v;
  return { ...env, ...extra };
}

/** `node dist/src/main.js ARGS` in cwd (bounded). */
async function cli(cwd: string, args: string[], env: NodeJS.ProcessEnv = cleanEnv(), timeoutMs = 60_000): Promise<Run> {
  requireCurrentBuild();
  const child = spawn(process.execPath, [BIN, ...args], { cwd, env, stdio: ['ignore', 'pipe', 'pipe'] });
  trackChild(child);
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
  child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
  const code = await new Promise<number | null>((resolve) => child.once('close', (c) => resolve(c)));
  clearTimeout(timer);
  untrackChild(child);
  return { code, stdout, stderr };
}

/** A temp dir with config.yaml (its database not created yet; iptables in a namespace that is never made). */
function sandbox(t: ExecutionContext, extra: Record<string, unknown> = {}): { dir: string; cwd: string; cfg: string; db: string; desired: string } {
  const dir = tempDir(t, 'polydev-cli-contract-');
  const cwd = path.join(dir, 'elsewhere');
  const desired = path.join(dir, 'desired');
  fs.mkdirSync(cwd);
  fs.mkdirSync(desired);
  const cfg = path.join(dir, 'config.yaml');
  // Paths relative to the config file: they must resolve there, not in the working directory.
  fs.writeFileSync(cfg, YAML.stringify({ database: 'state/polydev.db', desiredStateDir: 'desired', iptables: { netns: 'pd-never-made' }, process: { runDir: 'run' }, ...extra }));
  return { dir, cwd, cfg, desired, db: path.join(dir, 'state', 'polydev.db') };
}

const placeholder = /-:0:0|:0:0:|: -: -:|: -:/;

// ---- config lookup -----------------------------------------------------------------

test('--help says where the config is looked up and what the exit codes mean', async (t) => {
  const r = await cli(tempDir(t), ['--help']);
  t.is(r.code, 0, r.stderr);
  t.regex(r.stdout, /--config FILE, \$POLYDEV_CONFIG, \/etc\/polydev\/polydev-reconciler\.yaml/);
  t.regex(r.stdout, /var\/demo\/polydev-reconciler\.yaml, then manifests\/config\/polydev-reconciler\.yaml/);
  t.regex(r.stdout, /^Exit codes: 0 done/m);
  t.true(r.stdout.includes('2 usage, configuration or\nruntime error'));
});

test('from another directory, with no --config or POLYDEV_CONFIG, the CLI of a checkout uses the demo config', async (t) => {
  const cwd = tempDir(t);
  const r = await cli(cwd, ['config']);
  t.is(r.code, 0, r.stderr);
  const running = path.join(REPO, 'var', 'demo', 'polydev-reconciler.yaml');
  if (fs.existsSync(ETC_CONFIG)) {
    t.regex(r.stdout, new RegExp(`^config: +${ETC_CONFIG} \\(the system config\\)$`, 'm'));
  } else if (fs.existsSync(running)) {
    // A demo runs in this checkout (npm start): its generated config is the one.
    t.true(r.stdout.includes(`config:           ${running} (the config of this checkout's running demo)`), r.stdout);
  } else {
    const demo = path.join(REPO, 'manifests', 'config', 'polydev-reconciler.yaml');
    t.true(r.stdout.includes(`config:           ${demo} (this checkout's demo config)`), r.stdout);
    // Its paths are relative to it, and its iptables live in the demo's own namespace.
    t.regex(r.stdout, new RegExp(`^database: +${path.join(REPO, 'var', 'polydev.db')}`, 'm'));
    t.regex(r.stdout, /^iptables netns: +polydev-demo$/m);
  }
  t.deepEqual(fs.readdirSync(cwd), [], 'nothing was created in the working directory');
});

test('POLYDEV_CONFIG is used without --config; --config wins over it; config paths are relative to the file', async (t) => {
  const a = sandbox(t);
  const b = sandbox(t);
  const viaEnv = await cli(a.cwd, ['config'], cleanEnv({ POLYDEV_CONFIG: a.cfg }));
  t.is(viaEnv.code, 0, viaEnv.stderr);
  t.true(viaEnv.stdout.includes(`config:           ${a.cfg} (given by $POLYDEV_CONFIG)`), viaEnv.stdout);
  t.true(viaEnv.stdout.includes(`database:         ${a.db} (does not exist yet)`), viaEnv.stdout);
  const viaFlag = await cli(a.cwd, ['--config', b.cfg, 'config'], cleanEnv({ POLYDEV_CONFIG: a.cfg }));
  t.true(viaFlag.stdout.includes(`config:           ${b.cfg} (given by --config)`), viaFlag.stdout);
  t.regex(viaFlag.stdout, /^iptables netns: +pd-never-made$/m);
});

// ---- reads never create the database ----------------------------------------------

test('no read command creates the database: each says which one is missing and where it came from, exit 2', async (t) => {
  const s = sandbox(t);
  fs.writeFileSync(path.join(s.desired, 'proxy.yaml'), manifest({}, EXAMPLE_USERS));
  const reads: string[][] = [
    ['get', 'warmpools'],
    ['get', 'claims'],
    ['describe', 'proxypool', 'default'],
    ['events'],
    ['plan'],
    ['plan', 'warmpool'],
    ['diff', '-f', s.desired],
    ['delete', 'proxyport', 'alice'],
    ['render', 'turnserver-conf', 'coturn'],
    ['proxyport', 'remove', 'alice'],
    ['proxyport', 'check'],
  ];
  for (const args of reads) {
    const r = await cli(s.cwd, ['--config', s.cfg, ...args]);
    t.is(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
    t.is(r.stdout, '', args.join(' '));
    t.is(r.stderr, `error: database ${s.db} does not exist (set by config ${s.cfg}, given by --config); \`run\` or \`apply\` creates it\n`, args.join(' '));
  }
  const viaDb = await cli(s.cwd, ['--config', s.cfg, '--db', 'other.db', 'get', 'proxyports']);
  t.is(viaDb.code, 2);
  t.is(viaDb.stderr, `error: database ${path.join(s.cwd, 'other.db')} does not exist (given by --db); \`run\` or \`apply\` creates it\n`);
  t.false(fs.existsSync(path.dirname(s.db)), 'no database, not even its directory');
  t.deepEqual(fs.readdirSync(s.cwd), [], 'nothing in the working directory');
  // validate and apply --dry-run check against an empty store in memory: no file either.
  t.is((await cli(s.cwd, ['--config', s.cfg, 'validate', '-f', s.desired])).code, 0);
  t.is((await cli(s.cwd, ['--config', s.cfg, 'apply', '--dry-run', '-f', s.desired])).code, 0);
  t.false(fs.existsSync(path.dirname(s.db)));
  // apply writes, and creates it where the config says (relative to the config, not the cwd).
  const applied = await cli(s.cwd, ['--config', s.cfg, 'apply', '-f', s.desired]);
  t.is(applied.code, 0, applied.stderr);
  t.true(fs.existsSync(s.db));
  const got = await cli(s.cwd, ['--config', s.cfg, 'get', 'proxyports', '-o', 'json']);
  t.is(got.code, 0, got.stderr);
  t.is((JSON.parse(got.stdout) as { items: unknown[] }).items.length, 3);
});

// ---- files and messages -------------------------------------------------------------

test('a missing -f file is a usage error (exit 2) with a plain message, for validate, apply and diff', async (t) => {
  const s = sandbox(t);
  fs.writeFileSync(path.join(s.desired, 'proxy.yaml'), manifest({}, EXAMPLE_USERS));
  t.is((await cli(s.cwd, ['--config', s.cfg, 'apply', '-f', s.desired])).code, 0);
  for (const command of ['validate', 'apply', 'diff']) {
    const r = await cli(s.cwd, ['--config', s.cfg, command, '-f', 'missing.yaml']);
    t.is(r.code, 2, command);
    t.is(r.stderr, 'error: missing.yaml: no such file or directory\n', command);
    t.notRegex(r.stdout + r.stderr, placeholder);
  }
});

test('a file ending in --- (and comment-only documents) validates and applies like kubectl takes it', async (t) => {
  const s = sandbox(t);
  const file = path.join(s.desired, 'proxy.yaml');
  fs.writeFileSync(file, `# users of the default pool\n---\n${manifest({}, EXAMPLE_USERS)}---\n# more to come\n---\n`);
  const v = await cli(s.cwd, ['--config', s.cfg, 'validate', '-f', file]);
  t.is(v.code, 0, v.stdout + v.stderr);
  t.is(v.stdout, '4 resource(s) in 1 file(s) are valid\n');
  t.is((await cli(s.cwd, ['--config', s.cfg, 'apply', '-f', file])).code, 0);
});

test('diff says "no differences" (exit 0), and shows them when there are (exit 1)', async (t) => {
  const s = sandbox(t);
  fs.writeFileSync(path.join(s.desired, 'proxy.yaml'), manifest({}, EXAMPLE_USERS));
  t.is((await cli(s.cwd, ['--config', s.cfg, 'apply', '-f', s.desired])).code, 0);
  const same = await cli(s.cwd, ['--config', s.cfg, 'diff', '-f', s.desired]);
  t.is(same.code, 0, same.stderr);
  t.is(same.stdout, '');
  t.is(same.stderr, 'no differences\n');
  fs.writeFileSync(path.join(s.desired, 'proxy.yaml'), manifest({}, [...EXAMPLE_USERS, { userId: 'dave', sourceIP: '127.0.0.14' }]));
  const changed = await cli(s.cwd, ['--config', s.cfg, 'diff', '-f', s.desired]);
  t.is(changed.code, 1);
  t.regex(changed.stdout, /^\+\+\+ ProxyPort\/dave \(new\)$/m);
  t.notRegex(changed.stderr, /no differences/);
});

// ---- validate = apply's checks ---------------------------------------------------------

test('validate runs apply\'s cross-resource checks: a ProxyPort with no free port, an unknown pool', async (t) => {
  const s = sandbox(t);
  const file = path.join(s.desired, 'proxy.yaml');
  fs.writeFileSync(file, manifest({ portRange: { min: 10001, max: 10002 } }, [...EXAMPLE_USERS.map((u) => ({ ...u, port: undefined })), { userId: 'dave', sourceIP: '127.0.0.14', pool: 'nope' }]));
  const v = await cli(s.cwd, ['--config', s.cfg, 'validate', '-f', file]);
  t.is(v.code, 1, v.stdout + v.stderr);
  t.regex(v.stdout, new RegExp(`^${file}:\\d+:\\d+: ProxyPort/carol: spec\\.port: ProxyPool default has no free port left in 10001-10002 for user carol$`, 'm'));
  t.regex(v.stdout, new RegExp(`^${file}:\\d+:\\d+: ProxyPort/dave: spec\\.pool: ProxyPool "nope" does not exist$`, 'm'));
  t.notRegex(v.stdout, placeholder);
  // apply refuses the same, with the same lines; nothing is written by either.
  const dry = await cli(s.cwd, ['--config', s.cfg, 'apply', '--dry-run', '-f', file]);
  t.is(dry.code, 1);
  t.deepEqual(dry.stderr.split('\n').filter((l) => l.startsWith(file)), v.stdout.split('\n').filter((l) => l.startsWith(file)));
  t.false(fs.existsSync(s.db));
});

test('validate checks ports against the configured database when it exists', async (t) => {
  const s = sandbox(t);
  fs.writeFileSync(path.join(s.desired, 'proxy.yaml'), manifest({ portRange: { min: 10001, max: 10003 } }, EXAMPLE_USERS));
  t.is((await cli(s.cwd, ['--config', s.cfg, 'apply', '-f', s.desired])).code, 0);
  // Another file asking for a port the store gave alice: valid alone, refused against the store.
  const other = path.join(s.dir, 'eve.yaml');
  fs.writeFileSync(other, YAML.stringify(portDoc({ userId: 'eve', sourceIP: '127.0.0.15', port: 10001 })));
  const v = await cli(s.cwd, ['--config', s.cfg, 'validate', '-f', other]);
  t.is(v.code, 1, v.stdout);
  t.regex(v.stdout, /ProxyPort\/eve: spec\.port: .*10001.*alice/);
});

test('validate of a database it cannot open (another user\'s) checks the files alone and says so; apply --dry-run refuses', async (t) => {
  const s = sandbox(t);
  fs.writeFileSync(path.join(s.desired, 'proxy.yaml'), manifest({}, EXAMPLE_USERS));
  // A directory where the database should be: it exists, and SQLite cannot open it.
  fs.mkdirSync(s.db, { recursive: true });
  const v = await cli(s.cwd, ['--config', s.cfg, 'validate', '-f', s.desired]);
  t.is(v.code, 0, v.stderr);
  t.is(v.stdout, '4 resource(s) in 1 file(s) are valid\n');
  t.regex(v.stderr, new RegExp(`^note: cannot open the database ${s.db} \\(set by config ${s.cfg}, given by --config\\): .+; checked against an empty store instead\\n$`));
  const dry = await cli(s.cwd, ['--config', s.cfg, 'apply', '--dry-run', '-f', s.desired]);
  t.is(dry.code, 2, dry.stdout + dry.stderr);
  t.regex(dry.stderr, new RegExp(`^error: cannot open the database ${s.db} \\(set by config ${s.cfg}, given by --config\\): `));
});

test('validate checks the prune limit: --prune, and by default for the config\'s desiredStateDir (as the daemon applies it)', async (t) => {
  const s = sandbox(t);
  const file = path.join(s.desired, 'proxy.yaml');
  fs.writeFileSync(file, manifest({}, EXAMPLE_USERS));
  t.is((await cli(s.cwd, ['--config', s.cfg, 'apply', '--prune', '-f', s.desired])).code, 0);
  // Two of three ports gone: 67% > maxPrune 50%.
  fs.writeFileSync(file, manifest({}, EXAMPLE_USERS.slice(0, 1)));
  const watched = await cli(s.cwd, ['--config', s.cfg, 'validate', '-f', s.desired]);
  t.is(watched.code, 1, watched.stdout);
  t.regex(watched.stdout, /is the config's desiredStateDir: checked as the daemon applies it, with prune/);
  t.regex(watched.stdout, /^ProxyPort: prune would delete 2 of 3 ProxyPort resources \(67% > --max-prune 50%\)/m);
  t.notRegex(watched.stdout, placeholder);
  t.is((await cli(s.cwd, ['--config', s.cfg, 'validate', '--no-prune', '-f', s.desired])).code, 0);
  t.is((await cli(s.cwd, ['--config', s.cfg, 'validate', '--max-prune', '0.7', '-f', s.desired])).code, 0);
  // Another directory is not pruned unless asked.
  const copy = path.join(s.dir, 'copy');
  fs.cpSync(s.desired, copy, { recursive: true });
  t.is((await cli(s.cwd, ['--config', s.cfg, 'validate', '-f', copy])).code, 0);
  // validate changed nothing.
  const got = await cli(s.cwd, ['--config', s.cfg, 'get', 'proxyports', '-o', 'json']);
  t.is((JSON.parse(got.stdout) as { items: Array<{ metadata: { deletionTimestamp?: string } }> }).items.filter((i) => !i.metadata.deletionTimestamp).length, 3);
});

// ---- run --once ------------------------------------------------------------------------

test('run --once exits 1 and names the problems when its desiredStateDir is rejected: a file over 1 MiB', async (t) => {
  const env = await e2eEnv(t);
  env.writeDesired('proxy.yaml', manifest({}, EXAMPLE_USERS));
  env.writeDesired('big.yaml', `# padding\n${'#'.repeat(100)}\n`.repeat(11_000));
  const cfgFile = env.writeConfig({ desiredStateDir: env.desiredDir });
  const r = await cli(env.dir, ['--config', cfgFile, 'run', '--once'], env.childEnv());
  t.is(r.code, 1, r.stdout + r.stderr);
  t.true(r.stderr.includes(`error: the desired state in ${env.desiredDir} was rejected, nothing of it was applied:\n  ${path.join(env.desiredDir, 'big.yaml')}:1:1: file is `), r.stderr);
  t.regex(r.stderr, /over the limit of 1048576 bytes/);
  t.regex(r.stdout, /^converged: 0 resource\(s\) \(the last good desired state\)$/m);
});

test('run --once exits 1 when a ProxyPort of its desiredStateDir has no free port; the accepted state before it still converges', async (t) => {
  const env = await e2eEnv(t);
  env.writeDesired('proxy.yaml', manifest({ portRange: { min: 10001, max: 10003 } }, EXAMPLE_USERS));
  const cfgFile = env.writeConfig({ desiredStateDir: env.desiredDir });
  const first = await cli(env.dir, ['--config', cfgFile, 'run', '--once'], env.childEnv());
  t.is(first.code, 0, first.stdout + first.stderr);
  env.writeDesired('proxy.yaml', manifest({ portRange: { min: 10001, max: 10003 } }, [...EXAMPLE_USERS, { userId: 'dave', sourceIP: '127.0.0.14' }]));
  const r = await cli(env.dir, ['--config', cfgFile, 'run', '--once'], env.childEnv());
  t.is(r.code, 1, r.stdout + r.stderr);
  t.regex(r.stderr, /was rejected, nothing of it was applied:\n {2}\S+proxy\.yaml:\d+:\d+: ProxyPort\/dave: spec\.port: ProxyPool default has no free port left in 10001-10003 for user dave$/m);
  t.regex(r.stdout, /^converged: 4 resource\(s\) \(the last good desired state\)$/m);
});

// ---- plan ----------------------------------------------------------------------------

test('plan reads the rules in the config\'s network namespace; one that does not exist is one error line, exit 2', async (t) => {
  const s = sandbox(t);
  fs.writeFileSync(path.join(s.desired, 'proxy.yaml'), manifest({}, EXAMPLE_USERS));
  t.is((await cli(s.cwd, ['--config', s.cfg, 'apply', '-f', s.desired])).code, 0);
  const r = await cli(s.cwd, ['--config', s.cfg, 'plan']);
  t.is(r.code, 2, r.stdout + r.stderr);
  t.is(r.stdout, '');
  t.regex(r.stderr, /^error: ProxyPool\/default: cannot read the live rules in network namespace pd-never-made: [^\n]*pd-never-made[^\n]*\n$/);
});

test('plan warmpool groups identical actions: "start 10 warm containers", once', async (t) => {
  const s = sandbox(t);
  const pool = path.join(s.desired, 'pool.yaml');
  fs.writeFileSync(pool, YAML.stringify({
    apiVersion: 'polydev.ai/v1alpha1',
    kind: 'WarmPool',
    metadata: { name: 'wp' },
    spec: { provider: 'claude', engine: 'process', command: ['sleep', '300'], size: 10, maxSize: 12 },
  }));
  t.is((await cli(s.cwd, ['--config', s.cfg, 'apply', '-f', pool])).code, 0);
  const r = await cli(s.cwd, ['--config', s.cfg, 'plan', 'warmpool']);
  t.is(r.code, 1, r.stdout + r.stderr);
  t.is(r.stdout, 'WarmPool/wp: 10 change(s)\n  start 10 warm containers\n');
});

test('plan turnserver probes the server once and says what the controller would do; claims have no plan', async (t) => {
  const s = sandbox(t);
  // A port nothing listens on: the TCP probe is refused at once.
  const closed = net.createServer();
  await new Promise<void>((r) => closed.listen(0, '127.0.0.1', () => r()));
  const port = (closed.address() as net.AddressInfo).port;
  await new Promise<void>((r) => closed.close(() => r()));
  const secret = path.join(s.dir, 'turn-secret');
  fs.writeFileSync(secret, 'not-a-real-secret-0123456789\n', { mode: 0o600 });
  const turn = (name: string, secretFile: string) => ({
    apiVersion: 'polydev.ai/v1alpha1',
    kind: 'TurnServer',
    metadata: { name },
    spec: {
      host: '127.0.0.1',
      ports: { stun: port },
      transports: ['tcp'],
      realm: 'test.example',
      auth: { mode: 'restSecret', secretFile },
      probe: { interval: '10s', timeout: '1s', failureThreshold: 1 },
      remediation: { command: ['true'], backoff: '5s', maxRestarts: 3, window: '10m' },
    },
  });
  const file = path.join(s.desired, 'turn.yaml');
  fs.writeFileSync(file, [turn('down', secret), turn('nosecret', path.join(s.dir, 'missing-secret'))].map((d) => YAML.stringify(d)).join('---\n'));
  t.is((await cli(s.cwd, ['--config', s.cfg, 'apply', '-f', file])).code, 0);
  const r = await cli(s.cwd, ['--config', s.cfg, 'plan', 'turnserver', 'down']);
  t.is(r.code, 1, r.stdout + r.stderr);
  t.regex(r.stdout, /^TurnServer\/down: 1 change\(s\)\n {2}restart via command true now \(1 consecutive failed probes; probe failed \(unreachable: .+\)\)\n$/);
  const noSecret = await cli(s.cwd, ['--config', s.cfg, 'plan', 'turnserver', 'nosecret']);
  t.is(noSecret.code, 0, noSecret.stdout + noSecret.stderr);
  t.regex(noSecret.stdout, /^TurnServer\/nosecret: no changes \(cannot probe: .*missing-secret.*\)$/m);
  t.notRegex(r.stdout + r.stderr + noSecret.stdout, /no controller/);
  const claims = await cli(s.cwd, ['--config', s.cfg, 'plan', 'claims']);
  t.is(claims.code, 2);
  t.regex(claims.stderr, /^error: claims have no plan of their own: `plan warmpool POOL`/);
  // The default plan (ProxyPools) has none here; it says what else there is to plan.
  const none = await cli(s.cwd, ['--config', s.cfg, 'plan']);
  t.is(none.code, 0, none.stderr);
  t.regex(none.stderr, /no ProxyPool resources \(`plan warmpool` and `plan turnserver` plan the other kinds\)/);
});
