// A problem with desired state, and how it is printed. Kept apart from the validator (which
// loads the schema compiler) so that what only reports problems loads nothing heavy.

export interface Problem {
  /** The file, or `-` when the problem is not in one (a prune refused across files). */
  file: string;
  /** 1-based; 0 when there is no position (the file cannot be read). */
  line: number;
  col: number;
  /** `Kind/name`, or `-` when the document has none yet. */
  resource: string;
  /** Dotted field path, e.g. `spec.upstream.host`, or `-` for the whole document. */
  field: string;
  message: string;
}

/**
 * `FILE:LINE:COL: Kind/name: field: message`, the parts that are not known left out (never a
 * `-:0:0: -: -:` placeholder): `FILE: message` for a file that cannot be read,
 * `ProxyPort: message` for a refused prune.
 */
export function formatProblem(p: Problem): string {
  const parts: string[] = [];
  if (p.file !== '-' && p.file !== '') parts.push(p.line > 0 ? `${p.file}:${p.line}${p.col > 0 ? `:${p.col}` : ''}` : p.file);
  if (p.resource !== '-' && p.resource !== '' && p.resource !== '-/-') parts.push(p.resource.replace(/^-\//, '').replace(/\/-$/, ''));
  if (p.field !== '-' && p.field !== '') parts.push(p.field);
  parts.push(p.message);
  return parts.join(': ');
}

export function formatPath(p: Array<string | number>): string {
  if (p.length === 0) return '-';
  let out = '';
  for (const part of p) {
    if (typeof part === 'number') out += `[${part}]`;
    else out += out === '' ? part : `.${part}`;
  }
  return out;
}

/** `no such file or directory` rather than `ENOENT: no such file or directory, stat 'x'`. */
export function plainFsError(err: unknown): string {
  const e = err as NodeJS.ErrnoException;
  switch (e.code) {
    case 'ENOENT':
      return 'no such file or directory';
    case 'EACCES':
    case 'EPERM':
      return 'permission denied';
    case 'ENOTDIR':
      return 'a part of the path is not a directory';
    default:
      return e.message ?? String(err);
  }
}
