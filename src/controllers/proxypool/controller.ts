import { createHash } from 'node:crypto';
import type { IptablesDriver } from '../../drivers/iptables.js';
import { resolveIPv4 } from '../../drivers/dns.js';
import type { Metrics } from '../../observability/metrics.js';
import type { DriftPolicy } from '../../runtime/convergence-machine.js';
import type { ControllerContext, ConvergingController, SettledRun } from '../../runtime/controller.js';
import { listAllocations, releasePort } from '../../state/allocations.js';
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
import type { ProxyPoolSpec, ProxyPortHealth, ProxyPortSpec } from './types.js';

export interface PortDesired {
  name: string;
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

/** Reads a pool and its ports (with their allocated ports) from the store. */
export function loadPoolDesired(store: Store, pool: StoredResource): PoolDesired {
  const spec = pool.spec as unknown as ProxyPoolSpec;
  const allocated = new Map(
    listAllocations(store, pool.metadata.name)
      .filter((a) => a.state === 'bound')
      .map((a) => [a.userId, a.port]),
  );
  const ports: PortDesired[] = [];
  for (const r of store.listResources<ProxyPortSpec>('ProxyPort')) {
    if (poolOf(r.spec) !== pool.metadata.name) continue;
    const port = allocated.get(r.spec.userId) ?? null;
    let problem: string | null = null;
    if (port === null) problem = 'no port is allocated to this user';
    else if (port < spec.portRange.min || port > spec.portRange.max) {
      problem = `port ${port} is outside the pool's range ${spec.portRange.min}-${spec.portRange.max}`;
    }
    ports.push({
      name: r.metadata.name,
      userId: r.spec.userId,
      sourceIP: r.spec.sourceIP,
      port,
      deleting: r.metadata.deletionTimestamp !== undefined,
      problem,
    });
  }
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
  private ctx: ControllerContext | undefined;

  constructor(
    private readonly store: Store,
    private readonly iptables: IptablesDriver,
    private readonly metrics: Metrics,
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
    return loadPoolDesired(this.store, resource);
  }

  driftPolicy(resource: StoredResource): DriftPolicy {
    return (resource.spec as unknown as ProxyPoolSpec).driftPolicy ?? 'correct';
  }

  fingerprint(desired: PoolDesired): string {
    const h = createHash('sha256');
    h.update(JSON.stringify(desired.spec));
    for (const p of desired.ports) h.update(`\n${p.userId} ${p.sourceIP} ${p.port} ${p.deleting} ${p.problem ?? ''}`);
    return h.digest('hex').slice(0, 16);
  }

  async observe(desired: PoolDesired): Promise<PoolObserved> {
    const syncStartedAt = performance.now();
    const { ip, at } = await this.upstreamAddress(desired);
    const [text, ipForward] = await Promise.all([this.iptables.save(), this.iptables.getIpForward()]);
    const rules = observePool(parseIptablesSave(text), desired.spec.chains, ipForward);
    return { upstreamIP: ip, resolvedAt: new Date(at).toISOString(), rules, syncStartedAt };
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
    return planPool(desired, observed);
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
        this.metrics.iptablesRestoreTotal.inc({ result: 'success' });
      } catch (err) {
        this.metrics.iptablesRestoreTotal.inc({ result: 'error' });
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
  }

  statusFields(run: SettledRun<PoolDesired, PoolObserved>): Record<string, unknown> {
    if (!run.desired || !run.observed) return {};
    const programmed = programmedUsers(ruleSetOf(run.desired, run.observed.upstreamIP), run.observed.rules);
    const durationMs = +(performance.now() - run.observed.syncStartedAt).toFixed(1);
    this.metrics.iptablesSyncDuration.observe(durationMs / 1000);
    const prev = run.resource.status?.ports as { healthy?: number; unhealthy?: number } | undefined;
    return {
      upstreamIP: run.observed.upstreamIP,
      lastResolvedAt: run.observed.resolvedAt,
      ports: {
        total: run.desired.ports.filter((p) => !p.deleting).length,
        programmed: run.state === 'Ready' ? ruleSetOf(run.desired, run.observed.upstreamIP).ports.length : programmed.size,
        healthy: prev?.healthy ?? 0,
        unhealthy: prev?.unhealthy ?? 0,
      },
      foreignRules: run.observed.rules.foreign.length,
      lastSyncAt: new Date().toISOString(),
      lastSyncDurationMs: durationMs,
    };
  }

  /** Port statuses and finalizers, in the pool's status transaction. */
  commit(run: SettledRun<PoolDesired, PoolObserved>): void {
    if (run.state === 'Deleted') return;
    const desired = run.desired ?? loadPoolDesired(this.store, run.resource);
    const converged = run.state === 'Ready';
    const programmed = run.observed
      ? converged
        ? new Set(ruleSetOf(desired, run.observed.upstreamIP).ports.map((p) => p.userId))
        : programmedUsers(ruleSetOf(desired, run.observed.upstreamIP), run.observed.rules)
      : new Set<string>();
    const now = new Date().toISOString();
    const previous = new Map(
      this.store.listResources<ProxyPortSpec>('ProxyPort').map((r) => [r.metadata.name, r]),
    );
    let ready = 0;
    let failed = 0;
    let pending = 0;
    for (const p of desired.ports) {
      const res = previous.get(p.name);
      if (!res) continue;
      if (p.deleting) {
        if (converged && run.observed) {
          // Finalizer: the rule is gone (the pool converged without it), so the port may go.
          releasePort(this.store, p.userId);
          this.store.removeResource('ProxyPort', p.name);
        }
        continue;
      }
      const rulePresent = programmed.has(p.userId);
      const phase = p.problem ? 'Failed' : rulePresent ? 'Ready' : run.state === 'Drifted' ? 'Drifted' : 'Pending';
      if (phase === 'Ready') ready++;
      else if (phase === 'Failed') failed++;
      else pending++;
      const conditions = setCondition(res.status?.conditions ?? [], {
        type: 'Ready',
        status: phase === 'Ready' ? 'True' : 'False',
        reason: p.problem ? 'PortInvalid' : rulePresent ? 'RuleProgrammed' : run.state === 'Drifted' ? 'DriftNotCorrected' : `Pool${run.state}`,
        message: p.problem ?? (rulePresent ? `DNAT to ${run.observed?.upstreamIP}:${p.port} is in place` : run.lastError ?? `ProxyPool ${desired.name} is ${run.state}`),
        observedGeneration: res.metadata.generation,
      }, now);
      const status: ResourceStatus = {
        ...(res.status ?? {}),
        phase,
        observedGeneration: res.metadata.generation,
        conditions,
        port: p.port,
        pool: desired.name,
        rulePresent,
      };
      this.store.setStatus('ProxyPort', p.name, status);
    }
    this.metrics.proxyPorts.set({ state: 'programmed' }, ready);
    this.metrics.proxyPorts.set({ state: 'pending' }, pending);
    this.metrics.proxyPorts.set({ state: 'failed' }, failed);
  }

  requeueAfterMs(run: SettledRun<PoolDesired, PoolObserved>): number | undefined {
    if (!run.desired) return undefined;
    return parseDuration(run.desired.spec.upstream.resolveInterval);
  }
}

export type { ProxyPortHealth };
