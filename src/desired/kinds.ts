import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import YAML from 'yaml';
import type { JsonObject } from '../state/types.js';

export interface KindInfo {
  kind: string;
  plural: string;
  singular: string;
  shortNames: string[];
  specSchema: JsonObject;
  statusSchema: JsonObject | undefined;
  printerColumns: PrinterColumn[];
  crdFile: string;
}

/** A CRD's additionalPrinterColumns entry: what `get` shows (priority > 0 only with -o wide). */
export interface PrinterColumn {
  name: string;
  type: string;
  jsonPath: string;
  priority?: number;
}

export const GROUP = 'polydev.ai';
export const VERSION = 'v1alpha1';

/** The package root: the nearest ancestor of this module holding package.json and crds/ (works from src/ and dist/). */
export function packageRoot(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 8; i++) {
    if (fs.existsSync(path.join(dir, 'package.json')) && fs.existsSync(path.join(dir, 'crds'))) return dir;
    dir = path.dirname(dir);
  }
  throw new Error('cannot find the package root (a folder with package.json and crds/) above ' + import.meta.url);
}

interface CrdDocument {
  kind?: string;
  spec?: {
    group?: string;
    names?: { kind?: string; plural?: string; singular?: string; shortNames?: string[] };
    versions?: Array<{
      name?: string;
      schema?: { openAPIV3Schema?: { properties?: Record<string, JsonObject> } };
      additionalPrinterColumns?: PrinterColumn[];
    }>;
  };
}

/** Reads every CustomResourceDefinition in crds/: they are the one source of what each kind allows. */
export function loadKinds(crdDir = path.join(packageRoot(), 'crds')): Map<string, KindInfo> {
  const kinds = new Map<string, KindInfo>();
  for (const file of fs.readdirSync(crdDir).filter((f) => /\.ya?ml$/.test(f)).sort()) {
    const full = path.join(crdDir, file);
    const crd = YAML.parse(fs.readFileSync(full, 'utf8')) as CrdDocument;
    if (crd?.kind !== 'CustomResourceDefinition' || crd.spec?.group !== GROUP) continue;
    const names = crd.spec.names;
    const version = crd.spec.versions?.find((v) => v.name === VERSION);
    const props = version?.schema?.openAPIV3Schema?.properties;
    if (!names?.kind || !names.plural || !props?.spec) {
      throw new Error(`${full}: CRD lacks names.kind, names.plural or a ${VERSION} spec schema`);
    }
    kinds.set(names.kind, {
      kind: names.kind,
      plural: names.plural,
      singular: names.singular ?? names.kind.toLowerCase(),
      shortNames: names.shortNames ?? [],
      specSchema: props.spec,
      statusSchema: props.status,
      printerColumns: version?.additionalPrinterColumns ?? [],
      crdFile: full,
    });
  }
  return kinds;
}

/** Resolves `proxyport`, `proxyports`, `ProxyPort`, `pp` (short name) to the kind's canonical name. */
export function resolveKindName(kinds: ReadonlyMap<string, Pick<KindInfo, 'kind' | 'plural' | 'singular' | 'shortNames'>>, name: string): string | undefined {
  const lower = name.toLowerCase();
  for (const info of kinds.values()) {
    if (
      info.kind.toLowerCase() === lower ||
      info.plural === lower ||
      info.singular === lower ||
      info.shortNames.includes(lower)
    ) {
      return info.kind;
    }
  }
  return undefined;
}
