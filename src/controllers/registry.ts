import { DockerEngine } from '../drivers/docker.js';
import type { IptablesDriver } from '../drivers/iptables.js';
import { ProcessEngine } from '../drivers/process.js';
import type { Admission } from '../desired/apply.js';
import { loadKinds } from '../desired/kinds.js';
import { DesiredStateValidator, type SemanticCheck } from '../desired/validate.js';
import type { Logger } from '../observability/logger.js';
import type { Metrics } from '../observability/metrics.js';
import type { Controller } from '../runtime/controller.js';
import { installationId } from '../state/pools.js';
import type { Store } from '../state/store.js';
import { ProxyPoolController } from './proxypool/controller.js';
import {
  proxyPoolAdmission,
  proxyPoolDocumentsCheck,
  proxyPortAdmission,
  proxyPortDocumentsCheck,
} from './proxyport/admission.js';
import { ProxyPortController } from './proxyport/controller.js';
import { turnServerDocumentsCheck } from './turnserver/admission.js';
import { TurnServerController } from './turnserver/controller.js';
import { claimDocumentsCheck } from './warmpool/admission.js';
import { WarmPoolController } from './warmpool/controller.js';
import { EngineSet, type EngineFactories } from './warmpool/engines.js';

// The one place that knows which kinds this build handles. A kind with a CRD but no
// controller here would be validated and stored, and its status would say NoController.

export const ADMISSIONS: Admission[] = [proxyPoolAdmission, proxyPortAdmission];

const SEMANTIC_CHECKS = new Map<string, SemanticCheck>([
  ['ProxyPool', proxyPoolDocumentsCheck],
  ['ProxyPort', proxyPortDocumentsCheck],
  ['Claim', claimDocumentsCheck],
  ['TurnServer', turnServerDocumentsCheck],
]);

export function createValidator(): DesiredStateValidator {
  return new DesiredStateValidator(loadKinds(), SEMANTIC_CHECKS);
}

export interface ControllerDeps {
  store: Store;
  iptables: IptablesDriver;
  metrics: Metrics;
  logger: Logger;
  docker: { socket: string; network: string };
  process: { runDir: string };
  warmPools: { parallelism: number; claimHistory: number; orphanSweepMs: number };
  /** Replaces the engines built from the settings above (tests). */
  engines?: EngineFactories;
}

export function engineFactories(deps: Pick<ControllerDeps, 'docker' | 'process'>): EngineFactories {
  return {
    docker: () => new DockerEngine({ socketPath: deps.docker.socket, network: deps.docker.network }),
    process: () => new ProcessEngine({ runDir: deps.process.runDir }),
  };
}

export function createControllers(deps: ControllerDeps): {
  controllers: Controller[];
  proxyPools: ProxyPoolController;
  warmPools: WarmPoolController;
  engines: EngineSet;
} {
  const proxyPools = new ProxyPoolController(deps.store, deps.iptables, deps.metrics);
  const engines = new EngineSet(deps.engines ?? engineFactories(deps), deps.metrics);
  const warmPools = new WarmPoolController({
    store: deps.store,
    engines,
    logger: deps.logger,
    owner: installationId(deps.store),
    parallelism: deps.warmPools.parallelism,
    orphanSweepMs: deps.warmPools.orphanSweepMs,
    claimHistory: deps.warmPools.claimHistory,
  });
  const turnServers = new TurnServerController({ store: deps.store, metrics: deps.metrics, logger: deps.logger });
  return { controllers: [proxyPools, new ProxyPortController(deps.store), warmPools, turnServers], proxyPools, warmPools, engines };
}
