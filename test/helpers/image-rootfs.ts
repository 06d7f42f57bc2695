// Base images without a registry: a root filesystem assembled from the host's own files
// (executables, the shared libraries `ldd` lists for them, busybox applets, a few /etc files),
// tarred and imported into a dockerd with the real `docker import`. test/dockerfile.test.ts uses
// it to stand in for node:20-bookworm-slim: the host's node, iptables-nft (with its extensions),
// setcap, groupadd/useradd and a busybox shell are what the Dockerfile's runtime stage runs.
//
// Every command is spawned with an argument array (never a shell).

import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chmod, copyFile, mkdir, mkdtemp, readdir, realpath, rm, stat, symlink, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';

import { BUSYBOX_BIN } from './dockerd.js';

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs FILE with ARGS (no shell); resolves with the exit code and output, never rejects on a non-zero exit. */
export function runCommand(
  file: string,
  args: string[],
  opts: { timeoutMs?: number; env?: NodeJS.ProcessEnv; cwd?: string } = {},
): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    execFile(
      file,
      args,
      { timeout: opts.timeoutMs ?? 120_000, killSignal: 'SIGKILL', maxBuffer: 64 * 1024 * 1024, env: opts.env ?? process.env, cwd: opts.cwd },
      (err, stdout, stderr) => {
        if (err && typeof (err as NodeJS.ErrnoException).code === 'string') {
          reject(new Error(`${file}: ${err.message}`));
          return;
        }
        const code = err ? ((err as { code?: number }).code ?? (err.killed ? 137 : 1)) : 0;
        resolve({ code: typeof code === 'number' ? code : 1, stdout: String(stdout), stderr: String(stderr) });
      },
    );
  });
}

/** The `docker` CLI to use: Debian's (what CI installs with docker.io) when present, else the one on PATH. */
export function dockerCli(): string {
  return existsSync('/usr/bin/docker') ? '/usr/bin/docker' : 'docker';
}

/** Absolute paths of the shared libraries (and the dynamic loader) `ldd FILE` lists. */
export async function sharedLibraries(file: string): Promise<string[]> {
  const res = await runCommand('ldd', [file]);
  // "not a dynamic executable" (static binaries) exits 1: no libraries.
  if (res.code !== 0) return [];
  const out = new Set<string>();
  for (const line of res.stdout.split('\n')) {
    const arrow = /=>\s+(\/\S+)/.exec(line);
    if (arrow) out.add(arrow[1]!);
    else {
      const direct = /^\s*(\/\S+)\s+\(/.exec(line);
      if (direct) out.add(direct[1]!);
    }
  }
  return [...out];
}

async function copyInto(root: string, hostPath: string, mode?: number): Promise<void> {
  const dest = path.join(root, hostPath);
  if (existsSync(dest)) return;
  await mkdir(path.dirname(dest), { recursive: true });
  // copyFile follows symlinks: the file lands under the name ldd (or the caller) gave.
  await copyFile(hostPath, dest);
  await chmod(dest, mode ?? ((await stat(hostPath)).mode & 0o7777));
}

export interface RootfsSpec {
  /** Host executables copied to the same path, each with the libraries ldd lists for it. */
  executables: string[];
  /** Host files copied as they are (e.g. /etc/login.defs), with their libraries if they are ELF objects. */
  files?: string[];
  /** Host directories whose *.so files are copied with their libraries (e.g. iptables extensions). */
  libraryDirs?: string[];
  /** Symlinks: path in the image → target. */
  symlinks?: Record<string, string>;
  /** Busybox applets linked into /bin (busybox itself comes from Debian's busybox-static). */
  applets?: string[];
}

/** Writes a root filesystem for SPEC into ROOT. */
export async function assembleRootfs(root: string, spec: RootfsSpec): Promise<void> {
  for (const d of ['bin', 'sbin', 'usr/bin', 'usr/sbin', 'tmp', 'etc', 'run', 'var/tmp', 'root']) await mkdir(path.join(root, d), { recursive: true });
  await chmod(path.join(root, 'tmp'), 0o1777);
  await chmod(path.join(root, 'var/tmp'), 0o1777);
  await copyInto(root, BUSYBOX_BIN, 0o755);
  for (const a of spec.applets ?? []) {
    const link = path.join(root, 'bin', a);
    if (!existsSync(link)) await symlink('busybox', link);
  }
  const libs = new Set<string>();
  for (const exe of spec.executables) {
    await copyInto(root, exe);
    for (const l of await sharedLibraries(exe)) libs.add(l);
  }
  for (const f of spec.files ?? []) {
    await copyInto(root, f);
  }
  for (const dir of spec.libraryDirs ?? []) {
    for (const e of await readdir(dir)) {
      if (!e.endsWith('.so')) continue;
      const f = path.join(dir, e);
      await copyInto(root, f);
      for (const l of await sharedLibraries(f)) libs.add(l);
    }
  }
  for (const l of libs) await copyInto(root, l);
  for (const [link, target] of Object.entries(spec.symlinks ?? {})) {
    const p = path.join(root, link);
    await mkdir(path.dirname(p), { recursive: true });
    if (!existsSync(p)) await symlink(target, p);
  }
  // Debian's /lib64 and /lib are symlinks into /usr; a copied loader path keeps working either way.
  await writeFile(path.join(root, 'etc/passwd'), 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n');
  await writeFile(path.join(root, 'etc/group'), 'root:x:0:\nnogroup:x:65534:\n');
  await writeFile(path.join(root, 'etc/shadow'), 'root:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n', { mode: 0o640 });
  await writeFile(path.join(root, 'etc/gshadow'), 'root:*::\nnogroup:*::\n', { mode: 0o640 });
  await writeFile(path.join(root, 'etc/nsswitch.conf'), 'passwd: files\ngroup: files\nshadow: files\nhosts: files\n');
}

/**
 * Assembles SPEC into a temporary root, tars it and imports it with `docker import` into the
 * dockerd at SOCKET as TAG (with CHANGES, Dockerfile instructions such as ENV or CMD).
 * Returns the image id.
 */
export async function importRootfsImage(socketPath: string, tag: string, spec: RootfsSpec, changes: string[] = []): Promise<string> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'pd-base-'));
  try {
    const root = path.join(dir, 'root');
    await mkdir(root);
    await assembleRootfs(root, spec);
    const tarball = path.join(dir, 'rootfs.tar');
    const tar = await runCommand('tar', ['--numeric-owner', '--owner=0', '--group=0', '-C', root, '-cf', tarball, '.']);
    if (tar.code !== 0) throw new Error(`tar failed: ${tar.stderr}`);
    const args = ['-H', `unix://${socketPath}`, 'import'];
    for (const c of changes) args.push('--change', c);
    args.push(tarball, tag);
    const res = await runCommand(dockerCli(), args, { timeoutMs: 180_000 });
    if (res.code !== 0) throw new Error(`docker import ${tag} failed (${res.code}): ${res.stderr.trim()}`);
    return res.stdout.trim();
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** Host paths of iptables-nft: the multi-call binary and its extension directory. */
export async function iptablesNftPaths(): Promise<{ multi: string; extensions: string }> {
  const multi = '/usr/sbin/xtables-nft-multi';
  const libxtables = (await sharedLibraries(multi)).find((l) => path.basename(l).startsWith('libxtables.so'));
  if (!libxtables) throw new Error(`${multi}: libxtables not found by ldd`);
  // The compiled-in XTABLES_LIBDIR is under /usr (merged /usr: ldd may name /lib/...).
  return { multi, extensions: path.join(path.dirname(await realpath(libxtables)), 'xtables') };
}

/**
 * A stand-in for node:20-bookworm-slim, from this host: busybox as /bin/sh and the applets the
 * Dockerfile's RUN lines use, the host's node, iptables-nft (with the iptables, -save, -restore
 * names the daemon runs), setcap, groupadd and useradd.
 */
export async function nodeBaseSpec(nodeBin = '/usr/bin/node'): Promise<RootfsSpec> {
  const ipt = await iptablesNftPaths();
  const names = ['iptables', 'iptables-save', 'iptables-restore', 'iptables-nft', 'iptables-nft-save', 'iptables-nft-restore'];
  const symlinks: Record<string, string> = {};
  for (const n of names) symlinks[`/usr/sbin/${n}`] = 'xtables-nft-multi';
  if (nodeBin !== '/usr/bin/node') symlinks['/usr/bin/node'] = nodeBin;
  return {
    // coreutils' install: Debian's busybox-static has no install applet.
    executables: [nodeBin, ipt.multi, '/usr/sbin/setcap', '/usr/sbin/groupadd', '/usr/sbin/useradd', '/usr/bin/install', '/usr/sbin/nologin'],
    files: ['/etc/login.defs'],
    libraryDirs: [ipt.extensions],
    symlinks,
    applets: ['sh', '[', 'test', 'printf', 'rm', 'mkdir', 'cat', 'echo', 'ls', 'id', 'env', 'sleep', 'true', 'false', 'mv', 'cp', 'chmod', 'grep'],
  };
}
