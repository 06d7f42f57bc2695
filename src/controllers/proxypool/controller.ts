import { createHash } from 'node:crypto';
import type { IptablesDriver } from '../../drivers/iptables.js';
import { resolveIPv4 } from '../../drivers/dns.js';
import type { Metrics } from '../../observability/metrics.js';
import type { DriftPolicy } from '../../runtime/convergence-machine.js';
import type { ControllerContext, ConvergingController, SettledRun } from '../../runtime/controller.js';
import { releasePort } from '../../state/allocations.js';
import type { Store } from '../../state/store.js';
import { setCondition, type ResourceStatus, type StoredResource } from '../../state/types.js';
import { parseDuration } from '../../util/duration.js';
import { poolOf } from '../proxyport/admission.js';
import {
  describeAction,
  iptablesActions,
  observePool,
  parseIptablesSave,
  planPoolRules,
  planPoolTeardown,
  programmedUsers,
  renderRestorePayload,
  sysctlActions,
  type ObservedPoolRules,
  type PoolRuleSet,
  type RuleAction,
} from './rules.js';
import type { ProxyPoolSpec, ProxyPortSpec } from './types.js';

export interface PortDesired {
  name: string;
  uid: string;
  generation: number;
  userId: string;
  sourceIP: string;
  /** The allocated port, or null when none is bound (should not happen: admission allocates). */
  port: number | null;
  deleting: boolean;
  /** Why the port cannot be programmed, if it cannot. */
  problem: string | null;
}

export interface PoolDesired {
  name: string;
  spec: ProxyPoolSpec;
  ports: PortDesired[];
}

export interface PoolObserved {
  upstreamIP: string;
  resolvedAt: string;
  rules: ObservedPoolRules;
  syncStartedAt: number;
}

/**
 * A digest of an iptables-save without its comment lines (they carry the time of the save), taken
 * over the bytes in place: telling an unchanged ruleset apart costs no 2 MB string per resync.
 */
export function saveDigest(saved: Buffer): string {
  const h = createHash('sha1');
  let pos = 0;
  while (pos < saved.length) {
    if (saved[pos] === 0x23 /* # */) {
      const eol = saved.indexOf(0x0a, pos);
      pos = eol < 0 ? saved.length : eol + 1;
      continue;
    }
    const comment = saved.indexOf('\n#', pos);
    const end = comment < 0 ? saved.length : comment + 1;
    h.update(saved.subarray(pos, end));
    pos = end;
  }
  return h.digest('hex');
}

/** The rule set for a pool once its upstream address is known: pure. */
export function ruleSetOf(desired: PoolDesired, upstreamIP: string): PoolRuleSet {
  return {
    pool: desired.name,
    chains: desired.spec.chains,
    upstreamIP,
    destinationPorts: desired.spec.destinationPorts,
    portRange: desired.spec.portRange,
    ipForward: desired.spec.ipForward,
    ports: desired.ports
      .filter((p) => !p.deleting && p.problem === null && p.port !== null)
      .map((p) => ({ userId: p.userId, sourceIP: p.sourceIP, port: p.port! })),
  };
}

/** The pool's plan: pure function of desired and observed (the CLI's `plan` and drift detection use it). */
export function planPool(desired: PoolDesired, observed: PoolObserved): RuleAction[] {
  return planPoolRules(ruleSetOf(desired, observed.upstreamIP), observed.rules);
}

/** Reads a pool and its ports (with their allocated ports) from the store, in one query. */
export function loadPoolDesired(store: Store, pool: StoredResource): PoolDesired {
  const spec = pool.spec as unknown as ProxyPoolSpec;
  const rows = store
    .stmt(
      `SELECT r.name AS name, r.uid AS uid, r.generation AS generation,
              json_extract(r.spec, '$.userId') AS userId, json_extract(r.spec, '$.sourceIP') AS sourceIP,
              r.deletion_requested_at AS deleting, a.port AS port
       FROM resources r
       LEFT JOIN allocations a ON a.user_id = json_extract(r.spec, '$.userId') AND a.state = 'bound' AND a.pool = @pool
       WHERE r.kind = 'ProxyPort' AND coalesce(json_extract(r.spec, '$.pool'), 'default') = @pool
       ORDER BY r.name`,
    )
    .all({ pool: pool.metadata.name }) as Array<{
    name: string;
    uid: string;
    generation: number;
    userId: string;
    sourceIP: string;
    deleting: string | null;
    port: number | null;
  }>;
  const ports: PortDesired[] = rows.map((r) => {
    let problem: string | null = null;
    if (r.port === null) problem = 'no port is allocated to this user';
    else if (r.port < spec.portRange.min || r.port > spec.portRange.max) {
      problem = `port ${r.port} is outside the pool's range ${spec.portRange.min}-${spec.portRange.max}`;
    }
    return {
      name: r.name,
      uid: r.uid,
      generation: r.generation,
      userId: r.userId,
      sourceIP: r.sourceIP,
      port: r.port,
      deleting: r.deleting !== null,
      problem,
    };
  });
  return { name: pool.metadata.name, spec, ports };
}

/**
 * ProxyPool: one reconcile per pool programs all of its users' rules, as kube-proxy does:
 * one iptables-save, a pure diff, one iptables-restore --noflush with only the changes, and a
 * read-back. ProxyPorts converge through their pool's run; their status is written in the
 * same transaction as the pool's.
 */
export class ProxyPoolController implements ConvergingController<PoolDesired, PoolObserved, RuleAction> {
  readonly kind = 'ProxyPool';
  readonly watches;
  private readonly resolved = new Map<string, { host: string; ip: string; at: number }>();
  /** What this process last wrote to each ProxyPort's status (its summary), to skip unchanged writes. */
  private readonly written = new Map<string, string>();
  private readonly programmedCache = new WeakMap<ObservedPoolRules, { desired: PoolDesired; changes: number; set: Set<string> }>();
  private readonly lastRules = new Map<string, { digest: string; ipForward: boolean; chains: ProxyPoolSpec['chains']; rules: ObservedPoolRules }>();
  private readonly planMemo = new WeakMap<ObservedPoolRules, { desired: PoolDesired; upstreamIP: string; actions: RuleAction[] }>();
  /** The inputs of the last port-status pass per pool: an identical pass writes nothing and is skipped. */
  private readonly lastCommit = new Map<string, { desired: PoolDesired; programmed: Set<string>; state: string; lastError: string | null; upstreamIP: string | undefined }>();
  private readonly fingerprints = new WeakMap<PoolDesired, string>();
  private readonly desiredCache = new Map<string, { seq: number; uid: string; desired: PoolDesired }>();
  private ctx: ControllerContext | undefined;

  constructor(
    private readonly store: Store,
    private readonly iptables: IptablesDriver,
    /** Absent for a one-shot look that only observes and plans (`plan`: no prom-client to load). */
    private readonly metrics?: Metrics,
  ) {
    this.watches = [
      {
        kind: 'ProxyPort',
        map: (name: string) => {
          const port = this.store.getResource<ProxyPortSpec>('ProxyPort', name);
          return port ? [poolOf(port.spec)] : [];
        },
      },
    ];
  }

  start(ctx: ControllerContext): void {
    this.ctx = ctx;
  }

  desired(resource: StoredResource): PoolDesired {
    // Every write to resources or allocations moves the change feed, so an unchanged feed
    // means an unchanged desired state: a no-op resync of 10,000 ports skips the query.
    const seq = this.store.latestChangeSeq();
    const cached = this.desiredCache.get(resource.metadata.name);
    if (cached && cached.seq === seq && cached.uid === resource.metadata.uid) return cached.desired;
    const desired = loadPoolDesired(this.store, resource);
    this.desiredCache.set(resource.metadata.name, { seq, uid: resource.metadata.uid, desired });
    return desired;
  }

  driftPolicy(resource: StoredResource): DriftPolicy {
    return (resource.spec as unknown as ProxyPoolSpec).driftPolicy ?? 'correct';
  }

  fingerprint(desired: PoolDesired): string {
    const cached = this.fingerprints.get(desired);
    if (cached) return cached;
    const h = createHash('sha256');
    h.update(JSON.stringify(desired.spec));
    for (const p of desired.ports) h.update(`\n${p.userId} ${p.sourceIP} ${p.port} ${p.deleting} ${p.problem ?? ''}`);
    const digest = h.digest('hex').slice(0, 16);
    this.fingerprints.set(desired, digest);
    return digest;
  }

  async observe(desired: PoolDesired): Promise<PoolObserved> {
    const syncStartedAt = performance.now();
    const { ip, at } = await this.upstreamAddress(desired);
    const [saved, ipForward] = await Promise.all([this.iptables.saveRaw(), this.iptables.getIpForward()]);
    return { upstreamIP: ip, resolvedAt: new Date(at).toISOString(), rules: this.observeRules(desired, saved, ipForward), syncStartedAt };
  }

  /**
   * The parsed view of a save. A resync usually finds exactly the ruleset it found last time:
   * then the last parse is reused (same object), and so are the plan and the port statuses
   * derived from it, so a no-op resync of 10,000 rules allocates almost nothing beyond the
   * save's text: a daemon's memory stays flat however long it runs.
   */
  private observeRules(desired: PoolDesired, saved: Buffer, ipForward: boolean): ObservedPoolRules {
    const digest = saveDigest(saved);
    const last = this.lastRules.get(desired.name);
    if (last && last.digest === digest && last.ipForward === ipForward && last.chains === desired.spec.chains) return last.rules;
    const rules = observePool(parseIptablesSave(saved.toString('utf8')), desired.spec.chains, ipForward);
    this.lastRules.set(desired.name, { digest, ipForward, chains: desired.spec.chains, rules });
    return rules;
  }

  /** Resolved at most once per resolveInterval; a failed lookup keeps the last good address. */
  private async upstreamAddress(desired: PoolDesired): Promise<{ ip: string; at: number }> {
    const host = desired.spec.upstream.host;
    const cached = this.resolved.get(desired.name);
    const interval = parseDuration(desired.spec.upstream.resolveInterval);
    if (cached && cached.host === host && Date.now() - cached.at < interval) return cached;
    try {
      const ip = await resolveIPv4(host);
      const entry = { host, ip, at: Date.now() };
      if (cached && cached.host === host && cached.ip !== ip) {
        this.ctx?.recorder.record('ProxyPool', desired.name, 'Warning', 'UpstreamAddressChanged',
          `upstream ${host} now resolves to ${ip} (was ${cached.ip}); every user rule is re-pointed`);
      }
      this.resolved.set(desired.name, entry);
      return entry;
    } catch (err) {
      if (cached && cached.host === host) {
        this.ctx?.recorder.record('ProxyPool', desired.name, 'Warning', 'UpstreamUnresolvable',
          `${(err as Error).message}; keeping ${cached.ip}`);
        return cached;
      }
      throw err;
    }
  }

  plan(desired: PoolDesired, observed: PoolObserved): RuleAction[] {
    // Pure, so memoised on its inputs' identities (both are reused while nothing changes).
    const memo = this.planMemo.get(observed.rules);
    if (memo && memo.desired === desired && memo.upstreamIP === observed.upstreamIP) return memo.actions;
    const actions = planPool(desired, observed);
    this.planMemo.set(observed.rules, { desired, upstreamIP: observed.upstreamIP, actions });
    return actions;
  }

  describe(action: RuleAction): string {
    return describeAction(action);
  }

  async execute(_desired: PoolDesired, _observed: PoolObserved, actions: RuleAction[]): Promise<void> {
    await this.apply(actions);
  }

  private async apply(actions: RuleAction[]): Promise<void> {
    const payload = renderRestorePayload(iptablesActions(actions));
    if (payload.trim() !== '') {
      try {
        await this.iptables.restore(payload);
        this.metrics?.iptablesRestoreTotal.inc({ result: 'success' });
      } catch (err) {
        this.metrics?.iptablesRestoreTotal.inc({ result: 'error' });
        throw err;
      }
    }
    for (const a of sysctlActions(actions)) await this.iptables.setIpForward(a.value);
  }

  async teardown(resource: StoredResource): Promise<void> {
    const spec = resource.spec as unknown as ProxyPoolSpec;
    const rules = observePool(parseIptablesSave(await this.iptables.save()), spec.chains, await this.iptables.getIpForward());
    await this.apply(planPoolTeardown(spec.chains, rules));
    const after = observePool(parseIptablesSave(await this.iptables.save()), spec.chains, true);
    const left = planPoolTeardown(spec.chains, after);
    if (left.length > 0) throw new Error(`teardown incomplete: ${left.map(describeAction).join('; ')}`);
    this.resolved.delete(resource.metadata.name);
    this.lastRules.delete(resource.metadata.name);
    this.lastCommit.delete(resource.metadata.name);
    this.written.clear();
  }

  /**
   * Users whose rule is in place after the run. A converged last observation (empty plan) means
   * every desired rule is there; otherwise (a failure, or drift left alone under warn/ignore)
   * it is read off the observed rules.
   */
  private programmed(run: SettledRun<PoolDesired, PoolObserved>): Set<string> {
    if (!run.desired || !run.observed) return new Set();
    const cached = this.programmedCache.get(run.observed.rules);
    if (cached && cached.desired === run.desired && cached.changes === run.changes) return cached.set;
    const ruleSet = ruleSetOf(run.desired, run.observed.upstreamIP);
    const out = run.changes === 0 ? new Set(ruleSet.ports.map((p) => p.userId)) : programmedUsers(ruleSet, run.observed.rules);
    this.programmedCache.set(run.observed.rules, { desired: run.desired, changes: run.changes, set: out });
    return out;
  }

  statusFields(run: SettledRun<PoolDesired, PoolObserved>): Record<string, unknown> {
    if (!run.desired || !run.observed) return {};
    const durationMs = +(performance.now() - run.observed.syncStartedAt).toFixed(1);
    this.metrics?.iptablesSyncDuration.observe(durationMs / 1000);
    // Read now, inside the status transaction: a health check may have finished during the run.
    const prev = this.store.getStatus(this.kind, run.resource.metadata.name)?.ports as
      | { healthy?: number; unhealthy?: number }
      | undefined;
    return {
      upstreamIP: run.observed.upstreamIP,
      lastResolvedAt: run.observed.resolvedAt,
      ports: {
        total: run.desired.ports.filter((p) => !p.deleting).length,
        programmed: this.programmed(run).size,
        healthy: prev?.healthy ?? 0,
        unhealthy: prev?.unhealthy ?? 0,
      },
      foreignRules: run.observed.rules.foreign.length,
      lastSyncAt: new Date().toISOString(),
      lastSyncDurationMs: durationMs,
    };
  }

  /**
   * Port statuses and finalizers, in the pool's status transaction. Only ports whose status
   * changes are written: a no-op resync of 10,000 ports writes nothing.
   */
  commit(run: SettledRun<PoolDesired, PoolObserved>): void {
    if (run.state === 'Deleted') {
      this.written.clear();
      // The ports lose their pool: their own controller reports PoolNotFound (or finishes a
      // deletion) now, not at the next resync.
      for (const p of run.desired?.ports ?? loadPoolDesired(this.store, run.resource).ports) {
        this.ctx?.enqueue('ProxyPort', p.name);
      }
      return;
    }
    const desired = run.desired ?? loadPoolDesired(this.store, run.resource);
    const programmed = this.programmed(run);
    const last = this.lastCommit.get(desired.name);
    if (
      last &&
      last.desired === desired &&
      last.programmed === programmed &&
      last.state === run.state &&
      last.lastError === run.lastError &&
      last.upstreamIP === run.observed?.upstreamIP
    ) {
      return;
    }
    this.lastCommit.set(desired.name, { desired, programmed, state: run.state, lastError: run.lastError, upstreamIP: run.observed?.upstreamIP });
    const now = new Date().toISOString();
    for (const p of desired.ports) {
      if (p.deleting) {
        // Finalizer: the pool converged without this user's rule, so the port may go; but only
        // if it is still the same resource and still being deleted (an apply during the run may
        // have brought it back, and then its rule is simply added on the next run).
        if (run.observed && run.changes === 0 && this.stillDeleting(p)) {
          releasePort(this.store, p.userId, p.name);
          this.store.removeResource('ProxyPort', p.name);
          this.written.delete(p.name);
        }
        continue;
      }
      const rulePresent = programmed.has(p.userId);
      const phase = p.problem ? 'Failed' : rulePresent ? 'Ready' : run.state === 'Drifted' ? 'Drifted' : 'Pending';
      const reason = p.problem ? 'PortInvalid' : rulePresent ? 'RuleProgrammed' : run.state === 'Drifted' ? 'DriftNotCorrected' : `Pool${run.state}`;
      const message =
        p.problem ??
        (rulePresent ? `DNAT to ${run.observed?.upstreamIP}:${p.port} is in place` : (run.lastError ?? `ProxyPool ${desired.name} is ${run.state}`));
      const summary = `${p.uid}|${p.generation}|${phase}|${reason}|${message}|${p.port}|${desired.name}`;
      if (this.written.get(p.name) === summary) continue;
      const current = this.store.getStatus('ProxyPort', p.name);
      const conditions = setCondition(current?.conditions ?? [], {
        type: 'Ready',
        status: phase === 'Ready' ? 'True' : 'False',
        reason,
        message,
        observedGeneration: p.generation,
      }, now);
      const status: ResourceStatus = {
        ...(current ?? {}),
        phase,
        observedGeneration: p.generation,
        conditions,
        port: p.port,
        pool: desired.name,
        rulePresent,
      };
      this.store.setStatus('ProxyPort', p.name, status);
      this.written.set(p.name, summary);
    }
    const counts = { programmed: 0, pending: 0, failed: 0 };
    for (const { phase, n } of this.store
      .stmt(`SELECT phase, count(*) AS n FROM status WHERE kind = 'ProxyPort' GROUP BY phase`)
      .all() as Array<{ phase: string; n: number }>) {
      if (phase === 'Ready') counts.programmed += n;
      else if (phase === 'Failed') counts.failed += n;
      else counts.pending += n;
    }
    for (const [state, n] of Object.entries(counts)) this.metrics?.proxyPorts.set({ state }, n);
  }

  private stillDeleting(p: PortDesired): boolean {
    return (
      this.store
        .stmt(`SELECT 1 FROM resources WHERE kind = 'ProxyPort' AND name = ? AND uid = ? AND deletion_requested_at IS NOT NULL`)
        .get(p.name, p.uid) !== undefined
    );
  }

  requeueAfterMs(run: SettledRun<PoolDesired, PoolObserved>): number | undefined {
    if (!run.desired) return undefined;
    return parseDuration(run.desired.spec.upstream.resolveInterval);
  }
}

