// TurnServer end to end: the daemon probes a real coturn (Debian's, on 127.0.0.1) with its own
// STUN/TURN client, restarts it with the test's own command when it hangs, and hands out ICE
// servers with derived credentials only while it is healthy.

import test from 'ava';
import fs from 'node:fs';
import path from 'node:path';
import { probeTurn } from '../src/drivers/turn.js';
import type { Daemon } from '../src/daemon.js';
import { startCoturn, type Coturn } from './helpers/coturn.js';
import { e2eEnv, metricValue, REPO, runBin, startDaemon, TOKEN, waitFor, type E2eEnv } from './helpers/e2e-env.js';

const RESTART_SCRIPT = path.join(REPO, 'test', 'helpers', 'restart-coturn.mjs');

interface TurnEnv {
  env: E2eEnv;
  daemon: Daemon;
  status(name: string): Record<string, any> | undefined;
  events(name: string): Array<{ reason: string; message: string }>;
  get(p: string): Promise<{ status: number; body: any; headers: Headers }>;
}

async function turnEnv(t: Parameters<typeof e2eEnv>[0], docs: (env: E2eEnv) => Array<Record<string, unknown>>): Promise<TurnEnv> {
  const env = await e2eEnv(t);
  const cfg = env.writeConfig({ desiredStateDir: env.desiredDir, apiTokenFile: env.tokenFile, resyncInterval: '60s' });
  env.writeDesired('turn.yaml', docs(env).map((d) => JSON.stringify(d)).join('\n---\n'));
  const daemon = await startDaemon(t, cfg);
  return {
    env,
    daemon,
    status: (name) => daemon.store.getResource('TurnServer', name)?.status as Record<string, any> | undefined,
    events: (name) => daemon.store.listEvents({ kind: 'TurnServer', name }),
    get: async (p) => {
      const res = await fetch(daemon.address + p, { headers: { authorization: `Bearer ${TOKEN}` }, signal: AbortSignal.timeout(10_000) });
      const text = await res.text();
      return { status: res.status, body: text ? JSON.parse(text) : undefined, headers: res.headers };
    },
  };
}

/** A TurnServer document for a harness instance; its credential goes into a file of the env's dir. */
function turnDoc(env: E2eEnv, c: Coturn, name: string, extra: Record<string, unknown> = {}, opts: { wrongSecret?: boolean } = {}): Record<string, unknown> {
  const secretFile = path.join(env.dir, `${name}.secret`);
  const secret = c.mode === 'longTerm' ? c.password! : c.secret!;
  fs.writeFileSync(secretFile, `${opts.wrongSecret ? `${secret}-wrong` : secret}\n`, { mode: 0o600 });
  const auth = c.mode === 'longTerm'
    ? { mode: 'longTerm', username: c.username, passwordFile: secretFile }
    : { mode: 'restSecret', secretFile, credentialTTL: '10m' };
  return {
    apiVersion: 'polydev.ai/v1alpha1',
    kind: 'TurnServer',
    metadata: { name },
    spec: {
      host: '127.0.0.1',
      ports: { stun: c.port },
      transports: ['udp', 'tcp'],
      realm: c.realm,
      auth,
      // A probe of a healthy coturn on loopback takes a few ms, but under the suite's load a 500 ms
      // timeout failed some (AuthFailed → Suspect → AuthFailed, a second event). Only a hung server
      // costs the timeout, so a generous one only slows the hang test (bench/turn.ts measures
      // detection with the 500 ms timeout operators would use).
      probe: { interval: '1s', timeout: '2s', failureThreshold: 3 },
      relayPortRange: c.relayRange,
      ...extra,
    },
  };
}

const restartCommand = (c: Coturn, extra: Record<string, unknown> = {}) => ({
  remediation: { command: [process.execPath, RESTART_SCRIPT, c.configFile, c.pidFile], backoff: '200ms', maxRestarts: 3, window: '5m', settle: '200ms', ...extra },
});

const phaseIs = (p: TurnEnv, name: string, phase: string) => () => p.status(name)?.phase === phase;

test('long-term credentials: Healthy on UDP and TCP, relayed address in range, no leaked allocations, STUN only for browsers', async (t) => {
  const c = await startCoturn(t, { mode: 'longTerm' });
  const p = await turnEnv(t, (env) => [turnDoc(env, c, 'lt')]);
  await waitFor('Healthy', phaseIs(p, 'lt', 'Healthy'), 20_000);
  const s = p.status('lt')!;
  t.true(s.healthy);
  t.is(s.lastProbe.errorClass, 'none');
  t.deepEqual(s.lastProbe.transports.map((x: { transport: string }) => x.transport), ['udp', 'tcp']);
  for (const x of s.lastProbe.transports) {
    const port = Number(String(x.relayedAddress).split(':').pop());
    t.true(port >= c.relayRange.min && port <= c.relayRange.max, `relayed ${x.relayedAddress}`);
    t.true(x.bindingLatencyMs >= 0 && x.allocationLatencyMs >= 0);
  }
  // A few more probes, then none of their allocations is left on the server.
  const probes0 = Date.parse(s.lastProbe.at);
  await waitFor('three more probes', () => Date.parse(p.status('lt')!.lastProbe.at) >= probes0 + 2500, 10_000);
  const metrics = await (await fetch(`${p.daemon.address}/metrics`)).text();
  t.is(metricValue(metrics, 'polydev_turn_up', { server: 'lt' }), 1);
  t.true((metricValue(metrics, 'polydev_turn_probe_duration_seconds_count', { server: 'lt', step: 'allocate' }) ?? 0) >= 2);
  const ice = await p.get('/api/v1/ice-servers?userId=alice');
  t.is(ice.status, 200);
  t.deepEqual(ice.body.iceServers, [{ urls: [`stun:127.0.0.1:${c.port}`] }], 'the static password never leaves the daemon');
  // Every probe released its allocation: with the daemon stopped, coturn holds none
  // (a released UDP allocation lingers until coturn's next 1-second tick).
  // (The wait polls coturn's CLI; its deadline is a hang guard. A probe whose Allocate answer came
  // too late releases it all the same: see the turn-client test of that.)
  await p.daemon.stop();
  t.is(await c.waitAllocations(0, 20_000), 0);
});

test('TURN REST secret: ICE servers carry per-user credentials that coturn accepts; none healthy is 503', async (t) => {
  const c = await startCoturn(t, { mode: 'restSecret' });
  const p = await turnEnv(t, (env) => [turnDoc(env, c, 'rest')]);
  await waitFor('Healthy', phaseIs(p, 'rest', 'Healthy'), 20_000);
  const ice = await p.get('/api/v1/ice-servers?userId=alice');
  t.is(ice.status, 200, JSON.stringify(ice.body));
  t.is(ice.headers.get('cache-control'), 'no-store');
  const turn = ice.body.iceServers.find((s: { urls: string[] }) => s.urls.some((u) => u.startsWith('turn:')));
  t.deepEqual(turn.urls, [`turn:127.0.0.1:${c.port}?transport=udp`, `turn:127.0.0.1:${c.port}?transport=tcp`]);
  t.regex(turn.username, /^\d+:alice$/);
  const expiry = Number(turn.username.split(':')[0]) * 1000;
  t.true(Math.abs(expiry - (Date.now() + 600_000)) < 5_000, 'credentialTTL 10m');
  t.false(JSON.stringify(ice.body).includes(c.secret!), 'the shared secret never leaves the daemon');
  // The derived credentials are real: coturn grants an allocation with them. (It answers in
  // milliseconds; the 20 s budget only bounds a hang under load.)
  const r = await probeTurn({ host: '127.0.0.1', port: c.port, transport: 'udp', realm: c.realm, timeoutMs: 20_000, credentials: { mode: 'longTerm', username: turn.username, password: turn.credential } });
  t.is(r.errorClass, undefined, r.error);
  t.truthy(r.relayedAddress);
  t.is((await p.get('/api/v1/ice-servers')).status, 400, 'userId is required');

  // Stopped for good and no remediation: Unhealthy, and no ICE servers at all.
  await c.kill();
  await waitFor('Unhealthy', phaseIs(p, 'rest', 'Unhealthy'), 20_000);
  const none = await p.get('/api/v1/ice-servers?userId=alice');
  t.is(none.status, 503);
  t.is(none.body.error.code, 'NO_HEALTHY_TURN_SERVER');
  t.truthy(none.headers.get('retry-after'));
  t.true(p.events('rest').some((e) => e.reason === 'Unhealthy' && /no remediation/.test(e.message)));
});

test('a hang (SIGSTOP) is detected after failureThreshold timed-out probes, the restart command runs, and the server is Healthy again', async (t) => {
  const c = await startCoturn(t, { mode: 'longTerm' });
  const p = await turnEnv(t, (env) => [turnDoc(env, c, 'hang', restartCommand(c))]);
  await waitFor('Healthy', phaseIs(p, 'hang', 'Healthy'), 20_000);
  // Before any restart or timeout the counters are there at 0 (a series that appears at 1 is an
  // increase() of 0 to Prometheus); after, the restart counts 1.
  const before = await (await fetch(`${p.daemon.address}/metrics`)).text();
  t.is(metricValue(before, 'polydev_turn_restarts_total', { server: 'hang' }), 0);
  t.not(metricValue(before, 'polydev_turn_probe_failures_total', { server: 'hang', reason: 'timeout' }), undefined);
  const oldPid = c.pid;
  c.pause();
  // Detection takes 3 probes of (1 s interval + 2 s timeout), about 9 s; how fast it is measured
  // by bench/turn.ts (goal: under 5 s with a 500 ms timeout), not here.
  await waitFor('restarted', () => (p.status('hang')?.restarts ?? 0) >= 1, 40_000);
  await waitFor('Healthy again', phaseIs(p, 'hang', 'Healthy'), 20_000);
  t.true(p.events('hang').filter((e) => e.reason === 'Unhealthy').every((e) => /timeout/.test(e.message)), 'detected by timed-out probes');
  const newPid = c.currentPid();
  t.truthy(newPid);
  t.not(newPid, oldPid, 'a new coturn process');
  const reasons = p.events('hang').map((e) => e.reason);
  for (const r of ['Unhealthy', 'Restarted', 'Recovered']) t.true(reasons.includes(r), `${r} in ${reasons.join(',')}`);
  t.is(p.status('hang')!.restarts, 1);
  const metrics = await (await fetch(`${p.daemon.address}/metrics`)).text();
  t.is(metricValue(metrics, 'polydev_turn_restarts_total', { server: 'hang' }), 1);
  t.true((metricValue(metrics, 'polydev_turn_probe_failures_total', { server: 'hang', reason: 'timeout' }) ?? 0) >= 3);
});

test('wrong credentials are AuthFailed: reported, and the server is never restarted', async (t) => {
  const c = await startCoturn(t, { mode: 'longTerm' });
  const p = await turnEnv(t, (env) => [turnDoc(env, c, 'badauth', restartCommand(c), { wrongSecret: true })]);
  await waitFor('AuthFailed', phaseIs(p, 'badauth', 'AuthFailed'), 20_000);
  const at = Date.parse(p.status('badauth')!.lastProbe.at);
  await waitFor('four more probes', () => Date.parse(p.status('badauth')!.lastProbe.at) >= at + 3500, 10_000);
  const s = p.status('badauth')!;
  t.is(s.phase, 'AuthFailed');
  t.is(s.restarts, 0, 'no restart loop');
  t.is(s.lastProbe.errorClass, 'authRejected');
  t.is(c.currentPid(), c.pid, 'the same coturn process');
  t.is(s.conditions.find((x: { type: string }) => x.type === 'Ready').reason, 'AuthFailed');
  t.is(p.events('badauth').filter((e) => e.reason === 'AuthFailed').length, 1, 'one event, not one per probe');
  const secret = fs.readFileSync(path.join(p.env.dir, 'badauth.secret'), 'utf8').trim();
  t.false(JSON.stringify(s).includes(secret), 'the password is in no status');
});

test('a server gone for good is Failed after the restart budget, and restarts stop', async (t) => {
  const c = await startCoturn(t, { mode: 'longTerm' });
  // The "restart" succeeds as a command but brings nothing back.
  const p = await turnEnv(t, (env) => [turnDoc(env, c, 'gone', { remediation: { command: ['true'], backoff: '100ms', maxRestarts: 2, window: '5m', settle: '100ms' } })]);
  await waitFor('Healthy', phaseIs(p, 'gone', 'Healthy'), 20_000);
  await c.kill();
  await waitFor('Failed', phaseIs(p, 'gone', 'Failed'), 30_000);
  t.is(p.status('gone')!.restarts, 2);
  const at = Date.parse(p.status('gone')!.lastProbe.at);
  await waitFor('probing goes on', () => Date.parse(p.status('gone')!.lastProbe.at) >= at + 2500, 10_000);
  t.is(p.status('gone')!.restarts, 2, 'no restart after the budget');
  t.is(p.status('gone')!.phase, 'Failed');
  t.true(['unreachable', 'timeout'].includes(p.status('gone')!.lastProbe.errorClass));
  t.is(p.events('gone').filter((e) => e.reason === 'RestartBudgetExhausted').length, 1);
  // Deleted: the resource goes (the daemon does not own the server) and so do its series.
  p.daemon.store.transaction(() => p.daemon.store.requestDeletion('TurnServer', 'gone'));
  await waitFor('deleted', () => p.daemon.store.getResource('TurnServer', 'gone') === undefined, 10_000);
  const metrics = await (await fetch(`${p.daemon.address}/metrics`)).text();
  t.is(metricValue(metrics, 'polydev_turn_up', { server: 'gone' }), undefined);
  t.is(metricValue(metrics, 'polydev_turn_restarts_total', { server: 'gone' }), undefined);
  t.is(metricValue(metrics, 'polydev_turn_probe_failures_total', { server: 'gone' }), undefined);
  t.is(metricValue(metrics, 'polydev_turn_probe_duration_seconds_count', { server: 'gone' }), undefined);
});

test('an unreadable secret file is CredentialsUnavailable: nothing probed, nothing restarted', async (t) => {
  const c = await startCoturn(t, { mode: 'restSecret' });
  const p = await turnEnv(t, (env) => {
    const doc = turnDoc(env, c, 'nosecret', restartCommand(c));
    (doc.spec as { auth: { secretFile: string } }).auth.secretFile = path.join(env.dir, 'missing.secret');
    return [doc];
  });
  await waitFor('CredentialsUnavailable', () => p.status('nosecret')?.conditions?.some((x: { reason: string }) => x.reason === 'CredentialsUnavailable'), 20_000);
  t.regex(p.status('nosecret')!.conditions.find((x: { type: string }) => x.type === 'Ready').message, /missing\.secret cannot be read: ENOENT/);
  t.is(p.status('nosecret')!.restarts ?? 0, 0);
  t.is(c.currentPid(), c.pid);
});

test('render turnserver-conf: without -o no secret is printed; with -o a 0600 file coturn starts from and the probe accepts', async (t) => {
  const c = await startCoturn(t, { mode: 'restSecret' });
  const env = await e2eEnv(t);
  const port = c.port + 1;
  const doc = turnDoc(env, c, 'rendered');
  (doc.spec as { ports: { stun: number } }).ports.stun = port;
  await c.stop();
  env.writeDesired('turn.yaml', JSON.stringify(doc));
  const cfg = env.writeConfig({});
  const envVars = env.childEnv();
  t.is((await runBin(['--config', cfg, 'apply', '-f', env.desiredDir], envVars)).code, 0);
  const printed = await runBin(['--config', cfg, 'render', 'turnserver-conf', 'rendered'], envVars);
  t.is(printed.code, 0, printed.stderr);
  t.regex(printed.stdout, new RegExp(`^listening-port=${port}$`, 'm'));
  t.regex(printed.stdout, /^use-auth-secret$/m);
  t.regex(printed.stdout, new RegExp(`^min-port=${c.relayRange.min}$`, 'm'));
  t.false(printed.stdout.includes(c.secret!));
  const out = path.join(env.dir, 'turnserver.conf');
  const written = await runBin(['--config', cfg, 'render', 'turnserver-conf', 'rendered', '-o', out], envVars);
  t.is(written.code, 0, written.stderr);
  t.is(fs.statSync(out).mode & 0o777, 0o600);
  t.true(fs.readFileSync(out, 'utf8').includes(`static-auth-secret=${c.secret}`));
  // coturn started from exactly that file accepts the probe's derived credentials (the 20 s budget
  // only bounds a hang under load).
  const rendered = await c.startFrom(t, out, port);
  const r = await probeTurn({ host: '127.0.0.1', port: rendered.port, transport: 'udp', realm: c.realm, timeoutMs: 20_000, credentials: { mode: 'restSecret', secret: c.secret!, id: 'render-test', ttlSeconds: 600 } });
  t.is(r.errorClass, undefined, r.error);
});

test('TLS: the probe trusts the CA from tls.caFile, all three transports pass, and browsers get a turns: URI', async (t) => {
  const c = await startCoturn(t, { mode: 'restSecret', tls: true });
  const p = await turnEnv(t, (env) => {
    const caFile = path.join(env.dir, 'turn-ca.pem');
    fs.writeFileSync(caFile, c.tlsCert!);
    return [turnDoc(env, c, 'tls', { transports: ['udp', 'tcp', 'tls'], ports: { stun: c.port, tls: c.tlsPort }, tls: { caFile } })];
  });
  await waitFor('Healthy', phaseIs(p, 'tls', 'Healthy'), 20_000);
  const tls = p.status('tls')!.lastProbe.transports.find((x: { transport: string }) => x.transport === 'tls');
  t.is(tls.errorClass, 'none');
  t.truthy(tls.relayedAddress);
  const ice = await p.get('/api/v1/ice-servers?userId=bob');
  t.is(ice.status, 200);
  const turn = ice.body.iceServers.find((s: { urls: string[] }) => s.urls.some((u) => u.startsWith('turns:')));
  t.true(turn.urls.includes(`turns:127.0.0.1:${c.tlsPort}?transport=tcp`));
});
