// The notifier's memory in SQLite (migration 4): which alerts are active since when, and what
// each target is owed. Every change is one store.transaction, so a crash between two leaves
// either the old or the new state, never half of one.

import type { Store } from '../state/store.js';
import type { EvaluatedAlert } from './rules.js';
import type { NoticeAlert, NoticeStatus } from './payloads.js';

interface AlertRow {
  fingerprint: string;
  firing: number;
  resolved_at: number | null;
}

interface DeliveryRow {
  fingerprint: string;
  status: NoticeStatus;
  notified: number;
  due: number;
  sent_at: number | null;
}

/** A notice waiting for a target, with what the message needs. */
export interface DueNotice extends NoticeAlert {
  alertname: string;
  attempts: number;
  firstAttemptAt: number | null;
}

/** activeAt of every alert active at the last evaluation (for `for` to carry on). */
export function loadActiveAt(store: Store): Map<string, number> {
  const rows = store.stmt('SELECT fingerprint, active_at FROM notify_alerts WHERE resolved_at IS NULL').all() as Array<{
    fingerprint: string;
    active_at: number;
  }>;
  return new Map(rows.map((r) => [r.fingerprint, r.active_at]));
}

/** Deliveries to targets no longer configured (their resolves can never be sent). */
export function forgetTargets(store: Store, keep: readonly string[]): number {
  return store.transaction(() => {
    const info = store.stmt('DELETE FROM notify_deliveries WHERE target NOT IN (SELECT value FROM json_each(?))').run(JSON.stringify(keep));
    deleteSettledAlerts(store);
    return info.changes;
  });
}

function deleteSettledAlerts(store: Store): void {
  store.stmt(
    `DELETE FROM notify_alerts WHERE resolved_at IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM notify_deliveries d WHERE d.fingerprint = notify_alerts.fingerprint)`,
  ).run();
}

export interface ApplyResult {
  /** Alerts that fired for the first time at this evaluation. */
  fired: number;
  /** Alerts that cleared after having fired. */
  resolved: number;
}

/**
 * Records one evaluation: active alerts are upserted; a firing alert owes each target a notice
 * when it has none (or when repeatIntervalMs passed since the last); an alert that fired and is
 * gone owes a resolve to each target that may have heard of it; a pending one that is gone is forgotten.
 */
export function applyEvaluation(
  store: Store,
  alerts: readonly EvaluatedAlert[],
  opts: { now: number; targets: readonly string[]; repeatIntervalMs: number },
): ApplyResult {
  const { now, targets, repeatIntervalMs } = opts;
  return store.transaction(() => {
    const result: ApplyResult = { fired: 0, resolved: 0 };
    const before = new Map(
      (store.stmt('SELECT fingerprint, firing, resolved_at FROM notify_alerts').all() as AlertRow[]).map((r) => [r.fingerprint, r]),
    );
    const upsert = store.stmt(
      `INSERT INTO notify_alerts (fingerprint, alertname, labels, annotations, active_at, starts_at, firing, resolved_at)
       VALUES (?, ?, ?, ?, ?, ?, ?, NULL)
       ON CONFLICT (fingerprint) DO UPDATE SET labels = excluded.labels, annotations = excluded.annotations,
         active_at = excluded.active_at, starts_at = excluded.starts_at, firing = excluded.firing, resolved_at = NULL`,
    );
    const getDelivery = store.stmt(
      'SELECT fingerprint, status, notified, due, sent_at FROM notify_deliveries WHERE target = ? AND fingerprint = ?',
    );
    const insertDelivery = store.stmt(
      `INSERT INTO notify_deliveries (target, fingerprint, status, notified, due, next_attempt_at) VALUES (?, ?, 'firing', 0, 1, ?)`,
    );
    const oweFiring = store.stmt(
      `UPDATE notify_deliveries SET status = 'firing', due = 1, attempts = 0, first_attempt_at = NULL, next_attempt_at = ?, last_error = NULL
       WHERE target = ? AND fingerprint = ?`,
    );
    const cancelResolve = store.stmt(
      `UPDATE notify_deliveries SET status = 'firing', due = 0, attempts = 0, first_attempt_at = NULL, last_error = NULL
       WHERE target = ? AND fingerprint = ?`,
    );

    const active = new Set<string>();
    for (const a of alerts) {
      active.add(a.fingerprint);
      const prev = before.get(a.fingerprint);
      // Once firing, an alert stays firing while it is active (its activeAt does not move).
      const firing = a.state === 'firing' || (prev !== undefined && prev.resolved_at === null && prev.firing === 1);
      if (firing && !(prev && prev.resolved_at === null && prev.firing === 1)) result.fired++;
      upsert.run(a.fingerprint, a.alertname, JSON.stringify(a.labels), JSON.stringify(a.annotations), a.activeAt, a.startsAt, firing ? 1 : 0);
      if (!firing) continue;
      for (const target of targets) {
        const d = getDelivery.get(target, a.fingerprint) as DeliveryRow | undefined;
        if (!d) {
          insertDelivery.run(target, a.fingerprint, now);
        } else if (d.status === 'resolved') {
          // Back before its resolve went out: the target (if it heard) still thinks it fires.
          const stillKnown = d.notified === 1 && d.sent_at !== null && now - d.sent_at < repeatIntervalMs;
          if (stillKnown) cancelResolve.run(target, a.fingerprint);
          else oweFiring.run(now, target, a.fingerprint);
        } else if (d.due === 0 && (d.sent_at === null || now - d.sent_at >= repeatIntervalMs)) {
          oweFiring.run(now, target, a.fingerprint);
        }
      }
    }

    const oweResolve = store.stmt(
      `UPDATE notify_deliveries SET status = 'resolved', due = 1, attempts = 0, first_attempt_at = NULL, next_attempt_at = ?, last_error = NULL
       WHERE fingerprint = ? AND notified = 1`,
    );
    const dropUnheard = store.stmt('DELETE FROM notify_deliveries WHERE fingerprint = ? AND notified = 0');
    const markResolved = store.stmt('UPDATE notify_alerts SET resolved_at = ?, firing = 0 WHERE fingerprint = ?');
    const forget = store.stmt('DELETE FROM notify_alerts WHERE fingerprint = ?');
    for (const [fp, prev] of before) {
      if (active.has(fp) || prev.resolved_at !== null) continue;
      if (prev.firing === 1) {
        result.resolved++;
        markResolved.run(now, fp);
        oweResolve.run(now, fp);
        dropUnheard.run(fp);
      } else {
        forget.run(fp);
      }
    }
    deleteSettledAlerts(store);
    return result;
  });
}

/** Notices owed to target and due by now, oldest alertname groups first; at most limit. */
export function dueNotices(store: Store, target: string, now: number, limit: number): DueNotice[] {
  const rows = store
    .stmt(
      `SELECT d.fingerprint AS fingerprint, d.status AS status, d.attempts AS attempts, d.first_attempt_at AS firstAttemptAt,
              a.alertname AS alertname, a.labels AS labels, a.annotations AS annotations, a.starts_at AS startsAt,
              a.resolved_at AS resolvedAt
       FROM notify_deliveries d JOIN notify_alerts a ON a.fingerprint = d.fingerprint
       WHERE d.target = ? AND d.due = 1 AND d.next_attempt_at <= ?
       ORDER BY a.alertname, d.fingerprint LIMIT ?`,
    )
    .all(target, now, limit) as Array<{
    fingerprint: string;
    status: NoticeStatus;
    attempts: number;
    firstAttemptAt: number | null;
    alertname: string;
    labels: string;
    annotations: string;
    startsAt: number;
    resolvedAt: number | null;
  }>;
  return rows.map((r) => ({
    fingerprint: r.fingerprint,
    status: r.status,
    alertname: r.alertname,
    labels: JSON.parse(r.labels) as Record<string, string>,
    annotations: JSON.parse(r.annotations) as Record<string, string>,
    startsAt: r.startsAt,
    endsAt: r.status === 'resolved' ? (r.resolvedAt ?? null) : null,
    attempts: r.attempts,
    firstAttemptAt: r.firstAttemptAt,
  }));
}

/** Before a request: the target may hear of these firing alerts from now on, even if the answer never comes. */
export function markAttempting(store: Store, target: string, notices: readonly DueNotice[]): void {
  const mark = store.stmt(`UPDATE notify_deliveries SET notified = 1 WHERE target = ? AND fingerprint = ? AND status = 'firing'`);
  store.transaction(() => {
    for (const n of notices) if (n.status === 'firing') mark.run(target, n.fingerprint);
  });
}

export function recordDelivered(store: Store, target: string, notices: readonly DueNotice[], now: number): void {
  // Conditional on status: an evaluation may have turned a firing notice into a resolve meanwhile.
  const firing = store.stmt(
    `UPDATE notify_deliveries SET due = 0, notified = 1, sent_at = ?, attempts = 0, first_attempt_at = NULL, last_error = NULL
     WHERE target = ? AND fingerprint = ? AND status = 'firing'`,
  );
  const resolved = store.stmt(`DELETE FROM notify_deliveries WHERE target = ? AND fingerprint = ? AND status = 'resolved'`);
  store.transaction(() => {
    for (const n of notices) {
      if (n.status === 'firing') firing.run(now, target, n.fingerprint);
      else resolved.run(target, n.fingerprint);
    }
    deleteSettledAlerts(store);
  });
}

export interface FailurePolicy {
  now: number;
  /** A 4xx answer other than 408/429: retrying cannot help. */
  permanent: boolean;
  /** Delay before the attempt after `attempts` failed ones (the caller's backoff with jitter). */
  delayMs: (attempts: number) => number;
  /** The receiver's Retry-After, when it sent one (overrides the backoff). */
  retryAfterMs?: number | undefined;
  maxAttempts: number;
  maxAgeMs: number;
  error: string;
}

/** Schedules the retry of each notice, or gives it up; returns how many were given up and the next attempt time. */
export function recordFailed(
  store: Store,
  target: string,
  notices: readonly DueNotice[],
  p: FailurePolicy,
): { dropped: DueNotice[]; retryAt: number | undefined } {
  const retry = store.stmt(
    `UPDATE notify_deliveries SET attempts = ?, first_attempt_at = ?, next_attempt_at = ?, last_error = ?
     WHERE target = ? AND fingerprint = ? AND status = ? AND due = 1`,
  );
  // A firing notice given up is tried again after repeatInterval (sent_at), like a delivered one.
  const giveUpFiring = store.stmt(
    `UPDATE notify_deliveries SET due = 0, sent_at = ?, attempts = 0, first_attempt_at = NULL, last_error = ?
     WHERE target = ? AND fingerprint = ? AND status = 'firing' AND due = 1`,
  );
  const giveUpResolved = store.stmt(`DELETE FROM notify_deliveries WHERE target = ? AND fingerprint = ? AND status = 'resolved'`);
  const dropped: DueNotice[] = [];
  let retryAt: number | undefined;
  store.transaction(() => {
    for (const n of notices) {
      const attempts = n.attempts + 1;
      const first = n.firstAttemptAt ?? p.now;
      if (p.permanent || attempts >= p.maxAttempts || p.now - first >= p.maxAgeMs) {
        dropped.push(n);
        if (n.status === 'firing') giveUpFiring.run(p.now, p.error, target, n.fingerprint);
        else giveUpResolved.run(target, n.fingerprint);
        continue;
      }
      const at = p.now + (p.retryAfterMs ?? p.delayMs(attempts));
      retry.run(attempts, first, at, p.error, target, n.fingerprint, n.status);
      retryAt = retryAt === undefined ? at : Math.min(retryAt, at);
    }
    deleteSettledAlerts(store);
  });
  return { dropped, retryAt };
}

/** The earliest next attempt of anything owed to target. */
export function nextAttemptAt(store: Store, target: string): number | undefined {
  const row = store.stmt('SELECT min(next_attempt_at) AS t FROM notify_deliveries WHERE target = ? AND due = 1').get(target) as {
    t: number | null;
  };
  return row.t ?? undefined;
}

export function pendingCount(store: Store, target: string): number {
  return (store.stmt('SELECT count(*) AS n FROM notify_deliveries WHERE target = ? AND due = 1').get(target) as { n: number }).n;
}
