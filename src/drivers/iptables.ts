// The only place that runs iptables. One `iptables-save` per observation and one
// `iptables-restore --noflush` per change, whatever the number of rules.
//
// Processes are started with spawn() and argument arrays only (never a shell), always
// with a timeout that SIGKILLs the child. Binaries are looked up in PATH plus the sbin
// directories, so a daemon started with a minimal PATH still finds them.

import { spawn } from 'node:child_process';
import { accessSync, constants as fsConstants } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { delimiter, join } from 'node:path';

export type IptablesBackend = 'auto' | 'nft' | 'legacy';

export interface IptablesDriverOptions {
  /** `auto` runs `iptables-save`/`iptables-restore` (whatever Debian alternatives point to). */
  backend: IptablesBackend;
  /** Run every command inside this network namespace (`ip netns exec NETNS ...`). */
  netns?: string;
  /** Per-process timeout; the child is SIGKILLed when it expires. Default 30 s. */
  timeoutMs?: number;
}

export interface IptablesStats {
  saves: number;
  restores: number;
  sysctlWrites: number;
}

const EXTRA_DIRS = ['/usr/local/sbin', '/usr/local/bin', '/usr/sbin', '/usr/bin', '/sbin', '/bin'];
const executableCache = new Map<string, string | null>();

/** Absolute path of an executable from PATH, /usr/sbin, /sbin, ...; null when missing. */
export function findExecutable(name: string): string | null {
  if (name.includes('/')) {
    try {
      accessSync(name, fsConstants.X_OK);
      return name;
    } catch {
      return null;
    }
  }
  const cached = executableCache.get(name);
  if (cached !== undefined) return cached;
  const dirs = [...(process.env.PATH ?? '').split(delimiter).filter((d) => d.startsWith('/')), ...EXTRA_DIRS];
  let found: string | null = null;
  for (const dir of new Set(dirs)) {
    const p = join(dir, name);
    try {
      accessSync(p, fsConstants.X_OK);
      found = p;
      break;
    } catch {
      // keep looking
    }
  }
  executableCache.set(name, found);
  return found;
}

function requireExecutable(name: string): string {
  const p = findExecutable(name);
  if (!p) throw new Error(`executable "${name}" not found in PATH nor in ${EXTRA_DIRS.join(', ')}`);
  return p;
}

export function backendBinaries(backend: IptablesBackend): { save: string; restore: string; iptables: string } {
  switch (backend) {
    case 'auto':
      return { save: 'iptables-save', restore: 'iptables-restore', iptables: 'iptables' };
    case 'nft':
      return { save: 'iptables-nft-save', restore: 'iptables-nft-restore', iptables: 'iptables-nft' };
    case 'legacy':
      return { save: 'iptables-legacy-save', restore: 'iptables-legacy-restore', iptables: 'iptables-legacy' };
    default:
      throw new Error(`unknown iptables backend ${JSON.stringify(backend)}: expected auto, nft or legacy`);
  }
}

/** Whether the save and restore binaries of a backend are installed. */
export function backendAvailable(backend: IptablesBackend): boolean {
  const b = backendBinaries(backend);
  return findExecutable(b.save) !== null && findExecutable(b.restore) !== null;
}

const NETNS_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;

export class IptablesCommandError extends Error {
  readonly command: string[];
  readonly exitCode: number | null;
  readonly signal: NodeJS.Signals | null;
  readonly stderr: string;
  readonly timedOut: boolean;
  /** For restore failures: the payload line iptables-restore complained about (1-based) and its text. */
  readonly line: number | null;
  readonly lineText: string | null;

  constructor(
    message: string,
    info: {
      command: string[];
      exitCode: number | null;
      signal: NodeJS.Signals | null;
      stderr: string;
      timedOut: boolean;
      line?: number | null;
      lineText?: string | null;
    },
  ) {
    super(message);
    this.name = 'IptablesCommandError';
    this.command = info.command;
    this.exitCode = info.exitCode;
    this.signal = info.signal;
    this.stderr = info.stderr;
    this.timedOut = info.timedOut;
    this.line = info.line ?? null;
    this.lineText = info.lineText ?? null;
  }
}

export interface RunResult {
  /** Decoded on first access: a caller that only needs the bytes never builds the string. */
  readonly stdout: string;
  stdoutBuffer: Buffer;
  stderr: string;
  exitCode: number | null;
  signal: NodeJS.Signals | null;
  timedOut: boolean;
}

const MAX_OUTPUT = 512 * 1024 * 1024;

/**
 * Runs one process (argument array, no shell) with stdin `input`, SIGKILLing it after
 * `timeoutMs`. Every command of the driver goes through here; exported for tests.
 */
export function runProcess(
  file: string,
  args: string[],
  input: string | null,
  timeoutMs: number,
  onSpawn?: (pid: number | undefined) => void,
): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const env = { ...process.env, LC_ALL: 'C', PATH: [process.env.PATH ?? '', ...EXTRA_DIRS].filter(Boolean).join(delimiter) };
    const child = spawn(file, args, { stdio: ['pipe', 'pipe', 'pipe'], env, shell: false });
    onSpawn?.(child.pid);
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let outLen = 0;
    let timedOut = false;
    let settled = false;
    const timer = setTimeout(() => {
      // The child may have exited already with its pipes still draining: not a timeout.
      if (child.exitCode !== null || child.signalCode !== null) return;
      timedOut = true;
      child.kill('SIGKILL');
    }, timeoutMs);
    child.stdout.on('data', (b: Buffer) => {
      outLen += b.length;
      if (outLen > MAX_OUTPUT) child.kill('SIGKILL');
      else out.push(b);
    });
    child.stderr.on('data', (b: Buffer) => {
      if (err.length < 1024) err.push(b);
    });
    child.on('error', (e) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      reject(e);
    });
    child.on('close', (code, signal) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      const stdoutBuffer = Buffer.concat(out);
      let decoded: string | undefined;
      resolve({
        get stdout() {
          return (decoded ??= stdoutBuffer.toString('utf8'));
        },
        stdoutBuffer,
        stderr: Buffer.concat(err).toString('utf8'),
        exitCode: code,
        signal,
        // Our SIGKILL can race with a child that already exited but was not reaped
        // yet: it then reports its own exit status and did not time out.
        timedOut: timedOut && signal !== null,
      });
    });
    // EPIPE when the child exits before reading all input: its exit status tells why.
    child.stdin.on('error', () => {});
    if (input !== null) child.stdin.end(input);
    else child.stdin.end();
  });
}

/** Line number iptables-restore reports (`line 3 failed`, `Error occurred at line: 3`, `line 3: ...`). */
export function restoreErrorLine(stderr: string): number | null {
  const m = /line:? (\d+)/.exec(stderr);
  return m ? Number(m[1]) : null;
}

export class IptablesDriver {
  readonly backend: IptablesBackend;
  readonly netns: string | undefined;
  readonly timeoutMs: number;
  readonly stats: IptablesStats = { saves: 0, restores: 0, sysctlWrites: 0 };
  private readonly names: { save: string; restore: string };

  constructor(options: IptablesDriverOptions) {
    this.names = backendBinaries(options.backend);
    this.backend = options.backend;
    if (options.netns !== undefined && !NETNS_RE.test(options.netns)) {
      throw new Error(`invalid network namespace name ${JSON.stringify(options.netns)}`);
    }
    this.netns = options.netns;
    const t = options.timeoutMs ?? 30_000;
    if (!Number.isFinite(t) || t <= 0) throw new Error(`invalid timeoutMs ${t}`);
    this.timeoutMs = t;
  }

  /** [file, args] for a command, wrapped in `ip netns exec` when a namespace is set. */
  private command(name: string, args: string[]): [string, string[]] {
    const bin = requireExecutable(name);
    if (this.netns === undefined) return [bin, args];
    return [requireExecutable('ip'), ['netns', 'exec', this.netns, bin, ...args]];
  }

  private async run(name: string, args: string[], input: string | null): Promise<RunResult & { argv: string[] }> {
    const [file, argv] = this.command(name, args);
    const res = await runProcess(file, argv, input, this.timeoutMs);
    return { ...res, argv: [file, ...argv] };
  }

  private fail(what: string, res: RunResult & { argv: string[] }, extra?: { line: number | null; lineText: string | null }): never {
    const why = res.timedOut
      ? `timed out after ${this.timeoutMs} ms (killed)`
      : res.signal
        ? `killed by ${res.signal}`
        : `exit ${res.exitCode}`;
    let msg = `${what} failed (${why})`;
    if (extra?.line != null) {
      msg += ` at payload line ${extra.line}${extra.lineText != null ? `: ${extra.lineText}` : ''}`;
      // iptables-nft-restore reports some errors (e.g. a jump to a missing chain) at the
      // table's COMMIT line, where its nf_tables transaction is checked.
      if (extra.lineText === 'COMMIT') msg += ' (the error is in that table block, found at commit)';
    }
    const stderr = res.stderr.trim();
    if (stderr) msg += `\n${stderr}`;
    throw new IptablesCommandError(msg, {
      command: res.argv,
      exitCode: res.exitCode,
      signal: res.signal,
      stderr: res.stderr,
      timedOut: res.timedOut,
      line: extra?.line ?? null,
      lineText: extra?.lineText ?? null,
    });
  }

  /** `iptables-save` of all tables, in one process. */
  async save(): Promise<string> {
    return (await this.saveRaw()).toString('utf8');
  }

  /** `iptables-save` of all tables, as the bytes it printed. */
  async saveRaw(): Promise<Buffer> {
    this.stats.saves++;
    const res = await this.run(this.names.save, [], null);
    if (res.exitCode !== 0 || res.timedOut) this.fail(this.names.save, res);
    return res.stdoutBuffer;
  }

  /**
   * `iptables-restore --noflush` with the payload on stdin, in one process. Atomic per
   * table on both backends: on failure nothing of that table is applied.
   */
  async restore(payload: string): Promise<void> {
    await this.restoreWith(payload, []);
  }

  private async restoreWith(payload: string, extra: string[]): Promise<void> {
    if (payload.trim() === '') return;
    if (extra.length === 0) this.stats.restores++;
    // -w: wait for the xtables lock (legacy) instead of failing at once; bounded below our timeout.
    const wait = String(Math.max(1, Math.floor(this.timeoutMs / 2000)));
    const args = ['--noflush', '-w', wait, ...extra];
    const res = await this.run(this.names.restore, args, payload.endsWith('\n') ? payload : `${payload}\n`);
    if (res.exitCode !== 0 || res.timedOut) {
      const line = res.timedOut ? null : restoreErrorLine(res.stderr);
      const lineText = line !== null ? (payload.split('\n')[line - 1] ?? null) : null;
      this.fail(`${this.names.restore} ${args.join(' ')}`, res, { line, lineText });
    }
  }

  async getIpForward(): Promise<boolean> {
    let value: string;
    if (this.netns === undefined) {
      value = await readFile('/proc/sys/net/ipv4/ip_forward', 'utf8');
    } else {
      const res = await this.run('sysctl', ['-n', 'net.ipv4.ip_forward'], null);
      if (res.exitCode !== 0 || res.timedOut) this.fail('sysctl -n net.ipv4.ip_forward', res);
      value = res.stdout;
    }
    return value.trim() === '1';
  }

  async setIpForward(on: boolean): Promise<void> {
    this.stats.sysctlWrites++;
    const v = on ? '1' : '0';
    if (this.netns === undefined) {
      try {
        await writeFile('/proc/sys/net/ipv4/ip_forward', `${v}\n`);
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        // Net sysctls grant CAP_NET_ADMIN root's access, so the systemd unit can write it; Docker's
        // read-only /proc/sys and a unit without ReadWritePaths= for it cannot.
        throw new Error(
          `cannot set net.ipv4.ip_forward=${v} (${code ?? 'error'}): give the daemon CAP_NET_ADMIN and a writable /proc/sys/net/ipv4/ip_forward, or set it on the host ` +
            `(/etc/sysctl.d) and keep it there, or set the ProxyPool's ipForward: false`,
        );
      }
      return;
    }
    const res = await this.run('sysctl', ['-w', `net.ipv4.ip_forward=${v}`], null);
    if (res.exitCode !== 0 || res.timedOut) this.fail(`sysctl -w net.ipv4.ip_forward=${v}`, res);
  }
}
