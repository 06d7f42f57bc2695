import os from 'node:os';
import { randomUUID } from 'node:crypto';
import { isConflict, microTime, type KubernetesClient, type LeaseRecord } from '../drivers/kubernetes.js';
import type { Logger } from '../observability/logger.js';
import { canonicalJson } from '../util/canonical-json.js';
import { AbortError, sleep, type LeaderElectionTimings, type LeaderElector } from './leader.js';

export interface KubernetesLeaseElectorOptions {
  client: KubernetesClient;
  namespace: string;
  /** The Lease's name (default polydev-reconciler). */
  name?: string;
  /** Default: hostname_uuid (client-go's convention), unique per process. */
  identity?: string;
  timings: LeaderElectionTimings;
  logger: Logger;
}

/**
 * Leader election on a coordination.k8s.io/v1 Lease, with client-go's leaderelection semantics:
 * - the record is holderIdentity, leaseDurationSeconds, acquireTime and renewTime (MicroTime),
 *   leaseTransitions (incremented whenever the holder changes);
 * - another holder's lease is honoured until leaseDurationSeconds after this process last saw
 *   the record change, by its own clock: clocks of different machines are never compared;
 * - writes are conditional on resourceVersion, so of two candidates exactly one wins (409 for
 *   the other);
 * - the leader renews every retryPeriod and gives up when it could not renew for renewDeadline
 *   (shorter than leaseDuration, so it stops acting before anyone may take over), or at once
 *   when it finds another holder in the record.
 */
export class KubernetesLeaseElector implements LeaderElector {
  readonly identity: string;
  readonly leaseName: string;
  private observed: { spec: LeaseRecord['spec']; digest: string } | undefined;
  private observedAt = 0;
  private leading = false;
  private lastRenewAt = 0;
  /** The newest tryAcquireOrRenew, which a race may have stopped waiting for (release checks it). */
  private attempt: Promise<boolean> | undefined;
  private lostCallbacks: Array<() => void> = [];
  private lostFired = false;
  private renewAbort: AbortController | undefined;
  private renewLoop: Promise<void> | undefined;

  constructor(private readonly opts: KubernetesLeaseElectorOptions) {
    const { leaseDurationMs, renewDeadlineMs, retryPeriodMs } = opts.timings;
    // client-go's own checks: a leader must give up before a standby may take over.
    if (!(leaseDurationMs > renewDeadlineMs)) throw new Error('leader election: leaseDuration must be greater than renewDeadline');
    if (!(renewDeadlineMs > retryPeriodMs * 1.2)) throw new Error('leader election: renewDeadline must be greater than retryPeriod × 1.2');
    this.identity = opts.identity ?? `${os.hostname()}_${randomUUID()}`;
    this.leaseName = opts.name ?? 'polydev-reconciler';
  }

  /** Whole seconds, as the Lease stores them; rounded up so a holder is never honoured for less than asked. */
  private get leaseSeconds(): number {
    return Math.max(1, Math.ceil(this.opts.timings.leaseDurationMs / 1000));
  }

  async acquire(signal: AbortSignal): Promise<void> {
    if (this.leading) return;
    let lastHolder: string | undefined;
    const aborted = new Promise<never>((_, reject) => {
      const fail = () => reject(new AbortError('leader election aborted'));
      if (signal.aborted) fail();
      else signal.addEventListener('abort', fail, { once: true });
    });
    aborted.catch(() => undefined); // observed by the race below, or never needed
    for (;;) {
      if (signal.aborted) throw new AbortError('leader election aborted');
      // An attempt stuck on a slow API server must not hold up an abort.
      this.attempt = this.tryAcquireOrRenew();
      const ok = await Promise.race([this.attempt, aborted]);
      if (ok) {
        this.leading = true;
        this.lostFired = false;
        this.lastRenewAt = Date.now();
        this.opts.logger.info('became leader', { lease: `${this.opts.namespace}/${this.leaseName}`, identity: this.identity });
        this.startRenewing();
        return;
      }
      const holder = this.observed?.spec.holderIdentity;
      if (holder && holder !== lastHolder) {
        this.opts.logger.info('waiting for the lease', { lease: `${this.opts.namespace}/${this.leaseName}`, holder });
        lastHolder = holder;
      }
      // client-go's JitterUntil(retryPeriod, 1.2): candidates do not retry in lockstep.
      await sleep(this.opts.timings.retryPeriodMs * (1 + Math.random() * 0.2), signal);
    }
  }

  onLost(cb: () => void): void {
    if (this.lostFired) {
      queueMicrotask(cb);
      return;
    }
    this.lostCallbacks.push(cb);
  }

  /** Leading, and renewed within renewDeadline: past it, the lease may be someone else's already. */
  isLeader(): boolean {
    return this.leading && Date.now() - this.lastRenewAt < this.opts.timings.renewDeadlineMs;
  }

  async holder(): Promise<{ identity: string; renewedAt: Date } | undefined> {
    const lease = await this.opts.client.readLease(this.opts.namespace, this.leaseName);
    const identity = lease?.spec.holderIdentity;
    if (!identity) return undefined;
    return { identity, renewedAt: new Date(lease.spec.renewTime ?? lease.spec.acquireTime ?? 0) };
  }

  async release(): Promise<void> {
    await this.stopRenewing();
    if (!this.leading) {
      // An attempt abandoned by an abort (or a missed deadline) may still have written us in as
      // holder; if it did, give the lease up too, or the next pod waits out a whole lease.
      const late = this.attempt;
      this.attempt = undefined;
      if (!late) return;
      const won = await Promise.race([late.catch(() => false), new Promise<false>((r) => setTimeout(() => r(false), 5000).unref())]);
      if (!won) return;
    }
    this.leading = false;
    try {
      const lease = await this.opts.client.readLease(this.opts.namespace, this.leaseName);
      if (!lease || lease.spec.holderIdentity !== this.identity) return;
      // Like client-go's ReleaseOnCancel: the holder is cleared, so a standby takes over at its next try.
      const now = microTime(Date.now());
      await this.opts.client.replaceLease(this.opts.namespace, {
        metadata: { ...lease.metadata },
        spec: { ...lease.spec, holderIdentity: '', renewTime: now, leaseDurationSeconds: lease.spec.leaseDurationSeconds ?? this.leaseSeconds },
      });
      this.opts.logger.info('released the lease', { lease: `${this.opts.namespace}/${this.leaseName}`, identity: this.identity });
    } catch (err) {
      // Not fatal: the lease expires by itself after leaseDuration.
      this.opts.logger.warn('could not release the lease; it expires by itself', { lease: `${this.opts.namespace}/${this.leaseName}`, error: (err as Error).message });
    }
  }

  /** One attempt: create the Lease, renew ours, or take over an expired or released one. */
  private async tryAcquireOrRenew(): Promise<boolean> {
    const { client, namespace, logger } = this.opts;
    const now = Date.now();
    const fresh = (): LeaseRecord['spec'] => ({
      holderIdentity: this.identity,
      leaseDurationSeconds: this.leaseSeconds,
      acquireTime: microTime(now),
      renewTime: microTime(now),
      leaseTransitions: 0,
    });
    let lease: LeaseRecord | undefined;
    try {
      lease = await client.readLease(namespace, this.leaseName);
      if (!lease) {
        const created = await client.createLease(namespace, { metadata: { name: this.leaseName, namespace }, spec: fresh() });
        this.observe(created.spec, now);
        return true;
      }
    } catch (err) {
      if (!isConflict(err)) logger.debug('lease read/create failed', { lease: `${namespace}/${this.leaseName}`, error: (err as Error).message });
      return false;
    }
    this.observe(lease.spec, now);
    const holder = lease.spec.holderIdentity;
    const durationMs = (lease.spec.leaseDurationSeconds ?? this.leaseSeconds) * 1000;
    if (holder && holder !== this.identity && this.observedAt + durationMs > now) return false;
    const ours = holder === this.identity;
    const spec: LeaseRecord['spec'] = {
      holderIdentity: this.identity,
      leaseDurationSeconds: this.leaseSeconds,
      acquireTime: ours ? (lease.spec.acquireTime ?? microTime(now)) : microTime(now),
      renewTime: microTime(now),
      leaseTransitions: ours ? (lease.spec.leaseTransitions ?? 0) : (lease.spec.leaseTransitions ?? 0) + 1,
    };
    try {
      const updated = await client.replaceLease(namespace, { metadata: lease.metadata, spec });
      this.observe(updated.spec, now);
      if (!ours) logger.info('took over the lease', { lease: `${namespace}/${this.leaseName}`, from: holder || null, transitions: spec.leaseTransitions });
      return true;
    } catch (err) {
      if (!isConflict(err)) logger.debug('lease update failed', { lease: `${namespace}/${this.leaseName}`, error: (err as Error).message });
      return false;
    }
  }

  /** observedAt moves only when the record changes: expiry is measured from when we saw it change. */
  private observe(spec: LeaseRecord['spec'], now: number): void {
    const digest = canonicalJson(spec);
    if (this.observed?.digest !== digest) {
      this.observed = { spec, digest };
      this.observedAt = now;
    }
  }

  private startRenewing(): void {
    const abort = new AbortController();
    this.renewAbort = abort;
    this.renewLoop = (async () => {
      const { retryPeriodMs, renewDeadlineMs } = this.opts.timings;
      while (!abort.signal.aborted) {
        try {
          await sleep(retryPeriodMs, abort.signal);
        } catch {
          return;
        }
        const remaining = this.lastRenewAt + renewDeadlineMs - Date.now();
        // A hung API server must not keep us "leading" past the deadline: stop waiting for it then.
        let deadline: NodeJS.Timeout | undefined;
        this.attempt = this.tryAcquireOrRenew();
        const ok = await Promise.race([
          this.attempt,
          new Promise<false>((resolve) => {
            deadline = setTimeout(() => resolve(false), Math.max(0, remaining));
            deadline.unref();
          }),
        ]);
        clearTimeout(deadline);
        if (abort.signal.aborted) return;
        if (ok) {
          this.lastRenewAt = Date.now();
          continue;
        }
        const holder = this.observed?.spec.holderIdentity;
        if (holder && holder !== this.identity) return this.lose(`the lease is held by ${holder} now`);
        if (Date.now() >= this.lastRenewAt + renewDeadlineMs) return this.lose(`could not renew within renewDeadline (${renewDeadlineMs} ms)`);
      }
    })();
  }

  private async stopRenewing(): Promise<void> {
    this.renewAbort?.abort();
    await this.renewLoop;
    this.renewAbort = undefined;
    this.renewLoop = undefined;
  }

  private lose(why: string): void {
    this.leading = false;
    this.renewAbort?.abort();
    if (this.lostFired) return;
    this.lostFired = true;
    this.opts.logger.error('lost leadership', { lease: `${this.opts.namespace}/${this.leaseName}`, identity: this.identity, why });
    const callbacks = this.lostCallbacks;
    this.lostCallbacks = [];
    for (const cb of callbacks) {
      try {
        cb();
      } catch (err) {
        this.opts.logger.error('leadership-lost handler failed', { error: (err as Error).message });
      }
    }
  }
}
