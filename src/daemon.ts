import fs from 'node:fs';
import type { FastifyInstance } from 'fastify';
import { buildApi } from './api/server.js';
import type { Config } from './config.js';
import { ProxyHealthChecker } from './controllers/proxyport/health.js';
import { ADMISSIONS, createControllers, createValidator } from './controllers/registry.js';
import { ClaimService } from './controllers/warmpool/claims.js';
import type { EngineFactories, EngineSet } from './controllers/warmpool/engines.js';
import { memberCountsByPool } from './state/pools.js';
import { DesiredStateDirWatcher } from './desired/dir-watcher.js';
import { IptablesDriver, runProcess, findExecutable } from './drivers/iptables.js';
import { createLogger, type Logger } from './observability/logger.js';
import { Metrics } from './observability/metrics.js';
import { Manager, type ConvergenceReport } from './runtime/manager.js';
import { Lease } from './state/lease.js';
import { Store } from './state/store.js';

export interface DaemonOptions {
  logger?: Logger;
  /** Skip the HTTP listener (run --once does not need it). */
  serveApi?: boolean;
  /** Health-check tick; tests shorten it. */
  healthTickMs?: number;
  /** Engines to use instead of those the config describes (tests). */
  engines?: EngineFactories;
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
  if (fs.existsSync(`/run/netns/${name}`)) return;
  const ip = findExecutable('ip');
  if (!ip) throw new Error('iptables.createNetns needs the `ip` command (iproute2)');
  for (const args of [['netns', 'add', name], ['netns', 'exec', name, ip, 'link', 'set', 'lo', 'up']]) {
    const r = await runProcess(ip, args, null, 10_000);
    if (r.exitCode !== 0) throw new Error(`ip ${args.join(' ')} failed: ${r.stderr.trim() || `exit ${r.exitCode}`}`);
  }
  logger.info('created network namespace for iptables', { netns: name });
}

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
  private watcher: DesiredStateDirWatcher | undefined;
  private stopped = false;

  constructor(
    readonly config: Config,
    private readonly options: DaemonOptions = {},
  ) {
    this.logger = options.logger ?? createLogger(config.logLevel);
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
      this.lease = new Lease(this.store, 'daemon', 15_000, () => {
        // Another process holds the database now: acting on would fight it. Stop, loudly.
        this.logger.error('lost the database lease to another process; stopping', { database: config.database });
        void this.stop().finally(() => process.exit(1));
      });
      this.lease.acquire();
    } catch (err) {
      this.store.close();
      throw err;
    }
    this.store.checkpointInBackground({
      intervalMs: 1000,
      onError: (message) => logger.warn('background WAL checkpoints stopped; SQLite checkpoints on commit again', { error: message }),
    });
    if (config.iptables.netns && config.iptables.createNetns) await ensureNetns(config.iptables.netns, logger);
    this.iptables = new IptablesDriver({ backend: config.iptables.backend, ...(config.iptables.netns ? { netns: config.iptables.netns } : {}) });
    const validator = createValidator();
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
    });
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
      this.api = buildApi({ store: this.store, validator, metrics: this.metrics, logger, manager: this.manager, health: this.health, claims: this.claims, token });
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
    if (config.desiredStateDir) {
      this.watcher = new DesiredStateDirWatcher({
        dir: config.desiredStateDir,
        store: this.store,
        validator,
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
    logger.info('polydev-reconciler started', {
      database: config.database,
      desiredStateDir: config.desiredStateDir ?? null,
      listen: this.address ?? null,
      iptablesBackend: config.iptables.backend,
      netns: config.iptables.netns ?? null,
      pid: process.pid,
    });
  }

  waitConverged(timeoutMs: number): Promise<ConvergenceReport> {
    return this.manager.waitConverged(timeoutMs);
  }

  /** Stops taking work, lets in-flight reconciles finish (up to shutdownTimeout), persists, releases the lease. */
  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    const started = Date.now();
    this.watcher?.stop();
    // Health checks first: an API check waiting on a silent upstream must not hold the close.
    await Promise.all([this.health?.stop(), this.api?.close()]);
    const { abandoned } = this.manager ? await this.manager.stop(this.config.shutdownTimeoutMs) : { abandoned: [] };
    await this.engines?.close();
    this.claims?.flushLatencies();
    this.lease?.release();
    this.store?.close();
    this.logger.info('polydev-reconciler stopped', { tookMs: Date.now() - started, abandoned });
  }
}
