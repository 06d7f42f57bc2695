import YAML from 'yaml';
import type { PrinterColumn } from '../desired/kinds.js';
import type { StoredResource } from '../state/types.js';

export type OutputFormat = 'table' | 'wide' | 'json' | 'yaml';

/** Kubernetes-style age: 45s, 12m, 3h, 5d. */
export function age(iso: string | undefined, now = Date.now()): string {
  if (!iso) return '<none>';
  const s = Math.max(0, Math.floor((now - Date.parse(iso)) / 1000));
  if (s < 120) return `${s}s`;
  if (s < 7200) return `${Math.floor(s / 60)}m`;
  if (s < 172_800) return `${Math.floor(s / 3600)}h`;
  return `${Math.floor(s / 86_400)}d`;
}

/** Evaluates the simple JSONPath of printer columns (`.status.ports.total`). */
export function jsonPathGet(obj: unknown, jsonPath: string): unknown {
  let cur: unknown = obj;
  for (const part of jsonPath.split('.').filter(Boolean)) {
    if (cur === null || typeof cur !== 'object') return undefined;
    cur = (cur as Record<string, unknown>)[part];
  }
  return cur;
}

export function table(headers: string[], rows: string[][]): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]) => cells.map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i]!))).join('   ').trimEnd();
  return [line(headers), ...rows.map(line)].join('\n');
}

export function publicView(r: StoredResource): Record<string, unknown> {
  return { apiVersion: r.apiVersion, kind: r.kind, metadata: r.metadata, spec: r.spec, status: r.status ?? {} };
}

export function renderResources(resources: StoredResource[], columns: PrinterColumn[], format: OutputFormat, single: boolean): string {
  if (format === 'json') {
    return JSON.stringify(single ? publicView(resources[0]!) : { apiVersion: 'v1', kind: 'List', items: resources.map(publicView) }, null, 2);
  }
  if (format === 'yaml') {
    return single
      ? YAML.stringify(publicView(resources[0]!))
      : YAML.stringify({ apiVersion: 'v1', kind: 'List', items: resources.map(publicView) });
  }
  const cols = columns.filter((c) => format === 'wide' || !c.priority);
  const headers = ['NAME', ...cols.map((c) => c.name.toUpperCase())];
  const rows = resources.map((r) => {
    const view = publicView(r);
    return [
      r.metadata.name + (r.metadata.deletionTimestamp ? ' (deleting)' : ''),
      ...cols.map((c) => {
        const v = jsonPathGet(view, c.jsonPath);
        if (v === undefined || v === null) return '<none>';
        return c.type === 'date' ? age(String(v)) : String(v);
      }),
    ];
  });
  return table(headers, rows);
}
