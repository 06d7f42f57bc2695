// The shipped Prometheus alert rules (manifests/prometheus/alerts.yml) through the real promtool
// (Debian's `prometheus` package): they parse, and their unit tests (alerts.test.yml) pass.
// A missing promtool fails these tests; it is never a skip. The Grafana dashboard's queries go
// through a real Prometheus's parser (an instant query each).

import test from 'ava';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import YAML from 'yaml';
import { ALERTS_FILE, ALERTS_TEST_FILE, DASHBOARD_FILE, PROMTOOL_BIN, requireBinary, runTool, startPrometheus } from './helpers/prometheus.js';

interface Rule {
  alert?: string;
  record?: string;
  expr: string;
  for?: string;
  labels?: Record<string, string>;
  annotations?: Record<string, string>;
}

const rules = (): Rule[] => (YAML.parse(fs.readFileSync(ALERTS_FILE, 'utf8')) as { groups: Array<{ rules: Rule[] }> }).groups.flatMap((g) => g.rules);

/** The alerts the issue asks for: the daemon down, drift, Degraded, warm pool, engine, proxy ports, TURN, errors. */
const REQUIRED = [
  'PolydevReconcilerDown',
  'PolydevReconcilerAbsent',
  'PolydevDriftUnrepaired',
  'PolydevResourceDegraded',
  'PolydevWarmPoolBelowSize',
  'PolydevEngineUnavailable',
  'PolydevProxyPortsUnhealthy',
  'PolydevTurnServerDown',
  'PolydevReconcileErrorsRising',
];

test('promtool check rules accepts alerts.yml', async (t) => {
  const promtool = requireBinary(PROMTOOL_BIN, 'prometheus');
  const r = await runTool(promtool, ['check', 'rules', ALERTS_FILE]);
  t.is(r.code, 0, `${r.stdout}\n${r.stderr}`);
  const m = /SUCCESS: (\d+) rules found/.exec(r.stdout + r.stderr);
  t.truthy(m, r.stdout + r.stderr);
  t.is(Number(m![1]), rules().length);
});

test('promtool test rules: alerts.test.yml passes', async (t) => {
  const promtool = requireBinary(PROMTOOL_BIN, 'prometheus');
  const r = await runTool(promtool, ['test', 'rules', ALERTS_TEST_FILE]);
  t.is(r.code, 0, `${r.stdout}\n${r.stderr}`);
  t.regex(r.stdout + r.stderr, /SUCCESS/);
  t.notRegex(r.stdout + r.stderr, /FAILED/);
});

test('promtool test rules fails when an expectation is wrong (the runner can fail)', async (t) => {
  const promtool = requireBinary(PROMTOOL_BIN, 'prometheus');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'polydev-alerts-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  fs.copyFileSync(ALERTS_FILE, path.join(dir, 'alerts.yml'));
  const broken = fs.readFileSync(ALERTS_TEST_FILE, 'utf8').replace('summary: "ProxyPool/default has drift that is not repaired"', 'summary: "ProxyPool/other has drift that is not repaired"');
  t.not(broken, fs.readFileSync(ALERTS_TEST_FILE, 'utf8'), 'the mutation applied');
  fs.writeFileSync(path.join(dir, 'alerts.test.yml'), broken);
  const r = await runTool(promtool, ['test', 'rules', path.join(dir, 'alerts.test.yml')]);
  t.not(r.code, 0);
  t.regex(r.stdout + r.stderr, /FAILED[\s\S]*PolydevDriftUnrepaired/);
});

test('every required alert exists, with a severity and a summary and description naming what it is about', (t) => {
  const alerts = rules().filter((r) => r.alert);
  const names = alerts.map((r) => r.alert!);
  for (const name of REQUIRED) t.true(names.includes(name), `${name} is missing`);
  t.is(new Set(names).size, names.length, 'alert names are unique');
  for (const r of alerts) {
    t.true(['critical', 'warning', 'info'].includes(r.labels?.severity ?? ''), `${r.alert}: severity ${r.labels?.severity}`);
    t.truthy(r.annotations?.summary, `${r.alert}: summary`);
    t.truthy(r.annotations?.description, `${r.alert}: description`);
    // absent() has no labels to name: it is about the job as a whole.
    if (r.alert !== 'PolydevReconcilerAbsent') t.regex(r.annotations!.summary!, /\{\{ \$labels\.\w+ \}\}/, `${r.alert}: the summary names the resource`);
  }
});

test('every alert has a firing and a not-firing case in alerts.test.yml', (t) => {
  const spec = YAML.parse(fs.readFileSync(ALERTS_TEST_FILE, 'utf8')) as {
    rule_files: string[];
    tests: Array<{ alert_rule_test?: Array<{ alertname: string; exp_alerts?: unknown[] }> }>;
  };
  t.deepEqual(spec.rule_files, ['alerts.yml']);
  const cases = spec.tests.flatMap((g) => g.alert_rule_test ?? []);
  for (const r of rules().filter((x) => x.alert)) {
    const mine = cases.filter((c) => c.alertname === r.alert);
    t.true(mine.some((c) => (c.exp_alerts ?? []).length > 0), `${r.alert}: no firing case`);
    t.true(mine.some((c) => (c.exp_alerts ?? []).length === 0), `${r.alert}: no not-firing case`);
  }
});

interface Panel {
  id: number;
  type: string;
  title: string;
  gridPos?: { h: number; w: number; x: number; y: number };
  targets?: Array<{ expr: string; refId: string }>;
}

test('the Grafana dashboard: panels well formed, and every query parses in a real Prometheus', async (t) => {
  const dash = JSON.parse(fs.readFileSync(DASHBOARD_FILE, 'utf8')) as {
    uid: string;
    title: string;
    panels: Panel[];
    templating: { list: Array<{ name: string }> };
  };
  t.is(dash.uid, 'polydev-reconciler');
  t.deepEqual(dash.templating.list.map((v) => v.name), ['datasource', 'instance']);
  t.is(new Set(dash.panels.map((p) => p.id)).size, dash.panels.length, 'panel ids are unique');
  for (const p of dash.panels) {
    t.truthy(p.gridPos, `${p.title}: gridPos`);
    t.true(p.gridPos!.x + p.gridPos!.w <= 24, `${p.title}: fits the 24-column grid`);
  }
  const titles = dash.panels.filter((p) => p.type === 'row').map((p) => p.title);
  for (const section of ['Reconciles and work queue', 'Drift', 'Warm pools and claims', 'Proxy ports', 'TURN']) t.true(titles.includes(section), `row ${section}`);
  const queries = dash.panels.flatMap((p) => (p.targets ?? []).map((q) => ({ panel: p.title, expr: q.expr })));
  t.true(queries.length >= 30, `${queries.length} queries`);

  const prom = await startPrometheus(t, { config: 'global:\n  scrape_interval: 15s\nscrape_configs: []\n' });
  for (const { panel, expr } of queries) {
    // Grafana's variables as Grafana would substitute them.
    const promql = expr.replaceAll('$__rate_interval', '1m').replaceAll('$instance', '.*');
    t.notRegex(promql, /\$/, `${panel}: an unknown variable in ${expr}`);
    const res = await fetch(`${prom.url}/api/v1/query?query=${encodeURIComponent(promql)}`, { signal: AbortSignal.timeout(5000) });
    const body = (await res.json()) as { status: string; error?: string };
    t.is(body.status, 'success', `${panel}: ${expr}: ${body.error}`);
  }
  // The check can fail: a broken expression is refused.
  const bad = await fetch(`${prom.url}/api/v1/query?query=${encodeURIComponent('sum by (kind (polydev_reconcile_total)')}`);
  t.is(((await bad.json()) as { status: string }).status, 'error');
});
