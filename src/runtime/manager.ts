import { createActor, fromPromise, waitFor, type SnapshotFrom } from 'xstate';
import type { Logger } from '../observability/logger.js';
import { RECONCILE_RESULTS, type Metrics } from '../observability/metrics.js';
import type { Store } from '../state/store.js';
import {
  setCondition,
  type Change,
  type Condition,
  type EventType,
  type ResourceStatus,
} from '../state/types.js';
import {
  convergenceMachine,
  DEFAULT_DEGRADED,
  SETTLED_STATES,
  SUMMARY_LIMIT,
  type ConvergenceContext,
  type DegradedPolicy,
  type DriftPolicy,
  type ObserveOutput,
} from './convergence-machine.js';
import {
  isConverging,
  type AnyConvergingController,
  type Controller,
  type ControllerContext,
  type EventRecorder,
  type SettledRun,
  type SimpleController,
} from './controller.js';
import { backoffDelay, DEFAULT_BACKOFF, ItemExponentialBackoff, WorkQueue, type BackoffPolicy } from './queue.js';
import { relieveMemoryAfterBurst } from '../util/memory.js';
import { wireStatusMetrics } from './status-metrics.js';
import { formatDuration } from '../util/duration.js';

export interface ManagerOptions {
  store: Store;
  logger: Logger;
  metrics: Metrics;
  controllers: Controller[];
  workers: number;
  resyncIntervalMs: number;
  backoff?: BackoffPolicy;
  /** When a failing converging resource becomes Degraded (default DEFAULT_DEGRADED: 5 failures over at least a minute). */
  degraded?: DegradedPolicy;
  /** How often to look for changes other processes (the CLI) wrote to the store. */
  changePollMs?: number;
  /** A single run (observe, act, verify) that takes longer than this fails. */
  runTimeoutMs?: number;
  /**
   * Checked before every reconcile: under leader election, whether the lease is provably still
   * ours. A leader resumed after a long stall (SIGSTOP, a frozen VM) must not act on timers that
   * fire before its renewal finds out the lease has moved on.
   */
  mayAct?: () => boolean;
}

export interface ConvergenceReport {
  converged: boolean;
  pending: Array<{ kind: string; name: string; phase: string; reason: string }>;
}

type Snapshot = SnapshotFrom<typeof convergenceMachine>;

type LogLevel = 'error' | 'warn' | 'info' | 'debug';

const FAILED_STATES = new Set(['Backoff', 'Degraded', 'TerminatingBackoff']);

const key = (kind: string, name: string) => `${kind}/${name}`;

const splitKey = (k: string): [string, string] => {
  const i = k.indexOf('/');
  return [k.slice(0, i), k.slice(i + 1)];
};

/** A controlled kind's reconcile series at 0 before its first reconcile (see metrics.ts); drift only where it can be found. */
function exportKindSeries(metrics: Metrics, kind: string, converging: boolean): void {
  for (const result of RECONCILE_RESULTS) metrics.reconcileTotal.inc({ kind, result }, 0);
  metrics.reconcileErrors.inc({ kind }, 0);
  metrics.reconcileDuration.zero({ kind });
  if (converging) metrics.driftTotal.inc({ kind }, 0);
}

/**
 * The machinery that every kind shares (controller-runtime's Manager): the work queue and its
 * workers, backoff kept in the store, periodic resync, the change feed, watches between kinds,
 * and the one transaction that records each settled run.
 */
export class Manager {
  readonly queue: WorkQueue;
  private readonly controllers = new Map<string, Controller>();
  private readonly watchers = new Map<string, Array<{ controller: Controller; map: (name: string) => string[] }>>();
  private readonly ctx: ControllerContext;
  private readonly recorder: EventRecorder;
  private readonly backoff: BackoffPolicy;
  private readonly degraded: DegradedPolicy;
  /** Failure counts of keys whose controller has no convergence machine to count them. */
  private readonly simpleBackoff: ItemExponentialBackoff;
  /** Keys whose last run failed → what that run was for: a newer generation or a deletion since is a reason to retry at once. */
  private readonly failing = new Map<string, FailedFor>();
  /** Keys whose failure cause went away (retryNow): their next run starts a new failure streak. */
  private readonly fresh = new Map<string, string>();
  /** The last failure logged per key (reason and message): the same failure again is logged at debug only. */
  private readonly lastFailureLogged = new Map<string, string>();
  private workers: Array<Promise<void>> = [];
  private resyncTimer: NodeJS.Timeout | undefined;
  private pollTimer: NodeJS.Timeout | undefined;
  private lastSeq = 0;
  private readonly initialKeys = new Set<string>();
  private initialSyncDone = false;
  private readonly inFlight = new Map<string, AbortController>();
  /** Seqs of in-process changes already handled, so the change-feed poll does not handle them again. */
  private readonly handledSeqs = new Set<number>();
  private readonly onChange = (c: Change) => {
    if (c.seq > this.lastSeq) this.handledSeqs.add(c.seq);
    this.handleChange(c);
  };
  private stopped = false;

  constructor(private readonly opts: ManagerOptions) {
    this.backoff = opts.backoff ?? DEFAULT_BACKOFF;
    this.degraded = opts.degraded ?? DEFAULT_DEGRADED;
    this.simpleBackoff = new ItemExponentialBackoff(this.backoff);
    // polydev_resource_phase, polydev_resource_ready, polydev_warm_pool_{desired,max}_size: read from the store at scrape time.
    wireStatusMetrics(opts.metrics, opts.store);
    this.queue = new WorkQueue({
      onDepth: (d) => opts.metrics.workqueueDepth.set(d),
      onAdd: () => opts.metrics.workqueueAdds.inc(),
    });
    this.recorder = {
      record: (kind, name, type, reason, message) =>
        this.recordEvent(kind, name, type, reason, message, type === 'Warning' ? 'warn' : 'info'),
    };
    this.ctx = {
      store: opts.store,
      logger: opts.logger,
      metrics: opts.metrics,
      recorder: this.recorder,
      enqueue: (kind, name, afterMs) =>
        afterMs ? this.queue.addAfter(key(kind, name), afterMs) : this.queue.add(key(kind, name)),
      retryNow: (kind, name, why, o) => this.retryNow(kind, name, why, o),
    };
    for (const c of opts.controllers) {
      this.controllers.set(c.kind, c);
      exportKindSeries(opts.metrics, c.kind, isConverging(c));
      for (const w of c.watches ?? []) {
        const list = this.watchers.get(w.kind) ?? [];
        list.push({ controller: c, map: w.map });
        this.watchers.set(w.kind, list);
      }
    }
  }

  get events(): EventRecorder {
    return this.recorder;
  }

  /** Records an event and logs it at `level` (failures repeated by retries are logged at debug). */
  private recordEvent(kind: string, name: string, type: EventType, reason: string, message: string, level: LogLevel): void {
    this.opts.store.recordEvent({ kind, name, type, reason, message });
    this.opts.logger.log(level, message, { event: reason, resource: key(kind, name) });
  }

  /**
   * The level for logging a failure of key k: warn (or error) the first time and whenever the
   * failure changes, debug while the same failure repeats with each retry.
   */
  private failureLogLevel(k: string, reason: string, message: string, level: 'warn' | 'error', reportedElsewhere = false): LogLevel {
    const signature = `${reason}\u0000${message}`;
    const repeated = this.lastFailureLogged.get(k) === signature;
    this.lastFailureLogged.set(k, signature);
    return repeated || reportedElsewhere ? 'debug' : level;
  }

  /**
   * Ends the backoff of a key whose failure cause is gone and runs it now, its failure count
   * started over (unless resetFailures is false). Its status says so at once (the run may take a
   * while to settle), and an event records why. Called by controllers (an engine is back) and for
   * a spec change of a failing key.
   */
  retryNow(kind: string, name: string, why: string, opts: { resetFailures?: boolean } = {}): void {
    const k = key(kind, name);
    if (this.stopped) return;
    const waited = this.queue.backoffEnds(k);
    if (opts.resetFailures ?? true) {
      this.fresh.set(k, why);
      this.simpleBackoff.forget(k);
    }
    if (this.failing.has(k) || waited !== undefined) this.noteRetrying(kind, name, why, waited);
    this.queue.retryNow(k);
  }

  /** Writes "retrying now" into a failing resource's Ready condition: a status must not promise a retry minutes away that is happening now. */
  private noteRetrying(kind: string, name: string, why: string, waited: number | undefined): void {
    const { store, logger } = this.opts;
    if (!store.db.open) return;
    store.transaction(() => {
      const last = store.getBackoff(kind, name);
      store.clearBackoff(kind, name);
      const status = store.getStatus(kind, name);
      if (!status || !FAILED_STATES.has(status.phase ?? '')) return;
      const ready = status.conditions.find((c) => c.type === 'Ready');
      if (!ready) return;
      const lastError = last?.lastError ?? (status.lastError as string | undefined);
      const conditions = setCondition(status.conditions, {
        ...ready,
        message: `retrying now: ${why}${lastError ? `; the last attempt failed: ${lastError}` : ''}`,
      }, new Date().toISOString());
      store.setStatus(kind, name, { ...status, conditions });
      const due = waited ?? (last && last.nextAttemptAt > Date.now() ? last.nextAttemptAt : undefined);
      const message = `retrying now: ${why}${due !== undefined ? ` (instead of in ${formatDuration(due - Date.now())})` : ''}`;
      store.recordEvent({ kind, name, type: 'Normal', reason: 'Retrying', message });
      logger.debug(message, { event: 'Retrying', resource: key(kind, name) });
    });
  }

  /** Forgets everything kept in memory about a key that no longer exists. */
  private forgetKey(k: string): void {
    this.failing.delete(k);
    this.fresh.delete(k);
    this.lastFailureLogged.delete(k);
    this.simpleBackoff.forget(k);
  }

  get context(): ControllerContext {
    return this.ctx;
  }

  isReady(): boolean {
    return this.initialSyncDone;
  }

  start(): void {
    const { store } = this.opts;
    this.lastSeq = store.latestChangeSeq();
    store.on('change', this.onChange);
    const now = Date.now();
    const delayed = new Map(store.listBackoff().map((b) => [key(b.kind, b.name), b]));
    for (const k of this.syncKeys()) {
      this.initialKeys.add(k);
      const b = delayed.get(k);
      if (b) {
        // The generation the stored failure was for (its status says, when it has one).
        const res = store.getResource(b.kind, b.name);
        const generation = (res?.status?.observedGeneration as number | undefined) ?? res?.metadata.generation ?? 0;
        this.failing.set(k, { generation, deleting: res?.status?.phase === 'TerminatingBackoff' });
      }
      // A backoff stored by the last process is honoured unless its spec changed since the failure.
      const changedSince = b ? this.specChangedSinceFailure(b.kind, b.name) : undefined;
      if (b && changedSince) this.fresh.set(k, changedSince);
      if (b && b.nextAttemptAt > now && !changedSince) this.queue.addRateLimited(k, b.nextAttemptAt - now);
      else this.queue.add(k);
    }
    if (this.initialKeys.size === 0) this.markInitialSync();
    for (const c of this.controllers.values()) c.start?.(this.ctx);
    for (let i = 0; i < this.opts.workers; i++) this.workers.push(this.worker());
    this.resyncTimer = setInterval(() => this.resync(), this.opts.resyncIntervalMs);
    this.resyncTimer.unref();
    this.pollTimer = setInterval(() => this.pollChanges(), this.opts.changePollMs ?? 250);
    this.pollTimer.unref();
  }

  private markInitialSync(): void {
    if (this.initialSyncDone) return;
    this.initialSyncDone = true;
    this.opts.metrics.up.set(1);
    this.opts.logger.info('initial sync done', { resources: this.opts.store.listKeys().length });
  }

  /** Enqueues every key: drift that no watch reports is found here. */
  resync(): void {
    // A key waiting out a backoff keeps waiting: resync is for drift, not for retrying sooner.
    const now = Date.now();
    const backingOff = new Set(
      this.opts.store
        .listBackoff()
        .filter((b) => b.nextAttemptAt > now)
        .map((b) => key(b.kind, b.name)),
    );
    for (const k of this.syncKeys()) if (!backingOff.has(k)) this.queue.add(k);
  }

  /** Every key, less those a controller says converge through another key (see resyncNames). */
  private syncKeys(): string[] {
    const out: string[] = [];
    const narrowed = new Map<string, Set<string>>();
    for (const c of this.controllers.values()) {
      if (!isConverging(c) && c.resyncNames) narrowed.set(c.kind, new Set(c.resyncNames()));
    }
    for (const { kind, name } of this.opts.store.listKeys()) {
      const only = narrowed.get(kind);
      if (!only || only.has(name)) out.push(key(kind, name));
    }
    return out;
  }

  private pollChanges(): void {
    if (this.stopped || !this.opts.store.db.open) return;
    try {
      const changes = this.opts.store.changesSince(this.lastSeq);
      for (const c of changes) {
        this.lastSeq = c.seq;
        if (this.handledSeqs.delete(c.seq)) continue;
        this.logOutsideChange(c);
        this.handleChange(c);
      }
    } catch (err) {
      this.opts.logger.warn('cannot read the change feed', { error: (err as Error).message });
    }
  }

  /**
   * Desired state another process wrote (the CLI's apply, delete, proxyport add/remove) is logged
   * at info when the daemon takes it up, so its log tells what changed and when; changes made in
   * this process are logged where they are made (directory applies, the API).
   */
  private logOutsideChange(c: Change): void {
    if (c.op !== 'upsert' && c.op !== 'delete-requested') return;
    const res = this.opts.store.getResource(c.kind, c.name);
    if (c.op === 'upsert') {
      this.opts.logger.info('desired state changed by another process', { resource: key(c.kind, c.name), generation: res?.metadata.generation ?? null });
    } else {
      this.opts.logger.info('deletion requested by another process', { resource: key(c.kind, c.name) });
    }
  }

  private handleChange(c: Change): void {
    const k = key(c.kind, c.name);
    if (c.op === 'deleted') {
      this.forgetKey(k);
      return;
    }
    // A failing key waits out its backoff whatever happens, unless what happened is a new cause:
    // a new spec (generation) or a deletion.
    const why = this.failing.has(k) ? this.specChangedSinceFailure(c.kind, c.name) : undefined;
    if (why) this.retryNow(c.kind, c.name, why);
    else this.queue.add(k);
    for (const w of this.watchers.get(c.kind) ?? []) {
      for (const name of w.map(c.name)) this.queue.add(key(w.controller.kind, name));
    }
  }

  /** Why a failing key should be retried at once because of a change to itself (new generation, deletion), if it should. */
  private specChangedSinceFailure(kind: string, name: string): string | undefined {
    const res = this.opts.store.getResource(kind, name);
    const failed = this.failing.get(key(kind, name));
    if (!res || !failed) return undefined;
    if (res.metadata.deletionTimestamp && !failed.deleting) return 'its deletion was requested';
    if (res.metadata.generation !== failed.generation) return `its spec changed (generation ${res.metadata.generation})`;
    return undefined;
  }

  private async worker(): Promise<void> {
    for (;;) {
      const k = await this.queue.get();
      if (k === undefined) return;
      try {
        await this.reconcileKey(k);
      } catch (err) {
        this.opts.logger.error('reconcile crashed', { key: k, error: (err as Error).stack ?? String(err) });
      } finally {
        this.queue.done(k);
        if (!this.initialSyncDone && this.initialKeys.delete(k) && this.initialKeys.size === 0) this.markInitialSync();
      }
    }
  }

  /** Reconciles one key now (workers call this; tests and `--once` may too). */
  async reconcileKey(k: string): Promise<void> {
    if (this.opts.mayAct && !this.opts.mayAct()) {
      this.queue.addAfter(k, 1000);
      return;
    }
    const [kind, name] = splitKey(k);
    const controller = this.controllers.get(kind);
    const started = performance.now();
    let result: (typeof RECONCILE_RESULTS)[number] = 'success';
    try {
      if (!controller) {
        this.markUncontrolled(kind, name);
        return;
      }
      const converging = isConverging(controller);
      const abort = converging ? new AbortController() : undefined;
      if (abort) this.inFlight.set(k, abort);
      try {
        const outcome = converging
          ? await this.runConverging(controller, name, abort!.signal)
          : await this.runSimple(controller, name);
        if (outcome.failed) {
          result = 'error';
          this.opts.metrics.reconcileErrors.inc({ kind });
        }
        if (outcome.backoffUntil !== undefined) this.queue.backOffUntil(k, outcome.backoffUntil);
        else if (outcome.requeueAfterMs !== undefined) this.queue.addAfter(k, outcome.requeueAfterMs);
      } finally {
        if (abort) this.inFlight.delete(k);
      }
    } finally {
      const seconds = (performance.now() - started) / 1000;
      this.opts.metrics.reconcileTotal.inc({ kind, result });
      this.opts.metrics.reconcileDuration.observe({ kind }, seconds);
      // A long reconcile (a pool of thousands of rules) leaves a burst of garbage behind.
      if (seconds > 0.05) relieveMemoryAfterBurst();
    }
  }

  private markUncontrolled(kind: string, name: string): void {
    const { store } = this.opts;
    const res = store.getResource(kind, name);
    if (!res) return;
    if (res.metadata.deletionTimestamp) {
      store.removeResource(kind, name);
      return;
    }
    const now = new Date().toISOString();
    const conditions = setCondition(res.status?.conditions ?? [], {
      type: 'Ready',
      status: 'False',
      reason: 'NoController',
      message: `this build of polydev-reconciler has no controller for ${kind} yet; the resource is stored but not acted on`,
    }, now);
    store.transaction(() => store.setStatus(kind, name, { phase: 'Pending', conditions }));
  }

  private async runSimple(c: SimpleController, name: string): Promise<RunOutcome> {
    const k = key(c.kind, name);
    const { logger, store } = this.opts;
    try {
      const out = await c.reconcile(name, this.ctx);
      const failures = this.simpleBackoff.numRequeues(k);
      this.simpleBackoff.forget(k);
      this.failing.delete(k);
      if (this.lastFailureLogged.delete(k)) logger.info('reconcile recovered', { resource: k, failedAttempts: failures });
      return { failed: false, ...(out?.requeueAfterMs !== undefined ? { requeueAfterMs: out.requeueAfterMs } : {}) };
    } catch (err) {
      const message = (err as Error).message;
      const delay = this.simpleBackoff.when(k);
      const res = store.db.open ? store.getResource(c.kind, name) : undefined;
      this.failing.set(k, { generation: res?.metadata.generation ?? 0, deleting: res?.metadata.deletionTimestamp !== undefined });
      const level = this.failureLogLevel(k, 'SyncFailed', message, 'error');
      logger.log(level, 'reconcile failed', { resource: k, error: message, failures: this.simpleBackoff.numRequeues(k), retryInMs: delay });
      return { failed: true, backoffUntil: Date.now() + delay };
    }
  }

  private async runConverging(
    c: AnyConvergingController,
    name: string,
    signal: AbortSignal,
  ): Promise<RunOutcome> {
    const { store, logger, metrics } = this.opts;
    const k = key(c.kind, name);
    // Taken now: a retryNow() while this run is in flight marks the next run fresh, not this one.
    const fresh = this.fresh.get(k);
    this.fresh.delete(k);
    const resource = store.getResource(c.kind, name);
    if (!resource) return { failed: false };
    const deleting = resource.metadata.deletionTimestamp !== undefined;

    let desired: unknown;
    let observed: unknown;
    let actions: unknown[] = [];
    let fingerprint = '';
    // The side effect in flight, if any: a run that times out waits for it before the key is
    // released, so two restores for one key never overlap.
    let inFlight: Promise<unknown> = Promise.resolve();
    const lastFingerprint = resource.status?.desiredFingerprint as string | undefined;
    const machine = convergenceMachine.provide({
      actors: {
        observe: fromObserve(async () => {
          // Once per run: Verifying compares against what was executed, not a newer write.
          if (desired === undefined) desired = c.desired(resource);
          fingerprint = c.fingerprint?.(desired) ?? `generation:${resource.metadata.generation}`;
          observed = await c.observe(desired);
          actions = c.plan(desired, observed);
          return {
            changes: actions.length,
            summary: actions.slice(0, SUMMARY_LIMIT).map((a) => c.describe(a)),
            // Expected work (see isDrift) is treated like a change being rolled out: done, not counted.
            desiredChanged: fingerprint !== lastFingerprint || (actions.length > 0 && c.isDrift !== undefined && !c.isDrift(actions)),
          };
        }),
        execute: fromExecute(async () => {
          // The observation that made the plan is not needed past this point (Verifying makes a
          // new one); dropping it lets a 10,000-rule parse be collected while the restore runs.
          const obs = observed;
          observed = undefined;
          const p = c.execute(desired, obs, actions);
          inFlight = p.catch(() => undefined);
          await p;
        }),
        teardown: fromExecute(async () => {
          const p = c.teardown(resource);
          inFlight = p.catch(() => undefined);
          await p;
        }),
      },
    });
    const persisted = store.getSnapshot(c.kind, name) as Snapshot | undefined;
    const restorable = persisted && SETTLED_STATES.has(String(persisted.value)) && persisted.value !== 'Deleted';
    const actor = createActor(machine, restorable ? { snapshot: persisted, input: {} } : { input: {} });
    actor.start();
    const driftPolicy: DriftPolicy = c.driftPolicy(resource);
    actor.send(
      deleting
        ? { type: 'DELETE' }
        : { type: 'RECONCILE', driftPolicy, at: Date.now(), degraded: this.degraded, ...(fresh !== undefined ? { fresh: true } : {}) },
    );
    let snap: Snapshot;
    try {
      snap = await waitFor(actor, (s) => SETTLED_STATES.has(String(s.value)), {
        timeout: this.opts.runTimeoutMs ?? 120_000,
        signal,
      });
    } catch (err) {
      actor.stop();
      // (At shutdown there is no next run to overlap with: the restore finishes or dies with us.)
      if (!signal.aborted) await Promise.race([inFlight, new Promise((r) => setTimeout(r, 60_000).unref())]);
      // Abandoned (shutdown) or stuck: the last settled snapshot stays, the next run starts afresh.
      const reason = signal.aborted ? 'abandoned at shutdown' : (err as Error).message;
      logger.warn('reconcile did not settle', { resource: key(c.kind, name), reason });
      if (signal.aborted) return { failed: false };
      this.recorder.record(c.kind, name, 'Warning', 'SyncTimeout', `reconcile did not settle: ${reason}`);
      this.failing.set(k, { generation: resource.metadata.generation, deleting });
      return { failed: true, backoffUntil: Date.now() + backoffDelay(1, this.backoff) };
    }
    const persistedSnapshot = actor.getPersistedSnapshot();
    actor.stop();
    const state = String(snap.value);
    const context: ConvergenceContext = snap.context;
    const run: SettledRun<unknown, unknown> = {
      resource,
      desired,
      observed,
      state,
      lastError: context.lastError,
      driftDetected: context.driftDetected,
      changes: context.changes,
      summary: context.summary,
    };
    const failed = FAILED_STATES.has(state);
    const retryInMs = failed ? backoffDelay(context.failures, this.backoff) : undefined;
    const retryAt = retryInMs !== undefined ? Date.now() + retryInMs : undefined;
    const events: Array<[EventType, string, string, LogLevel]> = [];
    if (context.driftDetected) {
      metrics.driftTotal.inc({ kind: c.kind });
      const what = `${context.driftChanges} change(s): ${context.driftSummary.slice(0, 5).join('; ')}${context.driftChanges > 5 ? '; …' : ''}`;
      events.push([
        'Warning',
        'DriftDetected',
        state === 'Drifted' ? `drift found and left alone (driftPolicy ${driftPolicy}): ${what}` : `drift found, repairing: ${what}`,
        'warn',
      ]);
    }
    if (state === 'Ready' && context.changes === 0 && !run.driftDetected && persisted?.value !== 'Ready') {
      // After a failure streak this is the one line that says the failures are over.
      const before = persisted && FAILED_STATES.has(String(persisted.value)) ? (persisted.context as Partial<ConvergenceContext>) : undefined;
      const streak = before?.failures
        ? `, recovered after ${before.failures} failed attempt(s)${before.failingSince ? ` over ${formatDuration(Date.now() - before.failingSince)}` : ''}`
        : '';
      events.push(['Normal', 'Converged', `${c.kind} ${name} is converged${streak}`, 'info']);
    }
    const failureReason = failed ? c.failureReason?.(run) : undefined;
    if (failed) {
      const reason = failureReason ?? (state === 'Degraded' ? 'Degraded' : 'SyncFailed');
      const lastError = context.lastError ?? 'failed';
      const message = state === 'Degraded' && failureReason ? `degraded after repeated failures: ${lastError}` : lastError;
      events.push(['Warning', reason, message, this.failureLogLevel(k, reason, message, 'warn', c.reportsFailureItself?.(run) ?? false)]);
      this.failing.set(k, { generation: resource.metadata.generation, deleting });
    } else {
      this.failing.delete(k);
      this.lastFailureLogged.delete(k);
    }
    if (state === 'Deleted') {
      events.push(['Normal', 'Deleted', `${c.kind} ${name} and everything it owned are removed`, 'info']);
      this.forgetKey(k);
    }
    metrics.driftUnrepaired.set({ kind: c.kind, name }, state === 'Drifted' || (failed && context.driftDetected) ? 1 : 0);

    store.transaction(() => {
      if (state === 'Deleted') {
        c.commit?.(run);
        store.removeResource(c.kind, name);
        metrics.driftUnrepaired.remove({ kind: c.kind, name });
      } else {
        store.setSnapshot(c.kind, name, persistedSnapshot);
        const status = this.statusOf(c, run, retryAt, failureReason, context);
        if ((state === 'Ready' || state === 'Drifted') && fingerprint) status.desiredFingerprint = fingerprint;
        store.setStatus(c.kind, name, status);
        if (failed) {
          store.setBackoff(c.kind, name, context.failures, retryAt!, context.lastError ?? 'failed');
        } else {
          store.clearBackoff(c.kind, name);
        }
        c.commit?.(run);
      }
      for (const [type, reason, message, level] of events) this.recordEvent(c.kind, name, type, reason, message, level);
    });
    if (failed) {
      metrics.workqueueRetries.inc();
      return { failed: true, backoffUntil: retryAt! };
    }
    const after = c.requeueAfterMs?.(run);
    return { failed: false, ...(after !== undefined ? { requeueAfterMs: after } : {}) };
  }

  private statusOf(
    c: AnyConvergingController,
    run: SettledRun<unknown, unknown>,
    retryAt: number | undefined,
    failureReason: string | undefined,
    context: ConvergenceContext,
  ): ResourceStatus {
    const nowMs = Date.now();
    const now = new Date(nowMs).toISOString();
    // When the next attempt comes, as a time too: "in 5m" alone is stale as soon as it is read.
    const retry = retryAt !== undefined ? ` (next retry in ${formatDuration(retryAt - nowMs)}, at ${new Date(retryAt).toISOString()})` : '';
    const streak = context.failingSince ? `failing since ${new Date(context.failingSince).toISOString()}, ${context.failures} attempt(s)` : '';
    const generation = run.resource.metadata.generation;
    const prev = run.resource.status;
    let conditions: Condition[] = prev?.conditions ?? [];
    const ready = run.state === 'Ready';
    const readyReason: Record<string, string> = {
      Ready: 'Converged',
      Drifted: 'DriftNotCorrected',
      Backoff: 'SyncFailed',
      Degraded: 'Degraded',
      TerminatingBackoff: 'TeardownFailed',
    };
    conditions = setCondition(conditions, {
      type: 'Ready',
      status: ready ? 'True' : 'False',
      reason: failureReason ?? readyReason[run.state] ?? run.state,
      message: ready
        ? 'desired state is in place'
        : run.state === 'Drifted'
          ? `live state differs (${run.changes} change(s)) and driftPolicy is not correct: ${run.summary.slice(0, 3).join('; ')}`
          : `${run.lastError ?? run.state}${retry}`,
      observedGeneration: generation,
    }, now);
    conditions = setCondition(conditions, {
      type: 'Degraded',
      status: run.state === 'Degraded' ? 'True' : 'False',
      reason: run.state === 'Degraded' ? 'RepeatedFailures' : 'AsExpected',
      message: run.state === 'Degraded' ? `${run.lastError ?? 'repeated failures'}${streak ? ` (${streak})` : ''}` : '',
      observedGeneration: generation,
    }, now);
    const lastDriftAt = run.driftDetected ? now : (prev?.lastDriftAt as string | undefined);
    return {
      ...(prev ?? {}),
      ...(c.statusFields?.(run) ?? {}),
      phase: run.state,
      observedGeneration: generation,
      conditions,
      ...(lastDriftAt ? { lastDriftAt } : {}),
    };
  }

  /** Waits until every resource has converged for its current generation, or the deadline passes. */
  async waitConverged(timeoutMs: number, pollMs = 50): Promise<ConvergenceReport> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const report = this.convergenceReport();
      if (report.converged && this.queue.depth === 0 && this.queue.busy === 0) return report;
      if (Date.now() >= deadline) return report;
      await new Promise((r) => setTimeout(r, pollMs));
    }
  }

  /**
   * Converged: phase Ready for the current generation, not being deleted, and a controller for
   * the kind. Counted in SQL: `run --once` polls this, and 10,000 ports must not be read whole.
   */
  convergenceReport(limit = 50): ConvergenceReport {
    const kinds = [...this.controllers.keys()];
    const rows = this.opts.store
      .stmt(
        `SELECT r.kind AS kind, r.name AS name, coalesce(s.phase, 'Pending') AS phase, s.body AS body
         FROM resources r LEFT JOIN status s ON s.kind = r.kind AND s.name = r.name
         WHERE NOT (s.phase IS 'Ready' AND r.deletion_requested_at IS NULL
                    AND json_extract(s.body, '$.observedGeneration') IS r.generation
                    AND r.kind IN (SELECT value FROM json_each(?)))
         LIMIT ?`,
      )
      .all(JSON.stringify(kinds), limit) as Array<{ kind: string; name: string; phase: string; body: string | null }>;
    const pending = rows.map((r) => {
      const status = r.body ? (JSON.parse(r.body) as ResourceStatus) : undefined;
      const ready = status?.conditions.find((c) => c.type === 'Ready');
      return {
        kind: r.kind,
        name: r.name,
        phase: r.phase,
        reason: ready ? `${ready.reason}: ${ready.message}` : 'not reconciled yet',
      };
    });
    return { converged: pending.length === 0, pending };
  }

  /** Stops taking work, lets in-flight reconciles finish for up to graceMs, then abandons them. */
  async stop(graceMs: number): Promise<{ abandoned: string[] }> {
    if (this.stopped) return { abandoned: [] };
    this.stopped = true;
    this.opts.store.off('change', this.onChange);
    if (this.resyncTimer) clearInterval(this.resyncTimer);
    if (this.pollTimer) clearInterval(this.pollTimer);
    this.queue.shutDown();
    await Promise.allSettled([...this.controllers.values()].map((c) => c.stop?.()));
    const all = Promise.allSettled(this.workers);
    let timer: NodeJS.Timeout | undefined;
    const timedOut = await Promise.race([
      all.then(() => false),
      new Promise<boolean>((r) => {
        timer = setTimeout(() => r(true), graceMs);
      }),
    ]);
    if (timer) clearTimeout(timer);
    const abandoned = timedOut ? [...this.inFlight.keys()] : [];
    for (const a of this.inFlight.values()) a.abort();
    if (timedOut) await Promise.race([all, new Promise((r) => setTimeout(r, 500))]);
    return { abandoned };
  }
}

// The machine's placeholder actors are replaced per run; these keep their types.
const fromObserve = (fn: () => Promise<ObserveOutput>) => fromPromise(fn);
const fromExecute = (fn: () => Promise<void>) => fromPromise(fn);

/** What a failed run was for (see Manager.failing). */
interface FailedFor {
  generation: number;
  deleting: boolean;
}

/** What one reconcile leaves for the queue: a failure backs off (until backoffUntil, epoch ms), a success may ask to come back (requeueAfterMs). */
interface RunOutcome {
  failed: boolean;
  requeueAfterMs?: number;
  backoffUntil?: number;
}
