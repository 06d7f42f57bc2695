import { ENGINE_OPERATION_RESULTS, type Metrics } from '../../observability/metrics.js';
import { EngineError, type Engine, type EngineName } from './engine.js';

export type EngineFactories = Partial<Record<EngineName, () => Engine>>;

/** The op label of polydev_engine_operations_total: every counted Engine method (update and rename are Docker's only). */
const ENGINE_OPERATIONS = ['ping', 'list', 'start', 'remove', 'inject', 'recycle', 'update', 'rename'] as const;
type EngineOperation = (typeof ENGINE_OPERATIONS)[number];

/** Counts every call (polydev_engine_operations_total) without the drivers knowing about metrics. */
function instrument(engine: Engine, metrics: Metrics): Engine {
  const count = <T>(op: EngineOperation, p: Promise<T>): Promise<T> =>
    p.then(
      (v) => {
        metrics.engineOperations.inc({ engine: engine.name, op, result: 'success' });
        return v;
      },
      (err: unknown) => {
        metrics.engineOperations.inc({ engine: engine.name, op, result: 'error' });
        throw err;
      },
    );
  const wrapped: Engine = {
    name: engine.name,
    ping: () => count('ping', engine.ping()),
    list: (owner) => count('list', engine.list(owner)),
    start: (spec) => count('start', engine.start(spec)),
    remove: (id) => count('remove', engine.remove(id)),
    inject: (id, injection) => count('inject', engine.inject(id, injection)),
    recycle: (c, dir) => count('recycle', engine.recycle(c, dir)),
    watch: (owner, onEvent, onError, onResumed) => engine.watch(owner, onEvent, onError, onResumed),
  };
  if (engine.update) wrapped.update = (id, r) => count('update', engine.update!(id, r));
  if (engine.rename) wrapped.rename = (id, n) => count('rename', engine.rename!(id, n));
  if (engine.close) wrapped.close = () => engine.close!();
  return wrapped;
}

/** The engines this daemon is configured for, created on first use. */
export class EngineSet {
  private readonly engines = new Map<EngineName, Engine>();

  constructor(
    private readonly factories: EngineFactories,
    private readonly metrics: Metrics,
  ) {
    // Counted from 0 for every configured engine (see metrics.ts), though it is created on first use
    // (so whether it has update and rename is not known yet: an engine without them stays at 0).
    for (const engine of Object.keys(factories)) {
      for (const op of ENGINE_OPERATIONS) for (const result of ENGINE_OPERATION_RESULTS) metrics.engineOperations.inc({ engine, op, result }, 0);
    }
  }

  /** The engine, or EngineError(EngineUnavailable) when this daemon has none of that name configured. */
  get(name: EngineName): Engine {
    let engine = this.engines.get(name);
    if (!engine) {
      const make = this.factories[name];
      if (!make) {
        // Only nomad needs a setting (docker and process always have a factory in a daemon).
        const how = name === 'nomad' ? ' (set nomad.address in its config, env POLYDEV_NOMAD_ADDRESS)' : '';
        throw new EngineError('EngineUnavailable', `the ${name} engine is not configured in this daemon${how}`);
      }
      let made: Engine;
      try {
        made = make();
      } catch (err) {
        throw new EngineError('EngineUnavailable', `the ${name} engine cannot be set up: ${err instanceof Error ? err.message : String(err)}`);
      }
      engine = instrument(made, this.metrics);
      this.engines.set(name, engine);
    }
    return engine;
  }

  configured(): EngineName[] {
    return Object.keys(this.factories) as EngineName[];
  }

  /** Engines already in use. */
  active(): Engine[] {
    return [...this.engines.values()];
  }

  async close(): Promise<void> {
    await Promise.allSettled([...this.engines.values()].map((e) => e.close?.()));
    this.engines.clear();
  }
}
