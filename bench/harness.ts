// What every benchmark needs from the test harness: an ava-like context whose teardowns the
// bench runs itself, in reverse, when it ends (the helpers in test/helpers take an ava context).
import type { ExecutionContext } from 'ava';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import YAML from 'yaml';
import { createNetns, type Netns } from '../test/helpers/netns.js';

export function benchContext(cleanups: Array<() => unknown>): ExecutionContext {
  return { teardown: (fn: () => unknown) => cleanups.push(fn), log: () => undefined } as unknown as ExecutionContext;
}

/** Runs the cleanups last-registered first; a failing one is logged and the rest still run. */
export async function runCleanups(cleanups: Array<() => unknown>, log: (msg: string) => void): Promise<void> {
  for (const fn of cleanups.reverse()) {
    try {
      await fn();
    } catch (err) {
      log(`cleanup: ${(err as Error).message}`);
    }
  }
}

export interface DaemonSandbox {
  ns: Netns;
  dir: string;
  /** The watched desired-state folder. */
  desired: string;
  /** Writes config.yaml (own database, the desired folder, API on a free loopback port, rules in ns) plus extra; returns its path. */
  writeConfig(extra?: Record<string, unknown>): string;
  /** This process's environment without POLYDEV_*: a daemon of the bench gets only its config. */
  env: NodeJS.ProcessEnv;
}

/** A network namespace and a temp dir for a daemon process, both removed by the cleanups. */
export async function daemonSandbox(cleanups: Array<() => unknown>, prefix: string): Promise<DaemonSandbox> {
  const ns = await createNetns();
  cleanups.push(() => ns.destroy());
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  cleanups.push(() => fs.rmSync(dir, { recursive: true, force: true }));
  const desired = path.join(dir, 'desired');
  fs.mkdirSync(desired);
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('POLYDEV_')) env[k] = v;
  const writeConfig = (extra: Record<string, unknown> = {}): string => {
    const cfg = path.join(dir, 'config.yaml');
    fs.writeFileSync(cfg, YAML.stringify({
      database: path.join(dir, 'polydev.db'),
      desiredStateDir: desired,
      listen: '127.0.0.1:0',
      logLevel: 'info',
      iptables: { netns: ns.name },
      ...extra,
    }));
    return cfg;
  };
  return { ns, dir, desired, writeConfig, env };
}
