// `plan [KIND] [NAME]`: the store against live state, what a reconcile would do now, changing
// nothing. ProxyPools and their ports by default (the rules in the config's iptables namespace);
// `plan warmpool` asks each pool's engine, `plan turnserver` probes each server once. Exit 0
// nothing to do, 1 changes, 2 error.

import type { Config } from '../config.js';
import type { PoolObserved } from '../controllers/proxypool/controller.js';
import type { ProxyPortSpec } from '../controllers/proxypool/types.js';
import type { TurnProbe } from '../controllers/turnserver/controller.js';
import type { IptablesDriver } from '../drivers/iptables.js';
import type { StoredResource } from '../state/types.js';
import type { Store } from '../state/store.js';
import type { CliContext } from './context.js';
import { CliError, EXIT, type Io } from './errors.js';
import { groupLines } from './output.js';

export async function plan(ctx: CliContext, kindName: string | undefined, name: string | undefined): Promise<number> {
  const kind = kindName ? await ctx.kindArg(kindName) : undefined;
  if (kind === 'Claim') {
    throw new CliError('claims have no plan of their own: `plan warmpool POOL` shows what the reconcile of their pool does (ending expired claims among it)');
  }
  if (kind !== undefined && !['ProxyPool', 'ProxyPort', 'WarmPool', 'TurnServer'].includes(kind)) throw new CliError(`plan does not cover ${kind} yet`);
  const cfg = await ctx.settings();
  // The live rules are read at once, while the store opens and the controller loads.
  let rules: IptablesDriver | undefined;
  if (kind === undefined || kind === 'ProxyPool' || kind === 'ProxyPort') {
    ctx.requireDatabase(cfg);
    rules = await liveRules(cfg);
  }
  return ctx.withStore('read', async (store) => {
    let changes: number;
    if (kind === 'WarmPool') {
      const { planWarmPools } = await import('./plan-warmpool.js');
      changes = await planWarmPools(store, cfg, name, ctx.io);
    } else if (kind === 'TurnServer') {
      changes = await planTurnServers(store, name, ctx.io);
    } else {
      changes = await planProxyPools(store, cfg, rules!, kind, name, ctx.io);
    }
    return changes > 0 ? EXIT.PROBLEMS : EXIT.OK;
  }, cfg);
}

/**
 * An iptables driver that reads the live rules once, starting now, and answers every later read
 * from that: each pool is planned against the same moment (one `iptables-save`, however many
 * pools), and the read runs while this process loads the rest. It only reads; a plan never writes.
 */
async function liveRules(cfg: Config): Promise<IptablesDriver> {
  const { IptablesDriver } = await import('../drivers/iptables.js');
  class OneRead extends IptablesDriver {
    private readonly saved = quiet(super.saveRaw());
    private readonly forwarding = quiet(super.getIpForward());
    override saveRaw(): Promise<Buffer> {
      return this.saved;
    }
    override getIpForward(): Promise<boolean> {
      return this.forwarding;
    }
  }
  return new OneRead({ backend: cfg.iptables.backend, ...(cfg.iptables.netns ? { netns: cfg.iptables.netns } : {}) });
}

/** The same promise, with its failure marked handled until someone awaits it (there may be no pool to plan). */
function quiet<T>(p: Promise<T>): Promise<T> {
  p.catch(() => undefined);
  return p;
}

/** Prints one resource's plan: a header with the count, then its actions, identical ones once with a count. */
export function printPlan(io: Io, id: string, actions: string[], group: (line: string, count: number) => string = countSuffix): void {
  io.out(`${id}: ${actions.length === 0 ? 'no changes' : `${actions.length} change(s)`}`);
  for (const { line, count } of groupLines(actions)) io.out(`  ${count === 1 ? line : group(line, count)}`);
}

function countSuffix(line: string, count: number): string {
  return `${line} (${count} times)`;
}

async function planProxyPools(store: Store, cfg: Config, iptables: IptablesDriver, kind: string | undefined, name: string | undefined, io: Io): Promise<number> {
  const [{ loadPoolDesired, planPool, ProxyPoolController }, { describeAction }, { poolOf }] = await Promise.all([
    import('../controllers/proxypool/controller.js'),
    import('../controllers/proxypool/rules.js'),
    import('../controllers/proxyport/admission.js'),
  ]);
  let poolNames = store.listResources('ProxyPool').map((p) => p.metadata.name);
  let onlyUser: string | undefined;
  if (kind === 'ProxyPool' && name) poolNames = poolNames.filter((p) => p === name);
  if (kind === 'ProxyPort' && name) {
    const port = store.getResource<ProxyPortSpec>('ProxyPort', name);
    if (!port) throw new CliError(`ProxyPort "${name}" not found`, EXIT.PROBLEMS);
    poolNames = poolNames.filter((p) => p === poolOf(port.spec));
    onlyUser = port.spec.userId;
  }
  if (name && poolNames.length === 0) throw new CliError(`${kind} "${name}" not found`, EXIT.PROBLEMS);
  if (poolNames.length === 0) {
    io.err('no ProxyPool resources (`plan warmpool` and `plan turnserver` plan the other kinds)');
    return 0;
  }
  const pools = new ProxyPoolController(store, iptables);
  let changes = 0;
  for (const poolName of poolNames) {
    const pool = store.getResource('ProxyPool', poolName)!;
    const desired = loadPoolDesired(store, pool);
    let observed: PoolObserved;
    try {
      observed = await pools.observe(desired);
    } catch (err) {
      const where = cfg.iptables.netns ? ` in network namespace ${cfg.iptables.netns}` : '';
      // One line: the driver's message carries the command's stderr on lines of its own.
      const why = (err as Error).message.split('\n').map((l) => l.trim()).filter(Boolean).join(': ');
      throw new CliError(`ProxyPool/${poolName}: cannot read the live rules${where}: ${why}`);
    }
    const actions = planPool(desired, observed).filter((a) => !onlyUser || ('userId' in a && a.userId === onlyUser));
    changes += actions.length;
    printPlan(io, `ProxyPool/${poolName}`, actions.map(describeAction));
  }
  return changes;
}

/**
 * A TurnServer is reconciled by probing it: its plan probes each server once, as the controller
 * would, and says where the health machine would go and whether that means a restart.
 */
async function planTurnServers(store: Store, name: string | undefined, io: Io): Promise<number> {
  const [{ TurnServerController }, machine, { CredentialsError, turnServerDesired }, { Metrics }, { silentLogger }, { formatDuration }] = await Promise.all([
    import('../controllers/turnserver/controller.js'),
    import('../controllers/turnserver/machine.js'),
    import('../controllers/turnserver/types.js'),
    import('../observability/metrics.js'),
    import('../observability/logger.js'),
    import('../util/duration.js'),
  ]);
  let servers: StoredResource[] = store.listResources('TurnServer');
  if (name) {
    servers = servers.filter((s) => s.metadata.name === name);
    if (servers.length === 0) throw new CliError(`TurnServer "${name}" not found`, EXIT.PROBLEMS);
  }
  if (servers.length === 0) {
    io.err('no TurnServer resources');
    return 0;
  }
  const controller = new TurnServerController({ store, metrics: new Metrics({ processMetrics: false }), logger: silentLogger() });
  let changes = 0;
  for (const resource of servers) {
    const d = turnServerDesired(resource);
    const id = `TurnServer/${d.name}`;
    let snap = machine.restoreTurnSnapshot(store.getSnapshot('TurnServer', d.name));
    // A changed spec starts over as a new server (as the controller does).
    if (resource.status?.observedGeneration !== undefined && resource.status.observedGeneration !== d.generation) snap = machine.nextTurnSnapshot(snap, { type: 'RESET' });
    const before = machine.phaseOf(snap);
    let probe: TurnProbe;
    try {
      probe = await controller.probe(d);
    } catch (err) {
      if (!(err instanceof CredentialsError)) throw err;
      io.out(`${id}: no changes (cannot probe: ${err.message}; the controller reports this and does not restart)`);
      continue;
    }
    const now = Date.now();
    // As the controller does: a server restarted less than interval × failureThreshold ago is
    // still coming up, and a failed probe then is shown but not counted.
    const starting = before === 'Recovering' && !probe.ok && probe.errorClass !== 'auth_rejected'
      && snap.context.lastRestartAt !== null && probe.at - snap.context.lastRestartAt < d.intervalMs * d.policy.failureThreshold;
    const after = starting ? snap : machine.nextTurnSnapshot(snap, { type: 'PROBE', ok: probe.ok, ...(probe.errorClass ? { errorClass: probe.errorClass } : {}), at: probe.at, policy: d.policy });
    const phase = machine.phaseOf(after);
    const transports = probe.transports.map((t) => t.transport).join(', ');
    const result = probe.ok ? `probe succeeded (${transports})` : `probe failed (${probe.errorClass ?? 'malformed'}: ${probe.transports.find((t) => t.error)?.error ?? 'no detail'})`;
    const move = before === phase ? `phase stays ${phase}` : `phase ${before} → ${phase}`;
    if (phase !== 'Restarting') {
      io.out(`${id}: no changes (${result}; ${move})`);
      continue;
    }
    changes++;
    const r = d.spec.remediation;
    const how = r.command ? `command ${r.command.join(' ')}` : r.systemdUnit ? `systemctl restart ${r.systemdUnit}` : `Nomad job ${r.nomadJob}`;
    const due = machine.restartDueAt(after.context, d.policy, now);
    printPlan(io, id, [`restart via ${how} ${due <= now ? 'now' : `in ${formatDuration(due - now)}`} (${after.context.consecutiveFailures} consecutive failed probes; ${result})`]);
  }
  return changes;
}
