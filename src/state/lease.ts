import fs from 'node:fs';
import os from 'node:os';
import { randomUUID } from 'node:crypto';
import type { Store } from './store.js';
import { AbortError, sleep, type LeaderElectionTimings, type LeaderElector } from '../runtime/leader.js';

export class LeaseHeldError extends Error {
  constructor(
    readonly holder: LeaseHolder,
    file: string,
  ) {
    super(
      `another polydev-reconciler (pid ${holder.pid} on ${holder.hostname}) is running on ${file} ` +
        `(lease renewed ${Math.max(0, Math.round((Date.now() - holder.renewedAt) / 1000))}s ago); ` +
        `stop it first, or point this one at another --db`,
    );
    this.name = 'LeaseHeldError';
  }
}

interface LeaseRow {
  name: string;
  holder: string;
  pid: number;
  hostname: string;
  acquired_at: string;
  renewed_at: number;
}

/**
 * The host and PID namespace: a pid only means something within its namespace, and
 * host-network containers share the hostname but not the pids.
 */
function hostIdentity(): string {
  let pidns = '';
  try {
    pidns = fs.readlinkSync('/proc/self/ns/pid');
  } catch {
    pidns = 'unknown';
  }
  return `${os.hostname()} ${pidns}`;
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
  // kill(pid, 0) also succeeds for a process that has died but is not reaped yet (a zombie, until
  // its parent waits for it): a dead holder, whose lease is free. /proc tells them apart.
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'latin1');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return true; // no /proc: believe kill()
  }
}

export interface LeaseHolder {
  holder: string;
  pid: number;
  hostname: string;
  renewedAt: number;
}

export interface LeaseOptions {
  /** The holder column: a daemon's identity in the lease (unique per process: the pid is checked too). */
  holder?: string;
  /** Renewal interval once acquired (default ttl/3). */
  renewEveryMs?: number;
}

/**
 * One daemon per database. The lease row is renewed every ttl/3; a holder is taken to be
 * gone when its lease expired, or at once when it ran on this host and its pid is dead.
 */
export class Lease {
  readonly holder: string;
  private timer: NodeJS.Timeout | undefined;
  private readonly renewEveryMs: number;

  constructor(
    private readonly store: Store,
    readonly name = 'daemon',
    readonly ttlMs = 15_000,
    /** Called once if another process took the lease over (this one must stop acting). */
    private readonly onLost?: () => void,
    options: LeaseOptions = {},
  ) {
    this.holder = options.holder ?? randomUUID();
    this.renewEveryMs = options.renewEveryMs ?? Math.max(500, Math.floor(ttlMs / 3));
  }

  /** Takes the lease, or throws LeaseHeldError naming who holds it. */
  acquire(): void {
    const held = this.tryAcquire();
    if (held) throw new LeaseHeldError(held, this.store.file);
  }

  /** Takes the lease and starts renewing it; when someone else holds it, returns them and changes nothing. */
  tryAcquire(): LeaseHolder | undefined {
    const hostname = hostIdentity();
    const held = this.store.transaction((): LeaseHolder | undefined => {
      const row = this.store.stmt('SELECT * FROM leases WHERE name = ?').get(this.name) as LeaseRow | undefined;
      const ours = row !== undefined && row.holder === this.holder && row.pid === process.pid;
      if (row && !ours) {
        const expired = row.renewed_at + this.ttlMs <= Date.now();
        const deadHere = row.hostname === hostname && !processAlive(row.pid);
        if (!expired && !deadHere) return { holder: row.holder, pid: row.pid, hostname: row.hostname, renewedAt: row.renewed_at };
      }
      this.store.stmt(
          `INSERT INTO leases (name, holder, pid, hostname, acquired_at, renewed_at) VALUES (?, ?, ?, ?, ?, ?)
           ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, pid = excluded.pid,
             hostname = excluded.hostname, acquired_at = excluded.acquired_at, renewed_at = excluded.renewed_at`,
        )
        .run(this.name, this.holder, process.pid, hostname, new Date().toISOString(), Date.now());
      return undefined;
    });
    if (held) return held;
    if (!this.timer) {
      this.timer = setInterval(() => this.renewQuietly(), this.renewEveryMs);
      this.timer.unref();
    }
    return undefined;
  }

  /** The current holder, whoever it is (undefined: nobody). */
  current(): LeaseHolder | undefined {
    const row = this.store.stmt('SELECT * FROM leases WHERE name = ?').get(this.name) as LeaseRow | undefined;
    return row ? { holder: row.holder, pid: row.pid, hostname: row.hostname, renewedAt: row.renewed_at } : undefined;
  }

  /** When the last successful renewal happened (ms since epoch). */
  lastRenewedAt = 0;

  /** Returns false (and calls onLost once) when the lease is no longer ours. */
  renew(): boolean {
    if (!this.store.db.open) return false;
    const now = Date.now();
    const info = this.store.stmt('UPDATE leases SET renewed_at = ? WHERE name = ? AND holder = ? AND pid = ?').run(now, this.name, this.holder, process.pid);
    if (info.changes === 0) {
      this.stopRenewing();
      this.onLost?.();
      return false;
    }
    this.lastRenewedAt = now;
    return true;
  }

  /**
   * The timer's renewal: a busy or failing database is retried at the next tick; only a lease
   * that is provably someone else's (or a renewal overdue past the ttl) counts as lost.
   */
  private renewQuietly(): void {
    try {
      this.renew();
    } catch {
      if (this.lastRenewedAt > 0 && Date.now() - this.lastRenewedAt >= this.overdueMs) {
        this.stopRenewing();
        this.onLost?.();
      }
    }
  }

  /** How long renewals may fail before the holder must assume the lease is gone. */
  overdueMs = Number.POSITIVE_INFINITY;

  private stopRenewing(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
  }

  release(): void {
    this.stopRenewing();
    if (!this.store.db.open) return;
    this.store.stmt('DELETE FROM leases WHERE name = ? AND holder = ? AND pid = ?').run(this.name, this.holder, process.pid);
  }
}

/**
 * Leader election on the shared database: two daemons on one host and one SQLite file, one leads.
 * A standby polls every retryPeriod; a leader whose process died on this host is replaced at the
 * next poll, a hung one once its lease is leaseDuration old.
 */
export class SqliteLeaderElector implements LeaderElector {
  readonly identity: string;
  private readonly lease: Lease;
  private leading = false;
  private lostCallbacks: Array<() => void> = [];
  private lostFired = false;

  constructor(
    store: Store,
    private readonly options: LeaderElectionTimings & {
      name: string;
      identity?: string;
      /** Told whenever the holder it waits for changes (for the log). */
      onWaiting?: (holder: LeaseHolder) => void;
    },
  ) {
    this.identity = options.identity ?? `${os.hostname()}_${randomUUID().slice(0, 8)}`;
    this.lease = new Lease(store, options.name, options.leaseDurationMs, () => this.lost(), {
      holder: this.identity,
      renewEveryMs: options.retryPeriodMs,
    });
    this.lease.overdueMs = options.renewDeadlineMs;
  }

  async acquire(signal: AbortSignal): Promise<void> {
    let waitingFor = '';
    for (;;) {
      if (signal.aborted) throw new AbortError();
      let held: LeaseHolder | undefined;
      try {
        held = this.lease.tryAcquire();
      } catch (err) {
        // A locked database is a reason to try again, never a win: nothing was written.
        if ((err as { code?: string }).code !== 'SQLITE_BUSY') throw err;
        await sleep(this.options.retryPeriodMs, signal);
        continue;
      }
      if (!held) {
        this.leading = true;
        this.lease.lastRenewedAt = Date.now();
        return;
      }
      const key = `${held.holder} ${held.pid}`;
      if (key !== waitingFor) {
        waitingFor = key;
        this.options.onWaiting?.(held);
      }
      await sleep(this.options.retryPeriodMs, signal);
    }
  }

  onLost(cb: () => void): void {
    this.lostCallbacks.push(cb);
  }

  /** Leading, and renewed within renewDeadline: past it, the lease may be someone else's already. */
  isLeader(): boolean {
    return this.leading && Date.now() - this.lease.lastRenewedAt < this.options.renewDeadlineMs;
  }

  async holder(): Promise<{ identity: string; renewedAt: Date } | undefined> {
    const h = this.lease.current();
    return h ? { identity: h.holder, renewedAt: new Date(h.renewedAt) } : undefined;
  }

  async release(): Promise<void> {
    const was = this.leading;
    this.leading = false;
    if (was) this.lease.release();
  }

  private lost(): void {
    if (!this.leading || this.lostFired) return;
    this.leading = false;
    this.lostFired = true;
    for (const cb of this.lostCallbacks) cb();
  }
}
