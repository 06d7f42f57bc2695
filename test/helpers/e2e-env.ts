// End-to-end test environment: a throwaway network namespace for iptables, a temp dir
// with the config, the SQLite file, the API token and a watched desired-state dir,
// in-process daemons and real CLI child processes (the compiled `dist/src/main.js`). Everything
// is torn down through t.teardown (daemons stopped, children killed by PID, namespace
// deleted, temp dir removed). The host's root-namespace iptables is never touched:
// every daemon and every CLI run gets iptables.netns / POLYDEV_IPTABLES_NETNS.

import type { ExecutionContext } from 'ava';
import { trackChild, untrackChild } from './reaper.js';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import YAML from 'yaml';

import { loadConfig, type Config } from '../../src/config.js';
import { tokenizeRuleSpec } from '../../src/controllers/proxypool/rules.js';
import { Daemon, type DaemonOptions } from '../../src/daemon.js';
import { findExecutable } from '../../src/drivers/iptables.js';
import { silentLogger } from '../../src/observability/logger.js';
import { BUILT_MAIN, requireCurrentBuild } from './build.js';
import { createNetns, requireRoot, type Netns } from './netns.js';
import { heavyTests } from './slots.js';

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
/** The CLI as child processes run it: the compiled build (see helpers/build.ts for why). */
export const BIN = BUILT_MAIN;
export const TOKEN = 'e2e-test-token-0123456789abcdef';

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Resolves with undefined after ms, without keeping the process alive (for Promise.race deadlines). */
export const deadline = (ms: number): Promise<undefined> =>
  new Promise((r) => {
    setTimeout(() => r(undefined), ms).unref();
  });

/**
 * Polls fn until it returns a truthy value or the deadline passes (then throws with `what`).
 * The deadline is a hang guard: a wait that succeeds costs only what it waited. With
 * POLYDEV_TEST_WAIT_LOG set (`npm run test:repeat` sets it), every wait appends how long it took
 * and where it is to that file, so deadlines can be checked against the worst case measured under
 * the suite's own load.
 */
export async function waitFor<T>(what: string, fn: () => T | Promise<T>, timeoutMs = 15_000, intervalMs = 50): Promise<NonNullable<T>> {
  const started = Date.now();
  const deadline = started + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await fn();
      if (v) {
        recordWait(what, started, timeoutMs, true);
        return v as NonNullable<T>;
      }
      last = v;
    } catch (err) {
      last = err;
    }
    if (Date.now() >= deadline) {
      recordWait(what, started, timeoutMs, false);
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what} (last: ${last instanceof Error ? last.message : JSON.stringify(last)})`);
    }
    await sleep(intervalMs);
  }
}

/** One line per wait into POLYDEV_TEST_WAIT_LOG: what, where (the test file's line), took, deadline. */
function recordWait(what: string, started: number, timeoutMs: number, ok: boolean): void {
  const file = process.env.POLYDEV_TEST_WAIT_LOG;
  if (!file) return;
  const site = (new Error().stack ?? '').split('\n').map((l) => /(test\/[\w./-]+\.ts):(\d+)/.exec(l)).find((m) => m && !m[1]!.includes('helpers/'));
  const line = { what: what.slice(0, 120), site: site ? `${site[1]}:${site[2]}` : 'unknown', ms: Date.now() - started, timeoutMs, ok };
  try {
    fs.appendFileSync(file, `${JSON.stringify(line)}\n`);
  } catch {
    // Measuring must never fail a test.
  }
}

// ---------------------------------------------------------------------------
// Desired state YAML

export interface PoolOptions {
  name?: string;
  host?: string;
  destinationPorts?: number[];
  driftPolicy?: 'correct' | 'warn' | 'ignore';
  portRange?: { min: number; max: number };
  healthCheck?: Record<string, unknown>;
  ipForward?: boolean;
  /** `omit` (default) leaves chains to the CRD defaults, as the bundled example does; `explicit` writes them out. */
  chains?: 'omit' | 'explicit';
}

export interface UserOptions {
  name?: string;
  userId: string;
  sourceIP: string;
  port?: number;
  pool?: string;
}

export function poolDoc(o: PoolOptions = {}): Record<string, unknown> {
  return {
    apiVersion: 'polydev.ai/v1alpha1',
    kind: 'ProxyPool',
    metadata: { name: o.name ?? 'default' },
    spec: {
      portRange: o.portRange ?? { min: 10001, max: 19999 },
      upstream: { host: o.host ?? '127.0.0.1', scheme: 'http' },
      destinationPorts: o.destinationPorts ?? [80, 443],
      ...(o.chains !== 'explicit' ? {} : { chains: { nat: 'POLYDEV-PROXY', postrouting: 'POLYDEV-PROXY-MASQ', filter: 'POLYDEV-PROXY-FWD' } }),
      ...(o.driftPolicy ? { driftPolicy: o.driftPolicy } : {}),
      ...(o.healthCheck ? { healthCheck: o.healthCheck } : {}),
      ...(o.ipForward !== undefined ? { ipForward: o.ipForward } : {}),
    },
  };
}

export function portDoc(u: UserOptions): Record<string, unknown> {
  return {
    apiVersion: 'polydev.ai/v1alpha1',
    kind: 'ProxyPort',
    metadata: { name: u.name ?? u.userId },
    spec: {
      userId: u.userId,
      sourceIP: u.sourceIP,
      ...(u.pool ? { pool: u.pool } : {}),
      ...(u.port !== undefined ? { port: u.port } : {}),
    },
  };
}

/** The bundled example's shape: pool `default` (upstream 127.0.0.1) and alice (port 10001), bob, carol. */
export const EXAMPLE_USERS: UserOptions[] = [
  { userId: 'alice', sourceIP: '127.0.0.11', port: 10001 },
  { userId: 'bob', sourceIP: '127.0.0.12' },
  { userId: 'carol', sourceIP: '127.0.0.13' },
];

export function manifest(pool: PoolOptions, users: UserOptions[]): string {
  return [poolDoc(pool), ...users.map(portDoc)].map((d) => YAML.stringify(d)).join('---\n');
}

// ---------------------------------------------------------------------------
// Environment

export interface E2eEnv {
  ns: Netns;
  dir: string;
  desiredDir: string;
  db: string;
  tokenFile: string;
  /** Writes a file into the watched desired-state dir (atomically: temp file + rename). */
  writeDesired(file: string, text: string): void;
  removeDesired(file: string): void;
  /** Writes config.yaml (database, netns, quiet logs, short intervals) plus `extra`; returns its path. */
  writeConfig(extra?: Record<string, unknown>, file?: string): string;
  /** Env for child processes: no inherited POLYDEV_*, iptables always in the test netns. */
  childEnv(extra?: Record<string, string>): NodeJS.ProcessEnv;
}

export async function e2eEnv(t: ExecutionContext, opts: { addresses?: string[] } = {}): Promise<E2eEnv> {
  requireRoot();
  await heavyTests.acquire(t);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'polydev-e2e-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const ns = await createNetns(opts.addresses ? { addresses: opts.addresses } : {});
  t.teardown(() => ns.destroy());
  const desiredDir = path.join(dir, 'desired');
  fs.mkdirSync(desiredDir);
  const tokenFile = path.join(dir, 'token');
  fs.writeFileSync(tokenFile, `${TOKEN}\n`, { mode: 0o600 });
  const db = path.join(dir, 'polydev.db');
  let tmpCounter = 0;
  return {
    ns,
    dir,
    desiredDir,
    db,
    tokenFile,
    writeDesired(file, text) {
      // The temp name does not end in .yaml, so the watcher never sees a half-written file.
      const tmp = path.join(desiredDir, `.${file}.${++tmpCounter}.tmp`);
      fs.writeFileSync(tmp, text);
      fs.renameSync(tmp, path.join(desiredDir, file));
    },
    removeDesired(file) {
      fs.rmSync(path.join(desiredDir, file), { force: true });
    },
    writeConfig(extra = {}, file = 'config.yaml') {
      const cfg: Record<string, unknown> = {
        database: db,
        listen: '127.0.0.1:0',
        logLevel: 'error',
        resyncInterval: '500ms',
        applyDebounce: '100ms',
        shutdownTimeout: '5s',
        ...extra,
        iptables: { backend: 'auto', netns: ns.name, ...((extra.iptables as Record<string, unknown> | undefined) ?? {}) },
      };
      const p = path.join(dir, file);
      fs.writeFileSync(p, YAML.stringify(cfg));
      return p;
    },
    childEnv(extra = {}) {
      const env: NodeJS.ProcessEnv = {};
      for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('POLYDEV_')) env[k] = v;
      return { ...env, POLYDEV_IPTABLES_NETNS: ns.name, ...extra };
    },
  };
}

/** Loads a config file with no environment overrides (the test process' POLYDEV_* never leak in). */
export function configFrom(file: string): Config {
  const cfg = loadConfig(file, {});
  if (!cfg.iptables.netns) throw new Error('refusing to run a daemon without iptables.netns');
  return cfg;
}

/** Starts an in-process daemon (silent unless told otherwise); stopped in teardown. */
export async function startDaemon(t: ExecutionContext, cfgFile: string, options: DaemonOptions = {}): Promise<Daemon> {
  const daemon = new Daemon(configFrom(cfgFile), { logger: silentLogger(), ...options });
  t.teardown(() => daemon.stop());
  await daemon.start();
  return daemon;
}

// ---------------------------------------------------------------------------
// iptables inside the namespace

export function iptablesBin(): string {
  const bin = findExecutable('iptables');
  if (!bin) throw new Error('iptables not found');
  return bin;
}

export async function saveAll(ns: Netns): Promise<string> {
  const bin = findExecutable('iptables-save');
  if (!bin) throw new Error('iptables-save not found');
  return (await ns.exec(bin, [])).stdout;
}

export async function saveNat(ns: Netns): Promise<string> {
  const bin = findExecutable('iptables-save');
  if (!bin) throw new Error('iptables-save not found');
  return (await ns.exec(bin, ['-t', 'nat'])).stdout;
}

/** `iptables -w 5 ARGS` in the namespace (hand edits, as an operator would make them). */
export async function iptables(ns: Netns, args: string[]): Promise<string> {
  return (await ns.exec(iptablesBin(), ['-w', '5', ...args])).stdout;
}

/** The `-A CHAIN ...` lines of one chain, in order. */
export function chainLines(saveText: string, chain: string): string[] {
  return saveText.split('\n').filter((l) => l.startsWith(`-A ${chain} `));
}

/** Per-user DNAT rules (owned, `user:` comment) in the nat chain. */
export function userRules(saveText: string, chain = 'POLYDEV-PROXY'): string[] {
  return chainLines(saveText, chain).filter((l) => /--comment "polydev:[0-9a-f]{12} pool:\S+ user:/.test(l));
}

export function ruleOf(saveText: string, userId: string, chain = 'POLYDEV-PROXY'): string | undefined {
  return userRules(saveText, chain).find((l) => l.includes(` user:${userId}"`));
}

/** Deletes a saved `-A CHAIN spec` line by hand (`iptables -t TABLE -D CHAIN spec`). */
export async function deleteSavedRule(ns: Netns, table: string, line: string): Promise<void> {
  const m = /^-A (\S+) (.*)$/.exec(line);
  if (!m) throw new Error(`not a saved rule: ${line}`);
  await iptables(ns, ['-t', table, '-D', m[1]!, ...tokenizeRuleSpec(m[2]!)]);
}

/** Appends a saved-form rule by hand (`iptables -t TABLE -A CHAIN spec`). */
export async function appendSavedRule(ns: Netns, table: string, line: string): Promise<void> {
  const m = /^-A (\S+) (.*)$/.exec(line);
  if (!m) throw new Error(`not a saved rule: ${line}`);
  await iptables(ns, ['-t', table, '-A', m[1]!, ...tokenizeRuleSpec(m[2]!)]);
}

// ---------------------------------------------------------------------------
// Metrics

/** The value of one sample in Prometheus text format; undefined when absent. */
export function metricValue(text: string, name: string, labels: Record<string, string> = {}): number | undefined {
  for (const line of text.split('\n')) {
    if (line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})? (\S+)/.exec(line);
    if (!m || m[1] !== name) continue;
    const have = new Map<string, string>();
    for (const part of (m[3] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) have.set(part[1]!, part[2]!);
    if (Object.entries(labels).every(([k, v]) => have.get(k) === v)) return Number(m[4]);
  }
  return undefined;
}

// ---------------------------------------------------------------------------
// Child processes (the real binary, helpers inside the namespace)

export interface Child {
  child: ChildProcess;
  pid: number;
  stdout(): string;
  stderr(): string;
  /** Resolves when the process has exited. */
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null; at: number }>;
  running(): boolean;
  /** Sends SIGKILL by PID if still running and waits for the exit (bounded). */
  kill(): Promise<void>;
}

/** Spawns a process (argument array, no shell); killed by PID in teardown if still running. */
export function spawnChild(t: ExecutionContext, file: string, args: string[], env: NodeJS.ProcessEnv): Child {
  if (args.includes(BIN)) requireCurrentBuild();
  const child = spawn(file, args, { env, cwd: REPO, stdio: ['ignore', 'pipe', 'pipe'] });
  if (child.pid === undefined) throw new Error(`cannot spawn ${file}`);
  const pid = child.pid;
  trackChild(child);
  let out = '';
  let err = '';
  child.stdout!.setEncoding('utf8').on('data', (d: string) => {
    if (out.length < 4 * 1024 * 1024) out += d;
  });
  child.stderr!.setEncoding('utf8').on('data', (d: string) => {
    if (err.length < 4 * 1024 * 1024) err += d;
  });
  let done = false;
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null; at: number }>((resolve) => {
    child.once('close', (code, signal) => {
      done = true;
      untrackChild(child);
      resolve({ code, signal, at: Date.now() });
    });
  });
  const kill = async (): Promise<void> => {
    if (done) return;
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      /* gone */
    }
    // A hang guard: SIGKILL is immediate, but seeing the exit can take seconds on a loaded machine,
    // and callers (crash tests) start the next daemon right after, which must find the old one gone.
    await Promise.race([exited, deadline(30_000)]);
  };
  t.teardown(kill);
  return { child, pid, stdout: () => out, stderr: () => err, exited, running: () => !done, kill };
}

/** Runs the real binary to completion (bounded); returns exit code and output. */
export async function runBin(
  args: string[],
  env: NodeJS.ProcessEnv,
  timeoutMs = 60_000,
): Promise<{ code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string; ms: number }> {
  requireCurrentBuild();
  const started = Date.now();
  const child = spawn(process.execPath, [BIN, ...args], { env, cwd: REPO, stdio: ['ignore', 'pipe', 'pipe'] });
  trackChild(child);
  let stdout = '';
  let stderr = '';
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (stdout += d));
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const timer = setTimeout(() => {
    try {
      if (child.pid !== undefined) process.kill(child.pid, 'SIGKILL');
    } catch {
      /* gone */
    }
  }, timeoutMs);
  const { code, signal } = await new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    child.once('close', (c, s) => resolve({ code: c, signal: s }));
  });
  clearTimeout(timer);
  untrackChild(child);
  return { code, signal, stdout, stderr, ms: Date.now() - started };
}

/** JSON log lines of a daemon's stdout. */
export function logLines(stdout: string): Array<Record<string, unknown>> {
  const out: Array<Record<string, unknown>> = [];
  for (const line of stdout.split('\n')) {
    if (!line.startsWith('{')) continue;
    try {
      out.push(JSON.parse(line) as Record<string, unknown>);
    } catch {
      /* partial line */
    }
  }
  return out;
}

/** Waits for the binary's "polydev-reconciler started" log line and returns its API address. */
export async function waitStarted(c: Child, timeoutMs = 30_000): Promise<string> {
  return waitFor(
    `the daemon (pid ${c.pid}) to log "polydev-reconciler started"`,
    () => {
      if (!c.running()) throw new Error(`daemon exited early: ${c.stderr().slice(-2000)} ${c.stdout().slice(-2000)}`);
      const started = logLines(c.stdout()).find((l) => l.message === 'polydev-reconciler started');
      return started ? String(started.listen) : undefined;
    },
    timeoutMs,
    100,
  );
}

/** Waits for a started daemon's API address, leader or standby ("polydev-reconciler started…" lines). */
export async function waitListening(c: Child, timeoutMs = 30_000): Promise<string> {
  return waitFor(
    `daemon pid ${c.pid} to log its address`,
    () => {
      if (!c.running()) throw new Error(`daemon exited early: ${c.stderr().slice(-2000)} ${c.stdout().slice(-2000)}`);
      const line = logLines(c.stdout()).find((l) => typeof l.message === 'string' && l.message.startsWith('polydev-reconciler started') && l.listen);
      return line ? String(line.listen) : undefined;
    },
    timeoutMs,
    20,
  );
}

/** Waits until GET url returns 200. */
export async function waitHttp200(url: string, timeoutMs = 30_000): Promise<void> {
  await waitFor(`${url} to answer 200`, async () => (await fetch(url, { signal: AbortSignal.timeout(2000) })).status === 200, timeoutMs, 100);
}
