// WarmPool engine `nomad`: one Nomad job per warm container.
//
// Why one job per container rather than one job per pool with a Count: Nomad chooses which
// allocations a Count decrease stops, and a job update may replace any of them, so a claimed
// container could be killed by scaling or rolling. With one job per container the daemon
// decides exactly which container goes (it deregisters that job and no other), a claim binds
// to the single allocation of its job, and the job carries the same ownership meta as a
// Docker container carries labels. Restarts and reschedules are off: a dead container is
// replaced by the daemon, never silently moved elsewhere under a user's claim. Nomad still
// replaces a LOST allocation (node down or drained) whatever the ReschedulePolicy; the engine
// takes the job's first allocation for the container, so such a replacement reads as the
// container being dead (its claim fails, the pool refills), never as the container.
//
// Cost: a steady-state resync is one `GET /v1/jobs?prefix=` (paged) while the event stream is
// up: allocations are cached and kept current by the stream, and re-read only for jobs whose
// ModifyIndex moved or when the stream was down.

import { EngineError, LABELS, MANAGED_BY, SECRETS_DIR, ownershipLabels } from '../controllers/warmpool/engine.js';
import type {
  ContainerResources,
  ContainerSpec,
  Engine,
  EngineEvent,
  EngineName,
  Injection,
  ObservedContainer,
} from '../controllers/warmpool/engine.js';
import { mapSettled } from '../util/concurrency.js';
import { RECYCLE_SCRIPT, WRITE_FILE_SCRIPT, injectedFilePath, renderEnvFile } from './docker.js';
import {
  NomadError,
  oneLine,
  type NomadAllocStub,
  type NomadAllocation,
  type NomadClient,
  type NomadEvent,
  type NomadJob,
  type NomadJobStub,
  type NomadTaskEvent,
} from './nomad.js';

export const NOMAD_GROUP = 'warm';
export const NOMAD_TASK = 'runtime';
const NS_PER_MS = 1_000_000;
const SECRETS_TMPFS_BYTES = 16 * 1024 * 1024;

export interface NomadEngineOptions {
  client: NomadClient;
  /** Datacenters of rendered jobs (Nomad 1.6+ accepts "*"). */
  datacenters: string[];
  /** How long start() waits for the allocation to run before giving up (default 120 s). */
  startTimeoutMs?: number;
  /** Allocation reads in flight at once while the cache is cold (default 8). */
  parallelism?: number;
}

/** Nomad job id of a container: owner first, so one prefix lists an installation's jobs. */
export function nomadJobId(owner: string, pool: string, slot: string): string {
  return `${nomadJobPrefix(owner)}${pool}-${slot}`;
}

export function nomadJobPrefix(owner: string): string {
  return `polydev-${owner}-`;
}

/**
 * The pool in a job id of this installation (`<prefix><pool>-<slot>`, slots are hex). Allocation
 * events carry no job (nomad/state/events.go sets `Allocation.Job = nil`, Nomad 1.7.3), so for a
 * job not in the cache the id is all there is.
 */
export function poolOfJobId(jobId: string, prefix: string): string | undefined {
  if (!jobId.startsWith(prefix)) return undefined;
  const m = /^(.+)-[0-9a-f]+$/.exec(jobId.slice(prefix.length));
  return m?.[1];
}

function ownerOf(spec: ContainerSpec): string {
  const owner = spec.labels[LABELS.owner];
  if (!owner) throw new EngineError('StartFailed', `container ${spec.name}: no ${LABELS.owner} label`);
  return owner;
}

/** The job registered for one container (pure; `plan` prints it). */
export function renderNomadJob(spec: ContainerSpec, opts: { datacenters: string[] }): NomadJob {
  if (!spec.image) throw new EngineError('StartFailed', `container ${spec.name}: the nomad engine needs an image (pool ${spec.pool})`);
  const meta = ownershipLabels(spec);
  const ports = spec.ports ?? [];
  const config: Record<string, unknown> = {
    image: spec.image,
    // The docker driver declares labels `list(map(string))` (drivers/docker/config.go, Nomad 1.7.3):
    // an object here registers fine and then fails every allocation on the client.
    labels: [{ ...meta }],
    // The secrets directory is a tmpfs, as on the docker engine: credentials never touch disk.
    mount: [{ type: 'tmpfs', target: SECRETS_DIR, readonly: false, tmpfs_options: { size: SECRETS_TMPFS_BYTES, mode: 0o700 } }],
  };
  if (spec.command && spec.command.length) config.entrypoint = spec.command;
  if (spec.args && spec.args.length) config.args = spec.args;
  if (ports.length) config.ports = ports.map((p) => p.name);
  return {
    ID: nomadJobId(ownerOf(spec), spec.pool, spec.slot),
    Name: spec.name,
    Type: 'service',
    Datacenters: opts.datacenters,
    Priority: 50,
    Meta: meta,
    TaskGroups: [
      {
        Name: NOMAD_GROUP,
        Count: 1,
        Meta: meta,
        // The daemon replaces dead containers itself; Nomad must not restart or move one under a claim.
        RestartPolicy: { Attempts: 0, Mode: 'fail', Interval: 60_000 * NS_PER_MS, Delay: 0 },
        ReschedulePolicy: { Attempts: 0, Unlimited: false },
        Networks: ports.length ? [{ DynamicPorts: ports.map((p) => ({ Label: p.name, To: p.containerPort })) }] : [],
        Tasks: [
          {
            Name: NOMAD_TASK,
            Driver: 'docker',
            Config: config,
            Env: { ...spec.env },
            Meta: meta,
            Resources: nomadResources(spec.resources),
            KillTimeout: 5_000 * NS_PER_MS,
          },
        ],
      },
    ],
  };
}

/** 1 MHz = Nomad's CPU unit; memory in MB; `vendor/type` devices as Nomad device requests. */
export function nomadResources(r: ContainerResources): NonNullable<NomadJob['TaskGroups'][number]['Tasks'][number]['Resources']> {
  const out: NonNullable<NomadJob['TaskGroups'][number]['Tasks'][number]['Resources']> = {
    CPU: r.cpuMHz ?? 100,
    MemoryMB: r.memoryMB ?? r.memoryMaxMB ?? 300,
  };
  // MemoryMaxMB needs memory oversubscription enabled in Nomad's scheduler configuration.
  if (r.memoryMaxMB !== undefined && r.memoryMB !== undefined && r.memoryMaxMB > r.memoryMB) out.MemoryMaxMB = r.memoryMaxMB;
  if (r.devices?.length) out.Devices = r.devices.map((d) => ({ Name: d.name, Count: d.count }));
  return out;
}

// ---------------------------------------------------------------------------------------
// Reading jobs and allocations back (pure).

interface AllocView {
  id: string;
  modifyIndex: number;
  createIndex: number;
  desired: string;
  client: string;
  taskState: string | undefined;
  restarts: number;
  events: NomadTaskEvent[];
  address?: string;
  ports?: Record<string, number>;
  nodeName: string;
  /** Set when Nomad placed a replacement of this allocation (NextAllocation). */
  next?: string;
  /** Set when this allocation replaces another (PreviousAllocation; full allocations only). */
  previous?: string;
}

export function allocView(a: NomadAllocStub | NomadAllocation): AllocView {
  const task = a.TaskStates?.[NOMAD_TASK];
  const view: AllocView = {
    id: a.ID,
    modifyIndex: a.ModifyIndex,
    createIndex: a.CreateIndex,
    desired: a.DesiredStatus,
    client: a.ClientStatus,
    taskState: task?.State,
    restarts: task?.Restarts ?? 0,
    events: task?.Events ?? [],
    nodeName: a.NodeName,
  };
  if (typeof a.NextAllocation === 'string' && a.NextAllocation) view.next = a.NextAllocation;
  if (typeof a.PreviousAllocation === 'string' && a.PreviousAllocation) view.previous = a.PreviousAllocation;
  const net = networkOf(a as NomadAllocation);
  if (net) {
    view.address = net.address;
    view.ports = net.ports;
  }
  return view;
}

function networkOf(a: NomadAllocation): { address: string; ports: Record<string, number> } | undefined {
  const shared = a.AllocatedResources?.Shared;
  if (!shared) return undefined;
  const ports: Record<string, number> = {};
  let address: string | undefined;
  for (const p of shared.Ports ?? []) {
    ports[p.Label] = p.Value;
    address ??= p.HostIP;
  }
  for (const n of shared.Networks ?? []) {
    address ??= n.IP;
    for (const p of [...(n.DynamicPorts ?? []), ...(n.ReservedPorts ?? [])]) if (p.Value !== undefined) ports[p.Label] ??= p.Value;
  }
  return address ? { address, ports } : undefined;
}

/**
 * Nomad's own words for why a task failed: the newest validation, setup or driver error (a
 * Config the client could not decode, a failed pull…), else the last failing event.
 */
export function failureReason(events: NomadTaskEvent[], client: string): string {
  for (let i = events.length - 1; i >= 0; i--) {
    const e = events[i]!;
    const why = e.ValidationError || e.SetupError || e.DriverError;
    if (why) return oneLine(why);
  }
  for (let i = events.length - 1; i >= 0; i--) {
    const e = events[i]!;
    if (e.Type === 'Terminated') return `${e.DisplayMessage ?? 'terminated'}${e.ExitCode !== undefined ? ` (exit code ${e.ExitCode})` : ''}`;
    if (e.FailsTask || e.Type === 'Setup Failure' || e.Type === 'Killed') return e.DisplayMessage ?? e.Message ?? e.Type;
  }
  return `allocation is ${client}`;
}

function exitCodeOf(events: NomadTaskEvent[]): number | undefined {
  for (let i = events.length - 1; i >= 0; i--) if (events[i]!.Type === 'Terminated') return events[i]!.ExitCode;
  return undefined;
}

/**
 * The allocation that is the container: the job's first. Nomad replaces a lost allocation (its
 * node went down or was drained) whatever the ReschedulePolicy (scheduler/reconcile.go, Nomad
 * 1.7.3); the replacement is a new container on another node, at another address, without the
 * credentials injected into the first, so it is never taken for the container.
 */
function containerAlloc(allocs: Iterable<AllocView>): AllocView | undefined {
  let first: AllocView | undefined;
  for (const a of allocs) if (!first || a.createIndex < first.createIndex) first = a;
  return first;
}

/** Whether Nomad has replaced the container's allocation with one of its own making. */
function replaced(first: AllocView, allocs: Iterable<AllocView>): boolean {
  if (first.client === 'lost' || first.next || first.previous) return true;
  for (const a of allocs) if (a.id !== first.id) return true;
  return false;
}

/**
 * A job and its allocations as the container the controller reasons about. Nomad's pending
 * (placed, pulling, starting) reads as running-but-starting so it is neither counted warm nor
 * removed; a job nobody could place within the start timeout reads as unhealthy.
 */
export function observeNomadJob(
  job: { ID: string; Name?: string; Meta?: Record<string, string> | null; Stop?: boolean; Status?: string; SubmitTime?: number },
  allocs: Iterable<AllocView>,
  now: number,
  startTimeoutMs: number,
): ObservedContainer | undefined {
  const meta = job.Meta ?? {};
  const pool = meta[LABELS.pool];
  const slot = meta[LABELS.slot];
  if (!pool || !slot) return undefined;
  const createdAt = job.SubmitTime ? Math.floor(job.SubmitTime / NS_PER_MS) : now;
  const all = [...allocs];
  const a = containerAlloc(all);
  const base = {
    id: job.ID,
    name: job.Name ?? job.ID,
    pool,
    slot,
    specHash: meta[LABELS.specHash] ?? '',
    createdAt,
    address: a?.address ?? (a ? `nomad-node:${a.nodeName}` : ''),
  };
  const c: ObservedContainer = { ...base, state: 'running' };
  if (meta[LABELS.claim]) c.claim = meta[LABELS.claim];
  if (a?.ports && Object.keys(a.ports).length) c.ports = a.ports;
  const late = now - createdAt > startTimeoutMs;
  if (job.Stop || !a) {
    if (job.Stop || job.Status === 'dead') c.state = 'exited';
    else c.health = late ? 'unhealthy' : 'starting';
    return c;
  }
  if (replaced(a, all)) {
    c.state = 'dead';
  } else if (a.desired !== 'run') {
    c.state = 'exited';
  } else if (a.client === 'running' && (a.taskState === undefined || a.taskState === 'running')) {
    // running
  } else if (a.client === 'pending' || (a.client === 'running' && a.taskState === 'pending')) {
    c.health = late ? 'unhealthy' : 'starting';
  } else {
    c.state = a.client === 'complete' ? 'exited' : 'dead';
    const code = exitCodeOf(a.events);
    if (code !== undefined) c.exitCode = code;
  }
  return c;
}

function ownedBy(meta: Record<string, string> | null | undefined, owner: string): boolean {
  return !!meta && meta[LABELS.managedBy] === MANAGED_BY && meta[LABELS.owner] === owner;
}

// ---------------------------------------------------------------------------------------

interface CachedJob {
  stub: Pick<NomadJobStub, 'ID' | 'Name' | 'Meta' | 'Stop' | 'Status' | 'SubmitTime' | 'ModifyIndex'>;
  allocs: Map<string, AllocView>;
}

/** The namespace capability an engine call needs, for the message of a refusal. */
function capabilityOf(what: string): string {
  if (what.startsWith('restarting')) return 'recycle needs alloc-lifecycle';
  if (what.startsWith('registering') || what.startsWith('deregistering')) return 'needs submit-job';
  if (what.startsWith('listing')) return 'needs list-jobs';
  if (/^(writing|wiping)/.test(what) || what.includes(' in job ')) return 'needs alloc-exec';
  return 'needs read-job';
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export class NomadEngine implements Engine {
  readonly name: EngineName = 'nomad';
  readonly client: NomadClient;
  private readonly datacenters: string[];
  private readonly startTimeoutMs: number;
  private readonly parallelism: number;
  private readonly cache = new Map<string, CachedJob>();
  /** Watches whose event stream is delivering; while one is, cached allocations are current. */
  private liveStreams = 0;
  private readonly stops = new Set<() => void>();

  constructor(opts: NomadEngineOptions) {
    this.client = opts.client;
    this.datacenters = opts.datacenters;
    this.startTimeoutMs = opts.startTimeoutMs ?? 120_000;
    this.parallelism = opts.parallelism ?? 8;
  }

  private fail(err: unknown, what: string): EngineError {
    if (err instanceof EngineError) return err;
    if (err instanceof NomadError) {
      if (err.code === 'Unavailable' || err.code === 'Timeout' || err.code === 'ServerError') {
        return new EngineError('EngineUnavailable', `Nomad: ${what}: ${err.message}`);
      }
      if (err.code === 'Invalid') return new EngineError('StartFailed', `Nomad: ${what}: ${err.message}`);
      if (err.code === 'Forbidden') {
        return new EngineError('EngineError', `Nomad refused ${what} (permission denied): check the ACL token and its namespace policy (${capabilityOf(what)}): ${err.message}`);
      }
      return new EngineError('EngineError', `Nomad: ${what}: ${err.message}`);
    }
    return new EngineError('EngineError', `Nomad: ${what}: ${err instanceof Error ? err.message : String(err)}`);
  }

  async ping(): Promise<void> {
    try {
      await this.client.listJobs('polydev-ping-', { perPage: 1 });
    } catch (err) {
      throw this.fail(err, 'listing jobs');
    }
  }

  async list(owner: string): Promise<ObservedContainer[]> {
    let stubs: NomadJobStub[];
    try {
      stubs = (await this.client.listJobs(nomadJobPrefix(owner), { meta: true, perPage: 500 })).items;
    } catch (err) {
      throw this.fail(err, `listing jobs of owner ${owner}`);
    }
    const trusted = this.liveStreams > 0;
    const mine = stubs.filter((s) => ownedBy(s.Meta, owner));
    const stale = mine.filter((s) => {
      const c = this.cache.get(s.ID);
      return !trusted || !c || c.stub.ModifyIndex !== s.ModifyIndex;
    });
    const results = await mapSettled(stale, this.parallelism, (s) => this.refresh(s));
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw this.fail(failed.reason, 'reading allocations');
    const seen = new Set(mine.map((s) => s.ID));
    for (const id of this.cache.keys()) if (id.startsWith(nomadJobPrefix(owner)) && !seen.has(id)) this.cache.delete(id);
    const now = Date.now();
    const out: ObservedContainer[] = [];
    for (const s of mine) {
      const cached = this.cache.get(s.ID);
      if (!cached) continue;
      cached.stub = s;
      const c = observeNomadJob(s, cached.allocs.values(), now, this.startTimeoutMs);
      if (c) out.push(c);
    }
    return out;
  }

  /** Re-reads a job's allocations (and each new running one's ports) into the cache. */
  private async refresh(stub: CachedJob['stub']): Promise<CachedJob> {
    const { items } = await this.client.jobAllocations(stub.ID);
    const prev = this.cache.get(stub.ID);
    const allocs = new Map<string, AllocView>();
    for (const a of items) {
      const v = allocView(a);
      const old = prev?.allocs.get(a.ID);
      if (!v.address && old?.address) {
        v.address = old.address;
        if (old.ports) v.ports = old.ports;
      }
      // Stubs lack PreviousAllocation; a replacement whose lost predecessor Nomad already
      // garbage-collected is known by it, from the full allocation.
      if (old?.previous) v.previous = old.previous;
      if (!v.address && a.ClientStatus === 'running' && a.DesiredStatus === 'run') {
        const full = allocView(await this.client.readAllocation(a.ID));
        if (full.address) v.address = full.address;
        if (full.ports) v.ports = full.ports;
        if (full.previous) v.previous = full.previous;
      }
      allocs.set(a.ID, v);
    }
    const entry: CachedJob = { stub, allocs };
    this.cache.set(stub.ID, entry);
    return entry;
  }

  async start(spec: ContainerSpec): Promise<ObservedContainer> {
    const job = renderNomadJob(spec, { datacenters: this.datacenters });
    let submitted = Date.now();
    try {
      // Check-and-set: only create. A job of this id already there is a retry after a crash: adopt it.
      await this.client.registerJob(job, { enforceIndex: 0 });
    } catch (err) {
      if (!(err instanceof NomadError && err.code === 'Conflict')) throw this.fail(err, `registering job ${job.ID}`);
      let existing: NomadJob;
      try {
        existing = await this.client.readJob(job.ID);
      } catch (e) {
        throw this.fail(e, `reading job ${job.ID}`);
      }
      if (existing.Meta?.[LABELS.slot] !== spec.slot || existing.Meta?.[LABELS.owner] !== spec.labels[LABELS.owner]) {
        throw new EngineError('EngineError', `Nomad job ${job.ID} exists and is not slot ${spec.slot} of this installation`);
      }
      if (existing.SubmitTime) submitted = Math.floor(existing.SubmitTime / NS_PER_MS);
    }
    return this.awaitRunning(job, submitted);
  }

  /** Blocks on the job's allocations until one runs, fails, or the start timeout passes. */
  private async awaitRunning(job: NomadJob, submitted: number): Promise<ObservedContainer> {
    const deadline = submitted + this.startTimeoutMs;
    let index = 0;
    for (let round = 0; round < 10_000; round++) {
      const left = deadline - Date.now();
      if (left <= 0) break;
      let items: NomadAllocStub[];
      try {
        const r = await this.client.jobAllocations(job.ID, index ? { index, waitMs: Math.min(left, 5_000) } : {});
        items = r.items;
        index = Math.max(index, r.meta.index);
      } catch (err) {
        throw this.fail(err, `waiting for the allocation of job ${job.ID}`);
      }
      const views = items.map(allocView);
      const a = containerAlloc(views);
      if (a && a.desired === 'run' && a.client === 'running' && a.taskState !== 'pending') {
        const full = allocView(await this.readAllocation(a.id));
        const allocs = new Map(views.map((v) => [v.id, v]));
        allocs.set(full.id, full);
        const stub = { ID: job.ID, Name: job.Name ?? job.ID, Meta: job.Meta ?? null, Stop: false, Status: 'running', SubmitTime: submitted * NS_PER_MS, ModifyIndex: -1 };
        this.cache.set(job.ID, { stub, allocs });
        const c = observeNomadJob(stub, allocs.values(), Date.now(), this.startTimeoutMs);
        if (c) return c;
      }
      if (a && (a.client === 'failed' || a.client === 'lost' || a.client === 'complete')) {
        const why = failureReason(a.events, a.client);
        await this.removeQuietly(job.ID);
        throw new EngineError('AllocationFailed', `Nomad allocation ${a.id.slice(0, 8)} of job ${job.ID} ${a.client}: ${why}`);
      }
      if (!index) await sleep(50);
    }
    await this.removeQuietly(job.ID);
    throw new EngineError(
      'AllocationFailed',
      `Nomad job ${job.ID}: no allocation running within ${Math.round(this.startTimeoutMs / 1000)} s (not placed: no node with the requested resources or devices, or the image is still pulling); the job was deregistered`,
    );
  }

  private async readAllocation(id: string): Promise<NomadAllocation> {
    try {
      return await this.client.readAllocation(id);
    } catch (err) {
      throw this.fail(err, `reading allocation ${id}`);
    }
  }

  private async removeQuietly(id: string): Promise<void> {
    try {
      await this.remove(id);
    } catch {
      /* list() shows it again and the controller removes it */
    }
  }

  async remove(id: string): Promise<void> {
    try {
      await this.client.deregisterJob(id, { purge: true });
    } catch (err) {
      if (err instanceof NomadError && err.code === 'NotFound') return;
      throw this.fail(err, `deregistering job ${id}`);
    } finally {
      this.cache.delete(id);
    }
  }

  /** The running allocation behind a container (the job id), from the cache or Nomad. */
  private async runningAlloc(jobId: string, what: string): Promise<string> {
    const cached = this.cache.get(jobId);
    let views = cached ? [...cached.allocs.values()] : [];
    let a = containerAlloc(views);
    if (!a || a.client !== 'running' || a.desired !== 'run' || replaced(a, views)) {
      try {
        views = (await this.client.jobAllocations(jobId)).items.map(allocView);
        a = containerAlloc(views);
      } catch (err) {
        throw this.fail(err, `${what}: reading the allocations of job ${jobId}`);
      }
    }
    if (a && replaced(a, views)) {
      throw new EngineError('StartFailed', `${what}: the allocation of job ${jobId} was ${a.client === 'lost' ? 'lost (its node is down)' : 'replaced'} and Nomad placed another: the container is gone`);
    }
    if (!a || a.client !== 'running' || a.desired !== 'run') {
      throw new EngineError('StartFailed', `${what}: job ${jobId} has no running allocation`);
    }
    return a.id;
  }

  private async exec(jobId: string, allocId: string, argv: string[], stdin: string | undefined, what: string): Promise<void> {
    let r;
    try {
      r = await this.client.execAllocation(allocId, argv, { task: NOMAD_TASK, ...(stdin !== undefined ? { stdin } : {}) });
    } catch (err) {
      // Nomad's and the transport's messages never contain stdin (the content).
      throw this.fail(err, `${what} in job ${jobId}`);
    }
    if (r.exitCode !== 0) {
      throw new EngineError('EngineError', `${what} in job ${jobId} exited ${r.exitCode}: ${r.stderr.toString('utf8').slice(0, 200)}`);
    }
  }

  async inject(id: string, injection: Injection): Promise<void> {
    const envText = injection.env && Object.keys(injection.env).length ? renderEnvFile(injection.env) : undefined;
    const files = Object.entries(injection.files ?? {}).map(([rel, content]) => {
      if (typeof content !== 'string') throw new Error(`injection file ${JSON.stringify(rel)}: content is not a string`);
      return { path: injectedFilePath(rel), content };
    });
    const alloc = await this.runningAlloc(id, 'injection');
    if (envText !== undefined) await this.exec(id, alloc, ['sh', '-c', WRITE_FILE_SCRIPT, 'sh', `${SECRETS_DIR}/env`], envText, 'writing the env file');
    for (const f of files) await this.exec(id, alloc, ['sh', '-c', WRITE_FILE_SCRIPT, 'sh', f.path], f.content, `writing ${f.path}`);
  }

  async recycle(container: ObservedContainer, workspaceDir: string): Promise<ObservedContainer> {
    if (!workspaceDir.startsWith('/') || workspaceDir.replace(/\/+$/, '') === '' || workspaceDir.split('/').includes('..')) {
      throw new Error(`recycle of ${container.name}: workspace dir ${JSON.stringify(workspaceDir)} must be absolute, not / and without ..`);
    }
    const alloc = await this.runningAlloc(container.id, 'recycle');
    await this.exec(container.id, alloc, ['sh', '-c', RECYCLE_SCRIPT, 'sh', workspaceDir.replace(/\/+$/, '')], undefined, 'wiping the workspace');
    const before = allocView(await this.readAllocation(alloc)).restarts;
    try {
      await this.client.restartAllocation(alloc, NOMAD_TASK);
    } catch (err) {
      throw this.fail(err, `restarting allocation ${alloc}`);
    }
    const deadline = Date.now() + this.startTimeoutMs;
    for (let i = 0; i < 10_000 && Date.now() < deadline; i++) {
      const full = await this.readAllocation(alloc);
      const v = allocView(full);
      if (v.client === 'failed' || v.client === 'complete' || v.client === 'lost') {
        throw new EngineError('AllocationFailed', `recycle: allocation ${alloc.slice(0, 8)} of job ${container.id} ${v.client} after restart: ${failureReason(v.events, v.client)}`);
      }
      if (v.restarts > before && v.taskState === 'running') {
        const entry = this.cache.get(container.id);
        entry?.allocs.set(v.id, v);
        return { ...container, state: 'running', address: v.address ?? container.address, ...(v.ports ? { ports: v.ports } : {}) };
      }
      await sleep(Math.min(200, 20 * 2 ** i));
    }
    throw new EngineError('StartFailed', `recycle: allocation ${alloc.slice(0, 8)} of job ${container.id} did not run again within ${Math.round(this.startTimeoutMs / 1000)} s`);
  }

  watch(owner: string, onEvent: (e: EngineEvent) => void, onError?: (err: Error) => void, onResumed?: () => void): () => void {
    const prefix = nomadJobPrefix(owner);
    let live = false;
    let down = false;
    const setLive = (v: boolean): void => {
      if (v === live) return;
      live = v;
      this.liveStreams += v ? 1 : -1;
    };
    const delivering = (): void => {
      if (down) {
        down = false;
        onResumed?.();
      }
      setLive(true);
    };
    const stream = this.client.eventStream(
      ['Job', 'Allocation'],
      (batch) => {
        delivering();
        for (const e of batch.events) {
          const ev = this.apply(e, prefix);
          if (ev) onEvent(ev);
        }
      },
      {
        onHeartbeat: delivering,
        onError: (err) => {
          setLive(false);
          if (!down) {
            down = true;
            onError?.(this.fail(err, 'event stream'));
          }
        },
      },
    );
    const stop = (): void => {
      stream.stop();
      setLive(false);
      this.stops.delete(stop);
    };
    this.stops.add(stop);
    return stop;
  }

  /** Folds one event into the cache; the engine event it means for the controller, if any. */
  private apply(e: NomadEvent, prefix: string): EngineEvent | undefined {
    if (e.Topic === 'Allocation') {
      const a = e.Payload['Allocation'] as NomadAllocation | undefined;
      if (!a || typeof a.JobID !== 'string' || !a.JobID.startsWith(prefix)) return undefined;
      const entry = this.cache.get(a.JobID);
      const v = allocView(a);
      const old = entry?.allocs.get(a.ID);
      if (old && old.modifyIndex > v.modifyIndex) return undefined;
      if (!v.address && old?.address) {
        v.address = old.address;
        if (old.ports) v.ports = old.ports;
      }
      entry?.allocs.set(a.ID, v);
      const pool = entry?.stub.Meta?.[LABELS.pool] ?? poolOfJobId(a.JobID, prefix);
      if (!pool) return undefined;
      const at = typeof a.ModifyTime === 'number' ? Math.floor(a.ModifyTime / NS_PER_MS) : undefined;
      const first = entry ? containerAlloc(entry.allocs.values()) : undefined;
      const replacement = !!v.previous || (first !== undefined && first.id !== v.id);
      const type = replacement || v.desired !== 'run' || ['failed', 'complete', 'lost'].includes(v.client) ? 'die' : v.client === 'running' ? 'start' : undefined;
      if (!type) return undefined;
      return { id: a.JobID, pool, type, ...(at !== undefined ? { at } : {}) };
    }
    if (e.Topic === 'Job' && e.Key.startsWith(prefix)) {
      const entry = this.cache.get(e.Key);
      const pool = entry?.stub.Meta?.[LABELS.pool] ?? ((e.Payload['Job'] as NomadJob | undefined)?.Meta ?? {})[LABELS.pool] ?? poolOfJobId(e.Key, prefix);
      // A purge emits this only on Nomad 1.7.5+ (nomad/state/events.go); on 1.7.0–1.7.4 the
      // allocations' desired "stop" (a "die" above) is the only word of it, and list() forgets
      // the job when it is no longer listed.
      if (e.Type === 'JobDeregistered') {
        this.cache.delete(e.Key);
        return pool ? { id: e.Key, pool, type: 'destroy' } : undefined;
      }
    }
    return undefined;
  }

  async close(): Promise<void> {
    for (const stop of [...this.stops]) stop();
  }
}
