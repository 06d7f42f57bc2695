// Shared fixtures of the unit tests: throwaway directories, stores on real SQLite files,
// an in-process CLI with captured output, and small YAML builders. Every test gets its
// own directory, removed in t.teardown, so tests never depend on each other or on order.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { ExecutionContext } from 'ava';
import { runCli } from '../../src/cli/main.js';
import { createValidator } from '../../src/controllers/registry.js';
import type { DesiredStateValidator } from '../../src/desired/validate.js';
import { Store, type StoreOptions } from '../../src/state/store.js';
import { pollUntil } from './timing.js';

export const REPO_ROOT = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..', '..');
export const EXAMPLES_DIR = path.join(REPO_ROOT, 'manifests', 'examples');

/** A fresh directory under the OS temp dir, removed when the test ends. */
export function tempDir(t: ExecutionContext, prefix = 'polydev-unit-'): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** A Store on a real SQLite file in a fresh directory; closed when the test ends. */
export function openStore(t: ExecutionContext, options: StoreOptions = {}): { store: Store; dir: string; file: string } {
  const dir = tempDir(t);
  const file = path.join(dir, 'state.db');
  const store = new Store(file, options);
  t.teardown(() => store.close());
  return { store, dir, file };
}

/** Writes files (name → content) into dir and returns their full paths in the same order. */
export function writeFiles(dir: string, files: Record<string, string>): string[] {
  return Object.entries(files).map(([name, content]) => {
    const full = path.join(dir, name);
    fs.mkdirSync(path.dirname(full), { recursive: true });
    fs.writeFileSync(full, content);
    return full;
  });
}

let sharedValidator: DesiredStateValidator | undefined;
/** Compiling the CRD schemas takes a while; one validator serves a whole test file. */
export function validator(): DesiredStateValidator {
  return (sharedValidator ??= createValidator());
}

export interface CliRun {
  code: number;
  out: string[];
  err: string[];
}

/** Runs the CLI in-process against a database file, capturing what it prints. */
export async function cli(db: string, ...args: string[]): Promise<CliRun> {
  const out: string[] = [];
  const err: string[] = [];
  const code = await runCli(['--db', db, ...args], {
    out: (s) => out.push(...s.split('\n')),
    err: (s) => err.push(...s.split('\n')),
  });
  return { code, out, err };
}

export const API = 'polydev.ai/v1alpha1';

/** A ProxyPool document (no trailing `---`). */
export function poolYaml(name: string, opts: { min?: number; max?: number; chainPrefix?: string; cooldown?: string } = {}): string {
  const prefix = opts.chainPrefix ?? (name === 'default' ? 'POLYDEV-PROXY' : `P-${name.toUpperCase()}`);
  return [
    `apiVersion: ${API}`,
    'kind: ProxyPool',
    'metadata:',
    `  name: ${name}`,
    'spec:',
    '  portRange:',
    `    min: ${opts.min ?? 10001}`,
    `    max: ${opts.max ?? 19999}`,
    '  upstream:',
    '    host: 127.0.0.1',
    ...(opts.cooldown ? [`  portReuseCooldown: ${opts.cooldown}`] : []),
    '  chains:',
    `    nat: ${prefix}`,
    `    postrouting: ${prefix}-MASQ`,
    `    filter: ${prefix}-FWD`,
    '',
  ].join('\n');
}

/** A ProxyPort document (no trailing `---`). */
export function portYaml(
  name: string,
  spec: { userId: string; sourceIP: string; port?: number; pool?: string },
  labels?: Record<string, string>,
): string {
  return [
    `apiVersion: ${API}`,
    'kind: ProxyPort',
    'metadata:',
    `  name: ${name}`,
    ...(labels ? ['  labels:', ...Object.entries(labels).map(([k, v]) => `    ${k}: ${v}`)] : []),
    'spec:',
    `  userId: ${spec.userId}`,
    `  sourceIP: ${spec.sourceIP}`,
    ...(spec.port !== undefined ? [`  port: ${spec.port}`] : []),
    ...(spec.pool !== undefined ? [`  pool: ${spec.pool}`] : []),
    '',
  ].join('\n');
}

export function docs(...parts: string[]): string {
  return parts.join('---\n');
}

/**
 * Polls cond until it holds or the deadline passes (then fails with what). The deadline is a hang
 * guard, not a speed check: a passing wait costs only its own time, and on a loaded machine (other
 * test files, stalled event loops) a 5 s default failed waits for things that were merely slow.
 */
export async function eventually(cond: () => boolean, what: string, timeoutMs = 30_000, stepMs = 5): Promise<void> {
  if (!(await pollUntil(cond, timeoutMs, stepMs))) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
}

/** Rejects if p does not settle within ms. */
export function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not happen within ${ms} ms`)), ms);
  });
  return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
}
