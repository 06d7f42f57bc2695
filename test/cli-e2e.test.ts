// End-to-end tests of the CLI: the real program as it ships (`node dist/src/main.js`, which
// bin/polydev-reconciler.js runs; the command itself is tested in cli-bin.test.ts) with --db /
// --config, iptables always in a throwaway namespace (POLYDEV_IPTABLES_NETNS).

import test, { type ExecutionContext } from 'ava';
import fs from 'node:fs';
import path from 'node:path';
import YAML from 'yaml';

import {
  BIN,
  EXAMPLE_USERS,
  REPO,
  deleteSavedRule,
  e2eEnv,
  manifest,
  ruleOf,
  runBin,
  saveNat,
  spawnChild,
  userRules,
  waitFor,
  waitStarted,
  type E2eEnv,
} from './helpers/e2e-env.js';

const EXAMPLES = path.join(REPO, 'manifests', 'examples');

interface Cli {
  env: E2eEnv;
  cfgFile: string;
  run(args: string[], timeoutMs?: number): ReturnType<typeof runBin>;
}

/** The bundled proxy example alone (the warm-pool examples need Docker images and are tested elsewhere). */
function proxyExample(env: E2eEnv): string {
  const dir = path.join(env.dir, 'examples');
  fs.mkdirSync(dir, { recursive: true });
  fs.copyFileSync(path.join(EXAMPLES, 'proxy.yaml'), path.join(dir, 'proxy.yaml'));
  return dir;
}

async function cli(t: ExecutionContext, config: Record<string, unknown> = {}): Promise<Cli> {
  const env = await e2eEnv(t);
  const cfgFile = env.writeConfig({ desiredStateDir: proxyExample(env), ...config });
  return {
    env,
    cfgFile,
    run: (args, timeoutMs) => runBin(['--config', cfgFile, '--db', env.db, ...args], env.childEnv(), timeoutMs),
  };
}

/** A CLI whose store holds the converged example (3 users), programmed in the namespace. */
async function converged(t: ExecutionContext): Promise<Cli> {
  const c = await cli(t);
  const r = await c.run(['run', '--once']);
  t.is(r.code, 0, r.stderr + r.stdout);
  return c;
}

// ---------------------------------------------------------------------------
// run --once

test('run --once with the bundled example: exit 0, "converged", rules in the namespace', async (t) => {
  const c = await cli(t);
  const r = await c.run(['run', '--once']);
  t.is(r.code, 0, r.stderr);
  t.regex(r.stdout, /^converged: 4 resource\(s\)/m);
  t.log(`run --once took ${r.ms} ms`);
  const nat = await saveNat(c.env.ns);
  t.is(userRules(nat).length, 3);
  t.true(ruleOf(nat, 'alice')!.endsWith('127.0.0.1:10001'));
  // A second run finds everything in place and still exits 0.
  const again = await c.run(['run', '--once']);
  t.is(again.code, 0, again.stderr);
  t.deepEqual(userRules(await saveNat(c.env.ns)), userRules(nat));
});

test('run --once that cannot converge: exit 1 after onceTimeout, listing the resource', async (t) => {
  const env = await e2eEnv(t);
  env.writeDesired('proxy.yaml', manifest({ host: 'nonexistent.invalid' }, EXAMPLE_USERS.slice(0, 1)));
  const cfgFile = env.writeConfig({ desiredStateDir: env.desiredDir, onceTimeout: '2s' });
  const r = await runBin(['--config', cfgFile, 'run', '--once'], env.childEnv());
  t.is(r.code, 1, r.stderr + r.stdout);
  t.regex(r.stdout, /not converged after 2s:/);
  t.regex(r.stdout, /ProxyPool\/default: \w+: .*nonexistent\.invalid/);
  t.regex(r.stdout, /ProxyPort\/alice/);
  // A hang guard, not a speed check: onceTimeout is 2 s, start-up on a loaded machine takes seconds.
  t.true(r.ms < 60_000, `took ${r.ms} ms`);
  t.deepEqual(userRules(await saveNat(env.ns)), []);
});

// ---------------------------------------------------------------------------
// get / describe / events

test('get proxyports: table, json, yaml, single resource, kind aliases; unknown kind exits 2', async (t) => {
  const c = await converged(t);
  const table = await c.run(['get', 'proxyports']);
  t.is(table.code, 0, table.stderr);
  const lines = table.stdout.trimEnd().split('\n');
  const header = lines[0]!.split(/\s{2,}/);
  for (const col of ['NAME', 'USER', 'PORT']) t.true(header.includes(col), `${col} in ${lines[0]}`);
  t.is(lines.length, 4);
  const alice = lines.find((l) => l.startsWith('alice '))!;
  t.truthy(alice);
  const cells = alice.split(/\s{2,}/);
  t.is(cells[header.indexOf('USER')], 'alice');
  t.is(cells[header.indexOf('PORT')], '10001');

  const json = await c.run(['get', 'proxyports', '-o', 'json']);
  t.is(json.code, 0);
  const list = JSON.parse(json.stdout) as { items: Array<{ kind: string; spec: { userId: string }; status: { port: number; phase: string } }> };
  t.is(list.items.length, 3);
  t.deepEqual(list.items.map((i) => i.spec.userId), ['alice', 'bob', 'carol']);
  t.true(list.items.every((i) => i.kind === 'ProxyPort' && i.status.phase === 'Ready' && Number.isInteger(i.status.port)));

  const yaml = await c.run(['get', 'proxyports', '-o', 'yaml']);
  t.is(yaml.code, 0);
  const parsed = YAML.parse(yaml.stdout) as { items: unknown[] };
  t.is(parsed.items.length, 3);
  t.deepEqual(parsed, list as unknown);

  for (const alias of ['proxyport', 'proxyports', 'ProxyPort', 'PROXYPORTS', 'pport']) {
    const r = await c.run(['get', alias, '-o', 'json']);
    t.is(r.code, 0, alias);
    t.is((JSON.parse(r.stdout) as { items: unknown[] }).items.length, 3, alias);
  }
  const one = await c.run(['get', 'proxyport', 'bob', '-o', 'json']);
  t.is(one.code, 0);
  t.is((JSON.parse(one.stdout) as { spec: { userId: string } }).spec.userId, 'bob');
  const missing = await c.run(['get', 'proxyport', 'nobody']);
  t.is(missing.code, 1);
  t.regex(missing.stderr, /not found/);

  const unknown = await c.run(['get', 'widgets']);
  t.is(unknown.code, 2);
  t.regex(unknown.stderr, /unknown kind "widgets"/);
  const badFormat = await c.run(['get', 'proxyports', '-o', 'xml']);
  t.is(badFormat.code, 2);

  const pools = await c.run(['get', 'proxypools']);
  t.is(pools.code, 0);
  t.regex(pools.stdout, /^NAME\s+UPSTREAM\s+UPSTREAM-IP\s+PORTS\s+PROGRAMMED/m);
  t.regex(pools.stdout, /^default\s+127\.0\.0\.1\s+127\.0\.0\.1\s+3\s+3\s/m);
});

test('describe proxypool default shows Conditions and Events; events ProxyPool/default lists them', async (t) => {
  const c = await converged(t);
  const d = await c.run(['describe', 'proxypool', 'default']);
  t.is(d.code, 0, d.stderr);
  t.regex(d.stdout, /^Name:\s+default$/m);
  t.regex(d.stdout, /^Kind:\s+ProxyPool$/m);
  t.regex(d.stdout, /^Conditions:\n\s+TYPE\s+STATUS\s+REASON/m);
  t.regex(d.stdout, /^\s+Ready\s+True\s+Converged\s/m);
  t.regex(d.stdout, /^Events:\n\s+LAST SEEN\s+TYPE\s+REASON/m);
  t.regex(d.stdout, /Normal\s+Converged\s+\d+\s+ProxyPool default is converged/);
  t.notRegex(d.stdout, /desiredFingerprint/);
  const dp = await c.run(['describe', 'pport', 'alice']);
  t.is(dp.code, 0);
  t.regex(dp.stdout, /rulePresent: true/);
  t.is((await c.run(['describe', 'proxypool', 'nope'])).code, 1);

  const ev = await c.run(['events', 'ProxyPool/default']);
  t.is(ev.code, 0, ev.stderr);
  t.regex(ev.stdout, /^LAST SEEN\s+TYPE\s+REASON\s+OBJECT\s+COUNT\s+MESSAGE/);
  t.regex(ev.stdout, /Normal\s+Converged\s+ProxyPool\/default\s+1\s+ProxyPool default is converged/);
  t.notRegex(ev.stdout, /DesiredState\//);
  const all = await c.run(['events']);
  t.regex(all.stdout, /DesiredState\/directory/);
  const kindOnly = await c.run(['events', 'proxypool']);
  t.is(kindOnly.code, 0);
  t.regex(kindOnly.stdout, /ProxyPool\/default/);
  const none = await c.run(['events', 'ProxyPort/alice']);
  t.is(none.code, 0);
  const dir = await c.run(['events', 'DesiredState/directory']);
  t.is(dir.code, 0);
  t.regex(dir.stdout, /Normal\s+Applied\s+DesiredState\/directory\s+1\s+4 created, 0 configured, 0 pruned/);
});

// ---------------------------------------------------------------------------
// plan

test('plan: exit 0 when converged; after a hand-deleted rule exit 1 naming the user; per port', async (t) => {
  const c = await converged(t);
  const p0 = await c.run(['plan']);
  t.is(p0.code, 0, p0.stderr + p0.stdout);
  t.regex(p0.stdout, /ProxyPool\/default: no changes/);

  await deleteSavedRule(c.env.ns, 'nat', ruleOf(await saveNat(c.env.ns), 'bob')!);
  const p1 = await c.run(['plan']);
  t.is(p1.code, 1, p1.stderr);
  t.regex(p1.stdout, /ProxyPool\/default: 1 change\(s\)/);
  t.regex(p1.stdout, /add nat\/POLYDEV-PROXY rule for user bob \(port \d+\)/);
  t.notRegex(p1.stdout, /user (alice|carol)/);

  const pb = await c.run(['plan', 'proxyport', 'bob']);
  t.is(pb.code, 1);
  t.regex(pb.stdout, /user bob/);
  const pa = await c.run(['plan', 'proxyport', 'alice']);
  t.is(pa.code, 0, pa.stdout);
  t.regex(pa.stdout, /no changes/);
  const pp = await c.run(['plan', 'proxypool', 'default']);
  t.is(pp.code, 1);
  t.is((await c.run(['plan', 'proxyport', 'nobody'])).code, 1);
  t.is((await c.run(['plan', 'widgets'])).code, 2);

  // plan changes nothing; run --once repairs, and plan is clean again.
  t.is(ruleOf(await saveNat(c.env.ns), 'bob'), undefined);
  t.is((await c.run(['run', '--once'])).code, 0);
  t.is((await c.run(['plan'])).code, 0);
});

// ---------------------------------------------------------------------------
// proxyport add / remove

test('proxyport add prints a port and is idempotent; remove; the next run programs and unprograms it', async (t) => {
  const c = await converged(t);
  const add = await c.run(['proxyport', 'add', 'dave', '--source-ip', '127.0.0.14']);
  t.is(add.code, 0, add.stderr);
  const m = /^user dave: port (\d+) in ProxyPool default \(created, ProxyPort dave\)$/m.exec(add.stdout);
  t.truthy(m, add.stdout);
  const port = Number(m![1]);
  t.true(port >= 10001 && port <= 19999);
  const again = await c.run(['proxyport', 'add', 'dave', '--source-ip', '127.0.0.14']);
  t.is(again.code, 0);
  t.regex(again.stdout, new RegExp(`^user dave: port ${port} in ProxyPool default \\(unchanged, ProxyPort dave\\)$`, 'm'));

  const bad = await c.run(['proxyport', 'add', 'eve', '--source-ip', '10.0.0.300']);
  t.is(bad.code, 1);
  t.regex(bad.stderr, /sourceIP/);
  const taken = await c.run(['proxyport', 'add', 'eve', '--source-ip', '127.0.0.15', '--port', String(port)]);
  t.is(taken.code, 1);
  t.regex(taken.stderr, /already held by user dave/);
  const noPool = await c.run(['proxyport', 'add', 'eve', '--source-ip', '127.0.0.15', '--pool', 'nope']);
  t.is(noPool.code, 1);
  t.regex(noPool.stderr, /ProxyPool "nope" does not exist/);
  t.is((await c.run(['proxyport', 'add', 'eve'])).code, 2, 'missing --source-ip is a usage error');

  t.is((await c.run(['run', '--once'])).code, 0);
  t.true(ruleOf(await saveNat(c.env.ns), 'dave')?.endsWith(`127.0.0.1:${port}`));

  const rm = await c.run(['proxyport', 'remove', 'dave']);
  t.is(rm.code, 0, rm.stderr);
  t.regex(rm.stdout, /user dave: ProxyPort dave deleted/);
  t.is((await c.run(['run', '--once'])).code, 0);
  t.is(ruleOf(await saveNat(c.env.ns), 'dave'), undefined);
  t.is(userRules(await saveNat(c.env.ns)).length, 3);
  const gone = await c.run(['proxyport', 'remove', 'dave']);
  t.is(gone.code, 1);
  t.regex(gone.stderr, /has no ProxyPort/);
  t.is((await c.run(['get', 'proxyport', 'dave'])).code, 1);
});

test('a running daemon follows what the CLI writes (proxyport add/remove through the change feed)', async (t) => {
  const c = await cli(t, { logLevel: 'info' });
  const daemon = spawnChild(t, process.execPath, [BIN, '--config', c.cfgFile, 'run'], c.env.childEnv());
  await waitStarted(daemon);
  await waitFor('3 rules', async () => userRules(await saveNat(c.env.ns)).length === 3);

  const add = await c.run(['proxyport', 'add', 'dave', '--source-ip', '127.0.0.14']);
  t.is(add.code, 0, add.stderr);
  const port = Number(/port (\d+)/.exec(add.stdout)![1]);
  await waitFor('dave\'s rule', async () => ruleOf(await saveNat(c.env.ns), 'dave')?.endsWith(`127.0.0.1:${port}`));
  await waitFor('dave to be Ready', async () => {
    const r = await c.run(['get', 'proxyport', 'dave', '-o', 'json']);
    return r.code === 0 && (JSON.parse(r.stdout) as { status: { phase?: string } }).status.phase === 'Ready';
  });
  t.is((await c.run(['proxyport', 'remove', 'dave'])).code, 0);
  await waitFor('dave\'s rule to go', async () => ruleOf(await saveNat(c.env.ns), 'dave') === undefined);
  await waitFor('ProxyPort dave to go', async () => (await c.run(['get', 'proxyport', 'dave'])).code === 1);
  // The daemon's log says what the CLI changed, when it took it up.
  const logged = daemon.stdout().split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as Record<string, unknown>);
  t.like(logged.find((e) => e['message'] === 'desired state changed by another process' && e['resource'] === 'ProxyPort/dave'), { level: 'info', generation: 1 });
  t.like(logged.find((e) => e['message'] === 'deletion requested by another process'), { level: 'info', resource: 'ProxyPort/dave' });
  // run --once (or a second daemon) on the same DB is refused while the daemon runs.
  const once = await c.run(['run', '--once']);
  t.is(once.code, 2);
  t.regex(once.stderr, new RegExp(`another polydev-reconciler \\(pid ${daemon.pid} `));
  t.true(daemon.running());
});

test('run with an API address already in use exits 2 and says which address', async (t) => {
  const net = await import('node:net');
  const busy = net.createServer();
  await new Promise<void>((r) => busy.listen(0, '127.0.0.1', () => r()));
  t.teardown(() => busy.close());
  const port = (busy.address() as import('node:net').AddressInfo).port;
  const c = await cli(t, { listen: `127.0.0.1:${port}` });
  const r = await c.run(['run'], 30_000);
  t.is(r.code, 2, r.stdout + r.stderr);
  t.regex(r.stderr, new RegExp(`EADDRINUSE.*127\\.0\\.0\\.1:${port}`));
});

// ---------------------------------------------------------------------------
// apply / validate / diff, errors

test('validate, apply (twice: unchanged), diff against the store', async (t) => {
  const c = await cli(t);
  const v = await c.run(['validate', '-f', EXAMPLES]);
  t.is(v.code, 0, v.stdout + v.stderr);
  t.regex(v.stdout, /9 resource\(s\) in 4 file\(s\) are valid/);
  // The examples that need a GPU or a Nomad cluster are valid too, though not part of the demo.
  const extra = await c.run(['validate', '-f', path.join(REPO, 'manifests', 'examples-extra')]);
  t.is(extra.code, 0, extra.stdout + extra.stderr);
  t.regex(extra.stdout, /2 resource\(s\) in 2 file\(s\) are valid/);
  const a1 = await c.run(['apply', '-f', EXAMPLES]);
  t.is(a1.code, 0, a1.stderr);
  t.regex(a1.stdout, /proxypool\/default created/);
  t.regex(a1.stdout, /warmpool\/openai created/);
  t.regex(a1.stdout, /warmpool\/dev created/);
  t.regex(a1.stdout, /turnserver\/coturn created/);
  const a2 = await c.run(['apply', '-f', EXAMPLES]);
  t.is(a2.code, 0, a2.stderr);
  t.regex(a2.stdout, /proxypool\/default unchanged/);
  t.regex(a2.stdout, /proxyport\/alice unchanged/);
  const d0 = await c.run(['diff', '-f', EXAMPLES]);
  t.is(d0.code, 0, d0.stdout);

  c.env.writeDesired('proxy.yaml', manifest({}, [...EXAMPLE_USERS, { userId: 'dave', sourceIP: '127.0.0.14' }]));
  const d1 = await c.run(['diff', '-f', c.env.desiredDir]);
  t.is(d1.code, 1);
  t.regex(d1.stdout, /\+\+\+ ProxyPort\/dave \(new\)/);

  c.env.writeDesired('proxy.yaml', manifest({}, [{ userId: 'dave', sourceIP: '10.0.0.300' }]));
  const bad = await c.run(['validate', '-f', c.env.desiredDir]);
  t.is(bad.code, 1);
  t.regex(bad.stdout, /proxy\.yaml:\d+:\d+: ProxyPort\/dave: spec\.sourceIP/);
  const badApply = await c.run(['apply', '-f', c.env.desiredDir]);
  t.is(badApply.code, 1);
  t.regex(badApply.stderr, /nothing was applied/);
});

test('usage and configuration errors exit 2', async (t) => {
  const c = await cli(t);
  t.is((await c.run(['no-such-command'])).code, 2);
  t.is((await c.run(['get'])).code, 2);
  const badCfg = path.join(c.env.dir, 'bad.yaml');
  (await import('node:fs')).writeFileSync(badCfg, 'database: x.db\nresyncInterval: soon\n');
  const r = await runBin(['--config', badCfg, 'get', 'proxyports'], c.env.childEnv());
  t.is(r.code, 2);
  t.regex(r.stderr, /bad\.yaml:2:\d+: resyncInterval/);
  const unknownKey = path.join(c.env.dir, 'unknown.yaml');
  (await import('node:fs')).writeFileSync(unknownKey, 'database: x.db\nlisten_addr: 1\n');
  const r2 = await runBin(['--config', unknownKey, 'get', 'proxyports'], c.env.childEnv());
  t.is(r2.code, 2);
  t.regex(r2.stderr, /unknown setting/);
  // API token: too short, or missing, refuses to start (never a silently open API).
  const fs = await import('node:fs');
  const shortToken = path.join(c.env.dir, 'short-token');
  fs.writeFileSync(shortToken, 'short\n');
  const short = await runBin(['--config', c.cfgFile, '--db', c.env.db, 'run'], c.env.childEnv({ POLYDEV_API_TOKEN_FILE: shortToken }), 30_000);
  t.is(short.code, 2);
  t.regex(short.stderr, /at least 16 characters/);
  const missing = await runBin(['--config', c.cfgFile, '--db', c.env.db, 'run'], c.env.childEnv({ POLYDEV_API_TOKEN_FILE: path.join(c.env.dir, 'nope') }), 30_000);
  t.is(missing.code, 2);
  t.regex(missing.stderr, /ENOENT|no such file/i);
  // run --source: a bad value is a configuration error; kubernetes without any cluster says what it tried.
  const badSource = await runBin(['--config', c.cfgFile, '--db', c.env.db, 'run', '--source', 'etcd'], c.env.childEnv(), 30_000);
  t.is(badSource.code, 2);
  t.regex(badSource.stderr, /command line: source: must be files or kubernetes/);
  const noCluster = await runBin(['--config', c.cfgFile, '--db', c.env.db, 'run', '--source', 'kubernetes'],
    c.env.childEnv({ KUBERNETES_SERVICE_HOST: '', KUBECONFIG: '' }), 30_000);
  t.is(noCluster.code, 2, noCluster.stderr);
  t.regex(noCluster.stderr, /no Kubernetes credentials: no kubeconfig was given/);
  const help = await c.run(['--help']);
  t.is(help.code, 0);
  t.regex(help.stdout, /Usage: polydev-reconciler/);
});
