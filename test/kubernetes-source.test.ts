// Desired state from Kubernetes custom resources (src/desired/kubernetes-source.ts) through the
// client in src/drivers/kubernetes.ts, against the fake API server in helpers/fake-kube.ts, with
// real SQLite stores.

import test, { type ExecutionContext } from 'ava';
import fs from 'node:fs';
import path from 'node:path';
import { ADMISSIONS } from '../src/controllers/registry.js';
import { KUBE_GENERATION_ANNOTATION, KubernetesSource } from '../src/desired/kubernetes-source.js';
import { applyPath } from '../src/desired/apply.js';
import { boundAllocationOf } from '../src/state/allocations.js';
import { KubernetesClient, loadKubeConfig, resolveNamespace } from '../src/drivers/kubernetes.js';
import { Metrics } from '../src/observability/metrics.js';
import type { Store } from '../src/state/store.js';
import { capturedLogger, startFakeKube, type FakeKube, type FakeKubeOptions } from './helpers/fake-kube.js';
import { eventually, openStore, poolYaml, tempDir, validator, writeFiles } from './helpers/unit-fixtures.js';

const NS = 'polydev';

function pool(name: string, chainPrefix = name === 'default' ? 'POLYDEV-PROXY' : `P-${name.toUpperCase()}`, host = '127.0.0.1') {
  return {
    apiVersion: 'polydev.ai/v1alpha1',
    kind: 'ProxyPool',
    metadata: { name },
    spec: {
      portRange: { min: 10001, max: 19999 },
      upstream: { host },
      chains: { nat: chainPrefix, postrouting: `${chainPrefix}-MASQ`, filter: `${chainPrefix}-FWD` },
    },
  };
}

function port(name: string, userId: string, sourceIP: string, extra: Record<string, unknown> = {}) {
  return { apiVersion: 'polydev.ai/v1alpha1', kind: 'ProxyPort', metadata: { name }, spec: { userId, sourceIP, ...extra } };
}

interface Env {
  fake: FakeKube;
  store: Store;
  source: KubernetesSource;
  logs: () => string;
  client: KubernetesClient;
}

async function setup(
  t: ExecutionContext,
  opts: { fake?: FakeKubeOptions; resyncMs?: number; seed?: (fake: FakeKube) => void; store?: Store } = {},
): Promise<Env> {
  const { fake, kubeconfig } = await startFakeKube(t, opts.fake ?? {});
  opts.seed?.(fake);
  const store = opts.store ?? openStore(t).store;
  const { logger, text } = capturedLogger();
  const client = new KubernetesClient(loadKubeConfig({ kubeconfig }));
  const source = new KubernetesSource({
    client,
    store,
    validator: validator(),
    admissions: ADMISSIONS,
    logger,
    metrics: new Metrics(),
    namespace: NS,
    resyncMs: opts.resyncMs ?? 60_000,
    minBackoffMs: 20,
    maxBackoffMs: 200,
  });
  t.teardown(() => source.stop());
  await source.start();
  return { fake, store, source, logs: text, client };
}

const watchesOf = (fake: FakeKube, plural: string) =>
  fake.requests.filter((r) => r.path.endsWith(`/namespaces/${NS}/${plural}`) && r.query.watch === 'true');
const listsOf = (fake: FakeKube, plural: string) =>
  fake.requests.filter((r) => r.method === 'GET' && r.path.endsWith(`/namespaces/${NS}/${plural}`) && r.query.watch === undefined);

test('objects present at start are in the store when start() resolves, with the Kubernetes generation kept', async (t) => {
  const { store, fake } = await setup(t, {
    seed: (fake) => {
      fake.create('proxypools', NS, pool('default'));
      fake.create('proxyports', NS, port('alice', 'alice', '10.0.0.1'));
      fake.update('proxypools', NS, 'default', (o) => ((o.spec!.upstream as Record<string, unknown>).host = '127.0.0.2'));
      fake.create('proxypools', 'elsewhere', pool('other', 'P-OTHER'));
    },
  });
  const p = store.getResource('ProxyPool', 'default');
  t.is(p?.source, 'kubernetes');
  t.is((p?.spec.upstream as { host: string }).host, '127.0.0.2');
  t.is(p?.metadata.annotations[KUBE_GENERATION_ANNOTATION], '2', 'the Kubernetes generation (2), not the store one (1)');
  t.is(p?.metadata.generation, 1);
  // The schema's defaults are filled in, as for YAML.
  t.is(store.getResource('ProxyPool', 'default')?.spec.portReuseCooldown !== undefined, true);
  t.is(store.getResource('ProxyPort', 'alice')?.source, 'kubernetes');
  t.is(store.getResource('ProxyPool', 'other'), undefined, 'another namespace is not watched');
  // List then watch from the list's version, with bookmarks; Claims are not desired state.
  await eventually(() => watchesOf(fake, 'proxypools').length > 0, 'a watch');
  const w = watchesOf(fake, 'proxypools')[0]!;
  t.is(w.query.allowWatchBookmarks, 'true');
  t.truthy(w.query.resourceVersion);
  t.is(listsOf(fake, 'claims').length, 0);
});

test('a new leader keeps recorded ports: objects whose status names a port are admitted before those without', async (t) => {
  const { store } = await setup(t, {
    seed: (fake) => {
      fake.create('proxypools', NS, pool('default'));
      // aaron comes first in the list and has no port yet; alice's status names the first port.
      fake.create('proxyports', NS, port('aaron', 'aaron', '10.0.0.9'));
      fake.create('proxyports', NS, port('alice', 'alice', '10.0.0.1'));
      fake.updateStatus('proxyports', NS, 'alice', { phase: 'Ready', port: 10001 });
      fake.create('proxyports', NS, port('bob', 'bob', '10.0.0.2'));
      fake.updateStatus('proxyports', NS, 'bob', { phase: 'Ready', port: 10005 });
    },
  });
  const portOf = (user: string) => boundAllocationOf(store, user)?.port;
  t.is(portOf('alice'), 10001);
  t.is(portOf('bob'), 10005, 'a recorded port is kept even when lower ones are free');
  t.is(portOf('aaron'), 10002, 'the one without a record gets the next free port, not alice\'s');
});

test('create, update and delete of a custom resource reach the store', async (t) => {
  const { store, fake, source } = await setup(t, { seed: (fake) => void fake.create('proxypools', NS, pool('default')) });
  fake.create('proxyports', NS, port('bob', 'bob', '10.0.0.2'));
  await eventually(() => store.getResource('ProxyPort', 'bob') !== undefined, 'ProxyPort/bob in the store');
  t.is(store.getResource('ProxyPort', 'bob')?.spec.sourceIP, '10.0.0.2');

  fake.update('proxyports', NS, 'bob', (o) => (o.spec!.sourceIP = '10.0.0.3'));
  await eventually(() => store.getResource('ProxyPort', 'bob')?.spec.sourceIP === '10.0.0.3', 'the update');
  const r = store.getResource('ProxyPort', 'bob')!;
  t.is(r.metadata.generation, 2);
  t.is(source.kubernetesGeneration('ProxyPort', 'bob', 2), 2);
  t.is(source.kubernetesGeneration('ProxyPort', 'bob', 1), 1);

  // A label-only change moves neither generation.
  fake.update('proxyports', NS, 'bob', (o) => (o.metadata.labels = { team: 'x' }));
  await eventually(() => store.getResource('ProxyPort', 'bob')?.metadata.labels.team === 'x', 'the label');
  t.is(store.getResource('ProxyPort', 'bob')?.metadata.generation, 2);

  fake.delete('proxyports', NS, 'bob');
  await eventually(() => store.getResource('ProxyPort', 'bob')?.metadata.deletionTimestamp !== undefined, 'deletion requested');
  t.truthy(store.getResource('ProxyPort', 'bob'), 'the controller removes it after teardown, not the source');
});

test('an invalid custom resource gets a Warning event and does not block a valid one; the last good spec stays', async (t) => {
  // An API server with an older CRD installed lets through what the daemon's schema refuses.
  const { store, fake } = await setup(t, { fake: { validate: false }, seed: (fake) => void fake.create('proxypools', NS, pool('default')) });
  fake.create('proxyports', NS, port('bad', 'carol', 'not-an-ip'));
  fake.create('proxyports', NS, port('good', 'dave', '10.0.0.4'));
  await eventually(() => store.getResource('ProxyPort', 'good') !== undefined, 'the valid one');
  t.is(store.getResource('ProxyPort', 'bad'), undefined);
  await eventually(() => store.listEvents({ kind: 'ProxyPort', name: 'bad' }).length > 0, 'a Warning event');
  const ev = store.listEvents({ kind: 'ProxyPort', name: 'bad' })[0]!;
  t.is(ev.type, 'Warning');
  t.regex(ev.message, /ProxyPort\/bad: spec\.sourceIP: .*not applied/);
  await eventually(() => fake.events.some((e) => (e.involvedObject as { name: string }).name === 'bad'), 'a core/v1 Event');

  // An invalid update keeps the previous valid spec in effect.
  fake.update('proxyports', NS, 'good', (o) => (o.spec!.sourceIP = '999.1.1.1'));
  await eventually(() => store.listEvents({ kind: 'ProxyPort', name: 'good' }).some((e) => e.type === 'Warning'), 'a Warning for good');
  t.is(store.getResource('ProxyPort', 'good')?.spec.sourceIP, '10.0.0.4');
  t.regex(store.listEvents({ kind: 'ProxyPort', name: 'good' }).find((e) => e.type === 'Warning')!.message, /previous valid spec stays in effect/);
  // Fixed: applied again.
  fake.update('proxyports', NS, 'good', (o) => (o.spec!.sourceIP = '10.0.0.5'));
  await eventually(() => store.getResource('ProxyPort', 'good')?.spec.sourceIP === '10.0.0.5', 'the fix');
});

test('a ProxyPort refused because its pool is missing is applied once the pool arrives', async (t) => {
  const { store, fake } = await setup(t, { seed: (fake) => void fake.create('proxyports', NS, port('early', 'erin', '10.0.1.1')) });
  t.is(store.getResource('ProxyPort', 'early'), undefined);
  t.regex(store.listEvents({ kind: 'ProxyPort', name: 'early' })[0]?.message ?? '', /ProxyPool "default" does not exist/);
  fake.create('proxypools', NS, pool('default'));
  await eventually(() => store.getResource('ProxyPort', 'early') !== undefined, 'the port after its pool');
  t.is(store.listEvents({ kind: 'ProxyPort', name: 'early' }).at(-1)?.reason, 'Accepted');
});

test('a dropped watch resumes from the last resourceVersion without a relist', async (t) => {
  const { store, fake } = await setup(t, { seed: (fake) => void fake.create('proxypools', NS, pool('default')) });
  await eventually(() => fake.openWatches === 4, 'four watches');
  const created = fake.create('proxyports', NS, port('fred', 'fred', '10.0.2.1'));
  await eventually(() => store.getResource('ProxyPort', 'fred') !== undefined, 'fred');
  const lists = listsOf(fake, 'proxyports').length;
  const watches = watchesOf(fake, 'proxyports').length;
  fake.dropWatches();
  await eventually(() => watchesOf(fake, 'proxyports').length > watches, 'a new watch');
  const resumed = watchesOf(fake, 'proxyports').at(-1)!;
  t.is(resumed.query.resourceVersion, created.metadata.resourceVersion);
  t.is(listsOf(fake, 'proxyports').length, lists, 'no relist');
  // And it still delivers.
  fake.delete('proxyports', NS, 'fred');
  await eventually(() => store.getResource('ProxyPort', 'fred')?.metadata.deletionTimestamp !== undefined, 'the delete after resume');
});

test('bookmarks advance the resourceVersion a watch resumes from', async (t) => {
  const { fake } = await setup(t);
  await eventually(() => fake.openWatches === 4, 'four watches');
  const first = watchesOf(fake, 'turnservers').at(-1)!.query.resourceVersion;
  // Other kinds move the global version; turnservers sees none of it but a bookmark.
  fake.create('proxypools', NS, pool('default'));
  fake.create('proxypools', NS, pool('second', 'P-SECOND'));
  const now = String(fake.resourceVersion);
  t.not(first, now);
  // Bookmark, give the client a moment to read it, cut the watch: it resumes from the bookmark's
  // version. Nothing outside the source shows when it has read the bookmark, and on a loaded
  // machine 100 ms may not be enough; so a resume that still starts from the first version (the
  // bookmark not read yet: nothing else could have moved it) is followed by another round, until a
  // deadline that is a hang guard. A source that ignored bookmarks never resumes from `now`.
  const deadline = Date.now() + 30_000;
  for (let round = 1; ; round++) {
    await eventually(() => fake.openWatches === 4, 'four watches');
    fake.sendBookmarks();
    await new Promise((r) => setTimeout(r, 100));
    const before = watchesOf(fake, 'turnservers').length;
    fake.dropWatches();
    await eventually(() => watchesOf(fake, 'turnservers').length > before, 'the resumed watch');
    const resumedFrom = watchesOf(fake, 'turnservers').at(-1)!.query.resourceVersion;
    if (resumedFrom === now || Date.now() > deadline) {
      t.is(resumedFrom, now, `resumed from the bookmark's version (round ${round})`);
      break;
    }
    t.is(resumedFrom, first, 'not yet the bookmark: still the first version');
  }
});

test('410 Gone relists, and the relist prunes what was deleted meanwhile', async (t) => {
  const { store, fake } = await setup(t, {
    seed: (fake) => {
      fake.create('proxypools', NS, pool('default'));
      fake.create('proxyports', NS, port('gina', 'gina', '10.0.3.1'));
      fake.create('proxyports', NS, port('hank', 'hank', '10.0.3.2'));
    },
  });
  await eventually(() => fake.openWatches === 4, 'four watches');
  const lists = listsOf(fake, 'proxyports').length;
  // All in one tick: no watch sees the delete, and the history is gone when they come back.
  fake.dropWatches();
  fake.delete('proxyports', NS, 'gina');
  fake.update('proxyports', NS, 'hank', (o) => (o.spec!.sourceIP = '10.0.3.3'));
  fake.compact();
  await eventually(() => store.getResource('ProxyPort', 'gina')?.metadata.deletionTimestamp !== undefined, 'gina pruned');
  t.is(store.getResource('ProxyPort', 'hank')?.spec.sourceIP, '10.0.3.3');
  t.true(listsOf(fake, 'proxyports').length > lists, 'relisted');
  t.is(store.getResource('ProxyPool', 'default')?.metadata.deletionTimestamp, undefined, 'still-present objects are kept');
});

test('resync relists every resyncMs and repairs an event the watch never delivered', async (t) => {
  const { store, fake } = await setup(t, { resyncMs: 300, seed: (fake) => void fake.create('proxypools', NS, pool('default')) });
  const spec = structuredClone(fake.get('proxypools', NS, 'default')!.spec!);
  (spec.upstream as Record<string, unknown>).host = '127.0.0.9';
  fake.silentUpdate('proxypools', NS, 'default', spec);
  await eventually(() => (store.getResource('ProxyPool', 'default')?.spec.upstream as { host: string }).host === '127.0.0.9', 'the resync');
  await eventually(() => listsOf(fake, 'proxypools').length >= 3, 'repeated relists');
  t.pass();
});

test('resources from other sources are left alone', async (t) => {
  const { store } = openStore(t);
  const dir = tempDir(t);
  writeFiles(dir, { 'pool.yaml': poolYaml('default') });
  t.true(applyPath(store, validator(), ADMISSIONS, dir).ok);
  const before = store.getResource('ProxyPool', 'default')!;
  const { fake } = await setup(t, { store, seed: (fake) => void fake.create('proxypools', NS, pool('default', 'OTHER', '10.9.9.9')) });
  const after = store.getResource('ProxyPool', 'default')!;
  t.is(after.source, 'apply');
  t.deepEqual(after.spec, before.spec);
  t.regex(store.listEvents({ kind: 'ProxyPool', name: 'default' }).at(-1)!.message, /from a YAML apply/);
  // Deleting the CR does not delete the applied resource either.
  fake.delete('proxypools', NS, 'default');
  await new Promise((r) => setTimeout(r, 200));
  t.is(store.getResource('ProxyPool', 'default')?.metadata.deletionTimestamp, undefined);
});

test('start fails with a clear error when the credentials are refused, and the token is in no message or log', async (t) => {
  const { fake, dir } = await startFakeKube(t);
  const wrongToken = 'wrong-token-0123456789abcdef';
  const kubeconfig = path.join(dir, 'wrong.yaml');
  fs.writeFileSync(kubeconfig, fs.readFileSync(path.join(dir, 'kubeconfig.yaml'), 'utf8').replace(fake.token, wrongToken));
  const { store } = openStore(t);
  const { logger, text } = capturedLogger();
  const source = new KubernetesSource({
    client: new KubernetesClient(loadKubeConfig({ kubeconfig })),
    store,
    validator: validator(),
    admissions: ADMISSIONS,
    logger,
    metrics: new Metrics(),
    namespace: NS,
    resyncMs: 60_000,
  });
  const err = await t.throwsAsync(source.start());
  t.regex(err!.message, /401/);
  t.false(err!.message.includes(wrongToken));
  t.false(text().includes(wrongToken));
  await source.stop();
});

test('the bearer token never appears in the logs of a working source', async (t) => {
  const { logs, fake } = await setup(t, { fake: { validate: false }, seed: (fake) => void fake.create('proxypools', NS, pool('default')) });
  fake.create('proxyports', NS, port('bad', 'x', 'nope'));
  fake.dropWatches();
  await eventually(() => logs().includes('kubernetes resource rejected'), 'a warning in the log');
  t.true(logs().length > 0);
  t.false(logs().includes(fake.token));
});

test('the kubeconfig: a clear error naming what was tried, and the namespace order', (t) => {
  const root = tempDir(t);
  const err = t.throws(() => loadKubeConfig({}, {}, root));
  t.regex(err!.message, /no kubeconfig was given.*KUBERNETES_SERVICE_HOST.*serviceaccount\/token does not exist/);
  t.regex(t.throws(() => loadKubeConfig({ kubeconfig: path.join(root, 'missing') }))!.message, /kubeconfig .*missing: cannot load it/);

  const kubeconfig = path.join(root, 'kc.yaml');
  fs.writeFileSync(kubeconfig, [
    'apiVersion: v1', 'kind: Config', 'clusters:', '- name: c', '  cluster:', '    server: http://127.0.0.1:1', '    insecure-skip-tls-verify: true',
    'users:', '- name: u', '  user:', '    token: secret-token-value', 'contexts:', '- name: x', '  context:', '    cluster: c', '    user: u', '    namespace: from-context',
    'current-context: x', '',
  ].join('\n'));
  t.is(resolveNamespace({ namespace: 'given', kubeconfig }, { inClusterRoot: root }), 'given');
  t.is(resolveNamespace({ namespace: undefined, kubeconfig }, { inClusterRoot: root }), 'from-context');
  t.is(resolveNamespace({ namespace: undefined, kubeconfig: undefined }, { inClusterRoot: root }), 'default');
  const sa = path.join(root, 'var/run/secrets/kubernetes.io/serviceaccount');
  fs.mkdirSync(sa, { recursive: true });
  fs.writeFileSync(path.join(sa, 'namespace'), 'pod-ns\n');
  fs.writeFileSync(path.join(sa, 'token'), 'sa-token');
  t.is(resolveNamespace({ namespace: undefined, kubeconfig }, { inClusterRoot: root }), 'pod-ns');
  const kc = loadKubeConfig({}, { KUBERNETES_SERVICE_HOST: '10.0.0.1', KUBERNETES_SERVICE_PORT: '443' }, root);
  t.is(kc.getCurrentCluster()?.server, 'https://10.0.0.1:443');
});
