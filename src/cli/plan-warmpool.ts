// `plan warmpool [NAME]`: the store against the live engine, what a reconcile would do now,
// and for the nomad engine the job each start would register.

import type { Config } from '../config.js';
import { engineFactories } from '../controllers/registry.js';
import { WarmPoolController } from '../controllers/warmpool/controller.js';
import { EngineSet } from '../controllers/warmpool/engines.js';
import { describeAction } from '../controllers/warmpool/types.js';
import { renderNomadJob } from '../drivers/nomad-engine.js';
import { silentLogger } from '../observability/logger.js';
import { Metrics } from '../observability/metrics.js';
import { installationId } from '../state/pools.js';
import type { Store } from '../state/store.js';
import { CliError, EXIT, type Io } from './errors.js';
import { printPlan } from './plan.js';

/** Prints each pool's plan; returns how many changes there are (a pool it cannot observe throws). */
export async function planWarmPools(store: Store, cfg: Config, name: string | undefined, io: Io): Promise<number> {
  let pools = store.listResources('WarmPool');
  if (name) {
    pools = pools.filter((p) => p.metadata.name === name);
    if (pools.length === 0) throw new CliError(`WarmPool "${name}" not found`, EXIT.PROBLEMS);
  }
  const engines = new EngineSet(engineFactories({ docker: cfg.docker, process: cfg.process, nomad: cfg.nomad }), new Metrics({ processMetrics: false }));
  const controller = new WarmPoolController({
    store,
    engines,
    logger: silentLogger(),
    owner: installationId(store),
    parallelism: cfg.warmPools.parallelism,
    orphanSweepMs: cfg.resyncIntervalMs,
    claimHistory: cfg.warmPools.claimHistory,
  });
  let changes = 0;
  try {
    for (const resource of pools) {
      const d = controller.desired(resource);
      let actions;
      try {
        actions = controller.plan(d, await controller.observe(d));
      } catch (err) {
        throw new CliError(`WarmPool/${d.name}: cannot observe the ${d.spec.engine} engine: ${(err as Error).message}`);
      }
      changes += actions.length;
      // Identical actions once, counted: a pool short of ten containers says "start 10 warm containers".
      printPlan(io, `WarmPool/${d.name}`, actions.map(describeAction), (line, count) =>
        line === describeAction({ type: 'start' }) ? `start ${count} warm containers` : `${line} (${count} times)`,
      );
      if (d.spec.engine === 'nomad' && actions.some((a) => a.type === 'start')) {
        const job = renderNomadJob(controller.containerSpec(d, controller.newSlot(d)), { datacenters: cfg.nomad.datacenters });
        io.out('  each start registers one Nomad job like this (its own slot and ID):');
        for (const line of JSON.stringify({ Job: job }, null, 2).split('\n')) io.out(`    ${line}`);
      }
    }
  } finally {
    await controller.stop();
    await engines.close();
  }
  return changes;
}
