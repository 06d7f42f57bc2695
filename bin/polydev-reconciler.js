#!/usr/bin/env node
// The command `polydev-reconciler`: runs the compiled build, dist/src/main.js.
//
// An installed package and the container image ship only dist/, and run it. A checkout of the
// project has the TypeScript sources too, and a build that may be older than them (after a pull
// or an edit): then this compiles src/ once, saying so in one line on stderr, and runs the fresh
// build. Compiling on demand, as `go run` does, keeps the promise the old shim made (what runs is
// what the sources say) without its cost: it ran src/ through tsx, 3-6 s per call, against
// ~0.2 s for the build. Refusing with "run npm run build" would break every script and habit
// that calls the command after a pull, for a step the command can take itself. The check costs a
// few milliseconds (one stat per source file); a compile that fails leaves the old build alone
// (noEmitOnError) and exits 2 with the compiler's messages.

import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const ROOT = path.dirname(path.dirname(fileURLToPath(import.meta.url)));
const SRC = path.join(ROOT, 'src');
const OUT = path.join(ROOT, 'dist', 'src');
const LOCK = path.join(ROOT, 'dist', '.build-lock');
/** Compiles src/ only (see the file): tests and benchmarks are not the command's business. */
const BUILD_CONFIG = path.join(ROOT, 'bin', 'tsconfig.src.json');
const LOCK_WAIT_MS = 10 * 60_000;

/** The first source file newer than its compiled output (or without one), else undefined. */
function staleSource() {
  const stack = [''];
  let visited = 0;
  while (stack.length > 0) {
    const rel = stack.pop();
    for (const e of fs.readdirSync(path.join(SRC, rel), { withFileTypes: true })) {
      // Bounded: the tree has a few hundred files; a runaway link farm is an error, not a wait.
      if (++visited > 10_000) throw new Error(`more than 10000 entries under ${SRC}`);
      const r = path.join(rel, e.name);
      if (e.isDirectory()) stack.push(r);
      else if (e.name.endsWith('.ts') && !e.name.endsWith('.d.ts')) {
        let built;
        try {
          built = fs.statSync(path.join(OUT, r.replace(/\.ts$/, '.js'))).mtimeMs;
        } catch {
          return path.join('src', r);
        }
        if (built < fs.statSync(path.join(SRC, r)).mtimeMs) return path.join('src', r);
      }
    }
  }
  return undefined;
}

function fail(message) {
  process.stderr.write(`polydev-reconciler: ${message}\n`);
  process.exit(2);
}

function alive(pid) {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return err.code === 'EPERM';
  }
}

/** Takes the build lock (a directory holding the builder's pid); false while another live process holds it. */
function takeLock() {
  fs.mkdirSync(path.dirname(LOCK), { recursive: true });
  try {
    fs.mkdirSync(LOCK);
  } catch (err) {
    if (err.code !== 'EEXIST') throw err;
    let holder = 0;
    let since = 0;
    try {
      since = fs.statSync(LOCK).mtimeMs;
      holder = Number(fs.readFileSync(path.join(LOCK, 'pid'), 'utf8'));
    } catch {
      // Not written yet (the holder is between mkdir and writeFile), or just removed.
    }
    if (holder > 0 ? alive(holder) : Date.now() - since < 10_000) return false;
    // Left behind by a builder that died: take it over.
    fs.rmSync(LOCK, { recursive: true, force: true });
    return takeLock();
  }
  fs.writeFileSync(path.join(LOCK, 'pid'), String(process.pid));
  return true;
}

function rebuild(stale) {
  const deadline = Date.now() + LOCK_WAIT_MS;
  // Two commands started at once compile once: the second waits for the first, then finds it done.
  while (!takeLock()) {
    if (Date.now() > deadline) fail(`another process has held ${LOCK} for 10 minutes; remove it if no build is running`);
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 250);
    stale = staleSource();
    if (stale === undefined) return;
  }
  try {
    stale = staleSource();
    if (stale === undefined) return;
    let tsc;
    try {
      tsc = createRequire(import.meta.url).resolve('typescript/bin/tsc');
    } catch {
      fail(`dist/ is older than ${stale} and TypeScript is not installed here: run \`npm install && npm run build\``);
    }
    process.stderr.write(`polydev-reconciler: dist/ is older than ${stale}; compiling the sources once (npm run build does the same)\n`);
    const r = spawnSync(process.execPath, [tsc, '-p', BUILD_CONFIG], { cwd: ROOT, encoding: 'utf8', maxBuffer: 64 * 1024 * 1024 });
    if (r.error) fail(`cannot run the TypeScript compiler: ${r.error.message}`);
    if (r.status !== 0) {
      process.stderr.write(r.stdout + r.stderr);
      fail('the sources do not compile (above); nothing was built. Fix them, then run the command again (or `npm run build`)');
    }
  } finally {
    fs.rmSync(LOCK, { recursive: true, force: true });
  }
}

if (fs.existsSync(path.join(SRC, 'main.ts'))) {
  const stale = staleSource();
  if (stale !== undefined) rebuild(stale);
}
await import(pathToFileURL(path.join(OUT, 'main.js')).href);
