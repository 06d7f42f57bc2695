// Warm-pool test environment: an in-process daemon (see e2e-env.ts) configured for a real
// dockerd started by helpers/dockerd.ts, desired state written as WarmPool YAML, and a
// small API client with the test token.

import type { ExecutionContext } from 'ava';
import path from 'node:path';
import YAML from 'yaml';
import type { Daemon, DaemonOptions } from '../../src/daemon.js';
import { LABELS } from '../../src/controllers/warmpool/engine.js';
import { listMembers, type PoolMember } from '../../src/state/pools.js';
import type { Dockerd } from './dockerd.js';
import { TOKEN, e2eEnv, startDaemon, waitFor, type E2eEnv } from './e2e-env.js';

export interface WarmPoolOptions {
  name: string;
  image?: string;
  engine?: 'docker' | 'process' | 'nomad';
  ports?: Array<{ name: string; containerPort: number }>;
  command?: string[];
  size: number;
  maxSize: number;
  env?: Record<string, string>;
  resources?: Record<string, unknown>;
  idleResources?: Record<string, unknown>;
  idleTimeout?: string;
  claim?: Record<string, unknown>;
  provider?: string;
  driftPolicy?: 'correct' | 'warn' | 'ignore';
}

/** Every container on dockerd (running or not) labelled as owned by this installation id. */
export async function ownedContainers(dockerd: Dockerd, owner: string): Promise<Array<{ Id: string; State: string; Labels: Record<string, string> }>> {
  const filters = encodeURIComponent(JSON.stringify({ label: [`${LABELS.owner}=${owner}`] }));
  return (await dockerd.request('GET', `/containers/json?all=1&filters=${filters}`)).json as Array<{ Id: string; State: string; Labels: Record<string, string> }>;
}

export function warmPoolDoc(o: WarmPoolOptions): Record<string, unknown> {
  const spec: Record<string, unknown> = {
    provider: o.provider ?? 'openai',
    engine: o.engine ?? 'docker',
    command: o.command ?? ['sleep', '100000'],
    size: o.size,
    maxSize: o.maxSize,
  };
  if (o.image) spec.image = o.image;
  for (const k of ['env', 'ports', 'resources', 'idleResources', 'idleTimeout', 'claim', 'driftPolicy'] as const) if (o[k] !== undefined) spec[k] = o[k];
  return { apiVersion: 'polydev.ai/v1alpha1', kind: 'WarmPool', metadata: { name: o.name }, spec };
}

export function poolsYaml(pools: WarmPoolOptions[]): string {
  return pools.map((p) => YAML.stringify(warmPoolDoc(p))).join('---\n');
}

export interface Res {
  status: number;
  body: any; // eslint-disable-line @typescript-eslint/no-explicit-any
  headers: Headers;
}

export interface PoolApi {
  base: string;
  request(method: string, p: string, body?: unknown): Promise<Res>;
  claim(pool: string, body: Record<string, unknown>): Promise<Res>;
  release(id: string): Promise<Res>;
  stats(pool: string): Promise<Res>;
}

export function poolApi(daemon: Daemon): PoolApi {
  const base = daemon.address!;
  const request = async (method: string, p: string, body?: unknown): Promise<Res> => {
    const headers: Record<string, string> = { authorization: `Bearer ${TOKEN}` };
    if (body !== undefined) headers['content-type'] = 'application/json';
    const res = await fetch(base + p, {
      method,
      headers,
      ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
      signal: AbortSignal.timeout(60_000),
    });
    const text = await res.text();
    return { status: res.status, body: text ? JSON.parse(text) : undefined, headers: res.headers };
  };
  return {
    base,
    request,
    claim: (pool, body) => request('POST', `/api/v1/pools/${pool}/claims`, body),
    release: (id) => request('DELETE', `/api/v1/claims/${id}`),
    stats: (pool) => request('GET', `/api/v1/pools/${pool}/stats`),
  };
}

export interface PoolEnv {
  env: E2eEnv;
  daemon: Daemon;
  api: PoolApi;
  cfgFile: string;
  /** Writes the pools as the watched desired state (pools.yaml). */
  setPools(pools: WarmPoolOptions[]): void;
  members(pool: string): PoolMember[];
  /** Waits until the pool has `warm` warm members (and, when given, `claimed` claimed ones) and is Ready. */
  waitWarm(pool: string, warm: number, timeoutMs?: number): Promise<void>;
}

export async function poolEnv(
  t: ExecutionContext,
  dockerd: Dockerd | undefined,
  pools: WarmPoolOptions[],
  opts: { config?: Record<string, unknown>; daemon?: DaemonOptions } = {},
): Promise<PoolEnv> {
  const env = await e2eEnv(t);
  const cfgFile = env.writeConfig({
    desiredStateDir: env.desiredDir,
    apiTokenFile: env.tokenFile,
    resyncInterval: '60s',
    ...(dockerd ? { docker: { socket: dockerd.socketPath, network: 'none' } } : {}),
    process: { runDir: path.join(env.dir, 'run') },
    ...(opts.config ?? {}),
  });
  const setPools = (list: WarmPoolOptions[]) => env.writeDesired('pools.yaml', poolsYaml(list));
  setPools(pools);
  const daemon = await startDaemon(t, cfgFile, opts.daemon ?? {});
  const members = (pool: string) => listMembers(daemon.store, pool);
  return {
    env,
    daemon,
    api: poolApi(daemon),
    cfgFile,
    setPools,
    members,
    async waitWarm(pool, warm, timeoutMs = 60_000) {
      await waitFor(
        `${warm} warm containers in pool ${pool}`,
        () => {
          const m = members(pool);
          const status = daemon.store.getResource('WarmPool', pool)?.status;
          const q = daemon.manager.queue;
          // Idle too: a run still settling could otherwise take what the test does next as its own work.
          return m.filter((x) => x.state === 'warm').length === warm && status?.phase === 'Ready' && q.depth === 0 && q.busy === 0;
        },
        timeoutMs,
      );
    },
  };
}
