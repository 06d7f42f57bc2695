// The CLI's pure parts: the duration formatter, the problem formatter, grouping of plan lines,
// the config lookup order, the kinds snapshot, and empty YAML documents in desired state.

import test from 'ava';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { checkoutRoot, findConfigFile } from '../src/cli/config-file.js';
import { crdDigest, readKindNames, renderKindsSnapshot } from '../src/cli/kinds.js';
import { groupLines } from '../src/cli/output.js';
import { createValidator } from '../src/controllers/registry.js';
import { loadKinds } from '../src/desired/kinds.js';
import { formatProblem } from '../src/desired/validate.js';
import { formatDuration, parseDuration } from '../src/util/duration.js';
import { requireCurrentBuild } from './helpers/build.js';
import { REPO_ROOT, tempDir } from './helpers/unit-fixtures.js';

// ---- durations ---------------------------------------------------------------------

test('formatDuration: people\'s units, zero parts left out, remainders cut', (t) => {
  const cases: Array<[number, string]> = [
    [0, '0ms'],
    [0.25, '0.3ms'],
    [2.5, '2.5ms'],
    [12.4, '12ms'],
    [750, '750ms'],
    [999.4, '999ms'],
    [999.6, '1s'],
    [1000, '1s'],
    [1500, '1.5s'],
    [9_999, '9.9s'],
    [10_000, '10s'],
    [59_999, '59s'],
    [60_000, '1m'],
    [204_800, '3m24s'],
    [300_000, '5m'],
    [3_600_000, '1h'],
    [5_400_000, '1h30m'],
    [3_725_000, '1h2m5s'],
    [93_600_000, '26h'],
    [-1500, '-1.5s'],
  ];
  for (const [ms, text] of cases) t.is(formatDuration(ms), text, `${ms} ms`);
});

test('formatDuration writes what parseDuration reads (to within the cut remainder)', (t) => {
  for (const ms of [1, 750, 1000, 1500, 42_000, 204_800, 3_600_000, 5_400_000, 86_400_000 + 61_000]) {
    const back = parseDuration(formatDuration(ms));
    t.true(back <= ms && ms - back < 1000, `${ms} → ${formatDuration(ms)} → ${back}`);
  }
});

// ---- problems ----------------------------------------------------------------------

test('formatProblem leaves out the parts it does not know, never a placeholder', (t) => {
  const full = { file: 'a.yaml', line: 3, col: 5, resource: 'ProxyPort/alice', field: 'spec.port', message: 'bad' };
  t.is(formatProblem(full), 'a.yaml:3:5: ProxyPort/alice: spec.port: bad');
  t.is(formatProblem({ ...full, line: 0, col: 0, resource: '-', field: '-', message: 'cannot read: no such file or directory' }), 'a.yaml: cannot read: no such file or directory');
  t.is(formatProblem({ ...full, resource: '-', field: '-' }), 'a.yaml:3:5: bad');
  t.is(formatProblem({ ...full, resource: '-/-', field: '-' }), 'a.yaml:3:5: bad');
  t.is(formatProblem({ ...full, resource: 'ProxyPort/-', field: 'metadata.name' }), 'a.yaml:3:5: ProxyPort: metadata.name: bad');
  t.is(formatProblem({ ...full, resource: '-/alice', field: 'kind' }), 'a.yaml:3:5: alice: kind: bad');
  t.is(formatProblem({ file: '-', line: 0, col: 0, resource: 'ProxyPort', field: '-', message: 'prune would delete' }), 'ProxyPort: prune would delete');
});

test('a missing file is one plain problem: the file and "no such file or directory"', (t) => {
  const missing = path.join(tempDir(t), 'nope.yaml');
  const { problems } = createValidator().loadPath(missing);
  t.deepEqual(problems.map(formatProblem), [`${missing}: cannot read: no such file or directory`]);
});

// ---- empty documents -----------------------------------------------------------------

const POOL = 'apiVersion: polydev.ai/v1alpha1\nkind: ProxyPool\nmetadata:\n  name: default\nspec:\n  portRange: {min: 10001, max: 10010}\n  upstream: {host: 127.0.0.1}\n';
const PORT = 'apiVersion: polydev.ai/v1alpha1\nkind: ProxyPort\nmetadata:\n  name: alice\nspec:\n  userId: alice\n  sourceIP: 10.0.0.1\n';

test('empty documents are skipped as kubectl skips them: a trailing ---, two in a row, comment-only ones', (t) => {
  const dir = tempDir(t);
  const texts = {
    'trailing.yaml': `${POOL}---\n`,
    'leading-and-double.yaml': `---\n# just a comment\n---\n---\n${PORT}---\n# trailing comment only\n`,
  };
  for (const [f, text] of Object.entries(texts)) fs.writeFileSync(path.join(dir, f), text);
  const { problems, resources } = createValidator().loadPath(dir);
  t.deepEqual(problems.map(formatProblem), []);
  t.deepEqual(resources.map((r) => `${r.kind}/${r.name}`).sort(), ['ProxyPool/default', 'ProxyPort/alice']);
});

test('an explicit null document is not empty: still an error, at its line', (t) => {
  const file = path.join(tempDir(t), 'null.yaml');
  fs.writeFileSync(file, `${POOL}--- ~\n`);
  const { problems } = createValidator().loadPath(file);
  t.deepEqual(problems.map(formatProblem), [`${file}:8:5: a resource must be a mapping with apiVersion, kind, metadata and spec`]);
});

// ---- plan lines ----------------------------------------------------------------------

test('groupLines: identical lines once, counted, in order of first appearance', (t) => {
  t.deepEqual(groupLines(['start', 'remove a', 'start', 'start', 'remove b']), [
    { line: 'start', count: 3 },
    { line: 'remove a', count: 1 },
    { line: 'remove b', count: 1 },
  ]);
  t.deepEqual(groupLines([]), []);
});

// ---- config lookup -------------------------------------------------------------------

/** A fake project tree: package.json named as given, optionally src/main.ts and the demo config. */
function fakeTree(root: string, opts: { name?: string; sources?: boolean; demo?: boolean; running?: boolean }): void {
  fs.mkdirSync(path.join(root, 'dist', 'src', 'cli'), { recursive: true });
  fs.writeFileSync(path.join(root, 'package.json'), JSON.stringify({ name: opts.name ?? 'polydev-reconciler' }));
  if (opts.sources) {
    fs.mkdirSync(path.join(root, 'src'), { recursive: true });
    fs.writeFileSync(path.join(root, 'src', 'main.ts'), '');
  }
  if (opts.demo) {
    fs.mkdirSync(path.join(root, 'manifests', 'config'), { recursive: true });
    fs.writeFileSync(path.join(root, 'manifests', 'config', 'polydev-reconciler.yaml'), 'database: ../../var/polydev.db\n');
  }
  if (opts.running) {
    fs.mkdirSync(path.join(root, 'var', 'demo'), { recursive: true });
    fs.writeFileSync(path.join(root, 'var', 'demo', 'polydev-reconciler.yaml'), `database: ${path.join(root, 'var', 'polydev.db')}\n`);
  }
}

test('config lookup: --config, then POLYDEV_CONFIG, then /etc, then the checkout\'s running demo, its demo config, then none', (t) => {
  const dir = tempDir(t);
  const checkout = path.join(dir, 'checkout');
  fakeTree(checkout, { sources: true, demo: true, running: true });
  const from = path.join(checkout, 'dist', 'src', 'cli');
  const etcFile = path.join(dir, 'etc.yaml');
  const demo = path.join(checkout, 'manifests', 'config', 'polydev-reconciler.yaml');
  const running = path.join(checkout, 'var', 'demo', 'polydev-reconciler.yaml');

  t.deepEqual(findConfigFile({ from, etcFile, env: {} }), { file: running, origin: 'demo' });
  // The demo removes its generated config when it stops: then the base config.
  fs.rmSync(running);
  t.deepEqual(findConfigFile({ from, etcFile, env: {} }), { file: demo, origin: 'checkout' });
  fs.writeFileSync(etcFile, '');
  t.deepEqual(findConfigFile({ from, etcFile, env: {} }), { file: etcFile, origin: 'etc' });
  t.deepEqual(findConfigFile({ from, etcFile, env: { POLYDEV_CONFIG: 'rel/env.yaml' } }), { file: path.resolve('rel/env.yaml'), origin: 'POLYDEV_CONFIG' });
  t.deepEqual(findConfigFile({ from, etcFile, env: { POLYDEV_CONFIG: '/x/env.yaml' }, flag: '/x/flag.yaml' }), { file: '/x/flag.yaml', origin: '--config' });
  // An empty variable or flag counts as unset.
  t.deepEqual(findConfigFile({ from, etcFile, env: { POLYDEV_CONFIG: '' }, flag: '' }), { file: etcFile, origin: 'etc' });
  // A path through a file (ENOTDIR) is as absent as a missing one.
  t.deepEqual(findConfigFile({ from, etcFile: path.join(etcFile, 'x'), env: {} }), { file: demo, origin: 'checkout' });
  fs.rmSync(etcFile);
  fs.rmSync(demo);
  t.deepEqual(findConfigFile({ from, etcFile, env: {} }), { file: undefined, origin: 'none' });
});

test('a system config the user may not read is still the one found (loading it then says why), not skipped for defaults', async (t) => {
  const setpriv = ['/usr/bin/setpriv', '/bin/setpriv'].find((f) => fs.existsSync(f));
  if (process.getuid?.() !== 0 || !setpriv) return t.pass('needs root and setpriv to act as another user');
  requireCurrentBuild();
  const dir = tempDir(t);
  fs.chmodSync(dir, 0o755);
  const locked = path.join(dir, 'etc-polydev');
  fs.mkdirSync(locked, { mode: 0o700 });
  const etcFile = path.join(locked, 'polydev-reconciler.yaml');
  fs.writeFileSync(etcFile, 'database: /var/lib/polydev/polydev.db\n');
  // A copy the other user can read: a checkout under /root (0700) is not readable by it. The module
  // imports only node: built-ins, so it runs on its own.
  const module = path.join(dir, 'config-file.mjs');
  fs.copyFileSync(path.join(REPO_ROOT, 'dist', 'src', 'cli', 'config-file.js'), module);
  fs.chmodSync(module, 0o644);
  const script = `import(${JSON.stringify(module)}).then((m) => console.log(JSON.stringify(m.findConfigFile({ etcFile: ${JSON.stringify(etcFile)}, from: '/', env: {} }))))`;
  const r = spawnSync(setpriv, ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, '-e', script], { encoding: 'utf8', timeout: 60_000 });
  t.is(r.status, 0, r.stderr);
  t.deepEqual(JSON.parse(r.stdout) as unknown, { file: etcFile, origin: 'etc' });
});

test('a checkout is found from the CLI\'s own location; an installed copy (no sources) or another package is not one', (t) => {
  const dir = tempDir(t);
  const checkout = path.join(dir, 'checkout');
  fakeTree(checkout, { sources: true, demo: true });
  t.is(checkoutRoot(path.join(checkout, 'dist', 'src', 'cli')), checkout);
  const installed = path.join(dir, 'opt');
  fakeTree(installed, { sources: false, demo: true });
  t.is(checkoutRoot(path.join(installed, 'dist', 'src', 'cli')), undefined);
  t.deepEqual(findConfigFile({ from: path.join(installed, 'dist', 'src', 'cli'), etcFile: path.join(dir, 'none'), env: {} }), { file: undefined, origin: 'none' });
  const other = path.join(dir, 'other');
  fakeTree(other, { name: 'something-else', sources: true, demo: true });
  t.is(checkoutRoot(path.join(other, 'dist', 'src', 'cli')), undefined);
  // This very checkout: the tests run from src/.
  t.is(checkoutRoot(path.join(REPO_ROOT, 'src', 'cli')), REPO_ROOT);
});

// ---- kinds snapshot ------------------------------------------------------------------

test('src/cli/kinds-snapshot.ts is current (else: npx tsx scripts/gen-cli-kinds.ts)', (t) => {
  const crdDir = path.join(REPO_ROOT, 'crds');
  const expected = renderKindsSnapshot(loadKinds(crdDir).values(), crdDigest(crdDir));
  t.is(fs.readFileSync(path.join(REPO_ROOT, 'src', 'cli', 'kinds-snapshot.ts'), 'utf8'), expected, 'run npx tsx scripts/gen-cli-kinds.ts');
});

test('the kinds the CLI reads match the CRDs; an edited CRD is read from the CRDs, not the stale snapshot', async (t) => {
  const fromSnapshot = await readKindNames();
  const fromCrds = loadKinds();
  t.deepEqual([...fromSnapshot.keys()].sort(), [...fromCrds.keys()].sort());
  for (const [kind, info] of fromCrds) {
    const names = fromSnapshot.get(kind)!;
    t.deepEqual([names.plural, names.singular, names.shortNames], [info.plural, info.singular, info.shortNames], kind);
    t.deepEqual(names.printerColumns.map((c) => c.jsonPath), info.printerColumns.map((c) => c.jsonPath), kind);
  }
  const edited = path.join(tempDir(t), 'crds');
  fs.cpSync(path.join(REPO_ROOT, 'crds'), edited, { recursive: true });
  const file = path.join(edited, 'proxyport.yaml');
  const text = fs.readFileSync(file, 'utf8');
  t.true(text.includes('shortNames: [pport]'));
  fs.writeFileSync(file, text.replace('shortNames: [pport]', 'shortNames: [pport, ppzz]'));
  const read = await readKindNames(edited);
  t.true(read.get('ProxyPort')!.shortNames.includes('ppzz'), JSON.stringify(read.get('ProxyPort')!.shortNames));
});
