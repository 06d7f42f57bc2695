import { isConflict, isNotFound, type KubeObject, type KubernetesClient } from '../drivers/kubernetes.js';
import type { Logger } from '../observability/logger.js';
import type { Store } from '../state/store.js';
import type { Change, Condition, JsonObject, ResourceStatus } from '../state/types.js';
import { canonicalJson } from '../util/canonical-json.js';
import { loadKinds, type KindInfo } from './kinds.js';
import { KUBE_GENERATION_ANNOTATION, type KubernetesSource } from './kubernetes-source.js';

export interface KubernetesStatusWriterOptions {
  client: KubernetesClient;
  store: Store;
  logger: Logger;
  namespace: string;
  /** The running source: the objects it saw (fewer GETs) and its generation map. */
  source?: KubernetesSource | undefined;
  /** Kinds (plural, status schema); default: the CRDs in crds/. */
  kinds?: Map<string, KindInfo>;
  /** Changes within this window go out as one write per object (default 200 ms). */
  coalesceMs?: number;
  /** 409 Conflicts retried at once (re-reading the object) before the write backs off (default 5). */
  maxConflictRetries?: number;
  /** Backoff of failed writes (defaults 500 ms doubling to 60 s). */
  minBackoffMs?: number;
  maxBackoffMs?: number;
}

/** How many writes run at once: status is not urgent, and the API server has other clients. */
const PARALLEL_WRITES = 4;

/**
 * Writes the status of Kubernetes-sourced resources back to their status subresource: phase,
 * conditions, the kind's other status fields, and observedGeneration in Kubernetes terms (the
 * store counts its own generations). Runs beside the reconcilers, never in their way: changes
 * are noticed after commit, coalesced per object, and written in the background; a 409 re-reads
 * the object and retries, a 404 (the object is gone) drops the write, other failures back off.
 * Only the leader runs it.
 */
export class KubernetesStatusWriter {
  private readonly kinds: Map<string, KindInfo>;
  private readonly dirty = new Set<string>();
  private readonly failures = new Map<string, number>();
  private readonly retryTimers = new Map<string, NodeJS.Timeout>();
  /** Digest of the status body last written per object, so unchanged status is never PUT again. */
  private readonly written = new Map<string, string>();
  private flushTimer: NodeJS.Timeout | undefined;
  private flushing: Promise<void> | undefined;
  private stopped = true;

  constructor(private readonly opts: KubernetesStatusWriterOptions) {
    this.kinds = opts.kinds ?? loadKinds();
  }

  start(): void {
    if (!this.stopped) return;
    this.stopped = false;
    this.opts.store.on('change', this.onChange);
    this.opts.store.on('status', this.onStatus);
    // Whatever changed while this process was not leading (or not running) goes out first.
    for (const r of this.opts.store.listResources()) if (r.source === 'kubernetes' && r.status) this.mark(r.kind, r.metadata.name);
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.opts.store.off('change', this.onChange);
    this.opts.store.off('status', this.onStatus);
    if (this.flushTimer) clearTimeout(this.flushTimer);
    for (const t of this.retryTimers.values()) clearTimeout(t);
    this.retryTimers.clear();
    this.flushTimer = undefined;
    await this.flushing;
  }

  /** Writes everything pending now (tests, shutdown of a leader that wants the last status out). */
  async flush(): Promise<void> {
    if (this.flushTimer) clearTimeout(this.flushTimer);
    this.flushTimer = undefined;
    while (this.flushing) await this.flushing;
    if (this.dirty.size > 0) await this.runFlush();
  }

  private readonly onChange = (c: Change) => {
    if (c.op === 'deleted') {
      this.written.delete(`${c.kind}/${c.name}`);
      return;
    }
    if (this.opts.store.db.open && this.opts.store.getSource(c.kind, c.name) === 'kubernetes') this.mark(c.kind, c.name);
  };

  /** The store announces every status write after its commit (setStatus records no change-feed entry). */
  private readonly onStatus = (c: { kind: string; name: string }) => {
    if (this.opts.store.db.open && this.opts.store.getSource(c.kind, c.name) === 'kubernetes') this.mark(c.kind, c.name);
  };


  private mark(kind: string, name: string): void {
    if (this.stopped || !this.kinds.has(kind)) return;
    this.dirty.add(`${kind}/${name}`);
    this.scheduleFlush();
  }

  private scheduleFlush(): void {
    if (this.stopped || this.flushTimer || this.flushing || this.dirty.size === 0) return;
    this.flushTimer = setTimeout(() => {
      this.flushTimer = undefined;
      void this.runFlush();
    }, this.opts.coalesceMs ?? 200);
    this.flushTimer.unref();
  }

  private runFlush(): Promise<void> {
    const run = async () => {
      while (!this.stopped && this.dirty.size > 0) {
        const batch = [...this.dirty];
        this.dirty.clear();
        for (let i = 0; i < batch.length && !this.stopped; i += PARALLEL_WRITES) {
          await Promise.all(batch.slice(i, i + PARALLEL_WRITES).map((key) => this.writeKey(key)));
        }
      }
    };
    this.flushing = run().finally(() => {
      this.flushing = undefined;
      // Marked while the last batch was being written: their own coalescing window starts now.
      this.scheduleFlush();
    });
    return this.flushing;
  }

  private async writeKey(key: string): Promise<void> {
    const [kind, name] = splitKey(key);
    try {
      await this.write(kind, name);
      this.failures.delete(key);
    } catch (err) {
      if (this.stopped) return;
      const n = (this.failures.get(key) ?? 0) + 1;
      this.failures.set(key, n);
      const min = this.opts.minBackoffMs ?? 500;
      const max = this.opts.maxBackoffMs ?? 60_000;
      const delay = Math.min(max, min * 2 ** Math.min(n - 1, 20));
      this.opts.logger.warn('cannot write status to Kubernetes; retrying', { resource: key, namespace: this.opts.namespace, attempt: n, retryInMs: delay, error: (err as Error).message });
      const prev = this.retryTimers.get(key);
      if (prev) clearTimeout(prev);
      const timer = setTimeout(() => {
        this.retryTimers.delete(key);
        this.mark(kind, name);
      }, delay);
      timer.unref();
      this.retryTimers.set(key, timer);
    }
  }

  private async write(kind: string, name: string): Promise<void> {
    const { store, client, namespace } = this.opts;
    const key = `${kind}/${name}`;
    if (!store.db.open) return;
    const r = store.getResource(kind, name);
    if (!r || r.source !== 'kubernetes' || !r.status) return;
    const info = this.kinds.get(kind)!;
    const body = toKubernetesStatus(info, r.status, (g) => this.kubernetesGeneration(kind, name, g));
    const digest = canonicalJson(body);
    if (this.written.get(key) === digest) return;
    let obj: KubeObject | undefined = this.opts.source?.kubernetesObject(kind, name);
    if (obj && canonicalJson(obj.status ?? {}) === digest) {
      this.written.set(key, digest);
      return;
    }
    const maxConflicts = this.opts.maxConflictRetries ?? 5;
    for (let attempt = 0; ; attempt++) {
      try {
        obj ??= await client.getCustomObject(info.plural, namespace, name);
        await client.replaceCustomObjectStatus(info.plural, namespace, name, { ...obj, status: body });
        this.written.set(key, digest);
        return;
      } catch (err) {
        if (isNotFound(err)) {
          // Deleted in Kubernetes: the source tears the resource down; there is nothing to write to.
          this.written.delete(key);
          return;
        }
        if (isConflict(err) && attempt < maxConflicts) {
          obj = undefined; // someone else wrote it: re-read the latest version and try again
          continue;
        }
        throw err;
      }
    }
  }

  private kubernetesGeneration(kind: string, name: string, storeGeneration: number): number | undefined {
    if (this.opts.source) return this.opts.source.kubernetesGeneration(kind, name, storeGeneration);
    const r = this.opts.store.getResource(kind, name);
    if (!r || r.metadata.generation !== storeGeneration) return undefined;
    const n = Number(r.metadata.annotations[KUBE_GENERATION_ANNOTATION]);
    return Number.isInteger(n) && n > 0 ? n : undefined;
  }
}

function splitKey(key: string): [string, string] {
  const i = key.indexOf('/');
  return [key.slice(0, i), key.slice(i + 1)];
}

/**
 * The store's status as the CRD's status schema has it: fields the schema does not declare are
 * left out (the API server would prune them anyway), and every observedGeneration is translated
 * to the Kubernetes generation; one that cannot be translated is left out rather than guessed.
 */
export function toKubernetesStatus(
  info: KindInfo,
  status: ResourceStatus,
  kubernetesGeneration: (storeGeneration: number) => number | undefined,
): JsonObject {
  const declared = (info.statusSchema?.properties ?? undefined) as Record<string, unknown> | undefined;
  const out: JsonObject = {};
  for (const [k, v] of Object.entries(status)) {
    if (v === undefined || (declared && !(k in declared))) continue;
    out[k] = v;
  }
  const translate = (g: unknown) => (typeof g === 'number' ? kubernetesGeneration(g) : undefined);
  const observed = translate(status.observedGeneration);
  if (observed !== undefined) out.observedGeneration = observed;
  else delete out.observedGeneration;
  if (Array.isArray(status.conditions)) {
    out.conditions = status.conditions.map((c: Condition) => {
      const { observedGeneration, ...rest } = c;
      const g = translate(observedGeneration);
      return g !== undefined ? { ...rest, observedGeneration: g } : rest;
    });
  }
  return out;
}
