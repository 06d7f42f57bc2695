// The CLI's warm-pool commands (claim, release, get claims, describe warmpool/claim, get
// warmpools) against a real in-process daemon: a WarmPool on the `process` engine (`sleep 300`
// children), the HTTP API with a token file, iptables in a throwaway namespace. The CLI runs
// in-process through runCli with its output captured. Every test stops its daemon, then removes
// whatever processes its installation still owns (its run dir and logs live in the test's dir).

import test, { type ExecutionContext } from 'ava';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import YAML from 'yaml';

import { runCli } from '../src/cli/main.js';
import type { Daemon } from '../src/daemon.js';
import { ProcessEngine } from '../src/drivers/process.js';
import { installationId, listMembers, memberCounts } from '../src/state/pools.js';
import { TOKEN, e2eEnv, startDaemon, waitFor, type E2eEnv } from './helpers/e2e-env.js';
import { freePort } from './helpers/tinyproxy.js';

const POOL = 'wp';
const CONVERGE_MS = 60_000;
const CLAIM_LINE = /^claim ([0-9a-f-]{36}): container (polydev-wp-[0-9a-f]+) at (\S+) \((warm|cold start)\), (?:[0-9.]+(?:ms|s)|\d+m(?:\d+s)?), expires (\d{4}-\d\d-\d\dT\S+Z)$/;

// Values that must never show up in anything the CLI prints.
const SECRET_ENV = 'hunter2-value';
const SECRET_ENV_FILE = 'envfile-secret-value';
const SECRET_FILE = 'file-content-secret';

test.before(() => {
  // runCli reads POLYDEV_* from the environment: nothing of the caller's may leak in.
  for (const k of Object.keys(process.env)) if (k.startsWith('POLYDEV_')) delete process.env[k];
});

interface CliRun {
  code: number;
  out: string;
  err: string;
}

interface Ctx {
  env: E2eEnv;
  daemon: Daemon;
  /** The daemon's API (the config listens on port 0, so the CLI is told with --server). */
  server: string;
  runDir: string;
  owner: string;
  /** `polydev-reconciler --config CFG --db DB ARGS` in-process. */
  cli(...args: string[]): Promise<CliRun>;
  /** Everything every cli() call printed, stdout and stderr. */
  printed: string[];
}

function poolDoc(claim: Record<string, unknown> = {}): string {
  return YAML.stringify({
    apiVersion: 'polydev.ai/v1alpha1',
    kind: 'WarmPool',
    metadata: { name: POOL },
    spec: { provider: 'claude', engine: 'process', command: ['sleep', '300'], size: 2, maxSize: 4, claim },
  });
}

async function runIn(printed: string[], args: string[]): Promise<CliRun> {
  const out: string[] = [];
  const err: string[] = [];
  const code = await runCli(args, { out: (s) => out.push(s), err: (s) => err.push(s) });
  printed.push(...out, ...err);
  return { code, out: out.join('\n'), err: err.join('\n') };
}

/** A daemon with pool `wp` (process engine, size 2, maxSize 4) converged: two warm containers. */
async function setup(t: ExecutionContext, claim: Record<string, unknown> = {}): Promise<Ctx> {
  const env = await e2eEnv(t);
  const runDir = path.join(env.dir, 'run');
  let owner: string | undefined;
  // Registered before the daemon's own teardown, so it runs after the daemon has stopped: the
  // processes outlive a daemon on purpose (a restarted one adopts them), so they are removed here,
  // and so are their logs (the engine keeps them in its default log dir).
  t.teardown(async () => {
    if (!owner) return;
    const engine = new ProcessEngine({ runDir });
    try {
      for (const c of await engine.list(owner)) await engine.remove(c.id);
    } finally {
      await engine.close();
    }
    for (const f of fs.existsSync(engine.logDir) ? fs.readdirSync(engine.logDir) : []) {
      if (f.startsWith(`${owner}.`)) fs.rmSync(path.join(engine.logDir, f), { force: true });
    }
  });
  env.writeDesired('pool.yaml', poolDoc(claim));
  const cfgFile = env.writeConfig({ desiredStateDir: env.desiredDir, apiTokenFile: env.tokenFile, process: { runDir } });
  const daemon = await startDaemon(t, cfgFile);
  owner = installationId(daemon.store);
  await waitFor('two warm containers', () => memberCounts(daemon.store, POOL).warm === 2 && memberCounts(daemon.store, POOL).starting === 0, CONVERGE_MS);
  const printed: string[] = [];
  return {
    env,
    daemon,
    server: daemon.address!,
    runDir,
    owner,
    printed,
    cli: (...args) => runIn(printed, ['--config', cfgFile, '--db', env.db, ...args]),
  };
}

/** A warm container to claim: nothing but a claim takes one away, so the next claim is served warm. */
async function warmOne(c: Ctx): Promise<void> {
  await waitFor('a warm container', () => memberCounts(c.daemon.store, POOL).warm >= 1, CONVERGE_MS);
}

/** A `table()` as header → value maps (cells are separated by at least three spaces). */
function parseTable(text: string): Array<Record<string, string>> {
  const [header, ...rows] = text.split('\n').filter((l) => l.trim() !== '');
  const names = header!.split(/ {3,}/);
  return rows.map((r) => Object.fromEntries(r.split(/ {3,}/).map((v, i) => [names[i], v])));
}

function assertNoSecrets(t: ExecutionContext, printed: string[]): void {
  const all = printed.join('\n');
  for (const s of [SECRET_ENV, SECRET_ENV_FILE, SECRET_FILE]) t.false(all.includes(s), `"${s}" was printed`);
}

test.serial('claim, get claims, release, get claims --all: the claim lifecycle through the CLI', async (t) => {
  const c = await setup(t);

  const claimed = await c.cli('claim', POOL, '--user', 'alice', '--ttl', '30m', '--server', c.server);
  t.is(claimed.code, 0, claimed.err);
  const m = CLAIM_LINE.exec(claimed.out);
  t.truthy(m, claimed.out);
  const [, id, container, address, warm, expires] = m!;
  t.is(warm, 'warm');
  t.regex(address!, /^process:\d+$/);
  const ttl = Date.parse(expires!) - Date.now();
  t.true(ttl > 25 * 60_000 && ttl <= 30 * 60_000, `expires in ${ttl} ms`);

  // get claims: the open one, with its container.
  const list = await c.cli('get', 'claims');
  t.is(list.code, 0, list.err);
  const rows = parseTable(list.out);
  t.is(rows.length, 1, list.out);
  t.like(rows[0], { NAME: id, POOL, USER: 'alice', CONTAINER: container, PHASE: 'Bound', EXPIRES: expires });
  const wide = parseTable((await c.cli('get', 'clm', '-o', 'wide')).out);
  t.like(wide[0], { NAME: id, ADDRESS: address, WARM: 'true' });
  const bob = await c.cli('get', 'claims', '--user', 'bob');
  t.is(bob.code, 0);
  t.is(bob.out, '');
  t.regex(bob.err, /no open claims/);

  // One claim, as JSON (the Claim CRD's shape) and described.
  const one = await c.cli('get', 'claim', id!, '-o', 'json');
  t.is(one.code, 0, one.err);
  const obj = JSON.parse(one.out) as { kind: string; metadata: { name: string }; spec: { pool: string; userId: string }; status: { phase: string; containerName: string; warm: boolean } };
  t.like(obj, { kind: 'Claim', metadata: { name: id }, spec: { pool: POOL, userId: 'alice' }, status: { phase: 'Bound', containerName: container, warm: true } });
  const described = await c.cli('describe', 'claim', id!);
  t.is(described.code, 0, described.err);
  t.regex(described.out, new RegExp(`^Phase: +Bound$`, 'm'));
  t.regex(described.out, new RegExp(`^Container: +${container}$`, 'm'));
  t.regex(described.out, /^User: +alice$/m);

  // release
  const released = await c.cli('release', id!, '--server', c.server, '--token-file', c.env.tokenFile);
  t.is(released.code, 0, released.err);
  t.is(released.out, `claim ${id} released (container ${container} is destroyed or recycled by the reconciler)`);
  const after = await c.cli('get', 'claims');
  t.is(after.code, 0);
  t.false(after.out.includes(id!), after.out);
  t.regex(after.err, /no open claims/);
  const all = parseTable((await c.cli('get', 'claims', '--all')).out);
  t.like(all.find((r) => r.NAME === id), { PHASE: 'Released', USER: 'alice' });
  t.is((await c.cli('get', 'claims', '--all', '--pool', 'other')).err, 'no claims');

  // Releasing again changes nothing; an unknown claim is exit 1.
  t.is((await c.cli('release', id!, '--server', c.server)).code, 0);
  const unknown = await c.cli('release', '00000000-0000-4000-8000-000000000000', '--server', c.server);
  t.is(unknown.code, 1);
  t.regex(unknown.err, /^error: claim 00000000-0000-4000-8000-000000000000 not found$/);
  const deleted = await c.cli('delete', 'claim', id!);
  t.is(deleted.code, 2);
  t.is(deleted.err, `error: claims are ended through the daemon: polydev-reconciler release ${id}`);
  const missing = await c.cli('get', 'claim', 'nope');
  t.is(missing.code, 1);
  t.regex(missing.err, /Claim "nope" not found/);

  // The reconciler destroys the released container and keeps two warm.
  const engine = c.daemon.engines.get('process');
  await waitFor(`container ${container} destroyed`, async () => !(await engine.list(c.owner)).some((x) => x.name === container), CONVERGE_MS);
  await waitFor('two warm again', () => memberCounts(c.daemon.store, POOL).warm === 2, CONVERGE_MS);
});

test.serial('claim beyond maxPerUser is exit 1 (TOO_MANY_REQUESTS); an exhausted pool is exit 1 with retry after', async (t) => {
  const c = await setup(t, { maxPerUser: 1 });
  const claim = (user: string, ...more: string[]) => c.cli('claim', POOL, '--user', user, '--server', c.server, ...more);

  const first = await claim('alice');
  t.is(first.code, 0, first.err);
  const again = await claim('alice');
  t.is(again.code, 1, again.out);
  t.is(again.out, '');
  t.is(again.err, `error: user alice already holds 1 open claim(s) on pool ${POOL} (maxPerUser 1); release one first`);

  // Four users hold all of maxSize 4 (no refill fits any more); a fifth finds nothing warm and
  // no room to start one.
  for (const user of ['bob', 'carol', 'dave']) {
    await warmOne(c);
    const r = await claim(user);
    t.is(r.code, 0, `${user}: ${r.err}`);
    t.regex(r.out, CLAIM_LINE);
  }
  t.like(memberCounts(c.daemon.store, POOL), { claimed: 4, warm: 0 });
  const exhausted = await claim('erin');
  t.is(exhausted.code, 1, exhausted.out);
  t.regex(exhausted.err, /^error: pool wp has no warm container and is at maxSize \(4\); retry later \(retry after (\d+m)?(\d+(\.\d)?s)?\)$/);

  const noPool = await c.cli('claim', 'nope', '--user', 'alice', '--server', c.server);
  t.is(noPool.code, 1);
  t.is(noPool.err, 'error: WarmPool nope not found');

  // A wrong token is an error (exit 2), not an answer; so is an invalid request.
  const badTokenFile = path.join(c.env.dir, 'bad-token');
  fs.writeFileSync(badTokenFile, 'x'.repeat(TOKEN.length));
  const badToken = await claim('frank', '--token-file', badTokenFile);
  t.is(badToken.code, 2);
  t.regex(badToken.err, /Bearer token is required \(HTTP 401 UNAUTHORIZED; check --token-file or apiTokenFile\)/);
  const badFile = await claim('frank', '--file', '../escape=' + badTokenFile);
  t.is(badFile.code, 2);
  t.regex(badFile.err, /HTTP 400 INVALID/);

  const open = parseTable((await c.cli('get', 'claims', '--pool', POOL)).out);
  t.deepEqual(open.map((r) => r.USER).sort(), ['alice', 'bob', 'carol', 'dave']);
});

test.serial('claim with the daemon down: exit 2, "cannot reach the daemon" at the config\'s listen address', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'polydev-cli-down-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const port = await freePort();
  const tokenFile = path.join(dir, 'token');
  fs.writeFileSync(tokenFile, TOKEN, { mode: 0o600 });
  const cfgFile = path.join(dir, 'config.yaml');
  fs.writeFileSync(cfgFile, YAML.stringify({ database: path.join(dir, 'db.sqlite'), listen: `127.0.0.1:${port}`, apiTokenFile: tokenFile }));
  const printed: string[] = [];
  const cli = (...args: string[]) => runIn(printed, ['--config', cfgFile, ...args]);

  const r = await cli('claim', POOL, '--user', 'alice', '--env', `SECRET=${SECRET_ENV}`);
  t.is(r.code, 2);
  t.is(r.out, '');
  t.regex(r.err, new RegExp(`^error: cannot reach the daemon at http://127\\.0\\.0\\.1:${port}: .*ECONNREFUSED.* \\(is \`polydev-reconciler run\` running\\?\\)$`));
  const rel = await cli('release', 'some-claim');
  t.is(rel.code, 2);
  t.regex(rel.err, /cannot reach the daemon/);
  // The server named explicitly wins over the config.
  const explicit = await cli('claim', POOL, '--user', 'alice', '--server', `http://127.0.0.1:${port}/`);
  t.is(explicit.code, 2);
  t.regex(explicit.err, new RegExp(`cannot reach the daemon at http://127\\.0\\.0\\.1:${port}:`));
  assertNoSecrets(t, printed);
});

test.serial('describe warmpool and get warmpools show the claimed container; credentials reach it and are never printed', async (t) => {
  const c = await setup(t);

  // The status the columns show is written when a reconcile settles, just after the containers run.
  const row = await waitFor(
    'get warmpools: WARM 2, CLAIMED 0',
    async () => {
      const pools = await c.cli('get', 'warmpools');
      const r = parseTable(pools.out)[0];
      return pools.code === 0 && r?.WARM === '2' && r.CLAIMED === '0' ? r : undefined;
    },
    CONVERGE_MS,
    200,
  );
  t.like(row, { NAME: POOL, ENGINE: 'process', SIZE: '2', MAX: '4', PHASE: 'Ready' });

  const envFile = path.join(c.env.dir, 'claim.env');
  fs.writeFileSync(envFile, `# credentials\nOTHER=${SECRET_ENV_FILE}\n\nSECRET=overridden-by-flag\n`);
  const localFile = path.join(c.env.dir, 'token.txt');
  fs.writeFileSync(localFile, SECRET_FILE);
  const claimed = await c.cli(
    'claim', POOL, '--user', 'alice', '--server', c.server,
    '--env', `SECRET=${SECRET_ENV}`, '--env-file', envFile, '--file', `creds/token.txt=${localFile}`, '-o', 'json',
  );
  t.is(claimed.code, 0, claimed.err);
  const result = JSON.parse(claimed.out) as { claimId: string; pool: string; userId: string; warm: boolean; container: { id: string; name: string; address: string } };
  t.like(result, { pool: POOL, userId: 'alice', warm: true });

  // The credentials went into the container's run dir (the process engine's secrets dir).
  const member = listMembers(c.daemon.store, POOL).find((mm) => mm.containerId === result.container.id);
  t.truthy(member);
  const secretsDir = path.join(c.runDir, c.owner, member!.slot);
  t.is(fs.readFileSync(path.join(secretsDir, 'env'), 'utf8').split('\n').sort().join('\n'), `\nOTHER=${SECRET_ENV_FILE}\nSECRET=${SECRET_ENV}`);
  t.is(fs.readFileSync(path.join(secretsDir, 'files', 'creds', 'token.txt'), 'utf8'), SECRET_FILE);

  // get warmpools: the claimed container, and the refill that replaced it.
  await waitFor(
    'get warmpools: WARM 2, CLAIMED 1',
    async () => {
      const row = parseTable((await c.cli('get', 'wp')).out)[0];
      return row?.WARM === '2' && row.CLAIMED === '1';
    },
    CONVERGE_MS,
    200,
  );

  const described = await c.cli('describe', 'warmpool', POOL);
  t.is(described.code, 0, described.err);
  const text = described.out;
  for (const section of ['Spec:', 'Status:', 'Conditions:', 'Containers:', 'Claims:', 'Events:']) t.regex(text, new RegExp(`^${section}$`, 'm'));
  t.regex(text, /^Stats \(newest 1000 claims\):$/m);
  const containers = text.slice(text.indexOf('Containers:'), text.indexOf('Claims:'));
  t.regex(containers, /NAME +STATE +CLAIM +ADDRESS +AGE/);
  t.regex(containers, new RegExp(`^  ${result.container.name} +claimed +${result.claimId} +${result.container.address} +\\d+[smhd]$`, 'm'));
  t.is(containers.split('\n').filter((l) => / warm /.test(l)).length, 2, containers);
  const claims = text.slice(text.indexOf('Claims:'), text.indexOf('Stats'));
  t.regex(claims, new RegExp(`^  ${result.claimId} +alice +${result.container.name} +true +\\d{4}-\\S+Z \\(in \\d+m\\)$`, 'm'));
  t.regex(text, /^  Containers: +2 warm, 1 claimed, 0 starting, 0 releasing$/m);
  t.regex(text, /^  Claims served: +1 \(1 warm, 0 cold\), 0 failed$/m);
  t.regex(text, /^  Warm-hit ratio: +100\.0%$/m);
  t.regex(text, /^  Claim latency: +p50 [0-9.]+(ms|s), p99 [0-9.]+(ms|s)$/m);

  // Every other view of the claim, and malformed credential arguments: no value is ever echoed.
  for (const args of [['get', 'claims', '-o', 'yaml'], ['get', 'claims', '-o', 'json'], ['get', 'claims', '-o', 'wide'], ['describe', 'claim', result.claimId], ['events']]) {
    t.is((await c.cli(...args)).code, 0, args.join(' '));
  }
  const noEquals = await c.cli('claim', POOL, '--user', 'bob', '--server', c.server, '--env', SECRET_ENV);
  t.is(noEquals.code, 2);
  t.regex(noEquals.err, /--env takes KEY=VALUE/);
  const badName = await c.cli('claim', POOL, '--user', 'bob', '--server', c.server, '--env', `${SECRET_ENV}=x`);
  t.is(badName.code, 2);
  const badEnvFile = path.join(c.env.dir, 'bad.env');
  fs.writeFileSync(badEnvFile, `${SECRET_ENV_FILE}\n`);
  const badLine = await c.cli('claim', POOL, '--user', 'bob', '--server', c.server, '--env-file', badEnvFile);
  t.is(badLine.code, 2);
  t.regex(badLine.err, /bad\.env:1: expected KEY=VALUE/);
  assertNoSecrets(t, c.printed);
});
