// Which config file the CLI uses, found the way kubectl finds its kubeconfig: the first of
//
//   1. --config FILE
//   2. $POLYDEV_CONFIG
//   3. /etc/polydev/polydev-reconciler.yaml (what scripts/install-host.sh and the image install)
//   4. in a checkout of this project: the config of its running demo (var/demo/polydev-reconciler.yaml,
//      which `npm start` writes and removes when it stops), else its demo config,
//      manifests/config/polydev-reconciler.yaml
//
// and none of them: the built-in defaults. Step 4 walks up from this module's own file, not from
// the working directory: the CLI of a checkout then answers the same from every directory (the
// demo daemon's database and network namespace), and an installed CLI run inside somebody's
// checkout never picks up that checkout's demo config. A checkout is a package root named
// polydev-reconciler that holds the TypeScript sources; an installed copy (/opt, the image) ships
// only the compiled build, so it never takes step 4.

import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const ETC_CONFIG = '/etc/polydev/polydev-reconciler.yaml';
/** The demo's base config, relative to the checkout's root. */
export const CHECKOUT_CONFIG = path.join('manifests', 'config', 'polydev-reconciler.yaml');
/** The config a running demo (`npm start`, scripts/demo.ts) generated for its sandbox, relative to the checkout's root. */
export const DEMO_CONFIG = path.join('var', 'demo', 'polydev-reconciler.yaml');

export type ConfigOrigin = '--config' | 'POLYDEV_CONFIG' | 'etc' | 'demo' | 'checkout' | 'none';

export interface ConfigChoice {
  /** Absolute path, or undefined: no file, built-in defaults. */
  file: string | undefined;
  origin: ConfigOrigin;
}

export interface ConfigLookup {
  flag?: string | undefined;
  env?: NodeJS.ProcessEnv;
  /** Overridable for tests; ETC_CONFIG by default. */
  etcFile?: string;
  /** Where to start walking up to find a checkout; this module's directory by default. */
  from?: string;
}

/** The lookup order as the help text states it. */
export const CONFIG_LOOKUP_HELP = [
  'Config file: the first of --config FILE, $POLYDEV_CONFIG, /etc/polydev/polydev-reconciler.yaml',
  'and, when this CLI runs from a checkout of the project, its running demo\'s',
  'var/demo/polydev-reconciler.yaml, then manifests/config/polydev-reconciler.yaml; none of them:',
  'built-in defaults. Paths in a config file are relative to it. `polydev-reconciler config`',
  'shows which one is used.',
].join('\n');

export function findConfigFile(lookup: ConfigLookup = {}): ConfigChoice {
  if (lookup.flag !== undefined && lookup.flag !== '') return { file: path.resolve(lookup.flag), origin: '--config' };
  const fromEnv = (lookup.env ?? process.env).POLYDEV_CONFIG;
  if (fromEnv !== undefined && fromEnv !== '') return { file: path.resolve(fromEnv), origin: 'POLYDEV_CONFIG' };
  const etc = lookup.etcFile ?? ETC_CONFIG;
  if (present(etc)) return { file: etc, origin: 'etc' };
  const root = checkoutRoot(lookup.from ?? path.dirname(fileURLToPath(import.meta.url)));
  if (root !== undefined) {
    const running = path.join(root, DEMO_CONFIG);
    if (present(running)) return { file: running, origin: 'demo' };
    const base = path.join(root, CHECKOUT_CONFIG);
    if (present(base)) return { file: base, origin: 'checkout' };
  }
  return { file: undefined, origin: 'none' };
}

/**
 * Whether a config file is there. One the user may not read (root:polydev 0640 under a 0750
 * /etc/polydev) counts as there: loading it then says "permission denied", rather than the CLI
 * quietly falling back to defaults and reporting a database that does not exist.
 */
function present(file: string): boolean {
  try {
    fs.statSync(file);
    return true;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    return code !== 'ENOENT' && code !== 'ENOTDIR';
  }
}

/** The nearest ancestor of `from` that is a checkout of this project (package.json named polydev-reconciler, with src/main.ts). */
export function checkoutRoot(from: string): string | undefined {
  let dir = path.resolve(from);
  for (let depth = 0; depth < 8; depth++) {
    const manifest = path.join(dir, 'package.json');
    if (fs.existsSync(manifest)) {
      let name: unknown;
      try {
        name = (JSON.parse(fs.readFileSync(manifest, 'utf8')) as { name?: unknown }).name;
      } catch {
        name = undefined;
      }
      // The first package.json up the tree is this package's own: a checkout or an installed copy.
      return name === 'polydev-reconciler' && fs.existsSync(path.join(dir, 'src', 'main.ts')) ? dir : undefined;
    }
    const parent = path.dirname(dir);
    if (parent === dir) break;
    dir = parent;
  }
  return undefined;
}

/** How the config file was found, for messages: `--config`, `$POLYDEV_CONFIG`, ... */
export function howFound(choice: ConfigChoice): string {
  switch (choice.origin) {
    case '--config':
      return 'given by --config';
    case 'POLYDEV_CONFIG':
      return 'given by $POLYDEV_CONFIG';
    case 'etc':
      return 'the system config';
    case 'demo':
      return "the config of this checkout's running demo";
    case 'checkout':
      return "this checkout's demo config";
    case 'none':
      return `none found (--config, $POLYDEV_CONFIG, ${ETC_CONFIG}): built-in defaults`;
  }
}
