// validate, apply and diff: desired-state YAML against the schemas and the store.
//
// validate is apply --dry-run under another name: the same code (applyPath) runs the schema, the
// cross-document checks and every admission (pool references, free ports, prune limits) in a
// transaction that is rolled back, so whatever apply or the daemon's directory watcher would
// refuse, validate refuses too. It checks against the configured database when that exists (the
// ports already given out count), else against an empty store in memory; it never creates one.

import path from 'node:path';
import YAML from 'yaml';
import type { DesiredResource } from '../desired/validate.js';
import type { Store } from '../state/store.js';
import { canonicalJson } from '../util/canonical-json.js';
import { lineDiff } from '../util/line-diff.js';
import { requirePath, type CliContext } from './context.js';
import { CliError, EXIT } from './errors.js';
import { prefixLines } from './output.js';

export interface CheckOptions {
  prune?: boolean;
  maxPrune?: number;
  force?: boolean;
}

export async function validate(ctx: CliContext, filename: string, opts: CheckOptions): Promise<number> {
  requirePath(filename);
  const cfg = await ctx.settings();
  const [validator, { applyPath }, { ADMISSIONS }, { formatProblem }] = await Promise.all([
    ctx.validator(),
    import('../desired/apply.js'),
    import('../controllers/registry.js'),
    import('../desired/validate.js'),
  ]);
  // The daemon applies its desiredStateDir with prune: checked here the same way, unless told otherwise.
  const watched = cfg.source === 'files' && cfg.desiredStateDir !== undefined && path.resolve(filename) === path.resolve(cfg.desiredStateDir);
  const prune = opts.prune ?? watched;
  let store: Store;
  try {
    store = await ctx.openStore(cfg, 'check');
  } catch (err) {
    // Someone else's database (the daemon's, mode 0600): the files can still be checked, alone.
    const { Store } = await import('../state/store.js');
    if (!(err instanceof CliError)) throw err;
    ctx.io.err(`note: ${err.message}; checked against an empty store instead`);
    store = new Store(':memory:');
  }
  try {
    const result = applyPath(store, validator, ADMISSIONS, filename, {
      prune,
      dryRun: true,
      maxPrune: opts.maxPrune ?? cfg.maxPrune,
      force: opts.force ?? false,
    });
    if (result.pruneRefused && watched && opts.prune === undefined) {
      ctx.io.out(`${filename} is the config's desiredStateDir: checked as the daemon applies it, with prune`);
    }
    for (const p of result.problems) ctx.io.out(formatProblem(p));
    if (!result.ok) return EXIT.PROBLEMS;
    const count = result.created.length + result.configured.length + result.unchanged.length;
    ctx.io.out(`${count} resource(s) in ${result.files.length} file(s) are valid`);
    return EXIT.OK;
  } finally {
    store.close();
  }
}

export interface ApplyOptions extends CheckOptions {
  dryRun?: boolean;
}

export async function apply(ctx: CliContext, filename: string, opts: ApplyOptions): Promise<number> {
  requirePath(filename);
  const [validator, { applyPath }, { ADMISSIONS }, { formatProblem }] = await Promise.all([
    ctx.validator(),
    import('../desired/apply.js'),
    import('../controllers/registry.js'),
    import('../desired/validate.js'),
  ]);
  // A dry run never creates the database either.
  return ctx.withStore(opts.dryRun ? 'check' : 'write', (store, cfg) => {
    const result = applyPath(store, validator, ADMISSIONS, filename, {
      prune: opts.prune ?? false,
      dryRun: opts.dryRun ?? false,
      maxPrune: opts.maxPrune ?? cfg.maxPrune,
      force: opts.force ?? false,
    });
    for (const p of result.problems) ctx.io.err(formatProblem(p));
    if (!result.ok) {
      ctx.io.err('nothing was applied');
      return EXIT.PROBLEMS;
    }
    const suffix = opts.dryRun ? ' (dry run)' : '';
    for (const id of result.created) ctx.io.out(`${id.toLowerCase()} created${suffix}`);
    for (const id of result.configured) ctx.io.out(`${id.toLowerCase()} configured${suffix}`);
    for (const id of result.unchanged) ctx.io.out(`${id.toLowerCase()} unchanged${suffix}`);
    for (const id of result.pruned) ctx.io.out(`${id.toLowerCase()} pruned${suffix}`);
    return EXIT.OK;
  });
}

/** Exit 0 same, 1 different, 2 error (the files do not validate, no database). */
export async function diff(ctx: CliContext, filename: string, prune: boolean): Promise<number> {
  requirePath(filename);
  const [validator, { appliedFrom }, { formatProblem }] = await Promise.all([ctx.validator(), import('../desired/apply.js'), import('../desired/validate.js')]);
  return ctx.withStore('read', (store) => {
    const loaded = validator.loadPath(filename);
    if (loaded.problems.length > 0) {
      for (const p of loaded.problems) ctx.io.err(formatProblem(p));
      return EXIT.ERROR;
    }
    let differences = 0;
    const seen = new Set<string>();
    for (const r of loaded.resources) {
      seen.add(`${r.kind}/${r.name}`);
      const stored = store.getResource(r.kind, r.name);
      const want = wanted(r);
      if (!stored) {
        differences++;
        ctx.io.out(`+++ ${r.kind}/${r.name} (new)`);
        ctx.io.out(prefixLines(YAML.stringify(want), '+ '));
        continue;
      }
      const have = { metadata: { name: stored.metadata.name, labels: stored.metadata.labels, annotations: stored.metadata.annotations }, spec: stored.spec };
      if (canonicalJson(have) === canonicalJson(want) && !stored.metadata.deletionTimestamp) continue;
      differences++;
      ctx.io.out(`--- ${r.kind}/${r.name} (stored, generation ${stored.metadata.generation})`);
      ctx.io.out(`+++ ${r.kind}/${r.name} (${r.file})`);
      ctx.io.out(lineDiff(YAML.stringify(sortedCopy(have)), YAML.stringify(sortedCopy(want))));
    }
    if (prune) {
      const kinds = new Set(loaded.resources.map((r) => r.kind));
      for (const kind of kinds) {
        for (const s of store.listResources(kind)) {
          if (s.source !== 'apply' || !appliedFrom(s.sourceFile, filename) || seen.has(`${kind}/${s.metadata.name}`) || s.metadata.deletionTimestamp) continue;
          differences++;
          ctx.io.out(`--- ${kind}/${s.metadata.name} (would be pruned)`);
        }
      }
    }
    if (differences === 0) {
      ctx.io.err('no differences');
      return EXIT.OK;
    }
    return EXIT.PROBLEMS;
  });
}

function wanted(r: DesiredResource): Record<string, unknown> {
  return { metadata: { name: r.name, labels: r.labels, annotations: r.annotations }, spec: r.spec };
}

function sortedCopy(v: unknown): unknown {
  return JSON.parse(canonicalJson(v));
}
