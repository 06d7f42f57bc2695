// `source: kubernetes` end to end, against test/helpers/fake-kube.ts (a fake of the documented API
// endpoints: no real API server runs on these machines) and real iptables in a test namespace.
// Two daemons, each with a database of its own, elect a leader on a coordination.k8s.io/v1 Lease.
// The leader applies the custom resources, programs the rules and writes status back to the status
// subresource; when it is cut off from the API server it stops acting, and the standby takes
// over, keeps every user's port (from the status the old leader wrote) and programs nothing twice.

import test from 'ava';
import fs from 'node:fs';
import path from 'node:path';
import YAML from 'yaml';
import { Daemon } from '../src/daemon.js';
import { FAKE_GROUP, FAKE_VERSION, startFakeKube, writeKubeconfig, type FakeKube } from './helpers/fake-kube.js';
import { configFrom, e2eEnv, poolDoc, portDoc, saveNat, sleep, userRules, waitFor } from './helpers/e2e-env.js';
import { silentLogger } from '../src/observability/logger.js';

const NS = 'polydev-system';
const LEASE = 'polydev-reconciler';

function cr(doc: Record<string, unknown>): Record<string, unknown> {
  return { ...doc, apiVersion: `${FAKE_GROUP}/${FAKE_VERSION}`, metadata: { ...(doc.metadata as object), namespace: NS } };
}

/** The RBAC verb of a request, as the API server's authorizer sees it. */
function grantOf(r: { method: string; path: string; query: Record<string, string> }): string {
  const m = /^\/(?:apis\/([^/]+)\/[^/]+|api\/v1)\/namespaces\/[^/]+\/([^/]+)(?:\/([^/]+))?(?:\/(status))?$/.exec(r.path);
  if (!m) return `unexpected path ${r.path}`;
  const [, group = '', resource, name, sub] = m;
  const verb = r.method === 'GET' ? (r.query.watch === '1' || r.query.watch === 'true' ? 'watch' : name ? 'get' : 'list')
    : r.method === 'PUT' ? 'update' : r.method === 'POST' ? 'create' : r.method === 'PATCH' ? 'patch' : r.method === 'DELETE' ? 'delete' : r.method;
  return `${group}|${resource}${sub ? `/${sub}` : ''}|${verb}|${name ?? ''}`;
}

/** The (group, resource, verb, name) tuples manifests/kubernetes/rbac.yaml grants ('' name: any). */
function roleGrants(): Set<string> {
  const docs = YAML.parseAllDocuments(fs.readFileSync(path.join(import.meta.dirname, '..', 'manifests', 'kubernetes', 'rbac.yaml'), 'utf8'));
  const role = docs.map((d) => d.toJS() as { kind: string; rules: Array<{ apiGroups: string[]; resources: string[]; verbs: string[]; resourceNames?: string[] }> }).find((d) => d.kind === 'Role')!;
  const out = new Set<string>();
  for (const rule of role.rules) {
    for (const g of rule.apiGroups) for (const res of rule.resources) for (const v of rule.verbs) for (const n of rule.resourceNames ?? ['']) out.add(`${g}|${res}|${v}|${n}`);
  }
  return out;
}

function statusOf(fake: FakeKube, plural: string, name: string): Record<string, unknown> | undefined {
  return fake.get(plural, NS, name)?.status as Record<string, unknown> | undefined;
}

test.serial('two daemons on a Lease: the leader syncs the custom resources and writes status; a cut-off leader is replaced, ports kept', async (t) => {
  const env = await e2eEnv(t);
  const tokenB = 'token-of-daemon-b-0123456789';
  const { fake, kubeconfig: kubeconfigA, dir } = await startFakeKube(t, { extraTokens: [tokenB], namespace: NS });
  const kubeconfigB = writeKubeconfig(dir, fake.address, tokenB, { namespace: NS, file: 'kubeconfig-b.yaml' });

  fake.create('proxypools', NS, cr(poolDoc({})));
  // carol takes the first port and leaves later: a fresh allocation would hand alice and bob other ports.
  fake.create('proxyports', NS, cr(portDoc({ userId: 'carol', sourceIP: '127.0.0.13' })));
  fake.create('proxyports', NS, cr(portDoc({ userId: 'alice', sourceIP: '127.0.0.11' })));
  fake.create('proxyports', NS, cr(portDoc({ userId: 'bob', sourceIP: '127.0.0.12' })));

  const lost: string[] = [];
  const daemon = async (id: string, kubeconfig: string): Promise<Daemon> => {
    const cfgFile = env.writeConfig({
      database: path.join(env.dir, `${id}.db`),
      source: 'kubernetes',
      kubernetes: { kubeconfig, namespace: NS },
      installationId: 'kube-pair',
      leaderElection: { enabled: true, identity: id, leaseDuration: '3s', renewDeadline: '2s', retryPeriod: '300ms' },
    }, `${id}.yaml`);
    const d = new Daemon(configFrom(cfgFile), { logger: silentLogger(), onLeadershipLost: () => lost.push(id) });
    t.teardown(() => d.stop());
    await d.start();
    return d;
  };

  const a = await daemon('a', kubeconfigA);
  await a.waitLeading(15_000);
  const b = await daemon('b', kubeconfigB);
  await sleep(1000);
  t.false(b.isLeader(), 'one leader at a time');
  t.is((fake.lease(NS, LEASE)?.spec as { holderIdentity?: string } | undefined)?.holderIdentity, 'a');

  // The leader: everything from the cluster is in its store and programmed, and status went back.
  await waitFor('the leader converged', () => a.manager.isReady(), 30_000, 100);
  await waitFor('a rule per user', async () => userRules(await saveNat(env.ns)).length === 3, 30_000, 100);
  const ports = await waitFor('ports in the custom resources\' status', () => {
    const alice = statusOf(fake, 'proxyports', 'alice');
    const bob = statusOf(fake, 'proxyports', 'bob');
    return typeof alice?.port === 'number' && typeof bob?.port === 'number' ? { alice: alice.port, bob: bob.port } : undefined;
  }, 30_000, 100);
  t.is(a.store.getResource('ProxyPort', 'alice')?.source, 'kubernetes');
  fake.delete('proxyports', NS, 'carol');
  const rulesBefore = await waitFor('carol gone', async () => {
    const rules = userRules(await saveNat(env.ns));
    return rules.length === 2 && a.store.getResource('ProxyPort', 'carol') === undefined ? rules : undefined;
  }, 30_000, 100);
  t.true(ports.alice > 10001 && ports.bob > 10001, `carol had the first port: ${JSON.stringify(ports)}`);
  const poolStatus = await waitFor('the pool\'s status', () => {
    const st = statusOf(fake, 'proxypools', 'default');
    return st?.phase === 'Ready' ? st : undefined;
  }, 30_000, 100);
  t.is(poolStatus.observedGeneration, fake.get('proxypools', NS, 'default')!.metadata.generation);
  t.is(b.store.listResources().length, 0, 'the standby applied nothing');

  // A spec change in the cluster: a new generation, applied, and observed in status.
  fake.update('proxypools', NS, 'default', (o) => {
    (o.spec as { destinationPorts: number[] }).destinationPorts = [80, 443, 8080];
  });
  const generation = fake.get('proxypools', NS, 'default')!.metadata.generation!;
  t.is(generation, 2);
  await waitFor('observedGeneration 2', () => statusOf(fake, 'proxypools', 'default')?.observedGeneration === 2 && statusOf(fake, 'proxypools', 'default')?.phase === 'Ready', 30_000, 100);
  const rulesV2 = await waitFor('rules for 8080', async () => {
    const rules = userRules(await saveNat(env.ns));
    return rules.some((r) => r.includes('8080')) ? rules : undefined;
  }, 30_000, 100);
  t.not(rulesV2.join('\n'), rulesBefore.join('\n'));

  // The leader is cut off from the API server: it gives up after renewDeadline, and B takes the lease.
  // Every reconcile A starts from here on is recorded, with whether A had given up by then.
  const started: Array<{ key: string; afterLoss: boolean }> = [];
  const reconcileKey = a.manager.reconcileKey.bind(a.manager);
  a.manager.reconcileKey = (key: string) => {
    started.push({ key, afterLoss: lost.includes('a') });
    return reconcileKey(key);
  };
  fake.blockToken(fake.token);
  const cutAt = Date.now();
  await waitFor('A gives up', () => lost.includes('a'), 10_000, 50);
  t.true(Date.now() - cutAt < 3000, 'A stopped acting before its lease could expire');
  t.true(started.length > 0, 'A was reconciling (resync every 500 ms) until it gave up');
  // It stopped acting at once, not after a graceful shutdown: no reconcile starts any more. (One
  // that was already running may still finish: it is aborted, and fencing it is not possible.)
  await sleep(1500);
  t.deepEqual(started.filter((s) => s.afterLoss), [], 'no reconcile started after the lease was lost');
  t.false(a.isLeader());
  await a.stop();
  await b.waitLeading(15_000);
  t.log(`B led ${Date.now() - cutAt} ms after A was cut off`);
  const lease = fake.lease(NS, LEASE)?.spec as { holderIdentity: string; leaseTransitions: number };
  t.is(lease.holderIdentity, 'b');
  t.true(lease.leaseTransitions >= 1);

  // B adopts: same ports (from the status A wrote), each rule once, nothing else.
  await waitFor('B converged', () => b.manager.isReady(), 30_000, 100);
  await sleep(1500);
  const bPorts = { alice: b.store.getStatus('ProxyPort', 'alice')?.port, bob: b.store.getStatus('ProxyPort', 'bob')?.port };
  t.deepEqual(bPorts, ports, 'every user kept its port across the takeover');
  const rulesAfter = userRules(await saveNat(env.ns));
  t.deepEqual([...rulesAfter].sort(), [...rulesV2].sort());
  t.is(new Set(rulesAfter).size, rulesAfter.length);

  // A deletion in the cluster reaches B: the user's rule goes, the resource too.
  fake.delete('proxyports', NS, 'bob');
  await waitFor('bob removed', async () => b.store.getResource('ProxyPort', 'bob') === undefined && userRules(await saveNat(env.ns)).length === 1, 30_000, 100);
  t.false(lost.includes('b'));

  // Least privilege, checked against what the daemons really sent: every request is granted by the Role.
  const grants = roleGrants();
  const used = new Set(fake.requests.map(grantOf));
  const denied = [...used].filter((g) => !grants.has(g) && !grants.has(g.replace(/\|[^|]*$/, '|')));
  t.deepEqual(denied, [], `requests the Role does not grant (used: ${[...used].join(', ')})`);
  t.true(used.has('polydev.ai|proxyports|watch|') && used.has('polydev.ai|proxypools/status|update|default') && used.has(`coordination.k8s.io|leases|update|${LEASE}`));
});
