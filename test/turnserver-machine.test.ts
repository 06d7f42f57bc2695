// The TurnServer health machine (src/controllers/turnserver/machine.ts), event by event: no server.

import test from 'ava';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import YAML from 'yaml';
import {
  initialTurnSnapshot,
  isHealthy,
  nextTurnSnapshot,
  phaseOf,
  restartDueAt,
  restoreTurnSnapshot,
  turnServerMachine,
  type ProbeErrorClass,
  type RestartPolicy,
  type TurnEvent,
  type TurnSnapshot,
} from '../src/controllers/turnserver/machine.js';

const policy: RestartPolicy = { failureThreshold: 3, canRestart: true, maxRestarts: 2, windowMs: 600_000, backoffMs: 5_000 };

const ok = (at: number, p: RestartPolicy = policy): TurnEvent => ({ type: 'PROBE', ok: true, at, policy: p });
const fail = (at: number, errorClass: ProbeErrorClass = 'timeout', p: RestartPolicy = policy): TurnEvent => ({ type: 'PROBE', ok: false, errorClass, at, policy: p });
const restarted = (at: number, success = true): TurnEvent => ({ type: 'RESTARTED', ok: success, at, ...(success ? {} : { error: 'exit 1' }) });

/** Runs events from the initial state; returns the phase after each. */
function run(events: TurnEvent[], from: TurnSnapshot = initialTurnSnapshot()): { phases: string[]; last: TurnSnapshot } {
  let s = from;
  const phases: string[] = [];
  for (const e of events) {
    s = nextTurnSnapshot(s, e);
    phases.push(phaseOf(s));
  }
  return { phases, last: s };
}

test('Unknown → Healthy on the first good probe; Suspect(n) below the threshold; Healthy again on a success', (t) => {
  const { phases, last } = run([ok(0), fail(1), fail(2), ok(3)]);
  t.deepEqual(phases, ['Healthy', 'Suspect', 'Suspect', 'Healthy']);
  t.is(last.context.consecutiveFailures, 0);
  t.true(isHealthy(last));
});

test('Suspect is still healthy (under the threshold); the threshold makes a restart due', (t) => {
  const a = run([ok(0), fail(1), fail(2)]);
  t.is(a.last.context.consecutiveFailures, 2);
  t.true(isHealthy(a.last), 'two failures of three: still served');
  const b = run([fail(3)], a.last);
  t.deepEqual(b.phases, ['Restarting']);
  t.false(isHealthy(b.last));
  t.is(b.last.context.lastErrorClass, 'timeout');
});

test('Restarting → Recovering after the restart; Recovering → Healthy on a success, with the restart counted', (t) => {
  const { phases, last } = run([fail(0), fail(1), fail(2), restarted(3), fail(4), ok(5)]);
  t.deepEqual(phases, ['Suspect', 'Suspect', 'Restarting', 'Recovering', 'Recovering', 'Healthy']);
  t.is(last.context.totalRestarts, 1);
  t.deepEqual(last.context.recentRestarts, [3]);
  t.is(last.context.lastRestartAt, 3);
});

test('a success while a restart waits for its backoff cancels it', (t) => {
  const { phases } = run([fail(0), fail(1), fail(2), fail(3), ok(4)]);
  t.deepEqual(phases, ['Suspect', 'Suspect', 'Restarting', 'Restarting', 'Healthy']);
});

test('the budget: after maxRestarts within the window the server is Failed, keeps being probed, and is not restarted', (t) => {
  const three = (at: number) => [fail(at), fail(at + 1), fail(at + 2)];
  const { phases, last } = run([...three(0), restarted(3), ...three(10), restarted(13), ...three(20), fail(30)]);
  t.deepEqual(phases, [
    'Suspect', 'Suspect', 'Restarting', 'Recovering',
    'Recovering', 'Recovering', 'Restarting', 'Recovering',
    'Recovering', 'Recovering', 'Failed', 'Failed',
  ]);
  t.is(last.context.totalRestarts, 2);
  // A RESTARTED event in Failed changes nothing: nothing restarts from there.
  t.is(phaseOf(nextTurnSnapshot(last, restarted(40))), 'Failed');
  // Probing goes on, and a success is Healthy again.
  t.is(phaseOf(nextTurnSnapshot(last, ok(50))), 'Healthy');
});

test('restarts older than the window do not count against the budget', (t) => {
  const small: RestartPolicy = { ...policy, maxRestarts: 1, windowMs: 100 };
  const three = (at: number) => [fail(at, 'timeout', small), fail(at + 1, 'timeout', small), fail(at + 2, 'timeout', small)];
  const within = run([...three(0), restarted(3), ...three(10)]);
  t.is(phaseOf(within.last), 'Failed', 'second series inside the window: budget spent');
  const later = run([...three(0), restarted(3), ok(4), ...three(200)]);
  t.is(phaseOf(later.last), 'Restarting', 'the first restart has left the window');
  t.deepEqual(later.last.context.recentRestarts, [], 'and is pruned');
});

test('rejected credentials are AuthFailed at once: a configuration problem, never a restart', (t) => {
  const { phases, last } = run([ok(0), fail(1, 'auth_rejected'), fail(2, 'auth_rejected'), fail(3, 'auth_rejected'), fail(4, 'auth_rejected')]);
  t.deepEqual(phases, ['Healthy', 'AuthFailed', 'AuthFailed', 'AuthFailed', 'AuthFailed']);
  t.false(isHealthy(last));
  t.is(last.context.totalRestarts, 0);
  // Fixed credentials: Healthy. A hang after rejected credentials starts a fresh count.
  t.is(phaseOf(nextTurnSnapshot(last, ok(5))), 'Healthy');
  const hang = run([fail(5), fail(6), fail(7)], last);
  t.deepEqual(hang.phases, ['Suspect', 'Suspect', 'Restarting']);
});

test('without a remediation (or under driftPolicy warn) the threshold is Unhealthy: reported, never restarted', (t) => {
  const noRestart: RestartPolicy = { ...policy, canRestart: false };
  const { phases, last } = run([fail(0, 'timeout', noRestart), fail(1, 'timeout', noRestart), fail(2, 'timeout', noRestart), fail(3, 'timeout', noRestart)]);
  t.deepEqual(phases, ['Suspect', 'Suspect', 'Unhealthy', 'Unhealthy']);
  t.is(last.context.consecutiveFailures, 4);
  // A remediation added later: the next failure restarts.
  t.is(phaseOf(nextTurnSnapshot(last, fail(4))), 'Restarting');
});

test('failureThreshold 1: the first failure makes a restart due', (t) => {
  const one: RestartPolicy = { ...policy, failureThreshold: 1 };
  t.deepEqual(run([ok(0, one), fail(1, 'unreachable', one)]).phases, ['Healthy', 'Restarting']);
});

test('a failed restart command still counts against the budget and still leads to Recovering', (t) => {
  const { phases, last } = run([fail(0), fail(1), fail(2), restarted(3, false)]);
  t.deepEqual(phases, ['Suspect', 'Suspect', 'Restarting', 'Recovering']);
  t.is(last.context.totalRestarts, 1);
  t.is(last.context.lastRestartError, 'exit 1');
});

test('RESET (a new spec) starts over from Unknown, keeping the restart total', (t) => {
  const failedOnce = run([fail(0), fail(1), fail(2), restarted(3)]).last;
  const r = nextTurnSnapshot(failedOnce, { type: 'RESET' });
  t.is(phaseOf(r), 'Unknown');
  t.is(r.context.consecutiveFailures, 0);
  t.deepEqual(r.context.recentRestarts, []);
  t.is(r.context.totalRestarts, 1);
});

test('restart backoff doubles with each restart already in the window', (t) => {
  const ctx = (recent: number[]) => ({ ...initialTurnSnapshot().context, recentRestarts: recent, lastRestartAt: recent.at(-1) ?? null });
  t.is(restartDueAt(ctx([]), policy, 1000), 1000, 'first restart: at once');
  t.is(restartDueAt(ctx([1000]), policy, 2000), 1000 + 5_000);
  t.is(restartDueAt(ctx([1000, 7000]), policy, 8000), 7000 + 10_000);
  t.is(restartDueAt(ctx([1000]), { ...policy, windowMs: 500 }, 2000), 2000, 'a restart outside the window does not delay');
});

test('a persisted snapshot restores (a restarted daemon resumes); garbage starts fresh', (t) => {
  const s = run([fail(0), fail(1), fail(2)]).last;
  const json = JSON.parse(JSON.stringify(s)) as unknown;
  const back = restoreTurnSnapshot(json);
  t.is(phaseOf(back), 'Restarting');
  t.is(back.context.consecutiveFailures, 3);
  t.is(phaseOf(nextTurnSnapshot(back, restarted(3))), 'Recovering');
  t.is(phaseOf(restoreTurnSnapshot({ value: 'NoSuchState', context: {} })), 'Unknown');
  t.is(phaseOf(restoreTurnSnapshot('nonsense')), 'Unknown');
  t.is(phaseOf(restoreTurnSnapshot(undefined)), 'Unknown');
});

test('the CRD\'s status.phase description names exactly the machine\'s phases', (t) => {
  const file = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', 'crds', 'turnserver.yaml');
  const crd = YAML.parse(fs.readFileSync(file, 'utf8')) as {
    spec: { versions: Array<{ schema: { openAPIV3Schema: { properties: { status: { properties: { phase: { description: string } } } } } } }> };
  };
  const description = crd.spec.versions[0]!.schema.openAPIV3Schema.properties.status.properties.phase.description;
  // Each phase is listed as "Name (what it means)" or "Name,".
  const listed = [...description.matchAll(/\b([A-Z][A-Za-z]+)(?= \(|,)/g)].map((m) => m[1]!);
  t.deepEqual(listed.sort(), Object.keys(turnServerMachine.states).sort(), description);
});
