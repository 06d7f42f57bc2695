import fs from 'node:fs';
import type { FastifyInstance } from 'fastify';
import { buildApi } from './api/server.js';
import type { Config } from './config.js';
import { ProxyHealthChecker } from './controllers/proxyport/health.js';
import { ADMISSIONS, createControllers, createValidator } from './controllers/registry.js';
import { ClaimService } from './controllers/warmpool/claims.js';
import type { EngineFactories, EngineSet } from './controllers/warmpool/engines.js';
import { memberCountsByPool, setInstallationId } from './state/pools.js';
import { DesiredStateDirWatcher } from './desired/dir-watcher.js';
import { IptablesDriver, runProcess, findExecutable } from './drivers/iptables.js';
import { createLogger, type Logger } from './observability/logger.js';
import { Metrics } from './observability/metrics.js';
import { Manager, type ConvergenceReport, type ManagerOptions } from './runtime/manager.js';
import { Lease, SqliteLeaderElector } from './state/lease.js';
import { Notifier } from './notify/notifier.js';
import { KubernetesClient, resolveNamespace } from './drivers/kubernetes.js';
import { KubernetesSource } from './desired/kubernetes-source.js';
import { KubernetesStatusWriter } from './desired/kubernetes-status.js';
import { KubernetesLeaseElector } from './runtime/kubernetes-lease.js';
import { AbortError, type LeaderElector } from './runtime/leader.js';
import { Store } from './state/store.js';

export interface DaemonOptions {
  logger?: Logger;
  /** Skip the HTTP listener (run --once does not need it). */
  serveApi?: boolean;
  /** Health-check tick; tests shorten it. */
  healthTickMs?: number;
  /** Engines to use instead of those the config describes (tests). */
  engines?: EngineFactories;
  /** Failure backoff and when failures make a resource Degraded, instead of the defaults (tests: no config knob sets these). */
  retries?: Pick<ManagerOptions, 'backoff' | 'degraded'>;
  /**
   * What to do when leadership is lost (another process holds the lease now): by default stop and
   * exit 1, as controller-runtime does, so a supervisor restarts the process as a clean standby.
   */
  onLeadershipLost?: () => void;
}

/** Reads the API token file; a missing or empty file is a start-up error, never a silent open API. */
export function readToken(file: string | undefined): string | undefined {
  if (!file) return undefined;
  const token = fs.readFileSync(file, 'utf8').trim();
  if (token.length < 16) throw new Error(`${file}: the API token must be at least 16 characters`);
  return token;
}

/** Creates iptables.netns when the config asks for it (the demo config keeps the host firewall untouched). */
async function ensureNetns(name: string, logger: Logger): Promise<void> {
  const file = `/run/netns/${name}`;
  if (fs.existsSync(file) && isMountPoint(file)) return;
  const ip = findExecutable('ip');
  if (!ip) throw new Error('iptables.createNetns needs the `ip` command (iproute2)');
  if (fs.existsSync(file)) {
    // The name is there but no namespace is mounted on it (a reboot of a tmpfs-less /run, a crash
    // inside `ip netns add`, a mount namespace that went away): every `ip netns exec` would fail
    // with "Invalid argument" for ever. Nothing can be in it, so it is replaced.
    logger.warn('replacing a stale network namespace name (a file with no namespace mounted on it)', { netns: name, file });
    fs.rmSync(file, { force: true });
  }
  for (const args of [['netns', 'add', name], ['netns', 'exec', name, ip, 'link', 'set', 'lo', 'up']]) {
    const r = await runProcess(ip, args, null, 10_000);
    if (r.exitCode !== 0) throw new Error(`ip ${args.join(' ')} failed: ${r.stderr.trim() || `exit ${r.exitCode}`}`);
  }
  logger.info('created network namespace for iptables', { netns: name });
}

/** Whether `file` is a mount point now (a live `ip netns` name is a bind mount of the namespace). */
function isMountPoint(file: string): boolean {
  const unescape = (p: string): string => p.replace(/\\([0-7]{3})/g, (_m, o: string) => String.fromCharCode(parseInt(o, 8)));
  return fs
    .readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .some((line) => unescape(line.split(' ')[4] ?? '') === file);
}

/** How long a stopping leader may take to write its last statuses back to Kubernetes. */
export const STATUS_FLUSH_BUDGET_MS = 3000;

/** The lease row of a database: one, whatever the mode (leaseName names the Kubernetes Lease only). */
const DATABASE_LEASE = 'daemon';

/** The daemon: store, lease, controllers, manager, desired-state watcher, API. */
export class Daemon {
  readonly logger: Logger;
  readonly metrics = new Metrics();
  store!: Store;
  manager!: Manager;
  health!: ProxyHealthChecker;
  api: FastifyInstance | undefined;
  iptables!: IptablesDriver;
  claims!: ClaimService;
  engines!: EngineSet;
  private lease: Lease | undefined;
  private elector: LeaderElector | undefined;
  private readonly campaign = new AbortController();
  private leading: Promise<void> | undefined;
  private watcher: DesiredStateDirWatcher | undefined;
  private notifier: Notifier | undefined;
  private kube: { client: KubernetesClient; namespace: string } | undefined;
  private kubeSource: KubernetesSource | undefined;
  private statusWriter: KubernetesStatusWriter | undefined;
  private validator: ReturnType<typeof createValidator> | undefined;
  private stopped = false;
  /** Set when the lease is lost (or leading failed): from then on nothing may change the world. */
  private mustNotAct = false;

  constructor(
    readonly config: Config,
    private readonly options: DaemonOptions = {},
  ) {
    this.logger = options.logger ?? createLogger(config.logLevel, 'stdout', config.logFormat);
  }

  /** The address the API listens on (after start). */
  get address(): string | undefined {
    const a = this.api?.server.address();
    return a && typeof a === 'object' ? `http://${a.family === 'IPv6' ? `[${a.address}]` : a.address}:${a.port}` : undefined;
  }

  async start(): Promise<void> {
    const { config, logger } = this;
    const token = readToken(config.apiTokenFile);
    this.store = new Store(config.database, { eventRetention: config.eventRetention });
    try {
      if (config.source === 'kubernetes') {
        const client = KubernetesClient.fromSettings(config.kubernetes);
        this.kube = { client, namespace: resolveNamespace(config.kubernetes, { kubeConfig: client.kubeConfig }) };
      }
      if (config.leaderElection.enabled) {
        this.elector = this.createElector();
      } else {
        this.lease = new Lease(this.store, DATABASE_LEASE, 15_000, () => this.leadershipLost());
        this.lease.acquire();
      }
    } catch (err) {
      this.store.close();
      throw err;
    }
    if (config.installationId) {
      const before = setInstallationId(this.store, config.installationId);
      if (before !== undefined) {
        const members = memberCountsByPool(this.store).reduce((n, r) => n + r.n, 0);
        const meta = { installationId: config.installationId, previous: before, membersUnderPreviousId: members };
        // Containers labelled with the previous id are not this daemon's any more: worth a warning.
        if (members > 0) logger.warn('installation id changed by the config; containers of the previous id are no longer adopted', meta);
        else logger.info('installation id set from the config', meta);
      }
    }
    this.iptables = new IptablesDriver({ backend: config.iptables.backend, ...(config.iptables.netns ? { netns: config.iptables.netns } : {}) });
    const validator = (this.validator = createValidator());
    const { controllers, warmPools, engines } = createControllers({
      store: this.store,
      iptables: this.iptables,
      metrics: this.metrics,
      logger,
      docker: config.docker,
      process: config.process,
      nomad: config.nomad,
      warmPools: { ...config.warmPools, orphanSweepMs: config.resyncIntervalMs },
      ...(this.options.engines ? { engines: this.options.engines } : {}),
    });
    this.engines = engines;
    this.manager = new Manager({
      store: this.store,
      logger,
      metrics: this.metrics,
      controllers,
      workers: config.workers,
      resyncIntervalMs: config.resyncIntervalMs,
      ...(this.options.retries ?? {}),
      ...(this.elector ? { mayAct: () => this.elector!.isLeader() } : {}),
    });
    this.metrics.reportStoreStateWhen(() => this.isLeader());
    this.metrics.countResourcesWith(() => (this.store.db.open ? this.store.phaseCounts() : []));
    this.metrics.countPoolMembersWith(() => (this.store.db.open ? memberCountsByPool(this.store) : []));
    this.claims = new ClaimService({
      store: this.store,
      controller: warmPools,
      metrics: this.metrics,
      logger,
      recorder: this.manager.events,
      enqueue: (kind, name) => this.manager.context.enqueue(kind, name),
    });
    this.health = new ProxyHealthChecker(this.store, this.metrics, logger, this.manager.events);
    // Bind the API first: a daemon that cannot serve must fail before it changes anything.
    if (this.options.serveApi ?? true) {
      const elector = this.elector;
      this.api = buildApi({
        store: this.store, validator, metrics: this.metrics, logger, manager: this.manager, health: this.health, claims: this.claims, token,
        ...(elector ? { leadership: { isLeader: () => elector.isLeader(), holder: () => elector.holder() } } : {}),
      });
      try {
        await this.api.listen({ host: config.listen.host, port: config.listen.port });
      } catch (err) {
        await this.api.close().catch(() => undefined);
        this.api = undefined;
        this.lease?.release();
        this.store.close();
        throw new Error(`cannot listen on ${config.listen.host}:${config.listen.port}: ${(err as Error).message}`);
      }
    }
    if (!this.elector && !this.kube) {
      this.metrics.leader.set(1);
      await this.lead();
      return;
    }
    if (!this.elector) {
      // The first list of the custom resources waits for the API server: start() must not (signals, /healthz).
      this.metrics.leader.set(1);
      this.leading = this.lead().catch((err: Error) => {
        this.fatal('could not start: the custom resources could not be read; stopping', { error: err.message });
        throw err;
      });
      this.leading.catch(() => undefined);
      return;
    }
    this.metrics.leader.set(0);
    this.leading = this.runForLeadership(this.elector);
    // Failures are logged and end the process there; waitLeading still sees them.
    this.leading.catch(() => undefined);
    logger.info('polydev-reconciler started as a standby; waiting for the lease', {
      database: config.database,
      listen: this.address ?? null,
      lease: this.leaseLabel(),
      identity: this.elector.identity,
      pid: process.pid,
    });
  }

  /** Resolves once this daemon leads and has started acting (at once without leader election). */
  async waitLeading(timeoutMs: number): Promise<void> {
    if (!this.leading) return;
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`not leading after ${timeoutMs} ms`)), timeoutMs);
    });
    try {
      await Promise.race([this.leading, timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  isLeader(): boolean {
    return this.elector ? this.elector.isLeader() : !this.stopped;
  }

  /** What holds the lease, for logs: the Kubernetes Lease, or the database's own row. */
  private leaseLabel(): string {
    return this.kube ? `Lease ${this.kube.namespace}/${this.config.leaderElection.leaseName}` : `database ${this.config.database}`;
  }

  private createElector(): LeaderElector {
    const { config, logger } = this;
    const le = config.leaderElection;
    if (this.kube) {
      // Each replica has a database of its own: the lease must live where all of them see it.
      return new KubernetesLeaseElector({
        client: this.kube.client,
        namespace: this.kube.namespace,
        name: le.leaseName,
        ...(le.identity ? { identity: le.identity } : {}),
        timings: le,
        logger,
      });
    }
    return new SqliteLeaderElector(this.store, {
      // The same row a daemon without leader election takes: a standby pair and a lone daemon
      // (or `run --once`) on one database must see each other.
      name: DATABASE_LEASE,
      ...(le.identity ? { identity: le.identity } : {}),
      leaseDurationMs: le.leaseDurationMs,
      renewDeadlineMs: le.renewDeadlineMs,
      retryPeriodMs: le.retryPeriodMs,
      onWaiting: (h) =>
        logger.info('standby: the lease is held by another daemon', {
          lease: this.leaseLabel(),
          holder: h.holder,
          holderPid: h.pid,
          renewedAgoMs: Math.max(0, Date.now() - h.renewedAt),
        }),
    });
  }

  private async runForLeadership(elector: LeaderElector): Promise<void> {
    elector.onLost(() => this.leadershipLost());
    try {
      await elector.acquire(this.campaign.signal);
    } catch (err) {
      if (err instanceof AbortError) return new Promise<void>(() => undefined);
      this.fatal('leader election failed; stopping', { error: (err as Error).message });
      throw err;
    }
    this.metrics.leader.set(1);
    this.metrics.leaderTransitions.inc();
    this.logger.info('became the leader', { lease: this.leaseLabel(), identity: elector.identity });
    try {
      await this.lead();
    } catch (err) {
      this.fatal('could not start acting as the leader; stopping', { error: (err as Error).message });
      throw err;
    }
  }

  /** Everything that changes the world: only the leader (or the only daemon) does it. */
  private async lead(): Promise<void> {
    const { config, logger } = this;
    if (this.stopped) return;
    this.store.checkpointInBackground({
      intervalMs: 1000,
      onError: (message) => logger.warn('background WAL checkpoints stopped; SQLite checkpoints on commit again', { error: message }),
    });
    if (config.iptables.netns && config.iptables.createNetns) await ensureNetns(config.iptables.netns, logger);
    if (this.stopped || this.mustNotAct) return;
    if (this.kube) {
      if (config.desiredStateDir) logger.warn('desiredStateDir is ignored: source is kubernetes', { desiredStateDir: config.desiredStateDir });
      this.kubeSource = new KubernetesSource({
        client: this.kube.client,
        store: this.store,
        validator: this.validator!,
        admissions: ADMISSIONS,
        logger,
        metrics: this.metrics,
        recorder: this.manager.events,
        namespace: this.kube.namespace,
        resyncMs: config.kubernetes.resyncMs,
      });
      // The first sync must see every custom resource: reconciling a partial list would prune the rest.
      await this.kubeSource.start();
      if (this.stopped || this.mustNotAct) return;
      this.statusWriter = new KubernetesStatusWriter({
        client: this.kube.client,
        store: this.store,
        logger,
        namespace: this.kube.namespace,
        source: this.kubeSource,
      });
      this.statusWriter.start();
    } else if (config.desiredStateDir) {
      this.watcher = new DesiredStateDirWatcher({
        dir: config.desiredStateDir,
        store: this.store,
        validator: this.validator!,
        admissions: ADMISSIONS,
        logger,
        metrics: this.metrics,
        recorder: this.manager.events,
        debounceMs: config.applyDebounceMs,
        pollMs: Math.max(1000, config.resyncIntervalMs),
        maxPrune: config.maxPrune,
      });
      this.watcher.start();
    }
    this.manager.start();
    this.health.start(this.options.healthTickMs ?? 1000);
    if (config.notify.targets.length > 0) {
      // Leader only: its delivery state is in the shared database, and a standby has nothing to report.
      this.notifier = new Notifier({
        store: this.store,
        logger,
        metrics: this.metrics,
        targets: config.notify.targets,
        evaluationIntervalMs: config.notify.evaluationIntervalMs,
        repeatIntervalMs: config.notify.repeatIntervalMs,
        isReady: () => this.manager.isReady(),
        ...(this.address ? { externalURL: this.address } : {}),
      });
      this.notifier.start();
    }
    logger.info('polydev-reconciler started', {
      database: config.database,
      source: config.source,
      ...(this.kube ? { kubernetesNamespace: this.kube.namespace } : { desiredStateDir: config.desiredStateDir ?? null }),
      listen: this.address ?? null,
      iptablesBackend: config.iptables.backend,
      netns: config.iptables.netns ?? null,
      notifyTargets: config.notify.targets.map((t) => t.name),
      apiTokenFile: config.apiTokenFile ?? null,
      pid: process.pid,
    });
    // Without a token every mutating call answers 403: say why once, where a person looks first.
    if (this.address && !config.apiTokenFile) {
      logger.warn('no apiTokenFile is configured: the API refuses claims, releases and proxy-port changes (403) until one is set (env POLYDEV_API_TOKEN_FILE; a file with at least 16 characters)');
    }
  }

  /** Another process holds the lease now: acting on would fight it. Stop, loudly. */
  private leadershipLost(): void {
    this.fatal('lost the lease to another process; stopping', { database: this.config.database, lease: this.leaseLabel() });
  }

  /** This daemon must not act any more: stop and exit 1 (a supervisor restarts it, as a standby if others lead). */
  private fatal(message: string, meta: Record<string, unknown>): void {
    if (this.stopped || this.mustNotAct) return;
    this.mustNotAct = true;
    this.metrics.leader.set(0);
    this.logger.error(message, meta);
    this.stopActingNow();
    if (this.options.onLeadershipLost) {
      this.options.onLeadershipLost();
      return;
    }
    // Another daemon may lead already: no graceful shutdown, no waiting on slow clients.
    setTimeout(() => process.exit(1), 3000).unref();
    void this.stop().finally(() => process.exit(1));
  }

  /**
   * At once, without awaiting anything: no new reconcile starts and in-flight ones are aborted, no
   * desired state is applied, no status written, no notice sent (controller-runtime exits here).
   */
  private stopActingNow(): void {
    this.watcher?.stop();
    void this.kubeSource?.stop();
    void this.statusWriter?.stop();
    void this.notifier?.stop();
    void this.health?.stop(0);
    void this.manager?.stop(0);
  }

  waitConverged(timeoutMs: number): Promise<ConvergenceReport> {
    return this.manager.waitConverged(timeoutMs);
  }

  /**
   * The longest a clean stop() takes: in-flight reconciles get shutdownTimeout, then (source
   * kubernetes) the last status writes get STATUS_FLUSH_BUDGET_MS. A supervisor's hard-exit timer
   * must allow at least this much, or a clean stop ends as a failure.
   */
  get stopBudgetMs(): number {
    return this.config.shutdownTimeoutMs + (this.config.source === 'kubernetes' ? STATUS_FLUSH_BUDGET_MS : 0);
  }

  /** Stops taking work, lets in-flight reconciles finish (up to shutdownTimeout), persists, releases the lease. */
  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    const started = Date.now();
    this.campaign.abort();
    this.watcher?.stop();
    await this.kubeSource?.stop();
    // Health checks first: an API check waiting on a silent upstream must not hold the close.
    await Promise.all([this.health?.stop(), this.api?.close(), this.notifier?.stop()]);
    const { abandoned } = this.manager ? await this.manager.stop(this.config.shutdownTimeoutMs) : { abandoned: [] };
    await this.engines?.close();
    // After the manager, and only while still the leader: the last status writes of the stopping
    // reconciles reach the cluster (bounded; a new leader needs e.g. the ports they name).
    if (this.statusWriter && !this.mustNotAct && (this.elector?.isLeader() ?? true)) {
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([
        this.statusWriter.flush().catch(() => undefined),
        new Promise((r) => {
          timer = setTimeout(r, STATUS_FLUSH_BUDGET_MS);
        }),
      ]);
      clearTimeout(timer);
    }
    await this.statusWriter?.stop();
    this.claims?.flushLatencies();
    this.lease?.release();
    await this.elector?.release();
    this.store?.close();
    this.logger.info('polydev-reconciler stopped', { tookMs: Date.now() - started, abandoned });
  }
}
