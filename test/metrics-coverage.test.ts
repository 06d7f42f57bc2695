// Every metric the shipped alert rules (manifests/prometheus/alerts.yml) and the Grafana dashboard
// (manifests/grafana/polydev-reconciler.json) query must exist in a real daemon's /metrics; the
// per-resource gauges the alerts rely on (polydev_resource_phase, polydev_resource_ready,
// polydev_warm_pool_desired_size) show what the daemon's store says; every counter is there at 0
// before its first event (or Prometheus's increase() misses that event); and the real promtool
// finds nothing wrong with the exposition. The daemon runs in process against iptables in a
// throwaway namespace, a WarmPool on the process engine (real child processes), a WarmPool on a
// Docker socket that does not exist (EngineUnavailable, for real), a TurnServer on a port nobody
// listens on, and a notifier target (a real webhook receiver).

import test, { type ExecutionContext } from 'ava';
import dgram from 'node:dgram';
import fs from 'node:fs';
import path from 'node:path';
import YAML from 'yaml';

import type { Daemon } from '../src/daemon.js';
import { ProcessEngine } from '../src/drivers/process.js';
import { installationId } from '../src/state/pools.js';
import { EXAMPLE_USERS, e2eEnv, manifest, metricValue, startDaemon, waitFor } from './helpers/e2e-env.js';
import { ALERTS_FILE, DASHBOARD_FILE, PROMTOOL_BIN, requireBinary, runTool } from './helpers/prometheus.js';
import { poolsYaml } from './helpers/warmpool-env.js';
import { startReceiver } from './helpers/webhook-receiver.js';

// Hang guard of the waits on the daemon (a passing wait costs only its own time): converging,
// starting processes and five failed reconciles take many times longer on a loaded machine.
const WAIT_MS = 90_000;

const PROMQL_KEYWORDS = new Set(['and', 'or', 'unless', 'bool', 'offset', 'by', 'without', 'on', 'ignoring', 'group_left', 'group_right', 'inf', 'nan']);

/**
 * The metric names a PromQL expression selects: strings, label matchers, ranges, grouping
 * clauses and Grafana variables are removed; what is left that is not a function call or a
 * keyword is a metric name.
 */
export function metricNamesOf(expr: string): string[] {
  let e = expr
    .replace(/"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`/g, '""')
    .replace(/\{[^}]*\}/g, ' ')
    .replace(/\[[^\]]*\]/g, ' ')
    .replace(/\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)/g, ' ')
    .replace(/\$\{?\w+\}?/g, ' ');
  e = e.replace(/#.*$/gm, ' ');
  const names: string[] = [];
  for (const m of e.matchAll(/(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?/g)) {
    if (m[2]) continue; // a function
    if (PROMQL_KEYWORDS.has(m[1]!.toLowerCase())) continue;
    names.push(m[1]!);
  }
  return names;
}

test('metricNamesOf finds metric names and nothing else', (t) => {
  t.deepEqual(
    metricNamesOf('sum by (job, pool) (rate(polydev_a_total{state="x y", pool=~"$pool"}[$__rate_interval])) / on (pool) group_left sum without (state) (polydev_b) > 0.2 and polydev_c offset 5m'),
    ['polydev_a_total', 'polydev_b', 'polydev_c'],
  );
  t.deepEqual(metricNamesOf('absent(up{job="polydev-reconciler"})'), ['up']);
  t.deepEqual(metricNamesOf('histogram_quantile(0.99, sum(rate(x_bucket[5m])) by (le))'), ['x_bucket']);
});

function alertExprs(): string[] {
  const doc = YAML.parse(fs.readFileSync(ALERTS_FILE, 'utf8')) as { groups: Array<{ rules: Array<{ expr: string }> }> };
  return doc.groups.flatMap((g) => g.rules.map((r) => r.expr));
}

function dashboardExprs(): string[] {
  const out: string[] = [];
  const walk = (v: unknown): void => {
    if (Array.isArray(v)) v.forEach(walk);
    else if (v && typeof v === 'object') {
      for (const [k, x] of Object.entries(v)) {
        if (k === 'expr' && typeof x === 'string') out.push(x);
        else walk(x);
      }
    }
  };
  walk((JSON.parse(fs.readFileSync(DASHBOARD_FILE, 'utf8')) as { panels: unknown }).panels);
  return out;
}

/** Metric families of an exposition: names from HELP/TYPE lines and samples, with each family's type. */
function families(exposition: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const line of exposition.split('\n')) {
    let m = /^# (?:HELP|TYPE) ([a-zA-Z_:][a-zA-Z0-9_:]*)(?: (\w+))?/.exec(line);
    if (m) {
      if (line.startsWith('# TYPE')) out.set(m[1]!, m[2] ?? 'untyped');
      else if (!out.has(m[1]!)) out.set(m[1]!, 'untyped');
      continue;
    }
    m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]/.exec(line);
    if (m && !out.has(m[1]!)) out.set(m[1]!, 'untyped');
  }
  return out;
}

/** Whether a queried name is in the exposition (histogram/summary series map to their family). */
function exported(name: string, fams: Map<string, string>): boolean {
  if (fams.has(name)) return true;
  const m = /^(.*)_(bucket|sum|count)$/.exec(name);
  if (!m) return false;
  const type = fams.get(m[1]!);
  return type === 'histogram' || (type === 'summary' && m[2] !== 'bucket');
}

interface Running {
  daemon: Daemon;
  scrape(): Promise<string>;
}

/** A UDP port on 127.0.0.1 that nothing listens on (it was free a moment ago). */
async function closedUdpPort(): Promise<number> {
  const socket = dgram.createSocket('udp4');
  await new Promise<void>((resolve) => socket.bind(0, '127.0.0.1', resolve));
  const { port } = socket.address();
  await new Promise<void>((resolve) => socket.close(() => resolve()));
  return port;
}

/**
 * A TurnServer nobody answers for: its first probe fails, and with an hour between probes and
 * three failures needed (and no remediation) it is never restarted during a test.
 */
function silentTurnServerYaml(port: number, passwordFile: string): string {
  return YAML.stringify({
    apiVersion: 'polydev.ai/v1alpha1',
    kind: 'TurnServer',
    metadata: { name: 'silent' },
    spec: {
      host: '127.0.0.1',
      ports: { stun: port },
      transports: ['udp'],
      realm: 'coverage.test',
      auth: { mode: 'longTerm', username: 'probe', passwordFile },
      probe: { interval: '1h', timeout: '1s', failureThreshold: 3 },
    },
  });
}

/**
 * A daemon with a converged ProxyPool, a process-engine WarmPool, a WarmPool whose Docker socket
 * is missing, a TurnServer that does not answer, and a notifier target.
 */
async function runningDaemon(t: ExecutionContext): Promise<Running> {
  const env = await e2eEnv(t);
  const runDir = path.join(env.dir, 'run');
  const receiver = await startReceiver(t);
  const turnPasswordFile = path.join(env.dir, 'turn.password');
  fs.writeFileSync(turnPasswordFile, 'not-used\n', { mode: 0o600 });
  env.writeDesired('proxy.yaml', manifest({}, EXAMPLE_USERS));
  env.writeDesired(
    'pools.yaml',
    poolsYaml([
      { name: 'dev', engine: 'process', command: ['sleep', '300'], size: 2, maxSize: 3 },
      { name: 'nodocker', engine: 'docker', image: 'polydev-coverage-test:latest', size: 1, maxSize: 1 },
    ]),
  );
  env.writeDesired('turn.yaml', silentTurnServerYaml(await closedUdpPort(), turnPasswordFile));
  const cfgFile = env.writeConfig({
    desiredStateDir: env.desiredDir,
    docker: { socket: path.join(env.dir, 'missing-docker.sock'), network: 'none' },
    process: { runDir },
    notify: { targets: [{ name: 'ops', format: 'alertmanager', url: receiver.url('/hook') }] },
  });
  // Degraded after 5 failures over 2 s rather than the default minute: the test waits for it.
  const daemon = await startDaemon(t, cfgFile, { retries: { degraded: { afterFailures: 5, afterMs: 2_000 } } });
  const owner = installationId(daemon.store);
  t.teardown(async () => {
    await daemon.stop();
    const engine = new ProcessEngine({ runDir });
    for (const c of await engine.list(owner)) await engine.remove(c.id);
    // The engine keeps its processes' logs (a development aid); these are ours alone.
    for (const f of fs.readdirSync(engine.logDir)) if (f.startsWith(`${owner}.`)) fs.rmSync(path.join(engine.logDir, f), { force: true });
  });
  const scrape = async () => {
    const res = await fetch(`${daemon.address}/metrics`, { signal: AbortSignal.timeout(10_000) });
    if (res.status !== 200) throw new Error(`/metrics answered ${res.status}`);
    return res.text();
  };
  await waitFor('ProxyPool/default Ready', () => daemon.store.getResource('ProxyPool', 'default')?.status?.phase === 'Ready', WAIT_MS);
  return { daemon, scrape };
}

test('every metric the alert rules and the dashboard query is in the daemon\'s /metrics', async (t) => {
  const { scrape } = await runningDaemon(t);
  const fams = families(await scrape());
  t.true(fams.size > 20, `only ${fams.size} families`);

  const fromAlerts = new Set(alertExprs().flatMap(metricNamesOf));
  const fromDashboard = new Set(dashboardExprs().flatMap(metricNamesOf));
  // The extraction must have found something, or the check below would pass vacuously.
  for (const n of ['up', 'polydev_drift_unrepaired', 'polydev_resource_phase', 'polydev_turn_up', 'polydev_warm_pool_desired_size']) t.true(fromAlerts.has(n), `alerts: ${n}`);
  for (const n of ['polydev_claim_duration_seconds_bucket', 'polydev_reconcile_total', 'polydev_proxy_ports', 'polydev_turn_up']) t.true(fromDashboard.has(n), `dashboard: ${n}`);

  for (const [where, names] of [['alerts.yml', fromAlerts], ['dashboard', fromDashboard]] as const) {
    for (const name of names) {
      if (name === 'up') continue; // Prometheus's own, per scrape target
      t.true(name.startsWith('polydev_'), `${where}: ${name} is not a polydev_ metric`);
      t.true(exported(name, fams), `${where}: ${name} is not in the daemon's /metrics`);
    }
  }
  // And the mapping is not so loose that anything passes.
  t.false(exported('polydev_no_such_metric', fams));
  t.false(exported('polydev_workqueue_depth_bucket', fams), 'a gauge has no _bucket series');
});

test('per-resource gauges follow the store: phase, Ready reason (EngineUnavailable, then Degraded), warm pool sizes', async (t) => {
  t.timeout(360_000); // a hang guard above ava's 120 s default: three waits of up to WAIT_MS
  const { scrape } = await runningDaemon(t);
  let text = await scrape();
  t.is(metricValue(text, 'polydev_resource_phase', { kind: 'ProxyPool', name: 'default', phase: 'Ready' }), 1);
  t.is(metricValue(text, 'polydev_resource_ready', { kind: 'ProxyPool', name: 'default', reason: 'Converged' }), 1);
  // One series per resource: the current phase only.
  t.is(text.split('\n').filter((l) => l.startsWith('polydev_resource_phase{') && l.includes('kind="ProxyPool",name="default"')).length, 1, text);
  // ProxyPorts are counted in polydev_proxy_ports, not listed one by one.
  t.false(text.split('\n').some((l) => l.startsWith('polydev_resource_') && l.includes('kind="ProxyPort"')));
  t.is(metricValue(text, 'polydev_warm_pool_desired_size', { pool: 'dev' }), 2);
  t.is(metricValue(text, 'polydev_warm_pool_max_size', { pool: 'dev' }), 3);
  t.is(metricValue(text, 'polydev_warm_pool_desired_size', { pool: 'nodocker' }), 1);

  // The process pool fills up and is Ready.
  text = await waitFor('WarmPool/dev Ready with 2 warm', async () => {
    const s = await scrape();
    return metricValue(s, 'polydev_resource_phase', { kind: 'WarmPool', name: 'dev', phase: 'Ready' }) === 1 &&
      metricValue(s, 'polydev_warm_pool_containers', { pool: 'dev', state: 'warm' }) === 2
      ? s
      : undefined;
  }, WAIT_MS);
  t.is(metricValue(text, 'polydev_resource_ready', { kind: 'WarmPool', name: 'dev', reason: 'Converged' }), 1);

  // The Docker pool: Ready=False with reason EngineUnavailable, and Degraded after 5 failures in a row over 2 s.
  text = await waitFor('WarmPool/nodocker Degraded', async () => {
    const s = await scrape();
    return metricValue(s, 'polydev_resource_phase', { kind: 'WarmPool', name: 'nodocker', phase: 'Degraded' }) === 1 ? s : undefined;
  }, WAIT_MS);
  t.is(metricValue(text, 'polydev_resource_ready', { kind: 'WarmPool', name: 'nodocker', reason: 'EngineUnavailable' }), 0);
  t.is(metricValue(text, 'polydev_resource_phase', { kind: 'WarmPool', name: 'nodocker', phase: 'Backoff' }), undefined, 'the old phase is gone');
  t.is(metricValue(text, 'polydev_warm_pool_containers', { pool: 'nodocker', state: 'warm' }), undefined);
});

/** A scrape once the TurnServer has been probed (its series exist from its first reconcile, turn_up from its first probe). */
async function scrapeAfterFirstProbe(scrape: () => Promise<string>): Promise<string> {
  return waitFor('TurnServer/silent probed', async () => {
    const s = await scrape();
    return metricValue(s, 'polydev_turn_up', { server: 'silent' }) !== undefined ? s : undefined;
  }, WAIT_MS);
}

test('promtool check metrics has nothing to say about the daemon\'s /metrics', async (t) => {
  const promtool = requireBinary(PROMTOOL_BIN, 'prometheus');
  // The check is not vacuous: a gauge named like a counter is reported.
  const bad = await runTool(promtool, ['check', 'metrics'], 60_000, '# HELP x_total A gauge.\n# TYPE x_total gauge\nx_total 1\n');
  t.not(bad.code, 0);
  t.regex(bad.stdout + bad.stderr, /x_total non-counter metrics should not have "_total" suffix/);

  const { scrape } = await runningDaemon(t);
  const text = await scrapeAfterFirstProbe(scrape);
  const r = await runTool(promtool, ['check', 'metrics'], 60_000, text);
  t.is(r.stdout + r.stderr, '', 'promtool check metrics printed something');
  t.is(r.code, 0);
});

test('every counter and histogram is exported at 0 for each label set it will carry, before its first event', async (t) => {
  const { scrape } = await runningDaemon(t);
  const text = await scrapeAfterFirstProbe(scrape);
  const missing: string[] = [];
  const expect = (name: string, labels: Record<string, string>): void => {
    if (metricValue(text, name, labels) === undefined) missing.push(`${name}${JSON.stringify(labels)}`);
  };
  // Label sets fixed by the build and the configuration: every kind with a controller, results, engines, targets.
  for (const kind of ['ProxyPool', 'ProxyPort', 'WarmPool', 'TurnServer']) {
    for (const result of ['success', 'error']) expect('polydev_reconcile_total', { kind, result });
    expect('polydev_reconcile_errors_total', { kind });
    expect('polydev_reconcile_duration_seconds_count', { kind });
  }
  // Drift is found only by the kinds that converge on a plan.
  for (const kind of ['ProxyPool', 'WarmPool']) expect('polydev_drift_total', { kind });
  for (const result of ['success', 'error']) expect('polydev_iptables_restore_total', { result });
  for (const result of ['applied', 'unchanged', 'rejected']) expect('polydev_desired_state_applies_total', { result });
  for (const engine of ['docker', 'process']) {
    for (const op of ['ping', 'list', 'start', 'remove', 'inject', 'recycle', 'update', 'rename']) {
      for (const result of ['success', 'error']) expect('polydev_engine_operations_total', { engine, op, result });
    }
  }
  for (const status of ['sent', 'failed', 'dropped']) expect('polydev_notifications_total', { target: 'ops', format: 'alertmanager', status });
  // Label sets of resources: each WarmPool and TurnServer in the store.
  for (const pool of ['dev', 'nodocker']) {
    for (const result of ['warm', 'cold', 'rejected', 'exhausted', 'too_many', 'failed']) expect('polydev_claims_total', { pool, result });
    for (const warm of ['true', 'false']) expect('polydev_claim_duration_seconds_count', { pool, warm });
  }
  for (const reason of ['unreachable', 'timeout', 'auth_rejected', 'allocation_refused', 'malformed', 'credentials']) {
    expect('polydev_turn_probe_failures_total', { server: 'silent', reason });
  }
  expect('polydev_turn_restarts_total', { server: 'silent' });
  for (const step of ['binding', 'allocate', 'release']) expect('polydev_turn_probe_duration_seconds_count', { server: 'silent', step });
  t.deepEqual(missing, []);

  // Whatever the lists above forget: no counter or histogram of the daemon's own is without a series
  // (prom-client's process and Node.js metrics are its business).
  const empty = [...families(text)]
    .filter(([name, type]) => (type === 'counter' || type === 'histogram') && !/^polydev_(process|nodejs)_/.test(name))
    .map(([name]) => name)
    .filter((name) => !text.split('\n').some((l) => l.startsWith(`${name}{`) || l.startsWith(`${name} `) || l.startsWith(`${name}_`)));
  t.deepEqual(empty, []);

  // Nothing has happened to these yet, and they say so with a 0 rather than with no series.
  t.is(metricValue(text, 'polydev_turn_restarts_total', { server: 'silent' }), 0);
  t.is(metricValue(text, 'polydev_turn_probe_failures_total', { server: 'silent', reason: 'auth_rejected' }), 0);
  t.is(metricValue(text, 'polydev_drift_total', { kind: 'ProxyPool' }), 0);
  t.is(metricValue(text, 'polydev_reconcile_errors_total', { kind: 'ProxyPool' }), 0);
  t.is(metricValue(text, 'polydev_claims_total', { pool: 'dev', result: 'warm' }), 0);
  t.is(metricValue(text, 'polydev_iptables_restore_total', { result: 'error' }), 0);
  t.is(metricValue(text, 'polydev_engine_operations_total', { engine: 'process', op: 'inject', result: 'success' }), 0);
  t.is(metricValue(text, 'polydev_notifications_total', { target: 'ops', format: 'alertmanager', status: 'dropped' }), 0);
  // The one probe so far failed: exactly one reason counts it.
  const failures = ['unreachable', 'timeout', 'auth_rejected', 'allocation_refused', 'malformed', 'credentials']
    .map((reason) => metricValue(text, 'polydev_turn_probe_failures_total', { server: 'silent', reason }) ?? 0);
  t.is(failures.reduce((a, b) => a + b, 0), 1, `failures by reason: ${failures.join(',')}`);
});
