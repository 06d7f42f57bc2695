// `npm run bench`: runs every benchmark, writes bench/results/<name>.json and prints a table.
// BENCH_ONLY=proxy|warm-pool|turn|nomad|standby|lifecycle|engine-outage|cli runs one; BENCH_RUNS sets the runs per figure (default 5).
// Warm-pool only, for investigations: BENCH_WARM_POOL_PARTS=claims,refill,rss (default all),
// BENCH_RSS_RUNS (default 2), BENCH_CPU_PROFILE=1 (profile the daemon during the claim bursts).
// Needs root (network namespaces, dockerd, coturn); everything it creates is deleted when it ends.
// Exits 1 if any goal is unmet.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { runCliBench } from './cli.js';
import { runEngineOutageBench } from './engine-outage.js';
import { runLifecycleBench } from './lifecycle.js';
import { runNomadBench } from './nomad.js';
import { runProxyBench } from './proxy.js';
import { runStandbyBench } from './standby.js';
import { printTable, type BenchFigure } from './stats.js';
import { runTurnBench } from './turn.js';
import { runWarmPoolBench } from './warm-pool.js';

const RESULTS = path.join(path.dirname(fileURLToPath(import.meta.url)), 'results');
const runs = Number(process.env.BENCH_RUNS ?? 5);

interface Bench {
  name: string;
  issue: number;
  title: string;
  run(runs: number): Promise<{ figures: BenchFigure[]; raw: Record<string, unknown>; method?: Record<string, unknown> }>;
}

const BENCHES: Bench[] = [
  { name: 'proxy', issue: 2, title: 'ProxyPort (issue 2)', run: runProxyBench },
  { name: 'warm-pool', issue: 3, title: 'WarmPool (issue 3)', run: runWarmPoolBench },
  { name: 'turn', issue: 4, title: 'TurnServer (issue 4)', run: runTurnBench },
  { name: 'nomad', issue: 5, title: 'WarmPool engine nomad (issue 5)', run: runNomadBench },
  { name: 'standby', issue: 6, title: 'Standby takeover (issue 6)', run: runStandbyBench },
  { name: 'lifecycle', issue: 20, title: 'Stop and process-engine timings, formerly test assertions (issue 20)', run: runLifecycleBench },
  { name: 'engine-outage', issue: 13, title: 'Engine outage recovery (issue 13)', run: runEngineOutageBench },
  { name: 'cli', issue: 13, title: 'CLI start-up to exit (issue 13)', run: runCliBench },
];

const only = process.env.BENCH_ONLY;
if (only !== undefined && !BENCHES.some((b) => b.name === only)) {
  console.error(`BENCH_ONLY must be one of ${BENCHES.map((b) => b.name).join(', ')}, got ${JSON.stringify(only)}`);
  process.exit(2);
}
if (!Number.isInteger(runs) || runs < 1) {
  console.error(`BENCH_RUNS must be a positive whole number, got ${JSON.stringify(process.env.BENCH_RUNS)}`);
  process.exit(2);
}

fs.mkdirSync(RESULTS, { recursive: true });
let unmet = false;
for (const bench of BENCHES.filter((b) => only === undefined || b.name === only)) {
  const { figures, raw, method } = await bench.run(runs);
  const out = {
    benchmark: bench.name,
    issue: bench.issue,
    date: new Date().toISOString(),
    machine: { cpus: os.cpus().length, cpuModel: os.cpus()[0]?.model, memoryGb: Math.round(os.totalmem() / 2 ** 30), node: process.version },
    runs,
    ...(method ? { method } : {}),
    figures,
    raw,
  };
  const file = path.join(RESULTS, `${bench.name}.json`);
  // Temp file + rename: an interrupted run never leaves half a results file.
  fs.writeFileSync(`${file}.tmp`, JSON.stringify(out, null, 2) + '\n');
  fs.renameSync(`${file}.tmp`, file);
  printTable(bench.title, figures);
  console.log(`\nwritten: ${path.relative(process.cwd(), file)}\n`);
  if (figures.some((f) => f.met === false)) unmet = true;
}
if (unmet) process.exitCode = 1;
