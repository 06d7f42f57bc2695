export interface BenchFigure {
  backend?: string;
  name: string;
  value: number;
  unit: string;
  goal?: string;
  met?: boolean;
}

export function median(values: number[]): number {
  if (values.length === 0) return NaN;
  const s = [...values].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

export function printTable(title: string, figures: BenchFigure[]): void {
  const rows = figures.map((f) => [
    f.backend ?? '',
    f.name,
    `${f.value >= 100 ? Math.round(f.value) : +f.value.toFixed(2)} ${f.unit}`,
    f.goal ?? '',
    f.met === undefined ? '' : f.met ? 'yes' : 'NO',
  ]);
  const headers = ['backend', title, 'median', 'goal', 'met'];
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (cells: string[]) => cells.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd();
  console.log(line(headers));
  console.log(widths.map((w) => '-'.repeat(w)).join('  '));
  for (const r of rows) console.log(line(r));
}

/** Nearest-rank percentile (p in 0-100): the smallest value with at least p% of the values at or below it. */
export function percentile(values: number[], p: number): number {
  if (values.length === 0) return NaN;
  const s = [...values].sort((a, b) => a - b);
  const rank = Math.max(1, Math.ceil((p / 100) * s.length));
  return s[Math.min(s.length, rank) - 1]!;
}

/** p50, p99 and max of a sample, rounded to microseconds (for the raw JSON). */
export function summarize(values: number[]): { n: number; p50: number; p99: number; max: number } {
  const r = (x: number) => Math.round(x * 1000) / 1000;
  return { n: values.length, p50: r(percentile(values, 50)), p99: r(percentile(values, 99)), max: r(values.length ? Math.max(...values) : NaN) };
}
