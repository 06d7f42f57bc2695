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
