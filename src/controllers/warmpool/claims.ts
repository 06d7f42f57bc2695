import { randomUUID } from 'node:crypto';
import type { Logger } from '../../observability/logger.js';
import type { Metrics } from '../../observability/metrics.js';
import type { EventRecorder } from '../../runtime/controller.js';
import {
  bindColdClaim,
  claimContainer,
  ClaimError,
  claimHistory,
  endClaim,
  forgetMember,
  getClaim,
  listClaims,
  memberCounts,
  recordClaimLatencies,
  type ClaimFilter,
  type ClaimOutcome,
  type ClaimRecord,
  type ClaimRequest,
} from '../../state/pools.js';
import type { Store } from '../../state/store.js';
import { EngineError, type Injection, type ObservedContainer } from './engine.js';
import type { WarmPoolController } from './controller.js';
import { warmPoolDesired, type WarmPoolDesired } from './types.js';

export interface ClaimInput {
  userId: string;
  env?: Record<string, string>;
  files?: Record<string, string>;
  ttlSeconds?: number;
}

export interface ClaimResult {
  claimId: string;
  pool: string;
  userId: string;
  container: { id: string; name: string; address: string; ports?: Record<string, number> };
  warm: boolean;
  latencyMs: number;
  expiresAt: string;
}

export type ClaimServiceCode =
  | 'INVALID'
  | 'NOT_FOUND'
  | 'POOL_DELETING'
  | 'TOO_MANY_REQUESTS'
  | 'POOL_EXHAUSTED'
  | 'IMAGE_NOT_FOUND'
  | 'START_FAILED'
  | 'ENGINE_UNAVAILABLE'
  | 'ENGINE_ERROR'
  | 'INJECTION_FAILED';

const HTTP_STATUS: Record<ClaimServiceCode, number> = {
  INVALID: 400,
  NOT_FOUND: 404,
  POOL_DELETING: 409,
  TOO_MANY_REQUESTS: 429,
  POOL_EXHAUSTED: 503,
  ENGINE_UNAVAILABLE: 503,
  IMAGE_NOT_FOUND: 502,
  START_FAILED: 502,
  ENGINE_ERROR: 502,
  INJECTION_FAILED: 502,
};

/** A claim that could not be served; `status` is the HTTP status the API answers with. */
export class ClaimServiceError extends Error {
  readonly status: number;
  constructor(
    readonly code: ClaimServiceCode,
    message: string,
    readonly retryAfterSeconds?: number,
  ) {
    super(message);
    this.name = 'ClaimServiceError';
    this.status = HTTP_STATUS[code];
  }
}

const ENGINE_CODES: Record<string, ClaimServiceCode> = {
  ImageNotFound: 'IMAGE_NOT_FOUND',
  StartFailed: 'START_FAILED',
  EngineUnavailable: 'ENGINE_UNAVAILABLE',
  EngineError: 'ENGINE_ERROR',
};

export const USER_ID = /^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$/;
const ENV_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;
const MAX_TTL_SECONDS = 30 * 24 * 3600;

/** Checks a claim's input; messages name fields and keys, never values (they may be credentials). */
export function validateClaimInput(input: ClaimInput): void {
  const bad = (msg: string): never => {
    throw new ClaimServiceError('INVALID', msg);
  };
  if (typeof input.userId !== 'string' || !USER_ID.test(input.userId)) {
    bad('userId: must be 1-128 of letters, digits and . _ @ -, starting with a letter or digit');
  }
  if (input.ttlSeconds !== undefined && (!Number.isInteger(input.ttlSeconds) || input.ttlSeconds < 1 || input.ttlSeconds > MAX_TTL_SECONDS)) {
    bad(`ttlSeconds: must be a whole number from 1 to ${MAX_TTL_SECONDS}`);
  }
  for (const [k, v] of Object.entries(input.env ?? {})) {
    if (!ENV_NAME.test(k)) bad(`env.${k}: not a valid environment variable name`);
    if (typeof v !== 'string' || /[\n\r\0]/.test(v)) bad(`env.${k}: the value must be a string without newlines or NUL`);
  }
  for (const [p, v] of Object.entries(input.files ?? {})) {
    const parts = p.split('/');
    if (p === '' || p.startsWith('/') || parts.some((s) => s === '' || s === '.' || s === '..') || p.includes('\0') || p.length > 255) {
      bad(`files: ${JSON.stringify(p.slice(0, 80))} must be a relative path without empty, . or .. segments`);
    }
    if (typeof v !== 'string') bad(`files: ${JSON.stringify(p)} must have string content`);
  }
}

export interface PoolStats {
  pool: string;
  warm: number;
  starting: number;
  claimed: number;
  releasing: number;
  /** Containers of the pool that exited or are unhealthy, awaiting removal (from the last reconcile). */
  failed: number;
  claimsServed: number;
  claimsFailed: number;
  warmHitRatio: number | null;
  claimLatencyMs: { p50: number | null; p99: number | null };
  /** Over how many of the newest claims the ratio and latencies are computed. */
  window: number;
  lastRefillDurationMs: number | null;
}

export interface ClaimServiceOptions {
  store: Store;
  controller: WarmPoolController;
  metrics: Metrics;
  logger: Logger;
  recorder: EventRecorder;
  enqueue(kind: string, name: string): void;
}

interface QueuedClaim {
  req: ClaimRequest;
  resolve(outcome: ClaimOutcome): void;
  reject(err: unknown): void;
}

/** Claims committed together at most (a COMMIT costs about as much as 4 claims' statements). */
const MAX_GROUP = 32;

/** How long measured latencies wait before they are written (they are figures, not state). */
const LATENCY_FLUSH_MS = 200;

/**
 * The claim path: one transaction binds a warm container (or reserves room for a cold start),
 * the pool is enqueued for a refill at once, and credentials go straight into the container.
 *
 * Claims that arrive in the same turn of the event loop are committed together (group
 * commit): each claim is still all-or-nothing and answered only after its commit, but a
 * burst pays for one COMMIT instead of one per claim, which was most of a claim's cost.
 */
export class ClaimService {
  private queued: QueuedClaim[] = [];
  private readonly latencies = new Map<string, number>();
  private latencyTimer: NodeJS.Timeout | undefined;
  private readonly pools = new Map<string, { resourceVersion: number; desired: WarmPoolDesired }>();

  constructor(private readonly opts: ClaimServiceOptions) {}

  /** The pool's desired state, parsed again only when its resourceVersion moved. */
  private pool(name: string): WarmPoolDesired {
    const { store } = this.opts;
    const row = store
      .stmt(`SELECT resource_version AS rv, deletion_requested_at AS deleting FROM resources WHERE kind = 'WarmPool' AND name = ?`)
      .get(name) as { rv: number; deleting: string | null } | undefined;
    if (!row) {
      this.pools.delete(name);
      throw new ClaimServiceError('NOT_FOUND', `WarmPool ${name} not found`);
    }
    if (row.deleting) throw new ClaimServiceError('POOL_DELETING', `WarmPool ${name} is being deleted`);
    const cached = this.pools.get(name);
    if (cached && cached.resourceVersion === row.rv) return cached.desired;
    const res = store.getResource('WarmPool', name);
    if (!res) throw new ClaimServiceError('NOT_FOUND', `WarmPool ${name} not found`);
    const desired = warmPoolDesired(res);
    this.pools.set(name, { resourceVersion: res.metadata.resourceVersion, desired });
    return desired;
  }

  async claim(poolName: string, input: ClaimInput): Promise<ClaimResult> {
    const started = performance.now();
    const { metrics, controller } = this.opts;
    // An unknown pool is not counted: its name comes from the URL and must not become a label.
    const d = this.pool(poolName);
    try {
      validateClaimInput(input);
    } catch (err) {
      metrics.claimsTotal.inc({ pool: d.name, result: 'rejected' });
      throw err;
    }
    const now = Date.now();
    const claimId = randomUUID();
    const ttlMs = input.ttlSeconds !== undefined ? input.ttlSeconds * 1000 : d.claimTtlMs;
    let outcome: ClaimOutcome;
    try {
      outcome = await this.commit({
        id: claimId,
        pool: d.name,
        userId: input.userId,
        maxPerUser: d.spec.claim.maxPerUser,
        maxSize: d.spec.maxSize,
        now,
        expiresAt: now + ttlMs,
        coldSlot: () => controller.newSlot(d),
      });
    } catch (err) {
      if (err instanceof ClaimError) {
        const result = err.code === 'TOO_MANY_REQUESTS' ? 'too_many' : 'exhausted';
        metrics.claimsTotal.inc({ pool: d.name, result });
        // A container of a refill is moments from warm: retry soon; otherwise room comes with a release.
        const retry = err.code === 'POOL_EXHAUSTED' ? (memberCounts(this.opts.store, d.name).starting > 0 ? 1 : 5) : undefined;
        throw new ClaimServiceError(err.code as ClaimServiceCode, err.message, retry);
      }
      throw err;
    }
    // Refill now: the warm container just taken is replaced without waiting for a resync.
    this.opts.enqueue('WarmPool', d.name);

    let container: ClaimResult['container'];
    try {
      if (outcome.warm) {
        const m = outcome.member;
        container = { id: m.containerId!, name: m.name, address: m.address ?? '', ...(m.ports ? { ports: m.ports } : {}) };
        const engine = controller.engineFor(d);
        if (d.spec.idleResources && engine.update) await engine.update(container.id, d.spec.resources ?? {});
      } else {
        container = await this.coldStart(d, outcome.slot, claimId);
      }
      if (input.env || input.files) await this.inject(d, container.id, input);
    } catch (err) {
      this.fail(d.name, claimId, err);
      throw this.translate(err);
    }
    const latencyMs = Math.round((performance.now() - started) * 1000) / 1000;
    this.noteLatency(claimId, latencyMs);
    metrics.claimsTotal.inc({ pool: d.name, result: outcome.warm ? 'warm' : 'cold' });
    metrics.claimDuration.observe({ pool: d.name, warm: String(outcome.warm) }, latencyMs / 1000);
    return {
      claimId,
      pool: d.name,
      userId: input.userId,
      container,
      warm: outcome.warm,
      latencyMs,
      expiresAt: new Date(outcome.claim.expiresAt).toISOString(),
    };
  }

  /**
   * Queues a claim for the group commit at the end of this turn of the event loop, or at once
   * when the group is full: in a burst the first claims are answered while later ones are
   * still being read, instead of all waiting for the last.
   */
  private commit(req: ClaimRequest): Promise<ClaimOutcome> {
    return new Promise((resolve, reject) => {
      this.queued.push({ req, resolve, reject });
      if (this.queued.length === 1) setImmediate(() => this.commitQueued());
      else if (this.queued.length >= MAX_GROUP) this.commitQueued();
    });
  }

  private commitQueued(): void {
    const { store } = this.opts;
    const group = this.queued;
    if (group.length === 0) return;
    this.queued = [];
    const results: Array<{ outcome: ClaimOutcome } | { refused: ClaimError }> = [];
    try {
      store.transaction(() => {
        for (const q of group) {
          try {
            results.push({ outcome: claimContainer(store, q.req) });
          } catch (err) {
            // Refusals happen before any write (claimContainer's contract): the group goes on.
            if (!(err instanceof ClaimError)) throw err;
            results.push({ refused: err });
          }
        }
      });
    } catch (err) {
      // Something unexpected rolled the whole group back. A locked database fails them all
      // alike; otherwise each claim gets a transaction of its own, so only the culprit fails.
      const busy = (err as { code?: string }).code === 'SQLITE_BUSY';
      for (const q of group) {
        if (busy || group.length === 1) q.reject(err);
        else {
          try {
            q.resolve(store.transaction(() => claimContainer(store, q.req)));
          } catch (own) {
            q.reject(own);
          }
        }
      }
      return;
    }
    group.forEach((q, i) => {
      const r = results[i]!;
      if ('outcome' in r) q.resolve(r.outcome);
      else q.reject(r.refused);
    });
  }

  /** Latencies are written in batches: a second transaction per claim would cost as much as the claim. */
  private noteLatency(claimId: string, latencyMs: number): void {
    this.latencies.set(claimId, latencyMs);
    this.latencyTimer ??= setTimeout(() => this.flushLatencies(), LATENCY_FLUSH_MS).unref();
  }

  /** Writes the latencies measured so far (also before anything reads them, and at shutdown). */
  flushLatencies(): void {
    if (this.latencyTimer) clearTimeout(this.latencyTimer);
    this.latencyTimer = undefined;
    if (this.latencies.size === 0) return;
    const { store } = this.opts;
    const batch = new Map(this.latencies);
    this.latencies.clear();
    try {
      store.transaction(() => recordClaimLatencies(store, batch));
    } catch (err) {
      // Figures only: a failed write is logged and dropped rather than retried forever.
      this.opts.logger.warn('claim latencies could not be written', { claims: batch.size, error: (err as Error).message });
    }
  }

  private async coldStart(d: WarmPoolDesired, slot: ReturnType<WarmPoolController['newSlot']>, claimId: string) {
    const { store, controller } = this.opts;
    const inFlight = controller.slotsInFlight(d.name);
    inFlight.add(slot.slot);
    let c: ObservedContainer;
    try {
      c = await controller.engineFor(d).start(controller.containerSpec(d, slot, claimId));
    } catch (err) {
      store.transaction(() => forgetMember(store, slot.slot));
      throw err;
    } finally {
      inFlight.delete(slot.slot);
    }
    const bound = store.transaction(() => bindColdClaim(store, claimId, { id: c.id, address: c.address, ports: c.ports }, Date.now()));
    if (!bound) {
      // Released while it was starting: the reconciler removes the container (state releasing).
      this.opts.enqueue('WarmPool', d.name);
      throw new ClaimServiceError('NOT_FOUND', `claim ${claimId} was released while its container was starting`);
    }
    return { id: c.id, name: c.name, address: c.address, ...(c.ports ? { ports: c.ports } : {}) };
  }

  private async inject(d: WarmPoolDesired, containerId: string, input: ClaimInput): Promise<void> {
    const injection: Injection = {};
    if (input.env) injection.env = input.env;
    if (input.files) injection.files = input.files;
    try {
      await this.opts.controller.engineFor(d).inject(containerId, injection);
    } catch (err) {
      // The driver's message names paths and keys only; it is still not echoed beyond the code.
      throw new ClaimServiceError('INJECTION_FAILED', `credentials could not be delivered into the container: ${(err as Error).message}`);
    }
  }

  private fail(pool: string, claimId: string, err: unknown): void {
    const { store, metrics, logger, recorder } = this.opts;
    const reason = err instanceof Error ? err.message : String(err);
    const claim = store.transaction(() => {
      const c = endClaim(store, claimId, 'failed', reason.slice(0, 500), Date.now());
      if (c) recorder.record('WarmPool', pool, 'Warning', 'ClaimFailed', `claim ${claimId} of user ${c.userId}: ${reason.slice(0, 500)}`);
      return c;
    });
    metrics.claimsTotal.inc({ pool, result: 'failed' });
    logger.warn('claim failed', { pool, claim: claimId, user: claim?.userId, error: reason });
    this.opts.enqueue('WarmPool', pool);
  }

  private translate(err: unknown): Error {
    if (err instanceof ClaimServiceError) return err;
    if (err instanceof EngineError) {
      return new ClaimServiceError(ENGINE_CODES[err.reason] ?? 'ENGINE_ERROR', err.message, err.reason === 'EngineUnavailable' ? 5 : undefined);
    }
    return new ClaimServiceError('ENGINE_ERROR', (err as Error).message);
  }

  /** Ends a claim; its container is destroyed or recycled by the reconciler right after. Unknown id → NOT_FOUND. */
  release(claimId: string): ClaimRecord {
    const { store } = this.opts;
    const claim = store.transaction(() => endClaim(store, claimId, 'released', 'released by request', Date.now()));
    if (!claim) throw new ClaimServiceError('NOT_FOUND', `claim ${claimId} not found`);
    this.opts.enqueue('WarmPool', claim.pool);
    return claim;
  }

  get(claimId: string): ClaimRecord {
    this.flushLatencies();
    const claim = getClaim(this.opts.store, claimId);
    if (!claim) throw new ClaimServiceError('NOT_FOUND', `claim ${claimId} not found`);
    return claim;
  }

  list(filter: ClaimFilter): ClaimRecord[] {
    this.flushLatencies();
    return listClaims(this.opts.store, filter);
  }

  stats(poolName: string): PoolStats {
    const { store } = this.opts;
    const res = store.getResource('WarmPool', poolName);
    if (!res) throw new ClaimServiceError('NOT_FOUND', `WarmPool ${poolName} not found`);
    this.flushLatencies();
    const counts = memberCounts(store, poolName);
    const window = 1000;
    const h = claimHistory(store, poolName, window);
    const status = res.status ?? { phase: 'Pending', conditions: [] };
    return {
      pool: poolName,
      ...counts,
      failed: typeof status.failed === 'number' ? status.failed : 0,
      claimsServed: h.served,
      claimsFailed: h.failed,
      warmHitRatio: h.served ? Math.round((h.warmHits / h.served) * 10_000) / 10_000 : null,
      claimLatencyMs: { p50: h.p50Ms, p99: h.p99Ms },
      window,
      lastRefillDurationMs: typeof status.lastRefillDurationMs === 'number' ? status.lastRefillDurationMs : null,
    };
  }
}

/** A claim as the API and `get claims -o json` show it: the Claim CRD's shape. */
export function claimObject(c: ClaimRecord): Record<string, unknown> {
  const iso = (ms: number | null) => (ms === null ? undefined : new Date(ms).toISOString());
  return {
    apiVersion: 'polydev.ai/v1alpha1',
    kind: 'Claim',
    metadata: { name: c.id, creationTimestamp: iso(c.createdAt) },
    spec: { pool: c.pool, userId: c.userId, expiresAt: iso(c.expiresAt) },
    status: {
      phase: { pending: 'Pending', bound: 'Bound', released: 'Released', expired: 'Expired', failed: 'Failed' }[c.state],
      containerId: c.containerId ?? undefined,
      containerName: c.containerName ?? undefined,
      address: c.address ?? undefined,
      ports: c.ports ?? undefined,
      warm: c.warm,
      boundAt: iso(c.boundAt),
      releasedAt: iso(c.endedAt),
      expiresAt: iso(c.expiresAt),
      reason: c.reason ?? undefined,
      latencyMs: c.latencyMs ?? undefined,
    },
  };
}
