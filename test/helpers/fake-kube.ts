// A small in-memory fake of the Kubernetes API endpoints the daemon uses, on node:http
// (127.0.0.1, port 0), following the documented API conventions:
//  - API concepts (https://kubernetes.io/docs/reference/using-api/api-concepts/): one global,
//    monotonically increasing resourceVersion; list returns the collection's resourceVersion;
//    watch from a resourceVersion replays later events then streams ADDED/MODIFIED/DELETED,
//    BOOKMARK when allowWatchBookmarks (object with only metadata.resourceVersion), and an ERROR
//    event with a 410 Expired Status when the version is older than the retained history;
//    timeoutSeconds ends the stream; watch without a version (or "0") starts with ADDED for
//    everything there is.
//  - Custom resources with a status subresource
//    (https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#status-subresource):
//    PUT of the main resource ignores status, PUT of /status ignores everything but status,
//    metadata.generation moves only on spec changes; updates are conditional on
//    metadata.resourceVersion (409 Conflict Status when stale, 422 when missing). Specs are
//    validated against the CRD's openAPIV3Schema from crds/ with its defaults applied
//    (`validate: false` stands for a cluster with an older CRD installed).
//  - coordination.k8s.io/v1 Leases (https://kubernetes.io/docs/concepts/architecture/leases/):
//    GET (404 NotFound Status), POST (409 AlreadyExists), PUT with the resourceVersion check;
//    acquireTime/renewTime must be metav1.MicroTime (RFC 3339 with 6 fractional digits).
//  - core/v1 Events: POST only (kept for tests to read).
// Every error is a v1 Status (kind Status, code, reason, message). Requests need the bearer token.
//
// Deliberately NOT implemented: other API groups or versions, label/field selectors, pagination
// (limit/continue are ignored), PATCH, finalizers and graceful deletion, resourceVersionMatch,
// CEL validation rules (x-kubernetes-validations), pruning of unknown fields, server-side apply.
//
// Test hooks: dropWatches() (resets every watch connection), compact() (history forgotten: older
// versions get 410), sendBookmarks(), injectStatusConflicts(n), blockToken(t) (requests with that
// token get their connection reset: a partitioned client), silentUpdate() (a change no watch
// sees), and `requests` (method, path, query of everything received).

import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { randomUUID } from 'node:crypto';
import type { AddressInfo } from 'node:net';
import type { Socket } from 'node:net';
import { Ajv, type ValidateFunction } from 'ajv';
import { createRequire } from 'node:module';
import { PassThrough } from 'node:stream';
import { loadKinds } from '../../src/desired/kinds.js';
import { createLogger, type Logger } from '../../src/observability/logger.js';

const addFormats = createRequire(import.meta.url)('ajv-formats') as (ajv: Ajv) => Ajv;

export const FAKE_GROUP = 'polydev.ai';
export const FAKE_VERSION = 'v1alpha1';

type Json = Record<string, unknown>;

export interface FakeObject {
  apiVersion: string;
  kind: string;
  metadata: {
    name: string;
    namespace: string;
    uid: string;
    generation?: number;
    resourceVersion: string;
    creationTimestamp: string;
    labels?: Record<string, string>;
    annotations?: Record<string, string>;
  };
  spec?: Json;
  status?: Json;
}

export interface RecordedRequest {
  method: string;
  path: string;
  query: Record<string, string>;
}

interface HistoryEntry {
  rv: number;
  plural: string;
  namespace: string;
  type: 'ADDED' | 'MODIFIED' | 'DELETED';
  object: FakeObject;
}

interface WatchConn {
  plural: string;
  namespace: string;
  bookmarks: boolean;
  res: http.ServerResponse;
  timer?: NodeJS.Timeout;
}

export interface FakeKubeOptions {
  token?: string;
  /** Further accepted tokens (a second client). */
  extraTokens?: string[];
  /** Validate custom objects against the CRD schemas (default true). */
  validate?: boolean;
  /** History entries retained for watches (default 1000). */
  historyLimit?: number;
}

export class FakeKube {
  readonly token: string;
  readonly requests: RecordedRequest[] = [];
  readonly events: Json[] = [];
  private readonly tokens: Set<string>;
  private readonly blocked = new Set<string>();
  private readonly server: http.Server;
  private readonly sockets = new Set<Socket>();
  private readonly objects = new Map<string, FakeObject>();
  private readonly leases = new Map<string, Json>();
  private history: HistoryEntry[] = [];
  /** Oldest resourceVersion a watch may start from (anything older is 410 Gone). */
  private oldestRv = 0;
  private rv = 100;
  private watches = new Set<WatchConn>();
  private statusConflicts = 0;
  private readonly kinds: Map<string, { kind: string; validate: ValidateFunction | undefined }>;
  address = '';

  constructor(private readonly opts: FakeKubeOptions = {}) {
    this.token = opts.token ?? `fake-token-${randomUUID()}`;
    this.tokens = new Set([this.token, ...(opts.extraTokens ?? [])]);
    const ajv = new Ajv({ allErrors: true, strict: false, useDefaults: true });
    addFormats(ajv);
    this.kinds = new Map(
      [...loadKinds().values()].map((k) => [
        k.plural,
        { kind: k.kind, validate: opts.validate === false ? undefined : ajv.compile(k.specSchema) },
      ]),
    );
    this.server = http.createServer((req, res) => this.handle(req, res));
    this.server.on('connection', (s) => {
      this.sockets.add(s);
      s.on('close', () => this.sockets.delete(s));
    });
  }

  async start(): Promise<this> {
    await new Promise<void>((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    this.address = `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
    return this;
  }

  async close(): Promise<void> {
    for (const w of this.watches) this.endWatch(w);
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  /** The global resourceVersion now. */
  get resourceVersion(): number {
    return this.rv;
  }

  get openWatches(): number {
    return this.watches.size;
  }

  // ---- test hooks --------------------------------------------------------------

  /** Resets every watch connection (a load balancer or API server restart). */
  dropWatches(): void {
    for (const w of [...this.watches]) {
      this.watches.delete(w);
      if (w.timer) clearTimeout(w.timer);
      w.res.socket?.destroy();
    }
  }

  /** Forgets the watch history, as etcd compaction does: watches from older versions get 410. */
  compact(): void {
    this.history = [];
    this.oldestRv = this.rv;
  }

  /** A BOOKMARK with the current resourceVersion on every watch that asked for them. */
  sendBookmarks(): void {
    for (const w of this.watches) {
      if (w.bookmarks) this.send(w, { type: 'BOOKMARK', object: { kind: this.kinds.get(w.plural)?.kind, apiVersion: `${FAKE_GROUP}/${FAKE_VERSION}`, metadata: { resourceVersion: String(this.rv) } } });
    }
  }

  /** The next n status PUTs answer 409 Conflict whatever their resourceVersion (another writer got there first). */
  injectStatusConflicts(n: number): void {
    this.statusConflicts = n;
  }

  /** Requests with this token get their connection reset until unblocked (a partitioned or frozen client). */
  blockToken(token: string, blocked = true): void {
    if (blocked) this.blocked.add(token);
    else this.blocked.delete(token);
  }

  /** Bumps a version without telling any watch (a lost event): only a relist notices. */
  silentUpdate(plural: string, namespace: string, name: string, spec: Json): void {
    const obj = this.objects.get(this.key(plural, namespace, name));
    if (!obj) throw new Error(`no ${plural} ${namespace}/${name}`);
    obj.spec = spec;
    obj.metadata.generation = (obj.metadata.generation ?? 1) + 1;
    obj.metadata.resourceVersion = String(++this.rv);
    this.oldestRv = this.rv; // the event is gone from history too
    this.history = [];
  }

  // ---- in-process object access (the same code paths as the HTTP endpoints) -------------

  create(plural: string, namespace: string, body: Json): FakeObject {
    const r = this.createObject(plural, namespace, body);
    if ('code' in r) throw new Error(`create failed: ${r.code} ${r.reason}: ${r.message}`);
    return r;
  }

  update(plural: string, namespace: string, name: string, mutate: (o: FakeObject) => void): FakeObject {
    const current = this.get(plural, namespace, name);
    if (!current) throw new Error(`no ${plural} ${namespace}/${name}`);
    const copy = structuredClone(current);
    mutate(copy);
    const r = this.replaceObject(plural, namespace, name, copy as unknown as Json, false);
    if ('code' in r) throw new Error(`update failed: ${r.code} ${r.reason}: ${r.message}`);
    return r;
  }

  /** Writes the status subresource, as another client (an earlier leader) would. */
  updateStatus(plural: string, namespace: string, name: string, status: Json): FakeObject {
    const current = this.get(plural, namespace, name);
    if (!current) throw new Error(`no ${plural} ${namespace}/${name}`);
    const r = this.replaceObject(plural, namespace, name, { ...structuredClone(current), status } as unknown as Json, true);
    if ('code' in r) throw new Error(`status update failed: ${r.code} ${r.reason}: ${r.message}`);
    return r;
  }

  delete(plural: string, namespace: string, name: string): boolean {
    return !('code' in this.deleteObject(plural, namespace, name));
  }

  get(plural: string, namespace: string, name: string): FakeObject | undefined {
    const o = this.objects.get(this.key(plural, namespace, name));
    return o ? structuredClone(o) : undefined;
  }

  lease(namespace: string, name: string): Json | undefined {
    const l = this.leases.get(`${namespace}/${name}`);
    return l ? structuredClone(l) : undefined;
  }

  /** Overwrites a Lease as another (non-cooperating) writer would. */
  putLease(namespace: string, name: string, mutate: (spec: Json) => void): void {
    const l = this.leases.get(`${namespace}/${name}`);
    if (!l) throw new Error(`no lease ${namespace}/${name}`);
    mutate(l.spec as Json);
    (l.metadata as Json).resourceVersion = String(++this.rv);
  }

  // ---- HTTP ----------------------------------------------------------------------

  private handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    const url = new URL(req.url ?? '/', 'http://fake');
    const query = Object.fromEntries(url.searchParams);
    this.requests.push({ method: req.method ?? 'GET', path: url.pathname, query });
    const auth = req.headers.authorization ?? '';
    const token = auth.startsWith('Bearer ') ? auth.slice(7) : '';
    if (this.blocked.has(token)) {
      req.socket.destroy();
      return;
    }
    if (!this.tokens.has(token)) return this.status(res, 401, 'Unauthorized', 'Unauthorized');
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      let body: Json | undefined;
      if (chunks.length > 0) {
        try {
          body = JSON.parse(Buffer.concat(chunks).toString('utf8')) as Json;
        } catch {
          return this.status(res, 400, 'BadRequest', 'the body is not JSON');
        }
      }
      this.route(req.method ?? 'GET', url.pathname, query, body, res);
    });
  }

  private route(method: string, p: string, query: Record<string, string>, body: Json | undefined, res: http.ServerResponse): void {
    let m = p.match(/^\/apis\/polydev\.ai\/v1alpha1\/namespaces\/([^/]+)\/([^/]+)(?:\/([^/]+)(\/status)?)?$/);
    if (m) {
      const [, ns, plural, name, sub] = m as unknown as [string, string, string, string | undefined, string | undefined];
      if (!this.kinds.has(plural)) return this.status(res, 404, 'NotFound', `the server could not find the requested resource`);
      if (!name) {
        if (method === 'GET' && (query.watch === 'true' || query.watch === '1')) return this.watch(plural, ns, query, res);
        if (method === 'GET') return this.json(res, 200, this.list(plural, ns));
        if (method === 'POST') return this.reply(res, this.createObject(plural, ns, body ?? {}), 201);
        return this.status(res, 405, 'MethodNotAllowed', `${method} is not supported here`);
      }
      if (method === 'GET') {
        const o = this.objects.get(this.key(plural, ns, name));
        return o ? this.json(res, 200, o) : this.notFound(res, `${plural}.${FAKE_GROUP}`, name);
      }
      if (method === 'PUT') return this.reply(res, this.replaceObject(plural, ns, name, body ?? {}, sub === '/status'), 200);
      if (method === 'DELETE' && !sub) return this.reply(res, this.deleteObject(plural, ns, name), 200);
      return this.status(res, 405, 'MethodNotAllowed', `${method} is not supported here`);
    }
    m = p.match(/^\/apis\/coordination\.k8s\.io\/v1\/namespaces\/([^/]+)\/leases(?:\/([^/]+))?$/);
    if (m) return this.leaseRoute(method, m[1]!, m[2], body, res);
    m = p.match(/^\/api\/v1\/namespaces\/([^/]+)\/events$/);
    if (m && method === 'POST') {
      const ev = { ...(body ?? {}), metadata: { ...((body?.metadata as Json) ?? {}), name: `ev-${randomUUID().slice(0, 8)}`, namespace: m[1], resourceVersion: String(++this.rv) } };
      this.events.push(ev);
      return this.json(res, 201, ev);
    }
    return this.status(res, 404, 'NotFound', 'the server could not find the requested resource');
  }

  private key(plural: string, ns: string, name: string): string {
    return `${plural}/${ns}/${name}`;
  }

  private list(plural: string, ns: string): Json {
    const items = [...this.objects.entries()]
      .filter(([k]) => k.startsWith(`${plural}/${ns}/`))
      .map(([, o]) => o);
    return {
      apiVersion: `${FAKE_GROUP}/${FAKE_VERSION}`,
      kind: `${this.kinds.get(plural)!.kind}List`,
      metadata: { resourceVersion: String(this.rv) },
      items,
    };
  }

  private validateSpec(plural: string, name: string, spec: unknown): StatusBody | undefined {
    const v = this.kinds.get(plural)?.validate;
    if (!v || v(spec)) return undefined;
    const first = v.errors?.[0];
    return statusBody(422, 'Invalid', `${this.kinds.get(plural)!.kind}.${FAKE_GROUP} "${name}" is invalid: spec${first?.instancePath.replace(/\//g, '.') ?? ''}: ${first?.message ?? 'invalid'}`);
  }

  private createObject(plural: string, ns: string, body: Json): FakeObject | StatusBody {
    const meta = (body.metadata ?? {}) as Json;
    const name = meta.name;
    if (typeof name !== 'string' || !name) return statusBody(422, 'Invalid', 'metadata.name: Required value');
    if (this.objects.has(this.key(plural, ns, name))) return statusBody(409, 'AlreadyExists', `${plural}.${FAKE_GROUP} "${name}" already exists`);
    const spec = structuredClone((body.spec ?? {}) as Json);
    const invalid = this.validateSpec(plural, name, spec);
    if (invalid) return invalid;
    const obj: FakeObject = {
      apiVersion: `${FAKE_GROUP}/${FAKE_VERSION}`,
      kind: this.kinds.get(plural)!.kind,
      metadata: {
        name,
        namespace: ns,
        uid: randomUUID(),
        generation: 1,
        resourceVersion: String(++this.rv),
        creationTimestamp: new Date().toISOString().replace(/\.\d+Z$/, 'Z'),
        ...(meta.labels ? { labels: meta.labels as Record<string, string> } : {}),
        ...(meta.annotations ? { annotations: meta.annotations as Record<string, string> } : {}),
      },
      spec,
    };
    this.objects.set(this.key(plural, ns, name), obj);
    this.emit(plural, ns, 'ADDED', obj);
    return obj;
  }

  private replaceObject(plural: string, ns: string, name: string, body: Json, statusOnly: boolean): FakeObject | StatusBody {
    const current = this.objects.get(this.key(plural, ns, name));
    if (!current) return statusBody(404, 'NotFound', `${plural}.${FAKE_GROUP} "${name}" not found`);
    const meta = (body.metadata ?? {}) as Json;
    if (typeof meta.resourceVersion !== 'string' || meta.resourceVersion === '') {
      return statusBody(422, 'Invalid', `${current.kind}.${FAKE_GROUP} "${name}" is invalid: metadata.resourceVersion: Invalid value: 0x0: must be specified for an update`);
    }
    const conflict = statusBody(409, 'Conflict', `Operation cannot be fulfilled on ${plural}.${FAKE_GROUP} "${name}": the object has been modified; please apply your changes to the latest version and try again`);
    if (statusOnly && this.statusConflicts > 0) {
      this.statusConflicts--;
      // Another writer won: the object moves on, as it would in a real cluster.
      current.metadata.resourceVersion = String(++this.rv);
      this.emit(plural, ns, 'MODIFIED', current);
      return conflict;
    }
    if (meta.resourceVersion !== current.metadata.resourceVersion) return conflict;
    const next = structuredClone(current);
    if (statusOnly) {
      if (body.status === undefined) delete next.status;
      else next.status = structuredClone(body.status as Json);
    } else {
      const spec = structuredClone((body.spec ?? {}) as Json);
      const invalid = this.validateSpec(plural, name, spec);
      if (invalid) return invalid;
      if (JSON.stringify(spec) !== JSON.stringify(current.spec ?? {})) next.metadata.generation = (current.metadata.generation ?? 1) + 1;
      next.spec = spec;
      if (meta.labels) next.metadata.labels = meta.labels as Record<string, string>;
      else delete next.metadata.labels;
      if (meta.annotations) next.metadata.annotations = meta.annotations as Record<string, string>;
      else delete next.metadata.annotations;
    }
    if (JSON.stringify(next) === JSON.stringify(current)) return current; // a no-op write does not bump the version
    next.metadata.resourceVersion = String(++this.rv);
    this.objects.set(this.key(plural, ns, name), next);
    this.emit(plural, ns, 'MODIFIED', next);
    return next;
  }

  private deleteObject(plural: string, ns: string, name: string): FakeObject | StatusBody {
    const key = this.key(plural, ns, name);
    const current = this.objects.get(key);
    if (!current) return statusBody(404, 'NotFound', `${plural}.${FAKE_GROUP} "${name}" not found`);
    this.objects.delete(key);
    const gone = structuredClone(current);
    gone.metadata.resourceVersion = String(++this.rv);
    this.emit(plural, ns, 'DELETED', gone);
    return gone;
  }

  private emit(plural: string, namespace: string, type: HistoryEntry['type'], object: FakeObject): void {
    const entry: HistoryEntry = { rv: Number(object.metadata.resourceVersion), plural, namespace, type, object: structuredClone(object) };
    this.history.push(entry);
    const limit = this.opts.historyLimit ?? 1000;
    if (this.history.length > limit) {
      const dropped = this.history.splice(0, this.history.length - limit);
      this.oldestRv = dropped[dropped.length - 1]!.rv;
    }
    for (const w of this.watches) {
      if (w.plural === plural && w.namespace === namespace) this.send(w, { type, object: entry.object });
    }
  }

  private watch(plural: string, ns: string, query: Record<string, string>, res: http.ServerResponse): void {
    res.writeHead(200, { 'content-type': 'application/json', 'transfer-encoding': 'chunked' });
    const w: WatchConn = { plural, namespace: ns, bookmarks: query.allowWatchBookmarks === 'true' || query.allowWatchBookmarks === '1', res };
    const from = query.resourceVersion;
    if (from && from !== '0') {
      const rv = Number(from);
      if (!Number.isFinite(rv) || rv < this.oldestRv) {
        this.send(w, { type: 'ERROR', object: { ...statusBody(410, 'Expired', `too old resource version: ${from} (${this.oldestRv})`) } });
        res.end();
        return;
      }
      for (const e of this.history) if (e.rv > rv && e.plural === plural && e.namespace === ns) this.send(w, { type: e.type, object: e.object });
    } else {
      for (const [k, o] of this.objects) if (k.startsWith(`${plural}/${ns}/`)) this.send(w, { type: 'ADDED', object: o });
    }
    this.watches.add(w);
    res.on('close', () => this.endWatch(w));
    const timeout = Number(query.timeoutSeconds);
    if (timeout > 0) {
      w.timer = setTimeout(() => this.endWatch(w), timeout * 1000);
      w.timer.unref();
    }
  }

  private endWatch(w: WatchConn): void {
    if (!this.watches.delete(w)) return;
    if (w.timer) clearTimeout(w.timer);
    if (!w.res.writableEnded) w.res.end();
  }

  private send(w: WatchConn, ev: Json): void {
    if (!w.res.writableEnded) w.res.write(JSON.stringify(ev) + '\n');
  }

  private leaseRoute(method: string, ns: string, name: string | undefined, body: Json | undefined, res: http.ServerResponse): void {
    const key = `${ns}/${name ?? ''}`;
    const current = this.leases.get(key);
    if (method === 'GET' && name) return current ? this.json(res, 200, current) : this.notFound(res, 'leases.coordination.k8s.io', name);
    const bad = body ? this.checkLease(body) : 'no body';
    if (method === 'POST' && !name) {
      if (bad) return this.status(res, 400, 'BadRequest', bad);
      const n = (body!.metadata as Json | undefined)?.name;
      if (typeof n !== 'string') return this.status(res, 422, 'Invalid', 'metadata.name: Required value');
      if (this.leases.has(`${ns}/${n}`)) return this.status(res, 409, 'AlreadyExists', `leases.coordination.k8s.io "${n}" already exists`);
      const lease = { apiVersion: 'coordination.k8s.io/v1', kind: 'Lease', metadata: { name: n, namespace: ns, uid: randomUUID(), resourceVersion: String(++this.rv) }, spec: body!.spec ?? {} };
      this.leases.set(`${ns}/${n}`, lease);
      return this.json(res, 201, lease);
    }
    if (method === 'PUT' && name) {
      if (bad) return this.status(res, 400, 'BadRequest', bad);
      if (!current) return this.notFound(res, 'leases.coordination.k8s.io', name);
      const rv = (body!.metadata as Json | undefined)?.resourceVersion;
      if (rv !== (current.metadata as Json).resourceVersion) {
        return this.status(res, 409, 'Conflict', `Operation cannot be fulfilled on leases.coordination.k8s.io "${name}": the object has been modified; please apply your changes to the latest version and try again`);
      }
      const lease = { ...current, metadata: { ...(current.metadata as Json), resourceVersion: String(++this.rv) }, spec: body!.spec ?? {} };
      this.leases.set(key, lease);
      return this.json(res, 200, lease);
    }
    return this.status(res, 405, 'MethodNotAllowed', `${method} is not supported here`);
  }

  /** The API server rejects MicroTime fields that are not RFC 3339 with exactly 6 fractional digits. */
  private checkLease(body: Json): string | undefined {
    const spec = (body.spec ?? {}) as Json;
    for (const f of ['acquireTime', 'renewTime']) {
      const v = spec[f];
      if (v !== undefined && v !== null && (typeof v !== 'string' || !/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d)$/.test(v))) {
        return `Lease in version "v1" cannot be handled as a Lease: spec.${f}: ${JSON.stringify(v)} is not a MicroTime (RFC 3339 with microseconds)`;
      }
    }
    return undefined;
  }

  private reply(res: http.ServerResponse, r: FakeObject | StatusBody, okCode: number): void {
    if ('code' in r) return this.json(res, r.code, r);
    this.json(res, okCode, r);
  }

  private notFound(res: http.ServerResponse, resource: string, name: string): void {
    this.status(res, 404, 'NotFound', `${resource} "${name}" not found`);
  }

  private status(res: http.ServerResponse, code: number, reason: string, message: string): void {
    this.json(res, code, statusBody(code, reason, message));
  }

  private json(res: http.ServerResponse, code: number, body: unknown): void {
    res.writeHead(code, { 'content-type': 'application/json' });
    res.end(JSON.stringify(body));
  }
}

interface StatusBody {
  kind: 'Status';
  apiVersion: 'v1';
  metadata: Json;
  status: 'Failure';
  message: string;
  reason: string;
  code: number;
}

function statusBody(code: number, reason: string, message: string): StatusBody {
  return { kind: 'Status', apiVersion: 'v1', metadata: {}, status: 'Failure', message, reason, code };
}

/**
 * A kubeconfig pointing at the fake. client-node refuses plain http unless the cluster says
 * insecure-skip-tls-verify, so the file says it (the fake has no TLS).
 */
export function writeKubeconfig(dir: string, server: string, token: string, opts: { namespace?: string; file?: string } = {}): string {
  const file = path.join(dir, opts.file ?? 'kubeconfig.yaml');
  const text = [
    'apiVersion: v1',
    'kind: Config',
    'clusters:',
    '- name: fake',
    '  cluster:',
    `    server: ${server}`,
    '    insecure-skip-tls-verify: true',
    'users:',
    '- name: fake-user',
    '  user:',
    `    token: ${token}`,
    'contexts:',
    '- name: fake',
    '  context:',
    '    cluster: fake',
    '    user: fake-user',
    ...(opts.namespace ? [`    namespace: ${opts.namespace}`] : []),
    'current-context: fake',
    '',
  ].join('\n');
  fs.writeFileSync(file, text, { mode: 0o600 });
  return file;
}

/** A started fake, its kubeconfig in a temp dir, both cleaned up when the test ends. */
export async function startFakeKube(
  t: { teardown(fn: () => void | Promise<void>): void },
  opts: FakeKubeOptions & { namespace?: string } = {},
): Promise<{ fake: FakeKube; kubeconfig: string; dir: string }> {
  const fake = await new FakeKube(opts).start();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'polydev-kube-'));
  t.teardown(async () => {
    await fake.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  const kubeconfig = writeKubeconfig(dir, fake.address, fake.token, opts.namespace ? { namespace: opts.namespace } : {});
  return { fake, kubeconfig, dir };
}

/** A logger whose output the test can read (to check what is, and what is never, logged). */
export function capturedLogger(): { logger: Logger; text: () => string } {
  const stream = new PassThrough();
  const chunks: string[] = [];
  stream.on('data', (c: Buffer) => chunks.push(c.toString('utf8')));
  return { logger: createLogger('debug', stream), text: () => chunks.join('') };
}
