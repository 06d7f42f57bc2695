import path from 'node:path';
import type { Store } from '../state/store.js';
import type { JsonObject, ResourceSource } from '../state/types.js';
import { formatPath, type Problem } from './problem.js';
import type { DesiredResource, DesiredStateValidator, LoadResult } from './validate.js';

/** What a kind checks against the store when a resource is written (like a Kubernetes admission webhook). */
export interface Admission {
  kind: string;
  /** Lower runs first within one apply (pools before the ports that reference them). */
  order: number;
  /**
   * Called once per write transaction; the returned function runs for each resource of the kind
   * in it, may write (allocations), and throws AdmissionError to refuse. Per-batch state (caches)
   * lives in the closure, so a bulk apply stays linear.
   */
  prepare(store: Store): (resource: AdmittedResource) => void;
}

export interface AdmittedResource {
  kind: string;
  name: string;
  spec: JsonObject;
  /**
   * The status the resource carries elsewhere (a Kubernetes custom resource's, written by an
   * earlier leader with a database of its own): allocations it names are kept where they are free.
   */
  recordedStatus?: JsonObject;
}

export class AdmissionError extends Error {
  constructor(
    readonly field: Array<string | number>,
    message: string,
    readonly code = 'INVALID',
  ) {
    super(message);
    this.name = 'AdmissionError';
  }
}

export interface ApplyOptions {
  prune?: boolean;
  dryRun?: boolean;
  /** Largest share (0..1) of a kind's applied resources that prune may delete without force. */
  maxPrune?: number;
  force?: boolean;
  source?: ResourceSource;
}

export interface ApplyResult {
  ok: boolean;
  created: string[];
  configured: string[];
  unchanged: string[];
  pruned: string[];
  problems: Problem[];
  /** Set when prune was refused (the refusal is also in problems). */
  pruneRefused?: boolean;
  files: string[];
}

class Rollback extends Error {}

/**
 * Applies a file or directory all or nothing: every document is validated first, then every
 * write (and the prune) happens in one transaction that any refused document rolls back.
 */
export function applyPath(
  store: Store,
  validator: DesiredStateValidator,
  admissions: Admission[],
  target: string,
  options: ApplyOptions = {},
): ApplyResult {
  return applyLoaded(store, admissions, validator.loadPath(target), target, options);
}

/** The write half of applyPath, for documents already loaded and validated. */
export function applyLoaded(
  store: Store,
  admissions: Admission[],
  loaded: LoadResult,
  target: string,
  options: ApplyOptions = {},
): ApplyResult {
  const result: ApplyResult = {
    ok: false,
    created: [],
    configured: [],
    unchanged: [],
    pruned: [],
    problems: loaded.problems,
    files: loaded.files,
  };
  if (loaded.problems.length > 0) return result;
  if (loaded.resources.length === 0) {
    // Like kubectl, a plain apply of nothing is an error. With prune (the watched directory) an
    // empty directory is fine on a fresh install; but once resources were applied from it, an
    // empty one is more likely a volume that did not mount than a wish to delete everything.
    const before = options.prune
      ? store.listResources().filter((r) => r.source === 'apply' && appliedFrom(r.sourceFile, target) && !r.metadata.deletionTimestamp)
      : undefined;
    if (before && before.length === 0) {
      result.ok = true;
      return result;
    }
    const message = before
      ? `no resources to apply, but ${before.length} resource(s) were applied from here before (${before.slice(0, 3).map((r) => `${r.kind}/${r.metadata.name}`).join(', ')}${before.length > 3 ? ', …' : ''}); an empty directory deletes nothing: delete them by name`
      : 'no resources to apply';
    result.problems.push({ file: target, line: 0, col: 0, resource: '-', field: '-', message });
    return result;
  }
  const admissionOf = new Map(admissions.map((a) => [a.kind, a]));
  const admitters = new Map<string, (r: AdmittedResource) => void>();
  const ordered = [...loaded.resources].sort(
    (a, b) => (admissionOf.get(a.kind)?.order ?? 50) - (admissionOf.get(b.kind)?.order ?? 50),
  );
  const report = (r: DesiredResource, field: Array<string | number>, message: string) =>
    result.problems.push({ file: r.file, ...r.locate(field), resource: `${r.kind}/${r.name}`, field: formatPath(field), message });

  try {
    store.transaction(() => {
      for (const r of ordered) {
        const existingSource = store.getSource(r.kind, r.name);
        if (existingSource === 'kubernetes' && options.source !== 'kubernetes') {
          report(r, ['metadata', 'name'], `${r.kind}/${r.name} is owned by the Kubernetes source; change it there`);
          continue;
        }
        try {
          const admission = admissionOf.get(r.kind);
          if (admission) {
            if (!admitters.has(r.kind)) admitters.set(r.kind, admission.prepare(store));
            admitters.get(r.kind)!(r);
          }
        } catch (err) {
          if (err instanceof AdmissionError) {
            report(r, err.field, err.message);
            continue;
          }
          throw err;
        }
        const out = store.upsertResource({
          kind: r.kind,
          name: r.name,
          labels: r.labels,
          annotations: r.annotations,
          spec: r.spec,
          source: options.source ?? 'apply',
          sourceFile: path.resolve(r.file),
        });
        const id = `${r.kind}/${r.name}`;
        if (out.created) result.created.push(id);
        else if (out.specChanged || out.metaChanged) result.configured.push(id);
        else result.unchanged.push(id);
      }
      if (result.problems.length > 0) throw new Rollback();
      if (options.prune) prune(store, loaded.resources, target, options, result);
      if (result.problems.length > 0 || options.dryRun) throw new Rollback();
    });
  } catch (err) {
    if (!(err instanceof Rollback)) throw err;
  }
  result.ok = result.problems.length === 0;
  return result;
}

/** Whether a resource was applied from the file or directory now being applied. */
export function appliedFrom(sourceFile: string | undefined, target: string): boolean {
  if (!sourceFile) return false;
  const root = path.resolve(target);
  return sourceFile === root || sourceFile.startsWith(root + path.sep);
}

function prune(store: Store, applied: DesiredResource[], target: string, options: ApplyOptions, result: ApplyResult): void {
  const maxPrune = options.maxPrune ?? 0.5;
  const keep = new Set(applied.map((r) => `${r.kind}/${r.name}`));
  const kinds = [...new Set(applied.map((r) => r.kind))];
  const doomed: string[] = [];
  const createdNow = new Set(result.created);
  for (const kind of kinds) {
    // Only what an apply created is pruned: resources made through the API belong to their callers,
    // The share is of what existed before this apply: replacing every resource is 100%, not 50%.
    const candidates = store
      .listResources(kind)
      // Only what was applied from this same path: `apply -f other.yaml` and the watched directory
      // never prune each other's resources.
      .filter(
        (r) =>
          r.source === 'apply' &&
          appliedFrom(r.sourceFile, target) &&
          !r.metadata.deletionTimestamp &&
          !createdNow.has(`${kind}/${r.metadata.name}`),
      );
    const gone = candidates.filter((r) => !keep.has(`${kind}/${r.metadata.name}`));
    if (gone.length === 0) continue;
    const share = gone.length / candidates.length;
    if (share > maxPrune && !options.force) {
      result.pruneRefused = true;
      result.problems.push({
        file: '-',
        line: 0,
        col: 0,
        resource: kind,
        field: '-',
        message:
          `prune would delete ${gone.length} of ${candidates.length} ${kind} resources ` +
          `(${Math.round(share * 100)}% > --max-prune ${Math.round(maxPrune * 100)}%): ` +
          `${gone.slice(0, 5).map((r) => r.metadata.name).join(', ')}${gone.length > 5 ? ', …' : ''}; nothing was changed (use --force)`,
      });
      continue;
    }
    for (const r of gone) doomed.push(`${kind}/${r.metadata.name}`);
  }
  if (result.pruneRefused) return;
  for (const id of doomed) {
    const [kind, name] = id.split('/') as [string, string];
    store.requestDeletion(kind, name);
    result.pruned.push(id);
  }
}
