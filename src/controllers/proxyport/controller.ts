import type { ControllerContext, SimpleController } from '../../runtime/controller.js';
import { releasePort } from '../../state/allocations.js';
import type { Store } from '../../state/store.js';
import { setCondition, type StoredResource } from '../../state/types.js';
import type { ProxyPortSpec } from '../proxypool/types.js';
import { poolOf } from './admission.js';

/**
 * ProxyPorts converge through their pool (one iptables pass for all users). This controller
 * only covers a port whose pool is missing: it reports that, and finalizes a deleted port
 * that no pool can own a rule for.
 */
export class ProxyPortController implements SimpleController {
  readonly kind = 'ProxyPort';

  constructor(private readonly store: Store) {}

  async reconcile(name: string, ctx: ControllerContext): Promise<void> {
    const res = this.store.getResource<ProxyPortSpec>('ProxyPort', name);
    if (!res) return;
    const pool = poolOf(res.spec);
    if (this.store.getResource('ProxyPool', pool)) {
      ctx.enqueue('ProxyPool', pool);
      return;
    }
    this.store.transaction(() => {
      if (res.metadata.deletionTimestamp) {
        releasePort(this.store, res.spec.userId, name);
        this.store.removeResource('ProxyPort', name);
        return;
      }
      const conditions = setCondition(res.status?.conditions ?? [], {
        type: 'Ready',
        status: 'False',
        reason: 'PoolNotFound',
        message: `ProxyPool ${pool} does not exist`,
        observedGeneration: res.metadata.generation,
      }, new Date().toISOString());
      if (this.store.setStatus('ProxyPort', name, { ...(res.status ?? {}), phase: 'Pending', conditions, rulePresent: false })) {
        ctx.recorder.record('ProxyPort', name, 'Warning', 'PoolNotFound', `ProxyPool ${pool} does not exist`);
      }
    });
  }

  converged(resource: StoredResource): boolean {
    return resource.status?.phase === 'Ready' && resource.status.observedGeneration === resource.metadata.generation;
  }
}
