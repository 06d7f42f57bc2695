// Pure model of a ProxyPool's iptables rules: parse `iptables-save`, observe what a
// pool owns, render the desired rules exactly as `iptables-save` prints them back,
// diff the two into actions, and render those actions as ONE `iptables-restore
// --noflush` payload. No I/O here: the driver (src/drivers/iptables.ts) runs it.
//
// Ownership follows Calico Felix: a rule is ours when its comment starts with
// `polydev:`. Everything else (even a rule inside one of our chains) is foreign and
// never touched; it is reported in `ObservedPoolRules.foreign` so the caller can warn.
//
// Backend facts this module is designed around (verified on iptables 1.8.9, both
// the nf_tables and the legacy backend, see test/iptables.test.ts):
// - With `--noflush`, declaring `:CHAIN - [0:0]` for an EXISTING user chain flushes
//   it (both backends). So chains are created with `-N CHAIN`, and only when the last
//   save did not show them; if someone created it in between, `-N` fails ("Chain
//   already exists"), the whole restore is rejected atomically and the next
//   reconcile re-plans. Built-in chains are never declared (a declaration would also
//   reset their policy).
// - `-D CHAIN <spec>` matches the comment too, so deleting by the exact saved spec
//   deletes exactly that rule (the first of identical duplicates).
// - `--dport A:A` is printed back as `--dport A`; comments with spaces are printed
//   double-quoted; `-s`/`-d` get `/32`; `-p tcp --dport` gets an explicit `-m tcp`.
//   The renderers below emit exactly that canonical form, so render == read-back.
// - `-X` of a chain that still has rules or is still referenced fails; teardown
//   flushes first and keeps a chain that foreign rules still live in or jump to.

import { createHash } from 'node:crypto';
import type { PortRange, ProxyChains } from './types.js';

// ---------------------------------------------------------------------------
// iptables-save parsing

export interface SavedChain {
  name: string;
  /** `ACCEPT`/`DROP` for built-in chains, `-` for user-defined chains. */
  policy: string;
  builtin: boolean;
  /** Rule specs in order: the text after `-A CHAIN ` exactly as saved. */
  rules: string[];
}

export interface SavedTable {
  name: string;
  chains: Map<string, SavedChain>;
}

export interface SavedTables {
  tables: Map<string, SavedTable>;
  /** Lines the parser did not understand (kept for logging, never fatal). */
  warnings: string[];
}

/** Parses `iptables-save` output (any backend, any tables). Linear in the input size. */
export function parseIptablesSave(text: string): SavedTables {
  const tables = new Map<string, SavedTable>();
  const warnings: string[] = [];
  let current: SavedTable | null = null;
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    let line = lines[i]!;
    if (line.endsWith('\r')) line = line.slice(0, -1);
    if (line === '' || line.startsWith('#')) continue;
    const c0 = line.charCodeAt(0);
    if (c0 === 45 /* - */ || c0 === 91 /* [ */) {
      // `-A CHAIN spec`, or `[pkts:bytes] -A CHAIN spec` when saved with -c.
      let rest = line;
      if (c0 === 91) {
        const close = rest.indexOf('] ');
        if (close < 0) {
          warnings.push(`line ${i + 1}: unparsable counters: ${line}`);
          continue;
        }
        rest = rest.slice(close + 2);
      }
      if (!rest.startsWith('-A ')) {
        warnings.push(`line ${i + 1}: unexpected command: ${line}`);
        continue;
      }
      if (!current) {
        warnings.push(`line ${i + 1}: rule outside of a table: ${line}`);
        continue;
      }
      const sp = rest.indexOf(' ', 3);
      const chainName = sp < 0 ? rest.slice(3) : rest.slice(3, sp);
      const spec = sp < 0 ? '' : rest.slice(sp + 1);
      let chain = current.chains.get(chainName);
      if (!chain) {
        // Not declared (not produced by iptables-save itself, but be lenient).
        chain = { name: chainName, policy: '-', builtin: false, rules: [] };
        current.chains.set(chainName, chain);
      }
      chain.rules.push(spec);
    } else if (c0 === 58 /* : */) {
      if (!current) {
        warnings.push(`line ${i + 1}: chain outside of a table: ${line}`);
        continue;
      }
      const parts = line.slice(1).split(' ');
      const name = parts[0] ?? '';
      const policy = parts[1] ?? '-';
      const existing = current.chains.get(name);
      if (existing) {
        existing.policy = policy;
        existing.builtin = policy !== '-';
      } else {
        current.chains.set(name, { name, policy, builtin: policy !== '-', rules: [] });
      }
    } else if (c0 === 42 /* * */) {
      const name = line.slice(1).trim();
      current = tables.get(name) ?? null;
      if (!current) {
        current = { name, chains: new Map() };
        tables.set(name, current);
      }
    } else if (line === 'COMMIT') {
      current = null;
    } else {
      warnings.push(`line ${i + 1}: unexpected line: ${line}`);
    }
  }
  return { tables, warnings };
}

export function getSavedChain(saved: SavedTables, table: string, chain: string): SavedChain | undefined {
  return saved.tables.get(table)?.chains.get(chain);
}

/**
 * Splits a saved rule spec into argv words the way iptables-restore does (double
 * quotes group, backslash escapes the next character). Useful to run one rule through
 * `iptables` with an argument array.
 */
export function tokenizeRuleSpec(spec: string): string[] {
  const out: string[] = [];
  let cur = '';
  let inWord = false;
  let quoted = false;
  for (let i = 0; i < spec.length; i++) {
    const ch = spec[i]!;
    if (ch === '\\' && i + 1 < spec.length) {
      cur += spec[++i]!;
      inWord = true;
    } else if (ch === '"') {
      quoted = !quoted;
      inWord = true;
    } else if (ch === ' ' && !quoted) {
      if (inWord) out.push(cur);
      cur = '';
      inWord = false;
    } else {
      cur += ch;
      inWord = true;
    }
  }
  if (inWord) out.push(cur);
  return out;
}

const COMMENT_RE = /(?:^| )-m comment --comment ("(?:[^"\\]|\\.)*"|[^ ]+)/;

/** The first `-m comment --comment` value of a saved spec, unquoted; null when none. */
export function ruleComment(spec: string): string | null {
  if (!spec.includes('--comment ')) return null;
  const m = COMMENT_RE.exec(spec);
  if (!m) return null;
  const raw = m[1]!;
  if (raw.startsWith('"')) return raw.slice(1, -1).replace(/\\(.)/g, '$1');
  return raw;
}

/** The `-j`/`-g` target of a saved spec (quote-aware); null when the rule has none. */
export function ruleTarget(spec: string): { target: string; goto: boolean } | null {
  const words = tokenizeRuleSpec(spec);
  for (let i = 0; i < words.length - 1; i++) {
    const w = words[i];
    if (w === '-j' || w === '--jump') return { target: words[i + 1]!, goto: false };
    if (w === '-g' || w === '--goto') return { target: words[i + 1]!, goto: true };
  }
  return null;
}

// ---------------------------------------------------------------------------
// Input validation (defense in depth: values end up in an iptables-restore payload)

const IPV4_OCTET = '(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])';
const IPV4_RE = new RegExp(`^${IPV4_OCTET}(?:\\.${IPV4_OCTET}){3}$`);
const USER_ID_RE = /^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$/;
const CHAIN_RE = /^[A-Z][A-Z0-9_-]{0,27}$/;
const POOL_RE = /^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$/;
/** Built-in chains and standard/extension targets iptables would not accept as a user chain name. */
const RESERVED_CHAINS = new Set([
  'PREROUTING', 'INPUT', 'FORWARD', 'OUTPUT', 'POSTROUTING',
  'ACCEPT', 'DROP', 'QUEUE', 'RETURN', 'REJECT', 'DNAT', 'SNAT', 'MASQUERADE', 'REDIRECT',
  'LOG', 'MARK', 'CONNMARK', 'TPROXY', 'NFQUEUE', 'NOTRACK', 'CT', 'TRACE', 'AUDIT',
]);
/** iptables' multiport match accepts at most 15 ports. */
const MULTIPORT_MAX = 15;

function show(value: unknown): string {
  try {
    return JSON.stringify(value) ?? String(value);
  } catch {
    return String(value);
  }
}

export function assertIPv4(value: unknown, what = 'IPv4 address'): string {
  if (typeof value !== 'string' || !IPV4_RE.test(value)) {
    throw new Error(`invalid ${what} ${show(value)}: expected a dotted-quad IPv4 address (four octets 0-255, no leading zeros)`);
  }
  return value;
}

export function assertPort(value: unknown, what = 'port'): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 1 || value > 65535) {
    throw new Error(`invalid ${what} ${show(value)}: expected an integer 1-65535`);
  }
  return value;
}

export function assertUserId(value: unknown): string {
  if (typeof value !== 'string' || !USER_ID_RE.test(value)) {
    throw new Error(`invalid userId ${show(value)}: expected 1-128 characters of [A-Za-z0-9._@-], starting with a letter or digit`);
  }
  return value;
}

export function assertChainName(value: unknown, what = 'chain name'): string {
  if (typeof value !== 'string' || !CHAIN_RE.test(value)) {
    throw new Error(`invalid ${what} ${show(value)}: expected 1-28 characters of [A-Z0-9_-], starting with A-Z`);
  }
  if (RESERVED_CHAINS.has(value)) {
    throw new Error(`invalid ${what} ${show(value)}: it is a built-in chain or target name`);
  }
  return value;
}

export function assertPoolName(value: unknown): string {
  if (typeof value !== 'string' || !POOL_RE.test(value)) {
    throw new Error(`invalid pool name ${show(value)}: expected a DNS label (1-63 characters of [a-z0-9-], alphanumeric at both ends)`);
  }
  return value;
}

export function assertChains(chains: ProxyChains): ProxyChains {
  if (!chains || typeof chains !== 'object') throw new Error(`invalid chains ${show(chains)}`);
  assertChainName(chains.nat, 'chains.nat');
  assertChainName(chains.postrouting, 'chains.postrouting');
  assertChainName(chains.filter, 'chains.filter');
  if (new Set([chains.nat, chains.postrouting, chains.filter]).size !== 3) {
    throw new Error(`invalid chains ${show(chains)}: nat, postrouting and filter chain names must differ`);
  }
  return chains;
}

export function assertPortRange(range: PortRange): PortRange {
  if (!range || typeof range !== 'object') throw new Error(`invalid portRange ${show(range)}`);
  assertPort(range.min, 'portRange.min');
  assertPort(range.max, 'portRange.max');
  if (range.min > range.max) throw new Error(`invalid portRange ${range.min}-${range.max}: min is greater than max`);
  return range;
}

/** Validates destination ports and returns them in canonical form (sorted, de-duplicated). */
export function canonicalDestinationPorts(dports: readonly number[]): number[] {
  if (!Array.isArray(dports) || dports.length === 0) {
    throw new Error(`invalid destinationPorts ${show(dports)}: expected a non-empty list of ports`);
  }
  for (const p of dports) assertPort(p, 'destination port');
  const out = [...new Set(dports)].sort((a, b) => a - b);
  if (out.length > MULTIPORT_MAX) {
    throw new Error(`invalid destinationPorts: at most ${MULTIPORT_MAX} ports (iptables multiport limit), got ${out.length}`);
  }
  return out;
}

// ---------------------------------------------------------------------------
// Rendering (canonical iptables-save form of every rule we own)

export const OWNER_PREFIX = 'polydev:';
export type TableName = 'nat' | 'filter';
export type ChainRole = 'nat' | 'postrouting' | 'filter';
export const CHAIN_ROLES: readonly ChainRole[] = ['nat', 'postrouting', 'filter'];
export const ROLE_TABLE: Readonly<Record<ChainRole, TableName>> = { nat: 'nat', postrouting: 'nat', filter: 'filter' };

export type RuleKind = 'user' | 'masquerade' | 'forward-to-upstream' | 'forward-from-upstream' | 'jump';

export interface PortEntry {
  userId: string;
  sourceIP: string;
  port: number;
}

export interface PoolRuleSet {
  pool: string;
  chains: ProxyChains;
  upstreamIP: string;
  destinationPorts: number[];
  portRange: PortRange;
  ports: PortEntry[];
  ipForward: boolean;
}

/** The built-in chains that jump to each of our chains (inserted at position 1). */
export function jumpSources(chains: ProxyChains): Array<{ table: TableName; from: string; target: string; role: ChainRole }> {
  return [
    { table: 'nat', from: 'PREROUTING', target: chains.nat, role: 'nat' },
    { table: 'nat', from: 'OUTPUT', target: chains.nat, role: 'nat' },
    { table: 'nat', from: 'POSTROUTING', target: chains.postrouting, role: 'postrouting' },
    { table: 'filter', from: 'FORWARD', target: chains.filter, role: 'filter' },
  ];
}

/** First 12 hex digits of sha256 over the rule's desired content. */
export function ruleHash(parts: ReadonlyArray<string | number>): string {
  return createHash('sha256').update(JSON.stringify(parts)).digest('hex').slice(0, 12);
}

function rangeText(range: PortRange): string {
  return range.min === range.max ? String(range.min) : `${range.min}:${range.max}`;
}

/** The DNAT rule of one user, in chains.nat. Returns the spec (text after `-A CHAIN `). */
export function renderPortRule(
  pool: string,
  chains: ProxyChains,
  upstreamIP: string,
  dports: readonly number[],
  entry: PortEntry,
): string {
  assertPoolName(pool);
  assertChains(chains);
  assertIPv4(upstreamIP, 'upstream IP');
  return userRuleSpec(pool, upstreamIP, canonicalDestinationPorts(dports).join(','), entry);
}

/** renderPortRule once pool, upstream and ports are validated (the entry is still checked). */
// Rendering (checks + sha256) is the bulk of a plan's cost; a resync renders the same rules
// again, so rendered specs are memoised by their inputs. Bounded: cleared when it outgrows
// any realistic pool, so memory stays flat.
const renderedUserRules = new Map<string, string>();
const RENDER_CACHE_MAX = 200_000;

function userRuleSpec(pool: string, upstreamIP: string, dp: string, entry: PortEntry): string {
  if (!entry || typeof entry !== 'object') throw new Error(`invalid port entry ${show(entry)}`);
  const key = `${pool}\0${upstreamIP}\0${dp}\0${entry.userId}\0${entry.sourceIP}\0${entry.port}`;
  const cached = renderedUserRules.get(key);
  if (cached !== undefined) return cached;
  const spec = renderUserRuleSpec(pool, upstreamIP, dp, entry);
  if (renderedUserRules.size >= RENDER_CACHE_MAX) renderedUserRules.clear();
  renderedUserRules.set(key, spec);
  return spec;
}

function renderUserRuleSpec(pool: string, upstreamIP: string, dp: string, entry: PortEntry): string {
  assertUserId(entry.userId);
  assertIPv4(entry.sourceIP, `sourceIP of user ${entry.userId}`);
  assertPort(entry.port, `proxy port of user ${entry.userId}`);
  const hash = ruleHash(['user', pool, entry.userId, entry.sourceIP, entry.port, upstreamIP, dp]);
  return (
    `-s ${entry.sourceIP}/32 -p tcp -m multiport --dports ${dp}` +
    ` -m comment --comment "${OWNER_PREFIX}${hash} pool:${pool} user:${entry.userId}"` +
    ` -j DNAT --to-destination ${upstreamIP}:${entry.port}`
  );
}

/**
 * The MASQUERADE rule in chains.postrouting. `! -o lo`: masquerading a connection that
 * leaves through loopback (an upstream on this host, e.g. 127.0.0.1) rewrites its source
 * to an address the reply never comes back to, and the connection hangs (measured on
 * both backends); forwarded traffic to a remote upstream never leaves through lo anyway.
 */
export function renderMasqueradeRule(pool: string, upstreamIP: string, portRange: PortRange): string {
  assertPoolName(pool);
  assertIPv4(upstreamIP, 'upstream IP');
  assertPortRange(portRange);
  const r = rangeText(portRange);
  const hash = ruleHash(['masquerade', pool, upstreamIP, r, '!lo']);
  return (
    `-d ${upstreamIP}/32 ! -o lo -p tcp -m tcp --dport ${r}` +
    ` -m comment --comment "${OWNER_PREFIX}${hash} pool:${pool} masquerade" -j MASQUERADE`
  );
}

/** The two ACCEPT rules in chains.filter: to the upstream, and back from it. */
export function renderForwardRules(pool: string, upstreamIP: string, portRange: PortRange): [toUpstream: string, fromUpstream: string] {
  assertPoolName(pool);
  assertIPv4(upstreamIP, 'upstream IP');
  assertPortRange(portRange);
  const r = rangeText(portRange);
  // Only connections our DNAT rules made (`--ctstate DNAT`, both directions) are accepted:
  // a VM connecting straight to upstream:<another user's port> gets no help from these rules
  // and stays subject to the FORWARD policy.
  const h1 = ruleHash(['forward-to-upstream', pool, upstreamIP, r, 'ctstate-dnat']);
  const h2 = ruleHash(['forward-from-upstream', pool, upstreamIP, r, 'ctstate-dnat']);
  return [
    `-d ${upstreamIP}/32 -p tcp -m tcp --dport ${r} -m conntrack --ctstate DNAT` +
      ` -m comment --comment "${OWNER_PREFIX}${h1} pool:${pool} forward-to-upstream" -j ACCEPT`,
    `-s ${upstreamIP}/32 -p tcp -m tcp --sport ${r} -m conntrack --ctstate DNAT` +
      ` -m comment --comment "${OWNER_PREFIX}${h2} pool:${pool} forward-from-upstream" -j ACCEPT`,
  ];
}

/** The jump from a built-in chain to one of ours. */
export function renderJumpRule(pool: string, target: string): string {
  assertPoolName(pool);
  assertChainName(target, 'jump target');
  return `-m comment --comment "${OWNER_PREFIX}jump pool:${pool}" -j ${target}`;
}

export interface DesiredRule {
  table: TableName;
  chain: string;
  spec: string;
  kind: Exclude<RuleKind, 'jump'>;
  userId?: string;
  port?: number;
}

export interface DesiredJump {
  table: TableName;
  from: string;
  target: string;
  spec: string;
}

export interface DesiredPoolRules {
  rules: Record<ChainRole, DesiredRule[]>;
  jumps: DesiredJump[];
}

/** Every rule the pool wants, rendered. Throws on invalid input or a duplicate userId. */
export function renderDesiredPoolRules(desired: PoolRuleSet): DesiredPoolRules {
  const { pool, chains, upstreamIP, portRange } = desired;
  assertPoolName(pool);
  assertChains(chains);
  assertIPv4(upstreamIP, 'upstream IP');
  assertPortRange(portRange);
  const dp = canonicalDestinationPorts(desired.destinationPorts).join(',');
  if (!Array.isArray(desired.ports)) throw new Error('invalid ports: expected a list');
  const seen = new Set<string>();
  const userRules: DesiredRule[] = [];
  for (const entry of desired.ports) {
    const spec = userRuleSpec(pool, upstreamIP, dp, entry);
    if (seen.has(entry.userId)) throw new Error(`duplicate userId ${show(entry.userId)} in pool ${pool}`);
    seen.add(entry.userId);
    userRules.push({ table: 'nat', chain: chains.nat, spec, kind: 'user', userId: entry.userId, port: entry.port });
  }
  const [toUp, fromUp] = renderForwardRules(pool, upstreamIP, portRange);
  return {
    rules: {
      nat: userRules,
      postrouting: [
        { table: 'nat', chain: chains.postrouting, spec: renderMasqueradeRule(pool, upstreamIP, portRange), kind: 'masquerade' },
      ],
      filter: [
        { table: 'filter', chain: chains.filter, spec: toUp, kind: 'forward-to-upstream' },
        { table: 'filter', chain: chains.filter, spec: fromUp, kind: 'forward-from-upstream' },
      ],
    },
    jumps: jumpSources(chains).map((j) => ({ table: j.table, from: j.from, target: j.target, spec: renderJumpRule(pool, j.target) })),
  };
}

// ---------------------------------------------------------------------------
// Observation

export interface ObservedRule {
  table: TableName;
  chain: string;
  spec: string;
  /** 0-based position in the chain. */
  index: number;
  comment: string | null;
}

export interface OwnedRule extends ObservedRule {
  comment: string;
  /** What the comment says (a hand-edited rule may lie; only the exact text counts). */
  hash: string | null;
  pool: string | null;
  userId: string | null;
  kind: RuleKind | 'unknown';
  /** The `--to-destination` port of a DNAT rule, for messages. */
  port: number | null;
}

export interface ObservedChain {
  role: ChainRole;
  table: TableName;
  name: string;
  exists: boolean;
  /** All rule specs in order (owned and foreign). */
  rules: string[];
  owned: OwnedRule[];
  foreign: ObservedRule[];
}

export interface ObservedJump extends ObservedRule {
  /** The chain the rule lives in (`chain` repeated for readability). */
  from: string;
  fromBuiltin: boolean;
  target: string;
  goto: boolean;
  owned: boolean;
}

export interface ForeignRule extends ObservedRule {
  reason: 'in-owned-chain' | 'unowned-jump';
}

export interface ObservedPoolRules {
  chains: Record<ChainRole, ObservedChain>;
  /** Every rule outside our chains (in nat/filter) that jumps or goes to one of our chains, duplicates included. */
  jumps: ObservedJump[];
  /** Rules we must never touch but the operator should know about. */
  foreign: ForeignRule[];
  ipForward: boolean;
  /** Tables present in the save. */
  tables: string[];
}

function parseOwnedComment(comment: string): { hash: string | null; pool: string | null; userId: string | null; kind: RuleKind | 'unknown' } {
  const words = comment.split(' ');
  const first = words[0]!.slice(OWNER_PREFIX.length);
  let pool: string | null = null;
  let userId: string | null = null;
  let kind: RuleKind | 'unknown' = 'unknown';
  if (first === 'jump') kind = 'jump';
  for (let i = 1; i < words.length; i++) {
    const w = words[i]!;
    if (w.startsWith('pool:')) pool = w.slice(5);
    else if (w.startsWith('user:')) {
      userId = w.slice(5);
      kind = 'user';
    } else if (w === 'masquerade' || w === 'forward-to-upstream' || w === 'forward-from-upstream') kind = w;
  }
  return { hash: /^[0-9a-f]{12}$/.test(first) ? first : null, pool, userId, kind };
}

const TO_DEST_PORT_RE = /--to-destination [0-9.]+:(\d+)/;

function observeChain(saved: SavedTables, role: ChainRole, name: string): { chain: ObservedChain; foreign: ForeignRule[] } {
  const table = ROLE_TABLE[role];
  const sc = getSavedChain(saved, table, name);
  const chain: ObservedChain = { role, table, name, exists: sc !== undefined, rules: sc ? sc.rules : [], owned: [], foreign: [] };
  const foreign: ForeignRule[] = [];
  if (!sc) return { chain, foreign };
  for (let i = 0; i < sc.rules.length; i++) {
    const spec = sc.rules[i]!;
    const comment = ruleComment(spec);
    if (comment !== null && comment.startsWith(OWNER_PREFIX)) {
      const meta = parseOwnedComment(comment);
      let port: number | null = null;
      if (meta.kind === 'user') {
        const m = TO_DEST_PORT_RE.exec(spec);
        if (m) port = Number(m[1]);
      }
      chain.owned.push({ table, chain: name, spec, index: i, comment, ...meta, port });
    } else {
      const r: ObservedRule = { table, chain: name, spec, index: i, comment };
      chain.foreign.push(r);
      foreign.push({ ...r, reason: 'in-owned-chain' });
    }
  }
  return { chain, foreign };
}

/** What exists of a pool's rules in a parsed save. */
export function observePool(saved: SavedTables, chains: ProxyChains, ipForward: boolean): ObservedPoolRules {
  assertChains(chains);
  const foreign: ForeignRule[] = [];
  const observed = {} as Record<ChainRole, ObservedChain>;
  for (const role of CHAIN_ROLES) {
    const r = observeChain(saved, role, chains[role]);
    observed[role] = r.chain;
    foreign.push(...r.foreign);
  }
  const ours: Record<TableName, Set<string>> = {
    nat: new Set([chains.nat, chains.postrouting]),
    filter: new Set([chains.filter]),
  };
  const jumps: ObservedJump[] = [];
  for (const table of ['nat', 'filter'] as const) {
    const st = saved.tables.get(table);
    if (!st) continue;
    const names = [...ours[table]];
    for (const sc of st.chains.values()) {
      if (ours[table].has(sc.name)) continue;
      for (let i = 0; i < sc.rules.length; i++) {
        const spec = sc.rules[i]!;
        // Cheap pre-filter before the quote-aware tokenizer.
        if (!names.some((n) => spec.includes(n))) continue;
        const t = ruleTarget(spec);
        if (!t || !ours[table].has(t.target)) continue;
        const comment = ruleComment(spec);
        const owned = comment !== null && comment.startsWith(OWNER_PREFIX);
        const j: ObservedJump = {
          table, chain: sc.name, spec, index: i, comment,
          from: sc.name, fromBuiltin: sc.builtin, target: t.target, goto: t.goto, owned,
        };
        jumps.push(j);
        if (!owned) foreign.push({ table, chain: sc.name, spec, index: i, comment, reason: 'unowned-jump' });
      }
    }
  }
  return { chains: observed, jumps, foreign, ipForward, tables: [...saved.tables.keys()] };
}

// ---------------------------------------------------------------------------
// Actions and planning

export type DeleteReason = 'removed' | 'changed' | 'duplicate' | 'teardown';

export type RuleAction =
  | { type: 'create-chain'; table: TableName; chain: string }
  | { type: 'insert-jump'; table: TableName; chain: string; target: string; spec: string }
  | { type: 'delete-jump'; table: TableName; chain: string; target: string; spec: string; reason: DeleteReason }
  | { type: 'append-rule'; table: TableName; chain: string; spec: string; kind: Exclude<RuleKind, 'jump'>; userId?: string; port?: number }
  | {
      type: 'delete-rule';
      table: TableName;
      chain: string;
      spec: string;
      kind: RuleKind | 'unknown';
      reason: DeleteReason;
      userId?: string;
      port?: number;
    }
  | { type: 'flush-chain'; table: TableName; chain: string; ruleCount: number }
  | { type: 'delete-chain'; table: TableName; chain: string }
  | { type: 'set-ip-forward'; value: boolean };

export type IptablesAction = Exclude<RuleAction, { type: 'set-ip-forward' }>;
export type SysctlAction = Extract<RuleAction, { type: 'set-ip-forward' }>;

function kindLabel(kind: RuleKind | 'unknown'): string {
  switch (kind) {
    case 'masquerade':
      return 'masquerade rule';
    case 'forward-to-upstream':
      return 'forward rule (to upstream)';
    case 'forward-from-upstream':
      return 'forward rule (from upstream)';
    case 'jump':
      return 'jump rule';
    case 'user':
      return 'rule';
    default:
      return 'owned rule';
  }
}

function userSuffix(userId: string | undefined, port: number | undefined): string {
  if (userId === undefined) return '';
  return ` for user ${userId}${port !== undefined ? ` (port ${port})` : ''}`;
}

const REASON_TEXT: Record<DeleteReason, string> = {
  removed: 'no longer desired',
  changed: 'differs from desired',
  duplicate: 'duplicate',
  teardown: 'teardown',
};

/** One line a human can read, e.g. `add nat/POLYDEV-PROXY rule for user alice (port 10001)`. */
export function describeAction(a: RuleAction): string {
  switch (a.type) {
    case 'create-chain':
      return `create chain ${a.table}/${a.chain}`;
    case 'insert-jump':
      return `insert jump ${a.table}/${a.chain} -> ${a.target} at position 1`;
    case 'delete-jump':
      return `delete jump ${a.table}/${a.chain} -> ${a.target} (${REASON_TEXT[a.reason]})`;
    case 'append-rule':
      return `add ${a.table}/${a.chain} ${kindLabel(a.kind)}${userSuffix(a.userId, a.port)}`;
    case 'delete-rule':
      return `delete ${a.table}/${a.chain} ${kindLabel(a.kind)}${userSuffix(a.userId, a.port)} (${REASON_TEXT[a.reason]})`;
    case 'flush-chain':
      return `flush chain ${a.table}/${a.chain} (${a.ruleCount} rule${a.ruleCount === 1 ? '' : 's'})`;
    case 'delete-chain':
      return `delete chain ${a.table}/${a.chain}`;
    case 'set-ip-forward':
      return `set net.ipv4.ip_forward=${a.value ? 1 : 0}`;
  }
}

function deleteRuleAction(r: OwnedRule, reason: DeleteReason): RuleAction {
  const a: RuleAction = { type: 'delete-rule', table: r.table, chain: r.chain, spec: r.spec, kind: r.kind, reason };
  if (r.userId !== null) a.userId = r.userId;
  if (r.port !== null) a.port = r.port;
  return a;
}

/**
 * Pure diff of desired vs observed. Order: create chains, delete (stale jumps, stale
 * and duplicate rules), append missing rules, insert missing jumps, sysctl. Empty when
 * converged. Foreign rules are never in the plan.
 */
export function planPoolRules(desired: PoolRuleSet, observed: ObservedPoolRules): RuleAction[] {
  const want = renderDesiredPoolRules(desired);
  const creates: RuleAction[] = [];
  const deletes: RuleAction[] = [];
  const appends: RuleAction[] = [];
  const inserts: RuleAction[] = [];

  for (const role of CHAIN_ROLES) {
    const oc = observed.chains[role];
    const table = ROLE_TABLE[role];
    const name = desired.chains[role];
    if (oc.name !== name || oc.table !== table) {
      throw new Error(`observed chains do not match desired: ${role} is ${oc.table}/${oc.name}, want ${table}/${name}`);
    }
    if (!oc.exists) creates.push({ type: 'create-chain', table, chain: name });

    const bySpec = new Map<string, DesiredRule>();
    const usersWanted = new Set<string>();
    const kindsWanted = new Set<string>();
    for (const d of want.rules[role]) {
      bySpec.set(d.spec, d);
      if (d.userId !== undefined) usersWanted.add(d.userId);
      else kindsWanted.add(d.kind);
    }
    const present = new Set<string>();
    for (const r of oc.owned) {
      if (bySpec.has(r.spec)) {
        if (present.has(r.spec)) deletes.push(deleteRuleAction(r, 'duplicate'));
        else present.add(r.spec);
        continue;
      }
      const sameOwner =
        r.kind === 'user'
          ? r.userId !== null && r.pool === desired.pool && usersWanted.has(r.userId)
          : r.pool === desired.pool && kindsWanted.has(r.kind);
      deletes.push(deleteRuleAction(r, sameOwner ? 'changed' : 'removed'));
    }
    for (const d of want.rules[role]) {
      if (present.has(d.spec)) continue;
      const a: RuleAction = { type: 'append-rule', table, chain: name, spec: d.spec, kind: d.kind };
      if (d.userId !== undefined) a.userId = d.userId;
      if (d.port !== undefined) a.port = d.port;
      appends.push(a);
    }
  }

  // Jumps: exactly one owned jump per (built-in chain, target); foreign jumps untouched.
  const wantedJumps = new Map<string, DesiredJump>();
  for (const j of want.jumps) wantedJumps.set(`${j.table}\u0000${j.from}\u0000${j.spec}`, j);
  const jumpPresent = new Set<string>();
  for (const j of observed.jumps) {
    if (!j.owned) continue;
    const key = `${j.table}\u0000${j.from}\u0000${j.spec}`;
    if (wantedJumps.has(key)) {
      if (jumpPresent.has(key)) {
        deletes.push({ type: 'delete-jump', table: j.table, chain: j.from, target: j.target, spec: j.spec, reason: 'duplicate' });
      } else jumpPresent.add(key);
    } else {
      deletes.push({ type: 'delete-jump', table: j.table, chain: j.from, target: j.target, spec: j.spec, reason: 'removed' });
    }
  }
  for (const [key, j] of wantedJumps) {
    if (!jumpPresent.has(key)) inserts.push({ type: 'insert-jump', table: j.table, chain: j.from, target: j.target, spec: j.spec });
  }

  const plan = [...creates, ...deletes, ...appends, ...inserts];
  if (desired.ipForward && !observed.ipForward) plan.push({ type: 'set-ip-forward', value: true });
  return plan;
}

/**
 * Removes what the pool owns: its jumps, then flushes and deletes its chains. A chain
 * that still holds foreign rules only loses our rules (one by one) and is kept; a
 * chain a foreign rule still jumps to is flushed but kept (iptables refuses `-X`).
 * ip_forward is left as it is.
 */
export function planPoolTeardown(chains: ProxyChains, observed: ObservedPoolRules): RuleAction[] {
  assertChains(chains);
  const jumpDeletes: RuleAction[] = [];
  const ruleActions: RuleAction[] = [];
  const referenced = new Set<string>();
  for (const j of observed.jumps) {
    if (j.owned) {
      jumpDeletes.push({ type: 'delete-jump', table: j.table, chain: j.from, target: j.target, spec: j.spec, reason: 'teardown' });
    } else referenced.add(`${j.table}/${j.target}`);
  }
  for (const role of CHAIN_ROLES) {
    const oc = observed.chains[role];
    if (oc.name !== chains[role]) {
      throw new Error(`observed chains do not match: ${role} is ${oc.name}, want ${chains[role]}`);
    }
    if (!oc.exists) continue;
    if (oc.foreign.length === 0) {
      if (oc.rules.length > 0) ruleActions.push({ type: 'flush-chain', table: oc.table, chain: oc.name, ruleCount: oc.rules.length });
      if (!referenced.has(`${oc.table}/${oc.name}`)) ruleActions.push({ type: 'delete-chain', table: oc.table, chain: oc.name });
    } else {
      for (const r of oc.owned) ruleActions.push(deleteRuleAction(r, 'teardown'));
    }
  }
  return [...jumpDeletes, ...ruleActions];
}

// ---------------------------------------------------------------------------
// Payload

export function iptablesActions(actions: readonly RuleAction[]): IptablesAction[] {
  return actions.filter((a): a is IptablesAction => a.type !== 'set-ip-forward');
}

export function sysctlActions(actions: readonly RuleAction[]): SysctlAction[] {
  return actions.filter((a): a is SysctlAction => a.type === 'set-ip-forward');
}

/** The iptables-restore line of one action (without the table header). */
export function actionLine(a: IptablesAction): string {
  switch (a.type) {
    case 'create-chain':
      return `-N ${assertChainName(a.chain)}`;
    case 'insert-jump':
      return `-I ${a.chain} 1 ${a.spec}`;
    case 'delete-jump':
    case 'delete-rule':
      return `-D ${a.chain} ${a.spec}`;
    case 'append-rule':
      return `-A ${a.chain} ${a.spec}`;
    case 'flush-chain':
      return `-F ${assertChainName(a.chain)}`;
    case 'delete-chain':
      return `-X ${assertChainName(a.chain)}`;
  }
}

/**
 * One payload for ONE `iptables-restore --noflush` run: a `*table ... COMMIT` block
 * per table touched, actions in plan order. Empty string when there is nothing to do.
 * ip_forward actions are not part of it (see sysctlActions).
 */
export function renderRestorePayload(actions: readonly RuleAction[]): string {
  const byTable = new Map<string, string[]>();
  for (const a of actions) {
    if (a.type === 'set-ip-forward') continue;
    if (a.table !== 'nat' && a.table !== 'filter') throw new Error(`unsupported table ${show(a.table)}`);
    const line = actionLine(a);
    if (line.includes('\n') || line.includes('\r')) throw new Error(`refusing a rule with a line break: ${show(line)}`);
    let lines = byTable.get(a.table);
    if (!lines) {
      lines = [];
      byTable.set(a.table, lines);
    }
    lines.push(line);
  }
  let out = '';
  for (const [table, lines] of byTable) {
    out += `*${table}\n${lines.join('\n')}\nCOMMIT\n`;
  }
  return out;
}

/** Users whose desired DNAT rule is present exactly (the per-port "rule present" status). */
export function programmedUsers(desired: PoolRuleSet, observed: ObservedPoolRules): Set<string> {
  assertPoolName(desired.pool);
  assertChains(desired.chains);
  assertIPv4(desired.upstreamIP, 'upstream IP');
  const dp = canonicalDestinationPorts(desired.destinationPorts).join(',');
  const present = new Set(observed.chains.nat.rules);
  const out = new Set<string>();
  for (const entry of desired.ports) {
    if (present.has(userRuleSpec(desired.pool, desired.upstreamIP, dp, entry))) out.add(entry.userId);
  }
  return out;
}
