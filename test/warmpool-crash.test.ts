// Crash safety of warm pools: the real daemon binary is killed with SIGKILL in the middle of
// refills and of a cold-start claim, then started again on the same database and dockerd.
// It must adopt what it finds: no more than maxSize containers at any moment, no leaked
// containers, and claims still bound to their containers.

import anyTest, { type TestFn } from 'ava';
import path from 'node:path';
import { LABELS } from '../src/controllers/warmpool/engine.js';
import { installationId, listClaims, listMembers } from '../src/state/pools.js';
import { Store } from '../src/state/store.js';
import { startDockerd, type Dockerd } from './helpers/dockerd.js';
import { BIN, TOKEN, e2eEnv, sleep, spawnChild, waitFor, waitStarted, type Child } from './helpers/e2e-env.js';
import { ownedContainers, poolApi, poolsYaml } from './helpers/warmpool-env.js';

const test = anyTest as TestFn<{ dockerd: Dockerd }>;

test.before(async (t) => {
  t.context.dockerd = await startDockerd({ name: 'crash' });
});
test.after.always(async (t) => {
  await t.context.dockerd?.stop();
});


test.serial('kill -9 mid-refill and mid-claim, restart: adopted, never above maxSize, nothing leaked, claims kept', async (t) => {
  // Three daemon starts and some 15 container starts in one test: under load far past ava's 120 s
  // without a test result. A hang guard, like the waits' deadlines below.
  t.timeout(480_000);
  const { dockerd } = t.context;
  const env = await e2eEnv(t);
  const cfg = env.writeConfig({
    desiredStateDir: env.desiredDir,
    apiTokenFile: env.tokenFile,
    resyncInterval: '60s',
    logLevel: 'info',
    docker: { socket: dockerd.socketPath, network: 'none' },
    process: { runDir: path.join(env.dir, 'run') },
    // Two starts at a time: a refill of 10 takes long enough to be killed in the middle.
    warmPools: { parallelism: 2 },
    // The clean SIGTERM stop at the end must exit 0; the process exits 1 on its own once a stop takes
    // shutdownTimeout + 1.5 s. The test is not about that limit, and a loaded machine can need more than 5 s.
    shutdownTimeout: '30s',
  });
  env.writeDesired('pools.yaml', poolsYaml([
    { name: 'crashy', image: dockerd.image, size: 10, maxSize: 12 },
    { name: 'cold', image: dockerd.image, size: 0, maxSize: 2 },
  ]));
  const run = (): Child => spawnChild(t, process.execPath, [BIN, 'run', '--config', cfg], env.childEnv());
  // Hang guard for a daemon process start (5-20x slower under load than the usual second).
  const started = (c: Child): Promise<string> => waitStarted(c, 60_000);

  // The owner label comes from the database: create it (and read it) before the first start.
  const owner = (() => {
    const s = new Store(env.db);
    try {
      return installationId(s);
    } finally {
      s.close();
    }
  })();

  let maxSeen = 0;
  let sampling = true;
  const sampler = (async () => {
    while (sampling) {
      const n = (await ownedContainers(dockerd, owner)).filter((c) => c.Labels[LABELS.pool] === 'crashy').length;
      maxSeen = Math.max(maxSeen, n);
      await sleep(20);
    }
  })();

  // 1: killed in the middle of the first refill.
  let d = run();
  await started(d);
  await waitFor('refill under way', async () => {
    const n = (await ownedContainers(dockerd, owner)).length;
    return n >= 2 && n <= 7;
  }, 60_000, 10);
  await d.kill();

  // 2: restarted, a warm claim and a cold claim made; killed while the cold start may be in flight
  // and the refill after the warm claim is running.
  d = run();
  const base = await started(d);
  const api = poolApi({ address: base } as never);
  const warm = await waitFor('a warm claim', async () => {
    const r = await api.claim('crashy', { userId: 'keeper' });
    return r.status === 201 ? r.body : undefined;
  }, 60_000, 200);
  const coldReq = api.claim('cold', { userId: 'coldie' }).catch(() => undefined);
  await sleep(30);
  await d.kill();
  const coldRes = await coldReq;

  // 3: restarted again and left to converge.
  d = run();
  const base3 = await started(d);
  const api3 = poolApi({ address: base3 } as never);
  await waitFor('crashy converged', async () => {
    const s = await api3.stats('crashy');
    return s.status === 200 && s.body.warm === 10 && s.body.starting === 0;
  }, 90_000, 200);
  await waitFor('no leftovers', async () => {
    const list = await ownedContainers(dockerd, owner);
    return list.filter((c) => c.Labels[LABELS.pool] === 'crashy').length === 11 && list.every((c) => c.State === 'running');
  }, 60_000, 200);
  sampling = false;
  await sampler;
  t.true(maxSeen <= 12, `saw ${maxSeen} containers of a pool with maxSize 12`);

  // Stop cleanly and check the store against dockerd.
  process.kill(d.pid, 'SIGTERM');
  t.is((await d.exited).code, 0);
  const store = new Store(env.db);
  t.teardown(() => store.close());
  const list = await ownedContainers(dockerd, owner);
  const members = listMembers(store);
  t.deepEqual(members.map((m) => m.containerId).sort(), list.map((c) => c.Id).sort(), 'every container is a member and every member a container');
  const open = listClaims(store, { state: 'open' });
  const keeper = open.find((c) => c.userId === 'keeper');
  t.truthy(keeper, 'the warm claim survived two crashes');
  t.is(keeper!.containerId, warm.container.id);
  t.true(list.some((c) => c.Id === warm.container.id && c.State === 'running'));
  // The cold claim either completed before the kill (then it is bound to a running container)
  // or it failed on restart and its container, if created, is gone.
  const cold = listClaims(store, { pool: 'cold' });
  for (const c of cold) {
    if (c.state === 'bound') t.true(list.some((x) => x.Id === c.containerId));
    else t.is(c.state, 'failed');
  }
  t.is(list.filter((c) => c.Labels[LABELS.pool] === 'cold').length, cold.filter((c) => c.state === 'bound').length);
  t.truthy(coldRes === undefined || coldRes.status === 201 || coldRes.status >= 500 || coldRes.status === 0);
  void TOKEN;
});
