// CLI commands of warm pools and claims: `claim` and `release` go through the running daemon's
// HTTP API (a claim starts or binds a container and injects credentials, which only the daemon
// can do); `get claims`, `describe claim` and the WarmPool sections of `describe` read the store.
//
// Credentials given to `claim` (--env, --env-file, --file) are sent to the daemon and nowhere
// else: no message of this file ever contains an env value or a file's content.

import fs from 'node:fs';
import YAML from 'yaml';
import type { Config } from '../config.js';
import { claimObject, USER_ID, type ClaimResult } from '../controllers/warmpool/claims.js';
import type { PrinterColumn } from '../desired/kinds.js';
import { claimHistory, getClaim, listClaims, listMembers, memberCounts, type ClaimRecord } from '../state/pools.js';
import type { Store } from '../state/store.js';
import { formatDuration, parseDuration } from '../util/duration.js';
import type { Io } from './errors.js';
import { age, CliError, eventsSection, EXIT, prefixLines, relativeTime, renderObjects, table, type OutputFormat } from './output.js';

export interface ServerOptions {
  server?: string;
  tokenFile?: string;
}

export interface ClaimOptions extends ServerOptions {
  user: string;
  ttl?: string;
  env?: string[];
  envFile?: string;
  file?: string[];
  output: 'table' | 'json' | 'yaml';
}

export interface GetClaimsOptions {
  pool?: string;
  user?: string;
  all?: boolean;
  output: OutputFormat;
}

/** A cold start pulls nothing but may still take a while (image start, health check). */
const CLAIM_TIMEOUT_MS = 120_000;
const RELEASE_TIMEOUT_MS = 30_000;
/** The claims `describe warmpool` computes its figures over (as GET /pools/{pool}/stats does). */
const STATS_WINDOW = 1000;
/** API answers that mean "not possible right now / no such thing", not a broken call: exit 1. */
const PROBLEM_STATUSES = new Set([404, 409, 429, 503]);
const ENV_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;

// ---- talking to the daemon ---------------------------------------------------

/** --server, else the daemon's own listen address (a wildcard address is reached on loopback). */
export function serverUrl(server: string | undefined, cfg: Config): string {
  if (server !== undefined) {
    let url: URL;
    try {
      url = new URL(server);
    } catch {
      throw new CliError(`--server ${JSON.stringify(server)} is not a URL (e.g. http://127.0.0.1:9470)`);
    }
    if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new CliError(`--server must be an http:// or https:// URL, got ${url.protocol}`);
    return server.replace(/\/+$/, '');
  }
  let host = cfg.listen.host;
  if (host === '0.0.0.0') host = '127.0.0.1';
  else if (host === '::') host = '::1';
  return `http://${host.includes(':') ? `[${host}]` : host}:${cfg.listen.port}`;
}

/** The bearer token: --token-file, else apiTokenFile (env POLYDEV_API_TOKEN_FILE). Never printed. */
export function readApiToken(tokenFile: string | undefined, cfg: Config): string {
  const file = tokenFile ?? cfg.apiTokenFile;
  if (!file) throw new CliError('no API token: pass --token-file FILE, or set apiTokenFile in the config (env POLYDEV_API_TOKEN_FILE)');
  let token: string;
  try {
    token = fs.readFileSync(file, 'utf8').trim();
  } catch (err) {
    throw new CliError(`cannot read the API token file ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  if (token === '') throw new CliError(`the API token file ${file} is empty`);
  return token;
}

interface ApiResponse {
  status: number;
  retryAfter: string | null;
  body: unknown;
}

interface Call {
  method: string;
  path: string;
  body?: unknown;
  timeoutMs: number;
  /** Added to the timeout message (what may have happened anyway). */
  timeoutHint?: string;
}

async function callApi(server: string, token: string, call: Call): Promise<ApiResponse> {
  const { method, path, body, timeoutMs } = call;
  const headers: Record<string, string> = { accept: 'application/json', authorization: `Bearer ${token}` };
  if (body !== undefined) headers['content-type'] = 'application/json';
  let res: Response;
  let text: string;
  try {
    res = await fetch(server + path, {
      method,
      headers,
      ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
      signal: AbortSignal.timeout(timeoutMs),
    });
    text = await res.text();
  } catch (err) {
    throw unreachable(server, err, call);
  }
  let parsed: unknown = text;
  try {
    parsed = JSON.parse(text);
  } catch {
    /* not JSON: a proxy's error page, say; apiError() falls back to the status */
  }
  return { status: res.status, retryAfter: res.headers.get('retry-after'), body: parsed };
}

function unreachable(server: string, err: unknown, call: Call): CliError {
  const e = err as Error & { cause?: { message?: string } };
  if (e.name === 'TimeoutError' || e.name === 'AbortError') {
    return new CliError(`the daemon at ${server} did not answer within ${formatDuration(call.timeoutMs)}${call.timeoutHint ? `; ${call.timeoutHint}` : ''}`);
  }
  const why = e.cause?.message ?? e.message;
  return new CliError(`cannot reach the daemon at ${server}: ${why} (is \`polydev-reconciler run\` running?)`);
}

/** The API's `{error: {code, message}}`, or what the status says when the body is something else. */
function apiError(res: ApiResponse): { code: string; message: string } {
  const err = (res.body as { error?: { code?: unknown; message?: unknown } } | null)?.error;
  if (err && typeof err === 'object' && typeof err.message === 'string') {
    return { code: typeof err.code === 'string' ? err.code : `HTTP_${res.status}`, message: err.message };
  }
  return { code: `HTTP_${res.status}`, message: `the daemon answered HTTP ${res.status}` };
}

/** 404/409/429/503 are answers (exit 1); anything else unexpected is an error (exit 2). */
function failure(res: ApiResponse): CliError {
  const { code, message } = apiError(res);
  const retry = res.retryAfter && /^[0-9]+$/.test(res.retryAfter) ? ` (retry after ${formatDuration(Number(res.retryAfter) * 1000)})` : '';
  if (PROBLEM_STATUSES.has(res.status)) return new CliError(message + retry, EXIT.PROBLEMS);
  const hint = res.status === 401 || res.status === 403 ? '; check --token-file or apiTokenFile' : '';
  return new CliError(`${message} (HTTP ${res.status} ${code}${hint})${retry}`);
}

// ---- claim and release ---------------------------------------------------------

/** `KEY=VALUE` arguments; a malformed one is reported without its text (it may hold a value). */
function envFromArgs(args: string[]): Record<string, string> {
  const env: Record<string, string> = {};
  args.forEach((arg, i) => {
    const eq = arg.indexOf('=');
    if (eq < 0) throw new CliError(`--env takes KEY=VALUE; --env argument ${i + 1} has no "=" (not shown: it may be a value)`);
    const key = arg.slice(0, eq);
    if (!ENV_NAME.test(key)) throw new CliError(`--env argument ${i + 1}: the name before "=" is not a valid environment variable name`);
    env[key] = arg.slice(eq + 1);
  });
  return env;
}

/** KEY=VALUE lines; blank lines and # comments are skipped; values are literal (no quotes, no expansion). */
function envFromFile(file: string): Record<string, string> {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    throw new CliError(`--env-file: cannot read ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  const env: Record<string, string> = {};
  text.split('\n').forEach((raw, i) => {
    const line = raw.replace(/\r$/, '');
    if (line.trim() === '' || line.trimStart().startsWith('#')) return;
    const eq = line.indexOf('=');
    const key = eq < 0 ? '' : line.slice(0, eq);
    if (!ENV_NAME.test(key)) throw new CliError(`--env-file ${file}:${i + 1}: expected KEY=VALUE with a valid variable name (the line is not shown)`);
    env[key] = line.slice(eq + 1);
  });
  return env;
}

/** `NAME=LOCALPATH` → files[NAME] = the local file's text. */
function filesFromArgs(args: string[]): Record<string, string> {
  const files: Record<string, string> = {};
  const utf8 = new TextDecoder('utf-8', { fatal: true });
  for (const arg of args) {
    const eq = arg.indexOf('=');
    const name = eq < 0 ? '' : arg.slice(0, eq);
    const local = eq < 0 ? '' : arg.slice(eq + 1);
    if (!name || !local) throw new CliError(`--file takes NAME=LOCALPATH (the path inside the container's secrets dir, then a local file), got ${JSON.stringify(arg)}`);
    let buf: Buffer;
    try {
      buf = fs.readFileSync(local);
    } catch (err) {
      throw new CliError(`--file ${name}: cannot read ${local}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
    }
    try {
      files[name] = utf8.decode(buf);
    } catch {
      throw new CliError(`--file ${name}: ${local} is not UTF-8 text (the claim API carries text files only)`);
    }
  }
  return files;
}

function ttlSeconds(ttl: string): number {
  let ms: number;
  try {
    ms = parseDuration(ttl);
  } catch (err) {
    throw new CliError(`--ttl: ${(err as Error).message}`);
  }
  if (ms <= 0) throw new CliError('--ttl must be longer than 0');
  return Math.ceil(ms / 1000);
}

function isClaimResult(v: unknown): v is ClaimResult {
  const r = v as Partial<ClaimResult> | null;
  return typeof r === 'object' && r !== null && typeof r.claimId === 'string' && typeof r.container === 'object' && r.container !== null;
}

/** `claim POOL --user U ...`: POST /api/v1/pools/{pool}/claims. */
export async function claimCommand(pool: string, opts: ClaimOptions, cfg: Config, io: Io): Promise<number> {
  if (!USER_ID.test(opts.user)) throw new CliError('--user must be 1-128 of letters, digits and . _ @ -, starting with a letter or digit');
  const env = { ...(opts.envFile !== undefined ? envFromFile(opts.envFile) : {}), ...envFromArgs(opts.env ?? []) };
  const files = filesFromArgs(opts.file ?? []);
  const body = {
    userId: opts.user,
    ...(Object.keys(env).length > 0 ? { env } : {}),
    ...(Object.keys(files).length > 0 ? { files } : {}),
    ...(opts.ttl !== undefined ? { ttlSeconds: ttlSeconds(opts.ttl) } : {}),
  };
  const server = serverUrl(opts.server, cfg);
  const token = readApiToken(opts.tokenFile, cfg);
  const res = await callApi(server, token, {
    method: 'POST',
    path: `/api/v1/pools/${encodeURIComponent(pool)}/claims`,
    body,
    timeoutMs: CLAIM_TIMEOUT_MS,
    timeoutHint: `the claim may still have been made: see \`polydev-reconciler get claims --user ${opts.user}\``,
  });
  if (res.status !== 201) throw failure(res);
  if (!isClaimResult(res.body)) throw new CliError(`the daemon at ${server} answered 201 without a claim in the body`);
  const r = res.body;
  if (opts.output === 'json') io.out(JSON.stringify(r, null, 2));
  else if (opts.output === 'yaml') io.out(YAML.stringify(r).trimEnd());
  else {
    io.out(
      `claim ${r.claimId}: container ${r.container.name} at ${r.container.address || '<none>'} (${r.warm ? 'warm' : 'cold start'}), ` +
        `${formatDuration(r.latencyMs)}, expires ${r.expiresAt}`,
    );
  }
  return EXIT.OK;
}

/** `release CLAIM_ID`: DELETE /api/v1/claims/{id}. Releasing an ended claim changes nothing and says so. */
export async function releaseCommand(claimId: string, opts: ServerOptions, cfg: Config, io: Io): Promise<number> {
  const server = serverUrl(opts.server, cfg);
  const token = readApiToken(opts.tokenFile, cfg);
  const res = await callApi(server, token, { method: 'DELETE', path: `/api/v1/claims/${encodeURIComponent(claimId)}`, timeoutMs: RELEASE_TIMEOUT_MS });
  if (res.status !== 200) throw failure(res);
  const status = (res.body as { status?: { phase?: unknown; containerName?: unknown; reason?: unknown } } | null)?.status ?? {};
  const phase = typeof status.phase === 'string' ? status.phase : 'Released';
  if (phase !== 'Released') {
    io.out(`claim ${claimId} had already ended: ${phase}${typeof status.reason === 'string' ? ` (${status.reason})` : ''}`);
    return EXIT.OK;
  }
  const container = typeof status.containerName === 'string' ? `container ${status.containerName}` : 'its container';
  io.out(`claim ${claimId} released (${container} is destroyed or recycled by the reconciler)`);
  return EXIT.OK;
}

// ---- reading claims from the store ------------------------------------------------

/** `get claims [ID]`: open claims (pending, bound) unless --all; newest first. */
export function getClaims(store: Store, columns: PrinterColumn[], id: string | undefined, opts: GetClaimsOptions, io: Io): number {
  let claims: ClaimRecord[];
  if (id !== undefined) {
    const c = getClaim(store, id);
    if (!c) throw new CliError(`Claim "${id}" not found`, EXIT.PROBLEMS);
    claims = [c];
  } else {
    claims = listClaims(store, {
      ...(opts.pool !== undefined ? { pool: opts.pool } : {}),
      ...(opts.user !== undefined ? { userId: opts.user } : {}),
      ...(opts.all ? {} : { state: 'open' as const }),
      limit: 1_000_000,
    });
  }
  if (claims.length === 0 && (opts.output === 'table' || opts.output === 'wide')) {
    io.err(opts.all ? 'no claims' : 'no open claims (--all shows ended ones too)');
    return EXIT.OK;
  }
  io.out(renderObjects(claims.map(claimObject), columns, opts.output, id !== undefined).trimEnd());
  return EXIT.OK;
}

const iso = (ms: number | null): string | undefined => (ms === null ? undefined : new Date(ms).toISOString());

/** `describe claim ID`: the claim's fields, then the pool's events that name it. */
export function describeClaim(store: Store, id: string): string {
  const c = getClaim(store, id);
  if (!c) throw new CliError(`Claim "${id}" not found`, EXIT.PROBLEMS);
  const phase = (claimObject(c).status as { phase: string }).phase;
  const lines: string[] = [];
  const kv = (k: string, v: string) => lines.push(`${(k + ':').padEnd(20)}${v}`);
  const when = (ms: number | null) => (ms === null ? '<none>' : `${iso(ms)} (${relativeTime(iso(ms))})`);
  kv('Name', c.id);
  kv('Kind', 'Claim');
  kv('Pool', c.pool);
  kv('User', c.userId);
  kv('Phase', phase);
  kv('Container', c.containerName ?? '<none>');
  kv('Container ID', c.containerId ?? '<none>');
  kv('Address', c.address ?? '<none>');
  kv('Warm', c.state === 'pending' ? '<pending>' : String(c.warm));
  kv('Latency', c.latencyMs === null ? '<none>' : formatDuration(c.latencyMs));
  kv('Created', when(c.createdAt));
  kv('Bound', when(c.boundAt));
  kv('Expires', when(c.expiresAt));
  kv('Ended', when(c.endedAt));
  kv('Reason', c.reason ?? '<none>');
  const events = store.listEvents({ kind: 'WarmPool', name: c.pool, limit: 500 }).filter((e) => e.message.includes(c.id));
  lines.push(...eventsSection(events));
  return lines.join('\n');
}

function percent(ratio: number): string {
  return `${(ratio * 100).toFixed(1)}%`;
}

/** The sections `describe warmpool NAME` adds to the generic ones: containers, open claims, stats. */
export function warmPoolSections(store: Store, pool: string): string[] {
  const lines: string[] = [];
  const members = listMembers(store, pool);
  lines.push('Containers:');
  lines.push(
    members.length === 0
      ? '  <none>'
      : prefixLines(
          table(['NAME', 'STATE', 'CLAIM', 'ADDRESS', 'AGE'], members.map((m) => [m.name, m.state, m.claimId ?? '<none>', m.address ?? '<none>', age(iso(m.createdAt))])),
          '  ',
        ),
  );
  const open = listClaims(store, { pool, state: 'open', limit: 1_000_000 });
  lines.push('Claims:');
  lines.push(
    open.length === 0
      ? '  <none>'
      : prefixLines(
          table(
            ['ID', 'USER', 'CONTAINER', 'WARM', 'EXPIRES'],
            open.map((c) => [c.id, c.userId, c.containerName ?? '<none>', c.state === 'pending' ? '<pending>' : String(c.warm), `${iso(c.expiresAt)} (${relativeTime(iso(c.expiresAt))})`]),
          ),
          '  ',
        ),
  );
  const counts = memberCounts(store, pool);
  const h = claimHistory(store, pool, STATS_WINDOW);
  const latency = h.p50Ms === null || h.p99Ms === null ? '<none>' : `p50 ${formatDuration(h.p50Ms)}, p99 ${formatDuration(h.p99Ms)}`;
  lines.push(`Stats (newest ${STATS_WINDOW} claims):`);
  lines.push(`  Containers:       ${counts.warm} warm, ${counts.claimed} claimed, ${counts.starting} starting, ${counts.releasing} releasing`);
  lines.push(`  Claims served:    ${h.served} (${h.warmHits} warm, ${h.served - h.warmHits} cold), ${h.failed} failed`);
  lines.push(`  Warm-hit ratio:   ${h.served ? percent(h.warmHits / h.served) : '<none>'}`);
  lines.push(`  Claim latency:    ${latency}`);
  return lines;
}
