// Waiting without assuming how fast a loaded machine is.

/**
 * Polls cond every stepMs until it holds (true) or timeoutMs passes (false, after one last look).
 * The deadline is a hang guard: a wait that succeeds costs only its own time.
 */
export async function pollUntil(cond: () => boolean | Promise<boolean>, timeoutMs = 30_000, stepMs = 20): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await cond()) return true;
    if (Date.now() >= deadline) return cond();
    await new Promise((r) => setTimeout(r, stepMs));
  }
}

/**
 * A reference timer for upper bounds on a timeout under test: start it before the code under test
 * arms its own (shorter) deadline, then assert the result came back before it fired. A stalled
 * event loop delays both timers alike, so the check holds under any load and still catches a
 * deadline that is too late.
 */
export function controlTimer(ms: number): { readonly fired: boolean; cancel(): void } {
  let fired = false;
  const timer = setTimeout(() => (fired = true), ms);
  return {
    get fired() {
      return fired;
    },
    cancel: () => clearTimeout(timer),
  };
}
