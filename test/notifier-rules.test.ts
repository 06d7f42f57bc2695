// The built-in notifier's rules (src/notify/rules.ts, pure) against manifests/prometheus/alerts.yml,
// and the store reading behind them (src/notify/snapshot.ts) on a real SQLite store.

import test from 'ava';
import fs from 'node:fs';
import path from 'node:path';
import YAML from 'yaml';

import { parseRetryAfter, safeOrigin } from '../src/notify/notifier.js';
import { alertmanagerPayload, slackPayload, SLACK_MAX_ATTACHMENTS, type NoticeAlert } from '../src/notify/payloads.js';
import {
  NOT_MIRRORED,
  RULES,
  evaluateAlerts,
  fingerprint,
  humanizePercentage,
  reconcileErrorRatios,
  renderTemplate,
  type AlertInputs,
  type EvaluatedAlert,
  type ResourceState,
} from '../src/notify/rules.js';
import { readStoreInputs } from '../src/notify/snapshot.js';
import { claimContainer, recordStarted, reserveSlots } from '../src/state/pools.js';
import { setCondition } from '../src/state/types.js';
import { REPO_ROOT, openStore } from './helpers/unit-fixtures.js';

const MIN = 60_000;
const NOW = Date.parse('2026-03-01T12:00:00.000Z');
const iso = (ms: number) => new Date(ms).toISOString();

function inputs(partial: Partial<AlertInputs>): AlertInputs {
  return { resources: [], warmPools: [], proxyPorts: { healthy: 0, unhealthy: 0 }, reconcileErrorRatios: [], ...partial };
}

function evaluate(i: AlertInputs, previous: Map<string, number> = new Map(), now = NOW): EvaluatedAlert[] {
  return evaluateAlerts(i, { now, instance: 'h1', previousActiveAt: previous }).alerts;
}

function resource(kind: string, name: string, phase: string, extra: Partial<ResourceState> = {}): ResourceState {
  return { kind, name, phase, conditions: [], lastDriftAt: null, healthy: null, ...extra };
}

const ready = (status: string, reason: string, at: number) => ({ type: 'Ready', status, reason, lastTransitionTime: iso(at) });

interface PromRule {
  alert?: string;
  for?: string;
  labels?: Record<string, string>;
  annotations?: Record<string, string>;
}

test('every rule of alerts.yml is mirrored with the same for, severity and annotation templates, or listed as not mirrorable', (t) => {
  const doc = YAML.parse(fs.readFileSync(path.join(REPO_ROOT, 'manifests', 'prometheus', 'alerts.yml'), 'utf8')) as {
    groups: Array<{ rules: PromRule[] }>;
  };
  const promRules = doc.groups.flatMap((g) => g.rules).filter((r) => r.alert);
  t.true(promRules.length >= 10);
  const seen = new Set<string>();
  for (const r of promRules) {
    const name = r.alert!;
    seen.add(name);
    if (name in NOT_MIRRORED) continue;
    const ours = (RULES as Record<string, (typeof RULES)[keyof typeof RULES]>)[name];
    if (!ours) {
      t.fail(`${name} is neither mirrored nor listed in NOT_MIRRORED`);
      continue;
    }
    t.is(r.for, ours.for, `${name}: for`);
    t.is(r.labels?.severity, ours.severity, `${name}: severity`);
    t.is(r.annotations?.summary, ours.summary, `${name}: summary`);
    t.is(r.annotations?.description, ours.description, `${name}: description`);
  }
  for (const name of [...Object.keys(RULES), ...Object.keys(NOT_MIRRORED)]) t.true(seen.has(name), `${name} is not in alerts.yml`);
});

test('fingerprints are Alertmanager\'s (prometheus/common test vectors) and independent of label order', (t) => {
  t.is(fingerprint({}), 'cbf29ce484222325');
  t.is(fingerprint({ name: 'garland, briggs', fear: 'love is not enough' }), '507a62d79ee76c9a');
  t.is(fingerprint({ a: 'b', c: 'd' }), fingerprint({ c: 'd', a: 'b' }));
  t.not(fingerprint({ a: 'b' }), fingerprint({ a: 'c' }));
});

test('templates: $labels, $value and humanizePercentage as Prometheus renders them; anything else refused', (t) => {
  t.is(humanizePercentage(0.25), '25%');
  t.is(humanizePercentage(1 / 3), '33.33%');
  t.is(renderTemplate('{{ $labels.kind }}/{{$labels.name}} {{ $value }} {{ $value | humanizePercentage }}', { kind: 'K', name: 'n' }, 0.5), 'K/n 0.5 50%');
  t.is(renderTemplate('{{ $labels.missing }}x', {}, 0), 'x');
  t.throws(() => renderTemplate('{{ $externalURL }}', {}, 0), { message: /unsupported/ });
});

test('PolydevResourceDegraded: from the Degraded condition\'s lastTransitionTime, for 5m; ProxyPorts left out like polydev_resource_phase', (t) => {
  const degraded = (kind: string, since: number) => resource(kind, 'x', 'Degraded', {
    conditions: [ready('False', 'SyncFailed', since), { type: 'Degraded', status: 'True', reason: 'RepeatedFailures', lastTransitionTime: iso(since) }],
  });
  const [a] = evaluate(inputs({ resources: [degraded('WarmPool', NOW - 6 * MIN)] }));
  t.is(a!.alertname, 'PolydevResourceDegraded');
  t.is(a!.state, 'firing');
  t.is(a!.activeAt, NOW - 6 * MIN);
  t.is(a!.startsAt, NOW - 1 * MIN);
  t.deepEqual(a!.labels, { alertname: 'PolydevResourceDegraded', severity: 'critical', kind: 'WarmPool', name: 'x', phase: 'Degraded', job: 'polydev-reconciler', instance: 'h1' });
  t.is(a!.annotations.summary, 'WarmPool/x is Degraded');
  t.is(evaluate(inputs({ resources: [degraded('WarmPool', NOW - 4 * MIN)] }))[0]!.state, 'pending');
  t.deepEqual(evaluate(inputs({ resources: [degraded('ProxyPort', NOW - 60 * MIN)] })), []);
  t.deepEqual(evaluate(inputs({ resources: [resource('WarmPool', 'x', 'Backoff', { conditions: [ready('False', 'SyncFailed', NOW - 60 * MIN)] })] })), []);
});

test('PolydevDriftUnrepaired: Drifted (driftPolicy warn), or failing since a drift was found; not for an older drift', (t) => {
  const drifted = resource('ProxyPool', 'default', 'Drifted', { conditions: [ready('False', 'DriftNotCorrected', NOW - 16 * MIN)] });
  const [a] = evaluate(inputs({ resources: [drifted] }));
  t.is(a!.alertname, 'PolydevDriftUnrepaired');
  t.is(a!.state, 'firing');
  t.is(a!.annotations.summary, 'ProxyPool/default has drift that is not repaired');
  t.is(evaluate(inputs({ resources: [{ ...drifted, conditions: [ready('False', 'DriftNotCorrected', NOW - 14 * MIN)] }] }))[0]!.state, 'pending');

  const leftReadyAt = NOW - 20 * MIN;
  const failingRepair = resource('ProxyPool', 'default', 'Backoff', { conditions: [ready('False', 'SyncFailed', leftReadyAt)], lastDriftAt: iso(leftReadyAt) });
  t.is(evaluate(inputs({ resources: [failingRepair] }))[0]?.alertname, 'PolydevDriftUnrepaired');
  // The last drift was repaired before this failure streak began: not this alert.
  const oldDrift = { ...failingRepair, lastDriftAt: iso(leftReadyAt - MIN) };
  t.deepEqual(evaluate(inputs({ resources: [oldDrift] })), []);
});

test('PolydevEngineUnavailable and PolydevTurnServerDown follow the Ready reason and status.healthy', (t) => {
  const pool = resource('WarmPool', 'gpu', 'Backoff', { conditions: [ready('False', 'EngineUnavailable', NOW - 3 * MIN)] });
  const [e] = evaluate(inputs({ resources: [pool] }));
  t.is(e!.alertname, 'PolydevEngineUnavailable');
  t.is(e!.state, 'firing');
  t.is(e!.labels.reason, 'EngineUnavailable');
  t.is(e!.annotations.summary, 'WarmPool/gpu: its container engine is unavailable');
  t.deepEqual(evaluate(inputs({ resources: [{ ...pool, conditions: [ready('False', 'ImageNotFound', NOW - 3 * MIN)] }] })), []);

  const turn = resource('TurnServer', 't1', 'Unhealthy', { healthy: false, conditions: [ready('False', 'ProbeFailing', NOW - 90_000)] });
  const [d] = evaluate(inputs({ resources: [turn] }));
  t.is(d!.alertname, 'PolydevTurnServerDown');
  t.is(d!.labels.server, 't1');
  t.is(d!.state, 'pending');
  t.is(d!.annotations.summary, 'TurnServer/t1 is down');
  // Suspect is still healthy (polydev_turn_up 1).
  t.deepEqual(evaluate(inputs({ resources: [resource('TurnServer', 't1', 'Suspect', { healthy: true })] })), []);
});

test('WarmPoolBelowSize, ProxyPortsUnhealthy, ReconcileErrorsRising and NotReady: thresholds, values in annotations, activeAt carried over', (t) => {
  const [below] = evaluate(inputs({ warmPools: [{ pool: 'dev', size: 3, warm: 1 }, { pool: 'full', size: 2, warm: 2 }] }));
  t.is(below!.alertname, 'PolydevWarmPoolBelowSize');
  t.is(below!.annotations.summary, 'WarmPool/dev has only 1 warm container(s), below its size');
  t.is(below!.activeAt, NOW);
  t.is(below!.state, 'pending');
  // The previous evaluation's activeAt is kept: 10 minutes later it fires.
  const again = evaluate(inputs({ warmPools: [{ pool: 'dev', size: 3, warm: 1 }] }), new Map([[below!.fingerprint, NOW]]), NOW + 10 * MIN);
  t.is(again[0]!.state, 'firing');
  t.is(again[0]!.activeAt, NOW);

  t.deepEqual(evaluate(inputs({ proxyPorts: { healthy: 8, unhealthy: 2 } })), [], 'exactly 20% is not more than 20%');
  const [ports] = evaluate(inputs({ proxyPorts: { healthy: 3, unhealthy: 1 } }));
  t.is(ports!.alertname, 'PolydevProxyPortsUnhealthy');
  t.is(ports!.annotations.summary, '25% of checked proxy ports on h1 are unhealthy');
  t.deepEqual(evaluate(inputs({ proxyPorts: { healthy: 0, unhealthy: 0 } })), []);

  const [errs] = evaluate(inputs({ reconcileErrorRatios: [{ kind: 'WarmPool', ratio: 0.5 }, { kind: 'ProxyPool', ratio: 0.1 }] }));
  t.is(errs!.alertname, 'PolydevReconcileErrorsRising');
  t.is(errs!.annotations.summary, 'WarmPool reconciles fail (50%)');

  t.is(evaluate(inputs({ ready: false }))[0]!.alertname, 'PolydevReconcilerNotReady');
  t.deepEqual(evaluate(inputs({ ready: true })), []);
  t.deepEqual(evaluate(inputs({})), [], 'readiness unknown: not evaluated');
});

test('reconcileErrorRatios: increase of errors over increase of reconciles within the window', (t) => {
  const s = (at: number, total: number, errors: number) => ({ at, total: new Map([['WarmPool', total]]), errors: new Map([['WarmPool', errors]]) });
  t.deepEqual(reconcileErrorRatios([s(NOW - 10 * MIN, 0, 0), s(NOW - 4 * MIN, 100, 10), s(NOW, 200, 40)], NOW, 5 * MIN), [{ kind: 'WarmPool', ratio: 0.3 }]);
  t.deepEqual(reconcileErrorRatios([s(NOW, 200, 40)], NOW, 5 * MIN), [], 'one sample is no rate');
  t.deepEqual(reconcileErrorRatios([s(NOW - MIN, 200, 40), s(NOW, 200, 40)], NOW, 5 * MIN), [], 'no reconciles, no ratio');
});

test('at most maxAlerts, always the same ones', (t) => {
  const many = Array.from({ length: 30 }, (_, i) => resource('ProxyPort', `p${String(i).padStart(2, '0')}`, 'Drifted', { conditions: [ready('False', 'DriftNotCorrected', NOW)] }));
  const a = evaluateAlerts(inputs({ resources: many }), { now: NOW, instance: 'h', previousActiveAt: new Map(), maxAlerts: 10 });
  const b = evaluateAlerts(inputs({ resources: [...many].reverse() }), { now: NOW, instance: 'h', previousActiveAt: new Map(), maxAlerts: 10 });
  t.is(a.alerts.length, 10);
  t.is(a.truncated, 20);
  t.deepEqual(a.alerts.map((x) => x.fingerprint), b.alerts.map((x) => x.fingerprint));
});

test('readStoreInputs reads statuses, pool fill and port health from a real store', (t) => {
  const { store } = openStore(t);
  store.upsertResource({ kind: 'WarmPool', name: 'dev', source: 'apply', spec: { provider: 'openai', engine: 'process', command: ['sleep', '1'], size: 3, maxSize: 5 } });
  store.setStatus('WarmPool', 'dev', { phase: 'Backoff', conditions: setCondition([], { type: 'Ready', status: 'False', reason: 'EngineUnavailable', message: 'no socket' }, iso(NOW)) });
  store.transaction(() => {
    const slots = reserveSlots(store, 'dev', 5, ['s1', 's2', 's3'].map((slot) => ({ slot, name: `dev-${slot}`, specHash: 'h', engine: 'process' })), 1);
    for (const s of slots) recordStarted(store, s.slot, { id: `p:${s.slot}`, address: '127.0.0.1', ready: true }, 1);
    claimContainer(store, {
      id: 'c1', pool: 'dev', userId: 'u', maxPerUser: 1, maxSize: 5, now: Date.now(), expiresAt: Date.now() + 60_000,
      coldSlot: () => {
        throw new Error('a warm container was there');
      },
    });
  });
  store.upsertResource({ kind: 'TurnServer', name: 't1', source: 'apply', spec: { host: '127.0.0.1' } });
  store.setStatus('TurnServer', 't1', { phase: 'Unhealthy', conditions: [], healthy: false });
  store.upsertResource({ kind: 'ProxyPool', name: 'default', source: 'apply', spec: {} });
  store.setStatus('ProxyPool', 'default', { phase: 'Ready', conditions: [] });
  for (const [user, healthy] of [['a', true], ['b', false], ['c', undefined]] as const) {
    store.upsertResource({ kind: 'ProxyPort', name: user, source: 'api', spec: { userId: user, sourceIP: '10.0.0.1' } });
    store.setStatus('ProxyPort', user, { phase: 'Ready', conditions: [], ...(healthy === undefined ? {} : { health: { healthy } }) });
  }
  const got = readStoreInputs(store);
  t.deepEqual(got.warmPools, [{ pool: 'dev', size: 3, warm: 2 }]);
  t.deepEqual(got.proxyPorts, { healthy: 1, unhealthy: 1 });
  // Ready resources of other kinds are not read at all.
  t.deepEqual(got.resources.map((r) => `${r.kind}/${r.name}`), ['TurnServer/t1', 'WarmPool/dev']);
  t.is(got.resources[0]!.healthy, false);
  t.deepEqual(got.resources[1]!.conditions, [{ type: 'Ready', status: 'False', reason: 'EngineUnavailable', lastTransitionTime: iso(NOW) }]);
  const names = evaluate(inputs(got)).map((a) => a.alertname).sort();
  t.deepEqual(names, ['PolydevEngineUnavailable', 'PolydevProxyPortsUnhealthy', 'PolydevTurnServerDown', 'PolydevWarmPoolBelowSize']);
});

test('payloads: common labels and annotations, mixed firing/resolved status, Slack escaping and attachment cap', (t) => {
  const alert = (name: string, status: 'firing' | 'resolved'): NoticeAlert => ({
    status,
    labels: { alertname: 'A', severity: 'warning', kind: 'WarmPool', name },
    annotations: { summary: `s <${name}> & co`, description: 'same' },
    startsAt: NOW,
    endsAt: status === 'resolved' ? NOW + MIN : null,
    fingerprint: fingerprint({ name }),
  });
  const group = { receiver: 'r', alertname: 'A', alerts: [alert('a', 'firing'), alert('b', 'resolved')], truncated: 3, externalURL: '' };
  const am = alertmanagerPayload(group);
  t.is(am.status, 'firing');
  t.is(am.truncatedAlerts, 3);
  t.deepEqual(am.commonLabels, { alertname: 'A', severity: 'warning', kind: 'WarmPool' });
  t.deepEqual(am.commonAnnotations, { description: 'same' });
  t.is(am.alerts[1]!.endsAt, iso(NOW + MIN));
  const slack = slackPayload(group);
  t.is(slack.text, '[FIRING:1 RESOLVED:1] A (and 3 more)');
  t.is(slack.attachments[0]!.title, '[FIRING] s &lt;a&gt; &amp; co');
  t.deepEqual(slack.attachments.map((a) => a.color), ['warning', 'good']);
  const big = slackPayload({ ...group, truncated: 0, alerts: Array.from({ length: 30 }, (_, i) => alert(`n${i}`, 'firing')) });
  t.is(big.attachments.length, SLACK_MAX_ATTACHMENTS);
  t.is(big.text, `[FIRING:30] A (and ${30 - SLACK_MAX_ATTACHMENTS} more)`);
});

test('Retry-After in seconds or as a date; origins without path, query or credentials', (t) => {
  t.is(parseRetryAfter('7', NOW), 7000);
  t.is(parseRetryAfter(new Date(NOW + 3000).toUTCString(), NOW), 3000);
  t.is(parseRetryAfter('soon', NOW), undefined);
  t.is(parseRetryAfter(null, NOW), undefined);
  t.is(parseRetryAfter('999999', NOW), 3_600_000, 'capped');
  t.is(safeOrigin('https://user:pw@hooks.slack.com/services/T/B/secret?x=1'), 'https://hooks.slack.com');
  t.is(safeOrigin('not a url'), '(invalid URL)');
});
