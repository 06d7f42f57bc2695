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

export interface ConvergenceContext {
  failures: number;
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
  degradedAfter: number;
}

export type ConvergenceEvent =
  | { type: 'RECONCILE'; driftPolicy: DriftPolicy }
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
 *   any failure → Backoff → Observing; `degradedAfter` failures in a row → Degraded
 *   DELETE → Terminating → Deleted (teardown failure → TerminatingBackoff → Terminating)
 *
 * Only settled states are persisted. A daemon that died mid-run restores the last settled
 * state and starts over with a fresh observation, so no stale plan is ever replayed.
 */
export const convergenceMachine = setup({
  types: {
    context: {} as ConvergenceContext,
    events: {} as ConvergenceEvent,
    input: {} as { degradedAfter?: number } | undefined,
  },
  actors: {
    observe: notProvided<ObserveOutput>('observe'),
    execute: notProvided<void>('execute'),
    teardown: notProvided<void>('teardown'),
  },
  actions: {
    beginRun: assign(({ event }) => ({
      driftDetected: false,
      driftChanges: 0,
      driftSummary: [],
      driftPolicy: event.type === 'RECONCILE' ? event.driftPolicy : 'correct',
    })),
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
    tooManyFailures: ({ context }) => context.failures >= context.degradedAfter,
  },
}).createMachine({
  id: 'convergence',
  initial: 'Pending',
  context: ({ input }) => ({
    failures: 0,
    lastError: null,
    changes: 0,
    summary: [],
    driftChanges: 0,
    driftSummary: [],
    wasReady: false,
    wasDrifted: false,
    driftDetected: false,
    driftPolicy: 'correct',
    degradedAfter: input?.degradedAfter ?? 5,
  }),
  on: {
    DELETE: { target: '.Terminating' },
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
      entry: assign({ failures: ({ context }) => context.failures + 1, wasReady: false, wasDrifted: false }),
      always: [{ guard: 'tooManyFailures', target: 'Degraded' }, { target: 'Backoff' }],
    },
    Ready: {
      entry: assign({ failures: 0, lastError: null, wasReady: true, wasDrifted: false }),
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
    TerminatingBackoff: { on: { RECONCILE: { target: 'Terminating' } } },
    Deleted: { type: 'final' },
  },
});

export type ConvergenceMachine = typeof convergenceMachine;
