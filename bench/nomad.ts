// WarmPool engine `nomad` benchmarks (issue 5), against the fake Nomad of
// test/helpers/fake-nomad.ts in docker mode (its "client" runs every task as a real container
// on a private dockerd from test/helpers/dockerd.ts) and in-process daemons, as
// test/warmpool-nomad.test.ts starts them (the resync figure needs the daemon's work queue).
//
// 1. Claim latency through the nomad engine: CLAIM_POOL concurrent claims at a pool of
//    CLAIM_POOL warm containers (bench/http-burst.ts, as bench/warm-pool.ts), and the same
//    burst at a docker-engine pool of the same size in the same daemon, runs interleaved.
//    Goal (issue): "same order as the docker engine, since claims come from the store":
//    nomad/docker ≤ 3.
// 2. Nomad API calls per steady-state resync (a forced reconcile of the pool) with the event
//    stream up, for pools of 30 and 10 containers; and with the stream down (the fallback).
//    Goal: O(1): the same count at 30 and 10, and ≤ 2.
//
// Everything it creates (daemons, fakes, dockerd and its containers, namespaces, temp dirs)
// is removed when it ends, also on SIGINT/SIGTERM.
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { ExecutionContext } from 'ava';
import { LABELS, MANAGED_BY } from '../src/controllers/warmpool/engine.js';
import type { Daemon } from '../src/daemon.js';
import { listMembers } from '../src/state/pools.js';
import { startDockerd, type Dockerd } from '../test/helpers/dockerd.js';
import { TOKEN, e2eEnv, startDaemon } from '../test/helpers/e2e-env.js';
import { startFakeNomad, type FakeNomad } from '../test/helpers/fake-nomad.js';
import { poolsYaml, type WarmPoolOptions } from '../test/helpers/warmpool-env.js';
import { encodeRequest, RawConnections } from './http-burst.js';
import { median, summarize, type BenchFigure } from './stats.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
/** Warm containers per pool, and concurrent claims per burst (2 CPUs: kept modest). */
const CLAIM_POOL = 50;
const PARALLELISM = 8;
/** Forced resyncs per measured state. */
const RESYNCS = 10;
const RESYNC_SIZES = [30, 10] as const;
const HEARTBEAT_MS = 500;
const STREAM_PATH = '/v1/event/stream';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const round = (x: number, digits = 3) => Math.round(x * 10 ** digits) / 10 ** digits;
const log = (msg: string) => process.stderr.write(`[nomad ${new Date().toISOString().slice(11, 19)}] ${msg}\n`);

// ---------------------------------------------------------------------------------------
// Cleanup: everything registered here runs once, in reverse order, at the end or on a signal.

const cleanups: Array<() => Promise<void> | void> = [];
async function runCleanups(): Promise<void> {
  while (cleanups.length) {
    const fn = cleanups.pop()!;
    try {
      await fn();
    } catch (err) {
      log(`cleanup step failed: ${(err as Error).message}`);
    }
  }
}
function onSignal(sig: NodeJS.Signals): void {
  log(`${sig}: cleaning up`);
  void runCleanups().finally(() => process.exit(130));
}

/** The test helpers take an ava context only for t.teardown: here teardowns join the cleanups. */
const ctx = { teardown: (fn: () => unknown) => void cleanups.push(async () => void (await fn())) } as unknown as ExecutionContext;

async function waitUntil(what: string, fn: () => boolean | Promise<boolean>, timeoutMs: number, intervalMs = 20): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await fn()) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(intervalMs);
  }
}

/** Busy and total jiffies of the whole machine (/proc/stat). */
function machineJiffies(): { busy: number; total: number } {
  const f = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0]!.trim().split(/\s+/).slice(1).map(Number);
  const total = f.reduce((a, b) => a + b, 0);
  const idle = (f[3] ?? 0) + (f[4] ?? 0);
  return { busy: total - idle, total };
}

/** Waits (at most maxMs) until the machine was under busyPct busy for 500 ms (the previous run's removals and refills done). */
async function waitQuiet(busyPct = 15, maxMs = 60_000): Promise<{ waitedMs: number; busyPct: number }> {
  const start = performance.now();
  let busy = 100;
  while (performance.now() - start < maxMs) {
    const j0 = machineJiffies();
    await sleep(500);
    const j1 = machineJiffies();
    busy = j1.total > j0.total ? Math.round((100 * (j1.busy - j0.busy)) / (j1.total - j0.total)) : 100;
    if (busy < busyPct) break;
  }
  return { waitedMs: Math.round(performance.now() - start), busyPct: busy };
}

// ---------------------------------------------------------------------------------------
// Daemons (in-process, as test/helpers/warmpool-env.ts starts them).

interface BenchDaemon {
  daemon: Daemon;
  port: number;
  setPools(pools: WarmPoolOptions[]): void;
}

async function benchDaemon(pools: WarmPoolOptions[], config: Record<string, unknown>): Promise<BenchDaemon> {
  const env = await e2eEnv(ctx);
  const cfgFile = env.writeConfig({
    desiredStateDir: env.desiredDir,
    apiTokenFile: env.tokenFile,
    resyncInterval: '10m',
    applyDebounce: '50ms',
    warmPools: { parallelism: PARALLELISM },
    ...config,
  });
  const setPools = (list: WarmPoolOptions[]) => env.writeDesired('pools.yaml', poolsYaml(list));
  setPools(pools);
  const daemon = await startDaemon(ctx, cfgFile);
  const port = Number(new URL(daemon.address!).port);
  return { daemon, port, setPools };
}

const queueIdle = (d: Daemon) => d.manager.queue.depth === 0 && d.manager.queue.busy === 0;

/** Until the pool has exactly `warm` members, all warm, is Ready, and the queue is idle, for stableMs. */
async function waitIdle(d: Daemon, pool: string, warm: number, timeoutMs: number, stableMs = 500): Promise<void> {
  let since: number | undefined;
  await waitUntil(
    `pool ${pool}: ${warm} warm and idle`,
    () => {
      const m = listMembers(d.store, pool);
      const ok = m.length === warm && m.every((x) => x.state === 'warm') && d.store.getResource('WarmPool', pool)?.status?.phase === 'Ready' && queueIdle(d);
      if (!ok) {
        since = undefined;
        return false;
      }
      since ??= Date.now();
      return Date.now() - since >= stableMs;
    },
    timeoutMs,
    50,
  );
}

async function api(port: number, method: string, p: string, body?: unknown): Promise<{ status: number; json: any }> { // eslint-disable-line @typescript-eslint/no-explicit-any
  const res = await fetch(`http://127.0.0.1:${port}${p}`, {
    method,
    headers: { authorization: `Bearer ${TOKEN}`, ...(body !== undefined ? { 'content-type': 'application/json' } : {}) },
    ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
    signal: AbortSignal.timeout(60_000),
  });
  const text = await res.text();
  return { status: res.status, json: text ? JSON.parse(text) : undefined };
}

// ---------------------------------------------------------------------------------------
// 1: claim latency, nomad vs docker engine.

interface BurstRun {
  engine: 'nomad' | 'docker';
  client: ReturnType<typeof summarize>;
  server: ReturnType<typeof summarize>;
  burstMs: number;
  statuses: Record<string, number>;
  warmHits: number;
  /** Nomad API requests the fake received between the first send and the last response. */
  nomadRequestsDuringBurst: number;
  /** Nomad API requests (by path shape, the event stream excluded) from the first send until the pool was idle again (claims, releases, refill). */
  nomadRequestsUntilIdle: Record<string, number>;
  quietBefore: { waitedMs: number; busyPct: number };
  loadavg1: number;
  recoverMs: number;
}

async function burst(d: BenchDaemon, pool: string, engine: 'nomad' | 'docker', run: string, fake: FakeNomad): Promise<BurstRun> {
  const conns = await RawConnections.open(d.port, CLAIM_POOL);
  try {
    const healthz = Array.from({ length: CLAIM_POOL }, () => encodeRequest({ method: 'GET', path: '/healthz' }));
    const claims = Array.from({ length: CLAIM_POOL }, (_, i) =>
      encodeRequest({ method: 'POST', path: `/api/v1/pools/${pool}/claims`, headers: { Authorization: `Bearer ${TOKEN}` }, body: { userId: `bench-${run}-u${i}` } }),
    );
    const quietBefore = await waitQuiet();
    // Every connection carries one request first, so the burst meets no first-request cost.
    await conns.burst(healthz);
    await sleep(300);
    const load = os.loadavg()[0]!;
    const n0 = fake.requests.length;
    const t0 = performance.now();
    const results = await conns.burst(claims);
    const burstMs = performance.now() - t0;
    const nomadRequestsDuringBurst = fake.requests.length - n0;
    const statuses: Record<string, number> = {};
    const server: number[] = [];
    const ids: string[] = [];
    let warmHits = 0;
    for (const r of results) {
      statuses[r.status] = (statuses[r.status] ?? 0) + 1;
      if (r.status === 201) {
        const body = JSON.parse(r.body) as { claimId: string; latencyMs: number; warm: boolean };
        server.push(body.latencyMs);
        ids.push(body.claimId);
        if (body.warm) warmHits++;
      }
    }
    if (statuses['201'] !== CLAIM_POOL) log(`${engine} run ${run}: not every claim succeeded: ${JSON.stringify(statuses)}; e.g. ${results.find((r) => r.status !== 201)?.body.slice(0, 300)}`);
    const rel = await conns.burst(ids.map((id) => encodeRequest({ method: 'DELETE', path: `/api/v1/claims/${id}`, headers: { Authorization: `Bearer ${TOKEN}` } })));
    const relBad = rel.filter((r) => r.status !== 200).length;
    if (relBad) throw new Error(`${engine} run ${run}: ${relBad} releases failed, e.g. ${rel.find((r) => r.status !== 200)?.body.slice(0, 300)}`);
    const r0 = performance.now();
    await waitIdle(d.daemon, pool, CLAIM_POOL, 300_000);
    const nomadRequestsUntilIdle = countPaths(callsSince(fake, n0));
    return {
      engine,
      client: summarize(results.map((r) => r.ms)),
      server: summarize(server),
      burstMs: round(burstMs),
      statuses,
      warmHits,
      nomadRequestsDuringBurst,
      nomadRequestsUntilIdle,
      quietBefore,
      loadavg1: round(load, 2),
      recoverMs: Math.round(performance.now() - r0),
    };
  } finally {
    conns.close();
  }
}

async function claimLatency(dockerd: Dockerd, runs: number): Promise<{ figures: BenchFigure[]; raw: Record<string, unknown> }> {
  const fake = await startFakeNomad(ctx, { docker: dockerd.client, heartbeatMs: 10_000 });
  const pools: WarmPoolOptions[] = [
    { name: 'nomad-hot', engine: 'nomad', image: dockerd.image, command: ['sleep', '100000'], size: CLAIM_POOL, maxSize: CLAIM_POOL * 2 },
    { name: 'docker-hot', engine: 'docker', image: dockerd.image, command: ['sleep', '100000'], size: CLAIM_POOL, maxSize: CLAIM_POOL * 2 },
  ];
  const d = await benchDaemon(pools, {
    resyncInterval: '30s',
    docker: { socket: dockerd.socketPath, network: 'none' },
    nomad: { address: fake.address, startTimeout: '60s' },
  });
  const f0 = performance.now();
  await Promise.all([waitIdle(d.daemon, 'nomad-hot', CLAIM_POOL, 600_000), waitIdle(d.daemon, 'docker-hot', CLAIM_POOL, 600_000)]);
  const initialFillMs = Math.round(performance.now() - f0);
  log(`both pools warm (${CLAIM_POOL} + ${CLAIM_POOL}) after ${initialFillMs} ms`);
  // Warm-up (not measured): a few claims and releases per pool.
  for (const p of pools) {
    for (let i = 0; i < 5; i++) {
      const c = await api(d.port, 'POST', `/api/v1/pools/${p.name}/claims`, { userId: `warmup-u${i}` });
      if (c.status !== 201) throw new Error(`warm-up claim on ${p.name}: ${c.status} ${JSON.stringify(c.json).slice(0, 300)}`);
      const r = await api(d.port, 'DELETE', `/api/v1/claims/${c.json.claimId as string}`);
      if (r.status !== 200) throw new Error(`warm-up release on ${p.name}: ${r.status}`);
    }
    await waitIdle(d.daemon, p.name, CLAIM_POOL, 120_000);
  }
  const bursts: BurstRun[] = [];
  for (let i = 0; i < runs; i++) {
    // Interleaved, the order alternating, so drift in the machine's load hits both engines alike.
    const order: Array<['nomad' | 'docker', string]> = i % 2 === 0 ? [['nomad', 'nomad-hot'], ['docker', 'docker-hot']] : [['docker', 'docker-hot'], ['nomad', 'nomad-hot']];
    for (const [engine, pool] of order) {
      const b = await burst(d, pool, engine, `r${i}`, fake);
      log(`  run ${i + 1} ${engine}: client p50 ${b.client.p50} p99 ${b.client.p99} ms; server p50 ${b.server.p50} p99 ${b.server.p99} ms; warm ${b.warmHits}/${CLAIM_POOL}; Nomad requests during the burst ${b.nomadRequestsDuringBurst}; recovered in ${b.recoverMs} ms`);
      bursts.push(b);
    }
  }
  const of = (e: 'nomad' | 'docker') => bursts.filter((b) => b.engine === e);
  const m = (xs: number[]) => round(median(xs));
  const fig = (e: 'nomad' | 'docker') => ({
    clientP50: m(of(e).map((b) => b.client.p50)),
    clientP99: m(of(e).map((b) => b.client.p99)),
    serverP50: m(of(e).map((b) => b.server.p50)),
    serverP99: m(of(e).map((b) => b.server.p99)),
  });
  const nomad = fig('nomad');
  const docker = fig('docker');
  const ratio = (k: keyof typeof nomad) => round(nomad[k] / docker[k], 2);
  const label = `claim, ${CLAIM_POOL} concurrent on ${CLAIM_POOL} warm`;
  const allWarm = (e: 'nomad' | 'docker') => of(e).every((b) => b.warmHits === CLAIM_POOL);
  const figures: BenchFigure[] = [
    { backend: 'nomad', name: `${label}: client p50`, value: nomad.clientP50, unit: 'ms' },
    { backend: 'nomad', name: `${label}: client p99`, value: nomad.clientP99, unit: 'ms' },
    { backend: 'nomad', name: '  server-side latencyMs p50', value: nomad.serverP50, unit: 'ms' },
    { backend: 'nomad', name: '  server-side latencyMs p99', value: nomad.serverP99, unit: 'ms' },
    { backend: 'nomad', name: '  warm hits', value: median(of('nomad').map((b) => b.warmHits)), unit: 'count', goal: `${CLAIM_POOL}`, met: allWarm('nomad') },
    { backend: 'nomad', name: '  Nomad API requests during the burst', value: median(of('nomad').map((b) => b.nomadRequestsDuringBurst)), unit: 'count' },
    { backend: 'docker', name: `${label}: client p50 (same daemon, same run)`, value: docker.clientP50, unit: 'ms' },
    { backend: 'docker', name: `${label}: client p99 (same daemon, same run)`, value: docker.clientP99, unit: 'ms' },
    { backend: 'docker', name: '  server-side latencyMs p50', value: docker.serverP50, unit: 'ms' },
    { backend: 'docker', name: '  server-side latencyMs p99', value: docker.serverP99, unit: 'ms' },
    { backend: 'docker', name: '  warm hits', value: median(of('docker').map((b) => b.warmHits)), unit: 'count', goal: `${CLAIM_POOL}`, met: allWarm('docker') },
    { backend: 'nomad/docker', name: 'ratio client p50', value: ratio('clientP50'), unit: 'x' },
    { backend: 'nomad/docker', name: 'ratio client p99', value: ratio('clientP99'), unit: 'x', goal: '<= 3', met: ratio('clientP99') <= 3 },
    { backend: 'nomad/docker', name: 'ratio server-side p50', value: ratio('serverP50'), unit: 'x' },
    { backend: 'nomad/docker', name: 'ratio server-side p99', value: ratio('serverP99'), unit: 'x', goal: '<= 3', met: ratio('serverP99') <= 3 },
  ];
  const raw: Record<string, unknown> = { initialFillMs, bursts, medians: { nomad, docker } };
  // For context only: bench/warm-pool.json's docker figure (another shape: 200 on 200, daemon in its own process).
  try {
    const wp = JSON.parse(fs.readFileSync(path.join(HERE, 'results', 'warm-pool.json'), 'utf8')) as { date: string; figures: BenchFigure[] };
    raw.warmPoolJsonReference = { date: wp.date, figures: wp.figures.slice(0, 5).map((f) => ({ name: f.name, value: f.value, unit: f.unit })) };
  } catch {
    raw.warmPoolJsonReference = null;
  }
  return { figures, raw };
}

// ---------------------------------------------------------------------------------------
// 2: Nomad API calls per steady-state resync.

/**
 * A pass-through HTTP proxy in front of the fake Nomad that can refuse the event stream
 * (503, which the client retries with backoff) and counts the heartbeats it forwards: the
 * fake has no switch to refuse streams, and the bench must know a heartbeat got through.
 */
interface StreamGate {
  address: string;
  down: boolean;
  refused: number;
  heartbeats: number;
  streamsOpened: number;
  close(): Promise<void>;
}

async function startGate(target: string): Promise<StreamGate> {
  const t = new URL(target);
  const agent = new http.Agent({ keepAlive: true });
  const server = http.createServer((req, res) => {
    const isStream = (req.url ?? '').startsWith(STREAM_PATH);
    if (isStream && gate.down) {
      gate.refused++;
      req.resume();
      res.writeHead(503, { 'content-type': 'text/plain' });
      res.end('event stream refused by the bench (stream-down phase)');
      return;
    }
    const up = http.request({ host: t.hostname, port: t.port, method: req.method, path: req.url, headers: req.headers, agent }, (upRes) => {
      res.writeHead(upRes.statusCode ?? 502, upRes.headers);
      if (isStream) {
        res.flushHeaders();
        gate.streamsOpened++;
        upRes.on('data', (chunk: Buffer) => {
          for (const line of chunk.toString('utf8').split('\n')) if (line.trim() === '{}') gate.heartbeats++;
        });
      }
      upRes.pipe(res);
      upRes.on('close', () => {
        if (!upRes.complete) res.destroy();
      });
    });
    up.on('error', () => res.destroy());
    res.on('close', () => {
      if (!res.writableFinished) up.destroy();
    });
    req.pipe(up);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const gate: StreamGate = {
    address: `http://127.0.0.1:${(server.address() as import('node:net').AddressInfo).port}`,
    down: false,
    refused: 0,
    heartbeats: 0,
    streamsOpened: 0,
    async close() {
      server.closeAllConnections();
      agent.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
  cleanups.push(() => gate.close());
  return gate;
}

interface Resync {
  calls: number;
  paths: string[];
  ms: number;
}

/** A request path with ids folded, for the raw JSON (e.g. /v1/job/:id/allocations). */
function shape(p: string): string {
  return p.replace(/^\/v1\/job\/[^/]+/, '/v1/job/:id').replace(/^\/v1\/allocation\/[^/]+/, '/v1/allocation/:id').replace(/^\/v1\/client\/allocation\/[^/]+/, '/v1/client/allocation/:id');
}

function callsSince(fake: FakeNomad, from: number): string[] {
  return fake.requests.slice(from).filter((r) => r.path !== STREAM_PATH).map((r) => `${r.method} ${shape(r.path)}`);
}

/** enqueue('WarmPool', pool), wait until the queue is idle (and stays so for 100 ms); the Nomad calls made meanwhile. */
async function forceResync(d: Daemon, fake: FakeNomad, pool: string): Promise<Resync> {
  const n0 = fake.requests.length;
  const t0 = performance.now();
  d.manager.context.enqueue('WarmPool', pool);
  let ms = NaN;
  await waitUntil('the queue idle after a forced resync', () => {
    if (!queueIdle(d)) return false;
    ms = performance.now() - t0;
    return true;
  }, 30_000, 2);
  await sleep(100);
  await waitUntil('the queue idle', () => queueIdle(d), 30_000, 5);
  const paths = callsSince(fake, n0);
  return { calls: paths.length, paths, ms: round(ms, 1) };
}

interface ResyncCase {
  size: number;
  fillMs: number;
  heartbeatsBefore: number;
  steady: Resync[];
  streamDown: Resync[];
  /** Stream refusals (the client's reconnect attempts) during the stream-down phase. */
  refusedDuringDown: number;
  /** From letting the stream through again until the queue is idle (the controller's onResumed resync). */
  resume: { calls: number; paths: string[]; waitedMs: number };
  afterResume: Resync[];
}

function countPaths(paths: string[]): Record<string, number> {
  const out: Record<string, number> = {};
  for (const p of paths) out[p] = (out[p] ?? 0) + 1;
  return out;
}

async function resyncCase(dockerd: Dockerd, size: number): Promise<ResyncCase> {
  const local: Array<() => Promise<void> | void> = [];
  const mark = cleanups.length;
  try {
    const fake = await startFakeNomad(ctx, { docker: dockerd.client, heartbeatMs: HEARTBEAT_MS });
    const gate = await startGate(fake.address);
    const pool = `steady${size}`;
    const d = await benchDaemon([{ name: pool, engine: 'nomad', image: dockerd.image, command: ['sleep', '100000'], size, maxSize: size }], {
      docker: { socket: dockerd.socketPath, network: 'none' },
      nomad: { address: gate.address, startTimeout: '60s' },
    });
    const f0 = performance.now();
    await waitIdle(d.daemon, pool, size, 300_000);
    const fillMs = Math.round(performance.now() - f0);
    // The stream must be known to deliver: at least one heartbeat through after the pool is warm.
    const hb0 = gate.heartbeats;
    await waitUntil('a heartbeat on the event stream', () => gate.heartbeats > hb0, 10_000);
    await waitUntil('the queue idle', () => queueIdle(d.daemon), 30_000);
    const heartbeatsBefore = gate.heartbeats;
    const steady: Resync[] = [];
    for (let i = 0; i < RESYNCS; i++) steady.push(await forceResync(d.daemon, fake, pool));

    // Stream down: refused from now on, the open one dropped. The client's first reconnect
    // attempt (refused) comes after its error callback ran: the engine then knows it is down.
    gate.down = true;
    const r0 = gate.refused;
    fake.dropStreams();
    await waitUntil('a refused reconnect of the event stream', () => gate.refused > r0, 15_000);
    await waitUntil('the queue idle', () => queueIdle(d.daemon), 30_000);
    const streamDown: Resync[] = [];
    for (let i = 0; i < RESYNCS; i++) streamDown.push(await forceResync(d.daemon, fake, pool));
    const refusedDuringDown = gate.refused - r0;

    // Back up: the client reconnects (backoff ≤ 5 s), the controller reconciles every pool.
    const n0 = fake.requests.length;
    const t0 = performance.now();
    const opened = gate.streamsOpened;
    gate.down = false;
    await waitUntil('the event stream reconnected', () => gate.streamsOpened > opened, 15_000);
    const hb1 = gate.heartbeats;
    await waitUntil('a heartbeat after the reconnect', () => gate.heartbeats > hb1, 10_000);
    await sleep(200);
    await waitUntil('the queue idle', () => queueIdle(d.daemon), 30_000);
    const resumePaths = callsSince(fake, n0);
    const resume = { calls: resumePaths.length, paths: resumePaths, waitedMs: Math.round(performance.now() - t0) };
    const afterResume: Resync[] = [];
    for (let i = 0; i < 3; i++) afterResume.push(await forceResync(d.daemon, fake, pool));
    return { size, fillMs, heartbeatsBefore, steady, streamDown, refusedDuringDown, resume, afterResume };
  } finally {
    // This case's daemon, namespace, gate and fake (with its containers) go now, not at the end.
    local.push(...cleanups.splice(mark));
    while (local.length) {
      try {
        await local.pop()!();
      } catch (err) {
        log(`cleanup step failed: ${(err as Error).message}`);
      }
    }
  }
}

async function resyncCalls(dockerd: Dockerd): Promise<{ figures: BenchFigure[]; raw: Record<string, unknown> }> {
  const cases: ResyncCase[] = [];
  for (const size of RESYNC_SIZES) {
    log(`resyncs: a nomad pool of ${size}, ${RESYNCS} forced resyncs with the stream up, ${RESYNCS} with it down`);
    const c = await resyncCase(dockerd, size);
    log(
      `  ${size}: stream up ${c.steady.map((r) => r.calls).join(',')} calls/resync; down ${c.streamDown.map((r) => r.calls).join(',')}; resume ${c.resume.calls}; after resume ${c.afterResume.map((r) => r.calls).join(',')}`,
    );
    cases.push(c);
  }
  const byIdx = (size: number) => cases.find((c) => c.size === size)!;
  const up = (size: number) => median(byIdx(size).steady.map((r) => r.calls));
  const upMax = (size: number) => Math.max(...byIdx(size).steady.map((r) => r.calls));
  const down = (size: number) => median(byIdx(size).streamDown.map((r) => r.calls));
  const [big, small] = RESYNC_SIZES;
  const o1 = up(big) === up(small) && upMax(big) === upMax(small) && upMax(big) <= 2;
  const figures: BenchFigure[] = [
    { backend: 'nomad', name: `API calls per steady resync, stream up, ${big} containers`, value: up(big), unit: 'calls', goal: '<= 2, = at 10', met: o1 },
    { backend: 'nomad', name: `API calls per steady resync, stream up, ${small} containers`, value: up(small), unit: 'calls', goal: '<= 2, = at 30', met: o1 },
    { backend: 'nomad', name: `  max over the ${RESYNCS} resyncs, ${big} containers`, value: upMax(big), unit: 'calls' },
    { backend: 'nomad', name: `  max over the ${RESYNCS} resyncs, ${small} containers`, value: upMax(small), unit: 'calls' },
    { backend: 'nomad', name: `API calls per resync, stream down (fallback), ${big} containers`, value: down(big), unit: 'calls' },
    { backend: 'nomad', name: `API calls per resync, stream down (fallback), ${small} containers`, value: down(small), unit: 'calls' },
    { backend: 'nomad', name: `  the controller's resync when the stream is back, ${big} containers`, value: byIdx(big).resume.calls, unit: 'calls' },
    { backend: 'nomad', name: `  steady resync after the stream is back, ${big} containers`, value: median(byIdx(big).afterResume.map((r) => r.calls)), unit: 'calls' },
  ];
  const raw: Record<string, unknown> = {
    cases: cases.map((c) => ({
      size: c.size,
      fillMs: c.fillMs,
      heartbeatsBefore: c.heartbeatsBefore,
      steady: { perResync: c.steady.map((r) => r.calls), resyncMs: c.steady.map((r) => r.ms), paths: countPaths(c.steady.flatMap((r) => r.paths)) },
      streamDown: { perResync: c.streamDown.map((r) => r.calls), resyncMs: c.streamDown.map((r) => r.ms), paths: countPaths(c.streamDown.flatMap((r) => r.paths)), refusedReconnects: c.refusedDuringDown },
      resume: { calls: c.resume.calls, waitedMs: c.resume.waitedMs, paths: countPaths(c.resume.paths) },
      afterResume: { perResync: c.afterResume.map((r) => r.calls), paths: countPaths(c.afterResume.flatMap((r) => r.paths)) },
    })),
  };
  return { figures, raw };
}

// ---------------------------------------------------------------------------------------

export async function runNomadBench(runs = 5): Promise<{ figures: BenchFigure[]; raw: Record<string, unknown>; method: Record<string, unknown> }> {
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  const started = performance.now();
  try {
    log('starting a private dockerd');
    const dockerd = await startDockerd({ name: 'nmbench' });
    cleanups.push(() => dockerd.stop());
    const raw: Record<string, unknown> = { dockerd: dockerd.timings, loadavgAtStart: os.loadavg().map((x) => round(x, 2)) };
    const figures: BenchFigure[] = [];

    log(`claims: pools of ${CLAIM_POOL} (nomad and docker engine), ${runs} runs each, interleaved`);
    const claims = await claimLatency(dockerd, runs);
    figures.push(...claims.figures);
    raw.claims = claims.raw;
    // The claim daemon, its fake and their containers go before the resync part.
    await runCleanupsAbove(1);
    await dockerd.removeByLabel(`${LABELS.managedBy}=${MANAGED_BY}`);

    const resyncs = await resyncCalls(dockerd);
    figures.push(...resyncs.figures);
    raw.resyncs = resyncs.raw;
    raw.loadavgAtEnd = os.loadavg().map((x) => round(x, 2));
    raw.totalSeconds = Math.round((performance.now() - started) / 1000);

    const method = {
      setup: `in-process daemons (src/daemon.ts, as test/helpers/warmpool-env.ts starts them: silent logger, iptables in a throwaway netns), warmPools.parallelism ${PARALLELISM}, applyDebounce 50ms; a private dockerd 20.10 (test/helpers/dockerd.ts: vfs, no bridge; busybox image; containers run \`sleep 100000\`); the fake Nomad of test/helpers/fake-nomad.ts in docker mode (its "client" runs each allocation as a real container on that dockerd). The bench client, the daemon and the fake Nomad share this one process (the resync figure needs the daemon's work queue), so the claim latencies include the client's own work and the fake's, for both engines alike.`,
      claimLatency: `one daemon with two pools of size ${CLAIM_POOL}, maxSize ${CLAIM_POOL * 2}: nomad-hot (engine nomad) and docker-hot (engine docker), resyncInterval 30s. After the fill, 5 claims and releases per pool (not measured). ${runs} runs per engine, interleaved and alternating which engine goes first. Each run: wait until the machine is under 15% busy for 500 ms, ${CLAIM_POOL} keep-alive connections (bench/http-burst.ts), one GET /healthz on each, 300 ms pause, then ${CLAIM_POOL} POST /api/v1/pools/<pool>/claims written in one loop (distinct userIds, no env/files: no injection). Client latency: write → last byte of the response; server: the latencyMs of each answer. Per run p50/p99 over the ${CLAIM_POOL} (nearest rank); figures are medians over runs. Then every claim is released and the pool waited for idle (${CLAIM_POOL} warm, Ready, queue idle for 500 ms); the refill the claims trigger starts during the burst. The docker figure is measured in this run, in the same daemon (not read from bench/results/warm-pool.json, which has another shape: 200 claims, daemon in its own process; its figures are copied into raw.claims.warmPoolJsonReference for context). Goal: ratio nomad/docker <= 3 for client p99 and for server-side p99.`,
      resyncCalls: `per pool size (${RESYNC_SIZES.join(', ')}): a fresh fake Nomad (heartbeat every ${HEARTBEAT_MS} ms) behind a pass-through proxy made by the bench (it forwards everything, counts heartbeats on the stream, and refuses ${STREAM_PATH} with 503 while the stream is to be down), a fresh daemon with one nomad pool size = maxSize = N, resyncInterval 10m (no periodic resync during the measurement). Once N are warm and a heartbeat got through: ${RESYNCS} forced resyncs, each daemon.manager.context.enqueue('WarmPool', pool), then until the work queue is idle (depth 0, busy 0) plus 100 ms; counted: the fake's recorded requests (fake.requests) in that window, except ${STREAM_PATH}. Stream down: the proxy starts refusing the stream, fake.dropStreams() drops the open one, the bench waits for the client's first refused reconnect (by then the engine has marked the stream down), then ${RESYNCS} forced resyncs counted the same way. Then the stream is let through again: the calls until the queue is idle after the reconnect (the controller's resync of every pool on resume) and 3 more forced resyncs. Goal: O(1): the counts with the stream up equal at ${RESYNC_SIZES.join(' and ')} containers (median and max) and <= 2.`,
      machineLoad: 'loadavg is recorded (other sessions may share the machine); figures are not corrected for it',
    };
    return { figures, raw, method };
  } finally {
    await runCleanups();
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
}

/** Runs the cleanups registered after the first `keep` ones (newest first). */
async function runCleanupsAbove(keep: number): Promise<void> {
  while (cleanups.length > keep) {
    const fn = cleanups.pop()!;
    try {
      await fn();
    } catch (err) {
      log(`cleanup step failed: ${(err as Error).message}`);
    }
  }
}
