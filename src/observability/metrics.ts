import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

/** One resource's phase and Ready condition, as polydev_resource_phase / polydev_resource_ready show them. */
export interface ResourceStatusRow {
  kind: string;
  name: string;
  phase: string;
  ready: boolean;
  /** The Ready condition's reason ('NotReconciled' before the first status). */
  reason: string;
}

// Counters (and histograms, whose _count and _bucket are counters) are exported at 0 for every label
// set they will carry before its first event: Prometheus's increase() and rate() see a series that
// appears already at 1 as having started there, and the first event would be lost. Closed label
// sets are created here; sets that depend on configuration or resources are created by the code
// that learns of them (Manager: kinds; EngineSet: engines; Notifier: targets; TurnServer controller:
// servers; the scrape below: WarmPools), and a resource's series go with it, as its gauges do.

/** result of polydev_reconcile_total. */
export const RECONCILE_RESULTS = ['success', 'error'] as const;
/** result of polydev_iptables_restore_total. */
export const IPTABLES_RESTORE_RESULTS = ['success', 'error'] as const;
/** result of polydev_desired_state_applies_total. */
export const DESIRED_STATE_APPLY_RESULTS = ['applied', 'unchanged', 'rejected'] as const;
/** result of polydev_claims_total. */
export const CLAIM_RESULTS = ['warm', 'cold', 'rejected', 'exhausted', 'too_many', 'failed'] as const;
/** result of polydev_engine_operations_total. */
export const ENGINE_OPERATION_RESULTS = ['success', 'error'] as const;
/** status of polydev_notifications_total. */
export const NOTIFICATION_STATUSES = ['sent', 'failed', 'dropped'] as const;

/** prom-client's process_* and nodejs_* metrics, as polydev_process_* and polydev_nodejs_* (the dashboard's names). */
const DEFAULT_METRICS_PREFIX = 'polydev_';
/**
 * prom-client's default metrics that promtool rejects: gauges named *_total (a suffix reserved for
 * counters). The same numbers are the sum over `type` of nodejs_active_{handles,requests,resources}.
 */
const MISNAMED_DEFAULT_METRICS = ['nodejs_active_handles_total', 'nodejs_active_requests_total', 'nodejs_active_resources_total'];

/** Every metric the daemon exports, on a registry of its own (so tests can run several daemons in one process). */
export class Metrics {
  readonly registry = new Registry();

  readonly leader = new Gauge({
    name: 'polydev_leader',
    help: '1 while this daemon holds the lease and acts, 0 while it waits as a standby.',
    registers: [this.registry],
  });
  private storeGate: () => boolean = () => true;

  /**
   * The store-derived series (resources, pools) only while gate() holds: a standby reading the
   * leader's database must not export the same resources again, or every alert would fire twice.
   */
  reportStoreStateWhen(gate: () => boolean): void {
    this.storeGate = gate;
  }
  readonly leaderTransitions = new Counter({
    name: 'polydev_leader_transitions_total',
    help: 'Times this daemon became the leader (more than 1 in a process never happens: a lost lease ends it).',
    registers: [this.registry],
  });

  readonly reconcileTotal = new Counter({
    name: 'polydev_reconcile_total',
    help: 'Reconciles by kind and result (success, error).',
    labelNames: ['kind', 'result'] as const,
    registers: [this.registry],
  });
  readonly reconcileErrors = new Counter({
    name: 'polydev_reconcile_errors_total',
    help: 'Reconciles that ended in an error, by kind.',
    labelNames: ['kind'] as const,
    registers: [this.registry],
  });
  readonly reconcileDuration = new Histogram({
    name: 'polydev_reconcile_duration_seconds',
    help: 'Time of one reconcile of one key, by kind.',
    labelNames: ['kind'] as const,
    buckets: [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
    registers: [this.registry],
  });
  readonly workqueueDepth = new Gauge({
    name: 'polydev_workqueue_depth',
    help: 'Keys waiting in the work queue (not counting keys waiting out a backoff).',
    registers: [this.registry],
  });
  readonly workqueueRetries = new Counter({
    name: 'polydev_workqueue_retries_total',
    help: 'Keys put back on the queue with a backoff after a failure.',
    registers: [this.registry],
  });
  readonly workqueueAdds = new Counter({
    name: 'polydev_workqueue_adds_total',
    help: 'Keys added to the work queue.',
    registers: [this.registry],
  });
  readonly driftTotal = new Counter({
    name: 'polydev_drift_total',
    help: 'Times a Ready resource was found to differ from its desired state, by kind.',
    labelNames: ['kind'] as const,
    registers: [this.registry],
  });
  readonly driftUnrepaired = new Gauge({
    name: 'polydev_drift_unrepaired',
    help: '1 while a resource has drift that is not repaired (driftPolicy warn, or repair failing).',
    labelNames: ['kind', 'name'] as const,
    registers: [this.registry],
  });
  /** Counted from the store when scraped (see countResourcesWith), not on every reconcile. */
  readonly resources = new Gauge({
    name: 'polydev_resources',
    help: 'Resources by kind and phase.',
    labelNames: ['kind', 'phase'] as const,
    registers: [this.registry],
    collect: () => this.collectResources(),
  });
  private resourceCounter: (() => Array<{ kind: string; phase: string; n: number }>) | undefined;

  /** Where polydev_resources comes from at scrape time (the daemon passes its store). */
  countResourcesWith(counter: () => Array<{ kind: string; phase: string; n: number }>): void {
    this.resourceCounter = counter;
  }

  private collectResources(): void {
    if (!this.resourceCounter) return;
    this.resources.reset();
    if (!this.storeGate()) return;
    for (const { kind, phase, n } of this.resourceCounter()) this.resources.set({ kind, phase }, n);
  }
  /**
   * One series per resource (ProxyPorts excepted: there can be 10,000; see polydev_proxy_ports), for
   * its current phase only, value 1. Read from the store when scraped (see describeResourcesWith).
   */
  readonly resourcePhase = new Gauge({
    name: 'polydev_resource_phase',
    help: 'The current phase of each resource (Ready, Drifted, Backoff, Degraded, …), always 1; ProxyPorts are not listed (see polydev_proxy_ports).',
    labelNames: ['kind', 'name', 'phase'] as const,
    registers: [this.registry],
    collect: () => this.collectResourceStatus('phase'),
  });
  readonly resourceReady = new Gauge({
    name: 'polydev_resource_ready',
    help: "1 while a resource's Ready condition is True, else 0; reason is the condition's reason (Converged, EngineUnavailable, ImageNotFound, …). ProxyPorts are not listed.",
    labelNames: ['kind', 'name', 'reason'] as const,
    registers: [this.registry],
    collect: () => this.collectResourceStatus('ready'),
  });
  private resourceStatusSource: (() => ResourceStatusRow[]) | undefined;

  /** Where polydev_resource_phase and polydev_resource_ready come from at scrape time (the manager passes the store). */
  describeResourcesWith(source: () => ResourceStatusRow[]): void {
    this.resourceStatusSource = source;
  }

  private collectResourceStatus(which: 'phase' | 'ready'): void {
    if (!this.resourceStatusSource) return;
    const rows = this.storeGate() ? this.resourceStatusSource() : [];
    if (which === 'phase') {
      this.resourcePhase.reset();
      for (const r of rows) this.resourcePhase.set({ kind: r.kind, name: r.name, phase: r.phase }, 1);
    } else {
      this.resourceReady.reset();
      for (const r of rows) this.resourceReady.set({ kind: r.kind, name: r.name, reason: r.reason }, r.ready ? 1 : 0);
    }
  }
  readonly iptablesRestoreTotal = new Counter({
    name: 'polydev_iptables_restore_total',
    help: 'iptables-restore runs, by result.',
    labelNames: ['result'] as const,
    registers: [this.registry],
  });
  readonly iptablesSyncDuration = new Histogram({
    name: 'polydev_iptables_sync_duration_seconds',
    help: 'Time of one ProxyPool iptables sync (save, plan, restore, read-back).',
    buckets: [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5],
    registers: [this.registry],
  });
  readonly proxyPorts = new Gauge({
    name: 'polydev_proxy_ports',
    help: 'Proxy ports by state (programmed, pending, failed, healthy, unhealthy, unchecked).',
    labelNames: ['state'] as const,
    registers: [this.registry],
  });
  readonly proxyPortCheckDuration = new Histogram({
    name: 'polydev_proxy_port_check_duration_seconds',
    help: 'Time of one proxy port health check through the upstream.',
    buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
    registers: [this.registry],
  });
  readonly desiredStateApplies = new Counter({
    name: 'polydev_desired_state_applies_total',
    help: 'Applies of the watched desired-state directory, by result (applied, unchanged, rejected).',
    labelNames: ['result'] as const,
    registers: [this.registry],
  });
  /** Counted from the store when scraped (see countPoolMembersWith). */
  readonly warmPoolContainers = new Gauge({
    name: 'polydev_warm_pool_containers',
    help: 'Containers of each WarmPool by state (warm, starting, claimed, releasing).',
    labelNames: ['pool', 'state'] as const,
    registers: [this.registry],
    collect: () => this.collectPoolMembers(),
  });
  private poolMemberCounter: (() => Array<{ pool: string; state: string; n: number }>) | undefined;

  countPoolMembersWith(counter: () => Array<{ pool: string; state: string; n: number }>): void {
    this.poolMemberCounter = counter;
  }

  private collectPoolMembers(): void {
    if (!this.poolMemberCounter) return;
    this.warmPoolContainers.reset();
    if (!this.storeGate()) return;
    for (const { pool, state, n } of this.poolMemberCounter()) this.warmPoolContainers.set({ pool, state }, n);
  }
  /** Read from the store when scraped (see sizeWarmPoolsWith). */
  readonly warmPoolDesired = new Gauge({
    name: 'polydev_warm_pool_desired_size',
    help: 'Warm (unclaimed) containers each WarmPool should keep: its spec.size.',
    labelNames: ['pool'] as const,
    registers: [this.registry],
    collect: () => this.collectPoolSizes('size'),
  });
  readonly warmPoolMax = new Gauge({
    name: 'polydev_warm_pool_max_size',
    help: 'Containers each WarmPool may have in all (warm, starting, claimed): its spec.maxSize.',
    labelNames: ['pool'] as const,
    registers: [this.registry],
    collect: () => this.collectPoolSizes('maxSize'),
  });
  private poolSizeSource: (() => Array<{ pool: string; size: number; maxSize: number }>) | undefined;

  sizeWarmPoolsWith(source: () => Array<{ pool: string; size: number; maxSize: number }>): void {
    this.poolSizeSource = source;
  }

  private collectPoolSizes(which: 'size' | 'maxSize'): void {
    if (!this.poolSizeSource) return;
    const gauge = which === 'size' ? this.warmPoolDesired : this.warmPoolMax;
    gauge.reset();
    if (!this.storeGate()) return;
    for (const p of this.poolSizeSource()) gauge.set({ pool: p.pool }, p[which]);
  }
  /** Its series and claimDuration's follow the WarmPools in the store, read when scraped (see exportPoolSeries). */
  readonly claimsTotal = new Counter({
    name: 'polydev_claims_total',
    help: 'Claim requests by pool and result (warm, cold, rejected, exhausted, too_many, failed).',
    labelNames: ['pool', 'result'] as const,
    registers: [this.registry],
    collect: () => this.exportPoolSeries(),
  });
  readonly claimDuration = new Histogram({
    name: 'polydev_claim_duration_seconds',
    help: 'Time to serve a claim (bind, start when cold, inject credentials), by pool and whether a warm container served it.',
    labelNames: ['pool', 'warm'] as const,
    buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
    registers: [this.registry],
    collect: () => this.exportPoolSeries(),
  });
  /** WarmPools whose claim series exist. */
  private readonly exportedPools = new Set<string>();

  /**
   * Claim series at 0 for every WarmPool in the store, and none for a pool that is gone (as with
   * the pool gauges above). A claim can only name a pool in the store, so a pool is here before
   * its first claim is counted, except one created and claimed between two scrapes.
   */
  private exportPoolSeries(): void {
    if (!this.poolSizeSource || !this.storeGate()) return;
    const pools = new Set(this.poolSizeSource().map((p) => p.pool));
    for (const pool of this.exportedPools) {
      if (pools.has(pool)) continue;
      for (const result of CLAIM_RESULTS) this.claimsTotal.remove({ pool, result });
      for (const warm of ['true', 'false']) this.claimDuration.remove({ pool, warm });
      this.exportedPools.delete(pool);
    }
    for (const pool of pools) {
      if (this.exportedPools.has(pool)) continue;
      for (const result of CLAIM_RESULTS) this.claimsTotal.inc({ pool, result }, 0);
      // zero() would reset a series that has observations: only a pool not yet exported gets it.
      for (const warm of ['true', 'false']) this.claimDuration.zero({ pool, warm });
      this.exportedPools.add(pool);
    }
  }
  readonly turnUp = new Gauge({
    name: 'polydev_turn_up',
    help: '1 while a TurnServer is healthy (its last probe succeeded or failures are under the threshold), else 0.',
    labelNames: ['server'] as const,
    registers: [this.registry],
  });
  readonly turnProbeDuration = new Histogram({
    name: 'polydev_turn_probe_duration_seconds',
    help: 'Successful probe steps of a TurnServer: binding, allocate (with the 401 round), release.',
    labelNames: ['server', 'step'] as const,
    buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5],
    registers: [this.registry],
  });
  readonly turnProbeFailures = new Counter({
    name: 'polydev_turn_probe_failures_total',
    help: 'Failed probes of a TurnServer by reason (unreachable, timeout, auth_rejected, allocation_refused, malformed, credentials).',
    labelNames: ['server', 'reason'] as const,
    registers: [this.registry],
  });
  readonly turnRestarts = new Counter({
    name: 'polydev_turn_restarts_total',
    help: 'Restarts of a TurnServer the daemon ran (successful or not).',
    labelNames: ['server'] as const,
    registers: [this.registry],
  });
  readonly engineOperations = new Counter({
    name: 'polydev_engine_operations_total',
    help: 'Calls to a container engine by engine, operation (ping, list, start, remove, inject, recycle, update, rename) and result (success, error).',
    labelNames: ['engine', 'op', 'result'] as const,
    registers: [this.registry],
  });
  // The built-in notifier (src/notify/): target is the configured name, never the URL (it may hold a token).
  readonly notificationsTotal = new Counter({
    name: 'polydev_notifications_total',
    help: 'Alert notices (one alert, firing or resolved) to a webhook target by format and status: sent, failed (an attempt that will be retried or dropped), dropped (given up).',
    labelNames: ['target', 'format', 'status'] as const,
    registers: [this.registry],
  });
  readonly notificationsPending = new Gauge({
    name: 'polydev_notifications_pending',
    help: 'Alert notices waiting to be delivered to a webhook target (including those waiting out a retry backoff).',
    labelNames: ['target'] as const,
    registers: [this.registry],
  });
  readonly up = new Gauge({
    name: 'polydev_reconciler_ready',
    help: '1 once the first full sync is done.',
    registers: [this.registry],
  });

  constructor(opts: { processMetrics?: boolean } = {}) {
    for (const result of IPTABLES_RESTORE_RESULTS) this.iptablesRestoreTotal.inc({ result }, 0);
    for (const result of DESIRED_STATE_APPLY_RESULTS) this.desiredStateApplies.inc({ result }, 0);
    if (opts.processMetrics ?? true) {
      collectDefaultMetrics({ register: this.registry, prefix: DEFAULT_METRICS_PREFIX });
      for (const name of MISNAMED_DEFAULT_METRICS) this.registry.removeSingleMetric(DEFAULT_METRICS_PREFIX + name);
    }
  }
}
