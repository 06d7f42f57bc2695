// The alert rules of manifests/prometheus/alerts.yml, evaluated from the daemon's own state, so
// an operator without Prometheus and Alertmanager gets the same alerts (same alertname, severity,
// `for` and annotation templates; test/notifier-rules.test.ts holds the two side by side).
//
// Everything here is pure: the inputs are read from the store elsewhere (snapshot.ts), the clock
// is a parameter, and the only memory between evaluations is the caller's map of when each alert
// became active (Prometheus's pending state), which the notifier persists.

import { parseDuration } from '../util/duration.js';

export type Severity = 'critical' | 'warning';

export interface RuleDefinition {
  alertname: string;
  severity: Severity;
  /** As written in alerts.yml. */
  for: string;
  forMs: number;
  /** Prometheus template text, verbatim from alerts.yml (only $labels.X, $value and humanizePercentage are used there). */
  summary: string;
  description: string;
}

function rule(alertname: string, severity: Severity, forText: string, summary: string, description: string): RuleDefinition {
  return { alertname, severity, for: forText, forMs: parseDuration(forText), summary, description };
}

/** The rules mirrored here, keyed by alertname. */
export const RULES = {
  PolydevReconcilerNotReady: rule('PolydevReconcilerNotReady', 'warning', '10m',
    'polydev-reconciler {{ $labels.instance }} has not finished its first sync',
    'The daemon at {{ $labels.instance }} answers but has not reconciled every resource once in 10 minutes (/readyz is 503). Look at `polydev-reconciler get` for resources stuck in Pending or Backoff.'),
  PolydevDriftUnrepaired: rule('PolydevDriftUnrepaired', 'warning', '15m',
    '{{ $labels.kind }}/{{ $labels.name }} has drift that is not repaired',
    'The live state of {{ $labels.kind }} {{ $labels.name }} has differed from its desired state for 15 minutes and the daemon is not repairing it (driftPolicy warn, or the repair keeps failing). See `polydev-reconciler describe {{ $labels.kind }} {{ $labels.name }}` and `polydev-reconciler plan {{ $labels.kind }} {{ $labels.name }}`.'),
  PolydevResourceDegraded: rule('PolydevResourceDegraded', 'critical', '5m',
    '{{ $labels.kind }}/{{ $labels.name }} is Degraded',
    '{{ $labels.kind }} {{ $labels.name }} failed at least 5 reconciles in a row and has been Degraded for 5 minutes; it is retried every 5 minutes at most. Its Ready condition and events say why: `polydev-reconciler describe {{ $labels.kind }} {{ $labels.name }}`.'),
  PolydevReconcileErrorsRising: rule('PolydevReconcileErrorsRising', 'warning', '15m',
    '{{ $labels.kind }} reconciles fail ({{ $value | humanizePercentage }})',
    'More than 10% of {{ $labels.kind }} reconciles on {{ $labels.instance }} ended in an error for 15 minutes (now {{ $value | humanizePercentage }}). Look at `polydev-reconciler events {{ $labels.kind }}` for SyncFailed events.'),
  PolydevWarmPoolBelowSize: rule('PolydevWarmPoolBelowSize', 'warning', '10m',
    'WarmPool/{{ $labels.pool }} has only {{ $value }} warm container(s), below its size',
    'WarmPool {{ $labels.pool }} has had fewer warm containers than spec.size for 10 minutes (now {{ $value }}): claims get cold starts or 503 POOL_EXHAUSTED. Either claims fill maxSize, or refills fail (see PolydevEngineUnavailable and `polydev-reconciler describe warmpool {{ $labels.pool }}`).'),
  PolydevEngineUnavailable: rule('PolydevEngineUnavailable', 'critical', '2m',
    'WarmPool/{{ $labels.name }}: its container engine is unavailable',
    'The container engine of WarmPool {{ $labels.name }} (Docker socket or process engine) has not answered for 2 minutes: no refills, no cold starts, claims get 503 ENGINE_UNAVAILABLE. See `polydev-reconciler describe warmpool {{ $labels.name }}`.'),
  PolydevProxyPortsUnhealthy: rule('PolydevProxyPortsUnhealthy', 'warning', '10m',
    '{{ $value | humanizePercentage }} of checked proxy ports on {{ $labels.instance }} are unhealthy',
    'More than 20% of the proxy ports health-checked on {{ $labels.instance }} fail their check through the upstream proxy (now {{ $value | humanizePercentage }}) for 10 minutes. Users behind them have no egress. `polydev-reconciler proxyport check` lists them.'),
  PolydevTurnServerDown: rule('PolydevTurnServerDown', 'critical', '2m',
    'TurnServer/{{ $labels.server }} is down',
    'TurnServer {{ $labels.server }} has failed its STUN/TURN probes for 2 minutes and is not offered to browsers (ICE servers come from healthy servers only). See `polydev-reconciler describe turnserver {{ $labels.server }}`.'),
} as const satisfies Record<string, RuleDefinition>;

export type AlertName = keyof typeof RULES;

/** Rules of alerts.yml that cannot be evaluated from inside one daemon, and why. */
export const NOT_MIRRORED: Readonly<Record<string, string>> = {
  PolydevReconcilerDown: 'a daemon cannot report that it is down: this needs an outside watcher (Prometheus, or a dead man\'s switch)',
  PolydevReconcilerAbsent: 'about the scrape configuration, which only Prometheus sees',
  PolydevNoLeader: 'aggregates polydev_leader over every scraped daemon; one daemon sees only itself (and a standby does not notify)',
  PolydevSeveralLeaders: 'aggregates polydev_leader over every scraped daemon; one daemon sees only itself',
};

// Kinds left out of the per-resource gauges (polydev_resource_phase/ready), so out of the alerts on them.
const PER_RESOURCE_EXCLUDED_KINDS = new Set(['ProxyPort']);
const FAILED_PHASES = new Set(['Backoff', 'Degraded', 'TerminatingBackoff']);

// Thresholds of the rule expressions.
const PROXY_UNHEALTHY_RATIO = 0.2;
const RECONCILE_ERROR_RATIO = 0.1;

export interface ConditionState {
  type: string;
  status: string;
  reason: string;
  lastTransitionTime: string | null;
}

/** What the rules need of one resource's status. */
export interface ResourceState {
  kind: string;
  name: string;
  phase: string;
  conditions: ConditionState[];
  lastDriftAt: string | null;
  /** TurnServer status.healthy (what polydev_turn_up shows); null for other kinds or before a probe. */
  healthy: boolean | null;
}

export interface AlertInputs {
  /** The daemon's readiness (/readyz); undefined when the caller does not know it (the rule is skipped). */
  ready?: boolean | undefined;
  resources: ResourceState[];
  warmPools: Array<{ pool: string; size: number; warm: number }>;
  proxyPorts: { healthy: number; unhealthy: number };
  /** Share of failed reconciles per kind over the rate window (see reconcileErrorRatios). */
  reconcileErrorRatios: Array<{ kind: string; ratio: number }>;
}

export interface EvaluationContext {
  now: number;
  /** The instance label (Prometheus puts the scrape address there; here the host). */
  instance: string;
  /** fingerprint → epoch ms at which the alert became active, for alerts active at the previous evaluation. */
  previousActiveAt: ReadonlyMap<string, number>;
  /** At most this many alerts are returned (a mass drift of 10,000 ProxyPorts must not make 10,000). */
  maxAlerts?: number;
}

export interface EvaluatedAlert {
  alertname: AlertName;
  fingerprint: string;
  labels: Record<string, string>;
  annotations: { summary: string; description: string };
  /** When the condition became true (the start of `for`). */
  activeAt: number;
  /** When it fires or fired: activeAt + for (Prometheus sends this as startsAt). */
  startsAt: number;
  state: 'pending' | 'firing';
  value: number;
}

export interface Evaluation {
  alerts: EvaluatedAlert[];
  /** Active alerts left out because of maxAlerts. */
  truncated: number;
}

export const JOB = 'polydev-reconciler';
export const DEFAULT_MAX_ALERTS = 1000;

/** Alertmanager's fingerprint of a label set (FNV-1a 64 over sorted name, 0xff, value, 0xff), as 16 hex digits. */
export function fingerprint(labels: Record<string, string>): string {
  let h = 0xcbf29ce484222325n;
  const prime = 0x100000001b3n;
  const mask = 0xffffffffffffffffn;
  const add = (bytes: Uint8Array): void => {
    for (const b of bytes) h = ((h ^ BigInt(b)) * prime) & mask;
  };
  const sep = new Uint8Array([0xff]);
  const enc = new TextEncoder();
  for (const name of Object.keys(labels).sort()) {
    add(enc.encode(name));
    add(sep);
    add(enc.encode(labels[name]!));
    add(sep);
  }
  return h.toString(16).padStart(16, '0');
}

/** Prometheus's humanizePercentage: %.4g of value × 100, then "%". */
export function humanizePercentage(value: number): string {
  return `${formatG4(value * 100)}%`;
}

function formatG4(v: number): string {
  if (!Number.isFinite(v)) return String(v);
  // Number() drops the trailing zeros %g drops too.
  return String(Number(v.toPrecision(4)));
}

const TEMPLATE_PART = /\{\{\s*(.*?)\s*\}\}/g;

/** Expands the subset of Prometheus templating alerts.yml uses; anything else is a programming error. */
export function renderTemplate(template: string, labels: Record<string, string>, value: number): string {
  return template.replace(TEMPLATE_PART, (_all, expr: string) => {
    const label = /^\$labels\.([A-Za-z_][A-Za-z0-9_]*)$/.exec(expr);
    if (label) return labels[label[1]!] ?? '';
    if (expr === '$value') return Number.isFinite(value) ? String(value) : String(value);
    if (/^\$value\s*\|\s*humanizePercentage$/.test(expr)) return humanizePercentage(value);
    throw new Error(`unsupported template expression {{ ${expr} }}`);
  });
}

function timeOf(text: string | null | undefined, now: number): number | undefined {
  if (!text) return undefined;
  const t = Date.parse(text);
  if (!Number.isFinite(t)) return undefined;
  // A clock step backwards must not make an alert fire early or "start in the future".
  return Math.min(t, now);
}

function condition(r: ResourceState, type: string): ConditionState | undefined {
  return r.conditions.find((c) => c.type === type);
}

interface Candidate {
  alertname: AlertName;
  labels: Record<string, string>;
  value: number;
  /** When the condition is known to have started (a condition's lastTransitionTime), if it is. */
  since?: number | undefined;
}

function candidates(inputs: AlertInputs, now: number): Candidate[] {
  const out: Candidate[] = [];
  if (inputs.ready === false) out.push({ alertname: 'PolydevReconcilerNotReady', labels: {}, value: 0 });

  for (const r of inputs.resources) {
    const ready = condition(r, 'Ready');
    const readySince = ready && ready.status !== 'True' ? timeOf(ready.lastTransitionTime, now) : undefined;
    // polydev_drift_unrepaired: Drifted (driftPolicy warn), or failing while the drift that made it
    // leave Ready is unrepaired (lastDriftAt is written with the status of the run that found it).
    const driftUnrepaired =
      r.phase === 'Drifted' ||
      (FAILED_PHASES.has(r.phase) && r.lastDriftAt !== null && ready !== undefined && ready.status !== 'True' &&
        ready.lastTransitionTime !== null && r.lastDriftAt >= ready.lastTransitionTime);
    if (driftUnrepaired) {
      out.push({ alertname: 'PolydevDriftUnrepaired', labels: { kind: r.kind, name: r.name }, value: 1, since: readySince });
    }
    if (PER_RESOURCE_EXCLUDED_KINDS.has(r.kind)) continue;
    if (r.phase === 'Degraded') {
      const degraded = condition(r, 'Degraded');
      out.push({
        alertname: 'PolydevResourceDegraded',
        labels: { kind: r.kind, name: r.name, phase: 'Degraded' },
        value: 1,
        since: degraded?.status === 'True' ? timeOf(degraded.lastTransitionTime, now) : undefined,
      });
    }
    if (r.kind === 'WarmPool' && ready && ready.status !== 'True' && ready.reason === 'EngineUnavailable') {
      out.push({
        alertname: 'PolydevEngineUnavailable',
        labels: { kind: 'WarmPool', name: r.name, reason: 'EngineUnavailable' },
        value: 0,
        since: readySince,
      });
    }
    if (r.kind === 'TurnServer' && r.healthy === false) {
      out.push({
        alertname: 'PolydevTurnServerDown',
        labels: { kind: 'TurnServer', name: r.name, server: r.name },
        value: 0,
        since: readySince,
      });
    }
  }

  for (const p of inputs.warmPools) {
    if (p.warm < p.size) {
      out.push({ alertname: 'PolydevWarmPoolBelowSize', labels: { kind: 'WarmPool', name: p.pool, pool: p.pool }, value: p.warm });
    }
  }

  const checked = inputs.proxyPorts.healthy + inputs.proxyPorts.unhealthy;
  if (checked > 0) {
    const ratio = inputs.proxyPorts.unhealthy / checked;
    if (ratio > PROXY_UNHEALTHY_RATIO) out.push({ alertname: 'PolydevProxyPortsUnhealthy', labels: {}, value: ratio });
  }

  for (const { kind, ratio } of inputs.reconcileErrorRatios) {
    if (ratio > RECONCILE_ERROR_RATIO) out.push({ alertname: 'PolydevReconcileErrorsRising', labels: { kind }, value: ratio });
  }
  return out;
}

/**
 * The alerts active at ctx.now, pending or firing. An alert keeps the activeAt it had at the
 * previous evaluation; a new one starts at its condition's lastTransitionTime when there is one
 * (so a restarted daemon does not start `for` over), else now.
 */
export function evaluateAlerts(inputs: AlertInputs, ctx: EvaluationContext): Evaluation {
  const { now } = ctx;
  const byFingerprint = new Map<string, EvaluatedAlert>();
  for (const c of candidates(inputs, now)) {
    const def: RuleDefinition = RULES[c.alertname];
    const labels: Record<string, string> = {
      ...c.labels,
      alertname: def.alertname,
      severity: def.severity,
      job: JOB,
      instance: ctx.instance,
    };
    const fp = fingerprint(labels);
    if (byFingerprint.has(fp)) continue;
    const activeAt = ctx.previousActiveAt.get(fp) ?? c.since ?? now;
    const startsAt = activeAt + def.forMs;
    byFingerprint.set(fp, {
      alertname: c.alertname,
      fingerprint: fp,
      labels,
      annotations: {
        summary: renderTemplate(def.summary, labels, c.value),
        description: renderTemplate(def.description, labels, c.value),
      },
      activeAt,
      startsAt,
      state: now >= startsAt ? 'firing' : 'pending',
      value: c.value,
    });
  }
  // A stable order, so a cut at maxAlerts keeps the same alerts from one evaluation to the next
  // (those past it would otherwise flap between firing and resolved).
  const all = [...byFingerprint.values()].sort((a, b) =>
    a.alertname < b.alertname ? -1 : a.alertname > b.alertname ? 1 : a.fingerprint < b.fingerprint ? -1 : a.fingerprint > b.fingerprint ? 1 : 0);
  const max = ctx.maxAlerts ?? DEFAULT_MAX_ALERTS;
  return { alerts: all.slice(0, max), truncated: Math.max(0, all.length - max) };
}

/** One reading of polydev_reconcile_total (all results) and polydev_reconcile_errors_total, per kind. */
export interface ReconcileSample {
  at: number;
  total: ReadonlyMap<string, number>;
  errors: ReadonlyMap<string, number>;
}

/**
 * rate(errors[window]) / rate(total[window]) per kind, from the samples inside the window (the
 * oldest and the newest; the rates' common duration cancels out). No value without reconciles.
 */
export function reconcileErrorRatios(samples: readonly ReconcileSample[], now: number, windowMs: number): Array<{ kind: string; ratio: number }> {
  const inWindow = samples.filter((s) => s.at >= now - windowMs && s.at <= now);
  if (inWindow.length < 2) return [];
  const first = inWindow[0]!;
  const last = inWindow[inWindow.length - 1]!;
  const out: Array<{ kind: string; ratio: number }> = [];
  for (const [kind, total] of last.total) {
    const dTotal = total - (first.total.get(kind) ?? 0);
    if (dTotal <= 0) continue;
    const dErrors = (last.errors.get(kind) ?? 0) - (first.errors.get(kind) ?? 0);
    out.push({ kind, ratio: Math.max(0, dErrors) / dTotal });
  }
  return out.sort((a, b) => (a.kind < b.kind ? -1 : a.kind > b.kind ? 1 : 0));
}
