// Runs a real Debian tinyproxy (1.11.x) for tests: private config, log and pid
// file in a fresh temp dir, foreground child process (-d), stopped by PID.

import { spawn } from 'node:child_process';
import { trackChild, untrackChild } from './reaper.js';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';

export const TINYPROXY_BIN = '/usr/bin/tinyproxy';

export interface TinyproxyOptions {
  /** Listen port; 0 picks a free one (bind port 0, read it, release it). */
  port: number;
  /** Listen address (default 127.0.0.1). */
  listen?: string;
  /** Source address for outgoing connections, e.g. 127.0.0.2. */
  bind?: string;
  basicAuth?: { username: string; password: string };
  /** Ports allowed for CONNECT. Omitted/empty: tinyproxy allows CONNECT to every port. */
  connectPorts?: number[];
  /** Idle timeout in seconds (tinyproxy `Timeout`, default 30). */
  idleTimeoutSec?: number;
  maxClients?: number;
}

export interface Tinyproxy {
  port: number;
  pid: number;
  /** Path of tinyproxy's LogFile (LogLevel Connect), handy in assertion messages. */
  logFile: string;
  readLog(): Promise<string>;
  stop(): Promise<void>;
}

// tinyproxy listens about 90 ms after it starts on an idle machine (three at once: 20-60 ms). The
// deadline is a hang guard: under the suite's load on 2 cores 5 s was not enough for some starts
// (the check's own connect attempts were starved too), and a start that works costs only its time.
const STARTUP_TIMEOUT_MS = 30_000;
/** One connect attempt; a refused connection answers at once, so this only bounds a stall. */
const CONNECT_TIMEOUT_MS = 2000;
const POLL_MS = 50;
const KILL_GRACE_MS = 2000;

// tinyproxy 1.11 parses `BasicAuth user password` with a [-a-z0-9._] pattern per
// field (case-insensitive); anything else makes the config line a syntax error.
const BASIC_AUTH_FIELD = /^[-A-Za-z0-9._]+$/;


export async function freePort(host = '127.0.0.1'): Promise<number> {
  return new Promise<number>((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, host, () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => resolve(port));
    });
  });
}

function canConnect(host: string, port: number): Promise<boolean> {
  return new Promise<boolean>((resolve) => {
    const s = net.connect({ host, port });
    const done = (ok: boolean): void => {
      s.destroy();
      resolve(ok);
    };
    s.setTimeout(CONNECT_TIMEOUT_MS, () => done(false));
    s.once('connect', () => done(true));
    s.once('error', () => done(false));
  });
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function quote(v: string): string {
  if (/["\r\n]/.test(v)) throw new Error(`tinyproxy config value may not contain quotes or newlines`);
  return `"${v}"`;
}

/** Port-0 starts that lost their port to another process between picking and binding. */
const PORT_RACE_RETRIES = 5;

export async function startTinyproxy(opts: TinyproxyOptions): Promise<Tinyproxy> {
  // With port 0 the port is picked by binding and releasing it; another process (tests run
  // concurrently) can take it before tinyproxy binds, and tinyproxy then exits at once: pick again.
  for (let attempt = 1; ; attempt++) {
    try {
      return await startOnce(opts);
    } catch (err) {
      if (opts.port !== 0 || attempt >= PORT_RACE_RETRIES || !(err instanceof PortTakenError)) throw err;
    }
  }
}

class PortTakenError extends Error {}

async function startOnce(opts: TinyproxyOptions): Promise<Tinyproxy> {
  const listen = opts.listen ?? '127.0.0.1';
  const port = opts.port === 0 ? await freePort(listen) : opts.port;
  if (opts.basicAuth) {
    const { username, password } = opts.basicAuth;
    if (!BASIC_AUTH_FIELD.test(username) || !BASIC_AUTH_FIELD.test(password)) {
      throw new Error('tinyproxy BasicAuth username/password may only contain [-A-Za-z0-9._]');
    }
  }

  const dir = await mkdtemp(path.join(os.tmpdir(), 'tinyproxy-test-'));
  const confFile = path.join(dir, 'tinyproxy.conf');
  const logFile = path.join(dir, 'tinyproxy.log');
  const pidFile = path.join(dir, 'tinyproxy.pid');
  const lines = [
    `Port ${port}`,
    `Listen ${listen}`,
    ...(opts.bind ? [`Bind ${opts.bind}`] : []),
    `Timeout ${opts.idleTimeoutSec ?? 30}`,
    `MaxClients ${opts.maxClients ?? 32}`,
    'Allow 127.0.0.0/8',
    'Syslog Off',
    `LogFile ${quote(logFile)}`,
    'LogLevel Connect',
    `PidFile ${quote(pidFile)}`,
    'DisableViaHeader Yes',
    ...(opts.basicAuth ? [`BasicAuth ${opts.basicAuth.username} ${opts.basicAuth.password}`] : []),
    ...(opts.connectPorts ?? []).map((p) => `ConnectPort ${p}`),
    '',
  ];
  await writeFile(confFile, lines.join('\n'), { mode: 0o600 });

  const child = spawn(TINYPROXY_BIN, ['-d', '-c', confFile], { stdio: ['ignore', 'ignore', 'pipe'] });
  trackChild(child);
  let stderr = '';
  child.stderr?.setEncoding('utf8');
  child.stderr?.on('data', (d: string) => {
    if (stderr.length < 8192) stderr += d;
  });
  let exited = false;
  const exitPromise = new Promise<void>((resolve) => {
    child.once('exit', () => {
      exited = true;
      untrackChild(child);
      resolve();
    });
    child.once('error', () => {
      exited = true;
      untrackChild(child);
      resolve();
    });
  });

  const readLog = async (): Promise<string> => readFile(logFile, 'utf8').catch(() => '');

  let stopped = false;
  const stop = async (): Promise<void> => {
    if (stopped) return;
    stopped = true;
    if (!exited && child.pid !== undefined) {
      try {
        process.kill(child.pid, 'SIGTERM');
      } catch {
        /* already gone */
      }
      const killTimer = setTimeout(() => {
        if (!exited && child.pid !== undefined) {
          try {
            process.kill(child.pid, 'SIGKILL');
          } catch {
            /* already gone */
          }
        }
      }, KILL_GRACE_MS);
      await exitPromise;
      clearTimeout(killTimer);
    }
    await rm(dir, { recursive: true, force: true });
  };

  const deadline = Date.now() + STARTUP_TIMEOUT_MS;
  for (;;) {
    if (exited) {
      const log = await readLog();
      await stop();
      const message = `tinyproxy exited during startup (exit ${child.exitCode ?? child.signalCode}): ${stderr.trim()} ${log.slice(-2000)}`.trim();
      throw /Address already in use|Could not create listening sockets/i.test(message) ? new PortTakenError(message) : new Error(message);
    }
    if (await canConnect(listen, port)) break;
    if (Date.now() >= deadline) {
      const log = await readLog();
      await stop();
      throw new Error(`tinyproxy did not accept connections on ${listen}:${port} within ${STARTUP_TIMEOUT_MS} ms: ${stderr.trim()} ${log.slice(-2000)}`.trim());
    }
    await sleep(POLL_MS);
  }

  return { port, pid: child.pid!, logFile, readLog, stop };
}
