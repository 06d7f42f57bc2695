// Throwaway network namespaces for tests that need real iptables: nothing a test
// does to iptables ever reaches the host's root namespace.

import { execFile } from 'node:child_process';
import { findExecutable } from '../../src/drivers/iptables.js';

export interface Netns {
  name: string;
  /** Runs `ip netns exec NAME cmd ...args` (argument array, no shell); rejects on a non-zero exit. */
  exec(cmd: string, args: string[], opts?: { input?: string; timeoutMs?: number }): Promise<{ stdout: string; stderr: string }>;
  /** Deletes the namespace; safe to call more than once. */
  destroy(): Promise<void>;
}

let counter = 0;

function ipBinary(): string {
  const ip = findExecutable('ip');
  if (!ip) throw new Error('the `ip` command (iproute2) is required for network-namespace tests');
  return ip;
}

function run(file: string, args: string[], opts: { input?: string; timeoutMs?: number } = {}): Promise<{ stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = execFile(
      file,
      args,
      { timeout: opts.timeoutMs ?? 30_000, killSignal: 'SIGKILL', maxBuffer: 256 * 1024 * 1024, env: { ...process.env, LC_ALL: 'C' } },
      (err, stdout, stderr) => {
        if (err) {
          const e = new Error(`${[file, ...args].join(' ')} failed: ${err.message}${stderr ? `\n${stderr}` : ''}`);
          reject(Object.assign(e, { stdout, stderr }));
        } else resolve({ stdout, stderr });
      },
    );
    child.stdin?.on('error', () => {});
    if (opts.input !== undefined) child.stdin?.end(opts.input);
    else child.stdin?.end();
  });
}

/** Fails (throws) with a clear message unless running as root: the iptables tests need CAP_NET_ADMIN and netns. */
export function requireRoot(): void {
  const uid = process.getuid?.();
  if (uid !== 0) {
    throw new Error(
      `these tests must run as root (uid 0, for network namespaces and iptables); running as uid ${uid ?? 'unknown'}. ` +
        'They never touch the host namespace: everything happens in throwaway `ip netns` namespaces.',
    );
  }
  ipBinary();
}

/** Creates `pdt-<pid>-<n>` with `lo` up and the given addresses (CIDR, e.g. `127.0.0.11/8`) on `lo`. */
export async function createNetns(opts: { addresses?: string[] } = {}): Promise<Netns> {
  const ip = ipBinary();
  const name = `pdt-${process.pid}-${++counter}`;
  await run(ip, ['netns', 'add', name]);
  let destroyed = false;
  const destroy = async (): Promise<void> => {
    if (destroyed) return;
    destroyed = true;
    try {
      await run(ip, ['netns', 'del', name]);
    } catch (e) {
      const msg = e instanceof Error ? e.message : String(e);
      if (!/No such file|not found|does not exist/i.test(msg)) throw e;
    }
  };
  try {
    await run(ip, ['-n', name, 'link', 'set', 'lo', 'up']);
    // A new namespace inherits IPv4 forwarding from the host's (devconf_inherit_init_net 0):
    // start every test from the kernel default, whatever the host has.
    await run(ip, ['netns', 'exec', name, 'sh', '-c', 'echo 0 > /proc/sys/net/ipv4/ip_forward']);
    for (const addr of opts.addresses ?? []) {
      await run(ip, ['-n', name, 'addr', 'add', addr, 'dev', 'lo']);
    }
  } catch (e) {
    await destroy().catch(() => {});
    throw e;
  }
  return {
    name,
    exec: (cmd, args, o) => run(ip, ['netns', 'exec', name, cmd, ...args], o),
    destroy,
  };
}
