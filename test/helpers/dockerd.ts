// A private dockerd (Debian docker.io 20.10) per test file: its own data-root, exec-root
// (where dockerd keeps its managed containerd's socket, state and config), API socket
// and pid file, all in a fresh temp dir, so several test processes can each run one at
// the same time. vfs storage, no bridge, no iptables: nothing on the host changes.
//
// Images come from a local rootfs (a copy of the static /bin/busybox plus applet
// symlinks) imported through the Engine API: there is no registry here.

import { execFile, spawn } from 'node:child_process';
import { closeSync, openSync } from 'node:fs';
import { chmod, mkdir, mkdtemp, readFile, readdir, rm, symlink, copyFile, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';

import { DockerClient, query } from '../../src/drivers/docker.js';
import { trackChild, untrackChild } from './reaper.js';

export const DOCKERD_BIN = '/usr/sbin/dockerd';
export const BUSYBOX_BIN = '/bin/busybox';
export const TEST_IMAGE = 'polydev-test/busybox:1';
/** Label tests put on containers they create directly (removed by stop()). */
export const TEST_LABEL = 'polydev.test/created-by';

/** Applets linked into the test image's /bin. */
export const BUSYBOX_APPLETS = [
  'sh', 'sleep', 'cat', 'head', 'mkdir', 'dirname', 'rm', 'ls', 'tar', 'true', 'false', 'env', 'id', 'echo',
  'stat', 'chmod', 'kill', 'wc', 'test', 'touch', 'printf', 'mount', 'grep', 'find', 'httpd',
];

/** A hang guard: dockerd (and its containerd) usually answer within a second or two, but a loaded 2-core machine has needed many times that. */
const STARTUP_TIMEOUT_MS = 60_000;
const STOP_GRACE_MS = 15_000;
/** sun_path is 108 bytes including the NUL; the longest path below DIR is containerd's ttrpc socket. */
const LONGEST_SUFFIX = '/exec/containerd/containerd.sock.ttrpc';

export interface Dockerd {
  socketPath: string;
  pid: number;
  dir: string;
  /** A busybox image tag present in this dockerd (TEST_IMAGE). */
  image: string;
  /** Milliseconds from spawn until /_ping answered, and for the image import. */
  timings: { startMs: number; imageMs: number };
  client: DockerClient;
  request(method: string, path: string, body?: unknown): Promise<{ status: number; json: unknown }>;
  /** Force-removes every container (running or not) carrying `label` (`key` or `key=value`); returns how many. */
  removeByLabel(label: string): Promise<number>;
  /** Last lines of dockerd's log (for assertion messages). */
  logTail(lines?: number): Promise<string>;
  /**
   * An engine outage: stops dockerd (SIGTERM; it stops its containers and removes its socket) and
   * waits for it to exit, keeping its data. The containers stay, exited.
   */
  stopEngine(): Promise<void>;
  /** Ends the outage: starts dockerd again on the same socket and data; resolves once /_ping answers. */
  startEngine(): Promise<void>;
  /** Removes all containers, stops dockerd (SIGTERM, then SIGKILL after 15 s), unmounts and deletes DIR. Safe to call twice. */
  stop(): Promise<void>;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Resolves true when `p` settles within `ms`, else false; never keeps the process alive afterwards. */
function within(p: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<boolean>((r) => {
    timer = setTimeout(() => r(false), ms);
  });
  return Promise.race([p.then(() => true), t]).finally(() => clearTimeout(timer));
}

function run(file: string, args: string[], timeoutMs = 30_000): Promise<{ stdout: Buffer; stderr: string }> {
  return new Promise((resolve, reject) => {
    execFile(file, args, { timeout: timeoutMs, killSignal: 'SIGKILL', maxBuffer: 256 * 1024 * 1024, encoding: 'buffer' }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${[file, ...args].join(' ')} failed: ${err.message} ${stderr.toString('utf8').trim()}`));
      else resolve({ stdout, stderr: stderr.toString('utf8') });
    });
  });
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

async function tail(file: string, lines = 30): Promise<string> {
  try {
    const text = await readFile(file, 'utf8');
    return text.trimEnd().split('\n').slice(-lines).join('\n');
  } catch {
    return '(no log)';
  }
}

/** Unescapes a /proc/self/mountinfo path field (\040 etc.). */
function unescapeMount(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_m, o: string) => String.fromCharCode(parseInt(o, 8)));
}

async function mountsUnder(dir: string): Promise<string[]> {
  const info = await readFile('/proc/self/mountinfo', 'utf8');
  const out: string[] = [];
  for (const line of info.split('\n')) {
    const f = line.split(' ');
    if (f.length < 5) continue;
    const mp = unescapeMount(f[4] ?? '');
    if (mp === dir || mp.startsWith(dir + '/')) out.push(mp);
  }
  // Deepest first.
  return out.sort((a, b) => b.length - a.length);
}

/** PIDs whose command line mentions `needle` (dockerd's managed containerd and its shims). */
async function pidsMentioning(needle: string): Promise<number[]> {
  const out: number[] = [];
  for (const e of await readdir('/proc')) {
    if (!/^\d+$/.test(e) || Number(e) === process.pid) continue;
    try {
      const cmd = await readFile(`/proc/${e}/cmdline`, 'utf8');
      if (cmd.includes(needle)) out.push(Number(e));
    } catch {
      /* exited meanwhile */
    }
  }
  return out;
}

function shortTmpBase(): string {
  const t = os.tmpdir();
  // mkdtemp adds 6 chars; keep room for the longest socket path below DIR.
  return t.length + 20 + LONGEST_SUFFIX.length < 104 ? t : '/tmp';
}

function splitRepoTag(repoTag: string): { repo: string; tag: string } {
  const slash = repoTag.lastIndexOf('/');
  const colon = repoTag.lastIndexOf(':');
  if (colon > slash) return { repo: repoTag.slice(0, colon), tag: repoTag.slice(colon + 1) };
  return { repo: repoTag, tag: 'latest' };
}

export interface ImportOptions {
  /** Image CMD, default ["/bin/sh"]. */
  cmd?: string[];
  /** Extra Dockerfile-style changes for the import (ENV, WORKDIR, LABEL, ENTRYPOINT…). */
  changes?: string[];
  applets?: string[];
  timeoutMs?: number;
}

/**
 * Builds a busybox image without any registry: a rootfs with a copy of the static
 * /bin/busybox and applet symlinks, tarred by `tar` and imported with
 * POST /images/create?fromSrc=-. Returns the image id.
 */
export async function importBusyboxImage(socketPath: string, repoTag: string, opts: ImportOptions = {}): Promise<string> {
  const root = await mkdtemp(path.join(shortTmpBase(), 'pd-rootfs-'));
  try {
    for (const d of ['bin', 'tmp', 'etc', 'run', 'workspace']) await mkdir(path.join(root, d), { recursive: true });
    await chmod(path.join(root, 'tmp'), 0o1777);
    await copyFile(BUSYBOX_BIN, path.join(root, 'bin', 'busybox'));
    await chmod(path.join(root, 'bin', 'busybox'), 0o755);
    for (const a of opts.applets ?? BUSYBOX_APPLETS) await symlink('busybox', path.join(root, 'bin', a));
    await writeFile(path.join(root, 'etc', 'passwd'), 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n');
    await writeFile(path.join(root, 'etc', 'group'), 'root:x:0:\nnogroup:x:65534:\n');
    const { stdout: tarball } = await run('tar', ['--numeric-owner', '--owner=0', '--group=0', '-C', root, '-cf', '-', '.']);
    const { repo, tag } = splitRepoTag(repoTag);
    const changes = [`CMD ${JSON.stringify(opts.cmd ?? ['/bin/sh'])}`, 'ENV PATH=/bin', ...(opts.changes ?? [])];
    const qs = query({ fromSrc: '-', repo, tag }) + changes.map((c) => `&changes=${encodeURIComponent(c)}`).join('');
    const client = new DockerClient({ socketPath, requestTimeoutMs: opts.timeoutMs ?? 60_000 });
    try {
      const res = await client.request('POST', `/images/create${qs}`, { body: tarball, contentType: 'application/x-tar' });
      // The answer is a stream of JSON progress lines; errors can arrive with status 200.
      const lines = res.text.split('\n').filter((l) => l.trim());
      let id = '';
      for (const l of lines) {
        let v: unknown;
        try {
          v = JSON.parse(l);
        } catch {
          continue;
        }
        if (typeof v === 'object' && v !== null) {
          const o = v as Record<string, unknown>;
          if (o['error'] || o['errorDetail']) throw new Error(`importing ${repoTag} into unix://${socketPath} failed: ${String(o['error'] ?? JSON.stringify(o['errorDetail']))}`);
          if (typeof o['status'] === 'string' && o['status'].startsWith('sha256:')) id = o['status'];
        }
      }
      if (res.status !== 200) throw new Error(`importing ${repoTag} into unix://${socketPath} failed: ${res.status} ${res.text.slice(0, 300)}`);
      if (!id) {
        const insp = await client.call('GET', `/images/${encodeURIComponent(repoTag)}/json`);
        const j = insp.json as Record<string, unknown> | undefined;
        id = typeof j?.['Id'] === 'string' ? j['Id'] : '';
      }
      return id;
    } finally {
      client.close();
    }
  } finally {
    await rm(root, { recursive: true, force: true });
  }
}

export async function startDockerd(opts: { name?: string } = {}): Promise<Dockerd> {
  const t0 = performance.now();
  const tag = (opts.name ?? 'dk').replace(/[^A-Za-z0-9]/g, '').slice(0, 8) || 'dk';
  const dir = await mkdtemp(path.join(shortTmpBase(), `pd-${tag}-`));
  const socketPath = path.join(dir, 'docker.sock');
  const logFile = path.join(dir, 'dockerd.log');
  await mkdir(path.join(dir, 'data'));
  await mkdir(path.join(dir, 'exec'));
  // Our own (empty) config file: /etc/docker/daemon.json must not leak in.
  await writeFile(path.join(dir, 'daemon.json'), '{}\n');
  const args = [
    '--config-file', path.join(dir, 'daemon.json'),
    '--data-root', path.join(dir, 'data'),
    '--exec-root', path.join(dir, 'exec'),
    '--host', `unix://${socketPath}`,
    '--pidfile', path.join(dir, 'dockerd.pid'),
    '--storage-driver=vfs',
    '--iptables=false',
    '--ip-masq=false',
    // Leave the host's sysctls alone (dockerd would turn on net.ipv4.ip_forward).
    '--ip-forward=false',
    '--bridge=none',
    '--userland-proxy=false',
    '--log-level=info',
  ];
  // The running dockerd: replaced by startEngine() after stopEngine().
  let child!: ReturnType<typeof spawn>;
  let exited: string | undefined;
  let exitPromise!: Promise<void>;
  let pid = -1;
  const spawnDockerd = (): void => {
    const logFd = openSync(logFile, 'a');
    const c = spawn(DOCKERD_BIN, args, { stdio: ['ignore', logFd, logFd], env: { ...process.env, PATH: process.env['PATH'] ?? '/usr/sbin:/usr/bin:/sbin:/bin' } });
    closeSync(logFd);
    trackChild(c);
    child = c;
    exited = undefined;
    exitPromise = new Promise<void>((resolve) => {
      c.once('exit', (code, signal) => {
        exited = `exited with ${code ?? signal}`;
        resolve();
      });
      c.once('error', (err) => {
        exited = `failed to spawn: ${err.message}`;
        resolve();
      });
    });
    pid = c.pid ?? -1;
  };
  spawnDockerd();
  const client = new DockerClient({ socketPath, requestTimeoutMs: 30_000 });

  /** SIGTERM, then SIGKILL after STOP_GRACE_MS. */
  const terminate = async (): Promise<void> => {
    if (exited !== undefined || pid <= 0) return;
    try {
      process.kill(pid, 'SIGTERM');
    } catch {
      /* gone */
    }
    if (!(await within(exitPromise, STOP_GRACE_MS))) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        /* gone */
      }
      await within(exitPromise, 5000);
    }
    untrackChild(child);
  };

  const waitForPing = async (): Promise<void> => {
    const deadline = Date.now() + STARTUP_TIMEOUT_MS;
    for (;;) {
      if (exited !== undefined) throw new Error(`dockerd ${exited} before answering /_ping; log tail:\n${await tail(logFile)}`);
      const ok = await client
        .request('GET', '/_ping', { timeoutMs: 1000 })
        .then((r) => r.status === 200)
        .catch(() => false);
      if (ok) return;
      if (Date.now() > deadline) throw new Error(`dockerd at unix://${socketPath} did not answer /_ping within ${STARTUP_TIMEOUT_MS} ms; log tail:\n${await tail(logFile)}`);
      await sleep(50);
    }
  };

  let stopping: Promise<void> | undefined;
  const stop = (): Promise<void> => {
    stopping ??= (async () => {
      // 1. Containers first: dockerd would otherwise stop each with a grace period on shutdown.
      if (exited === undefined) {
        try {
          await removeAll();
        } catch {
          /* dockerd may be wedged; the kill below deals with it */
        }
      }
      client.close();
      // 2. dockerd, by PID.
      await terminate();
      untrackChild(child);
      // 3. Its managed containerd and shims (they carry DIR in their command line).
      for (let i = 0; i < 50; i++) {
        const left = await pidsMentioning(dir + "/");
        if (!left.length) break;
        if (i === 10 || i === 30) for (const p of left) if (alive(p)) try { process.kill(p, 'SIGKILL'); } catch { /* gone */ }
        await sleep(100);
      }
      // 4. Mounts (netns bind mounts, container shm) and the directory.
      for (const mp of await mountsUnder(dir)) {
        await run('umount', ['-l', mp]).catch(() => undefined);
      }
      for (let i = 0; i < 5; i++) {
        try {
          await rm(dir, { recursive: true, force: true });
          break;
        } catch {
          await sleep(200);
        }
      }
    })();
    return stopping;
  };

  const listIds = async (filter?: string): Promise<string[]> => {
    const qs = query({ all: 1, ...(filter ? { filters: { label: [filter] } } : {}) });
    const res = await client.call('GET', `/containers/json${qs}`);
    return Array.isArray(res.json)
      ? res.json.map((c: unknown) => (typeof c === 'object' && c !== null ? (c as Record<string, unknown>)['Id'] : undefined)).filter((x): x is string => typeof x === 'string')
      : [];
  };
  const removeIds = async (ids: string[]): Promise<number> => {
    let n = 0;
    await Promise.all(
      ids.map(async (id) => {
        const r = await client.request('DELETE', `/containers/${id}?force=1&v=1`);
        if (r.status === 204 || r.status === 404) n++;
      }),
    );
    return n;
  };
  const removeAll = async (): Promise<number> => removeIds(await listIds());

  try {
    // Wait for the API.
    await waitForPing();
    const startMs = performance.now() - t0;
    const t1 = performance.now();
    await importBusyboxImage(socketPath, TEST_IMAGE);
    const imageMs = performance.now() - t1;

    return {
      socketPath,
      get pid() {
        return pid;
      },
      dir,
      image: TEST_IMAGE,
      timings: { startMs: Math.round(startMs), imageMs: Math.round(imageMs) },
      client,
      async request(method, p, body) {
        const r = await client.request(method, p, body === undefined ? {} : { json: body });
        return { status: r.status, json: r.json };
      },
      async removeByLabel(label) {
        return removeIds(await listIds(label));
      },
      logTail: (lines) => tail(logFile, lines),
      async stopEngine() {
        await terminate();
        if (exited === undefined) throw new Error(`dockerd (pid ${pid}) did not exit; log tail:\n${await tail(logFile)}`);
      },
      async startEngine() {
        if (exited === undefined) throw new Error('dockerd is still running');
        spawnDockerd();
        await waitForPing();
      },
      stop,
    };
  } catch (err) {
    await stop();
    throw err;
  }
}
