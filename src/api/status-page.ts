// The status page: GET / serves one self-contained HTML document (inline CSS and JS, nothing
// fetched from anywhere but this daemon) that polls GET /api/v1/status every 2 s and renders it.
//
// Escaping: the HTML itself holds no data. Everything from the summary (resource names come
// from user YAML, messages from errors) reaches the DOM through createElement / text nodes /
// setAttribute, never through innerHTML. The Content-Security-Policy allows only this page's
// own script and style (by hash) and connections to its own origin, so even a mistake there
// could neither run injected script nor send anything elsewhere.

import { createHash } from 'node:crypto';
import type { FastifyInstance } from 'fastify';
import type { Store } from '../state/store.js';
import { buildStatusSummary } from './status.js';

export const STATUS_POLL_MS = 2000;

const STYLE = `
:root { color-scheme: light dark; --fg: #1b1f24; --bg: #fff; --muted: #57606a; --line: #d0d7de; --head: #f6f8fa;
  --good: #116329; --good-bg: #dafbe1; --warn: #7d4e00; --warn-bg: #fff8c5; --bad: #a40e26; --bad-bg: #ffebe9; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #e6edf3; --bg: #0d1117; --muted: #9da7b3; --line: #30363d; --head: #161b22;
    --good: #7ee787; --good-bg: #033a16; --warn: #f2cc60; --warn-bg: #3b2e00; --bad: #ffa198; --bad-bg: #490202; }
}
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); background: var(--bg); }
header, main { padding: 0 1rem; }
header { display: flex; flex-wrap: wrap; align-items: baseline; gap: .25rem 1.5rem; border-bottom: 1px solid var(--line); }
h1 { font-size: 1.25rem; margin: .75rem 0; }
h2 { font-size: 1.05rem; margin: 1.25rem 0 .5rem; }
header p { margin: .5rem 0; }
#conn { padding: .15rem .5rem; border-radius: 4px; }
#conn[data-state="ok"] { color: var(--good); background: var(--good-bg); }
#conn[data-state="loading"] { color: var(--warn); background: var(--warn-bg); }
#conn[data-state="error"] { color: var(--bad); background: var(--bad-bg); font-weight: 600; }
main[data-stale="true"] { opacity: .55; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; }
caption { text-align: left; color: var(--muted); padding-bottom: .25rem; }
th, td { text-align: left; vertical-align: top; padding: .3rem .5rem; border-bottom: 1px solid var(--line); }
thead th { background: var(--head); white-space: nowrap; }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
.phase { display: inline-block; padding: 0 .4rem; border-radius: 4px; font-weight: 600; }
.good { color: var(--good); background: var(--good-bg); }
.warn { color: var(--warn); background: var(--warn-bg); }
.bad { color: var(--bad); background: var(--bad-bg); }
ul.conds { list-style: none; margin: 0; padding: 0; }
.muted { color: var(--muted); }
.msg { overflow-wrap: anywhere; }
`;

const SCRIPT = `
'use strict';
(() => {
  const POLL_MS = ${STATUS_POLL_MS};
  const TIMEOUT_MS = 5000;
  const byId = (id) => document.getElementById(id);
  let lastGood = null;

  // Data only ever becomes text nodes and attribute values: never markup.
  function h(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) if (v !== undefined && v !== null && v !== false) e.setAttribute(k, String(v));
    for (const c of children.flat(Infinity)) if (c !== undefined && c !== null && c !== false) e.append(c instanceof Node ? c : String(c));
    return e;
  }
  const dash = '\\u2014';
  const show = (v) => (v === undefined || v === null || v === '' ? dash : v);
  const ms = (v) => (typeof v === 'number' ? (Math.round(v * 10) / 10) + ' ms' : dash);
  const yesNo = (v) => (v === true ? 'yes' : v === false ? 'no' : dash);
  function when(iso) {
    if (!iso) return dash;
    const d = new Date(iso);
    return isNaN(d.getTime()) ? String(iso) : h('time', { datetime: iso, title: iso }, d.toLocaleString());
  }
  const GOOD = new Set(['Ready', 'Healthy', 'Bound']);
  const BAD = new Set(['Backoff', 'Degraded', 'Failed', 'Unhealthy', 'AuthFailed', 'TerminatingBackoff', 'RestartBudgetExhausted']);
  const tone = (phase) => (GOOD.has(phase) ? 'good' : BAD.has(phase) ? 'bad' : 'warn');
  const phase = (p, deleting) => h('td', {}, h('span', { class: 'phase ' + tone(p) }, p), deleting ? ' (deleting)' : '');
  const num = (v) => h('td', { class: 'num' }, show(v));
  function condTone(c) {
    if (c.status !== 'True' && c.status !== 'False') return 'warn';
    const wantFalse = c.type === 'Degraded' || c.type === 'Drifted';
    return (c.status === 'True') !== wantFalse ? 'good' : 'bad';
  }
  function conditions(list) {
    if (!list.length) return h('span', { class: 'muted' }, 'none yet');
    return h('ul', { class: 'conds' }, list.map((c) => h('li', {},
      h('strong', {}, c.type), ' ', h('span', { class: 'phase ' + condTone(c) }, c.status), ' ', c.reason,
      c.message ? h('span', { class: 'msg' }, ': ' + c.message) : '')));
  }
  function drift(d) {
    if (!d) return h('span', { class: 'muted' }, 'never');
    return [when(d.at), d.message ? h('div', { class: 'msg' }, d.message) : ''];
  }
  function summary(r) {
    const d = r.details || {};
    switch (r.kind) {
      case 'WarmPool': return 'ready ' + d.warm + '/' + show(d.size) + ' (max ' + show(d.maxSize) + '), claimed ' + d.claimed;
      case 'ProxyPool': return 'ports ' + show(d.ports && d.ports.total) + ', healthy ' + d.ports.healthy + ', unhealthy ' + d.ports.unhealthy;
      case 'ProxyPort': return 'port ' + show(d.port) + ' in ' + show(d.pool) + ', ' + (d.healthy === true ? 'healthy' : d.healthy === false ? 'unhealthy' : 'not checked') + (typeof d.latencyMs === 'number' ? ', ' + ms(d.latencyMs) : '');
      case 'TurnServer': return (d.healthy === true ? 'healthy' : d.healthy === false ? 'unhealthy' : 'not probed') + ', ' + show(d.consecutiveFailures) + ' failure(s), ' + show(d.restarts) + ' restart(s)';
      default: return '';
    }
  }
  function fill(id, rows, cols) {
    const body = byId(id);
    body.replaceChildren(...(rows.length ? rows : [h('tr', {}, h('td', { colspan: cols, class: 'muted' }, 'None.'))]));
  }
  const row = (r, ...cells) => h('tr', { 'data-kind': r.kind, 'data-name': r.name }, cells);
  const nameCell = (r) => h('th', { scope: 'row' }, r.name);

  function render(s) {
    const res = s.resources;
    fill('resources-body', res.map((r) => row(r,
      h('td', {}, r.kind), nameCell(r), phase(r.phase, r.deleting),
      h('td', { class: 'num' }, show(r.observedGeneration) + '/' + r.generation),
      h('td', {}, conditions(r.conditions)), h('td', {}, drift(r.lastDrift)), h('td', {}, summary(r)))), 7);
    const cut = Object.entries(s.truncated);
    byId('truncated').textContent = cut.length
      ? 'Not shown: ' + cut.map(([k, n]) => n + ' of ' + s.totals[k] + ' ' + k + '(s)').join(', ') + '.' : '';

    fill('warmpools-body', res.filter((r) => r.kind === 'WarmPool').map((r) => { const d = r.details; return row(r,
      nameCell(r), phase(r.phase, r.deleting), h('td', {}, show(d.engine)),
      h('td', { class: 'num' }, d.warm + ' / ' + show(d.size)), num(d.maxSize), num(d.starting), num(d.claimed), num(d.failed),
      num(d.claimsServed), h('td', { class: 'num' }, ms(d.claimLatencyMs.p50) + ' / ' + ms(d.claimLatencyMs.p99)),
      h('td', { class: 'msg' }, show(d.lastError))); }), 11);

    fill('proxypools-body', res.filter((r) => r.kind === 'ProxyPool').map((r) => { const d = r.details; return row(r,
      nameCell(r), phase(r.phase, r.deleting), h('td', {}, show(d.upstream), d.upstreamIP ? ' (' + d.upstreamIP + ')' : ''),
      num(d.ports.total), num(d.ports.programmed), num(d.ports.healthy), num(d.ports.unhealthy), num(d.ports.unchecked),
      h('td', { class: 'num' }, d.healthCheck ? ms(d.latencyMs.p50) + ' / ' + ms(d.latencyMs.max) : 'no health check'),
      h('td', {}, when(d.lastSyncAt))); }), 10);

    fill('turn-body', res.filter((r) => r.kind === 'TurnServer').map((r) => { const d = r.details; const p = d.lastProbe || {}; return row(r,
      nameCell(r), h('td', {}, show(d.host)), phase(r.phase, r.deleting), h('td', {}, yesNo(d.healthy)),
      num(d.consecutiveFailures), num(d.restarts), h('td', {}, when(p.at)), num(ms(p.bindingLatencyMs)), num(ms(p.allocationLatencyMs)),
      h('td', { class: 'msg' }, p.errorClass && p.errorClass !== 'none' ? p.errorClass + (p.error ? ': ' + p.error : '') : dash)); }), 10);

    byId('claims-count').textContent = s.claims.open > s.claims.items.length
      ? '(' + s.claims.items.length + ' of ' + s.claims.open + ')' : '(' + s.claims.open + ')';
    fill('claims-body', s.claims.items.map((c) => h('tr', {},
      h('th', { scope: 'row' }, c.id), h('td', {}, c.pool), h('td', {}, c.userId), phase(c.phase, false),
      h('td', {}, c.warm ? 'warm' : 'cold start'), h('td', {}, when(c.createdAt)), h('td', {}, when(c.expiresAt)))), 7);

    fill('events-body', s.events.map((e) => h('tr', {},
      h('td', {}, when(e.time)), h('td', {}, h('span', { class: 'phase ' + (e.type === 'Warning' ? 'bad' : 'good') }, e.type)),
      h('td', {}, e.kind + '/' + e.name), h('td', {}, e.reason), h('td', { class: 'msg' }, e.message), num(e.count))), 6);

    byId('ready').textContent = s.ready ? 'ready' : 'starting (first sync not done)';
  }

  function setConn(state, text) {
    const c = byId('conn');
    c.dataset.state = state;
    c.textContent = text;
    byId('main').dataset.stale = String(state === 'error');
  }

  async function poll() {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), TIMEOUT_MS);
    try {
      const res = await fetch('api/v1/status', { cache: 'no-store', signal: ctl.signal, headers: { accept: 'application/json' } });
      if (!res.ok) throw Object.assign(new Error('HTTP ' + res.status), { answered: true });
      const s = await res.json();
      render(s);
      lastGood = new Date();
      const u = byId('updated');
      u.dateTime = s.generatedAt;
      u.textContent = lastGood.toLocaleTimeString();
      setConn('ok', 'Connected: refreshing every ' + POLL_MS / 1000 + ' s');
    } catch (err) {
      const why = err && err.name === 'AbortError' ? 'no answer within ' + TIMEOUT_MS / 1000 + ' s' : (err && err.message) || 'network error';
      setConn('error', (err && err.answered ? 'The daemon answered with an error (' + why + '). ' : 'Cannot reach the daemon (' + why + '). ') +
        (lastGood ? 'The tables show the state as of ' + lastGood.toLocaleTimeString() + '. ' : '') + 'Retrying every ' + POLL_MS / 1000 + ' s.');
    } finally {
      clearTimeout(timer);
      setTimeout(poll, POLL_MS);
    }
  }
  poll();
})();
`;

function table(id: string, caption: string, headers: string[]): string {
  const ths = headers.map((h) => `<th scope="col">${h}</th>`).join('');
  return `<div class="scroll"><table><caption>${caption}</caption><thead><tr>${ths}</tr></thead>` +
    `<tbody id="${id}-body"><tr><td colspan="${headers.length}" class="muted">Loading…</td></tr></tbody></table></div>`;
}

// Static: no data is interpolated below, only this module's own constants.
const HTML = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>polydev-reconciler status</title>
<link rel="icon" href="data:,">
<style>${STYLE}</style>
</head>
<body>
<header>
<h1>polydev-reconciler status</h1>
<p id="conn" role="status" aria-live="polite" data-state="loading">Loading…</p>
<p>Last updated: <time id="updated">never</time></p>
<p>Daemon: <span id="ready">unknown</span></p>
</header>
<main id="main" data-stale="false">
<section aria-labelledby="h-resources">
<h2 id="h-resources">Resources</h2>
${table('resources', 'Every resource with its phase, conditions and last drift', ['Kind', 'Name', 'Phase', 'Observed / generation', 'Conditions', 'Last drift', 'Summary'])}
<p id="truncated" class="muted"></p>
</section>
<section aria-labelledby="h-warmpools">
<h2 id="h-warmpools">Warm pools</h2>
${table('warmpools', 'Fill of each warm pool: warm (ready) containers against size and maxSize', ['Name', 'Phase', 'Engine', 'Ready / size', 'Max', 'Starting', 'Claimed', 'Failed', 'Claims served', 'Claim latency p50 / p99', 'Last error'])}
</section>
<section aria-labelledby="h-proxypools">
<h2 id="h-proxypools">Proxy pools</h2>
${table('proxypools', 'Health of each pool’s user ports (last health check of each port)', ['Name', 'Phase', 'Upstream', 'Ports', 'Programmed', 'Healthy', 'Unhealthy', 'Unchecked', 'Latency p50 / max', 'Last sync'])}
</section>
<section aria-labelledby="h-turn">
<h2 id="h-turn">TURN servers</h2>
${table('turn', 'Last probe of each TURN server', ['Name', 'Host', 'Phase', 'Healthy', 'Failures', 'Restarts', 'Last probe', 'Binding', 'Allocation', 'Error'])}
</section>
<section aria-labelledby="h-claims">
<h2 id="h-claims">Open claims <span id="claims-count" class="muted"></span></h2>
${table('claims', 'Claims that hold a container now (newest first)', ['Claim', 'Pool', 'User', 'Phase', 'Start', 'Created', 'Expires'])}
</section>
<section aria-labelledby="h-events">
<h2 id="h-events">Recent events</h2>
${table('events', 'The newest events first', ['Time', 'Type', 'Object', 'Reason', 'Message', 'Count'])}
</section>
</main>
<script>${SCRIPT}</script>
</body>
</html>
`;

const sha256 = (s: string) => `'sha256-${createHash('sha256').update(s, 'utf8').digest('base64')}'`;

/** Only this page's own script and style run; it talks to its own origin only. */
export const STATUS_PAGE_CSP = [
  "default-src 'none'",
  `script-src ${sha256(SCRIPT)}`,
  `style-src ${sha256(STYLE)}`,
  "connect-src 'self'",
  'img-src data:',
  "base-uri 'none'",
  "form-action 'none'",
  "frame-ancestors 'none'",
].join('; ');

export function statusPageHtml(): string {
  return HTML;
}

export interface StatusPageDeps {
  store: Store;
  /** Whether the first full sync is done (the same answer as /readyz). */
  ready(): boolean;
}

/** GET / (the page) and GET /api/v1/status (its data). Read-only, so no token, like the other GETs. */
export function registerStatusPage(app: FastifyInstance, deps: StatusPageDeps): void {
  app.get('/', async (_req, reply) => {
    reply
      .header('content-type', 'text/html; charset=utf-8')
      .header('content-security-policy', STATUS_PAGE_CSP)
      .header('x-content-type-options', 'nosniff')
      .header('referrer-policy', 'no-referrer')
      .header('cache-control', 'no-store');
    return HTML;
  });
  app.get('/api/v1/status', async (_req, reply) => {
    reply.header('cache-control', 'no-store');
    return buildStatusSummary(deps.store, { ready: deps.ready() });
  });
}
