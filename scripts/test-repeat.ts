// Runs the whole test suite (`npm test`, exactly the README's command) N times in a row and prints,
// for each run, its duration, the machine's load while it ran and the tests that failed; the full
// output of every run is kept. A suite that passes once can still fail one run in three: this is
// how to tell.
//
//   npm run test:repeat               5 runs
//   npm run test:repeat -- 10         10 runs
//   npm run test:repeat -- 3 --out DIR
//
// Exit code: 0 when every run passed, 1 when any failed, 2 on a usage error.

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const USAGE = 'usage: npm run test:repeat -- [RUNS (1-100, default 5)] [--out DIR]';
const SAMPLE_MS = 2000;
/** A hang guard per run, far above the suite's 15-minute budget. */
const RUN_TIMEOUT_MS = 60 * 60 * 1000;

interface CpuTimes {
  busy: number;
  total: number;
}

/** Jiffies of all CPUs from /proc/stat: busy (everything but idle and iowait) and total. */
function cpuTimes(): CpuTimes {
  const line = fs.readFileSync('/proc/stat', 'latin1').split('\n')[0] ?? '';
  const v = line.trim().split(/\s+/).slice(1).map(Number);
  const total = v.reduce((a, b) => a + b, 0);
  const idle = (v[3] ?? 0) + (v[4] ?? 0);
  return { busy: total - idle, total };
}

export interface RunReport {
  run: number;
  startedAt: string;
  durationSeconds: number;
  exitCode: number | null;
  passed: number;
  failures: string[];
  /** 1-minute load average, sampled every 2 s while the run went on. */
  load: { mean: number; max: number };
  /** Share of all CPUs busy during the run (the suite and anything else on the machine). */
  cpuBusyPercent: number;
  log: string;
}

/** What ava printed about failures: failed tests, uncaught errors, timeouts, crashed workers. */
export function failuresOf(output: string): string[] {
  const out: string[] = [];
  for (const raw of output.split('\n')) {
    // eslint-disable-next-line no-control-regex
    const line = raw.replace(/\u001b\[[0-9;]*m/g, '').trim();
    if (/^✘ /.test(line) || /^(Uncaught exception|Unhandled rejection) in /.test(line) || /Timed out while running tests/.test(line) || /exited with a non-zero exit code/.test(line)) {
      out.push(line.length > 300 ? `${line.slice(0, 300)}…` : line);
    }
  }
  if (/error TS\d+:/.test(output)) out.push('TypeScript errors (tsc)');
  return [...new Set(out)];
}

interface WaitStat {
  site: string;
  what: string;
  count: number;
  worstMs: number;
  medianMs: number;
  timeoutMs: number;
}

/** Per call site of waitFor: the worst and median time taken, the ten nearest to their deadline. */
export function closestWaits(files: string[], top = 10): WaitStat[] {
  const bySite = new Map<string, { what: string; ms: number[]; timeoutMs: number }>();
  for (const f of files) {
    let text = '';
    try {
      text = fs.readFileSync(f, 'utf8');
    } catch {
      continue;
    }
    for (const line of text.split('\n')) {
      if (!line) continue;
      let w: { what: string; site: string; ms: number; timeoutMs: number };
      try {
        w = JSON.parse(line) as typeof w;
      } catch {
        continue;
      }
      const e = bySite.get(w.site) ?? { what: w.what, ms: [], timeoutMs: w.timeoutMs };
      e.ms.push(w.ms);
      e.timeoutMs = Math.min(e.timeoutMs, w.timeoutMs);
      bySite.set(w.site, e);
    }
  }
  return [...bySite.entries()]
    .map(([site, e]) => {
      const sorted = [...e.ms].sort((a, b) => a - b);
      return { site, what: e.what, count: sorted.length, worstMs: sorted[sorted.length - 1]!, medianMs: sorted[Math.floor(sorted.length / 2)]!, timeoutMs: e.timeoutMs };
    })
    .sort((a, b) => b.worstMs / b.timeoutMs - a.worstMs / a.timeoutMs)
    .slice(0, top);
}

function parseArgs(argv: string[]): { runs: number; out: string } {
  let runs = 5;
  let out = path.join(os.tmpdir(), `polydev-test-repeat-${new Date().toISOString().replace(/[:.]/g, '-')}`);
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--out') {
      const v = argv[++i];
      if (!v) throw new Error(`--out needs a directory\n${USAGE}`);
      out = path.resolve(v);
    } else if (/^\d+$/.test(a) && Number(a) >= 1 && Number(a) <= 100) {
      runs = Number(a);
    } else {
      throw new Error(`unexpected argument ${JSON.stringify(a)}\n${USAGE}`);
    }
  }
  return { runs, out };
}

async function oneRun(run: number, dir: string): Promise<RunReport> {
  const log = path.join(dir, `run-${run}.log`);
  const fd = fs.openSync(log, 'w');
  const startedAt = new Date();
  const cpu0 = cpuTimes();
  const loads: number[] = [];
  const sampler = setInterval(() => loads.push(os.loadavg()[0]!), SAMPLE_MS);
  const waitLog = path.join(dir, `run-${run}.waits.jsonl`);
  const child = spawn('npm', ['test'], { stdio: ['ignore', fd, fd], env: { ...process.env, FORCE_COLOR: '0', POLYDEV_TEST_WAIT_LOG: waitLog } });
  const timer = setTimeout(() => {
    if (child.pid !== undefined) process.kill(child.pid, 'SIGKILL');
  }, RUN_TIMEOUT_MS);
  const exitCode = await new Promise<number | null>((resolve) => {
    child.once('error', () => resolve(null));
    child.once('close', (code) => resolve(code));
  });
  clearTimeout(timer);
  clearInterval(sampler);
  fs.closeSync(fd);
  const cpu1 = cpuTimes();
  const output = fs.readFileSync(log, 'utf8');
  // ava prints "N tests passed" only when none failed; otherwise count its ✔ lines.
  const passedLine = /(\d+) tests? passed/.exec(output);
  const passed = passedLine ? Number(passedLine[1]) : output.split('\n').filter((l) => /^\s*✔ /.test(l)).length;
  const failures = failuresOf(output);
  if (exitCode !== 0 && failures.length === 0) failures.push(`npm test exited with ${exitCode ?? 'a spawn error'} (see the log)`);
  return {
    run,
    startedAt: startedAt.toISOString(),
    durationSeconds: Math.round((Date.now() - startedAt.getTime()) / 100) / 10,
    exitCode,
    passed,
    failures,
    load: {
      mean: loads.length ? Math.round((loads.reduce((a, b) => a + b, 0) / loads.length) * 100) / 100 : 0,
      max: loads.length ? Math.max(...loads) : 0,
    },
    cpuBusyPercent: Math.round((100 * (cpu1.busy - cpu0.busy)) / Math.max(1, cpu1.total - cpu0.total)),
    log,
  };
}

async function main(): Promise<number> {
  let args: { runs: number; out: string };
  try {
    args = parseArgs(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(`${(err as Error).message}\n`);
    return 2;
  }
  fs.mkdirSync(args.out, { recursive: true });
  process.stdout.write(`${args.runs} runs of npm test on ${os.cpus().length} CPUs; logs in ${args.out}\n`);
  const reports: RunReport[] = [];
  for (let run = 1; run <= args.runs; run++) {
    const r = await oneRun(run, args.out);
    reports.push(r);
    const head = `run ${run}/${args.runs}: ${r.failures.length === 0 ? 'passed' : 'FAILED'} in ${r.durationSeconds} s` +
      ` (${r.passed} passed; load mean ${r.load.mean}, max ${r.load.max}; CPU busy ${r.cpuBusyPercent}%)`;
    process.stdout.write(`${head}\n${r.failures.map((f) => `    ${f}\n`).join('')}`);
    fs.writeFileSync(path.join(args.out, 'summary.json'), `${JSON.stringify(reports, null, 2)}\n`);
  }
  const tight = closestWaits(reports.map((r) => r.log.replace(/\.log$/, '.waits.jsonl')));
  if (tight.length > 0) {
    process.stdout.write(`\nwaits closest to their deadline (worst of all runs; helpers/e2e-env.ts waitFor):\n`);
    for (const w of tight) process.stdout.write(`  ${String(w.worstMs).padStart(6)} of ${String(w.timeoutMs).padStart(6)} ms (${w.count}×, median ${w.medianMs})  ${w.site}  ${w.what}\n`);
  }
  const failed = reports.filter((r) => r.failures.length > 0);
  process.stdout.write(`\n${reports.length - failed.length} of ${reports.length} runs passed; summary in ${path.join(args.out, 'summary.json')}\n`);
  return failed.length === 0 ? 0 : 1;
}

if (process.argv[1] && path.resolve(process.argv[1]).endsWith(path.join('scripts', 'test-repeat.ts'))) {
  process.exitCode = await main();
}
