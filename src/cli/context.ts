// What the commands share: the settings (config file found as config-file.ts says, then the
// environment, then flags), the store, the kinds and the validator, each made when a command
// first asks for it. Everything heavy is imported here on first use, never at start-up: `--help`
// loads nothing of it, `get` no schema validator, `plan` no daemon.

import fs from 'node:fs';
import type { Config } from '../config.js';
import type { DesiredStateValidator } from '../desired/validate.js';
import { plainFsError } from '../desired/problem.js';
import type { Store } from '../state/store.js';
import { findConfigFile, howFound, type ConfigChoice } from './config-file.js';
import { CliError, EXIT, type Io } from './errors.js';
import type { KindNames } from './kinds.js';

export interface GlobalOptions {
  db?: string;
  config?: string;
}

/**
 * How a command uses the database. `read`: it must exist (a read never leaves an empty database
 * behind, wherever it runs from). `check`: it is read when it exists, else an empty in-memory
 * store stands in (validate, apply --dry-run). `write`: created when missing (run, apply).
 */
export type StoreMode = 'read' | 'check' | 'write';

export class CliContext {
  private choice: ConfigChoice | undefined;
  private kindsCache: Map<string, KindNames> | undefined;
  private validatorCache: DesiredStateValidator | undefined;

  constructor(
    readonly io: Io,
    private readonly globals: () => GlobalOptions,
    private readonly env: NodeJS.ProcessEnv = process.env,
  ) {}

  /** The config file in use (looked up once). */
  configChoice(): ConfigChoice {
    return (this.choice ??= findConfigFile({ flag: this.globals().config, env: this.env }));
  }

  /** Settings: defaults, the config file, POLYDEV_* variables, --db, then the command's own overrides. */
  async settings(overrides: Partial<Record<string, string>> = {}): Promise<Config> {
    const { loadConfig } = await import('../config.js');
    const db = this.databaseFlag();
    return loadConfig(this.configChoice().file, this.env, { ...(db ? { database: db.value } : {}), ...overrides });
  }

  /** Where the database path came from, for messages: `given by --db`, `set by config FILE (...)`. */
  databaseOrigin(): string {
    const flag = this.databaseFlag();
    if (flag) return `given by ${flag.origin}`;
    if (this.env.POLYDEV_DATABASE) return 'given by $POLYDEV_DATABASE';
    const choice = this.configChoice();
    if (choice.file === undefined) return 'the built-in default; no config file was found';
    return `set by config ${choice.file}, ${howFound(choice)}`;
  }

  private databaseFlag(): { value: string; origin: string } | undefined {
    const flag = this.globals().db;
    if (flag) return { value: flag, origin: '--db' };
    const env = this.env.POLYDEV_DB;
    if (env) return { value: env, origin: '$POLYDEV_DB' };
    return undefined;
  }

  /** Throws the one-line error of a read command when the database does not exist. */
  requireDatabase(cfg: Config): void {
    if (!fs.existsSync(cfg.database)) {
      throw new CliError(`database ${cfg.database} does not exist (${this.databaseOrigin()}); \`run\` or \`apply\` creates it`);
    }
  }

  /** Opens the store of the settings (see StoreMode); the caller closes it. */
  async openStore(cfg: Config, mode: StoreMode): Promise<Store> {
    if (mode === 'read') this.requireDatabase(cfg);
    const { Store } = await import('../state/store.js');
    if (mode === 'check' && !fs.existsSync(cfg.database)) return new Store(':memory:');
    try {
      return new Store(cfg.database, { eventRetention: cfg.eventRetention });
    } catch (err) {
      throw new CliError(`cannot open the database ${cfg.database} (${this.databaseOrigin()}): ${plainFsError(err)}`);
    }
  }

  /** Runs fn with the store open (of `settings`, else of this.settings()), and closes it. */
  async withStore<T>(mode: StoreMode, fn: (store: Store, cfg: Config) => Promise<T> | T, settings?: Config): Promise<T> {
    const cfg = settings ?? (await this.settings());
    const store = await this.openStore(cfg, mode);
    try {
      return await fn(store, cfg);
    } finally {
      store.close();
    }
  }

  async kinds(): Promise<Map<string, KindNames>> {
    if (!this.kindsCache) {
      const { readKindNames } = await import('./kinds.js');
      this.kindsCache = await readKindNames();
    }
    return this.kindsCache;
  }

  /** The canonical kind name of `proxyport`, `pport`, `ProxyPorts`, ...; an unknown one is a usage error. */
  async kindArg(name: string): Promise<string> {
    const kinds = await this.kinds();
    const { resolveKindName } = await import('../desired/kinds.js');
    const kind = resolveKindName(kinds, name);
    if (!kind) throw new CliError(`unknown kind "${name}" (known: ${[...kinds.keys()].join(', ')})`);
    return kind;
  }

  async printerColumns(kind: string): Promise<KindNames['printerColumns']> {
    return (await this.kinds()).get(kind)?.printerColumns ?? [];
  }

  /** The CRD schema validator with every kind's checks (compiled per kind on first use). */
  async validator(): Promise<DesiredStateValidator> {
    if (!this.validatorCache) {
      const { createValidator } = await import('../controllers/registry.js');
      this.validatorCache = createValidator();
    }
    return this.validatorCache;
  }
}

/** A missing or unreadable -f path is a usage error (exit 2), said plainly. */
export function requirePath(target: string): void {
  try {
    fs.statSync(target);
  } catch (err) {
    throw new CliError(`${target}: ${plainFsError(err)}`, EXIT.ERROR);
  }
}
