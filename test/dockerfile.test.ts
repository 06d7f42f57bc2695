// The Dockerfile, built and run by a real dockerd (the suite's private one, test/helpers/dockerd.ts)
// with the real docker CLI. No registry is reachable here, so (as the Dockerfile's header says):
// - the base image is assembled from this host's files (busybox, node, iptables-nft, setcap,
//   useradd; test/helpers/image-rootfs.ts) and imported with `docker import`;
// - the app tree is compiled on the host by scripts/install-host.sh (--destdir, production
//   node_modules) into the build context's prebuilt/, and the `prebuilt` target is built with the
//   classic builder, which builds only the stages up to the target: `base` (everything the runtime
//   image is made of except where /app comes from) and `prebuilt`.
// Then the image runs: validate, run --once as uid 10001 with iptables-nft through the file
// capability (and without NET_ADMIN, which must fail), and the HEALTHCHECK against the daemon.

import test from 'ava';
import { copyFile, mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { startDockerd, type Dockerd } from './helpers/dockerd.js';
import { dockerCli, importRootfsImage, nodeBaseSpec, runCommand, type RunResult } from './helpers/image-rootfs.js';

const REPO = fileURLToPath(new URL('..', import.meta.url));
const BASE_IMAGE = 'polydev-test/node-base:20';
const IMAGE = 'polydev-test/reconciler:test';
const LABEL_KEY = 'polydev.test/created-by';
const LABEL = `${LABEL_KEY}=dockerfile-test-${process.pid}`;

let dockerd: Dockerd | undefined;
let workDir = '';
let build: RunResult | undefined;
let buildMs = 0;

const docker = (args: string[], timeoutMs = 120_000, env: NodeJS.ProcessEnv = process.env): Promise<RunResult> =>
  runCommand(dockerCli(), ['-H', `unix://${dockerd!.socketPath}`, ...args], { timeoutMs, env });

/** `docker run --rm` of the image with the test's label and no network (a private netns). */
const runImage = (flags: string[], args: string[] = []): Promise<RunResult> =>
  docker(['run', '--rm', '--network', 'none', '--label', LABEL, ...flags, IMAGE, ...args]);

/** `docker exec` in the long-running container of this file (cheap: vfs copies the image per container). */
const exec = (args: string[], flags: string[] = []): Promise<RunResult> => docker(['exec', ...flags, container, ...args]);

/** The daemon's command line in the image (ENTRYPOINT), for exec. */
const NODE_MAIN = ['node', '--max-semi-space-size=2', 'dist/src/main.js'];

/** Desired state for run --once (a ProxyPool) and a broken file for validate, bind-mounted read-only. */
let container = '';
let builder = '';

test.before(async (t) => {
  // dockerd, a base image import, install-host.sh and a docker build: minutes on a loaded machine,
  // past ava's 120 s without a test result. The same hang guard as the build's own timeout.
  t.timeout(900_000);
  workDir = await mkdtemp(path.join(os.tmpdir(), 'pd-dockerfile-'));
  const t0 = Date.now();
  dockerd = await startDockerd({ name: 'dockerfile' });
  await importRootfsImage(dockerd.socketPath, BASE_IMAGE, await nodeBaseSpec(process.execPath), [
    'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin',
    'CMD ["/bin/sh"]',
  ]);
  const tBase = Date.now();

  // The build context: the Dockerfile and .dockerignore as they are, and the app under prebuilt/.
  const ctx = path.join(workDir, 'ctx');
  const inst = await runCommand('bash', [path.join(REPO, 'scripts/install-host.sh'), '--destdir', ctx, '--prefix', '/prebuilt', '--docker=no', '--iptables-legacy=no', '--node', process.execPath], { timeoutMs: 300_000 });
  if (inst.code !== 0) throw new Error(`install-host.sh failed (${inst.code}):\n${inst.stdout}\n${inst.stderr}`);
  await copyFile(path.join(REPO, 'Dockerfile'), path.join(ctx, 'Dockerfile'));
  await copyFile(path.join(REPO, '.dockerignore'), path.join(ctx, '.dockerignore'));
  const tInstall = Date.now();

  const b0 = Date.now();
  const buildArgs = ['build', '--network', 'none', '--target', 'prebuilt', '--build-arg', `RUNTIME_IMAGE=${BASE_IMAGE}`, '--build-arg', `BUILD_IMAGE=${BASE_IMAGE}`, '--label', LABEL, '--tag', IMAGE, ctx];
  // BuildKit (Debian's docker.io 20.10 CLI has its client built in; it builds only the stages
  // the target needs, and metadata steps cost nothing). A newer CLI without the buildx plugin
  // refuses BuildKit: then the classic builder, which builds the stages up to the target.
  builder = 'BuildKit';
  build = await docker([...buildArgs.slice(0, 1), '--progress=plain', ...buildArgs.slice(1)], 600_000, { ...process.env, DOCKER_BUILDKIT: '1' });
  if (build.code !== 0 && /buildx|BuildKit is enabled/i.test(build.stderr)) {
    builder = 'classic';
    build = await docker(buildArgs, 600_000, { ...process.env, DOCKER_BUILDKIT: '0' });
  }
  buildMs = Date.now() - b0;

  // One long-running container: the daemon on the image's defaults, NET_ADMIN only.
  if (build.code === 0) {
    await writeProxyState(path.join(workDir, 'desired'));
    await writeBroken(path.join(workDir, 'broken'));
    const c = await docker([
      'run', '--detach', '--network', 'none', '--label', LABEL, '--cap-drop', 'ALL', '--cap-add', 'NET_ADMIN',
      '--health-interval', '1s', '--health-start-period', '1s',
      '--volume', `${path.join(workDir, 'desired')}:/desired:ro`, '--volume', `${path.join(workDir, 'broken')}:/broken:ro`,
      IMAGE,
    ]);
    if (c.code !== 0) throw new Error(`docker run failed: ${c.stderr}`);
    container = c.stdout.trim();
  }
  t.log(`dockerd + base image ${tBase - t0} ms, install-host.sh ${tInstall - tBase} ms, docker build (${builder}) ${buildMs} ms`);
});

test.after.always(async () => {
  if (dockerd) {
    await dockerd.removeByLabel(LABEL_KEY).catch(() => 0);
    const ids = await docker(['image', 'ls', '--quiet', '--filter', `label=${LABEL}`]).catch(() => undefined);
    for (const id of new Set((ids?.stdout ?? '').split('\n').filter(Boolean))) await docker(['image', 'rm', '--force', id]).catch(() => undefined);
    await dockerd.stop();
  }
  if (workDir) await rm(workDir, { recursive: true, force: true });
});

test.serial('the prebuilt target builds, with the runtime configuration of the base stage', async (t) => {
  t.is(build?.code, 0, `docker build (${builder}) failed:\n${build?.stdout.slice(-3000)}\n${build?.stderr.slice(-3000)}`);
  // The build stage (apt-get, npm ci) is not needed for the target and must not have run.
  t.notRegex(build!.stdout + build!.stderr, /RUN npm ci|npm ci\b.*\n.*added \d+ packages|python3 make g\+\+/);
  const insp = await docker(['image', 'inspect', IMAGE]);
  t.is(insp.code, 0, insp.stderr);
  const cfg = (JSON.parse(insp.stdout) as Array<{ Config: Record<string, unknown> }>)[0]!.Config;
  t.is(cfg['User'], '10001:10001');
  t.is(cfg['WorkingDir'], '/app');
  t.deepEqual(cfg['Entrypoint'], ['node', '--max-semi-space-size=2', 'dist/src/main.js']);
  t.deepEqual(cfg['Cmd'], ['run', '--config', '/etc/polydev/polydev-reconciler.yaml']);
  t.deepEqual(Object.keys((cfg['ExposedPorts'] as object) ?? {}), ['9470/tcp']);
  const hc = cfg['Healthcheck'] as { Test?: string[] } | undefined;
  t.truthy(hc?.Test?.join(' ').includes('http://127.0.0.1:9470/healthz'), JSON.stringify(hc));
  t.true((cfg['Env'] as string[]).includes('NODE_ENV=production'));
  t.is((cfg['Labels'] as Record<string, string>)[LABEL_KEY], LABEL.split('=')[1]);
});

test.serial('the daemon runs as uid 10001; the app is root-owned and read-only to it', async (t) => {
  t.truthy(container, 'no container (the build failed)');
  const own = await exec(['sh', '-c', 'id -u; ls -ldn /app/dist/src /var/lib/polydev /run/xtables.lock; test -w /app/package.json && echo app-writable || echo app-readonly']);
  t.is(own.code, 0, own.stderr);
  const lines = own.stdout.trim().split('\n');
  t.is(lines[0], '10001');
  t.regex(own.stdout, /^drwx------\s+\d+\s+10001\s+10001\s.*\/var\/lib\/polydev$/m);
  t.regex(own.stdout, /^-rw-------\s+\d+\s+10001\s+10001\s.*\/run\/xtables\.lock$/m);
  t.regex(own.stdout, /^d\S+\s+\d+\s+0\s+0\s.*\/app\/dist\/src$/m);
  t.is(lines.at(-1), 'app-readonly');
});

test.serial('validate -f on the bundled examples and on a broken file', async (t) => {
  t.truthy(container, 'no container (the build failed)');
  const ok = await exec([...NODE_MAIN, 'validate', '-f', 'manifests/examples']);
  t.is(ok.code, 0, `${ok.stdout}\n${ok.stderr}`);
  t.regex(ok.stdout, /\d+ resource\(s\) in \d+ file\(s\) are valid/);

  const bad = await exec([...NODE_MAIN, 'validate', '-f', '/broken']);
  t.is(bad.code, 1, `${bad.stdout}\n${bad.stderr}`);
  t.regex(bad.stdout + bad.stderr, /\/broken\/bad\.yaml:7:\d+: ProxyPort\/eve: spec\.sourceIP/);
});

async function writeBroken(dir: string): Promise<void> {
  await mkdir(dir, { recursive: true });
  await writeFile(
    path.join(dir, 'bad.yaml'),
    ['apiVersion: polydev.ai/v1alpha1', 'kind: ProxyPort', 'metadata:', '  name: eve', 'spec:', '  userId: eve', '  sourceIP: not-an-ip', '  pool: default', ''].join('\n'),
  );
}

/** A ProxyPool with one port, on loopback inside the container's own network namespace. */
async function writeProxyState(dir: string): Promise<void> {
  await mkdir(dir, { recursive: true });
  await writeFile(
    path.join(dir, 'proxy.yaml'),
    [
      'apiVersion: polydev.ai/v1alpha1',
      'kind: ProxyPool',
      'metadata:',
      '  name: ctest',
      'spec:',
      '  portRange: {min: 12001, max: 12010}',
      '  upstream: {host: 127.0.0.1, scheme: http}',
      '  destinationPorts: [80, 443]',
      // Docker mounts /proc/sys read-only: the image cannot set ip_forward (see the Dockerfile).
      '  ipForward: false',
      '---',
      'apiVersion: polydev.ai/v1alpha1',
      'kind: ProxyPort',
      'metadata:',
      '  name: alice',
      'spec:',
      '  userId: alice',
      '  sourceIP: 127.0.0.11',
      '  pool: ctest',
      '  port: 12001',
      '',
    ].join('\n'),
  );
}

test.serial('run --once as uid 10001: converges with NET_ADMIN through the iptables file capability, fails without', async (t) => {
  t.truthy(container, 'no container (the build failed)');
  // A database of its own (the running daemon holds the default one) and the ProxyPool.
  const env = ['--env', 'POLYDEV_DATABASE=/tmp/once.db', '--env', 'POLYDEV_LISTEN=127.0.0.1:9471', '--env', 'POLYDEV_DESIRED_STATE_DIR=/desired'];
  // A shell only to print the rules after the daemon exits (same container, same netns).
  const script = `${NODE_MAIN.join(' ')} run --once --config /etc/polydev/polydev-reconciler.yaml; rc=$?; echo "exit=$rc"; iptables-save -t nat; exit $rc`;

  // onceTimeout is how long run --once may take to converge: generous, as a loaded machine makes the
  // daemon start and its iptables calls many times slower (this one must converge; the limit is not tested).
  const good = await exec(['sh', '-c', script], [...env, '--env', 'POLYDEV_ONCE_TIMEOUT=90s']);
  t.is(good.code, 0, `${good.stdout}\n${good.stderr.slice(-1500)}`);
  t.regex(good.stdout, /exit=0/);
  // The port's DNAT rule is in the container's nat table: the daemon, as uid 10001, programmed it.
  t.regex(good.stdout, /-s 127\.0\.0\.11\/32 .*--to-destination 127\.0\.0\.1:12001/);

  // Without NET_ADMIN (a container of its own): the file capability cannot be raised. (4 s: it never
  // converges, so this only bounds how long it tries; a shorter try under load passes the same way.)
  const denied = await runImage(
    ['--cap-drop', 'ALL', ...env, '--env', 'POLYDEV_ONCE_TIMEOUT=4s', '--volume', `${path.join(workDir, 'desired')}:/desired:ro`, '--entrypoint', 'sh'],
    ['-c', script],
  );
  t.not(denied.code, 0, `converged without NET_ADMIN?\n${denied.stdout}`);
  t.regex(denied.stdout, /exit=1/);
  t.regex(denied.stdout, /not converged[\s\S]*ProxyPool\/ctest/);
  t.notRegex(denied.stdout, /--to-destination 127\.0\.0\.1:12001/);
});

test.serial('HEALTHCHECK: the running daemon turns the container healthy', async (t) => {
  // The container was started with the image's probe command run every second instead of every 30 s.
  t.truthy(container, 'no container (the build failed)');
  const id = container;
  let status = '';
  // Hang guard: the daemon's start in the container, then a probe (every 1 s) that passes.
  const deadline = Date.now() + 90_000;
  while (Date.now() < deadline) {
    const insp = await docker(['inspect', '--format', '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}', id]);
    status = insp.stdout.trim();
    if (status.endsWith(' healthy') || status.startsWith('exited')) break;
    await new Promise((r) => setTimeout(r, 500));
  }
  if (!status.endsWith(' healthy')) t.log((await docker(['logs', '--tail', '40', id])).stderr);
  t.is(status, 'running healthy');
  // SIGTERM: the daemon stops and exits 0. docker stop waits 30 s before its SIGKILL (exit 137) rather
  // than the default 10 s, so a slow stop on a loaded machine is not killed; the daemon bounds its own
  // stop anyway (shutdownTimeout 8 s + 1.5 s, then exit 1), so exit 0 still means a clean, bounded stop.
  const stop = await docker(['stop', '--time', '30', id]);
  t.is(stop.code, 0, stop.stderr);
  const exit = await docker(['inspect', '--format', '{{.State.ExitCode}}', id]);
  t.is(exit.stdout.trim(), '0');
});
