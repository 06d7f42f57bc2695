import { randomBytes } from 'node:crypto';
import type { Logger } from '../../observability/logger.js';
import type { DriftPolicy } from '../../runtime/convergence-machine.js';
import type { ControllerContext, ConvergingController, SettledRun } from '../../runtime/controller.js';
import {
  adoptMember,
  endClaim,
  forgetMember,
  listMembers,
  memberByContainer,
  markReleasing,
  nextExpiry,
  openClaims,
  pruneEndedClaims,
  recordRecycled,
  recordStarted,
  reserveSlots,
  type NewSlot,
} from '../../state/pools.js';
import type { Store } from '../../state/store.js';
import type { StoredResource } from '../../state/types.js';
import { mapSettled } from '../../util/concurrency.js';
import {
  EngineError,
  LABELS,
  MANAGED_BY,
  type ContainerSpec,
  type Engine,
  type EngineEvent,
  type EngineName,
  type ObservedContainer,
} from './engine.js';
import { EngineAvailability } from './engine-availability.js';
import type { EngineSet } from './engines.js';
import { planOrphans, planWarmPool } from './plan.js';
import {
  describeAction,
  idleResourcesOf,
  isDriftAction,
  warmPoolDesired,
  type WarmPoolAction,
  type WarmPoolDesired,
  type WarmPoolObserved,
} from './types.js';

export interface WarmPoolControllerOptions {
  store: Store;
  engines: EngineSet;
  logger: Logger;
  /** LABELS.owner of everything this daemon creates. */
  owner: string;
  /** Engine calls (starts, removals) in flight at once per pool. */
  parallelism: number;
  /** How often to look for owned containers of pools that no longer exist. */
  orphanSweepMs: number;
  /** Ended claims kept for `get claims` and the stats. */
  claimHistory: number;
  /** How often an unreachable engine is pinged, so pools waiting for it are retried soon after it is back (default 500 ms). */
  engineProbeMs?: number;
}

const DEFAULT_ENGINE_PROBE_MS = 500;

/** Rounds of act → observe → plan in one execute (a roll that keeps size - 1 warm takes several). */
const MAX_ROUNDS = 25;
const EXECUTE_BUDGET_MS = 90_000;

const newSlotId = () => randomBytes(5).toString('hex');

/**
 * WarmPool: keeps `size` warm, unclaimed containers per pool on its engine, never more than
 * `maxSize` in all, and hands them to claims (see claims.ts). Containers are found again by
 * their labels; the store knows which are warm, claimed or being released.
 */
export class WarmPoolController implements ConvergingController<WarmPoolDesired, WarmPoolObserved, WarmPoolAction> {
  readonly kind = 'WarmPool';
  private ctx: ControllerContext | undefined;
  private readonly inFlight = new Map<string, Set<string>>();
  private readonly watching = new Map<EngineName, () => void>();
  private readonly lastFailure = new Map<string, string>();
  /** Engine outages: logged once per engine, and their end retries the pools waiting for them. */
  readonly availability: EngineAvailability;
  private readonly lastRefillMs = new Map<string, number>();
  private sweepTimer: NodeJS.Timeout | undefined;
  private sweeping: Promise<void> | undefined;
  private stopped = false;

  constructor(private readonly opts: WarmPoolControllerOptions) {
    this.availability = new EngineAvailability({
      logger: opts.logger,
      probeMs: opts.engineProbeMs ?? DEFAULT_ENGINE_PROBE_MS,
      poolsOn: (engine) => this.poolsOn(engine),
      ping: (engine) => opts.engines.get(engine).ping(),
      onUp: (engine, _outage, origin) => this.engineUp(engine, origin),
      onDown: (engine, outage) => this.engineDown(engine, outage.message),
    });
  }

  get owner(): string {
    return this.opts.owner;
  }

  desired(resource: StoredResource): WarmPoolDesired {
    return warmPoolDesired(resource);
  }

  driftPolicy(resource: StoredResource): DriftPolicy {
    return (resource.spec as { driftPolicy?: DriftPolicy }).driftPolicy ?? 'correct';
  }

  fingerprint(d: WarmPoolDesired): string {
    const { spec } = d;
    return `${d.specHash}:${spec.size}:${spec.maxSize}:${spec.idleTimeout ?? ''}:${spec.claim.onRelease}`;
  }

  /** A refill after a claim or the removal after a release is the pool doing its job, not drift. */
  isDrift(actions: WarmPoolAction[]): boolean {
    return actions.some(isDriftAction);
  }

  /** Slots this process is starting for a pool (refills and cold claims). */
  slotsInFlight(pool: string): Set<string> {
    let set = this.inFlight.get(pool);
    if (!set) {
      set = new Set();
      this.inFlight.set(pool, set);
    }
    return set;
  }

  engineFor(d: WarmPoolDesired): Engine {
    const engine = this.opts.engines.get(d.spec.engine);
    this.ensureWatch(d.spec.engine, engine);
    return engine;
  }

  async observe(d: WarmPoolDesired): Promise<WarmPoolObserved> {
    const { store } = this.opts;
    const engine = this.engineFor(d);
    // Rows before containers: a container started between the two reads is then seen as in
    // flight or adoptable, never as a row whose container is gone.
    const members = listMembers(store, d.name);
    const claims = openClaims(store, d.name);
    const inFlight = new Set(this.slotsInFlight(d.name));
    let listed: ObservedContainer[];
    try {
      listed = await engine.list(this.opts.owner);
    } catch (err) {
      this.noteFailure(d, err);
      throw err;
    }
    // The engine answers: pools waiting for it are retried now (this one is running already).
    this.lastFailure.delete(d.name);
    this.availability.markUp(d.spec.engine, `pool ${d.name}`, d.name);
    const containers = listed.filter((c) => c.pool === d.name);
    return { now: Date.now(), containers, members, claims, inFlight };
  }

  plan(d: WarmPoolDesired, o: WarmPoolObserved): WarmPoolAction[] {
    return planWarmPool(d, o);
  }

  describe(a: WarmPoolAction): string {
    return describeAction(a);
  }

  async execute(d: WarmPoolDesired, observed: WarmPoolObserved, actions: WarmPoolAction[]): Promise<void> {
    const deadline = Date.now() + EXECUTE_BUDGET_MS;
    let acts = actions;
    try {
      for (let round = 0; round < MAX_ROUNDS && acts.length > 0; round++) {
        await this.act(d, acts);
        if (Date.now() > deadline) break;
        const next = await this.observe(d);
        acts = this.plan(d, next);
      }
      this.lastFailure.delete(d.name);
    } catch (err) {
      this.noteFailure(d, err);
      throw err;
    }
    void observed;
  }

  private noteFailure(d: WarmPoolDesired, err: unknown): void {
    const reason = err instanceof EngineError ? err.reason : 'SyncFailed';
    this.lastFailure.set(d.name, reason);
    if (reason === 'EngineUnavailable') this.availability.markDown(d.spec.engine, err as Error, `pool ${d.name}`);
  }

  /** Pools (by name) whose spec names this engine. */
  private poolsOn(engine: EngineName): string[] {
    const { store } = this.opts;
    if (!store.db.open) return [];
    return store
      .listResources('WarmPool')
      .filter((r) => ((r.spec as { engine?: EngineName }).engine ?? 'docker') === engine)
      .map((r) => r.metadata.name);
  }

  /**
   * Why the pool's last settled run failed (its Ready reason: EngineUnavailable, StartFailed, …),
   * or undefined when it is not failing. From the stored status, so a restarted daemon knows too.
   */
  private failureOf(pool: string): string | undefined {
    const status = this.opts.store.getStatus('WarmPool', pool);
    if (status?.phase !== 'Backoff' && status?.phase !== 'Degraded') return undefined;
    const ready = status.conditions.find((c) => c.type === 'Ready');
    return ready?.status === 'False' ? ready.reason : undefined;
  }

  /**
   * The engine answers again. Pools that failed for want of it are retried at once with their
   * failure count reset: the cause is gone. Pools failing for another reason are retried at once
   * too (a restarted engine may have changed anything, and a failure caught in its shutdown, such
   * as a start refused halfway, is the outage in disguise) but keep counting. The others are
   * reconciled as well: events may have been missed. (`origin`, the pool whose run found the
   * engine back, is that run already.)
   */
  private engineUp(engine: EngineName, origin?: string): void {
    const ctx = this.ctx;
    if (!ctx || this.stopped) return;
    for (const pool of this.poolsOn(engine)) {
      if (pool === origin) continue;
      const failure = this.failureOf(pool);
      if (failure === 'EngineUnavailable') ctx.retryNow('WarmPool', pool, `the ${engine} engine is reachable again`);
      else if (failure) ctx.retryNow('WarmPool', pool, `the ${engine} engine is reachable again after an outage`, { resetFailures: false });
      else ctx.enqueue('WarmPool', pool);
    }
  }

  /**
   * An outage starts: every pool of the engine shows it in its status now, not at its next run.
   * A pool failing for another reason (often the engine's own shutdown: a start refused halfway)
   * is run again at once, keeping its failure count, so its status names the real cause; a pool
   * already waiting for the engine keeps waiting.
   */
  private engineDown(engine: EngineName, message: string): void {
    const ctx = this.ctx;
    if (!ctx || this.stopped) return;
    for (const pool of this.poolsOn(engine)) {
      const failure = this.failureOf(pool);
      if (failure && failure !== 'EngineUnavailable') {
        ctx.retryNow('WarmPool', pool, `the ${engine} engine became unreachable (${message})`, { resetFailures: false });
      } else ctx.enqueue('WarmPool', pool);
    }
  }

  /** One round: store changes, then removals and recycles, then starts. */
  private async act(d: WarmPoolDesired, actions: WarmPoolAction[]): Promise<void> {
    const { store } = this.opts;
    const engine = this.engineFor(d);
    const now = Date.now();
    const ended: Array<{ claimId: string; state: string; reason: string }> = [];
    store.transaction(() => {
      for (const a of actions) {
        if (a.type === 'endClaim') {
          const c = endClaim(store, a.claimId, a.state, a.reason, now);
          if (c) ended.push({ claimId: c.id, state: a.state, reason: `claim ${c.id} of user ${c.userId}: ${a.reason}` });
        } else if (a.type === 'adopt') adoptMember(store, a.member);
        else if (a.type === 'promote') recordStarted(store, a.slot, { id: a.containerId, address: a.address, ports: a.ports, ready: true }, now);
        else if (a.type === 'forget') forgetMember(store, a.slot);
      }
      for (const e of ended) {
        this.ctx?.recorder.record('WarmPool', d.name, e.state === 'failed' ? 'Warning' : 'Normal', e.state === 'failed' ? 'ClaimFailed' : 'ClaimExpired', e.reason);
      }
    });

    const removals = actions.filter((a): a is Extract<WarmPoolAction, { type: 'remove' }> => a.type === 'remove');
    const recycles = actions.filter((a): a is Extract<WarmPoolAction, { type: 'recycle' }> => a.type === 'recycle');
    const results = await mapSettled([...removals, ...recycles], this.opts.parallelism, async (a) => {
      if (a.type === 'remove') {
        if (a.reason === 'stale' || a.reason === 'idle' || a.reason === 'excess') {
          // Claimed since the plan was made? Then it is the user's now, not ours to roll.
          const taken = store.transaction(() => {
            markReleasing(store, a.slot);
            const m = listMembers(store, d.name).find((x) => x.slot === a.slot);
            return m !== undefined && m.state !== 'releasing';
          });
          if (taken) return;
        }
        await engine.remove(a.containerId);
        if (a.reason !== 'duplicate') store.transaction(() => forgetMember(store, a.slot));
        return;
      }
      try {
        const c = await engine.recycle(a.container, d.spec.claim.workspaceDir);
        store.transaction(() => recordRecycled(store, a.slot, { id: c.id, address: c.address, ports: c.ports }, Date.now()));
      } catch (err) {
        this.opts.logger.warn('recycle failed; removing the container instead', { pool: d.name, container: a.container.name, error: (err as Error).message });
        await engine.remove(a.container.id);
        store.transaction(() => forgetMember(store, a.slot));
      }
    });
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;

    const starts = actions.filter((a) => a.type === 'start').length;
    if (starts > 0) await this.refill(d, engine, starts);
  }

  private async refill(d: WarmPoolDesired, engine: Engine, count: number): Promise<void> {
    const { store } = this.opts;
    const wanted: NewSlot[] = Array.from({ length: count }, () => this.newSlot(d));
    const inFlight = this.slotsInFlight(d.name);
    // Reserved in the store first: a claim's cold start and a refill can never overshoot maxSize together.
    const reserved = store.transaction(() => reserveSlots(store, d.name, d.spec.maxSize, wanted, Date.now()));
    for (const s of reserved) inFlight.add(s.slot);
    const started = performance.now();
    try {
      const results = await mapSettled(reserved, this.opts.parallelism, async (slot) => {
        try {
          const c = await engine.start(this.containerSpec(d, slot));
          const ready = c.state === 'running' && (c.health === undefined || c.health === 'healthy');
          store.transaction(() => recordStarted(store, slot.slot, { id: c.id, address: c.address, ports: c.ports, ready }, Date.now()));
        } catch (err) {
          store.transaction(() => forgetMember(store, slot.slot));
          throw err;
        } finally {
          inFlight.delete(slot.slot);
        }
      });
      const errors = results.filter((r): r is PromiseRejectedResult => r.status === 'rejected').map((r) => r.reason as Error);
      if (errors.length > 0) {
        const first = errors[0]!;
        const message = `${errors.length} of ${reserved.length} container start(s) failed: ${first.message}`;
        throw first instanceof EngineError ? new EngineError(first.reason, message) : new Error(message);
      }
      this.lastRefillMs.set(d.name, Math.round(performance.now() - started));
    } finally {
      for (const s of reserved) inFlight.delete(s.slot);
    }
  }

  newSlot(d: WarmPoolDesired): NewSlot {
    const slot = newSlotId();
    return { slot, name: `polydev-${d.name}-${slot}`, specHash: d.specHash, engine: d.spec.engine };
  }

  /** What the engine is asked to start for a slot; claimed (cold) containers get the full resources at once. */
  containerSpec(d: WarmPoolDesired, slot: NewSlot, claimId?: string): ContainerSpec {
    const { spec } = d;
    const labels: Record<string, string> = {
      [LABELS.managedBy]: MANAGED_BY,
      [LABELS.owner]: this.opts.owner,
      [LABELS.pool]: d.name,
      [LABELS.provider]: spec.provider,
      [LABELS.specHash]: d.specHash,
      [LABELS.slot]: slot.slot,
    };
    if (claimId) labels[LABELS.claim] = claimId;
    return {
      pool: d.name,
      provider: spec.provider,
      slot: slot.slot,
      name: slot.name,
      ...(spec.image !== undefined ? { image: spec.image } : {}),
      ...(spec.command !== undefined ? { command: spec.command } : {}),
      ...(spec.args !== undefined ? { args: spec.args } : {}),
      ...(spec.ports !== undefined ? { ports: spec.ports } : {}),
      env: spec.env ?? {},
      resources: claimId ? (spec.resources ?? {}) : idleResourcesOf(spec),
      specHash: d.specHash,
      labels,
    };
  }

  async teardown(resource: StoredResource): Promise<void> {
    const { store } = this.opts;
    const d = this.desired(resource);
    const now = Date.now();
    let engine: Engine;
    try {
      engine = this.engineFor(d);
    } catch (err) {
      // An engine this daemon does not have can hold nothing of ours unless the store says so.
      if (listMembers(store, d.name).length === 0) {
        store.transaction(() => {
          for (const c of openClaims(store, d.name)) endClaim(store, c.id, 'failed', 'the pool was deleted', now);
        });
        return;
      }
      throw err;
    }
    store.transaction(() => {
      for (const c of openClaims(store, d.name)) endClaim(store, c.id, 'failed', 'the pool was deleted', now);
    });
    const containers = (await engine.list(this.opts.owner)).filter((c) => c.pool === d.name);
    const results = await mapSettled(containers, this.opts.parallelism, (c) => engine.remove(c.id));
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
    store.transaction(() => {
      for (const m of listMembers(store, d.name)) forgetMember(store, m.slot);
    });
  }

  statusFields(run: SettledRun<WarmPoolDesired, WarmPoolObserved>): Record<string, unknown> {
    const name = run.resource.metadata.name;
    const counts = { warm: 0, claimed: 0, starting: 0, releasing: 0 };
    for (const m of listMembers(this.opts.store, name)) counts[m.state]++;
    const failed = run.observed?.containers.filter((c) => c.state !== 'running' || c.health === 'unhealthy').length ?? 0;
    const refill = this.lastRefillMs.get(name);
    const out: Record<string, unknown> = { ...counts, failed };
    if (refill !== undefined) out.lastRefillDurationMs = refill;
    if (run.lastError) out.lastError = run.lastError.slice(0, 4000);
    else if (run.state === 'Ready') out.lastError = undefined;
    return out;
  }

  failureReason(run: SettledRun<WarmPoolDesired, WarmPoolObserved>): string | undefined {
    return this.lastFailure.get(run.resource.metadata.name);
  }

  /** An engine outage is logged once for every pool (EngineAvailability), not once per pool and retry. */
  reportsFailureItself(run: SettledRun<WarmPoolDesired, WarmPoolObserved>): boolean {
    const engine = run.desired?.spec.engine;
    return engine !== undefined && this.failureReason(run) === 'EngineUnavailable' && this.availability.isDown(engine);
  }

  commit(): void {
    pruneEndedClaims(this.opts.store, this.opts.claimHistory);
  }

  /** Back when the next open claim expires, so expiry is on time rather than at the next resync. */
  requeueAfterMs(run: SettledRun<WarmPoolDesired, WarmPoolObserved>): number | undefined {
    const at = nextExpiry(this.opts.store, run.resource.metadata.name);
    const idle = run.desired?.idleTimeoutMs;
    const candidates = [at === undefined ? undefined : Math.max(10, at - Date.now() + 5), idle !== undefined ? Math.max(1000, idle / 4) : undefined];
    const defined = candidates.filter((x): x is number => x !== undefined);
    return defined.length ? Math.min(...defined) : undefined;
  }

  start(ctx: ControllerContext): void {
    this.ctx = ctx;
    this.sweepTimer = setInterval(() => void this.sweepOrphans(), this.opts.orphanSweepMs);
    this.sweepTimer.unref();
    // First sweep soon after start: pools deleted while the daemon was down leave containers.
    setTimeout(() => void this.sweepOrphans(), 1000).unref();
    // Pools the last process found their engine unreachable for wait out a stored backoff (up to
    // 5 minutes): if the engine answers now (it was fixed meanwhile), they are retried at once.
    const engines = new Set<EngineName>();
    for (const r of this.opts.store.listResources('WarmPool')) {
      if (this.failureOf(r.metadata.name) === 'EngineUnavailable') engines.add((r.spec as { engine?: EngineName }).engine ?? 'docker');
    }
    for (const engine of engines) void this.availability.check(engine);
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.availability.stop();
    if (this.sweepTimer) clearInterval(this.sweepTimer);
    for (const stop of this.watching.values()) stop();
    this.watching.clear();
    await this.sweeping;
  }

  private poolKeys(): string[] {
    return this.opts.store.listKeys().filter((k) => k.kind === 'WarmPool').map((k) => k.name);
  }

  /** Follows an engine's events: a container that dies is replaced now, not at the next resync. */
  private ensureWatch(name: EngineName, engine: Engine): void {
    if (this.watching.has(name) || this.stopped) return;
    const onEvent = (e: EngineEvent) => {
      if (!this.ctx || this.stopped) return;
      if (e.type === 'die' || e.type === 'destroy') {
        const { store } = this.opts;
        if (!store.db.open) return;
        const m = memberByContainer(store, e.id);
        // The event may be older than a recycle that restarted the container: trust it only if newer.
        if (m && m.state === 'warm' && (e.at === undefined || m.readyAt === null || e.at >= m.readyAt)) {
          store.transaction(() => markReleasing(store, m.slot));
        }
      }
      this.ctx.enqueue('WarmPool', e.pool);
    };
    const onError = (err: Error) => {
      if (err instanceof EngineError && err.reason === 'EngineUnavailable') {
        this.availability.markDown(name, err, 'event stream');
        return;
      }
      this.opts.logger.warn('engine event stream broke; every pool is reconciled when it is back', { engine: name, error: err.message });
    };
    // Events may have been missed while the stream was down: every pool is reconciled.
    const onResumed = () => {
      if (this.availability.markUp(name, 'event stream')) return; // engineUp has enqueued its pools
      this.opts.logger.info('engine event stream is back; reconciling every pool', { engine: name });
      for (const pool of this.poolKeys()) this.ctx?.enqueue('WarmPool', pool);
    };
    this.watching.set(name, engine.watch(this.opts.owner, onEvent, onError, onResumed));
  }

  /** Removes owned containers (and rows) of pools that no longer exist. */
  sweepOrphans(): Promise<void> {
    if (this.sweeping || this.stopped) return this.sweeping ?? Promise.resolve();
    this.sweeping = this.doSweep().finally(() => {
      this.sweeping = undefined;
    });
    return this.sweeping;
  }

  private async doSweep(): Promise<void> {
    const { store, logger } = this.opts;
    if (!store.db.open) return;
    const pools = new Set(this.poolKeys());
    const rows = listMembers(store);
    const engineNames = new Set<EngineName>([
      ...this.opts.engines.active().map((e) => e.name),
      ...rows.map((m) => m.engine as EngineName),
    ]);
    for (const name of engineNames) {
      let engine: Engine;
      try {
        engine = this.opts.engines.get(name);
        const orphans = planOrphans(pools, await engine.list(this.opts.owner));
        await mapSettled(orphans, this.opts.parallelism, async (c) => {
          await engine.remove(c.id);
          logger.warn('removed a container of a pool that no longer exists', { engine: name, pool: c.pool, container: c.name });
        });
      } catch (err) {
        logger.debug('orphan sweep skipped an engine', { engine: name, error: (err as Error).message });
      }
    }
    if (!store.db.open) return;
    store.transaction(() => {
      const now = Date.now();
      for (const m of rows) {
        if (pools.has(m.pool)) continue;
        if (m.claimId) endClaim(store, m.claimId, 'failed', 'the pool no longer exists', now);
        forgetMember(store, m.slot);
      }
    });
  }
}
