// A small typed client of HashiCorp Nomad's HTTP API (documented behaviour of
// Nomad 1.6–1.8, https://developer.hashicorp.com/nomad/api-docs; where the documentation is
// silent, as Nomad v1.7.3's source answers, cited where it matters). Only the
// endpoints the reconciler needs: job register/list/read/deregister, job
// allocations, allocation read/restart and the event stream.
//
// Errors are NomadError with a small closed set of codes; the ACL token is sent
// only as the X-Nomad-Token header and is scrubbed from any error message.

import http from 'node:http';
import https from 'node:https';
import WebSocket from 'ws';

// ---------------------------------------------------------------------------
// Types (PascalCase, as Nomad sends them). Only fields we use or that are
// commonly needed are spelled out; everything else stays reachable through the
// index signatures as `unknown`.

export interface NomadDeviceRequest {
  Name: string;
  Count?: number;
  [k: string]: unknown;
}

export interface NomadPort {
  Label: string;
  Value?: number;
  To?: number;
  HostNetwork?: string;
}

export interface NomadNetworkResource {
  Mode?: string;
  Device?: string;
  IP?: string;
  CIDR?: string;
  MBits?: number;
  DynamicPorts?: NomadPort[] | null;
  ReservedPorts?: NomadPort[] | null;
  [k: string]: unknown;
}

export interface NomadResources {
  CPU?: number;
  Cores?: number;
  MemoryMB?: number;
  MemoryMaxMB?: number;
  DiskMB?: number;
  Networks?: NomadNetworkResource[] | null;
  Devices?: NomadDeviceRequest[] | null;
  [k: string]: unknown;
}

export interface NomadTask {
  Name: string;
  Driver: string;
  Config?: Record<string, unknown>;
  Env?: Record<string, string> | null;
  Meta?: Record<string, string> | null;
  Resources?: NomadResources;
  [k: string]: unknown;
}

export interface NomadTaskGroup {
  Name: string;
  Count?: number;
  Meta?: Record<string, string> | null;
  Tasks: NomadTask[];
  Networks?: NomadNetworkResource[] | null;
  [k: string]: unknown;
}

export interface NomadJob {
  ID: string;
  Name?: string;
  Type?: 'service' | 'batch' | 'system' | 'sysbatch' | string;
  Namespace?: string;
  Region?: string;
  Datacenters?: string[];
  Priority?: number;
  Meta?: Record<string, string> | null;
  TaskGroups: NomadTaskGroup[];
  Stop?: boolean;
  Status?: string;
  StatusDescription?: string;
  Version?: number;
  CreateIndex?: number;
  ModifyIndex?: number;
  JobModifyIndex?: number;
  SubmitTime?: number;
  [k: string]: unknown;
}

export interface NomadJobStub {
  ID: string;
  ParentID?: string;
  Name: string;
  Namespace: string;
  Datacenters?: string[];
  Type: string;
  Priority?: number;
  Stop: boolean;
  Status: string;
  StatusDescription?: string;
  JobSummary?: unknown;
  CreateIndex: number;
  ModifyIndex: number;
  JobModifyIndex: number;
  SubmitTime?: number;
  Meta?: Record<string, string> | null;
  [k: string]: unknown;
}

export interface NomadTaskEvent {
  Type: string;
  Time: number; // unix nanoseconds
  DisplayMessage?: string;
  Message?: string;
  DriverError?: string;
  /** Set on "Failed Validation": e.g. the driver Config did not decode against the driver's spec. */
  ValidationError?: string;
  SetupError?: string;
  ExitCode?: number;
  Signal?: number;
  RestartReason?: string;
  FailsTask?: boolean;
  Details?: Record<string, string>;
  [k: string]: unknown;
}

export interface NomadTaskState {
  State: 'pending' | 'running' | 'dead' | string;
  Failed: boolean;
  Restarts: number;
  LastRestart?: string | null;
  StartedAt?: string | null;
  FinishedAt?: string | null;
  Events?: NomadTaskEvent[] | null;
  [k: string]: unknown;
}

export type NomadClientStatus = 'pending' | 'running' | 'complete' | 'failed' | 'lost' | 'unknown';

export interface NomadAllocStub {
  ID: string;
  EvalID?: string;
  Name?: string;
  Namespace?: string;
  NodeID: string;
  NodeName: string;
  JobID: string;
  JobType?: string;
  JobVersion?: number;
  TaskGroup: string;
  DesiredStatus: 'run' | 'stop' | 'evict' | string;
  DesiredDescription?: string;
  ClientStatus: NomadClientStatus | string;
  ClientDescription?: string;
  TaskStates?: Record<string, NomadTaskState> | null;
  CreateIndex: number;
  ModifyIndex: number;
  CreateTime?: number;
  ModifyTime?: number;
  [k: string]: unknown;
}

export interface NomadAllocatedPortMapping {
  Label: string;
  Value: number;
  To?: number;
  HostIP: string;
}

export interface NomadAllocatedResources {
  Tasks?: Record<
    string,
    {
      Cpu?: { CpuShares?: number; ReservedCores?: number[] | null };
      Memory?: { MemoryMB?: number; MemoryMaxMB?: number };
      Networks?: NomadNetworkResource[] | null;
      Devices?: unknown[] | null;
      [k: string]: unknown;
    }
  >;
  Shared?: {
    DiskMB?: number;
    Networks?: NomadNetworkResource[] | null;
    Ports?: NomadAllocatedPortMapping[] | null;
    [k: string]: unknown;
  };
  [k: string]: unknown;
}

export interface NomadAllocation extends NomadAllocStub {
  Job?: NomadJob;
  AllocatedResources?: NomadAllocatedResources | null;
  /** Legacy (pre-0.9 style) resources; still sent by 1.x. */
  Resources?: NomadResources | null;
  TaskResources?: Record<string, NomadResources> | null;
}

export interface NomadEvent {
  Topic: string;
  Type: string;
  Key: string;
  Namespace?: string;
  FilterKeys?: string[] | null;
  Index: number;
  Payload: Record<string, unknown>;
}

export interface NomadClientOptions {
  address: string;
  token?: string;
  namespace?: string;
  region?: string;
  tls?: {
    ca?: string | Buffer;
    cert?: string | Buffer;
    key?: string | Buffer;
    serverName?: string;
    insecureSkipVerify?: boolean;
  };
  /** Per request, default 10 000 ms; blocking queries add their wait. */
  timeoutMs?: number;
  /** Retries on 5xx and connection errors (default 3); never on 4xx. */
  retries?: number;
  /** Base of the exponential backoff in ms (default 100). */
  retryBaseMs?: number;
}

export type NomadErrorCode =
  | 'Forbidden'
  | 'NotFound'
  | 'Conflict'
  | 'BadRequest'
  /** Nomad refused the request's content (an invalid job): HTTP 500 with "N error(s) occurred:". */
  | 'Invalid'
  | 'ServerError'
  | 'Unavailable'
  | 'Timeout'
  | 'Malformed';

export class NomadError extends Error {
  status?: number;
  code: NomadErrorCode;
  constructor(code: NomadErrorCode, message: string, status?: number) {
    super(message);
    this.name = 'NomadError';
    this.code = code;
    if (status !== undefined) this.status = status;
  }
}

export interface QueryMeta {
  index: number;
  lastContact?: number;
  knownLeader?: boolean;
}

export interface BlockingOptions {
  index?: number;
  waitMs?: number;
  signal?: AbortSignal;
}

export interface ListJobsOptions extends BlockingOptions {
  /** Page size sent as per_page; pages are followed until exhausted. */
  perPage?: number;
  /** Ask for each job's Meta in the stubs (`meta=true`, Nomad 1.6+). */
  meta?: boolean;
}

export interface ExecOptions {
  task: string;
  /** Written to the command's stdin, which is then closed. */
  stdin?: string | Buffer;
  /** Default 30 000 ms. */
  timeoutMs?: number;
  /** stdout/stderr kept per stream (default 64 KiB); the rest is dropped. */
  maxOutputBytes?: number;
}

export interface ExecResult {
  exitCode: number;
  stdout: Buffer;
  stderr: Buffer;
}

export interface EventStreamOptions {
  index?: number;
  onError?: (e: Error) => void;
  onHeartbeat?: () => void;
  /** Reconnect when nothing (not even a heartbeat) arrives for this long. Default EVENT_STREAM_IDLE_TIMEOUT_MS. */
  idleTimeoutMs?: number;
}

/**
 * How often Nomad writes a `{}` heartbeat on an idle event stream: nomad/event_endpoint.go passes
 * 30*time.Second to stream.NewJsonStream (nomad/stream/ndjson.go), which also sends one at once.
 */
export const NOMAD_EVENT_HEARTBEAT_MS = 30_000;

/**
 * A stream silent this long is taken for dead and reconnected: two heartbeats missed and half
 * of one more, so a loaded agent or network is not mistaken for a dead one.
 */
export const EVENT_STREAM_IDLE_TIMEOUT_MS = 2.5 * NOMAD_EVENT_HEARTBEAT_MS;

// The error message Nomad (nomad/job_endpoint.go) uses for failed check-and-set.
const ENFORCE_INDEX_PREFIX = 'Enforcing job modify index';

/** Nomad holds a blocking query at most this long (MaxBlockingRPCQueryTime, nomad/structs/structs.go). */
export const MAX_BLOCKING_WAIT_MS = 300_000;

// structs.ErrPermissionDenied (nomad/structs/errors.go).
const PERMISSION_DENIED = 'Permission denied';

// hashicorp/go-multierror's ListFormatFunc: "1 error occurred:\n\t* …" / "N errors occurred:\n\t* …".
const MULTIERROR = /^\d+ errors? occurred:\n/;

/** A Nomad multierror text ("2 errors occurred:\n\t* …") on one line: conditions and logs are one line. */
export function oneLine(s: string): string {
  return s
    .split('\n')
    .map((l) => l.trim().replace(/^\* /, ''))
    .filter(Boolean)
    .join(' ');
}

const RETRYABLE_NET = new Set(['ECONNREFUSED', 'ECONNRESET', 'EPIPE', 'EHOSTUNREACH', 'ENETUNREACH', 'EAI_AGAIN', 'ECONNABORTED']);

interface RawResponse {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: string;
}

interface RequestSpec {
  method: 'GET' | 'POST' | 'PUT' | 'DELETE';
  path: string;
  query?: Array<[string, string]>;
  body?: unknown;
  blocking?: BlockingOptions;
}

function goDuration(ms: number): string {
  return ms % 1000 === 0 ? `${ms / 1000}s` : `${Math.ceil(ms)}ms`;
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(abortError(signal));
    const t = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    const onAbort = (): void => {
      clearTimeout(t);
      reject(abortError(signal!));
    };
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

function abortError(signal: AbortSignal): Error {
  // Always a plain Error (signal.reason is a DOMException by default).
  const e = new Error('The operation was aborted', { cause: signal.reason });
  e.name = 'AbortError';
  return e;
}

function headerNumber(h: http.IncomingHttpHeaders, name: string): number | undefined {
  const v = h[name];
  const s = Array.isArray(v) ? v[0] : v;
  if (s === undefined || s === '') return undefined;
  const n = Number(s);
  return Number.isFinite(n) ? n : undefined;
}

function headerString(h: http.IncomingHttpHeaders, name: string): string | undefined {
  const v = h[name];
  return Array.isArray(v) ? v[0] : v;
}

export class NomadClient {
  private readonly base: URL;
  private readonly token: string | undefined;
  private readonly namespace: string | undefined;
  private readonly region: string | undefined;
  private readonly timeoutMs: number;
  private readonly retries: number;
  private readonly retryBaseMs: number;
  private readonly agent: http.Agent | https.Agent;
  private readonly isHttps: boolean;

  constructor(opts: NomadClientOptions) {
    this.base = new URL(opts.address);
    if (this.base.protocol !== 'http:' && this.base.protocol !== 'https:') {
      throw new NomadError('BadRequest', `unsupported Nomad address scheme ${this.base.protocol}`);
    }
    this.isHttps = this.base.protocol === 'https:';
    this.token = opts.token;
    this.namespace = opts.namespace;
    this.region = opts.region;
    this.timeoutMs = opts.timeoutMs ?? 10_000;
    this.retries = opts.retries ?? 3;
    this.retryBaseMs = opts.retryBaseMs ?? 100;
    if (this.isHttps) {
      const tls = opts.tls ?? {};
      this.agent = new https.Agent({
        keepAlive: true,
        ca: tls.ca,
        cert: tls.cert,
        key: tls.key,
        servername: tls.serverName,
        rejectUnauthorized: !tls.insecureSkipVerify,
      });
    } else {
      this.agent = new http.Agent({ keepAlive: true });
    }
  }

  // ---- jobs -----------------------------------------------------------------

  async registerJob(
    job: NomadJob,
    opts: { enforceIndex?: number } = {},
  ): Promise<{ evalId: string; jobModifyIndex: number; warnings?: string }> {
    const body: Record<string, unknown> = { Job: job };
    if (opts.enforceIndex !== undefined) {
      body.EnforceIndex = true;
      body.JobModifyIndex = opts.enforceIndex;
    }
    const { data } = await this.call<{ EvalID?: string; JobModifyIndex?: number; Warnings?: string }>({
      method: 'POST',
      path: '/v1/jobs',
      body,
    });
    const out: { evalId: string; jobModifyIndex: number; warnings?: string } = {
      evalId: data.EvalID ?? '',
      jobModifyIndex: data.JobModifyIndex ?? 0,
    };
    if (data.Warnings) out.warnings = data.Warnings;
    return out;
  }

  async listJobs(prefix?: string, opts: ListJobsOptions = {}): Promise<{ items: NomadJobStub[]; meta: QueryMeta }> {
    const items: NomadJobStub[] = [];
    let meta: QueryMeta | undefined;
    let nextToken: string | undefined;
    let first = true;
    for (;;) {
      const query: Array<[string, string]> = [];
      if (prefix) query.push(['prefix', prefix]);
      if (opts.meta) query.push(['meta', 'true']);
      if (opts.perPage !== undefined) query.push(['per_page', String(opts.perPage)]);
      if (nextToken) query.push(['next_token', nextToken]);
      const spec: RequestSpec = { method: 'GET', path: '/v1/jobs', query };
      // Only the first page blocks; later pages are read at once.
      if (first) spec.blocking = opts;
      else if (opts.signal) spec.blocking = { signal: opts.signal };
      const r = await this.call<NomadJobStub[] | null>(spec);
      if (r.data !== null && !Array.isArray(r.data)) throw new NomadError('Malformed', 'GET /v1/jobs: expected a JSON array');
      items.push(...(r.data ?? []));
      meta = meta ? { ...r.meta, index: Math.max(meta.index, r.meta.index) } : r.meta;
      nextToken = headerString(r.headers, 'x-nomad-nexttoken');
      first = false;
      if (!nextToken) break;
    }
    return { items, meta: meta! };
  }

  async readJob(id: string): Promise<NomadJob> {
    const { data } = await this.call<NomadJob>({ method: 'GET', path: `/v1/job/${encodeURIComponent(id)}` });
    return data;
  }

  async jobAllocations(id: string, opts: BlockingOptions = {}): Promise<{ items: NomadAllocStub[]; meta: QueryMeta }> {
    const r = await this.call<NomadAllocStub[] | null>({
      method: 'GET',
      path: `/v1/job/${encodeURIComponent(id)}/allocations`,
      blocking: opts,
    });
    if (r.data !== null && !Array.isArray(r.data)) throw new NomadError('Malformed', 'job allocations: expected a JSON array');
    return { items: r.data ?? [], meta: r.meta };
  }

  async deregisterJob(id: string, opts: { purge?: boolean } = {}): Promise<{ evalId: string }> {
    const query: Array<[string, string]> = [];
    if (opts.purge) query.push(['purge', 'true']);
    const { data } = await this.call<{ EvalID?: string }>({
      method: 'DELETE',
      path: `/v1/job/${encodeURIComponent(id)}`,
      query,
    });
    return { evalId: data.EvalID ?? '' };
  }

  // ---- allocations ----------------------------------------------------------

  async restartAllocation(allocId: string, task?: string): Promise<void> {
    const body: Record<string, unknown> = {};
    if (task) body.TaskName = task;
    await this.call<unknown>({
      method: 'POST',
      path: `/v1/client/allocation/${encodeURIComponent(allocId)}/restart`,
      body,
    });
  }

  async readAllocation(allocId: string): Promise<NomadAllocation> {
    const { data } = await this.call<NomadAllocation>({ method: 'GET', path: `/v1/allocation/${encodeURIComponent(allocId)}` });
    return data;
  }

  /**
   * Runs a command in a running allocation's task (`/v1/client/allocation/:id/exec`, a WebSocket:
   * JSON frames, byte fields base64; stdin frames in, stdout/stderr frames and a final
   * `{exited, result: {exit_code}}` out). The command is an argv array, never a shell string.
   * Not retried: a command may have side effects.
   */
  execAllocation(allocId: string, command: string[], opts: ExecOptions): Promise<ExecResult> {
    const url = new URL(`/v1/client/allocation/${encodeURIComponent(allocId)}/exec`, this.base);
    if (this.base.pathname !== '/' && this.base.pathname !== '') {
      url.pathname = this.base.pathname.replace(/\/$/, '') + url.pathname;
    }
    url.protocol = this.isHttps ? 'wss:' : 'ws:';
    url.searchParams.set('task', opts.task);
    url.searchParams.set('tty', 'false');
    url.searchParams.set('command', JSON.stringify(command));
    if (this.namespace) url.searchParams.set('namespace', this.namespace);
    if (this.region) url.searchParams.set('region', this.region);
    const headers: Record<string, string> = {};
    if (this.token) headers['X-Nomad-Token'] = this.token;
    const timeoutMs = opts.timeoutMs ?? 30_000;
    const limit = opts.maxOutputBytes ?? 64 * 1024;
    const what = `exec in allocation ${allocId}`;
    return new Promise<ExecResult>((resolve, reject) => {
      const ws = new WebSocket(url, { headers, agent: this.agent, handshakeTimeout: timeoutMs });
      const out: Buffer[] = [];
      const err: Buffer[] = [];
      const size = { out: 0, err: 0 };
      let settled = false;
      const finish = (e: Error | undefined, r?: ExecResult): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        ws.removeAllListeners('close');
        if (ws.readyState === WebSocket.OPEN || ws.readyState === WebSocket.CONNECTING) ws.terminate();
        if (e) reject(e);
        else resolve(r!);
      };
      const timer = setTimeout(() => finish(new NomadError('Timeout', `${what}: no result within ${timeoutMs} ms`)), timeoutMs);
      const keep = (into: Buffer[], key: 'out' | 'err', b64: unknown): void => {
        if (typeof b64 !== 'string' || size[key] >= limit) return;
        const chunk = Buffer.from(b64, 'base64').subarray(0, limit - size[key]);
        size[key] += chunk.length;
        into.push(chunk);
      };
      ws.on('unexpected-response', (_req, res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (c: string) => (body += c));
        res.on('end', () => finish(this.httpError(`GET /v1/client/allocation/${allocId}/exec`, res.statusCode ?? 0, body)));
      });
      ws.on('error', (e: NodeJS.ErrnoException) => finish(this.netError(e, what)));
      ws.on('open', () => {
        if (opts.stdin !== undefined && opts.stdin.length > 0) {
          const data = Buffer.isBuffer(opts.stdin) ? opts.stdin : Buffer.from(opts.stdin, 'utf8');
          // Frames of at most 64 KiB of payload, like the Nomad CLI sends.
          for (let i = 0; i < data.length; i += 65536) {
            ws.send(JSON.stringify({ stdin: { data: data.subarray(i, i + 65536).toString('base64') } }));
          }
        }
        ws.send(JSON.stringify({ stdin: { close: true } }));
      });
      ws.on('message', (raw: WebSocket.RawData) => {
        let frame: { stdout?: { data?: unknown }; stderr?: { data?: unknown }; exited?: unknown; result?: { exit_code?: unknown } };
        try {
          frame = JSON.parse(raw.toString()) as typeof frame;
        } catch {
          return finish(new NomadError('Malformed', `${what}: a frame is not JSON`));
        }
        if (frame.stdout) keep(out, 'out', frame.stdout.data);
        if (frame.stderr) keep(err, 'err', frame.stderr.data);
        if (frame.exited) {
          const code = frame.result?.exit_code;
          finish(undefined, { exitCode: typeof code === 'number' ? code : 0, stdout: Buffer.concat(out), stderr: Buffer.concat(err) });
        }
      });
      ws.on('close', (code: number, reason: Buffer) => finish(this.execCloseError(what, code, this.scrub(reason.toString()))));
    });
  }

  /**
   * Nomad upgrades the exec WebSocket before it checks anything, so refusals arrive as close
   * frames: 1008 (policy violation) for an RPC error coded 4xx (unknown allocation, task not
   * running, terminal allocation), 1011 for 500 and uncoded errors, among them "Permission
   * denied" (command/agent/alloc_endpoint.go toWsCode, v1.7.3).
   */
  private execCloseError(what: string, code: number, reason: string): NomadError {
    const msg = `${what}: closed before the command exited (${code}${reason ? ` ${reason}` : ''})`;
    if (code === 1011 && (reason === PERMISSION_DENIED || reason === 'ACL token not found')) return new NomadError('Forbidden', msg);
    if (code === 1008 && reason.startsWith('Unknown allocation')) return new NomadError('NotFound', msg);
    if (code === 1008) return new NomadError('BadRequest', msg);
    if (code === 1011) return new NomadError('ServerError', msg);
    return new NomadError('Unavailable', msg);
  }

  // ---- event stream ---------------------------------------------------------

  /**
   * GET /v1/event/stream?topic=…&index=… (NDJSON; `{}` lines are heartbeats).
   * Reconnects with backoff after a drop, resuming from the last Index seen.
   * On resume it asks for `index=<last seen>` and drops batches whose Index is
   * not above it, so it is correct whether the server starts at `>= index` or
   * `> index` (Nomad 1.x starts at the first buffered batch with Index >= the
   * requested one, and re-sends the newest batch if asked for a future index).
   * Without `opts.index` Nomad replays its whole event buffer first; pass e.g.
   * `meta.index + 1` from a list call to skip history. A 4xx answer (e.g. 403), and the 500
   * "Permission denied" Nomad gives a token without read-job, is reported to onError and ends the stream.
   */
  eventStream(
    topics: string[],
    onEvents: (batch: { index: number; events: NomadEvent[] }) => void,
    opts: EventStreamOptions = {},
  ): { stop(): void } {
    let stopped = false;
    let lastIndex = opts.index !== undefined && opts.index > 0 ? opts.index - 1 : 0;
    let startIndex = opts.index ?? 0;
    let attempt = 0;
    let current: http.ClientRequest | undefined;
    let backoffTimer: NodeJS.Timeout | undefined;
    const idleMs = opts.idleTimeoutMs ?? EVENT_STREAM_IDLE_TIMEOUT_MS;

    const report = (e: Error): void => {
      if (stopped) return;
      try {
        opts.onError?.(e);
      } catch {
        /* a throwing callback must not kill the loop */
      }
    };

    const scheduleReconnect = (): void => {
      if (stopped || backoffTimer) return;
      const delay = Math.min(5_000, this.backoffMs(attempt));
      attempt++;
      backoffTimer = setTimeout(() => {
        backoffTimer = undefined;
        connect();
      }, delay);
    };

    const connect = (): void => {
      if (stopped) return;
      const query: Array<[string, string]> = topics.map((t) => ['topic', t]);
      if (startIndex > 0) query.push(['index', String(startIndex)]);
      const req = this.rawRequest('GET', '/v1/event/stream', query, undefined);
      current = req;
      let idle: NodeJS.Timeout | undefined;
      let finished = false;
      const finish = (err?: Error): void => {
        if (finished) return;
        finished = true;
        if (idle) clearTimeout(idle);
        if (current === req) current = undefined;
        if (stopped) return;
        if (err) report(err);
        scheduleReconnect();
      };
      const armIdle = (): void => {
        if (idle) clearTimeout(idle);
        idle = setTimeout(() => {
          req.destroy();
          finish(new NomadError('Timeout', `event stream: no data for ${idleMs} ms`));
        }, idleMs);
      };
      armIdle();
      req.on('error', (e: NodeJS.ErrnoException) => finish(this.netError(e, 'GET /v1/event/stream')));
      req.on('response', (res) => {
        if ((res.statusCode ?? 0) >= 300) {
          let body = '';
          res.setEncoding('utf8');
          res.on('data', (c: string) => (body += c));
          res.on('end', () => {
            const err = this.httpError('GET /v1/event/stream', res.statusCode ?? 0, body);
            const status = res.statusCode ?? 0;
            // A refusal is final (reconnecting cannot grant a capability); other 5xx are retried.
            if ((status >= 400 && status < 500 && status !== 429) || err.code === 'Forbidden' || err.code === 'Invalid') {
              finished = true;
              if (idle) clearTimeout(idle);
              report(err);
              stopped = true;
              return;
            }
            finish(err);
          });
          res.on('error', () => finish(new NomadError('Unavailable', 'event stream: response aborted')));
          return;
        }
        let buf = '';
        res.setEncoding('utf8');
        res.on('data', (chunk: string) => {
          if (stopped) return;
          armIdle();
          attempt = 0;
          buf += chunk;
          let nl: number;
          while ((nl = buf.indexOf('\n')) >= 0) {
            const line = buf.slice(0, nl).trim();
            buf = buf.slice(nl + 1);
            if (line) this.handleStreamLine(line, lastIndex, opts, report, (batch) => {
              lastIndex = batch.index;
              startIndex = batch.index;
              onEvents(batch);
            });
            if (stopped) return;
          }
        });
        res.on('end', () => finish(new NomadError('Unavailable', 'event stream ended by server')));
        res.on('aborted', () => finish(new NomadError('Unavailable', 'event stream dropped')));
        res.on('error', () => finish(new NomadError('Unavailable', 'event stream dropped')));
        res.on('close', () => finish(new NomadError('Unavailable', 'event stream closed')));
      });
      req.end();
    };

    connect();
    return {
      stop: () => {
        stopped = true;
        if (backoffTimer) clearTimeout(backoffTimer);
        backoffTimer = undefined;
        current?.destroy();
        current = undefined;
      },
    };
  }

  private handleStreamLine(
    line: string,
    lastIndex: number,
    opts: EventStreamOptions,
    report: (e: Error) => void,
    deliver: (batch: { index: number; events: NomadEvent[] }) => void,
  ): void {
    let msg: unknown;
    try {
      msg = JSON.parse(line);
    } catch {
      report(new NomadError('Malformed', 'event stream: line is not JSON'));
      return;
    }
    if (typeof msg !== 'object' || msg === null) {
      report(new NomadError('Malformed', 'event stream: line is not an object'));
      return;
    }
    const m = msg as { Index?: unknown; Events?: unknown; Error?: unknown };
    if (typeof m.Error === 'string' && m.Error) {
      report(new NomadError('ServerError', `event stream: ${this.scrub(m.Error)}`));
      return;
    }
    if (m.Index === undefined && m.Events === undefined) {
      opts.onHeartbeat?.();
      return;
    }
    if (typeof m.Index !== 'number' || !Array.isArray(m.Events)) {
      report(new NomadError('Malformed', 'event stream: batch without numeric Index / Events array'));
      return;
    }
    if (m.Index <= lastIndex) return; // already delivered before a reconnect
    deliver({ index: m.Index, events: m.Events as NomadEvent[] });
  }

  // ---- transport ------------------------------------------------------------

  private backoffMs(attempt: number): number {
    const exp = this.retryBaseMs * 2 ** attempt;
    return exp / 2 + Math.random() * (exp / 2); // "equal jitter"
  }

  private scrub(s: string): string {
    return this.token ? s.split(this.token).join('<redacted>') : s;
  }

  private rawRequest(
    method: string,
    path: string,
    query: Array<[string, string]>,
    body: string | undefined,
    signal?: AbortSignal,
  ): http.ClientRequest {
    const url = new URL(path, this.base);
    // Keep any path prefix of the configured address (e.g. behind a proxy).
    if (this.base.pathname !== '/' && this.base.pathname !== '') {
      url.pathname = this.base.pathname.replace(/\/$/, '') + path;
    }
    for (const [k, v] of query) url.searchParams.append(k, v);
    if (this.namespace) url.searchParams.set('namespace', this.namespace);
    if (this.region) url.searchParams.set('region', this.region);
    const headers: http.OutgoingHttpHeaders = { Accept: 'application/json' };
    if (this.token) headers['X-Nomad-Token'] = this.token;
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      headers['Content-Length'] = Buffer.byteLength(body);
    }
    const options: http.RequestOptions = { method, headers, agent: this.agent };
    if (signal) options.signal = signal;
    return this.isHttps ? https.request(url, options) : http.request(url, options);
  }

  private once(spec: RequestSpec, timeoutMs: number): Promise<RawResponse> {
    const query = [...(spec.query ?? [])];
    const b = spec.blocking;
    if (b?.index !== undefined) query.push(['index', String(b.index)]);
    if (b?.waitMs !== undefined) query.push(['wait', goDuration(Math.min(b.waitMs, MAX_BLOCKING_WAIT_MS))]);
    const body = spec.body === undefined ? undefined : JSON.stringify(spec.body);
    const what = `${spec.method} ${spec.path}`;
    return new Promise<RawResponse>((resolve, reject) => {
      const req = this.rawRequest(spec.method, spec.path, query, body, b?.signal);
      let done = false;
      const timer = setTimeout(() => {
        if (done) return;
        done = true;
        req.destroy();
        reject(new NomadError('Timeout', `${what}: no answer within ${timeoutMs} ms`));
      }, timeoutMs);
      req.on('error', (e: NodeJS.ErrnoException) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        if (b?.signal?.aborted) reject(abortError(b.signal));
        else reject(e);
      });
      req.on('response', (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          if (done) return;
          done = true;
          clearTimeout(timer);
          resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks).toString('utf8') });
        });
        res.on('error', (e: NodeJS.ErrnoException) => {
          if (done) return;
          done = true;
          clearTimeout(timer);
          reject(e);
        });
      });
      req.end(body);
    });
  }

  private netError(e: NodeJS.ErrnoException, what: string): NomadError {
    if (e instanceof NomadError) return e;
    return new NomadError('Unavailable', `${what}: ${e.code ?? 'connection error'}: ${this.scrub(e.message)}`);
  }

  private httpError(what: string, status: number, body: string): NomadError {
    const text = this.scrub(body.trim().slice(0, 500));
    const msg = `${what}: HTTP ${status}${text ? `: ${text}` : ''}`;
    if (text.includes(ENFORCE_INDEX_PREFIX)) return new NomadError('Conflict', msg, status);
    // Validation errors are RPC errors without a code, which Nomad's HTTP layer answers with 500
    // (command/agent/http.go); their text is a go-multierror list. Retrying cannot help.
    if (status === 500 && MULTIERROR.test(text)) {
      return new NomadError('Invalid', `${what}: HTTP 500: Nomad refused it as invalid: ${oneLine(text)}`, status);
    }
    if (status === 403) return new NomadError('Forbidden', msg, status);
    // A valid token without the capability on the event stream: nomad/event_endpoint.go (v1.7.3)
    // answers the failed ACL check with code 500 and structs.ErrPermissionDenied's text.
    if (status === 500 && text === PERMISSION_DENIED) return new NomadError('Forbidden', msg, status);
    if (status === 404) return new NomadError('NotFound', msg, status);
    if (status === 409) return new NomadError('Conflict', msg, status);
    if (status >= 400 && status < 500) return new NomadError('BadRequest', msg, status);
    return new NomadError('ServerError', msg, status);
  }

  private async call<T>(spec: RequestSpec): Promise<{ data: T; meta: QueryMeta; headers: http.IncomingHttpHeaders }> {
    const what = `${spec.method} ${spec.path}`;
    const wait = Math.min(spec.blocking?.waitMs ?? 0, MAX_BLOCKING_WAIT_MS);
    // Nomad adds up to wait/16 of jitter to a blocking query.
    const timeoutMs = this.timeoutMs + (wait > 0 ? wait + wait / 16 : 0);
    let lastErr: NomadError | undefined;
    for (let attempt = 0; attempt <= this.retries; attempt++) {
      if (attempt > 0) await sleep(this.backoffMs(attempt - 1), spec.blocking?.signal);
      let res: RawResponse;
      try {
        res = await this.once(spec, timeoutMs);
      } catch (e) {
        if (e instanceof NomadError) throw e; // Timeout: not retried
        const err = e as NodeJS.ErrnoException;
        if (err.name === 'AbortError' || spec.blocking?.signal?.aborted) throw e;
        lastErr = this.netError(err, what);
        if (err.code && RETRYABLE_NET.has(err.code)) continue;
        throw lastErr;
      }
      if (res.status >= 200 && res.status < 300) {
        const meta: QueryMeta = { index: headerNumber(res.headers, 'x-nomad-index') ?? 0 };
        const lc = headerNumber(res.headers, 'x-nomad-lastcontact');
        if (lc !== undefined) meta.lastContact = lc;
        const kl = headerString(res.headers, 'x-nomad-knownleader');
        if (kl !== undefined) meta.knownLeader = kl === 'true';
        let data: T;
        try {
          data = (res.body === '' ? null : JSON.parse(res.body)) as T;
        } catch {
          throw new NomadError('Malformed', `${what}: response is not JSON`, res.status);
        }
        return { data, meta, headers: res.headers };
      }
      const err = this.httpError(what, res.status, res.body);
      if (res.status >= 500 && err.code === 'ServerError') {
        // Conflict and Invalid are answers, not failures: only these are retried.
        lastErr = err;
        continue;
      }
      throw err;
    }
    throw lastErr ?? new NomadError('Unavailable', `${what}: failed`);
  }
}
