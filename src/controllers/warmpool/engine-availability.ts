import type { Logger } from '../../observability/logger.js';
import type { EngineName } from './engine.js';

export interface EngineOutage {
  /** Epoch ms of the first failure that showed it. */
  since: number;
  /** The first failure's message (it names the engine and its address). */
  message: string;
  /** Failures seen during the outage (pool runs, event stream, probes). */
  failures: number;
}

export interface EngineAvailabilityOptions {
  logger: Logger;
  /** The pools that use an engine (they wait for it while it is down). */
  poolsOn(engine: EngineName): string[];
  /** Throws while the engine cannot be reached. */
  ping(engine: EngineName): Promise<void>;
  /** An outage starts (the first failure that shows it). */
  onDown(engine: EngineName, outage: EngineOutage): void;
  /**
   * The engine answers again after an outage (or at start, after failures the last process
   * stored). `origin` is the pool whose own run found it back, if one did (it is running already).
   */
  onUp(engine: EngineName, outage: EngineOutage | undefined, origin?: string): void;
  /** While an engine is down it is pinged this often, so its return is noticed within about this long. */
  probeMs: number;
}

/**
 * Whether each engine can be reached, told by everything that talks to it: pool runs, the event
 * stream, and a probe that pings a down engine every probeMs. An outage is logged once, as a
 * warning naming the engine and the pools waiting for it, when it starts; its end once, at info;
 * the failures in between (every pool's retries, the stream's reconnects) at debug. The end of
 * an outage is the cause of those pools' failures going away: onUp retries them at once.
 */
export class EngineAvailability {
  private readonly down = new Map<EngineName, EngineOutage>();
  private readonly probes = new Map<EngineName, NodeJS.Timeout>();
  private readonly probing = new Set<EngineName>();
  private stopped = false;

  constructor(private readonly opts: EngineAvailabilityOptions) {}

  outage(engine: EngineName): EngineOutage | undefined {
    return this.down.get(engine);
  }

  isDown(engine: EngineName): boolean {
    return this.down.has(engine);
  }

  /** A call to the engine failed because it cannot be reached. Returns true when this starts an outage. */
  markDown(engine: EngineName, err: Error, via: string): boolean {
    if (this.stopped) return false;
    const known = this.down.get(engine);
    if (known) {
      known.failures++;
      this.opts.logger.debug('engine still unreachable', { engine, via, error: err.message, failures: known.failures });
      return false;
    }
    const outage: EngineOutage = { since: Date.now(), message: err.message, failures: 1 };
    this.down.set(engine, outage);
    const pools = this.opts.poolsOn(engine);
    this.opts.logger.warn(
      `${err.message}; ${pools.length ? `pool${pools.length > 1 ? 's' : ''} ${pools.join(', ')} wait${pools.length > 1 ? '' : 's'} for it` : 'no pool uses it'}`,
      { engine, cause: 'EngineUnavailable', via, pools },
    );
    this.scheduleProbe(engine);
    this.opts.onDown(engine, outage);
    return true;
  }

  /** A call to the engine succeeded (by pool `origin`'s run, if so). Returns true when this ends an outage (onUp has then run). */
  markUp(engine: EngineName, via: string, origin?: string): boolean {
    const outage = this.down.get(engine);
    if (!outage || this.stopped) return false;
    this.down.delete(engine);
    this.cancelProbe(engine);
    const pools = this.opts.poolsOn(engine);
    const seconds = ((Date.now() - outage.since) / 1000).toFixed(1);
    this.opts.logger.info(
      `the ${engine} engine is reachable again after ${seconds} s${pools.length ? `; retrying pool${pools.length > 1 ? 's' : ''} ${pools.join(', ')} now` : ''}`,
      { engine, via, downSince: new Date(outage.since).toISOString(), failures: outage.failures, pools },
    );
    this.opts.onUp(engine, outage, origin);
    return true;
  }

  /**
   * Pings an engine that pools found unreachable before this process started (their status says
   * so): if it answers now, they are retried at once instead of waiting out a stored backoff.
   */
  async check(engine: EngineName): Promise<void> {
    if (this.stopped || this.down.has(engine)) return;
    try {
      await this.opts.ping(engine);
    } catch (err) {
      this.markDown(engine, err instanceof Error ? err : new Error(String(err)), 'ping');
      return;
    }
    if (!this.stopped) this.opts.onUp(engine, undefined);
  }

  stop(): void {
    this.stopped = true;
    for (const t of this.probes.values()) clearTimeout(t);
    this.probes.clear();
  }

  private scheduleProbe(engine: EngineName): void {
    if (this.stopped || this.probes.has(engine) || this.probing.has(engine)) return;
    const timer = setTimeout(() => {
      this.probes.delete(engine);
      void this.probe(engine);
    }, this.opts.probeMs);
    timer.unref();
    this.probes.set(engine, timer);
  }

  private cancelProbe(engine: EngineName): void {
    const t = this.probes.get(engine);
    if (t) clearTimeout(t);
    this.probes.delete(engine);
  }

  /** One ping of a down engine; the next is scheduled only after this one ends (a hung engine is not pinged in parallel). */
  private async probe(engine: EngineName): Promise<void> {
    if (this.stopped || !this.down.has(engine)) return;
    this.probing.add(engine);
    let ok = false;
    let failure: Error | undefined;
    try {
      await this.opts.ping(engine);
      ok = true;
    } catch (err) {
      failure = err instanceof Error ? err : new Error(String(err));
    } finally {
      this.probing.delete(engine);
    }
    if (ok) this.markUp(engine, 'ping');
    else if (this.down.has(engine)) {
      const outage = this.down.get(engine)!;
      outage.failures++;
      this.opts.logger.debug('engine still unreachable', { engine, via: 'ping', error: failure?.message, failures: outage.failures });
      this.scheduleProbe(engine);
    }
  }
}
