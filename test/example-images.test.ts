// `npm run example-images` (scripts/example-images.ts): which Docker engine it uses
// (POLYDEV_DOCKER_SOCKET, then DOCKER_HOST=unix://..., then /var/run/docker.sock), one friendly
// line instead of a stack trace when that engine cannot be reached, and a tcp:// DOCKER_HOST
// refused in words. The images are built into a real dockerd of the test's own.

import test from 'ava';
import { spawn } from 'node:child_process';
import path from 'node:path';
import { dockerSocket } from '../scripts/example-images.js';
import { REPO_DIR } from './helpers/build.js';
import { startDockerd } from './helpers/dockerd.js';
import { trackChild, untrackChild } from './helpers/reaper.js';
import { tempDir } from './helpers/unit-fixtures.js';

const SCRIPT = path.join(REPO_DIR, 'scripts', 'example-images.ts');

/** `tsx scripts/example-images.ts`, as npm runs it, with exactly this Docker environment. */
function exampleImages(env: Record<string, string>): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const base: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('POLYDEV_') && !k.startsWith('DOCKER_')) base[k] = v;
  const child = spawn(process.execPath, ['--import', 'tsx', SCRIPT], { cwd: REPO_DIR, env: { ...base, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  trackChild(child);
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
  child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const timer = setTimeout(() => child.kill('SIGKILL'), 120_000);
  return new Promise((resolve) => {
    child.once('close', (code) => {
      clearTimeout(timer);
      untrackChild(child);
      resolve({ code, stdout, stderr });
    });
  });
}

test('the socket: POLYDEV_DOCKER_SOCKET, then DOCKER_HOST (unix://), then /var/run/docker.sock', (t) => {
  t.deepEqual(dockerSocket({}), { socket: '/var/run/docker.sock', from: 'the default' });
  t.deepEqual(dockerSocket({ DOCKER_HOST: 'unix:///run/user/1000/docker.sock' }), { socket: '/run/user/1000/docker.sock', from: 'DOCKER_HOST' });
  t.deepEqual(dockerSocket({ DOCKER_HOST: 'unix:///a.sock', POLYDEV_DOCKER_SOCKET: '/b.sock' }), { socket: '/b.sock', from: 'POLYDEV_DOCKER_SOCKET' });
  t.throws(() => dockerSocket({ DOCKER_HOST: 'tcp://10.0.0.1:2376' }), { message: /DOCKER_HOST=tcp:\/\/10\.0\.0\.1:2376 is not supported: only unix:\/\/ sockets are/ });
});

test('an unreachable engine is one line naming the socket and what to do, exit 1, no stack trace', async (t) => {
  const missing = path.join(tempDir(t), 'docker.sock');
  const r = await exampleImages({ DOCKER_HOST: `unix://${missing}` });
  t.is(r.code, 1);
  t.is(r.stdout, '');
  t.is(r.stderr, `example-images: cannot reach the Docker engine at unix://${missing} (DOCKER_HOST): no such socket. Start dockerd, or point DOCKER_HOST=unix://PATH or POLYDEV_DOCKER_SOCKET=PATH at its socket\n`);
  const tcp = await exampleImages({ DOCKER_HOST: 'tcp://127.0.0.1:2375' });
  t.is(tcp.code, 2);
  t.is(tcp.stderr.split('\n').filter(Boolean).length, 1, tcp.stderr);
  t.regex(tcp.stderr, /^example-images: DOCKER_HOST=tcp:\/\/127\.0\.0\.1:2375 is not supported/);
});

test('DOCKER_HOST=unix://SOCKET builds the three stand-in images in that engine', async (t) => {
  const dockerd = await startDockerd({ name: 'examples' });
  t.teardown(() => dockerd.stop());
  const r = await exampleImages({ DOCKER_HOST: `unix://${dockerd.socketPath}` });
  t.is(r.code, 0, r.stderr);
  const tags = ['openai', 'anthropic', 'google'].map((p) => `polydev-${p}-runtime:latest`);
  t.deepEqual(r.stdout.trim().split('\n').map((l) => l.split(' ')[0]), tags);
  for (const tag of tags) {
    const inspect = await dockerd.request('GET', `/images/${encodeURIComponent(tag)}/json`);
    t.is(inspect.status, 200, tag);
    t.deepEqual((inspect.json as { Config: { Cmd: string[] } }).Config.Cmd, ['sleep', '2147483647'], tag);
  }
});
