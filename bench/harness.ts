// What every benchmark needs from the test harness: an ava-like context whose teardowns the
// bench runs itself, in reverse, when it ends (the helpers in test/helpers take an ava context).
import type { ExecutionContext } from 'ava';

export function benchContext(cleanups: Array<() => unknown>): ExecutionContext {
  return { teardown: (fn: () => unknown) => cleanups.push(fn), log: () => undefined } as unknown as ExecutionContext;
}

/** Runs the cleanups last-registered first; a failing one is logged and the rest still run. */
export async function runCleanups(cleanups: Array<() => unknown>, log: (msg: string) => void): Promise<void> {
  for (const fn of cleanups.reverse()) {
    try {
      await fn();
    } catch (err) {
      log(`cleanup: ${(err as Error).message}`);
    }
  }
}
