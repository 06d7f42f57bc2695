import type { Metrics, ResourceStatusRow } from '../observability/metrics.js';
import type { Store } from '../state/store.js';

// Gauges read from the store when /metrics is scraped, so they show what the status table says
// (including resources no run has touched since a restart, e.g. one waiting out a stored backoff)
// and cost nothing between scrapes.

/** Kinds left out of the per-resource gauges: there can be 10,000 ProxyPorts (polydev_proxy_ports counts them). */
export const PER_RESOURCE_EXCLUDED_KINDS: readonly string[] = ['ProxyPort'];

/** Phase and Ready condition of every resource, ProxyPorts excepted. */
export function resourceStatusRows(store: Store): ResourceStatusRow[] {
  const rows = store
    .stmt(
      `SELECT r.kind AS kind, r.name AS name, coalesce(s.phase, 'Pending') AS phase,
              (SELECT json_extract(c.value, '$.status') FROM json_each(s.body, '$.conditions') c
                WHERE json_extract(c.value, '$.type') = 'Ready') AS readyStatus,
              (SELECT json_extract(c.value, '$.reason') FROM json_each(s.body, '$.conditions') c
                WHERE json_extract(c.value, '$.type') = 'Ready') AS readyReason
       FROM resources r LEFT JOIN status s ON s.kind = r.kind AND s.name = r.name
       WHERE r.kind NOT IN (SELECT value FROM json_each(?))
       ORDER BY r.kind, r.name`,
    )
    .all(JSON.stringify(PER_RESOURCE_EXCLUDED_KINDS)) as Array<{
    kind: string;
    name: string;
    phase: string;
    readyStatus: string | null;
    readyReason: string | null;
  }>;
  return rows.map((r) => ({
    kind: r.kind,
    name: r.name,
    phase: r.phase,
    ready: r.readyStatus === 'True',
    reason: r.readyReason ?? 'NotReconciled',
  }));
}

/** spec.size and spec.maxSize of every WarmPool (being deleted or not). */
export function warmPoolSizes(store: Store): Array<{ pool: string; size: number; maxSize: number }> {
  return store
    .stmt(
      `SELECT name AS pool, coalesce(json_extract(spec, '$.size'), 0) AS size, coalesce(json_extract(spec, '$.maxSize'), 0) AS maxSize
       FROM resources WHERE kind = 'WarmPool' ORDER BY name`,
    )
    .all() as Array<{ pool: string; size: number; maxSize: number }>;
}

/** Points the scrape-time gauges at the store (a closed store reads as empty: the daemon is stopping). */
export function wireStatusMetrics(metrics: Metrics, store: Store): void {
  metrics.describeResourcesWith(() => (store.db.open ? resourceStatusRows(store) : []));
  metrics.sizeWarmPoolsWith(() => (store.db.open ? warmPoolSizes(store) : []));
}
