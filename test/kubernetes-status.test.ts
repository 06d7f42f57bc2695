// Status written back to the status subresource (src/desired/kubernetes-status.ts), against the
// fake API server in helpers/fake-kube.ts, with the Kubernetes source feeding a real SQLite store.

import test, { type ExecutionContext } from 'ava';
import { ADMISSIONS } from '../src/controllers/registry.js';
import { loadKinds } from '../src/desired/kinds.js';
import { KubernetesSource } from '../src/desired/kubernetes-source.js';
import { KubernetesStatusWriter, toKubernetesStatus } from '../src/desired/kubernetes-status.js';
import { KubernetesClient, loadKubeConfig } from '../src/drivers/kubernetes.js';
import { Metrics } from '../src/observability/metrics.js';
import type { Store } from '../src/state/store.js';
import type { ResourceStatus } from '../src/state/types.js';
import { capturedLogger, startFakeKube, type FakeKube } from './helpers/fake-kube.js';
import { eventually, openStore, validator } from './helpers/unit-fixtures.js';

const NS = 'polydev';

const poolBody = (name: string, host = '127.0.0.1') => ({
  apiVersion: 'polydev.ai/v1alpha1',
  kind: 'ProxyPool',
  metadata: { name },
  spec: {
    portRange: { min: 10001, max: 19999 },
    upstream: { host },
    chains: { nat: `P-${name.toUpperCase()}`, postrouting: `P-${name.toUpperCase()}-MASQ`, filter: `P-${name.toUpperCase()}-FWD` },
  },
});

function status(storeGeneration: number, phase = 'Ready', extra: Record<string, unknown> = {}): ResourceStatus {
  return {
    phase,
    observedGeneration: storeGeneration,
    conditions: [
      { type: 'Ready', status: phase === 'Ready' ? 'True' : 'False', reason: phase, message: `now ${phase}`, lastTransitionTime: '2025-01-01T00:00:00Z', observedGeneration: storeGeneration },
    ],
    ...extra,
  };
}

interface Env {
  fake: FakeKube;
  store: Store;
  writer: KubernetesStatusWriter;
  logs: () => string;
}

async function setup(t: ExecutionContext, seed: (fake: FakeKube) => void): Promise<Env> {
  const { fake, kubeconfig } = await startFakeKube(t);
  seed(fake);
  const { store } = openStore(t);
  const { logger, text } = capturedLogger();
  const client = new KubernetesClient(loadKubeConfig({ kubeconfig }));
  const source = new KubernetesSource({ client, store, validator: validator(), admissions: ADMISSIONS, logger, metrics: new Metrics(), namespace: NS, resyncMs: 60_000, minBackoffMs: 20, maxBackoffMs: 200 });
  t.teardown(() => source.stop());
  await source.start();
  const writer = new KubernetesStatusWriter({ client, store, logger, namespace: NS, source, coalesceMs: 50, minBackoffMs: 50, maxBackoffMs: 200 });
  t.teardown(() => writer.stop());
  writer.start();
  return { fake, store, writer, logs: text };
}

const statusPuts = (fake: FakeKube, name: string) => fake.requests.filter((r) => r.method === 'PUT' && r.path.endsWith(`/proxypools/${name}/status`));

test('a status change in the store reaches the status subresource with the Kubernetes observedGeneration', async (t) => {
  const { fake, store } = await setup(t, (fake) => {
    fake.create('proxypools', NS, poolBody('web'));
    // Two spec edits before the daemon ever saw it: Kubernetes is at generation 3, the store starts at 1.
    fake.update('proxypools', NS, 'web', (o) => ((o.spec!.upstream as Record<string, unknown>).host = '127.0.0.2'));
    fake.update('proxypools', NS, 'web', (o) => ((o.spec!.upstream as Record<string, unknown>).host = '127.0.0.3'));
  });
  t.is(store.getResource('ProxyPool', 'web')?.metadata.generation, 1);
  store.setStatus('ProxyPool', 'web', status(1, 'Ready', { upstreamIP: '127.0.0.3', notInTheSchema: 'x' }));
  await eventually(() => fake.get('proxypools', NS, 'web')?.status?.phase === 'Ready', 'status in Kubernetes');
  const obj = fake.get('proxypools', NS, 'web')!;
  t.is(obj.metadata.generation, 3, 'a status write does not move the generation');
  t.is(obj.status!.observedGeneration, 3);
  t.is((obj.status!.conditions as Array<{ observedGeneration: number }>)[0]!.observedGeneration, 3);
  t.is(obj.status!.upstreamIP, '127.0.0.3');
  t.false('notInTheSchema' in obj.status!, 'fields the CRD does not declare are left out');
  t.is((obj.spec!.upstream as { host: string }).host, '127.0.0.3', 'the spec is untouched');

  // A later spec change: the store's generation 2 is Kubernetes' 4.
  fake.update('proxypools', NS, 'web', (o) => ((o.spec!.upstream as Record<string, unknown>).host = '127.0.0.4'));
  await eventually(() => store.getResource('ProxyPool', 'web')?.metadata.generation === 2, 'the new spec in the store');
  store.setStatus('ProxyPool', 'web', status(2, 'Converging'));
  await eventually(() => fake.get('proxypools', NS, 'web')?.status?.phase === 'Converging', 'the second status');
  t.is(fake.get('proxypools', NS, 'web')!.status!.observedGeneration, 4);
});

test('409 Conflicts are retried with a fresh read and the write lands', async (t) => {
  const { fake, store, logs } = await setup(t, (fake) => void fake.create('proxypools', NS, poolBody('busy')));
  fake.injectStatusConflicts(3);
  store.setStatus('ProxyPool', 'busy', status(1, 'Degraded'));
  await eventually(() => fake.get('proxypools', NS, 'busy')?.status?.phase === 'Degraded', 'the write after conflicts');
  t.is(statusPuts(fake, 'busy').length, 4, 'three conflicts, then the write');
  const gets = fake.requests.filter((r) => r.method === 'GET' && r.path.endsWith('/proxypools/busy'));
  t.true(gets.length >= 3, 'each conflict re-reads the object');
  t.false(logs().includes('cannot write status'), 'handled within the write, not by the failure backoff');
});

test('a burst of status changes is coalesced, and unchanged status is not written again', async (t) => {
  const { fake, store, writer } = await setup(t, (fake) => void fake.create('proxypools', NS, poolBody('burst')));
  for (let i = 0; i < 20; i++) store.setStatus('ProxyPool', 'burst', status(1, 'Converging', { upstreamIP: `127.0.0.${i + 1}` }));
  await eventually(() => fake.get('proxypools', NS, 'burst')?.status?.upstreamIP === '127.0.0.20', 'the last status');
  await writer.flush();
  const puts = statusPuts(fake, 'burst').length;
  t.true(puts <= 3, `20 changes, ${puts} writes`);
  await new Promise((r) => setTimeout(r, 300));
  t.is(statusPuts(fake, 'burst').length, puts, 'nothing more to write');
});

test('an object deleted in Kubernetes is dropped, not retried', async (t) => {
  const { fake, store, logs } = await setup(t, (fake) => void fake.create('proxypools', NS, poolBody('gone')));
  // The source's watches are up (so that dropping them below hides the delete from it). Was a
  // 100 ms sleep, which a loaded machine can outlast.
  await eventually(() => fake.openWatches === 4, 'four watches');
  // The delete and the status change race: the writer finds the object gone.
  fake.dropWatches();
  fake.delete('proxypools', NS, 'gone');
  store.setStatus('ProxyPool', 'gone', status(1, 'Terminating'));
  await eventually(() => fake.requests.some((r) => r.method === 'GET' && r.path.endsWith('/proxypools/gone')) || statusPuts(fake, 'gone').length > 0, 'an attempt');
  await new Promise((r) => setTimeout(r, 400));
  t.true(statusPuts(fake, 'gone').length <= 1);
  t.false(logs().includes('cannot write status'), 'a 404 is not a failure');
});

test('failed writes are retried with backoff until they land', async (t) => {
  const { fake, store, logs } = await setup(t, (fake) => void fake.create('proxypools', NS, poolBody('flaky')));
  fake.blockToken(fake.token);
  store.setStatus('ProxyPool', 'flaky', status(1, 'Ready'));
  await eventually(() => logs().includes('cannot write status to Kubernetes; retrying'), 'a failure');
  t.is(fake.get('proxypools', NS, 'flaky')?.status, undefined);
  fake.blockToken(fake.token, false);
  await eventually(() => fake.get('proxypools', NS, 'flaky')?.status?.phase === 'Ready', 'the retried write');
  t.false(logs().includes(fake.token), 'the token is in no log line');
});

test('toKubernetesStatus leaves out an observedGeneration it cannot translate', (t) => {
  const info = loadKinds().get('ProxyPool')!;
  const out = toKubernetesStatus(info, status(7), (g) => (g === 7 ? undefined : g));
  t.false('observedGeneration' in out);
  t.false('observedGeneration' in (out.conditions as object[])[0]!);
  t.is(out.phase, 'Ready');
});
