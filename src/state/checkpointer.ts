import { createRequire } from 'node:module';
import { Worker } from 'node:worker_threads';
import type Database from 'better-sqlite3';

// In WAL mode SQLite copies the log back into the database (a checkpoint, with an fsync) from
// inside whichever COMMIT pushes the log past 1000 pages. On the daemon's one thread that made
// every tenth or so claim commit take 6-10 ms instead of 1. Here the daemon's connection stops
// checkpointing by itself and a worker thread, with a connection of its own, checkpoints
// PASSIVE-ly (never blocking a writer) on a timer; the fsync is the worker's to wait for.

const WORKER_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads');
let db;
try {
  const Database = require(workerData.driver);
  db = new Database(workerData.file, { fileMustExist: true, timeout: 0 });
} catch (err) {
  parentPort.postMessage({ error: String(err && err.message || err) });
  process.exit(1);
}
const tick = () => {
  try {
    const [r] = db.pragma('wal_checkpoint(PASSIVE)');
    parentPort.postMessage({ busy: r.busy, log: r.log, checkpointed: r.checkpointed });
  } catch (err) {
    // Another checkpoint running (SQLITE_BUSY) is not a failure; the next tick tries again.
    if (err && err.code !== 'SQLITE_BUSY') parentPort.postMessage({ error: String(err.message || err) });
  }
};
const timer = setInterval(tick, workerData.intervalMs);
parentPort.on('message', (m) => {
  if (m === 'now') tick();
  if (m === 'stop') { clearInterval(timer); db.close(); process.exit(0); }
});
parentPort.postMessage({ ready: true });
`;

export interface CheckpointResult {
  /** Frames in the log, and how many of them are in the database now. */
  log: number;
  checkpointed: number;
}

export interface CheckpointerOptions {
  intervalMs: number;
  /** The worker failed; the connection checkpoints by itself again (nothing grows without bound). */
  onError(message: string): void;
  onCheckpoint?(r: CheckpointResult): void;
}

/** SQLite's own default, restored on the main connection if the worker fails. */
const DEFAULT_AUTOCHECKPOINT_PAGES = 1000;

export class BackgroundCheckpointer {
  private worker: Worker | undefined;
  private failed = false;

  constructor(
    private readonly db: Database.Database,
    file: string,
    private readonly opts: CheckpointerOptions,
    driver = createRequire(import.meta.url).resolve('better-sqlite3'),
  ) {
    db.pragma('wal_autocheckpoint = 0');
    const worker = new Worker(WORKER_SOURCE, {
      eval: true,
      workerData: { file, driver, intervalMs: opts.intervalMs },
      // A few statements on a timer: a small heap keeps the thread's memory small.
      resourceLimits: { maxOldGenerationSizeMb: 12, maxYoungGenerationSizeMb: 1 },
    });
    worker.unref();
    worker.on('message', (m: { error?: string; log?: number; checkpointed?: number }) => {
      if (m.error !== undefined) this.fail(m.error);
      else if (m.log !== undefined) this.opts.onCheckpoint?.({ log: m.log, checkpointed: m.checkpointed ?? 0 });
    });
    worker.on('error', (err) => this.fail(err.message));
    worker.on('exit', (code) => {
      if (this.worker && code !== 0) this.fail(`checkpoint worker exited with code ${code}`);
    });
    this.worker = worker;
  }

  get running(): boolean {
    return this.worker !== undefined && !this.failed;
  }

  /** Asks for a checkpoint now (tests, and before a backup). */
  checkpointNow(): void {
    this.worker?.postMessage('now');
  }

  private fail(message: string): void {
    if (this.failed) return;
    this.failed = true;
    const w = this.worker;
    this.worker = undefined;
    void w?.terminate();
    if (this.db.open) this.db.pragma(`wal_autocheckpoint = ${DEFAULT_AUTOCHECKPOINT_PAGES}`);
    this.opts.onError(message);
  }

  stop(): void {
    const w = this.worker;
    this.worker = undefined;
    w?.postMessage('stop');
  }
}
