// Desired-state validation (src/desired/validate.ts, kinds.ts, cel-rules.ts and the ProxyPool /
// ProxyPort cross-document checks): every problem of a directory in one run, each with the
// FILE:LINE:COL of what is wrong.

import test from 'ava';
import fs from 'node:fs';
import path from 'node:path';
import { CEL_RULES, celRulesIn, checkCelRules } from '../src/desired/cel-rules.js';
import { loadKinds, resolveKindName } from '../src/desired/kinds.js';
import { formatProblem, MAX_FILE_BYTES, type Problem } from '../src/desired/validate.js';
import { cli, EXAMPLES_DIR, poolYaml, portYaml, docs, tempDir, validator, writeFiles } from './helpers/unit-fixtures.js';

/** 1-based line of the only line of text containing needle, and the column of token in it. */
function pos(text: string, needle: string, token = needle): { line: number; col: number } {
  const lines = text.split('\n');
  const hits = lines.map((l, i) => (l.includes(needle) ? i : -1)).filter((i) => i >= 0);
  if (hits.length !== 1) throw new Error(`test bug: ${JSON.stringify(needle)} is on ${hits.length} lines`);
  const line = hits[0]!;
  const col = lines[line]!.indexOf(token);
  if (col < 0) throw new Error(`test bug: ${JSON.stringify(token)} not in line ${JSON.stringify(lines[line])}`);
  return { line: line + 1, col: col + 1 };
}

interface Expect {
  file: string;
  at: { line: number; col: number } | { lines: number[] };
  resource: string;
  field: string;
  message: RegExp;
}

/** Finds the one problem matching file/resource/field/message and checks its position. */
function expectProblem(t: import('ava').ExecutionContext, problems: Problem[], e: Expect): void {
  const matches = problems.filter(
    (p) => p.file === e.file && p.resource === e.resource && p.field === e.field && e.message.test(p.message),
  );
  const label = `${path.basename(e.file)} ${e.resource} ${e.field} ${e.message}`;
  if (matches.length !== 1) {
    t.fail(`${label}: expected one problem, found ${matches.length} among:\n${problems.map(formatProblem).join('\n')}`);
    return;
  }
  const p = matches[0]!;
  if ('lines' in e.at) t.true(e.at.lines.includes(p.line), `${label}: line ${p.line} not in ${e.at.lines.join(', ')}`);
  else t.deepEqual({ line: p.line, col: p.col }, e.at, label);
}

// ---- one directory, every kind of mistake ------------------------------------------

const KINDS_YAML = `# unknown kind, unknown fields, wrong types
apiVersion: polydev.ai/v1alpha1
kind: Frobnicator
metadata:
  name: thing
spec: {}
---
apiVersion: polydev.ai/v1alpha1
kind: ProxyPool
metadata:
  name: typo-pool
spex: {}
spec:
  upstream:
    host: 127.0.0.1
    colour: blue
  destinationPorts: 80
  chains:
    nat: TYPO-NAT
    postrouting: TYPO-MASQ
    filter: TYPO-FWD
`;

const PORTS_YAML = `apiVersion: polydev.ai/v1alpha1
kind: ProxyPort
metadata:
  name: Bad_Name
spec:
  userId: "a b"
  sourceIP: 10.0.0.300
  port: 70000
  pool: other
---
apiVersion: polydev.ai/v1alpha1
kind: ProxyPort
metadata:
  name: injection
spec:
  userId: 'x"; iptables -F'
  sourceIP: "1.2.3.4; rm -rf /"
  port: "80"
  pool: other
---
apiVersion: polydev.ai/v1alpha1
kind: ProxyPort
metadata:
  name: ipv6
spec:
  userId: carol
  sourceIP: "::1"
  pool: other
---
apiVersion: polydev.ai/v1alpha1
kind: ProxyPort
metadata:
  name: no-source
spec:
  userId: dave
  pool: other
`;

const CEL_YAML = `apiVersion: polydev.ai/v1alpha1
kind: ProxyPool
metadata:
  name: cel
spec:
  portRange:
    min: 20000
    max: 10000
  upstream:
    host: 127.0.0.1
  healthCheck:
    url: https://example.com/ip
    mode: forward
  chains:
    nat: CEL-NAT
    postrouting: CEL-MASQ
    filter: CEL-FWD
`;

const SYNTAX_YAML = `apiVersion: polydev.ai/v1alpha1
kind: ProxyPort
metadata:
  name: fine-before-syntax
spec:
  userId: fine
  sourceIP: 10.9.0.1
  pool: other
---
apiVersion: polydev.ai/v1alpha1
kind: ProxyPort
metadata:
  name: broken
spec:
  userId: erin: frank
  sourceIP: 10.9.0.2
`;

/** Pool `default` (range 10001-10010) and ports that break the cross-document rules. */
const CROSS_POOL = poolYaml('default', { min: 10001, max: 10010 });
const CROSS_PORTS = docs(
  portYaml('alice', { userId: 'alice', sourceIP: '10.1.0.1', port: 10001 }),
  portYaml('alice-again', { userId: 'alice', sourceIP: '10.1.0.2' }),
  portYaml('bob', { userId: 'bob', sourceIP: '10.1.0.1' }),
  portYaml('carol', { userId: 'carol', sourceIP: '10.1.0.3', port: 10001 }),
  portYaml('dave', { userId: 'dave', sourceIP: '10.1.0.4', port: 15000 }),
);
/** A second pool stealing the default pool's nat chain. */
const CHAIN_THIEF = `apiVersion: polydev.ai/v1alpha1
kind: ProxyPool
metadata:
  name: thief
spec:
  portRange:
    min: 30001
    max: 30010
  upstream:
    host: 127.0.0.1
  chains:
    nat: POLYDEV-PROXY
    postrouting: THIEF-MASQ
    filter: THIEF-FWD
`;

const DUP_A = portYaml('dup', { userId: 'dup-one', sourceIP: '10.2.0.1', pool: 'other' });
const DUP_B = `# the same ProxyPort again, in another file
${portYaml('dup', { userId: 'dup-two', sourceIP: '10.2.0.2', pool: 'other' })}`;

function badDir(t: import('ava').ExecutionContext): { dir: string; files: Record<string, string> } {
  const dir = tempDir(t);
  const names = {
    kinds: '10-kinds.yaml',
    ports: '20-ports.yaml',
    cel: '30-cel.yaml',
    syntax: '40-syntax.yaml',
    empty: '50-empty.yaml',
    comments: '51-comments.yml',
    big: '60-big.yaml',
    crossPool: '70-pool.yaml',
    crossPorts: '71-ports.yaml',
    thief: '72-thief.yaml',
    dupA: '80-dup-a.yaml',
    dupB: '81-dup-b.yaml',
  };
  writeFiles(dir, {
    [names.kinds]: KINDS_YAML,
    [names.ports]: PORTS_YAML,
    [names.cel]: CEL_YAML,
    [names.syntax]: SYNTAX_YAML,
    [names.empty]: '',
    [names.comments]: '# only a comment\n---\n\n',
    [names.crossPool]: CROSS_POOL,
    [names.crossPorts]: CROSS_PORTS,
    [names.thief]: CHAIN_THIEF,
    [names.dupA]: DUP_A,
    [names.dupB]: DUP_B,
    'ignored.txt': 'not yaml at all: [',
    '.hidden.yaml': 'kind: [',
  });
  // ~10 MB of otherwise valid YAML: refused by size before it is parsed.
  const doc = portYaml('big', { userId: 'big', sourceIP: '10.3.0.1', pool: 'other' }) + '---\n';
  fs.writeFileSync(path.join(dir, names.big), doc.repeat(Math.ceil((10 * 1024 * 1024) / doc.length)));
  const full = Object.fromEntries(Object.entries(names).map(([k, v]) => [k, path.join(dir, v)]));
  return { dir, files: full };
}

test('validate reports every problem of a directory in one run, each at its FILE:LINE:COL', (t) => {
  const { dir, files } = badDir(t);
  const { problems, resources, files: loaded } = validator().loadPath(dir);
  t.false(loaded.some((f) => f.endsWith('ignored.txt') || f.endsWith('.hidden.yaml')), 'only visible *.yaml / *.yml files are read');
  t.is(loaded.length, 12);

  const k = files.kinds!;
  expectProblem(t, problems, { file: k, at: pos(KINDS_YAML, 'kind: Frobnicator', 'Frobnicator'), resource: 'Frobnicator/thing', field: 'kind', message: /unknown kind "Frobnicator" \(known: .*ProxyPool/ });
  expectProblem(t, problems, { file: k, at: pos(KINDS_YAML, 'spex:'), resource: 'ProxyPool/typo-pool', field: 'spex', message: /unknown field "spex"/ });
  expectProblem(t, problems, { file: k, at: pos(KINDS_YAML, 'colour: blue', 'colour'), resource: 'ProxyPool/typo-pool', field: 'spec.upstream.colour', message: /unknown field "colour"/ });
  expectProblem(t, problems, { file: k, at: pos(KINDS_YAML, 'destinationPorts: 80', '80'), resource: 'ProxyPool/typo-pool', field: 'spec.destinationPorts', message: /must be array/ });

  const p = files.ports!;
  expectProblem(t, problems, { file: p, at: pos(PORTS_YAML, 'name: Bad_Name', 'Bad_Name'), resource: 'ProxyPort/Bad_Name', field: 'metadata.name', message: /DNS-1123/ });
  expectProblem(t, problems, { file: p, at: pos(PORTS_YAML, 'userId: "a b"', '"a b"'), resource: 'ProxyPort/Bad_Name', field: 'spec.userId', message: /not allowed/ });
  expectProblem(t, problems, { file: p, at: pos(PORTS_YAML, '10.0.0.300'), resource: 'ProxyPort/Bad_Name', field: 'spec.sourceIP', message: /ipv4/ });
  expectProblem(t, problems, { file: p, at: pos(PORTS_YAML, 'port: 70000', '70000'), resource: 'ProxyPort/Bad_Name', field: 'spec.port', message: /65535/ });
  expectProblem(t, problems, { file: p, at: pos(PORTS_YAML, 'iptables -F', `'x"`), resource: 'ProxyPort/injection', field: 'spec.userId', message: /not allowed/ });
  expectProblem(t, problems, { file: p, at: pos(PORTS_YAML, 'rm -rf', '"1.2.3.4'), resource: 'ProxyPort/injection', field: 'spec.sourceIP', message: /ipv4/ });
  expectProblem(t, problems, { file: p, at: pos(PORTS_YAML, 'port: "80"', '"80"'), resource: 'ProxyPort/injection', field: 'spec.port', message: /must be integer/ });
  expectProblem(t, problems, { file: p, at: pos(PORTS_YAML, '"::1"'), resource: 'ProxyPort/ipv6', field: 'spec.sourceIP', message: /ipv4/ });
  // A missing field points at the mapping that lacks it.
  const noSource = pos(PORTS_YAML, 'userId: dave');
  expectProblem(t, problems, { file: p, at: { lines: [noSource.line - 1, noSource.line] }, resource: 'ProxyPort/no-source', field: 'spec.sourceIP', message: /required/ });

  const c = files.cel!;
  const range = pos(CEL_YAML, 'portRange:');
  expectProblem(t, problems, { file: c, at: { lines: [range.line, range.line + 1] }, resource: 'ProxyPool/cel', field: 'spec.portRange', message: /portRange.min must be less than or equal to portRange.max/ });
  const hc = pos(CEL_YAML, 'healthCheck:');
  expectProblem(t, problems, { file: c, at: { lines: [hc.line, hc.line + 1] }, resource: 'ProxyPool/cel', field: 'spec.healthCheck', message: /https health-check URLs need mode connect/ });

  const syntaxAt = pos(SYNTAX_YAML, 'userId: erin: frank');
  t.true(
    problems.some((x) => x.file === files.syntax && x.line === syntaxAt.line && /YAML syntax error/.test(x.message)),
    `a YAML syntax error is reported at line ${syntaxAt.line}`,
  );
  t.true(resources.some((r) => r.name === 'fine-before-syntax'), 'the valid document before the syntax error is still read');

  expectProblem(t, problems, { file: files.empty!, at: { line: 1, col: 1 }, resource: '-', field: '-', message: /empty/ });
  expectProblem(t, problems, { file: files.comments!, at: { line: 1, col: 1 }, resource: '-', field: '-', message: /empty/ });
  expectProblem(t, problems, { file: files.big!, at: { line: 1, col: 1 }, resource: '-', field: '-', message: new RegExp(`over the limit of ${MAX_FILE_BYTES} bytes`) });

  const cp = files.crossPorts!;
  expectProblem(t, problems, { file: cp, at: posInDoc(CROSS_PORTS, 'name: alice-again', 'userId: alice', 'alice'), resource: 'ProxyPort/alice-again', field: 'spec.userId', message: /user alice also has ProxyPort alice/ });
  expectProblem(t, problems, { file: cp, at: posInDoc(CROSS_PORTS, 'name: bob', 'sourceIP: 10.1.0.1', '10.1.0.1'), resource: 'ProxyPort/bob', field: 'spec.sourceIP', message: /sourceIP 10.1.0.1 is also used by ProxyPort alice/ });
  expectProblem(t, problems, { file: cp, at: posInDoc(CROSS_PORTS, 'name: carol', 'port: 10001', '10001'), resource: 'ProxyPort/carol', field: 'spec.port', message: /port 10001 is also requested by ProxyPort alice/ });
  expectProblem(t, problems, { file: cp, at: pos(CROSS_PORTS, 'port: 15000', '15000'), resource: 'ProxyPort/dave', field: 'spec.port', message: /port 15000 is outside ProxyPool default's range 10001-10010/ });

  expectProblem(t, problems, { file: files.thief!, at: pos(CHAIN_THIEF, 'nat: POLYDEV-PROXY', 'POLYDEV-PROXY'), resource: 'ProxyPool/thief', field: 'spec.chains.nat', message: /chain POLYDEV-PROXY is already owned by ProxyPool default/ });

  expectProblem(t, problems, {
    file: files.dupB!,
    at: pos(DUP_B, 'name: dup', 'dup'),
    resource: 'ProxyPort/dup',
    field: 'metadata.name',
    message: new RegExp(`duplicate ProxyPort/dup: also defined at ${escape(files.dupA!)}:1`),
  });

  // Nothing else: every problem above is reported once, and no valid document is blamed.
  const blamed = new Set(problems.map((x) => x.resource));
  for (const fine of ['ProxyPool/default', 'ProxyPort/alice', 'ProxyPort/fine-before-syntax']) t.false(blamed.has(fine), fine);
  for (const x of problems) {
    t.true(x.line >= 1 && x.col >= 1, `${formatProblem(x)} has a position`);
    t.true(fs.existsSync(x.file), `${formatProblem(x)} names a real file`);
  }
});

/** Position of `needle` (token) in the document that contains `docMarker`. */
function posInDoc(text: string, docMarker: string, needle: string, token: string): { line: number; col: number } {
  const docsText = text.split(/^---\n/m);
  let offset = 0;
  for (const d of docsText) {
    if (d.includes(docMarker)) {
      const p = pos(d, needle, token);
      return { line: p.line + offset, col: p.col };
    }
    offset += d.split('\n').length; // the document's lines plus its `---` separator
  }
  throw new Error(`test bug: no document with ${docMarker}`);
}

function escape(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

// (A regression test: with prettyErrors: false YAMLError.linePos is never set, and every syntax
// error used to be reported at the start of its document.)
test('a YAML syntax error is reported at its own line and column', (t) => {
  const dir = tempDir(t);
  const [file] = writeFiles(dir, { 'syntax.yaml': SYNTAX_YAML });
  const { problems } = validator().loadPath(file!);
  const syntax = problems.filter((p) => /YAML syntax error/.test(p.message));
  t.true(syntax.length >= 1, problems.map(formatProblem).join('\n'));
  const at = pos(SYNTAX_YAML, 'userId: erin: frank');
  t.deepEqual(
    syntax.map((p) => p.line),
    syntax.map(() => at.line),
    `expected line ${at.line}, got:\n${syntax.map(formatProblem).join('\n')}`,
  );
});

test('a duplicate key is a YAML error at the second key', (t) => {
  const dir = tempDir(t);
  const text = `apiVersion: polydev.ai/v1alpha1
kind: ProxyPort
metadata:
  name: twice
spec:
  userId: one
  userId: two
  sourceIP: 10.0.0.1
`;
  const [file] = writeFiles(dir, { 'dupkey.yaml': text });
  const { problems, resources } = validator().loadPath(file!);
  t.is(resources.length, 0);
  t.is(problems.length, 1, problems.map(formatProblem).join('\n'));
  t.deepEqual({ line: problems[0]!.line, col: problems[0]!.col }, pos(text, 'userId: two', 'userId'), formatProblem(problems[0]!));
});

// BUG (src/desired/validate.ts, locateLater): positions of cross-document problems come from a
// module-level cache of the last re-parsed file keyed by path only, so after the file is edited
// (the desired-state directory watcher re-validates the same paths) they point into the old text.
test('positions stay right when a file is edited and validated again', (t) => {
  const dir = tempDir(t);
  const body = docs(
    portYaml('first', { userId: 'same', sourceIP: '10.4.0.1', pool: 'other' }),
    portYaml('second', { userId: 'same', sourceIP: '10.4.0.2', pool: 'other' }),
  );
  const [file] = writeFiles(dir, { 'ports.yaml': body });
  const lineOf = (text: string) => posInDoc(text, 'name: second', 'userId: same', 'same').line;
  const v = validator();
  const before = v.loadPath(dir).problems;
  t.deepEqual(before.map((p) => p.line), [lineOf(body)]);

  const edited = '# three new lines\n# at the top\n# of the file\n' + body;
  fs.writeFileSync(file!, edited);
  const after = v.loadPath(dir).problems;
  t.is(after.length, 1);
  t.is(after[0]!.line, lineOf(body) + 3, formatProblem(after[0]!));
});

test('a file of exactly the size limit is read; one byte more is refused', (t) => {
  const dir = tempDir(t);
  const doc = poolYaml('default');
  const pad = (n: number) => doc + '#'.repeat(n - Buffer.byteLength(doc) - 1) + '\n';
  const [ok, over] = writeFiles(dir, { 'a.yaml': pad(MAX_FILE_BYTES), 'b.yaml': pad(MAX_FILE_BYTES + 1) });
  t.is(fs.statSync(ok!).size, MAX_FILE_BYTES);
  const r1 = validator().loadPath(ok!);
  t.deepEqual(r1.problems.map(formatProblem), []);
  t.is(r1.resources.length, 1);
  const r2 = validator().loadPath(over!);
  t.is(r2.problems.length, 1);
  t.regex(r2.problems[0]!.message, /over the limit/);
});

test('a path that does not exist is one problem, not an exception', (t) => {
  const dir = tempDir(t);
  const missing = path.join(dir, 'nope');
  const { problems, resources } = validator().loadPath(missing);
  t.is(resources.length, 0);
  t.is(problems.length, 1);
  t.is(problems[0]!.file, missing);
  t.regex(problems[0]!.message, /ENOENT|no such file/);
});

test('metadata and top-level mistakes: apiVersion, labels, missing spec, non-mapping documents', (t) => {
  const dir = tempDir(t);
  const text = `apiVersion: polydev.ai/v1
kind: ProxyPool
metadata:
  name: wrong-version
  labels:
    "bad key!": x
    good: "not ok value with spaces"
  colour: red
spec:
  upstream:
    host: 127.0.0.1
---
apiVersion: polydev.ai/v1alpha1
kind: ProxyPort
metadata:
  name: no-spec
---
- just
- a list
`;
  const [file] = writeFiles(dir, { 'm.yaml': text });
  const { problems } = validator().loadPath(file!);
  expectProblem(t, problems, { file: file!, at: { line: 1, col: 13 }, resource: 'ProxyPool/wrong-version', field: 'apiVersion', message: /apiVersion must be polydev.ai\/v1alpha1/ });
  expectProblem(t, problems, { file: file!, at: pos(text, '"bad key!"'), resource: 'ProxyPool/wrong-version', field: 'metadata.labels.bad key!', message: /invalid key/ });
  expectProblem(t, problems, { file: file!, at: pos(text, 'not ok value', '"not'), resource: 'ProxyPool/wrong-version', field: 'metadata.labels.good', message: /label values/ });
  expectProblem(t, problems, { file: file!, at: pos(text, 'colour: red', 'colour'), resource: 'ProxyPool/wrong-version', field: 'metadata.colour', message: /unknown field "colour"/ });
  expectProblem(t, problems, { file: file!, at: { line: pos(text, 'name: no-spec').line - 3, col: 1 }, resource: 'ProxyPort/no-spec', field: 'spec', message: /spec is required/ });
  expectProblem(t, problems, { file: file!, at: pos(text, '- just'), resource: '-', field: '-', message: /must be a mapping/ });
  t.is(problems.length, 6, problems.map(formatProblem).join('\n'));
});

// ---- CEL mirrors ------------------------------------------------------------------

test('every CEL rule in crds/ has a TypeScript mirror, and sits where the checker walks', (t) => {
  const kinds = loadKinds();
  t.true(kinds.size >= 5);
  const mirrored = new Set(Object.keys(CEL_RULES));
  let rules = 0;
  for (const info of kinds.values()) {
    for (const rule of celRulesIn(info.specSchema)) {
      rules++;
      t.true(mirrored.has(rule), `${path.basename(info.crdFile)}: ${rule} has no mirror in CEL_RULES`);
    }
    // checkCelRules only descends through properties and items: a rule anywhere else would never run.
    const unreachable: string[] = [];
    const walk = (s: unknown, where: string[], reachable: boolean) => {
      if (Array.isArray(s)) return s.forEach((x, i) => walk(x, [...where, String(i)], false));
      if (s === null || typeof s !== 'object') return;
      for (const [k, v] of Object.entries(s)) {
        if (k === 'x-kubernetes-validations') {
          if (!reachable) unreachable.push(where.join('.'));
        } else if (k === 'properties' && v && typeof v === 'object') {
          for (const [name, sub] of Object.entries(v)) walk(sub, [...where, name], reachable);
        } else if (k === 'items') walk(v, [...where, '[]'], reachable);
        else walk(v, [...where, k], false);
      }
    };
    walk(info.specSchema, ['spec'], true);
    t.deepEqual(unreachable, [], `${info.kind}: CEL rules the checker never evaluates`);
  }
  t.true(rules >= 10, `${rules} rules found`);
});

test('CEL mirrors: each rule accepts a valid value and rejects a violating one', (t) => {
  const pool = loadKinds().get('ProxyPool')!.specSchema;
  const base = { upstream: { host: '127.0.0.1' }, chains: { nat: 'A', postrouting: 'B', filter: 'C' }, portRange: { min: 1, max: 2 } };
  t.deepEqual(checkCelRules(pool, base, ['spec']), []);
  t.deepEqual(
    checkCelRules(pool, { ...base, chains: { nat: 'A', postrouting: 'A', filter: 'C' } }, ['spec']).map((v) => v.path.join('.')),
    ['spec'],
  );
  t.deepEqual(checkCelRules(pool, { ...base, portRange: { min: 5, max: 5 } }, ['spec']), [], 'min == max is fine');
  t.deepEqual(checkCelRules(pool, { ...base, portRange: { min: 6, max: 5 } }, ['spec']).map((v) => v.path.join('.')), ['spec.portRange']);
  t.deepEqual(checkCelRules(pool, { ...base, healthCheck: { url: 'https://x/', mode: 'connect' } }, ['spec']), []);
  t.deepEqual(checkCelRules(pool, { ...base, healthCheck: { url: 'http://x/', mode: 'forward' } }, ['spec']), []);
  t.is(checkCelRules(pool, { ...base, healthCheck: { url: 'https://x/', mode: 'forward' } }, ['spec']).length, 1);

  const turn = loadKinds().get('TurnServer')!.specSchema;
  const violations = (v: unknown) => checkCelRules(turn, v, ['spec']).map((x) => x.message);
  t.true(violations({ transports: ['udp', 'tls'], ports: {} }).length === 1, 'tls transport needs ports.tls');
  t.deepEqual(violations({ transports: ['udp', 'tls'], ports: { tls: 5349 } }), []);
  t.true(violations({ auth: { mode: 'longTerm', username: 'u' } }).length === 1);
  t.true(violations({ auth: { mode: 'restSecret' } }).length === 1);
  t.true(violations({ remediation: { command: ['x'], systemdUnit: 'coturn' } }).length === 1);
  t.deepEqual(violations({ remediation: { systemdUnit: 'coturn' } }), []);
});

test('the CEL rules of the CRDs are enforced in validate output', (t) => {
  const dir = tempDir(t);
  const text = poolYaml('same-chains', { chainPrefix: 'SAME' }).replace('postrouting: SAME-MASQ', 'postrouting: SAME');
  const [file] = writeFiles(dir, { 'p.yaml': text });
  const { problems } = validator().loadPath(file!);
  t.is(problems.length, 1, problems.map(formatProblem).join('\n'));
  t.is(problems[0]!.field, 'spec');
  t.regex(problems[0]!.message, /chains.nat and chains.postrouting .* must differ/);
});

// ---- kinds -------------------------------------------------------------------

test('kind names resolve from kind, plural, singular and short name, case-insensitively', (t) => {
  const kinds = loadKinds();
  for (const name of ['ProxyPort', 'proxyport', 'proxyports', 'PROXYPORTS', 'pport']) t.is(resolveKindName(kinds, name), 'ProxyPort', name);
  t.is(resolveKindName(kinds, 'proxypools'), 'ProxyPool');
  t.is(resolveKindName(kinds, 'nothing'), undefined);
});

test('validateSpec (API input) applies the same schema and CEL rules with field paths', (t) => {
  const v = validator();
  t.deepEqual(v.validateSpec('ProxyPort', { userId: 'ok', sourceIP: '10.0.0.1' }), []);
  const problems = v.validateSpec('ProxyPort', { userId: 'x; iptables -F', sourceIP: '10.0.0.1; reboot', port: 80, extra: 1 });
  const fields = problems.map((p) => p.field).sort();
  t.deepEqual([...new Set(fields)], ['spec.extra', 'spec.port', 'spec.sourceIP', 'spec.userId']);
  t.deepEqual(v.validateSpec('Nope', {}), [{ field: '-', message: 'unknown kind Nope' }]);
});

// ---- the bundled examples and the CLI -----------------------------------------------

test('the bundled example manifests validate clean', (t) => {
  const { problems, resources } = validator().loadPath(EXAMPLES_DIR);
  t.deepEqual(problems.map(formatProblem), []);
  t.true(resources.length >= 2);
  t.true(resources.some((r) => r.kind === 'ProxyPool'));
  t.true(resources.some((r) => r.kind === 'ProxyPort'));
});

test('`validate -f DIR` prints one FILE:LINE:COL line per problem and exits 1', async (t) => {
  const { dir } = badDir(t);
  const expected = validator().loadPath(dir).problems;
  const db = path.join(tempDir(t), 'unused.db');
  const run = await cli(db, 'validate', '-f', dir);
  t.is(run.code, 1);
  t.deepEqual(run.out, expected.map(formatProblem));
  t.true(expected.length >= 25, `${expected.length} problems`);
  for (const line of run.out) {
    t.regex(line, new RegExp(`^${escape(dir)}/[^:]+\\.ya?ml:\\d+:\\d+: .+`));
    // Unknown parts are left out, never printed as placeholders.
    t.notRegex(line, /:0:0:|: -:|: -\/|\/-:/);
  }
});

test('`validate -f manifests/examples` exits 0 and says how much it checked', async (t) => {
  const db = path.join(tempDir(t), 'unused.db');
  const run = await cli(db, 'validate', '-f', EXAMPLES_DIR);
  t.is(run.code, 0, run.out.join('\n'));
  t.regex(run.out.join('\n'), /^\d+ resource\(s\) in \d+ file\(s\) are valid$/);
  t.false(fs.existsSync(db), 'validate does not touch the database');
});
