import fs from 'node:fs';
import type { NomadSettings } from '../config.js';
import { DockerEngine } from '../drivers/docker.js';
import { NomadClient, type NomadClientOptions } from '../drivers/nomad.js';
import { NomadEngine } from '../drivers/nomad-engine.js';
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
  process: { runDir: string; logDir?: string };
  nomad?: NomadSettings;
  warmPools: { parallelism: number; claimHistory: number; orphanSweepMs: number };
  /** Replaces the engines built from the settings above (tests). */
  engines?: EngineFactories;
}

export function engineFactories(deps: Pick<ControllerDeps, 'docker' | 'process' | 'nomad'>): EngineFactories {
  const factories: EngineFactories = {
    docker: () => new DockerEngine({ socketPath: deps.docker.socket, network: deps.docker.network }),
    process: () => new ProcessEngine({ runDir: deps.process.runDir, ...(deps.process.logDir ? { logDir: deps.process.logDir } : {}) }),
  };
  const nomad = deps.nomad;
  if (nomad?.address) {
    factories.nomad = () => new NomadEngine({ client: nomadClient(nomad), datacenters: nomad.datacenters, startTimeoutMs: nomad.startTimeoutMs });
  }
  return factories;
}

/** A Nomad API client from the settings; the token and TLS files are read here, when first needed. */
export function nomadClient(settings: NomadSettings): NomadClient {
  if (!settings.address) throw new Error('nomad.address is not set');
  const read = (file: string, what: string): Buffer => {
    try {
      return fs.readFileSync(file);
    } catch (err) {
      throw new Error(`nomad.${what}: cannot read ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
    }
  };
  const opts: NomadClientOptions = { address: settings.address };
  if (settings.tokenFile) opts.token = read(settings.tokenFile, 'tokenFile').toString('utf8').trim();
  if (settings.namespace) opts.namespace = settings.namespace;
  if (settings.region) opts.region = settings.region;
  const tls: NonNullable<NomadClientOptions['tls']> = {};
  if (settings.caFile) tls.ca = read(settings.caFile, 'caFile');
  if (settings.certFile) tls.cert = read(settings.certFile, 'certFile');
  if (settings.keyFile) tls.key = read(settings.keyFile, 'keyFile');
  if (settings.serverName) tls.serverName = settings.serverName;
  if (Object.keys(tls).length) opts.tls = tls;
  return new NomadClient(opts);
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
  const nomad = deps.nomad;
  const turnServers = new TurnServerController({
    store: deps.store,
    metrics: deps.metrics,
    logger: deps.logger,
    ...(nomad?.address ? { nomad: () => nomadClient(nomad) } : {}),
  });
  return { controllers: [proxyPools, new ProxyPortController(deps.store), warmPools, turnServers], proxyPools, warmPools, engines };
}
