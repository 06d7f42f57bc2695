import fs from 'node:fs';
import path from 'node:path';
import YAML, { LineCounter, isMap, isPair, isScalar } from 'yaml';
import type { LogFormat, LogLevel } from './observability/logger.js';
import { formatDuration, parseDuration } from './util/duration.js';

export interface Config {
  /** The config file this came from, if any. */
  configFile: string | undefined;
  database: string;
  installationId: string | undefined;
  desiredStateDir: string | undefined;
  listen: { host: string; port: number };
  apiTokenFile: string | undefined;
  logLevel: LogLevel;
  logFormat: LogFormat;
  resyncIntervalMs: number;
  workers: number;
  applyDebounceMs: number;
  maxPrune: number;
  eventRetention: number;
  shutdownTimeoutMs: number;
  onceTimeoutMs: number;
  iptables: {
    backend: 'auto' | 'nft' | 'legacy';
    netns: string | undefined;
    createNetns: boolean;
  };
  docker: { socket: string; network: string };
  process: { runDir: string; logDir: string };
  warmPools: { parallelism: number; claimHistory: number };
  nomad: NomadSettings;
  /** Where desired state comes from: YAML files (desiredStateDir, apply, the API) or Kubernetes custom resources. */
  source: 'files' | 'kubernetes';
  kubernetes: { kubeconfig: string | undefined; namespace: string | undefined; resyncMs: number };
  leaderElection: LeaderElectionSettings;
  notify: { targets: NotifyTargetSetting[]; repeatIntervalMs: number; evaluationIntervalMs: number };
}

export interface LeaderElectionSettings {
  enabled: boolean;
  leaseName: string;
  /** Unset: `<hostname>_<random>` (in Kubernetes, set it to the pod name). */
  identity: string | undefined;
  leaseDurationMs: number;
  renewDeadlineMs: number;
  retryPeriodMs: number;
}

export interface NotifyTargetSetting {
  name: string;
  format: 'alertmanager' | 'slack';
  /** The webhook URL; read from urlFile at load time when the config names one (Slack URLs are secrets). */
  url: string;
}

export interface NomadSettings {
  /** Unset: the nomad engine is not configured, and pools with `engine: nomad` say so. */
  address: string | undefined;
  tokenFile: string | undefined;
  namespace: string | undefined;
  region: string | undefined;
  datacenters: string[];
  caFile: string | undefined;
  certFile: string | undefined;
  keyFile: string | undefined;
  serverName: string | undefined;
  startTimeoutMs: number;
}

type Kind = 'path' | 'string' | 'url' | 'list' | 'listen' | 'logLevel' | 'logFormat' | 'duration' | 'int' | 'ratio' | 'backend' | 'bool' | 'source' | 'targets';

interface Setting {
  /** Dotted key in the YAML file. */
  key: string;
  env: string;
  kind: Kind;
  default: string | undefined;
  help: string;
}

/** Every setting, its default and its environment variable: the README's reference is generated from this table. */
export const SETTINGS: readonly Setting[] = [
  { key: 'database', env: 'POLYDEV_DATABASE', kind: 'path', default: 'var/polydev.db', help: 'SQLite file: desired state, status, events, allocations, snapshots. Created with mode 0600. (`--db` / `POLYDEV_DB` override it for one command.)' },
  { key: 'installationId', env: 'POLYDEV_INSTALLATION_ID', kind: 'string', default: undefined, help: 'The owner id in the labels and Nomad job names of everything this daemon creates (it finds its own things by it after a restart). Unset: a random id made with the database. Set the same id on daemons with separate databases that take over from each other (Kubernetes replicas), so a new leader adopts the old one\'s warm containers.' },
  { key: 'desiredStateDir', env: 'POLYDEV_DESIRED_STATE_DIR', kind: 'path', default: undefined, help: 'Directory of desired-state YAML that the daemon watches and applies (all or nothing, with prune). Unset: only `apply` and the API change desired state.' },
  { key: 'listen', env: 'POLYDEV_LISTEN', kind: 'listen', default: '127.0.0.1:9470', help: 'Address of the HTTP API, /metrics, /healthz and /readyz.' },
  { key: 'apiTokenFile', env: 'POLYDEV_API_TOKEN_FILE', kind: 'path', default: undefined, help: 'File holding the bearer token that mutating API calls need (at least 16 characters). Unset: mutating calls are refused (403).' },
  { key: 'logLevel', env: 'POLYDEV_LOG_LEVEL', kind: 'logLevel', default: 'info', help: 'error, warn, info or debug.' },
  { key: 'logFormat', env: 'POLYDEV_LOG_FORMAT', kind: 'logFormat', default: 'auto', help: '`json` (one JSON object per line, for journald and log shippers), `text` (time, level, resource, message, then the other fields, for a person) or `auto`: text when the log goes to a terminal, else JSON.' },
  { key: 'resyncInterval', env: 'POLYDEV_RESYNC_INTERVAL', kind: 'duration', default: '30s', help: 'Every key is reconciled at least this often, changes or not (drift detection).' },
  { key: 'workers', env: 'POLYDEV_WORKERS', kind: 'int', default: '4', help: 'Reconciles running at once (never two for the same key).' },
  { key: 'applyDebounce', env: 'POLYDEV_APPLY_DEBOUNCE', kind: 'duration', default: '500ms', help: 'Quiet time after the last change in desiredStateDir before it is applied.' },
  { key: 'maxPrune', env: 'POLYDEV_MAX_PRUNE', kind: 'ratio', default: '0.5', help: 'Largest share of a kind\'s resources that a directory apply may delete without --force.' },
  { key: 'eventRetention', env: 'POLYDEV_EVENT_RETENTION', kind: 'int', default: '10000', help: 'Events kept in the store; older ones are deleted.' },
  { key: 'shutdownTimeout', env: 'POLYDEV_SHUTDOWN_TIMEOUT', kind: 'duration', default: '8s', help: 'On SIGTERM/SIGINT, how long in-flight reconciles may finish before they are abandoned.' },
  { key: 'onceTimeout', env: 'POLYDEV_ONCE_TIMEOUT', kind: 'duration', default: '60s', help: '`run --once`: give up (exit 1) if not converged by then.' },
  { key: 'iptables.backend', env: 'POLYDEV_IPTABLES_BACKEND', kind: 'backend', default: 'auto', help: 'auto (the system\'s iptables), nft or legacy.' },
  { key: 'iptables.netns', env: 'POLYDEV_IPTABLES_NETNS', kind: 'string', default: undefined, help: 'Run every iptables and sysctl command inside this network namespace (ip netns exec). Unset: the daemon\'s own namespace.' },
  { key: 'iptables.createNetns', env: 'POLYDEV_IPTABLES_CREATE_NETNS', kind: 'bool', default: 'false', help: 'Create iptables.netns at start if it does not exist (the bundled demo config uses this to keep the host firewall untouched).' },
  { key: 'docker.socket', env: 'POLYDEV_DOCKER_SOCKET', kind: 'path', default: '/var/run/docker.sock', help: 'Unix socket of the Docker Engine API that WarmPools with engine docker use.' },
  { key: 'docker.network', env: 'POLYDEV_DOCKER_NETWORK', kind: 'string', default: 'bridge', help: 'Docker network warm containers join; their address on it is what a claim returns (`none`: no network, the address is `container:NAME`).' },
  { key: 'process.runDir', env: 'POLYDEV_PROCESS_RUN_DIR', kind: 'path', default: '/dev/shm/polydev-process', help: 'Engine process (development): where each process gets its private directory for injected credentials (a tmpfs by default).' },
  { key: 'process.logDir', env: 'POLYDEV_PROCESS_LOG_DIR', kind: 'path', default: '/tmp/polydev-process-logs', help: 'Engine process (development): where each process\'s stdout and stderr go (`<owner>.<slot>.log`, kept after removal, not rotated).' },
  { key: 'warmPools.parallelism', env: 'POLYDEV_WARM_POOL_PARALLELISM', kind: 'int', default: '8', help: 'Container starts and removals in flight at once per pool.' },
  { key: 'nomad.address', env: 'POLYDEV_NOMAD_ADDRESS', kind: 'url', default: undefined, help: 'HTTP API of a Nomad cluster (`http://…:4646` or `https://…`) for WarmPools with engine nomad. Unset: the nomad engine is off and such pools report EngineUnavailable.' },
  { key: 'nomad.tokenFile', env: 'POLYDEV_NOMAD_TOKEN_FILE', kind: 'path', default: undefined, help: 'File holding the Nomad ACL token (sent as X-Nomad-Token, never logged). Needs submit-job, read-job, list-jobs and alloc-exec in the namespace, and alloc-lifecycle for WarmPools with `onRelease: recycle` (recycling restarts the allocation) and for TurnServer remediation. Without read-job the event stream is refused and pools are only resynced.' },
  { key: 'nomad.namespace', env: 'POLYDEV_NOMAD_NAMESPACE', kind: 'string', default: undefined, help: 'Nomad namespace of the jobs. Unset: Nomad\'s `default`.' },
  { key: 'nomad.region', env: 'POLYDEV_NOMAD_REGION', kind: 'string', default: undefined, help: 'Nomad region to address. Unset: the agent\'s own.' },
  { key: 'nomad.datacenters', env: 'POLYDEV_NOMAD_DATACENTERS', kind: 'list', default: '*', help: 'Comma-separated datacenters of rendered jobs (`*`: all, Nomad 1.6+).' },
  { key: 'nomad.caFile', env: 'POLYDEV_NOMAD_CA_FILE', kind: 'path', default: undefined, help: 'CA bundle that signs the Nomad API\'s certificate (https addresses).' },
  { key: 'nomad.certFile', env: 'POLYDEV_NOMAD_CERT_FILE', kind: 'path', default: undefined, help: 'Client certificate for Nomad mTLS (with nomad.keyFile).' },
  { key: 'nomad.keyFile', env: 'POLYDEV_NOMAD_KEY_FILE', kind: 'path', default: undefined, help: 'Private key of nomad.certFile.' },
  { key: 'nomad.serverName', env: 'POLYDEV_NOMAD_SERVER_NAME', kind: 'string', default: undefined, help: 'TLS server name to verify instead of the address\'s host (Nomad\'s own certificates name `server.<region>.nomad`).' },
  { key: 'nomad.startTimeout', env: 'POLYDEV_NOMAD_START_TIMEOUT', kind: 'duration', default: '120s', help: 'How long a container start waits for its allocation to run (placement and image pull) before it is deregistered and reported as AllocationFailed.' },
  { key: 'warmPools.claimHistory', env: 'POLYDEV_CLAIM_HISTORY', kind: 'int', default: '10000', help: 'Ended claims kept in the store (for `get claims` and pool stats); open claims are always kept.' },
  { key: 'source', env: 'POLYDEV_SOURCE', kind: 'source', default: 'files', help: '`files`: desired state comes from desiredStateDir, `apply` and the API. `kubernetes`: from the polydev.ai custom resources in kubernetes.namespace (watched); status is written back to their status subresource.' },
  { key: 'kubernetes.kubeconfig', env: 'POLYDEV_KUBECONFIG', kind: 'path', default: undefined, help: 'Kubeconfig file for source kubernetes. Unset: the pod\'s service account (in-cluster).' },
  { key: 'kubernetes.namespace', env: 'POLYDEV_KUBERNETES_NAMESPACE', kind: 'string', default: undefined, help: 'Namespace of the custom resources and the leader Lease. Unset: the pod\'s own namespace, else the kubeconfig context\'s, else `default`.' },
  { key: 'kubernetes.resync', env: 'POLYDEV_KUBERNETES_RESYNC', kind: 'duration', default: '10m', help: 'Full relist of the custom resources this often, besides the watch (catches anything a watch missed).' },
  { key: 'leaderElection.enabled', env: 'POLYDEV_LEADER_ELECTION', kind: 'bool', default: 'false', help: 'true: several daemons may run; one leads and the others wait as standbys (/readyz 503) and take over when it dies. The lease is a row in the database (source files: daemons sharing one database on one host) or a coordination.k8s.io/v1 Lease (source kubernetes). false: a second daemon on the same database refuses to start.' },
  { key: 'leaderElection.leaseName', env: 'POLYDEV_LEADER_ELECTION_LEASE', kind: 'string', default: 'polydev-reconciler', help: 'Name of the coordination.k8s.io/v1 Lease (source kubernetes). Daemons sharing a database always use the database\'s own lease, the one a daemon without leader election takes too, so the two modes exclude each other.' },
  { key: 'leaderElection.identity', env: 'POLYDEV_LEADER_ELECTION_IDENTITY', kind: 'string', default: undefined, help: 'This daemon\'s name in the lease. Unset: `<hostname>_<random>`; in Kubernetes set it to the pod name.' },
  { key: 'leaderElection.leaseDuration', env: 'POLYDEV_LEADER_ELECTION_LEASE_DURATION', kind: 'duration', default: '15s', help: 'How long a standby honours a lease that is not renewed: the longest a hung leader blocks a takeover (a leader whose process died on the same host is replaced at the next retry).' },
  { key: 'leaderElection.renewDeadline', env: 'POLYDEV_LEADER_ELECTION_RENEW_DEADLINE', kind: 'duration', default: '10s', help: 'A leader that cannot renew for this long stops acting and exits (shorter than leaseDuration, so it stops before anyone takes over).' },
  { key: 'leaderElection.retryPeriod', env: 'POLYDEV_LEADER_ELECTION_RETRY_PERIOD', kind: 'duration', default: '2s', help: 'Interval of renewals and of a standby\'s attempts to take the lease.' },
  { key: 'notify.targets', env: 'POLYDEV_NOTIFY_TARGETS', kind: 'targets', default: undefined, help: 'Webhooks the built-in notifier sends alerts to (for operators without Alertmanager): a list of `{name, format: alertmanager|slack, url | urlFile}`; in the variable, the same list as JSON. URLs are secrets and never logged. Unset: no notifications.' },
  { key: 'notify.repeatInterval', env: 'POLYDEV_NOTIFY_REPEAT_INTERVAL', kind: 'duration', default: '4h', help: 'An alert still firing is sent again this often.' },
  { key: 'notify.evaluationInterval', env: 'POLYDEV_NOTIFY_EVALUATION_INTERVAL', kind: 'duration', default: '15s', help: 'How often the built-in notifier evaluates its alert rules.' },
];

export class ConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ConfigError';
  }
}

const NETNS_NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$/;

function convert(s: Setting, raw: unknown, baseDir: string, where: string): unknown {
  const fail = (why: string): never => {
    throw new ConfigError(`${where}: ${s.key}: ${why}`);
  };
  if (s.kind === 'targets') return convertTargets(raw, baseDir, fail);
  const text = typeof raw === 'string' ? raw : typeof raw === 'number' || typeof raw === 'boolean' ? String(raw) : fail('must be a scalar');
  switch (s.kind) {
    case 'path':
      if (text === '') return fail('must not be empty');
      return path.resolve(baseDir, text);
    case 'string':
      if (s.key === 'iptables.netns' && !NETNS_NAME.test(text)) return fail('must be a namespace name of [A-Za-z0-9_.-], at most 32');
      if (s.key === 'docker.network' && !/^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/.test(text)) return fail('must be a Docker network name');
      if (s.key === 'installationId' && !/^[a-z0-9]([a-z0-9-]{0,22}[a-z0-9])?$/.test(text)) return fail('must be 1-24 characters of [a-z0-9-] (it is part of container and Nomad job names)');
      if (s.key === 'kubernetes.namespace' && !/^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$/.test(text)) return fail('must be a Kubernetes namespace name (RFC 1123 label)');
      if (s.key === 'leaderElection.leaseName' && !/^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$/.test(text)) return fail('must be a Kubernetes object name (RFC 1123 subdomain)');
      if (s.key === 'leaderElection.identity' && !/^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$/.test(text)) return fail('must be a name of [A-Za-z0-9_.:-], at most 128');
      return text;
    case 'url': {
      let u: URL;
      try {
        u = new URL(text);
      } catch {
        return fail(`must be a URL, got ${JSON.stringify(text)}`);
      }
      if (u.protocol !== 'http:' && u.protocol !== 'https:') return fail('must be an http:// or https:// URL');
      return text.replace(/\/+$/, '');
    }
    case 'list': {
      const items = text.split(',').map((x) => x.trim()).filter(Boolean);
      if (items.length === 0) return fail('must name at least one item');
      return items;
    }
    case 'listen': {
      const m = /^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})$/.exec(text);
      if (!m || Number(m[2]) > 65535) return fail(`must be HOST:PORT, got ${JSON.stringify(text)}`);
      return { host: m[1]!.replace(/^\[|\]$/g, ''), port: Number(m[2]) };
    }
    case 'logLevel':
      if (!['error', 'warn', 'info', 'debug'].includes(text)) return fail('must be error, warn, info or debug');
      return text;
    case 'logFormat':
      if (!['auto', 'json', 'text'].includes(text)) return fail('must be auto, json or text');
      return text;
    case 'duration': {
      let ms: number;
      try {
        ms = parseDuration(text);
      } catch (err) {
        return fail((err as Error).message);
      }
      if (ms <= 0) return fail('must be longer than 0');
      return ms;
    }
    case 'int': {
      if (!/^[0-9]+$/.test(text) || Number(text) < 1) return fail('must be a positive whole number');
      return Number(text);
    }
    case 'ratio': {
      const n = Number(text);
      if (!Number.isFinite(n) || n < 0 || n > 1) return fail('must be a number from 0 to 1');
      return n;
    }
    case 'backend':
      if (!['auto', 'nft', 'legacy'].includes(text)) return fail('must be auto, nft or legacy');
      return text;
    case 'bool':
      if (!['true', 'false'].includes(text)) return fail('must be true or false');
      return text === 'true';
    case 'source':
      if (!['files', 'kubernetes'].includes(text)) return fail('must be files or kubernetes');
      return text;
  }
}

const TARGET_NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;

/** notify.targets: a YAML list, or the same list as JSON in the environment variable. */
function convertTargets(raw: unknown, baseDir: string, fail: (why: string) => never): NotifyTargetSetting[] {
  let list = raw;
  if (typeof raw === 'string') {
    try {
      list = JSON.parse(raw) as unknown;
    } catch {
      return fail('must be a JSON list of {name, format, url | urlFile}');
    }
  }
  if (!Array.isArray(list)) return fail('must be a list of {name, format, url | urlFile}');
  const seen = new Set<string>();
  return list.map((item: unknown, i) => {
    const at = (why: string) => fail(`[${i}]: ${why}`);
    if (item === null || typeof item !== 'object' || Array.isArray(item)) return at('must be a mapping');
    const t = item as Record<string, unknown>;
    for (const k of Object.keys(t)) if (!['name', 'format', 'url', 'urlFile'].includes(k)) at(`${k}: unknown field (known: name, format, url, urlFile)`);
    if (typeof t.name !== 'string' || !TARGET_NAME.test(t.name)) return at('name: must be a name of [A-Za-z0-9_.-]');
    if (seen.has(t.name)) return at(`name: ${t.name} is used twice`);
    seen.add(t.name);
    if (t.format !== 'alertmanager' && t.format !== 'slack') return at('format: must be alertmanager or slack');
    if ((t.url === undefined) === (t.urlFile === undefined)) return at('needs exactly one of url and urlFile');
    let url: string;
    if (t.urlFile !== undefined) {
      if (typeof t.urlFile !== 'string' || t.urlFile === '') return at('urlFile: must be a path');
      const file = path.resolve(baseDir, t.urlFile);
      try {
        url = fs.readFileSync(file, 'utf8').trim();
      } catch (err) {
        return at(`urlFile: cannot read ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
      }
    } else {
      if (typeof t.url !== 'string') return at('url: must be a string');
      url = t.url;
    }
    let u: URL;
    try {
      u = new URL(url);
    } catch {
      // The URL itself is never echoed: a Slack webhook URL is a credential.
      return at('url: is not a valid URL');
    }
    if (u.protocol !== 'http:' && u.protocol !== 'https:') return at('url: must be http:// or https://');
    return { name: t.name, format: t.format, url };
  });
}

function flatten(obj: Record<string, unknown>, prefix = ''): Map<string, unknown> {
  const out = new Map<string, unknown>();
  for (const [k, v] of Object.entries(obj)) {
    const key = prefix ? `${prefix}.${k}` : k;
    // An empty mapping is kept as a key of its own, so a misspelt empty section is still reported.
    if (v !== null && typeof v === 'object' && !Array.isArray(v) && Object.keys(v).length > 0) {
      for (const [k2, v2] of flatten(v as Record<string, unknown>, key)) out.set(k2, v2);
    } else out.set(key, v);
  }
  return out;
}

function linePosOf(text: string, key: string): string {
  const lc = new LineCounter();
  const doc = YAML.parseDocument(text, { lineCounter: lc });
  let node: unknown = doc.contents;
  let pos = { line: 1, col: 1 };
  for (const part of key.split('.')) {
    if (!isMap(node)) break;
    const pair = node.items.find((p) => isPair(p) && isScalar(p.key) && p.key.value === part);
    if (!pair || !isScalar(pair.key) || !pair.key.range) break;
    pos = lc.linePos(pair.key.range[0]);
    node = pair.value;
  }
  return `${pos.line}:${pos.col}`;
}

/**
 * Loads settings: defaults, then the YAML file (paths relative to it), then POLYDEV_* variables
 * (paths relative to the working directory), then explicit overrides (command-line flags).
 */
export function loadConfig(
  file: string | undefined,
  env: NodeJS.ProcessEnv = process.env,
  overrides: Partial<Record<string, string>> = {},
): Config {
  const values = new Map<string, unknown>();
  const cwd = process.cwd();
  for (const s of SETTINGS) if (s.default !== undefined) values.set(s.key, convert(s, s.default, cwd, 'default'));
  let configFile: string | undefined;
  if (file) {
    configFile = path.resolve(file);
    let text: string;
    try {
      text = fs.readFileSync(configFile, 'utf8');
    } catch (err) {
      throw new ConfigError(`${configFile}: cannot read config: ${(err as Error).message}`);
    }
    const lc = new LineCounter();
    const doc = YAML.parseDocument(text, { prettyErrors: false, uniqueKeys: true, lineCounter: lc });
    if (doc.errors.length > 0) {
      const e = doc.errors[0]!;
      const pos = e.linePos?.[0] ?? lc.linePos(e.pos[0]);
      throw new ConfigError(`${configFile}:${pos?.line ?? 1}:${pos?.col ?? 1}: YAML syntax error: ${e.message.split('\n')[0]}`);
    }
    const parsed = doc.toJS() as unknown;
    if (parsed !== null && parsed !== undefined) {
      if (typeof parsed !== 'object' || Array.isArray(parsed)) throw new ConfigError(`${configFile}:1:1: config must be a mapping`);
      const known = new Map(SETTINGS.map((s) => [s.key, s]));
      for (const [key, raw] of flatten(parsed as Record<string, unknown>)) {
        const s = known.get(key);
        const where = `${configFile}:${linePosOf(text, key)}`;
        const emptySection = raw !== null && typeof raw === 'object' && !Array.isArray(raw);
        if (!s && emptySection && SETTINGS.some((x) => x.key.startsWith(`${key}.`))) continue;
        if (!s) throw new ConfigError(`${where}: ${key}: unknown setting (known: ${[...known.keys()].join(', ')})`);
        if (raw === null || raw === undefined) continue;
        values.set(key, convert(s, raw, path.dirname(configFile), where));
      }
    }
  }
  for (const s of SETTINGS) {
    const raw = env[s.env];
    if (raw !== undefined && raw !== '') values.set(s.key, convert(s, raw, cwd, `environment ${s.env}`));
  }
  for (const [key, raw] of Object.entries(overrides)) {
    const s = SETTINGS.find((x) => x.key === key);
    if (s && raw !== undefined) values.set(key, convert(s, raw, cwd, 'command line'));
  }
  const get = <T>(key: string) => values.get(key) as T;
  return {
    configFile,
    database: get<string>('database'),
    installationId: get<string | undefined>('installationId'),
    desiredStateDir: get<string | undefined>('desiredStateDir'),
    listen: get<{ host: string; port: number }>('listen'),
    apiTokenFile: get<string | undefined>('apiTokenFile'),
    logLevel: get<LogLevel>('logLevel'),
    logFormat: get<LogFormat>('logFormat'),
    resyncIntervalMs: get<number>('resyncInterval'),
    workers: get<number>('workers'),
    applyDebounceMs: get<number>('applyDebounce'),
    maxPrune: get<number>('maxPrune'),
    eventRetention: get<number>('eventRetention'),
    shutdownTimeoutMs: get<number>('shutdownTimeout'),
    onceTimeoutMs: get<number>('onceTimeout'),
    iptables: {
      backend: get<'auto' | 'nft' | 'legacy'>('iptables.backend'),
      netns: get<string | undefined>('iptables.netns'),
      createNetns: get<boolean>('iptables.createNetns'),
    },
    docker: { socket: get<string>('docker.socket'), network: get<string>('docker.network') },
    process: { runDir: get<string>('process.runDir'), logDir: get<string>('process.logDir') },
    warmPools: { parallelism: get<number>('warmPools.parallelism'), claimHistory: get<number>('warmPools.claimHistory') },
    nomad: {
      address: get<string | undefined>('nomad.address'),
      tokenFile: get<string | undefined>('nomad.tokenFile'),
      namespace: get<string | undefined>('nomad.namespace'),
      region: get<string | undefined>('nomad.region'),
      datacenters: get<string[]>('nomad.datacenters'),
      caFile: get<string | undefined>('nomad.caFile'),
      certFile: get<string | undefined>('nomad.certFile'),
      keyFile: get<string | undefined>('nomad.keyFile'),
      serverName: get<string | undefined>('nomad.serverName'),
      startTimeoutMs: get<number>('nomad.startTimeout'),
    },
    source: get<'files' | 'kubernetes'>('source'),
    kubernetes: {
      kubeconfig: get<string | undefined>('kubernetes.kubeconfig'),
      namespace: get<string | undefined>('kubernetes.namespace'),
      resyncMs: get<number>('kubernetes.resync'),
    },
    leaderElection: checkLeaderElection({
      enabled: get<boolean>('leaderElection.enabled'),
      leaseName: get<string>('leaderElection.leaseName'),
      identity: get<string | undefined>('leaderElection.identity'),
      leaseDurationMs: get<number>('leaderElection.leaseDuration'),
      renewDeadlineMs: get<number>('leaderElection.renewDeadline'),
      retryPeriodMs: get<number>('leaderElection.retryPeriod'),
    }),
    notify: {
      targets: get<NotifyTargetSetting[] | undefined>('notify.targets') ?? [],
      repeatIntervalMs: get<number>('notify.repeatInterval'),
      evaluationIntervalMs: get<number>('notify.evaluationInterval'),
    },
  };
}

/** client-go's rule: a leader must give up before a standby may take over, with room for one retry. */
function checkLeaderElection(le: LeaderElectionSettings): LeaderElectionSettings {
  if (le.renewDeadlineMs >= le.leaseDurationMs) {
    throw new ConfigError(`leaderElection.renewDeadline (${formatDuration(le.renewDeadlineMs)}) must be shorter than leaderElection.leaseDuration (${formatDuration(le.leaseDurationMs)})`);
  }
  if (le.retryPeriodMs * 1.2 >= le.renewDeadlineMs) {
    throw new ConfigError(`leaderElection.retryPeriod (${formatDuration(le.retryPeriodMs)}) must be well under leaderElection.renewDeadline (${formatDuration(le.renewDeadlineMs)})`);
  }
  return le;
}

/** The README's configuration table, generated from SETTINGS (`npx tsx scripts/config-reference.ts`). */
export function configReference(): string {
  const cell = (s: string) => s.replace(/\|/g, '\\|');
  const rows = SETTINGS.map((s) => `| \`${s.key}\` | \`${s.env}\` | ${s.default === undefined ? '(unset)' : `\`${s.default}\``} | ${cell(s.help)} |`);
  return ['| setting | environment | default | meaning |', '|---|---|---|---|', ...rows].join('\n');
}
