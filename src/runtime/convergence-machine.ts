import { assign, fromPromise, setup } from 'xstate';

export type DriftPolicy = 'correct' | 'warn' | 'ignore';

/** How many of a plan's actions are described in the context (and so in the persisted snapshot). */
export const SUMMARY_LIMIT = 20;

export interface ObserveOutput {
  /** How many actions a sync would take now; 0 when converged. */
  changes: number;
  /** Descriptions of the first SUMMARY_LIMIT of them, for events, status and logs. */
  summary: string[];
  /** Desired state differs from what was last converged: a non-empty plan is then a change, not drift. */
  desiredChanged: boolean;
}

const output = (event: unknown) => (event as { output: ObserveOutput }).output;

/**
 * When repeated failures make a resource Degraded (a condition and an alert, not just a retry):
 * at least afterFailures failures in a row AND the first of them at least afterMs ago. The count
 * alone would say nothing about time: a burst of retries (or a short backoff) reaches any count
 * within seconds, while a dockerd restart of half a minute is not worth paging anyone.
 */
export interface DegradedPolicy {
  afterFailures: number;
  afterMs: number;
}

/**
 * 5 failures over at least a minute. With the default backoff (200 ms doubling) the fifth failure
 * comes 3 s into an outage; the first failure past a minute, the 10th, about 100 s into it. An
 * engine or network blip of under a minute (a dockerd restart takes 5-30 s) stays in Backoff.
 */
export const DEFAULT_DEGRADED: DegradedPolicy = { afterFailures: 5, afterMs: 60_000 };

/** Pure: whether a streak of `failures` failures, the first `failingForMs` ago, is Degraded. */
export function isDegraded(failures: number, failingForMs: number, policy: DegradedPolicy = DEFAULT_DEGRADED): boolean {
  return failures >= policy.afterFailures && failingForMs >= policy.afterMs;
}

export interface ConvergenceContext {
  failures: number;
  /** Epoch ms of the run that failed first in the current streak; null when not failing. */
  failingSince: number | null;
  /** Epoch ms at which the current (or last) run started (RECONCILE's `at`). */
  runAt: number;
  lastError: string | null;
  /** The last observation's plan: its size and the first few descriptions. */
  changes: number;
  summary: string[];
  /** The plan that was found to be drift, kept apart (Verifying overwrites changes/summary). */
  driftChanges: number;
  driftSummary: string[];
  /** The last settled state was Ready or Drifted (so a non-empty plan now is drift, not a failure to converge). */
  wasReady: boolean;
  /** The last settled state was Drifted: the drift is already known and counted. */
  wasDrifted: boolean;
  /** Set during a run in which drift was found (from Ready to a non-empty plan). */
  driftDetected: boolean;
  driftPolicy: DriftPolicy;
  /** DegradedPolicy.afterFailures. */
  degradedAfter: number;
  /** DegradedPolicy.afterMs. */
  degradedAfterMs: number;
}

export type ConvergenceEvent =
  | {
      type: 'RECONCILE';
      driftPolicy: DriftPolicy;
      /** Epoch ms of this run (default now): failures are counted in time from it. */
      at?: number;
      /** Overrides the policy the machine was created (or persisted) with. */
      degraded?: DegradedPolicy;
      /**
       * The cause of the failure streak is gone (the engine is back, the spec changed): this run
       * starts a new streak, so a failure now is the first again (Backoff, base delay).
       */
      fresh?: boolean;
    }
  | { type: 'DELETE' };

/** States in which a run stops and the snapshot is persisted: nothing is in flight there. */
export const SETTLED_STATES = new Set(['Pending', 'Ready', 'Drifted', 'Backoff', 'Degraded', 'TerminatingBackoff', 'Deleted']);

// Each run provides the real actors (closures over that run's desired state) with machine.provide().
const notProvided = <T>(what: string) =>
  fromPromise<T>(async () => {
    throw new Error(`${what} actor not provided`);
  });

/**
 * The life of one converging resource (WarmPool, ProxyPool, …):
 *
 *   Pending → Observing → Converging → Verifying → Ready ⇄ (Observing) → Drifted | Converging
 *   any failure → Backoff → Observing; `degradedAfter` failures in a row, the first at least
 *   `degradedAfterMs` ago → Degraded; a RECONCILE marked `fresh` starts the count over
 *   DELETE → Terminating → Deleted (teardown failure → TerminatingBackoff → Terminating)
 *
 * Only settled states are persisted. A daemon that died mid-run restores the last settled
 * state and starts over with a fresh observation, so no stale plan is ever replayed.
 */
export const convergenceMachine = setup({
  types: {
    context: {} as ConvergenceContext,
    events: {} as ConvergenceEvent,
    input: {} as { degradedAfter?: number; degradedAfterMs?: number } | undefined,
  },
  actors: {
    observe: notProvided<ObserveOutput>('observe'),
    execute: notProvided<void>('execute'),
    teardown: notProvided<void>('teardown'),
  },
  actions: {
    beginRun: assign(({ context, event }) => {
      const run = event.type === 'RECONCILE' ? event : undefined;
      return {
        driftDetected: false,
        driftChanges: 0,
        driftSummary: [],
        driftPolicy: run?.driftPolicy ?? 'correct',
        runAt: run?.at ?? Date.now(),
        degradedAfter: run?.degraded?.afterFailures ?? context.degradedAfter,
        // Snapshots persisted before degradedAfterMs existed lack it.
        degradedAfterMs: run?.degraded?.afterMs ?? context.degradedAfterMs ?? DEFAULT_DEGRADED.afterMs,
        failures: run?.fresh ? 0 : context.failures,
        failingSince: run?.fresh ? null : (context.failingSince ?? null),
      };
    }),
    recordPlan: assign({ changes: ({ event }) => output(event).changes, summary: ({ event }) => output(event).summary }),
    markDrift: assign(({ context, event }) => {
      const drift = context.wasReady && !context.wasDrifted && !output(event).desiredChanged;
      return {
        driftDetected: drift,
        driftChanges: drift ? output(event).changes : 0,
        driftSummary: drift ? output(event).summary : [],
      };
    }),
    recordError: assign({
      lastError: ({ event }) => {
        const err = (event as unknown as { error: unknown }).error;
        return err instanceof Error ? err.message : String(err);
      },
    }),
  },
  guards: {
    converged: ({ event }) => output(event).changes === 0,
    ignoreDrift: ({ context, event }) => context.wasReady && !output(event).desiredChanged && context.driftPolicy === 'ignore',
    leaveDrift: ({ context, event }) => context.wasReady && !output(event).desiredChanged && context.driftPolicy === 'warn',
    tooManyFailures: ({ context }) =>
      isDegraded(context.failures, context.runAt - (context.failingSince ?? context.runAt), {
        afterFailures: context.degradedAfter,
        afterMs: context.degradedAfterMs,
      }),
  },
}).createMachine({
  id: 'convergence',
  initial: 'Pending',
  context: ({ input }) => ({
    failures: 0,
    failingSince: null,
    runAt: 0,
    lastError: null,
    changes: 0,
    summary: [],
    driftChanges: 0,
    driftSummary: [],
    wasReady: false,
    wasDrifted: false,
    driftDetected: false,
    driftPolicy: 'correct',
    degradedAfter: input?.degradedAfter ?? DEFAULT_DEGRADED.afterFailures,
    degradedAfterMs: input?.degradedAfterMs ?? DEFAULT_DEGRADED.afterMs,
  }),
  on: {
    // A deletion is a new cause: its teardown failures count from zero (TerminatingBackoff keeps its own count).
    DELETE: { target: '.Terminating', actions: assign({ failures: 0, failingSince: null }) },
  },
  states: {
    Pending: { on: { RECONCILE: { target: 'Observing', actions: 'beginRun' } } },
    Observing: {
      invoke: {
        src: 'observe',
        onDone: [
          { guard: 'converged', target: 'Ready', actions: 'recordPlan' },
          { guard: 'ignoreDrift', target: 'Ready', actions: 'recordPlan' },
          { guard: 'leaveDrift', target: 'Drifted', actions: ['recordPlan', 'markDrift'] },
          { target: 'Converging', actions: ['recordPlan', 'markDrift'] },
        ],
        onError: { target: 'Failing', actions: 'recordError' },
      },
    },
    Converging: {
      invoke: {
        src: 'execute',
        onDone: { target: 'Verifying' },
        onError: { target: 'Failing', actions: 'recordError' },
      },
    },
    Verifying: {
      invoke: {
        src: 'observe',
        onDone: [
          { guard: 'converged', target: 'Ready', actions: 'recordPlan' },
          {
            target: 'Failing',
            actions: [
              'recordPlan',
              assign({
                lastError: ({ event }) => {
                  const o = output(event);
                  return `not converged after sync: ${o.changes} change(s) still needed (${o.summary.slice(0, 3).join('; ')})`;
                },
              }),
            ],
          },
        ],
        onError: { target: 'Failing', actions: 'recordError' },
      },
    },
    Failing: {
      entry: assign({
        failures: ({ context }) => context.failures + 1,
        failingSince: ({ context }) => context.failingSince ?? context.runAt,
        wasReady: false,
        wasDrifted: false,
      }),
      always: [{ guard: 'tooManyFailures', target: 'Degraded' }, { target: 'Backoff' }],
    },
    Ready: {
      entry: assign({ failures: 0, failingSince: null, lastError: null, wasReady: true, wasDrifted: false }),
      on: { RECONCILE: { target: 'Observing', actions: 'beginRun' } },
    },
    Drifted: {
      entry: assign({ wasReady: true, wasDrifted: true }),
      on: { RECONCILE: { target: 'Observing', actions: 'beginRun' } },
    },
    Backoff: { on: { RECONCILE: { target: 'Observing', actions: 'beginRun' } } },
    Degraded: { on: { RECONCILE: { target: 'Observing', actions: 'beginRun' } } },
    Terminating: {
      invoke: {
        src: 'teardown',
        onDone: { target: 'Deleted' },
        onError: { target: 'TerminatingBackoff', actions: ['recordError', assign({ failures: ({ context }) => context.failures + 1 })] },
      },
    },
    TerminatingBackoff: { on: { RECONCILE: { target: 'Terminating' }, DELETE: { target: 'Terminating' } } },
    Deleted: { type: 'final' },
  },
});

export type ConvergenceMachine = typeof convergenceMachine;
