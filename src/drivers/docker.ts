// Docker Engine driver: a small typed client for the Docker Engine API (v1.41, dockerd
// 20.10) over its unix socket, on node:http only, and the WarmPool `Engine` adapter.
//
// No dockerode/docker-modem: they pull in gRPC/ssh2 support we never use (15-22 MB RSS,
// 40-90 ms import). What we need is a handful of JSON endpoints, one streaming endpoint
// (/events) and the hijacked exec stream for writing credentials through stdin.
//
// Secrets (Injection env values and file contents) only ever travel through an exec's
// stdin: never argv, never the container's env, never logs or error messages.

import http from 'node:http';
import type { Socket } from 'node:net';
import { StringDecoder } from 'node:string_decoder';
import type { Duplex } from 'node:stream';

import {
  EngineError,
  LABELS,
  MANAGED_BY,
  SECRETS_DIR,
  ownershipLabels,
  type ContainerHealth,
  type ContainerResources,
  type ContainerSpec,
  type ContainerState,
  type Engine,
  type EngineEvent,
  type EngineName,
  type Injection,
  type ObservedContainer,
} from '../controllers/warmpool/engine.js';

export const DOCKER_API_VERSION = 'v1.41';
const API_PREFIX = `/${DOCKER_API_VERSION}`;

/** Mount options of the credentials tmpfs (SECRETS_DIR): private to the container user. */
export const SECRETS_TMPFS_OPTIONS = 'rw,nosuid,nodev,noexec,size=16m,mode=0700';

const DEFAULT_TIMEOUT_MS = 30_000;
const DEFAULT_EXEC_TIMEOUT_MS = 10_000;
const MAX_BODY_BYTES = 64 * 1024 * 1024;
const MAX_EXEC_OUTPUT_BYTES = 1024 * 1024;
const WATCH_BACKOFF_MIN_MS = 250;
const WATCH_BACKOFF_MAX_MS = 10_000;
/** An event stream that stayed up this long resets the reconnect backoff (a flapping engine does not). */
const WATCH_STABLE_MS = 5_000;

// ---------------------------------------------------------------------------------------
// Small JSON narrowing helpers (everything from the socket is `unknown` until checked).

type JsonObject = Record<string, unknown>;

function isObject(v: unknown): v is JsonObject {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function str(o: JsonObject, key: string): string | undefined {
  const v = o[key];
  return typeof v === 'string' ? v : undefined;
}

function num(o: JsonObject, key: string): number | undefined {
  const v = o[key];
  return typeof v === 'number' && Number.isFinite(v) ? v : undefined;
}

function obj(o: JsonObject, key: string): JsonObject | undefined {
  const v = o[key];
  return isObject(v) ? v : undefined;
}

function stringMap(v: unknown): Record<string, string> {
  const out: Record<string, string> = {};
  if (!isObject(v)) return out;
  for (const [k, val] of Object.entries(v)) if (typeof val === 'string') out[k] = val;
  return out;
}

function errMessage(err: unknown): string {
  if (err instanceof Error) {
    const code = (err as NodeJS.ErrnoException).code;
    return code && !err.message.includes(code) ? `${code}: ${err.message}` : err.message;
  }
  return String(err);
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

// ---------------------------------------------------------------------------------------
// The client.

export interface DockerClientOptions {
  socketPath: string;
  /** Upper bound of every request (connect + response), default 30 s. */
  requestTimeoutMs?: number;
  /** Keep-alive connections to dockerd, default 32. */
  maxSockets?: number;
}

export interface DockerRequestOptions {
  /** Serialised as the JSON request body. */
  json?: unknown;
  /** A raw body (e.g. a tar for /images/create?fromSrc=-); wins over `json`. */
  body?: Buffer;
  contentType?: string;
  timeoutMs?: number;
}

export interface DockerResponse {
  status: number;
  /** Parsed JSON when the body is JSON, else undefined. */
  json: unknown;
  text: string;
}

/** A non-2xx answer from dockerd; `message` is Docker's own error text. */
export class DockerApiError extends Error {
  constructor(
    readonly status: number,
    readonly dockerMessage: string,
    readonly method: string,
    readonly path: string,
    readonly socketPath: string,
  ) {
    super(`Docker engine at unix://${socketPath}: ${method} ${path} failed: ${status} ${dockerMessage}`);
    this.name = 'DockerApiError';
  }
}

export interface ExecResult {
  exitCode: number;
  stdout: Buffer;
  stderr: Buffer;
}

export interface ExecOptions {
  /** Written to the process' stdin, then stdin is closed (EOF). Omitted: stdin is not attached. */
  stdin?: Buffer | string;
  /** Overall bound for create + run + exit, default 10 s. */
  timeoutMs?: number;
  user?: string;
}

/** Query string from a plain object; arrays/objects are JSON-encoded (Docker `filters`). */
export function query(params: Record<string, string | number | boolean | undefined | object>): string {
  const parts: string[] = [];
  for (const [k, v] of Object.entries(params)) {
    if (v === undefined) continue;
    const s = typeof v === 'object' ? JSON.stringify(v) : String(v);
    parts.push(`${encodeURIComponent(k)}=${encodeURIComponent(s)}`);
  }
  return parts.length ? `?${parts.join('&')}` : '';
}

/** Splits Docker's multiplexed (Tty:false) attach stream: frames of [type,0,0,0,size32be] + payload. */
export class StreamDemuxer {
  private buf: Buffer = Buffer.alloc(0);
  readonly stdout: Buffer[] = [];
  readonly stderr: Buffer[] = [];
  private sizes = { stdout: 0, stderr: 0 };

  constructor(private readonly limit = MAX_EXEC_OUTPUT_BYTES) {}

  push(chunk: Buffer): void {
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
    while (this.buf.length >= 8) {
      const type = this.buf[0];
      const size = this.buf.readUInt32BE(4);
      if (this.buf.length < 8 + size) break;
      const payload = this.buf.subarray(8, 8 + size);
      this.buf = this.buf.subarray(8 + size);
      const which = type === 2 ? 'stderr' : type === 1 ? 'stdout' : undefined;
      if (!which || this.sizes[which] >= this.limit) continue;
      const part = payload.subarray(0, this.limit - this.sizes[which]);
      this.sizes[which] += part.length;
      this[which].push(Buffer.from(part));
    }
  }

  result(): { stdout: Buffer; stderr: Buffer } {
    return { stdout: Buffer.concat(this.stdout), stderr: Buffer.concat(this.stderr) };
  }
}

function isConnectionError(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  return (
    code === 'ENOENT' ||
    code === 'ECONNREFUSED' ||
    code === 'EACCES' ||
    code === 'EPERM' ||
    code === 'ECONNRESET' ||
    code === 'EPIPE' ||
    code === 'ENOTSOCK' ||
    code === 'ENOTDIR' ||
    code === 'ETIMEDOUT' ||
    code === 'ECONNABORTED'
  );
}

class RequestTimeout extends Error {
  override readonly name = 'RequestTimeout';
  readonly code = 'ETIMEDOUT';
}

export class DockerClient {
  readonly socketPath: string;
  readonly requestTimeoutMs: number;
  private readonly agent: http.Agent;

  constructor(opts: DockerClientOptions) {
    this.socketPath = opts.socketPath;
    this.requestTimeoutMs = opts.requestTimeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.agent = new http.Agent({ keepAlive: true, maxSockets: opts.maxSockets ?? 32, maxFreeSockets: 8 });
  }

  /** The EngineError every connection-level failure (and timeout) becomes. */
  unavailable(why: unknown): EngineError {
    return new EngineError('EngineUnavailable', `Docker engine at unix://${this.socketPath} is not reachable: ${errMessage(why)}`);
  }

  /**
   * One request; resolves with any HTTP status (callers decide what is an error).
   * Connection failures and timeouts reject with EngineError('EngineUnavailable').
   */
  async request(method: string, path: string, opts: DockerRequestOptions = {}): Promise<DockerResponse> {
    try {
      return await this.requestOnce(method, path, opts);
    } catch (err) {
      // A keep-alive socket dockerd closed while idle: the request never reached it.
      if ((err as { retryable?: boolean }).retryable) {
        return this.requestOnce(method, path, opts).catch((e: unknown) => {
          throw e instanceof EngineError ? e : this.unavailable(e);
        });
      }
      if (err instanceof EngineError) throw err;
      throw new EngineError('EngineError', `Docker engine at unix://${this.socketPath}: ${method} ${path}: ${errMessage(err)}`);
    }
  }

  private requestOnce(method: string, path: string, opts: DockerRequestOptions): Promise<DockerResponse> {
    const timeoutMs = opts.timeoutMs ?? this.requestTimeoutMs;
    let payload: Buffer | undefined;
    let contentType = opts.contentType;
    if (opts.body) payload = opts.body;
    else if (opts.json !== undefined) {
      payload = Buffer.from(JSON.stringify(opts.json), 'utf8');
      contentType ??= 'application/json';
    }
    const headers: http.OutgoingHttpHeaders = { Host: 'docker' };
    if (payload) {
      headers['Content-Type'] = contentType ?? 'application/octet-stream';
      headers['Content-Length'] = payload.length;
    }
    return new Promise<DockerResponse>((resolve, reject) => {
      let settled = false;
      const finish = (err: unknown, res?: DockerResponse): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        if (err) reject(err);
        else resolve(res as DockerResponse);
      };
      const req = http.request({ socketPath: this.socketPath, path: API_PREFIX + path, method, headers, agent: this.agent });
      const timer = setTimeout(() => {
        req.destroy(new RequestTimeout(`no answer to ${method} ${path} within ${timeoutMs} ms`));
      }, timeoutMs);
      req.on('error', (err) => {
        const code = (err as NodeJS.ErrnoException).code;
        if (req.reusedSocket && (code === 'ECONNRESET' || code === 'EPIPE')) finish(Object.assign(err, { retryable: true }));
        else finish(isConnectionError(err) || err instanceof RequestTimeout ? this.unavailable(err) : err);
      });
      req.on('response', (res) => {
        const chunks: Buffer[] = [];
        let size = 0;
        res.on('data', (c: Buffer) => {
          size += c.length;
          if (size > MAX_BODY_BYTES) {
            req.destroy(new Error(`response to ${method} ${path} from unix://${this.socketPath} exceeds ${MAX_BODY_BYTES} bytes`));
            return;
          }
          chunks.push(c);
        });
        res.on('error', (err) => finish(isConnectionError(err) || err instanceof RequestTimeout ? this.unavailable(err) : err));
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString('utf8');
          let json: unknown;
          const ct = String(res.headers['content-type'] ?? '');
          if (text && (ct.includes('json') || /^\s*[[{]/.test(text))) {
            try {
              json = JSON.parse(text);
            } catch {
              json = undefined;
            }
          }
          finish(undefined, { status: res.statusCode ?? 0, json, text });
        });
      });
      req.end(payload);
    });
  }

  /** Docker's error text from an error response ({"message": …}), else the raw body. */
  static messageOf(res: DockerResponse): string {
    if (isObject(res.json)) {
      const m = str(res.json, 'message');
      if (m) return m;
    }
    return res.text.trim() || `HTTP ${res.status}`;
  }

  apiError(method: string, path: string, res: DockerResponse): DockerApiError {
    return new DockerApiError(res.status, DockerClient.messageOf(res), method, path, this.socketPath);
  }

  /** request() that requires a 2xx status (or one of `okStatuses`). */
  async call(method: string, path: string, opts: DockerRequestOptions & { okStatuses?: number[] } = {}): Promise<DockerResponse> {
    const res = await this.request(method, path, opts);
    if ((res.status >= 200 && res.status < 300) || opts.okStatuses?.includes(res.status)) return res;
    throw this.apiError(method, path, res);
  }

  /**
   * Runs a command in a running container through the exec API. stdin (when given) is
   * streamed over the hijacked connection and closed with a half-close, which dockerd
   * 20.10 turns into EOF on the process' stdin. Resolves with the exit code and the
   * demultiplexed output (each capped at 1 MiB).
   */
  async exec(containerId: string, cmd: string[], opts: ExecOptions = {}): Promise<ExecResult> {
    const timeoutMs = opts.timeoutMs ?? DEFAULT_EXEC_TIMEOUT_MS;
    const deadline = Date.now() + timeoutMs;
    const left = (): number => Math.max(1, deadline - Date.now());
    const withStdin = opts.stdin !== undefined;
    const created = await this.call('POST', `/containers/${encodeURIComponent(containerId)}/exec`, {
      json: {
        AttachStdin: withStdin,
        AttachStdout: true,
        AttachStderr: true,
        Tty: false,
        Cmd: cmd,
        ...(opts.user ? { User: opts.user } : {}),
      },
      timeoutMs: left(),
    });
    const execId = isObject(created.json) ? str(created.json, 'Id') : undefined;
    if (!execId) throw new Error(`Docker engine at unix://${this.socketPath}: exec create in container ${containerId} returned no Id`);
    const stdin = opts.stdin === undefined ? undefined : Buffer.isBuffer(opts.stdin) ? opts.stdin : Buffer.from(opts.stdin, 'utf8');
    const out = await this.hijackExec(execId, containerId, stdin, left());
    // The stream ends when the process' output closes; the exit code follows shortly.
    let delay = 5;
    for (;;) {
      const res = await this.call('GET', `/exec/${execId}/json`, { timeoutMs: left() });
      const j = isObject(res.json) ? res.json : {};
      if (j['Running'] !== true) {
        const exitCode = num(j, 'ExitCode');
        return { exitCode: exitCode ?? -1, ...out };
      }
      if (Date.now() + delay >= deadline) {
        throw new Error(`exec in container ${containerId} (unix://${this.socketPath}) still running after ${timeoutMs} ms`);
      }
      await sleep(delay);
      delay = Math.min(delay * 2, 100);
    }
  }

  private hijackExec(execId: string, containerId: string, stdin: Buffer | undefined, timeoutMs: number): Promise<{ stdout: Buffer; stderr: Buffer }> {
    const body = Buffer.from(JSON.stringify({ Detach: false, Tty: false }), 'utf8');
    const path = `/exec/${execId}/start`;
    return new Promise((resolve, reject) => {
      let settled = false;
      let sock: Duplex | undefined;
      const demux = new StreamDemuxer();
      const finish = (err?: unknown): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        if (err) {
          sock?.destroy();
          req.destroy();
          reject(err);
        } else resolve(demux.result());
      };
      // A dedicated connection: an upgraded socket never goes back to the keep-alive pool.
      const req = http.request({
        socketPath: this.socketPath,
        path: API_PREFIX + path,
        method: 'POST',
        agent: false,
        headers: {
          Host: 'docker',
          'Content-Type': 'application/json',
          'Content-Length': body.length,
          Connection: 'Upgrade',
          Upgrade: 'tcp',
        },
      });
      const timer = setTimeout(() => {
        finish(new Error(`exec in container ${containerId} (unix://${this.socketPath}) did not finish within ${timeoutMs} ms`));
      }, timeoutMs);
      req.on('error', (err) => finish(isConnectionError(err) ? this.unavailable(err) : err));
      req.on('response', (res) => {
        // No upgrade: dockerd answered with an error (404 no such exec, 409 not running…).
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString('utf8');
          let json: unknown;
          try {
            json = JSON.parse(text);
          } catch {
            json = undefined;
          }
          const r: DockerResponse = { status: res.statusCode ?? 0, json, text };
          finish(this.apiError('POST', path, r));
        });
      });
      req.on('upgrade', (_res, socket: Socket, head: Buffer) => {
        sock = socket;
        if (head.length) demux.push(head);
        socket.on('data', (c: Buffer) => demux.push(c));
        socket.on('end', () => {
          finish();
          socket.destroy();
        });
        socket.on('close', () => finish());
        // EPIPE/ECONNRESET while writing stdin: the process exited without reading it all
        // (e.g. mkdir failed). Not an engine failure: the exit code tells what happened.
        socket.on('error', () => finish());
        if (stdin && stdin.length) socket.write(stdin);
        // Half-close: dockerd sees EOF on the hijacked connection and closes the process' stdin.
        socket.end();
      });
      req.end(body);
    });
  }

  /** Destroys the keep-alive pool. */
  close(): void {
    this.agent.destroy();
  }
}

// ---------------------------------------------------------------------------------------
// Mapping Docker's JSON onto ObservedContainer.

const STATES: readonly ContainerState[] = ['created', 'running', 'restarting', 'paused', 'exited', 'dead', 'removing'];

function toState(s: string | undefined): ContainerState {
  return (STATES as readonly string[]).includes(s ?? '') ? (s as ContainerState) : 'dead';
}

/** Health from the /containers/json `Status` text ("Up 3 s (healthy)", "(health: starting)"). */
export function healthFromStatus(status: string): ContainerHealth | undefined {
  if (/\(unhealthy\)/.test(status)) return 'unhealthy';
  if (/\(healthy\)/.test(status)) return 'healthy';
  if (/\(health: starting\)/.test(status)) return 'starting';
  return undefined;
}

/** Exit code from the /containers/json `Status` text ("Exited (137) 2 seconds ago"). */
export function exitCodeFromStatus(status: string): number | undefined {
  const m = /^Exited \((-?\d+)\)/.exec(status.trim());
  return m ? Number(m[1]) : undefined;
}

function addressOf(networks: JsonObject | undefined, network: string, name: string): string {
  const n = networks ? obj(networks, network) : undefined;
  const ip = n ? str(n, 'IPAddress') : undefined;
  return ip ? ip : `container:${name}`;
}

function ownership(labels: Record<string, string>): { pool: string; slot: string; specHash: string; claim?: string } | undefined {
  const pool = labels[LABELS.pool];
  const slot = labels[LABELS.slot];
  if (!pool || !slot) return undefined;
  const claim = labels[LABELS.claim];
  return { pool, slot, specHash: labels[LABELS.specHash] ?? '', ...(claim ? { claim } : {}) };
}

/** One entry of GET /containers/json → ObservedContainer (undefined without pool/slot labels). */
export function fromListEntry(entry: unknown, network: string): ObservedContainer | undefined {
  if (!isObject(entry)) return undefined;
  const id = str(entry, 'Id');
  if (!id) return undefined;
  const own = ownership(stringMap(entry['Labels']));
  if (!own) return undefined;
  const names = Array.isArray(entry['Names']) ? entry['Names'].filter((n): n is string => typeof n === 'string') : [];
  const name = (names[0] ?? id).replace(/^\//, '');
  const status = str(entry, 'Status') ?? '';
  const state = toState(str(entry, 'State'));
  const health = healthFromStatus(status);
  const exitCode = state === 'exited' || state === 'dead' ? exitCodeFromStatus(status) : undefined;
  const ns = obj(entry, 'NetworkSettings');
  return {
    id,
    name,
    ...own,
    state,
    ...(health ? { health } : {}),
    createdAt: (num(entry, 'Created') ?? 0) * 1000,
    ...(exitCode !== undefined ? { exitCode } : {}),
    address: addressOf(ns ? obj(ns, 'Networks') : undefined, network, name),
  };
}

/** GET /containers/{id}/json → ObservedContainer (undefined without pool/slot labels). */
export function fromInspect(info: unknown, network: string): ObservedContainer | undefined {
  if (!isObject(info)) return undefined;
  const id = str(info, 'Id');
  if (!id) return undefined;
  const config = obj(info, 'Config') ?? {};
  const own = ownership(stringMap(config['Labels']));
  if (!own) return undefined;
  const name = (str(info, 'Name') ?? id).replace(/^\//, '');
  const st = obj(info, 'State') ?? {};
  const state = toState(str(st, 'Status'));
  const healthObj = obj(st, 'Health');
  const hs = healthObj ? str(healthObj, 'Status') : undefined;
  const health: ContainerHealth | undefined = hs === 'healthy' || hs === 'unhealthy' || hs === 'starting' ? hs : undefined;
  const exitCode = state === 'exited' || state === 'dead' ? num(st, 'ExitCode') : undefined;
  const created = Date.parse(str(info, 'Created') ?? '');
  const ns = obj(info, 'NetworkSettings');
  return {
    id,
    name,
    ...own,
    state,
    ...(health ? { health } : {}),
    createdAt: Number.isFinite(created) ? created : 0,
    ...(exitCode !== undefined ? { exitCode } : {}),
    address: addressOf(ns ? obj(ns, 'Networks') : undefined, network, name),
  };
}

// ---------------------------------------------------------------------------------------
// The create body (pure).

export interface DeviceRequest {
  Driver: string;
  Count: number;
  Capabilities: string[][];
}

/** `vendor/type` device names → Docker DeviceRequests (`nvidia/gpu` → driver nvidia, capability gpu). */
export function deviceRequests(devices: Array<{ name: string; count: number }> | undefined): DeviceRequest[] {
  const out: DeviceRequest[] = [];
  for (const d of devices ?? []) {
    const [vendor, type] = d.name.includes('/') ? [d.name.slice(0, d.name.indexOf('/')), d.name.slice(d.name.indexOf('/') + 1)] : [d.name, d.name];
    if (!vendor || !type) throw new Error(`device name ${JSON.stringify(d.name)} is not vendor/type`);
    out.push({ Driver: vendor, Count: d.count, Capabilities: [[type]] });
  }
  return out;
}

const MB = 1024 * 1024;
export const CPU_PERIOD_US = 100_000;

/**
 * CPU and memory limits as HostConfig fields (create and update). Swap is pinned to the memory
 * limit: no swap, and a later update can raise the limit (Docker refuses Memory > MemorySwap).
 */
export function resourceLimits(r: ContainerResources): JsonObject {
  const out: JsonObject = {};
  const memMB = r.memoryMaxMB ?? r.memoryMB;
  if (memMB !== undefined) {
    out['Memory'] = Math.round(memMB * MB);
    out['MemorySwap'] = Math.round(memMB * MB);
  }
  if (r.memoryMaxMB !== undefined && r.memoryMB !== undefined) out['MemoryReservation'] = Math.round(r.memoryMB * MB);
  if (r.cpuMHz !== undefined && r.cpuMHz > 0) {
    out['CpuShares'] = Math.max(2, Math.round((r.cpuMHz * 1024) / 1000));
    out['CpuPeriod'] = CPU_PERIOD_US;
    out['CpuQuota'] = Math.max(1000, Math.round((r.cpuMHz / 1000) * CPU_PERIOD_US));
  }
  return out;
}

/**
 * The POST /containers/create body for a spec. Pure. 1000 MHz = one CPU: CpuQuota over a
 * 100 ms period (at least 1 ms) caps it, CpuShares (≥ 2) weighs it under contention.
 */
export function buildCreateBody(spec: ContainerSpec, network: string): JsonObject {
  if (!spec.image) throw new EngineError('StartFailed', `container ${spec.name}: the docker engine needs an image (pool ${spec.pool})`);
  const r = spec.resources;
  const hostConfig: JsonObject = {
    NetworkMode: network,
    Tmpfs: { [SECRETS_DIR]: SECRETS_TMPFS_OPTIONS },
    RestartPolicy: { Name: 'no' },
    ...resourceLimits(r),
  };
  const devs = deviceRequests(r.devices);
  if (devs.length) hostConfig['DeviceRequests'] = devs;

  const labels = ownershipLabels(spec);
  const body: JsonObject = {
    Image: spec.image,
    Env: Object.entries(spec.env).map(([k, v]) => `${k}=${v}`),
    Labels: labels,
    HostConfig: hostConfig,
  };
  if (spec.command && spec.command.length) {
    body['Entrypoint'] = spec.command;
    body['Cmd'] = spec.args ?? [];
  } else if (spec.args) {
    body['Cmd'] = spec.args;
  }
  return body;
}

// ---------------------------------------------------------------------------------------
// Injection helpers (pure).

const ENV_KEY = /^[A-Za-z_][A-Za-z0-9_]*$/;

/** `KEY=value` lines for SECRETS_DIR/env; the error names the key, never the value. */
export function renderEnvFile(env: Record<string, string>): string {
  let out = '';
  for (const [k, v] of Object.entries(env)) {
    if (!ENV_KEY.test(k)) throw new Error(`injection env key ${JSON.stringify(k)} is not a valid variable name`);
    if (typeof v !== 'string' || /[\n\r\0]/.test(v)) throw new Error(`injection env value of ${k} contains a newline or NUL`);
    out += `${k}=${v}\n`;
  }
  return out;
}

/** SECRETS_DIR/files/<rel> for a relative path without `.`/`..`/empty segments. */
export function injectedFilePath(rel: string): string {
  const bad = (why: string): Error => new Error(`injection file path ${JSON.stringify(rel)} ${why}`);
  if (!rel) throw bad('is empty');
  if (rel.startsWith('/')) throw bad('is absolute');
  if (rel.includes('\0')) throw bad('contains NUL');
  for (const seg of rel.split('/')) {
    if (seg === '..') throw bad('contains a .. segment');
    if (seg === '' || seg === '.') throw bad('contains an empty or . segment');
  }
  return `${SECRETS_DIR}/files/${rel}`;
}

export const WRITE_FILE_SCRIPT = 'umask 077 && mkdir -p "$(dirname "$1")" && cat > "$1"';
// `.[!.]*` misses names starting with two dots (`..x`); `..?*` catches those.
export const RECYCLE_SCRIPT = 'rm -rf /run/polydev/* "$1"/* "$1"/.[!.]* "$1"/..?* 2>/dev/null; true';

// ---------------------------------------------------------------------------------------
// Events.

/** One /events JSON object → EngineEvent (undefined for actions the controller does not need). */
export function toEngineEvent(ev: unknown): EngineEvent | undefined {
  if (!isObject(ev)) return undefined;
  if ((str(ev, 'Type') ?? 'container') !== 'container') return undefined;
  const action = str(ev, 'Action') ?? str(ev, 'status') ?? '';
  const actor = obj(ev, 'Actor') ?? {};
  const id = str(actor, 'ID') ?? str(ev, 'id');
  const attrs = stringMap(actor['Attributes']);
  const pool = attrs[LABELS.pool];
  if (!id || !pool) return undefined;
  let type: EngineEvent['type'] | undefined;
  if (action === 'start') type = 'start';
  else if (action === 'die' || action === 'oom') type = 'die';
  else if (action === 'destroy') type = 'destroy';
  else if (action.startsWith('health_status')) type = 'health';
  if (!type) return undefined;
  const nano = ev['timeNano'];
  const at = typeof nano === 'number' ? Math.floor(nano / 1e6) : typeof ev['time'] === 'number' ? (ev['time'] as number) * 1000 : undefined;
  return at === undefined ? { id, pool, type } : { id, pool, type, at };
}

/** Splits a stream of newline-separated JSON objects, across chunk boundaries. */
export class JsonLineSplitter {
  private decoder = new StringDecoder('utf8');
  private rest = '';

  push(chunk: Buffer, onValue: (v: unknown) => void): void {
    this.rest += this.decoder.write(chunk);
    let nl: number;
    while ((nl = this.rest.indexOf('\n')) >= 0) {
      const line = this.rest.slice(0, nl).trim();
      this.rest = this.rest.slice(nl + 1);
      if (!line) continue;
      let v: unknown;
      try {
        v = JSON.parse(line);
      } catch {
        continue;
      }
      onValue(v);
    }
  }
}

// ---------------------------------------------------------------------------------------
// The Engine.

export interface DockerEngineOptions {
  socketPath: string;
  /** NetworkMode of created containers, default 'none' (address: `container:<name>`). */
  network?: string;
  requestTimeoutMs?: number;
}

export class DockerEngine implements Engine {
  readonly name: EngineName = 'docker';
  readonly client: DockerClient;
  readonly network: string;
  private readonly watches = new Set<() => void>();

  constructor(opts: DockerEngineOptions) {
    this.client = new DockerClient({ socketPath: opts.socketPath, requestTimeoutMs: opts.requestTimeoutMs ?? DEFAULT_TIMEOUT_MS });
    this.network = opts.network ?? 'none';
  }

  get socketPath(): string {
    return this.client.socketPath;
  }

  private generic(err: unknown, what: string): Error {
    if (err instanceof EngineError) return err;
    if (err instanceof DockerApiError) return new EngineError('EngineError', err.message);
    return new EngineError('EngineError', `Docker engine at unix://${this.socketPath}: ${what}: ${errMessage(err)}`);
  }

  async ping(): Promise<void> {
    const res = await this.client.request('GET', '/_ping');
    if (res.status !== 200) throw this.client.unavailable(`GET /_ping answered ${res.status} ${DockerClient.messageOf(res)}`);
  }

  async list(owner: string): Promise<ObservedContainer[]> {
    const filters = { label: [`${LABELS.managedBy}=${MANAGED_BY}`, `${LABELS.owner}=${owner}`] };
    const path = `/containers/json${query({ all: 1, filters })}`;
    let res: DockerResponse;
    try {
      res = await this.client.call('GET', path);
    } catch (err) {
      throw this.generic(err, `listing containers of owner ${owner}`);
    }
    if (!Array.isArray(res.json)) throw new EngineError('EngineError', `Docker engine at unix://${this.socketPath}: GET /containers/json returned no array`);
    const out: ObservedContainer[] = [];
    for (const e of res.json) {
      // The filter already did it; re-check so a daemon bug can never hand us a foreign container.
      const labels = isObject(e) ? stringMap(e['Labels']) : {};
      if (labels[LABELS.owner] !== owner || labels[LABELS.managedBy] !== MANAGED_BY) continue;
      const c = fromListEntry(e, this.network);
      if (c) out.push(c);
    }
    return out;
  }

  /** GET /containers/{id}/json, raw; undefined on 404. */
  async inspectRaw(idOrName: string): Promise<JsonObject | undefined> {
    const res = await this.client.request('GET', `/containers/${encodeURIComponent(idOrName)}/json`);
    if (res.status === 404) return undefined;
    if (res.status !== 200 || !isObject(res.json)) throw this.generic(this.client.apiError('GET', `/containers/${idOrName}/json`, res), 'inspect');
    return res.json;
  }

  /** Inspect mapped to ObservedContainer; undefined when gone or not ours (no pool/slot labels). */
  async inspect(idOrName: string): Promise<ObservedContainer | undefined> {
    return fromInspect(await this.inspectRaw(idOrName), this.network);
  }

  async start(spec: ContainerSpec): Promise<ObservedContainer> {
    const body = buildCreateBody(spec, this.network);
    const createPath = `/containers/create${query({ name: spec.name })}`;
    const res = await this.client.request('POST', createPath, { json: body });
    let id: string;
    if (res.status === 201 && isObject(res.json) && str(res.json, 'Id')) {
      id = str(res.json, 'Id') as string;
    } else if (res.status === 404) {
      const msg = DockerClient.messageOf(res);
      if (/no such image/i.test(msg)) {
        throw new EngineError('ImageNotFound', `image ${spec.image} not found on the Docker engine (no registry pull is attempted)`);
      }
      throw new EngineError('EngineError', `Docker engine at unix://${this.socketPath}: creating container ${spec.name} failed: ${msg}`);
    } else if (res.status === 409) {
      return this.adopt(spec, DockerClient.messageOf(res));
    } else {
      const msg = DockerClient.messageOf(res);
      throw new EngineError(res.status === 400 ? 'StartFailed' : 'EngineError', `Docker engine at unix://${this.socketPath}: creating container ${spec.name} failed: ${res.status} ${msg}`);
    }
    return this.startCreated(id, spec.name);
  }

  /** A container with this name exists (crash between create and record, or a retry): take it over if it is the same slot. */
  private async adopt(spec: ContainerSpec, conflict: string): Promise<ObservedContainer> {
    const info = await this.inspectRaw(spec.name);
    const labels = info ? stringMap((obj(info, 'Config') ?? {})['Labels']) : {};
    const wantOwner = spec.labels[LABELS.owner];
    if (!info || labels[LABELS.slot] !== spec.slot || (wantOwner !== undefined && labels[LABELS.owner] !== wantOwner)) {
      throw new EngineError('EngineError', `container name ${spec.name} is taken on unix://${this.socketPath} by a container that is not slot ${spec.slot}: ${conflict}`);
    }
    const id = str(info, 'Id') as string;
    const st = obj(info, 'State') ?? {};
    if (st['Running'] === true) {
      const c = fromInspect(info, this.network);
      if (c) return c;
    }
    return this.startCreated(id, spec.name);
  }

  private async startCreated(id: string, name: string): Promise<ObservedContainer> {
    const startPath = `/containers/${id}/start`;
    // A connection failure here leaves it unknown whether it started: list()/adoption sorts that out.
    const res = await this.client.request('POST', startPath);
    if (res.status !== 204 && res.status !== 304) {
      const msg = DockerClient.messageOf(res);
      await this.removeQuietly(id);
      throw new EngineError('StartFailed', `container ${name} (${id.slice(0, 12)}) failed to start: ${msg}`);
    }
    const info = await this.inspectRaw(id);
    if (!info) throw new EngineError('StartFailed', `container ${name} (${id.slice(0, 12)}) disappeared right after start`);
    const st = obj(info, 'State') ?? {};
    if (st['Running'] !== true) {
      const code = num(st, 'ExitCode');
      const why = str(st, 'Error');
      await this.removeQuietly(id);
      throw new EngineError(
        'StartFailed',
        `container ${name} (${id.slice(0, 12)}) exited immediately after start${code !== undefined ? ` with code ${code}` : ''}${why ? `: ${why}` : ''}`,
      );
    }
    const c = fromInspect(info, this.network);
    if (!c) throw new EngineError('EngineError', `container ${name} (${id.slice(0, 12)}) lost its pool/slot labels`);
    return c;
  }

  private async removeQuietly(id: string): Promise<void> {
    try {
      await this.remove(id);
    } catch {
      /* best effort: list() will show it and the controller will remove it again */
    }
  }

  async remove(id: string): Promise<void> {
    const path = `/containers/${encodeURIComponent(id)}${query({ force: 1, v: 1 })}`;
    const res = await this.client.request('DELETE', path);
    if (res.status === 204 || res.status === 200 || res.status === 404) return;
    const msg = DockerClient.messageOf(res);
    if (res.status === 409 && /already in progress/i.test(msg)) return;
    throw new EngineError('EngineError', `Docker engine at unix://${this.socketPath}: removing container ${id} failed: ${res.status} ${msg}`);
  }

  private async writeFileInto(id: string, path: string, content: string, what: string): Promise<void> {
    let r: ExecResult;
    try {
      r = await this.client.exec(id, ['sh', '-c', WRITE_FILE_SCRIPT, 'sh', path], { stdin: content, timeoutMs: DEFAULT_EXEC_TIMEOUT_MS });
    } catch (err) {
      if (err instanceof EngineError) throw err;
      // Messages from dockerd or timeouts: none of them can contain the content.
      throw new Error(`injection into ${id} failed (${what}): ${errMessage(err)}`);
    }
    if (r.exitCode !== 0) {
      throw new Error(`injection into ${id} failed: exit ${r.exitCode}: ${r.stderr.toString('utf8').slice(0, 200)}`);
    }
  }

  async inject(id: string, injection: Injection): Promise<void> {
    // Validate everything before writing anything.
    const envText = injection.env && Object.keys(injection.env).length ? renderEnvFile(injection.env) : undefined;
    const files = Object.entries(injection.files ?? {}).map(([rel, content]) => {
      if (typeof content !== 'string') throw new Error(`injection file ${JSON.stringify(rel)}: content is not a string`);
      return { path: injectedFilePath(rel), content };
    });
    if (envText !== undefined) await this.writeFileInto(id, `${SECRETS_DIR}/env`, envText, 'env');
    for (const f of files) await this.writeFileInto(id, f.path, f.content, f.path);
  }

  async recycle(container: ObservedContainer, workspaceDir: string): Promise<ObservedContainer> {
    if (!workspaceDir.startsWith('/') || workspaceDir.replace(/\/+$/, '') === '' || workspaceDir.split('/').includes('..')) {
      throw new Error(`recycle of ${container.name}: workspace dir ${JSON.stringify(workspaceDir)} must be absolute, not / and without ..`);
    }
    const id = container.id;
    let info = await this.inspectRaw(id);
    if (!info) throw new EngineError('EngineError', `recycle: container ${container.name} (${id.slice(0, 12)}) no longer exists on unix://${this.socketPath}`);
    if ((obj(info, 'State') ?? {})['Running'] !== true) {
      // The wipe needs a running process namespace.
      const res = await this.client.request('POST', `/containers/${id}/start`);
      if (res.status !== 204 && res.status !== 304) {
        throw new EngineError('StartFailed', `recycle: container ${container.name} (${id.slice(0, 12)}) could not be started: ${DockerClient.messageOf(res)}`);
      }
    }
    let wipe: ExecResult;
    try {
      wipe = await this.client.exec(id, ['sh', '-c', RECYCLE_SCRIPT, 'sh', workspaceDir.replace(/\/+$/, '')]);
    } catch (err) {
      throw this.generic(err, `recycle: wiping container ${container.name}`);
    }
    if (wipe.exitCode !== 0) {
      throw new EngineError('EngineError', `recycle: wiping container ${container.name} (${id.slice(0, 12)}) exited ${wipe.exitCode}: ${wipe.stderr.toString('utf8').slice(0, 200)}`);
    }
    const rs = await this.client.request('POST', `/containers/${id}/restart${query({ t: 0 })}`);
    if (rs.status !== 204) {
      throw new EngineError('StartFailed', `recycle: restarting container ${container.name} (${id.slice(0, 12)}) failed: ${DockerClient.messageOf(rs)}`);
    }
    info = await this.inspectRaw(id);
    const c = fromInspect(info, this.network);
    if (!info || !c) throw new EngineError('EngineError', `recycle: container ${container.name} (${id.slice(0, 12)}) vanished during restart`);
    if (c.state !== 'running') {
      throw new EngineError('StartFailed', `recycle: container ${container.name} (${id.slice(0, 12)}) is ${c.state} after restart${c.exitCode !== undefined ? ` (exit ${c.exitCode})` : ''}`);
    }
    return c;
  }

  /** Changes CPU and memory limits of a running container (idle → claimed resources). */
  async update(id: string, resources: ContainerResources): Promise<void> {
    const body = resourceLimits(resources);
    if (Object.keys(body).length === 0) return;
    const res = await this.client.request('POST', `/containers/${encodeURIComponent(id)}/update`, { json: body });
    if (res.status === 200) return;
    throw new EngineError(
      res.status === 404 ? 'StartFailed' : 'EngineError',
      `Docker engine at unix://${this.socketPath}: updating the limits of container ${id} failed: ${res.status} ${DockerClient.messageOf(res)}`,
    );
  }

  async rename(id: string, name: string): Promise<void> {
    const res = await this.client.request('POST', `/containers/${encodeURIComponent(id)}/rename${query({ name })}`);
    if (res.status === 204 || res.status === 200 || res.status === 409 || res.status === 404) return;
    throw new EngineError('EngineError', `Docker engine at unix://${this.socketPath}: renaming container ${id} to ${name} failed: ${res.status} ${DockerClient.messageOf(res)}`);
  }

  watch(owner: string, onEvent: (e: EngineEvent) => void, onError?: (err: Error) => void, onResumed?: () => void): () => void {
    const filters = { type: ['container'], label: [`${LABELS.owner}=${owner}`] };
    let stopped = false;
    let req: http.ClientRequest | undefined;
    let retry: NodeJS.Timeout | undefined;
    let backoff = WATCH_BACKOFF_MIN_MS;
    /** Seconds of the last event seen: a reconnect replays from there (duplicates are harmless). */
    let since: number | undefined;

    const report = (err: Error): void => {
      if (stopped) return;
      try {
        onError?.(err);
      } catch {
        /* the callback's problem */
      }
    };
    /** When the current stream got its 200; a stream that stayed up a while resets the backoff. */
    let upSince: number | undefined;
    /** An outage was reported and the stream has not been back since: retries stay quiet. */
    let down = false;
    const reconnect = (err: Error): void => {
      if (stopped || retry) return;
      req?.destroy();
      req = undefined;
      if (upSince !== undefined && Date.now() - upSince >= WATCH_STABLE_MS) backoff = WATCH_BACKOFF_MIN_MS;
      upSince = undefined;
      if (!down) report(err);
      down = true;
      const delay = backoff;
      backoff = Math.min(backoff * 2, WATCH_BACKOFF_MAX_MS);
      retry = setTimeout(() => {
        retry = undefined;
        connect();
      }, delay);
    };
    const connect = (): void => {
      if (stopped) return;
      const path = `/events${query({ filters, since })}`;
      const r = http.request({ socketPath: this.socketPath, path: API_PREFIX + path, method: 'GET', agent: false, headers: { Host: 'docker' } });
      req = r;
      // Bound the wait for the response headers only; the stream itself may stay quiet for hours.
      const connectTimer = setTimeout(() => {
        r.destroy(new RequestTimeout(`no answer to GET /events within ${this.client.requestTimeoutMs} ms`));
      }, this.client.requestTimeoutMs);
      r.on('error', (err) => {
        clearTimeout(connectTimer);
        if (req === r) reconnect(this.client.unavailable(err));
      });
      r.on('response', (res) => {
        clearTimeout(connectTimer);
        if (res.statusCode !== 200) {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('end', () => {
            if (req !== r) return;
            const text = Buffer.concat(chunks).toString('utf8');
            reconnect(new EngineError('EngineError', `Docker engine at unix://${this.socketPath}: GET /events answered ${res.statusCode}: ${text.trim().slice(0, 200)}`));
          });
          return;
        }
        upSince = Date.now();
        if (down) {
          down = false;
          try {
            onResumed?.();
          } catch {
            /* the callback's problem */
          }
        }
        const splitter = new JsonLineSplitter();
        res.on('data', (chunk: Buffer) => {
          if (stopped || req !== r) return;
          splitter.push(chunk, (v) => {
            if (stopped) return;
            if (isObject(v)) {
              const t = num(v, 'time');
              if (t !== undefined) since = t;
            }
            const e = toEngineEvent(v);
            if (!e) return;
            try {
              onEvent(e);
            } catch {
              /* the callback's problem */
            }
          });
        });
        res.on('error', (err) => {
          if (req === r) reconnect(this.client.unavailable(err));
        });
        res.on('end', () => {
          if (req === r) reconnect(new EngineError('EngineUnavailable', `Docker engine at unix://${this.socketPath} closed the event stream`));
        });
      });
      r.end();
    };

    const stop = (): void => {
      if (stopped) return;
      stopped = true;
      this.watches.delete(stop);
      if (retry) clearTimeout(retry);
      retry = undefined;
      const r = req;
      req = undefined;
      r?.destroy();
    };
    this.watches.add(stop);
    connect();
    return stop;
  }

  async close(): Promise<void> {
    for (const stop of [...this.watches]) stop();
    this.client.close();
  }
}
