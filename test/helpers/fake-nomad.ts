// A small in-memory fake of the Nomad HTTP API endpoints used by src/drivers/nomad.ts. It
// answers like a Nomad 1.7.3 agent (the version the platform runs; `nomadVersion: '1.7.5'`
// switches the one difference the engine meets, the purge Job event), read from Nomad's source
// at that tag; every such behaviour cites its file. It must never be laxer than a real agent.
//
// What it checks like Nomad: registration validation (a subset of Job.Validate, HTTP 500 with
// go-multierror's text) and check-and-set; nothing of the driver Config at registration, then,
// as a client does when it starts a task, the Config decoded against the docker/qemu driver's
// declared spec (nomad-driver-config.ts: "Failed Validation" with the decoder's words), the
// docker plugin's allow_caps, qemu's port_map labels; ACL capabilities per endpoint (403, but
// 500 "Permission denied" on the event stream, close frames 1008/1011 on exec after the
// WebSocket upgrade); blocking queries of at most 300 s plus jitter; the event stream's
// heartbeat (at once, then every 30 s), replay from an index, Allocation events without their
// Job; purge answering before the allocations stop; DELETE of an unknown job answering 200;
// defaults filled into stored jobs. One namespace; `loseNode()` takes the node down: its
// allocations turn lost and replacements are placed on a new node whatever the ReschedulePolicy.
//
// With `docker`, the fake's "client" runs every docker-driver task as a real container on the
// given dockerd (image, entrypoint, args, env, labels, tmpfs mounts), each in its own network
// namespace with the task's `ports` published on 127.0.0.1:<host port> → <To> (docker's
// userland proxy, done here), and NOMAD_PORT_<label> = To as client/taskenv/env.go sets it. A
// container that exits fails (exit code ≠ 0) or completes its allocation; a deregistration
// removes it; an allocation restart destroys it and creates a new one (the writable layer is
// lost, as with the docker driver); alloc exec runs a docker exec. Without `docker` allocations
// are records that turn "running" (or fail the client's checks).
// Tasks asking for devices (e.g. nvidia/gpu) are placed only while `devices` has enough of
// that name; otherwise no allocation is made and the job stays pending, as a blocked
// evaluation leaves it in Nomad.
//
// Deliberately NOT modelled: evaluations and deployments as objects, rolling updates,
// reschedules of failed allocations (the engine turns them off), client disconnect handling,
// several namespaces or regions (the query parameters are accepted and ignored), ACL policies
// beyond a capability list per token, HCL interpolation inside driver Config strings, every
// default a real agent fills in, job version history, summaries, filter expressions, gzip, the
// event stream's buffer eviction, TTY exec, drivers other than docker and qemu (their Config is
// not checked).

import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { createHash, randomUUID } from 'node:crypto';
import type { AddressInfo } from 'node:net';
import type { Duplex } from 'node:stream';
import type { ExecutionContext } from 'ava';
import { WebSocketServer, type WebSocket } from 'ws';

import { query, type DockerClient } from '../../src/drivers/docker.js';

import { DOCKER_DEFAULT_ALLOW_CAPS, disallowedCaps, driverConfigError, multierror } from './nomad-driver-config.js';
import { NOMAD_EVENT_HEARTBEAT_MS, type NomadAllocStub, type NomadAllocation, type NomadEvent, type NomadJob, type NomadJobStub, type NomadTaskState } from '../../src/drivers/nomad.js';

/** Namespace capabilities of Nomad ACL policies the fake checks (what each endpoint needs). */
export type NomadCapability = 'submit-job' | 'read-job' | 'list-jobs' | 'alloc-exec' | 'alloc-lifecycle';

export interface FakeNomadOptions {
  /** A management token (every capability). With it or `tokens`, ACLs are on. */
  token?: string;
  /** Client tokens by secret, each with the namespace capabilities of its policies. */
  tokens?: Record<string, NomadCapability[]>;
  /** Event stream heartbeat interval (default Nomad's, NOMAD_EVENT_HEARTBEAT_MS: 30 s). */
  heartbeatMs?: number;
  failImages?: string[];
  /** Delay before allocations leave "pending" (default 20 ms). */
  placeMs?: number;
  /** Run docker-driver tasks as real containers on this dockerd. */
  docker?: DockerClient;
  /** Devices the one node has, by name (e.g. {'nvidia/gpu': 1}); default none. */
  devices?: Record<string, number>;
  /**
   * Which Nomad the fake answers like where versions differ (default '1.7.3', what the platform
   * runs): a purge deregistration emits a Job event only from 1.7.5 on (nomad/state/events.go).
   */
  nomadVersion?: '1.7.3' | '1.7.5';
  /** The docker plugin's allow_caps on the node (default: Nomad's, DOCKER_DEFAULT_ALLOW_CAPS). */
  dockerAllowCaps?: string[];
}

/** Label on every container the fake starts (value: the fake's id), for cleanup. */
export const FAKE_NOMAD_LABEL = 'polydev.test/fake-nomad';

export interface FakeNomad {
  address: string;
  /** Every request received, in order (path without the query string). */
  requests: Array<{ method: string; path: string; url: string }>;
  /** Delay every response by this many ms (settable). */
  delayMs: number;
  /** Current global index. */
  readonly index: number;
  /** The event stream's heartbeat interval. */
  readonly heartbeatMs: number;
  failNext(status: number, count?: number): void;
  dropStreams(): void;
  readonly openStreams: number;
  /**
   * The node goes down: its allocations turn "lost" and Nomad places a replacement of each on
   * another node, whatever the job's ReschedulePolicy (scheduler/reconcile.go, v1.7.3). Resolves
   * with the replacements' ids once placed.
   */
  loseNode(): Promise<string[]>;
  /** Nomad's garbage collector removes a terminal allocation (it is no longer listed or readable). */
  collectGarbage(allocId: string): void;
  /** Docker container id of a running allocation's task (docker mode). */
  containerOf(allocId: string, task?: string): string | undefined;
  close(): Promise<void>;
}

interface Stream {
  res: http.ServerResponse;
  topics: Array<{ topic: string; key: string }>;
  heartbeat: NodeJS.Timeout;
}

const nodeOf = (n: number): { id: string; name: string } => ({ id: `f0c1d1e2-0000-4000-8000-${String(n).padStart(12, '0')}`, name: `fake-node-${n}` });

/**
 * How long a blocking query may hold (ms): ?wait, default and at most 300 s
 * (DefaultBlockingRPCQueryTime, MaxBlockingRPCQueryTime in nomad/structs/structs.go, v1.7.3), plus
 * RandomStagger(wait / JitterFraction 16) as nomad/rpc.go blockingRPC adds.
 */
export function blockingWaitMs(wait: string | null, random: () => number = Math.random): number {
  const MAX = 300_000;
  let total = 0;
  if (wait) {
    const re = /(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)/g;
    const unit: Record<string, number> = { ns: 1e-6, us: 1e-3, µs: 1e-3, ms: 1, s: 1000, m: 60_000, h: 3_600_000 };
    let m: RegExpExecArray | null;
    while ((m = re.exec(wait))) total += Number(m[1]) * unit[m[2]!]!;
  }
  const base = total > 0 ? Math.min(total, MAX) : MAX;
  return base + Math.floor(random() * (base / 16));
}

export async function startFakeNomad(t: ExecutionContext, opts: FakeNomadOptions = {}): Promise<FakeNomad> {
  const heartbeatMs = opts.heartbeatMs ?? NOMAD_EVENT_HEARTBEAT_MS;
  const placeMs = opts.placeMs ?? 20;
  const failImages = new Set(opts.failImages ?? []);
  const nomadVersion = opts.nomadVersion ?? '1.7.3';
  /** The node allocations are placed on; loseNode() moves on to a fresh one. */
  let nodeNumber = 1;
  let node = nodeOf(nodeNumber);
  const allowCaps = opts.dockerAllowCaps ?? DOCKER_DEFAULT_ALLOW_CAPS;
  const imageId = (image: string): string => `sha256:${createHash('sha256').update(image).digest('hex')}`;

  let index = 1;
  const tableIndex = { jobs: 1, allocs: 1 };
  const jobs = new Map<string, NomadJob>();
  const allocs = new Map<string, NomadAllocation>();
  const eventLog: Array<{ Index: number; Events: NomadEvent[] }> = [];
  const waiters = new Set<() => void>();
  const streams = new Set<Stream>();
  const timers = new Set<NodeJS.Timeout>();
  let fail: { status: number; count: number } | undefined;
  // Host networking in docker mode: start somewhere random below the ephemeral range so test
  // files running at once rarely meet.
  let nextPort = 21000 + Math.floor(Math.random() * 100) * 100;
  const fakeId = randomUUID().slice(0, 8);
  const docker = opts.docker;
  const devicesFree = new Map(Object.entries(opts.devices ?? {}));
  /** allocId → task → container id. */
  const containers = new Map<string, Map<string, string>>();

  /** Apply one write at a new index and publish its events. */
  function write(tables: Array<'jobs' | 'allocs'>, fn: (idx: number) => NomadEvent[]): number {
    const idx = ++index;
    for (const tb of tables) tableIndex[tb] = idx;
    const events = fn(idx);
    if (events.length) {
      const batch = { Index: idx, Events: events };
      eventLog.push(batch);
      for (const s of streams) sendBatch(s, batch);
    }
    for (const w of [...waiters]) w();
    return idx;
  }

  function matches(s: Stream, e: NomadEvent): boolean {
    return s.topics.some(
      (tp) =>
        (tp.topic === '*' || tp.topic === e.Topic) &&
        (tp.key === '*' || tp.key === e.Key || (e.FilterKeys ?? []).includes(tp.key)),
    );
  }

  function sendBatch(s: Stream, batch: { Index: number; Events: NomadEvent[] }): void {
    const evs = batch.Events.filter((e) => matches(s, e));
    if (evs.length) s.res.write(JSON.stringify({ Index: batch.Index, Events: evs }) + '\n');
  }

  const jobEvent = (type: string, job: NomadJob, idx: number): NomadEvent => ({
    Topic: 'Job',
    Type: type,
    Key: job.ID,
    Namespace: job.Namespace ?? 'default',
    FilterKeys: null,
    Index: idx,
    Payload: { Job: structuredClone(job) },
  });
  const allocEvent = (type: string, a: NomadAllocation, idx: number): NomadEvent => ({
    Topic: 'Allocation',
    Type: type,
    Key: a.ID,
    Namespace: a.Namespace ?? 'default',
    FilterKeys: [a.JobID, a.DeploymentID as string].filter(Boolean),
    Index: idx,
    // nomad/state/events.go (v1.7.3): "remove job info to help keep size of alloc event down".
    Payload: { Allocation: { ...structuredClone(a), Job: null } },
  });

  function stub(j: NomadJob, withMeta: boolean): NomadJobStub {
    const out: NomadJobStub = {
      ID: j.ID,
      ParentID: '',
      Name: j.Name ?? j.ID,
      Namespace: j.Namespace ?? 'default',
      Datacenters: j.Datacenters ?? ['dc1'],
      Type: j.Type ?? 'service',
      Priority: j.Priority ?? 50,
      Stop: j.Stop ?? false,
      Status: j.Status ?? 'pending',
      StatusDescription: '',
      CreateIndex: j.CreateIndex ?? 0,
      ModifyIndex: j.ModifyIndex ?? 0,
      JobModifyIndex: j.JobModifyIndex ?? 0,
      SubmitTime: j.SubmitTime ?? 0,
    };
    // Nomad 1.6+ adds Meta to the stubs only when asked (?meta=true).
    if (withMeta) out.Meta = j.Meta ?? null;
    return out;
  }

  /** The fields of structs.AllocListStub (nomad/structs/structs.go, v1.7.3; AllocatedResources only with ?resources=true). */
  const STUB_FIELDS = [
    'ID', 'EvalID', 'Name', 'Namespace', 'NodeID', 'NodeName', 'JobID', 'JobType', 'JobVersion', 'TaskGroup', 'DesiredStatus',
    'DesiredDescription', 'ClientStatus', 'ClientDescription', 'DesiredTransition', 'TaskStates', 'DeploymentStatus', 'FollowupEvalID',
    'NextAllocation', 'RescheduleTracker', 'PreemptedAllocations', 'PreemptedByAllocation', 'CreateIndex', 'ModifyIndex', 'CreateTime', 'ModifyTime',
  ];
  function allocStub(a: NomadAllocation): NomadAllocStub {
    const out: Record<string, unknown> = {};
    for (const k of STUB_FIELDS) if (a[k] !== undefined) out[k] = a[k];
    return out as NomadAllocStub;
  }

  function refreshJobStatus(job: NomadJob, idx: number): void {
    const as = [...allocs.values()].filter((a) => a.JobID === job.ID && a.DesiredStatus === 'run');
    const status = job.Stop
      ? 'dead'
      : as.some((a) => a.ClientStatus === 'running' || a.ClientStatus === 'pending')
        ? as.some((a) => a.ClientStatus === 'running')
          ? 'running'
          : 'pending'
        : as.length
          ? 'dead'
          : 'pending';
    if (status !== job.Status) {
      job.Status = status;
      job.ModifyIndex = idx;
    }
  }

  function taskState(state: string, failed: boolean, events: NomadTaskState['Events']): NomadTaskState {
    return { State: state, Failed: failed, Restarts: 0, LastRestart: null, StartedAt: null, FinishedAt: null, Events: events };
  }

  /** Takes the devices a group needs from the node; false (nothing taken) when it has too few. */
  function takeDevices(tg: NomadJob['TaskGroups'][number]): boolean {
    const need = new Map<string, number>();
    for (const t of tg.Tasks) for (const d of t.Resources?.Devices ?? []) need.set(d.Name, (need.get(d.Name) ?? 0) + (d.Count ?? 1));
    for (const [name, n] of need) if ((devicesFree.get(name) ?? 0) < n) return false;
    for (const [name, n] of need) devicesFree.set(name, devicesFree.get(name)! - n);
    return true;
  }

  const released = new Set<string>();
  function releaseDevices(a: NomadAllocation): void {
    if (released.has(a.ID)) return;
    released.add(a.ID);
    const tg = a.Job?.TaskGroups.find((g) => g.Name === a.TaskGroup);
    for (const t of tg?.Tasks ?? []) for (const d of t.Resources?.Devices ?? []) devicesFree.set(d.Name, (devicesFree.get(d.Name) ?? 0) + (d.Count ?? 1));
  }

  function place(job: NomadJob, idx: number, only?: { group: string; previous: NomadAllocation }): NomadAllocation[] {
    const out: NomadAllocation[] = [];
    // A parameterized or periodic job is a template: Nomad places allocations only for the jobs
    // dispatched or launched from it.
    if (job.ParameterizedJob || job.Periodic) return out;
    const nowNs = Date.now() * 1e6;
    for (const tg of job.TaskGroups ?? []) {
      if (only && tg.Name !== only.group) continue;
      for (let i = 0; i < (only ? 1 : tg.Count ?? 1); i++) {
        if (!takeDevices(tg)) break; // a blocked evaluation: no allocation

        const ports: Array<{ Label: string; Value: number; To: number; HostIP: string }> = [];
        const nets = (tg.Networks ?? []).map((n) => ({
          Mode: n.Mode ?? 'host',
          IP: '127.0.0.1',
          DynamicPorts: (n.DynamicPorts ?? []).map((p) => {
            const v = { Label: p.Label, Value: nextPort++, To: p.To ?? 0, HostNetwork: 'default' };
            ports.push({ Label: p.Label, Value: v.Value, To: v.To, HostIP: '127.0.0.1' });
            return v;
          }),
          ReservedPorts: (n.ReservedPorts ?? []).map((p) => {
            ports.push({ Label: p.Label, Value: p.Value ?? 0, To: p.To ?? 0, HostIP: '127.0.0.1' });
            return { Label: p.Label, Value: p.Value ?? 0, To: p.To ?? 0, HostNetwork: 'default' };
          }),
        }));
        const tasks: Record<string, NonNullable<NomadAllocation['AllocatedResources']>['Tasks'] extends infer T ? T extends Record<string, infer V> ? V : never : never> = {};
        const states: Record<string, NomadTaskState> = {};
        for (const task of tg.Tasks) {
          // Task-level networks (deprecated, but the only ones the qemu driver forwards in 1.7/1.8):
          // their ports are allocated per task, with no `To`.
          const taskNets = (task.Resources?.Networks ?? []).map((n) => ({
            Mode: n.Mode ?? 'host',
            IP: '127.0.0.1',
            DynamicPorts: (n.DynamicPorts ?? []).map((p) => ({ Label: p.Label, Value: nextPort++ })),
            ReservedPorts: (n.ReservedPorts ?? []).map((p) => ({ Label: p.Label, Value: p.Value ?? 0 })),
          }));
          tasks[task.Name] = {
            Cpu: { CpuShares: task.Resources?.CPU ?? 100, ReservedCores: null },
            Memory: { MemoryMB: task.Resources?.MemoryMB ?? 300, MemoryMaxMB: task.Resources?.MemoryMaxMB ?? 0 },
            Networks: taskNets.length ? taskNets : null,
            Devices: null,
          };
          states[task.Name] = taskState('pending', false, [
            { Type: 'Received', Time: nowNs, DisplayMessage: 'Task received by client' },
          ]);
        }
        const a: NomadAllocation = {
          ID: randomUUID(),
          EvalID: randomUUID(),
          Name: `${job.ID}.${tg.Name}[${i}]`,
          Namespace: job.Namespace ?? 'default',
          NodeID: node.id,
          NodeName: node.name,
          JobID: job.ID,
          JobType: job.Type ?? 'service',
          JobVersion: job.Version ?? 0,
          TaskGroup: tg.Name,
          DesiredStatus: 'run',
          DesiredDescription: '',
          ClientStatus: 'pending',
          ClientDescription: '',
          TaskStates: states,
          CreateIndex: idx,
          ModifyIndex: idx,
          CreateTime: nowNs,
          ModifyTime: nowNs,
          Job: structuredClone(job),
          AllocatedResources: { Tasks: tasks, Shared: { DiskMB: 0, Networks: nets, Ports: ports } },
          Resources: {
            CPU: tg.Tasks.reduce((s, tk) => s + (tk.Resources?.CPU ?? 100), 0),
            MemoryMB: tg.Tasks.reduce((s, tk) => s + (tk.Resources?.MemoryMB ?? 300), 0),
            Networks: nets,
          },
        };
        if (only) {
          a.PreviousAllocation = only.previous.ID;
          only.previous.NextAllocation = a.ID;
        }
        allocs.set(a.ID, a);
        out.push(a);
      }
    }
    return out;
  }

  /** The "client" starts (or fails to start) the placed allocations. */
  function startLater(jobId: string, allocIds: string[]): void {
    const tm = setTimeout(() => {
      timers.delete(tm);
      const run = runAllocs(jobId, allocIds).catch(() => undefined);
      pending.add(run);
      void run.finally(() => pending.delete(run));
    }, placeMs);
    timers.add(tm);
  }

  type TaskFailure = { kind: 'validation' | 'driver'; message: string };

  /**
   * What a Nomad client refuses before any container exists: a driver Config that does not decode
   * against the driver's spec (a "Failed Validation" event, task_runner.go runDriver, v1.7.3), and
   * what the driver refuses when it builds the container (a "Driver Failure" event).
   */
  function clientRefusal(task: NomadJob['TaskGroups'][number]['Tasks'][number]): TaskFailure | undefined {
    const invalid = driverConfigError(task.Driver, task.Config);
    if (invalid) return { kind: 'validation', message: invalid };
    const cfg = (task.Config ?? {}) as Record<string, unknown>;
    if (task.Driver === 'docker') {
      const image = typeof cfg.image === 'string' ? cfg.image : '';
      if (failImages.has(image)) {
        return { kind: 'driver', message: `Failed to pull \`${image}\`: Error response from daemon: manifest for ${image} not found: manifest unknown` };
      }
      // drivers/docker/driver.go (StartTask → createContainerConfig → capabilities.Delta), v1.7.3.
      const missing = disallowedCaps(cfg.cap_add, allowCaps);
      if (missing.length) {
        return {
          kind: 'driver',
          message: `Failed to create container configuration for image ${JSON.stringify(image)} (${JSON.stringify(imageId(image))}): driver does not allow the following capabilities: ${missing.join(', ')}`,
        };
      }
    }
    if (task.Driver === 'qemu') {
      // drivers/qemu/driver.go (StartTask), v1.7.3: port_map labels are looked up in the TASK's
      // network (cfg.Resources.NomadResources.Networks), never in the group's.
      const taskNets = task.Resources?.Networks ?? [];
      const portMap = Array.isArray(cfg.port_map) ? (cfg.port_map as Array<Record<string, number>>) : [];
      const labels = new Set(taskNets.length ? [...(taskNets[0]!.DynamicPorts ?? []), ...(taskNets[0]!.ReservedPorts ?? [])].map((p) => p.Label) : []);
      if (taskNets.length) {
        for (const m of portMap) for (const label of Object.keys(m)) if (!labels.has(label)) return { kind: 'driver', message: `Unknown port label ${JSON.stringify(label)}` };
      }
    }
    return undefined;
  }

  /**
   * The defaults a real agent fills in before it stores a job (api/jobs.go Canonicalize on the
   * agent, then nomad/structs/structs.go Job.Canonicalize, v1.7.3): a job reads back with more
   * than was sent. A subset of them, enough that "reads back as sent" cannot pass here either.
   */
  function canonicalize(job: NomadJob): NomadJob {
    const NS = 1_000_000_000;
    job.Region ??= 'global';
    job.Priority ??= 50;
    if (!job.Datacenters?.length) job.Datacenters = ['*'];
    job.AllAtOnce ??= false;
    job.ParentID ??= '';
    const batch = job.Type === 'batch' || job.Type === 'sysbatch';
    for (const tg of job.TaskGroups) {
      tg.Count ??= 1;
      tg.EphemeralDisk = { Sticky: false, Migrate: false, SizeMB: 300, ...(tg.EphemeralDisk as object | undefined) };
      tg.RestartPolicy = {
        // DefaultServiceJobRestartPolicy / DefaultBatchJobRestartPolicy.
        ...(batch ? { Attempts: 3, Interval: 24 * 3600 * NS } : { Attempts: 2, Interval: 30 * 60 * NS }),
        Delay: 15 * NS,
        Mode: 'fail',
        RenderTemplates: false,
        ...(tg.RestartPolicy as object | undefined),
      };
      for (const task of tg.Tasks ?? []) {
        task.LogConfig = { MaxFiles: 10, MaxFileSizeMB: 10, Disabled: false, ...(task.LogConfig as object | undefined) };
        task.KillTimeout ??= 5 * NS;
        task.Leader ??= false;
        task.Resources = { CPU: 100, MemoryMB: 300, ...task.Resources };
      }
    }
    return job;
  }

  /**
   * A subset of what Nomad 1.7.3 refuses at registration (nomad/structs/structs.go Job.Validate and
   * TaskGroup.Validate, nomad/job_endpoint_hooks.go jobValidate), with its texts. Driver Config is
   * not among it: only the client checks that.
   */
  function validateJob(job: NomadJob): string[] {
    const errs: string[] = [];
    if (job.ID.includes(' ')) errs.push('Job ID contains a space');
    const type = job.Type ?? 'service';
    if (!['service', 'batch', 'system', 'sysbatch'].includes(type)) errs.push(`Invalid job type: ${JSON.stringify(type)}`);
    if ((job.Datacenters ?? []).some((d) => d === '')) errs.push('Job datacenter must be non-empty string');
    const groups = Array.isArray(job.TaskGroups) ? job.TaskGroups : [];
    if (groups.length === 0) errs.push('Missing job task groups');
    const seen = new Map<string, number>();
    groups.forEach((tg, i) => {
      if (!tg.Name) errs.push(`Job task group ${i + 1} missing name`);
      else if (seen.has(tg.Name)) errs.push(`Job task group ${i + 1} redefines '${tg.Name}' from group ${seen.get(tg.Name)! + 1}`);
      else seen.set(tg.Name, i);
      const tgErrs: string[] = [];
      if ((tg.Count ?? 1) < 0) tgErrs.push("Task group count can't be negative");
      if (!Array.isArray(tg.Tasks) || tg.Tasks.length === 0) tgErrs.push('Missing tasks for task group');
      if (tgErrs.length) errs.push(`Task group ${tg.Name} validation failed: ${multierror(tgErrs)}`);
    });
    const priority = job.Priority ?? 50;
    if (priority !== 0 && (priority < 1 || priority > 100)) errs.push('job priority must be between [1, 100]');
    return errs;
  }

  /** The scheduler's plan for a stopped job (desired "stop"), then the client killing its tasks. */
  function stopJobAllocsLater(jobId: string): void {
    const tm = setTimeout(() => {
      timers.delete(tm);
      if (closed) return;
      const stopping: NomadAllocation[] = [];
      write(['allocs'], (i) => {
        const evs: NomadEvent[] = [];
        for (const a of allocs.values()) {
          if (a.JobID !== jobId || a.DesiredStatus !== 'run') continue;
          a.DesiredStatus = 'stop';
          a.DesiredDescription = 'alloc not needed due to job update';
          a.ModifyIndex = i;
          stopping.push(a);
          evs.push(allocEvent('PlanResult', a, i));
        }
        return evs;
      });
      const run = (async () => {
        for (const a of stopping) await stopContainers(a);
        if (closed || stopping.length === 0) return;
        write(['allocs'], (i) => {
          const evs: NomadEvent[] = [];
          for (const a of stopping) {
            if (a.ClientStatus !== 'pending' && a.ClientStatus !== 'running') continue;
            a.ClientStatus = 'complete';
            a.ClientDescription = 'All tasks have completed';
            for (const st of Object.values(a.TaskStates ?? {})) {
              if (st.State === 'dead') continue;
              st.State = 'dead';
              st.FinishedAt = new Date().toISOString();
              st.Events?.push({ Type: 'Killed', Time: Date.now() * 1e6, DisplayMessage: 'Task successfully killed' });
            }
            a.ModifyIndex = i;
            evs.push(allocEvent('AllocationUpdated', a, i));
          }
          return evs;
        });
      })().catch(() => undefined);
      pending.add(run);
      void run.finally(() => pending.delete(run));
    }, placeMs);
    timers.add(tm);
  }

  async function runAllocs(jobId: string, allocIds: string[]): Promise<void> {
    // The client's checks, then (docker mode) the containers outside the write, then one write
    // with the outcomes.
    const failures = new Map<string, Map<string, TaskFailure>>();
    for (const id of allocIds) {
      const a = allocs.get(id);
      if (!a || a.DesiredStatus !== 'run' || a.ClientStatus !== 'pending') continue;
      const tg = a.Job?.TaskGroups.find((g) => g.Name === a.TaskGroup);
      const failed = new Map<string, TaskFailure>();
      failures.set(id, failed);
      for (const task of tg?.Tasks ?? []) {
        const refused = clientRefusal(task);
        if (refused) {
          failed.set(task.Name, refused);
          continue;
        }
        if (!docker || task.Driver !== 'docker') continue;
        try {
          const cid = await runTask(a, task);
          let per = containers.get(a.ID);
          if (!per) containers.set(a.ID, (per = new Map()));
          per.set(task.Name, cid);
        } catch (err) {
          failed.set(task.Name, { kind: 'driver', message: (err as Error).message });
        }
      }
    }
    if (closed) return;
    const stopped: NomadAllocation[] = [];
    write(['allocs', 'jobs'], (idx) => {
      const evs: NomadEvent[] = [];
      const nowNs = Date.now() * 1e6;
      for (const id of allocIds) {
        const a = allocs.get(id);
        if (!a) continue;
        if (a.DesiredStatus !== 'run') {
          stopped.push(a); // deregistered while its containers were starting
          continue;
        }
        if (a.ClientStatus !== 'pending') {
          continue;
        }
        const tg = a.Job?.TaskGroups.find((g) => g.Name === a.TaskGroup);
        let anyFailed = false;
        for (const task of tg?.Tasks ?? []) {
          const st = a.TaskStates![task.Name]!;
          const why = failures.get(id)?.get(task.Name);
          if (why !== undefined) {
            anyFailed = true;
            st.State = 'dead';
            st.Failed = true;
            st.FinishedAt = new Date().toISOString();
            if (why.kind === 'validation') {
              // structs.TaskFailedValidation + SetValidationError (nomad/structs/structs.go, v1.7.3).
              st.Events!.push({ Type: 'Failed Validation', Time: nowNs, DisplayMessage: why.message, ValidationError: why.message, Details: { validation_error: why.message } });
            } else {
              st.Events!.push({ Type: 'Driver Failure', Time: nowNs, DisplayMessage: why.message, DriverError: why.message, Details: { driver_error: why.message } });
            }
            // Neither error is recoverable: restarts.go's ReasonUnrecoverableError, whatever the policy.
            st.Events!.push({ Type: 'Not Restarting', Time: nowNs, DisplayMessage: 'Error was unrecoverable', RestartReason: 'Error was unrecoverable', FailsTask: true });
          } else {
            st.State = 'running';
            st.StartedAt = new Date().toISOString();
            st.Events!.push({ Type: 'Started', Time: nowNs, DisplayMessage: 'Task started by client' });
          }
        }
        a.ClientStatus = anyFailed ? 'failed' : 'running';
        a.ClientDescription = anyFailed ? 'Failed tasks' : 'Tasks are running';
        a.ModifyIndex = idx;
        a.ModifyTime = nowNs;
        if (anyFailed) stopped.push(a);
        evs.push(allocEvent('AllocationUpdated', a, idx));
      }
      const job = jobs.get(jobId);
      if (job) refreshJobStatus(job, idx);
      return evs;
    });
    for (const a of stopped) void stopContainers(a);
  }

  // ---- docker mode ------------------------------------------------------------

  /** Creates and starts one task's container the way Nomad's docker driver would; Nomad-like errors. */
  async function runTask(a: NomadAllocation, task: NomadJob['TaskGroups'][number]['Tasks'][number]): Promise<string> {
    const cfg = (task.Config ?? {}) as {
      image?: string;
      entrypoint?: string[];
      args?: string[];
      labels?: Array<Record<string, string>>;
      mount?: Array<{ type?: string; target?: string; tmpfs_options?: { size?: number; mode?: number } }>;
    };
    const image = cfg.image ?? '';
    const env: Record<string, string> = {
      ...(task.Env ?? {}),
      NOMAD_ALLOC_ID: a.ID,
      NOMAD_JOB_ID: a.JobID,
      NOMAD_GROUP_NAME: a.TaskGroup,
      NOMAD_TASK_NAME: task.Name,
    };
    // client/taskenv/env.go addPorts (v1.7.3): NOMAD_PORT_<label> is the port the task listens
    // on, `To` when set; the host side is NOMAD_HOST_PORT / NOMAD_ADDR.
    for (const p of a.AllocatedResources?.Shared?.Ports ?? []) {
      const inside = String(p.To && p.To > 0 ? p.To : p.Value);
      env[`NOMAD_PORT_${p.Label}`] = inside;
      env[`NOMAD_ALLOC_PORT_${p.Label}`] = inside;
      env[`NOMAD_HOST_PORT_${p.Label}`] = String(p.Value);
      env[`NOMAD_IP_${p.Label}`] = p.HostIP;
      env[`NOMAD_HOST_IP_${p.Label}`] = p.HostIP;
      env[`NOMAD_ADDR_${p.Label}`] = `${p.HostIP}:${p.Value}`;
      env[`NOMAD_HOST_ADDR_${p.Label}`] = `${p.HostIP}:${p.Value}`;
    }
    const tmpfs: Record<string, string> = {};
    for (const m of cfg.mount ?? []) {
      if (m.type !== 'tmpfs' || !m.target) continue;
      const mode = (m.tmpfs_options?.mode ?? 0o755).toString(8).padStart(4, '0');
      tmpfs[m.target] = `rw,nosuid,nodev${m.tmpfs_options?.size ? `,size=${m.tmpfs_options.size}` : ''},mode=${mode}`;
    }
    const body: Record<string, unknown> = {
      Image: image,
      Env: Object.entries(env).map(([k, v]) => `${k}=${v}`),
      Labels: { ...Object.assign({}, ...(cfg.labels ?? [])), [FAKE_NOMAD_LABEL]: fakeId, 'polydev.test/fake-nomad-alloc': a.ID },
      // Its own network namespace (the test dockerd has no bridge): the ports in the task's
      // `ports` are published on 127.0.0.1:<host port> by publishPorts(), like the docker
      // driver's port bindings (host port → To).
      HostConfig: { NetworkMode: 'none', Tmpfs: tmpfs, RestartPolicy: { Name: 'no' } },
    };
    if (cfg.entrypoint?.length) body.Entrypoint = cfg.entrypoint;
    if (cfg.args?.length) body.Cmd = cfg.args;
    const name = `fake-nomad-${a.ID.slice(0, 8)}-${task.Name}`;
    const created = await docker!.request('POST', `/containers/create${query({ name })}`, { json: body });
    const message = (r: { json: unknown; text: string }): string =>
      (r.json && typeof r.json === 'object' && typeof (r.json as { message?: unknown }).message === 'string' ? (r.json as { message: string }).message : r.text).trim();
    if (created.status === 404) throw new Error(`Failed to pull \`${image}\`: Error response from daemon: ${message(created)}`);
    if (created.status !== 201) throw new Error(`failed to create container: ${message(created)}`);
    const id = (created.json as { Id: string }).Id;
    const started = await docker!.request('POST', `/containers/${id}/start`);
    if (started.status !== 204 && started.status !== 304) {
      await docker!.request('DELETE', `/containers/${id}${query({ force: 1, v: 1 })}`).catch(() => undefined);
      throw new Error(`failed to start task: ${message(started)}`);
    }
    const published = new Set(Array.isArray((task.Config ?? {}).ports) ? ((task.Config ?? {}).ports as string[]) : []);
    const ports = (a.AllocatedResources?.Shared?.Ports ?? []).filter((p) => published.has(p.Label));
    if (ports.length) {
      try {
        await publishPorts(id, ports);
      } catch (err) {
        await docker!.request('DELETE', `/containers/${id}${query({ force: 1, v: 1 })}`).catch(() => undefined);
        throw new Error(`failed to start task: ${(err as Error).message}`);
      }
    }
    return id;
  }

  // ---- port publishing (docker mode) -----------------------------------------------------------
  // The test dockerd runs without a bridge, iptables or userland proxy, so the fake does what
  // docker's userland proxy does: it listens on 127.0.0.1:<host port> and forwards each
  // connection into the container's network namespace, to 127.0.0.1:<To>. The part inside is a
  // node process started in that namespace with nsenter; the two talk over a unix socket (not
  // bound to a network namespace).

  const FORWARDER = [
    "const net = require('node:net');",
    'const [sock, port] = process.argv.slice(1);',
    'net.createServer((c) => {',
    "  const u = net.connect(Number(port), '127.0.0.1');",
    "  c.pipe(u); u.pipe(c); c.on('error', () => u.destroy()); u.on('error', () => c.destroy());",
    '}).listen(sock);',
  ].join('\n');
  const publishedBy = new Map<string, Array<{ server: net.Server; child: ChildProcess }>>();
  let sockDir: string | undefined;

  async function publishPorts(containerId: string, ports: Array<{ Label: string; Value: number; To?: number }>): Promise<void> {
    const inspect = await docker!.request('GET', `/containers/${containerId}/json`);
    const pid = (inspect.json as { State?: { Pid?: number } } | undefined)?.State?.Pid;
    if (!pid) throw new Error(`container ${containerId.slice(0, 12)} has no pid`);
    sockDir ??= fs.mkdtempSync(path.join(os.tmpdir(), 'fake-nomad-ports-'));
    const list: Array<{ server: net.Server; child: ChildProcess }> = [];
    publishedBy.set(containerId, list);
    for (const p of ports) {
      const inside = p.To && p.To > 0 ? p.To : p.Value;
      const sock = path.join(sockDir, `${containerId.slice(0, 12)}-${p.Label}.sock`);
      const child = spawn('nsenter', [`--net=/proc/${pid}/ns/net`, '--', process.execPath, '-e', FORWARDER, sock, String(inside)], { stdio: 'ignore' });
      child.on('error', () => undefined);
      const server = net.createServer((c) => {
        // The forwarder may still be starting: its socket appears within milliseconds.
        const connect = (tries: number): void => {
          const u = net.connect(sock);
          u.once('connect', () => {
            c.pipe(u);
            u.pipe(c);
          });
          u.once('error', () => {
            if (tries > 0 && !c.destroyed) setTimeout(() => connect(tries - 1), 50);
            else c.destroy();
          });
          c.once('close', () => u.destroy());
        };
        c.on('error', () => undefined);
        connect(100);
      });
      list.push({ server, child });
      await new Promise<void>((resolve, reject) => {
        server.once('error', (e) => reject(new Error(`Failed to bind port ${p.Value} for ${p.Label}: ${e.message}`)));
        server.listen(p.Value, '127.0.0.1', () => resolve());
      });
    }
  }

  function unpublish(containerId: string): void {
    for (const { server, child } of publishedBy.get(containerId) ?? []) {
      server.close();
      child.kill();
    }
    publishedBy.delete(containerId);
  }

  async function stopContainers(a: NomadAllocation): Promise<void> {
    releaseDevices(a);
    const per = containers.get(a.ID);
    containers.delete(a.ID);
    if (!docker || !per) return;
    for (const cid of per.values()) {
      unpublish(cid);
      await docker.request('DELETE', `/containers/${cid}${query({ force: 1, v: 1 })}`).catch(() => undefined);
    }
  }

  const restarting = new Set<string>();

  /** Allocations whose container exited on its own: failed (exit ≠ 0) or complete, as Nomad's client reports. */
  async function pollExits(): Promise<void> {
    if (!docker || containers.size === 0) return;
    const r = await docker.request('GET', `/containers/json${query({ all: 1, filters: { label: [`${FAKE_NOMAD_LABEL}=${fakeId}`] } })}`);
    if (r.status !== 200 || !Array.isArray(r.json)) return;
    const exited = new Map<string, number>();
    for (const c of r.json as Array<{ Id: string; State: string; Status: string }>) {
      if (c.State === 'exited' || c.State === 'dead') exited.set(c.Id, Number(/Exited \((-?\d+)\)/.exec(c.Status)?.[1] ?? '0'));
    }
    const ended: Array<{ a: NomadAllocation; task: string; code: number }> = [];
    for (const [allocId, per] of containers) {
      const a = allocs.get(allocId);
      if (!a || a.ClientStatus !== 'running') continue;
      for (const [task, cid] of per) if (exited.has(cid) && !restarting.has(cid)) ended.push({ a, task, code: exited.get(cid)! });
    }
    if (ended.length === 0 || closed) return;
    write(['allocs', 'jobs'], (idx) => {
      const evs: NomadEvent[] = [];
      const nowNs = Date.now() * 1e6;
      for (const { a, task, code } of ended) {
        const st = a.TaskStates?.[task];
        if (!st || st.State !== 'running') continue;
        st.State = 'dead';
        st.Failed = code !== 0;
        st.FinishedAt = new Date().toISOString();
        st.Events?.push({ Type: 'Terminated', Time: nowNs, DisplayMessage: `Exit Code: ${code}`, ExitCode: code });
        if (code !== 0) st.Events?.push({ Type: 'Not Restarting', Time: nowNs, DisplayMessage: 'Policy allows no restarts', FailsTask: true });
        a.ClientStatus = code !== 0 ? 'failed' : 'complete';
        a.ClientDescription = code !== 0 ? 'Failed tasks' : 'All tasks have completed';
        a.ModifyIndex = idx;
        a.ModifyTime = nowNs;
        evs.push(allocEvent('AllocationUpdated', a, idx));
        const job = jobs.get(a.JobID);
        if (job) refreshJobStatus(job, idx);
      }
      return evs;
    });
    for (const { a } of ended) void stopContainers(a);
  }
  const poller = docker
    ? setInterval(() => {
        if (polling) return;
        polling = true;
        void pollExits()
          .catch(() => undefined)
          .finally(() => (polling = false));
      }, 200)
    : undefined;
  let polling = false;
  const pending = new Set<Promise<unknown>>();

  // ---- HTTP -----------------------------------------------------------------

  function send(res: http.ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
    const text = typeof body === 'string' ? body : JSON.stringify(body);
    res.writeHead(status, {
      'Content-Type': typeof body === 'string' ? 'text/plain; charset=utf-8' : 'application/json',
      ...headers,
    });
    res.end(text);
  }
  const queryHeaders = (idx: number): Record<string, string> => ({
    'X-Nomad-Index': String(idx),
    'X-Nomad-LastContact': '0',
    'X-Nomad-KnownLeader': 'true',
  });

  /** Hold a blocking query until `table`'s index passes ?index or ?wait elapses. */
  async function block(u: URL, table: 'jobs' | 'allocs', res: http.ServerResponse): Promise<void> {
    const min = Number(u.searchParams.get('index') ?? '0');
    if (!(min > 0) || tableIndex[table] > min) return;
    const waitMs = blockingWaitMs(u.searchParams.get('wait'));
    await new Promise<void>((resolve) => {
      const done = (): void => {
        clearTimeout(tm);
        waiters.delete(check);
        res.off('close', done);
        resolve();
      };
      const check = (): void => {
        if (tableIndex[table] > min) done();
      };
      const tm = setTimeout(done, waitMs);
      waiters.add(check);
      res.on('close', done);
    });
  }

  const aclsOn = opts.token !== undefined || opts.tokens !== undefined;

  /** The capability an endpoint needs (Nomad's ACL checks in nomad/*_endpoint.go and client/*_endpoint.go). */
  function capabilityFor(method: string, path: string): NomadCapability | undefined {
    if (path === '/v1/jobs') return method === 'GET' ? 'list-jobs' : 'submit-job';
    if (/^\/v1\/job\/[^/]+$/.test(path)) return method === 'DELETE' ? 'submit-job' : 'read-job';
    if (/^\/v1\/job\/[^/]+\/allocations$/.test(path)) return 'read-job';
    if (/^\/v1\/allocation\/[^/]+$/.test(path)) return 'read-job';
    if (/^\/v1\/client\/allocation\/[^/]+\/restart$/.test(path)) return 'alloc-lifecycle';
    if (/^\/v1\/client\/allocation\/[^/]+\/exec$/.test(path)) return 'alloc-exec';
    if (path === '/v1/event/stream') return 'read-job'; // the Job and Allocation topics
    return undefined;
  }

  /**
   * The refusal a Nomad agent with ACLs on answers, if any. No token (anonymous, no policy) and an
   * unknown token are 403; a known token without the capability is 403 "Permission denied",
   * except on the event stream, where nomad/event_endpoint.go (v1.7.3) sends the failed
   * SubscribeWithACLCheck with code 500.
   */
  function authorize(req: http.IncomingMessage, method: string, path: string): { status: number; text: string } | undefined {
    if (!aclsOn) return undefined;
    const header = req.headers['x-nomad-token'];
    const secret = Array.isArray(header) ? header[0] : header;
    if (secret !== undefined && secret === opts.token) return undefined;
    if (!secret) return { status: 403, text: 'Permission denied' };
    const caps = opts.tokens?.[secret];
    if (!caps) return { status: 403, text: 'ACL token not found' };
    const need = capabilityFor(method, path);
    if (!need || caps.includes(need)) return undefined;
    return { status: path === '/v1/event/stream' ? 500 : 403, text: 'Permission denied' };
  }

  async function readBody(req: http.IncomingMessage): Promise<unknown> {
    const chunks: Buffer[] = [];
    for await (const c of req) chunks.push(c as Buffer);
    const s = Buffer.concat(chunks).toString('utf8');
    return s ? JSON.parse(s) : {};
  }

  async function handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const u = new URL(req.url ?? '/', 'http://fake');
    const method = req.method ?? 'GET';
    fake.requests.push({ method, path: u.pathname, url: req.url ?? '/' });
    if (fake.delayMs > 0) await new Promise((r) => setTimeout(r, fake.delayMs));
    if (res.destroyed) return;
    const denied = authorize(req, method, u.pathname);
    if (denied) return send(res, denied.status, denied.text);
    if (fail && fail.count > 0) {
      fail.count--;
      return send(res, fail.status, 'injected failure');
    }
    const p = u.pathname;
    let m: RegExpMatchArray | null;

    if (method === 'POST' && p === '/v1/jobs') {
      let body: { Job?: NomadJob; EnforceIndex?: boolean; JobModifyIndex?: number };
      try {
        body = (await readBody(req)) as typeof body;
      } catch {
        return send(res, 400, 'Failed to decode request body');
      }
      const job = body.Job;
      // command/agent/job_endpoint.go (v1.7.3).
      if (!job || typeof job.ID !== 'string' || !job.ID) return send(res, 400, "Job ID hasn't been provided");
      // An invalid job is an RPC error without a code, so HTTP 500 (command/agent/http.go) with
      // the multierror's text.
      const invalid = validateJob(job);
      if (invalid.length) return send(res, 500, multierror(invalid));
      const existing = jobs.get(job.ID);
      if (body.EnforceIndex) {
        // Real Nomad (nomad/job_endpoint.go, Job.Register) answers a failed
        // check-and-set with HTTP 500 and one of these texts:
        //   "Enforcing job modify index 0: job already exists"
        //   "Enforcing job modify index N: job does not exist"
        //   "Enforcing job modify index N: job exists with conflicting job modify index: M"
        const want = body.JobModifyIndex ?? 0;
        if (want === 0 && existing) return send(res, 500, 'Enforcing job modify index 0: job already exists');
        if (want !== 0 && !existing) return send(res, 500, `Enforcing job modify index ${want}: job does not exist`);
        if (existing && existing.JobModifyIndex !== want) {
          return send(
            res,
            500,
            `Enforcing job modify index ${want}: job exists with conflicting job modify index: ${existing.JobModifyIndex}`,
          );
        }
      }
      let placed: NomadAllocation[] = [];
      const replaced: NomadAllocation[] = [];
      const idx = write(['jobs', 'allocs'], (i) => {
        const evs: NomadEvent[] = [];
        const stored: NomadJob = canonicalize(structuredClone(job));
        stored.Namespace = u.searchParams.get('namespace') ?? job.Namespace ?? 'default';
        stored.Name = job.Name ?? job.ID;
        stored.Type = job.Type ?? 'service';
        stored.Stop = false;
        stored.Status = 'pending';
        stored.Version = existing ? (existing.Version ?? 0) + 1 : 0;
        stored.CreateIndex = existing?.CreateIndex ?? i;
        stored.ModifyIndex = i;
        stored.JobModifyIndex = i;
        stored.SubmitTime = Date.now() * 1e6;
        jobs.set(job.ID, stored);
        evs.push(jobEvent('JobRegistered', stored, i));
        // Replace the previous version's allocations (no rolling update here).
        for (const a of allocs.values()) {
          if (a.JobID === job.ID && a.DesiredStatus === 'run') {
            a.DesiredStatus = 'stop';
            a.DesiredDescription = 'alloc is being updated due to job update';
            if (a.ClientStatus === 'pending' || a.ClientStatus === 'running') a.ClientStatus = 'complete';
            a.ModifyIndex = i;
            replaced.push(a);
            evs.push(allocEvent('AllocationUpdateDesiredStatus', a, i));
          }
        }
        placed = place(stored, i);
        for (const a of placed) evs.push(allocEvent('PlanResult', a, i));
        return evs;
      });
      for (const a of replaced) void stopContainers(a);
      startLater(job.ID, placed.map((a) => a.ID));
      return send(
        res,
        200,
        { EvalID: randomUUID(), EvalCreateIndex: idx, JobModifyIndex: idx, Warnings: '', Index: idx, LastContact: 0, KnownLeader: false },
        { 'X-Nomad-Index': String(idx) },
      );
    }

    if (method === 'GET' && p === '/v1/jobs') {
      await block(u, 'jobs', res);
      const prefix = u.searchParams.get('prefix') ?? '';
      const perPage = Number(u.searchParams.get('per_page') ?? '0');
      const next = u.searchParams.get('next_token') ?? '';
      let list = [...jobs.values()]
        .filter((j) => j.ID.startsWith(prefix))
        .sort((a, b) => (a.ID < b.ID ? -1 : a.ID > b.ID ? 1 : 0));
      if (next) list = list.filter((j) => j.ID >= next);
      const headers = queryHeaders(tableIndex.jobs);
      if (perPage > 0 && list.length > perPage) {
        headers['X-Nomad-NextToken'] = list[perPage]!.ID;
        list = list.slice(0, perPage);
      }
      const withMeta = u.searchParams.get('meta') === 'true';
      return send(res, 200, list.map((j) => stub(j, withMeta)), headers);
    }

    if ((m = p.match(/^\/v1\/job\/([^/]+)\/allocations$/)) && method === 'GET') {
      await block(u, 'allocs', res);
      const id = decodeURIComponent(m[1]!);
      const list = [...allocs.values()].filter((a) => a.JobID === id).map(allocStub);
      return send(res, 200, list, queryHeaders(tableIndex.allocs));
    }

    if ((m = p.match(/^\/v1\/job\/([^/]+)$/))) {
      const id = decodeURIComponent(m[1]!);
      const job = jobs.get(id);
      if (method === 'GET') {
        if (!job) return send(res, 404, 'job not found', queryHeaders(tableIndex.jobs));
        return send(res, 200, job, queryHeaders(tableIndex.jobs));
      }
      if (method === 'DELETE') {
        // nomad/job_endpoint.go (Job.Deregister, v1.7.3): an unknown job is no error, just no evaluation.
        if (!job) return send(res, 200, { EvalID: '', EvalCreateIndex: 0, JobModifyIndex: 0, Index: 0 }, { 'X-Nomad-Index': '0' });
        const purge = u.searchParams.get('purge') === 'true';
        const idx = write(['jobs'], (i) => {
          job.Stop = true;
          job.Status = 'dead';
          job.ModifyIndex = i;
          job.JobModifyIndex = i;
          if (purge) jobs.delete(id);
          // nomad/state/events.go: a purge deletes the job row, and deletions of "jobs" make an
          // event only from 1.7.5 on; a stop (no purge) updates the row and always makes one.
          return !purge || nomadVersion !== '1.7.3' ? [jobEvent('JobDeregistered', job, i)] : [];
        });
        // The evaluation the deregistration created stops the allocations later, asynchronously
        // (the scheduler's plan, then the client killing the tasks), not before the answer.
        stopJobAllocsLater(id);
        return send(res, 200, { EvalID: randomUUID(), EvalCreateIndex: idx, JobModifyIndex: idx, Index: idx }, { 'X-Nomad-Index': String(idx) });
      }
    }

    if ((m = p.match(/^\/v1\/allocation\/([^/]+)$/)) && method === 'GET') {
      const a = allocs.get(decodeURIComponent(m[1]!));
      if (!a) return send(res, 404, 'alloc not found', queryHeaders(tableIndex.allocs));
      return send(res, 200, a, queryHeaders(tableIndex.allocs));
    }

    if ((m = p.match(/^\/v1\/client\/allocation\/([^/]+)\/restart$/)) && (method === 'POST' || method === 'PUT')) {
      const a = allocs.get(decodeURIComponent(m[1]!));
      // Real Nomad forwards this to the client agent; an unknown alloc is a 404 "Unknown allocation".
      if (!a) return send(res, 404, `Unknown allocation "${m[1]}"`);
      let body: { TaskName?: string; AllTasks?: boolean };
      try {
        body = (await readBody(req)) as typeof body;
      } catch {
        return send(res, 400, 'Failed to decode request body');
      }
      const names = body.TaskName ? [body.TaskName] : Object.keys(a.TaskStates ?? {});
      for (const n of names) {
        if (!a.TaskStates?.[n]) return send(res, 500, `Unknown task: ${n}`);
      }
      if (a.ClientStatus !== 'running') return send(res, 500, 'Task not running');
      const per = containers.get(a.ID);
      if (docker && per) {
        for (const n of names) {
          const cid = per.get(n);
          if (!cid) continue;
          // A restart kills the task and runs the driver again (client/allocrunner/taskrunner/
          // task_runner.go Restart → killTask, then runDriver, v1.7.3); the docker driver destroys
          // the old container and creates a new one from the image: the writable layer is gone.
          restarting.add(cid);
          try {
            unpublish(cid);
            await docker.request('DELETE', `/containers/${cid}${query({ force: 1, v: 1 })}`);
            const task = a.Job?.TaskGroups.find((g) => g.Name === a.TaskGroup)?.Tasks.find((tk) => tk.Name === n);
            if (!task) return send(res, 500, `Unknown task: ${n}`);
            try {
              per.set(n, await runTask(a, task));
            } catch (err) {
              per.delete(n);
              return send(res, 500, `failed to restart task ${n}: ${(err as Error).message}`);
            }
          } finally {
            restarting.delete(cid);
          }
        }
      }
      write(['allocs'], (i) => {
        for (const n of names) {
          const st = a.TaskStates![n]!;
          if (st.State !== 'running') continue;
          st.Restarts++;
          st.LastRestart = new Date().toISOString();
          st.Events!.push({ Type: 'Restart Signaled', Time: Date.now() * 1e6, DisplayMessage: 'User requested restart', RestartReason: 'User requested restart' });
          st.Events!.push({ Type: 'Restarting', Time: Date.now() * 1e6, DisplayMessage: 'Task restarting in 0s' });
          st.Events!.push({ Type: 'Started', Time: Date.now() * 1e6, DisplayMessage: 'Task started by client' });
        }
        a.ModifyIndex = i;
        return [allocEvent('AllocationUpdated', a, i)];
      });
      return send(res, 200, {});
    }

    if (method === 'GET' && p === '/v1/event/stream') {
      const topics = u.searchParams.getAll('topic').map((s) => {
        const i = s.indexOf(':');
        return i < 0 ? { topic: s, key: '*' } : { topic: s.slice(0, i), key: s.slice(i + 1) || '*' };
      });
      if (topics.length === 0) topics.push({ topic: '*', key: '*' });
      const from = Number(u.searchParams.get('index') ?? '0');
      res.writeHead(200, { 'Content-Type': 'application/json' });
      // nomad/stream/ndjson.go (NewJsonStream, v1.7.3) sends a heartbeat at once, then one per interval.
      res.write('{}\n');
      const s: Stream = {
        res,
        topics,
        heartbeat: setInterval(() => res.write('{}\n'), heartbeatMs),
      };
      // Replay from the buffer like Nomad's EventBroker.Subscribe / eventBuffer.StartAtClosest
      // (nomad/stream/event_buffer.go): index 0 or absent starts at the buffer's head (the
      // oldest retained batch, so everything is replayed here since nothing is evicted);
      // otherwise at the first batch with Index >= the requested one, and if the requested
      // index is past the newest batch, at the newest batch (which is then re-sent).
      const last = eventLog.at(-1);
      if (from > 0 && last && from > last.Index) sendBatch(s, last);
      else for (const b of eventLog) if (b.Index >= from) sendBatch(s, b);
      streams.add(s);
      const cleanup = (): void => {
        clearInterval(s.heartbeat);
        streams.delete(s);
      };
      res.on('close', cleanup);
      return;
    }

    return send(res, 404, `Invalid method or path: ${method} ${p}`);
  }

  const server = http.createServer((req, res) => {
    handle(req, res).catch((e: unknown) => {
      if (!res.headersSent) send(res, 500, String(e));
      else res.destroy();
    });
  });

  // /v1/client/allocation/:id/exec: a WebSocket of JSON frames, byte fields base64 (Nomad's
  // api/allocations_exec.go): stdin {data}/{close} in; stdout/stderr {data} and a final
  // {exited: true, result: {exit_code}} out. Runs as a docker exec in the task's container.
  const wss = new WebSocketServer({ noServer: true });
  server.on('upgrade', (req: http.IncomingMessage, socket: Duplex, head: Buffer) => {
    const u = new URL(req.url ?? '/', 'http://fake');
    fake.requests.push({ method: 'GET', path: u.pathname, url: req.url ?? '/' });
    const refuse = (status: number, text: string): void => {
      socket.end(`HTTP/1.1 ${status} ${http.STATUS_CODES[status]}\r\nContent-Type: text/plain\r\nContent-Length: ${Buffer.byteLength(text)}\r\nConnection: close\r\n\r\n${text}`);
    };
    const m = u.pathname.match(/^\/v1\/client\/allocation\/([^/]+)\/exec$/);
    if (!m) return refuse(404, `Invalid method or path: GET ${u.pathname}`);
    let command: unknown;
    try {
      command = JSON.parse(u.searchParams.get('command') ?? '');
    } catch (e) {
      // command/agent/alloc_endpoint.go (allocExec, v1.7.3): the only refusal before the upgrade.
      return refuse(500, `failed to marshal command into json: ${(e as Error).message}`);
    }
    // Everything else is decided after the WebSocket upgrade and arrives as a close frame whose
    // code is toWsCode(the RPC error's code): 1011 for 500 (and for errors without a code, such
    // as structs.ErrPermissionDenied from ClientAllocations.Exec), 1008 for any other
    // (command/agent/alloc_endpoint.go execStreamImpl; nomad/client_alloc_endpoint.go;
    // client/alloc_endpoint.go execImpl; v1.7.3).
    wss.handleUpgrade(req, socket, head, (ws: WebSocket) => {
      const allocId = decodeURIComponent(m[1]!);
      const a = allocs.get(allocId);
      const task = u.searchParams.get('task') ?? '';
      const closeWith = (code: 1008 | 1011, reason: string): void => ws.close(code, reason.slice(0, 120));
      if (!a) return closeWith(1008, `Unknown allocation ${JSON.stringify(allocId)}`);
      const denied = authorize(req, 'GET', u.pathname);
      if (denied) return closeWith(1011, denied.text);
      if (['complete', 'failed', 'lost'].includes(a.ClientStatus)) return closeWith(1008, `exec not possible, client status of allocation ${a.ID} is ${a.ClientStatus}`);
      if (!Array.isArray(command) || command.length === 0 || !command.every((c) => typeof c === 'string')) return closeWith(1008, 'command is not present');
      const st = a.TaskStates?.[task];
      if (!st) return closeWith(1008, `unknown task name ${JSON.stringify(task)}`);
      const cid = containers.get(a.ID)?.get(task);
      if (st.State === 'pending') return closeWith(1008, `task ${JSON.stringify(task)} not started yet.`);
      if (st.State !== 'running' || !docker || !cid) return closeWith(1008, `task ${JSON.stringify(task)} is not running.`);
      const stdin: Buffer[] = [];
      ws.on('message', (raw) => {
        let frame: { stdin?: { data?: string; close?: boolean } };
        try {
          frame = JSON.parse(raw.toString()) as typeof frame;
        } catch {
          ws.close(1003, 'frame is not JSON');
          return;
        }
        if (frame.stdin?.data) stdin.push(Buffer.from(frame.stdin.data, 'base64'));
        if (!frame.stdin?.close) return;
        docker
          .exec(cid, command as string[], { stdin: Buffer.concat(stdin), timeoutMs: 30_000 })
          .then((r) => {
            if (r.stdout.length) ws.send(JSON.stringify({ stdout: { data: r.stdout.toString('base64') } }));
            if (r.stderr.length) ws.send(JSON.stringify({ stderr: { data: r.stderr.toString('base64') } }));
            ws.send(JSON.stringify({ exited: true, result: { exit_code: r.exitCode } }));
            ws.close(1000);
          })
          .catch((e: unknown) => ws.close(1011, String((e as Error).message).slice(0, 120)));
      });
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;

  let closed = false;
  const fake: FakeNomad = {
    address: `http://127.0.0.1:${port}`,
    requests: [],
    delayMs: 0,
    get index() {
      return index;
    },
    heartbeatMs,
    get openStreams() {
      return streams.size;
    },
    failNext(status: number, count = 1) {
      fail = { status, count };
    },
    async loseNode() {
      const down = node;
      node = nodeOf(++nodeNumber);
      const lost: NomadAllocation[] = [];
      let placed: NomadAllocation[] = [];
      write(['allocs', 'jobs'], (i) => {
        const evs: NomadEvent[] = [];
        const nowNs = Date.now() * 1e6;
        for (const a of allocs.values()) {
          if (a.NodeID !== down.id || a.DesiredStatus !== 'run' || !['pending', 'running'].includes(a.ClientStatus)) continue;
          // markStop(lost, AllocClientStatusLost, allocLost): scheduler/reconcile.go, generic_sched.go.
          a.DesiredStatus = 'stop';
          a.DesiredDescription = 'alloc is lost since its node is down';
          a.ClientStatus = 'lost';
          a.ModifyIndex = i;
          a.ModifyTime = nowNs;
          lost.push(a);
          evs.push(allocEvent('PlanResult', a, i));
        }
        for (const old of lost) {
          const job = jobs.get(old.JobID);
          if (!job || job.Stop) continue;
          const more = place(job, i, { group: old.TaskGroup, previous: old });
          placed = placed.concat(more);
          for (const a of more) evs.push(allocEvent('PlanResult', a, i));
        }
        return evs;
      });
      for (const a of lost) await stopContainers(a);
      const byJob = new Map<string, string[]>();
      for (const a of placed) byJob.set(a.JobID, [...(byJob.get(a.JobID) ?? []), a.ID]);
      for (const [jobId, ids] of byJob) startLater(jobId, ids);
      return placed.map((a) => a.ID);
    },
    collectGarbage(allocId: string) {
      const a = allocs.get(allocId);
      if (!a || !['complete', 'failed', 'lost'].includes(a.ClientStatus)) throw new Error(`allocation ${allocId} is not terminal`);
      write(['allocs'], () => {
        allocs.delete(allocId);
        return [];
      });
    },
    containerOf(allocId: string, task?: string) {
      const per = containers.get(allocId);
      if (!per) return undefined;
      return task ? per.get(task) : per.values().next().value;
    },
    dropStreams() {
      for (const s of [...streams]) {
        clearInterval(s.heartbeat);
        streams.delete(s);
        s.res.socket?.destroy();
      }
    },
    async close() {
      if (closed) return;
      closed = true;
      for (const tm of timers) clearTimeout(tm);
      timers.clear();
      if (poller) clearInterval(poller);
      for (const w of [...waiters]) w();
      fake.dropStreams();
      for (const c of wss.clients) c.terminate();
      wss.close();
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
      await Promise.allSettled([...pending]);
      for (const cid of [...publishedBy.keys()]) unpublish(cid);
      if (sockDir) fs.rmSync(sockDir, { recursive: true, force: true });
      if (docker) {
        const r = await docker.request('GET', `/containers/json${query({ all: 1, filters: { label: [`${FAKE_NOMAD_LABEL}=${fakeId}`] } })}`).catch(() => undefined);
        for (const c of (Array.isArray(r?.json) ? r.json : []) as Array<{ Id: string }>) {
          await docker.request('DELETE', `/containers/${c.Id}${query({ force: 1, v: 1 })}`).catch(() => undefined);
        }
      }
    },
  };
  t.teardown(() => fake.close());
  return fake;
}
