import { createHash } from 'node:crypto';
import type { DriftPolicy } from '../../runtime/convergence-machine.js';
import type { ClaimRecord, PoolMember } from '../../state/pools.js';
import type { StoredResource } from '../../state/types.js';
import { canonicalJson } from '../../util/canonical-json.js';
import { parseDuration } from '../../util/duration.js';
import type { ContainerResources, EngineName, ObservedContainer, PortSpec } from './engine.js';

/** WarmPool spec after CRD defaults. */
export interface WarmPoolSpec {
  provider: string;
  engine: EngineName;
  image?: string;
  command?: string[];
  args?: string[];
  ports?: PortSpec[];
  size: number;
  maxSize: number;
  resources?: ContainerResources;
  idleResources?: { cpuMHz?: number; memoryMB?: number };
  env?: Record<string, string>;
  idleTimeout?: string;
  claim: { ttl: string; maxPerUser: number; onRelease: 'destroy' | 'recycle'; workspaceDir: string };
  driftPolicy: DriftPolicy;
}

export interface WarmPoolDesired {
  name: string;
  spec: WarmPoolSpec;
  /** Digest of what a container is made of (image, command, env, resources): a change rolls warm containers. */
  specHash: string;
  idleTimeoutMs: number | undefined;
  claimTtlMs: number;
}

export interface WarmPoolObserved {
  /** Epoch ms of the observation. */
  now: number;
  /** This pool's containers as the engine reports them. */
  containers: ObservedContainer[];
  /** This pool's rows in the store. */
  members: PoolMember[];
  /** Open (pending or bound) claims on this pool. */
  claims: ClaimRecord[];
  /** Slots this process is starting right now (refills and cold claims). */
  inFlight: ReadonlySet<string>;
}

export type RemoveReason =
  | 'exited'
  | 'unhealthy'
  | 'stale'
  | 'idle'
  | 'excess'
  | 'released'
  | 'untracked'
  | 'duplicate';

export type WarmPoolAction =
  | { type: 'start' }
  | { type: 'remove'; containerId: string; name: string; slot: string; reason: RemoveReason }
  | { type: 'recycle'; container: ObservedContainer; slot: string }
  | { type: 'adopt'; member: PoolMember }
  | { type: 'promote'; slot: string; containerId: string; address: string; ports?: Record<string, number> }
  | { type: 'forget'; slot: string; reason: string }
  | { type: 'endClaim'; claimId: string; state: 'expired' | 'failed'; reason: string };

export function warmPoolDesired(resource: StoredResource): WarmPoolDesired {
  const spec = resource.spec as unknown as WarmPoolSpec;
  return {
    name: resource.metadata.name,
    spec,
    specHash: specHashOf(spec),
    idleTimeoutMs: spec.idleTimeout ? parseDuration(spec.idleTimeout) : undefined,
    claimTtlMs: parseDuration(spec.claim.ttl),
  };
}

/** What a container is made of. Size, timeouts and claim settings are not: changing them rolls nothing. */
export function specHashOf(spec: WarmPoolSpec): string {
  const made = {
    engine: spec.engine,
    image: spec.image,
    command: spec.command,
    args: spec.args,
    ports: spec.ports,
    env: spec.env,
    resources: spec.resources,
    idleResources: spec.idleResources,
  };
  return createHash('sha256').update(canonicalJson(made)).digest('hex').slice(0, 12);
}

/** The resources a warm (unclaimed) container runs with. */
export function idleResourcesOf(spec: WarmPoolSpec): ContainerResources {
  if (!spec.idleResources) return spec.resources ?? {};
  return { ...spec.resources, ...spec.idleResources, memoryMaxMB: spec.idleResources.memoryMB ?? spec.resources?.memoryMaxMB };
}

export function describeAction(a: WarmPoolAction): string {
  switch (a.type) {
    case 'start':
      return 'start a warm container';
    case 'remove':
      return `remove container ${a.name} (${a.reason})`;
    case 'recycle':
      return `recycle container ${a.container.name} into the warm pool`;
    case 'adopt':
      return `adopt container ${a.member.name} (${a.member.state})`;
    case 'promote':
      return `mark container of slot ${a.slot} warm`;
    case 'forget':
      return `forget slot ${a.slot} (${a.reason})`;
    case 'endClaim':
      return `end claim ${a.claimId} (${a.state}: ${a.reason})`;
  }
}

/**
 * Whether a plan repairs something nobody asked for. Starts (refills after claims), ended claims,
 * released, rolled, idle and excess containers are the pool's own work; a container that died,
 * a row whose container vanished, or an owned container nobody recorded is drift.
 */
export function isDriftAction(a: WarmPoolAction): boolean {
  switch (a.type) {
    case 'remove':
      return a.reason === 'exited' || a.reason === 'unhealthy' || a.reason === 'untracked' || a.reason === 'duplicate';
    case 'adopt':
    case 'forget':
      return true;
    default:
      return false;
  }
}
