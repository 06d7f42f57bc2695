// Runs a real Debian coturn (4.6.1) on 127.0.0.1 for one test: private config,
// log and pid file in a fresh temp dir, foreground child process, killed by PID
// in t.teardown.
//
// An outside restart (a remediation command that kill -9s the PID in the pidfile and
// starts `turnserver -c CONFIG` detached) is supported: currentPid() reads the
// pidfile, and pause/resume/kill/stop/teardown also act on a turnserver started
// from our config file whose PID is in the pidfile (checked via /proc/PID/cmdline).
//
// Ports: the listening port, the CLI port and a 20-port relay range are picked at
// random and reserved across ava worker processes with O_EXCL lock files in
// os.tmpdir()/polydev-coturn-ports (stale locks of dead PIDs are taken over).
// That matters because coturn binds its sockets with SO_REUSEPORT: two root
// coturns on the same port would both start fine and share the traffic, so
// "retry on EADDRINUSE" alone cannot detect a collision. We additionally check
// that the ports are bindable right before the start and retry with new ports if
// coturn exits or logs a bind error.
//
// allocations(): Debian's coturn 4.6.1 is built without Prometheus support (no
// --prometheus option in `turnserver -h`, no libprom/microhttpd linked), so the
// count comes from coturn's telnet CLI (cli-ip=127.0.0.1, cli-port, cli-password;
// coturn refuses allow-loopback-peers with an empty CLI password anyway). The
// `pc` command prints the realm's `total-current-allocs`, the counter coturn
// increments when it admits an allocation (quota check) and decrements when the
// session holding it is deleted (`ps`'s "Total sessions" agrees). Measured: 0 -> 1
// while an allocation is held; after Refresh(LIFETIME 0) over UDP coturn deletes the
// allocation on its next 1-second timer tick (so the count drops within ~1 s, use
// waitAllocations()), over TCP at once when the connection closes.

import { spawn, type ChildProcess } from 'node:child_process';
import dgram from 'node:dgram';
import { randomBytes, randomInt } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import { mkdir, mkdtemp, open, readFile, rm, unlink, writeFile } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import type { ExecutionContext } from 'ava';

import { probeTurn } from '../../src/drivers/turn.js';
import { trackChild, untrackChild } from './reaper.js';

export const TURNSERVER_BIN = '/usr/bin/turnserver';
export const OPENSSL_BIN = '/usr/bin/openssl';

export interface Coturn {
  pid: number;
  port: number;
  /** TLS listening port when started with `tls: true`. */
  tlsPort?: number;
  /** PEM of the self-signed certificate (CN turn.test, SAN IP:127.0.0.1) when started with `tls: true`. */
  tlsCert?: string;
  realm: string;
  dir: string;
  configFile: string;
  logFile: string;
  /** coturn's pidfile (an outside restart, e.g. a remediation command, rewrites it). */
  pidFile: string;
  cliPort: number;
  relayRange: { min: number; max: number };
  mode: 'longTerm' | 'restSecret';
  username?: string;
  password?: string;
  secret?: string;
  /** SIGTERM, then SIGKILL after 3 s; waits for exit. */
  stop(): Promise<void>;
  /** SIGKILL and wait. */
  kill(): Promise<void>;
  /** SIGSTOP; returns once every coturn thread is stopped (throws if that takes over 10 s). */
  pause(): void;
  /** SIGCONT. */
  resume(): void;
  /** kill -9 and start again on the same ports and config (new pid). */
  restart(): Promise<void>;
  /** How many allocations the server holds right now (telnet CLI `pc`, total-current-allocs). */
  allocations(): Promise<number>;
  /**
   * Allocations no client has released yet: `ps` sessions minus those expiring within 1 s (a Refresh with
   * LIFETIME 0 leaves the session listed, "expiring in 0/1 secs", until coturn's next 1-s timer tick).
   * Use it to assert "no leaked allocation" while UDP probes keep coming; allocations() counts the
   * released-but-not-yet-deleted ones too (their relay ports are still taken).
   */
  liveAllocations(): Promise<number>;
  /** Polls allocations() until it equals `expected` or `timeoutMs` (default 20 s, a hang guard) passes; returns the last count. */
  waitAllocations(expected: number, timeoutMs?: number): Promise<number>;
  /** Runs one CLI command and returns its output (telnet bytes stripped). */
  cli(command: string): Promise<string>;
  readLog(): Promise<string>;
  /** The PID in coturn's pidfile right now (differs from `pid` after an outside restart); undefined when unreadable. */
  currentPid(): number | undefined;
  /**
   * Starts another coturn from a config file written elsewhere (e.g. one the daemon rendered) and waits until
   * it answers a STUN binding on 127.0.0.1:`port`; killed by PID in t.teardown.
   */
  startFrom(t: ExecutionContext, configFile: string, port: number): Promise<CoturnProcess>;
}

/** A coturn started from someone else's config (startFrom). */
export interface CoturnProcess {
  pid: number;
  port: number;
  kill(): Promise<void>;
}

export interface CoturnOptions {
  mode: 'longTerm' | 'restSecret';
  realm?: string;
  username?: string;
  password?: string;
  secret?: string;
  /** coturn user-quota (concurrent allocations per user). */
  userQuota?: number;
  /** coturn total-quota. */
  totalQuota?: number;
  /** Also listen with TLS on a second port (self-signed certificate made with openssl). */
  tls?: boolean;
  /** Extra config lines. */
  extra?: string[];
}

// coturn answers STUN about 50-100 ms after it starts on an idle machine. The deadline is a hang
// guard: under the suite's load on 2 cores starts take 5-20x longer (5 s was tight), and a start
// that works costs only its time. A start that cannot work ends the wait early (exit, bind error).
const READY_TIMEOUT_MS = 30_000;
/** One readiness probe: a refused port answers at once (ICMP), so this only bounds a stalled event loop. */
const READY_PROBE_TIMEOUT_MS = 2000;
const STOP_GRACE_MS = 3000;
// One CLI round trip to a healthy coturn takes milliseconds; no test is about the CLI's timeout, so this
// is a hang guard generous enough for a starved coturn CLI thread or a stalled test process.
const CLI_TIMEOUT_MS = 15_000;
// Hang guards for things that take milliseconds when the machine is idle (a SIGKILLed process to go,
// every thread of a SIGSTOPped one to reach the stopped state); generous because only a hang costs them.
const KILL_WAIT_MS = 10_000;
const STOP_WAIT_MS = 10_000;
/** Default deadline of waitAllocations(): coturn frees a UDP-released allocation on its next 1-s tick. */
const ALLOCATIONS_WAIT_MS = 20_000;
const RELAY_PORTS = 20;
const LOCK_DIR = path.join(os.tmpdir(), 'polydev-coturn-ports');
// Outside Linux's default ephemeral range (32768-60999), so client sockets never take them.
const LISTEN_RANGE = [20000, 29999] as const;
const RELAY_RANGE = [61000, 65499] as const;

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Cross-process reservation of a name (port or relay block); returns a release function or undefined when taken. */
async function reserve(name: string): Promise<(() => Promise<void>) | undefined> {
  await mkdir(LOCK_DIR, { recursive: true });
  const file = path.join(LOCK_DIR, name);
  for (let i = 0; i < 2; i++) {
    try {
      const fh = await open(file, 'wx');
      await fh.writeFile(String(process.pid));
      await fh.close();
      return async () => {
        await unlink(file).catch(() => undefined);
      };
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
      const owner = Number((await readFile(file, 'utf8').catch(() => '')).trim());
      if (Number.isInteger(owner) && owner > 0 && alive(owner)) return undefined;
      await unlink(file).catch(() => undefined); // stale: take over once
    }
  }
  return undefined;
}

function canBindTcp(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.once('error', () => resolve(false));
    s.listen({ port, host: '127.0.0.1', exclusive: true }, () => s.close(() => resolve(true)));
  });
}

function canBindUdp(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = dgram.createSocket('udp4');
    s.once('error', () => {
      s.close();
      resolve(false);
    });
    s.bind({ port, address: '127.0.0.1', exclusive: true }, () => s.close(() => resolve(true)));
  });
}

interface Reservation {
  ports: number[];
  release: () => Promise<void>;
}

/** Reserves `count` consecutive ports starting at a random multiple of `align` inside [lo, hi], bindable (TCP+UDP) when `check`. */
async function reserveBlock(lo: number, hi: number, count: number, align: number, check: boolean): Promise<Reservation> {
  for (let attempt = 0; attempt < 50; attempt++) {
    const slots = Math.floor((hi - lo + 1 - count) / align);
    const start = lo + randomInt(0, slots + 1) * align;
    const release = await reserve(`block-${start}-${count}`);
    if (!release) continue;
    const ports = Array.from({ length: count }, (_, i) => start + i);
    if (check) {
      let ok = true;
      for (const p of ports) {
        if (!(await canBindTcp(p)) || !(await canBindUdp(p))) {
          ok = false;
          break;
        }
      }
      if (!ok) {
        await release();
        continue;
      }
    }
    return { ports, release };
  }
  throw new Error(`no free port block in ${lo}-${hi}`);
}

function readPid(file: string): number | undefined {
  try {
    const n = Number(readFileSync(file, 'utf8').trim());
    return Number.isInteger(n) && n > 0 ? n : undefined;
  } catch {
    return undefined;
  }
}

/** True when `pid` is a live turnserver started with `configFile` (never signal someone else's process). */
function isOurTurnserver(pid: number, configFile: string): boolean {
  try {
    const argv = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
    return argv.some((a) => a.endsWith('turnserver')) && argv.includes(configFile);
  } catch {
    return false;
  }
}

/** SIGKILLs a process we did not spawn (no exit event): polls until it is gone (max KILL_WAIT_MS). */
async function killForeign(pid: number): Promise<void> {
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    return;
  }
  const deadline = Date.now() + KILL_WAIT_MS;
  while (Date.now() < deadline && alive(pid) && !isZombieOrGone(pid)) await sleep(20);
}

function isZombieOrGone(pid: number): boolean {
  try {
    return /^\d+ \(.*\) Z/.test(readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return true;
  }
}

/**
 * Blocks (synchronously, max `timeoutMs`) until every thread of `pid` is in the stopped state. kill(SIGSTOP)
 * returns before the group stop has happened: until one of coturn's threads has dequeued the signal, another
 * thread woken by a packet can still answer it (seen under load: a Binding answered right after pause()).
 */
function waitAllThreadsStopped(pid: number, timeoutMs = STOP_WAIT_MS): boolean {
  const nap = new Int32Array(new SharedArrayBuffer(4));
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    let all = true;
    try {
      for (const tid of readdirSync(`/proc/${pid}/task`)) {
        const stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
        const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
        if (state !== 'T' && state !== 't') {
          all = false;
          break;
        }
      }
    } catch {
      return false; // gone
    }
    if (all) return true;
    if (Date.now() >= deadline) return false;
    Atomics.wait(nap, 0, 0, 1);
  }
}

/** Polls a STUN binding (our own client) on 127.0.0.1:port until it answers; false when `gone()` or after READY_TIMEOUT_MS. */
async function waitStun(port: number, gone: () => boolean): Promise<boolean> {
  const deadline = Date.now() + READY_TIMEOUT_MS;
  while (Date.now() < deadline) {
    if (gone()) return false;
    const r = await probeTurn({
      host: '127.0.0.1',
      port,
      transport: 'udp',
      realm: 'ready',
      credentials: { mode: 'longTerm', username: 'ready', password: 'ready' },
      timeoutMs: READY_PROBE_TIMEOUT_MS,
      allocate: false,
    });
    if (r.reachable && r.errorClass === undefined) return true;
    await sleep(30);
  }
  return false;
}

function configLines(o: {
  port: number;
  tlsPort?: number;
  cliPort: number;
  cliPassword: string;
  relay: { min: number; max: number };
  realm: string;
  opts: CoturnOptions;
  username?: string;
  password?: string;
  secret?: string;
  dir: string;
  logFile: string;
  pidFile: string;
}): string[] {
  const safe = (v: string, what: string): string => {
    if (!/^[-A-Za-z0-9._@+/=]+$/.test(v)) throw new Error(`coturn ${what} must match [-A-Za-z0-9._@+/=]+`);
    return v;
  };
  return [
    'listening-ip=127.0.0.1',
    `listening-port=${o.port}`,
    'relay-ip=127.0.0.1',
    `min-port=${o.relay.min}`,
    `max-port=${o.relay.max}`,
    `realm=${safe(o.realm, 'realm')}`,
    ...(o.opts.mode === 'longTerm'
      ? ['lt-cred-mech', `user=${safe(o.username!, 'username')}:${safe(o.password!, 'password')}`]
      : ['use-auth-secret', `static-auth-secret=${safe(o.secret!, 'secret')}`]),
    ...(o.tlsPort !== undefined
      ? [`tls-listening-port=${o.tlsPort}`, `cert=${path.join(o.dir, 'cert.pem')}`, `pkey=${path.join(o.dir, 'key.pem')}`, 'no-tlsv1', 'no-tlsv1_1']
      : ['no-tls']),
    'no-dtls',
    'cli-ip=127.0.0.1',
    `cli-port=${o.cliPort}`,
    `cli-password=${o.cliPassword}`,
    'allow-loopback-peers',
    ...(o.opts.userQuota !== undefined ? [`user-quota=${o.opts.userQuota}`] : []),
    ...(o.opts.totalQuota !== undefined ? [`total-quota=${o.opts.totalQuota}`] : []),
    `userdb=${path.join(o.dir, 'turndb')}`, // not the system's /var/lib/turn/turndb
    'cli-max-output-sessions=10000', // ps lists every session (liveAllocations)
    'no-stdout-log',
    'simple-log',
    `log-file=${o.logFile}`,
    `pidfile=${o.pidFile}`,
    ...(o.opts.extra ?? []),
    '',
  ];
}

function runOpenssl(args: string[]): Promise<void> {
  return new Promise((resolve, reject) => {
    const c = spawn(OPENSSL_BIN, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    c.stderr?.setEncoding('utf8');
    c.stderr?.on('data', (d: string) => (err += d));
    c.once('error', reject);
    c.once('exit', (code) => (code === 0 ? resolve() : reject(new Error(`openssl ${args[0]} failed: ${err.trim()}`))));
  });
}

/** Strips telnet IAC sequences (coturn's CLI speaks telnet via libtelnet). */
function stripTelnet(s: string): string {
  return s.replace(/\xff[\xfb-\xfe][\s\S]/g, '').replace(/\xff[\xf0-\xfa]/g, '');
}

/** One CLI session: password, then `command`, collects the output up to the next prompt, quits. */
function cliCommand(port: number, password: string, command: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const sock = net.connect({ host: '127.0.0.1', port });
    let buf = '';
    let stage: 'password' | 'prompt' | 'output' = 'password';
    let outStart = 0;
    const timer = setTimeout(() => finish(new Error(`coturn CLI: no answer within ${CLI_TIMEOUT_MS} ms (stage ${stage}): ${JSON.stringify(buf.slice(-300))}`)), CLI_TIMEOUT_MS);
    const finish = (err: Error | undefined, out?: string): void => {
      clearTimeout(timer);
      sock.removeAllListeners('data');
      sock.on('error', () => undefined);
      sock.destroy();
      if (err) reject(err);
      else resolve(out!);
    };
    sock.setEncoding('latin1');
    sock.on('error', (e) => finish(e));
    sock.on('data', (d: string) => {
      buf += d;
      const clean = stripTelnet(buf);
      if (stage === 'password' && clean.includes('Enter password:')) {
        stage = 'prompt';
        buf = '';
        sock.write(`${password}\r\n`);
      } else if (stage === 'prompt' && clean.endsWith('> ')) {
        stage = 'output';
        buf = '';
        outStart = 0;
        sock.write(`${command}\r\n`);
      } else if (stage === 'prompt' && clean.includes('Enter password:')) {
        finish(new Error('coturn CLI: password rejected'));
      } else if (stage === 'output' && clean.slice(outStart).endsWith('> ')) {
        sock.write('quit\r\n');
        finish(undefined, clean.slice(0, -2));
      }
    });
  });
}

export async function startCoturn(t: ExecutionContext, opts: CoturnOptions): Promise<Coturn> {
  const realm = opts.realm ?? 'polydev.test';
  const username = opts.mode === 'longTerm' ? (opts.username ?? 'probe') : undefined;
  const password = opts.mode === 'longTerm' ? (opts.password ?? `pw-${randomBytes(8).toString('hex')}`) : undefined;
  const secret = opts.mode === 'restSecret' ? (opts.secret ?? `sec-${randomBytes(12).toString('hex')}`) : undefined;
  const cliPassword = randomBytes(12).toString('hex');

  const dir = await mkdtemp(path.join(os.tmpdir(), 'coturn-test-'));
  const configFile = path.join(dir, 'turnserver.conf');
  const logFile = path.join(dir, 'turn.log');
  const pidFile = path.join(dir, 'turn.pid');
  const releases: Array<() => Promise<void>> = [];

  let child: ChildProcess | undefined;
  let exitPromise: Promise<void> = Promise.resolve();
  let exited = true;
  let stderr = '';
  let torn = false;

  const readLog = async (): Promise<string> => readFile(logFile, 'utf8').catch(() => '');

  const spawnServer = (): void => {
    stderr = '';
    const c = spawn(TURNSERVER_BIN, ['-c', configFile], { stdio: ['ignore', 'ignore', 'pipe'] });
    child = c;
    exited = false;
    trackChild(c);
    c.stderr?.setEncoding('utf8');
    c.stderr?.on('data', (d: string) => {
      if (stderr.length < 8192) stderr += d;
    });
    exitPromise = new Promise<void>((resolve) => {
      const done = (): void => {
        exited = true;
        untrackChild(c);
        resolve();
      };
      c.once('exit', done);
      c.once('error', done);
    });
  };

  const signal = (sig: NodeJS.Signals): void => {
    if (!exited && child?.pid !== undefined) {
      try {
        process.kill(child.pid, sig);
      } catch {
        /* already gone */
      }
    }
  };

  /** A coturn an outside restart (remediation command) started from our config: its PID is in the pidfile. */
  const foreignPid = (): number | undefined => {
    const p = readPid(pidFile);
    return p !== undefined && p !== child?.pid && isOurTurnserver(p, configFile) ? p : undefined;
  };

  const signalAll = (sig: NodeJS.Signals): void => {
    signal(sig);
    const f = foreignPid();
    if (f !== undefined) {
      try {
        process.kill(f, sig);
      } catch {
        /* already gone */
      }
    }
  };

  const kill = async (): Promise<void> => {
    signal('SIGKILL');
    const f = foreignPid();
    if (f !== undefined) await killForeign(f);
    await exitPromise;
  };

  const stop = async (): Promise<void> => {
    const f = foreignPid();
    if (f !== undefined) await killForeign(f);
    signal('SIGTERM');
    signal('SIGCONT'); // a paused server would never act on SIGTERM
    const timer = setTimeout(() => signal('SIGKILL'), STOP_GRACE_MS);
    await exitPromise;
    clearTimeout(timer);
  };

  const teardown = async (): Promise<void> => {
    if (torn) return;
    torn = true;
    await kill();
    for (const r of releases.splice(0)) await r();
    await rm(dir, { recursive: true, force: true });
  };
  t.teardown(teardown);

  let port = 0;
  let tlsPort: number | undefined;
  let cliPort = 0;
  let relay = { min: 0, max: 0 };

  const bindErrors = (log: string): boolean => /Address already in use|Cannot bind|errno=98/i.test(log);
  const readLogSync = (): string => {
    try {
      return readFileSync(logFile, 'utf8');
    } catch {
      return '';
    }
  };

  /**
   * Waits until a STUN binding (our own client) succeeds; false when the process died, logged a bind error
   * (it would never answer on our port: no point waiting out the generous deadline) or the time ran out.
   */
  const waitReady = (): Promise<boolean> => waitStun(port, () => exited || bindErrors(readLogSync()));

  /**
   * Waits until the telnet CLI answers `pc` with our password (coturn may open the CLI after the STUN
   * listener). Resolves undefined when it does, else the problem: a rejected password (someone else's
   * CLI on the port) at once, anything else (refused, no answer) once the process died or the time ran out.
   */
  const waitCli = async (): Promise<string | undefined> => {
    const deadline = Date.now() + READY_TIMEOUT_MS;
    for (;;) {
      try {
        await cliCommand(cliPort, cliPassword, 'pc');
        return undefined;
      } catch (e) {
        const msg = (e as Error).message;
        if (/password rejected/.test(msg) || exited || Date.now() >= deadline) return msg;
      }
      await sleep(50);
    }
  };

  if (opts.tls) {
    await runOpenssl([
      'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
      '-keyout', path.join(dir, 'key.pem'), '-out', path.join(dir, 'cert.pem'),
      '-days', '2', '-subj', '/CN=turn.test', '-addext', 'subjectAltName=IP:127.0.0.1,DNS:turn.test',
    ]);
  }

  let lastProblem = '';
  for (let attempt = 1; attempt <= 4; attempt++) {
    // start: STUN port, +1: coturn's alt port, +2: CLI, +4: TLS, +5: alt TLS (all reserved and checked).
    const listen = await reserveBlock(LISTEN_RANGE[0], LISTEN_RANGE[1], 6, 8, true);
    const relayBlock = await reserveBlock(RELAY_RANGE[0], RELAY_RANGE[1], RELAY_PORTS, RELAY_PORTS, false);
    port = listen.ports[0]!;
    cliPort = listen.ports[2]!;
    tlsPort = opts.tls ? listen.ports[4]! : undefined;
    relay = { min: relayBlock.ports[0]!, max: relayBlock.ports[RELAY_PORTS - 1]! };
    await writeFile(
      configFile,
      configLines({ port, ...(tlsPort !== undefined ? { tlsPort } : {}), cliPort, cliPassword, relay, realm, opts, ...(username ? { username } : {}), ...(password ? { password } : {}), ...(secret ? { secret } : {}), dir, logFile, pidFile }).join('\n'),
      { mode: 0o600 },
    );
    await rm(logFile, { force: true });
    spawnServer();
    const ready = await waitReady();
    const log = await readLog();
    if (ready && !bindErrors(log)) {
      const cliProblem = await waitCli(); // proves the CLI (and its unique password) is ours
      if (cliProblem === undefined) {
        releases.push(listen.release, relayBlock.release);
        break;
      }
      lastProblem = `CLI check failed: ${cliProblem}`;
    } else {
      lastProblem = `${bindErrors(log) ? 'bind errors in the log' : exited ? `exited (${child?.exitCode ?? child?.signalCode})` : 'no STUN answer'}: ${stderr.trim()} ${log.slice(-1500)}`;
    }
    await kill();
    await listen.release();
    await relayBlock.release();
    if (attempt === 4) {
      await teardown();
      throw new Error(`coturn did not start on 127.0.0.1 after ${attempt} attempts: ${lastProblem}`);
    }
  }

  const c: Coturn = {
    pid: child!.pid!,
    port,
    realm,
    dir,
    configFile,
    logFile,
    pidFile,
    cliPort,
    relayRange: relay,
    mode: opts.mode,
    stop,
    kill,
    pause: () => {
      signalAll('SIGSTOP');
      for (const p of [child?.pid, foreignPid()]) {
        if (p !== undefined && alive(p) && !waitAllThreadsStopped(p)) throw new Error(`coturn ${p} did not stop within ${STOP_WAIT_MS} ms`);
      }
    },
    resume: () => signalAll('SIGCONT'),
    restart: async () => {
      await kill();
      spawnServer();
      c.pid = child!.pid!;
      if (!(await waitReady())) {
        throw new Error(`coturn did not come back after restart: ${stderr.trim()} ${(await readLog()).slice(-1500)}`);
      }
      // allocations() right after a restart needs the CLI, which coturn may open after the STUN port.
      const cliProblem = await waitCli();
      if (cliProblem !== undefined) throw new Error(`coturn's CLI did not come back after restart: ${cliProblem}`);
    },
    allocations: async () => {
      const out = await cliCommand(cliPort, cliPassword, 'pc');
      const m = /total-current-allocs:\s*(\d+)/.exec(out);
      if (!m) throw new Error(`coturn CLI pc: no total-current-allocs in ${JSON.stringify(out.slice(-500))}`);
      return Number(m[1]);
    },
    liveAllocations: async () => {
      const out = await cliCommand(cliPort, cliPassword, 'ps');
      const total = /Total sessions:\s*(\d+)/.exec(out);
      if (!total) throw new Error(`coturn CLI ps: no total in ${JSON.stringify(out.slice(-500))}`);
      const sessions = out.split(/^\s+\d+\) id=/m).slice(1);
      if (sessions.length !== Number(total[1])) throw new Error(`coturn CLI ps listed ${sessions.length} of ${total[1]} sessions`);
      return sessions.filter((x) => !/^\s+(expired|expiring in [01] secs)\r?$/m.test(x)).length;
    },
    // A polled wait: the deadline only matters when the count never gets there (then the test fails anyway).
    waitAllocations: async (expected: number, timeoutMs = ALLOCATIONS_WAIT_MS) => {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const n = await c.allocations();
        if (n === expected || Date.now() >= deadline) return n;
        await sleep(100);
      }
    },
    cli: (command: string) => cliCommand(cliPort, cliPassword, command),
    readLog,
    currentPid: () => readPid(pidFile),
    startFrom: async (t2: ExecutionContext, file: string, listenPort: number): Promise<CoturnProcess> => {
      const p = spawn(TURNSERVER_BIN, ['-c', file], { stdio: ['ignore', 'ignore', 'pipe'] });
      trackChild(p);
      let err = '';
      p.stderr?.setEncoding('utf8');
      p.stderr?.on('data', (d: string) => {
        if (err.length < 4096) err += d;
      });
      let gone = false;
      const exit = new Promise<void>((resolve) => {
        const done = (): void => {
          gone = true;
          untrackChild(p);
          resolve();
        };
        p.once('exit', done);
        p.once('error', done);
      });
      const killIt = async (): Promise<void> => {
        if (!gone && p.pid !== undefined) {
          try {
            process.kill(p.pid, 'SIGKILL');
          } catch {
            /* already gone */
          }
        }
        await exit;
      };
      t2.teardown(killIt);
      if (!(await waitStun(listenPort, () => gone))) {
        await killIt();
        throw new Error(`coturn from ${file} did not answer STUN on 127.0.0.1:${listenPort}: ${err.trim()}`);
      }
      return { pid: p.pid!, port: listenPort, kill: killIt };
    },
  };
  if (tlsPort !== undefined) {
    c.tlsPort = tlsPort;
    c.tlsCert = await readFile(path.join(dir, 'cert.pem'), 'utf8');
  }
  if (username !== undefined) c.username = username;
  if (password !== undefined) c.password = password;
  if (secret !== undefined) c.secret = secret;
  return c;
}
