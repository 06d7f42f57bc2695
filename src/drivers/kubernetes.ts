import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import type * as KubernetesLibrary from '@kubernetes/client-node';
import type { CoordinationV1Api, CoreV1Api, CoreV1Event, CustomObjectsApi, KubeConfig, V1Lease, Watch } from '@kubernetes/client-node';
import { GROUP, VERSION } from '../desired/kinds.js';
import { redact } from '../observability/logger.js';
import type { JsonObject } from '../state/types.js';

/**
 * A small typed client for what the daemon needs from a Kubernetes API server: the polydev.ai
 * custom objects of one namespace (list, watch, get, status subresource), coordination.k8s.io/v1
 * Leases and core/v1 Events. Everything goes through @kubernetes/client-node 1.x (2.x needs
 * Node 22); this module only adds types, error mapping and the redaction of credentials.
 */

export interface KubernetesSettings {
  /** Path of a kubeconfig file; unset: the pod's service account (in-cluster). */
  kubeconfig: string | undefined;
  /** Namespace whose custom resources are the desired state; unset: see resolveNamespace. */
  namespace: string | undefined;
  /** Full relist of every kind this often, on top of the watch. */
  resyncMs: number;
}

/**
 * @kubernetes/client-node, loaded on first use. Importing it costs about 0.9 s of CPU (hundreds of
 * generated model modules), and every CLI command and every daemon that never talks to Kubernetes
 * (files source, database lease) would pay it at start. Node >= 20.19 loads an ES module through
 * require() synchronously, so the functions below stay synchronous.
 */
let library: typeof KubernetesLibrary | undefined;
function k8s(): typeof KubernetesLibrary {
  library ??= createRequire(import.meta.url)('@kubernetes/client-node') as typeof KubernetesLibrary;
  return library;
}

export const SERVICE_ACCOUNT_DIR = '/var/run/secrets/kubernetes.io/serviceaccount';

export interface KubeObjectMeta {
  name: string;
  namespace?: string;
  uid?: string;
  generation?: number;
  resourceVersion?: string;
  labels?: Record<string, string>;
  annotations?: Record<string, string>;
  creationTimestamp?: string;
  deletionTimestamp?: string;
}

export interface KubeObject {
  apiVersion: string;
  kind: string;
  metadata: KubeObjectMeta;
  spec?: JsonObject;
  status?: JsonObject;
}

export interface KubeList {
  metadata: { resourceVersion: string; continue?: string };
  items: KubeObject[];
}

/** The v1 Status the API server answers errors with (and sends in watch ERROR events). */
export interface KubeStatus {
  kind: 'Status';
  apiVersion: 'v1';
  status?: 'Failure' | 'Success';
  code: number;
  reason?: string;
  message?: string;
}

export type WatchEventType = 'ADDED' | 'MODIFIED' | 'DELETED' | 'BOOKMARK' | 'ERROR';

export type WatchEvent =
  | { type: 'ADDED' | 'MODIFIED' | 'DELETED'; object: KubeObject }
  | { type: 'BOOKMARK'; object: { metadata: { resourceVersion: string } } }
  | { type: 'ERROR'; object: KubeStatus };

export interface WatchHandle {
  /** Ends the watch; `done` then resolves with null. */
  stop(): void;
  /** Resolves when the stream ends: null for a clean close, else the error (a KubeApiError for an HTTP status). */
  done: Promise<Error | null>;
}

export interface LeaseRecord {
  metadata: { name: string; namespace?: string; resourceVersion?: string };
  spec: {
    holderIdentity?: string;
    leaseDurationSeconds?: number;
    /** RFC 3339 with microseconds (metav1.MicroTime) as the API server sends it. */
    acquireTime?: string;
    renewTime?: string;
    leaseTransitions?: number;
  };
}

/** An API answer other than 2xx, with the Status reason (Conflict, NotFound, Expired, …). */
export class KubeApiError extends Error {
  constructor(
    readonly code: number,
    readonly reason: string,
    message: string,
  ) {
    super(message);
    this.name = 'KubeApiError';
  }
}

export function isConflict(err: unknown): boolean {
  return err instanceof KubeApiError && err.code === 409;
}
export function isNotFound(err: unknown): boolean {
  return err instanceof KubeApiError && err.code === 404;
}
export function isGone(err: unknown): boolean {
  return err instanceof KubeApiError && (err.code === 410 || err.reason === 'Expired' || err.reason === 'Gone');
}

/**
 * Builds the KubeConfig: the given file, or the in-cluster service account. `inClusterRoot` is a
 * path prefix for the service-account files (tests); the error names everything that was tried.
 */
export function loadKubeConfig(
  opts: { kubeconfig?: string | undefined },
  env: NodeJS.ProcessEnv = process.env,
  inClusterRoot = '',
): KubeConfig {
  const kc = new (k8s().KubeConfig)();
  if (opts.kubeconfig) {
    try {
      kc.loadFromFile(opts.kubeconfig);
    } catch (err) {
      // The parser's message may quote the file, and the file holds the credentials: first line only, redacted.
      const first = String((err as Error).message ?? err).split('\n')[0] ?? '';
      throw new Error(`kubeconfig ${opts.kubeconfig}: cannot load it: ${scrub(first)}`);
    }
    if (!kc.getCurrentCluster()) throw new Error(`kubeconfig ${opts.kubeconfig}: its current context names no cluster`);
    return kc;
  }
  const tokenFile = path.join(inClusterRoot, SERVICE_ACCOUNT_DIR, 'token');
  const missing: string[] = [];
  if (!env.KUBERNETES_SERVICE_HOST || !env.KUBERNETES_SERVICE_PORT) missing.push('KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT are not set');
  if (!fs.existsSync(tokenFile)) missing.push(`${tokenFile} does not exist`);
  if (missing.length > 0) {
    throw new Error(
      `no Kubernetes credentials: no kubeconfig was given (kubernetes.kubeconfig), and this is not a pod with a service account (${missing.join('; ')})`,
    );
  }
  // loadFromCluster reads KUBERNETES_SERVICE_* from process.env; an injected env is applied around it.
  const saved = { host: process.env.KUBERNETES_SERVICE_HOST, port: process.env.KUBERNETES_SERVICE_PORT };
  process.env.KUBERNETES_SERVICE_HOST = env.KUBERNETES_SERVICE_HOST;
  process.env.KUBERNETES_SERVICE_PORT = env.KUBERNETES_SERVICE_PORT;
  try {
    kc.loadFromCluster(inClusterRoot);
  } finally {
    restoreEnv('KUBERNETES_SERVICE_HOST', saved.host);
    restoreEnv('KUBERNETES_SERVICE_PORT', saved.port);
  }
  return kc;
}

function restoreEnv(key: string, value: string | undefined): void {
  if (value === undefined) delete process.env[key];
  else process.env[key] = value;
}

/**
 * The namespace to watch: the setting; else the pod's own namespace (service-account file); else
 * the kubeconfig context's namespace; else `default` (kubectl's order, with the pod first).
 */
export function resolveNamespace(
  settings: Pick<KubernetesSettings, 'namespace' | 'kubeconfig'>,
  options: { kubeConfig?: KubeConfig; inClusterRoot?: string } = {},
): string {
  if (settings.namespace) return settings.namespace;
  try {
    const ns = fs.readFileSync(path.join(options.inClusterRoot ?? '', SERVICE_ACCOUNT_DIR, 'namespace'), 'utf8').trim();
    if (ns) return ns;
  } catch {
    // Not in a pod: fall through to the kubeconfig.
  }
  let kc = options.kubeConfig;
  if (!kc && settings.kubeconfig) {
    try {
      kc = loadKubeConfig({ kubeconfig: settings.kubeconfig });
    } catch {
      kc = undefined;
    }
  }
  const ctx = kc ? kc.getContextObject(kc.getCurrentContext()) : null;
  return ctx?.namespace || 'default';
}

/** Bearer tokens and other secret-looking fragments out of a message (the logger's own redaction). */
function scrub(message: string, secrets: string[] = []): string {
  let out = String(redact(message));
  for (const s of secrets) if (s.length >= 4) out = out.split(s).join('[REDACTED]');
  return out;
}

const REQUEST_TIMEOUT_MS = 30_000;

export class KubernetesClient {
  private readonly custom: CustomObjectsApi;
  private readonly coordination: CoordinationV1Api;
  private readonly core: CoreV1Api;
  private readonly watcher: Watch;
  /** Credentials that must never appear in an error we raise (the user's token, if inline). */
  private readonly secrets: string[];

  constructor(
    readonly kubeConfig: KubeConfig,
    private readonly opts: { requestTimeoutMs?: number } = {},
  ) {
    const lib = k8s();
    this.custom = kubeConfig.makeApiClient(lib.CustomObjectsApi);
    this.coordination = kubeConfig.makeApiClient(lib.CoordinationV1Api);
    this.core = kubeConfig.makeApiClient(lib.CoreV1Api);
    this.watcher = new lib.Watch(kubeConfig);
    const user = kubeConfig.getCurrentUser();
    this.secrets = [user?.token, user?.password].filter((s): s is string => typeof s === 'string');
  }

  static fromSettings(settings: Pick<KubernetesSettings, 'kubeconfig'>): KubernetesClient {
    return new KubernetesClient(loadKubeConfig({ kubeconfig: settings.kubeconfig }));
  }

  /** The API server's address, for logs (never the credentials). */
  get server(): string {
    return this.kubeConfig.getCurrentCluster()?.server ?? '-';
  }

  async listCustomObjects(plural: string, namespace: string): Promise<KubeList> {
    const list = await this.call(`list ${plural}.${GROUP} in namespace ${namespace}`, () =>
      this.custom.listNamespacedCustomObject({ group: GROUP, version: VERSION, namespace, plural }),
    );
    return list as KubeList;
  }

  async getCustomObject(plural: string, namespace: string, name: string): Promise<KubeObject> {
    return (await this.call(`get ${plural}.${GROUP} ${namespace}/${name}`, () =>
      this.custom.getNamespacedCustomObject({ group: GROUP, version: VERSION, namespace, plural, name }),
    )) as KubeObject;
  }

  /** PUT of the status subresource; body.metadata.resourceVersion makes it conditional (409 when stale). */
  async replaceCustomObjectStatus(plural: string, namespace: string, name: string, body: KubeObject): Promise<KubeObject> {
    return (await this.call(`update ${plural}.${GROUP} ${namespace}/${name} status`, () =>
      this.custom.replaceNamespacedCustomObjectStatus({ group: GROUP, version: VERSION, namespace, plural, name, body }),
    )) as KubeObject;
  }

  /**
   * Watches a kind from resourceVersion, with bookmarks, on the library's Watch (one HTTP stream).
   * The caller owns restarts: see KubernetesSource for why the library's informer is not used.
   */
  watchCustomObjects(
    plural: string,
    namespace: string,
    params: { resourceVersion: string; timeoutSeconds?: number },
    onEvent: (ev: WatchEvent) => void,
  ): WatchHandle {
    let resolveDone!: (err: Error | null) => void;
    const done = new Promise<Error | null>((r) => (resolveDone = r));
    let controller: AbortController | undefined;
    let stopped = false;
    const finish = (err: unknown) => {
      if (stopped) return resolveDone(null);
      if (err === null || err === undefined) return resolveDone(null);
      resolveDone(this.toError(`watch ${plural}.${GROUP} in namespace ${namespace}`, err));
    };
    const query: Record<string, string | number | boolean | undefined> = {
      resourceVersion: params.resourceVersion,
      allowWatchBookmarks: true,
      timeoutSeconds: params.timeoutSeconds,
    };
    this.watcher
      .watch(
        `/apis/${GROUP}/${VERSION}/namespaces/${encodeURIComponent(namespace)}/${plural}`,
        query,
        (type: string, object: unknown) => {
          if (stopped) return;
          onEvent({ type, object } as WatchEvent);
        },
        finish,
      )
      .then((c) => {
        controller = c;
        if (stopped) c.abort();
      })
      .catch(finish);
    return {
      stop: () => {
        stopped = true;
        controller?.abort();
        resolveDone(null);
      },
      done,
    };
  }

  async readLease(namespace: string, name: string): Promise<LeaseRecord | undefined> {
    try {
      const lease = await this.call(`get lease ${namespace}/${name}`, () => this.coordination.readNamespacedLease({ name, namespace }));
      return fromV1Lease(lease);
    } catch (err) {
      if (isNotFound(err)) return undefined;
      throw err;
    }
  }

  async createLease(namespace: string, lease: LeaseRecord): Promise<LeaseRecord> {
    const out = await this.call(`create lease ${namespace}/${lease.metadata.name}`, () =>
      this.coordination.createNamespacedLease({ namespace, body: toV1Lease(lease) }),
    );
    return fromV1Lease(out);
  }

  /** Conditional on lease.metadata.resourceVersion: 409 means someone else wrote it first. */
  async replaceLease(namespace: string, lease: LeaseRecord): Promise<LeaseRecord> {
    const name = lease.metadata.name;
    const out = await this.call(`update lease ${namespace}/${name}`, () =>
      this.coordination.replaceNamespacedLease({ name, namespace, body: toV1Lease(lease) }),
    );
    return fromV1Lease(out);
  }

  /** A core/v1 Event about a custom object, so `kubectl describe` shows it. */
  async createEvent(
    namespace: string,
    involved: { kind: string; name: string; uid?: string | undefined; resourceVersion?: string | undefined },
    type: 'Normal' | 'Warning',
    reason: string,
    message: string,
    component = 'polydev-reconciler',
  ): Promise<void> {
    const now = new Date();
    const body: CoreV1Event = {
      metadata: { generateName: `${involved.name}.`, namespace },
      involvedObject: {
        apiVersion: `${GROUP}/${VERSION}`,
        kind: involved.kind,
        name: involved.name,
        namespace,
        ...(involved.uid ? { uid: involved.uid } : {}),
        ...(involved.resourceVersion ? { resourceVersion: involved.resourceVersion } : {}),
      },
      type,
      reason,
      message: message.slice(0, 1024),
      firstTimestamp: now,
      lastTimestamp: now,
      count: 1,
      source: { component },
      reportingComponent: component,
    };
    await this.call(`create event about ${involved.kind}/${involved.name}`, () => this.core.createNamespacedEvent({ namespace, body }));
  }

  private async call<T>(what: string, fn: () => Promise<T>): Promise<T> {
    const ms = this.opts.requestTimeoutMs ?? REQUEST_TIMEOUT_MS;
    let timer: NodeJS.Timeout | undefined;
    // The generated client has no per-request deadline of its own; a hung API server must not
    // hang a renewal or a status write, so the caller stops waiting (the socket is the agent's).
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new KubeApiError(0, 'Timeout', `${what}: no answer from ${this.server} within ${ms} ms`)), ms);
      timer.unref();
    });
    try {
      return await Promise.race([fn(), timeout]);
    } catch (err) {
      throw this.toError(what, err);
    } finally {
      clearTimeout(timer);
    }
  }

  /** Any failure as a KubeApiError (HTTP status with the Status reason) or a plain Error; credentials scrubbed. */
  private toError(what: string, err: unknown): Error {
    if (err instanceof KubeApiError) return err;
    const e = err as { code?: unknown; statusCode?: unknown; body?: unknown; message?: unknown };
    const code = typeof e.code === 'number' ? e.code : typeof e.statusCode === 'number' ? e.statusCode : undefined;
    if (code !== undefined) {
      const status = parseStatus(e.body);
      const reason = status?.reason ?? (code === 404 ? 'NotFound' : code === 409 ? 'Conflict' : code === 410 ? 'Expired' : 'Unknown');
      // ApiException's own message embeds the response headers; the Status message is what people need.
      const detail = status?.message ?? (code === 401 ? 'Unauthorized' : code === 403 ? 'Forbidden' : `HTTP ${code}`);
      return new KubeApiError(code, reason, scrub(`${what}: ${code} ${reason}: ${detail}`, this.secrets));
    }
    const message = typeof e.message === 'string' ? e.message : String(err);
    return new Error(scrub(`${what}: ${message.split('\n')[0]}`, this.secrets));
  }
}

export function parseStatus(body: unknown): KubeStatus | undefined {
  let value = body;
  if (typeof value === 'string') {
    try {
      value = JSON.parse(value);
    } catch {
      return undefined;
    }
  }
  if (value && typeof value === 'object' && (value as { kind?: unknown }).kind === 'Status') return value as KubeStatus;
  return undefined;
}

/** The API server sends MicroTime as a string; the library types it as a Date subclass without converting. */
function timeString(v: unknown): string | undefined {
  if (v === undefined || v === null) return undefined;
  if (v instanceof Date) return new (k8s().V1MicroTime)(v.getTime()).toISOString();
  return String(v);
}

function fromV1Lease(l: V1Lease): LeaseRecord {
  const spec = l.spec ?? {};
  const out: LeaseRecord = { metadata: { name: l.metadata?.name ?? '' }, spec: {} };
  if (l.metadata?.namespace) out.metadata.namespace = l.metadata.namespace;
  if (l.metadata?.resourceVersion) out.metadata.resourceVersion = l.metadata.resourceVersion;
  if (spec.holderIdentity !== undefined && spec.holderIdentity !== null) out.spec.holderIdentity = spec.holderIdentity;
  if (spec.leaseDurationSeconds !== undefined) out.spec.leaseDurationSeconds = spec.leaseDurationSeconds;
  const acquire = timeString(spec.acquireTime);
  if (acquire) out.spec.acquireTime = acquire;
  const renew = timeString(spec.renewTime);
  if (renew) out.spec.renewTime = renew;
  if (spec.leaseTransitions !== undefined) out.spec.leaseTransitions = spec.leaseTransitions;
  return out;
}

/** MicroTime fields must go out with exactly six fractional digits (RFC3339Micro), which V1MicroTime writes. */
function toV1Lease(l: LeaseRecord): V1Lease {
  const micro = (s: string | undefined) => (s ? new (k8s().V1MicroTime)(Date.parse(s)) : undefined);
  return {
    apiVersion: 'coordination.k8s.io/v1',
    kind: 'Lease',
    metadata: {
      name: l.metadata.name,
      ...(l.metadata.namespace ? { namespace: l.metadata.namespace } : {}),
      ...(l.metadata.resourceVersion ? { resourceVersion: l.metadata.resourceVersion } : {}),
    },
    spec: {
      holderIdentity: l.spec.holderIdentity ?? '',
      ...(l.spec.leaseDurationSeconds !== undefined ? { leaseDurationSeconds: l.spec.leaseDurationSeconds } : {}),
      ...(l.spec.acquireTime ? { acquireTime: micro(l.spec.acquireTime) } : {}),
      ...(l.spec.renewTime ? { renewTime: micro(l.spec.renewTime) } : {}),
      ...(l.spec.leaseTransitions !== undefined ? { leaseTransitions: l.spec.leaseTransitions } : {}),
    },
  };
}

/** Formats a time as metav1.MicroTime (RFC 3339 with microseconds), e.g. for comparisons in tests. */
export function microTime(ms: number): string {
  return new (k8s().V1MicroTime)(ms).toISOString();
}
