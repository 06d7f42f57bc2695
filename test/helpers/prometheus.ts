// Real Prometheus tools for the alerting tests: promtool, and a Prometheus server started on
// loopback on a free port with a temp data dir of its own, stopped by PID at teardown.
// The binaries come from Debian's `prometheus` package (promtool, /usr/bin/prometheus); a
// missing binary is an error that says which package to install, never a skip.

import type { ExecutionContext } from 'ava';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { trackChild, untrackChild } from './reaper.js';
import { freePort } from './tinyproxy.js';

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const ALERTS_FILE = path.join(REPO, 'manifests', 'prometheus', 'alerts.yml');
export const ALERTS_TEST_FILE = path.join(REPO, 'manifests', 'prometheus', 'alerts.test.yml');
export const DASHBOARD_FILE = path.join(REPO, 'manifests', 'grafana', 'polydev-reconciler.json');

export const PROMTOOL_BIN = '/usr/bin/promtool';
export const PROMETHEUS_BIN = '/usr/bin/prometheus';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
/** Like sleep, without keeping the process alive (a bound for Promise.race). */
const bound = (ms: number): Promise<void> =>
  new Promise((r) => {
    setTimeout(r, ms).unref();
  });

/** The binary's path; throws (the test fails) with the Debian package to install when it is missing. */
export function requireBinary(bin: string, debianPackage: string): string {
  try {
    fs.accessSync(bin, fs.constants.X_OK);
    return bin;
  } catch {
    throw new Error(`${bin} is missing: install Debian's ${debianPackage} package (apt-get install --no-install-recommends ${debianPackage})`);
  }
}

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Runs a command to completion (argument array, no shell; `input` on its stdin), killed by PID after timeoutMs. */
export async function runTool(file: string, args: string[], timeoutMs = 60_000, input?: string): Promise<RunResult> {
  const child = spawn(file, args, { cwd: REPO, stdio: [input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'] });
  trackChild(child);
  if (input !== undefined) {
    // A tool that exits before reading all of it (EPIPE) is judged by its exit code and output.
    child.stdin!.on('error', () => {});
    child.stdin!.end(input);
  }
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
  try {
    return await new Promise<RunResult>((resolve, reject) => {
      child.once('error', reject);
      child.once('close', (code, signal) => resolve({ code, signal, stdout, stderr }));
    });
  } finally {
    clearTimeout(timer);
    untrackChild(child);
  }
}

export interface Server {
  pid: number;
  /** http://127.0.0.1:PORT */
  url: string;
  port: number;
  dir: string;
  output(): string;
  /** SIGTERM by PID, SIGKILL after 5 s; then the temp dir goes. Idempotent. */
  stop(): Promise<void>;
}

/**
 * Starts a server process on 127.0.0.1 (argument array; `args` gets the port and temp dir),
 * waits until `readyPath` answers 200 (bounded), and stops it in t.teardown.
 */
export async function startServer(
  t: ExecutionContext,
  o: { name: string; bin: string; debianPackage: string; args: (port: number, dir: string) => string[]; setup?: (dir: string, port: number) => void; readyPath: string; timeoutMs?: number },
): Promise<Server> {
  const bin = requireBinary(o.bin, o.debianPackage);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `polydev-${o.name}-`));
  const port = await freePort('127.0.0.1');
  o.setup?.(dir, port);
  const child = spawn(bin, o.args(port, dir), { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
  if (child.pid === undefined) {
    fs.rmSync(dir, { recursive: true, force: true });
    throw new Error(`cannot spawn ${bin}`);
  }
  const pid = child.pid;
  trackChild(child);
  let out = '';
  const keep = (d: string) => {
    if (out.length < 1024 * 1024) out += d;
  };
  child.stdout!.setEncoding('utf8').on('data', keep);
  child.stderr!.setEncoding('utf8').on('data', keep);
  let exited = false;
  const exit = new Promise<void>((resolve) => {
    child.once('close', () => {
      exited = true;
      untrackChild(child);
      resolve();
    });
  });
  let stopped = false;
  const stop = async (): Promise<void> => {
    if (stopped) return;
    stopped = true;
    if (!exited) {
      try {
        process.kill(pid, 'SIGTERM');
      } catch {
        /* gone */
      }
      const killer = setTimeout(() => {
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          /* gone */
        }
      }, 5000);
      await Promise.race([exit, bound(10_000)]);
      clearTimeout(killer);
    }
    fs.rmSync(dir, { recursive: true, force: true });
  };
  t.teardown(stop);
  const url = `http://127.0.0.1:${port}`;
  // A hang guard, not a speed check: Prometheus/Alertmanager start in 1-2 s alone, but 5-20x
  // that on a loaded 2-core machine (a passing wait costs only its own time).
  const startTimeoutMs = o.timeoutMs ?? 90_000;
  const deadline = Date.now() + startTimeoutMs;
  for (;;) {
    if (exited) {
      await stop();
      throw new Error(`${o.name} exited during start-up: ${out.slice(-3000)}`);
    }
    try {
      const res = await fetch(`${url}${o.readyPath}`, { signal: AbortSignal.timeout(1000) });
      if (res.status === 200) break;
    } catch {
      /* not yet */
    }
    if (Date.now() >= deadline) {
      await stop();
      throw new Error(`${o.name} did not answer ${o.readyPath} within ${startTimeoutMs} ms: ${out.slice(-3000)}`);
    }
    await sleep(100);
  }
  return { pid, url, port, dir, output: () => out, stop };
}

/**
 * A Prometheus server on 127.0.0.1: `config` is written as prometheus.yml into its temp dir,
 * next to `files` (rule files, by name).
 */
export async function startPrometheus(t: ExecutionContext, o: { config: string; files?: Record<string, string> }): Promise<Server> {
  return startServer(t, {
    name: 'prometheus',
    bin: PROMETHEUS_BIN,
    debianPackage: 'prometheus',
    setup: (dir) => {
      fs.writeFileSync(path.join(dir, 'prometheus.yml'), o.config);
      for (const [name, text] of Object.entries(o.files ?? {})) fs.writeFileSync(path.join(dir, name), text);
      fs.mkdirSync(path.join(dir, 'data'));
    },
    args: (port, dir) => [
      `--config.file=${path.join(dir, 'prometheus.yml')}`,
      `--storage.tsdb.path=${path.join(dir, 'data')}`,
      `--web.listen-address=127.0.0.1:${port}`,
      // A resolved or newly firing alert is sent at once; this only spaces out re-sends of firing ones.
      '--rules.alert.resend-delay=1s',
      '--log.level=warn',
    ],
    readyPath: '/-/ready',
  });
}
