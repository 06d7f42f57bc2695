import type { IptablesDriver } from '../drivers/iptables.js';
import type { Admission } from '../desired/apply.js';
import { loadKinds } from '../desired/kinds.js';
import { DesiredStateValidator, type SemanticCheck } from '../desired/validate.js';
import type { Metrics } from '../observability/metrics.js';
import type { Controller } from '../runtime/controller.js';
import type { Store } from '../state/store.js';
import { ProxyPoolController } from './proxypool/controller.js';
import {
  proxyPoolAdmission,
  proxyPoolDocumentsCheck,
  proxyPortAdmission,
  proxyPortDocumentsCheck,
} from './proxyport/admission.js';
import { ProxyPortController } from './proxyport/controller.js';

// The one place that knows which kinds this build handles. A kind with a CRD but no
// controller here (WarmPool, Claim, TurnServer for now) is validated and stored, and its
// status says NoController.

export const ADMISSIONS: Admission[] = [proxyPoolAdmission, proxyPortAdmission];

const SEMANTIC_CHECKS = new Map<string, SemanticCheck>([
  ['ProxyPool', proxyPoolDocumentsCheck],
  ['ProxyPort', proxyPortDocumentsCheck],
]);

export function createValidator(): DesiredStateValidator {
  return new DesiredStateValidator(loadKinds(), SEMANTIC_CHECKS);
}

export interface ControllerDeps {
  store: Store;
  iptables: IptablesDriver;
  metrics: Metrics;
}

export function createControllers(deps: ControllerDeps): { controllers: Controller[]; proxyPools: ProxyPoolController } {
  const proxyPools = new ProxyPoolController(deps.store, deps.iptables, deps.metrics);
  return { controllers: [proxyPools, new ProxyPortController(deps.store)], proxyPools };
}
