// Standby on one host: two real daemon processes on one SQLite database with leader election.
// One leads; the other answers only /healthz, /readyz (503) and /metrics. When the leader is
// killed with SIGKILL the standby takes over and adopts what the leader made: the same warm
// containers (never more than the pool's size), the same ports, each iptables rule once. How fast
// it takes over (the goal: within 15 s) is measured by bench/standby.ts, not here: on a loaded
// machine the wall clock says more about the load than about the daemon.

import anyTest, { type TestFn } from 'ava';
import path from 'node:path';
import { installationId, listMembers } from '../src/state/pools.js';
import { Store } from '../src/state/store.js';
import { startDockerd, type Dockerd } from './helpers/dockerd.js';
import {
  BIN,
  EXAMPLE_USERS,
  TOKEN,
  e2eEnv,
  logLines,
  manifest,
  runBin,
  metricValue,
  saveNat,
  sleep,
  spawnChild,
  userRules,
  waitFor,
  waitListening,
  type Child,
} from './helpers/e2e-env.js';
import { ownedContainers, poolsYaml } from './helpers/warmpool-env.js';

const test = anyTest as TestFn<{ dockerd: Dockerd }>;

test.before(async (t) => {
  t.context.dockerd = await startDockerd({ name: 'standby' });
});
test.after.always(async (t) => {
  await t.context.dockerd?.stop();
});



/** GET with a hang guard of 30 s (an answer from a daemon process on a loaded machine can take seconds). */
async function get(url: string, timeoutMs = 30_000): Promise<{ status: number; body: Record<string, unknown> | string }> {
  const r = await fetch(url, { signal: AbortSignal.timeout(timeoutMs) });
  const text = await r.text();
  try {
    return { status: r.status, body: JSON.parse(text) as Record<string, unknown> };
  } catch {
    return { status: r.status, body: text };
  }
}

/** Reconciles of KIND a daemon has finished, whatever their result (from its /metrics). */
async function reconciles(base: string, kind: string): Promise<number> {
  const text = (await get(`${base}/metrics`)).body as string;
  let n = 0;
  for (const line of text.split('\n')) {
    if (line.startsWith('polydev_reconcile_total{') && line.includes(`kind="${kind}"`)) n += Number(line.split(' ').at(-1));
  }
  return n;
}

test.serial('kill -9 of the leader: the standby takes over and adopts containers, ports and rules', async (t) => {
  // Four daemon processes, a one-shot run and three container starts: on a loaded machine well past
  // ava's 120 s without a test result. A hang guard, like the waits' deadlines below.
  t.timeout(480_000);
  const { dockerd } = t.context;
  const env = await e2eEnv(t);
  const cfg = env.writeConfig({
    desiredStateDir: env.desiredDir,
    apiTokenFile: env.tokenFile,
    logLevel: 'info',
    resyncInterval: '2s',
    docker: { socket: dockerd.socketPath, network: 'none' },
    process: { runDir: path.join(env.dir, 'run') },
    // The shipped timings (lease 15 s, renew deadline 10 s, retry 2 s): the test checks what operators get.
    leaderElection: { enabled: true },
    installationId: 'standby-pair',
    // Both SIGTERM stops below must exit 0; a daemon exits 1 on its own once a stop takes
    // shutdownTimeout + 1.5 s. The test is not about that limit, and a loaded machine can need more than 5 s.
    shutdownTimeout: '30s',
  });
  env.writeDesired('pools.yaml', poolsYaml([{ name: 'hot', image: dockerd.image, size: 3, maxSize: 3 }]));
  env.writeDesired('proxy.yaml', manifest({}, EXAMPLE_USERS));
  // The configured owner id: what the containers are labelled with (and found by) whichever daemon leads.
  const owner = 'standby-pair';
  const run = (): Child => spawnChild(t, process.execPath, [BIN, 'run', '--config', cfg], env.childEnv());
  // Hang guard for a daemon process start (5-20x slower under load than the usual second).
  const listening = (c: Child): Promise<string> => waitListening(c, 60_000);

  let maxSeen = 0;
  let sampling = true;
  const sampler = (async () => {
    for (let i = 0; sampling && i < 20_000; i++) {
      maxSeen = Math.max(maxSeen, (await ownedContainers(dockerd, owner)).length);
      await sleep(25);
    }
  })();
  t.teardown(() => {
    sampling = false;
  });

  const a = run();
  const aBase = await listening(a);
  await waitFor('A leads', () => logLines(a.stdout()).some((l) => l.message === 'became the leader'), 60_000, 100);
  const b = run();
  const bBase = await listening(b);
  t.true(logLines(b.stdout()).some((l) => l.message === 'polydev-reconciler started as a standby; waiting for the lease'));

  // Everything converged under A.
  await waitFor('A converged', async () => (await get(`${aBase}/readyz`)).status === 200, 60_000, 200);
  await waitFor('3 warm containers', async () => {
    const list = await ownedContainers(dockerd, owner);
    return list.length === 3 && list.every((c) => c.State === 'running');
  }, 90_000, 200);
  const rulesBefore = await waitFor('a rule per user', async () => {
    const rules = userRules(await saveNat(env.ns));
    return rules.length === EXAMPLE_USERS.length ? rules : undefined;
  }, 60_000, 200);
  const containersBefore = (await ownedContainers(dockerd, owner)).map((c) => c.Id).sort();
  const portsBefore = await (async () => {
    const s = new Store(env.db, { readonly: true });
    try {
      return s.listResources('ProxyPort').map((r) => `${r.metadata.name}:${String((r.status as { port?: number } | undefined)?.port)}`).sort();
    } finally {
      s.close();
    }
  })();
  t.is(portsBefore.length, EXAMPLE_USERS.length);
  t.false(portsBefore.some((p) => p.endsWith(':undefined')), `every user has a port: ${portsBefore.join(', ')}`);

  // B is a standby: alive, not ready, not serving the API, and says so in its metrics.
  t.is((await get(`${bBase}/healthz`)).status, 200);
  const bReady = await get(`${bBase}/readyz`);
  t.is(bReady.status, 503);
  t.is((bReady.body as { status: string }).status, 'standby');
  const bApi = await get(`${bBase}/api/v1/pools/hot/stats`);
  t.is(bApi.status, 503);
  t.is((bApi.body as { error: { code: string } }).error.code, 'STANDBY');
  t.regex((bApi.body as { error: { message: string } }).error.message, /the leader is /);
  const bMetrics = (await get(`${bBase}/metrics`)).body as string;
  t.is(metricValue(bMetrics, 'polydev_leader'), 0);
  t.false(/^polydev_resource_phase\{/m.test(bMetrics), 'a standby does not export the leader\'s resources a second time');
  t.regex((await get(`${aBase}/metrics`)).body as string, /^polydev_resource_phase\{kind="WarmPool",name="hot"/m);
  t.is(metricValue((await get(`${aBase}/metrics`)).body as string, 'polydev_leader'), 1);

  // A one-shot run on the pair's database is refused: the lone-daemon lease and the election are one lease.
  const once = await runBin(['run', '--once', '--config', cfg], env.childEnv(), 60_000);
  t.is(once.code, 2, once.stderr);
  t.regex(once.stderr, /another polydev-reconciler \(pid \d+ on /);
  t.deepEqual((await ownedContainers(dockerd, owner)).map((c) => c.Id).sort(), containersBefore, 'and it changed nothing');

  // The leader dies without a word.
  const killedAt = Date.now();
  await a.kill();
  // A hang guard, not the 15 s goal: bench/standby.ts measures the takeover against it (a dead
  // leader on this host is replaced at the standby's next 2 s retry; median 0.6 s there). Here a
  // stalled machine must not fail the test, and without a takeover it still fails.
  await waitFor('B leads', () => logLines(b.stdout()).some((l) => l.message === 'became the leader'), 60_000, 50);
  const tookOverMs = Date.now() - killedAt;
  t.log(`standby took over ${tookOverMs} ms after kill -9`);
  await waitFor('B ready', async () => (await get(`${bBase}/readyz`)).status === 200, 60_000, 100);
  t.is(metricValue((await get(`${bBase}/metrics`)).body as string, 'polydev_leader'), 1);

  // A full resync or two under B (resyncInterval 2 s), then nothing was redone: the same containers,
  // ports and rules. Counted rather than slept for: a loaded machine may not get through two
  // resyncs in 5 s, and the check after them would pass without having checked anything.
  const reconciledAtReady = await reconciles(bBase, 'WarmPool');
  await waitFor('two more WarmPool reconciles under B', async () => (await reconciles(bBase, 'WarmPool')) >= reconciledAtReady + 2, 60_000, 200);
  const stats = await get(`${bBase}/api/v1/pools/hot/stats`);
  t.is(stats.status, 200);
  t.is((stats.body as { warm: number }).warm, 3);
  sampling = false;
  await sampler;
  t.deepEqual((await ownedContainers(dockerd, owner)).map((c) => c.Id).sort(), containersBefore, 'B adopted the same containers');
  t.true(maxSeen <= 3, `saw ${maxSeen} containers of a pool of 3`);
  const rulesAfter = userRules(await saveNat(env.ns));
  t.deepEqual(rulesAfter.sort(), [...rulesBefore].sort(), 'the same rules, each once');
  t.is(new Set(rulesAfter).size, rulesAfter.length);

  // A comes back: it is the standby now.
  const a2 = run();
  const a2Base = await listening(a2);
  t.is((await get(`${a2Base}/readyz`)).status, 503);
  t.false(logLines(a2.stdout()).some((l) => l.message === 'became the leader'));

  process.kill(b.pid, 'SIGTERM');
  t.is((await b.exited).code, 0, b.stderr().slice(-2000));
  // A clean stop releases the lease: the standby takes over at its next retry, not after 15 s. Checked
  // in the database rather than by the clock: B's row is gone (or already A's).
  const releasedAt = Date.now();
  const leaseRows = (() => {
    const db = new Store(env.db, { readonly: true });
    try {
      return db.db.prepare('SELECT pid FROM leases').all() as Array<{ pid: number }>;
    } finally {
      db.close();
    }
  })();
  t.false(leaseRows.some((r) => r.pid === b.pid), `B's lease is still there after its clean stop: ${JSON.stringify(leaseRows)}`);
  // Hang guard for the takeover (the next 2 s retry).
  await waitFor('A leads again', () => logLines(a2.stdout()).some((l) => l.message === 'became the leader'), 60_000, 50);
  t.log(`after a clean stop the standby led ${Date.now() - releasedAt} ms later`);
  process.kill(a2.pid, 'SIGTERM');
  t.is((await a2.exited).code, 0);

  const s = new Store(env.db, { readonly: true });
  t.teardown(() => s.close());
  const portsAfter = s.listResources('ProxyPort').map((r) => `${r.metadata.name}:${String((r.status as { port?: number } | undefined)?.port)}`).sort();
  t.deepEqual(portsAfter, portsBefore, 'every user kept its port');
  t.deepEqual(listMembers(s).map((m) => m.containerId).sort(), containersBefore);
  t.is(installationId(s), owner);
  void TOKEN;
});
