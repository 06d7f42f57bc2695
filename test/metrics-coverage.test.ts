// Every metric the shipped alert rules (manifests/prometheus/alerts.yml) and the Grafana dashboard
// (manifests/grafana/polydev-reconciler.json) query must exist in a real daemon's /metrics; and
// the per-resource gauges the alerts rely on (polydev_resource_phase, polydev_resource_ready,
// polydev_warm_pool_desired_size) show what the daemon's store says. The daemon runs in process
// against iptables in a throwaway namespace, a WarmPool on the process engine (real child
// processes), and a WarmPool on a Docker socket that does not exist (EngineUnavailable, for real).

import test, { type ExecutionContext } from 'ava';
import fs from 'node:fs';
import path from 'node:path';
import YAML from 'yaml';

import type { Daemon } from '../src/daemon.js';
import { ProcessEngine } from '../src/drivers/process.js';
import { installationId } from '../src/state/pools.js';
import { EXAMPLE_USERS, e2eEnv, manifest, metricValue, startDaemon, waitFor } from './helpers/e2e-env.js';
import { ALERTS_FILE, DASHBOARD_FILE } from './helpers/prometheus.js';
import { poolsYaml } from './helpers/warmpool-env.js';

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

/** A daemon with a converged ProxyPool, a process-engine WarmPool and a WarmPool whose Docker socket is missing. */
async function runningDaemon(t: ExecutionContext): Promise<Running> {
  const env = await e2eEnv(t);
  const runDir = path.join(env.dir, 'run');
  env.writeDesired('proxy.yaml', manifest({}, EXAMPLE_USERS));
  env.writeDesired(
    'pools.yaml',
    poolsYaml([
      { name: 'dev', engine: 'process', command: ['sleep', '300'], size: 2, maxSize: 3 },
      { name: 'nodocker', engine: 'docker', image: 'polydev-coverage-test:latest', size: 1, maxSize: 1 },
    ]),
  );
  const cfgFile = env.writeConfig({
    desiredStateDir: env.desiredDir,
    docker: { socket: path.join(env.dir, 'missing-docker.sock'), network: 'none' },
    process: { runDir },
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
