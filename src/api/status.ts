// The summary behind the status page (GET /api/v1/status): every resource with its phase,
// conditions, last drift and a few kind-specific figures, open claims and recent events.
//
// Built from the store only, and from an allow-list of fields: specs are NOT copied (a
// WarmPool's env, a ProxyPool's credentialsFile, a TurnServer's auth files must never reach a
// browser), nor labels or annotations. What a kind contributes is spelt out below, field by field.

import { claimHistory, listClaims, memberCounts } from '../state/pools.js';
import type { Store } from '../state/store.js';
import type { Condition, StoredEvent, StoredResource } from '../state/types.js';

/** Rows per kind at most (a ProxyPool may have 10,000 ports; the page polls every 2 s). */
export const MAX_PER_KIND = 500;
export const MAX_EVENTS = 50;
export const MAX_CLAIMS = 100;

export interface StatusCondition {
  type: string;
  status: string;
  reason: string;
  message: string;
  lastTransitionTime: string | null;
}

export interface StatusDrift {
  at: string;
  /** What drifted: the message of the latest DriftDetected event, when it is still kept. */
  message: string | null;
}

export interface StatusResource {
  kind: string;
  name: string;
  phase: string;
  generation: number;
  observedGeneration: number | null;
  deleting: boolean;
  conditions: StatusCondition[];
  lastDrift: StatusDrift | null;
  /** Kind-specific figures (WarmPool fill, ProxyPool/ProxyPort health, TurnServer probes). */
  details: Record<string, unknown>;
}

export interface StatusEvent {
  time: string;
  kind: string;
  name: string;
  type: string;
  reason: string;
  message: string;
  count: number;
}

export interface StatusClaim {
  id: string;
  pool: string;
  userId: string;
  phase: string;
  warm: boolean;
  createdAt: string;
  expiresAt: string;
}

export interface StatusSummary {
  generatedAt: string;
  ready: boolean;
  /** Resources per kind (all of them, also those beyond MAX_PER_KIND). */
  totals: Record<string, number>;
  /** Kinds whose list was cut at MAX_PER_KIND. */
  truncated: Record<string, number>;
  resources: StatusResource[];
  claims: { open: number; items: StatusClaim[] };
  events: StatusEvent[];
}

const num = (v: unknown): number | null => (typeof v === 'number' && Number.isFinite(v) ? v : null);
const str = (v: unknown): string | null => (typeof v === 'string' ? v : null);
const bool = (v: unknown): boolean | null => (typeof v === 'boolean' ? v : null);
const obj = (v: unknown): Record<string, unknown> =>
  v !== null && typeof v === 'object' && !Array.isArray(v) ? (v as Record<string, unknown>) : {};

function condition(c: Condition): StatusCondition {
  return {
    type: String(c.type),
    status: String(c.status),
    reason: String(c.reason ?? ''),
    message: String(c.message ?? ''),
    lastTransitionTime: str(c.lastTransitionTime),
  };
}

/** The latest DriftDetected event per resource (one scan of the events table; it keeps at most eventRetention rows). */
function latestDrifts(store: Store): Map<string, { at: string; message: string }> {
  const rows = store
    .stmt(
      `SELECT e.kind AS kind, e.name AS name, e.last_time AS at, e.message AS message FROM events e
       JOIN (SELECT max(id) AS id FROM events WHERE reason = 'DriftDetected' GROUP BY kind, name) m ON m.id = e.id`,
    )
    .all() as Array<{ kind: string; name: string; at: string; message: string }>;
  return new Map(rows.map((r) => [`${r.kind}/${r.name}`, { at: r.at, message: r.message }]));
}

function lastDrift(r: StoredResource, drifts: Map<string, { at: string; message: string }>): StatusDrift | null {
  const at = str(r.status?.lastDriftAt);
  const ev = drifts.get(`${r.kind}/${r.metadata.name}`);
  if (!at && !ev) return null;
  // lastDriftAt is written in the same transaction as the event; an older event belongs to an older drift.
  if (at && ev && ev.at < at) return { at, message: null };
  return { at: at ?? ev!.at, message: ev?.message ?? null };
}

interface PortHealth {
  healthy: number;
  unhealthy: number;
  unchecked: number;
  latencies: number[];
}

function latencySummary(lat: number[]): { p50: number | null; max: number | null } {
  if (lat.length === 0) return { p50: null, max: null };
  const s = [...lat].sort((a, b) => a - b);
  return { p50: s[Math.ceil(0.5 * s.length) - 1]!, max: s[s.length - 1]! };
}

function portHealth(status: Record<string, unknown>): { healthy: boolean | null; latencyMs: number | null } {
  const h = obj(status.health);
  return { healthy: bool(h.healthy), latencyMs: num(h.latencyMs) };
}

function details(store: Store, r: StoredResource, ports: Map<string, PortHealth>): Record<string, unknown> {
  const spec = obj(r.spec);
  const status = obj(r.status);
  switch (r.kind) {
    case 'WarmPool': {
      const live = memberCounts(store, r.metadata.name);
      const history = claimHistory(store, r.metadata.name);
      return {
        engine: str(spec.engine),
        provider: str(spec.provider),
        size: num(spec.size),
        maxSize: num(spec.maxSize),
        warm: live.warm,
        starting: live.starting,
        claimed: live.claimed,
        releasing: live.releasing,
        failed: num(status.failed) ?? 0,
        claimsServed: history.served,
        claimLatencyMs: { p50: history.p50Ms, p99: history.p99Ms },
        lastError: str(status.lastError),
      };
    }
    case 'ProxyPool': {
      const counts = obj(status.ports);
      const h = ports.get(r.metadata.name) ?? { healthy: 0, unhealthy: 0, unchecked: 0, latencies: [] };
      return {
        // The host only: never upstream.credentialsFile.
        upstream: str(obj(spec.upstream).host),
        upstreamIP: str(status.upstreamIP),
        ports: {
          total: num(counts.total),
          programmed: num(counts.programmed),
          healthy: h.healthy,
          unhealthy: h.unhealthy,
          unchecked: h.unchecked,
        },
        healthCheck: spec.healthCheck !== undefined,
        latencyMs: latencySummary(h.latencies),
        lastSyncAt: str(status.lastSyncAt),
      };
    }
    case 'ProxyPort': {
      const h = obj(status.health);
      return {
        userId: str(spec.userId),
        port: num(status.port) ?? num(spec.port),
        pool: str(status.pool) ?? str(spec.pool) ?? 'default',
        rulePresent: bool(status.rulePresent),
        healthy: bool(h.healthy),
        latencyMs: num(h.latencyMs),
        egressIP: str(h.egressIP),
        lastVerifiedAt: str(h.lastVerifiedAt),
        error: str(h.error),
      };
    }
    case 'TurnServer': {
      const p = obj(status.lastProbe);
      const transports = Array.isArray(p.transports) ? p.transports.map(obj) : [];
      return {
        host: str(spec.host),
        healthy: bool(status.healthy),
        consecutiveFailures: num(status.consecutiveFailures),
        restarts: num(status.restarts),
        lastRestartAt: str(status.lastRestartAt),
        lastProbe: Object.keys(p).length === 0 ? null : {
          at: str(p.at),
          reachable: bool(p.reachable),
          bindingLatencyMs: num(p.bindingLatencyMs),
          allocationLatencyMs: num(p.allocationLatencyMs),
          errorClass: str(p.errorClass),
          error: str(p.error),
          transports: transports.map((t) => ({
            transport: str(t.transport),
            reachable: bool(t.reachable),
            bindingLatencyMs: num(t.bindingLatencyMs),
            allocationLatencyMs: num(t.allocationLatencyMs),
            errorClass: str(t.errorClass),
          })),
        },
      };
    }
    case 'Claim':
      return { pool: str(spec.pool), userId: str(spec.userId) };
    default:
      return {};
  }
}

const CLAIM_PHASE = { pending: 'Pending', bound: 'Bound', released: 'Released', expired: 'Expired', failed: 'Failed' } as const;

export function buildStatusSummary(store: Store, opts: { ready: boolean; now?: Date }): StatusSummary {
  const all = store.listResources();
  const drifts = latestDrifts(store);

  // Port health per pool, over every port (not only those listed).
  const ports = new Map<string, PortHealth>();
  for (const r of all) {
    if (r.kind !== 'ProxyPort') continue;
    const pool = str(obj(r.status).pool) ?? str(obj(r.spec).pool) ?? 'default';
    const h = ports.get(pool) ?? { healthy: 0, unhealthy: 0, unchecked: 0, latencies: [] };
    const { healthy, latencyMs } = portHealth(obj(r.status));
    if (healthy === true) h.healthy++;
    else if (healthy === false) h.unhealthy++;
    else h.unchecked++;
    if (latencyMs !== null) h.latencies.push(latencyMs);
    ports.set(pool, h);
  }

  const totals: Record<string, number> = {};
  const truncated: Record<string, number> = {};
  const resources: StatusResource[] = [];
  for (const r of all) {
    const n = (totals[r.kind] = (totals[r.kind] ?? 0) + 1);
    if (n > MAX_PER_KIND) {
      truncated[r.kind] = n - MAX_PER_KIND;
      continue;
    }
    const status = r.status;
    resources.push({
      kind: r.kind,
      name: r.metadata.name,
      phase: str(status?.phase) ?? 'Pending',
      generation: r.metadata.generation,
      observedGeneration: num(status?.observedGeneration),
      deleting: r.metadata.deletionTimestamp !== undefined,
      conditions: Array.isArray(status?.conditions) ? status.conditions.map(condition) : [],
      lastDrift: lastDrift(r, drifts),
      details: details(store, r, ports),
    });
  }

  const iso = (ms: number) => new Date(ms).toISOString();
  const openCount = (store.stmt(`SELECT count(*) AS n FROM claims WHERE state IN ('pending', 'bound')`).get() as { n: number }).n;
  const claims: StatusClaim[] = listClaims(store, { state: 'open', limit: MAX_CLAIMS }).map((c) => ({
    id: c.id,
    pool: c.pool,
    userId: c.userId,
    phase: CLAIM_PHASE[c.state],
    warm: c.warm,
    createdAt: iso(c.createdAt),
    expiresAt: iso(c.expiresAt),
  }));

  // Newest first.
  const events = store.listEvents({ limit: MAX_EVENTS }).reverse().map((e: StoredEvent) => ({
    time: e.lastTimestamp,
    kind: e.kind,
    name: e.name,
    type: e.type,
    reason: e.reason,
    message: e.message,
    count: e.count,
  }));

  return {
    generatedAt: (opts.now ?? new Date()).toISOString(),
    ready: opts.ready,
    totals,
    truncated,
    resources,
    claims: { open: openCount, items: claims },
    events,
  };
}
