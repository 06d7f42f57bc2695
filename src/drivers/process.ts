// The `process` engine: a WarmPool's containers as local child processes, for development.
//
// Each container is one process started with spawn(command[0], [...command.slice(1), ...args])
// in its own session and process group (detached), stdout/stderr appended to
// <logDir>/<owner>.<slot>.log. There is no isolation at all: the processes run as the daemon's
// user, see the whole file system and network, and share the host's PID namespace.
// `image` is ignored. Resources (cpuMHz, memoryMB, memoryMaxMB) are NOT enforced; a spec that
// asks for devices fails with StartFailed (use the docker or nomad engine).
//
// Ownership lives in the process's own environment, so a daemon restarted after kill -9 adopts
// what its predecessor started (the processes are unref()ed and outlive the daemon on purpose):
//   POLYDEV_OWNER=<owner>          quick filter; list(owner) matches it exactly
//   POLYDEV_LABELS=<JSON labels>   every ownership label, lossless
//   POLYDEV_NAME=<spec.name>
//   POLYDEV_INSTANCE=<random uuid> one per start: marks the leader and every descendant, even one
//                                  that left the process group (setsid), so remove() finds them all
//   POLYDEV_RUN_DIR=<runDir>/<owner>/<slot>  (mode 0700): this engine's SECRETS_DIR. inject()
//                                  writes `env` (KEY=value lines) and `files/…` there, mode 0600.
//   HOME=<run dir>/home            unless spec.env sets HOME
// The run dir also holds spec.json (the spec as started, never any injected content; recycle()
// starts from it) and container.json ({id, instance}, written once the process runs).
//
// Container id: `pid:<pid>:<starttime>` (starttime = field 22 of /proc/PID/stat). Every
// operation re-reads the starttime and treats a mismatch as "gone" (PID reuse). list() reports
// one container per start (the process-group leader), never the children it spawned. A leader
// whose descendants outlive it is reported `exited` until remove(); a zombie leader is `exited`.
// Exit codes are known only for processes this instance spawned (they are its children).
//
// Limits: a descendant that clears its environment (env -i) AND leaves the process group is
// invisible to this engine. Logs are kept after remove() (development aid); nothing rotates them.

import { spawn, type ChildProcess } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { constants as fsConstants, readFileSync } from 'node:fs';
import { chmod, lstat, mkdir, open, readFile, readdir, rename, rm, unlink } from 'node:fs/promises';
import { constants as osConstants, tmpdir, uptime } from 'node:os';
import { isAbsolute, join, resolve, sep } from 'node:path';

import {
  EngineError,
  LABELS,
  MANAGED_BY,
  type ContainerSpec,
  type ContainerState,
  type Engine,
  type EngineEvent,
  type Injection,
  type ObservedContainer,
} from '../controllers/warmpool/engine.js';

export interface ProcessEngineOptions {
  /** Per-container run dirs (SECRETS_DIR equivalent). Default /dev/shm/polydev-process (tmpfs). */
  runDir?: string;
  /** Where each process's stdout/stderr go. Default os.tmpdir()/polydev-process-logs. */
  logDir?: string;
  /** Liveness poll of watch(), ms. Default 1000. */
  pollMs?: number;
}

export const ENV_OWNER = 'POLYDEV_OWNER';
export const ENV_LABELS = 'POLYDEV_LABELS';
export const ENV_NAME = 'POLYDEV_NAME';
export const ENV_INSTANCE = 'POLYDEV_INSTANCE';
export const ENV_RUN_DIR = 'POLYDEV_RUN_DIR';

/** Linux USER_HZ: the unit of /proc/PID/stat times (100 on every mainstream architecture). */
const CLK_TCK = 100;
const SETTLE_MS = 50;
const TERM_GRACE_MS = 2000;
const KILL_WAIT_MS = 1000;
const STOP_POLL_MS = 50;
const SCAN_CONCURRENCY = 16;
const MAX_EXITED = 1000;
const SAFE_COMPONENT = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
const ENV_KEY = /^[A-Za-z_][A-Za-z0-9_]*$/;
const OWNER_PREFIX = Buffer.from(`${ENV_OWNER}=`);

// ---- /proc ------------------------------------------------------------------

export interface ProcStat {
  pid: number;
  state: string;
  ppid: number;
  pgrp: number;
  session: number;
  /** Clock ticks after boot. */
  starttime: number;
}

/** Parses /proc/PID/stat; the comm field may hold spaces and parentheses, so fields are split after the LAST ')'. */
export function parseStat(text: string): ProcStat | null {
  const open = text.indexOf('(');
  const close = text.lastIndexOf(')');
  if (open < 0 || close < open) return null;
  const pid = Number(text.slice(0, open).trim());
  const f = text
    .slice(close + 1)
    .trim()
    .split(/\s+/);
  // f[0] is field 3 (state), so field N is f[N - 3].
  if (f.length < 20 || !Number.isInteger(pid)) return null;
  const num = (i: number) => Number(f[i]);
  const st: ProcStat = { pid, state: f[0]!, ppid: num(1), pgrp: num(2), session: num(3), starttime: num(19) };
  return [st.ppid, st.pgrp, st.session, st.starttime].every(Number.isInteger) ? st : null;
}

export function parseId(id: string): { pid: number; starttime: number } | null {
  const m = /^pid:([1-9][0-9]{0,9}):([0-9]{1,20})$/.exec(id);
  return m ? { pid: Number(m[1]), starttime: Number(m[2]) } : null;
}

export function formatId(pid: number, starttime: number): string {
  return `pid:${pid}:${starttime}`;
}

function errCode(err: unknown): string | undefined {
  return typeof err === 'object' && err !== null && 'code' in err ? String((err as { code: unknown }).code) : undefined;
}

/** A process that vanished or that we may not read: not an error while scanning. */
function isGoneError(err: unknown): boolean {
  const c = errCode(err);
  return c === 'ENOENT' || c === 'ESRCH' || c === 'EACCES' || c === 'EPERM' || c === 'EINVAL' || c === 'ENOTDIR';
}

async function readStat(pid: number): Promise<ProcStat | null> {
  try {
    return parseStat(await readFile(`/proc/${pid}/stat`, 'latin1'));
  } catch (err) {
    if (isGoneError(err)) return null;
    throw err;
  }
}

/** NUL-separated environ → map; null when the process is gone, a zombie or unreadable. */
async function readEnviron(pid: number): Promise<Buffer | null> {
  try {
    return await readFile(`/proc/${pid}/environ`);
  } catch (err) {
    if (isGoneError(err)) return null;
    throw err;
  }
}

function parseEnviron(buf: Buffer): Map<string, string> {
  const env = new Map<string, string>();
  for (const entry of buf.toString('utf8').split('\0')) {
    const eq = entry.indexOf('=');
    if (eq > 0 && !env.has(entry.slice(0, eq))) env.set(entry.slice(0, eq), entry.slice(eq + 1));
  }
  return env;
}

/** Does the environ block contain a variable starting with `prefix` (at the start of an entry)? */
function environHas(buf: Buffer, prefix: Buffer): boolean {
  let i = buf.indexOf(prefix);
  while (i >= 0) {
    if (i === 0 || buf[i - 1] === 0) return true;
    i = buf.indexOf(prefix, i + 1);
  }
  return false;
}

async function listPids(): Promise<number[]> {
  let names: string[];
  try {
    names = await readdir('/proc');
  } catch (err) {
    throw new EngineError('EngineUnavailable', `/proc is not readable: ${errCode(err) ?? String(err)}`);
  }
  const pids: number[] = [];
  for (const n of names) if (/^[0-9]+$/.test(n)) pids.push(Number(n));
  return pids;
}

async function mapLimit<T, R>(items: T[], limit: number, fn: (item: T) => Promise<R>): Promise<R[]> {
  const out = new Array<R>(items.length);
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const i = next++;
      out[i] = await fn(items[i]!);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return out;
}

interface OwnedProc {
  stat: ProcStat;
  env: Map<string, string>;
}

/** Every live process carrying POLYDEV_OWNER (any owner, or exactly `owner`). Vanishing processes are skipped. */
async function scanOwned(filter: (env: Map<string, string>) => boolean): Promise<OwnedProc[]> {
  const pids = await listPids();
  const found = await mapLimit(pids, SCAN_CONCURRENCY, async (pid): Promise<OwnedProc | null> => {
    if (pid === process.pid) return null;
    const buf = await readEnviron(pid);
    if (!buf || !environHas(buf, OWNER_PREFIX)) return null;
    const env = parseEnviron(buf);
    if (!filter(env)) return null;
    const stat = await readStat(pid);
    if (!stat || stat.state === 'Z') return null;
    return { stat, env };
  });
  return found.filter((p): p is OwnedProc => p !== null);
}

/** Processes of group `pgid` that are not zombies. */
async function liveGroupMembers(pgid: number): Promise<number> {
  try {
    process.kill(-pgid, 0);
  } catch (err) {
    if (errCode(err) === 'ESRCH') return 0;
  }
  const stats = await mapLimit(await listPids(), SCAN_CONCURRENCY, readStat);
  return stats.filter((s) => s && s.pgrp === pgid && s.state !== 'Z').length;
}

function signalNumber(signal: NodeJS.Signals | null): number | undefined {
  if (!signal) return undefined;
  const n = (osConstants.signals as Record<string, number | undefined>)[signal];
  return n === undefined ? undefined : 128 + n;
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

// ---- files ------------------------------------------------------------------

/**
 * mkdir -p, then insists on a real directory (no symlink) owned by us with exactly `mode`.
 * A configured top-level dir (`top`) is never chmod()ed (it may be shared by mistake, e.g. /tmp):
 * it is refused when others may write to it.
 */
async function ensureDir(path: string, mode: number, top = false): Promise<void> {
  await mkdir(path, { recursive: true, mode });
  const st = await lstat(path);
  const err = (why: string) => new Error(`${path} ${why}`);
  if (!st.isDirectory()) throw err('is not a directory');
  const uid = process.geteuid?.();
  if (uid !== undefined && st.uid !== uid) throw err(`is owned by uid ${st.uid}, not ${uid}`);
  if (top) {
    if ((st.mode & 0o022) !== 0) throw err('is writable by group or others');
  } else if ((st.mode & 0o7777) !== mode) {
    await chmod(path, mode);
  }
}

/** Writes via a fresh temp file (O_EXCL|O_NOFOLLOW, exactly `mode`) renamed into place. */
async function writeFileAtomic(path: string, data: string, mode = 0o600): Promise<void> {
  const tmp = `${path}.tmp-${randomUUID()}`;
  const flags = fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_EXCL | fsConstants.O_NOFOLLOW;
  const fh = await open(tmp, flags, mode);
  try {
    await fh.chmod(mode);
    await fh.writeFile(data);
  } catch (err) {
    await fh.close().catch(() => undefined);
    await unlink(tmp).catch(() => undefined);
    throw err;
  }
  await fh.close();
  try {
    await rename(tmp, path);
  } catch (err) {
    await unlink(tmp).catch(() => undefined);
    throw err;
  }
}

async function readJson(path: string): Promise<unknown> {
  try {
    return JSON.parse(await readFile(path, 'utf8')) as unknown;
  } catch (err) {
    if (errCode(err) === 'ENOENT' || errCode(err) === 'ENOTDIR' || err instanceof SyntaxError) return undefined;
    throw err;
  }
}

/** Validates a relative injection path; returns its segments. Messages name the path, never content. */
function injectionPathSegments(rel: string): string[] {
  if (rel === '') throw new EngineError('EngineError', 'inject: empty file path');
  if (rel.includes('\0')) throw new EngineError('EngineError', 'inject: file path contains a NUL byte');
  if (isAbsolute(rel) || rel.startsWith('/')) throw new EngineError('EngineError', `inject: file path ${rel} is absolute`);
  const segs = rel.split('/');
  for (const s of segs) {
    if (s === '..') throw new EngineError('EngineError', `inject: file path ${rel} has a '..' segment`);
    if (s === '' || s === '.') throw new EngineError('EngineError', `inject: file path ${rel} has an empty or '.' segment`);
  }
  return segs;
}

// ---- the engine ---------------------------------------------------------------

interface ContainerRecord {
  id: string;
  instance: string;
}

interface Known {
  id: string;
  pid: number;
  starttime: number;
  owner: string;
  instance: string;
  labels: Record<string, string>;
  name: string;
  runDir: string;
  exitCode?: number;
  /** A start that failed: its exit is not a container's. */
  discard?: boolean;
}

interface Seen {
  state: 'running' | 'exited';
  pool: string;
}

interface Watcher {
  owner: string;
  onEvent: (e: EngineEvent) => void;
  onError?: (err: Error) => void;
  /** id → last state seen (from list, start() or a child's exit). */
  known: Map<string, Seen>;
  /** False until the first list, the baseline, which emits nothing new. */
  baselined: boolean;
  /** ids a `die` was emitted for → poll number, so a late poll does not repeat it. */
  died: Map<string, number>;
  polls: number;
  timer: NodeJS.Timeout | null;
  stopped: boolean;
}

export class ProcessEngine implements Engine {
  readonly name = 'process' as const;
  readonly runDir: string;
  readonly logDir: string;
  readonly pollMs: number;

  /** Live children of this instance, by pid. */
  private readonly children = new Map<number, Known>();
  /** Children of this instance that exited (with exit code), by id, until remove(); oldest evicted first. */
  private readonly exited = new Map<string, Known>();
  private readonly watchers = new Set<Watcher>();
  private readonly starting = new Map<string, Promise<ObservedContainer>>();
  private bootTimeMs: number | null = null;

  constructor(opts: ProcessEngineOptions = {}) {
    this.runDir = resolve(opts.runDir ?? '/dev/shm/polydev-process');
    this.logDir = resolve(opts.logDir ?? join(tmpdir(), 'polydev-process-logs'));
    this.pollMs = Math.max(10, opts.pollMs ?? 1000);
  }

  async ping(): Promise<void> {
    try {
      await readFile('/proc/self/stat', 'latin1');
      await readdir('/proc');
    } catch (err) {
      throw new EngineError('EngineUnavailable', `/proc is not readable: ${errCode(err) ?? String(err)}`);
    }
  }

  // ---- list ----

  async list(owner: string): Promise<ObservedContainer[]> {
    const procs = await scanOwned((env) => env.get(ENV_OWNER) === owner);
    const byInstance = new Map<string, OwnedProc[]>();
    for (const p of procs) {
      const inst = p.env.get(ENV_INSTANCE) ?? `pgrp:${p.stat.pgrp}`;
      let g = byInstance.get(inst);
      if (!g) byInstance.set(inst, (g = []));
      g.push(p);
    }
    const out = new Map<string, ObservedContainer>();
    for (const [instance, group] of byInstance) {
      const c = await this.observeGroup(instance, group);
      if (c) out.set(c.id, c);
    }
    // This instance's children the scan cannot attribute: zombies (their environ is gone) and
    // processes that replaced their environment.
    for (const k of this.children.values()) {
      if (k.owner !== owner || out.has(k.id)) continue;
      const st = await readStat(k.pid);
      if (!st || st.starttime !== k.starttime) continue;
      out.set(k.id, this.observed(k.id, k.pid, k.starttime, k.labels, k.name, st.state === 'Z' ? 'exited' : 'running'));
    }
    for (const k of [...this.exited.values()]) {
      if (k.owner !== owner) continue;
      const seen = out.get(k.id);
      if (seen) {
        seen.exitCode = k.exitCode;
      } else if ((await this.readRecord(k.runDir))?.id === k.id) {
        out.set(k.id, this.observed(k.id, k.pid, k.starttime, k.labels, k.name, 'exited', k.exitCode));
      } else {
        // Removed (maybe by another instance) or its slot started anew: gone.
        this.exited.delete(k.id);
      }
    }
    return [...out.values()];
  }

  /** One container from the processes of one start: the leader recorded in container.json, else the oldest group leader. */
  private async observeGroup(instance: string, group: OwnedProc[]): Promise<ObservedContainer | null> {
    const env = group[0]!.env;
    const labels = parseLabels(env.get(ENV_LABELS));
    if (!labels) return null;
    const name = env.get(ENV_NAME) ?? '';
    const rec = await this.readRecord(env.get(ENV_RUN_DIR));
    const ref = rec && rec.instance === instance ? parseId(rec.id) : null;
    if (ref) {
      const leader = group.find((p) => p.stat.pid === ref.pid && p.stat.starttime === ref.starttime);
      const exitCode = this.exited.get(rec!.id)?.exitCode;
      return this.observed(rec!.id, ref.pid, ref.starttime, labels, name, leader ? 'running' : 'exited', exitCode);
    }
    const leaders = group
      .filter((p) => p.stat.pid === p.stat.pgrp)
      .sort((a, b) => a.stat.starttime - b.stat.starttime || a.stat.pid - b.stat.pid);
    const leader = leaders[0];
    if (!leader) return null; // descendants of an unrecorded leader: nothing to name them by
    return this.observed(formatId(leader.stat.pid, leader.stat.starttime), leader.stat.pid, leader.stat.starttime, labels, name, 'running');
  }

  private observed(
    id: string,
    pid: number,
    starttime: number,
    labels: Record<string, string>,
    name: string,
    state: ContainerState,
    exitCode?: number,
  ): ObservedContainer {
    const c: ObservedContainer = {
      id,
      name,
      pool: labels[LABELS.pool] ?? '',
      slot: labels[LABELS.slot] ?? '',
      specHash: labels[LABELS.specHash] ?? '',
      state,
      createdAt: this.createdAt(starttime),
      address: `process:${pid}`,
    };
    if (labels[LABELS.claim] !== undefined) c.claim = labels[LABELS.claim];
    if (exitCode !== undefined) c.exitCode = exitCode;
    return c;
  }

  private createdAt(starttime: number): number {
    if (this.bootTimeMs === null) this.bootTimeMs = readBootTimeMs();
    return Math.round(this.bootTimeMs + (starttime * 1000) / CLK_TCK);
  }

  private async readRecord(runDir: string | undefined): Promise<ContainerRecord | null> {
    if (!runDir || !isAbsolute(runDir)) return null;
    const rec = await readJson(join(runDir, 'container.json'));
    if (typeof rec !== 'object' || rec === null) return null;
    const { id, instance } = rec as Record<string, unknown>;
    return typeof id === 'string' && typeof instance === 'string' ? { id, instance } : null;
  }

  // ---- start ----

  async start(spec: ContainerSpec): Promise<ObservedContainer> {
    const owner = spec.labels[LABELS.owner];
    const key = `${owner}\0${spec.slot}`;
    const inflight = this.starting.get(key);
    if (inflight) return inflight;
    const p = this.startOnce(spec).finally(() => this.starting.delete(key));
    this.starting.set(key, p);
    return p;
  }

  private async startOnce(spec: ContainerSpec): Promise<ObservedContainer> {
    const command = spec.command ?? [];
    const cmd0 = command[0];
    if (!cmd0) throw new EngineError('StartFailed', 'the process engine needs a command');
    if ((spec.resources?.devices ?? []).some((d) => d.count > 0)) {
      throw new EngineError('StartFailed', 'devices need the docker or nomad engine');
    }
    const owner = spec.labels[LABELS.owner];
    if (!owner) throw new EngineError('StartFailed', `spec has no ${LABELS.owner} label`);
    if (!SAFE_COMPONENT.test(owner)) throw new EngineError('StartFailed', `owner ${JSON.stringify(owner)} is not usable as a directory name`);
    if (!SAFE_COMPONENT.test(spec.slot)) throw new EngineError('StartFailed', `slot ${JSON.stringify(spec.slot)} is not usable as a directory name`);
    for (const [k, v] of Object.entries(spec.env ?? {})) {
      if (k === '' || k.includes('=') || k.includes('\0')) throw new EngineError('StartFailed', `env: invalid variable name ${JSON.stringify(k)}`);
      if (typeof v !== 'string' || v.includes('\0')) throw new EngineError('StartFailed', `env: ${k} is not a string without NUL bytes`);
    }
    const labels: Record<string, string> = {
      [LABELS.managedBy]: MANAGED_BY,
      [LABELS.pool]: spec.pool,
      [LABELS.provider]: spec.provider,
      [LABELS.specHash]: spec.specHash,
      ...spec.labels,
      [LABELS.owner]: owner,
      [LABELS.slot]: spec.slot,
    };

    // Idempotent by slot: a live process of this owner already carries it.
    const existing = (await this.list(owner)).find((c) => c.slot === spec.slot && c.state === 'running');
    if (existing) return existing;

    const runDir = join(this.runDir, owner, spec.slot);
    const home = join(runDir, 'home');
    // A previous start of this slot that no longer runs (exited, maybe with descendants still
    // alive) is superseded: take its leftovers down before its run dir is wiped.
    const previous = await this.readRecord(runDir);
    if (previous) await this.remove(previous.id).catch(() => undefined);
    let logFh: Awaited<ReturnType<typeof open>> | undefined;
    try {
      await ensureDir(this.runDir, 0o700, true);
      await ensureDir(join(this.runDir, owner), 0o700);
      // Whatever a previous process of this slot left (secrets included) is not the new one's.
      await rm(runDir, { recursive: true, force: true });
      await ensureDir(runDir, 0o700);
      await ensureDir(home, 0o700);
      await writeFileAtomic(join(runDir, 'spec.json'), JSON.stringify({ ...spec, labels }));
      await ensureDir(this.logDir, 0o700, true);
      const logFlags = fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_APPEND | fsConstants.O_NOFOLLOW;
      logFh = await open(join(this.logDir, `${owner}.${spec.slot}.log`), logFlags, 0o600);
    } catch (err) {
      await logFh?.close().catch(() => undefined);
      throw new EngineError('StartFailed', `${cmd0}: preparing ${runDir}: ${errCode(err) ?? (err as Error).message}`);
    }

    const instance = randomUUID();
    const env: Record<string, string> = {};
    if (process.env.PATH !== undefined) env.PATH = process.env.PATH;
    env.HOME = home;
    Object.assign(env, spec.env ?? {});
    env[ENV_OWNER] = owner;
    env[ENV_LABELS] = JSON.stringify(labels);
    env[ENV_NAME] = spec.name;
    env[ENV_INSTANCE] = instance;
    env[ENV_RUN_DIR] = runDir;

    let child: ChildProcess;
    try {
      child = spawn(cmd0, [...command.slice(1), ...(spec.args ?? [])], {
        detached: true,
        stdio: ['ignore', logFh.fd, logFh.fd],
        env,
      });
    } catch (err) {
      await logFh.close().catch(() => undefined);
      await rm(runDir, { recursive: true, force: true }).catch(() => undefined);
      throw new EngineError('StartFailed', `${cmd0}: ${describeSpawnError(err)}`);
    }
    // The exit listener goes on at once: an exit must never be missed (it updates the caches).
    const ev: { exit?: { code: number | null; signal: NodeJS.Signals | null }; known?: Known } = {};
    child.once('exit', (code, signal) => {
      ev.exit = { code, signal };
      if (ev.known) this.onChildExit(ev.known, code, signal);
    });
    const spawned = await new Promise<Error | null>((res) => {
      child.once('spawn', () => res(null));
      child.once('error', (err) => res(err));
    });
    await logFh.close().catch(() => undefined);
    child.on('error', () => undefined); // later errors (kill failures) are not ours to throw
    if (spawned || child.pid === undefined) {
      await rm(runDir, { recursive: true, force: true }).catch(() => undefined);
      throw new EngineError('StartFailed', `${cmd0}: ${describeSpawnError(spawned)}`);
    }
    const pid = child.pid;
    child.unref();
    const stat = await readStat(pid);
    if (!ev.exit && stat && stat.state !== 'Z') {
      ev.known = { id: formatId(pid, stat.starttime), pid, starttime: stat.starttime, owner, instance, labels, name: spec.name, runDir };
      this.children.set(pid, ev.known);
      await sleep(SETTLE_MS);
    }
    const known = ev.known;
    const after = known && !ev.exit ? await readStat(pid) : null;
    if (!known || ev.exit || !after || after.starttime !== known.starttime || after.state === 'Z') {
      // Exited at once: take down whatever it left behind, and its run dir.
      if (known) {
        known.discard = true;
        this.exited.delete(known.id);
      }
      // Whatever it left behind carries its (fresh, unique) instance token.
      await this.terminate(pid, known?.starttime ?? 0, instance, known !== undefined && !ev.exit);
      await rm(runDir, { recursive: true, force: true }).catch(() => undefined);
      const code = ev.exit?.code ?? child.exitCode;
      const sig = ev.exit?.signal ?? child.signalCode;
      const why = code !== null ? `exited at once with code ${code}` : sig ? `killed at once by ${sig}` : 'exited at once';
      throw new EngineError('StartFailed', `${cmd0}: ${why}`);
    }
    try {
      await writeFileAtomic(join(runDir, 'container.json'), JSON.stringify({ id: known.id, instance } satisfies ContainerRecord));
    } catch {
      // Without the record, list() falls back to the oldest group leader of this start.
    }
    const c = this.observed(known.id, pid, known.starttime, labels, spec.name, 'running');
    for (const w of this.watchers) {
      if (w.owner !== owner || w.stopped || w.known.has(c.id)) continue;
      w.known.set(c.id, { state: 'running', pool: c.pool });
      emit(w, { id: c.id, pool: c.pool, type: 'start' });
    }
    return c;
  }

  private onChildExit(k: Known, code: number | null, signal: NodeJS.Signals | null): void {
    this.children.delete(k.pid);
    if (k.discard) return;
    const exitCode = code ?? signalNumber(signal);
    this.exited.set(k.id, exitCode === undefined ? { ...k } : { ...k, exitCode });
    while (this.exited.size > MAX_EXITED) this.exited.delete(this.exited.keys().next().value!);
    const pool = k.labels[LABELS.pool] ?? '';
    for (const w of this.watchers) {
      if (w.owner !== k.owner || w.stopped || w.died.has(k.id)) continue;
      w.died.set(k.id, w.polls);
      w.known.set(k.id, { state: 'exited', pool });
      emit(w, { id: k.id, pool, type: 'die' });
    }
  }

  // ---- remove ----

  async remove(id: string): Promise<void> {
    const ref = parseId(id);
    if (!ref) throw new EngineError('EngineError', `${JSON.stringify(id)} is not a process engine id`);
    const target = await this.resolve(id, ref.pid, ref.starttime);
    this.exited.delete(id);
    if (!target) return; // gone (or its pid reused): nothing of ours is left to stop
    await this.terminate(ref.pid, ref.starttime, target.instance, target.leaderPresent);
    if (target.runDir) await this.removeRunDir(target.runDir, id);
  }

  /**
   * What id refers to: its instance token and run dir. null when it is gone and nothing records
   * it. Throws when the pid/starttime match a live process that this engine did not start.
   */
  private async resolve(
    id: string,
    pid: number,
    starttime: number,
  ): Promise<{ instance: string; runDir?: string; leaderPresent: boolean; env?: Map<string, string> } | null> {
    const st = await readStat(pid);
    const k = this.children.get(pid);
    const cached = k && k.id === id ? k : this.exited.get(id);
    const recorded = async () =>
      cached ? { instance: cached.instance, runDir: cached.runDir } : await this.findRecord(id);
    if (st && st.starttime === starttime) {
      const buf = await readEnviron(pid);
      const env = buf ? parseEnviron(buf) : null;
      const inst = env?.get(ENV_INSTANCE);
      if (env && env.has(ENV_OWNER) && inst) return { instance: inst, runDir: env.get(ENV_RUN_DIR), leaderPresent: true, env };
      // A zombie (no environ), or our leader after it replaced its environment.
      const info = await recorded();
      if (info) return { ...info, leaderPresent: true };
      if (st.state === 'Z' || !buf) return null;
      throw new EngineError('EngineError', `${id} is not a process this engine started`);
    }
    // Gone, or the pid was reused (the kernel hands a pid out again only once our whole group is
    // gone). Descendants that left the group may remain: they carry the instance token.
    const info = await recorded();
    return info ? { ...info, leaderPresent: false } : null;
  }

  /** The run dir whose container.json records id (a container whose leader is gone). */
  private async findRecord(id: string): Promise<{ instance: string; runDir: string } | null> {
    let owners: string[];
    try {
      owners = await readdir(this.runDir);
    } catch {
      return null;
    }
    for (const o of owners) {
      let slots: string[];
      try {
        slots = await readdir(join(this.runDir, o));
      } catch {
        continue;
      }
      for (const s of slots) {
        const dir = join(this.runDir, o, s);
        const rec = await this.readRecord(dir);
        if (rec?.id === id) return { instance: rec.instance, runDir: dir };
      }
    }
    return null;
  }

  /**
   * SIGTERM the leader's process group (when the leader is still ours) and every process
   * carrying the instance token; up to 2 s later SIGKILL what is left. Bounded.
   */
  private async terminate(pid: number, starttime: number, instance: string, leaderPresent: boolean): Promise<void> {
    const members = async (): Promise<ProcStat[]> =>
      (await scanOwned((env) => env.get(ENV_INSTANCE) === instance)).map((p) => p.stat).filter((s) => s.starttime >= starttime);
    const groupIsOurs = async (): Promise<boolean> => {
      if (leaderPresent) {
        const st = await readStat(pid);
        if (st) return st.starttime === starttime; // zombie leader included: the group is still ours
        // Leader reaped since: the pgid stays reserved while members exist, so the group is ours.
        return true;
      }
      // Leader gone before we came: only if a member with our token still holds the pgid.
      return (await members()).some((s) => s.pgrp === pid);
    };
    const signalAll = async (sig: NodeJS.Signals): Promise<number> => {
      let n = 0;
      if (await groupIsOurs()) {
        try {
          process.kill(-pid, sig);
          n++;
        } catch {
          /* ESRCH: group gone */
        }
      }
      for (const s of await members()) {
        try {
          process.kill(s.pid, sig);
          n++;
        } catch {
          /* gone */
        }
      }
      return n;
    };
    const anyAlive = async (): Promise<boolean> => {
      if ((await members()).length > 0) return true;
      if (!(await groupIsOurs())) return false;
      return (await liveGroupMembers(pid)) > 0;
    };
    if ((await signalAll('SIGTERM')) === 0) return;
    const termDeadline = Date.now() + TERM_GRACE_MS;
    while (Date.now() < termDeadline) {
      await sleep(STOP_POLL_MS);
      if (!(await anyAlive())) return;
    }
    await signalAll('SIGKILL');
    const killDeadline = Date.now() + KILL_WAIT_MS;
    while (Date.now() < killDeadline) {
      await sleep(STOP_POLL_MS);
      if (!(await anyAlive())) return;
    }
  }

  /** Removes a run dir under this.runDir unless it now belongs to a newer start of the slot. */
  private async removeRunDir(dir: string, id: string): Promise<void> {
    if (!this.ownsPath(dir)) return;
    const rec = await this.readRecord(dir);
    if (rec && rec.id !== id) return;
    await rm(dir, { recursive: true, force: true });
  }

  private ownsPath(dir: string): boolean {
    const r = resolve(dir);
    return r.startsWith(this.runDir + sep) && r !== this.runDir;
  }

  // ---- inject ----

  async inject(id: string, injection: Injection): Promise<void> {
    const ref = parseId(id);
    if (!ref) throw new EngineError('EngineError', `${JSON.stringify(id)} is not a process engine id`);
    // Validate everything before writing anything.
    const envLines: string[] = [];
    for (const [k, v] of Object.entries(injection.env ?? {})) {
      if (!ENV_KEY.test(k)) throw new EngineError('EngineError', `inject: invalid env variable name ${JSON.stringify(k)}`);
      if (typeof v !== 'string' || /[\r\n\0]/.test(v)) {
        throw new EngineError('EngineError', `inject: the value of ${k} contains a newline or NUL byte`);
      }
      envLines.push(`${k}=${v}\n`);
    }
    const files: Array<{ rel: string; segs: string[]; content: string }> = [];
    for (const [rel, content] of Object.entries(injection.files ?? {})) {
      const segs = injectionPathSegments(rel);
      if (typeof content !== 'string') throw new EngineError('EngineError', `inject: content of ${rel} is not a string`);
      files.push({ rel, segs, content });
    }

    const st = await readStat(ref.pid);
    if (!st || st.starttime !== ref.starttime || st.state === 'Z') throw new EngineError('EngineError', `inject: container ${id} is gone`);
    const buf = await readEnviron(ref.pid);
    const env = buf ? parseEnviron(buf) : null;
    if (!env) throw new EngineError('EngineError', `inject: container ${id} is gone`);
    if (!env.has(ENV_OWNER)) throw new EngineError('EngineError', `inject: ${id} is not a process this engine started`);
    const runDir = env.get(ENV_RUN_DIR);
    if (!runDir || !this.ownsPath(runDir)) {
      throw new EngineError('EngineError', `inject: run dir of ${id} (${runDir ?? 'none'}) is not under ${this.runDir}`);
    }

    const step = async (what: string, fn: () => Promise<void>) => {
      try {
        await fn();
      } catch (err) {
        throw new EngineError('EngineError', `inject ${id}: ${what}: ${errCode(err) ?? (err as Error).message}`);
      }
    };
    await step('run dir', () => ensureDir(runDir, 0o700));
    if (injection.env) await step('env', () => writeFileAtomic(join(runDir, 'env'), envLines.join('')));
    if (files.length > 0) {
      const root = join(runDir, 'files');
      await step('files/', () => ensureDir(root, 0o700));
      for (const f of files) {
        await step(`files/${f.rel}`, async () => {
          let dir = root;
          for (const s of f.segs.slice(0, -1)) {
            dir = join(dir, s);
            await ensureDir(dir, 0o700);
          }
          await writeFileAtomic(join(dir, f.segs[f.segs.length - 1]!), f.content);
        });
      }
    }
  }

  // ---- recycle ----

  async recycle(container: ObservedContainer, workspaceDir: string): Promise<ObservedContainer> {
    if (!isAbsolute(workspaceDir) || resolve(workspaceDir) === '/') {
      throw new EngineError('EngineError', `recycle: workspace dir ${JSON.stringify(workspaceDir)} must be absolute and not /`);
    }
    const ref = parseId(container.id);
    if (!ref) throw new EngineError('EngineError', `${JSON.stringify(container.id)} is not a process engine id`);
    const target = await this.resolve(container.id, ref.pid, ref.starttime);
    const runDir = target?.runDir;
    if (!runDir || !this.ownsPath(runDir)) {
      throw new EngineError('StartFailed', `recycle: cannot find the run dir of ${container.id} under ${this.runDir}`);
    }
    const saved = await readJson(join(runDir, 'spec.json'));
    if (!isSpec(saved)) throw new EngineError('StartFailed', `recycle: ${join(runDir, 'spec.json')} is missing or invalid`);
    const spec: ContainerSpec = saved;
    const envLabels = parseLabels(target.env?.get(ENV_LABELS));
    if (envLabels) spec.labels = envLabels;
    if (spec.labels[LABELS.slot] !== undefined && spec.labels[LABELS.slot] !== container.slot) {
      throw new EngineError('StartFailed', `recycle: ${container.id} is slot ${spec.labels[LABELS.slot]}, not ${container.slot}`);
    }

    await this.remove(container.id);
    const rec = await this.readRecord(runDir);
    if (!rec || rec.id === container.id) await rm(runDir, { recursive: true, force: true });
    await wipeContents(resolve(workspaceDir));
    return this.start(spec);
  }

  // ---- watch ----

  watch(owner: string, onEvent: (e: EngineEvent) => void, onError?: (err: Error) => void): () => void {
    const w: Watcher = { owner, onEvent, onError, known: new Map(), baselined: false, died: new Map(), polls: 0, timer: null, stopped: false };
    this.watchers.add(w);
    const poll = async () => {
      w.timer = null;
      try {
        const list = await this.list(owner);
        if (w.stopped) return;
        w.polls++;
        const next = new Map<string, Seen>();
        for (const c of list) next.set(c.id, { state: c.state === 'running' ? 'running' : 'exited', pool: c.pool });
        // The first list is the baseline: what already runs or already died is not an event,
        // except for ids this watcher already announced (start() and child exits report at once).
        for (const c of list) {
          const prev = w.known.get(c.id);
          if (c.state === 'running') {
            if (prev === undefined && w.baselined) emit(w, { id: c.id, pool: c.pool, type: 'start' });
          } else if ((prev?.state === 'running' || (prev === undefined && w.baselined)) && !w.died.has(c.id)) {
            w.died.set(c.id, w.polls);
            emit(w, { id: c.id, pool: c.pool, type: 'die' });
          }
        }
        for (const [id, prev] of w.known) {
          if (next.has(id) || prev.state === 'exited' || w.died.has(id)) continue;
          w.died.set(id, w.polls);
          emit(w, { id, pool: prev.pool, type: 'die' });
        }
        w.known = next;
        w.baselined = true;
        for (const [id, at] of w.died) if (!next.has(id) && w.polls - at > 10) w.died.delete(id);
      } catch (err) {
        if (!w.stopped) {
          try {
            w.onError?.(err instanceof Error ? err : new Error(String(err)));
          } catch {
            /* the caller's problem */
          }
        }
      } finally {
        if (!w.stopped && w.timer === null) w.timer = setTimeout(() => void poll(), this.pollMs);
      }
    };
    w.timer = setTimeout(() => void poll(), 0);
    return () => this.stopWatcher(w);
  }

  private stopWatcher(w: Watcher): void {
    w.stopped = true;
    if (w.timer) clearTimeout(w.timer);
    w.timer = null;
    w.known.clear();
    w.died.clear();
    this.watchers.delete(w);
  }

  /** Stops every watcher; the processes keep running (a restarted daemon adopts them). */
  async close(): Promise<void> {
    for (const w of [...this.watchers]) this.stopWatcher(w);
  }
}

function emit(w: Watcher, e: EngineEvent): void {
  try {
    w.onEvent(e);
  } catch (err) {
    try {
      w.onError?.(err instanceof Error ? err : new Error(String(err)));
    } catch {
      /* ignore */
    }
  }
}

function parseLabels(json: string | undefined): Record<string, string> | null {
  if (json === undefined) return null;
  try {
    const v = JSON.parse(json) as unknown;
    if (typeof v !== 'object' || v === null || Array.isArray(v)) return null;
    const out: Record<string, string> = {};
    for (const [k, val] of Object.entries(v)) if (typeof val === 'string') out[k] = val;
    return out;
  } catch {
    return null;
  }
}

function isSpec(v: unknown): v is ContainerSpec {
  if (typeof v !== 'object' || v === null) return false;
  const s = v as Partial<ContainerSpec>;
  return (
    typeof s.slot === 'string' &&
    typeof s.pool === 'string' &&
    typeof s.name === 'string' &&
    Array.isArray(s.command) &&
    typeof s.labels === 'object' &&
    s.labels !== null &&
    typeof s.env === 'object' &&
    s.env !== null
  );
}

function describeSpawnError(err: unknown): string {
  const code = errCode(err);
  if (code === 'ENOENT') return 'command not found (ENOENT)';
  if (code === 'EACCES') return 'permission denied (EACCES)';
  return code ?? 'spawn failed';
}

/** Removes everything inside dir (not dir itself); symlinks are removed, never followed. */
async function wipeContents(dir: string): Promise<void> {
  let names: string[];
  try {
    names = await readdir(dir);
  } catch (err) {
    if (errCode(err) === 'ENOENT') return;
    throw new EngineError('EngineError', `recycle: cannot read workspace ${dir}: ${errCode(err) ?? 'failed'}`);
  }
  for (const n of names) await rm(join(dir, n), { recursive: true, force: true });
}

function readBootTimeMs(): number {
  // Synchronous on purpose: read once per instance, a few hundred bytes from procfs.
  let text = '';
  try {
    text = readFileSync('/proc/stat', 'latin1');
  } catch {
    /* fall back to uptime */
  }
  const m = /^btime\s+(\d+)$/m.exec(text);
  return m ? Number(m[1]) * 1000 : Date.now() - Math.round(uptime() * 1000);
}
