// `npm start` runs this: a self-contained demo of the daemon on one machine. It brings up, in a
// sandbox of its own, what the bundled resources (manifests/examples/) need, runs the daemon on
// them until Ctrl-C, then stops everything it started and removes the sandbox:
//   - a private dockerd (own socket, data root and exec root; vfs, no bridge, no iptables) with
//     local stand-ins of the provider images (busybox, no registry);
//   - coturn on a loopback address with a generated TURN REST secret, configured by the daemon's
//     own renderer from the TurnServer resource, restartable by the daemon (remediation command);
//   - an IP-echo server and, for every port the ProxyPool hands out, a tinyproxy listening on it
//     (the upstream provider's stand-in: one proxy port per user, as the platform's provider has);
//   - the iptables rules in a network namespace named after this checkout (polydev-demo-<id>), so
//     the host firewall is untouched and two checkouts' demos never share chains;
//   - an API token (var/demo/api-token, mode 0600, kept across runs) and a generated config
//     (var/demo/polydev-reconciler.yaml) that the CLI finds by itself inside the checkout.
// Everything listens on a loopback address of its own (127.A.B.1 from the checkout's path), so
// two demos on one host do not collide on ports either.
//
// The desired state is manifests/examples/ as written, with the few fields that name this
// sandbox filled in (upstream and TURN addresses, the TURN secret file, the restart command):
// see overlay(). Editing a file there while the demo runs applies the change.
//
// `npm run demo:down` (this script with `down`) removes what a demo left behind when it was
// killed without a chance to clean up (kill -9, a closed terminal): by the PIDs, directories and
// namespace recorded in var/demo/state.json, each PID checked against its command line first.

import { spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import YAML from 'yaml';

import { DockerClient } from '../src/drivers/docker.js';
import { renderTurnserverConf } from '../src/controllers/turnserver/render.js';
import type { TurnServerSpec } from '../src/controllers/turnserver/types.js';
import { importBusyboxImage, startDockerd, type Dockerd } from '../test/helpers/dockerd.js';
import { startIpEcho, type IpEcho } from '../test/helpers/ip-echo.js';
import { startTinyproxy, type Tinyproxy } from '../test/helpers/tinyproxy.js';

/** The checkout: the nearest directory above this file with this project's package.json (works from scripts/ and dist/scripts/). */
function findCheckout(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 6; i++) {
    const pkg = path.join(dir, 'package.json');
    if (fs.existsSync(pkg) && (JSON.parse(fs.readFileSync(pkg, 'utf8')) as { name?: string }).name === 'polydev-reconciler') return dir;
    dir = path.dirname(dir);
  }
  throw new Error('scripts/demo: not inside a polydev-reconciler checkout');
}

const CHECKOUT = findCheckout();
const EXAMPLES = path.join(CHECKOUT, 'manifests', 'examples');
const BASE_CONFIG = path.join(CHECKOUT, 'manifests', 'config', 'polydev-reconciler.yaml');
// POLYDEV_DEMO_VAR moves var/ (database, token, generated config) elsewhere: the demo's own test
// uses it so that it never touches a developer's demo.
const VAR_DIR = path.resolve(process.env['POLYDEV_DEMO_VAR'] ?? path.join(CHECKOUT, 'var'));
const DEMO_DIR = path.join(VAR_DIR, 'demo');
const DATABASE = path.join(VAR_DIR, 'polydev.db');
const STATE_FILE = path.join(DEMO_DIR, 'state.json');
const CONFIG_FILE = path.join(DEMO_DIR, 'polydev-reconciler.yaml');
const TOKEN_FILE = path.join(DEMO_DIR, 'api-token');
const DESIRED_DIR = path.join(DEMO_DIR, 'desired');
const MAIN_JS = path.join(CHECKOUT, 'dist', 'src', 'main.js');
const RESTART_COTURN = path.join(CHECKOUT, 'test', 'helpers', 'restart-coturn.mjs');

/** Names and addresses derived from var/'s path: stable across runs, distinct between checkouts. */
fs.mkdirSync(VAR_DIR, { recursive: true });
const ID = createHash('sha256').update(fs.realpathSync(VAR_DIR)).digest('hex').slice(0, 8);
const NETNS = `polydev-demo-${ID}`;
const DEMO_IP = `127.${100 + (parseInt(ID.slice(0, 2), 16) % 100)}.${parseInt(ID.slice(2, 4), 16)}.1`;
const API_PORT = 9470;
const TURN_PORT = 3478;
const IP_ECHO_PORT = 8080;
/** Every bundled resource reaches Ready well within this on the 2-core reference machine (see the README). */
const READY_DEADLINE_MS = 120_000;
const POLL_MS = 1000;

/** What a demo started, so that `down` can remove it after the demo itself died. */
interface DemoState {
  supervisorPid: number;
  sandbox: string;
  netns: string;
  dockerd?: { pid: number; dir: string };
  coturnPidFile?: string;
  tinyproxies: Array<{ pid: number; port: number }>;
  daemonPid?: number;
}

const say = (line: string): void => void process.stdout.write(`demo: ${line}\n`);

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}

function commandLine(pid: number): string {
  try {
    return fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').replace(/\0/g, ' ');
  } catch {
    return '';
  }
}

function environment(pid: number): string {
  try {
    return fs.readFileSync(`/proc/${pid}/environ`, 'utf8');
  } catch {
    return '';
  }
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** SIGTERM, then SIGKILL after graceMs: only if the process is still the one we started (its command line mentions `marker`). */
async function stopPid(pid: number, marker: string, graceMs = 5000): Promise<void> {
  if (!alive(pid) || !commandLine(pid).includes(marker)) return;
  try {
    process.kill(pid, 'SIGTERM');
  } catch {
    return;
  }
  for (const end = Date.now() + graceMs; Date.now() < end && alive(pid); ) await sleep(50);
  if (alive(pid)) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      /* gone */
    }
  }
}

function run(file: string, args: string[]): Promise<{ code: number; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(file, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString('utf8')));
    child.on('error', (err) => resolve({ code: 127, stderr: err.message }));
    child.on('exit', (code) => resolve({ code: code ?? 1, stderr }));
  });
}

function readState(): DemoState | undefined {
  try {
    return JSON.parse(fs.readFileSync(STATE_FILE, 'utf8')) as DemoState;
  } catch {
    return undefined;
  }
}

function writeState(state: DemoState): void {
  fs.mkdirSync(DEMO_DIR, { recursive: true });
  fs.writeFileSync(STATE_FILE + '.tmp', JSON.stringify(state, null, 2) + '\n');
  fs.renameSync(STATE_FILE + '.tmp', STATE_FILE);
}

/**
 * Removes everything a demo recorded: the daemon, the stand-in servers, the warm containers (with
 * their dockerd), the dev pool's processes, the namespace and the sandbox. Idempotent; every step
 * runs even when an earlier one failed, and what could not be removed is named.
 */
async function teardown(state: DemoState): Promise<string[]> {
  const problems: string[] = [];
  const step = async (what: string, fn: () => Promise<void>): Promise<void> => {
    try {
      await fn();
    } catch (err) {
      problems.push(`${what}: ${(err as Error).message}`);
    }
  };
  if (state.daemonPid) await step('the daemon', () => stopPid(state.daemonPid!, 'main.js', 15_000));
  for (const p of state.tinyproxies) await step(`tinyproxy on port ${p.port}`, () => stopPid(p.pid, 'tinyproxy'));
  if (state.coturnPidFile) {
    await step('coturn', async () => {
      const pid = Number(fs.readFileSync(state.coturnPidFile!, 'utf8').trim());
      if (pid > 0) await stopPid(pid, 'turnserver');
    }).catch(() => undefined);
  }
  // The dev pool's processes outlive the daemon on purpose (a restarted daemon adopts them): here
  // they must go. Each carries its run directory, inside the sandbox, in its environment.
  await step('the dev pool processes', async () => {
    const marker = `POLYDEV_RUN_DIR=${path.join(state.sandbox, 'process')}`;
    for (const e of fs.readdirSync('/proc')) {
      if (!/^\d+$/.test(e) || Number(e) === process.pid) continue;
      if (environment(Number(e)).includes(marker)) {
        try {
          process.kill(Number(e), 'SIGKILL');
        } catch {
          /* gone */
        }
      }
    }
  });
  if (state.dockerd) {
    const { pid, dir } = state.dockerd;
    await step('dockerd', async () => {
      // Containers first, through its API while it answers: killing the shims would orphan their processes.
      const client = new DockerClient({ socketPath: path.join(dir, 'docker.sock'), requestTimeoutMs: 20_000 });
      try {
        const res = await client.call('GET', '/containers/json?all=1');
        const ids = Array.isArray(res.json) ? res.json.map((c) => String((c as { Id?: unknown }).Id)) : [];
        await Promise.all(ids.map((id) => client.request('DELETE', `/containers/${id}?force=1&v=1`).catch(() => undefined)));
      } catch {
        /* not answering: what is left is killed below */
      } finally {
        client.close();
      }
      await stopPid(pid, dir, 15_000);
      for (const e of fs.readdirSync('/proc')) {
        if (/^\d+$/.test(e) && commandLine(Number(e)).includes(dir + '/')) await stopPid(Number(e), dir + '/', 2000);
      }
      const mounts = fs
        .readFileSync('/proc/self/mountinfo', 'utf8')
        .split('\n')
        .map((l) => l.split(' ')[4] ?? '')
        .filter((mp) => mp === dir || mp.startsWith(dir + '/'))
        .sort((a, b) => b.length - a.length);
      for (const mp of mounts) await run('umount', ['-l', mp]);
      fs.rmSync(dir, { recursive: true, force: true });
    });
  }
  await step(`network namespace ${state.netns}`, async () => {
    if (!fs.existsSync(`/run/netns/${state.netns}`)) return;
    const r = await run('ip', ['netns', 'del', state.netns]);
    if (r.code !== 0) throw new Error(r.stderr.trim() || `ip netns del exited ${r.code}`);
  });
  await step('the sandbox directory', async () => fs.rmSync(state.sandbox, { recursive: true, force: true }));
  await step('the generated config and desired state', async () => {
    fs.rmSync(CONFIG_FILE, { force: true });
    fs.rmSync(DESIRED_DIR, { recursive: true, force: true });
  });
  if (problems.length === 0) fs.rmSync(STATE_FILE, { force: true });
  return problems;
}

/** The API token: kept across runs (the CLI and scripts read it from this file), made once. */
function ensureToken(): void {
  fs.mkdirSync(DEMO_DIR, { recursive: true });
  if (fs.existsSync(TOKEN_FILE)) {
    fs.chmodSync(TOKEN_FILE, 0o600);
    return;
  }
  fs.writeFileSync(TOKEN_FILE, randomBytes(24).toString('hex') + '\n', { mode: 0o600, flag: 'wx' });
}

interface Sandbox {
  ipEcho: IpEcho;
  coturnConf: string;
  coturnPidFile: string;
  turnSecretFile: string;
}

/**
 * The bundled examples with the fields that name this sandbox filled in. Comments and every
 * other field stay as written; each changed field is listed in the generated file's header.
 */
function overlay(sandbox: Sandbox): void {
  fs.mkdirSync(DESIRED_DIR, { recursive: true });
  const wanted = new Set<string>();
  for (const file of fs.readdirSync(EXAMPLES).filter((f) => /\.ya?ml$/.test(f)).sort()) {
    const docs = YAML.parseAllDocuments(fs.readFileSync(path.join(EXAMPLES, file), 'utf8'));
    const changed: string[] = [];
    for (const doc of docs) {
      const kind = doc.get('kind');
      const name = String(doc.getIn(['metadata', 'name']));
      const set = (p: string[], value: unknown): void => {
        doc.setIn(p, value);
        changed.push(`${kind}/${name} ${p.join('.')}`);
      };
      if (kind === 'ProxyPool') {
        set(['spec', 'upstream', 'host'], DEMO_IP);
        if (doc.hasIn(['spec', 'healthCheck'])) set(['spec', 'healthCheck', 'url'], `http://${DEMO_IP}:${IP_ECHO_PORT}/ip`);
      } else if (kind === 'TurnServer') {
        set(['spec', 'host'], DEMO_IP);
        set(['spec', 'ports', 'stun'], TURN_PORT);
        if (doc.getIn(['spec', 'auth', 'mode']) === 'restSecret') set(['spec', 'auth', 'secretFile'], sandbox.turnSecretFile);
        doc.deleteIn(['spec', 'remediation', 'systemdUnit']);
        doc.deleteIn(['spec', 'remediation', 'nomadJob']);
        set(['spec', 'remediation', 'command'], [process.execPath, RESTART_COTURN, sandbox.coturnConf, sandbox.coturnPidFile]);
      }
    }
    const header = [
      `# Generated by the demo (scripts/demo.ts) from manifests/examples/${file}; edit that file instead.`,
      ...(changed.length ? [`# Fields set for the demo's sandbox: ${changed.join(', ')}.`] : []),
    ].join('\n');
    const text = `${header}\n${docs.map((d) => d.toString()).join('')}`;
    const target = path.join(DESIRED_DIR, file);
    wanted.add(file);
    if (!fs.existsSync(target) || fs.readFileSync(target, 'utf8') !== text) {
      fs.writeFileSync(target + '.tmp', text);
      fs.renameSync(target + '.tmp', target);
    }
  }
  for (const f of fs.readdirSync(DESIRED_DIR)) if (!wanted.has(f)) fs.rmSync(path.join(DESIRED_DIR, f), { force: true });
}

/** The TurnServer of the examples as the daemon will see it (after the overlay), for coturn's config. */
function demoTurnServer(): { name: string; spec: TurnServerSpec } | undefined {
  for (const file of fs.readdirSync(DESIRED_DIR).filter((f) => /\.ya?ml$/.test(f))) {
    for (const doc of YAML.parseAllDocuments(fs.readFileSync(path.join(DESIRED_DIR, file), 'utf8'))) {
      const r = doc.toJS() as { kind?: string; metadata?: { name?: string }; spec?: TurnServerSpec } | null;
      if (r?.kind === 'TurnServer' && r.metadata?.name && r.spec) return { name: r.metadata.name, spec: r.spec };
    }
  }
  return undefined;
}

async function startCoturn(sandbox: Sandbox, logFile: string): Promise<void> {
  const turn = demoTurnServer();
  if (!turn) return;
  const secret = fs.readFileSync(sandbox.turnSecretFile, 'utf8').trim();
  const { text } = renderTurnserverConf(turn.name, turn.spec, secret);
  const extra = [
    `relay-ip=${DEMO_IP}`,
    // The daemon's probe allocates a relay and releases it at once; loopback peers are all there is here.
    'allow-loopback-peers',
    `pidfile=${sandbox.coturnPidFile}`,
    `log-file=${logFile}`,
    'simple-log',
    'no-stdout-log',
  ];
  fs.writeFileSync(sandbox.coturnConf, text + extra.join('\n') + '\n', { mode: 0o600 });
  // The restart script the daemon's remediation runs starts it too: one way to start coturn.
  const r = await run(process.execPath, [RESTART_COTURN, sandbox.coturnConf, sandbox.coturnPidFile]);
  if (r.code !== 0) throw new Error(`coturn did not start: ${r.stderr.trim()} (log: ${logFile})`);
}

async function freeOn(host: string, port: number): Promise<boolean> {
  const net = await import('node:net');
  return new Promise((resolve) => {
    const s = net.createServer();
    s.once('error', () => resolve(false));
    s.listen({ port, host, exclusive: true }, () => s.close(() => resolve(true)));
  });
}

interface ApiResource {
  kind: string;
  metadata: { name: string };
  spec: Record<string, unknown>;
  status?: { phase?: string; port?: number; conditions?: Array<{ type: string; status: string; reason?: string; message?: string }>; [k: string]: unknown };
}

function api(method: string, p: string, body?: unknown): Promise<{ status: number; json: unknown }> {
  const token = fs.readFileSync(TOKEN_FILE, 'utf8').trim();
  return new Promise((resolve, reject) => {
    const payload = body === undefined ? undefined : JSON.stringify(body);
    const req = http.request(
      { host: DEMO_IP, port: API_PORT, method, path: p, timeout: 10_000,
        headers: { authorization: `Bearer ${token}`, accept: 'application/json', ...(payload ? { 'content-type': 'application/json' } : {}) } },
      (res) => {
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (d: string) => (text += d));
        res.on('end', () => {
          try {
            resolve({ status: res.statusCode ?? 0, json: text ? JSON.parse(text) : undefined });
          } catch (err) {
            reject(err as Error);
          }
        });
      },
    );
    req.on('timeout', () => req.destroy(new Error(`${method} ${p}: no answer within 10 s`)));
    req.on('error', reject);
    req.end(payload);
  });
}

async function list(kind: string): Promise<ApiResource[]> {
  const r = await api('GET', `/api/v1/${kind}`);
  if (r.status !== 200) return [];
  return ((r.json as { items?: ApiResource[] }).items ?? []);
}

const KINDS = ['ProxyPool', 'ProxyPort', 'WarmPool', 'TurnServer'];

/** A resource is "up" for the demo when it is Ready (TurnServer: Healthy; ProxyPort: also its port healthy). */
function upState(r: ApiResource, since: number): { up: boolean; detail: string } {
  const phase = r.status?.phase ?? 'Unknown';
  if (r.kind === 'TurnServer') return { up: phase === 'Healthy', detail: phase };
  if (r.kind === 'ProxyPort') {
    // The database outlives a demo: only a check made by this one counts.
    const recorded = r.status?.['health'] as { healthy?: boolean; egressIP?: string; lastVerifiedAt?: string } | undefined;
    const health = recorded && Date.parse(recorded.lastVerifiedAt ?? '') >= since ? recorded : undefined;
    return { up: phase === 'Ready' && health?.healthy === true, detail: `${phase}, port ${String(r.status?.port ?? '?')}${health ? (health.healthy ? `, healthy via ${health.egressIP ?? '?'}` : ', unhealthy') : ', not checked yet'}` };
  }
  if (r.kind === 'WarmPool') {
    const warm = r.status?.['warm'] ?? r.status?.['ready'];
    return { up: phase === 'Ready', detail: `${phase}${warm !== undefined ? `, ${String(warm)} warm` : ''}` };
  }
  return { up: phase === 'Ready', detail: phase };
}

async function up(): Promise<number> {
  if (process.getuid?.() !== 0) {
    process.stderr.write('demo: needs root (it creates a network namespace and runs its own dockerd); run: sudo npm start\n');
    return 2;
  }
  if (!fs.existsSync(MAIN_JS)) {
    process.stderr.write(`demo: ${path.relative(process.cwd(), MAIN_JS)} is missing; run: npm run build\n`);
    return 2;
  }
  const previous = readState();
  if (previous && alive(previous.supervisorPid) && commandLine(previous.supervisorPid).includes('demo')) {
    process.stderr.write(`demo: a demo of this checkout is already running (pid ${previous.supervisorPid}); stop it with Ctrl-C in its terminal or: npm run demo:down\n`);
    return 2;
  }
  if (previous) {
    say('removing what the last demo left behind (it did not stop cleanly)');
    const problems = await teardown(previous);
    if (problems.length) {
      process.stderr.write(`demo: could not remove the last demo's leftovers:\n  ${problems.join('\n  ')}\n`);
      return 1;
    }
  }
  for (const [what, port] of [['API', API_PORT], ['coturn', TURN_PORT], ['IP echo', IP_ECHO_PORT]] as const) {
    if (!(await freeOn(DEMO_IP, port))) {
      process.stderr.write(`demo: ${DEMO_IP}:${port} (${what}) is taken by another process; find it with: ss -ltnp 'sport = :${port}'\n`);
      return 1;
    }
  }

  const sandboxDir = fs.mkdtempSync(path.join(fs.existsSync('/run') ? '/run' : '/tmp', `polydev-demo-${ID}-`));
  fs.chmodSync(sandboxDir, 0o700);
  const state: DemoState = { supervisorPid: process.pid, sandbox: sandboxDir, netns: NETNS, tinyproxies: [] };
  writeState(state);

  let daemon: ChildProcess | undefined;
  let dockerd: Dockerd | undefined;
  let ipEcho: IpEcho | undefined;
  const proxies = new Map<number, Tinyproxy>();
  let stopping = false;
  let stopRequested: (() => void) | undefined;
  const stopSignal = new Promise<void>((r) => (stopRequested = r));
  const onSignal = (sig: NodeJS.Signals): void => {
    if (stopping) return;
    stopping = true;
    say(`${sig}: stopping the daemon and removing the sandbox…`);
    stopRequested?.();
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  process.on('SIGHUP', onSignal);

  let exitCode = 0;
  try {
    ensureToken();
    say(`sandbox ${sandboxDir}, loopback address ${DEMO_IP}, network namespace ${NETNS}`);
    say('starting a private dockerd and importing the stand-in provider images…');
    dockerd = await startDockerd({ name: 'demo' });
    state.dockerd = { pid: dockerd.pid, dir: dockerd.dir };
    writeState(state);
    for (const provider of ['openai', 'anthropic', 'google']) {
      await importBusyboxImage(dockerd.socketPath, `polydev-${provider}-runtime:latest`, {
        cmd: ['sleep', '2147483647'],
        changes: ['WORKDIR /workspace', `LABEL polydev.ai/stand-in=${provider}`],
      });
    }
    ipEcho = await startIpEcho({ host: DEMO_IP, port: IP_ECHO_PORT });
    const sandbox: Sandbox = {
      ipEcho,
      coturnConf: path.join(sandboxDir, 'turnserver.conf'),
      coturnPidFile: path.join(sandboxDir, 'turnserver.pid'),
      turnSecretFile: path.join(sandboxDir, 'turn-rest-secret'),
    };
    fs.writeFileSync(sandbox.turnSecretFile, randomBytes(24).toString('hex') + '\n', { mode: 0o600 });
    overlay(sandbox);
    say('starting coturn…');
    state.coturnPidFile = sandbox.coturnPidFile;
    writeState(state);
    await startCoturn(sandbox, path.join(sandboxDir, 'turnserver.log'));

    const base = (YAML.parse(fs.readFileSync(BASE_CONFIG, 'utf8')) ?? {}) as Record<string, unknown>;
    const config = {
      ...base,
      database: DATABASE,
      desiredStateDir: DESIRED_DIR,
      listen: `${DEMO_IP}:${API_PORT}`,
      apiTokenFile: TOKEN_FILE,
      iptables: { ...((base['iptables'] as object | undefined) ?? {}), netns: NETNS, createNetns: true },
      docker: { socket: dockerd.socketPath, network: 'none' },
      process: { runDir: path.join(sandboxDir, 'process'), logDir: path.join(sandboxDir, 'process-logs') },
    };
    fs.writeFileSync(
      CONFIG_FILE,
      `# Written by the demo (scripts/demo.ts) from ${path.relative(DEMO_DIR, BASE_CONFIG)} for its sandbox; removed when it stops.\n` +
        '# Inside this checkout the CLI reads this file while it exists (see the README, "Configuration").\n' +
        YAML.stringify(config),
    );

    say(`starting the daemon: node dist/src/main.js run --config ${path.relative(CHECKOUT, CONFIG_FILE)}`);
    // Its own process group: a Ctrl-C reaches the daemon from us, in order, not from the terminal at once.
    daemon = spawn(process.execPath, ['--max-semi-space-size=2', MAIN_JS, 'run', '--config', CONFIG_FILE], {
      stdio: 'inherit',
      detached: true,
      env: process.env,
    });
    const daemonExit = new Promise<number>((resolve) => daemon!.once('exit', (code, signal) => resolve(code ?? (signal ? 1 : 0))));
    state.daemonPid = daemon.pid;
    writeState(state);

    // Re-applies the overlay when an example changes, so the daemon sees the edit.
    let overlayTimer: NodeJS.Timeout | undefined;
    const watcher = fs.watch(EXAMPLES, () => {
      clearTimeout(overlayTimer);
      overlayTimer = setTimeout(() => {
        try {
          overlay(sandbox);
        } catch (err) {
          say(`could not regenerate the desired state: ${(err as Error).message}`);
        }
      }, 200);
    });

    let summarized = false;
    const startedAt = Date.now();
    const loop = (async () => {
      while (!stopping) {
        await sleep(POLL_MS);
        if (stopping) break;
        let resources: ApiResource[];
        try {
          resources = (await Promise.all(KINDS.map(list))).flat();
        } catch {
          continue; // the API is not up yet
        }
        // The upstream provider's stand-in: a tinyproxy on every port the pool handed out.
        const fresh: string[] = [];
        for (const r of resources) {
          const port = r.kind === 'ProxyPort' ? r.status?.port : undefined;
          if (typeof port !== 'number' || proxies.has(port)) continue;
          try {
            const p = await startTinyproxy({ port, listen: DEMO_IP, bind: DEMO_IP });
            proxies.set(port, p);
            state.tinyproxies.push({ pid: p.pid, port });
            writeState(state);
            fresh.push(String(r.spec['userId']));
          } catch (err) {
            say(`could not start the upstream proxy on ${DEMO_IP}:${port}: ${(err as Error).message}`);
          }
        }
        if (fresh.length) await api('POST', '/api/v1/proxyports/check', { userIds: fresh }).catch(() => undefined);
        if (!summarized) {
          const states = resources.map((r) => ({ r, ...upState(r, startedAt) }));
          const allUp = states.length > 0 && states.every((s) => s.up);
          if (allUp || Date.now() - startedAt > READY_DEADLINE_MS) {
            summarized = true;
            printSummary(states, Math.round((Date.now() - startedAt) / 1000), allUp);
          }
        }
      }
    })();

    const code = await Promise.race([daemonExit, stopSignal.then(() => undefined)]);
    stopping = true;
    watcher.close();
    clearTimeout(overlayTimer);
    if (code !== undefined) {
      say(`the daemon exited with code ${code}; removing the sandbox`);
      exitCode = code === 0 ? 0 : 1;
    } else if (daemon.exitCode === null && daemon.pid) {
      try {
        process.kill(daemon.pid, 'SIGTERM');
      } catch {
        /* gone */
      }
      const exited = await Promise.race([daemonExit.then(() => true), sleep(20_000).then(() => false)]);
      if (!exited) process.kill(daemon.pid, 'SIGKILL');
    }
    await loop;
  } catch (err) {
    process.stderr.write(`demo: ${(err as Error).message}\n`);
    exitCode = 1;
  } finally {
    for (const p of proxies.values()) await p.stop().catch(() => undefined);
    state.tinyproxies = [];
    await ipEcho?.close().catch(() => undefined);
    await dockerd?.stop().catch(() => undefined);
    const problems = await teardown(state);
    if (problems.length) {
      process.stderr.write(`demo: could not remove everything; run npm run demo:down to retry:\n  ${problems.join('\n  ')}\n`);
      exitCode = 1;
    } else {
      say('stopped; the sandbox and the namespace are gone (the database var/polydev.db and the token are kept)');
    }
  }
  return exitCode;
}

function printSummary(states: Array<{ r: ApiResource; up: boolean; detail: string }>, seconds: number, allUp: boolean): void {
  const rel = (p: string): string => {
    const r = path.relative(process.cwd(), p);
    return r && !r.startsWith('..') ? r : p;
  };
  // The checkout's CLI runs the compiled build (npx would add npm's own start-up, about a second).
  const cli = `node ${rel(path.join(CHECKOUT, 'bin', 'polydev-reconciler.js'))}`;
  const lines = [
    '',
    allUp ? `Every bundled resource is up (${seconds} s):` : `Not everything is up after ${seconds} s:`,
    ...states.map((s) => `  ${s.up ? '✓' : '✗'} ${`${s.r.kind}/${s.r.metadata.name}`.padEnd(26)} ${s.detail}`),
    '',
    `API          http://${DEMO_IP}:${API_PORT}  (metrics: /metrics, status page: /)`,
    `API token    ${rel(TOKEN_FILE)} (mode 0600; mutating calls send it as a bearer token)`,
    `Config       ${rel(CONFIG_FILE)} (the CLI finds it by itself inside this checkout)`,
    '',
    'Next, in another terminal:',
    `  ${cli} get warmpools               # the pools and their warm containers`,
    `  ${cli} claim anthropic --user me   # claim a warm container (release it with: release CLAIM_ID)`,
    `  ${cli} describe proxyport alice    # a user's egress port, its rules and health`,
    '',
    'Ctrl-C stops the daemon and removes the sandbox.',
    '',
  ];
  process.stdout.write(lines.join('\n') + '\n');
}

async function down(): Promise<number> {
  const state = readState();
  if (!state) {
    say('no demo state (var/demo/state.json): nothing to remove');
    return 0;
  }
  if (alive(state.supervisorPid) && state.supervisorPid !== process.pid && commandLine(state.supervisorPid).includes('demo')) {
    say(`stopping the running demo (pid ${state.supervisorPid})…`);
    process.kill(state.supervisorPid, 'SIGTERM');
    for (const end = Date.now() + 60_000; Date.now() < end && alive(state.supervisorPid); ) await sleep(200);
    if (!readState()) {
      say('done');
      return 0;
    }
  }
  const problems = await teardown(state);
  if (problems.length) {
    process.stderr.write(`demo: could not remove:\n  ${problems.join('\n  ')}\n`);
    return 1;
  }
  say(`removed the demo's daemon, servers, containers, namespace ${state.netns} and sandbox ${state.sandbox}`);
  return 0;
}

/** What this checkout's demo uses (JSON), without starting anything. */
function info(): number {
  process.stdout.write(JSON.stringify({ var: VAR_DIR, config: CONFIG_FILE, tokenFile: TOKEN_FILE, database: DATABASE, netns: NETNS,
    address: DEMO_IP, api: `http://${DEMO_IP}:${API_PORT}`, running: readState() !== undefined }, null, 2) + '\n');
  return 0;
}

const commands: Record<string, () => Promise<number> | number> = { up, down, info };
const command = process.argv[2] ?? 'up';
const fn = commands[command];
if (!fn || process.argv.length > 3) {
  process.stderr.write('usage: demo.js [up|down|info]\n');
  process.exit(2);
}
process.exitCode = await fn();
