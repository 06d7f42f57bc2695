// `proxyport add | remove | check`: users' egress proxy ports, straight in the store.

import type { CliContext } from './context.js';
import { CliError, EXIT } from './errors.js';
import { table } from './output.js';

export async function add(ctx: CliContext, user: string, opts: { sourceIp: string; port?: number; pool?: string }): Promise<number> {
  const validator = await ctx.validator();
  const { ensureUserPort } = await import('../controllers/proxyport/service.js');
  return ctx.withStore('write', (store) => {
    const out = ensureUserPort(store, validator, { userId: user, sourceIP: opts.sourceIp, port: opts.port, pool: opts.pool }, 'api');
    ctx.io.out(`user ${user}: port ${out.port} in ProxyPool ${out.resource.spec.pool ?? 'default'} (${out.created ? 'created' : 'unchanged'}, ProxyPort ${out.resource.metadata.name})`);
    return EXIT.OK;
  });
}

export async function remove(ctx: CliContext, user: string): Promise<number> {
  const { removeUserPort } = await import('../controllers/proxyport/service.js');
  return ctx.withStore('read', (store) => {
    const res = removeUserPort(store, user);
    if (!res) throw new CliError(`user ${user} has no ProxyPort`, EXIT.PROBLEMS);
    ctx.io.out(`user ${user}: ProxyPort ${res.metadata.name} deleted (rule removed at the next reconcile)`);
    return EXIT.OK;
  });
}

export async function check(ctx: CliContext, user: string | undefined): Promise<number> {
  const [{ findPortByUser }, { ProxyHealthChecker }, { Metrics }, { silentLogger }, { formatDuration }] = await Promise.all([
    import('../controllers/proxyport/service.js'),
    import('../controllers/proxyport/health.js'),
    import('../observability/metrics.js'),
    import('../observability/logger.js'),
    import('../util/duration.js'),
  ]);
  return ctx.withStore('read', async (store) => {
    if (user && !findPortByUser(store, user)) throw new CliError(`user ${user} has no ProxyPort`, EXIT.PROBLEMS);
    const checker = new ProxyHealthChecker(store, new Metrics({ processMetrics: false }), silentLogger());
    const summary = await checker.check(user ? { userIds: [user] } : {});
    ctx.io.out(table(['USER', 'PORT', 'HEALTHY', 'LATENCY', 'EGRESS-IP', 'FAILURES', 'ERROR'], summary.results.map((r) => [
      r.userId, String(r.port), String(r.healthy), r.latencyMs === null ? '-' : formatDuration(r.latencyMs), r.egressIP ?? '-', String(r.consecutiveFailures), r.error ?? '',
    ])));
    ctx.io.out(`${summary.total} checked: ${summary.healthy} healthy, ${summary.unhealthy} unhealthy`);
    return summary.unhealthy > 0 ? EXIT.PROBLEMS : EXIT.OK;
  });
}
