// WarmPool benchmarks (issue 3), against a private dockerd (vfs storage, no bridge; see
// test/helpers/dockerd.ts) and the real daemon as deployed: the compiled build run with
// `node --max-semi-space-size=2 …/src/main.js run --config …` in its own process.
//
// 1. Claim latency: 200 claims fired at once at a pool of 200 warm containers, over 200
//    keep-alive connections opened beforehand, measured at the client (send → full response)
//    and as the API's own latencyMs. The refill those claims trigger runs meanwhile.
// 2. Cold-start claims (pool of size 0) for comparison.
// 3. Refill of 30 containers from empty: the daemon's time against 30 raw Engine API
//    create+start calls at the same parallelism.
// 4. Peak RSS of the daemon with 300 containers in 3 pools (fill, claims, releases, resyncs).
//
// Everything it creates (daemons, dockerd and its containers, the network namespace, temp
// dirs, the private build) is removed when it ends, also on SIGINT/SIGTERM.
import { fork, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import YAML from 'yaml';
import { LABELS, MANAGED_BY, type ContainerSpec } from '../src/controllers/warmpool/engine.js';
import { buildCreateBody, DockerClient, query } from '../src/drivers/docker.js';
import { findExecutable } from '../src/drivers/iptables.js';
import { mapSettled } from '../src/util/concurrency.js';
import { startDockerd, TEST_LABEL, type Dockerd } from '../test/helpers/dockerd.js';
import { encodeRequest, RawConnections } from './http-burst.js';
import { median, summarize, type BenchFigure } from './stats.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const IP = findExecutable('ip') ?? '/usr/sbin/ip';
const TOKEN = 'warm-pool-bench-token-0123456789abcdef';
/** The daemon's warmPools.parallelism, set explicitly, and the baseline's. */
const PARALLELISM = 8;
const CONCURRENT_CLAIMS = 200;
const COLD_CLAIMS = 10;
const REFILL_SIZE = 30;
const RSS_POOLS = 3;
const RSS_POOL_SIZE = 100;

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const round = (x: number, digits = 3) => Math.round(x * 10 ** digits) / 10 ** digits;
const log = (msg: string) => process.stderr.write(`[warm-pool ${new Date().toISOString().slice(11, 19)}] ${msg}\n`);

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

// ---------------------------------------------------------------------------------------
// The build, the namespace, the daemon process.

/**
 * Compiles src/ alone into a private directory under dist/ (inside the repository, so the
 * build resolves node_modules and finds crds/): test files others are editing cannot break
 * it, and the shared dist/ is left alone. Returns the path of main.js.
 */
function buildPrivate(): string {
  const dir = path.join(ROOT, 'dist', `.bench-warm-pool-${process.pid}`);
  fs.mkdirSync(dir, { recursive: true });
  cleanups.push(() => fs.rmSync(dir, { recursive: true, force: true }));
  fs.writeFileSync(
    path.join(dir, 'tsconfig.json'),
    JSON.stringify({ extends: '../../tsconfig.json', compilerOptions: { outDir: '.', rootDir: '../..', sourceMap: false }, include: ['../../src/**/*.ts'] }),
  );
  const r = spawnSync(process.execPath, [path.join(ROOT, 'node_modules/typescript/bin/tsc'), '-p', path.join(dir, 'tsconfig.json')], { encoding: 'utf8', timeout: 300_000 });
  if (r.status !== 0) throw new Error(`tsc failed: ${r.stdout}${r.stderr}`);
  const main = path.join(dir, 'src', 'main.js');
  if (!fs.existsSync(main)) throw new Error(`the build has no ${main}`);
  return main;
}

function netnsAdd(): string {
  const name = `pdwp-${process.pid}`;
  const run = (args: string[]) => {
    const r = spawnSync(IP, args, { encoding: 'utf8', timeout: 10_000 });
    if (r.status !== 0) throw new Error(`ip ${args.join(' ')}: ${r.stderr}`);
  };
  run(['netns', 'add', name]);
  cleanups.push(() => void spawnSync(IP, ['netns', 'del', name], { timeout: 10_000 }));
  run(['netns', 'exec', name, IP, 'link', 'set', 'lo', 'up']);
  return name;
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const port = (srv.address() as net.AddressInfo).port;
      srv.close(() => resolve(port));
    });
  });
}

interface PoolDef {
  name: string;
  size: number;
  maxSize: number;
}

function poolDoc(image: string, p: PoolDef): Record<string, unknown> {
  return {
    apiVersion: 'polydev.ai/v1alpha1',
    kind: 'WarmPool',
    metadata: { name: p.name },
    spec: { provider: 'openai', engine: 'docker', image, command: ['sleep', '100000'], size: p.size, maxSize: p.maxSize },
  };
}

interface DaemonProc {
  pid: number;
  port: number;
  dir: string;
  desiredDir: string;
  logFile: string;
  /** Writes the pools as desiredStateDir/pools.yaml (temp file + rename: the watcher never sees half a file). */
  setPools(pools: PoolDef[]): void;
  /** /proc/PID/status fields in MB. */
  memory(): { rssMb: number; hwmMb: number };
  logTail(lines?: number): string;
  stop(): Promise<void>;
}

let daemonCounter = 0;

async function startDaemon(opts: {
  main: string;
  dockerd: Dockerd;
  netns: string;
  image: string;
  resyncInterval: string;
  pools: PoolDef[];
  /** Extra node flags (the CPU profile of BENCH_CPU_PROFILE). */
  nodeFlags?: string[];
}): Promise<DaemonProc> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `pdwp-d${daemonCounter++}-`));
  cleanups.push(() => fs.rmSync(dir, { recursive: true, force: true }));
  const desiredDir = path.join(dir, 'desired');
  fs.mkdirSync(desiredDir);
  fs.writeFileSync(path.join(dir, 'token'), `${TOKEN}\n`, { mode: 0o600 });
  const port = await freePort();
  const config = {
    database: path.join(dir, 'polydev.db'),
    desiredStateDir: desiredDir,
    listen: `127.0.0.1:${port}`,
    apiTokenFile: path.join(dir, 'token'),
    // As deployed (the bundled config logs at info), to a file.
    logLevel: 'info',
    resyncInterval: opts.resyncInterval,
    applyDebounce: '50ms',
    docker: { socket: opts.dockerd.socketPath, network: 'none' },
    warmPools: { parallelism: PARALLELISM },
    iptables: { backend: 'auto', netns: opts.netns },
  };
  fs.writeFileSync(path.join(dir, 'config.yaml'), YAML.stringify(config));
  let tmpCounter = 0;
  const setPools = (pools: PoolDef[]) => {
    const tmp = path.join(desiredDir, `.pools.${++tmpCounter}.tmp`);
    fs.writeFileSync(tmp, pools.map((p) => YAML.stringify(poolDoc(opts.image, p))).join('---\n'));
    fs.renameSync(tmp, path.join(desiredDir, 'pools.yaml'));
  };
  if (opts.pools.length) setPools(opts.pools);
  const logFile = path.join(dir, 'daemon.log');
  const logFd = fs.openSync(logFile, 'a');
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('POLYDEV_') && k !== 'NODE_OPTIONS') env[k] = v;
  const child: ChildProcess = spawn(process.execPath, ['--max-semi-space-size=2', ...(opts.nodeFlags ?? []), ...daemonFlagsFromEnv(), opts.main, 'run', '--config', path.join(dir, 'config.yaml')], {
    cwd: dir,
    stdio: ['ignore', logFd, logFd],
    env,
  });
  fs.closeSync(logFd);
  const pid = child.pid ?? -1;
  let exited: string | undefined;
  const exit = new Promise<void>((resolve) => {
    child.once('exit', (code, signal) => {
      exited = String(code ?? signal);
      resolve();
    });
    child.once('error', (err) => {
      exited = err.message;
      resolve();
    });
  });
  const logTail = (lines = 20) => {
    try {
      return fs.readFileSync(logFile, 'utf8').trimEnd().split('\n').slice(-lines).join('\n');
    } catch {
      return '(no log)';
    }
  };
  let stopping: Promise<void> | undefined;
  const stop = () =>
    (stopping ??= (async () => {
      if (exited !== undefined || pid <= 0) return;
      process.kill(pid, 'SIGTERM');
      if (!(await within(exit, 20_000))) {
        log(`daemon ${pid} did not stop within 20 s of SIGTERM; SIGKILL`);
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          /* gone */
        }
        await within(exit, 5000);
      }
    })());
  cleanups.push(stop);
  const proc: DaemonProc = {
    pid,
    port,
    dir,
    desiredDir,
    logFile,
    setPools,
    memory() {
      const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
      const kb = (field: string) => Number(new RegExp(`${field}:\\s+(\\d+) kB`).exec(status)?.[1] ?? NaN);
      return { rssMb: round(kb('VmRSS') / 1024, 1), hwmMb: round(kb('VmHWM') / 1024, 1) };
    },
    logTail,
    stop,
  };
  const deadline = Date.now() + 30_000;
  for (;;) {
    if (exited !== undefined) throw new Error(`the daemon exited (${exited}) before answering /healthz:\n${logTail()}`);
    const ok = await get(port, '/healthz').then((r) => r.status === 200).catch(() => false);
    if (ok) break;
    if (Date.now() > deadline) throw new Error(`the daemon did not answer /healthz within 30 s:\n${logTail()}`);
    await sleep(50);
  }
  return proc;
}

function within(p: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([p.then(() => true), new Promise<boolean>((r) => (timer = setTimeout(() => r(false), ms)))]).finally(() => clearTimeout(timer));
}

// ---------------------------------------------------------------------------------------
// HTTP client (node:http: its Agent decides which connection each request goes over).

interface Timed {
  status: number;
  text: string;
  /** Client latency: http.request() call → last byte of the response. */
  ms: number;
}

const pollAgent = new http.Agent({ keepAlive: true, maxSockets: 4 });

function request(port: number, method: string, p: string, opts: { agent?: http.Agent; body?: unknown; auth?: boolean; timeoutMs?: number } = {}): Promise<Timed> {
  return new Promise((resolve, reject) => {
    const payload = opts.body === undefined ? undefined : Buffer.from(JSON.stringify(opts.body));
    const headers: http.OutgoingHttpHeaders = {};
    if (opts.auth) headers['authorization'] = `Bearer ${TOKEN}`;
    if (payload) {
      headers['content-type'] = 'application/json';
      headers['content-length'] = payload.length;
    }
    const t0 = performance.now();
    const req = http.request({ host: '127.0.0.1', port, method, path: p, headers, agent: opts.agent ?? pollAgent }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, text: Buffer.concat(chunks).toString('utf8'), ms: performance.now() - t0 }));
      res.on('error', reject);
    });
    req.setTimeout(opts.timeoutMs ?? 30_000, () => req.destroy(new Error(`${method} ${p}: no answer within ${opts.timeoutMs ?? 30_000} ms`)));
    req.on('error', reject);
    req.end(payload);
  });
}

const get = (port: number, p: string) => request(port, 'GET', p, { timeoutMs: 10_000 });

async function getJson<T>(port: number, p: string): Promise<T> {
  const r = await get(port, p);
  if (r.status !== 200) throw new Error(`GET ${p}: ${r.status} ${r.text.slice(0, 300)}`);
  return JSON.parse(r.text) as T;
}

interface Stats {
  warm: number;
  starting: number;
  claimed: number;
  releasing: number;
  failed: number;
  lastRefillDurationMs: number | null;
}

interface PoolResource {
  metadata: { generation: number };
  status: { phase?: string; observedGeneration?: number; lastRefillDurationMs?: number; lastError?: string };
}

const stats = (d: DaemonProc, pool: string) => getJson<Stats>(d.port, `/api/v1/pools/${pool}/stats`);
const poolResource = (d: DaemonProc, pool: string) => getJson<PoolResource>(d.port, `/api/v1/warmpools/${pool}`);

/**
 * Waits until every pool has exactly `warm` warm members and nothing starting, claimed or
 * releasing, is Ready for its current generation, and has stayed so for `quietMs` (the
 * daemon is idle: no refill, removal or reconcile of that pool left to do).
 */
async function waitIdle(d: DaemonProc, pools: string[], warm: number, timeoutMs: number, quietMs = 1000): Promise<number> {
  const t0 = performance.now();
  const deadline = Date.now() + timeoutMs;
  let since: number | undefined;
  let last = '';
  for (;;) {
    let ok = true;
    for (const pool of pools) {
      let s: Stats;
      let r: PoolResource;
      try {
        [s, r] = await Promise.all([stats(d, pool), poolResource(d, pool)]);
      } catch (err) {
        // Not applied yet (404), or the API is busy: not idle.
        last = `${pool}: ${(err as Error).message}`;
        ok = false;
        break;
      }
      last = `${pool}: warm ${s.warm} starting ${s.starting} claimed ${s.claimed} releasing ${s.releasing} failed ${s.failed}; phase ${r.status.phase} gen ${r.status.observedGeneration}/${r.metadata.generation}${r.status.lastError ? `; lastError ${r.status.lastError.slice(0, 200)}` : ''}`;
      if (!(s.warm === warm && s.starting === 0 && s.claimed === 0 && s.releasing === 0 && r.status.phase === 'Ready' && r.status.observedGeneration === r.metadata.generation)) {
        ok = false;
        break;
      }
    }
    if (ok) {
      since ??= performance.now();
      if (performance.now() - since >= quietMs) return since - t0;
    } else since = undefined;
    if (Date.now() > deadline) throw new Error(`pools ${pools.join(', ')} not idle with ${warm} warm within ${timeoutMs} ms (last: ${last})\n${d.logTail(10)}`);
    await sleep(100);
  }
}

/** On-CPU and runqueue-wait nanoseconds of a thread (/proc/PID/task/TID/schedstat). */
function schedstat(pid: number, tid = pid): { runNs: number; waitNs: number } {
  try {
    const [run, wait] = fs.readFileSync(`/proc/${pid}/task/${tid}/schedstat`, 'utf8').trim().split(/\s+/).map(Number);
    return { runNs: run ?? NaN, waitNs: wait ?? NaN };
  } catch {
    return { runNs: NaN, waitNs: NaN };
  }
}

/** CPU time of every thread of pid and of its descendants (dockerd → containerd; the daemon's helper threads). */
function treeCpuNs(pid: number, depth = 0): number {
  let ns = 0;
  let tasks: string[] = [];
  try {
    tasks = fs.readdirSync(`/proc/${pid}/task`);
  } catch {
    return 0;
  }
  for (const tid of tasks) {
    ns += schedstat(pid, Number(tid)).runNs || 0;
    if (depth < 3) {
      let children: string[] = [];
      try {
        children = fs.readFileSync(`/proc/${pid}/task/${tid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean);
      } catch {
        // gone meanwhile
      }
      for (const c of children) ns += treeCpuNs(Number(c), depth + 1);
    }
  }
  return ns;
}

/** Busy and total jiffies of the whole machine (/proc/stat). */
function machineJiffies(): { busy: number; total: number } {
  const f = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0]!.trim().split(/\s+/).slice(1).map(Number);
  const total = f.reduce((a, b) => a + b, 0);
  const idle = (f[3] ?? 0) + (f[4] ?? 0);
  return { busy: total - idle, total };
}

interface CpuWindow {
  /** The daemon's main (JavaScript) thread: time on a CPU, and time runnable but waiting for one. */
  daemonMainCpuMs: number;
  daemonMainRunqueueWaitMs: number;
  /** The client's (this process') main thread on a CPU: sending 200 requests and reading 200 answers. */
  clientMainCpuMs: number;
  /** Every thread of the daemon (V8's GC helpers, libuv's pool, the checkpoint worker). */
  daemonAllThreadsCpuMs: number;
  /** dockerd and containerd (list calls the reconciles make, the refill's creates and starts). */
  dockerdCpuMs: number;
  /** Share of both CPUs busy (anything on the machine) over the window, from /proc/stat (10 ms ticks). */
  machineBusyPct: number;
}

function cpuWindow(pid: number, dockerdPid?: number): () => CpuWindow {
  const s0 = schedstat(pid);
  const c0 = schedstat(process.pid);
  const a0 = treeCpuNs(pid);
  const d0 = dockerdPid ? treeCpuNs(dockerdPid) : NaN;
  const j0 = machineJiffies();
  return () => {
    const s1 = schedstat(pid);
    const c1 = schedstat(process.pid);
    const a1 = treeCpuNs(pid);
    const d1 = dockerdPid ? treeCpuNs(dockerdPid) : NaN;
    const j1 = machineJiffies();
    return {
      daemonMainCpuMs: round((s1.runNs - s0.runNs) / 1e6, 2),
      daemonMainRunqueueWaitMs: round((s1.waitNs - s0.waitNs) / 1e6, 2),
      daemonAllThreadsCpuMs: round((a1 - a0) / 1e6, 2),
      dockerdCpuMs: round((d1 - d0) / 1e6, 2),
      clientMainCpuMs: round((c1.runNs - c0.runNs) / 1e6, 2),
      machineBusyPct: j1.total > j0.total ? Math.round((100 * (j1.busy - j0.busy)) / (j1.total - j0.total)) : NaN,
    };
  };
}

/**
 * Waits (at most maxMs) until the whole machine was under busyPct busy for 500 ms: the previous
 * run's releases and refills (dockerd removing and creating 200 containers) must not be measured
 * as part of this run's claims. The refill this run's claims start is measured: it begins during the burst.
 */
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

function loadavg(): number[] {
  return os.loadavg().map((x) => round(x, 2));
}

// ---------------------------------------------------------------------------------------
// 1 + 2: claim latency (daemon A).

interface BurstRun {
  /** 200 concurrent GET /healthz on the same connections, just before: the daemon's HTTP floor. */
  healthz: ReturnType<typeof summarize>;
  healthzCpu: CpuWindow;
  /** The same 200 POSTs against a bare node:http server (bench/floor-server.mjs): Node's own floor here. */
  bareNode: ReturnType<typeof summarize>;
  client: ReturnType<typeof summarize>;
  server: ReturnType<typeof summarize>;
  /** First send → last response. */
  burstMs: number;
  statuses: Record<string, number>;
  warmHits: number;
  /** Containers the daemon had started (stats.starting) right after the last response: the refill under way. */
  startingAfter: number;
  loadavg1: number;
  /** The machine before the burst (waitQuiet): how long until it was quiet, and how busy it was then. */
  quietBefore: { waitedMs: number; busyPct: number };
  /** Where the daemon's main thread was during the burst (first send → last response). */
  cpu: CpuWindow;
  /** CLOCK_MONOTONIC µs at the first send and the last response (to cut a daemon --cpu-prof profile to the burst). */
  windowMonotonicUs: [number, number];
  /** Pool idle again after the release: waiting time (refill of 200 + removal of 200). */
  recoverMs: number;
}

/** BENCH_DAEMON_FLAGS="--max-semi-space-size=16": extra node flags for the daemons (investigations; later flags win). */
function daemonFlagsFromEnv(): string[] {
  return (process.env['BENCH_DAEMON_FLAGS'] ?? '').split(/\s+/).filter(Boolean);
}

/** A bare node:http server in a child process (the floor of the claim burst). */
async function startBareNode(): Promise<{ port: number; stop(): void }> {
  const child = fork(path.join(path.dirname(fileURLToPath(import.meta.url)), 'floor-server.mjs'), [], { stdio: ['ignore', 'ignore', 'inherit', 'ipc'] });
  const port = await new Promise<number>((resolve, reject) => {
    child.once('message', (m) => resolve((m as { port: number }).port));
    child.once('exit', (code) => reject(new Error(`floor-server.mjs exited (${code}) before listening`)));
  });
  return { port, stop: () => child.kill('SIGKILL') };
}

async function burst(d: DaemonProc, pool: string, run: string, bare: { port: number }, dockerdPid: number): Promise<BurstRun> {
  const conns = await RawConnections.open(d.port, CONCURRENT_CLAIMS);
  const bareConns = await RawConnections.open(bare.port, CONCURRENT_CLAIMS);
  try {
    const healthz = Array.from({ length: CONCURRENT_CLAIMS }, () => encodeRequest({ method: 'GET', path: '/healthz' }));
    const claims = Array.from({ length: CONCURRENT_CLAIMS }, (_, i) =>
      encodeRequest({ method: 'POST', path: `/api/v1/pools/${pool}/claims`, headers: { Authorization: `Bearer ${TOKEN}` }, body: { userId: `bench-${run}-u${i}` } }),
    );
    const quietBefore = await waitQuiet();
    // Every connection carries one request first, so the burst meets no first-request cost.
    await conns.burst(healthz);
    // The HTTP floor: the same burst shape on the same connections, on the cheapest route.
    const hzDone = cpuWindow(d.pid);
    const hz = await conns.burst(healthz);
    const healthzCpu = hzDone();
    // Node's floor on this machine: the claim requests against a server that does nothing else.
    await bareConns.burst(claims);
    const bareNode = await bareConns.burst(claims);
    await sleep(300);
    const load = os.loadavg()[0]!;
    const m0 = Number(process.hrtime.bigint() / 1000n);
    const cpuDone = cpuWindow(d.pid, dockerdPid);
    const t0 = performance.now();
    const results = await conns.burst(claims);
    const burstMs = performance.now() - t0;
    const cpu = cpuDone();
    const m1 = Number(process.hrtime.bigint() / 1000n);
    const after = await stats(d, pool);
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
    if (statuses['201'] !== CONCURRENT_CLAIMS) {
      const bad = results.find((r) => r.status !== 201);
      log(`run ${run}: not every claim succeeded: ${JSON.stringify(statuses)}; e.g. ${bad?.body.slice(0, 300)}`);
    }
    // Release every claim (the daemon destroys those containers; the refill is already under way).
    const rel = await conns.burst(ids.map((id) => encodeRequest({ method: 'DELETE', path: `/api/v1/claims/${id}`, headers: { Authorization: `Bearer ${TOKEN}` } })));
    const relBad = rel.filter((r) => r.status !== 200).length;
    if (relBad) throw new Error(`run ${run}: ${relBad} releases failed, e.g. ${rel.find((r) => r.status !== 200)?.body.slice(0, 300)}`);
    const r0 = performance.now();
    await waitIdle(d, [pool], CONCURRENT_CLAIMS, 300_000);
    return {
      healthz: summarize(hz.map((r) => r.ms)),
      healthzCpu,
      bareNode: summarize(bareNode.map((r) => r.ms)),
      client: summarize(results.map((r) => r.ms)),
      server: summarize(server),
      burstMs: round(burstMs),
      statuses,
      warmHits,
      startingAfter: after.starting,
      loadavg1: round(load, 2),
      quietBefore,
      cpu,
      windowMonotonicUs: [m0, m1],
      recoverMs: Math.round(performance.now() - r0),
    };
  } finally {
    conns.close();
    bareConns.close();
  }
}

interface ColdRun {
  client: number[];
  server: number[];
  warm: boolean[];
}

async function coldClaims(d: DaemonProc, pool: string): Promise<ColdRun> {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  try {
    await request(d.port, 'GET', '/healthz', { agent });
    const out: ColdRun = { client: [], server: [], warm: [] };
    const ids: string[] = [];
    for (let i = 0; i < COLD_CLAIMS; i++) {
      const r = await request(d.port, 'POST', `/api/v1/pools/${pool}/claims`, { agent, auth: true, body: { userId: `cold-u${i}` }, timeoutMs: 60_000 });
      if (r.status !== 201) throw new Error(`cold claim ${i}: ${r.status} ${r.text.slice(0, 300)}`);
      const body = JSON.parse(r.text) as { claimId: string; latencyMs: number; warm: boolean };
      out.client.push(round(r.ms));
      out.server.push(body.latencyMs);
      out.warm.push(body.warm);
      ids.push(body.claimId);
    }
    for (const id of ids) {
      const r = await request(d.port, 'DELETE', `/api/v1/claims/${id}`, { agent, auth: true });
      if (r.status !== 200) throw new Error(`releasing cold claim ${id}: ${r.status} ${r.text.slice(0, 200)}`);
    }
    await waitIdle(d, [pool], 0, 120_000);
    return out;
  } finally {
    agent.destroy();
  }
}

// ---------------------------------------------------------------------------------------
// 3: refill of 30 from empty (daemon B) against raw create+start (same dockerd, same parallelism).

function baselineSpec(image: string, run: number, i: number): ContainerSpec {
  // The same shape as the daemon's (containerSpec in the controller): image, command, no
  // resources, the same label keys; an owner no daemon has, so no daemon ever sees them.
  const slot = `b${run}x${i}`;
  const labels = {
    [LABELS.managedBy]: MANAGED_BY,
    [LABELS.owner]: 'pdwp-baseline',
    [LABELS.pool]: 'baseline',
    [LABELS.provider]: 'openai',
    [LABELS.specHash]: 'baseline0000',
    [LABELS.slot]: slot,
    [TEST_LABEL]: 'warm-pool-bench',
  };
  return { pool: 'baseline', provider: 'openai', slot, name: `pdwp-baseline-${slot}`, image, command: ['sleep', '100000'], env: {}, resources: {}, specHash: 'baseline0000', labels };
}

/** 30 × (POST /containers/create with buildCreateBody, POST /containers/{id}/start), `PARALLELISM` in flight; optionally + GET /containers/{id}/json as the driver does. */
async function rawCreateStart(client: DockerClient, image: string, run: number, inspect: boolean): Promise<number> {
  const specs = Array.from({ length: REFILL_SIZE }, (_, i) => baselineSpec(image, run * 2 + (inspect ? 1 : 0), i));
  const t0 = performance.now();
  const results = await mapSettled(specs, PARALLELISM, async (spec) => {
    const created = await client.call('POST', `/containers/create${query({ name: spec.name })}`, { json: buildCreateBody(spec, 'none') });
    const id = (created.json as { Id: string }).Id;
    await client.call('POST', `/containers/${id}/start`);
    if (inspect) await client.call('GET', `/containers/${id}/json`);
  });
  const ms = performance.now() - t0;
  const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failed) throw new Error(`baseline create+start failed: ${(failed.reason as Error).message}`);
  return ms;
}

async function removeByLabel(client: DockerClient, label: string): Promise<number> {
  const res = await client.call('GET', `/containers/json${query({ all: 1, filters: { label: [label] } })}`);
  const ids = (res.json as Array<{ Id: string }>).map((c) => c.Id);
  const t0 = performance.now();
  const results = await mapSettled(ids, PARALLELISM, (id) => client.call('DELETE', `/containers/${id}${query({ force: 1, v: 1 })}`, { okStatuses: [404] }));
  const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failed) throw new Error(`removing containers (${label}) failed: ${(failed.reason as Error).message}`);
  return performance.now() - t0;
}

interface RefillRun {
  baselineMs: number;
  baselineWithInspectMs: number;
  /** status.lastRefillDurationMs: reserve slots → every container created, started, inspected and recorded. */
  daemonRefillMs: number;
  /** Pool YAML renamed into desiredStateDir → the stats endpoint first shows 30 warm (polled every 20 ms). */
  endToEndMs: number;
  loadavg1: number;
}

async function refillRun(d: DaemonProc, client: DockerClient, image: string, run: number): Promise<RefillRun> {
  const load = os.loadavg()[0]!;
  const baselineMs = await rawCreateStart(client, image, run, false);
  await removeByLabel(client, `${TEST_LABEL}=warm-pool-bench`);
  await sleep(500);
  const baselineWithInspectMs = await rawCreateStart(client, image, run, true);
  await removeByLabel(client, `${TEST_LABEL}=warm-pool-bench`);
  await sleep(500);

  const t0 = performance.now();
  d.setPools([{ name: 'refill', size: REFILL_SIZE, maxSize: REFILL_SIZE * 2 }]);
  const deadline = Date.now() + 120_000;
  let endToEndMs: number | undefined;
  while (endToEndMs === undefined) {
    const s = await stats(d, 'refill').catch(() => undefined);
    if (s && s.warm === REFILL_SIZE) endToEndMs = performance.now() - t0;
    else if (Date.now() > deadline) throw new Error(`refill of ${REFILL_SIZE} not done within 120 s (${JSON.stringify(s)})\n${d.logTail(10)}`);
    else await sleep(20);
  }
  // The status (with lastRefillDurationMs) is written when the reconcile settles, a little later.
  let refill: number | undefined;
  while (refill === undefined) {
    const r = await poolResource(d, 'refill');
    if (r.status.phase === 'Ready' && r.status.observedGeneration === r.metadata.generation && typeof r.status.lastRefillDurationMs === 'number') refill = r.status.lastRefillDurationMs;
    else if (Date.now() > deadline) throw new Error(`refill pool not Ready: ${JSON.stringify(r.status).slice(0, 300)}`);
    else await sleep(20);
  }
  // Back to empty for the next run: size 0 removes them all.
  d.setPools([{ name: 'refill', size: 0, maxSize: REFILL_SIZE * 2 }]);
  await waitIdle(d, ['refill'], 0, 120_000, 500);
  await sleep(500);
  return { baselineMs: round(baselineMs), baselineWithInspectMs: round(baselineWithInspectMs), daemonRefillMs: refill, endToEndMs: round(endToEndMs), loadavg1: round(load, 2) };
}

// ---------------------------------------------------------------------------------------
// 4: peak RSS with 300 containers (daemon C, resyncInterval 2s).

interface RssRun {
  /** VmRSS 3 s after start, no pools yet. */
  idleNoPoolsMb: number;
  /** VmHWM at the end of the window (fill from empty, claims, releases, resyncs). */
  peakMb: number;
  /** VmRSS at the end, idle with 300 warm containers, after ≥ 2 resyncs. */
  idleWith300Mb: number;
  fillMs: number;
  claimsAndReleaseMs: number;
}

async function rssRun(main: string, dockerd: Dockerd, netns: string, client: DockerClient): Promise<RssRun> {
  const d = await startDaemon({ main, dockerd, netns, image: dockerd.image, resyncInterval: '2s', pools: [] });
  try {
    await sleep(3000);
    const idleNoPoolsMb = d.memory().rssMb;
    const pools = Array.from({ length: RSS_POOLS }, (_, i) => ({ name: `rss${i}`, size: RSS_POOL_SIZE, maxSize: RSS_POOL_SIZE * 2 }));
    const t0 = performance.now();
    d.setPools(pools);
    const names = pools.map((p) => p.name);
    await waitIdle(d, names, RSS_POOL_SIZE, 600_000, 0);
    const fillMs = performance.now() - t0;
    // Claims and releases: half of every pool claimed at once, then released (destroyed, refilled).
    const t1 = performance.now();
    const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });
    try {
      const claims = await Promise.all(
        names.flatMap((pool) =>
          Array.from({ length: RSS_POOL_SIZE / 2 }, (_, i) => request(d.port, 'POST', `/api/v1/pools/${pool}/claims`, { agent, auth: true, body: { userId: `rss-u${i}` }, timeoutMs: 60_000 })),
        ),
      );
      const ids = claims.filter((r) => r.status === 201).map((r) => (JSON.parse(r.text) as { claimId: string }).claimId);
      if (ids.length !== claims.length) throw new Error(`${claims.length - ids.length} RSS-phase claims failed: ${claims.find((r) => r.status !== 201)?.text.slice(0, 200)}`);
      await sleep(1000);
      await Promise.all(ids.map((id) => request(d.port, 'DELETE', `/api/v1/claims/${id}`, { agent, auth: true })));
    } finally {
      agent.destroy();
    }
    await waitIdle(d, names, RSS_POOL_SIZE, 600_000, 0);
    const claimsAndReleaseMs = performance.now() - t1;
    // A few no-op resyncs (every 2 s) with 300 containers.
    await sleep(6000);
    const m = d.memory();
    return { idleNoPoolsMb, peakMb: m.hwmMb, idleWith300Mb: m.rssMb, fillMs: Math.round(fillMs), claimsAndReleaseMs: Math.round(claimsAndReleaseMs) };
  } finally {
    await d.stop();
    await removeByLabel(client, `${LABELS.managedBy}=${MANAGED_BY}`);
  }
}

// ---------------------------------------------------------------------------------------
// BENCH_CPU_PROFILE=1: daemon A runs with --cpu-prof, and the samples taken during the bursts
// are sorted into what the main thread was doing. The profiler costs time itself: the latency
// figures of such a run are not comparable with a normal one.

interface CpuProfile {
  nodes: Array<{ id: number; callFrame: { functionName: string; url: string }; children?: number[] }>;
  samples: number[];
  timeDeltas: number[];
  startTime: number;
}

const inClaim = (s: string[]) => s.some((f) => f.startsWith('claim claims.js') || f.startsWith('commitQueued claims.js'));
/** First match wins; each frame is "functionName file.js". */
const PROFILE_CATEGORIES: Array<[string, (stack: string[]) => boolean]> = [
  ['GC', (s) => s[0]!.startsWith('(garbage collector)')],
  ['idle (in epoll)', (s) => s[0]!.startsWith('(idle)')],
  ['native, outside JS ((program))', (s) => s[0]!.startsWith('(program)')],
  ['reconciles the claims enqueue (manager, controller, docker list)', (s) => !inClaim(s) && s.some((f) => /manager\.js|controller\.js|docker\.js|plan\.js|xstate|convergence/.test(f))],
  ['claim: the pool (resourceVersion check, getResource on a change)', (s) => inClaim(s) && s.some((f) => f.startsWith('pool claims.js'))],
  ['claim latencies written (one transaction per 200 ms)', (s) => s.some((f) => f.startsWith('flushLatencies claims.js'))],
  ['claim: warmPoolDesired (spec hash: canonical JSON + sha256)', (s) => inClaim(s) && s.some((f) => f.startsWith('warmPoolDesired '))],
  ['claim: newSlot (randomBytes)', (s) => inClaim(s) && s.some((f) => f.startsWith('newSlot '))],
  ['claim: SQL statements (claimContainer)', (s) => inClaim(s) && s.some((f) => /^(claimContainer|getClaim) pools\.js/.test(f))],
  ['claim: BEGIN IMMEDIATE / COMMIT (one per group of claims)', (s) => inClaim(s) && s.some((f) => /^(transaction|sqliteTransaction) /.test(f))],
  ['claim: metrics (prom-client)', (s) => inClaim(s) && s.some((f) => /prom-client|histogram\.js|counter\.js/.test(f))],
  ['claim: rest of ClaimService.claim', inClaim],
  ['auth preHandler', (s) => s.some((f) => f.startsWith('requireToken '))],
  ['HTTP: response (reply.send, serialisation, writev)', (s) => s.some((f) => /^(Reply\.send|writev|onSendEnd|onSendHook|end _http_outgoing|writeHead|resOnFinish|onFinish|_flush)/.test(f))],
  ['HTTP: request (parse, body, JSON, routing)', (s) => s.some((f) => /parserOn|content-type-parser|route\.js|fastify\.js|handle-request|_http_incoming|_http_server|readable|onStreamRead/.test(f))],
  ['other', () => true],
];

function attributeProfile(file: string, windows: Array<[number, number]>, claims: number): Array<{ what: string; ms: number; pct: number; usPerClaim: number }> {
  const p = JSON.parse(fs.readFileSync(file, 'utf8')) as CpuProfile;
  const nodes = new Map(p.nodes.map((n) => [n.id, n]));
  const parent = new Map<number, number>();
  for (const n of p.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
  const frame = (id: number) => {
    const n = nodes.get(id)!;
    return `${n.callFrame.functionName} ${n.callFrame.url.replace(/.*\//, '')}`;
  };
  const us = new Map<string, number>(PROFILE_CATEGORIES.map(([k]) => [k, 0]));
  const topFrames = new Map<string, number>();
  let total = 0;
  let t = p.startTime;
  for (let i = 0; i < p.samples.length; i++) {
    t += p.timeDeltas[i]!;
    if (!windows.some(([a, b]) => t >= a && t <= b)) continue;
    const dt = p.timeDeltas[i + 1] ?? 0;
    total += dt;
    const stack: string[] = [];
    for (let id: number | undefined = p.samples[i]; id !== undefined; id = parent.get(id)) stack.push(frame(id));
    const [k] = PROFILE_CATEGORIES.find(([, match]) => match(stack))!;
    us.set(k, us.get(k)! + dt);
    if (process.env['BENCH_PROFILE_TOP']) {
      const leaf = `${stack[0]} < ${stack.slice(1, 4).join(' < ')}`;
      topFrames.set(leaf, (topFrames.get(leaf) ?? 0) + dt);
    }
  }
  if (process.env['BENCH_PROFILE_TOP']) {
    for (const [f, v] of [...topFrames].sort((a, b) => b[1] - a[1]).slice(0, 40)) log(`  self ${String(round((100 * v) / total, 1)).padStart(5)}%  ${f}`);
  }
  return [...us]
    .filter(([, v]) => v > 0)
    .sort((a, b) => b[1] - a[1])
    .map(([what, v]) => ({ what, ms: round(v / 1000, 1), pct: round((100 * v) / total, 1), usPerClaim: Math.round(v / claims) }));
}

/** Warnings and errors the daemon logged (JSON lines with a level), for the raw JSON. */
function logProblems(file: string): { warn: number; error: number; samples: string[] } {
  const out = { warn: 0, error: 0, samples: [] as string[] };
  let text = '';
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch {
    return out;
  }
  for (const line of text.split('\n')) {
    const m = /"level":"(warn|error)"/.exec(line) ?? /\b(warn|error)\b/.exec(line.slice(0, 40));
    if (!m) continue;
    out[m[1] as 'warn' | 'error']++;
    if (out.samples.length < 5) out.samples.push(line.slice(0, 300));
  }
  return out;
}

// ---------------------------------------------------------------------------------------

const PARTS = ['claims', 'refill', 'rss'] as const;

/** BENCH_WARM_POOL_PARTS=claims,refill,rss (default all): run only some parts, for investigations. */
function partsToRun(): Set<string> {
  const v = process.env['BENCH_WARM_POOL_PARTS'];
  if (!v) return new Set(PARTS);
  const parts = v.split(',').map((x) => x.trim()).filter(Boolean);
  const bad = parts.filter((x) => !(PARTS as readonly string[]).includes(x));
  if (bad.length) throw new Error(`BENCH_WARM_POOL_PARTS: unknown part(s) ${bad.join(', ')} (known: ${PARTS.join(', ')})`);
  return new Set(parts);
}

export async function runWarmPoolBench(runs = 5): Promise<{ figures: BenchFigure[]; raw: Record<string, unknown>; method: Record<string, unknown> }> {
  const parts = partsToRun();
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  const started = performance.now();
  try {
    log('building src/ into a private directory');
    const git = (args: string[]) => spawnSync('git', ['-C', ROOT, ...args], { encoding: 'utf8', timeout: 10_000 }).stdout?.trim() ?? '';
    // What is built: HEAD, and whether src/ differed from it (others may be editing it).
    const src = { commit: git(['rev-parse', 'HEAD']), dirty: git(['status', '--porcelain', '--', 'src']) !== '' };
    const main = buildPrivate();
    log('starting a private dockerd');
    const dockerd = await startDockerd({ name: 'wpbench' });
    cleanups.push(() => dockerd.stop());
    const netns = netnsAdd();
    const client = new DockerClient({ socketPath: dockerd.socketPath, requestTimeoutMs: 60_000 });
    cleanups.push(() => client.close());
    const raw: Record<string, unknown> = {
      src,
      parts: [...parts],
      dockerd: dockerd.timings,
      loadavgAtStart: loadavg(),
    };
    const figures: BenchFigure[] = [];
    const m = (xs: number[]) => round(median(xs));
    const noRefillRuns = Math.min(runs, 2);
    const rssRuns = Math.min(runs, Number(process.env['BENCH_RSS_RUNS'] ?? 2));

    // ---- 1 + 2: claim latency -------------------------------------------------------
    if (parts.has('claims')) {
      log(`daemon A: pool of ${CONCURRENT_CLAIMS} warm, ${runs} runs of ${CONCURRENT_CLAIMS} concurrent claims`);
      const profDir = process.env['BENCH_CPU_PROFILE'] === '1' ? fs.mkdtempSync(path.join(os.tmpdir(), 'pdwp-prof-')) : undefined;
      if (profDir) cleanups.push(() => fs.rmSync(profDir, { recursive: true, force: true }));
      const a = await startDaemon({
        ...(profDir ? { nodeFlags: ['--cpu-prof', `--cpu-prof-dir=${profDir}`, '--cpu-prof-interval=200'] } : {}),
        main,
        dockerd,
        netns,
        image: dockerd.image,
        resyncInterval: '30s',
        pools: [
          { name: 'hot', size: CONCURRENT_CLAIMS, maxSize: CONCURRENT_CLAIMS * 2 },
          { name: 'cold', size: 0, maxSize: COLD_CLAIMS * 2 },
        ],
      });
      const f0 = performance.now();
      await waitIdle(a, ['hot'], CONCURRENT_CLAIMS, 600_000);
      raw.initialFill200Ms = Math.round(performance.now() - f0);
      raw.initialFill200LastRefillDurationMs = (await stats(a, 'hot')).lastRefillDurationMs;
      // Warm-up (not measured): a few claims and releases, so the first run does not pay for
      // compiling the claim path, as a daemon in service would not.
      for (let i = 0; i < 10; i++) {
        const r = await request(a.port, 'POST', '/api/v1/pools/hot/claims', { auth: true, body: { userId: `warmup-u${i}` } });
        if (r.status !== 201) throw new Error(`warm-up claim: ${r.status} ${r.text.slice(0, 300)}`);
        const del = await request(a.port, 'DELETE', `/api/v1/claims/${(JSON.parse(r.text) as { claimId: string }).claimId}`, { auth: true });
        if (del.status !== 200) throw new Error(`warm-up release: ${del.status} ${del.text.slice(0, 300)}`);
      }
      await waitIdle(a, ['hot'], CONCURRENT_CLAIMS, 120_000);
      const bare = await startBareNode();
      cleanups.push(() => bare.stop());
      const bursts: BurstRun[] = [];
      for (let i = 0; i < runs; i++) {
        const b = await burst(a, 'hot', `r${i}`, bare, dockerd.pid);
        log(`  run ${i + 1}: client p50 ${b.client.p50} p99 ${b.client.p99} max ${b.client.max} ms; server p50 ${b.server.p50} p99 ${b.server.p99} ms; healthz p99 ${b.healthz.p99} ms; bare node:http p99 ${b.bareNode.p99} ms; daemon cpu ${b.cpu.daemonMainCpuMs} ms (all threads ${b.cpu.daemonAllThreadsCpuMs}), runqueue wait ${b.cpu.daemonMainRunqueueWaitMs} ms, dockerd ${b.cpu.dockerdCpuMs} ms, machine busy ${b.cpu.machineBusyPct}% (${b.quietBefore.busyPct}% before, after ${b.quietBefore.waitedMs} ms of waiting); load ${b.loadavg1}; recovered in ${b.recoverMs} ms`);
        bursts.push(b);
      }
      // Diagnostic: the same burst when no refill can start (maxSize = size: the claimed 200 fill
      // it), to separate the claim path's own cost from the refill competing for the CPUs.
      a.setPools([
        { name: 'hot', size: CONCURRENT_CLAIMS, maxSize: CONCURRENT_CLAIMS },
        { name: 'cold', size: 0, maxSize: COLD_CLAIMS * 2 },
      ]);
      await waitIdle(a, ['hot'], CONCURRENT_CLAIMS, 60_000);
      const noRefill: BurstRun[] = [];
      for (let i = 0; i < noRefillRuns; i++) {
        const b = await burst(a, 'hot', `n${i}`, bare, dockerd.pid);
        log(`  no-refill run ${i + 1}: client p50 ${b.client.p50} p99 ${b.client.p99} max ${b.client.max} ms; server p99 ${b.server.p99} ms; daemon cpu ${b.cpu.daemonMainCpuMs} ms (all threads ${b.cpu.daemonAllThreadsCpuMs}), runqueue wait ${b.cpu.daemonMainRunqueueWaitMs} ms, dockerd ${b.cpu.dockerdCpuMs} ms, machine busy ${b.cpu.machineBusyPct}%; starting after ${b.startingAfter}`);
        noRefill.push(b);
      }
      log(`cold claims: ${COLD_CLAIMS} sequential on a pool of size 0`);
      const cold = await coldClaims(a, 'cold');
      raw.bursts = bursts;
      raw.burstsNoRefill = noRefill;
      raw.cold = cold;
      raw.daemonALog = logProblems(a.logFile);
      raw.daemonAMemoryAtEnd = a.memory();
      await a.stop();
      await removeByLabel(client, `${LABELS.managedBy}=${MANAGED_BY}`);
      if (profDir) {
        const file = fs.readdirSync(profDir).find((f) => f.endsWith('.cpuprofile'));
        if (!file) throw new Error(`BENCH_CPU_PROFILE: the daemon wrote no profile into ${profDir}`);
        const prof = path.join(profDir, file);
        raw.burstProfile = {
          note: 'daemon main thread, --cpu-prof-interval=200 µs, samples between the first send and the last response of each burst; sample time is wall time (includes time preempted); this run\'s latencies include the profiler\'s cost',
          bursts: attributeProfile(prof, bursts.map((x) => x.windowMonotonicUs), bursts.length * CONCURRENT_CLAIMS),
          burstsNoRefill: attributeProfile(prof, noRefill.map((x) => x.windowMonotonicUs), noRefill.length * CONCURRENT_CLAIMS),
        };
        for (const c of (raw.burstProfile as { bursts: Array<{ what: string; pct: number; usPerClaim: number }> }).bursts) log(`  profile: ${String(c.pct).padStart(5)}% ${String(c.usPerClaim).padStart(4)} µs/claim  ${c.what}`);
      }
      const p99 = m(bursts.map((x) => x.client.p99));
      figures.push(
        { name: `claim, ${CONCURRENT_CLAIMS} concurrent on ${CONCURRENT_CLAIMS} warm: client p50`, value: m(bursts.map((x) => x.client.p50)), unit: 'ms' },
        { name: `claim, ${CONCURRENT_CLAIMS} concurrent on ${CONCURRENT_CLAIMS} warm: client p99`, value: p99, unit: 'ms', goal: '< 10 ms', met: p99 < 10 },
        { name: '  client max', value: m(bursts.map((x) => x.client.max)), unit: 'ms' },
        { name: '  server-side latencyMs p50', value: m(bursts.map((x) => x.server.p50)), unit: 'ms' },
        { name: '  server-side latencyMs p99', value: m(bursts.map((x) => x.server.p99)), unit: 'ms' },
        { name: '  first send → last response (whole burst)', value: m(bursts.map((x) => x.burstMs)), unit: 'ms' },
        { name: '  warm hits', value: median(bursts.map((x) => x.warmHits)), unit: 'count', goal: `${CONCURRENT_CLAIMS}`, met: bursts.every((x) => x.warmHits === CONCURRENT_CLAIMS) },
        { name: '  daemon main thread on CPU during the burst', value: m(bursts.map((x) => x.cpu.daemonMainCpuMs)), unit: 'ms' },
        { name: '  daemon main thread runnable but waiting for a CPU', value: m(bursts.map((x) => x.cpu.daemonMainRunqueueWaitMs)), unit: 'ms' },
        { name: '  daemon, all threads, on CPU during the burst', value: m(bursts.map((x) => x.cpu.daemonAllThreadsCpuMs)), unit: 'ms' },
        { name: '  dockerd and containerd on CPU during the burst', value: m(bursts.map((x) => x.cpu.dockerdCpuMs)), unit: 'ms' },
        { name: '  client (this process) main thread on CPU during the burst', value: m(bursts.map((x) => x.cpu.clientMainCpuMs)), unit: 'ms' },
        { name: '  daemon main-thread CPU per claim (HTTP included)', value: m(bursts.map((x) => (x.cpu.daemonMainCpuMs * 1000) / CONCURRENT_CLAIMS)), unit: 'µs' },
        { name: `  HTTP floor: ${CONCURRENT_CLAIMS} concurrent GET /healthz, client p99`, value: m(bursts.map((x) => x.healthz.p99)), unit: 'ms' },
        { name: '  HTTP floor: daemon main-thread CPU per GET /healthz', value: m(bursts.map((x) => (x.healthzCpu.daemonMainCpuMs * 1000) / CONCURRENT_CLAIMS)), unit: 'µs' },
        { name: `  Node's floor: the same ${CONCURRENT_CLAIMS} POSTs to a bare node:http server, p99`, value: m(bursts.map((x) => x.bareNode.p99)), unit: 'ms' },
        { name: '  same claim burst, no refill possible (maxSize = size): p99', value: m(noRefill.map((x) => x.client.p99)), unit: 'ms' },
        { name: `cold-start claim (pool size 0), ${COLD_CLAIMS} sequential: client p50`, value: m(cold.client), unit: 'ms' },
        { name: '  server-side latencyMs p50', value: m(cold.server), unit: 'ms' },
      );
    }

    // ---- 3: refill ------------------------------------------------------------------
    if (parts.has('refill')) {
      log(`daemon B: refill of ${REFILL_SIZE} from empty vs raw create+start, ${runs} runs`);
      const b = await startDaemon({ main, dockerd, netns, image: dockerd.image, resyncInterval: '30s', pools: [{ name: 'refill', size: 0, maxSize: REFILL_SIZE * 2 }] });
      await waitIdle(b, ['refill'], 0, 60_000, 500);
      await client.call('GET', '/_ping');
      const refills: RefillRun[] = [];
      for (let i = 0; i < runs; i++) {
        const r = await refillRun(b, client, dockerd.image, i);
        log(`  run ${i + 1}: baseline ${Math.round(r.baselineMs)} ms (+inspect ${Math.round(r.baselineWithInspectMs)}), daemon refill ${r.daemonRefillMs} ms, end to end ${Math.round(r.endToEndMs)} ms`);
        refills.push(r);
      }
      raw.refills = refills;
      raw.daemonBLog = logProblems(b.logFile);
      await b.stop();
      await removeByLabel(client, `${LABELS.managedBy}=${MANAGED_BY}`);
      const ratio = median(refills.map((r) => r.daemonRefillMs)) / median(refills.map((r) => r.baselineMs));
      figures.push(
        { name: `refill ${REFILL_SIZE} from empty: daemon (status.lastRefillDurationMs)`, value: m(refills.map((r) => r.daemonRefillMs)), unit: 'ms' },
        { name: '  end to end: YAML written → 30 warm in the stats (20 ms polls)', value: m(refills.map((r) => r.endToEndMs)), unit: 'ms' },
        { name: `  baseline: ${REFILL_SIZE} raw create+start, ${PARALLELISM} in flight`, value: m(refills.map((r) => r.baselineMs)), unit: 'ms' },
        { name: "  baseline + the driver's inspect after start", value: m(refills.map((r) => r.baselineWithInspectMs)), unit: 'ms' },
        { name: '  ratio daemon refill / baseline', value: round(ratio), unit: 'x', goal: '<= 1.2', met: ratio <= 1.2 },
        { name: '  ratio end to end / baseline', value: round(median(refills.map((r) => r.endToEndMs)) / median(refills.map((r) => r.baselineMs))), unit: 'x' },
      );
    }

    // ---- 4: RSS ---------------------------------------------------------------------
    if (parts.has('rss')) {
      log(`daemon C: peak RSS with ${RSS_POOLS} × ${RSS_POOL_SIZE} containers, ${rssRuns} run(s)`);
      const rss: RssRun[] = [];
      for (let i = 0; i < rssRuns; i++) {
        const r = await rssRun(main, dockerd, netns, client);
        log(`  run ${i + 1}: idle ${r.idleNoPoolsMb} MB, peak ${r.peakMb} MB, idle with 300 ${r.idleWith300Mb} MB, fill ${r.fillMs} ms`);
        rss.push(r);
      }
      raw.rss = rss;
      figures.push(
        { name: `daemon peak RSS (VmHWM), ${RSS_POOLS * RSS_POOL_SIZE} containers in ${RSS_POOLS} pools`, value: m(rss.map((r) => r.peakMb)), unit: 'MB' },
        { name: '  idle RSS, no pools', value: m(rss.map((r) => r.idleNoPoolsMb)), unit: 'MB' },
        { name: `  idle RSS with ${RSS_POOLS * RSS_POOL_SIZE} warm, after resyncs`, value: m(rss.map((r) => r.idleWith300Mb)), unit: 'MB' },
        { name: `  fill of ${RSS_POOLS * RSS_POOL_SIZE} from empty (${RSS_POOLS} pools at once)`, value: m(rss.map((r) => r.fillMs)), unit: 'ms' },
      );
    }
    raw.loadavgAtEnd = loadavg();
    raw.totalSeconds = Math.round((performance.now() - started) / 1000);

    const method = {
      daemon: `the compiled build of src/ (tsc into a private dir under dist/), run as \`node --max-semi-space-size=2 src/main.js run --config …\` in its own process, logLevel info to a file, workers 4 (default), warmPools.parallelism ${PARALLELISM}, applyDebounce 50ms, docker {network: none}, iptables.netns a namespace made for the bench (no ProxyPool)`,
      dockerd: 'private dockerd 20.10 from test/helpers/dockerd.ts: vfs storage, --bridge=none, --iptables=false; image: local busybox import; containers run `sleep 100000`',
      claimLatency: `pool hot: size ${CONCURRENT_CLAIMS}, maxSize ${CONCURRENT_CLAIMS * 2}, resyncInterval 30s. After the initial fill, 10 claims and releases warm the claim path up (not measured). Before each run the pool is idle (${CONCURRENT_CLAIMS} warm, nothing starting/claimed/releasing, Ready, for 1 s). Client: the bench process (separate from the daemon), bench/http-burst.ts: a load generator's client as in wrk (${CONCURRENT_CLAIMS} keep-alive TCP connections opened first, each request pre-encoded, all written in one synchronous loop, one per connection, each response read by Content-Length). Before each run the bench waits (up to 60 s) until the machine has been under 15% busy for 500 ms, so the previous run's releases and refills in dockerd are not measured as this run's (raw.bursts[].quietBefore). Each connection first carries one GET /healthz (so the burst meets no first-request cost), then a second /healthz burst on them is measured (the daemon's HTTP floor); then the same ${CONCURRENT_CLAIMS} claim requests go twice to bench/floor-server.mjs, a bare node:http server in its own process that parses the JSON body and answers a claim-sized 201 (Node's floor on this machine, second burst measured); 300 ms pause; then ${CONCURRENT_CLAIMS} POST /api/v1/pools/hot/claims, distinct userIds, no env/files (no injection). Client latency: the request's write → the last byte of its response. Server latency: the latencyMs field of each answer. Each run's p50/p99/max are over its ${CONCURRENT_CLAIMS} requests (nearest rank); figures are medians over runs. Between runs every claim is released (destroy) and the pool refilled to idle. The claims trigger a refill of ${CONCURRENT_CLAIMS} containers that starts during the burst and competes for the 2 CPUs (as in production).`,
      noRefill: `diagnostic (${noRefillRuns} runs): the same burst with the pool at maxSize = size, so the claimed containers fill maxSize and no refill can start during the burst (the reconciles the claims enqueue still run: list + plan)`,
      coldStart: `pool cold: size 0, maxSize ${COLD_CLAIMS * 2}; ${COLD_CLAIMS} claims one after another over one keep-alive connection; each creates, starts and inspects a container`,
      refill: `a separate daemon (fresh store, empty dockerd), pool refill maxSize ${REFILL_SIZE * 2} going from size 0 to size ${REFILL_SIZE}. The ratio uses status.lastRefillDurationMs: the controller's refill() from reserving the 30 slots in the store to the last container created, started, inspected and recorded warm (excludes the debounce, the apply, the queue and the observe that lists containers). End to end: from renaming the YAML into desiredStateDir (debounce 50ms) to the stats endpoint first showing 30 warm (polled every 20 ms). Baseline: the bench's own DockerClient, ${REFILL_SIZE} × (POST /containers/create with buildCreateBody of the same image/command/label keys, POST /containers/{id}/start), ${PARALLELISM} in flight (mapSettled, as the daemon); also measured with the driver's GET /containers/{id}/json after each start. Same dockerd, no other containers present, containers removed between measurements; baseline and daemon runs interleaved.`,
      rss: `a fresh daemon with resyncInterval 2s: VmRSS 3 s after start without pools; then ${RSS_POOLS} pools of size ${RSS_POOL_SIZE} (maxSize ${RSS_POOL_SIZE * 2}) written at once and filled from empty, ${RSS_POOL_SIZE / 2} concurrent claims per pool, released after 1 s (destroyed and refilled), then 6 s of resyncs; VmHWM and VmRSS from /proc/PID/status at the end. Median over ${rssRuns} run(s) (BENCH_RSS_RUNS).`,
      machineLoad: 'loadavg is recorded per run (other sessions may share the machine); figures are not corrected for it',
    };
    return { figures, raw, method };
  } finally {
    await runCleanups();
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    pollAgent.destroy();
  }
}
