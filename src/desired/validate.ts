import fs from 'node:fs';
import path from 'node:path';
import { Ajv, type ErrorObject, type ValidateFunction } from 'ajv';
import { createRequire } from 'node:module';
import YAML, { Composer, isMap, isPair, isScalar, LineCounter, Parser, type Document, type Node, type Pair } from 'yaml';
import type { JsonObject } from '../state/types.js';
import { GROUP, VERSION, type KindInfo } from './kinds.js';
import { CEL_RULES, celRulesIn, checkCelRules } from './cel-rules.js';
import { formatPath, plainFsError, type Problem } from './problem.js';

export { formatPath, formatProblem, type Problem } from './problem.js';

// ajv-formats is CommonJS whose typings declare an ESM default; require() sidesteps the mismatch.
const addFormats = createRequire(import.meta.url)('ajv-formats') as (ajv: Ajv) => Ajv;

export const MAX_FILE_BYTES = 1024 * 1024;
export const MAX_DOCUMENTS_PER_FILE = 20_000;
export const API_VERSION = `${GROUP}/${VERSION}`;

/** One valid resource document, with its spec defaulted by the CRD schema. */
export interface DesiredResource {
  kind: string;
  name: string;
  labels: Record<string, string>;
  annotations: Record<string, string>;
  spec: JsonObject;
  file: string;
  line: number;
  /** Finds the position of a field path inside this document, for cross-document checks. */
  locate(fieldPath: Array<string | number>): { line: number; col: number };
}

export interface LoadResult {
  resources: DesiredResource[];
  problems: Problem[];
  files: string[];
}

/** Cross-field checks a kind needs beyond its schema (CEL rules of its CRD, references, uniqueness). */
export type SemanticCheck = (
  resources: DesiredResource[],
  report: (r: DesiredResource, field: Array<string | number>, message: string) => void,
) => void;

const DNS1123_LABEL = /^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$/;
const LABEL_KEY = /^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$/;
const LABEL_VALUE = /^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$/;
const TOP_LEVEL = new Set(['apiVersion', 'kind', 'metadata', 'spec', 'status']);
const METADATA_FIELDS = new Set([
  'name',
  'namespace',
  'labels',
  'annotations',
  // Present when a resource is exported from the daemon or Kubernetes; ignored on input.
  'uid',
  'generation',
  'resourceVersion',
  'creationTimestamp',
]);

// Sub-schemas under these keywords only add constraints to fields declared in the main body;
// closing them would reject those fields (Kubernetes prunes by the main body only, too).
const NOT_CLOSED = new Set(['default', 'example', 'enum', 'allOf', 'anyOf', 'oneOf', 'not']);

/** Closes every object schema that lists properties, so unknown fields are errors locally too. */
function closeSchema(schema: unknown): unknown {
  if (Array.isArray(schema)) return schema.map(closeSchema);
  if (schema === null || typeof schema !== 'object') return schema;
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(schema)) {
    out[k] = NOT_CLOSED.has(k) ? v : closeSchema(v);
  }
  if (
    out.type === 'object' &&
    out.properties &&
    out.additionalProperties === undefined &&
    out['x-kubernetes-preserve-unknown-fields'] !== true
  ) {
    out.additionalProperties = false;
  }
  return out;
}

export class DesiredStateValidator {
  private readonly validators = new Map<string, ValidateFunction>();
  private ajv: Ajv | undefined;

  constructor(
    readonly kinds: Map<string, KindInfo>,
    private readonly semanticChecks: Map<string, SemanticCheck> = new Map(),
  ) {
    for (const info of kinds.values()) {
      for (const rule of celRulesIn(info.specSchema)) {
        if (!CEL_RULES[rule]) throw new Error(`${info.crdFile}: CEL rule ${JSON.stringify(rule)} has no mirror in src/desired/cel-rules.ts`);
      }
    }
  }

  /**
   * A kind's compiled schema, compiled on first use: compiling all five costs about 100 ms, and
   * a command that checks one file of ProxyPorts needs two of them.
   */
  private validatorOf(kind: string): ValidateFunction {
    let validate = this.validators.get(kind);
    if (!validate) {
      if (!this.ajv) {
        this.ajv = new Ajv({ allErrors: true, strict: false, useDefaults: true, coerceTypes: false, verbose: true });
        addFormats(this.ajv);
      }
      validate = this.ajv.compile(closeSchema(this.kinds.get(kind)!.specSchema) as object);
      this.validators.set(kind, validate);
    }
    return validate;
  }

  /** Schema, then (only when the schema passed, as Kubernetes does) the CRD's CEL rules. Applies defaults to spec. */
  private check(kind: string, spec: unknown): Array<{ path: Array<string | number>; message: string; keyOnly: boolean }> {
    const validate = this.validatorOf(kind);
    if (!validate(spec)) {
      return dedupeAnyOf(validate.errors ?? []).map((e) => ({
        path: ajvErrorPath(e, ['spec']),
        message: ajvMessage(e),
        keyOnly: e.keyword === 'additionalProperties',
      }));
    }
    return checkCelRules(this.kinds.get(kind)!.specSchema, spec, ['spec']).map((v) => ({ ...v, keyOnly: false }));
  }

  /** Validates a spec object that did not come from a file (API input). Returns problems with field paths. */
  validateSpec(kind: string, spec: unknown): Array<{ field: string; message: string }> {
    if (!this.kinds.has(kind)) return [{ field: '-', message: `unknown kind ${kind}` }];
    return this.check(kind, spec).map((p) => ({ field: formatPath(p.path), message: p.message }));
  }

  /** Loads and validates a file or a directory (its *.yaml / *.yml files, not recursive). */
  loadPath(target: string): LoadResult {
    const problems: Problem[] = [];
    const resources: DesiredResource[] = [];
    let files: string[];
    try {
      const stat = fs.statSync(target);
      files = stat.isDirectory()
        ? fs
            .readdirSync(target)
            .filter((f) => /\.ya?ml$/.test(f) && !f.startsWith('.'))
            .sort()
            .map((f) => path.join(target, f))
        : [target];
    } catch (err) {
      problems.push({ file: target, line: 0, col: 0, resource: '-', field: '-', message: `cannot read: ${plainFsError(err)}` });
      return { resources, problems, files: [] };
    }
    for (const file of files) this.loadFile(file, resources, problems);
    this.checkAcrossDocuments(resources, problems);
    return { resources, problems, files };
  }

  private loadFile(file: string, resources: DesiredResource[], problems: Problem[]): void {
    const add = (line: number, col: number, resource: string, field: string, message: string) =>
      problems.push({ file, line, col, resource, field, message });
    let size: number;
    try {
      size = fs.statSync(file).size;
    } catch (err) {
      add(0, 0, '-', '-', `cannot read: ${plainFsError(err)}`);
      return;
    }
    if (size > MAX_FILE_BYTES) {
      add(1, 1, '-', '-', `file is ${size} bytes, over the limit of ${MAX_FILE_BYTES} bytes`);
      return;
    }
    const text = fs.readFileSync(file, 'utf8');
    if (text.trim() === '' || text.split('\n').every((l) => /^\s*(#.*)?$/.test(l) || /^---\s*$/.test(l))) {
      add(1, 1, '-', '-', 'file holds no resources (empty)');
      return;
    }
    // Streamed one document at a time, so a large file never holds every syntax tree at once.
    const lineCounter = new LineCounter();
    const parser = new Parser(lineCounter.addNewLine);
    const composer = new Composer({ prettyErrors: false, uniqueKeys: true });
    let docIndex = 0;
    for (const doc of composer.compose(parser.parse(text))) {
      if (docIndex >= MAX_DOCUMENTS_PER_FILE) {
        add(1, 1, '-', '-', `file holds more than ${MAX_DOCUMENTS_PER_FILE} documents`);
        return;
      }
      const index = docIndex++;
      const docLine = lineCounter.linePos(doc.range[0]);
      if (doc.errors.length > 0) {
        for (const e of doc.errors) {
          const pos = e.linePos?.[0] ?? lineCounter.linePos(e.pos[0]) ?? docLine;
          add(pos.line, pos.col, '-', '-', `YAML syntax error: ${e.message.split('\n')[0]}`);
        }
        continue;
      }
      // An empty document (a trailing `---`, two `---` in a row, only comments) is skipped, as
      // kubectl does; an explicit `null` or `~` is not empty and is still an error below.
      if (doc.contents === null || (isScalar(doc.contents) && doc.contents.value === null && doc.contents.source === '')) continue;
      this.checkDocument(file, index, doc as Document.Parsed, lineCounter, resources, problems);
    }
  }

  private checkDocument(
    file: string,
    docIndex: number,
    doc: Document.Parsed,
    lineCounter: LineCounter,
    resources: DesiredResource[],
    problems: Problem[],
  ): void {
    const locate = (fieldPath: Array<string | number>) => locateNode(doc, lineCounter, fieldPath);
    const docPos = lineCounter.linePos(doc.contents?.range[0] ?? 0);
    let value: unknown;
    try {
      value = doc.toJS({ maxAliasCount: 100 });
    } catch (err) {
      problems.push({ file, ...docPos, resource: '-', field: '-', message: (err as Error).message });
      return;
    }
    const push = (resource: string, fieldPath: Array<string | number>, message: string, keyOnly = false) => {
      const pos = keyOnly ? locateKey(doc, lineCounter, fieldPath) : locate(fieldPath);
      problems.push({ file, ...pos, resource, field: formatPath(fieldPath), message });
    };
    if (value === null || typeof value !== 'object' || Array.isArray(value)) {
      push('-', [], 'a resource must be a mapping with apiVersion, kind, metadata and spec');
      return;
    }
    const obj = value as Record<string, unknown>;
    const meta = obj.metadata as Record<string, unknown> | undefined;
    const name = typeof meta?.name === 'string' ? meta.name : undefined;
    const kind = typeof obj.kind === 'string' ? obj.kind : undefined;
    const id = `${kind ?? '-'}/${name ?? '-'}`;
    const before = problems.length;

    for (const key of Object.keys(obj)) {
      if (!TOP_LEVEL.has(key)) push(id, [key], `unknown field "${key}"`, true);
    }
    if (obj.apiVersion !== API_VERSION) {
      push(id, ['apiVersion'], `apiVersion must be ${API_VERSION}, got ${JSON.stringify(obj.apiVersion ?? null)}`);
    }
    if (!kind) {
      push(id, ['kind'], 'kind is required');
    } else if (!this.kinds.has(kind)) {
      push(id, ['kind'], `unknown kind "${kind}" (known: ${[...this.kinds.keys()].join(', ')})`);
    }
    if (!meta || typeof meta !== 'object' || Array.isArray(meta)) {
      push(id, ['metadata'], 'metadata with a name is required');
    } else {
      for (const key of Object.keys(meta)) {
        if (!METADATA_FIELDS.has(key)) push(id, ['metadata', key], `unknown field "${key}"`, true);
      }
      if (name === undefined) push(id, ['metadata', 'name'], 'metadata.name is required and must be a string');
      else if (!DNS1123_LABEL.test(name)) {
        push(id, ['metadata', 'name'], 'must be a DNS-1123 label: lower-case letters, digits and -, at most 63');
      }
      for (const mapName of ['labels', 'annotations'] as const) {
        const m = meta[mapName];
        if (m === undefined) continue;
        if (m === null || typeof m !== 'object' || Array.isArray(m)) {
          push(id, ['metadata', mapName], 'must be a map of strings');
          continue;
        }
        for (const [k, v] of Object.entries(m)) {
          if (!LABEL_KEY.test(k)) push(id, ['metadata', mapName, k], `invalid key "${k}"`, true);
          if (typeof v !== 'string') push(id, ['metadata', mapName, k], 'value must be a string');
          else if (mapName === 'labels' && !LABEL_VALUE.test(v)) {
            push(id, ['metadata', mapName, k], 'label values are at most 63 of [A-Za-z0-9_.-]');
          }
        }
      }
    }
    const spec = obj.spec;
    if (kind && this.kinds.has(kind)) {
      if (spec === undefined || spec === null || typeof spec !== 'object' || Array.isArray(spec)) {
        push(id, ['spec'], 'spec is required and must be a mapping');
      } else {
        for (const p of this.check(kind, spec)) push(id, p.path, p.message, p.keyOnly);
      }
    }
    if (problems.length > before || !kind || !name) return;
    resources.push({
      kind,
      name,
      labels: (meta?.labels as Record<string, string> | undefined) ?? {},
      annotations: (meta?.annotations as Record<string, string> | undefined) ?? {},
      spec: spec as JsonObject,
      file,
      line: docPos.line,
      // Positions of valid documents are needed only when a later check fails; re-parsing then
      // keeps 10,000 documents' syntax trees from staying in memory for the whole apply.
      // (Made outside this function: a closure here would share its scope, and so keep `doc`.)
      locate: lazyLocator(file, docIndex),
    });
  }

  private checkAcrossDocuments(resources: DesiredResource[], problems: Problem[]): void {
    const seen = new Map<string, DesiredResource>();
    const report = (r: DesiredResource, field: Array<string | number>, message: string) => {
      const pos = r.locate(field);
      problems.push({ file: r.file, ...pos, resource: `${r.kind}/${r.name}`, field: formatPath(field), message });
    };
    for (const r of resources) {
      const key = `${r.kind}/${r.name}`;
      const first = seen.get(key);
      if (first) report(r, ['metadata', 'name'], `duplicate ${key}: also defined at ${first.file}:${first.line}`);
      else seen.set(key, r);
    }
    for (const check of this.semanticChecks.values()) check(resources, report);
  }
}

/**
 * An anyOf failure is reported once, in its own words (the CRD's description of the rule),
 * instead of with every branch's errors as well.
 */
function dedupeAnyOf(errors: ErrorObject[]): ErrorObject[] {
  const anyOfPaths = errors.filter((e) => e.keyword === 'anyOf' || e.keyword === 'oneOf').map((e) => e.schemaPath);
  return errors.filter(
    (e) => e.keyword === 'anyOf' || e.keyword === 'oneOf' || !anyOfPaths.some((p) => e.schemaPath.startsWith(p + '/')),
  );
}

function ajvErrorPath(e: ErrorObject, prefix: Array<string | number>): Array<string | number> {
  const parts = e.instancePath
    .split('/')
    .slice(1)
    .map((s) => s.replace(/~1/g, '/').replace(/~0/g, '~'))
    .map((s) => (/^\d+$/.test(s) ? Number(s) : s));
  const out = [...prefix, ...parts];
  if (e.keyword === 'additionalProperties') out.push((e.params as { additionalProperty: string }).additionalProperty);
  if (e.keyword === 'required') out.push((e.params as { missingProperty: string }).missingProperty);
  return out;
}

function ajvMessage(e: ErrorObject): string {
  switch (e.keyword) {
    case 'additionalProperties':
      return `unknown field "${(e.params as { additionalProperty: string }).additionalProperty}"`;
    case 'required':
      return 'required field is missing';
    case 'enum':
      return `must be one of ${(e.params as { allowedValues: unknown[] }).allowedValues.map((v) => JSON.stringify(v)).join(', ')}`;
    case 'format':
      return `must be a valid ${(e.params as { format: string }).format} address or value`;
    case 'anyOf':
    case 'oneOf': {
      const description = (e.parentSchema as { description?: string } | undefined)?.description;
      return description ? `does not meet the rule: ${description.split('\n')[0]}` : 'does not match any allowed form';
    }
    case 'pattern':
      return `has a character or shape that is not allowed (must match ${(e.params as { pattern: string }).pattern})`;
    default:
      return e.message ?? e.keyword;
  }
}


function lazyLocator(file: string, docIndex: number): DesiredResource['locate'] {
  return (fieldPath) => locateLater(file, docIndex, fieldPath);
}

let reparsed: { key: string; docs: Document.Parsed[]; lc: LineCounter } | undefined;

function locateLater(file: string, docIndex: number, fieldPath: Array<string | number>): { line: number; col: number } {
  let text: string;
  let key: string;
  try {
    const st = fs.statSync(file);
    // Keyed on the file's identity and version: an edited file is never located in its old text.
    key = `${file}\0${st.ino}\0${st.size}\0${st.mtimeMs}`;
    text = reparsed?.key === key ? '' : fs.readFileSync(file, 'utf8');
  } catch {
    return { line: 0, col: 0 };
  }
  if (reparsed?.key !== key) {
    const lc = new LineCounter();
    reparsed = { key, docs: YAML.parseAllDocuments(text, { lineCounter: lc }) as Document.Parsed[], lc };
  }
  const doc = reparsed.docs[docIndex];
  return doc ? locateNode(doc, reparsed.lc, fieldPath) : { line: 0, col: 0 };
}

/** Position of the deepest existing node on the path (a missing field points at its parent). */
function locateNode(doc: Document.Parsed, lc: LineCounter, fieldPath: Array<string | number>): { line: number; col: number } {
  for (let n = fieldPath.length; n >= 0; n--) {
    const node = n === 0 ? doc.contents : (doc.getIn(fieldPath.slice(0, n), true) as Node | undefined);
    if (node && typeof node === 'object' && 'range' in node && node.range) {
      return lc.linePos(node.range[0]);
    }
  }
  return { line: 1, col: 1 };
}

/** Position of a mapping key (for unknown fields the key itself is the problem). */
function locateKey(doc: Document.Parsed, lc: LineCounter, fieldPath: Array<string | number>): { line: number; col: number } {
  const parentPath = fieldPath.slice(0, -1);
  const key = fieldPath[fieldPath.length - 1];
  const parent = parentPath.length === 0 ? doc.contents : doc.getIn(parentPath, true);
  if (isMap(parent)) {
    const pair = parent.items.find((p: Pair) => isPair(p) && isScalar(p.key) && p.key.value === key);
    if (pair && isScalar(pair.key) && pair.key.range) return lc.linePos(pair.key.range[0]);
  }
  return locateNode(doc, lc, fieldPath);
}
