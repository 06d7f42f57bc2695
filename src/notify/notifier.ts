// The built-in notifier, for operators without Alertmanager: evaluates the alert rules from the
// store on a timer of its own, and delivers firing and resolved notices to webhook targets
// (Alertmanager- or Slack-compatible), de-duplicated and retried with backoff.
//
// It must never slow the reconcile loop down: its timers are unref'd, an evaluation is a few
// aggregate queries and one short transaction, each target has its own sequential sender (a
// hanging target delays nobody else), every request has a timeout, and stop() aborts them.
// Target URLs may carry a secret (a Slack webhook's path is its token): they are never logged,
// put in an error, an event or a metric label; the target's name and the URL's origin are.

import os from 'node:os';
import type { Logger } from '../observability/logger.js';
import { NOTIFICATION_STATUSES, type Metrics } from '../observability/metrics.js';
import type { Store } from '../state/store.js';
import { alertmanagerPayload, slackPayload, type NoticeGroup } from './payloads.js';
import { evaluateAlerts, reconcileErrorRatios, RULES, type AlertInputs, type ReconcileSample } from './rules.js';
import { readStoreInputs } from './snapshot.js';
import {
  applyEvaluation,
  dueNotices,
  forgetTargets,
  loadActiveAt,
  markAttempting,
  nextAttemptAt,
  pendingCount,
  recordDelivered,
  recordFailed,
  type DueNotice,
} from './state.js';

export type NotifyFormat = 'alertmanager' | 'slack';

export type NotifyTarget = {
  name: string;
  format: NotifyFormat;
  /** May hold a secret (a token in the path or query): never logged. */
  url: string;
};

export interface NotifierOptions {
  store: Store;
  logger: Logger;
  metrics: Metrics;
  targets: NotifyTarget[];
  evaluationIntervalMs: number;
  /** A firing alert is sent again after this long while it still fires (Alertmanager's repeat_interval). */
  repeatIntervalMs: number;
  /** Per request (default 10 s). */
  requestTimeoutMs?: number;
  /** First retry delay (default 1 s); doubles per failed attempt, plus up to 25% jitter. */
  backoffBaseMs?: number;
  /** Longest retry delay (default 5 min). */
  backoffMaxMs?: number;
  /** Attempts of one notice before it is given up (default 20). */
  maxAttempts?: number;
  /** Age of a notice's first failed attempt after which it is given up (default 1 h). */
  maxAgeMs?: number;
  /** The daemon's readiness (/readyz), for PolydevReconcilerNotReady; without it that rule is not evaluated. */
  isReady?: () => boolean;
  /** The instance label of the alerts (default the host name). */
  instance?: string;
  /** externalURL and generatorURL of the messages, e.g. the daemon's status page (default empty). */
  externalURL?: string;
  /** Failed requests in a row to a target before a Warning event is recorded (default 3). */
  failureEventAfter?: number;
  /** At most one such event per target per this long (default 15 min). */
  failureEventIntervalMs?: number;
  /** Alerts per message at most (default 50); the rest follow in the next. */
  maxAlertsPerMessage?: number;
  /** Test hooks. */
  clock?: () => number;
  random?: () => number;
}

/** The kind the notifier's events are recorded under (the target's name is the event's name). */
export const EVENT_KIND = 'Notifier';

// The window of rate() in PolydevReconcileErrorsRising.
const RATE_WINDOW_MS = 5 * 60_000;
const MAX_SAMPLES = 1_000;
/** Notices read per pass of a target's sender (bounded memory; more are picked up by the next pass). */
const NOTICES_PER_PASS = 500;
/** Passes per kick: a steady stream of new notices cannot keep a sender busy forever. */
const MAX_PASSES = 10;
const MAX_RETRY_AFTER_MS = 3_600_000;
const MAX_TIMER_MS = 2_147_483_647;

type SendOutcome =
  | { ok: true }
  | { ok: false; aborted: true }
  | { ok: false; aborted: false; permanent: boolean; error: string; retryAfterMs?: number | undefined };

/** The URL's origin, the most of it that may be shown (no path, query or userinfo). */
export function safeOrigin(url: string): string {
  try {
    return new URL(url).origin;
  } catch {
    return '(invalid URL)';
  }
}

/** Retry-After as delta-seconds or an HTTP date, in ms from now; undefined when absent or unreadable. */
export function parseRetryAfter(header: string | null, now: number): number | undefined {
  if (!header) return undefined;
  const text = header.trim();
  if (/^\d+$/.test(text)) return Math.min(Number(text) * 1000, MAX_RETRY_AFTER_MS);
  const at = Date.parse(text);
  if (!Number.isFinite(at)) return undefined;
  return Math.min(Math.max(0, at - now), MAX_RETRY_AFTER_MS);
}

function errorCode(err: unknown): string {
  const cause = (err as { cause?: unknown } | null)?.cause;
  const code = (cause as { code?: unknown } | null | undefined)?.code ?? (err as { code?: unknown } | null)?.code;
  if (typeof code === 'string' && /^[A-Z0-9_]+$/.test(code)) return code;
  // Deliberately not the message: undici's messages can quote the URL.
  return err instanceof Error ? err.name : 'unknown';
}

function validateTargets(targets: readonly NotifyTarget[]): void {
  const names = new Set<string>();
  for (const t of targets) {
    if (!t.name) throw new Error('notifier target without a name');
    if (names.has(t.name)) throw new Error(`notifier target ${t.name} is configured twice`);
    names.add(t.name);
    if (t.format !== 'alertmanager' && t.format !== 'slack') throw new Error(`notifier target ${t.name}: unknown format ${String(t.format)}`);
    let url: URL;
    try {
      url = new URL(t.url);
    } catch {
      throw new Error(`notifier target ${t.name}: the URL is not valid`);
    }
    if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new Error(`notifier target ${t.name}: the URL must be http or https`);
  }
}

/** One target's sender: one request at a time, woken by evaluations and by its own retry timer. */
class TargetSender {
  running: Promise<void> | undefined;
  private again = false;
  private wake: NodeJS.Timeout | undefined;
  /** Set by a transient failure: nothing is sent to this target before then. */
  private holdUntil = 0;
  private failuresInRow = 0;
  private lastEventAt = -Infinity;
  private permanentLogged = false;
  readonly origin: string;

  constructor(readonly target: NotifyTarget, private readonly n: Notifier) {
    this.origin = safeOrigin(target.url);
  }

  kick(): Promise<void> {
    if (this.running) {
      this.again = true;
      return this.running;
    }
    const p = this.loop().finally(() => {
      if (this.running === p) this.running = undefined;
    });
    this.running = p;
    return p;
  }

  cancel(): void {
    if (this.wake) clearTimeout(this.wake);
    this.wake = undefined;
  }

  private async loop(): Promise<void> {
    try {
      for (let i = 0; i < MAX_PASSES && !this.n.isStopped(); i++) {
        this.again = false;
        const more = await this.pass();
        if (!more && !this.again) break;
      }
    } catch (err) {
      if (!this.n.isStopped()) this.n.log.warn('notifier: sending failed unexpectedly', { target: this.target.name, error: errorCode(err) });
    }
    if (!this.n.isStopped()) {
      try {
        this.scheduleWake();
      } catch (err) {
        // Nothing awaits this loop: a throw here would be an unhandled rejection, i.e. a crash.
        this.n.log.warn('notifier: scheduling the next delivery failed', { target: this.target.name, error: errorCode(err) });
      }
    }
  }

  private scheduleWake(): void {
    this.cancel();
    const store = this.n.store;
    if (!store.db.open) return;
    this.n.updatePending(this.target.name);
    const next = nextAttemptAt(store, this.target.name);
    if (next === undefined) return;
    const delay = Math.min(MAX_TIMER_MS, Math.max(0, Math.max(next, this.holdUntil) - this.n.now()));
    this.wake = setTimeout(() => void this.kick(), delay);
    this.wake.unref();
  }

  /** Sends what is due; true when more was due than one pass reads. */
  private async pass(): Promise<boolean> {
    const { store } = this.n;
    const now = this.n.now();
    if (now < this.holdUntil || !store.db.open) return false;
    const due = dueNotices(store, this.target.name, now, NOTICES_PER_PASS);
    if (due.length === 0) return false;
    const groups = new Map<string, DueNotice[]>();
    for (const d of due) {
      const g = groups.get(d.alertname);
      if (g) g.push(d);
      else groups.set(d.alertname, [d]);
    }
    const per = this.n.opts.maxAlertsPerMessage ?? 50;
    for (const [alertname, notices] of groups) {
      for (let i = 0; i < notices.length; i += per) {
        const chunk = notices.slice(i, i + per);
        const ok = await this.deliver(alertname, chunk, notices.length - i - chunk.length);
        if (!ok) return false;
      }
    }
    return due.length >= NOTICES_PER_PASS;
  }

  /** One message; false when the target failed (the rest waits for the retry). */
  private async deliver(alertname: string, notices: DueNotice[], truncated: number): Promise<boolean> {
    const { store, metrics, log } = this.n;
    const t = this.target;
    const group: NoticeGroup = {
      receiver: t.name,
      alertname,
      alerts: notices,
      truncated,
      externalURL: this.n.opts.externalURL ?? '',
    };
    markAttempting(store, t.name, notices);
    const outcome = await this.n.post(t, group);
    if (this.n.isStopped() || !store.db.open) return false;
    const now = this.n.now();
    const labels = { target: t.name, format: t.format };
    if (outcome.ok) {
      recordDelivered(store, t.name, notices, now);
      metrics.notificationsTotal.inc({ ...labels, status: 'sent' }, notices.length);
      if (this.failuresInRow > 0) log.info('notifier: target answers again', { target: t.name, origin: this.origin, afterFailures: this.failuresInRow });
      this.failuresInRow = 0;
      this.permanentLogged = false;
      log.debug('notifier: delivered', { target: t.name, alertname, alerts: notices.length });
      return true;
    }
    if (outcome.aborted) return false;
    this.failuresInRow++;
    metrics.notificationsTotal.inc({ ...labels, status: 'failed' }, notices.length);
    const { dropped, retryAt } = recordFailed(store, t.name, notices, {
      now,
      permanent: outcome.permanent,
      delayMs: (attempts) => this.n.backoffDelay(attempts),
      retryAfterMs: outcome.retryAfterMs,
      maxAttempts: this.n.opts.maxAttempts ?? 20,
      maxAgeMs: this.n.opts.maxAgeMs ?? 3_600_000,
      error: outcome.error,
    });
    if (dropped.length > 0) metrics.notificationsTotal.inc({ ...labels, status: 'dropped' }, dropped.length);
    if (outcome.permanent) {
      // Retrying cannot help (bad token, no such hook): said once until the target works again.
      if (!this.permanentLogged) {
        log.warn('notifier: target refuses notifications, not retrying them', { target: t.name, origin: this.origin, error: outcome.error, dropped: dropped.length });
        this.permanentLogged = true;
      }
    } else {
      if (retryAt !== undefined) this.holdUntil = retryAt;
      const level = this.failuresInRow === 1 || this.failuresInRow % 10 === 0 ? 'warn' : 'debug';
      log[level]('notifier: delivery failed, will retry', {
        target: t.name, origin: this.origin, error: outcome.error, failuresInRow: this.failuresInRow,
        retryInMs: retryAt === undefined ? null : Math.max(0, retryAt - now), dropped: dropped.length,
      });
      if (dropped.length > 0) log.warn('notifier: gave up notices after repeated failures', { target: t.name, origin: this.origin, dropped: dropped.length });
    }
    const threshold = this.n.opts.failureEventAfter ?? 3;
    const interval = this.n.opts.failureEventIntervalMs ?? 15 * 60_000;
    if ((this.failuresInRow >= threshold || outcome.permanent) && now - this.lastEventAt >= interval) {
      this.lastEventAt = now;
      store.recordEvent({
        kind: EVENT_KIND,
        name: t.name,
        type: 'Warning',
        reason: 'NotificationFailed',
        message: outcome.permanent
          ? `${t.format} webhook ${t.name} (${this.origin}) refuses notifications: ${outcome.error}; not retried`
          : `${this.failuresInRow} deliveries in a row to ${t.format} webhook ${t.name} (${this.origin}) failed, last: ${outcome.error}; retrying with backoff`,
      });
    }
    return false;
  }
}

export class Notifier {
  readonly store: Store;
  readonly log: Logger;
  readonly metrics: Metrics;
  private readonly senders: TargetSender[];
  private readonly abort = new AbortController();
  private readonly instance: string;
  private timer: NodeJS.Timeout | undefined;
  private firstTick: NodeJS.Timeout | undefined;
  private evaluating: Promise<unknown> | undefined;
  private stopped = false;
  private samples: ReconcileSample[] = [];
  private lastTruncationLog = -Infinity;

  constructor(readonly opts: NotifierOptions) {
    validateTargets(opts.targets);
    if (!(opts.evaluationIntervalMs > 0)) throw new Error('notifier: evaluationIntervalMs must be positive');
    if (!(opts.repeatIntervalMs > 0)) throw new Error('notifier: repeatIntervalMs must be positive');
    this.store = opts.store;
    this.log = opts.logger;
    this.metrics = opts.metrics;
    this.instance = opts.instance ?? os.hostname();
    this.senders = opts.targets.map((t) => new TargetSender({ ...t }, this));
    // Counted from 0 for every target (see metrics.ts).
    for (const t of opts.targets) {
      for (const status of NOTIFICATION_STATUSES) this.metrics.notificationsTotal.inc({ target: t.name, format: t.format, status }, 0);
    }
  }

  now(): number {
    return this.opts.clock ? this.opts.clock() : Date.now();
  }

  isStopped(): boolean {
    return this.stopped;
  }

  start(): void {
    if (this.stopped || this.timer) return;
    const dropped = forgetTargets(this.store, this.senders.map((s) => s.target.name));
    if (dropped > 0) this.log.info('notifier: forgot notices owed to targets no longer configured', { notices: dropped });
    this.log.info('notifier started', {
      targets: this.senders.map((s) => ({ name: s.target.name, format: s.target.format, origin: s.origin })),
      evaluationIntervalMs: this.opts.evaluationIntervalMs,
    });
    this.timer = setInterval(() => this.tick(), this.opts.evaluationIntervalMs);
    this.timer.unref();
    // At once too: notices owed before a restart must not wait a whole interval.
    this.firstTick = setTimeout(() => this.tick(), 0);
    this.firstTick.unref();
  }

  /** Aborts requests in flight and returns once the evaluation and senders have noticed (promptly). */
  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    if (this.timer) clearInterval(this.timer);
    if (this.firstTick) clearTimeout(this.firstTick);
    for (const s of this.senders) s.cancel();
    this.abort.abort();
    const busy = [this.evaluating, ...this.senders.map((s) => s.running)].filter((p): p is Promise<unknown> => p !== undefined);
    let guard: NodeJS.Timeout | undefined;
    await Promise.race([
      Promise.allSettled(busy),
      new Promise((resolve) => {
        guard = setTimeout(resolve, 5_000);
        guard.unref();
      }),
    ]);
    if (guard) clearTimeout(guard);
  }

  /** One evaluation now, then one sending pass per target (each bounded by the request timeout). */
  async evaluateNow(): Promise<void> {
    for (let i = 0; i < 3 && this.evaluating; i++) await this.evaluating.catch(() => undefined);
    const p = this.evaluate();
    this.evaluating = p;
    try {
      const passes = await p;
      await Promise.allSettled(passes);
    } finally {
      if (this.evaluating === p) this.evaluating = undefined;
    }
  }

  private tick(): void {
    if (this.stopped) return;
    // An evaluation still running (a slow disk) is not overlapped: this tick is skipped.
    if (this.evaluating) {
      this.log.debug('notifier: evaluation still running, tick skipped');
      return;
    }
    const p = this.evaluate().catch((err: unknown) => {
      this.log.warn('notifier: evaluation failed', { error: err instanceof Error ? err.message : String(err) });
    });
    this.evaluating = p;
    void p.finally(() => {
      if (this.evaluating === p) this.evaluating = undefined;
    });
  }

  private async sampleReconciles(now: number): Promise<void> {
    const [total, errors] = await Promise.all([this.metrics.reconcileTotal.get(), this.metrics.reconcileErrors.get()]);
    const sum = (values: ReadonlyArray<{ value: number; labels: Record<string, string | number | undefined> }>): Map<string, number> => {
      const m = new Map<string, number>();
      for (const v of values) {
        const kind = String(v.labels.kind ?? '');
        m.set(kind, (m.get(kind) ?? 0) + v.value);
      }
      return m;
    };
    this.samples.push({ at: now, total: sum(total.values), errors: sum(errors.values) });
    this.samples = this.samples.filter((s) => s.at >= now - RATE_WINDOW_MS).slice(-MAX_SAMPLES);
  }

  /** Evaluates, records, and starts a sending pass per target (returned, not awaited). */
  private async evaluate(): Promise<Array<Promise<void>>> {
    if (this.stopped) return [];
    const now = this.now();
    await this.sampleReconciles(now);
    if (this.stopped || !this.store.db.open) return [];
    const inputs: AlertInputs = {
      ...readStoreInputs(this.store),
      ready: this.opts.isReady?.(),
      reconcileErrorRatios: reconcileErrorRatios(this.samples, now, RATE_WINDOW_MS),
    };
    const { alerts, truncated } = evaluateAlerts(inputs, { now, instance: this.instance, previousActiveAt: loadActiveAt(this.store) });
    if (truncated > 0 && now - this.lastTruncationLog >= 15 * 60_000) {
      this.lastTruncationLog = now;
      this.log.warn('notifier: too many alerts, some are not tracked', { tracked: alerts.length, leftOut: truncated });
    }
    const result = applyEvaluation(this.store, alerts, {
      now,
      targets: this.senders.map((s) => s.target.name),
      repeatIntervalMs: this.opts.repeatIntervalMs,
    });
    if (result.fired > 0 || result.resolved > 0) {
      this.log.info('notifier: alerts changed', {
        fired: result.fired,
        resolved: result.resolved,
        firing: alerts.filter((a) => a.state === 'firing').map((a) => a.alertname).filter((v, i, all) => all.indexOf(v) === i),
      });
    }
    return this.senders.map((s) => s.kick());
  }

  /** Exponential backoff with up to 25% added jitter: the delay after n failed attempts always exceeds the one after n-1. */
  backoffDelay(attempts: number): number {
    const base = this.opts.backoffBaseMs ?? 1000;
    const max = this.opts.backoffMaxMs ?? 300_000;
    const exp = base * 2 ** Math.min(Math.max(0, attempts - 1), 40);
    const jitter = 1 + 0.25 * (this.opts.random ?? Math.random)();
    return Math.min(max, exp * jitter);
  }

  updatePending(target: string): void {
    if (!this.store.db.open) return;
    this.metrics.notificationsPending.set({ target }, pendingCount(this.store, target));
  }

  /** One POST; classifies the answer. Never puts the URL in the outcome. */
  async post(target: NotifyTarget, group: NoticeGroup): Promise<SendOutcome> {
    const body = JSON.stringify(target.format === 'slack' ? slackPayload(group) : alertmanagerPayload(group));
    const timeoutMs = this.opts.requestTimeoutMs ?? 10_000;
    // Not AbortSignal.any([…, AbortSignal.timeout(ms)]): on Node 20 nothing holds the timeout signal
    // but the combined one, and after a garbage collection it never fires, so a receiver that never
    // answers hung its sender for good. A timer of our own, cleared when the request settles, cannot be collected.
    const timeout = new AbortController();
    const timer = setTimeout(() => timeout.abort(), timeoutMs);
    const signal = AbortSignal.any([this.abort.signal, timeout.signal]);
    let res: Response;
    try {
      res = await fetch(target.url, {
        method: 'POST',
        headers: { 'content-type': 'application/json', 'user-agent': 'polydev-reconciler-notifier' },
        body,
        signal,
        // A redirect would resend the alert somewhere not configured; the final URL belongs in the config.
        redirect: 'manual',
      });
    } catch (err) {
      clearTimeout(timer);
      if (this.abort.signal.aborted) return { ok: false, aborted: true };
      if (timeout.signal.aborted) return { ok: false, aborted: false, permanent: false, error: `timed out after ${timeoutMs} ms` };
      return { ok: false, aborted: false, permanent: false, error: `connection failed (${errorCode(err)})` };
    }
    clearTimeout(timer);
    // The answer's body is not needed (and may echo the request): released, not read.
    await res.body?.cancel().catch(() => undefined);
    if (res.status >= 200 && res.status < 300) return { ok: true };
    const status = res.status;
    const retryAfterMs = status === 429 || status === 503 ? parseRetryAfter(res.headers.get('retry-after'), this.now()) : undefined;
    const permanent = (status >= 300 && status < 400) || (status >= 400 && status < 500 && status !== 408 && status !== 429);
    return { ok: false, aborted: false, permanent, error: `HTTP ${status}`, retryAfterMs };
  }
}

/** The alert names the built-in notifier can send (the mirrored rules of alerts.yml). */
export const NOTIFIER_ALERTNAMES: readonly string[] = Object.keys(RULES);
