// The contract between the WarmPool controller and whatever runs its containers (Docker,
// local processes, Nomad). The controller plans in these terms only; each driver in
// src/drivers/ maps them onto its outside system.

/** Labels (Docker labels, process environment, Nomad job meta) that mark what the daemon owns. */
export const LABELS = {
  managedBy: 'polydev.ai/managed-by',
  /** The installation (one state database) that owns the container: two daemons sharing an engine never touch each other's. */
  owner: 'polydev.ai/owner',
  pool: 'polydev.ai/pool',
  provider: 'polydev.ai/provider',
  specHash: 'polydev.ai/spec-hash',
  /** The daemon's own id for the container, chosen before it exists, so a crash between create and record is adoptable. */
  slot: 'polydev.ai/slot',
  /** Set on containers started for a claim (cold starts): Docker cannot add a label to an existing container. */
  claim: 'polydev.ai/claim',
} as const;

export const MANAGED_BY = 'polydev-reconciler';

/** Where credentials land inside a container: a tmpfs, mode 0700, files 0600. */
export const SECRETS_DIR = '/run/polydev';

export type EngineName = 'docker' | 'process' | 'nomad';

export interface ContainerResources {
  cpuMHz?: number;
  memoryMB?: number;
  memoryMaxMB?: number;
  devices?: Array<{ name: string; count: number }>;
}

export interface PortSpec {
  name: string;
  containerPort: number;
}

/** Everything an engine needs to start one container of a pool. */
export interface ContainerSpec {
  pool: string;
  provider: string;
  /** The daemon's id for this container (see LABELS.slot). */
  slot: string;
  /** Engine-level name: unique per owner, derived from pool and slot. */
  name: string;
  image?: string;
  command?: string[];
  args?: string[];
  env: Record<string, string>;
  resources: ContainerResources;
  /** Named ports the container listens on (Nomad maps each to a dynamic host port). */
  ports?: PortSpec[];
  specHash: string;
  /** Every ownership label, already filled in (managed-by, owner, pool, provider, spec-hash, slot, claim). */
  labels: Record<string, string>;
}

/** The ownership labels of a container (Docker labels, Nomad meta): the fixed ones, then spec.labels. */
export function ownershipLabels(spec: ContainerSpec): Record<string, string> {
  return {
    [LABELS.managedBy]: MANAGED_BY,
    [LABELS.pool]: spec.pool,
    [LABELS.provider]: spec.provider,
    [LABELS.slot]: spec.slot,
    [LABELS.specHash]: spec.specHash,
    ...spec.labels,
  };
}

export type ContainerState = 'created' | 'running' | 'restarting' | 'paused' | 'exited' | 'dead' | 'removing';
export type ContainerHealth = 'starting' | 'healthy' | 'unhealthy';

/** One container as the engine reports it, ownership read back from its labels. */
export interface ObservedContainer {
  /** Engine id: Docker container id, `pid:<pid>:<starttime>` for processes, Nomad job id. */
  id: string;
  name: string;
  pool: string;
  slot: string;
  specHash: string;
  /** LABELS.claim, when the container was started for a claim. */
  claim?: string;
  state: ContainerState;
  /** Only when the image or job defines a health check. */
  health?: ContainerHealth;
  /** Epoch ms. */
  createdAt: number;
  exitCode?: number;
  /** Where the platform reaches it: an IP, host:port, or `container:<name>` without a network. */
  address: string;
  /** Port name → port on `address`, when the engine maps ports (Nomad's dynamic ports). */
  ports?: Record<string, number>;
}

export type EngineFailure = 'ImageNotFound' | 'StartFailed' | 'AllocationFailed' | 'EngineUnavailable' | 'EngineError';

/** A failure with a reason a condition can carry (ImageNotFound, StartFailed, AllocationFailed, EngineUnavailable). */
export class EngineError extends Error {
  constructor(
    readonly reason: EngineFailure,
    message: string,
  ) {
    super(message);
    this.name = 'EngineError';
  }
}

/** Credentials for a claimed container. Never logged, evented or stored. */
export interface Injection {
  env?: Record<string, string>;
  /** Relative path under SECRETS_DIR/files → content. */
  files?: Record<string, string>;
}

export interface EngineEvent {
  id: string;
  pool: string;
  /** die/oom/destroy: gone or going; start; health: health status changed. */
  type: 'start' | 'die' | 'destroy' | 'health';
  /** Epoch ms at which the engine saw it, when the engine says. */
  at?: number;
}

export interface Engine {
  readonly name: EngineName;
  /** Throws EngineError('EngineUnavailable') when the engine cannot be reached. */
  ping(): Promise<void>;
  /** Every container carrying LABELS.owner = owner, of every pool, running or not. */
  list(owner: string): Promise<ObservedContainer[]>;
  /** Creates and starts one container; resolves when it runs. ImageNotFound / StartFailed / EngineUnavailable on failure. */
  start(spec: ContainerSpec): Promise<ObservedContainer>;
  /** Stops and removes; a container that is already gone is not an error. */
  remove(id: string): Promise<void>;
  /** Writes env (as SECRETS_DIR/env) and files (SECRETS_DIR/files/…) into a running container, mode 0600. */
  inject(id: string, injection: Injection): Promise<void>;
  /** Wipes SECRETS_DIR and workspaceDir and restarts the container's processes; returns the (possibly new) container. */
  recycle(container: ObservedContainer, workspaceDir: string): Promise<ObservedContainer>;
  /** Raises (or lowers) a running container's limits: idleResources → resources when claimed. */
  update?(id: string, resources: ContainerResources): Promise<void>;
  /** Best-effort display name change (Docker rename), used to show claimed containers; may be a no-op. */
  rename?(id: string, name: string): Promise<void>;
  /**
   * Follows the engine's events for this owner until the returned function is called; reconnects
   * by itself. onError hears once per outage (not on every failed retry); onResumed when the
   * stream is back after one (events may have been missed meanwhile).
   */
  watch(owner: string, onEvent: (e: EngineEvent) => void, onError?: (err: Error) => void, onResumed?: () => void): () => void;
  close?(): Promise<void>;
}
