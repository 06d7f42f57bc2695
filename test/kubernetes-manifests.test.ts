// manifests/kubernetes/: every file parses and is complete, the generated copies (CRDs, the
// PrometheusRule) equal their sources, the Role grants exactly the API calls the daemon makes,
// and the Deployment, ConfigMap, Service and ServiceMonitor agree with each other and with the
// daemon (its config loader, its routes, its image). Static checks: no API server runs here (the
// daemon's Kubernetes source is tested against a fake one); where kubectl is installed, its
// kustomize builds the folder too.

import test from 'ava';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import YAML from 'yaml';
import { loadConfig, SETTINGS } from '../src/config.js';
import { loadKinds } from '../src/desired/kinds.js';
import { KUBERNETES_DIR, NAMESPACE, REPO_ROOT, renderGenerated, staleGenerated } from '../scripts/gen-kubernetes-manifests.js';

const DIR = path.join(REPO_ROOT, KUBERNETES_DIR);
const NAME = 'polydev-reconciler';
const POD_NAME = 'polydev-reconciler-5d8f7c9b6-x2k4q';
/** Kinds without a namespace, of those these manifests may contain. */
const CLUSTER_SCOPED = new Set(['Namespace', 'CustomResourceDefinition', 'ClusterRole', 'ClusterRoleBinding']);

// ---- loading ------------------------------------------------------------------------------------

type Obj = Record<string, any>;
interface Loaded {
  file: string;
  obj: Obj;
}

/** Every *.yaml under manifests/kubernetes/ (relative paths), kustomization.yaml excluded. */
function manifestFiles(): string[] {
  const out: string[] = [];
  const walk = (rel: string) => {
    for (const e of fs.readdirSync(path.join(DIR, rel), { withFileTypes: true })) {
      const r = rel ? `${rel}/${e.name}` : e.name;
      if (e.isDirectory()) walk(r);
      else if (/\.ya?ml$/.test(e.name) && e.name !== 'kustomization.yaml') out.push(r);
    }
  };
  walk('');
  return out.sort();
}

function parseAll(file: string): Obj[] {
  const text = fs.readFileSync(file, 'utf8');
  const out: Obj[] = [];
  for (const d of YAML.parseAllDocuments(text, { prettyErrors: true, uniqueKeys: true })) {
    if (d.errors.length > 0) throw new Error(`${file}: ${d.errors.map((e) => e.message).join('; ')}`);
    const v = d.toJS({ maxAliasCount: 0 }) as unknown;
    if (v === null || v === undefined) continue;
    if (typeof v !== 'object' || Array.isArray(v)) throw new Error(`${file}: a document is not a mapping`);
    out.push(v as Obj);
  }
  return out;
}

function loadAll(): Loaded[] {
  return manifestFiles().flatMap((file) => parseAll(path.join(DIR, file)).map((obj) => ({ file, obj })));
}

function one(kind: string, name = NAME): Obj {
  const found = loadAll().filter((l) => l.obj.kind === kind && l.obj.metadata?.name === name);
  if (found.length !== 1) throw new Error(`expected exactly one ${kind}/${name}, found ${found.length}`);
  return found[0]!.obj;
}

function deployment() {
  const dep = one('Deployment');
  const pod = dep.spec.template.spec as Obj;
  const containers = pod.containers as Obj[];
  if (containers.length !== 1) throw new Error('the Deployment should run one container');
  return { dep, pod, container: containers[0]! };
}

/** The route strings of src/api/server.ts (`app.get('/healthz'`, …). */
function serverRoutes(): Set<string> {
  const src = fs.readFileSync(path.join(REPO_ROOT, 'src', 'api', 'server.ts'), 'utf8');
  return new Set([...src.matchAll(/app\.get\(\s*'([^']+)'/g)].map((m) => m[1]!));
}

/** The value at a dotted path of an object, or undefined. */
function at(obj: unknown, dotted: string): unknown {
  let v: unknown = obj;
  for (const part of dotted.split('.')) {
    if (v === null || typeof v !== 'object') return undefined;
    v = (v as Record<string, unknown>)[part];
  }
  return v;
}

/** The container's environment as the kubelet would set it for POD_NAME in NAMESPACE. */
function podEnv(container: Obj): Record<string, string> {
  const env: Record<string, string> = {};
  for (const e of (container.env ?? []) as Obj[]) {
    if (typeof e.value === 'string') env[e.name] = e.value;
    else if (e.valueFrom?.fieldRef?.fieldPath === 'metadata.name') env[e.name] = POD_NAME;
    else if (e.valueFrom?.fieldRef?.fieldPath === 'metadata.namespace') env[e.name] = NAMESPACE;
    else throw new Error(`env ${e.name}: unsupported source ${JSON.stringify(e.valueFrom)}`);
  }
  return env;
}

/** The ConfigMap's config.yaml, where the Deployment mounts it. */
function mountedConfig(): { text: string; mountPath: string; file: string } {
  const { pod, container } = deployment();
  const args = container.args as string[];
  const file = args[args.indexOf('--config') + 1]!;
  const mount = (container.volumeMounts as Obj[]).find((m) => path.dirname(file) === m.mountPath);
  if (!mount) throw new Error(`--config ${file}: no volume mounted at ${path.dirname(file)}`);
  const volume = (pod.volumes as Obj[]).find((v) => v.name === mount.name);
  const cmName = volume?.configMap?.name as string | undefined;
  if (!cmName) throw new Error(`--config ${file}: the volume ${mount.name} is not a ConfigMap`);
  const text = one('ConfigMap', cmName).data?.[path.basename(file)] as string | undefined;
  if (typeof text !== 'string') throw new Error(`ConfigMap ${cmName} has no key ${path.basename(file)}`);
  return { text, mountPath: mount.mountPath, file };
}

/** Which volume mount holds a file path, and its volume. */
function mountOf(filePath: string): { mount: Obj; volume: Obj } | undefined {
  const { pod, container } = deployment();
  const mounts = (container.volumeMounts as Obj[])
    .filter((m) => filePath.startsWith(m.mountPath.replace(/\/*$/, '/')))
    .sort((a, b) => b.mountPath.length - a.mountPath.length);
  const mount = mounts[0];
  if (!mount) return undefined;
  return { mount, volume: (pod.volumes as Obj[]).find((v) => v.name === mount.name)! };
}

// ---- the folder ---------------------------------------------------------------------------------

test('every file parses (multi-document); every object has apiVersion, kind and metadata.name, and namespaced ones are in polydev-system', (t) => {
  const loaded = loadAll();
  t.true(loaded.length > 0);
  for (const { file, obj } of loaded) {
    const id = `${file}: ${obj.kind}/${obj.metadata?.name}`;
    t.is(typeof obj.apiVersion, 'string', id);
    t.is(typeof obj.kind, 'string', id);
    t.is(typeof obj.metadata?.name, 'string', id);
    if (CLUSTER_SCOPED.has(obj.kind)) t.is(obj.metadata.namespace, undefined, `${id} is cluster-scoped`);
    else t.is(obj.metadata.namespace, NAMESPACE, id);
  }
  const kinds = new Set(loaded.map((l) => l.obj.kind));
  t.false(kinds.has('ClusterRole'), 'no cluster-scoped permissions');
  t.false(kinds.has('ClusterRoleBinding'), 'no cluster-scoped permissions');
  t.is(one('Namespace', NAMESPACE).metadata.labels?.['pod-security.kubernetes.io/enforce'], 'restricted');
});

test('kustomization.yaml lists every manifest once and nothing missing; the folder holds nothing else but README.md', (t) => {
  const k = parseAll(path.join(DIR, 'kustomization.yaml'))[0]!;
  t.is(k.kind, 'Kustomization');
  const resources = k.resources as string[];
  t.is(new Set(resources).size, resources.length, 'no file listed twice');
  t.deepEqual([...resources].sort(), manifestFiles());
  const other = fs.readdirSync(DIR, { recursive: true, withFileTypes: true })
    .filter((e) => e.isFile() && !/\.ya?ml$/.test(e.name))
    .map((e) => path.relative(DIR, path.join(e.parentPath, e.name)));
  t.deepEqual(other, ['README.md']);
  // The image kustomize rewrites is the one the Deployment names.
  const { container } = deployment();
  for (const img of (k.images ?? []) as Obj[]) t.is(img.name, String(container.image).split(':')[0]);
});

test('the generated files (crds/, prometheusrule.yaml) are exactly what scripts/gen-kubernetes-manifests.ts writes', (t) => {
  t.deepEqual(staleGenerated(), [], 'run: npx tsx scripts/gen-kubernetes-manifests.ts');
  t.true(renderGenerated().has(path.join(KUBERNETES_DIR, 'prometheusrule.yaml')));
});

test('the CRDs are exactly those in crds/', (t) => {
  const byName = (objs: Obj[]) => new Map(objs.map((o) => [o.metadata.name as string, o]));
  const topDir = path.join(REPO_ROOT, 'crds');
  const top = byName(fs.readdirSync(topDir).filter((f) => /\.ya?ml$/.test(f)).flatMap((f) => parseAll(path.join(topDir, f))));
  const here = byName(loadAll().filter((l) => l.obj.kind === 'CustomResourceDefinition').map((l) => l.obj));
  t.deepEqual([...here.keys()].sort(), [...top.keys()].sort());
  for (const [name, crd] of top) t.deepEqual(here.get(name), crd, name);
  for (const crd of here.values()) t.is(crd.spec.scope, 'Namespaced', `${crd.metadata.name}: the Role is namespaced`);
});

test("the PrometheusRule carries alerts.yml's groups", (t) => {
  const alerts = YAML.parse(fs.readFileSync(path.join(REPO_ROOT, 'manifests', 'prometheus', 'alerts.yml'), 'utf8')) as Obj;
  const rule = one('PrometheusRule');
  t.is(rule.apiVersion, 'monitoring.coreos.com/v1');
  t.deepEqual(rule.spec.groups, alerts.groups);
  t.deepEqual(Object.keys(rule.spec), ['groups']);
});

// ---- permissions --------------------------------------------------------------------------------

/** (group, resource, verb, resourceName or '') tuples a Role grants. */
function grants(role: Obj): string[] {
  const out: string[] = [];
  for (const r of role.rules as Obj[]) {
    for (const g of r.apiGroups ?? []) for (const res of r.resources ?? []) for (const v of r.verbs ?? []) {
      for (const n of (r.resourceNames as string[] | undefined) ?? ['']) out.push(`${g}|${res}|${v}|${n}`);
    }
  }
  return out.sort();
}

test('the Role grants exactly the calls the daemon makes: no wildcards, nothing cluster-scoped, every desired-state kind', (t) => {
  const role = one('Role');
  const leaseName = 'polydev-reconciler';
  for (const r of role.rules as Obj[]) {
    for (const field of ['apiGroups', 'resources', 'verbs', 'resourceNames']) {
      t.false(((r[field] ?? []) as string[]).some((x) => x.includes('*')), `no wildcard in ${field}: ${JSON.stringify(r)}`);
    }
    t.is(r.nonResourceURLs, undefined, 'no non-resource URLs (they are cluster-scoped)');
  }
  const plurals = [...loadKinds().values()].map((k) => k.plural).sort();
  t.deepEqual(plurals, ['claims', 'proxypools', 'proxyports', 'turnservers', 'warmpools']);
  // Claims are made through the daemon's API, never read from the cluster (test/kubernetes-daemon.test.ts
  // checks every request the daemon sends is granted here).
  const desired = plurals.filter((p) => p !== 'claims');
  const expected = [
    ...desired.flatMap((p) => ['get', 'list', 'watch'].map((v) => `polydev.ai|${p}|${v}|`)),
    ...desired.map((p) => `polydev.ai|${p}/status|update|`),
    'coordination.k8s.io|leases|create|',
    `coordination.k8s.io|leases|get|${leaseName}`,
    `coordination.k8s.io|leases|update|${leaseName}`,
    '|events|create|',
  ].sort();
  t.deepEqual(grants(role), expected);
  // Namespaced, every one: the polydev.ai CRDs say so; leases and events are namespaced in the core API.
  const crdScope = new Map(loadAll().filter((l) => l.obj.kind === 'CustomResourceDefinition').map((l) => [l.obj.spec.names.plural, l.obj.spec.scope]));
  for (const g of grants(role)) {
    const [group, resource] = g.split('|') as [string, string];
    const base = resource.split('/')[0]!;
    if (group === 'polydev.ai') t.is(crdScope.get(base), 'Namespaced', base);
    else t.true(['coordination.k8s.io|leases', '|events'].includes(`${group}|${base}`), `${group}/${base} is a namespaced resource`);
  }
});

test('the RoleBinding binds that Role to the ServiceAccount the Deployment runs as', (t) => {
  const binding = one('RoleBinding');
  const sa = one('ServiceAccount');
  t.deepEqual(binding.roleRef, { apiGroup: 'rbac.authorization.k8s.io', kind: 'Role', name: one('Role').metadata.name });
  t.deepEqual(binding.subjects, [{ kind: 'ServiceAccount', name: sa.metadata.name, namespace: sa.metadata.namespace }]);
  t.is(deployment().pod.serviceAccountName, sa.metadata.name);
});

// ---- the Deployment -----------------------------------------------------------------------------

test('the Deployment: 2 replicas, Recreate, spread over nodes, the image and user of the Dockerfile, its entrypoint kept', (t) => {
  const { dep, pod, container } = deployment();
  t.is(dep.spec.replicas, 2);
  // A standby is never Ready, so a rolling update would never finish (the file says why).
  t.is(dep.spec.strategy?.type, 'Recreate');
  for (const [k, v] of Object.entries(dep.spec.selector.matchLabels)) t.is(dep.spec.template.metadata.labels[k], v, `selector ${k} matches the pod template`);
  const anti = pod.affinity?.podAntiAffinity?.preferredDuringSchedulingIgnoredDuringExecution as Obj[];
  t.is(anti?.length, 1);
  t.is(anti[0]!.podAffinityTerm.topologyKey, 'kubernetes.io/hostname');
  t.deepEqual(anti[0]!.podAffinityTerm.labelSelector.matchLabels, dep.spec.selector.matchLabels);
  t.is(pod.affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution, undefined, 'preferred: one node still runs the daemon');

  const dockerfile = fs.readFileSync(path.join(REPO_ROOT, 'Dockerfile'), 'utf8');
  const built = /docker build -t (\S+) \.\n/.exec(dockerfile)?.[1];
  t.truthy(built, 'the Dockerfile names the image it builds');
  t.is(String(container.image).split(':')[0], built ?? '(none)');
  t.is(container.imagePullPolicy, 'IfNotPresent', 'a locally loaded image is not pulled');
  const uid = Number(/^USER (\d+):(\d+)$/m.exec(dockerfile)?.[1]);
  t.true(uid > 0);
  t.is(container.command, undefined, "the image's ENTRYPOINT (node --max-semi-space-size=2 dist/src/main.js) stays");
  t.is(container.args[0], 'run');
  t.false(container.args.includes('--once'));
  t.true(/ENTRYPOINT \["node", "--max-semi-space-size=2", "dist\/src\/main\.js"\]/.test(dockerfile));

  // Security: what the restricted Pod Security profile asks, and the image's own uid.
  t.is(pod.securityContext.runAsNonRoot, true);
  t.is(pod.securityContext.runAsUser, uid);
  t.is(pod.securityContext.seccompProfile?.type, 'RuntimeDefault');
  const sc = container.securityContext as Obj;
  t.is(sc.allowPrivilegeEscalation, false);
  t.is(sc.readOnlyRootFilesystem, true);
  t.not(sc.privileged, true);
  t.deepEqual(sc.capabilities, { drop: ['ALL'] }, 'no NET_ADMIN: iptables belongs on the hosts of the users\' containers');
  t.not(pod.hostNetwork, true);
  t.not(pod.hostPID, true);
  t.falsy((pod.volumes as Obj[]).some((v) => v.hostPath), 'no host paths (no docker.sock)');
  t.truthy(container.resources?.requests?.cpu && container.resources?.requests?.memory && container.resources?.limits?.memory);
  t.is(pod.enableServiceLinks, false, 'no POLYDEV_RECONCILER_* service variables beside the POLYDEV_* settings');
});

test('the probes: liveness /healthz and readiness /readyz, routes of src/api/server.ts, on the named container port', (t) => {
  const { container } = deployment();
  const routes = serverRoutes();
  const ports = new Map((container.ports as Obj[]).map((p) => [p.name, p.containerPort]));
  t.is(ports.get('http'), 9470);
  t.is(container.livenessProbe.httpGet.path, '/healthz');
  t.is(container.readinessProbe.httpGet.path, '/readyz');
  for (const probe of [container.livenessProbe, container.readinessProbe]) {
    t.true(routes.has(probe.httpGet.path), `${probe.httpGet.path} is a route of src/api/server.ts`);
    t.true(ports.has(probe.httpGet.port), `${probe.httpGet.port} is a named container port`);
  }
  t.true(routes.has('/metrics'));
});

// ---- the daemon's config ------------------------------------------------------------------------

test("the ConfigMap's config, with the Deployment's environment, loads with the daemon's own loadConfig and means Kubernetes with leader election", (t) => {
  const { pod, container } = deployment();
  const { text } = mountedConfig();
  const env = podEnv(container);
  const known = new Set(SETTINGS.map((s) => s.env));
  const keys = new Set(SETTINGS.map((s) => s.key));
  const missing = [
    ...Object.keys(env).filter((e) => !known.has(e)).map((e) => `env ${e}`),
    ...['source', 'leaderElection.enabled', 'leaderElection.leaseName', 'kubernetes.namespace'].filter((k) => !keys.has(k)).map((k) => `key ${k}`),
  ];
  t.deepEqual(missing, [], 'settings the manifests use that src/config.ts does not define (yet)');

  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'polydev-k8s-config-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'config.yaml');
  fs.writeFileSync(file, text);
  const cfg = loadConfig(file, env);

  t.is(at(cfg, 'source'), 'kubernetes');
  t.is(at(cfg, 'leaderElection.enabled'), true);
  t.is(at(cfg, 'leaderElection.identity'), POD_NAME);
  t.is(at(cfg, 'kubernetes.namespace'), NAMESPACE);
  t.is(at(cfg, 'kubernetes.kubeconfig'), undefined, 'in-cluster service account');
  // The Lease the daemon uses is the one the Role lets it read and renew.
  const leaseRule = (one('Role').rules as Obj[]).find((r) => r.resources.includes('leases') && r.resourceNames);
  t.deepEqual(leaseRule?.resourceNames, [at(cfg, 'leaderElection.leaseName')]);
  const ms = (key: string) => (at(cfg, `leaderElection.${key}Ms`) ?? at(cfg, `leaderElection.${key}`)) as number;
  t.deepEqual([ms('leaseDuration'), ms('renewDeadline'), ms('retryPeriod')], [15_000, 10_000, 2_000]);
  // A replica that loses the Lease stops acting after renewDeadline; it must have left the
  // Service (readiness) before another can take the Lease, leaseDuration after its last renewal.
  const rp = container.readinessProbe;
  t.true(rp.periodSeconds * rp.failureThreshold * 1000 < ms('leaseDuration') - ms('renewDeadline'));

  // Listening on the pod's address, on the container's port.
  t.deepEqual(cfg.listen, { host: '0.0.0.0', port: (container.ports as Obj[]).find((p) => p.name === 'http')!.containerPort });
  // The database on a writable volume of the pod (the root filesystem is read-only).
  const db = mountOf(cfg.database);
  t.truthy(db, `${cfg.database} is on a mounted volume`);
  t.not(db!.mount.readOnly, true);
  t.truthy(db!.volume.emptyDir ?? db!.volume.persistentVolumeClaim ?? db!.volume.ephemeral);
  // The API token from the Secret, under the key the volume projects.
  t.truthy(cfg.apiTokenFile);
  const tok = mountOf(cfg.apiTokenFile!);
  t.truthy(tok?.volume.secret, 'apiTokenFile is on a Secret volume');
  const items = (tok!.volume.secret.items ?? []) as Obj[];
  t.true(items.some((i) => path.join(tok!.mount.mountPath, i.path) === cfg.apiTokenFile), 'the Secret projects exactly that file');
  t.not(tok!.volume.secret.optional, true);
  // Graceful shutdown fits in the grace period.
  t.true(pod.terminationGracePeriodSeconds * 1000 > cfg.shutdownTimeoutMs);
  t.is(cfg.desiredStateDir, undefined, 'desired state is the custom resources');
});

// ---- Service and ServiceMonitor -----------------------------------------------------------------

test("the Service selects the Deployment's pods, targets its named port, and is named as the alert rules' job", (t) => {
  const { dep, container } = deployment();
  const svc = one('Service');
  const labels = dep.spec.template.metadata.labels as Record<string, string>;
  const selector = svc.spec.selector as Record<string, string>;
  t.true(Object.keys(selector).length > 0);
  for (const [k, v] of Object.entries(selector)) t.is(labels[k], v, `selector ${k}`);
  const names = new Set((container.ports as Obj[]).map((p) => p.name));
  t.is(svc.spec.ports.length, 1);
  t.deepEqual({ name: svc.spec.ports[0].name, port: svc.spec.ports[0].port }, { name: 'http', port: 9470 });
  t.true(names.has(svc.spec.ports[0].targetPort), 'targetPort is a named container port');
  t.not(svc.spec.publishNotReadyAddresses, true, 'only the leader (Ready) gets API calls');
  const alerts = fs.readFileSync(path.join(REPO_ROOT, 'manifests', 'prometheus', 'alerts.yml'), 'utf8');
  const jobs = new Set([...alerts.matchAll(/job="([^"]+)"/g)].map((m) => m[1]));
  t.deepEqual([...jobs], [svc.metadata.name]);
});

test('the ServiceMonitor selects the Service and scrapes /metrics on its port, keeping the job label', (t) => {
  const svc = one('Service');
  const sm = one('ServiceMonitor');
  t.deepEqual(sm.spec.namespaceSelector?.matchNames, [svc.metadata.namespace]);
  const match = sm.spec.selector.matchLabels as Record<string, string>;
  t.true(Object.keys(match).length > 0);
  for (const [k, v] of Object.entries(match)) t.is(svc.metadata.labels?.[k], v, `matchLabels ${k}`);
  t.is(sm.spec.selector.matchExpressions, undefined);
  t.is(sm.spec.endpoints.length, 1);
  const ep = sm.spec.endpoints[0];
  t.true((svc.spec.ports as Obj[]).some((p) => p.name === ep.port), `${ep.port} is a port name of the Service`);
  t.is(ep.path, '/metrics');
  t.true(serverRoutes().has(ep.path));
  t.is(sm.spec.jobLabel, undefined, 'the job label stays the Service name, which the alert rules select');
  t.is(ep.relabelings, undefined);
  // Every object of the other kinds is selected by none of them: only this Service carries the labels.
  t.is(loadAll().filter((l) => l.obj.kind === 'Service').length, 1);
});

// ---- kustomize, where kubectl is installed ------------------------------------------------------

const kubectl = spawnSync('kubectl', ['version', '--client'], { encoding: 'utf8' }).status === 0;
test('kubectl kustomize builds the folder into exactly the objects of its files', (t) => {
  t.truthy(kubectl, 'kubectl is needed (.ci/run installs Debian\'s kubernetes-client when none is there)');
  const r = spawnSync('kubectl', ['kustomize', DIR], { encoding: 'utf8', maxBuffer: 64 << 20 });
  t.is(r.status, 0, r.stderr);
  const built = YAML.parseAllDocuments(r.stdout).map((d) => d.toJS() as Obj);
  const key = (o: Obj) => `${o.kind}/${o.metadata.namespace ?? ''}/${o.metadata.name}`;
  const files = new Map(loadAll().map((l) => [key(l.obj), l.obj]));
  t.deepEqual(built.map(key).sort(), [...files.keys()].sort());
  for (const o of built) t.deepEqual(o, files.get(key(o)), key(o));
});
