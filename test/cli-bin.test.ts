// The command bin/polydev-reconciler.js: it runs the compiled build, never the TypeScript sources;
// in a checkout whose build is older than the sources it compiles once (one line on stderr), and
// a compile that fails is exit 2 with the compiler's messages and the old build kept. The rebuild
// is tested in a small copy of a checkout (its own package.json, tsconfig, src/ and the command),
// never here: touching this checkout's src/ would make every other test's build stale.

import test from 'ava';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { DEV_BIN, REPO_DIR, requireCurrentBuild } from './helpers/build.js';
import { trackChild, untrackChild } from './helpers/reaper.js';
import { tempDir } from './helpers/unit-fixtures.js';

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

function run(file: string, args: string[], opts: { cwd: string; env?: NodeJS.ProcessEnv }): Promise<Run> {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('POLYDEV_')) env[k] = v;
  const child = spawn(process.execPath, [file, ...args], { cwd: opts.cwd, env: { ...env, ...opts.env }, stdio: ['ignore', 'pipe', 'pipe'] });
  trackChild(child);
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
  child.stderr.setEncoding('utf8').on('data', (d: string) => {
    if (stderr.length < 4 * 1024 * 1024) stderr += d;
  });
  // A hang guard: a compile on a loaded machine takes seconds, not minutes.
  const timer = setTimeout(() => child.kill('SIGKILL'), 180_000);
  return new Promise((resolve) => {
    child.once('close', (code) => {
      clearTimeout(timer);
      untrackChild(child);
      resolve({ code, stdout, stderr });
    });
  });
}

test('in this checkout the command runs the compiled build (dist/), none of the TypeScript sources', async (t) => {
  requireCurrentBuild();
  const dir = tempDir(t);
  const coverage = path.join(dir, 'coverage');
  // V8 writes the URL of every script the process ran into this directory at exit.
  const r = await run(DEV_BIN, ['validate', '-f', path.join(REPO_DIR, 'manifests', 'examples', 'proxy.yaml')], { cwd: dir, env: { NODE_V8_COVERAGE: coverage } });
  t.is(r.code, 0, r.stderr.slice(-2000));
  t.regex(r.stdout, /^4 resource\(s\) in 1 file\(s\) are valid$/m);
  t.is(r.stderr, '', 'a current build: no notice, no compile');
  const ran = fs.readdirSync(coverage).flatMap((f) =>
    (JSON.parse(fs.readFileSync(path.join(coverage, f), 'utf8')) as { result: Array<{ url: string }> }).result.map((s) => s.url),
  );
  t.true(ran.includes(`file://${path.join(REPO_DIR, 'dist', 'src', 'main.js')}`), 'the build ran');
  t.false(ran.some((u) => u.startsWith(`file://${path.join(REPO_DIR, 'src')}/`)), 'no source file ran');
  t.false(ran.some((u) => /\/tsx\//.test(u)), 'no tsx');
});

/** A minimal checkout: package.json, tsconfig.json, the command and its build config, src/main.ts, node_modules. */
function fakeCheckout(dir: string, main: string): string {
  const root = path.join(dir, 'checkout');
  fs.mkdirSync(path.join(root, 'bin'), { recursive: true });
  fs.mkdirSync(path.join(root, 'src'));
  fs.writeFileSync(path.join(root, 'package.json'), JSON.stringify({ name: 'polydev-reconciler', type: 'module' }));
  fs.copyFileSync(path.join(REPO_DIR, 'tsconfig.json'), path.join(root, 'tsconfig.json'));
  fs.copyFileSync(DEV_BIN, path.join(root, 'bin', 'polydev-reconciler.js'));
  fs.copyFileSync(path.join(REPO_DIR, 'bin', 'tsconfig.src.json'), path.join(root, 'bin', 'tsconfig.src.json'));
  fs.symlinkSync(path.join(REPO_DIR, 'node_modules'), path.join(root, 'node_modules'));
  writeSource(root, main);
  return root;
}

/** Writes src/main.ts and dates its build (if any) a minute back: stale whatever the clock's resolution. */
function writeSource(root: string, text: string): void {
  fs.writeFileSync(path.join(root, 'src', 'main.ts'), text);
  const built = path.join(root, 'dist', 'src', 'main.js');
  if (fs.existsSync(built)) {
    const before = new Date(Date.now() - 60_000);
    fs.utimesSync(built, before, before);
  }
}

const NOTICE = /^polydev-reconciler: dist\/ is older than src\/main\.ts; compiling the sources once \(npm run build does the same\)\n$/;

test('a checkout whose build is missing or older than src/ is compiled once, with one line on stderr; a failed compile is exit 2 and keeps the old build', async (t) => {
  const dir = tempDir(t);
  const root = fakeCheckout(dir, "const words: string[] = process.argv.slice(2);\nconsole.log('v1', words.join(' '));\n");
  const bin = path.join(root, 'bin', 'polydev-reconciler.js');
  const cwd = path.join(dir, 'elsewhere');
  fs.mkdirSync(cwd);

  const first = await run(bin, ['a', 'b'], { cwd });
  t.is(first.code, 0, first.stderr);
  t.regex(first.stderr, NOTICE);
  t.is(first.stdout, 'v1 a b\n');
  t.true(fs.existsSync(path.join(root, 'dist', 'src', 'main.js')));

  const again = await run(bin, ['c'], { cwd });
  t.deepEqual(again, { code: 0, stdout: 'v1 c\n', stderr: '' }, 'current now: no compile');

  // Two commands at once on a stale build: one compiles, the other waits for it and runs the result.
  writeSource(root, "console.log('v2', process.argv.slice(2).join(' '));\n");
  const [x, y] = await Promise.all([run(bin, ['x'], { cwd }), run(bin, ['y'], { cwd })]);
  t.deepEqual([x.code, y.code], [0, 0], x.stderr + y.stderr);
  t.deepEqual([x.stdout, y.stdout], ['v2 x\n', 'v2 y\n']);
  t.is([x.stderr, y.stderr].filter((e) => NOTICE.test(e)).length, 1, 'compiled once');
  t.is([x.stderr, y.stderr].filter((e) => e === '').length, 1);
  t.false(fs.existsSync(path.join(root, 'dist', '.build-lock')), 'the lock is gone');

  writeSource(root, "const n: number = 'not a number';\nconsole.log('v3', n);\n");
  const broken = await run(bin, ['z'], { cwd });
  t.is(broken.code, 2);
  t.is(broken.stdout, '');
  t.regex(broken.stderr, /src\/main\.ts\(1,7\): error TS2322/);
  t.regex(broken.stderr, /polydev-reconciler: the sources do not compile \(above\); nothing was built\./);
  t.notRegex(broken.stderr, /^\s+at /m, 'no stack trace');
  t.regex(fs.readFileSync(path.join(root, 'dist', 'src', 'main.js'), 'utf8'), /'v2'/, 'the old build is kept');

  // An installed copy (no sources): the build runs as it is, nothing is checked or compiled.
  fs.rmSync(path.join(root, 'src'), { recursive: true });
  const installed = await run(bin, ['w'], { cwd });
  t.deepEqual(installed, { code: 0, stdout: 'v2 w\n', stderr: '' });
});
