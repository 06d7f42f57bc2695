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
 * Allocates ports of one pool. Must be used inside a Store transaction; it keeps
 * the pool's taken ports in memory so a bulk apply of 10,000 users stays linear.
 *
 * Rules: a user holds at most one bound port (across pools) and gets it back on every
 * call; a released port cools down for `cooldownMs` before anyone else may take it,
 * but its previous user may reclaim it at any time.
 */
export class PortAllocator {
  private readonly taken = new Map<number, AllocationRow>();
  private readonly cooldownByUser = new Map<string, AllocationRow>();
  private cursor: number;

  constructor(
    private readonly store: Store,
    private readonly pool: string,
    private readonly range: PortRange,
    private readonly cooldownMs: number,
    private readonly now: Date = new Date(),
  ) {
    this.cursor = range.min;
    const rows = store.stmt('SELECT * FROM allocations WHERE pool = ?').all(pool) as AllocationRow[];
    for (const row of rows) {
      if (row.state === 'cooldown') this.cooldownByUser.set(row.user_id, row);
      // A cooled-down port is free for anyone, but its last user still gets it back first.
      if (row.state === 'cooldown' && this.cooledDown(row)) continue;
      this.taken.set(row.port, row);
    }
  }

  private cooledDown(row: AllocationRow): boolean {
    return row.released_at !== null && Date.parse(row.released_at) + this.cooldownMs <= this.now.getTime();
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
        this.store.stmt('UPDATE allocations SET resource_name = ? WHERE pool = ? AND port = ?')
          .run(resourceName, this.pool, bound.port);
      }
      return { port: bound.port, created: false };
    }
    let port: number;
    if (requestedPort !== undefined) {
      this.checkRequested(userId, requestedPort);
      port = requestedPort;
    } else {
      const previous = this.cooldownByUser.get(userId);
      const holder = previous ? this.taken.get(previous.port) : undefined;
      port = previous && (!holder || holder.user_id === userId) ? previous.port : this.nextFree(userId);
    }
    this.store.stmt(
        `INSERT INTO allocations (pool, port, user_id, resource_name, state, bound_at, released_at)
         VALUES (?, ?, ?, ?, 'bound', ?, NULL)
         ON CONFLICT (pool, port) DO UPDATE SET user_id = excluded.user_id, resource_name = excluded.resource_name,
           state = 'bound', bound_at = excluded.bound_at, released_at = NULL`,
      )
      .run(this.pool, port, userId, resourceName, this.now.toISOString());
    const row: AllocationRow = {
      pool: this.pool,
      port,
      user_id: userId,
      resource_name: resourceName,
      state: 'bound',
      bound_at: this.now.toISOString(),
      released_at: null,
    };
    this.cooldownByUser.delete(userId);
    this.taken.set(port, row);
    return { port, created: true };
  }

  private checkRequested(userId: string, port: number): void {
    if (!Number.isInteger(port) || port < this.range.min || port > this.range.max) {
      throw new PortAllocationError(
        'PORT_OUT_OF_RANGE',
        `port ${port} is outside ProxyPool ${this.pool}'s range ${this.range.min}-${this.range.max}`,
      );
    }
    const holder = this.taken.get(port);
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
    const span = this.range.max - this.range.min + 1;
    for (let i = 0; i < span; i++) {
      const port = this.cursor;
      this.cursor = port >= this.range.max ? this.range.min : port + 1;
      if (!this.taken.has(port)) return port;
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
