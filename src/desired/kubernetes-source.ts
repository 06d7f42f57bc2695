import {
  isGone,
  KubeApiError,
  type KubeList,
  type KubeObject,
  type KubernetesClient,
  type WatchEvent,
  type WatchHandle,
} from '../drivers/kubernetes.js';
import type { Logger } from '../observability/logger.js';
import type { Metrics } from '../observability/metrics.js';
import type { EventRecorder } from '../runtime/controller.js';
import { AbortError, sleep } from '../runtime/leader.js';
import type { Store } from '../state/store.js';
import type { JsonObject } from '../state/types.js';
import { AdmissionError, type Admission } from './apply.js';
import type { KindInfo } from './kinds.js';
import type { DesiredStateValidator } from './validate.js';

/** Where the Kubernetes generation a store generation came from is kept across restarts. */
export const KUBE_GENERATION_ANNOTATION = 'polydev.ai/kubernetes-generation';
/** Kinds that are never desired state (the daemon's API creates them), so not watched. */
const NOT_DESIRED_STATE = new Set(['Claim']);
/** Duplicates the spec, and can be as large as the object: not worth storing. */
const DROPPED_ANNOTATIONS = new Set(['kubectl.kubernetes.io/last-applied-configuration']);
const DNS1123_LABEL = /^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$/;

export interface KubernetesSourceOptions {
  client: KubernetesClient;
  store: Store;
  validator: DesiredStateValidator;
  admissions: Admission[];
  logger: Logger;
  metrics: Metrics;
  /** Where Warning events go (the Manager's recorder); default: straight into the store. */
  recorder?: EventRecorder;
  namespace: string;
  /** A full relist of every kind this often (besides the watch). */
  resyncMs: number;
  /** Also post core/v1 Events for rejected objects, so `kubectl describe` shows them (default true). */
  kubernetesEvents?: boolean;
  /** Backoff of watch/list retries (defaults 200 ms doubling to 30 s). */
  minBackoffMs?: number;
  maxBackoffMs?: number;
  /** Server-side end of each watch (the API server's own default is 30-60 min); default 300 s. */
  watchTimeoutSeconds?: number;
}

interface KindState {
  info: KindInfo;
  rv: string;
  /** The last version of each object seen (the status writer PUTs from it). */
  objects: Map<string, KubeObject>;
  needList: boolean;
  failures: number;
  watch: WatchHandle | undefined;
  resyncTimer: NodeJS.Timeout | undefined;
  lastListAt: number;
}

/**
 * Desired state from the polydev.ai custom resources of one namespace: the Kubernetes
 * counterpart of DesiredStateDirWatcher. Each kind is listed, then watched from the list's
 * resourceVersion with bookmarks; a dropped watch resumes from the last version seen (bounded
 * backoff), a 410 Gone relists, and every resyncMs relists anyway. After a relist, resources this
 * source wrote that are gone from Kubernetes are marked for deletion (controllers tear them down).
 *
 * Unlike a directory apply, each object stands alone: an invalid or refused object gets a
 * Warning event naming kind/name, field and message, and its last good spec stays in effect,
 * while the others apply.
 *
 * Why not the library's ListWatch/makeInformer: in client-node 1.x it never asks for bookmarks
 * (so a quiet kind resumes from an old version and relists on every 410), does not restart after
 * an error other than 410 (it only reports it), and has no periodic relist. The loop here is the
 * reflector's (client-go) on top of the library's Watch.
 */
export class KubernetesSource {
  private readonly kinds: KindState[];
  private readonly abort = new AbortController();
  private readonly recorder: EventRecorder;
  private loops: Array<Promise<void>> = [];
  private stopped = false;
  /** Objects refused by an admission (e.g. their ProxyPool is not there yet): retried when something else applies. */
  private readonly pending = new Map<string, { ks: KindState; obj: KubeObject }>();
  /** What was last warned about per object, so a resync does not repeat it. */
  private readonly warned = new Map<string, string>();
  /** store generation → Kubernetes generation, per object (recent ones), for observedGeneration. */
  private readonly generations = new Map<string, Array<{ store: number; kube: number }>>();
  private retrying = false;
  /** Something was written since the last retry of pending objects (nothing else can unblock them). */
  private appliedSinceRetry = false;

  constructor(private readonly opts: KubernetesSourceOptions) {
    const order = new Map(opts.admissions.map((a) => [a.kind, a.order]));
    this.kinds = [...opts.validator.kinds.values()]
      .filter((k) => !NOT_DESIRED_STATE.has(k.kind))
      .sort((a, b) => (order.get(a.kind) ?? 50) - (order.get(b.kind) ?? 50) || a.kind.localeCompare(b.kind))
      .map((info) => ({ info, rv: '', objects: new Map(), needList: true, failures: 0, watch: undefined, resyncTimer: undefined, lastListAt: 0 }));
    this.recorder = opts.recorder ?? {
      record: (kind, name, type, reason, message) => opts.store.recordEvent({ kind, name, type, reason, message }),
    };
  }

  /** Kinds watched, by plural. */
  get plurals(): string[] {
    return this.kinds.map((k) => k.info.plural);
  }

  /** Resolves once every kind's first full list is in the store; then watches in the background. */
  async start(): Promise<void> {
    let lists: KubeList[];
    try {
      lists = await Promise.all(this.kinds.map((ks) => this.firstList(ks)));
    } catch (err) {
      // The other kinds' first lists would otherwise go on retrying behind a failed start.
      await this.stop();
      throw err;
    }
    if (this.stopped) throw new AbortError('the Kubernetes source was stopped while starting');
    // All lists first, then apply in admission order: a ProxyPort needs its ProxyPool in the store.
    this.kinds.forEach((ks, i) => this.applyList(ks, lists[i]!));
    this.opts.logger.info('desired state from Kubernetes listed', {
      server: this.opts.client.server,
      namespace: this.opts.namespace,
      objects: Object.fromEntries(this.kinds.map((ks) => [ks.info.plural, ks.objects.size])),
    });
    this.loops = this.kinds.map((ks) => this.run(ks));
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.abort.abort();
    for (const ks of this.kinds) {
      ks.watch?.stop();
      if (ks.resyncTimer) clearTimeout(ks.resyncTimer);
    }
    await Promise.all(this.loops);
  }

  /** The last version of an object seen from Kubernetes. */
  kubernetesObject(kind: string, name: string): KubeObject | undefined {
    return this.kinds.find((k) => k.info.kind === kind)?.objects.get(name);
  }

  /**
   * The Kubernetes metadata.generation whose spec became store generation `storeGeneration`:
   * from memory, else (after a restart) from the annotation when it is the store's current one.
   */
  kubernetesGeneration(kind: string, name: string, storeGeneration: number): number | undefined {
    const known = this.generations.get(`${kind}/${name}`)?.find((g) => g.store === storeGeneration);
    if (known) return known.kube;
    const r = this.opts.store.getResource(kind, name);
    if (!r || r.metadata.generation !== storeGeneration) return undefined;
    const n = Number(r.metadata.annotations[KUBE_GENERATION_ANNOTATION]);
    return Number.isInteger(n) && n > 0 ? n : undefined;
  }

  // ---- list and watch -----------------------------------------------------------------

  /** The first list: retried while the API server is unreachable, fatal when it answers that it never will. */
  private async firstList(ks: KindState): Promise<KubeList> {
    for (;;) {
      try {
        const list = await this.opts.client.listCustomObjects(ks.info.plural, this.opts.namespace);
        ks.failures = 0;
        return list;
      } catch (err) {
        // 401/403 (credentials, RBAC) and 404 (CRD not installed) are configuration: say so at start.
        if (err instanceof KubeApiError && [401, 403, 404].includes(err.code)) throw err;
        this.opts.logger.warn('cannot list custom resources yet; retrying', { kind: ks.info.kind, error: (err as Error).message });
        await this.backoff(ks);
      }
    }
  }

  private async run(ks: KindState): Promise<void> {
    while (!this.stopped) {
      try {
        if (ks.needList) {
          const list = await this.opts.client.listCustomObjects(ks.info.plural, this.opts.namespace);
          if (this.stopped) return;
          this.applyList(ks, list);
          ks.failures = 0;
        }
        await this.watchOnce(ks);
      } catch (err) {
        if (this.stopped || err instanceof AbortError) return;
        this.opts.logger.warn('kubernetes list/watch failed; retrying with backoff', {
          kind: ks.info.kind,
          namespace: this.opts.namespace,
          error: (err as Error).message,
        });
        try {
          await this.backoff(ks);
        } catch {
          return;
        }
      }
    }
  }

  /** One watch stream, from ks.rv until it ends; throws what should back off, returns what may resume at once. */
  private async watchOnce(ks: KindState): Promise<void> {
    const started = Date.now();
    let events = 0;
    let failure: Error | undefined;
    const handle = this.opts.client.watchCustomObjects(
      ks.info.plural,
      this.opts.namespace,
      { resourceVersion: ks.rv, timeoutSeconds: this.opts.watchTimeoutSeconds ?? 300 },
      (ev: WatchEvent) => {
        if (failure) return;
        events++;
        try {
          this.onEvent(ks, ev);
        } catch (err) {
          failure = err as Error;
          handle.stop();
        }
      },
    );
    ks.watch = handle;
    const err = await handle.done;
    ks.watch = undefined;
    if (this.stopped) return;
    const e = failure ?? err;
    if (e && isGone(e)) {
      // The version is older than the server's history: only a list can tell what happened since.
      this.opts.logger.info('watch expired (410); relisting', { kind: ks.info.kind, resourceVersion: ks.rv });
      ks.needList = true;
      return;
    }
    if (e) throw e;
    if (ks.needList) return; // the resync timer ended it
    // A clean close (timeoutSeconds, a proxy): resume from the last version at once, unless the
    // server keeps closing straight away, which must not become a hot loop.
    if (events === 0 && Date.now() - started < 1000) {
      await this.backoff(ks);
    } else {
      ks.failures = 0;
    }
  }

  private onEvent(ks: KindState, ev: WatchEvent): void {
    switch (ev.type) {
      case 'BOOKMARK':
        ks.rv = ev.object.metadata.resourceVersion;
        return;
      case 'ERROR': {
        const s = ev.object;
        throw new KubeApiError(s.code ?? 500, s.reason ?? 'Unknown', `watch ${ks.info.plural}: ${s.code} ${s.reason ?? ''}: ${s.message ?? ''}`);
      }
      case 'ADDED':
      case 'MODIFIED':
        this.observe(ks, ev.object);
        break;
      case 'DELETED':
        this.forget(ks, ev.object.metadata.name, 'deleted in Kubernetes');
        break;
    }
    if (ev.object.metadata.resourceVersion) ks.rv = ev.object.metadata.resourceVersion;
    this.retryPending();
  }

  /** Applies a full list: every object, then marks for deletion what this source wrote and the list lacks. */
  private applyList(ks: KindState, list: KubeList): void {
    const seen = new Set<string>();
    const previous = ks.objects;
    ks.objects = new Map();
    // Objects whose status records an allocation (a ProxyPort's port, from an earlier leader) first:
    // otherwise one without could be handed that port, being earlier in the list.
    const recorded = (o: KubeObject) => (typeof (o.status as { port?: unknown } | undefined)?.port === 'number' ? 0 : 1);
    const items = [...(list.items ?? [])].sort((a, b) => recorded(a) - recorded(b));
    for (const obj of items) {
      seen.add(obj.metadata.name);
      this.observe(ks, obj);
    }
    for (const name of previous.keys()) if (!seen.has(name)) this.forget(ks, name, 'gone from Kubernetes (relist)');
    for (const r of this.opts.store.listResources(ks.info.kind)) {
      if (r.source === 'kubernetes' && !r.metadata.deletionTimestamp && !seen.has(r.metadata.name)) {
        this.forget(ks, r.metadata.name, 'gone from Kubernetes (relist)');
      }
    }
    ks.rv = list.metadata?.resourceVersion ?? '';
    ks.needList = false;
    ks.lastListAt = Date.now();
    this.scheduleResync(ks);
    this.retryPending();
  }

  private scheduleResync(ks: KindState): void {
    if (ks.resyncTimer) clearTimeout(ks.resyncTimer);
    if (this.stopped || !(this.opts.resyncMs > 0)) return;
    ks.resyncTimer = setTimeout(() => {
      ks.resyncTimer = undefined;
      ks.needList = true;
      ks.watch?.stop();
    }, this.opts.resyncMs);
    ks.resyncTimer.unref();
  }

  private async backoff(ks: KindState): Promise<void> {
    ks.failures++;
    const min = this.opts.minBackoffMs ?? 200;
    const max = this.opts.maxBackoffMs ?? 30_000;
    const ms = Math.min(max, min * 2 ** Math.min(ks.failures - 1, 20)) * (0.8 + Math.random() * 0.4);
    await sleep(ms, this.abort.signal);
  }

  // ---- objects -----------------------------------------------------------------------

  private observe(ks: KindState, obj: KubeObject): void {
    const name = obj.metadata?.name;
    if (!name) return;
    if (obj.metadata.deletionTimestamp) {
      // Being deleted (someone else's finalizer holds it): for the daemon it is gone now.
      this.forget(ks, name, 'being deleted in Kubernetes');
      ks.objects.set(name, obj);
      return;
    }
    ks.objects.set(name, obj);
    this.applyObject(ks, obj);
  }

  /** Validates and admits one object and writes it; returns whether it is in effect now. */
  private applyObject(ks: KindState, obj: KubeObject): boolean {
    const { store, validator, logger, metrics } = this.opts;
    const kind = ks.info.kind;
    const name = obj.metadata.name;
    const key = `${kind}/${name}`;
    this.pending.delete(key);
    const existing = store.getSource(kind, name);
    if (existing && existing !== 'kubernetes') {
      this.reject(ks, obj, 'SourceConflict', 'metadata.name', `${key} already exists in the daemon from ${existing === 'api' ? 'its API' : 'a YAML apply'}; it stays as it is (delete it there first)`);
      return false;
    }
    if (!DNS1123_LABEL.test(name)) {
      this.reject(ks, obj, 'InvalidResource', 'metadata.name', 'must be a DNS-1123 label: lower-case letters, digits and -, at most 63');
      return false;
    }
    // validateSpec fills in the schema's defaults, as the file loader does: the store gets the defaulted spec.
    const spec = structuredClone(obj.spec ?? {}) as JsonObject;
    const problems = validator.validateSpec(kind, spec);
    if (problems.length > 0) {
      const first = problems[0]!;
      const more = problems.length > 1 ? ` (and ${problems.length - 1} more: ${problems.slice(1, 3).map((p) => `${p.field}: ${p.message}`).join('; ')})` : '';
      this.reject(ks, obj, 'InvalidResource', first.field, `${first.message}${more}`);
      return false;
    }
    const kubeGeneration = obj.metadata.generation ?? 1;
    const annotations: Record<string, string> = {};
    for (const [k, v] of Object.entries(obj.metadata.annotations ?? {})) if (!DROPPED_ANNOTATIONS.has(k)) annotations[k] = v;
    annotations[KUBE_GENERATION_ANNOTATION] = String(kubeGeneration);
    const admission = this.opts.admissions.find((a) => a.kind === kind);
    let outcome: { created: boolean; changed: boolean; generation: number };
    try {
      outcome = store.transaction(() => {
        const recordedStatus = obj.status !== null && typeof obj.status === 'object' ? (obj.status as JsonObject) : undefined;
        admission?.prepare(store)({ kind, name, spec, ...(recordedStatus ? { recordedStatus } : {}) });
        const out = store.upsertResource({ kind, name, labels: obj.metadata.labels ?? {}, annotations, spec, source: 'kubernetes' });
        return { created: out.created, changed: out.created || out.specChanged || out.metaChanged, generation: out.resource.metadata.generation };
      });
    } catch (err) {
      if (!(err instanceof AdmissionError)) throw err;
      // Often an ordering matter (the pool arrives later): retried whenever something else applies.
      this.pending.set(key, { ks, obj });
      this.reject(ks, obj, 'AdmissionRefused', err.field.length ? err.field.join('.') : '-', err.message);
      return false;
    }
    this.rememberGeneration(key, outcome.generation, kubeGeneration);
    if (this.warned.delete(key)) {
      this.recorder.record(kind, name, 'Normal', 'Accepted', `${key} from Kubernetes (generation ${kubeGeneration}) is valid again and applied`);
    }
    if (outcome.changed) {
      this.appliedSinceRetry = true;
      metrics.desiredStateApplies.inc({ result: 'applied' });
      logger.info(outcome.created ? 'kubernetes resource created' : 'kubernetes resource configured', {
        resource: key,
        namespace: this.opts.namespace,
        generation: kubeGeneration,
      });
    }
    return true;
  }

  private rememberGeneration(key: string, store: number, kube: number): void {
    const list = (this.generations.get(key) ?? []).filter((g) => g.store !== store);
    list.push({ store, kube });
    this.generations.set(key, list.slice(-8));
  }

  private reject(ks: KindState, obj: KubeObject, reason: string, field: string, message: string): void {
    const kind = ks.info.kind;
    const name = obj.metadata.name;
    const key = `${kind}/${name}`;
    const text = `${key}: ${field}: ${message}`;
    const fingerprint = `${obj.metadata.resourceVersion ?? ''}\0${text}`;
    if (this.warned.get(key) === fingerprint) return;
    this.warned.set(key, fingerprint);
    const inEffect = this.opts.store.getSource(kind, name) === 'kubernetes';
    const full = `${text}; ${inEffect ? 'the previous valid spec stays in effect' : 'not applied'}`;
    this.opts.metrics.desiredStateApplies.inc({ result: 'rejected' });
    this.opts.logger.warn('kubernetes resource rejected', { resource: key, namespace: this.opts.namespace, field, message, reason });
    this.recorder.record(kind, name, 'Warning', reason, full);
    if (this.opts.kubernetesEvents ?? true) {
      this.opts.client
        .createEvent(this.opts.namespace, { kind, name, uid: obj.metadata.uid, resourceVersion: obj.metadata.resourceVersion }, 'Warning', reason, full)
        .catch((err: Error) => this.opts.logger.debug('cannot post a Kubernetes event', { resource: key, error: err.message }));
    }
  }

  /** The object is gone from Kubernetes: its store resource (if this source wrote it) is torn down. */
  private forget(ks: KindState, name: string, why: string): void {
    const kind = ks.info.kind;
    const key = `${kind}/${name}`;
    ks.objects.delete(name);
    this.pending.delete(key);
    this.warned.delete(key);
    this.generations.delete(key);
    const r = this.opts.store.getResource(kind, name);
    if (r?.source !== 'kubernetes' || r.metadata.deletionTimestamp) return;
    this.opts.store.requestDeletion(kind, name);
    this.appliedSinceRetry = true; // a freed port or address may unblock a refused object
    this.opts.logger.info('kubernetes resource removed; tearing down', { resource: key, namespace: this.opts.namespace, why });
  }

  /** Each refused object once more, after something else applied (it may have been waiting for it). */
  private retryPending(): void {
    if (this.retrying || this.pending.size === 0 || !this.appliedSinceRetry) return;
    this.retrying = true;
    this.appliedSinceRetry = false;
    try {
      for (let round = 0; round < 3; round++) {
        let progress = false;
        for (const [key, { ks, obj }] of [...this.pending]) {
          if (!this.pending.has(key)) continue;
          if (this.applyObject(ks, obj)) progress = true;
        }
        if (!progress) break;
      }
    } finally {
      this.retrying = false;
    }
  }
}
