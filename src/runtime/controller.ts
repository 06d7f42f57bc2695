import type { Logger } from '../observability/logger.js';
import type { Metrics } from '../observability/metrics.js';
import type { Store } from '../state/store.js';
import type { EventType, StoredResource } from '../state/types.js';
import type { DriftPolicy } from './convergence-machine.js';

export interface EventRecorder {
  record(kind: string, name: string, type: EventType, reason: string, message: string): void;
}

export interface ControllerContext {
  store: Store;
  logger: Logger;
  metrics: Metrics;
  recorder: EventRecorder;
  /**
   * Puts a key of any kind on the work queue (watches call this). A key waiting out a failure
   * backoff is not run before the backoff ends: an event is no reason to try a failing key again.
   */
  enqueue(kind: string, name: string, afterMs?: number): void;
  /**
   * The cause of the key's failures is gone (its engine is reachable again): ends its backoff,
   * starts its failure count over, says so in its status, and runs it now. `why` completes
   * "retrying now: …" (e.g. "the docker engine is reachable again"). With resetFailures false the
   * key is run now but its failure streak goes on (something changed that may or may not be the
   * cause: a failure now still counts toward Degraded).
   */
  retryNow(kind: string, name: string, why: string, opts?: { resetFailures?: boolean }): void;
}

export interface Watch {
  /** A change to a resource of this kind … */
  kind: string;
  /** … enqueues these names of the watching controller's kind. */
  map(name: string): string[];
}

/** What a settled run leaves for the controller to write in the same transaction as the status. */
export interface SettledRun<Desired, Observed> {
  resource: StoredResource;
  desired: Desired | undefined;
  /** The last observation of the run, if one succeeded. */
  observed: Observed | undefined;
  /** The machine's settled state: Ready, Drifted, Backoff, Degraded, Deleted, … */
  state: string;
  lastError: string | null;
  driftDetected: boolean;
  /** Actions the last observation of the run still found to do: 0 means converged. */
  changes: number;
  /** Descriptions of the first of them. */
  summary: string[];
}

/**
 * A kind that converges through the shared convergence machine. The controller only
 * knows its own domain: how to read desired state, observe the world, plan (pure) and act.
 */
export interface ConvergingController<Desired, Observed, Action> {
  readonly kind: string;
  readonly watches?: Watch[];
  /** Builds the desired state from the stored resource (and anything it references). Throws on a bad reference. */
  desired(resource: StoredResource): Desired;
  driftPolicy(resource: StoredResource): DriftPolicy;
  /**
   * A stable digest of the desired state. A non-empty plan while this equals the digest of the
   * last converged run is drift; otherwise it is a change being rolled out. Default: generation.
   */
  fingerprint?(desired: Desired): string;
  observe(desired: Desired): Promise<Observed>;
  /**
   * Of a non-empty plan while the desired state is unchanged: does it repair something nobody
   * asked for (drift), or is it the resource's own expected work (a refill after a claim)?
   * Default: every such plan is drift.
   */
  isDrift?(actions: Action[]): boolean;
  /** Pure: what to do to make observed match desired. Empty when converged. */
  plan(desired: Desired, observed: Observed): Action[];
  describe(action: Action): string;
  execute(desired: Desired, observed: Observed, actions: Action[]): Promise<void>;
  /** Removes everything this resource owns (the finalizer). Must be idempotent. */
  teardown(resource: StoredResource): Promise<void>;
  /** Kind-specific status fields of the settled run. */
  statusFields?(run: SettledRun<Desired, Observed>): Record<string, unknown>;
  /** Writes inside the status transaction (statuses of owned resources, allocations). */
  commit?(run: SettledRun<Desired, Observed>): void;
  /**
   * A CamelCase reason for a failed run (e.g. ImageNotFound, EngineUnavailable), used as the Ready
   * condition's reason and the event's reason instead of the generic SyncFailed/Degraded.
   */
  failureReason?(run: SettledRun<Desired, Observed>): string | undefined;
  /**
   * True when the controller reports this failure's cause itself, once for every resource it
   * affects (one warning for an engine outage, not one per pool and retry): the manager then
   * logs the failure at debug. The event is recorded all the same.
   */
  reportsFailureItself?(run: SettledRun<Desired, Observed>): boolean;
  /** Ask for another reconcile after this long even when Ready (e.g. DNS re-resolution). */
  requeueAfterMs?(run: SettledRun<Desired, Observed>): number | undefined;
  start?(ctx: ControllerContext): void;
  stop?(): Promise<void>;
}

/** A kind with a reconcile of its own that does not need the convergence machine. */
export interface SimpleController {
  readonly kind: string;
  readonly watches?: Watch[];
  reconcile(name: string, ctx: ControllerContext): Promise<{ requeueAfterMs?: number } | void>;
  /**
   * The names that need a reconcile of their own at start and on resync; the others converge
   * through another kind's key (ProxyPorts through their pool). Default: every name.
   */
  resyncNames?(): string[];
  start?(ctx: ControllerContext): void;
  stop?(): Promise<void>;
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export type AnyConvergingController = ConvergingController<any, any, any>;
export type Controller = AnyConvergingController | SimpleController;

export function isConverging(c: Controller): c is AnyConvergingController {
  return typeof (c as AnyConvergingController).plan === 'function';
}
