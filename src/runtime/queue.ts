/**
 * A work queue of keys with controller-runtime's guarantees: a key is queued at most once,
 * never handed to two workers at once (a key added while it is being processed is queued
 * again when the worker calls done), and failures back off exponentially per key.
 *
 * One deliberate difference from client-go: a key waiting out a failure backoff
 * (addRateLimited) is not run early by add(). In client-go an event re-adds the key at once,
 * so a burst of events (containers dying while their engine shuts down) re-runs a failing key
 * as often as events arrive, and each re-run counts as one more failure: a pool went from
 * healthy to Degraded with a 5-minute backoff in under a second. Here the add is absorbed and
 * the key runs when its backoff ends, so failures count at most once per backoff window. A
 * caller that knows the failure's cause is gone (the engine is back, the spec changed) ends the
 * backoff with retryNow().
 */
export interface BackoffPolicy {
  baseMs: number;
  capMs: number;
}

export const DEFAULT_BACKOFF: BackoffPolicy = { baseMs: 200, capMs: 5 * 60_000 };

export function backoffDelay(failures: number, policy: BackoffPolicy = DEFAULT_BACKOFF): number {
  const exp = Math.min(30, Math.max(0, failures - 1));
  return Math.min(policy.capMs, policy.baseMs * 2 ** exp);
}

/**
 * controller-runtime's ItemExponentialFailureRateLimiter: per key, the delay doubles with each
 * failure recorded by when() until forget(). Keys whose failures the convergence machine counts
 * (and persists) use backoffDelay directly; this serves the others (simple controllers).
 */
export class ItemExponentialBackoff {
  private readonly failures = new Map<string, number>();

  constructor(private readonly policy: BackoffPolicy = DEFAULT_BACKOFF) {}

  /** Records one more failure of key and returns how long it should wait. */
  when(key: string): number {
    const n = (this.failures.get(key) ?? 0) + 1;
    this.failures.set(key, n);
    return backoffDelay(n, this.policy);
  }

  numRequeues(key: string): number {
    return this.failures.get(key) ?? 0;
  }

  forget(key: string): void {
    this.failures.delete(key);
  }
}

export interface QueueHooks {
  onDepth?(depth: number): void;
  onAdd?(): void;
}

export class WorkQueue {
  private readonly queue: string[] = [];
  private readonly queued = new Set<string>();
  private readonly processing = new Set<string>();
  private readonly dirty = new Set<string>();
  private readonly timers = new Map<string, { at: number; timer: NodeJS.Timeout }>();
  /** Keys waiting out a failure backoff, and until when: add() does not cut this short. */
  private readonly backoffUntil = new Map<string, number>();
  /** Keys whose backoff was ended (retryNow) while a worker had them: the run's own failure must not start a new one. */
  private readonly retryRequested = new Set<string>();
  private readonly waiters: Array<(key: string | undefined) => void> = [];
  private shuttingDown = false;

  constructor(
    private readonly hooks: QueueHooks = {},
    private readonly now: () => number = Date.now,
  ) {}

  get depth(): number {
    return this.queue.length;
  }

  get busy(): number {
    return this.processing.size;
  }

  /** Keys waiting for a delay (backoff or requeueAfter) to pass. */
  get delayed(): number {
    return this.timers.size;
  }

  isShuttingDown(): boolean {
    return this.shuttingDown;
  }

  /** Whether the key is waiting out a failure backoff (so add() would not run it before the backoff ends). */
  isBackingOff(key: string): boolean {
    const until = this.backoffUntil.get(key);
    return until !== undefined && until > this.now();
  }

  /** When the key's failure backoff ends (epoch ms), if it is waiting one out. */
  backoffEnds(key: string): number | undefined {
    return this.isBackingOff(key) ? this.backoffUntil.get(key) : undefined;
  }

  /**
   * Queues the key, unless it is waiting out a failure backoff: then the add is absorbed and the
   * key runs once, when the backoff ends. Cuts short a requeueAfter delay (addAfter).
   */
  add(key: string): void {
    if (this.shuttingDown) return;
    const until = this.backoffUntil.get(key);
    if (until !== undefined) {
      if (until > this.now()) return;
      // Its timer is late (a stalled event loop): the backoff is over all the same.
      this.backoffUntil.delete(key);
    }
    const t = this.timers.get(key);
    if (t) {
      clearTimeout(t.timer);
      this.timers.delete(key);
    }
    if (this.processing.has(key)) {
      this.dirty.add(key);
      return;
    }
    if (this.queued.has(key)) return;
    this.hooks.onAdd?.();
    const waiter = this.waiters.shift();
    if (waiter) {
      this.processing.add(key);
      waiter(key);
      return;
    }
    this.queued.add(key);
    this.queue.push(key);
    this.hooks.onDepth?.(this.queue.length);
  }

  /** Adds the key after delayMs; an earlier pending add for the same key wins. A key backing off waits for its backoff. */
  addAfter(key: string, delayMs: number): void {
    if (this.shuttingDown) return;
    if (delayMs <= 0) return this.add(key);
    if (this.queued.has(key) || this.isBackingOff(key)) return;
    const at = this.now() + delayMs;
    const existing = this.timers.get(key);
    if (existing && existing.at <= at) return;
    if (existing) clearTimeout(existing.timer);
    const timer = setTimeout(() => {
      this.timers.delete(key);
      this.add(key);
    }, delayMs);
    timer.unref();
    this.timers.set(key, { at, timer });
  }

  /**
   * The key failed: it runs again after delayMs and not before, however often it is added
   * meanwhile (retryNow ends the wait). Called by the worker that holds the key, before done().
   */
  addRateLimited(key: string, delayMs: number): void {
    this.backOffUntil(key, this.now() + delayMs);
  }

  /** addRateLimited with the deadline given as a time (epoch ms): the one a status already promised. */
  backOffUntil(key: string, at: number): void {
    if (this.shuttingDown) return;
    if (this.retryRequested.has(key)) {
      // The cause went away while this (failed) run was in flight: run again right after it.
      this.dirty.add(key);
      return;
    }
    const delayMs = at - this.now();
    if (delayMs <= 0) return this.add(key);
    const existing = this.timers.get(key);
    if (existing) clearTimeout(existing.timer);
    this.backoffUntil.set(key, at);
    const timer = setTimeout(() => {
      this.timers.delete(key);
      this.backoffUntil.delete(key);
      this.add(key);
    }, delayMs);
    timer.unref();
    this.timers.set(key, { at, timer });
  }

  /**
   * The cause of the key's failures is gone: ends its backoff and queues it now. A key a worker
   * holds runs again once that worker is done, even if the run in flight fails.
   */
  retryNow(key: string): void {
    if (this.shuttingDown) return;
    this.backoffUntil.delete(key);
    const t = this.timers.get(key);
    if (t) {
      clearTimeout(t.timer);
      this.timers.delete(key);
    }
    if (this.processing.has(key)) {
      this.retryRequested.add(key);
      this.dirty.add(key);
      return;
    }
    this.add(key);
  }

  /** Resolves with the next key, or undefined once the queue is shut down. */
  get(): Promise<string | undefined> {
    if (this.shuttingDown) return Promise.resolve(undefined);
    const key = this.queue.shift();
    if (key !== undefined) {
      this.queued.delete(key);
      this.processing.add(key);
      this.hooks.onDepth?.(this.queue.length);
      return Promise.resolve(key);
    }
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  done(key: string): void {
    this.processing.delete(key);
    this.retryRequested.delete(key);
    if (this.dirty.delete(key)) this.add(key);
  }

  shutDown(): void {
    this.shuttingDown = true;
    for (const t of this.timers.values()) clearTimeout(t.timer);
    this.timers.clear();
    this.backoffUntil.clear();
    this.retryRequested.clear();
    this.queue.length = 0;
    this.queued.clear();
    for (const w of this.waiters.splice(0)) w(undefined);
    this.hooks.onDepth?.(0);
  }
}
