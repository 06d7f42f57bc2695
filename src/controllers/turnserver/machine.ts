import { assign, getInitialSnapshot, getNextSnapshot, setup, type SnapshotFrom } from 'xstate';

/**
 * The health of one TURN server:
 *
 *   Unknown → Healthy ⇄ Suspect(n) → Restarting → Recovering → Healthy
 *                                                 Recovering → Restarting (threshold again, budget left)
 *   threshold reached with the restart budget spent          → Failed (probing goes on; no restart)
 *   threshold reached and restarts not allowed (no remediation configured, or driftPolicy warn)
 *                                                             → Unhealthy (reported, not touched)
 *   authentication rejected (401/438 after credentials)       → AuthFailed (a configuration
 *                                                               problem: reported, never restarted)
 *   any successful probe                                      → Healthy
 *
 * The machine has no actors: the controller feeds it probe and restart results and acts on the
 * state it lands in (a pure function of events, so it is table-tested without a server).
 */

export type ProbeErrorClass = 'unreachable' | 'timeout' | 'auth_rejected' | 'allocation_refused' | 'malformed';

/** What the spec allows, sent with every event (a spec change takes effect at the next probe). */
export interface RestartPolicy {
  failureThreshold: number;
  /** A remediation is configured and driftPolicy is correct. */
  canRestart: boolean;
  maxRestarts: number;
  windowMs: number;
  /** Wait before the first restart of a window's series; doubled for each restart already in the window. */
  backoffMs: number;
}

export type TurnEvent =
  | { type: 'PROBE'; ok: boolean; errorClass?: ProbeErrorClass; at: number; policy: RestartPolicy }
  | { type: 'RESTARTED'; ok: boolean; at: number; error?: string }
  /** The spec changed (new generation): start over, as a new server. */
  | { type: 'RESET' };

export interface TurnContext {
  consecutiveFailures: number;
  /** Epoch ms of the restarts within the window (the budget), oldest first. */
  recentRestarts: number[];
  totalRestarts: number;
  lastRestartAt: number | null;
  lastRestartError: string | null;
  lastErrorClass: ProbeErrorClass | null;
}

export type TurnPhase = 'Unknown' | 'Healthy' | 'Suspect' | 'Unhealthy' | 'AuthFailed' | 'Restarting' | 'Recovering' | 'Failed';

const inWindow = (restarts: number[], at: number, windowMs: number) => restarts.filter((t) => t > at - windowMs);

type ProbeEvent = Extract<TurnEvent, { type: 'PROBE' }>;
const probe = (e: TurnEvent) => e as ProbeEvent;
const failed = (e: TurnEvent) => !probe(e).ok;
const authRejected = (e: TurnEvent) => failed(e) && probe(e).errorClass === 'auth_rejected';
/** This failure reaches the threshold (the context still holds the count before it). */
const reachesThreshold = (c: TurnContext, e: TurnEvent) => c.consecutiveFailures + 1 >= probe(e).policy.failureThreshold;
const budgetLeft = (c: TurnContext, e: TurnEvent) =>
  inWindow(c.recentRestarts, probe(e).at, probe(e).policy.windowMs).length < probe(e).policy.maxRestarts;

export const turnServerMachine = setup({
  types: { context: {} as TurnContext, events: {} as TurnEvent },
  guards: {
    ok: ({ event }) => event.type === 'PROBE' && event.ok,
    authRejected: ({ event }) => event.type === 'PROBE' && authRejected(event),
    belowThreshold: ({ context, event }) => event.type === 'PROBE' && !reachesThreshold(context, event),
    mayRestart: ({ context, event }) => event.type === 'PROBE' && probe(event).policy.canRestart && budgetLeft(context, event),
    mayNotRestart: ({ event }) => event.type === 'PROBE' && !probe(event).policy.canRestart,
  },
  actions: {
    succeeded: assign({ consecutiveFailures: 0, lastErrorClass: null }),
    countFailure: assign(({ context, event }) => ({
      consecutiveFailures: context.consecutiveFailures + 1,
      lastErrorClass: probe(event).errorClass ?? 'malformed',
      recentRestarts: inWindow(context.recentRestarts, probe(event).at, probe(event).policy.windowMs),
    })),
    recordRestart: assign(({ context, event }) => {
      const e = event as Extract<TurnEvent, { type: 'RESTARTED' }>;
      return {
        recentRestarts: [...context.recentRestarts, e.at],
        totalRestarts: context.totalRestarts + 1,
        lastRestartAt: e.at,
        lastRestartError: e.ok ? null : (e.error ?? 'the restart failed'),
        // Recovering counts its own failures: the restart gets a full threshold to prove itself.
        consecutiveFailures: 0,
      };
    }),
    reset: assign(({ context }) => ({ consecutiveFailures: 0, recentRestarts: [], lastErrorClass: null, totalRestarts: context.totalRestarts })),
  },
}).createMachine({
  id: 'turnServer',
  initial: 'Unknown',
  context: {
    consecutiveFailures: 0,
    recentRestarts: [],
    totalRestarts: 0,
    lastRestartAt: null,
    lastRestartError: null,
    lastErrorClass: null,
  },
  on: {
    RESET: { target: '.Unknown', actions: 'reset' },
  },
  states: {
    // Unknown, Healthy, Suspect and Unhealthy judge a probe the same way.
    Unknown: { on: { PROBE: probeTransitions('Suspect') } },
    Healthy: { on: { PROBE: probeTransitions('Suspect') } },
    Suspect: { on: { PROBE: probeTransitions('Suspect') } },
    Unhealthy: { on: { PROBE: probeTransitions('Suspect') } },
    // Rejected credentials are not a hang: a different failure after them starts a fresh count.
    AuthFailed: {
      on: {
        PROBE: [
          { guard: 'ok', target: 'Healthy', actions: 'succeeded' },
          { guard: 'authRejected', target: 'AuthFailed', actions: 'countFailure' },
          { target: 'Suspect', actions: ['countFailure', assign({ consecutiveFailures: 1 })] },
        ],
      },
    },
    // A restart is due (the controller waits out the backoff first); a success meanwhile cancels it.
    Restarting: {
      on: {
        PROBE: [
          { guard: 'ok', target: 'Healthy', actions: 'succeeded' },
          { actions: 'countFailure' },
        ],
        RESTARTED: { target: 'Recovering', actions: 'recordRestart' },
      },
    },
    Recovering: { on: { PROBE: probeTransitions('Recovering') } },
    // The budget is spent: probes go on (a success is Healthy again), restarts do not.
    Failed: {
      on: {
        PROBE: [
          { guard: 'ok', target: 'Healthy', actions: 'succeeded' },
          { guard: 'authRejected', target: 'AuthFailed', actions: 'countFailure' },
          { target: 'Failed', actions: 'countFailure' },
        ],
      },
    },
  },
});

/** The shared judgement of a probe; `below` is where a failure under the threshold leads. */
function probeTransitions(below: 'Suspect' | 'Recovering') {
  return [
    { guard: 'ok', target: 'Healthy', actions: 'succeeded' },
    { guard: 'authRejected', target: 'AuthFailed', actions: 'countFailure' },
    { guard: 'belowThreshold', target: below, actions: 'countFailure' },
    { guard: 'mayNotRestart', target: 'Unhealthy', actions: 'countFailure' },
    { guard: 'mayRestart', target: 'Restarting', actions: 'countFailure' },
    { target: 'Failed', actions: 'countFailure' },
  ] as const;
}

export type TurnSnapshot = SnapshotFrom<typeof turnServerMachine>;

export function initialTurnSnapshot(): TurnSnapshot {
  return getInitialSnapshot(turnServerMachine);
}

/** Pure: the snapshot after an event. */
export function nextTurnSnapshot(snapshot: TurnSnapshot, event: TurnEvent): TurnSnapshot {
  return getNextSnapshot(turnServerMachine, snapshot, event);
}

export function phaseOf(snapshot: TurnSnapshot): TurnPhase {
  return snapshot.value as TurnPhase;
}

/** Healthy for ICE servers and polydev_turn_up: the last probe succeeded, or failures are still under the threshold. */
export function isHealthy(snapshot: TurnSnapshot): boolean {
  const phase = phaseOf(snapshot);
  return phase === 'Healthy' || phase === 'Suspect';
}

/** When a due restart may run: the backoff doubles with each restart already in the window. */
export function restartDueAt(context: TurnContext, policy: RestartPolicy, now: number): number {
  const recent = inWindow(context.recentRestarts, now, policy.windowMs);
  if (recent.length === 0 || context.lastRestartAt === null) return now;
  return context.lastRestartAt + policy.backoffMs * 2 ** (recent.length - 1);
}

/** Restores a persisted snapshot, or starts fresh when there is none or it does not fit this machine. */
export function restoreTurnSnapshot(persisted: unknown): TurnSnapshot {
  if (!persisted || typeof persisted !== 'object') return initialTurnSnapshot();
  try {
    const snap = turnServerMachine.resolveState(persisted as Parameters<typeof turnServerMachine.resolveState>[0]);
    return phaseOf(snap) ? snap : initialTurnSnapshot();
  } catch {
    return initialTurnSnapshot();
  }
}
