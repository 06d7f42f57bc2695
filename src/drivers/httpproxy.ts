// Health checks through an HTTP proxy: fetch an "echo my IP" URL through the
// proxy (plain absolute-form forwarding, or a CONNECT tunnel) and report whether
// it worked, how long it took and which egress IP the target saw.
//
// Only node built-ins. Never throws: every failure becomes a ProxyCheckResult.
// Secrets (proxy credentials, URL userinfo) never appear in returned strings.

import http from 'node:http';
import net from 'node:net';
import tls from 'node:tls';
import { readFile } from 'node:fs/promises';
import { performance } from 'node:perf_hooks';
import type { Duplex } from 'node:stream';

export type ProxyCheckErrorClass = 'timeout' | 'refused' | 'proxyAuth' | 'proxyError' | 'badResponse';

export interface ProxyCheckResult {
  healthy: boolean;
  /** Time from the start of the check until the complete response was read; null if no complete response. */
  latencyMs: number | null;
  egressIP: string | null;
  error?: string;
  errorClass?: ProxyCheckErrorClass;
}

export interface ProxyCredentials {
  username: string;
  password: string;
}

export interface ProxyCheckOptions {
  proxyHost: string;
  proxyPort: number;
  /** http:// (forward or connect) or https:// (connect only) URL answering with the caller's IP. */
  url: string;
  mode: 'connect' | 'forward';
  /** One overall deadline covering proxy connect, tunnel, TLS, request and body. */
  timeoutMs: number;
  credentials?: ProxyCredentials;
}

/** Response bodies larger than this are rejected (an IP echo answer is tiny). */
export const MAX_BODY_BYTES = 4096;

const USER_AGENT = 'polydev-reconciler-healthcheck/1';

function roundLatency(ms: number): number {
  return Math.round(ms * 10) / 10;
}

function basicAuth(c: ProxyCredentials): string {
  return 'Basic ' + Buffer.from(`${c.username}:${c.password}`, 'utf8').toString('base64');
}

/** Strips IPv6 brackets from URL.hostname ("[::1]" -> "::1"). */
function bareHost(hostname: string): string {
  return hostname.startsWith('[') && hostname.endsWith(']') ? hostname.slice(1, -1) : hostname;
}

/** host:port authority (IPv6 bracketed) for Host headers and CONNECT targets. */
function authority(host: string, port: number): string {
  return `${net.isIPv6(host) ? `[${host}]` : host}:${port}`;
}

/** Normalises an IP string; IPv4-mapped IPv6 (::ffff:a.b.c.d) becomes plain IPv4. Null if not an IP. */
function normaliseIP(s: string): string | null {
  const v = s.trim();
  const mapped = /^::ffff:(\d{1,3}(?:\.\d{1,3}){3})$/i.exec(v);
  const candidate = mapped ? mapped[1]! : v;
  return net.isIP(candidate) ? candidate : null;
}

/**
 * Extracts the egress IP from an echo response body: JSON with an `ip` or
 * `origin` field (httpbin's `origin` may be "a, b": the first one is taken), or
 * a plain-text body consisting of just the IP.
 */
export function parseEgressIP(body: string): string | null {
  const text = body.trim();
  if (text.startsWith('{')) {
    let doc: unknown;
    try {
      doc = JSON.parse(text);
    } catch {
      return null;
    }
    if (doc === null || typeof doc !== 'object' || Array.isArray(doc)) return null;
    const rec = doc as Record<string, unknown>;
    const raw = typeof rec.ip === 'string' ? rec.ip : typeof rec.origin === 'string' ? rec.origin : null;
    if (raw === null) return null;
    return normaliseIP(raw.split(',')[0] ?? '');
  }
  return normaliseIP(text);
}

function errnoCode(err: unknown): string | undefined {
  if (err && typeof err === 'object' && 'code' in err) {
    const code = (err as { code: unknown }).code;
    return typeof code === 'string' ? code : undefined;
  }
  return undefined;
}

const TLS_CODE = /^(ERR_TLS_|ERR_SSL_|CERT_|UNABLE_TO_|DEPTH_ZERO_|SELF_SIGNED_|ERR_OSSL_)/;

/**
 * Runs one check. Never rejects.
 *
 * errorClass:
 *  - timeout:     the overall deadline passed (socket destroyed)
 *  - refused:     the proxy port refused the TCP connection
 *  - proxyAuth:   the proxy (or, in forward mode, the answer relayed by it) was 407
 *  - proxyError:  any other failure of the proxy or tunnel: non-2xx answer, CONNECT
 *                 rejected, connection reset, TLS failure inside the tunnel
 *  - badResponse: a 2xx answer whose body is not an IP echo (or exceeds MAX_BODY_BYTES)
 * Option errors (invalid URL, https in forward mode) carry no errorClass.
 */
export function checkThroughProxy(opts: ProxyCheckOptions): Promise<ProxyCheckResult> {
  const started = performance.now();

  let target: URL;
  try {
    target = new URL(opts.url);
  } catch {
    return Promise.resolve({ healthy: false, latencyMs: null, egressIP: null, error: 'invalid health-check URL' });
  }
  const isHttps = target.protocol === 'https:';
  if (!isHttps && target.protocol !== 'http:') {
    return Promise.resolve({
      healthy: false,
      latencyMs: null,
      egressIP: null,
      error: `unsupported URL scheme ${target.protocol} (expected http: or https:)`,
    });
  }
  if (isHttps && opts.mode === 'forward') {
    return Promise.resolve({
      healthy: false,
      latencyMs: null,
      egressIP: null,
      error: 'forward mode needs an http:// URL; use connect mode for https://',
    });
  }
  const timeoutMs = Number.isFinite(opts.timeoutMs) && opts.timeoutMs > 0 ? opts.timeoutMs : 1;
  const host = bareHost(target.hostname);
  const port = target.port ? Number(target.port) : isHttps ? 443 : 80;
  const hostHeader = target.port ? authority(host, port) : net.isIPv6(host) ? `[${host}]` : host;
  const pathAndQuery = (target.pathname || '/') + target.search;
  // Absolute-form without userinfo or fragment: the proxy must never see URL credentials.
  const absoluteForm = `${target.protocol}//${hostHeader}${pathAndQuery}`;
  const proxyAuth = opts.credentials ? basicAuth(opts.credentials) : undefined;
  const proxyLabel = authority(opts.proxyHost, opts.proxyPort);

  return new Promise<ProxyCheckResult>((resolve) => {
    let settled = false;
    const disposables: Array<{ destroy(): unknown }> = [];

    const settle = (r: ProxyCheckResult): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      for (const d of disposables) {
        try {
          d.destroy();
        } catch {
          /* ignore */
        }
      }
      resolve(r);
    };
    const fail = (errorClass: ProxyCheckErrorClass, error: string): void =>
      settle({ healthy: false, latencyMs: null, egressIP: null, error, errorClass });

    const timer = setTimeout(() => fail('timeout', `timed out after ${timeoutMs} ms`), timeoutMs);

    // Classifies a socket/request error. `stage` tells whether we were still
    // talking to the proxy itself or already inside the tunnel.
    const onError = (err: unknown, stage: 'proxy' | 'tunnel'): void => {
      if (settled) return;
      const code = errnoCode(err);
      if (code === 'ECONNREFUSED' && stage === 'proxy') {
        fail('refused', `connection refused by proxy ${proxyLabel}`);
      } else if (code === 'ETIMEDOUT') {
        fail('timeout', `connection to proxy ${proxyLabel} timed out`);
      } else if (code && (TLS_CODE.test(code) || (code === 'EPROTO' && stage === 'tunnel' && isHttps))) {
        fail('proxyError', `TLS handshake with ${host} through the tunnel failed (${code})`);
      } else if (code === 'ECONNRESET' || code === 'EPIPE') {
        fail('proxyError', `connection ${stage === 'proxy' ? `to proxy ${proxyLabel}` : 'through tunnel'} reset`);
      } else if (code?.startsWith('HPE_')) {
        fail('proxyError', `malformed HTTP response ${stage === 'proxy' ? `from proxy ${proxyLabel}` : 'through tunnel'} (${code})`);
      } else {
        fail('proxyError', `${stage === 'proxy' ? `proxy ${proxyLabel}` : 'tunnel'}: ${code ?? 'error'}`);
      }
    };

    // 407 is always an auth failure. 401 is too when it can only have come from the
    // proxy: the answer to CONNECT, or a forward-mode answer to a request that carried
    // credentials (tinyproxy 1.11 rejects *wrong* credentials with 401, missing ones with 407).
    const statusFailure = (status: number, reason: string | undefined, via: string, fromProxy: boolean): void => {
      const text = `${via} answered ${status}${reason ? ` ${reason.slice(0, 80)}` : ''}`;
      const auth = status === 407 || (status === 401 && fromProxy);
      fail(auth ? 'proxyAuth' : 'proxyError', text);
    };

    // Reads the final response: status check, capped body, IP parsing.
    const handleResponse = (res: http.IncomingMessage, via: string): void => {
      disposables.push(res);
      const status = res.statusCode ?? 0;
      if (status < 200 || status > 299) {
        statusFailure(status, res.statusMessage, via, opts.mode === 'forward' && proxyAuth !== undefined);
        return;
      }
      const chunks: Buffer[] = [];
      let size = 0;
      res.on('data', (chunk: Buffer) => {
        size += chunk.length;
        if (size > MAX_BODY_BYTES) {
          fail('badResponse', `response body exceeds ${MAX_BODY_BYTES} bytes`);
          return;
        }
        chunks.push(chunk);
      });
      res.on('error', (err) => onError(err, opts.mode === 'connect' ? 'tunnel' : 'proxy'));
      res.on('aborted', () => fail('proxyError', 'response aborted before completion'));
      res.on('end', () => {
        if (settled) return;
        const latencyMs = roundLatency(performance.now() - started);
        const body = Buffer.concat(chunks).toString('utf8');
        const ip = parseEgressIP(body);
        if (ip === null) {
          settle({
            healthy: false,
            latencyMs,
            egressIP: null,
            error: 'response body is not an IP echo (expected an IP, or JSON with "ip"/"origin")',
            errorClass: 'badResponse',
          });
          return;
        }
        settle({ healthy: true, latencyMs, egressIP: ip });
      });
    };

    const baseHeaders: Record<string, string> = {
      Host: hostHeader,
      'User-Agent': USER_AGENT,
      Accept: 'application/json, text/plain;q=0.9, */*;q=0.1',
      Connection: 'close',
    };

    if (opts.mode === 'forward') {
      const headers = { ...baseHeaders };
      if (proxyAuth) headers['Proxy-Authorization'] = proxyAuth;
      let req: http.ClientRequest;
      try {
        req = http.request({
          host: opts.proxyHost,
          port: opts.proxyPort,
          method: 'GET',
          path: absoluteForm,
          setHost: false,
          headers,
          agent: false,
        });
      } catch (err) {
        fail('proxyError', `cannot send request to proxy ${proxyLabel}: ${errnoCode(err) ?? 'error'}`);
        return;
      }
      disposables.push(req);
      req.on('error', (err) => onError(err, 'proxy'));
      req.on('response', (res) => handleResponse(res, `proxy ${proxyLabel}`));
      req.end();
      return;
    }

    // connect mode: CONNECT host:port, then the request inside the tunnel.
    const connectTarget = authority(host, port);
    const connectHeaders: Record<string, string> = { Host: connectTarget, 'User-Agent': USER_AGENT };
    if (proxyAuth) connectHeaders['Proxy-Authorization'] = proxyAuth;
    let connectReq: http.ClientRequest;
    try {
      connectReq = http.request({
        host: opts.proxyHost,
        port: opts.proxyPort,
        method: 'CONNECT',
        path: connectTarget,
        setHost: false,
        headers: connectHeaders,
        agent: false,
      });
    } catch (err) {
      fail('proxyError', `cannot send CONNECT to proxy ${proxyLabel}: ${errnoCode(err) ?? 'error'}`);
      return;
    }
    disposables.push(connectReq);
    connectReq.on('error', (err) => onError(err, 'proxy'));
    connectReq.on('response', (res) => {
      // Only reached if the proxy answered the CONNECT with something node did not treat as a tunnel.
      disposables.push(res);
      statusFailure(res.statusCode ?? 0, res.statusMessage, `proxy ${proxyLabel} (CONNECT)`, true);
    });
    connectReq.on('connect', (res: http.IncomingMessage, socket: net.Socket, head: Buffer) => {
      disposables.push(socket);
      if (settled) return;
      const status = res.statusCode ?? 0;
      if (status < 200 || status > 299) {
        statusFailure(status, res.statusMessage, `proxy ${proxyLabel} (CONNECT)`, true);
        return;
      }
      if (head.length > 0) socket.unshift(head);
      socket.on('error', (err) => onError(err, 'tunnel'));

      let tunnel: Duplex = socket;
      if (isHttps) {
        const tlsOpts: tls.ConnectionOptions = { socket, ALPNProtocols: ['http/1.1'] };
        if (!net.isIP(host)) tlsOpts.servername = host;
        const tlsSocket = tls.connect(tlsOpts);
        disposables.push(tlsSocket);
        tlsSocket.on('error', (err) => onError(err, 'tunnel'));
        tunnel = tlsSocket;
      }

      let req: http.ClientRequest;
      try {
        req = http.request({
          method: 'GET',
          path: pathAndQuery,
          setHost: false,
          headers: baseHeaders,
          createConnection: () => tunnel,
        });
      } catch (err) {
        fail('proxyError', `cannot send request through tunnel: ${errnoCode(err) ?? 'error'}`);
        return;
      }
      disposables.push(req);
      req.on('error', (err) => onError(err, 'tunnel'));
      req.on('response', (r) => handleResponse(r, `target ${connectTarget} (via tunnel)`));
      req.end();
    });
    connectReq.end();
  });
}

/**
 * Runs `check` over `targets` with at most `concurrency` checks in flight.
 * Results are in the order of `targets`. A check that throws or rejects becomes
 * an unhealthy result (proxyError) instead of failing the batch.
 */
export async function checkMany<T>(
  targets: T[],
  concurrency: number,
  check: (t: T) => Promise<ProxyCheckResult>,
  signal?: AbortSignal,
): Promise<Array<{ target: T; result: ProxyCheckResult }>> {
  const limit = Math.max(1, Math.floor(Number.isFinite(concurrency) ? concurrency : 1));
  const out: Array<{ target: T; result: ProxyCheckResult }> = new Array(targets.length);
  let next = 0;
  const worker = async (): Promise<void> => {
    // An aborted batch starts no further checks; the ones in flight end by their own timeout.
    while (next < targets.length && !signal?.aborted) {
      const i = next++;
      const target = targets[i] as T;
      let result: ProxyCheckResult;
      try {
        result = await check(target);
      } catch (err) {
        result = {
          healthy: false,
          latencyMs: null,
          egressIP: null,
          error: `check failed: ${err instanceof Error ? err.name : 'error'}`,
          errorClass: 'proxyError',
        };
      }
      out[i] = { target, result };
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, targets.length) }, () => worker()));
  return signal?.aborted ? out.filter((x) => x !== undefined) : out;
}

/**
 * Reads `username:password` from the first line of `file` (trimmed). Throws an
 * Error naming the file (never its content) when it cannot be read or is malformed.
 */
export async function readProxyCredentials(file: string): Promise<ProxyCredentials> {
  let content: string;
  try {
    content = await readFile(file, 'utf8');
  } catch (err) {
    throw new Error(`cannot read proxy credentials file ${file}: ${errnoCode(err) ?? 'read error'}`);
  }
  const firstLine = (content.split(/\r?\n/, 1)[0] ?? '').trim();
  const colon = firstLine.indexOf(':');
  if (colon < 0) {
    throw new Error(`proxy credentials file ${file} is malformed: expected "username:password" on the first line`);
  }
  const username = firstLine.slice(0, colon);
  const password = firstLine.slice(colon + 1);
  if (username.length === 0) {
    throw new Error(`proxy credentials file ${file} is malformed: empty username`);
  }
  if (password.length === 0) {
    throw new Error(`proxy credentials file ${file} is malformed: empty password`);
  }
  if (/[\x00-\x1f\x7f]/.test(firstLine)) {
    throw new Error(`proxy credentials file ${file} is malformed: control characters in credentials`);
  }
  return { username, password };
}
