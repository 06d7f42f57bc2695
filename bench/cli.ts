// CLI start-up (issue 13): how long `get`, `describe`, `plan` and `--help` take, start to exit,
// as a user runs them: `node bin/polydev-reconciler.js ...` (the command npm installs; in this
// checkout it also checks that dist/ is current), from a directory other than the checkout, with
// --config naming a real config. The store holds the bundled proxy example converged by
// `run --once`, its rules in a network namespace of the bench's own, so `plan` reads real
// iptables there and finds nothing to do. Floor, same run: `node -e 1`, Node's own start and exit.
// Commands are interleaved within each round, so a burst of load on the machine hits them alike.

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { EXAMPLE_USERS, REPO, manifest } from '../test/helpers/e2e-env.js';
import { requireCurrentBuild } from '../test/helpers/build.js';
import { daemonSandbox, runCleanups } from './harness.js';
import { median, type BenchFigure } from './stats.js';

const log = (msg: string) => process.stderr.write(`[cli ${new Date().toISOString().slice(11, 19)}] ${msg}\n`);
const GOAL_MS = 300;
const COMMAND = path.join(REPO, 'bin', 'polydev-reconciler.js');

interface Timed {
  ms: number;
  code: number | null;
  stdout: string;
  stderr: string;
}

function timed(args: string[], cwd: string, env: NodeJS.ProcessEnv): Promise<Timed> {
  return new Promise((resolve, reject) => {
    const started = performance.now();
    const child = spawn(process.execPath, args, { cwd, env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    child.once('error', reject);
    child.once('close', (code) => resolve({ ms: performance.now() - started, code, stdout, stderr }));
  });
}

export async function runCliBench(runs: number): Promise<{ figures: BenchFigure[]; raw: Record<string, unknown>; method: Record<string, unknown> }> {
  requireCurrentBuild();
  const cleanups: Array<() => unknown> = [];
  try {
    const box = await daemonSandbox(cleanups, 'polydev-cli-bench-');
    fs.writeFileSync(path.join(box.desired, 'proxy.yaml'), manifest({}, EXAMPLE_USERS));
    const cfg = box.writeConfig({ logLevel: 'error' });
    // Another directory than the checkout: the CLI must find everything through the config.
    const cwd = fs.mkdtempSync(path.join(box.dir, 'cwd-'));
    const once = await timed([COMMAND, '--config', cfg, 'run', '--once'], cwd, box.env);
    if (once.code !== 0) throw new Error(`run --once exited ${once.code}: ${once.stderr}${once.stdout}`);

    const commands: Array<{ name: string; args: string[]; expect: number }> = [
      { name: '--help', args: [COMMAND, '--help'], expect: 0 },
      { name: 'get proxyports', args: [COMMAND, '--config', cfg, 'get', 'proxyports'], expect: 0 },
      { name: 'describe proxypool default', args: [COMMAND, '--config', cfg, 'describe', 'proxypool', 'default'], expect: 0 },
      { name: 'plan', args: [COMMAND, '--config', cfg, 'plan'], expect: 0 },
    ];
    const floor: number[] = [];
    const samples = new Map<string, number[]>(commands.map((c) => [c.name, []]));
    // One unmeasured round: the first spawn of each pays for the page cache.
    for (const c of commands) await timed(c.args, cwd, box.env);
    for (let i = 0; i < runs; i++) {
      floor.push((await timed(['-e', '1'], cwd, box.env)).ms);
      for (const c of commands) {
        const r = await timed(c.args, cwd, box.env);
        if (r.code !== c.expect) throw new Error(`${c.name} exited ${r.code}, expected ${c.expect}: ${r.stderr}${r.stdout}`);
        samples.get(c.name)!.push(r.ms);
      }
      log(`run ${i + 1}: floor ${Math.round(floor[i]!)} ms, ${commands.map((c) => `${c.name} ${Math.round(samples.get(c.name)![i]!)} ms`).join(', ')}`);
    }
    const floorMs = median(floor);
    const figures: BenchFigure[] = [{ name: 'node -e 1 (floor: Node start and exit)', value: floorMs, unit: 'ms' }];
    for (const c of commands) {
      const ms = median(samples.get(c.name)!);
      figures.push({ name: `polydev-reconciler ${c.name}`, value: ms, unit: 'ms', goal: `median < ${GOAL_MS} ms`, met: ms < GOAL_MS });
      figures.push({ name: '  over the floor', value: ms - floorMs, unit: 'ms' });
    }
    const round = (xs: number[]) => xs.map((x) => Math.round(x));
    return {
      figures,
      raw: { floorMs: round(floor), ...Object.fromEntries([...samples].map(([k, v]) => [k, round(v)])) },
      method: {
        command: 'node bin/polydev-reconciler.js ARGS (runs dist/src/main.js; checks dist/ is current first), cwd a temp directory, --config naming the bench config',
        store: 'bundled proxy example (ProxyPool default + 3 ProxyPorts) converged by run --once; plan reads iptables-save in the bench\'s network namespace and finds no changes',
        timing: 'spawn to close of the child, median of the runs; one unmeasured warm-up round; commands interleaved per round',
        floor: 'node -e 1, spawned the same way in the same rounds',
      },
    };
  } finally {
    await runCleanups(cleanups, log);
  }
}
