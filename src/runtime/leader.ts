/**
 * Leader election, whatever holds the lease: a row in the shared SQLite database (two daemons on
 * one host) or a coordination.k8s.io/v1 Lease (replicas in Kubernetes). Only the leader reconciles,
 * applies desired state and writes status; a standby serves /healthz and /metrics and waits.
 */
export interface LeaderElector {
  readonly identity: string;
  /** Resolves once this process holds the lease (retrying every retryPeriod); rejects with an AbortError when signal aborts first. */
  acquire(signal: AbortSignal): Promise<void>;
  /** Called at most once if leadership is lost (renew failed past renewDeadline, or another holder took the lease). */
  onLost(cb: () => void): void;
  /** Holds the lease and renewed it within renewDeadline (so it may act now). */
  isLeader(): boolean;
  /** Who holds it now, for status and logs. */
  holder(): Promise<{ identity: string; renewedAt: Date } | undefined>;
  /** Stops renewing and gives the lease up if held. */
  release(): Promise<void>;
}

export interface LeaderElectionTimings {
  /** How long a lease is honoured after its last renewal: the longest a dead leader blocks a standby. */
  leaseDurationMs: number;
  /** How long the leader keeps trying to renew before it gives up and stops acting. */
  renewDeadlineMs: number;
  /** Interval of acquire attempts and renewals. */
  retryPeriodMs: number;
}

export class AbortError extends Error {
  constructor(message = 'aborted') {
    super(message);
    this.name = 'AbortError';
  }
}

/** Resolves after ms, or rejects with AbortError as soon as signal aborts. */
export function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal.aborted) return reject(new AbortError());
    const timer = setTimeout(() => {
      signal.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(timer);
      reject(new AbortError());
    };
    signal.addEventListener('abort', onAbort, { once: true });
  });
}
