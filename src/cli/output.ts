import YAML from 'yaml';
import type { PrinterColumn } from '../desired/kinds.js';
import type { StoredEvent, StoredResource } from '../state/types.js';

export { CliError, EXIT } from './errors.js';

export type OutputFormat = 'table' | 'wide' | 'json' | 'yaml';

/** A resource as `get -o json` shows it: `{apiVersion, kind, metadata, spec, status}`. */
export type ResourceObject = Record<string, unknown>;

/** 45s, 12m, 3h, 5d (Kubernetes' rounding). */
function shortDuration(seconds: number): string {
  const s = Math.max(0, Math.floor(seconds));
  if (s < 120) return `${s}s`;
  if (s < 7200) return `${Math.floor(s / 60)}m`;
  if (s < 172_800) return `${Math.floor(s / 3600)}h`;
  return `${Math.floor(s / 86_400)}d`;
}

/** Kubernetes-style age: 45s, 12m, 3h, 5d. */
export function age(iso: string | undefined, now = Date.now()): string {
  if (!iso) return '<none>';
  return shortDuration((now - Date.parse(iso)) / 1000);
}

/** `5m ago` or `in 29m`: for times that may lie ahead (expiries). */
export function relativeTime(iso: string | undefined, now = Date.now()): string {
  if (!iso) return '<none>';
  const delta = (Date.parse(iso) - now) / 1000;
  return delta > 0 ? `in ${shortDuration(delta)}` : `${shortDuration(-delta)} ago`;
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

export function prefixLines(text: string, prefix: string): string {
  return text
    .trimEnd()
    .split('\n')
    .map((l) => prefix + l)
    .join('\n');
}

export function table(headers: string[], rows: string[][]): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]) => cells.map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i]!))).join('   ').trimEnd();
  return [line(headers), ...rows.map(line)].join('\n');
}

export function publicView(r: StoredResource): ResourceObject {
  return { apiVersion: r.apiVersion, kind: r.kind, metadata: r.metadata, spec: r.spec, status: r.status ?? {} };
}

export function renderResources(resources: StoredResource[], columns: PrinterColumn[], format: OutputFormat, single: boolean): string {
  return renderObjects(resources.map(publicView), columns, format, single);
}

/**
 * Renders resource-shaped objects (stored resources, or objects the store keeps elsewhere such
 * as claims) as kubectl does: a table of the CRD's printer columns, or the objects as JSON/YAML.
 */
export function renderObjects(objects: ResourceObject[], columns: PrinterColumn[], format: OutputFormat, single: boolean): string {
  const document = single ? objects[0]! : { apiVersion: 'v1', kind: 'List', items: objects };
  if (format === 'json') return JSON.stringify(document, null, 2);
  if (format === 'yaml') return YAML.stringify(document);
  const cols = columns.filter((c) => format === 'wide' || !c.priority);
  const headers = ['NAME', ...cols.map((c) => c.name.toUpperCase())];
  const rows = objects.map((o) => [
    String(jsonPathGet(o, '.metadata.name') ?? '<none>') + (jsonPathGet(o, '.metadata.deletionTimestamp') ? ' (deleting)' : ''),
    ...cols.map((c) => {
      const v = jsonPathGet(o, c.jsonPath);
      if (v === undefined || v === null) return '<none>';
      return c.type === 'date' ? age(String(v)) : String(v);
    }),
  ]);
  return table(headers, rows);
}

/** The `Events:` block of `describe`: a table of events, or `<none>`. */
export function eventsSection(events: StoredEvent[]): string[] {
  return [
    'Events:',
    events.length === 0
      ? '  <none>'
      : prefixLines(table(['LAST SEEN', 'TYPE', 'REASON', 'COUNT', 'MESSAGE'], events.map((e) => [age(e.lastTimestamp), e.type, e.reason, String(e.count), e.message])), '  '),
  ];
}

/** Identical lines once each, in order of first appearance, with how often they occur. */
export function groupLines(lines: string[]): Array<{ line: string; count: number }> {
  const counts = new Map<string, number>();
  for (const line of lines) counts.set(line, (counts.get(line) ?? 0) + 1);
  return [...counts].map(([line, count]) => ({ line, count }));
}
