// iptables rules of a ProxyPool: the pure planner (src/controllers/proxypool/rules.ts)
// against real iptables (src/drivers/iptables.ts), for both the nf_tables and the
// legacy backend. Every test that touches iptables runs in its own throwaway network
// namespace; the host's root namespace is never modified.

import test, { type ExecutionContext } from 'ava';
import { spawn } from 'node:child_process';
import { performance } from 'node:perf_hooks';

import {
  describeAction,
  observePool,
  parseIptablesSave,
  planPoolRules,
  planPoolTeardown,
  programmedUsers,
  renderDesiredPoolRules,
  renderForwardRules,
  renderJumpRule,
  renderMasqueradeRule,
  renderPortRule,
  renderRestorePayload,
  sysctlActions,
  tokenizeRuleSpec,
  type ObservedPoolRules,
  type PoolRuleSet,
  type RuleAction,
} from '../src/controllers/proxypool/rules.js';
import { DEFAULT_CHAINS, type ProxyChains } from '../src/controllers/proxypool/types.js';
import {
  IptablesCommandError,
  IptablesDriver,
  backendAvailable,
  backendBinaries,
  findExecutable,
  runProcess,
} from '../src/drivers/iptables.js';
import { createNetns, requireRoot, type Netns } from './helpers/netns.js';

type Backend = 'nft' | 'legacy';
const BACKENDS: Backend[] = (['nft', 'legacy'] as const).filter((b) => backendAvailable(b));

const CHAINS: ProxyChains = DEFAULT_CHAINS;

function ruleSet(over: Partial<PoolRuleSet> = {}): PoolRuleSet {
  return {
    pool: 'egress',
    chains: CHAINS,
    upstreamIP: '10.99.0.1',
    destinationPorts: [80, 443],
    portRange: { min: 10001, max: 19999 },
    ports: [
      { userId: 'alice', sourceIP: '10.1.0.2', port: 10001 },
      { userId: 'bob', sourceIP: '10.1.0.3', port: 10002 },
      { userId: 'carol@example.com', sourceIP: '10.1.0.4', port: 10003 },
    ],
    ipForward: true,
    ...over,
  };
}

interface Env {
  ns: Netns;
  driver: IptablesDriver;
  /** Runs the backend's own `iptables` binary in the namespace (hand edits, as an operator would). */
  iptables(args: string[]): Promise<string>;
}

async function setup(t: ExecutionContext, backend: Backend, addresses: string[] = []): Promise<Env> {
  requireRoot();
  const ns = await createNetns({ addresses });
  t.teardown(() => ns.destroy());
  const driver = new IptablesDriver({ backend, netns: ns.name, timeoutMs: 60_000 });
  const bin = findExecutable(backendBinaries(backend).iptables);
  if (!bin) throw new Error(`${backendBinaries(backend).iptables} not found`);
  return {
    ns,
    driver,
    // -w: the legacy backend's xtables lock (/run/xtables.lock) is one for all namespaces, shared with every
    // concurrent test and file; under load a holder (e.g. a big restore) can keep it for more than 5 s.
    // Waiting for it is never what a test checks, so the wait (and the exec's kill timer) are hang guards.
    iptables: async (args) => (await ns.exec(bin, ['-w', '60', ...args], { timeoutMs: 90_000 })).stdout,
  };
}

async function observe(driver: IptablesDriver, chains: ProxyChains = CHAINS): Promise<{ text: string; observed: ObservedPoolRules }> {
  const text = await driver.save();
  const observed = observePool(parseIptablesSave(text), chains, await driver.getIpForward());
  return { text, observed };
}

async function apply(driver: IptablesDriver, actions: RuleAction[]): Promise<void> {
  await driver.restore(renderRestorePayload(actions));
  for (const a of sysctlActions(actions)) await driver.setIpForward(a.value);
}

async function plan(driver: IptablesDriver, desired: PoolRuleSet): Promise<RuleAction[]> {
  return planPoolRules(desired, (await observe(driver, desired.chains)).observed);
}

async function converge(driver: IptablesDriver, desired: PoolRuleSet): Promise<RuleAction[]> {
  const actions = await plan(driver, desired);
  await apply(driver, actions);
  return actions;
}

/** `-A` lines of one chain, exactly as saved. */
function chainLines(text: string, table: string, chain: string): string[] {
  const saved = parseIptablesSave(text);
  return (saved.tables.get(table)?.chains.get(chain)?.rules ?? []).map((r) => `-A ${chain} ${r}`);
}

/** Everything that is not ours: foreign rules and foreign user-chain declarations, in order. */
function foreignState(text: string): string[] {
  const out: string[] = [];
  let table = '';
  for (const line of text.split('\n')) {
    if (line.startsWith('*')) table = line;
    else if (line.startsWith('-A ') && !line.includes('polydev:')) out.push(`${table} ${line}`);
    else if (line.startsWith(':') && line.includes(' - ') && !/^:POLYDEV-PROXY(-MASQ|-FWD)? /.test(line)) out.push(`${table} ${line}`);
  }
  return out;
}

function count<T>(xs: T[], x: T): number {
  return xs.filter((y) => y === x).length;
}

// ---------------------------------------------------------------------------
// Pure tests

test('renderers throw on values that are not what they claim to be', (t) => {
  const entry = { userId: 'alice', sourceIP: '10.0.0.2', port: 10001 };
  const ok = () => renderPortRule('egress', CHAINS, '10.0.0.1', [80, 443], entry);
  t.notThrows(ok);
  const bad: Array<[string, () => unknown, RegExp]> = [
    ['source 10.0.0.300', () => renderPortRule('egress', CHAINS, '10.0.0.1', [80], { ...entry, sourceIP: '10.0.0.300' }), /sourceIP/],
    ['source with shell', () => renderPortRule('egress', CHAINS, '10.0.0.1', [80], { ...entry, sourceIP: '1.2.3.4; rm -rf /' }), /sourceIP/],
    ['upstream ::1', () => renderPortRule('egress', CHAINS, '::1', [80], entry), /upstream IP/],
    ['upstream with shell', () => renderMasqueradeRule('egress', '1.2.3.4; rm -rf /', { min: 10001, max: 19999 }), /upstream IP/],
    ['upstream leading zero', () => renderForwardRules('egress', '010.0.0.1', { min: 10001, max: 19999 }), /upstream IP/],
    ['userId with space', () => renderPortRule('egress', CHAINS, '10.0.0.1', [80], { ...entry, userId: 'alice smith' }), /userId/],
    ['userId with quote', () => renderPortRule('egress', CHAINS, '10.0.0.1', [80], { ...entry, userId: 'al"ice' }), /userId/],
    ["userId with ' -j ACCEPT", () => renderPortRule('egress', CHAINS, '10.0.0.1', [80], { ...entry, userId: "x' -j ACCEPT" }), /userId/],
    ['port 70000', () => renderPortRule('egress', CHAINS, '10.0.0.1', [80], { ...entry, port: 70000 }), /port/],
    ['port 1.5', () => renderPortRule('egress', CHAINS, '10.0.0.1', [80], { ...entry, port: 1.5 }), /port/],
    ['dport 70000', () => renderPortRule('egress', CHAINS, '10.0.0.1', [70000], entry), /destination port/],
    ['no dports', () => renderPortRule('egress', CHAINS, '10.0.0.1', [], entry), /destinationPorts/],
    ['range max 70000', () => renderMasqueradeRule('egress', '10.0.0.1', { min: 10001, max: 70000 }), /portRange/],
    ['range min > max', () => renderForwardRules('egress', '10.0.0.1', { min: 20000, max: 10000 }), /portRange/],
    ['chain "bad chain"', () => renderPortRule('egress', { ...CHAINS, nat: 'bad chain' }, '10.0.0.1', [80], entry), /chains\.nat/],
    ['jump target "bad chain"', () => renderJumpRule('egress', 'bad chain'), /jump target/],
    ['chain ACCEPT', () => renderJumpRule('egress', 'ACCEPT'), /built-in/],
    ['chain too long', () => renderJumpRule('egress', 'A'.repeat(29)), /jump target/],
    ['same chain twice', () => renderPortRule('egress', { ...CHAINS, filter: CHAINS.nat }, '10.0.0.1', [80], entry), /must differ/],
    ['pool with space', () => renderMasqueradeRule('eg ress', '10.0.0.1', { min: 1, max: 2 }), /pool name/],
    ['pool with quote', () => renderJumpRule('e"x', 'POLYDEV-PROXY'), /pool name/],
  ];
  for (const [what, fn, re] of bad) {
    const err = t.throws(fn, undefined, what);
    t.regex(err?.message ?? '', re, what);
  }
});

test('renderers emit the canonical iptables-save form', (t) => {
  const spec = renderPortRule('egress', CHAINS, '10.99.0.1', [443, 80, 443], { userId: 'alice', sourceIP: '10.1.0.2', port: 10001 });
  t.regex(
    spec,
    /^-s 10\.1\.0\.2\/32 -p tcp -m multiport --dports 80,443 -m comment --comment "polydev:[0-9a-f]{12} pool:egress user:alice" -j DNAT --to-destination 10\.99\.0\.1:10001$/,
  );
  t.is(spec, renderPortRule('egress', CHAINS, '10.99.0.1', [80, 443], { userId: 'alice', sourceIP: '10.1.0.2', port: 10001 }));
  t.not(spec, renderPortRule('egress', CHAINS, '10.99.0.1', [80, 443], { userId: 'alice', sourceIP: '10.1.0.2', port: 10002 }));
  t.regex(renderMasqueradeRule('egress', '10.99.0.1', { min: 10001, max: 10001 }), / --dport 10001 /);
  t.regex(renderMasqueradeRule('egress', '10.99.0.1', { min: 10001, max: 19999 }), /^-d 10\.99\.0\.1\/32 ! -o lo -p tcp -m tcp --dport 10001:19999 /);
  t.is(renderJumpRule('egress', 'POLYDEV-PROXY'), '-m comment --comment "polydev:jump pool:egress" -j POLYDEV-PROXY');
  t.deepEqual(tokenizeRuleSpec(spec).slice(-6), ['--comment', spec.match(/"(.*)"/)![1], '-j', 'DNAT', '--to-destination', '10.99.0.1:10001']);
});

test('parseIptablesSave: tables, policies, order, counters, comments', (t) => {
  const saved = parseIptablesSave(
    [
      '# Generated by iptables-nft-save v1.8.9 (nf_tables) on ...',
      '*nat',
      ':PREROUTING ACCEPT [0:0]',
      ':X - [0:0]',
      '-A PREROUTING -j X',
      '[3:180] -A X -s 1.2.3.4/32 -m comment --comment "a b" -j RETURN',
      '-A X -j RETURN',
      'COMMIT',
      '*filter',
      ':FORWARD DROP [0:0]',
      'COMMIT',
      'garbage',
    ].join('\n'),
  );
  t.deepEqual([...saved.tables.keys()], ['nat', 'filter']);
  const x = saved.tables.get('nat')!.chains.get('X')!;
  t.false(x.builtin);
  t.deepEqual(x.rules, ['-s 1.2.3.4/32 -m comment --comment "a b" -j RETURN', '-j RETURN']);
  t.is(saved.tables.get('filter')!.chains.get('FORWARD')!.policy, 'DROP');
  t.true(saved.tables.get('filter')!.chains.get('FORWARD')!.builtin);
  t.is(saved.warnings.length, 1);
});

test('planner (pure): converge from nothing, then nothing; describeAction is readable', (t) => {
  const empty = observePool(parseIptablesSave(''), CHAINS, false);
  const actions = planPoolRules(ruleSet(), empty);
  t.deepEqual(
    actions.map((a) => a.type),
    [
      'create-chain', 'create-chain', 'create-chain',
      'append-rule', 'append-rule', 'append-rule', 'append-rule', 'append-rule', 'append-rule',
      'insert-jump', 'insert-jump', 'insert-jump', 'insert-jump',
      'set-ip-forward',
    ],
  );
  const texts = actions.map(describeAction);
  t.true(texts.includes('add nat/POLYDEV-PROXY rule for user alice (port 10001)'), texts.join('\n'));
  t.true(texts.includes('create chain nat/POLYDEV-PROXY-MASQ'));
  t.true(texts.includes('insert jump nat/PREROUTING -> POLYDEV-PROXY at position 1'));
  t.true(texts.includes('set net.ipv4.ip_forward=1'));
  t.is(actions.filter((a) => 'userId' in a && a.userId === 'bob').length, 1);
  const payload = renderRestorePayload(actions);
  t.is(count(payload.split('\n'), '*nat'), 1);
  t.is(count(payload.split('\n'), '*filter'), 1);
  t.false(payload.includes('ip_forward'));
  t.false(/^:/m.test(payload), 'never declares chains (that would flush existing ones)');

  // Feed the rendered state back as if iptables-save printed it.
  const want = renderDesiredPoolRules(ruleSet());
  const save = [
    '*nat',
    ':PREROUTING ACCEPT [0:0]', ':OUTPUT ACCEPT [0:0]', ':POSTROUTING ACCEPT [0:0]',
    `:${CHAINS.nat} - [0:0]`, `:${CHAINS.postrouting} - [0:0]`,
    ...want.jumps.filter((j) => j.table === 'nat').map((j) => `-A ${j.from} ${j.spec}`),
    ...want.rules.nat.map((r) => `-A ${r.chain} ${r.spec}`),
    ...want.rules.postrouting.map((r) => `-A ${r.chain} ${r.spec}`),
    'COMMIT', '*filter', ':FORWARD ACCEPT [0:0]', `:${CHAINS.filter} - [0:0]`,
    ...want.jumps.filter((j) => j.table === 'filter').map((j) => `-A ${j.from} ${j.spec}`),
    ...want.rules.filter.map((r) => `-A ${r.chain} ${r.spec}`),
    'COMMIT',
  ].join('\n');
  const observed = observePool(parseIptablesSave(save), CHAINS, true);
  t.deepEqual(planPoolRules(ruleSet(), observed), []);
  t.deepEqual([...programmedUsers(ruleSet(), observed)].sort(), ['alice', 'bob', 'carol@example.com']);
  t.deepEqual(renderRestorePayload([]), '');
});

test('driver: sbin binaries are found without them in PATH; bad netns names are refused', async (t) => {
  const code = `
    const m = await import(${JSON.stringify(new URL('../src/drivers/iptables.ts', import.meta.url).href)});
    console.log(JSON.stringify([m.findExecutable('iptables-save'), m.findExecutable('ip'), m.findExecutable('sysctl')]));`;
  const out = await new Promise<string>((resolve, reject) => {
    const child = spawn(process.execPath, ['--import=tsx', '--input-type=module', '-e', code], {
      env: { ...process.env, PATH: '/nonexistent' },
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    let buf = '';
    const timer = setTimeout(() => child.kill('SIGKILL'), 60_000); // hang guard: a tsx start, slow under load
    child.stdout.on('data', (b: Buffer) => (buf += b.toString()));
    child.on('error', reject);
    child.on('close', (c) => {
      clearTimeout(timer);
      if (c === 0) resolve(buf);
      else reject(new Error(`child exited ${c}`));
    });
  });
  const [save, ip, sysctl] = JSON.parse(out) as Array<string | null>;
  t.regex(save ?? '', /^\/(usr\/)?sbin\/iptables-save$/);
  t.regex(ip ?? '', /^\/(usr\/)?s?bin\/ip$/);
  t.regex(sysctl ?? '', /^\/(usr\/)?sbin\/sysctl$/);
  t.throws(() => new IptablesDriver({ backend: 'nft', netns: 'x; rm -rf /' }), { message: /network namespace/ });
  t.throws(() => new IptablesDriver({ backend: 'bogus' as 'nft' }), { message: /backend/ });
});

test('driver: every process is SIGKILLed when it exceeds its timeout', async (t) => {
  const sleep = findExecutable('sleep');
  if (!sleep) throw new Error('sleep not found');
  let pid: number | undefined;
  const t0 = performance.now();
  const res = await runProcess(sleep, ['30'], null, 200, (p) => (pid = p));
  // Killed at the 200 ms timeout, not after the 30 s sleep: a hang guard far below 30 s, not a speed
  // figure (a process start alone can take seconds on a loaded machine).
  t.true(performance.now() - t0 < 15_000);
  t.true(res.timedOut);
  t.is(res.signal, 'SIGKILL');
  t.truthy(pid);
  t.throws(() => process.kill(pid!, 0), { code: 'ESRCH' }, 'the child is gone');
  // Not about the timeout: a generous one, so a slow process start on a loaded machine is no failure.
  const ok = await runProcess(findExecutable('cat')!, [], 'payload on stdin', 30_000);
  t.false(ok.timedOut);
  t.is(ok.stdout, 'payload on stdin');
});

// ---------------------------------------------------------------------------
// Real iptables, per backend

test('at least one iptables backend is installed', (t) => {
  requireRoot();
  t.true(BACKENDS.length > 0, 'neither iptables-nft-restore nor iptables-legacy-restore found');
  t.log(`backends under test: ${BACKENDS.join(', ')}`);
});

for (const backend of BACKENDS) {
  test(`${backend}: quirk: with --noflush, declaring an existing user chain flushes it; -N refuses an existing one`, async (t) => {
    const { driver, iptables } = await setup(t, backend);
    await iptables(['-t', 'nat', '-N', 'QUIRK']);
    await iptables(['-t', 'nat', '-A', 'QUIRK', '-s', '10.0.0.1', '-j', 'RETURN']);
    await driver.restore('*nat\n:QUIRK - [0:0]\nCOMMIT\n');
    t.deepEqual(chainLines(await driver.save(), 'nat', 'QUIRK'), [], 'the declaration flushed the chain');

    await iptables(['-t', 'nat', '-A', 'QUIRK', '-s', '10.0.0.1', '-j', 'RETURN']);
    const payload = '*nat\n-A QUIRK -s 10.0.0.2/32 -j RETURN\n-N QUIRK\nCOMMIT\n';
    const err = await t.throwsAsync(driver.restore(payload), { instanceOf: IptablesCommandError });
    t.is(err?.line, 3, err?.message);
    t.is(err?.lineText, '-N QUIRK');
    // nft says why ("Chain already exists"); legacy only says "line 3 failed".
    if (backend === 'nft') t.regex(err?.stderr ?? '', /exist/i);
    t.regex(err?.message ?? '', /line 3/);
    t.deepEqual(chainLines(await driver.save(), 'nat', 'QUIRK'), ['-A QUIRK -s 10.0.0.1/32 -j RETURN'], 'failed restore applied nothing');
  });

  test(`${backend}: converge from empty, then the plan is empty`, async (t) => {
    const { driver } = await setup(t, backend);
    const desired = ruleSet();
    const first = await converge(driver, desired);
    t.true(first.length > 0);
    t.is(driver.stats.restores, 1, 'one iptables-restore for everything');
    t.is(driver.stats.sysctlWrites, 1);

    const { text, observed } = await observe(driver);
    t.deepEqual(planPoolRules(desired, observed), [], 'converged');
    t.true(await driver.getIpForward());
    t.deepEqual([...programmedUsers(desired, observed)].sort(), ['alice', 'bob', 'carol@example.com']);
    t.deepEqual(observed.foreign, []);
    for (const role of ['nat', 'postrouting', 'filter'] as const) t.true(observed.chains[role].exists);
    t.is(observed.chains.nat.owned.length, 3);
    const want = renderDesiredPoolRules(desired);
    for (const j of want.jumps) {
      const lines = chainLines(text, j.table, j.from);
      t.is(count(lines, `-A ${j.from} ${j.spec}`), 1, `${j.from} jump once`);
      t.is(lines[0], `-A ${j.from} ${j.spec}`, `${j.from} jump at position 1`);
    }
    t.is(observed.jumps.length, 4);
    // A second converge does nothing at all.
    const restores = driver.stats.restores;
    t.deepEqual(await converge(driver, desired), []);
    t.is(driver.stats.restores, restores, 'no restore for an empty plan');
  });

  test(`${backend}: render == read-back for every rule type (two pools, odd ports)`, async (t) => {
    const { driver } = await setup(t, backend);
    const a = ruleSet();
    const b: PoolRuleSet = {
      pool: 'single-9',
      chains: { nat: 'PD-B', postrouting: 'PD-B_MASQ', filter: 'PD-B-FWD' },
      upstreamIP: '192.168.255.254',
      destinationPorts: [8443, 80, 443, 8080, 1, 65535],
      portRange: { min: 12345, max: 12345 },
      ports: [{ userId: 'u.1@x-y_z', sourceIP: '0.0.0.0', port: 12345 }, { userId: '9', sourceIP: '255.255.255.255', port: 65535 }],
      ipForward: false,
    };
    await converge(driver, a);
    await converge(driver, b);
    const text = await driver.save();
    for (const set of [a, b]) {
      const want = renderDesiredPoolRules(set);
      const rules = [...want.rules.nat, ...want.rules.postrouting, ...want.rules.filter];
      for (const r of rules) {
        t.is(count(chainLines(text, r.table, r.chain), `-A ${r.chain} ${r.spec}`), 1, `${set.pool} ${r.kind} read back verbatim`);
      }
      for (const j of want.jumps) {
        t.is(count(chainLines(text, j.table, j.from), `-A ${j.from} ${j.spec}`), 1, `${set.pool} jump ${j.from} read back verbatim`);
      }
      t.deepEqual(await plan(driver, set), [], `${set.pool} converged`);
    }
  });

  test(`${backend}: foreign rules, a foreign rule in our chain, chain OTHER and a foreign jump survive converge, change and teardown`, async (t) => {
    const { driver, iptables } = await setup(t, backend);
    await iptables(['-t', 'nat', '-A', 'PREROUTING', '-p', 'udp', '--dport', '53', '-j', 'REDIRECT', '--to-ports', '5353']);
    await iptables(['-t', 'nat', '-N', 'OTHER']);
    await iptables(['-t', 'nat', '-A', 'OTHER', '-s', '10.5.0.0/16', '-j', 'RETURN']);
    await iptables(['-t', 'nat', '-A', 'OUTPUT', '-j', 'OTHER']);
    await iptables(['-t', 'filter', '-N', 'OTHER']);
    await iptables(['-t', 'filter', '-A', 'FORWARD', '-i', 'lo', '-j', 'OTHER']);
    // Our nat chain already exists (made by hand) and holds a rule without our comment.
    await iptables(['-t', 'nat', '-N', CHAINS.nat]);
    await iptables(['-t', 'nat', '-A', CHAINS.nat, '-s', '10.7.0.1', '-m', 'comment', '--comment', 'hand made', '-j', 'RETURN']);
    const before = foreignState(await driver.save());
    t.true(before.length >= 6);

    const desired = ruleSet();
    const actions = await converge(driver, desired);
    t.false(actions.some((a) => a.type === 'create-chain' && a.chain === CHAINS.nat), 'existing chain not re-created');
    let { text, observed } = await observe(driver);
    t.deepEqual(planPoolRules(desired, observed), []);
    t.deepEqual(foreignState(text), before);
    t.deepEqual(observed.foreign.map((f) => [f.reason, f.spec]), [['in-owned-chain', '-s 10.7.0.1/32 -m comment --comment "hand made" -j RETURN']]);

    // A foreign jump into one of our chains is reported and left alone.
    await iptables(['-t', 'filter', '-I', 'FORWARD', '1', '-s', '10.8.0.0/16', '-j', CHAINS.filter]);
    const withJump = foreignState(await driver.save());
    ({ observed } = await observe(driver));
    t.deepEqual(planPoolRules(desired, observed), []);
    t.true(observed.foreign.some((f) => f.reason === 'unowned-jump' && f.chain === 'FORWARD'));

    // Change: drop a user, change the upstream.
    const changed = ruleSet({ upstreamIP: '10.99.0.2', ports: ruleSet().ports.slice(1) });
    t.true((await converge(driver, changed)).length > 0);
    ({ text, observed } = await observe(driver));
    t.deepEqual(planPoolRules(changed, observed), []);
    t.deepEqual(foreignState(text), withJump);

    // Teardown: our jumps and rules go; the chain with a foreign rule and the chain a
    // foreign rule jumps to stay (flushed of ours); everything foreign is identical.
    const down = planPoolTeardown(CHAINS, observed);
    t.true(down.every((a) => a.type !== 'set-ip-forward'));
    await apply(driver, down);
    ({ text, observed } = await observe(driver));
    t.false(text.includes('polydev:'), 'nothing of ours left');
    t.deepEqual(foreignState(text), withJump);
    t.false(observed.chains.postrouting.exists, 'unreferenced empty chain deleted');
    t.true(observed.chains.nat.exists, 'chain holding a foreign rule kept');
    t.true(observed.chains.filter.exists, 'chain a foreign rule jumps to kept');
    t.deepEqual(planPoolTeardown(CHAINS, observed), [], 'teardown is idempotent');
  });

  test(`${backend}: hand-deleted rule, hand-edited rule, duplicated jump, removed jump are detected and repaired`, async (t) => {
    const { driver, iptables } = await setup(t, backend);
    const desired = ruleSet();
    await converge(driver, desired);
    const want = renderDesiredPoolRules(desired);
    const bob = want.rules.nat.find((r) => r.userId === 'bob')!;

    // 1. hand-deleted user rule
    await iptables(['-t', 'nat', '-D', CHAINS.nat, ...tokenizeRuleSpec(bob.spec)]);
    let actions = await plan(driver, desired);
    t.deepEqual(actions, [{ type: 'append-rule', table: 'nat', chain: CHAINS.nat, spec: bob.spec, kind: 'user', userId: 'bob', port: 10002 }]);
    t.deepEqual(actions.map(describeAction), ['add nat/POLYDEV-PROXY rule for user bob (port 10002)']);
    t.false(programmedUsers(desired, (await observe(driver)).observed).has('bob'));
    await apply(driver, actions);
    t.deepEqual(await plan(driver, desired), []);

    // 2. hand-edited owned rule: another port, same comment
    let lines = chainLines(await driver.save(), 'nat', CHAINS.nat);
    const idx = lines.indexOf(`-A ${CHAINS.nat} ${bob.spec}`) + 1;
    const edited = bob.spec.replace(':10002', ':10009');
    await iptables(['-t', 'nat', '-R', CHAINS.nat, String(idx), ...tokenizeRuleSpec(edited)]);
    actions = await plan(driver, desired);
    t.deepEqual(actions, [
      { type: 'delete-rule', table: 'nat', chain: CHAINS.nat, spec: edited, kind: 'user', reason: 'changed', userId: 'bob', port: 10009 },
      { type: 'append-rule', table: 'nat', chain: CHAINS.nat, spec: bob.spec, kind: 'user', userId: 'bob', port: 10002 },
    ]);
    t.deepEqual(actions.map(describeAction), [
      'delete nat/POLYDEV-PROXY rule for user bob (port 10009) (differs from desired)',
      'add nat/POLYDEV-PROXY rule for user bob (port 10002)',
    ]);
    await apply(driver, actions);
    t.deepEqual(await plan(driver, desired), []);
    lines = chainLines(await driver.save(), 'nat', CHAINS.nat);
    t.false(lines.some((l) => l.includes(':10009')));

    // 3. duplicated jump
    const pre = want.jumps.find((j) => j.from === 'PREROUTING')!;
    await iptables(['-t', 'nat', '-I', 'PREROUTING', '1', ...tokenizeRuleSpec(pre.spec)]);
    actions = await plan(driver, desired);
    t.deepEqual(actions, [{ type: 'delete-jump', table: 'nat', chain: 'PREROUTING', target: CHAINS.nat, spec: pre.spec, reason: 'duplicate' }]);
    await apply(driver, actions);
    t.deepEqual(chainLines(await driver.save(), 'nat', 'PREROUTING'), [`-A PREROUTING ${pre.spec}`]);

    // 4. removed jump
    const fwd = want.jumps.find((j) => j.from === 'FORWARD')!;
    await iptables(['-t', 'filter', '-A', 'FORWARD', '-s', '10.9.0.0/16', '-j', 'ACCEPT']);
    await iptables(['-t', 'filter', '-D', 'FORWARD', ...tokenizeRuleSpec(fwd.spec)]);
    actions = await plan(driver, desired);
    t.deepEqual(actions, [{ type: 'insert-jump', table: 'filter', chain: 'FORWARD', target: CHAINS.filter, spec: fwd.spec }]);
    await apply(driver, actions);
    t.is(chainLines(await driver.save(), 'filter', 'FORWARD')[0], `-A FORWARD ${fwd.spec}`, 're-inserted at position 1');
    t.deepEqual(await plan(driver, desired), []);

    // 5. flushed chain (the classic drift) and ip_forward turned off
    await iptables(['-t', 'nat', '-F', CHAINS.nat]);
    await driver.setIpForward(false);
    actions = await plan(driver, desired);
    t.is(actions.filter((a) => a.type === 'append-rule').length, 3);
    t.deepEqual(sysctlActions(actions), [{ type: 'set-ip-forward', value: true }]);
    await apply(driver, actions);
    t.deepEqual(await plan(driver, desired), []);
  });

  test(`${backend}: user removed deletes only their rule; upstream change replaces every user rule`, async (t) => {
    const { driver } = await setup(t, backend);
    const desired = ruleSet();
    await converge(driver, desired);
    const old = renderDesiredPoolRules(desired);

    const withoutBob = ruleSet({ ports: desired.ports.filter((p) => p.userId !== 'bob') });
    let actions = await plan(driver, withoutBob);
    t.deepEqual(actions, [
      {
        type: 'delete-rule', table: 'nat', chain: CHAINS.nat, kind: 'user', reason: 'removed', userId: 'bob', port: 10002,
        spec: old.rules.nat.find((r) => r.userId === 'bob')!.spec,
      },
    ]);
    t.is(describeAction(actions[0]!), 'delete nat/POLYDEV-PROXY rule for user bob (port 10002) (no longer desired)');
    await apply(driver, actions);
    t.deepEqual(await plan(driver, withoutBob), []);
    const lines = chainLines(await driver.save(), 'nat', CHAINS.nat);
    t.deepEqual(lines, old.rules.nat.filter((r) => r.userId !== 'bob').map((r) => `-A ${CHAINS.nat} ${r.spec}`));

    const moved = ruleSet({ upstreamIP: '10.99.0.7', ipForward: true });
    actions = await plan(driver, moved);
    const userDeletes = actions.filter((a) => a.type === 'delete-rule' && a.kind === 'user');
    const userAdds = actions.filter((a) => a.type === 'append-rule' && a.kind === 'user');
    t.deepEqual(userDeletes.map((a) => (a.type === 'delete-rule' ? `${a.userId}:${a.reason}` : '')).sort(), ['alice:changed', 'carol@example.com:changed']);
    t.deepEqual(userAdds.map((a) => ('userId' in a ? a.userId : '')).sort(), ['alice', 'bob', 'carol@example.com']);
    t.is(actions.filter((a) => a.type === 'delete-rule').length, 2 + 1 + 2, 'users + masquerade + 2 forward');
    t.false(actions.some((a) => a.type === 'insert-jump' || a.type === 'delete-jump' || a.type === 'create-chain'));
    await apply(driver, actions);
    const { text, observed } = await observe(driver);
    t.deepEqual(planPoolRules(moved, observed), []);
    t.false(text.includes('10.99.0.1'), 'nothing points to the old upstream');
    t.is(observed.chains.nat.rules.length, 3);
  });

  test(`${backend}: teardown removes exactly our chains and jumps`, async (t) => {
    const { driver, iptables } = await setup(t, backend);
    await iptables(['-t', 'nat', '-A', 'POSTROUTING', '-s', '10.3.0.0/16', '-j', 'MASQUERADE']);
    await iptables(['-t', 'filter', '-A', 'FORWARD', '-p', 'icmp', '-j', 'ACCEPT']);
    const strip = (s: string) => s.split('\n').filter((l) => l.startsWith('-A') || (l.startsWith(':') && l.includes(' - ')));
    const before = strip(await driver.save());
    await converge(driver, ruleSet());
    // Stale extras we also own: a jump from the wrong chain, a duplicate jump.
    await iptables(['-t', 'filter', '-A', 'INPUT', ...tokenizeRuleSpec(renderJumpRule('egress', CHAINS.filter))]);
    await iptables(['-t', 'nat', '-A', 'OUTPUT', ...tokenizeRuleSpec(renderJumpRule('egress', CHAINS.nat))]);
    const { observed } = await observe(driver);
    const actions = planPoolTeardown(CHAINS, observed);
    t.is(actions.filter((a) => a.type === 'delete-jump').length, 6);
    t.deepEqual(actions.filter((a) => a.type === 'flush-chain' || a.type === 'delete-chain').map(describeAction), [
      'flush chain nat/POLYDEV-PROXY (3 rules)',
      'delete chain nat/POLYDEV-PROXY',
      'flush chain nat/POLYDEV-PROXY-MASQ (1 rule)',
      'delete chain nat/POLYDEV-PROXY-MASQ',
      'flush chain filter/POLYDEV-PROXY-FWD (2 rules)',
      'delete chain filter/POLYDEV-PROXY-FWD',
    ]);
    await apply(driver, actions);
    t.deepEqual(strip(await driver.save()), before);
    t.true(await driver.getIpForward(), 'ip_forward left as it is');
  });

  test(`${backend}: DNAT really forwards: 127.0.0.11 -> 127.0.0.1:80 reaches the upstream on :10001`, async (t) => {
    const { ns, driver } = await setup(t, backend, ['127.0.0.11/8']);
    const ip = findExecutable('ip')!;
    const listenerScript = `
      const net = require('node:net');
      const srv = net.createServer((c) => c.end('upstream:' + c.localPort + '\\n'));
      srv.listen(10001, '127.0.0.1', () => process.stdout.write('ready\\n'));`;
    const child = spawn(ip, ['netns', 'exec', ns.name, process.execPath, '-e', listenerScript], { stdio: ['ignore', 'pipe', 'pipe'] });
    const kill = () => {
      if (child.pid !== undefined && child.exitCode === null && child.signalCode === null) process.kill(child.pid, 'SIGKILL');
    };
    t.teardown(kill);
    await new Promise<void>((resolve, reject) => {
      // Hang guard: a node start in the namespace, 5-20x slower under the suite's load.
      const timer = setTimeout(() => reject(new Error('listener did not start')), 30_000);
      let buf = '';
      child.stdout.on('data', (b: Buffer) => {
        buf += b.toString();
        if (buf.includes('ready')) {
          clearTimeout(timer);
          resolve();
        }
      });
      child.on('exit', (code) => reject(new Error(`listener exited with ${code}`)));
    });

    const connect = async (from: string, to = '127.0.0.1', port = 80): Promise<string> => {
      const script = `
        const net = require('node:net');
        const s = net.connect({ host: ${JSON.stringify(to)}, port: ${port}, localAddress: ${JSON.stringify(from)} });
        let data = '';
        s.setTimeout(20000, () => { console.log('ERR timeout'); process.exit(0); });
        s.on('data', (d) => { data += d; });
        s.on('end', () => { console.log('OK ' + data.trim()); process.exit(0); });
        s.on('error', (e) => { console.log('ERR ' + e.code); process.exit(0); });`;
      // Every expected outcome is immediate (refused, or the upstream's answer); 'ERR timeout' fails the
      // test anyway, so the socket timeout and the exec's kill timer are hang guards for a starved node
      // start and a starved listener on a loaded machine.
      return (await ns.exec(process.execPath, ['-e', script], { timeoutMs: 60_000 })).stdout.trim();
    };

    t.is(await connect('127.0.0.11'), 'ERR ECONNREFUSED', 'nothing listens on :80 before the rules');
    t.is(await connect('127.0.0.11', '127.0.0.1', 10001), 'OK upstream:10001', 'the upstream itself answers');

    const desired = ruleSet({
      upstreamIP: '127.0.0.1',
      destinationPorts: [80],
      ports: [{ userId: 'alice', sourceIP: '127.0.0.11', port: 10001 }],
    });
    await converge(driver, desired);
    t.deepEqual(await plan(driver, desired), []);

    t.is(await connect('127.0.0.11'), 'OK upstream:10001', 'DNATed in nat OUTPUT to the upstream port');
    t.is(await connect('127.0.0.11', '127.0.0.2'), 'OK upstream:10001', 'any destination address on port 80');
    t.is(await connect('127.0.0.1'), 'ERR ECONNREFUSED', 'other sources are not redirected');

    const { observed } = await observe(driver);
    await apply(driver, planPoolTeardown(CHAINS, observed));
    t.is(await connect('127.0.0.11'), 'ERR ECONNREFUSED', 'teardown stops the redirection');
    kill();
  });

  test.serial(`${backend}: 10,000 users converge in one restore and then plan nothing`, async (t) => {
    const { driver } = await setup(t, backend);
    const N = 10_000;
    const ports = Array.from({ length: N }, (_, i) => ({
      userId: `user-${String(i).padStart(5, '0')}`,
      sourceIP: `10.${(i >> 16) & 255}.${(i >> 8) & 255}.${i & 255}`,
      port: 10001 + i,
    }));
    const desired = ruleSet({ portRange: { min: 10001, max: 10000 + N }, ports, ipForward: false });
    const times: Record<string, number> = {};
    const time = async <T>(label: string, fn: () => T | Promise<T>): Promise<T> => {
      const t0 = performance.now();
      const r = await fn();
      times[label] = Math.round((performance.now() - t0) * 10) / 10;
      return r;
    };

    const text0 = await time('save (empty)', () => driver.save());
    const obs0 = await time('parse+observe (empty)', () => observePool(parseIptablesSave(text0), CHAINS, false));
    const actions = await time('plan (from empty)', () => planPoolRules(desired, obs0));
    const payload = await time('render payload', () => renderRestorePayload(actions));
    await time('restore (10k adds)', () => driver.restore(payload));
    t.is(driver.stats.restores, 1);

    const text1 = await time('save (10k)', () => driver.save());
    const saved1 = await time('parse (10k)', () => parseIptablesSave(text1));
    const obs1 = await time('observe (10k)', () => observePool(saved1, CHAINS, true));
    const again = await time('plan (10k, converged)', () => planPoolRules(desired, obs1));
    t.deepEqual(again, []);
    t.is(obs1.chains.nat.owned.length, N);
    t.is((await time('programmedUsers (10k)', () => programmedUsers(desired, obs1))).size, N);

    // One user changes port: one delete and one add in a chain of 10,000.
    const changed = { ...desired, ports: desired.ports.map((p, i) => (i === 5000 ? { ...p, port: 10000 + N } : p)) };
    changed.ports[N - 1] = { ...changed.ports[N - 1]!, port: 10001 + 5000 };
    const delta = planPoolRules(changed, obs1);
    t.is(delta.length, 4);
    await time('restore (4 changes in 10k)', () => driver.restore(renderRestorePayload(delta)));
    t.deepEqual(await plan(driver, changed), []);

    const obs2 = (await observe(driver)).observed;
    const down = planPoolTeardown(CHAINS, obs2);
    await time('restore (teardown of 10k)', () => driver.restore(renderRestorePayload(down)));
    t.false((await driver.save()).includes('polydev:'));
    t.log(`${backend} timings (ms): ${JSON.stringify(times)}; payload ${(payload.length / 1024).toFixed(0)} KiB, save ${(text1.length / 1024).toFixed(0)} KiB`);
  });
}
