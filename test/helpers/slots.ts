// Bounds how many heavy tests of one test file run at once.
//
// ava runs every test of a file concurrently, and two files at a time. A heavy test here is a
// whole environment: an in-process daemon (reconcile loop every 500 ms, each pass forking
// `ip netns exec … iptables-save` from a large process), a network namespace, child processes.
// Twenty of them at once in one worker, beside another file doing the same, kept a 2-core
// machine's load at 10-17 and starved every event loop: waits with sound deadlines (a proxy that
// listens in 90 ms, a rule that converges in 50 ms) timed out after 15 s, and 14 tests of api.test.ts
// took over 2 minutes each instead of 20 s. With a few at a time per file the same tests finish in
// about the same total time, and each one sees the machine it was written for.
//
// A test takes its slot when it builds its environment and gives it back after its last teardown.

import type { ExecutionContext } from 'ava';

/** Heavy tests per file at once (POLYDEV_TEST_SLOTS overrides, for experiments). */
export const DEFAULT_SLOTS = 3;

export class TestSlots {
  private used = 0;
  private readonly waiting: Array<() => void> = [];
  private readonly holders = new WeakSet<object>();

  constructor(readonly max: number) {
    if (!Number.isInteger(max) || max < 1) throw new Error(`test slots must be a positive integer, not ${max}`);
  }

  /** Waits for a slot for this test (once per test: a second environment in it shares the slot). */
  async acquire(t: ExecutionContext): Promise<void> {
    if (this.holders.has(t)) return;
    this.holders.add(t);
    if (this.used >= this.max) await new Promise<void>((resolve) => this.waiting.push(resolve));
    else this.used++;
    // Registered before anything else the environment registers, so it runs after all of it.
    t.teardown(() => this.release());
  }

  private release(): void {
    const next = this.waiting.shift();
    if (next) next(); // the slot passes straight on
    else this.used--;
  }
}

function slotsFromEnv(): number {
  const v = process.env.POLYDEV_TEST_SLOTS;
  if (v === undefined || v === '') return DEFAULT_SLOTS;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1) throw new Error(`POLYDEV_TEST_SLOTS must be a positive integer, not ${JSON.stringify(v)}`);
  return n;
}

/** The slots of this test file's worker process (one module instance per ava worker). */
export const heavyTests = new TestSlots(slotsFromEnv());
