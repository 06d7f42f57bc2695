// Reads what the alert rules need from the store, in a few aggregate queries: there may be
// 10,000 ProxyPorts, and the notifier runs every evaluation interval on the daemon's connection.

import type { Store } from '../state/store.js';
import type { AlertInputs, ConditionState, ResourceState } from './rules.js';

/** Resources read per evaluation at most (rules.ts caps the alerts again). */
export const MAX_RESOURCE_ROWS = 20_000;

interface ResourceRow {
  kind: string;
  name: string;
  phase: string;
  conditions: string | null;
  lastDriftAt: string | null;
  healthy: number | null;
}

function conditionsOf(text: string | null): ConditionState[] {
  if (!text) return [];
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    return [];
  }
  if (!Array.isArray(parsed)) return [];
  const out: ConditionState[] = [];
  for (const c of parsed) {
    if (c === null || typeof c !== 'object') continue;
    const o = c as Record<string, unknown>;
    out.push({
      type: String(o.type ?? ''),
      status: String(o.status ?? ''),
      reason: String(o.reason ?? ''),
      lastTransitionTime: typeof o.lastTransitionTime === 'string' ? o.lastTransitionTime : null,
    });
  }
  return out;
}

/** The store's part of the rules' inputs (readiness and reconcile rates come from the daemon). */
export function readStoreInputs(store: Store): Omit<AlertInputs, 'ready' | 'reconcileErrorRatios'> {
  // Only statuses some rule can match: failing or drifted resources of any kind, and every
  // WarmPool and TurnServer (their alerts depend on the Ready reason and status.healthy).
  const rows = store
    .stmt(
      `SELECT r.kind AS kind, r.name AS name, s.phase AS phase,
              json_extract(s.body, '$.conditions') AS conditions,
              json_extract(s.body, '$.lastDriftAt') AS lastDriftAt,
              CASE WHEN r.kind = 'TurnServer' THEN json_extract(s.body, '$.healthy') END AS healthy
       FROM resources r JOIN status s ON s.kind = r.kind AND s.name = r.name
       WHERE s.phase IN ('Drifted', 'Backoff', 'Degraded', 'TerminatingBackoff') OR r.kind IN ('WarmPool', 'TurnServer')
       ORDER BY r.kind, r.name LIMIT ?`,
    )
    .all(MAX_RESOURCE_ROWS) as ResourceRow[];
  const resources: ResourceState[] = rows.map((r) => ({
    kind: r.kind,
    name: r.name,
    phase: r.phase,
    conditions: conditionsOf(r.conditions),
    lastDriftAt: typeof r.lastDriftAt === 'string' ? r.lastDriftAt : null,
    healthy: r.healthy === null || r.healthy === undefined ? null : r.healthy === 1,
  }));

  const warmPools = store
    .stmt(
      `SELECT r.name AS pool, coalesce(json_extract(r.spec, '$.size'), 0) AS size,
              (SELECT count(*) FROM pool_members m WHERE m.pool = r.name AND m.state = 'warm') AS warm
       FROM resources r WHERE r.kind = 'WarmPool' ORDER BY r.name`,
    )
    .all() as Array<{ pool: string; size: number; warm: number }>;

  // What polydev_proxy_ports{state=healthy|unhealthy} counts: each port's last known health.
  const ports = store
    .stmt(
      `SELECT coalesce(sum(json_extract(s.body, '$.health.healthy') = 1), 0) AS healthy,
              coalesce(sum(json_extract(s.body, '$.health.healthy') = 0), 0) AS unhealthy
       FROM resources r JOIN status s ON s.kind = r.kind AND s.name = r.name WHERE r.kind = 'ProxyPort'`,
    )
    .get() as { healthy: number; unhealthy: number };

  return {
    resources,
    warmPools: warmPools.map((p) => ({ pool: p.pool, size: Number(p.size) || 0, warm: Number(p.warm) || 0 })),
    proxyPorts: { healthy: Number(ports.healthy) || 0, unhealthy: Number(ports.unhealthy) || 0 },
  };
}
