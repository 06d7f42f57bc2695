import { checkMany, checkThroughProxy, readProxyCredentials, type ProxyCheckResult } from '../../drivers/httpproxy.js';
import type { Logger } from '../../observability/logger.js';
import type { Metrics } from '../../observability/metrics.js';
import type { EventRecorder } from '../../runtime/controller.js';
import { listAllocations } from '../../state/allocations.js';
import type { Store } from '../../state/store.js';
import type { ResourceStatus } from '../../state/types.js';
import { parseDuration } from '../../util/duration.js';
import type { ProxyPoolSpec, ProxyPortHealth, ProxyPortSpec } from '../proxypool/types.js';
import { poolOf } from './admission.js';

export interface PortCheckResult {
  userId: string;
  name: string;
  pool: string;
  port: number;
  healthy: boolean;
  latencyMs: number | null;
  egressIP: string | null;
  consecutiveFailures: number;
  error?: string;
}

export interface CheckSummary {
  total: number;
  healthy: number;
  unhealthy: number;
  results: PortCheckResult[];
}

export class HealthCheckError extends Error {
  constructor(
    readonly code: 'NOT_FOUND' | 'NO_HEALTH_CHECK' | 'NOT_PROGRAMMED',
    message: string,
  ) {
    super(message);
    this.name = 'HealthCheckError';
  }
}

interface Target {
  name: string;
  userId: string;
  pool: string;
  port: number;
  upstreamIP: string;
  spec: ProxyPoolSpec;
  status: ResourceStatus | undefined;
}

/**
 * Checks users' ports through the upstream proxy (HTTP CONNECT or a plain proxy request to a
 * URL that echoes the caller's address): periodically per pool, and on demand per user or in
 * batch. Results land in each ProxyPort's status.health in one transaction per batch.
 */
export class ProxyHealthChecker {
  private timer: NodeJS.Timeout | undefined;
  private readonly lastRun = new Map<string, number>();
  private readonly running = new Set<string>();
  private stopping = false;
  private readonly abort = new AbortController();
  private readonly inFlight = new Set<Promise<unknown>>();

  constructor(
    private readonly store: Store,
    private readonly metrics: Metrics,
    private readonly logger: Logger,
    private readonly recorder?: EventRecorder,
  ) {}

  start(tickMs = 1000): void {
    this.timer = setInterval(() => void this.tick(), tickMs);
    this.timer.unref();
  }

  /**
   * Starts no further checks and waits for the ones in flight for at most graceMs: an upstream
   * that accepts and never answers must not hold up a shutdown. Late results are dropped.
   */
  async stop(graceMs = 1000): Promise<void> {
    this.stopping = true;
    this.abort.abort();
    if (this.timer) clearInterval(this.timer);
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      Promise.allSettled([...this.inFlight]),
      new Promise((r) => {
        timer = setTimeout(r, graceMs);
      }),
    ]);
    if (timer) clearTimeout(timer);
  }

  private async tick(): Promise<void> {
    if (this.stopping) return;
    for (const pool of this.store.listResources<ProxyPoolSpec>('ProxyPool')) {
      const hc = pool.spec.healthCheck;
      const name = pool.metadata.name;
      if (!hc || this.running.has(name) || pool.status?.phase !== 'Ready') continue;
      const last = this.lastRun.get(name) ?? 0;
      if (Date.now() - last < parseDuration(hc.interval)) continue;
      this.lastRun.set(name, Date.now());
      await this.check({ pool: name }).catch((err: Error) => {
        if (!this.stopping) this.logger.warn('periodic health check failed', { pool: name, error: err.message });
      });
    }
  }

  /** Checks ports: all programmed ports (of one pool), or the given users. */
  async check(filter: { pool?: string; userIds?: string[] } = {}): Promise<CheckSummary> {
    // One batch at a time: two overlapping batches would each count a failure for the same
    // port and make it unhealthy after half of failureThreshold.
    const run = this.queueBehind(() => this.runCheck(filter));
    this.inFlight.add(run);
    try {
      return await run;
    } finally {
      this.inFlight.delete(run);
    }
  }

  private tail: Promise<unknown> = Promise.resolve();

  private queueBehind<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.tail.then(fn, fn);
    this.tail = run.catch(() => undefined);
    return run;
  }

  private async runCheck(filter: { pool?: string; userIds?: string[] }): Promise<CheckSummary> {
    if (this.stopping) throw new Error('the health checker is stopping');
    const targets = this.targets(filter);
    const pools = [...new Set(targets.map((t) => t.pool))];
    for (const p of pools) this.running.add(p);
    try {
      const credentials = new Map<string, { username: string; password: string } | undefined>();
      for (const t of targets) {
        if (!credentials.has(t.pool)) {
          credentials.set(t.pool, t.spec.upstream.credentialsFile ? await readProxyCredentials(t.spec.upstream.credentialsFile) : undefined);
        }
      }
      const concurrency = Math.max(1, ...targets.map((t) => t.spec.healthCheck!.concurrency));
      const checked = await checkMany(targets, concurrency, async (t) => {
        const hc = t.spec.healthCheck!;
        const creds = credentials.get(t.pool);
        const result = await checkThroughProxy({
          proxyHost: t.upstreamIP,
          proxyPort: t.port,
          url: hc.url,
          mode: hc.mode,
          timeoutMs: parseDuration(hc.timeout),
          ...(creds ? { credentials: creds } : {}),
        });
        if (result.latencyMs !== null) this.metrics.proxyPortCheckDuration.observe(result.latencyMs / 1000);
        return result;
      }, this.abort.signal);
      if (this.stopping) throw new Error('the health checker stopped during the check; results dropped');
      return this.record(checked);
    } finally {
      for (const p of pools) this.running.delete(p);
    }
  }

  private targets(filter: { pool?: string; userIds?: string[] }): Target[] {
    const pools = new Map(this.store.listResources<ProxyPoolSpec>('ProxyPool').map((p) => [p.metadata.name, p]));
    const wanted = filter.userIds ? new Set(filter.userIds) : undefined;
    const ports = new Map<string, number>();
    for (const a of listAllocations(this.store)) if (a.state === 'bound') ports.set(a.userId, a.port);
    const out: Target[] = [];
    const found = new Set<string>();
    for (const r of this.store.listResources<ProxyPortSpec>('ProxyPort')) {
      const poolName = poolOf(r.spec);
      if (filter.pool && poolName !== filter.pool) continue;
      if (wanted && !wanted.has(r.spec.userId)) continue;
      found.add(r.spec.userId);
      const pool = pools.get(poolName);
      const port = ports.get(r.spec.userId);
      const upstreamIP = pool?.status?.upstreamIP as string | undefined;
      if (!pool?.spec.healthCheck) {
        if (wanted) throw new HealthCheckError('NO_HEALTH_CHECK', `ProxyPool ${poolName} has no healthCheck configured`);
        continue;
      }
      if (port === undefined || !upstreamIP || r.status?.rulePresent !== true) {
        if (wanted) throw new HealthCheckError('NOT_PROGRAMMED', `the port of user ${r.spec.userId} is not programmed yet`);
        continue;
      }
      out.push({ name: r.metadata.name, userId: r.spec.userId, pool: poolName, port, upstreamIP, spec: pool.spec, status: r.status });
    }
    for (const u of wanted ?? []) if (!found.has(u)) throw new HealthCheckError('NOT_FOUND', `user ${u} has no ProxyPort`);
    return out;
  }

  private record(checked: Array<{ target: Target; result: ProxyCheckResult }>): CheckSummary {
    const now = new Date().toISOString();
    const results: PortCheckResult[] = [];
    this.store.transaction(() => {
      for (const { target: t, result } of checked) {
        const current = this.store.getStatus('ProxyPort', t.name);
        if (!current) continue;
        const prev = current.health as ProxyPortHealth | undefined;
        const consecutiveFailures = result.healthy ? 0 : (prev?.consecutiveFailures ?? 0) + 1;
        const threshold = t.spec.healthCheck!.failureThreshold;
        // One failed check is not an outage: a port turns unhealthy after failureThreshold in a row.
        const healthy = result.healthy || (prev?.healthy === true && consecutiveFailures < threshold);
        const health: ProxyPortHealth = {
          healthy,
          latencyMs: result.latencyMs,
          egressIP: result.egressIP ?? prev?.egressIP ?? null,
          lastVerifiedAt: now,
          consecutiveFailures,
          ...(result.error ? { error: result.error } : {}),
        };
        this.store.setStatus('ProxyPort', t.name, { ...current, health });
        if (prev?.healthy !== healthy && prev !== undefined) {
          this.recorder?.record('ProxyPort', t.name, healthy ? 'Normal' : 'Warning', healthy ? 'PortHealthy' : 'PortUnhealthy',
            healthy ? `port ${t.port} is healthy again (egress ${health.egressIP})` : `port ${t.port} failed ${consecutiveFailures} checks in a row: ${result.error ?? 'unhealthy'}`);
        }
        results.push({ userId: t.userId, name: t.name, pool: t.pool, port: t.port, healthy, latencyMs: result.latencyMs,
          egressIP: health.egressIP, consecutiveFailures, ...(result.error ? { error: result.error } : {}) });
      }
      this.refreshPoolCounts();
    });
    const healthy = results.filter((r) => r.healthy).length;
    return { total: results.length, healthy, unhealthy: results.length - healthy, results };
  }

  /** Pool status and the gauge count every port's last known health, not just this batch's. */
  private refreshPoolCounts(): void {
    const counts = new Map<string, { healthy: number; unhealthy: number }>();
    let healthy = 0;
    let unhealthy = 0;
    let unchecked = 0;
    for (const r of this.store.listResources<ProxyPortSpec>('ProxyPort')) {
      const h = r.status?.health as ProxyPortHealth | undefined;
      const c = counts.get(poolOf(r.spec)) ?? { healthy: 0, unhealthy: 0 };
      if (!h) unchecked++;
      else if (h.healthy) {
        healthy++;
        c.healthy++;
      } else {
        unhealthy++;
        c.unhealthy++;
      }
      counts.set(poolOf(r.spec), c);
    }
    this.metrics.proxyPorts.set({ state: 'healthy' }, healthy);
    this.metrics.proxyPorts.set({ state: 'unhealthy' }, unhealthy);
    this.metrics.proxyPorts.set({ state: 'unchecked' }, unchecked);
    for (const [pool, c] of counts) {
      const status = this.store.getStatus('ProxyPool', pool);
      if (!status) continue;
      const ports = { ...((status.ports as Record<string, number> | undefined) ?? {}), healthy: c.healthy, unhealthy: c.unhealthy };
      this.store.setStatus('ProxyPool', pool, { ...status, ports });
    }
  }
}
