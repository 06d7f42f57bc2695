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
