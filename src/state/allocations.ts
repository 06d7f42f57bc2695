import type { Store } from './store.js';
import type { Allocation } from './types.js';

export interface PortRange {
  min: number;
  max: number;
}

export type PortAllocationErrorCode =
  | 'PORT_TAKEN'
  | 'PORT_OUT_OF_RANGE'
  | 'PORT_COOLING_DOWN'
  | 'USER_HAS_PORT'
  | 'POOL_EXHAUSTED';

export class PortAllocationError extends Error {
  constructor(
    readonly code: PortAllocationErrorCode,
    message: string,
  ) {
    super(message);
    this.name = 'PortAllocationError';
  }
}

interface AllocationRow {
  pool: string;
  port: number;
  user_id: string;
  resource_name: string | null;
  state: 'bound' | 'cooldown';
  bound_at: string;
  released_at: string | null;
}

function toAllocation(r: AllocationRow): Allocation {
  return {
    pool: r.pool,
    port: r.port,
    userId: r.user_id,
    resourceName: r.resource_name,
    state: r.state,
    boundAt: r.bound_at,
    releasedAt: r.released_at,
  };
}

export function listAllocations(store: Store, pool?: string): Allocation[] {
  const rows = (
    pool
      ? store.stmt('SELECT * FROM allocations WHERE pool = ? ORDER BY port').all(pool)
      : store.stmt('SELECT * FROM allocations ORDER BY pool, port').all()
  ) as AllocationRow[];
  return rows.map(toAllocation);
}

export function boundAllocationOf(store: Store, userId: string): Allocation | undefined {
  const row = store.stmt(`SELECT * FROM allocations WHERE user_id = ? AND state = 'bound'`).get(userId) as
    | AllocationRow
    | undefined;
  return row ? toAllocation(row) : undefined;
}

/**
 * Allocates ports of one pool, inside a Store transaction. The first few allocations of a
 * transaction ask SQLite directly (an API call creating one port costs a few index look-ups,
 * however large the pool); from the ninth on, the pool's allocations are loaded into memory
 * once, so a bulk apply of 10,000 users stays linear.
 *
 * Rules: a user holds at most one bound port (across pools) and gets it back on every call;
 * a released port cools down for `cooldownMs` before anyone else may take it, and its last
 * user gets it back first, even after the cooldown, while nobody else has taken it.
 */
export class PortAllocator {
  private static readonly BULK_AFTER = 8;
  private taken: Map<number, AllocationRow> | undefined;
  private readonly cooldownByUser = new Map<string, AllocationRow>();
  private cursor: number;
  private calls = 0;

  constructor(
    private readonly store: Store,
    private readonly pool: string,
    private readonly range: PortRange,
    private readonly cooldownMs: number,
    private readonly now: Date = new Date(),
  ) {
    this.cursor = range.min;
  }

  private load(): void {
    this.taken = new Map();
    for (const row of this.store.stmt('SELECT * FROM allocations WHERE pool = ?').all(this.pool) as AllocationRow[]) {
      if (row.state === 'cooldown') this.cooldownByUser.set(row.user_id, row);
      if (row.state === 'cooldown' && this.cooledDown(row)) continue;
      this.taken.set(row.port, row);
    }
  }

  private cooledDown(row: AllocationRow): boolean {
    return row.released_at !== null && Date.parse(row.released_at) + this.cooldownMs <= this.now.getTime();
  }

  /** Who holds the port (bound, or cooling down), if anyone. */
  private holderOf(port: number): AllocationRow | undefined {
    if (this.taken) return this.taken.get(port);
    const row = this.store.stmt('SELECT * FROM allocations WHERE pool = ? AND port = ?').get(this.pool, port) as
      | AllocationRow
      | undefined;
    return row && !(row.state === 'cooldown' && this.cooledDown(row)) ? row : undefined;
  }

  private previousPortOf(userId: string): AllocationRow | undefined {
    if (this.taken) return this.cooldownByUser.get(userId);
    return this.store
      .stmt(`SELECT * FROM allocations WHERE pool = ? AND user_id = ? AND state = 'cooldown' ORDER BY released_at DESC LIMIT 1`)
      .get(this.pool, userId) as AllocationRow | undefined;
  }

  allocate(userId: string, resourceName: string, requestedPort?: number): { port: number; created: boolean } {
    const bound = boundAllocationOf(this.store, userId);
    if (bound) {
      if (bound.pool !== this.pool) {
        throw new PortAllocationError(
          'USER_HAS_PORT',
          `user ${userId} already has port ${bound.port} in ProxyPool ${bound.pool}`,
        );
      }
      if (requestedPort !== undefined && requestedPort !== bound.port) {
        throw new PortAllocationError(
          'USER_HAS_PORT',
          `user ${userId} already has port ${bound.port}; remove it before asking for port ${requestedPort}`,
        );
      }
      if (bound.resourceName !== resourceName) {
        this.store.stmt('UPDATE allocations SET resource_name = ? WHERE pool = ? AND port = ?').run(resourceName, this.pool, bound.port);
      }
      return { port: bound.port, created: false };
    }
    if (++this.calls > PortAllocator.BULK_AFTER && !this.taken) this.load();
    let port: number;
    if (requestedPort !== undefined) {
      this.checkRequested(userId, requestedPort);
      port = requestedPort;
    } else {
      const previous = this.previousPortOf(userId);
      const holder = previous ? this.holderOf(previous.port) : undefined;
      port = previous && (!holder || holder.user_id === userId) ? previous.port : this.nextFree(userId);
    }
    const boundAt = this.now.toISOString();
    this.store
      .stmt(
        `INSERT INTO allocations (pool, port, user_id, resource_name, state, bound_at, released_at)
         VALUES (?, ?, ?, ?, 'bound', ?, NULL)
         ON CONFLICT (pool, port) DO UPDATE SET user_id = excluded.user_id, resource_name = excluded.resource_name,
           state = 'bound', bound_at = excluded.bound_at, released_at = NULL`,
      )
      .run(this.pool, port, userId, resourceName, boundAt);
    this.cooldownByUser.delete(userId);
    this.taken?.set(port, {
      pool: this.pool,
      port,
      user_id: userId,
      resource_name: resourceName,
      state: 'bound',
      bound_at: boundAt,
      released_at: null,
    });
    return { port, created: true };
  }

  private checkRequested(userId: string, port: number): void {
    if (!Number.isInteger(port) || port < this.range.min || port > this.range.max) {
      throw new PortAllocationError(
        'PORT_OUT_OF_RANGE',
        `port ${port} is outside ProxyPool ${this.pool}'s range ${this.range.min}-${this.range.max}`,
      );
    }
    const holder = this.holderOf(port);
    if (!holder || holder.user_id === userId) return;
    if (holder.state === 'bound') {
      throw new PortAllocationError('PORT_TAKEN', `port ${port} is already held by user ${holder.user_id}`);
    }
    throw new PortAllocationError(
      'PORT_COOLING_DOWN',
      `port ${port} was released by user ${holder.user_id} at ${holder.released_at} and cools down until ` +
        new Date(Date.parse(holder.released_at!) + this.cooldownMs).toISOString(),
    );
  }

  private nextFree(userId: string): number {
    if (!this.taken) {
      // The lowest free port: the range start or just above an allocated port (the start of a
      // gap), or a port whose cooldown is over.
      const cutoff = new Date(this.now.getTime() - this.cooldownMs).toISOString();
      const row = this.store
        .stmt(
          `SELECT c.p AS port FROM (
             SELECT @min AS p
             UNION SELECT port + 1 FROM allocations WHERE pool = @pool AND port >= @min AND port < @max
             UNION SELECT port FROM allocations WHERE pool = @pool AND state = 'cooldown' AND released_at <= @cutoff
           ) c
           WHERE c.p BETWEEN @min AND @max AND NOT EXISTS (
             SELECT 1 FROM allocations a WHERE a.pool = @pool AND a.port = c.p
             AND (a.state = 'bound' OR a.released_at > @cutoff))
           ORDER BY c.p LIMIT 1`,
        )
        .get({ pool: this.pool, min: this.range.min, max: this.range.max, cutoff }) as { port: number } | undefined;
      if (row) return row.port;
    } else {
      const span = this.range.max - this.range.min + 1;
      for (let i = 0; i < span; i++) {
        const port = this.cursor;
        this.cursor = port >= this.range.max ? this.range.min : port + 1;
        if (!this.taken.has(port)) return port;
      }
    }
    throw new PortAllocationError(
      'POOL_EXHAUSTED',
      `ProxyPool ${this.pool} has no free port left in ${this.range.min}-${this.range.max} for user ${userId}`,
    );
  }
}

/**
 * Moves a user's bound port into cooldown; returns the released port. With resourceName, only
 * a binding held by that ProxyPort is released (a newer ProxyPort of the same user keeps its port).
 */
export function releasePort(store: Store, userId: string, resourceName?: string, now = new Date()): number | undefined {
  const bound = boundAllocationOf(store, userId);
  if (!bound) return undefined;
  if (resourceName !== undefined && bound.resourceName !== null && bound.resourceName !== resourceName) return undefined;
  store.stmt(
      `UPDATE allocations SET state = 'cooldown', released_at = ?, resource_name = NULL WHERE pool = ? AND port = ?`,
    )
    .run(now.toISOString(), bound.pool, bound.port);
  return bound.port;
}
