import type { ChildProcess } from 'node:child_process';

/** Children the tests started and have not seen exit; SIGKILLed by PID if the test process exits first. */
const live = new Set<ChildProcess>();
let installed = false;

export function trackChild(child: ChildProcess): void {
  if (!installed) {
    installed = true;
    process.on('exit', () => {
      for (const c of live) {
        try {
          if (c.pid !== undefined) process.kill(c.pid, 'SIGKILL');
        } catch {
          /* already gone */
        }
      }
    });
  }
  live.add(child);
  child.once('exit', () => live.delete(child));
}

export function untrackChild(child: ChildProcess): void {
  live.delete(child);
}
