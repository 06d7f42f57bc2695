import { AdmissionError, type Admission, type AdmittedResource } from '../../desired/apply.js';
import type { SemanticCheck } from '../../desired/validate.js';
import { PortAllocationError, PortAllocator } from '../../state/allocations.js';
import type { Store } from '../../state/store.js';
import { canonicalJson } from '../../util/canonical-json.js';
import { parseDuration } from '../../util/duration.js';
import type { ProxyPoolSpec, ProxyPortSpec } from '../proxypool/types.js';

export const DEFAULT_POOL = 'default';

export function poolOf(spec: ProxyPortSpec): string {
  return spec.pool ?? DEFAULT_POOL;
}

/**
 * What every write of a ProxyPort (YAML apply or API) must pass, inside the write transaction:
 * the pool exists, userId and pool never change, one port per user, one user per source address,
 * and the port is allocated (or the requested one checked) in the same transaction.
 */
export const proxyPortAdmission: Admission = {
  kind: 'ProxyPort',
  order: 20,
  prepare(store: Store) {
    const allocators = new Map<string, PortAllocator>();
    const pools = new Map<string, ReturnType<typeof store.getResource<ProxyPoolSpec>>>();
    const existingPort = store.stmt(
      `SELECT json_extract(spec, '$.userId') AS userId, coalesce(json_extract(spec, '$.pool'), 'default') AS pool
       FROM resources WHERE kind = 'ProxyPort' AND name = ?`,
    );
    const byUser = store.stmt(
      `SELECT name FROM resources WHERE kind = 'ProxyPort' AND json_extract(spec, '$.userId') = ? AND name != ?
       AND deletion_requested_at IS NULL LIMIT 1`,
    );
    const bySource = store.stmt(
      `SELECT name, json_extract(spec, '$.userId') AS userId, coalesce(json_extract(spec, '$.pool'), 'default') AS pool
       FROM resources WHERE kind = 'ProxyPort' AND json_extract(spec, '$.sourceIP') = ? AND name != ?
       AND deletion_requested_at IS NULL`,
    );
    return (r: AdmittedResource) => {
      const spec = r.spec as unknown as ProxyPortSpec;
      const pool = poolOf(spec);
      const existing = existingPort.get(r.name) as { userId: string; pool: string } | undefined;
      if (existing) {
        if (existing.userId !== spec.userId) {
          throw new AdmissionError(['spec', 'userId'], `userId is immutable (was ${existing.userId}); delete the ProxyPort and create a new one`);
        }
        if (existing.pool !== pool) {
          throw new AdmissionError(['spec', 'pool'], `pool is immutable (was ${existing.pool}); delete the ProxyPort and create a new one`);
        }
      }
      if (!pools.has(pool)) pools.set(pool, store.getResource<ProxyPoolSpec>('ProxyPool', pool));
      const poolRes = pools.get(pool);
      if (!poolRes || poolRes.metadata.deletionTimestamp) {
        throw new AdmissionError(['spec', 'pool'], `ProxyPool "${pool}" does not exist${poolRes ? ' (it is being deleted)' : ''}`, 'POOL_NOT_FOUND');
      }
      const other = byUser.get(spec.userId, r.name) as { name: string } | undefined;
      if (other) {
        throw new AdmissionError(['spec', 'userId'], `user ${spec.userId} already has a port (ProxyPort ${other.name})`, 'USER_HAS_PORT');
      }
      // Global, not per pool: every pool's chain is jumped to from PREROUTING, so a source
      // address in two pools would be routed by whichever jump comes first.
      const sameSource = (bySource.all(spec.sourceIP, r.name) as Array<{ name: string; userId: string; pool: string }>)[0];
      if (sameSource) {
        throw new AdmissionError(
          ['spec', 'sourceIP'],
          `sourceIP ${spec.sourceIP} is already routed for user ${sameSource.userId} (ProxyPort ${sameSource.name})`,
          'SOURCE_IN_USE',
        );
      }
      let allocator = allocators.get(pool);
      if (!allocator) {
        allocator = new PortAllocator(store, pool, poolRes.spec.portRange, parseDuration(poolRes.spec.portReuseCooldown));
        allocators.set(pool, allocator);
      }
      // A new leader in Kubernetes starts with an empty database: the port the custom resource's
      // status names is the user's port, kept unless someone else holds it by now.
      const recorded = r.recordedStatus?.port;
      if (spec.port === undefined && typeof recorded === 'number' && !existing) {
        try {
          allocator.allocate(spec.userId, r.name, recorded);
          return;
        } catch (err) {
          if (!(err instanceof PortAllocationError)) throw err;
        }
      }
      try {
        allocator.allocate(spec.userId, r.name, spec.port);
      } catch (err) {
        if (err instanceof PortAllocationError) {
          throw new AdmissionError(['spec', err.code === 'USER_HAS_PORT' ? 'userId' : 'port'], err.message, err.code);
        }
        throw err;
      }
    };
  },
};

/** Checks across the documents of one apply, before anything touches the store. */
export const proxyPortDocumentsCheck: SemanticCheck = (resources, report) => {
  const pools = new Map(
    resources.filter((r) => r.kind === 'ProxyPool').map((r) => [r.name, r.spec as unknown as ProxyPoolSpec]),
  );
  const users = new Map<string, string>();
  const sources = new Map<string, string>();
  const ports = new Map<string, string>();
  for (const r of resources) {
    if (r.kind !== 'ProxyPort') continue;
    const spec = r.spec as unknown as ProxyPortSpec;
    const pool = poolOf(spec);
    const firstUser = users.get(spec.userId);
    if (firstUser) report(r, ['spec', 'userId'], `user ${spec.userId} also has ProxyPort ${firstUser} in this apply`);
    else users.set(spec.userId, r.name);
    const sourceKey = spec.sourceIP;
    const firstSource = sources.get(sourceKey);
    if (firstSource) report(r, ['spec', 'sourceIP'], `sourceIP ${spec.sourceIP} is also used by ProxyPort ${firstSource}`);
    else sources.set(sourceKey, r.name);
    if (spec.port !== undefined) {
      const portKey = `${pool}/${spec.port}`;
      const firstPort = ports.get(portKey);
      if (firstPort) report(r, ['spec', 'port'], `port ${spec.port} is also requested by ProxyPort ${firstPort}`);
      else ports.set(portKey, r.name);
      const range = pools.get(pool)?.portRange;
      if (range && (spec.port < range.min || spec.port > range.max)) {
        report(r, ['spec', 'port'], `port ${spec.port} is outside ProxyPool ${pool}'s range ${range.min}-${range.max}`);
      }
    }
  }
};

/** Two pools must not share a chain: each pool owns its chains outright. */
export const proxyPoolDocumentsCheck: SemanticCheck = (resources, report) => {
  const owners = new Map<string, string>();
  for (const r of resources) {
    if (r.kind !== 'ProxyPool') continue;
    const chains = (r.spec as unknown as ProxyPoolSpec).chains;
    for (const [role, chain] of Object.entries(chains)) {
      const owner = owners.get(chain);
      if (owner) report(r, ['spec', 'chains', role], `chain ${chain} is already owned by ProxyPool ${owner}`);
      else owners.set(chain, r.name);
    }
  }
};

/** The store-side half of the chain rule (pools applied at different times). */
export const proxyPoolAdmission: Admission = {
  kind: 'ProxyPool',
  order: 10,
  prepare(store: Store) {
    return (r: AdmittedResource) => {
      const chains = (r.spec as unknown as ProxyPoolSpec).chains;
      for (const other of store.listResources<ProxyPoolSpec>('ProxyPool')) {
        if (other.metadata.name === r.name) continue;
        for (const [role, chain] of Object.entries(chains)) {
          if (Object.values(other.spec.chains).includes(chain)) {
            throw new AdmissionError(['spec', 'chains', role], `chain ${chain} is already owned by ProxyPool ${other.metadata.name}`, 'CHAIN_CONFLICT');
          }
        }
      }
      const existing = store.getResource<ProxyPoolSpec>('ProxyPool', r.name);
      if (existing && canonicalJson(existing.spec.chains) !== canonicalJson(chains)) {
        // Renaming chains under live rules would orphan the old ones; make it an explicit delete.
        throw new AdmissionError(['spec', 'chains'], 'chains are immutable; delete the ProxyPool and apply it again to rename them');
      }
    };
  },
};
