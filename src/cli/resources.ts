// get, describe, events, delete and render: the commands that work on stored resources.

import fs from 'node:fs';
import YAML from 'yaml';
import type { TurnServerSpec } from '../controllers/turnserver/types.js';
import type { Store } from '../state/store.js';
import type { StoredResource } from '../state/types.js';
import type { CliContext } from './context.js';
import { CliError, EXIT } from './errors.js';
import { age, eventsSection, prefixLines, renderResources, table, type OutputFormat } from './output.js';

export interface GetOptions {
  output: OutputFormat;
  pool?: string;
  user?: string;
  all?: boolean;
}

function mustGet(store: Store, kind: string, name: string): StoredResource {
  const r = store.getResource(kind, name);
  if (!r) throw new CliError(`${kind} "${name}" not found`, EXIT.PROBLEMS);
  return r;
}

export async function get(ctx: CliContext, kindName: string, name: string | undefined, opts: GetOptions): Promise<number> {
  const kind = await ctx.kindArg(kindName);
  const columns = await ctx.printerColumns(kind);
  if (kind !== 'Claim' && (opts.pool !== undefined || opts.user !== undefined || opts.all)) throw new CliError('--pool, --user and --all apply to claims only');
  // Claims live in tables of their own (claims.ts), loaded only for them.
  const claims = kind === 'Claim' ? await import('./claims.js') : undefined;
  return ctx.withStore('read', (store) => {
    if (claims) return claims.getClaims(store, columns, name, opts, ctx.io);
    const resources = name ? [mustGet(store, kind, name)] : store.listResources(kind);
    if (resources.length === 0 && (opts.output === 'table' || opts.output === 'wide')) {
      ctx.io.err(`no ${kind} resources`);
      return EXIT.OK;
    }
    ctx.io.out(renderResources(resources, columns, opts.output, name !== undefined).trimEnd());
    return EXIT.OK;
  });
}

export async function describe(ctx: CliContext, kindName: string, name: string): Promise<number> {
  const kind = await ctx.kindArg(kindName);
  const claims = kind === 'Claim' || kind === 'WarmPool' ? await import('./claims.js') : undefined;
  return ctx.withStore('read', (store) => {
    if (kind === 'Claim') {
      ctx.io.out(claims!.describeClaim(store, name));
      return EXIT.OK;
    }
    const r = mustGet(store, kind, name);
    ctx.io.out(describeResource(r, store, kind === 'WarmPool' ? claims!.warmPoolSections(store, name) : []));
    return EXIT.OK;
  });
}

export async function events(ctx: CliContext, resource: string | undefined, limit: number): Promise<number> {
  let kind: string | undefined;
  let name: string | undefined;
  if (resource) {
    const [k, n] = resource.split('/');
    kind = k === 'DesiredState' ? k : await ctx.kindArg(k!);
    name = n || undefined;
  }
  return ctx.withStore('read', (store) => {
    const found = store.listEvents({ ...(kind ? { kind } : {}), ...(name ? { name } : {}), limit });
    if (found.length === 0) {
      ctx.io.err('no events');
      return EXIT.OK;
    }
    ctx.io.out(table(['LAST SEEN', 'TYPE', 'REASON', 'OBJECT', 'COUNT', 'MESSAGE'], found.map((e) => [age(e.lastTimestamp), e.type, e.reason, `${e.kind}/${e.name}`, String(e.count), e.message])));
    return EXIT.OK;
  });
}

export async function remove(ctx: CliContext, kindName: string, name: string): Promise<number> {
  const kind = await ctx.kindArg(kindName);
  if (kind === 'Claim') throw new CliError(`claims are ended through the daemon: polydev-reconciler release ${name}`);
  return ctx.withStore('read', (store) => {
    mustGet(store, kind, name);
    store.requestDeletion(kind, name);
    ctx.io.out(`${kind.toLowerCase()}/${name} deleted (the daemon tears down what it owns, then removes it)`);
    return EXIT.OK;
  });
}

export async function render(ctx: CliContext, what: string, name: string, outputFile: string | undefined): Promise<number> {
  if (what !== 'turnserver-conf') throw new CliError(`unknown thing to render "${what}" (known: turnserver-conf)`);
  const { renderTurnserverConf } = await import('../controllers/turnserver/render.js');
  const { CredentialsError, readSecretFile } = await import('../controllers/turnserver/types.js');
  return ctx.withStore('read', (store) => {
    const r = mustGet(store, 'TurnServer', name);
    const spec = r.spec as unknown as TurnServerSpec;
    if (!outputFile) {
      ctx.io.out(renderTurnserverConf(name, spec).text.trimEnd());
      return EXIT.OK;
    }
    let secret: string;
    try {
      secret = spec.auth.mode === 'longTerm' ? readSecretFile(spec.auth.passwordFile, 'auth.passwordFile') : readSecretFile(spec.auth.secretFile, 'auth.secretFile');
    } catch (err) {
      if (err instanceof CredentialsError) throw new CliError(`TurnServer ${name}: ${err.message}`);
      throw err;
    }
    writePrivateFile(outputFile, renderTurnserverConf(name, spec, secret).text);
    ctx.io.out(`wrote ${outputFile} (mode 0600; it holds the ${spec.auth.mode === 'longTerm' ? 'password' : 'shared secret'})`);
    return EXIT.OK;
  });
}

/** The generic description; `sections` (kind-specific blocks) go between the conditions and the events. */
function describeResource(r: StoredResource, store: Store, sections: string[] = []): string {
  const lines: string[] = [];
  const kv = (k: string, v: string) => lines.push(`${(k + ':').padEnd(20)}${v}`);
  kv('Name', r.metadata.name);
  kv('Kind', r.kind);
  kv('Labels', Object.entries(r.metadata.labels).map(([k, v]) => `${k}=${v}`).join(', ') || '<none>');
  kv('Annotations', Object.entries(r.metadata.annotations).map(([k, v]) => `${k}=${v}`).join(', ') || '<none>');
  kv('Generation', String(r.metadata.generation));
  kv('Created', `${r.metadata.creationTimestamp} (${age(r.metadata.creationTimestamp)} ago)`);
  kv('Source', r.source + (r.sourceFile ? ` (${r.sourceFile})` : ''));
  if (r.metadata.deletionTimestamp) kv('Deleting since', r.metadata.deletionTimestamp);
  lines.push('Spec:', prefixLines(YAML.stringify(r.spec).trimEnd(), '  '));
  const { conditions = [], phase, observedGeneration, ...rest } = r.status ?? { conditions: [], phase: 'Pending' };
  lines.push('Status:');
  lines.push(`  Phase:              ${phase ?? 'Pending'}`);
  lines.push(`  Observed gen.:      ${observedGeneration ?? '<none>'}`);
  delete (rest as Record<string, unknown>).desiredFingerprint;
  if (Object.keys(rest).length > 0) lines.push(prefixLines(YAML.stringify(rest).trimEnd(), '  '));
  lines.push('Conditions:');
  lines.push(
    conditions.length === 0
      ? '  <none>'
      : prefixLines(table(['TYPE', 'STATUS', 'REASON', 'SINCE', 'MESSAGE'], conditions.map((c) => [c.type, c.status, c.reason, age(c.lastTransitionTime), c.message])), '  '),
  );
  lines.push(...sections);
  const found = store.listEvents({ kind: r.kind, name: r.metadata.name, limit: 20 });
  lines.push(...eventsSection(found));
  return lines.join('\n');
}

/** Writes a file that holds a credential: created 0600 next to the target, then renamed over it. */
function writePrivateFile(file: string, text: string): void {
  const tmp = `${file}.tmp-${process.pid}`;
  fs.writeFileSync(tmp, text, { mode: 0o600, flag: 'wx' });
  try {
    fs.chmodSync(tmp, 0o600);
    fs.renameSync(tmp, file);
  } catch (err) {
    fs.rmSync(tmp, { force: true });
    throw err;
  }
}
