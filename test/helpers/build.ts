// The compiled CLI that tests spawn as a child process, and the check that it is current.
//
// Tests run the daemon's and the CLI's child processes from the `tsc` output (dist/src/main.js),
// which is what the container image, the systemd install, an installed package and the command
// bin/polydev-reconciler.js run. Running the TypeScript sources through tsx instead costs about
// 4 s of CPU per process start (its module hooks run on a second thread); the suite starts some
// 150 such processes, and on a 2-core machine that CPU was most of the load that made waits time
// out. `npm test` compiles first (`tsc -p tsconfig.json`), so the build is never older than the
// sources; a single file run by hand after an edit gets a one-line instruction instead of
// silently testing stale code. (The command compiles a stale build by itself, see
// bin/polydev-reconciler.js; tests do not rely on that, so two test processes never race to build.)

import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const REPO_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
/** The compiled entry point (`node dist/src/main.js ARGS` is the CLI). */
export const BUILT_MAIN = path.join(REPO_DIR, 'dist', 'src', 'main.js');
/** The command as npm installs it: runs dist/src/main.js (compiling it first in a checkout where it is stale). */
export const DEV_BIN = path.join(REPO_DIR, 'bin', 'polydev-reconciler.js');

let checked: string | undefined;

/** The first source file that is newer than its compiled output (or has none), else undefined. */
export function staleBuildOutput(srcDir = path.join(REPO_DIR, 'src'), outDir = path.join(REPO_DIR, 'dist', 'src')): string | undefined {
  const stack = [''];
  let visited = 0;
  while (stack.length > 0) {
    const rel = stack.pop()!;
    for (const e of fs.readdirSync(path.join(srcDir, rel), { withFileTypes: true })) {
      // Bounded: the tree has a few hundred files; a runaway link farm is an error, not a wait.
      if (++visited > 10_000) throw new Error(`more than 10000 entries under ${srcDir}`);
      const r = path.join(rel, e.name);
      if (e.isDirectory()) stack.push(r);
      else if (e.name.endsWith('.ts') && !e.name.endsWith('.d.ts')) {
        const src = fs.statSync(path.join(srcDir, r));
        let out: fs.Stats;
        try {
          out = fs.statSync(path.join(outDir, r.replace(/\.ts$/, '.js')));
        } catch {
          return `src/${r} (not compiled)`;
        }
        if (out.mtimeMs < src.mtimeMs) return `src/${r}`;
      }
    }
  }
  return undefined;
}

/** Throws, saying what to run, when dist/ is missing or older than src/ (checked once per process). */
export function requireCurrentBuild(): string {
  if (checked === undefined) {
    const stale = staleBuildOutput();
    if (stale !== undefined) {
      throw new Error(`dist/ is older than ${stale}: run \`npm run build\` (npm test compiles before it tests)`);
    }
    checked = BUILT_MAIN;
  }
  return checked;
}
