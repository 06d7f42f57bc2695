import type { Store } from './store.js';

// Warm-pool members (one row per container the daemon runs for a WarmPool) and claims.
// Every function that changes rows expects to run inside store.transaction(): the callers
// decide what one unit of change is (a claim is one transaction, a reconcile pass another).

export type MemberState = 'starting' | 'warm' | 'claimed' | 'releasing';

export interface PoolMember {
  slot: string;
  pool: string;
  engine: string;
  /** Null while the container is being created. */
  containerId: string | null;
  name: string;
  address: string | null;
  /** Port name → port on address (Nomad's dynamic ports); null or absent when the engine maps none. */
  ports?: Record<string, number> | null;
  specHash: string;
  state: MemberState;
  claimId: string | null;
  /** Epoch ms. */
  createdAt: number;
  /** Epoch ms at which it became warm (or was recycled). */
  readyAt: number | null;
}

export type ClaimState = 'pending' | 'bound' | 'released' | 'expired' | 'failed';
export const OPEN_CLAIM_STATES: readonly ClaimState[] = ['pending', 'bound'];

export interface ClaimRecord {
  id: string;
  pool: string;
  userId: string;
  slot: string | null;
  containerId: string | null;
  containerName: string | null;
  address: string | null;
  ports?: Record<string, number> | null;
  warm: boolean;
  state: ClaimState;
  /** Why it ended (or failed). */
  reason: string | null;
  createdAt: number;
  boundAt: number | null;
  expiresAt: number;
  endedAt: number | null;
  latencyMs: number | null;
}

interface MemberRow {
  slot: string;
  pool: string;
  engine: string;
  container_id: string | null;
  name: string;
  address: string | null;
  ports: string | null;
  spec_hash: string;
  state: MemberState;
  claim_id: string | null;
  created_at: number;
  ready_at: number | null;
}

interface ClaimRow {
  id: string;
  pool: string;
  user_id: string;
  slot: string | null;
  container_id: string | null;
  container_name: string | null;
  address: string | null;
  ports: string | null;
  warm: number;
  state: ClaimState;
  reason: string | null;
  created_at: number;
  bound_at: number | null;
  expires_at: number;
  ended_at: number | null;
  latency_ms: number | null;
}

function parsePorts(text: string | null): Record<string, number> | null {
  if (!text) return null;
  try {
    const v = JSON.parse(text) as unknown;
    return v && typeof v === 'object' && !Array.isArray(v) ? (v as Record<string, number>) : null;
  } catch {
    return null;
  }
}

const portsText = (ports: Record<string, number> | null | undefined): string | null =>
  ports && Object.keys(ports).length ? JSON.stringify(ports) : null;

const toMember = (r: MemberRow): PoolMember => ({
  slot: r.slot,
  pool: r.pool,
  engine: r.engine,
  containerId: r.container_id,
  name: r.name,
  address: r.address,
  ports: parsePorts(r.ports),
  specHash: r.spec_hash,
  state: r.state,
  claimId: r.claim_id,
  createdAt: r.created_at,
  readyAt: r.ready_at,
});

const toClaim = (r: ClaimRow): ClaimRecord => ({
  id: r.id,
  pool: r.pool,
  userId: r.user_id,
  slot: r.slot,
  containerId: r.container_id,
  containerName: r.container_name,
  address: r.address,
  ports: parsePorts(r.ports),
  warm: r.warm === 1,
  state: r.state,
  reason: r.reason,
  createdAt: r.created_at,
  boundAt: r.bound_at,
  expiresAt: r.expires_at,
  endedAt: r.ended_at,
  latencyMs: r.latency_ms,
});

export type ClaimErrorCode = 'TOO_MANY_REQUESTS' | 'POOL_EXHAUSTED' | 'NOT_FOUND';

export class ClaimError extends Error {
  constructor(
    readonly code: ClaimErrorCode,
    message: string,
  ) {
    super(message);
    this.name = 'ClaimError';
  }
}

/** The id that marks this database's containers in shared engines (LABELS.owner). */
/**
 * Makes the configured id this database's owner id. Returns the previous id when it differed
 * (what that id labelled is no longer this daemon's: the caller says so loudly).
 */
export function setInstallationId(store: Store, id: string): string | undefined {
  return store.transaction(() => {
    const before = installationId(store);
    if (before === id) return undefined;
    store.stmt(`UPDATE meta SET value = ? WHERE key = 'installation_id'`).run(id);
    return before;
  });
}

export function installationId(store: Store): string {
  const row = store.stmt(`SELECT value FROM meta WHERE key = 'installation_id'`).get() as { value: string } | undefined;
  if (!row) throw new Error(`${store.file}: the meta table has no installation_id`);
  return row.value;
}

// ---- members ------------------------------------------------------------

export function listMembers(store: Store, pool?: string): PoolMember[] {
  const rows = (
    pool === undefined
      ? store.stmt('SELECT * FROM pool_members ORDER BY pool, created_at').all()
      : store.stmt('SELECT * FROM pool_members WHERE pool = ? ORDER BY created_at').all(pool)
  ) as MemberRow[];
  return rows.map(toMember);
}

export function memberByContainer(store: Store, containerId: string): PoolMember | undefined {
  const row = store.stmt('SELECT * FROM pool_members WHERE container_id = ?').get(containerId) as MemberRow | undefined;
  return row && toMember(row);
}

export function poolsWithMembers(store: Store): string[] {
  return (store.stmt('SELECT DISTINCT pool FROM pool_members').all() as Array<{ pool: string }>).map((r) => r.pool);
}

export interface NewSlot {
  slot: string;
  name: string;
  specHash: string;
  engine: string;
}

function countMembers(store: Store, pool: string): number {
  return (store.stmt('SELECT count(*) AS n FROM pool_members WHERE pool = ?').get(pool) as { n: number }).n;
}

/** Inserts `starting` rows for as many of `wanted` as fit under maxSize; returns those reserved. */
export function reserveSlots(store: Store, pool: string, maxSize: number, wanted: NewSlot[], now: number): NewSlot[] {
  const room = Math.max(0, maxSize - countMembers(store, pool));
  const reserved = wanted.slice(0, room);
  const insert = store.stmt(
    `INSERT INTO pool_members (slot, pool, engine, name, spec_hash, state, created_at) VALUES (?, ?, ?, ?, ?, 'starting', ?)`,
  );
  for (const s of reserved) insert.run(s.slot, pool, s.engine, s.name, s.specHash, now);
  return reserved;
}

/** Records what the engine started for a slot: warm (claimable) or still starting (health check pending). */
export function recordStarted(
  store: Store,
  slot: string,
  c: { id: string; address: string; ports?: Record<string, number> | undefined; ready: boolean },
  now: number,
): boolean {
  const info = store
    .stmt(
      `UPDATE pool_members SET container_id = ?, address = ?, ports = ?,
         state = CASE WHEN state = 'starting' AND ? THEN 'warm' ELSE state END,
         ready_at = CASE WHEN state = 'starting' AND ? THEN ? ELSE ready_at END
       WHERE slot = ?`,
    )
    .run(c.id, c.address, portsText(c.ports), c.ready ? 1 : 0, c.ready ? 1 : 0, now, slot);
  return info.changes === 1;
}

/** An owned container the store did not know (a crash between create and record, or a lost database). */
export function adoptMember(store: Store, m: PoolMember): void {
  store
    .stmt(
      `INSERT INTO pool_members (slot, pool, engine, container_id, name, address, ports, spec_hash, state, claim_id, created_at, ready_at)
       VALUES (@slot, @pool, @engine, @containerId, @name, @address, @ports, @specHash, @state, @claimId, @createdAt, @readyAt)
       ON CONFLICT (slot) DO UPDATE SET container_id = excluded.container_id, address = excluded.address, ports = excluded.ports,
         state = excluded.state, ready_at = excluded.ready_at`,
    )
    .run({ ...m, ports: portsText(m.ports) });
}

export function forgetMember(store: Store, slot: string): void {
  store.stmt('DELETE FROM pool_members WHERE slot = ?').run(slot);
}

/** A recycled container is warm again, with no claim. */
export function recordRecycled(store: Store, slot: string, c: { id: string; address: string; ports?: Record<string, number> | undefined }, now: number): void {
  store
    .stmt(`UPDATE pool_members SET container_id = ?, address = ?, ports = ?, state = 'warm', claim_id = NULL, ready_at = ? WHERE slot = ?`)
    .run(c.id, c.address, portsText(c.ports), now, slot);
}

/** Takes a warm member out of rotation at once (its container died): no claim may get it. */
export function markReleasing(store: Store, slot: string): void {
  store.stmt(`UPDATE pool_members SET state = 'releasing' WHERE slot = ? AND state = 'warm'`).run(slot);
}

// ---- claims ---------------------------------------------------------------

export interface ClaimRequest {
  id: string;
  pool: string;
  userId: string;
  maxPerUser: number;
  maxSize: number;
  now: number;
  expiresAt: number;
  /** Makes the slot a cold start would use; called only when no container is warm. */
  coldSlot: () => NewSlot;
}

export type ClaimOutcome =
  | { warm: true; claim: ClaimRecord; member: PoolMember }
  | { warm: false; claim: ClaimRecord; slot: NewSlot };

/**
 * Binds a claim to the oldest warm container of the pool, or reserves a slot for a cold start
 * while the pool is below maxSize. Must run inside one transaction: that, and the unique index
 * on open claims per slot, is what keeps a container from ever going to two claims.
 * A ClaimError is thrown only before anything is written, so a refused claim leaves the
 * transaction it shares with other claims (the claim service's group commit) untouched.
 */
export function claimContainer(store: Store, req: ClaimRequest): ClaimOutcome {
  const open = (
    store.stmt(`SELECT count(*) AS n FROM claims WHERE pool = ? AND user_id = ? AND state IN ('pending', 'bound')`)
      .get(req.pool, req.userId) as { n: number }
  ).n;
  if (open >= req.maxPerUser) {
    throw new ClaimError(
      'TOO_MANY_REQUESTS',
      `user ${req.userId} already holds ${open} open claim(s) on pool ${req.pool} (maxPerUser ${req.maxPerUser}); release one first`,
    );
  }
  const warm = store
    .stmt(`SELECT * FROM pool_members WHERE pool = ? AND state = 'warm' ORDER BY ready_at, slot LIMIT 1`)
    .get(req.pool) as MemberRow | undefined;
  if (warm) {
    store.stmt(`UPDATE pool_members SET state = 'claimed', claim_id = ? WHERE slot = ?`).run(req.id, warm.slot);
    store
      .stmt(
        `INSERT INTO claims (id, pool, user_id, slot, container_id, container_name, address, ports, warm, state, created_at, bound_at, expires_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, 'bound', ?, ?, ?)`,
      )
      .run(req.id, req.pool, req.userId, warm.slot, warm.container_id, warm.name, warm.address, warm.ports, req.now, req.now, req.expiresAt);
    // The rows just written, without reading them back (this is the hot path of every claim).
    const claim: ClaimRecord = {
      id: req.id,
      pool: req.pool,
      userId: req.userId,
      slot: warm.slot,
      containerId: warm.container_id,
      containerName: warm.name,
      address: warm.address,
      ports: parsePorts(warm.ports),
      warm: true,
      state: 'bound',
      reason: null,
      createdAt: req.now,
      boundAt: req.now,
      expiresAt: req.expiresAt,
      endedAt: null,
      latencyMs: null,
    };
    return { warm: true, claim, member: toMember({ ...warm, state: 'claimed', claim_id: req.id }) };
  }
  const [slot] = countMembers(store, req.pool) < req.maxSize ? reserveSlots(store, req.pool, req.maxSize, [req.coldSlot()], req.now) : [];
  if (!slot) {
    throw new ClaimError(
      'POOL_EXHAUSTED',
      `pool ${req.pool} has no warm container and is at maxSize (${req.maxSize}); retry later`,
    );
  }
  store.stmt(`UPDATE pool_members SET claim_id = ? WHERE slot = ?`).run(req.id, slot.slot);
  store
    .stmt(
      `INSERT INTO claims (id, pool, user_id, slot, container_name, warm, state, created_at, expires_at)
       VALUES (?, ?, ?, ?, ?, 0, 'pending', ?, ?)`,
    )
    .run(req.id, req.pool, req.userId, slot.slot, slot.name, req.now, req.expiresAt);
  return { warm: false, claim: getClaim(store, req.id)!, slot };
}

/** Binds a cold-started container to its pending claim; false when the claim ended meanwhile. */
export function bindColdClaim(store: Store, claimId: string, c: { id: string; address: string; ports?: Record<string, number> | undefined }, now: number): boolean {
  const ports = portsText(c.ports);
  const info = store
    .stmt(`UPDATE claims SET container_id = ?, address = ?, ports = ?, state = 'bound', bound_at = ? WHERE id = ? AND state = 'pending'`)
    .run(c.id, c.address, ports, now, claimId);
  const bound = info.changes === 1;
  store
    .stmt(`UPDATE pool_members SET container_id = ?, address = ?, ports = ?, state = ?, ready_at = ? WHERE claim_id = ? AND state = 'starting'`)
    .run(c.id, c.address, ports, bound ? 'claimed' : 'releasing', now, claimId);
  return bound;
}

export function recordClaimLatencies(store: Store, latencies: ReadonlyMap<string, number>): void {
  const update = store.stmt('UPDATE claims SET latency_ms = ? WHERE id = ?');
  for (const [claimId, ms] of latencies) update.run(ms, claimId);
}

export function getClaim(store: Store, id: string): ClaimRecord | undefined {
  const row = store.stmt('SELECT * FROM claims WHERE id = ?').get(id) as ClaimRow | undefined;
  return row && toClaim(row);
}

export interface ClaimFilter {
  pool?: string;
  userId?: string;
  /** `open` is pending or bound. */
  state?: ClaimState | 'open';
  limit?: number;
}

export function listClaims(store: Store, f: ClaimFilter = {}): ClaimRecord[] {
  const where: string[] = [];
  const args: unknown[] = [];
  if (f.pool !== undefined) {
    where.push('pool = ?');
    args.push(f.pool);
  }
  if (f.userId !== undefined) {
    where.push('user_id = ?');
    args.push(f.userId);
  }
  if (f.state === 'open') where.push(`state IN ('pending', 'bound')`);
  else if (f.state !== undefined) {
    where.push('state = ?');
    args.push(f.state);
  }
  const sql = `SELECT * FROM claims ${where.length ? `WHERE ${where.join(' AND ')}` : ''} ORDER BY created_at DESC, id LIMIT ?`;
  return (store.stmt(sql).all(...args, f.limit ?? 1000) as ClaimRow[]).map(toClaim);
}

/**
 * Ends an open claim (released by its user, expired, or failed) and hands its container to the
 * reconciler (`releasing`: destroyed or recycled by the next pass). Returns the claim as it is
 * now; an already ended claim is returned unchanged.
 */
export function endClaim(
  store: Store,
  id: string,
  state: 'released' | 'expired' | 'failed',
  reason: string,
  now: number,
): ClaimRecord | undefined {
  const claim = getClaim(store, id);
  if (!claim) return undefined;
  if (claim.state !== 'pending' && claim.state !== 'bound') return claim;
  store.stmt('UPDATE claims SET state = ?, reason = ?, ended_at = ? WHERE id = ?').run(state, reason, now, id);
  if (claim.slot) {
    store.stmt(`UPDATE pool_members SET state = 'releasing' WHERE slot = ? AND claim_id = ?`).run(claim.slot, id);
  }
  return getClaim(store, id);
}

export function openClaims(store: Store, pool: string): ClaimRecord[] {
  return (store.stmt(`SELECT * FROM claims WHERE pool = ? AND state IN ('pending', 'bound')`).all(pool) as ClaimRow[]).map(toClaim);
}

/** The earliest expiry among open claims of a pool (to requeue the pool right then). */
export function nextExpiry(store: Store, pool: string): number | undefined {
  const row = store
    .stmt(`SELECT min(expires_at) AS at FROM claims WHERE pool = ? AND state IN ('pending', 'bound')`)
    .get(pool) as { at: number | null };
  return row.at ?? undefined;
}

/** Keeps the newest `keep` ended claims (history for stats and `get claims`); open claims are never pruned. */
export function pruneEndedClaims(store: Store, keep: number): void {
  store
    .stmt(
      `DELETE FROM claims WHERE state NOT IN ('pending', 'bound') AND id IN (
         SELECT id FROM claims WHERE state NOT IN ('pending', 'bound') ORDER BY created_at DESC LIMIT -1 OFFSET ?)`,
    )
    .run(keep);
}

export interface PoolCounts {
  starting: number;
  warm: number;
  claimed: number;
  releasing: number;
}

export function memberCounts(store: Store, pool: string): PoolCounts {
  const out: PoolCounts = { starting: 0, warm: 0, claimed: 0, releasing: 0 };
  const rows = store.stmt('SELECT state, count(*) AS n FROM pool_members WHERE pool = ? GROUP BY state').all(pool) as Array<{
    state: MemberState;
    n: number;
  }>;
  for (const r of rows) out[r.state] = r.n;
  return out;
}

export interface ClaimHistory {
  /** Claims in the retained history that got a container. */
  served: number;
  warmHits: number;
  failed: number;
  p50Ms: number | null;
  p99Ms: number | null;
}

/** Figures over the newest `window` claims of a pool. */
export function claimHistory(store: Store, pool: string, window = 1000): ClaimHistory {
  const rows = store
    .stmt(`SELECT warm, state, latency_ms, bound_at FROM claims WHERE pool = ? ORDER BY created_at DESC LIMIT ?`)
    .all(pool, window) as Array<{ warm: number; state: ClaimState; latency_ms: number | null; bound_at: number | null }>;
  const served = rows.filter((r) => r.bound_at !== null);
  const lat = served.map((r) => r.latency_ms).filter((x): x is number => x !== null).sort((a, b) => a - b);
  const q = (p: number) => (lat.length ? lat[Math.min(lat.length - 1, Math.ceil(p * lat.length) - 1)]! : null);
  return {
    served: served.length,
    warmHits: served.filter((r) => r.warm === 1).length,
    failed: rows.filter((r) => r.bound_at === null && r.state === 'failed').length,
    p50Ms: q(0.5),
    p99Ms: q(0.99),
  };
}

/** Members of every pool by state, for the polydev_warm_pool_containers gauge (at scrape time). */
export function memberCountsByPool(store: Store): Array<{ pool: string; state: string; n: number }> {
  return store.stmt('SELECT pool, state, count(*) AS n FROM pool_members GROUP BY pool, state').all() as Array<{
    pool: string;
    state: string;
    n: number;
  }>;
}
