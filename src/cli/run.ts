// `run`: the daemon, until SIGTERM/SIGINT; `run --once`: reconcile until converged, then exit.

import type { Config } from '../config.js';
import type { CliContext } from './context.js';
import type { Store } from '../state/store.js';
import { EXIT } from './errors.js';

export interface RunOptions {
  once?: boolean;
  source?: string;
  leaderElect?: boolean;
}

export async function run(ctx: CliContext, opts: RunOptions): Promise<number> {
  const cfg = await ctx.settings({
    ...(opts.source !== undefined ? { source: opts.source } : {}),
    ...(opts.leaderElect ? { 'leaderElection.enabled': 'true' } : {}),
  });
  // A one-shot run never waits for a lease: it acts now or refuses because a daemon is running.
  if (opts.once) return runOnce({ ...cfg, leaderElection: { ...cfg.leaderElection, enabled: false } }, ctx);
  return runForever(cfg);
}

/**
 * Exit 0: converged, and the desired-state directory (if any) was applied. Exit 1: not converged
 * within onceTimeout, or the directory was rejected (the daemon then keeps the last good state,
 * which this run still reconciles, but a script must not take that for success).
 */
async function runOnce(cfg: Config, ctx: CliContext): Promise<number> {
  const [{ Daemon }, { createLogger }, { formatDuration }] = await Promise.all([
    import('../daemon.js'),
    import('../observability/logger.js'),
    import('../util/duration.js'),
  ]);
  const { io } = ctx;
  const daemon = new Daemon(cfg, { serveApi: false, logger: createLogger(cfg.logLevel, 'stderr', cfg.logFormat) });
  await daemon.start();
  try {
    const report = await daemon.waitConverged(cfg.onceTimeoutMs);
    const rejected = await desiredStateProblems(cfg, daemon.store, ctx);
    if (rejected.length > 0) {
      io.err(`error: the desired state in ${cfg.desiredStateDir} was rejected, nothing of it was applied:`);
      for (const line of rejected) io.err(`  ${line}`);
    }
    if (report.converged) {
      io.out(`converged: ${daemon.store.listKeys().length} resource(s)${rejected.length > 0 ? ' (the last good desired state)' : ''}`);
      return rejected.length > 0 ? EXIT.PROBLEMS : EXIT.OK;
    }
    io.out(`not converged after ${formatDuration(cfg.onceTimeoutMs)}:`);
    for (const p of report.pending) io.out(`  ${p.kind}/${p.name}: ${p.phase}: ${p.reason}`);
    return EXIT.PROBLEMS;
  } finally {
    await daemon.stop();
  }
}

/**
 * Why the daemon refused its desiredStateDir, if it did. The daemon's watcher applied the
 * directory at start; checking it again with the same code (applyPath, dry run, with prune as the
 * watcher applies it) against the store it left gives the same verdict: a rejected apply changed
 * nothing, an accepted one makes the check find everything unchanged.
 */
async function desiredStateProblems(cfg: Config, store: Store, ctx: CliContext): Promise<string[]> {
  if (cfg.source !== 'files' || cfg.desiredStateDir === undefined) return [];
  const [validator, { applyPath }, { ADMISSIONS }, { formatProblem }] = await Promise.all([
    ctx.validator(),
    import('../desired/apply.js'),
    import('../controllers/registry.js'),
    import('../desired/validate.js'),
  ]);
  const result = applyPath(store, validator, ADMISSIONS, cfg.desiredStateDir, { prune: true, dryRun: true, maxPrune: cfg.maxPrune, source: 'apply' });
  return result.ok ? [] : result.problems.map(formatProblem);
}

async function runForever(cfg: Config): Promise<number> {
  const { Daemon } = await import('../daemon.js');
  const daemon = new Daemon(cfg);
  await daemon.start();
  return new Promise<number>((resolve) => {
    let stopping = false;
    const onSignal = (signal: NodeJS.Signals) => {
      if (stopping) return;
      stopping = true;
      daemon.logger.info('shutting down', { signal });
      // A second signal, or a shutdown that hangs, must still end the process: after the longest a
      // clean stop can take (shutdownTimeout, plus the status flush with source kubernetes) and a margin.
      const hard = setTimeout(() => process.exit(EXIT.PROBLEMS), daemon.stopBudgetMs + 1500);
      hard.unref();
      void daemon.stop().then(
        () => resolve(EXIT.OK),
        (err: Error) => {
          daemon.logger.error('shutdown failed', { error: err.message });
          resolve(EXIT.PROBLEMS);
        },
      );
    };
    process.once('SIGTERM', onSignal);
    process.once('SIGINT', onSignal);
  });
}
