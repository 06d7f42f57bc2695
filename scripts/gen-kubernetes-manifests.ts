// `npx tsx scripts/gen-kubernetes-manifests.ts [--check]`: writes the generated files of
// manifests/kubernetes/ from their one source each:
//
//   crds/*.yaml                    → manifests/kubernetes/crds/*.yaml (verbatim, under a header)
//   manifests/prometheus/alerts.yml → manifests/kubernetes/prometheusrule.yaml (its `groups:` as the
//                                     PrometheusRule's spec.groups, comments and all)
//
// Why copies: kustomize's default load restrictor refuses files outside the kustomization's
// folder (`../../crds/x.yaml`), and a kustomization.yaml inside crds/ is not an option either
// (the daemon loads every *.yaml in crds/ as a CRD). test/kubernetes-manifests.test.ts checks the
// checked-in files are exactly this script's output; `--check` does the same from the shell
// (exit 1 and the stale files listed).
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { isDeepStrictEqual } from 'node:util';
import YAML from 'yaml';

export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const KUBERNETES_DIR = path.join('manifests', 'kubernetes');
export const NAMESPACE = 'polydev-system';

const REGENERATE = 'npx tsx scripts/gen-kubernetes-manifests.ts';

/** The generated files: path relative to the repository root → exact contents. */
export function renderGenerated(root = REPO_ROOT): Map<string, string> {
  const out = new Map<string, string>();

  const crdDir = path.join(root, 'crds');
  for (const file of fs.readdirSync(crdDir).filter((f) => /\.ya?ml$/.test(f)).sort()) {
    const text = fs.readFileSync(path.join(crdDir, file), 'utf8');
    const header =
      `# GENERATED from crds/${file} by \`${REGENERATE}\`: do not edit here, edit\n` +
      `# crds/${file} and run it again (the test suite fails while this copy differs).\n`;
    out.set(path.join(KUBERNETES_DIR, 'crds', file), header + text);
  }

  const alertsFile = path.join(root, 'manifests', 'prometheus', 'alerts.yml');
  const alerts = fs.readFileSync(alertsFile, 'utf8');
  const lines = alerts.split('\n');
  const start = lines.findIndex((l) => /^groups:\s*$/.test(l));
  if (start < 0) throw new Error(`${alertsFile}: no top-level "groups:" line`);
  const later = lines.slice(start + 1).findIndex((l) => /^[^\s#]/.test(l));
  if (later >= 0) throw new Error(`${alertsFile}: a top-level key after groups: (line ${start + 2 + later}); the PrometheusRule carries only groups`);
  const body = lines
    .slice(start)
    .map((l) => (l === '' ? l : `  ${l}`))
    .join('\n')
    .replace(/\n*$/, '\n');
  const rule =
    `# GENERATED from manifests/prometheus/alerts.yml by \`${REGENERATE}\`: do not edit\n` +
    `# here, edit alerts.yml (and its promtool tests) and run it again. The same groups, as a\n` +
    `# Prometheus Operator PrometheusRule. The rules name job="polydev-reconciler": the job label a\n` +
    `# ServiceMonitor gives its targets is the Service's name (servicemonitor.yaml, service.yaml).\n` +
    `apiVersion: monitoring.coreos.com/v1\n` +
    `kind: PrometheusRule\n` +
    `metadata:\n` +
    `  name: polydev-reconciler\n` +
    `  namespace: ${NAMESPACE}\n` +
    `  labels:\n` +
    `    app.kubernetes.io/name: polydev-reconciler\n` +
    `    app.kubernetes.io/part-of: polydev\n` +
    `spec:\n` +
    body;
  const parsed = YAML.parse(rule) as { spec?: { groups?: unknown } };
  const source = YAML.parse(alerts) as { groups?: unknown };
  if (!isDeepStrictEqual(parsed.spec?.groups, source.groups)) throw new Error('prometheusrule.yaml: embedding changed the groups (indentation?)');
  out.set(path.join(KUBERNETES_DIR, 'prometheusrule.yaml'), rule);
  return out;
}

/** Generated files whose checked-in contents differ from renderGenerated(), and stale CRD copies. */
export function staleGenerated(root = REPO_ROOT): string[] {
  const want = renderGenerated(root);
  const stale: string[] = [];
  for (const [rel, text] of want) {
    const full = path.join(root, rel);
    if (!fs.existsSync(full) || fs.readFileSync(full, 'utf8') !== text) stale.push(rel);
  }
  const copies = path.join(root, KUBERNETES_DIR, 'crds');
  if (fs.existsSync(copies)) {
    for (const f of fs.readdirSync(copies)) {
      const rel = path.join(KUBERNETES_DIR, 'crds', f);
      if (!want.has(rel)) stale.push(`${rel} (no longer in crds/)`);
    }
  }
  return stale.sort();
}

function main(argv: string[]): number {
  if (argv.includes('--check')) {
    const stale = staleGenerated();
    for (const s of stale) console.error(`stale: ${s}`);
    if (stale.length > 0) console.error(`run: ${REGENERATE}`);
    return stale.length > 0 ? 1 : 0;
  }
  const want = renderGenerated();
  const copies = path.join(REPO_ROOT, KUBERNETES_DIR, 'crds');
  fs.mkdirSync(copies, { recursive: true });
  for (const f of fs.readdirSync(copies)) {
    if (!want.has(path.join(KUBERNETES_DIR, 'crds', f))) {
      fs.rmSync(path.join(copies, f));
      console.log(`removed ${path.join(KUBERNETES_DIR, 'crds', f)}`);
    }
  }
  for (const [rel, text] of want) {
    const full = path.join(REPO_ROOT, rel);
    if (fs.existsSync(full) && fs.readFileSync(full, 'utf8') === text) continue;
    fs.writeFileSync(full, text);
    console.log(`wrote ${rel}`);
  }
  return 0;
}

if (process.argv[1] && import.meta.url === pathToFileURL(path.resolve(process.argv[1])).href) {
  process.exitCode = main(process.argv.slice(2));
}
