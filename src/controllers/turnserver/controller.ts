import fs from 'node:fs';
import { probeTurn, type TurnCredentials, type TurnProbeResult, type TurnTransport } from '../../drivers/turn.js';
import type { NomadClient } from '../../drivers/nomad.js';
import { restartNomadJob, restartSystemdUnit, runRestartCommand, type RestartOutcome } from '../../drivers/restart.js';
import type { Logger } from '../../observability/logger.js';
import type { Metrics } from '../../observability/metrics.js';
import type { ControllerContext, SimpleController } from '../../runtime/controller.js';
import type { Store } from '../../state/store.js';
import { setCondition, type ResourceStatus } from '../../state/types.js';
import {
  isHealthy,
  nextTurnSnapshot,
  phaseOf,
  restartDueAt,
  restoreTurnSnapshot,
  turnServerMachine,
  type ProbeErrorClass,
  type TurnPhase,
  type TurnSnapshot,
} from './machine.js';
import { CredentialsError, readSecretFile, turnServerDesired, type TurnServerDesired } from './types.js';

const KIND = 'TurnServer';

/** The CRD's spelling of an error class (status.lastProbe.errorClass). */
const STATUS_ERROR_CLASS: Record<ProbeErrorClass, string> = {
  unreachable: 'unreachable',
  timeout: 'timeout',
  auth_rejected: 'authRejected',
  allocation_refused: 'allocationRefused',
  malformed: 'malformed',
};

/** The reason label of polydev_turn_probe_failures_total: every error class, and a secret file that cannot be read. */
const PROBE_FAILURE_REASONS = [...(Object.keys(STATUS_ERROR_CLASS) as ProbeErrorClass[]), 'credentials'] as const;
/** The step label of polydev_turn_probe_duration_seconds. */
const PROBE_STEPS = ['binding', 'allocate', 'release'] as const;

/** Ready's reason in each phase that is not ready. */
const NOT_READY_REASON: Record<Exclude<TurnPhase, 'Healthy' | 'Suspect'>, string> = {
  Unknown: 'NotProbedYet',
  Unhealthy: 'ProbeFailing',
  AuthFailed: 'AuthFailed',
  Restarting: 'Restarting',
  Recovering: 'Recovering',
  Failed: 'RestartBudgetExhausted',
};

/** The probe's own credentials for TURN REST (use-auth-secret) servers. */
const PROBE_ID = 'polydev-probe';

export interface TurnProbe {
  ok: boolean;
  errorClass?: ProbeErrorClass;
  /** Per transport, as the driver returned it. */
  transports: TurnProbeResult[];
  at: number;
}

interface Schedule {
  generation: number;
  nextProbeAt: number;
}

export interface TurnServerControllerOptions {
  store: Store;
  metrics: Metrics;
  logger: Logger;
  /** The Nomad API, for remediation.nomadJob; absent when this daemon has no nomad.address. */
  nomad?: () => NomadClient;
}

/**
 * Probes each TurnServer on its interval with a real binding and allocation (our own STUN/TURN
 * client), feeds the result to its health machine (machine.ts), and restarts the server when
 * the machine says so. Desired state here is "answering"; the machine decides, this class acts.
 */
export class TurnServerController implements SimpleController {
  readonly kind = KIND;
  private readonly schedules = new Map<string, Schedule>();
  /** Servers whose series exist (from their first reconcile until forget). */
  private readonly exported = new Set<string>();

  private nomadClient: NomadClient | undefined;

  constructor(private readonly opts: TurnServerControllerOptions) {}

  async reconcile(name: string, ctx: ControllerContext): Promise<{ requeueAfterMs?: number } | void> {
    const { store, metrics } = this.opts;
    const res = store.getResource(KIND, name);
    if (!res) return this.forget(name);
    if (res.metadata.deletionTimestamp) {
      // The daemon does not own the server: deleting the resource only stops watching it.
      store.transaction(() => store.removeResource(KIND, name));
      return this.forget(name);
    }
    const d = turnServerDesired(res);
    this.exportSeries(name);
    let snap = restoreTurnSnapshot(store.getSnapshot(KIND, name));
    const schedule = this.schedules.get(name);
    const specChanged = res.status?.observedGeneration !== undefined && res.status.observedGeneration !== d.generation;
    if (specChanged) snap = nextTurnSnapshot(snap, { type: 'RESET' });
    const now = Date.now();
    const phase = phaseOf(snap);

    if (phase === 'Restarting' && !specChanged) {
      const due = restartDueAt(snap.context, d.policy, now);
      if (due <= now) return this.restart(d, snap, ctx);
      const probeAt = schedule?.generation === d.generation ? schedule.nextProbeAt : now;
      if (probeAt > now) return { requeueAfterMs: Math.min(due, probeAt) - now };
    } else if (schedule && schedule.generation === d.generation && schedule.nextProbeAt > now && !specChanged) {
      // A resync or an unrelated enqueue: the probe keeps its own rhythm.
      return { requeueAfterMs: schedule.nextProbeAt - now };
    }

    let probe: TurnProbe;
    try {
      probe = await this.probe(d);
    } catch (err) {
      if (!(err instanceof CredentialsError)) throw err;
      metrics.turnProbeFailures.inc({ server: name, reason: 'credentials' });
      metrics.turnUp.set({ server: name }, 0);
      this.writeCredentialsProblem(d, snap, err.message, ctx);
      this.schedules.set(name, { generation: d.generation, nextProbeAt: now + d.intervalMs });
      return { requeueAfterMs: d.intervalMs };
    }
    const before = phaseOf(snap);
    // After a restart the server gets as long to come up as a hang takes to detect
    // (interval × failureThreshold), probed every remediation.settle meanwhile: a failure in
    // that grace is shown but not counted, so a slow start is not restarted again, and a
    // fast one is seen at once rather than an interval later.
    const starting = before === 'Recovering' && !probe.ok && probe.errorClass !== 'auth_rejected'
      && snap.context.lastRestartAt !== null && probe.at - snap.context.lastRestartAt < d.intervalMs * d.policy.failureThreshold;
    if (!starting) snap = nextTurnSnapshot(snap, { type: 'PROBE', ok: probe.ok, ...(probe.errorClass ? { errorClass: probe.errorClass } : {}), at: probe.at, policy: d.policy });
    this.recordProbeMetrics(name, probe, snap);
    this.save(d, snap, probe, ctx, before);
    // Probes start on a fixed rhythm: a slow (timed-out) probe does not push the next one back.
    const nextProbeAt = Math.max(Date.now(), now + (starting ? d.settleMs : d.intervalMs));
    this.schedules.set(name, { generation: d.generation, nextProbeAt });
    if (phaseOf(snap) === 'Restarting') {
      const due = restartDueAt(snap.context, d.policy, Date.now());
      return { requeueAfterMs: Math.max(0, Math.min(due, nextProbeAt) - Date.now()) };
    }
    return { requeueAfterMs: nextProbeAt - Date.now() };
  }

  /** Probes every configured transport at once; the server is fine only if all of them are. */
  async probe(d: TurnServerDesired): Promise<TurnProbe> {
    const { spec } = d;
    const credentials = this.credentials(d);
    const tls = spec.transports.includes('tls') ? tlsOptions(spec.tls) : undefined;
    const at = Date.now();
    const transports = await Promise.all(
      spec.transports.map((transport: TurnTransport) =>
        probeTurn({
          host: spec.host,
          port: transport === 'tls' ? (spec.ports.tls ?? 5349) : spec.ports.stun,
          transport,
          realm: spec.realm,
          credentials,
          timeoutMs: d.timeoutMs,
          ...(transport === 'tls' && tls ? { tls } : {}),
          signal: AbortSignal.timeout(d.timeoutMs * 3 + 500),
        }),
      ),
    );
    const failed = transports.filter((t) => t.errorClass !== undefined || !t.reachable);
    const outOfRange = spec.relayPortRange
      ? transports.find((t) => t.relayedAddress && !inRange(t.relayedAddress, spec.relayPortRange!))
      : undefined;
    if (outOfRange) {
      outOfRange.errorClass = 'malformed';
      outOfRange.error = `relayed address ${outOfRange.relayedAddress} is outside relayPortRange ${spec.relayPortRange!.min}-${spec.relayPortRange!.max}`;
      if (!failed.includes(outOfRange)) failed.push(outOfRange);
    }
    // Rejected credentials win: they are a configuration problem, whatever else failed.
    const errorClass = failed.find((t) => t.errorClass === 'auth_rejected')?.errorClass ?? failed[0]?.errorClass ?? (failed.length ? 'malformed' : undefined);
    return { ok: failed.length === 0, ...(errorClass ? { errorClass } : {}), transports, at };
  }

  private credentials(d: TurnServerDesired): TurnCredentials {
    const { auth } = d.spec;
    if (auth.mode === 'longTerm') {
      return { mode: 'longTerm', username: auth.username, password: readSecretFile(auth.passwordFile, 'auth.passwordFile') };
    }
    return { mode: 'restSecret', secret: readSecretFile(auth.secretFile, 'auth.secretFile'), id: PROBE_ID, ttlSeconds: Math.max(60, Math.round(d.credentialTtlMs / 1000)) };
  }

  private async restart(d: TurnServerDesired, snap: TurnSnapshot, ctx: ControllerContext): Promise<{ requeueAfterMs: number }> {
    const { metrics, logger } = this.opts;
    const r = d.spec.remediation;
    let outcome: RestartOutcome;
    if (r.command) outcome = await runRestartCommand(r.command, d.restartTimeoutMs);
    else if (r.systemdUnit) outcome = await restartSystemdUnit(r.systemdUnit, d.restartTimeoutMs);
    else if (r.nomadJob && this.opts.nomad) {
      let client: NomadClient | undefined;
      try {
        client = (this.nomadClient ??= this.opts.nomad());
      } catch (err) {
        outcome = { ok: false, exitCode: null, signal: null, timedOut: false, durationMs: 0, message: `the Nomad client cannot be set up: ${(err as Error).message}` };
      }
      if (client) outcome = await restartNomadJob(client, r.nomadJob, d.restartTimeoutMs);
      else outcome ??= { ok: false, exitCode: null, signal: null, timedOut: false, durationMs: 0, message: 'no Nomad client' };
    } else {
      outcome = { ok: false, exitCode: null, signal: null, timedOut: false, durationMs: 0, message: 'remediation.nomadJob: this daemon has no nomad.address configured' };
    }
    const at = Date.now();
    metrics.turnRestarts.inc({ server: d.name });
    const next = nextTurnSnapshot(snap, { type: 'RESTARTED', ok: outcome.ok, at, ...(outcome.ok ? {} : { error: outcome.message }) });
    const how = r.command ? `command ${r.command[0]}` : r.systemdUnit ? `systemctl restart ${r.systemdUnit}` : `Nomad job ${r.nomadJob}`;
    logger[outcome.ok ? 'info' : 'warn']('TURN server restarted', { server: d.name, via: how, ok: outcome.ok, tookMs: outcome.durationMs, result: outcome.message });
    this.opts.store.transaction(() => {
      ctx.recorder.record(KIND, d.name, outcome.ok ? 'Normal' : 'Warning', outcome.ok ? 'Restarted' : 'RestartFailed',
        `restart ${next.context.totalRestarts} (${next.context.recentRestarts.length} of ${d.policy.maxRestarts} within ${d.spec.remediation.window}) via ${how}: ${outcome.message}`);
      this.writeStatus(d, next, undefined);
    });
    // The server needs a moment to listen; then the next probe tells whether the restart worked.
    this.schedules.set(d.name, { generation: d.generation, nextProbeAt: at + d.settleMs });
    return { requeueAfterMs: d.settleMs };
  }

  /**
   * A server's counters at 0 from its first reconcile (see metrics.ts). That reconcile probes it
   * too, so only the very first probe of a new server can fail before a scrape saw the 0 (after a
   * restart of the daemon, the previous process's 0 came first).
   */
  private exportSeries(server: string): void {
    if (this.exported.has(server)) return;
    const { metrics } = this.opts;
    for (const reason of PROBE_FAILURE_REASONS) metrics.turnProbeFailures.inc({ server, reason }, 0);
    metrics.turnRestarts.inc({ server }, 0);
    for (const step of PROBE_STEPS) metrics.turnProbeDuration.zero({ server, step });
    this.exported.add(server);
  }

  private recordProbeMetrics(server: string, probe: TurnProbe, snap: TurnSnapshot): void {
    const { metrics } = this.opts;
    metrics.turnUp.set({ server }, isHealthy(snap) ? 1 : 0);
    for (const t of probe.transports) {
      if (t.bindingMs !== undefined) metrics.turnProbeDuration.observe({ server, step: 'binding' }, t.bindingMs / 1000);
      if (t.allocationMs !== undefined) metrics.turnProbeDuration.observe({ server, step: 'allocate' }, t.allocationMs / 1000);
      if (t.releaseMs !== undefined) metrics.turnProbeDuration.observe({ server, step: 'release' }, t.releaseMs / 1000);
    }
    if (!probe.ok) metrics.turnProbeFailures.inc({ server, reason: probe.errorClass ?? 'malformed' });
  }

  /** Status, snapshot and the event of a phase change, in one transaction. */
  private save(d: TurnServerDesired, snap: TurnSnapshot, probe: TurnProbe, ctx: ControllerContext, before: TurnPhase): void {
    const after = phaseOf(snap);
    const quiet = d.spec.driftPolicy === 'ignore';
    const failure = probe.transports.find((t) => t.errorClass)?.error ?? probe.errorClass ?? '';
    this.opts.store.transaction(() => {
      if (after !== before && !quiet) {
        const event = transitionEvent(d, snap, before, after, failure);
        if (event) ctx.recorder.record(KIND, d.name, event.type, event.reason, event.message);
      }
      this.writeStatus(d, snap, probe);
    });
  }

  private writeStatus(d: TurnServerDesired, snap: TurnSnapshot, probe: TurnProbe | undefined): void {
    const { store } = this.opts;
    const previous = store.getStatus(KIND, d.name);
    const phase = phaseOf(snap);
    const now = new Date().toISOString();
    const healthy = isHealthy(snap);
    const c = snap.context;
    const conditions = setCondition(previous?.conditions ?? [], healthy
      ? { type: 'Ready', status: 'True', reason: phase === 'Suspect' ? 'ProbeFailedOnce' : 'ProbesSucceed', message: phase === 'Suspect' ? `${c.consecutiveFailures} failed probe(s) of ${d.policy.failureThreshold}` : 'binding and allocation succeed on every transport', observedGeneration: d.generation }
      : { type: 'Ready', status: 'False', reason: NOT_READY_REASON[phase as keyof typeof NOT_READY_REASON], message: notReadyMessage(d, snap), observedGeneration: d.generation }, now);
    const status: ResourceStatus = {
      ...(previous ?? {}),
      phase,
      observedGeneration: d.generation,
      conditions,
      healthy,
      consecutiveFailures: c.consecutiveFailures,
      restarts: c.totalRestarts,
      restartsInWindow: c.recentRestarts.length,
      ...(c.lastRestartAt !== null ? { lastRestartAt: new Date(c.lastRestartAt).toISOString() } : {}),
      ...(probe ? { lastProbe: lastProbeStatus(probe) } : {}),
    };
    store.setStatus(KIND, d.name, status);
    store.setSnapshot(KIND, d.name, turnServerMachine.getPersistedSnapshot(snap));
  }

  private writeCredentialsProblem(d: TurnServerDesired, snap: TurnSnapshot, message: string, ctx: ControllerContext): void {
    const { store } = this.opts;
    const previous = store.getStatus(KIND, d.name);
    const already = previous?.conditions.some((c) => c.type === 'Ready' && c.reason === 'CredentialsUnavailable');
    store.transaction(() => {
      if (!already && d.spec.driftPolicy !== 'ignore') ctx.recorder.record(KIND, d.name, 'Warning', 'CredentialsUnavailable', `${message}; not probing (and not restarting) until it can be read`);
      const conditions = setCondition(previous?.conditions ?? [], { type: 'Ready', status: 'False', reason: 'CredentialsUnavailable', message, observedGeneration: d.generation }, new Date().toISOString());
      store.setStatus(KIND, d.name, { ...(previous ?? {}), phase: phaseOf(snap), observedGeneration: d.generation, conditions, healthy: false });
      store.setSnapshot(KIND, d.name, turnServerMachine.getPersistedSnapshot(snap));
    });
  }

  private forget(name: string): void {
    this.schedules.delete(name);
    const { metrics } = this.opts;
    // A server no longer declared leaves no series behind (an alert on it would never resolve).
    metrics.turnUp.remove({ server: name });
    for (const step of PROBE_STEPS) metrics.turnProbeDuration.remove({ server: name, step });
    for (const reason of PROBE_FAILURE_REASONS) metrics.turnProbeFailures.remove({ server: name, reason });
    metrics.turnRestarts.remove({ server: name });
    this.exported.delete(name);
  }
}

/** The probe's TLS settings; an unreadable CA file is a credentials problem (reported, nothing probed). */
function tlsOptions(tls: TurnServerDesired['spec']['tls']): { ca?: string; servername?: string } {
  const out: { ca?: string; servername?: string } = {};
  if (tls?.caFile) {
    try {
      out.ca = fs.readFileSync(tls.caFile, 'utf8');
    } catch (err) {
      throw new CredentialsError(`tls.caFile ${tls.caFile} cannot be read: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
    }
  }
  if (tls?.serverName) out.servername = tls.serverName;
  return out;
}

function inRange(address: string, range: { min: number; max: number }): boolean {
  const port = Number(address.slice(address.lastIndexOf(':') + 1));
  return port >= range.min && port <= range.max;
}

function lastProbeStatus(p: TurnProbe): Record<string, unknown> {
  const first = p.transports[0];
  const failed = p.transports.find((t) => t.errorClass);
  return {
    at: new Date(p.at).toISOString(),
    reachable: p.transports.every((t) => t.reachable),
    bindingLatencyMs: first?.bindingMs ?? null,
    allocationLatencyMs: first?.allocationMs ?? null,
    ...(first?.relayedAddress ? { relayedAddress: first.relayedAddress } : {}),
    errorClass: p.errorClass ? STATUS_ERROR_CLASS[p.errorClass] : 'none',
    ...(failed?.error ? { error: failed.error.slice(0, 500) } : {}),
    transports: p.transports.map((t) => ({
      transport: t.transport,
      reachable: t.reachable,
      bindingLatencyMs: t.bindingMs ?? null,
      allocationLatencyMs: t.allocationMs ?? null,
      ...(t.relayedAddress ? { relayedAddress: t.relayedAddress } : {}),
      errorClass: t.errorClass ? STATUS_ERROR_CLASS[t.errorClass] : 'none',
      ...(t.error ? { error: t.error.slice(0, 500) } : {}),
    })),
  };
}

function notReadyMessage(d: TurnServerDesired, snap: TurnSnapshot): string {
  const c = snap.context;
  const cls = c.lastErrorClass ?? 'unknown';
  switch (phaseOf(snap)) {
    case 'Unknown':
      return 'not probed yet';
    case 'Unhealthy':
      return `${c.consecutiveFailures} consecutive failed probes (${cls}); not restarting: ${d.spec.driftPolicy !== 'correct' ? `driftPolicy is ${d.spec.driftPolicy}` : 'no remediation is configured'}`;
    case 'AuthFailed':
      return `the server rejected the probe's credentials (auth mode ${d.spec.auth.mode}, realm ${d.spec.realm}); a configuration problem, so the server is not restarted`;
    case 'Restarting':
      return `${c.consecutiveFailures} consecutive failed probes (${cls}); restart due`;
    case 'Recovering':
      return `restarted ${c.lastRestartAt ? new Date(c.lastRestartAt).toISOString() : ''}${c.lastRestartError ? ` (the restart reported: ${c.lastRestartError})` : ''}; waiting for a good probe`;
    case 'Failed':
      return `${c.recentRestarts.length} restarts within ${d.spec.remediation.window} did not bring it back (maxRestarts ${d.policy.maxRestarts}); not restarting any more, probing goes on`;
    default:
      return '';
  }
}

function transitionEvent(
  d: TurnServerDesired,
  snap: TurnSnapshot,
  before: TurnPhase,
  after: TurnPhase,
  failure: string,
): { type: 'Normal' | 'Warning'; reason: string; message: string } | undefined {
  const c = snap.context;
  switch (after) {
    case 'Healthy':
      return before === 'Unknown' ? undefined : { type: 'Normal', reason: 'Recovered', message: `probes succeed again (was ${before})` };
    case 'Suspect':
      return { type: 'Warning', reason: 'ProbeFailed', message: `probe failed (${c.lastErrorClass}): ${failure}`.slice(0, 1000) };
    case 'Restarting':
      return { type: 'Warning', reason: 'Unhealthy', message: `${c.consecutiveFailures} consecutive failed probes (${c.lastErrorClass}): ${failure}; restarting`.slice(0, 1000) };
    case 'Unhealthy':
    case 'AuthFailed':
    case 'Failed':
      return { type: 'Warning', reason: after === 'Unhealthy' ? 'Unhealthy' : after === 'AuthFailed' ? 'AuthFailed' : 'RestartBudgetExhausted', message: notReadyMessage(d, snap) };
    default:
      return undefined;
  }
}
