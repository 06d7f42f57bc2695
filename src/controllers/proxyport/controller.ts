import type { ControllerContext, SimpleController } from '../../runtime/controller.js';
import { releasePort } from '../../state/allocations.js';
import type { Store } from '../../state/store.js';
import { setCondition } from '../../state/types.js';
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

  /** Only ports without an existing pool (or being deleted without one) need their own key. */
  resyncNames(): string[] {
    return (
      this.store
        .stmt(
          `SELECT r.name AS name FROM resources r WHERE r.kind = 'ProxyPort' AND NOT EXISTS (
             SELECT 1 FROM resources p WHERE p.kind = 'ProxyPool'
             AND p.name = coalesce(json_extract(r.spec, '$.pool'), 'default'))`,
        )
        .all() as Array<{ name: string }>
    ).map((r) => r.name);
  }

  async reconcile(name: string, ctx: ControllerContext): Promise<void> {
    // The common case (the pool exists) needs two index look-ups, not the whole resource:
    // a start-up sync of 10,000 ports passes through here 10,000 times.
    const ref = this.store
      .stmt(
        `SELECT coalesce(json_extract(r.spec, '$.pool'), 'default') AS pool,
                EXISTS (SELECT 1 FROM resources p WHERE p.kind = 'ProxyPool'
                        AND p.name = coalesce(json_extract(r.spec, '$.pool'), 'default')) AS poolExists
         FROM resources r WHERE r.kind = 'ProxyPort' AND r.name = ?`,
      )
      .get(name) as { pool: string; poolExists: number } | undefined;
    if (!ref) return;
    if (ref.poolExists) {
      ctx.enqueue('ProxyPool', ref.pool);
      return;
    }
    const res = this.store.getResource<ProxyPortSpec>('ProxyPort', name);
    if (!res) return;
    const pool = poolOf(res.spec);
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
}
