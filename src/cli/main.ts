// The command line: commander's program, and each command's module imported when it runs.
//
// Start-up is most of what a read command costs, so nothing here loads more than commander and
// the few small modules below: `--help` parses arguments and prints, `get` adds the config, the
// store and a kinds snapshot, and only the commands that need them load the schema validator,
// the controllers, the daemon or the drivers (bench/cli.ts measures it).

import { Command, InvalidArgumentError, Option } from 'commander';
import type { ClaimOptions, ServerOptions } from './claims.js';
import type { ApplyOptions, CheckOptions } from './desired.js';
import type { RunOptions } from './run.js';
import { CONFIG_LOOKUP_HELP } from './config-file.js';
import { CliContext, type GlobalOptions } from './context.js';
import { CliError, EXIT, type Io } from './errors.js';
import type { OutputFormat } from './output.js';

export { EXIT };

const EXIT_CODES_HELP = [
  'Exit codes: 0 done, nothing to report; 1 problems found (validate, apply), differences (diff),',
  'changes to make (plan), not found (get, describe, delete), not converged or desired state',
  'rejected (run --once), or the daemon said no (claim, release); 2 usage, configuration or',
  'runtime error (unknown command or option, a missing file or database, an unreachable daemon).',
].join('\n');

const stdio: Io = { out: (t) => process.stdout.write(t + '\n'), err: (t) => process.stderr.write(t + '\n') };

export async function runCli(argv: string[], io: Io = stdio): Promise<number> {
  let exitCode: number = EXIT.OK;
  const program = new Command('polydev-reconciler')
    .description(
      'Keeps warm pools, per-user proxy ports and TURN servers converged to their declared state.\n' +
        'Most commands work on the SQLite store directly; claim and release go through the running daemon\'s API.',
    )
    .option('--db <path>', 'SQLite database (env POLYDEV_DB); overrides the config file')
    .option('--config <file>', 'config file (env POLYDEV_CONFIG; see below for where it is looked up otherwise)')
    .addHelpText('after', `\n${CONFIG_LOOKUP_HELP}\n\n${EXIT_CODES_HELP}`)
    .exitOverride()
    .configureOutput({ writeOut: (s) => io.out(s.trimEnd()), writeErr: (s) => io.err(s.trimEnd()) })
    .showHelpAfterError();

  const ctx = new CliContext(io, () => program.opts<GlobalOptions>());
  const action =
    <A extends unknown[]>(fn: (...args: A) => Promise<number>) =>
    async (...args: A) => {
      exitCode = await fn(...args);
    };
  const outputOption = () => new Option('-o, --output <format>', 'output format').choices(['table', 'wide', 'json', 'yaml']).default('table');

  program
    .command('run')
    .description('run the daemon (or, with --once, reconcile everything until converged and exit)')
    .option('--once', 'reconcile until converged or onceTimeout, then exit 0 (converged), or 1 (not converged, or the desired-state directory was rejected)')
    .option('--source <source>', 'where desired state comes from: files or kubernetes (overrides the config\'s source)')
    .option('--leader-elect', 'wait as a standby while another daemon holds the lease (overrides leaderElection.enabled)')
    .action(action(async (opts: RunOptions) => (await import('./run.js')).run(ctx, opts)));

  const checkOptions = (cmd: Command, would: string): Command =>
    cmd
      .option('--prune', `${would} resources of the applied kinds that are no longer in PATH`)
      .addOption(new Option('--max-prune <ratio>', 'largest share a prune may delete (0..1; default: the config\'s maxPrune)').argParser(parseRatio))
      .option('--force', 'prune even past --max-prune');

  checkOptions(
    program
      .command('validate')
      .description(
        'check desired-state YAML as apply would (schemas, references, free ports, prune limits), changing nothing; one line per problem. ' +
          "Checked against the config's database when it exists, else an empty one; the config's desiredStateDir is checked with prune, as the daemon applies it",
      )
      .requiredOption('-f, --filename <path>', 'file or directory'),
    'check the deletion of',
  )
    .option('--no-prune', 'do not check a prune, even of the desiredStateDir')
    .action(action(async (opts: { filename: string } & CheckOptions) => (await import('./desired.js')).validate(ctx, opts.filename, opts)));

  checkOptions(
    program
      .command('apply')
      .description('apply desired state all or nothing')
      .requiredOption('-f, --filename <path>', 'file or directory'),
    'delete',
  )
    .option('--dry-run', 'check everything, change nothing')
    .action(action(async (opts: { filename: string } & ApplyOptions) => (await import('./desired.js')).apply(ctx, opts.filename, opts)));

  program
    .command('get')
    .description('list resources of a kind, or one resource (claims: the open ones, newest first, unless --all)')
    .argument('<kind>', 'warmpools, proxypools, proxyports, turnservers, claims (singular, plural or short name)')
    .argument('[name]', 'one resource (for claims: the claim id)')
    .addOption(outputOption())
    .option('--pool <name>', 'claims: only those of this WarmPool')
    .option('--user <id>', 'claims: only those of this user')
    .option('--all', 'claims: ended ones (released, expired, failed) too')
    .action(action(async (kind: string, name: string | undefined, opts: { output: OutputFormat; pool?: string; user?: string; all?: boolean }) => (await import('./resources.js')).get(ctx, kind, name, opts)));

  program
    .command('describe')
    .description('a resource in full: spec, status, conditions and recent events (a WarmPool also its containers, open claims and claim stats; a claim by id)')
    .argument('<kind>')
    .argument('<name>')
    .action(action(async (kind: string, name: string) => (await import('./resources.js')).describe(ctx, kind, name)));

  program
    .command('render')
    .description('configuration for an outside server, from a resource: `render turnserver-conf NAME` prints a coturn config')
    .argument('<what>', 'turnserver-conf')
    .argument('<name>', 'TurnServer name')
    .option('-o, --output-file <file>', 'write it to FILE (mode 0600) with the credential filled in from the file the spec names')
    .action(action(async (what: string, name: string, opts: { outputFile?: string }) => (await import('./resources.js')).render(ctx, what, name, opts.outputFile)));

  program
    .command('diff')
    .description('desired YAML against the store; exit 0 same ("no differences"), 1 different, 2 error')
    .requiredOption('-f, --filename <path>', 'file or directory')
    .option('--prune', 'also show what apply --prune would delete')
    .action(action(async (opts: { filename: string; prune?: boolean }) => (await import('./desired.js')).diff(ctx, opts.filename, opts.prune ?? false)));

  program
    .command('plan')
    .description(
      "store against live state, what a reconcile would do now, changing nothing: ProxyPools and their ports by default (the rules in the config's iptables namespace); " +
        '`plan warmpool [NAME]` asks the pools\' engines (with the Nomad job a start registers), `plan turnserver [NAME]` probes the servers once. Exit 0 nothing to do, 1 changes, 2 error',
    )
    .argument('[kind]')
    .argument('[name]')
    .action(action(async (kind: string | undefined, name: string | undefined) => (await import('./plan.js')).plan(ctx, kind, name)));

  program
    .command('delete')
    .description('delete a resource (what it owns is torn down first)')
    .argument('<kind>')
    .argument('<name>')
    .action(action(async (kind: string, name: string) => (await import('./resources.js')).remove(ctx, kind, name)));

  program
    .command('events')
    .description('recent events, of all resources or of KIND/NAME')
    .argument('[resource]', 'KIND/NAME or KIND')
    .option('--limit <n>', 'how many', (v) => parsePositiveInt(v), 50)
    .action(action(async (resource: string | undefined, opts: { limit: number }) => (await import('./resources.js')).events(ctx, resource, opts.limit)));

  program
    .command('config')
    .description('which config file is used (and how it was found), and the settings the other commands act on')
    .action(action(async () => showConfig(ctx)));

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
    .action(action(async (pool: string, opts: ClaimOptions) => (await import('./claims.js')).claimCommand(pool, opts, await ctx.settings(), io)));

  serverOptions(
    program
      .command('release')
      .description('end a claim through the running daemon; its container is destroyed or recycled (exit 1: unknown claim)')
      .argument('<claim-id>'),
  ).action(action(async (claimId: string, opts: ServerOptions) => (await import('./claims.js')).releaseCommand(claimId, opts, await ctx.settings(), io)));

  const proxyport = program.command('proxyport').description("users' egress proxy ports");
  proxyport
    .command('add')
    .description('give a user a port (idempotent: the same user keeps the same port)')
    .argument('<user>')
    .requiredOption('--source-ip <ip>', "the user's VM or container address")
    .option('--port <n>', 'a specific port instead of the next free one', (v) => parsePositiveInt(v))
    .option('--pool <name>', 'ProxyPool (default: default)')
    .action(action(async (user: string, opts: { sourceIp: string; port?: number; pool?: string }) => (await import('./proxyport.js')).add(ctx, user, opts)));
  proxyport
    .command('remove')
    .description("remove a user's port (the port cools down before anyone else gets it)")
    .argument('<user>')
    .action(action(async (user: string) => (await import('./proxyport.js')).remove(ctx, user)));
  proxyport
    .command('check')
    .description('health-check ports through the upstream proxy now (all, or one user)')
    .argument('[user]')
    .action(action(async (user: string | undefined) => (await import('./proxyport.js')).check(ctx, user)));

  try {
    await program.parseAsync(argv, { from: 'user' });
    return exitCode;
  } catch (err) {
    return reportError(err, io);
  }
}

/** `config`: where the settings come from, and the ones that decide what the other commands touch. */
async function showConfig(ctx: CliContext): Promise<number> {
  const [{ howFound }, fs] = await Promise.all([import('./config-file.js'), import('node:fs')]);
  const cfg = await ctx.settings();
  const choice = ctx.configChoice();
  const kv = (k: string, v: string) => ctx.io.out(`${(k + ':').padEnd(18)}${v}`);
  kv('config', choice.file === undefined ? `<none>: ${howFound(choice)}` : `${choice.file} (${howFound(choice)})`);
  kv('database', `${cfg.database}${fs.existsSync(cfg.database) ? '' : ' (does not exist yet)'}${ctx.databaseOrigin().startsWith('given by') ? ` (${ctx.databaseOrigin()})` : ''}`);
  kv('source', cfg.source);
  if (cfg.source === 'files') kv('desiredStateDir', cfg.desiredStateDir ?? '<none>');
  kv('iptables netns', cfg.iptables.netns ?? "<none>: the host's own rules");
  kv('listen', `${cfg.listen.host}:${cfg.listen.port}`);
  return EXIT.OK;
}

/** Prints a failure as one `error:` line (or one per field) and gives its exit code. */
async function reportError(err: unknown, io: Io): Promise<number> {
  const e = err as { code?: string; message?: string };
  if (e.code === 'commander.helpDisplayed' || e.code === 'commander.version') return EXIT.OK;
  if (typeof e.code === 'string' && e.code.startsWith('commander.')) return EXIT.ERROR;
  if (err instanceof CliError) {
    io.err(`error: ${err.message}`);
    return err.exitCode;
  }
  // Loaded here, on the error path only, so that no command pays for the others' error classes at start-up.
  const [{ InvalidInputError }, { AdmissionError }, { HealthCheckError }, { ConfigError }, { LeaseHeldError }] = await Promise.all([
    import('../controllers/proxyport/service.js'),
    import('../desired/apply.js'),
    import('../controllers/proxyport/health.js'),
    import('../config.js'),
    import('../state/lease.js'),
  ]);
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
