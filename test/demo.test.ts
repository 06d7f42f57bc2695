// The demo `npm start` runs (scripts/demo.ts, compiled), end to end on this machine: its private
// dockerd, coturn, upstream proxies and IP-echo server, the daemon on the bundled examples, and
// its clean-up both ways (Ctrl-C, and after the demo was killed without a chance to clean up).
// Runs with POLYDEV_DEMO_VAR in a temp directory, so a developer's own demo is never touched.

import test from 'ava';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { BUILT_MAIN, REPO_DIR, requireCurrentBuild } from './helpers/build.js';
import { requireRoot } from './helpers/netns.js';
import { pollUntil } from './helpers/timing.js';

const DEMO_JS = path.join(REPO_DIR, 'dist', 'scripts', 'demo.js');
// Hang guards. Idle, every bundled resource is up about 20 s after the daemon starts (30 warm
// containers on a vfs dockerd); the suite's load on 2 cores stretches that several times.
const UP_TIMEOUT_MS = 240_000;
const STOP_TIMEOUT_MS = 90_000;

interface DemoInfo {
  var: string;
  config: string;
  tokenFile: string;
  database: string;
  netns: string;
  address: string;
  api: string;
  running: boolean;
}

interface Running {
  child: ChildProcess;
  output: () => string;
  exit: Promise<number | null>;
}

function startDemo(env: NodeJS.ProcessEnv): Running {
  const child = spawn(process.execPath, [DEMO_JS, 'up'], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (out += d));
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (out += d));
  const exit = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  return { child, output: () => out, exit };
}

function demo(env: NodeJS.ProcessEnv, command: string): { code: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [DEMO_JS, command], { env, encoding: 'utf8', timeout: STOP_TIMEOUT_MS });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** Processes that belong to a demo: their command line or environment names its sandbox or its dockerd's directory. */
function processesMentioning(markers: string[]): string[] {
  const found: string[] = [];
  for (const e of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(e) || Number(e) === process.pid) continue;
    let text = '';
    try {
      text = fs.readFileSync(`/proc/${e}/cmdline`, 'utf8') + '\0' + fs.readFileSync(`/proc/${e}/environ`, 'utf8');
    } catch {
      continue;
    }
    if (markers.some((m) => text.includes(m))) found.push(`${e}: ${text.split('\0')[0]}`);
  }
  return found;
}

test('npm start: every bundled resource comes up in the sandbox, and the demo leaves nothing behind after Ctrl-C or kill -9', async (t) => {
  requireRoot();
  requireCurrentBuild();
  t.true(fs.existsSync(DEMO_JS), `${DEMO_JS}: run npm run build`);
  t.timeout(3 * UP_TIMEOUT_MS);
  const varDir = fs.mkdtempSync(path.join(os.tmpdir(), 'pd-demo-var-'));
  const env = { ...process.env, POLYDEV_DEMO_VAR: varDir };
  const info = JSON.parse(demo(env, 'info').stdout) as DemoInfo;
  t.regex(info.netns, /^polydev-demo-[0-9a-f]{8}$/);
  t.not(info.netns, JSON.parse(demo({ ...process.env, POLYDEV_DEMO_VAR: `${varDir}/other` }, 'info').stdout).netns, 'two checkouts get two namespaces');

  let running: Running | undefined;
  t.teardown(async () => {
    if (running && running.child.exitCode === null) running.child.kill('SIGKILL');
    demo(env, 'down');
    fs.rmSync(varDir, { recursive: true, force: true });
  });

  // A name left over with no namespace behind it (as after a reboot): the daemon must replace it.
  fs.mkdirSync('/run/netns', { recursive: true });
  fs.writeFileSync(`/run/netns/${info.netns}`, '');

  // 1. Up: the summary says every bundled resource is up, and names the API, the token and the config.
  running = startDemo(env);
  const first = running;
  await pollUntil(() => /Every bundled resource is up|Not everything is up/.test(first.output()) || first.child.exitCode !== null, UP_TIMEOUT_MS, 200);
  const out = first.output();
  t.regex(out, /Every bundled resource is up/, out.slice(-4000));
  for (const r of ['ProxyPool/default', 'ProxyPort/alice', 'ProxyPort/bob', 'ProxyPort/carol', 'WarmPool/openai', 'WarmPool/anthropic', 'WarmPool/google', 'WarmPool/dev', 'TurnServer/coturn']) {
    t.regex(out, new RegExp(`✓ ${r.replace('/', '\\/')} `), `${r} listed as up`);
  }
  t.notRegex(out, /✗/);
  t.notRegex(out, /gpu-/, 'the GPU examples are not part of the demo');
  t.regex(out, /10 warm/);
  t.regex(out, /healthy via 127\./, 'a proxy port was checked through the stand-in upstream');
  t.is(fs.statSync(info.tokenFile).mode & 0o777, 0o600);
  t.true(fs.readFileSync(info.tokenFile, 'utf8').trim().length >= 32);
  // Not at a terminal, the daemon's log is JSON lines.
  t.regex(out, /^\{"[A-Za-z]+":.*"message":"polydev-reconciler started"/m);

  // The CLI, given the generated config, reads the same database and talks to the same API.
  const get = spawnSync(process.execPath, [BUILT_MAIN, '--config', info.config, 'get', 'warmpools'], { encoding: 'utf8', timeout: 60_000 });
  t.is(get.status, 0, get.stderr);
  t.regex(get.stdout, /openai/);
  const ice = await fetch(`${info.api}/api/v1/ice-servers?userId=alice`, { headers: { authorization: `Bearer ${fs.readFileSync(info.tokenFile, 'utf8').trim()}` } });
  t.is(ice.status, 200);
  t.regex(await ice.text(), /turn:/, 'the healthy TurnServer hands out TURN URLs');

  const state = JSON.parse(fs.readFileSync(path.join(varDir, 'demo', 'state.json'), 'utf8')) as { sandbox: string; dockerd: { dir: string } };
  const markers = [state.sandbox, state.dockerd.dir];
  t.true(processesMentioning(markers).length > 0, 'the demo runs processes in its sandbox');

  // 2. kill -9 of the demo: everything it started runs on; the next `up` removes it before it starts.
  first.child.kill('SIGKILL');
  await first.exit;
  t.true(processesMentioning(markers).length > 0, 'its processes outlived it');
  running = startDemo(env);
  const second = running;
  await pollUntil(() => /polydev-reconciler started/.test(second.output()) || second.child.exitCode !== null, UP_TIMEOUT_MS, 200);
  t.regex(second.output(), /removing what the last demo left behind/);
  t.deepEqual(processesMentioning(markers), [], 'the first demo\'s processes are gone');
  t.false(fs.existsSync(state.sandbox));
  t.false(fs.existsSync(state.dockerd.dir));

  // 3. Ctrl-C (SIGINT): the daemon stops, then the sandbox, the namespace and the generated files go.
  const state2 = JSON.parse(fs.readFileSync(path.join(varDir, 'demo', 'state.json'), 'utf8')) as { sandbox: string; dockerd: { dir: string } };
  second.child.kill('SIGINT');
  const code = await second.exit;
  t.is(code, 0, second.output().slice(-3000));
  t.regex(second.output(), /stopped; the sandbox and the namespace are gone/);
  t.deepEqual(processesMentioning([state2.sandbox, state2.dockerd.dir]), []);
  t.false(fs.existsSync(`/run/netns/${info.netns}`), 'the namespace is gone');
  t.false(fs.existsSync(state2.sandbox));
  t.false(fs.existsSync(path.join(varDir, 'demo', 'state.json')));
  t.false(fs.existsSync(info.config), 'the generated config is gone');
  t.true(fs.existsSync(info.database), 'the database is kept');
  t.true(fs.existsSync(info.tokenFile), 'the token is kept for the next run');
  const down = demo(env, 'down');
  t.is(down.code, 0);
  t.regex(down.stdout, /nothing to remove/);
});
