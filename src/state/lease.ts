import fs from 'node:fs';
import os from 'node:os';
import { randomUUID } from 'node:crypto';
import type { Store } from './store.js';

export class LeaseHeldError extends Error {
  constructor(
    readonly holder: { holder: string; pid: number; hostname: string; renewedAt: number },
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
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * One daemon per database. The lease row is renewed every ttl/3; a holder is taken to be
 * gone when its lease expired, or at once when it ran on this host and its pid is dead.
 */
export class Lease {
  readonly holder = randomUUID();
  private timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly store: Store,
    readonly name = 'daemon',
    readonly ttlMs = 15_000,
    /** Called once if another process took the lease over (this one must stop acting). */
    private readonly onLost?: () => void,
  ) {}

  acquire(): void {
    const hostname = hostIdentity();
    this.store.transaction(() => {
      const row = this.store.stmt('SELECT * FROM leases WHERE name = ?').get(this.name) as LeaseRow | undefined;
      if (row && row.holder !== this.holder) {
        const expired = row.renewed_at + this.ttlMs <= Date.now();
        const deadHere = row.hostname === hostname && !processAlive(row.pid);
        if (!expired && !deadHere) {
          throw new LeaseHeldError(
            { holder: row.holder, pid: row.pid, hostname: row.hostname, renewedAt: row.renewed_at },
            this.store.file,
          );
        }
      }
      this.store.stmt(
          `INSERT INTO leases (name, holder, pid, hostname, acquired_at, renewed_at) VALUES (?, ?, ?, ?, ?, ?)
           ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, pid = excluded.pid,
             hostname = excluded.hostname, acquired_at = excluded.acquired_at, renewed_at = excluded.renewed_at`,
        )
        .run(this.name, this.holder, process.pid, hostname, new Date().toISOString(), Date.now());
    });
    this.timer = setInterval(() => this.renew(), Math.max(500, Math.floor(this.ttlMs / 3)));
    this.timer.unref();
  }

  /** Returns false (and calls onLost once) when the lease is no longer ours. */
  renew(): boolean {
    if (!this.store.db.open) return false;
    const info = this.store.stmt('UPDATE leases SET renewed_at = ? WHERE name = ? AND holder = ?').run(Date.now(), this.name, this.holder);
    if (info.changes === 0) {
      if (this.timer) clearInterval(this.timer);
      this.timer = undefined;
      this.onLost?.();
      return false;
    }
    return true;
  }

  release(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    if (!this.store.db.open) return;
    this.store.stmt('DELETE FROM leases WHERE name = ? AND holder = ?').run(this.name, this.holder);
  }
}
