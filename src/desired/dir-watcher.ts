import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from '../observability/logger.js';
import type { Metrics } from '../observability/metrics.js';
import type { EventRecorder } from '../runtime/controller.js';
import type { Store } from '../state/store.js';
import { applyPath, type Admission, type ApplyResult } from './apply.js';
import { formatProblem, MAX_FILE_BYTES, type DesiredStateValidator } from './validate.js';

export const WATCH_EVENT_KIND = 'DesiredState';

/**
 * Applies the desired-state directory on start and after every change (debounced), the same way
 * `apply --prune` does: all or nothing. A rejected edit is logged and evented, and the last good
 * state keeps running. Besides inotify, the directory's digest is compared on every resync, so an
 * edit that the watch missed (a replaced directory, a network filesystem) is still picked up.
 */
export class DesiredStateDirWatcher {
  private watcher: fs.FSWatcher | undefined;
  private debounce: NodeJS.Timeout | undefined;
  private poll: NodeJS.Timeout | undefined;
  private lastDigest: string | undefined;
  private applying = false;

  constructor(
    private readonly opts: {
      dir: string;
      store: Store;
      validator: DesiredStateValidator;
      admissions: Admission[];
      logger: Logger;
      metrics: Metrics;
      recorder: EventRecorder;
      debounceMs: number;
      pollMs: number;
      maxPrune: number;
    },
  ) {}

  start(): ApplyResult | undefined {
    const first = this.applyNow('start');
    try {
      this.watcher = fs.watch(this.opts.dir, () => this.schedule());
      this.watcher.on('error', (err) => this.opts.logger.warn('desired-state watch failed; polling only', { error: err.message }));
    } catch (err) {
      this.opts.logger.warn('cannot watch desired-state directory; polling only', { dir: this.opts.dir, error: (err as Error).message });
    }
    // The poll only notices; the debounce still decides when (a multi-file edit lands whole).
    this.poll = setInterval(() => {
      if (!this.debounce && this.digest() !== this.lastDigest) this.schedule();
    }, this.opts.pollMs);
    this.poll.unref();
    return first;
  }

  stop(): void {
    this.watcher?.close();
    if (this.debounce) clearTimeout(this.debounce);
    if (this.poll) clearInterval(this.poll);
  }

  private schedule(): void {
    if (this.debounce) clearTimeout(this.debounce);
    this.debounce = setTimeout(() => {
      this.debounce = undefined;
      this.applyIfChanged();
    }, this.opts.debounceMs);
    this.debounce.unref();
  }

  private applyIfChanged(): void {
    if (this.applying) return this.schedule();
    if (this.digest() === this.lastDigest) return;
    this.applyNow('change');
  }

  /** A digest of the directory's YAML files (names, sizes and contents), to skip no-op applies. */
  private digest(): string {
    const h = createHash('sha256');
    try {
      for (const f of fs.readdirSync(this.opts.dir).filter((f) => /\.ya?ml$/.test(f)).sort()) {
        const full = path.join(this.opts.dir, f);
        const st = fs.statSync(full);
        h.update(`${f}\0${st.size}\0`);
        if (st.size <= MAX_FILE_BYTES) h.update(fs.readFileSync(full));
      }
    } catch (err) {
      h.update(`error:${(err as Error).message}`);
    }
    return h.digest('hex');
  }

  applyNow(trigger: 'start' | 'change'): ApplyResult | undefined {
    const { logger, metrics, recorder } = this.opts;
    this.applying = true;
    const digest = this.digest();
    try {
      const result = applyPath(this.opts.store, this.opts.validator, this.opts.admissions, this.opts.dir, {
        prune: true,
        maxPrune: this.opts.maxPrune,
        source: 'apply',
      });
      this.lastDigest = digest;
      if (!result.ok) {
        metrics.desiredStateApplies.inc({ result: 'rejected' });
        const lines = result.problems.map(formatProblem);
        logger.error('desired state rejected; the last good state keeps running', { dir: this.opts.dir, trigger, problems: lines.slice(0, 50) });
        recorder.record(WATCH_EVENT_KIND, 'directory', 'Warning', 'ApplyRejected',
          `${lines.length} problem(s) in ${this.opts.dir}, nothing applied: ${lines.slice(0, 3).join(' | ')}${lines.length > 3 ? ' | …' : ''}`);
        return result;
      }
      const changed = result.created.length + result.configured.length + result.pruned.length;
      metrics.desiredStateApplies.inc({ result: changed > 0 ? 'applied' : 'unchanged' });
      if (changed > 0) {
        logger.info('desired state applied', { dir: this.opts.dir, trigger, created: result.created.length, configured: result.configured.length, pruned: result.pruned.length });
        recorder.record(WATCH_EVENT_KIND, 'directory', 'Normal', 'Applied',
          `${result.created.length} created, ${result.configured.length} configured, ${result.pruned.length} pruned from ${this.opts.dir}`);
      }
      return result;
    } catch (err) {
      metrics.desiredStateApplies.inc({ result: 'rejected' });
      logger.error('desired state apply failed', { dir: this.opts.dir, error: (err as Error).message });
      recorder.record(WATCH_EVENT_KIND, 'directory', 'Warning', 'ApplyFailed', (err as Error).message);
      return undefined;
    } finally {
      this.applying = false;
    }
  }
}
