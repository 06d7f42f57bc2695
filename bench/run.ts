// `npm run bench`: runs every benchmark, writes bench/results/<name>.json and prints a table.
// Needs root (network namespaces); everything it creates is deleted when it ends.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { runProxyBench } from './proxy.js';
import { printTable } from './stats.js';

const RESULTS = path.join(path.dirname(fileURLToPath(import.meta.url)), 'results');
const runs = Number(process.env.BENCH_RUNS ?? 5);

const { figures, raw } = await runProxyBench(runs);
fs.mkdirSync(RESULTS, { recursive: true });
const out = {
  benchmark: 'proxy',
  issue: 2,
  date: new Date().toISOString(),
  machine: { cpus: os.cpus().length, cpuModel: os.cpus()[0]?.model, memoryGb: Math.round(os.totalmem() / 2 ** 30), node: process.version },
  runs,
  figures,
  raw,
};
fs.writeFileSync(path.join(RESULTS, 'proxy.json'), JSON.stringify(out, null, 2) + '\n');
printTable('ProxyPort (issue 2)', figures);
console.log(`\nwritten: ${path.relative(process.cwd(), path.join(RESULTS, 'proxy.json'))}`);
if (figures.some((f) => f.met === false)) process.exitCode = 1;
