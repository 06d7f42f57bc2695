// TurnServer benchmark (issue 4), against Debian's coturn on 127.0.0.1 started by the test harness.
// 1. Probe cost: the daemon's own client, one probe at a time: a STUN binding alone, and a full
//    binding + allocate (401 round and authenticated retry) + release (Refresh LIFETIME 0), over
//    UDP and over TCP. Medians over PROBES probes per run.
// 2. Hang to Healthy: a daemon (in this process) probes with interval 1 s, threshold 3 and a
//    500 ms probe timeout; coturn gets SIGSTOP; the TurnServer's restart command (the tests'
//    restart-coturn.mjs: kill -9, start again) runs when the machine says so. Measured from the
//    SIGSTOP to the status saying Healthy with a new coturn PID. Goal: under 5 s.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import YAML from 'yaml';
import { loadConfig } from '../src/config.js';
import { Daemon } from '../src/daemon.js';
import { probeTurn, type TurnTransport } from '../src/drivers/turn.js';
import { silentLogger } from '../src/observability/logger.js';
import { startCoturn, type Coturn } from '../test/helpers/coturn.js';
import { REPO } from '../test/helpers/e2e-env.js';
import { benchContext, runCleanups } from './harness.js';
import { median, summarize, type BenchFigure } from './stats.js';

const PROBES = 50;
const round = (x: number, d = 2) => Math.round(x * 10 ** d) / 10 ** d;
const log = (msg: string) => process.stderr.write(`[turn ${new Date().toISOString().slice(11, 19)}] ${msg}\n`);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));


async function probeCost(c: Coturn, transport: TurnTransport, allocate: boolean): Promise<number[]> {
  const out: number[] = [];
  for (let i = 0; i < PROBES; i++) {
    const t0 = performance.now();
    const r = await probeTurn({ host: '127.0.0.1', port: c.port, transport, realm: c.realm, timeoutMs: 2000, allocate, credentials: { mode: 'longTerm', username: c.username!, password: c.password! } });
    const ms = performance.now() - t0;
    if (r.errorClass) throw new Error(`${transport} probe failed: ${r.errorClass} ${r.error ?? ''}`);
    out.push(ms);
    // coturn frees a relay port released over UDP only on its next 1-second tick: 50 allocations
    // back to back would exhaust the 20-port range (508). Paced, each probe finds a free port.
    if (allocate) await sleep(100);
  }
  return out;
}

interface HangRun {
  /** SIGSTOP → status Healthy with a new PID. */
  hangToHealthyMs: number;
  /** SIGSTOP → the machine entered Restarting (detection). */
  detectMs: number;
  /** Restarting → Healthy (restart command, settle, one good probe). */
  restartToHealthyMs: number;
}

async function hangRun(c: Coturn, daemon: Daemon): Promise<HangRun> {
  const status = () => daemon.store.getResource('TurnServer', 'bench')?.status as { phase?: string } | undefined;
  const deadline = Date.now() + 30_000;
  while (status()?.phase !== 'Healthy') {
    if (Date.now() > deadline) throw new Error(`not Healthy before the hang: ${JSON.stringify(status())}`);
    await sleep(20);
  }
  await sleep(300 + Math.random() * 700); // the hang lands anywhere in the probe rhythm
  const before = c.currentPid();
  process.kill(before!, 'SIGSTOP');
  const t0 = performance.now();
  let detect: number | undefined;
  for (;;) {
    const s = status();
    if (detect === undefined && (s?.phase === 'Restarting' || s?.phase === 'Recovering')) detect = performance.now() - t0;
    const pid = c.currentPid();
    if (s?.phase === 'Healthy' && pid !== undefined && pid !== before) break;
    if (performance.now() - t0 > 30_000) throw new Error(`not Healthy again within 30 s: ${JSON.stringify(s)}`);
    await sleep(10);
  }
  const total = performance.now() - t0;
  return { hangToHealthyMs: round(total), detectMs: round(detect ?? NaN), restartToHealthyMs: round(total - (detect ?? NaN)) };
}

export async function runTurnBench(runs: number): Promise<{ figures: BenchFigure[]; raw: Record<string, unknown>; method: Record<string, unknown> }> {
  const cleanups: Array<() => unknown> = [];
  const t = benchContext(cleanups);
  const raw: Record<string, unknown> = {};
  try {
    log('starting coturn (lt-cred-mech)');
    const c = await startCoturn(t, { mode: 'longTerm' });
    const cost: Record<string, number[]> = {};
    for (const transport of ['udp', 'tcp'] as const) {
      for (const allocate of [false, true]) {
        const key = `${transport}:${allocate ? 'allocate+release' : 'binding'}`;
        const medians: number[] = [];
        for (let r = 0; r < runs; r++) medians.push(median(await probeCost(c, transport, allocate)));
        cost[key] = medians.map((x) => round(x, 3));
        log(`  ${key}: medians per run ${cost[key]!.join(', ')} ms`);
      }
    }
    raw.probeCostMediansPerRun = cost;
    const leaked = await c.waitAllocations(0, 5_000);
    raw.allocationsAfterProbes = leaked;

    log(`hang to Healthy, ${runs} runs`);
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'polydev-turn-bench-'));
    cleanups.push(() => fs.rmSync(dir, { recursive: true, force: true }));
    const desired = path.join(dir, 'desired');
    fs.mkdirSync(desired);
    const passwordFile = path.join(dir, 'password');
    fs.writeFileSync(passwordFile, `${c.password}\n`, { mode: 0o600 });
    fs.writeFileSync(path.join(desired, 'turn.yaml'), YAML.stringify({
      apiVersion: 'polydev.ai/v1alpha1',
      kind: 'TurnServer',
      metadata: { name: 'bench' },
      spec: {
        host: '127.0.0.1',
        ports: { stun: c.port },
        transports: ['udp', 'tcp'],
        realm: c.realm,
        auth: { mode: 'longTerm', username: c.username, passwordFile },
        probe: { interval: '1s', timeout: '500ms', failureThreshold: 3 },
        remediation: { command: [process.execPath, path.join(REPO, 'test', 'helpers', 'restart-coturn.mjs'), c.configFile, c.pidFile], backoff: '200ms', maxRestarts: runs + 2, window: '1h', settle: '100ms' },
        relayPortRange: c.relayRange,
      },
    }));
    const cfgFile = path.join(dir, 'config.yaml');
    fs.writeFileSync(cfgFile, YAML.stringify({ database: path.join(dir, 'state.db'), desiredStateDir: desired, listen: '127.0.0.1:0', resyncInterval: '60s', logLevel: 'error' }));
    const daemon = new Daemon(loadConfig(cfgFile, {}), { logger: silentLogger() });
    await daemon.start();
    cleanups.push(() => daemon.stop());
    const hangs: HangRun[] = [];
    for (let r = 0; r < runs; r++) {
      const h = await hangRun(c, daemon);
      log(`  run ${r + 1}: hang → Healthy ${h.hangToHealthyMs} ms (detected after ${h.detectMs} ms, restart → Healthy ${h.restartToHealthyMs} ms)`);
      hangs.push(h);
    }
    raw.hangs = hangs;
    await daemon.stop();
    const hangMedian = median(hangs.map((h) => h.hangToHealthyMs));
    const m = (k: string) => round(median(cost[k]!), 3);
    const figures: BenchFigure[] = [
      { name: 'probe: STUN binding over UDP', value: m('udp:binding'), unit: 'ms' },
      { name: 'probe: binding + allocate + release over UDP', value: m('udp:allocate+release'), unit: 'ms' },
      { name: 'probe: STUN binding over TCP (connect included)', value: m('tcp:binding'), unit: 'ms' },
      { name: 'probe: binding + allocate + release over TCP', value: m('tcp:allocate+release'), unit: 'ms' },
      { name: 'allocations left on coturn after all probes', value: leaked, unit: 'count', goal: '0', met: leaked === 0 },
      { name: 'hang (SIGSTOP) → Healthy, interval 1s, threshold 3', value: round(hangMedian), unit: 'ms', goal: '< 5000 ms', met: hangMedian < 5000 },
      { name: '  of which detection (SIGSTOP → Restarting)', value: round(median(hangs.map((h) => h.detectMs))), unit: 'ms' },
      { name: '  of which restart → Healthy', value: round(median(hangs.map((h) => h.restartToHealthyMs))), unit: 'ms' },
    ];
    raw.hangSummary = summarize(hangs.map((h) => h.hangToHealthyMs));
    return {
      figures,
      raw,
      method: {
        coturn: 'Debian coturn 4.6.1 from test/helpers/coturn.ts: 127.0.0.1, a free port, a 20-port relay range, lt-cred-mech with a static user, no TLS',
        probeCost: `our client (src/drivers/turn.ts), ${PROBES} probes one after another per run (allocating ones 100 ms apart: coturn frees a UDP-released relay port only on its next 1-second tick), median per run, figure = median over runs; wall time of probeTurn() in this process, socket set-up and close included`,
        hang: 'daemon in this process (src/daemon.ts), TurnServer with transports udp+tcp, probe {interval 1s, timeout 500ms, failureThreshold 3}, remediation.command = node test/helpers/restart-coturn.mjs (kill -9, start again, wait for the new pidfile), backoff 200ms, settle 100ms. The SIGSTOP lands at a random point 0.3-1 s after the status last said Healthy; the end is the status saying Healthy while the pidfile names a new process (polled every 10 ms).',
      },
    };
  } finally {
    await runCleanups(cleanups, log);
  }
}
