// The convergence machine (src/runtime/convergence-machine.ts) driven with actors the test controls.

import test from 'ava';
import { createActor, fromPromise, waitFor, type Actor } from 'xstate';
import {
  convergenceMachine,
  DEFAULT_DEGRADED,
  isDegraded,
  SETTLED_STATES,
  SUMMARY_LIMIT,
  type DegradedPolicy,
  type DriftPolicy,
  type ObserveOutput,
} from '../src/runtime/convergence-machine.js';

interface Script {
  /** Outputs (or errors) of successive observe() calls; the last one repeats. */
  observe: Array<ObserveOutput | Error>;
  execute?: Array<void | Error>;
  teardown?: Array<void | Error>;
}

interface Harness {
  actor: Actor<typeof convergenceMachine>;
  calls: { observe: number; execute: number; teardown: number };
  script: Script;
  /** Sends RECONCILE and waits until the machine settles again. */
  reconcile(driftPolicy?: DriftPolicy, run?: { at?: number; fresh?: boolean; degraded?: DegradedPolicy }): Promise<string>;
  state(): string;
}

const plan = (n: number, desiredChanged = false): ObserveOutput => ({
  changes: n,
  summary: Array.from({ length: Math.min(n, SUMMARY_LIMIT) }, (_, i) => `add rule ${i}`),
  desiredChanged,
});
const EMPTY = plan(0);

function machineFor(script: Script, calls: Harness['calls']) {
  const pick = <T>(list: T[] | undefined, i: number): T | undefined => (list && list.length ? list[Math.min(i, list.length - 1)] : undefined);
  return convergenceMachine.provide({
    actors: {
      observe: fromPromise<ObserveOutput>(async () => {
        const out = pick(script.observe, calls.observe++);
        if (out instanceof Error) throw out;
        return out ?? EMPTY;
      }),
      execute: fromPromise<void>(async () => {
        const out = pick(script.execute, calls.execute++);
        if (out instanceof Error) throw out;
      }),
      teardown: fromPromise<void>(async () => {
        const out = pick(script.teardown, calls.teardown++);
        if (out instanceof Error) throw out;
      }),
    },
  });
}

function settled(actor: Actor<typeof convergenceMachine>): Promise<unknown> {
  return waitFor(actor, (s) => SETTLED_STATES.has(String(s.value)) || s.status === 'done', { timeout: 2000 });
}

function harness(
  t: import('ava').ExecutionContext,
  script: Script,
  input: { degradedAfter?: number; degradedAfterMs?: number } = {},
  snapshot?: unknown,
): Harness {
  const calls = { observe: 0, execute: 0, teardown: 0 };
  const machine = machineFor(script, calls);
  const actor = snapshot
    ? createActor(machine, { snapshot: snapshot as never, input })
    : createActor(machine, { input });
  actor.start();
  t.teardown(() => actor.stop());
  const h: Harness = {
    actor,
    calls,
    script,
    state: () => String(actor.getSnapshot().value),
    async reconcile(driftPolicy: DriftPolicy = 'correct', run = {}) {
      actor.send({ type: 'RECONCILE', driftPolicy, ...run });
      // The event moves the machine out of its settled state synchronously, unless it has no
      // transition for RECONCILE at all; either way wait for the next settled state.
      await settled(actor);
      return h.state();
    },
  };
  return h;
}

/** Records every state the actor passes through. */
function trace(actor: Actor<typeof convergenceMachine>): string[] {
  const seen: string[] = [String(actor.getSnapshot().value)];
  actor.subscribe((s) => {
    const v = String(s.value);
    if (seen[seen.length - 1] !== v) seen.push(v);
  });
  return seen;
}

test('Pending → Observing → Ready when the first plan is empty', async (t) => {
  const h = harness(t, { observe: [EMPTY] });
  t.is(h.state(), 'Pending');
  const states = trace(h.actor);
  t.is(await h.reconcile(), 'Ready');
  t.deepEqual(states, ['Pending', 'Observing', 'Ready']);
  t.is(h.calls.execute, 0);
  const ctx = h.actor.getSnapshot().context;
  t.false(ctx.driftDetected, 'the first convergence is not drift');
  t.true(ctx.wasReady);
  t.is(ctx.changes, 0);
  t.deepEqual(ctx.summary, []);
});

test('a non-empty plan goes Converging → Verifying → Ready', async (t) => {
  const h = harness(t, { observe: [plan(3), EMPTY] });
  const states = trace(h.actor);
  t.is(await h.reconcile(), 'Ready');
  t.deepEqual(states, ['Pending', 'Observing', 'Converging', 'Verifying', 'Ready']);
  t.is(h.calls.execute, 1);
  t.is(h.calls.observe, 2, 'observed again to verify');
  t.false(h.actor.getSnapshot().context.driftDetected, 'converging from Pending is not drift');
  t.is(h.actor.getSnapshot().context.failures, 0);
});

test('drift with policy correct: from Ready, a plan the desired state did not cause is drift, repaired, ends Ready', async (t) => {
  const h = harness(t, { observe: [EMPTY, plan(2), EMPTY] });
  t.is(await h.reconcile(), 'Ready');
  const states = trace(h.actor);
  t.is(await h.reconcile('correct'), 'Ready');
  t.deepEqual(states, ['Ready', 'Observing', 'Converging', 'Verifying', 'Ready']);
  const ctx = h.actor.getSnapshot().context;
  t.true(ctx.driftDetected);
  t.is(h.calls.execute, 1);
  t.is(ctx.changes, 0, 'the last observation (Verifying) found nothing left');
  t.is(ctx.driftChanges, 2, 'what was repaired is kept apart for the DriftDetected event');
  t.deepEqual(ctx.driftSummary, ['add rule 0', 'add rule 1']);

  // The next clean run clears the flag.
  h.script.observe = [EMPTY];
  h.calls.observe = 0;
  t.is(await h.reconcile(), 'Ready');
  t.false(h.actor.getSnapshot().context.driftDetected);
});

test('drift with policy warn: ends Drifted, nothing is executed', async (t) => {
  const h = harness(t, { observe: [EMPTY, plan(2)] });
  t.is(await h.reconcile(), 'Ready');
  t.is(await h.reconcile('warn'), 'Drifted');
  const ctx = h.actor.getSnapshot().context;
  t.true(ctx.driftDetected);
  t.is(ctx.changes, 2, 'the plan is kept for status and events');
  t.deepEqual(ctx.summary, ['add rule 0', 'add rule 1']);
  t.is(ctx.driftChanges, 2);
  t.is(h.calls.execute, 0);
  // Still drifted on the next run: still not repaired, and the same drift is not counted twice.
  t.is(await h.reconcile('warn'), 'Drifted');
  t.false(h.actor.getSnapshot().context.driftDetected, 'one drift, one detection');
  t.is(h.calls.execute, 0);
  // Switching the policy to correct repairs it (still the same drift, not a new one).
  h.script.observe = [plan(2), EMPTY];
  h.calls.observe = 0;
  t.is(await h.reconcile('correct'), 'Ready');
  t.is(h.calls.execute, 1);
  t.false(h.actor.getSnapshot().context.driftDetected);
  // A new drift after that is detected again.
  h.script.observe = [plan(1), EMPTY];
  h.calls.observe = 0;
  t.is(await h.reconcile('warn'), 'Drifted');
  t.true(h.actor.getSnapshot().context.driftDetected);
});

test('drift with policy ignore: stays Ready, nothing executed, not flagged', async (t) => {
  const h = harness(t, { observe: [EMPTY, plan(2)] });
  t.is(await h.reconcile(), 'Ready');
  t.is(await h.reconcile('ignore'), 'Ready');
  const ctx = h.actor.getSnapshot().context;
  t.false(ctx.driftDetected);
  t.is(h.calls.execute, 0);
});

test('a plan caused by a desired-state change is not drift, whatever the policy', async (t) => {
  for (const policy of ['correct', 'warn', 'ignore'] as const) {
    const h = harness(t, { observe: [EMPTY, plan(2, true), EMPTY] });
    t.is(await h.reconcile(), 'Ready');
    t.is(await h.reconcile(policy), 'Ready', policy);
    t.false(h.actor.getSnapshot().context.driftDetected, policy);
    t.is(h.calls.execute, 1, `${policy}: a change is always applied`);
  }
});

test('execute failing goes to Backoff with the error; 5 failures in a row over a minute → Degraded; success resets', async (t) => {
  const h = harness(t, { observe: [plan(1)], execute: [new Error('iptables-restore: exit 4')] });
  const t0 = 1_700_000_000_000;
  // Failures 20 s apart: the fourth is a minute after the first, but only the fourth.
  for (let i = 1; i <= 4; i++) {
    t.is(await h.reconcile('correct', { at: t0 + (i - 1) * 20_000 }), 'Backoff', `failure ${i}`);
    t.is(h.actor.getSnapshot().context.failures, i);
    t.is(h.actor.getSnapshot().context.failingSince, t0, 'the streak started with the first failure');
    t.is(h.actor.getSnapshot().context.lastError, 'iptables-restore: exit 4');
  }
  t.is(await h.reconcile('correct', { at: t0 + 80_000 }), 'Degraded', 'the fifth failure in a row, 80 s into the streak');
  t.is(h.actor.getSnapshot().context.failures, 5);
  t.is(h.calls.execute, 5);

  // Recovery from Degraded.
  h.script.observe = [plan(1), EMPTY];
  h.script.execute = [undefined];
  h.calls.observe = 0;
  h.calls.execute = 0;
  t.is(await h.reconcile(), 'Ready');
  const ctx = h.actor.getSnapshot().context;
  t.is(ctx.failures, 0);
  t.is(ctx.failingSince, null);
  t.is(ctx.lastError, null);
});

test('isDegraded: enough failures AND long enough, never either alone', (t) => {
  const p = { afterFailures: 5, afterMs: 60_000 };
  const table: Array<[failures: number, failingForMs: number, degraded: boolean]> = [
    [0, 0, false],
    [1, 3_600_000, false], // one failure an hour ago: a single retry pending, not a pattern
    [4, 600_000, false],
    [5, 59_999, false], // five quick failures (a burst, a short backoff): not yet
    [12, 700, false], // the burst: 12 runs in 0.7 s
    [5, 60_000, true],
    [40, 86_400_000, true],
  ];
  for (const [failures, ms, want] of table) t.is(isDegraded(failures, ms, p), want, `${failures} failures over ${ms} ms`);
  t.deepEqual(DEFAULT_DEGRADED, p, 'the default is 5 failures over at least a minute');
  t.true(isDegraded(2, 0, { afterFailures: 2, afterMs: 0 }), 'afterMs 0: the count alone, as before');
});

test('a burst of failures within seconds stays Backoff whatever the count; the first failure past afterMs is Degraded', async (t) => {
  const h = harness(t, { observe: [new Error('connect ENOENT /var/run/docker.sock')] });
  const t0 = 1_700_000_000_000;
  for (let i = 0; i < 30; i++) t.is(await h.reconcile('correct', { at: t0 + i * 25 }), 'Backoff', `failure ${i + 1}, ${i * 25} ms in`);
  t.is(h.actor.getSnapshot().context.failures, 30, 'every failure is counted');
  t.is(await h.reconcile('correct', { at: t0 + 60_000 }), 'Degraded');
});

test('a fresh RECONCILE (the cause went away) starts the failure count over, even from Degraded', async (t) => {
  const h = harness(t, { observe: [new Error('not reachable')] }, { degradedAfter: 2, degradedAfterMs: 0 });
  const t0 = 1_700_000_000_000;
  await h.reconcile('correct', { at: t0 });
  t.is(await h.reconcile('correct', { at: t0 + 1000 }), 'Degraded');
  t.is(await h.reconcile('correct', { at: t0 + 5000, fresh: true }), 'Backoff', 'the first failure of a new streak');
  t.is(h.actor.getSnapshot().context.failures, 1);
  t.is(h.actor.getSnapshot().context.failingSince, t0 + 5000);
  t.is(await h.reconcile('correct', { at: t0 + 6000 }), 'Degraded', 'and the new streak counts on');
});

test('the Degraded policy on RECONCILE overrides the one the machine was created or persisted with', async (t) => {
  const h = harness(t, { observe: [new Error('down')] });
  const t0 = 1_700_000_000_000;
  const quick = { afterFailures: 3, afterMs: 1000 };
  t.is(await h.reconcile('correct', { at: t0, degraded: quick }), 'Backoff');
  t.is(await h.reconcile('correct', { at: t0 + 10, degraded: quick }), 'Backoff');
  t.is(await h.reconcile('correct', { at: t0 + 20, degraded: quick }), 'Backoff', '3 failures, but within 20 ms');
  t.is(await h.reconcile('correct', { at: t0 + 1000, degraded: quick }), 'Degraded');
});

test('degradedAfter comes from input', async (t) => {
  const h = harness(t, { observe: [new Error('cannot list chains')] }, { degradedAfter: 2, degradedAfterMs: 0 });
  t.is(await h.reconcile(), 'Backoff');
  t.is(await h.reconcile(), 'Degraded');
  t.is(h.actor.getSnapshot().context.lastError, 'cannot list chains');
});

test('observe failing goes to Backoff with the error message and forgets Ready', async (t) => {
  const h = harness(t, { observe: [EMPTY] });
  h.script.observe = [new Error('docker unreachable')];
  t.is(await h.reconcile(), 'Backoff');
  t.is(h.actor.getSnapshot().context.lastError, 'docker unreachable');
  t.false(h.actor.getSnapshot().context.wasReady);
});

test('a failure after Ready is not drift on the next run: the next plan is just convergence', async (t) => {
  const h = harness(t, { observe: [EMPTY, new Error('flaky'), plan(1), EMPTY] });
  t.is(await h.reconcile(), 'Ready');
  t.is(await h.reconcile(), 'Backoff');
  t.is(await h.reconcile('warn'), 'Ready', 'from Backoff a plan is applied even with warn');
  t.false(h.actor.getSnapshot().context.driftDetected);
  t.is(h.calls.execute, 1);
});

test('Verifying with a plan still non-empty goes to Backoff with "not converged"', async (t) => {
  const h = harness(t, { observe: [plan(3), plan(2)] });
  const states = trace(h.actor);
  t.is(await h.reconcile(), 'Backoff');
  t.deepEqual(states, ['Pending', 'Observing', 'Converging', 'Verifying', 'Backoff']);
  const ctx = h.actor.getSnapshot().context;
  t.regex(ctx.lastError ?? '', /not converged/);
  t.regex(ctx.lastError ?? '', /2 change\(s\) still needed \(add rule 0; add rule 1\)/);
  t.is(ctx.failures, 1);
  t.is(ctx.changes, 2);
  t.deepEqual(ctx.summary, ['add rule 0', 'add rule 1']);
});

test('DELETE → Terminating → Deleted (final), tearing down once', async (t) => {
  const h = harness(t, { observe: [EMPTY] });
  t.is(await h.reconcile(), 'Ready');
  const states = trace(h.actor);
  h.actor.send({ type: 'DELETE' });
  await settled(h.actor);
  t.is(h.state(), 'Deleted');
  t.is(h.actor.getSnapshot().status, 'done');
  t.deepEqual(states, ['Ready', 'Terminating', 'Deleted']);
  t.is(h.calls.teardown, 1);
});

test('DELETE works from Pending and mid-run too', async (t) => {
  const h = harness(t, { observe: [EMPTY] });
  h.actor.send({ type: 'DELETE' });
  await settled(h.actor);
  t.is(h.state(), 'Deleted');

  const h2 = harness(t, { observe: [plan(1), EMPTY] });
  h2.actor.send({ type: 'RECONCILE', driftPolicy: 'correct' });
  t.is(h2.state(), 'Observing');
  h2.actor.send({ type: 'DELETE' });
  await settled(h2.actor);
  t.is(h2.state(), 'Deleted');
  t.is(h2.calls.teardown, 1);
});

test('teardown failing → TerminatingBackoff; the next RECONCILE retries the teardown', async (t) => {
  const h = harness(t, { observe: [EMPTY], teardown: [new Error('chain busy'), undefined] });
  h.actor.send({ type: 'DELETE' });
  await settled(h.actor);
  t.is(h.state(), 'TerminatingBackoff');
  t.is(h.actor.getSnapshot().context.lastError, 'chain busy');
  t.is(h.actor.getSnapshot().context.failures, 1);
  t.is(await h.reconcile(), 'Deleted');
  t.is(h.calls.teardown, 2);
  t.is(h.calls.observe, 0, 'a resource being deleted is never converged again');
});

test('a persisted snapshot from Ready restores Ready and carries on (drift is still recognised)', async (t) => {
  const first = harness(t, { observe: [plan(1), EMPTY] });
  t.is(await first.reconcile(), 'Ready');
  const persisted = JSON.parse(JSON.stringify(first.actor.getPersistedSnapshot()));
  first.actor.stop();

  const restored = harness(t, { observe: [plan(2), EMPTY] }, {}, persisted);
  t.is(restored.state(), 'Ready');
  t.true(restored.actor.getSnapshot().context.wasReady);
  t.is(await restored.reconcile(), 'Ready');
  t.true(restored.actor.getSnapshot().context.driftDetected, 'drift after a restart is still drift');
  t.is(restored.calls.execute, 1);
});

test('a persisted snapshot from Backoff keeps the failure count and the streak start toward Degraded', async (t) => {
  const first = harness(t, { observe: [new Error('down')] });
  const t0 = 1_700_000_000_000;
  for (let i = 0; i < 3; i++) await first.reconcile('correct', { at: t0 + i * 1000 });
  t.is(first.state(), 'Backoff');
  const persisted = JSON.parse(JSON.stringify(first.actor.getPersistedSnapshot()));
  first.actor.stop();

  const restored = harness(t, { observe: [new Error('still down')] }, {}, persisted);
  t.is(restored.state(), 'Backoff');
  t.is(restored.actor.getSnapshot().context.failures, 3);
  t.is(restored.actor.getSnapshot().context.failingSince, t0);
  t.is(await restored.reconcile('correct', { at: t0 + 30_000 }), 'Backoff');
  t.is(await restored.reconcile('correct', { at: t0 + 60_000 }), 'Degraded');
});

test('a snapshot persisted before failures were counted in time still restores and counts', async (t) => {
  const first = harness(t, { observe: [new Error('down')] });
  await first.reconcile('correct', { at: 1000 });
  const persisted = JSON.parse(JSON.stringify(first.actor.getPersistedSnapshot())) as { context: Record<string, unknown> };
  first.actor.stop();
  // What an older build persisted: no failingSince, runAt or degradedAfterMs.
  delete persisted.context['failingSince'];
  delete persisted.context['runAt'];
  delete persisted.context['degradedAfterMs'];
  const restored = harness(t, { observe: [new Error('still down')] }, {}, persisted);
  t.is(await restored.reconcile('correct', { at: 50_000 }), 'Backoff');
  t.is(restored.actor.getSnapshot().context.failures, 2);
  t.is(restored.actor.getSnapshot().context.failingSince, 50_000, 'the streak is timed from the first failure this build saw');
  t.is(restored.actor.getSnapshot().context.degradedAfterMs, DEFAULT_DEGRADED.afterMs);
});

test('a deletion starts the teardown failure count from zero', async (t) => {
  const h = harness(t, { observe: [new Error('down')], teardown: [new Error('engine down'), undefined] });
  for (let i = 0; i < 4; i++) await h.reconcile('correct', { at: i });
  t.is(h.actor.getSnapshot().context.failures, 4);
  h.actor.send({ type: 'DELETE' });
  await settled(h.actor);
  t.is(h.state(), 'TerminatingBackoff');
  t.is(h.actor.getSnapshot().context.failures, 1, 'the first teardown failure, not the fifth failure');
  h.actor.send({ type: 'DELETE' });
  await settled(h.actor);
  t.is(h.state(), 'Deleted');
});

test('only settled states are listed as settled', (t) => {
  for (const s of ['Pending', 'Ready', 'Drifted', 'Backoff', 'Degraded', 'TerminatingBackoff', 'Deleted']) t.true(SETTLED_STATES.has(s), s);
  for (const s of ['Observing', 'Converging', 'Verifying', 'Failing', 'Terminating']) t.false(SETTLED_STATES.has(s), s);
});
