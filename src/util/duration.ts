const UNIT_MS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 };
const PART = /([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)/gy;

/** Parses Go-style durations ("500ms", "5m", "1h30m") into milliseconds. */
export function parseDuration(text: string): number {
  if (typeof text !== 'string' || text.length === 0) throw new Error(`invalid duration ${JSON.stringify(text)}`);
  PART.lastIndex = 0;
  let total = 0;
  let consumed = 0;
  let m: RegExpExecArray | null;
  while ((m = PART.exec(text)) !== null) {
    total += Number(m[1]) * UNIT_MS[m[2]!]!;
    consumed = PART.lastIndex;
  }
  if (consumed !== text.length) {
    throw new Error(`invalid duration ${JSON.stringify(text)} (use e.g. 500ms, 30s, 5m, 1h30m)`);
  }
  return total;
}

/**
 * A duration for people, in the units parseDuration reads: `750ms` under a second, `1.5s` under
 * ten seconds, then whole units, largest first, zero parts left out (`3m24s`, `5m`, `1h`,
 * `1h30m`, `26h`). What is below the last unit shown is cut, not rounded (204800 ms is `3m24s`):
 * a wait shown never ends before it says.
 */
export function formatDuration(ms: number): string {
  if (!Number.isFinite(ms)) return String(ms);
  if (ms < 0) return `-${formatDuration(-ms)}`;
  if (ms < 10) return `${Number(ms.toFixed(1))}ms`;
  // 999.6 ms is "1s", not "1000ms".
  if (ms < 1000) return Math.round(ms) < 1000 ? `${Math.round(ms)}ms` : '1s';
  if (ms < 10_000) return `${Number((Math.floor(ms / 100) / 10).toFixed(1))}s`;
  const total = Math.floor(ms / 1000);
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = total % 60;
  return `${h ? `${h}h` : ''}${m ? `${m}m` : ''}${s ? `${s}s` : ''}`;
}
