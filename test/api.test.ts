// End-to-end tests of the HTTP API: a real daemon listening on 127.0.0.1:0 with a token
// file, iptables in a throwaway namespace, and (for health checks) real tinyproxy
// instances and an IP-echo server on loopback in the test's own namespace.

import test, { type ExecutionContext } from 'ava';

import type { Daemon, DaemonOptions } from '../src/daemon.js';
import { listAllocations } from '../src/state/allocations.js';
import {
  TOKEN,
  e2eEnv,
  manifest,
  metricValue,
  ruleOf,
  saveNat,
  startDaemon,
  userRules,
  waitFor,
  type E2eEnv,
  type PoolOptions,
} from './helpers/e2e-env.js';
import { startIpEcho } from './helpers/ip-echo.js';
import { freePort, startTinyproxy } from './helpers/tinyproxy.js';

const CONVERGE_MS = 30_000;

interface Api {
  base: string;
  request(method: string, path: string, opts?: { body?: unknown; token?: string | null; rawBody?: string; contentType?: string }): Promise<{ status: number; body: any }>;
  get(path: string): Promise<{ status: number; body: any }>;
  post(path: string, body: unknown, token?: string | null): Promise<{ status: number; body: any }>;
  del(path: string, token?: string | null): Promise<{ status: number; body: any }>;
}

function apiOf(daemon: Daemon): Api {
  const base = daemon.address!;
  const request: Api['request'] = async (method, path, opts = {}) => {
    const headers: Record<string, string> = {};
    const token = opts.token === undefined ? TOKEN : opts.token;
    if (token !== null) headers.authorization = `Bearer ${token}`;
    let body: string | undefined;
    if (opts.rawBody !== undefined) {
      body = opts.rawBody;
      headers['content-type'] = opts.contentType ?? 'application/json';
    } else if (opts.body !== undefined) {
      body = JSON.stringify(opts.body);
      headers['content-type'] = 'application/json';
    }
    // A guard against a hung request, not a speed check: 200 queued requests on a loaded CI machine take ~25 s.
    const res = await fetch(base + path, { method, headers, ...(body !== undefined ? { body } : {}), signal: AbortSignal.timeout(90_000) });
    const text = await res.text();
    let parsed: unknown = text;
    try {
      parsed = JSON.parse(text);
    } catch {
      /* not JSON (metrics) */
    }
    return { status: res.status, body: parsed };
  };
  return {
    base,
    request,
    get: (path) => request('GET', path, { token: null }),
    post: (path, body, token) => request('POST', path, { body, ...(token !== undefined ? { token } : {}) }),
    del: (path, token) => request('DELETE', path, token !== undefined ? { token } : {}),
  };
}

async function setup(
  t: ExecutionContext,
  o: { pool?: PoolOptions; config?: Record<string, unknown>; daemon?: DaemonOptions; token?: boolean } = {},
): Promise<{ env: E2eEnv; daemon: Daemon; api: Api }> {
  const env = await e2eEnv(t);
  env.writeDesired('pool.yaml', manifest(o.pool ?? {}, []));
  const cfgFile = env.writeConfig({
    desiredStateDir: env.desiredDir,
    ...(o.token === false ? {} : { apiTokenFile: env.tokenFile }),
    ...(o.config ?? {}),
  });
  const daemon = await startDaemon(t, cfgFile, o.daemon ?? {});
  const report = await daemon.waitConverged(CONVERGE_MS);
  t.true(report.converged, JSON.stringify(report.pending));
  return { env, daemon, api: apiOf(daemon) };
}

/** Everything a rejected call must leave alone: resources, allocations, the change feed. */
function storeState(daemon: Daemon): string {
  return JSON.stringify({
    resources: daemon.store.listResources().map((r) => [r.kind, r.metadata.name, r.metadata.generation, r.metadata.resourceVersion, r.spec, r.metadata.deletionTimestamp ?? null]),
    allocations: listAllocations(daemon.store),
    seq: daemon.store.latestChangeSeq(),
  });
}

// ---------------------------------------------------------------------------
// health, readiness, metrics

test('/healthz, /readyz and /metrics', async (t) => {
  const { api, daemon } = await setup(t);
  const h = await api.get('/healthz');
  t.is(h.status, 200);
  t.deepEqual(h.body, { status: 'ok' });
  const r = await api.get('/readyz');
  t.is(r.status, 200);
  t.is(r.body.status, 'ready');
  // One port so that the per-port gauges have something to say.
  t.is((await api.post('/api/v1/proxyports', { userId: 'alice', sourceIP: '127.0.0.11' })).status, 201);
  await daemon.waitConverged(CONVERGE_MS);
  const m = await fetch(`${api.base}/metrics`);
  t.is(m.status, 200);
  t.regex(m.headers.get('content-type') ?? '', /text\/plain/);
  const text = await m.text();
  for (const name of [
    'polydev_reconcile_total',
    'polydev_workqueue_depth',
    'polydev_iptables_restore_total',
    'polydev_proxy_ports',
    'polydev_resources',
    'polydev_drift_total',
    'polydev_reconciler_ready',
  ]) {
    t.regex(text, new RegExp(`^# TYPE ${name} `, 'm'), name);
  }
  t.true((metricValue(text, 'polydev_reconcile_total', { kind: 'ProxyPool', result: 'success' }) ?? 0) >= 1);
  t.true((metricValue(text, 'polydev_iptables_restore_total', { result: 'success' }) ?? 0) >= 1);
  t.is(metricValue(text, 'polydev_resources', { kind: 'ProxyPool', phase: 'Ready' }), 1);
  t.is(metricValue(text, 'polydev_resources', { kind: 'ProxyPort', phase: 'Ready' }), 1);
  t.is(metricValue(text, 'polydev_proxy_ports', { state: 'programmed' }), 1);
  t.is(metricValue(text, 'polydev_reconciler_ready'), 1);
  t.is(metricValue(text, 'polydev_workqueue_depth'), 0);
});

test('polydev_proxy_ports{state="programmed"} drops to 0 when the last port is deleted', async (t) => {
  const { api, daemon } = await setup(t);
  t.is((await api.post('/api/v1/proxyports', { userId: 'alice', sourceIP: '127.0.0.11' })).status, 201);
  await daemon.waitConverged(CONVERGE_MS);
  t.is(metricValue(await daemon.metrics.registry.metrics(), 'polydev_proxy_ports', { state: 'programmed' }), 1);
  t.is((await api.del('/api/v1/proxyports/alice')).status, 202);
  await waitFor('alice to be gone', async () => (await api.get('/api/v1/proxyports/alice')).status === 404);
  await daemon.waitConverged(CONVERGE_MS);
  const text = await daemon.metrics.registry.metrics();
  t.is(metricValue(text, 'polydev_resources', { kind: 'ProxyPort', phase: 'Ready' }) ?? 0, 0);
  // The gauge is set per phase found in the status table; a phase with no rows left keeps its old value.
  t.is(metricValue(text, 'polydev_proxy_ports', { state: 'programmed' }), 0);
});

test('/readyz is 503 NOT_READY until the first sync is done', async (t) => {
  const env = await e2eEnv(t);
  // An unresolvable upstream keeps the pool from converging, but the first sync still completes.
  env.writeDesired('pool.yaml', manifest({ host: 'nonexistent.invalid' }, []));
  const cfgFile = env.writeConfig({ desiredStateDir: env.desiredDir });
  const daemon = await startDaemon(t, cfgFile);
  const api = apiOf(daemon);
  const first = await api.get('/readyz');
  t.true(first.status === 503 || first.status === 200);
  if (first.status === 503) t.is(first.body.error.code, 'NOT_READY');
  await waitFor('readyz 200', async () => (await api.get('/readyz')).status === 200);
  t.is((await api.get('/healthz')).status, 200);
});

// ---------------------------------------------------------------------------
// authentication

test('mutating calls need the bearer token (401 UNAUTHORIZED); nothing changes without it', async (t) => {
  const { api, daemon } = await setup(t);
  t.is((await api.post('/api/v1/proxyports', { userId: 'alice', sourceIP: '127.0.0.11' })).status, 201);
  const before = storeState(daemon);
  const attempts: Array<[string, string, unknown, string | null]> = [
    ['POST', '/api/v1/proxyports', { userId: 'bob', sourceIP: '127.0.0.12' }, null],
    ['POST', '/api/v1/proxyports', { userId: 'bob', sourceIP: '127.0.0.12' }, 'wrong-token-0123456789abcdef'],
    ['POST', '/api/v1/proxyports', { userId: 'bob', sourceIP: '127.0.0.12' }, `${TOKEN}x`],
    ['POST', '/api/v1/proxyports', { userId: 'bob', sourceIP: '127.0.0.12' }, ''],
    ['POST', '/api/v1/proxyports/check', {}, null],
    ['DELETE', '/api/v1/proxyports/alice', undefined, null],
    ['DELETE', '/api/v1/proxyports/alice', undefined, 'nope'],
  ];
  for (const [method, path, body, token] of attempts) {
    const r = await api.request(method, path, { ...(body !== undefined ? { body } : {}), token });
    t.is(r.status, 401, `${method} ${path} token=${token}`);
    t.is(r.body.error?.code, 'UNAUTHORIZED');
  }
  // Basic auth or a token without "Bearer" is not accepted either.
  const basic = await fetch(`${api.base}/api/v1/proxyports`, {
    method: 'POST',
    headers: { authorization: `Basic ${Buffer.from(`x:${TOKEN}`).toString('base64')}`, 'content-type': 'application/json' },
    body: JSON.stringify({ userId: 'bob', sourceIP: '127.0.0.12' }),
  });
  t.is(basic.status, 401);
  const bare = await fetch(`${api.base}/api/v1/proxyports`, {
    method: 'POST',
    headers: { authorization: TOKEN, 'content-type': 'application/json' },
    body: JSON.stringify({ userId: 'bob', sourceIP: '127.0.0.12' }),
  });
  t.is(bare.status, 401);
  t.is(storeState(daemon), before);
  // Reads need no token.
  t.is((await api.get('/api/v1/proxyports/alice')).status, 200);
});

test('without apiTokenFile every mutating call is refused with 403', async (t) => {
  const { api, daemon } = await setup(t, { token: false });
  const before = storeState(daemon);
  for (const token of [null, TOKEN]) {
    const r = await api.post('/api/v1/proxyports', { userId: 'alice', sourceIP: '127.0.0.11' }, token);
    t.is(r.status, 403);
    t.is(r.body.error.code, 'API_TOKEN_NOT_CONFIGURED');
    t.is((await api.del('/api/v1/proxyports/alice', token)).status, 403);
    t.is((await api.post('/api/v1/proxyports/check', {}, token)).status, 403);
  }
  t.is(storeState(daemon), before);
  t.is((await api.get('/api/v1/proxyports')).status, 200);
});

// ---------------------------------------------------------------------------
// POST /api/v1/proxyports

test('POST /api/v1/proxyports: created, idempotent, distinct ports, conflicts and invalid input', async (t) => {
  const { env, api, daemon } = await setup(t);
  const a = await api.post('/api/v1/proxyports', { userId: 'alice', sourceIP: '127.0.0.11' });
  t.is(a.status, 201);
  t.is(a.body.userId, 'alice');
  t.is(a.body.created, true);
  t.is(a.body.pool, 'default');
  t.true(Number.isInteger(a.body.port) && a.body.port >= 10001 && a.body.port <= 19999);
  const again = await api.post('/api/v1/proxyports', { userId: 'alice', sourceIP: '127.0.0.11' });
  t.is(again.status, 200);
  t.is(again.body.port, a.body.port);
  t.is(again.body.created, false);
  const b = await api.post('/api/v1/proxyports', { userId: 'bob', sourceIP: '127.0.0.12' });
  t.is(b.status, 201);
  t.not(b.body.port, a.body.port);
  const explicit = await api.post('/api/v1/proxyports', { userId: 'erin', sourceIP: '127.0.0.15', port: 15555 });
  t.is(explicit.status, 201);
  t.is(explicit.body.port, 15555);

  const before = storeState(daemon);
  const rejected: Array<[unknown, number, string, RegExp | undefined]> = [
    [{ userId: 'carol', sourceIP: '127.0.0.13', port: a.body.port }, 409, 'PORT_TAKEN', /port/],
    [{ userId: 'carol', sourceIP: '127.0.0.11' }, 409, 'SOURCE_IN_USE', /sourceIP/],
    [{ userId: 'alice', sourceIP: '127.0.0.11', port: b.body.port }, 409, 'USER_HAS_PORT', undefined],
    [{ userId: 'carol', sourceIP: '10.0.0.300' }, 400, 'INVALID', /sourceIP/],
    [{ userId: 'carol', sourceIP: '1.2.3.4; rm -rf /' }, 400, 'INVALID', /sourceIP/],
    [{ userId: 'carol', sourceIP: '::1' }, 400, 'INVALID', /sourceIP/],
    [{ userId: 'carol', sourceIP: '010.0.0.1' }, 400, 'INVALID', /sourceIP/],
    [{ userId: 'carol', sourceIP: 42 }, 400, 'INVALID', /sourceIP/],
    [{ userId: 'carol' }, 400, 'INVALID', /sourceIP/],
    [{ userId: 'carol', sourceIP: '127.0.0.13', port: 70000 }, 400, 'INVALID', /port/],
    [{ userId: 'carol', sourceIP: '127.0.0.13', port: 'abc' }, 400, 'INVALID', /port/],
    [{ userId: 'carol', sourceIP: '127.0.0.13', port: 10001.5 }, 400, 'INVALID', /port/],
    [{ userId: 'carol', sourceIP: '127.0.0.13', port: 80 }, 400, 'INVALID', /port/],
    [{ userId: 'carol', sourceIP: '127.0.0.13', pool: 'nope' }, 404, 'POOL_NOT_FOUND', /pool/],
    [{ userId: 'carol', sourceIP: '127.0.0.13', pool: 'Bad Pool' }, 400, 'INVALID', /pool/],
    [{ userId: 'carol smith', sourceIP: '127.0.0.13' }, 400, 'INVALID', /userId/],
    [{ userId: 'carol"x', sourceIP: '127.0.0.13' }, 400, 'INVALID', /userId/],
    [{ userId: '', sourceIP: '127.0.0.13' }, 400, 'INVALID', /userId/],
    [{ userId: 'c'.repeat(129), sourceIP: '127.0.0.13' }, 400, 'INVALID', /userId/],
    [{ userId: 'carol', sourceIP: '127.0.0.13', prot: 12345 }, 400, 'INVALID', /prot/],
    [{ sourceIP: '127.0.0.13' }, 400, 'INVALID', /userId/],
    [[{ userId: 'carol', sourceIP: '127.0.0.13' }], 400, 'INVALID', undefined],
    ['carol', 400, 'INVALID', undefined],
  ];
  for (const [body, status, code, field] of rejected) {
    const r = await api.post('/api/v1/proxyports', body);
    const what = JSON.stringify(body).slice(0, 80);
    t.is(r.status, status, `${what}: ${JSON.stringify(r.body)}`);
    t.is(r.body.error?.code, code, what);
    t.is(typeof r.body.error?.message, 'string', what);
    if (field) {
      const fields = (r.body.error?.details ?? []).map((d: { field: string }) => d.field).join(' ');
      t.regex(fields, field, `${what}: details ${JSON.stringify(r.body.error?.details)}`);
    }
    t.is(storeState(daemon), before, `${what}: the store is unchanged`);
  }
  // Malformed JSON and a non-JSON content type.
  const bad = await api.request('POST', '/api/v1/proxyports', { rawBody: '{"userId": "carol", ' });
  t.is(bad.status, 400);
  t.is(typeof bad.body.error?.code, 'string');
  const text = await api.request('POST', '/api/v1/proxyports', { rawBody: 'userId=carol', contentType: 'text/plain' });
  t.true(text.status === 415 || text.status === 400, String(text.status));
  t.is(storeState(daemon), before);

  // The accepted ones (and only they) are programmed.
  await daemon.waitConverged(CONVERGE_MS);
  const rules = userRules(await saveNat(env.ns));
  t.deepEqual(rules.map((l) => /user:(\S+)"/.exec(l)![1]).sort(), ['alice', 'bob', 'erin']);
  t.true(ruleOf(rules.join('\n'), 'erin')!.endsWith('127.0.0.1:15555'));
});

// Serial: it runs before the concurrent tests of this file, alone in its worker. The burst makes the
// pool reconcile back to back (each run forks iptables-save, iptables-restore and sysctl from the
// worker's event loop, which also serves the 200 requests); with two more daemons of this file
// polling beside it on a machine running two suites at once, single requests waited out the 90 s
// guard. How fast a burst is served is for a benchmark; here every request must get its port.
test.serial('POST /api/v1/proxyports: 200 concurrent requests for distinct users get 200 distinct ports, all programmed', async (t) => {
  const { env, api, daemon } = await setup(t);
  const n = 200;
  const started = Date.now();
  const took: number[] = [];
  const results = await Promise.all(
    Array.from({ length: n }, async (_, i) => {
      const r = await api.post('/api/v1/proxyports', { userId: `user-${i}`, sourceIP: `127.2.${Math.floor(i / 250)}.${(i % 250) + 1}` });
      took.push(Date.now() - started);
      return r;
    }),
  );
  t.log(`${n} concurrent POSTs took ${Date.now() - started} ms (first answer ${Math.min(...took)} ms); iptables ${JSON.stringify(daemon.iptables.stats)}`);
  t.deepEqual(results.map((r) => r.status).filter((s) => s !== 201), []);
  const ports = results.map((r) => r.body.port as number);
  t.is(new Set(ports).size, n);
  t.true(ports.every((p) => p >= 10001 && p <= 19999));
  const report = await daemon.waitConverged(CONVERGE_MS);
  t.true(report.converged, JSON.stringify(report.pending.slice(0, 5)));
  const rules = userRules(await saveNat(env.ns));
  t.is(rules.length, n);
  for (let i = 0; i < n; i += 37) t.true(ruleOf(rules.join('\n'), `user-${i}`)?.endsWith(`127.0.0.1:${ports[i]}`), `user-${i}`);
  // Each one again: same port, 200.
  const again = await Promise.all(results.slice(0, 20).map((_r, i) => api.post('/api/v1/proxyports', { userId: `user-${i}`, sourceIP: `127.2.0.${i + 1}` })));
  t.deepEqual(again.map((r) => r.status), Array(20).fill(200));
  t.deepEqual(again.map((r) => r.body.port), ports.slice(0, 20));
});

test('POST /api/v1/proxyports: concurrent requests for the same user agree on one port; a new sourceIP moves the rule', async (t) => {
  const { env, api, daemon } = await setup(t);
  const rs = await Promise.all(Array.from({ length: 20 }, () => api.post('/api/v1/proxyports', { userId: 'alice', sourceIP: '127.0.0.11' })));
  t.deepEqual(rs.map((r) => r.status).sort(), [...Array(19).fill(200), 201]);
  t.is(new Set(rs.map((r) => r.body.port)).size, 1);
  const port = rs[0]!.body.port as number;
  await daemon.waitConverged(CONVERGE_MS);
  t.regex(ruleOf(await saveNat(env.ns), 'alice')!, /^-A POLYDEV-PROXY -s 127\.0\.0\.11\/32 /);

  const moved = await api.post('/api/v1/proxyports', { userId: 'alice', sourceIP: '127.0.0.21' });
  t.is(moved.status, 200);
  t.is(moved.body.port, port);
  t.is(moved.body.sourceIP, '127.0.0.21');
  await waitFor('the rule to follow the new source', async () => /^-A POLYDEV-PROXY -s 127\.0\.0\.21\/32 /.test(ruleOf(await saveNat(env.ns), 'alice') ?? ''));
  t.is(userRules(await saveNat(env.ns)).length, 1);
  // The old address is free again.
  t.is((await api.post('/api/v1/proxyports', { userId: 'bob', sourceIP: '127.0.0.11' })).status, 201);
});

test('POST /api/v1/proxyports for a user whose port is being removed is 409 DELETING, then works once it is gone', async (t) => {
  const { api, daemon } = await setup(t);
  const a = await api.post('/api/v1/proxyports', { userId: 'alice', sourceIP: '127.0.0.11' });
  await daemon.waitConverged(CONVERGE_MS);
  // Right after the DELETE the rule is usually still being removed: 409 DELETING (a very fast
  // worker may already be done, then it is a plain re-create).
  t.is((await api.del('/api/v1/proxyports/alice')).status, 202);
  const r = await api.post('/api/v1/proxyports', { userId: 'alice', sourceIP: '127.0.0.11' });
  if (r.status === 409) {
    t.is(r.body.error.code, 'DELETING');
    await waitFor('alice to be gone', async () => (await api.get('/api/v1/proxyports/alice')).status === 404);
    t.is((await api.post('/api/v1/proxyports', { userId: 'alice', sourceIP: '127.0.0.11' })).status, 201);
  } else {
    t.is(r.status, 201, JSON.stringify(r.body));
  }
  t.true((await daemon.waitConverged(CONVERGE_MS)).converged);
  t.is((await api.get('/api/v1/proxyports/alice')).body.status.port, a.body.port);
});

// ---------------------------------------------------------------------------
// reads

test('GET proxyports by user, lists, pools; 404s with stable codes', async (t) => {
  const { api, daemon } = await setup(t);
  const a = await api.post('/api/v1/proxyports', { userId: 'alice', sourceIP: '127.0.0.11' });
  const odd = await api.post('/api/v1/proxyports', { userId: 'Carol.Smith@example.com', sourceIP: '127.0.0.13' });
  t.is(odd.status, 201);
  t.regex(odd.body.name, /^u-[0-9a-f]{16}$/);
  await daemon.waitConverged(CONVERGE_MS);

  const one = await api.get('/api/v1/proxyports/alice');
  t.is(one.status, 200);
  t.is(one.body.kind, 'ProxyPort');
  t.is(one.body.apiVersion, 'polydev.ai/v1alpha1');
  t.is(one.body.spec.userId, 'alice');
  t.is(one.body.status.port, a.body.port);
  t.is(one.body.status.rulePresent, true);
  t.is(one.body.status.phase, 'Ready');
  const byOdd = await api.get(`/api/v1/proxyports/${encodeURIComponent('Carol.Smith@example.com')}`);
  t.is(byOdd.status, 200);
  t.is(byOdd.body.spec.userId, 'Carol.Smith@example.com');

  const list = await api.get('/api/v1/proxyports');
  t.is(list.status, 200);
  t.is(list.body.kind, 'ProxyPortList');
  t.deepEqual(list.body.items.map((i: { spec: { userId: string } }) => i.spec.userId).sort(), ['Carol.Smith@example.com', 'alice']);
  for (const alias of ['proxyport', 'ProxyPort', 'pport']) {
    const r = await api.get(`/api/v1/${alias}`);
    t.is(r.status, 200, alias);
    t.is(r.body.items.length, 2, alias);
  }
  const pool = await api.get('/api/v1/proxypools/default');
  t.is(pool.status, 200);
  t.is(pool.body.kind, 'ProxyPool');
  t.is(pool.body.status.phase, 'Ready');
  t.is(pool.body.status.upstreamIP, '127.0.0.1');
  t.is(pool.body.status.ports.total, 2);
  t.is((await api.get('/api/v1/proxypools')).body.items.length, 1);

  for (const [url, code] of [
    ['/api/v1/proxyports/nobody', 'NOT_FOUND'],
    ['/api/v1/proxypools/nope', 'NOT_FOUND'],
    ['/api/v1/widgets', 'UNKNOWN_KIND'],
    ['/api/v1/widgets/x', 'UNKNOWN_KIND'],
    ['/api/v2/nothing', 'NOT_FOUND'],
  ] as const) {
    const r = await api.get(url);
    t.is(r.status, 404, url);
    t.is(r.body.error.code, code, url);
  }
});

// ---------------------------------------------------------------------------
// DELETE

test('DELETE /api/v1/proxyports/{userId}: 202, the rule goes, then the resource; the user gets the same port back later', async (t) => {
  const { env, api, daemon } = await setup(t);
  const a = await api.post('/api/v1/proxyports', { userId: 'alice', sourceIP: '127.0.0.11' });
  const b = await api.post('/api/v1/proxyports', { userId: 'bob', sourceIP: '127.0.0.12' });
  await daemon.waitConverged(CONVERGE_MS);
  t.truthy(ruleOf(await saveNat(env.ns), 'alice'));

  const d = await api.del('/api/v1/proxyports/alice');
  t.is(d.status, 202);
  t.is(d.body.status, 'deleting');
  t.is(d.body.userId, 'alice');
  await waitFor('alice\'s rule to go', async () => ruleOf(await saveNat(env.ns), 'alice') === undefined);
  await waitFor('GET alice to be 404', async () => (await api.get('/api/v1/proxyports/alice')).status === 404);
  t.truthy(ruleOf(await saveNat(env.ns), 'bob'), 'bob keeps his rule');
  t.is(listAllocations(daemon.store).find((x) => x.userId === 'alice')?.state, 'cooldown');

  const again = await api.del('/api/v1/proxyports/alice');
  t.is(again.status, 404);
  t.is(again.body.error.code, 'NOT_FOUND');

  // The port cools down for others, but its previous user gets it back.
  const taken = await api.post('/api/v1/proxyports', { userId: 'mallory', sourceIP: '127.0.0.66', port: a.body.port });
  t.is(taken.status, 409);
  t.is(taken.body.error.code, 'PORT_COOLING_DOWN');
  const back = await api.post('/api/v1/proxyports', { userId: 'alice', sourceIP: '127.0.0.11' });
  t.is(back.status, 201);
  t.is(back.body.port, a.body.port);
  t.not(back.body.port, b.body.port);
  await waitFor('alice\'s rule to be back', async () => ruleOf(await saveNat(env.ns), 'alice'));
});

// ---------------------------------------------------------------------------
// health checks through real tinyproxy instances

async function healthSetup(t: ExecutionContext, healthCheck: Record<string, unknown>, daemonOptions: DaemonOptions = {}) {
  const echo = await startIpEcho();
  t.teardown(() => echo.close());
  const proxies = [];
  for (let i = 0; i < 2; i++) {
    // Port 0: the helper picks a free port and picks again if another process took it first.
    const proxy = await startTinyproxy({ port: 0, bind: '127.0.0.2', connectPorts: [echo.port] });
    t.teardown(() => proxy.stop());
    proxies.push(proxy);
  }
  const [p1, p2] = proxies.map((p) => p.port);
  const p3 = await freePort(); // nothing listens there: carol's checks fail
  const { env, api, daemon } = await setup(t, {
    // A generous check timeout: on a loaded test machine a short one can miss through tinyproxy,
    // and the failures these tests provoke are refused connections, which are immediate anyway.
    pool: { portRange: { min: 1024, max: 65535 }, healthCheck: { url: echo.url, mode: 'forward', timeout: '10s', ...healthCheck } },
    daemon: daemonOptions,
  });
  const users = [
    { userId: 'alice', sourceIP: '127.0.0.11', port: p1 },
    { userId: 'bob', sourceIP: '127.0.0.12', port: p2 },
    { userId: 'carol', sourceIP: '127.0.0.13', port: p3 },
  ];
  for (const u of users) {
    const r = await api.post('/api/v1/proxyports', u);
    t.is(r.status, 201, JSON.stringify(r.body));
    t.is(r.body.port, u.port);
  }
  const report = await daemon.waitConverged(CONVERGE_MS);
  t.true(report.converged, JSON.stringify(report.pending));
  return { env, api, daemon, echo, proxies, users };
}

test('POST /api/v1/proxyports/check: two users behind real tinyproxies are healthy (egress 127.0.0.2), one is not', async (t) => {
  // No periodic ticks: only the explicit checks below count.
  const { api, daemon, echo } = await healthSetup(t, { failureThreshold: 1, interval: '1h' }, { healthTickMs: 3_600_000 });
  const before = Date.now();
  const r = await api.post('/api/v1/proxyports/check', {});
  t.is(r.status, 200, JSON.stringify(r.body));
  t.is(r.body.total, 3);
  t.is(r.body.healthy, 2);
  t.is(r.body.unhealthy, 1);
  const by = new Map<string, any>(r.body.results.map((x: { userId: string }) => [x.userId, x]));
  for (const u of ['alice', 'bob']) {
    t.is(by.get(u).healthy, true, u);
    t.is(by.get(u).egressIP, '127.0.0.2', u);
    t.is(typeof by.get(u).latencyMs, 'number', u);
    t.true(by.get(u).latencyMs >= 0, 'a measured latency (how fast is for the benchmark)');
    t.is(by.get(u).consecutiveFailures, 0);
  }
  t.is(by.get('carol').healthy, false);
  t.is(by.get('carol').latencyMs, null);
  t.is(typeof by.get('carol').error, 'string');
  t.true(by.get('carol').consecutiveFailures >= 1);
  t.true(echo.requests >= 2);

  // Statuses carry the result.
  for (const u of ['alice', 'bob', 'carol']) {
    const s = (await api.get(`/api/v1/proxyports/${u}`)).body.status;
    t.truthy(s.health, u);
    t.is(s.health.healthy, u !== 'carol', u);
    t.true(Date.parse(s.health.lastVerifiedAt) >= before - 1000, u);
    if (u !== 'carol') t.is(s.health.egressIP, '127.0.0.2');
  }
  const pool = daemon.store.getResource('ProxyPool', 'default')!;
  t.like(pool.status?.ports as object, { healthy: 2, unhealthy: 1 });
  const text = await daemon.metrics.registry.metrics();
  t.is(metricValue(text, 'polydev_proxy_ports', { state: 'healthy' }), 2);
  t.is(metricValue(text, 'polydev_proxy_ports', { state: 'unhealthy' }), 1);

  // One user; an unknown user; a bad body.
  const one = await api.post('/api/v1/proxyports/check', { userIds: ['alice'] });
  t.is(one.status, 200);
  t.is(one.body.total, 1);
  t.is(one.body.results[0].egressIP, '127.0.0.2');
  const unknown = await api.post('/api/v1/proxyports/check', { userIds: ['nobody'] });
  t.is(unknown.status, 404);
  t.is(unknown.body.error.code, 'NOT_FOUND');
  const bad = await api.post('/api/v1/proxyports/check', { userIds: 'alice' });
  t.is(bad.status, 400);
  t.is(bad.body.error.code, 'INVALID');
  const byPool = await api.post('/api/v1/proxyports/check', { pool: 'default' });
  t.is(byPool.body.total, 3);
});

test('health: a healthy port turns unhealthy only after failureThreshold failures in a row', async (t) => {
  const { api, proxies } = await healthSetup(t, { failureThreshold: 2, interval: '1h' }, { healthTickMs: 3_600_000 });
  const first = await api.post('/api/v1/proxyports/check', { userIds: ['alice'] });
  t.is(first.body.results[0].healthy, true);
  await proxies[0]!.stop();
  const fail1 = await api.post('/api/v1/proxyports/check', { userIds: ['alice'] });
  t.is(fail1.body.results[0].healthy, true, `one failure is not an outage: ${JSON.stringify(fail1.body)}`);
  t.is(fail1.body.results[0].consecutiveFailures, 1);
  const fail2 = await api.post('/api/v1/proxyports/check', { userIds: ['alice'] });
  t.is(fail2.body.results[0].healthy, false);
  t.is(fail2.body.results[0].consecutiveFailures, 2);
  const s = (await api.get('/api/v1/proxyports/alice')).body.status;
  t.is(s.health.healthy, false);
  t.is(s.health.egressIP, '127.0.0.2', 'the last known egress IP is kept');
});

test('health: the periodic check fills in statuses without an explicit call', async (t) => {
  const { api, daemon } = await healthSetup(t, { failureThreshold: 1, interval: '1s' }, { healthTickMs: 100 });
  const health = async (u: string) => (await api.get(`/api/v1/proxyports/${u}`)).body.status.health;
  await waitFor('all three ports to have a health result', async () => (await Promise.all(['alice', 'bob', 'carol'].map(health))).every(Boolean));
  await waitFor('alice to be reported healthy by a periodic check', async () => (await health('alice')).healthy === true, 15_000);
  t.is((await health('alice')).egressIP, '127.0.0.2');
  t.is((await health('carol')).healthy, false);
  const at = (await health('bob')).lastVerifiedAt;
  await waitFor('a second periodic check', async () => (await health('bob')).lastVerifiedAt !== at, 10_000);
  t.like(daemon.store.getResource('ProxyPool', 'default')!.status?.ports as object, { healthy: 2, unhealthy: 1 });
});
