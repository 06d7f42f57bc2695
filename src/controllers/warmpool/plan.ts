import type { MemberState, PoolMember } from '../../state/pools.js';
import type { ObservedContainer } from './engine.js';
import type { RemoveReason, WarmPoolAction, WarmPoolDesired, WarmPoolObserved } from './types.js';

function samePorts(a: Record<string, number> | null | undefined, b: Record<string, number> | undefined): boolean {
  const ka = Object.keys(a ?? {});
  if (ka.length !== Object.keys(b ?? {}).length) return false;
  return ka.every((k) => a![k] === b?.[k]);
}

const alive = (c: ObservedContainer) => c.state === 'running' && c.health !== 'unhealthy';
const ready = (c: ObservedContainer) => alive(c) && c.health !== 'starting';

interface WarmOne {
  slot: string;
  container: ObservedContainer;
  /** When it became warm (the roll and idle recycling take the oldest first). */
  since: number;
  reason?: 'stale' | 'idle';
}

/**
 * What to do to make one pool's containers match its spec. Pure: (desired, observed) → actions.
 *
 * - Claims past their expiry end; pending claims whose cold start is no longer in flight (the
 *   daemon died during it) fail. Their containers are released.
 * - Owned containers the store does not know are adopted (a crash between create and record);
 *   untracked containers that are dead or were started for a claim are removed.
 * - Exited, dead and unhealthy containers are removed (a claim on one fails); rows whose
 *   container is gone are forgotten.
 * - Released containers are recycled (onRelease: recycle, same spec, while the pool needs
 *   warm ones) or removed.
 * - Warm containers of a stale spec or idle past idleTimeout are replaced, oldest first, never
 *   leaving fewer than size - 1 warm (when maxSize leaves no room at all, one at a time).
 *   Claimed containers are never touched by a roll.
 * - Warm containers beyond size, or anything unclaimed beyond maxSize, are removed.
 * - Then as many starts as size asks for and maxSize allows.
 */
export function planWarmPool(d: WarmPoolDesired, o: WarmPoolObserved): WarmPoolAction[] {
  const { spec } = d;
  const actions: WarmPoolAction[] = [];
  const removals: WarmPoolAction[] = [];
  const members = new Map(o.members.map((m) => [m.slot, m]));
  const openClaims = new Map(o.claims.map((c) => [c.id, c]));
  const state = new Map<string, MemberState>(o.members.map((m) => [m.slot, m.state]));
  const ended = new Set<string>();

  const endClaim = (claimId: string, st: 'expired' | 'failed', reason: string) => {
    if (ended.has(claimId)) return;
    ended.add(claimId);
    actions.push({ type: 'endClaim', claimId, state: st, reason });
    const slot = openClaims.get(claimId)?.slot;
    if (slot && state.has(slot)) state.set(slot, 'releasing');
  };
  const remove = (c: ObservedContainer, reason: RemoveReason) =>
    removals.push({ type: 'remove', containerId: c.id, name: c.name, slot: c.slot, reason });

  for (const c of o.claims) {
    if (c.state === 'pending' && !(c.slot && o.inFlight.has(c.slot))) {
      endClaim(c.id, 'failed', 'the daemon stopped while starting its container');
    } else if (c.expiresAt <= o.now) {
      endClaim(c.id, 'expired', `expired at ${new Date(c.expiresAt).toISOString()}`);
    }
  }
  // A row still marked claimed whose claim ended elsewhere (another process) is released too.
  for (const m of o.members) {
    if (state.get(m.slot) === 'claimed' && (!m.claimId || !openClaims.has(m.claimId))) state.set(m.slot, 'releasing');
  }

  // One container per slot: the one the store recorded, else a running one, else the oldest.
  const bySlot = new Map<string, ObservedContainer>();
  const rank = (c: ObservedContainer) =>
    (members.get(c.slot)?.containerId === c.id ? 0 : 2) + (c.state === 'running' ? 0 : 1);
  for (const c of [...o.containers].sort((a, b) => rank(a) - rank(b) || a.createdAt - b.createdAt || a.id.localeCompare(b.id))) {
    if (bySlot.has(c.slot)) remove(c, 'duplicate');
    else bySlot.set(c.slot, c);
  }

  const fresh: WarmOne[] = [];
  const candidates: WarmOne[] = [];
  const releasing: ObservedContainer[] = [];
  let starting = 0;
  let claimed = 0;

  const classifyWarm = (slot: string, c: ObservedContainer, since: number) => {
    const stale = c.specHash !== d.specHash;
    const idle = d.idleTimeoutMs !== undefined && o.now - since > d.idleTimeoutMs;
    if (stale || idle) candidates.push({ slot, container: c, since, reason: stale ? 'stale' : 'idle' });
    else fresh.push({ slot, container: c, since });
  };

  for (const [slot, c] of bySlot) {
    const m = members.get(slot);
    if (!m) {
      if (o.inFlight.has(slot)) {
        starting++;
        continue;
      }
      if (!alive(c) || c.claim !== undefined) {
        remove(c, 'untracked');
        continue;
      }
      const member: PoolMember = {
        slot,
        pool: d.name,
        engine: spec.engine,
        containerId: c.id,
        name: c.name,
        address: c.address,
        ports: c.ports ?? null,
        specHash: c.specHash,
        state: ready(c) ? 'warm' : 'starting',
        claimId: null,
        createdAt: c.createdAt,
        readyAt: ready(c) ? c.createdAt : null,
      };
      actions.push({ type: 'adopt', member });
      if (ready(c)) classifyWarm(slot, c, c.createdAt);
      else starting++;
      continue;
    }
    const st = state.get(slot)!;
    const inFlight = o.inFlight.has(slot);
    if (!alive(c) && !inFlight) {
      remove(c, c.health === 'unhealthy' ? 'unhealthy' : 'exited');
      if (st === 'claimed' && m.claimId) endClaim(m.claimId, 'failed', `its container ${c.name} is ${c.state}${c.exitCode !== undefined ? ` (exit ${c.exitCode})` : ''}${c.health === 'unhealthy' ? ' and unhealthy' : ''}`);
      continue;
    }
    if (st === 'releasing') {
      releasing.push(c);
      continue;
    }
    if (st === 'claimed' || (st === 'starting' && m.claimId)) {
      claimed++;
      continue;
    }
    if (st === 'starting') {
      if (inFlight || !ready(c)) {
        starting++;
        continue;
      }
      actions.push({ type: 'promote', slot, containerId: c.id, address: c.address, ...(c.ports ? { ports: c.ports } : {}) });
    } else if (m.containerId !== c.id || m.address !== c.address || !samePorts(m.ports, c.ports)) {
      // Recorded under another id or address (a recycle that restarted it, or a crash mid-record).
      actions.push({ type: 'promote', slot, containerId: c.id, address: c.address, ...(c.ports ? { ports: c.ports } : {}) });
    }
    classifyWarm(slot, c, m.readyAt ?? c.createdAt);
  }
  for (const m of o.members) {
    if (bySlot.has(m.slot)) continue;
    if (o.inFlight.has(m.slot)) {
      if (m.claimId) claimed++;
      else starting++;
      continue;
    }
    const st = state.get(m.slot);
    const what = m.containerId ? `container ${m.name} is gone` : 'its start did not finish';
    actions.push({ type: 'forget', slot: m.slot, reason: what });
    if (st === 'claimed' && m.claimId) endClaim(m.claimId, 'failed', what);
  }

  // Released containers: recycled while the pool needs warm ones, else removed.
  let recycle = 0;
  for (const c of releasing.sort((a, b) => a.createdAt - b.createdAt)) {
    const needed = spec.size - fresh.length - starting - recycle > 0;
    // A container started for a claim carries that claim's label for good: it is not recycled.
    if (spec.claim.onRelease === 'recycle' && c.specHash === d.specHash && c.claim === undefined && ready(c) && needed) {
      actions.push({ type: 'recycle', container: c, slot: c.slot });
      recycle++;
    } else remove(c, 'released');
  }

  // Roll stale and idle warm containers, oldest first, keeping size - 1 warm.
  candidates.sort((a, b) => (a.reason === b.reason ? 0 : a.reason === 'stale' ? -1 : 1) || a.since - b.since);
  fresh.sort((a, b) => a.since - b.since);
  const supply = fresh.length + starting + recycle;
  const wantStarts = Math.max(0, spec.size - supply);
  const floor = Math.max(0, spec.size - 1);
  let replace = Math.min(candidates.length, Math.max(0, fresh.length + candidates.length - floor));
  const remaining = () => fresh.length + candidates.length + starting + claimed + recycle;
  if (replace === 0 && candidates.length > 0 && starting === 0 && remaining() >= spec.maxSize) {
    // No room to start a replacement first (claims fill maxSize): one at a time, or never.
    replace = 1;
  }
  for (const w of candidates.splice(0, replace)) remove(w.container, w.reason!);
  // Warm beyond size (size lowered): the oldest go, stale ones first.
  let excess = Math.max(0, fresh.length + candidates.length - spec.size);
  for (const w of candidates.splice(0, Math.min(excess, candidates.length))) {
    remove(w.container, w.reason!);
    excess--;
  }
  for (const w of fresh.splice(0, excess)) remove(w.container, 'excess');
  // Anything unclaimed beyond maxSize (maxSize lowered): warm ones go; claimed ones stay.
  let over = remaining() - spec.maxSize;
  for (const list of [candidates, fresh]) {
    while (over > 0 && list.length > 0) {
      const w = list.shift()!;
      remove(w.container, w.reason ?? 'excess');
      over--;
    }
  }
  const starts = Math.min(wantStarts, Math.max(0, spec.maxSize - remaining()));
  for (let i = 0; i < starts; i++) actions.push({ type: 'start' });
  return [...actions, ...removals];
}

/** Owned containers whose pool no longer exists (removed while the daemon was down, or a lost row). */
export function planOrphans(pools: ReadonlySet<string>, containers: ObservedContainer[]): ObservedContainer[] {
  return containers.filter((c) => !pools.has(c.pool));
}
