import fs from 'node:fs';
import { Command, InvalidArgumentError, Option } from 'commander';
import YAML from 'yaml';
import { ConfigError, loadConfig, type Config } from '../config.js';
import { loadPoolDesired, planPool, ProxyPoolController } from '../controllers/proxypool/controller.js';
import { describeAction } from '../controllers/proxypool/rules.js';
import type { ProxyPortSpec } from '../controllers/proxypool/types.js';
import { poolOf } from '../controllers/proxyport/admission.js';
import { HealthCheckError, ProxyHealthChecker } from '../controllers/proxyport/health.js';
import { ensureUserPort, findPortByUser, InvalidInputError, removeUserPort } from '../controllers/proxyport/service.js';
import { ADMISSIONS, createValidator } from '../controllers/registry.js';
import { renderTurnserverConf } from '../controllers/turnserver/render.js';
import { CredentialsError, readSecretFile, type TurnServerSpec } from '../controllers/turnserver/types.js';
import { Daemon } from '../daemon.js';
import { AdmissionError, appliedFrom, applyPath } from '../desired/apply.js';
import { resolveKindName } from '../desired/kinds.js';
import { formatProblem, type DesiredStateValidator } from '../desired/validate.js';
import { IptablesDriver } from '../drivers/iptables.js';
import { createLogger, silentLogger } from '../observability/logger.js';
import { Metrics } from '../observability/metrics.js';
import { LeaseHeldError } from '../state/lease.js';
import { Store } from '../state/store.js';
import type { StoredResource } from '../state/types.js';
import { canonicalJson } from '../util/canonical-json.js';
import { lineDiff } from '../util/line-diff.js';
import { claimCommand, describeClaim, getClaims, releaseCommand, warmPoolSections, type ClaimOptions, type Io, type ServerOptions } from './claims.js';
import { planWarmPools } from './plan-warmpool.js';
import { age, CliError, eventsSection, EXIT, prefixLines, renderResources, table, type OutputFormat } from './output.js';

export { EXIT };

interface GlobalOptions {
  db?: string;
  config?: string;
}

export async function runCli(argv: string[], io: Io = { out: (t) => process.stdout.write(t + '\n'), err: (t) => process.stderr.write(t + '\n') }): Promise<number> {
  let exitCode: number = EXIT.OK;
  const program = new Command('polydev-reconciler')
    .description(
      'Keeps warm pools, per-user proxy ports and TURN servers converged to their declared state.\n' +
        'Most commands work on the SQLite store directly; claim and release go through the running daemon\'s API.',
    )
    .option('--db <path>', 'SQLite database (env POLYDEV_DB); overrides the config file')
    .option('--config <file>', 'config file (env POLYDEV_CONFIG)')
    .exitOverride()
    .configureOutput({ writeOut: (s) => io.out(s.trimEnd()), writeErr: (s) => io.err(s.trimEnd()) })
    .showHelpAfterError();

  const globals = (): GlobalOptions => program.opts<GlobalOptions>();
  const config = (): Config => {
    const g = globals();
    const db = g.db ?? process.env.POLYDEV_DB;
    return loadConfig(g.config ?? process.env.POLYDEV_CONFIG, process.env, db ? { database: db } : {});
  };
  let validatorCache: DesiredStateValidator | undefined;
  const validator = () => (validatorCache ??= createValidator());
  const withStore = async <T>(fn: (store: Store, cfg: Config) => Promise<T> | T): Promise<T> => {
    const cfg = config();
    const store = new Store(cfg.database, { eventRetention: cfg.eventRetention });
    try {
      return await fn(store, cfg);
    } finally {
      store.close();
    }
  };
  const kindArg = (name: string): string => {
    const kind = resolveKindName(validator().kinds, name);
    if (!kind) throw new CliError(`unknown kind "${name}" (known: ${[...validator().kinds.keys()].join(', ')})`);
    return kind;
  };
  const mustGet = (store: Store, kindName: string, name: string): StoredResource => {
    const kind = kindArg(kindName);
    const r = store.getResource(kind, name);
    if (!r) throw new CliError(`${kind} "${name}" not found`, EXIT.PROBLEMS);
    return r;
  };
  const action =
    <A extends unknown[]>(fn: (...args: A) => Promise<number | void> | number | void) =>
    async (...args: A) => {
      const code = await fn(...args);
      if (typeof code === 'number') exitCode = code;
    };

  program
    .command('run')
    .description('run the daemon (or, with --once, reconcile everything until converged and exit)')
    .option('--once', 'reconcile until converged or onceTimeout, then exit 0 (converged) or 1 (not)')
    .option('--source <source>', 'where desired state comes from: files or kubernetes (overrides the config\'s source)')
    .option('--leader-elect', 'wait as a standby while another daemon holds the lease (overrides leaderElection.enabled)')
    .action(
      action(async (opts: { once?: boolean; source?: string; leaderElect?: boolean }) => {
        const g = globals();
        const db = g.db ?? process.env.POLYDEV_DB;
        const cfg = loadConfig(g.config ?? process.env.POLYDEV_CONFIG, process.env, {
          ...(db ? { database: db } : {}),
          ...(opts.source !== undefined ? { source: opts.source } : {}),
          ...(opts.leaderElect ? { 'leaderElection.enabled': 'true' } : {}),
        });
        // A one-shot run never waits for a lease: it acts now or refuses because a daemon is running.
        if (opts.once) return runOnce({ ...cfg, leaderElection: { ...cfg.leaderElection, enabled: false } }, io);
        return runForever(cfg);
      }),
    );

  program
    .command('validate')
    .description('check desired-state YAML against the CRD schemas; one line per problem')
    .requiredOption('-f, --filename <path>', 'file or directory')
    .action(
      action((opts: { filename: string }) => {
        const result = validator().loadPath(opts.filename);
        for (const p of result.problems) io.out(formatProblem(p));
        if (result.problems.length > 0) return EXIT.PROBLEMS;
        io.out(`${result.resources.length} resource(s) in ${result.files.length} file(s) are valid`);
        return EXIT.OK;
      }),
    );

  program
    .command('apply')
    .description('apply desired state all or nothing')
    .requiredOption('-f, --filename <path>', 'file or directory')
    .option('--prune', 'delete resources of the applied kinds that are no longer in PATH')
    .option('--dry-run', 'check everything, change nothing')
    .addOption(new Option('--max-prune <ratio>', 'largest share a prune may delete (0..1)').argParser(parseRatio))
    .option('--force', 'prune even past --max-prune')
    .action(
      action((opts: { filename: string; prune?: boolean; dryRun?: boolean; maxPrune?: number; force?: boolean }) =>
        withStore((store, cfg) => {
          const result = applyPath(store, validator(), ADMISSIONS, opts.filename, {
            prune: opts.prune ?? false,
            dryRun: opts.dryRun ?? false,
            maxPrune: opts.maxPrune ?? cfg.maxPrune,
            force: opts.force ?? false,
          });
          for (const p of result.problems) io.err(formatProblem(p));
          if (!result.ok) {
            io.err('nothing was applied');
            return EXIT.PROBLEMS;
          }
          const suffix = opts.dryRun ? ' (dry run)' : '';
          for (const id of result.created) io.out(`${id.toLowerCase()} created${suffix}`);
          for (const id of result.configured) io.out(`${id.toLowerCase()} configured${suffix}`);
          for (const id of result.unchanged) io.out(`${id.toLowerCase()} unchanged${suffix}`);
          for (const id of result.pruned) io.out(`${id.toLowerCase()} pruned${suffix}`);
          return EXIT.OK;
        }),
      ),
    );

  program
    .command('get')
    .description('list resources of a kind, or one resource (claims: the open ones, newest first, unless --all)')
    .argument('<kind>', 'warmpools, proxypools, proxyports, claims, ... (singular, plural or short name)')
    .argument('[name]', 'one resource (for claims: the claim id)')
    .addOption(new Option('-o, --output <format>', 'output format').choices(['table', 'wide', 'json', 'yaml']).default('table'))
    .option('--pool <name>', 'claims: only those of this WarmPool')
    .option('--user <id>', 'claims: only those of this user')
    .option('--all', 'claims: ended ones (released, expired, failed) too')
    .action(
      action((kindName: string, name: string | undefined, opts: { output: OutputFormat; pool?: string; user?: string; all?: boolean }) =>
        withStore((store) => {
          const kind = kindArg(kindName);
          if (kind === 'Claim') return getClaims(store, validator().kinds.get(kind)!.printerColumns, name, opts, io);
          if (opts.pool !== undefined || opts.user !== undefined || opts.all) throw new CliError('--pool, --user and --all apply to claims only');
          const resources = name ? [mustGet(store, kind, name)] : store.listResources(kind);
          if (resources.length === 0 && (opts.output === 'table' || opts.output === 'wide')) {
            io.err(`no ${kind} resources`);
            return EXIT.OK;
          }
          io.out(renderResources(resources, validator().kinds.get(kind)!.printerColumns, opts.output, name !== undefined).trimEnd());
          return EXIT.OK;
        }),
      ),
    );

  program
    .command('describe')
    .description('a resource in full: spec, status, conditions and recent events (a WarmPool also its containers, open claims and claim stats; a claim by id)')
    .argument('<kind>')
    .argument('<name>')
    .action(
      action((kindName: string, name: string) =>
        withStore((store) => {
          const kind = kindArg(kindName);
          if (kind === 'Claim') {
            io.out(describeClaim(store, name));
            return EXIT.OK;
          }
          const r = mustGet(store, kind, name);
          io.out(describe(r, store, kind === 'WarmPool' ? warmPoolSections(store, name) : []));
          return EXIT.OK;
        }),
      ),
    );

  program
    .command('render')
    .description('configuration for an outside server, from a resource: `render turnserver-conf NAME` prints a coturn config')
    .argument('<what>', 'turnserver-conf')
    .argument('<name>', 'TurnServer name')
    .option('-o, --output-file <file>', 'write it to FILE (mode 0600) with the credential filled in from the file the spec names')
    .action(
      action((what: string, name: string, opts: { outputFile?: string }) =>
        withStore((store) => {
          if (what !== 'turnserver-conf') throw new CliError(`unknown thing to render "${what}" (known: turnserver-conf)`);
          const r = mustGet(store, 'TurnServer', name);
          const spec = r.spec as unknown as TurnServerSpec;
          if (!opts.outputFile) {
            io.out(renderTurnserverConf(name, spec).text.trimEnd());
            return EXIT.OK;
          }
          let secret: string;
          try {
            secret = spec.auth.mode === 'longTerm' ? readSecretFile(spec.auth.passwordFile, 'auth.passwordFile') : readSecretFile(spec.auth.secretFile, 'auth.secretFile');
          } catch (err) {
            if (err instanceof CredentialsError) throw new CliError(`TurnServer ${name}: ${err.message}`);
            throw err;
          }
          writePrivateFile(opts.outputFile, renderTurnserverConf(name, spec, secret).text);
          io.out(`wrote ${opts.outputFile} (mode 0600; it holds the ${spec.auth.mode === 'longTerm' ? 'password' : 'shared secret'})`);
          return EXIT.OK;
        }),
      ),
    );

  program
    .command('diff')
    .description('desired YAML against the store; exit 0 same, 1 different, 2 error')
    .requiredOption('-f, --filename <path>', 'file or directory')
    .option('--prune', 'also show what apply --prune would delete')
    .action(
      action((opts: { filename: string; prune?: boolean }) =>
        withStore((store) => {
          const loaded = validator().loadPath(opts.filename);
          if (loaded.problems.length > 0) {
            for (const p of loaded.problems) io.err(formatProblem(p));
            return EXIT.ERROR;
          }
          let differences = 0;
          const seen = new Set<string>();
          for (const r of loaded.resources) {
            seen.add(`${r.kind}/${r.name}`);
            const stored = store.getResource(r.kind, r.name);
            const want = { metadata: { name: r.name, labels: r.labels, annotations: r.annotations }, spec: r.spec };
            if (!stored) {
              differences++;
              io.out(`+++ ${r.kind}/${r.name} (new)`);
              io.out(prefixLines(YAML.stringify(want), '+ '));
              continue;
            }
            const have = { metadata: { name: stored.metadata.name, labels: stored.metadata.labels, annotations: stored.metadata.annotations }, spec: stored.spec };
            if (canonicalJson(have) === canonicalJson(want) && !stored.metadata.deletionTimestamp) continue;
            differences++;
            io.out(`--- ${r.kind}/${r.name} (stored, generation ${stored.metadata.generation})`);
            io.out(`+++ ${r.kind}/${r.name} (${r.file})`);
            io.out(lineDiff(YAML.stringify(sortedCopy(have)), YAML.stringify(sortedCopy(want))));
          }
          if (opts.prune) {
            const kinds = new Set(loaded.resources.map((r) => r.kind));
            for (const kind of kinds) {
              for (const s of store.listResources(kind)) {
                if (s.source !== 'apply' || !appliedFrom(s.sourceFile, opts.filename) || seen.has(`${kind}/${s.metadata.name}`) || s.metadata.deletionTimestamp) continue;
                differences++;
                io.out(`--- ${kind}/${s.metadata.name} (would be pruned)`);
              }
            }
          }
          return differences > 0 ? EXIT.PROBLEMS : EXIT.OK;
        }),
      ),
    );

  program
    .command('plan')
    .description('store against live state: what a reconcile would do now (ProxyPools and ports by default; `plan warmpool [NAME]` for pools, with the Nomad job a start registers); exit 0 nothing, 1 changes, 2 error')
    .argument('[kind]')
    .argument('[name]')
    .action(
      action((kindName: string | undefined, name: string | undefined) =>
        withStore(async (store, cfg) => {
          const kind = kindName ? kindArg(kindName) : undefined;
          const iptables = new IptablesDriver({ backend: cfg.iptables.backend, ...(cfg.iptables.netns ? { netns: cfg.iptables.netns } : {}) });
          const pools = new ProxyPoolController(store, iptables, new Metrics({ processMetrics: false }));
          let poolNames = store.listResources('ProxyPool').map((p) => p.metadata.name);
          let onlyUser: string | undefined;
          if (kind === 'ProxyPool' && name) poolNames = poolNames.filter((p) => p === name);
          if (kind === 'ProxyPort' && name) {
            const port = store.getResource<ProxyPortSpec>('ProxyPort', name);
            if (!port) throw new CliError(`ProxyPort "${name}" not found`, EXIT.PROBLEMS);
            poolNames = poolNames.filter((p) => p === poolOf(port.spec));
            onlyUser = port.spec.userId;
          }
          if (kind === 'WarmPool') {
            return (await planWarmPools(store, cfg, name, io)) > 0 ? EXIT.PROBLEMS : EXIT.OK;
          }
          if (kind && kind !== 'ProxyPool' && kind !== 'ProxyPort') {
            throw new CliError(`${kind} has no controller in this build; nothing to plan`);
          }
          if (name && poolNames.length === 0) throw new CliError(`${kind} "${name}" not found`, EXIT.PROBLEMS);
          let changes = 0;
          for (const poolName of poolNames) {
            const pool = store.getResource('ProxyPool', poolName)!;
            const desired = loadPoolDesired(store, pool);
            const observed = await pools.observe(desired);
            const actions = planPool(desired, observed).filter((a) => !onlyUser || ('userId' in a && a.userId === onlyUser));
            changes += actions.length;
            io.out(`ProxyPool/${poolName}: ${actions.length === 0 ? 'no changes' : `${actions.length} change(s)`}`);
            for (const a of actions) io.out(`  ${describeAction(a)}`);
          }
          return changes > 0 ? EXIT.PROBLEMS : EXIT.OK;
        }),
      ),
    );

  program
    .command('delete')
    .description('delete a resource (what it owns is torn down first)')
    .argument('<kind>')
    .argument('<name>')
    .action(
      action((kindName: string, name: string) =>
        withStore((store) => {
          if (kindArg(kindName) === 'Claim') throw new CliError(`claims are ended through the daemon: polydev-reconciler release ${name}`);
          const { kind } = mustGet(store, kindName, name);
          store.requestDeletion(kind, name);
          io.out(`${kind.toLowerCase()}/${name} deleted (the daemon tears down what it owns, then removes it)`);
          return EXIT.OK;
        }),
      ),
    );

  program
    .command('events')
    .description('recent events, of all resources or of KIND/NAME')
    .argument('[resource]', 'KIND/NAME or KIND')
    .option('--limit <n>', 'how many', (v) => parsePositiveInt(v), 50)
    .action(
      action((resource: string | undefined, opts: { limit: number }) =>
        withStore((store) => {
          let kind: string | undefined;
          let name: string | undefined;
          if (resource) {
            const [k, n] = resource.split('/');
            kind = k === 'DesiredState' ? k : kindArg(k!);
            name = n || undefined;
          }
          const events = store.listEvents({ ...(kind ? { kind } : {}), ...(name ? { name } : {}), limit: opts.limit });
          if (events.length === 0) {
            io.err('no events');
            return EXIT.OK;
          }
          io.out(table(['LAST SEEN', 'TYPE', 'REASON', 'OBJECT', 'COUNT', 'MESSAGE'], events.map((e) => [age(e.lastTimestamp), e.type, e.reason, `${e.kind}/${e.name}`, String(e.count), e.message])));
          return EXIT.OK;
        }),
      ),
    );

  const serverOptions = (cmd: Command): Command =>
    cmd
      .option('--server <url>', "the daemon's API (default: http://HOST:PORT of the config's listen)")
      .option('--token-file <file>', 'file holding the API bearer token (default: apiTokenFile, env POLYDEV_API_TOKEN_FILE)');

  serverOptions(
    program
      .command('claim')
      .description('bind a user to a container of a WarmPool (warm, or started now) through the running daemon')
      .argument('<pool>', 'WarmPool name')
      .requiredOption('--user <id>', 'the user the container is bound to')
      .option('--ttl <duration>', "lifetime of the claim, e.g. 30m or 2h (default: the pool's claim.ttl)")
      .option('--env <KEY=VALUE>', 'environment variable for the container (repeatable); never stored or printed', collect)
      .option('--env-file <file>', 'KEY=VALUE lines (# comments, literal values); --env wins over it')
      .option('--file <NAME=LOCALPATH>', "a local file's text, written to NAME in the container's secrets dir (repeatable)", collect)
      .addOption(new Option('-o, --output <format>', 'output format').choices(['table', 'json', 'yaml']).default('table')),
  )
    .addHelpText(
      'after',
      [
        '',
        'Exit codes: 0 claimed; 1 the daemon said no (pool unknown or being deleted, user at maxPerUser,',
        'pool exhausted: retry after the time it names); 2 anything else (daemon unreachable, bad token,',
        'the container failed to start). Prefer --env-file to --env for credentials: command lines are',
        'visible to other users of the machine (ps).',
        '',
        'Example:',
        '  polydev-reconciler claim claude --user alice --ttl 2h --env-file ./alice.env --file config.json=./cfg.json',
      ].join('\n'),
    )
    .action(action((pool: string, opts: ClaimOptions) => claimCommand(pool, opts, config(), io)));

  serverOptions(
    program
      .command('release')
      .description('end a claim through the running daemon; its container is destroyed or recycled (exit 1: unknown claim)')
      .argument('<claim-id>'),
  ).action(action((claimId: string, opts: ServerOptions) => releaseCommand(claimId, opts, config(), io)));

  const proxyport = program.command('proxyport').description("users' egress proxy ports");
  proxyport
    .command('add')
    .description('give a user a port (idempotent: the same user keeps the same port)')
    .argument('<user>')
    .requiredOption('--source-ip <ip>', "the user's VM or container address")
    .option('--port <n>', 'a specific port instead of the next free one', (v) => parsePositiveInt(v))
    .option('--pool <name>', 'ProxyPool (default: default)')
    .action(
      action((user: string, opts: { sourceIp: string; port?: number; pool?: string }) =>
        withStore((store) => {
          const out = ensureUserPort(store, validator(), { userId: user, sourceIP: opts.sourceIp, port: opts.port, pool: opts.pool }, 'api');
          io.out(`user ${user}: port ${out.port} in ProxyPool ${out.resource.spec.pool ?? 'default'} (${out.created ? 'created' : 'unchanged'}, ProxyPort ${out.resource.metadata.name})`);
          return EXIT.OK;
        }),
      ),
    );
  proxyport
    .command('remove')
    .description("remove a user's port (the port cools down before anyone else gets it)")
    .argument('<user>')
    .action(
      action((user: string) =>
        withStore((store) => {
          const res = removeUserPort(store, user);
          if (!res) throw new CliError(`user ${user} has no ProxyPort`, EXIT.PROBLEMS);
          io.out(`user ${user}: ProxyPort ${res.metadata.name} deleted (rule removed at the next reconcile)`);
          return EXIT.OK;
        }),
      ),
    );
  proxyport
    .command('check')
    .description('health-check ports through the upstream proxy now (all, or one user)')
    .argument('[user]')
    .action(
      action((user: string | undefined) =>
        withStore(async (store) => {
          if (user && !findPortByUser(store, user)) throw new CliError(`user ${user} has no ProxyPort`, EXIT.PROBLEMS);
          const checker = new ProxyHealthChecker(store, new Metrics({ processMetrics: false }), silentLogger());
          const summary = await checker.check(user ? { userIds: [user] } : {});
          io.out(table(['USER', 'PORT', 'HEALTHY', 'LATENCY', 'EGRESS-IP', 'FAILURES', 'ERROR'], summary.results.map((r) => [
            r.userId, String(r.port), String(r.healthy), r.latencyMs === null ? '-' : `${r.latencyMs}ms`, r.egressIP ?? '-', String(r.consecutiveFailures), r.error ?? '',
          ])));
          io.out(`${summary.total} checked: ${summary.healthy} healthy, ${summary.unhealthy} unhealthy`);
          return summary.unhealthy > 0 ? EXIT.PROBLEMS : EXIT.OK;
        }),
      ),
    );

  try {
    await program.parseAsync(argv, { from: 'user' });
    return exitCode;
  } catch (err) {
    const e = err as { code?: string; exitCode?: number; message?: string };
    if (e.code === 'commander.helpDisplayed' || e.code === 'commander.version') return EXIT.OK;
    if (typeof e.code === 'string' && e.code.startsWith('commander.')) return EXIT.ERROR;
    if (err instanceof CliError) {
      io.err(`error: ${err.message}`);
      return err.exitCode;
    }
    if (err instanceof InvalidInputError) {
      for (const p of err.problems) io.err(`error: ${p.field}: ${p.message}`);
      return EXIT.PROBLEMS;
    }
    if (err instanceof AdmissionError) {
      io.err(`error: ${err.field.join('.')}: ${err.message}`);
      return EXIT.PROBLEMS;
    }
    if (err instanceof HealthCheckError) {
      io.err(`error: ${err.message}`);
      return EXIT.PROBLEMS;
    }
    if (err instanceof ConfigError || err instanceof LeaseHeldError) {
      io.err(`error: ${err.message}`);
      return EXIT.ERROR;
    }
    io.err(`error: ${(err as Error).message}`);
    return EXIT.ERROR;
  }
}

async function runOnce(cfg: Config, io: Io): Promise<number> {
  const daemon = new Daemon(cfg, { serveApi: false, logger: createLogger(cfg.logLevel, 'stderr', cfg.logFormat) });
  await daemon.start();
  try {
    const report = await daemon.waitConverged(cfg.onceTimeoutMs);
    if (report.converged) {
      io.out(`converged: ${daemon.store.listKeys().length} resource(s)`);
      return EXIT.OK;
    }
    io.out(`not converged after ${cfg.onceTimeoutMs} ms:`);
    for (const p of report.pending) io.out(`  ${p.kind}/${p.name}: ${p.phase}: ${p.reason}`);
    return EXIT.PROBLEMS;
  } finally {
    await daemon.stop();
  }
}

async function runForever(cfg: Config): Promise<number> {
  const daemon = new Daemon(cfg);
  await daemon.start();
  return new Promise<number>((resolve) => {
    let stopping = false;
    const onSignal = (signal: NodeJS.Signals) => {
      if (stopping) return;
      stopping = true;
      daemon.logger.info('shutting down', { signal });
      // A second signal, or a shutdown that hangs, must still end the process: after the longest a
      // clean stop can take (shutdownTimeout, plus the status flush with source kubernetes) and a margin.
      const hard = setTimeout(() => process.exit(EXIT.PROBLEMS), daemon.stopBudgetMs + 1500);
      hard.unref();
      void daemon.stop().then(
        () => resolve(EXIT.OK),
        (err: Error) => {
          daemon.logger.error('shutdown failed', { error: err.message });
          resolve(EXIT.PROBLEMS);
        },
      );
    };
    process.once('SIGTERM', onSignal);
    process.once('SIGINT', onSignal);
  });
}

/** The generic description; `sections` (kind-specific blocks) go between the conditions and the events. */
function describe(r: StoredResource, store: Store, sections: string[] = []): string {
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
  const events = store.listEvents({ kind: r.kind, name: r.metadata.name, limit: 20 });
  lines.push(...eventsSection(events));
  return lines.join('\n');
}

function sortedCopy(v: unknown): unknown {
  return JSON.parse(canonicalJson(v));
}

/** Repeatable options (no default: commander would print `(default: [])` in the help). */
function collect(value: string, previous: string[] | undefined): string[] {
  return [...(previous ?? []), value];
}

function parsePositiveInt(v: string): number {
  if (!/^[0-9]+$/.test(v)) throw new InvalidArgumentError('must be a whole number');
  return Number(v);
}

function parseRatio(v: string): number {
  const n = Number(v);
  if (!Number.isFinite(n) || n < 0 || n > 1) throw new InvalidArgumentError('must be a number from 0 to 1');
  return n;
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
