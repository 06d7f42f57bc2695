// Restarts a server the daemon watches but does not run itself: an operator's command (an
// argument vector, never a shell string) or a systemd unit (`systemctl restart UNIT`).
//
// A restart command usually starts a daemon that outlives it. The result is therefore the
// command's own exit, not the closing of its output pipes (a daemonised child may keep them
// open for ever); stdout is ignored and only the tail of stderr is kept for the message.

import { spawn } from 'node:child_process';
import type { NomadClient } from './nomad.js';

export interface RestartOutcome {
  ok: boolean;
  exitCode: number | null;
  signal: NodeJS.Signals | null;
  timedOut: boolean;
  durationMs: number;
  /** One line for events and status: what ran and how it ended (stderr's tail when it failed). */
  message: string;
}

const STDERR_TAIL = 400;

export function runRestartCommand(argv: string[], timeoutMs: number): Promise<RestartOutcome> {
  if (argv.length === 0 || !argv[0]) throw new Error('a restart command needs at least a program');
  const started = performance.now();
  return new Promise((resolve) => {
    let stderr = '';
    let timedOut = false;
    let done = false;
    const finish = (o: Omit<RestartOutcome, 'durationMs' | 'message'>, message: string) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      child.stderr?.destroy();
      resolve({ ...o, durationMs: Math.round(performance.now() - started), message });
    };
    const child = spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', 'ignore', 'pipe'], shell: false, detached: false });
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, timeoutMs);
    child.stderr?.on('data', (b: Buffer) => {
      stderr = (stderr + b.toString('utf8')).slice(-STDERR_TAIL);
    });
    child.on('error', (err) => finish({ ok: false, exitCode: null, signal: null, timedOut: false }, `${argv[0]}: ${err.message}`));
    let stderrEnded = false;
    child.stderr?.on('end', () => (stderrEnded = true));
    child.on('exit', (code, signal) => {
      // stderr may still be arriving; a daemonised child may hold it open for ever: wait briefly.
      if (!stderrEnded && child.stderr) {
        const settle = setTimeout(() => judge(code, signal), 100);
        child.stderr.once('end', () => {
          clearTimeout(settle);
          judge(code, signal);
        });
      } else judge(code, signal);
    });
    const judge = (code: number | null, signal: NodeJS.Signals | null) => {
      const ok = code === 0 && !timedOut;
      const how = timedOut ? `killed after ${timeoutMs} ms` : signal ? `killed by ${signal}` : `exit code ${code}`;
      const tail = stderr.trim().split('\n').slice(-3).join(' | ');
      finish({ ok, exitCode: code, signal, timedOut }, ok ? `${argv[0]} finished (exit code 0)` : `${argv[0]} failed: ${how}${tail ? `: ${tail}` : ''}`);
    };
  });
}

export function restartSystemdUnit(unit: string, timeoutMs: number): Promise<RestartOutcome> {
  return runRestartCommand(['systemctl', 'restart', unit], timeoutMs);
}

/**
 * Restarts the running allocations of a Nomad job in place (`POST /v1/client/allocation/:id/restart`):
 * the server comes back on the same node, ports and allocation. A job without a running
 * allocation is a failure: Nomad itself places or reschedules, the daemon does not re-submit.
 */
export async function restartNomadJob(client: NomadClient, jobId: string, timeoutMs: number): Promise<RestartOutcome> {
  const started = performance.now();
  const outcome = (ok: boolean, message: string, timedOut = false): RestartOutcome => ({
    ok,
    exitCode: null,
    signal: null,
    timedOut,
    durationMs: Math.round(performance.now() - started),
    message,
  });
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<RestartOutcome>((resolve) => {
    timer = setTimeout(() => resolve(outcome(false, `restarting Nomad job ${jobId} took longer than ${timeoutMs} ms`, true)), timeoutMs);
  });
  const work = (async (): Promise<RestartOutcome> => {
    try {
      const { items } = await client.jobAllocations(jobId);
      const running = items.filter((a) => a.DesiredStatus === 'run' && a.ClientStatus === 'running');
      if (running.length === 0) {
        const states = items.map((a) => `${a.ID.slice(0, 8)} ${a.ClientStatus}`).join(', ');
        return outcome(false, `Nomad job ${jobId} has no running allocation to restart${states ? ` (${states})` : ''}`);
      }
      for (const a of running) await client.restartAllocation(a.ID);
      return outcome(true, `restarted allocation${running.length > 1 ? 's' : ''} ${running.map((a) => a.ID.slice(0, 8)).join(', ')} of Nomad job ${jobId}`);
    } catch (err) {
      return outcome(false, `restarting Nomad job ${jobId}: ${err instanceof Error ? err.message : String(err)}`);
    }
  })();
  try {
    return await Promise.race([work, deadline]);
  } finally {
    clearTimeout(timer);
  }
}
