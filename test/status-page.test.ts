// The status page (GET /) in a real headless Chromium (Debian's /usr/bin/chromium, driven by
// playwright-core; no browser is ever downloaded), against a real daemon whose WarmPool runs on
// the process engine. Plus the JSON summary builder (src/api/status.ts) on a real SQLite store.

import test, { type ExecutionContext } from 'ava';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium, type BrowserContext, type Page } from 'playwright-core';

import { MAX_PER_KIND, buildStatusSummary } from '../src/api/status.js';
import { ProcessEngine } from '../src/drivers/process.js';
import { claimContainer, installationId, recordStarted, reserveSlots } from '../src/state/pools.js';
import { setCondition } from '../src/state/types.js';
import { runBin, waitFor } from './helpers/e2e-env.js';
import { openStore } from './helpers/unit-fixtures.js';
import { poolEnv, type PoolEnv, type WarmPoolOptions } from './helpers/warmpool-env.js';

const CHROMIUM = '/usr/bin/chromium';

// What runs inside the page (the tsconfig has no DOM lib, so it is typed here, loosely).
interface PageGlobals {
  document: { querySelectorAll(selector: string): ArrayLike<{ dataset: Record<string, string | undefined>; cells: ArrayLike<{ textContent: string | null }> }> };
  __pwned?: number;
  __sameDocument?: boolean;
}

// Hang guard of every wait on the page (a passing wait costs only its own time): the page polls
// every 2 s, and on a loaded machine a process start, a poll and Chromium's rendering each take
// many times longer than alone.
const UI_WAIT_MS = 60_000;
const SECRET = 'sk-status-page-secret-0123456789';

// ---------------------------------------------------------------------------
// The summary builder

test('summary: phases, conditions, last drift, pool fill and port health from the store; specs (env, credential files) never copied', (t) => {
  const { store } = openStore(t);
  const now = '2026-01-01T00:00:00.000Z';
  store.upsertResource({
    kind: 'WarmPool', name: 'dev', source: 'apply',
    spec: { provider: 'openai', engine: 'process', command: ['sleep', '1'], size: 2, maxSize: 5, env: { API_KEY: SECRET } },
  });
  store.upsertResource({
    kind: 'ProxyPool', name: 'default', source: 'apply',
    spec: { portRange: { min: 10001, max: 10010 }, upstream: { host: 'proxy.example', scheme: 'http', credentialsFile: '/etc/polydev/secret-creds' }, destinationPorts: [80], healthCheck: { url: 'http://x/' } },
  });
  const ports: Array<[string, boolean | undefined, number | null]> = [['a', true, 10], ['b', true, 30], ['c', false, null], ['d', undefined, null]];
  for (const [user, healthy, latencyMs] of ports) {
    store.upsertResource({ kind: 'ProxyPort', name: user, source: 'api', spec: { userId: user, sourceIP: '10.0.0.1' } });
    store.setStatus('ProxyPort', user, {
      phase: 'Ready', conditions: [], port: 10001, pool: 'default',
      ...(healthy === undefined ? {} : { health: { healthy, latencyMs, consecutiveFailures: healthy ? 0 : 3, error: healthy ? undefined : 'timeout' } }),
    });
  }
  store.upsertResource({
    kind: 'TurnServer', name: 'turn1', source: 'apply',
    spec: { host: '127.0.0.1', ports: { stun: 3478 }, realm: 'r', auth: { mode: 'restSecret', secretFile: '/etc/polydev/turn-secret-file' } },
  });
  store.setStatus('TurnServer', 'turn1', {
    phase: 'Suspect', conditions: [], healthy: true, consecutiveFailures: 1, restarts: 2,
    lastProbe: { at: now, reachable: false, bindingLatencyMs: null, allocationLatencyMs: null, errorClass: 'timeout', error: 'no answer', transports: [{ transport: 'udp', reachable: false, errorClass: 'timeout' }] },
  });
  let conditions = setCondition([], { type: 'Ready', status: 'True', reason: 'Converged', message: 'desired state is in place' }, now);
  conditions = setCondition(conditions, { type: 'Degraded', status: 'False', reason: 'AsExpected', message: '' }, now);
  store.recordEvent({ kind: 'WarmPool', name: 'dev', type: 'Warning', reason: 'DriftDetected', message: 'drift found, repairing: 1 change(s): start w-1' });
  const driftAt = store.listEvents({ kind: 'WarmPool', name: 'dev' })[0]!.lastTimestamp;
  store.setStatus('WarmPool', 'dev', { phase: 'Ready', observedGeneration: 1, conditions, lastDriftAt: driftAt, failed: 1 });
  // Four containers: three came up warm, one is still starting; then one of the warm ones is claimed.
  store.transaction(() => {
    const slots = reserveSlots(store, 'dev', 5, ['s1', 's2', 's3', 's4'].map((slot) => ({ slot, name: `dev-${slot}`, specHash: 'h', engine: 'process' })), 1);
    for (const s of slots) recordStarted(store, s.slot, { id: `p:${s.slot}`, address: '127.0.0.1', ready: s.slot !== 's4' }, 1);
    claimContainer(store, {
      id: 'claim-1', pool: 'dev', userId: 'alice', maxPerUser: 1, maxSize: 5, now: Date.now(), expiresAt: Date.now() + 60_000,
      coldSlot: () => {
        throw new Error('a warm container was there');
      },
    });
  });

  const s = buildStatusSummary(store, { ready: true });
  t.true(s.ready);
  t.deepEqual(s.totals, { ProxyPool: 1, ProxyPort: 4, TurnServer: 1, WarmPool: 1 });
  const get = (kind: string, name: string) => s.resources.find((r) => r.kind === kind && r.name === name)!;

  const dev = get('WarmPool', 'dev');
  t.is(dev.phase, 'Ready');
  t.is(dev.observedGeneration, 1);
  t.deepEqual(dev.conditions.map((c) => [c.type, c.status, c.reason]), [['Degraded', 'False', 'AsExpected'], ['Ready', 'True', 'Converged']]);
  t.deepEqual(dev.lastDrift, { at: driftAt, message: 'drift found, repairing: 1 change(s): start w-1' });
  t.like(dev.details, { size: 2, maxSize: 5, warm: 2, claimed: 1, starting: 1, failed: 1, engine: 'process' });

  const pool = get('ProxyPool', 'default');
  t.is(pool.phase, 'Pending', 'no status yet');
  t.is(pool.lastDrift, null);
  t.deepEqual(pool.details.ports, { total: null, programmed: null, healthy: 2, unhealthy: 1, unchecked: 1 });
  t.deepEqual(pool.details.latencyMs, { p50: 10, max: 30 });
  t.is(pool.details.upstream, 'proxy.example');
  t.like(get('ProxyPort', 'c').details, { healthy: false, error: 'timeout', port: 10001 });

  const turn = get('TurnServer', 'turn1');
  t.is(turn.phase, 'Suspect');
  t.like(turn.details, { healthy: true, consecutiveFailures: 1, restarts: 2, lastProbe: { errorClass: 'timeout', reachable: false } });

  t.is(s.claims.open, 1);
  t.like(s.claims.items[0], { id: 'claim-1', pool: 'dev', userId: 'alice', phase: 'Bound', warm: true });
  t.deepEqual(s.events.map((e) => e.reason), ['DriftDetected']);
  const json = JSON.stringify(s);
  for (const secret of [SECRET, 'API_KEY', 'secret-creds', 'turn-secret-file', 'credentialsFile', 'secretFile']) t.false(json.includes(secret), secret);

  // A newer drift time than the kept event: the time is shown, the old event's words are not.
  store.setStatus('WarmPool', 'dev', { phase: 'Ready', conditions, lastDriftAt: '2999-01-01T00:00:00.000Z' });
  t.deepEqual(get2(store, 'WarmPool', 'dev').lastDrift, { at: '2999-01-01T00:00:00.000Z', message: null });
});

function get2(store: Parameters<typeof buildStatusSummary>[0], kind: string, name: string) {
  return buildStatusSummary(store, { ready: false }).resources.find((r) => r.kind === kind && r.name === name)!;
}

test('summary: at most MAX_PER_KIND rows per kind, the rest counted', (t) => {
  const { store } = openStore(t);
  store.transaction(() => {
    for (let i = 0; i < MAX_PER_KIND + 7; i++) store.upsertResource({ kind: 'ProxyPort', name: `p${String(i).padStart(4, '0')}`, source: 'api', spec: { userId: `u${i}`, sourceIP: '10.0.0.1' } });
  });
  const s = buildStatusSummary(store, { ready: true });
  t.is(s.resources.length, MAX_PER_KIND);
  t.deepEqual(s.truncated, { ProxyPort: 7 });
  t.is(s.totals.ProxyPort, MAX_PER_KIND + 7);
});

// ---------------------------------------------------------------------------
// The page in a real browser

async function launch(t: ExecutionContext): Promise<BrowserContext> {
  if (!fs.existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} is missing: apt-get install -y --no-install-recommends chromium`);
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'polydev-chromium-'));
  t.teardown(() => fs.rmSync(profile, { recursive: true, force: true }));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
    timeout: 90_000, // hang guard: Chromium starts in a second or two alone, far slower on a loaded machine
  });
  // Registered after the profile's removal, so it runs first (ava runs teardowns last-in first-out).
  t.teardown(() => context.close());
  return context;
}

/** The text of each cell (th and td) of the rows with data-kind/data-name, in the given table body. */
async function rowCells(page: Page, body: string, kind: string, name: string): Promise<string[] | undefined> {
  return page.evaluate(([b, k, n]) => {
    const rows = Array.from((globalThis as unknown as PageGlobals).document.querySelectorAll(`#${b} tr`));
    const row = rows.find((r) => r.dataset.kind === k && r.dataset.name === n);
    return row ? Array.from(row.cells).map((c) => (c.textContent ?? '').trim()) : undefined;
  }, [body, kind, name] as const);
}

async function waitRow(page: Page, what: string, body: string, kind: string, name: string, ok: (cells: string[] | undefined) => boolean): Promise<string[] | undefined> {
  let last: string[] | undefined;
  await waitFor(what, async () => ok((last = await rowCells(page, body, kind, name))), UI_WAIT_MS, 100).catch((err: Error) => {
    throw new Error(`${err.message}; row now: ${JSON.stringify(last)}`);
  });
  return last;
}

async function cleanupPools(p: PoolEnv, owner: string): Promise<void> {
  await p.daemon.stop();
  const engine = new ProcessEngine({ runDir: `${p.env.dir}/run` });
  for (const c of await engine.list(owner)) await engine.remove(c.id);
}

test('the page shows every resource, updates by itself, escapes names, talks to its own origin only, and says when the daemon is gone', async (t) => {
  // A hang guard above ava's 120 s default: a browser, a daemon and a dozen waits of up to UI_WAIT_MS each.
  t.timeout(300_000);
  const web = (size: number): WarmPoolOptions => ({ name: 'web', engine: 'process', command: ['sleep', '300'], size, maxSize: 3, env: { API_KEY: SECRET } });
  const p = await poolEnv(t, undefined, [web(1)]);
  const owner = installationId(p.daemon.store);
  t.teardown(() => cleanupPools(p, owner));
  await p.waitWarm('web', 1);
  const origin = p.api.base;

  // The document itself: HTML, locked down, no token needed.
  const doc = await fetch(`${origin}/`, { signal: AbortSignal.timeout(10_000) });
  t.is(doc.status, 200);
  t.regex(doc.headers.get('content-type') ?? '', /^text\/html; charset=utf-8/);
  t.regex(doc.headers.get('content-security-policy') ?? '', /default-src 'none'.*connect-src 'self'/);
  const html = await doc.text();
  t.false(/\b(src|href)=["']?(https?:)?\/\//i.test(html), 'no external asset');

  const context = await launch(t);
  const page = await context.newPage();
  const requests: string[] = [];
  const failedOffOrigin: string[] = [];
  page.on('request', (r) => requests.push(r.url()));
  // Nothing may leave the daemon's origin; if the page tried, the request is recorded and refused.
  await page.route('**/*', (route) => {
    const url = route.request().url();
    if (url === origin || url.startsWith(`${origin}/`)) return route.continue();
    failedOffOrigin.push(url);
    return route.abort();
  });
  const consoleErrors: string[] = [];
  page.on('pageerror', (e) => consoleErrors.push(e.message));
  let navigations = 0;
  page.on('framenavigated', (f) => {
    if (f === page.mainFrame()) navigations++;
  });

  await page.goto(`${origin}/`, { timeout: UI_WAIT_MS });
  t.is(await page.title(), 'polydev-reconciler status');
  let cells = await waitRow(page, 'web in the resources table, Ready', 'resources-body', 'WarmPool', 'web', (c) => c?.[2] === 'Ready');
  t.is(cells![0], 'WarmPool');
  t.is(cells![1], 'web');
  t.regex(cells![4]!, /Ready True Converged/);
  t.is(cells![5], 'never', 'no drift yet');
  cells = await waitRow(page, 'web filled 1/1', 'warmpools-body', 'WarmPool', 'web', (c) => c?.[3] === '1 / 1');
  t.is(cells![4], '3', 'maxSize');
  // Waited for rather than read once: a poll of the page that the loaded machine stretches past the
  // page's own 5 s request timeout shows "Cannot reach the daemon" until the next poll succeeds.
  await waitFor('the page connected', async () => (await page.locator('#conn').getAttribute('data-state')) === 'ok', UI_WAIT_MS, 100);
  await waitFor('the page saying ready', async () => (await page.locator('#ready').textContent()) === 'ready', UI_WAIT_MS, 100);
  const firstUpdate = await page.locator('#updated').getAttribute('datetime');
  t.truthy(firstUpdate);
  // Accessible structure: real tables with captions and column headers.
  t.is(await page.locator('table').count(), 6);
  t.is(await page.locator('table caption').count(), 6);
  t.true((await page.locator('thead th[scope="col"]').count()) >= 40);
  await page.evaluate(() => {
    (globalThis as unknown as PageGlobals).__sameDocument = true;
  });

  // A change through the desired-state dir: size 1 → 2. The page follows without a reload.
  p.setPools([web(2)]);
  await waitRow(page, 'web filled 2/2 on the page', 'warmpools-body', 'WarmPool', 'web', (c) => c?.[3] === '2 / 2');
  // A claim: claimed count and the open claim appear; its env never does.
  const claim = await p.api.claim('web', { userId: 'alice', env: { CLAIM_SECRET: SECRET } });
  t.is(claim.status, 201, JSON.stringify(claim.body));
  await waitRow(page, 'one claimed', 'warmpools-body', 'WarmPool', 'web', (c) => c?.[6] === '1');
  await waitFor('the open claim listed', async () => (await page.locator('#claims-body').textContent())?.includes(claim.body.claimId), UI_WAIT_MS, 100);
  t.regex((await page.locator('#claims-body').textContent()) ?? '', /alice/);

  // A name that is markup, as a store written by anything else could hold (apply refuses such names).
  const evil = 'evil<script>window.__pwned=1</script><img src=http://127.0.0.2:1/x.png onerror=window.__pwned=2>';
  p.daemon.store.upsertResource({ kind: 'Claim', name: evil, source: 'kubernetes', spec: { pool: 'web', userId: 'mallory' } });
  cells = await waitRow(page, 'the markup name, as text', 'resources-body', 'Claim', evil, (c) => c !== undefined);
  t.is(cells![1], evil, 'the name is shown character for character');
  t.is(await page.evaluate(() => (globalThis as unknown as PageGlobals).__pwned), undefined, 'nothing of it ran');
  t.is(await page.locator('main script, main img').count(), 0, 'no element was made from it');

  // Release: the claim leaves the list.
  t.is((await p.api.release(claim.body.claimId)).status, 200);
  await waitFor('the released claim gone from the list', async () => !(await page.locator('#claims-body').textContent())?.includes(claim.body.claimId), UI_WAIT_MS, 100);

  // Delete, with the real CLI in another process (the daemon hears of it through the change feed).
  const del = await runBin(['--db', p.env.db, 'delete', 'warmpool', 'web'], p.env.childEnv());
  t.is(del.code, 0, del.stderr);
  await waitRow(page, 'web gone from the page', 'resources-body', 'WarmPool', 'web', (c) => c === undefined);
  await waitFor('a Deleted event on the page', async () => /Deleted/.test((await page.locator('#events-body').textContent()) ?? ''), UI_WAIT_MS, 100);
  t.is(await page.evaluate(() => (globalThis as unknown as PageGlobals).__sameDocument), true, 'the same document: no reload');
  t.is(navigations, 1, 'one navigation only');
  t.not(await page.locator('#updated').getAttribute('datetime'), firstUpdate, 'the last-updated time moves');

  // No secret in anything the page holds or fetched.
  const text = await page.content();
  t.false(text.includes(SECRET));
  const summary = await (await fetch(`${origin}/api/v1/status`, { signal: AbortSignal.timeout(10_000) })).text();
  t.false(summary.includes(SECRET));
  t.false(summary.includes('API_KEY'));

  // The daemon goes away: the page says so, and keeps what it last saw.
  await p.daemon.stop();
  // (A poll caught by the shutdown itself may first be answered 503; then the connection is refused.)
  await waitFor('"Cannot reach the daemon" on the page', async () => /^Cannot reach the daemon/.test((await page.locator('#conn').textContent()) ?? ''), UI_WAIT_MS, 100);
  t.is(await page.locator('#conn').getAttribute('data-state'), 'error');
  t.is(await page.locator('#conn').getAttribute('role'), 'status', 'announced to screen readers');
  t.is(await page.locator('main').getAttribute('data-stale'), 'true');

  t.deepEqual(failedOffOrigin, [], 'no request left the daemon\'s origin');
  const offOrigin = requests.filter((u) => !u.startsWith(`${origin}/`) && !u.startsWith('data:'));
  t.deepEqual(offOrigin, []);
  t.true(requests.filter((u) => u.endsWith('/api/v1/status')).length >= 3, 'it polled');
  t.deepEqual(consoleErrors, []);
});
