import v8 from 'node:v8';
import vm from 'node:vm';

// The daemon allocates in bursts (a 10,000-rule save, parse and plan every resync) and then sits
// idle. V8 grows its heap to fit the bursts and is slow to give the space back, so a long-running
// daemon's RSS creeps up to several times its live data. A full collection after a burst, at
// most once per interval, keeps the footprint at live data plus one burst.
let collect: (() => void) | undefined | null;
let lastAt = 0;

function collector(): (() => void) | null {
  if (collect !== undefined) return collect;
  try {
    v8.setFlagsFromString('--expose-gc');
    collect = vm.runInNewContext('gc') as () => void;
  } catch {
    collect = null;
  }
  return collect;
}

/** Runs a full garbage collection soon after a large burst of work, at most once per minIntervalMs. */
export function relieveMemoryAfterBurst(minIntervalMs = 5000): void {
  const now = Date.now();
  if (now - lastAt < minIntervalMs) return;
  lastAt = now;
  const gc = collector();
  if (gc) setImmediate(gc);
}
