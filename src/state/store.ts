import Database from 'better-sqlite3';
import { EventEmitter } from 'node:events';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { BackgroundCheckpointer, type CheckpointerOptions } from './checkpointer.js';
import { migrate } from './migrations.js';
import {
  API_VERSION,
  type Change,
  type EventInput,
  type JsonObject,
  type ResourceInput,
  type ResourceSource,
  type ResourceStatus,
  type StoredEvent,
  type StoredResource,
} from './types.js';
import { canonicalJson } from '../util/canonical-json.js';

export interface StoreOptions {
  /** Events kept in all; older ones are deleted (Kubernetes keeps an hour, we keep a count). */
  eventRetention?: number;
  /** Change-feed rows kept for other processes to catch up on. */
  changeRetention?: number;
  readonly?: boolean;
}

export interface UpsertResult {
  /** Read back on first access only (a bulk apply never needs it). */
  readonly resource: StoredResource;
  created: boolean;
  specChanged: boolean;
  metaChanged: boolean;
}

interface ResourceRow {
  kind: string;
  name: string;
  uid: string;
  generation: number;
  resource_version: number;
  labels: string;
  annotations: string;
  spec: string;
  source: string;
  source_file: string | null;
  created_at: string;
  updated_at: string;
  deletion_requested_at: string | null;
  status_body?: string | null;
}

interface EventRow {
  id: number;
  first_time: string;
  last_time: string;
  kind: string;
  name: string;
  type: 'Normal' | 'Warning';
  reason: string;
  message: string;
  count: number;
}

/**
 * The daemon's one source of truth: desired state, status, events, allocations,
 * machine snapshots, backoff deadlines and a change feed, in one SQLite file.
 * Every write is a transaction; listeners hear about changes only after commit.
 */
export class Store extends EventEmitter {
  readonly db: Database.Database;
  readonly file: string;
  private readonly eventRetention: number;
  private readonly changeRetention: number;
  private pending: Change[] = [];
  /** Status writes of the open transaction, announced as 'status' after commit (the Kubernetes status writer listens). */
  private pendingStatus: Array<{ kind: string; name: string }> = [];
  private txDepth = 0;
  private eventInserts = 0;

  constructor(file: string, options: StoreOptions = {}) {
    super();
    this.file = file;
    this.eventRetention = options.eventRetention ?? 10_000;
    this.changeRetention = options.changeRetention ?? 10_000;
    if (file !== ':memory:') {
      fs.mkdirSync(path.dirname(path.resolve(file)), { recursive: true, mode: 0o700 });
      if (!fs.existsSync(file)) fs.closeSync(fs.openSync(file, 'a', 0o600));
      fs.chmodSync(file, 0o600);
    }
    this.db = new Database(file, { readonly: options.readonly ?? false, timeout: 5000 });
    if (!options.readonly) {
      this.db.pragma('journal_mode = WAL');
      this.db.pragma('synchronous = NORMAL');
      this.db.pragma('foreign_keys = ON');
      migrate(this.db);
      for (const extra of ['-wal', '-shm']) {
        if (fs.existsSync(file + extra)) fs.chmodSync(file + extra, 0o600);
      }
    }
  }

  private checkpointer: BackgroundCheckpointer | undefined;

  /** Moves WAL checkpoints off this connection to a worker thread (the daemon; see checkpointer.ts). */
  checkpointInBackground(opts: CheckpointerOptions): BackgroundCheckpointer | undefined {
    if (this.file === ':memory:' || this.db.readonly || this.checkpointer) return this.checkpointer;
    this.checkpointer = new BackgroundCheckpointer(this.db, this.file, opts);
    return this.checkpointer;
  }

  close(): void {
    this.statements.clear();
    if (this.checkpointer) {
      this.checkpointer.stop();
      this.checkpointer = undefined;
      // What the worker had not copied yet goes into the database now, so the log is left empty.
      if (this.db.open) {
        try {
          this.db.pragma('wal_checkpoint(TRUNCATE)');
        } catch {
          // A reader elsewhere holds the log: SQLite finishes the checkpoint later, nothing is lost.
        }
      }
    }
    if (this.db.open) this.db.close();
  }

  private readonly statements = new Map<string, Database.Statement>();

  /** A prepared statement, prepared once per SQL text (preparing is most of a small query's cost). */
  stmt(sql: string): Database.Statement {
    let st = this.statements.get(sql);
    if (!st) {
      st = this.db.prepare(sql);
      this.statements.set(sql, st);
    }
    return st;
  }

  /** Runs fn in one transaction (nesting is a savepoint); change listeners fire after the outermost commit. */
  transaction<T>(fn: () => T): T {
    this.txDepth++;
    // Changes recorded by this (possibly nested) transaction start here; a rollback drops them.
    const mark = this.pending.length;
    const statusMark = this.pendingStatus.length;
    try {
      // IMMEDIATE takes the write lock up front, so two processes never deadlock upgrading a read lock.
      const result = this.db.transaction(fn).immediate();
      this.txDepth--;
      if (this.txDepth === 0) this.flushChanges();
      return result;
    } catch (err) {
      this.txDepth--;
      this.pending.length = mark;
      this.pendingStatus.length = statusMark;
      throw err;
    }
  }

  private flushChanges(): void {
    const changes = this.pending;
    this.pending = [];
    for (const c of changes) this.emit('change', c);
    // Not a 'change': the manager requeues on changes, and must not on its own status writes.
    const statuses = this.pendingStatus;
    this.pendingStatus = [];
    for (const st of statuses) this.emit('status', st);
  }

  private recordChange(kind: string, name: string, op: Change['op']): number {
    const info = this.stmt('INSERT INTO changes (kind, name, op, time) VALUES (?, ?, ?, ?)')
      .run(kind, name, op, new Date().toISOString());
    const seq = Number(info.lastInsertRowid);
    this.pending.push({ seq, kind, name, op });
    if (seq % 500 === 0) {
      this.stmt('DELETE FROM changes WHERE seq <= ?').run(seq - this.changeRetention);
    }
    return seq;
  }

  // ---- resources -------------------------------------------------------

  getResource<Spec = JsonObject>(kind: string, name: string): StoredResource<Spec> | undefined {
    const row = this.stmt(
        `SELECT r.*, s.body AS status_body FROM resources r
         LEFT JOIN status s ON s.kind = r.kind AND s.name = r.name
         WHERE r.kind = ? AND r.name = ?`,
      )
      .get(kind, name) as ResourceRow | undefined;
    return row ? (toResource(row) as StoredResource<Spec>) : undefined;
  }

  listResources<Spec = JsonObject>(kind?: string): Array<StoredResource<Spec>> {
    const sql = `SELECT r.*, s.body AS status_body FROM resources r
      LEFT JOIN status s ON s.kind = r.kind AND s.name = r.name
      ${kind ? 'WHERE r.kind = ?' : ''} ORDER BY r.kind, r.name`;
    const rows = (kind ? this.stmt(sql).all(kind) : this.stmt(sql).all()) as ResourceRow[];
    return rows.map((r) => toResource(r) as StoredResource<Spec>);
  }

  listKeys(): Array<{ kind: string; name: string }> {
    return this.stmt('SELECT kind, name FROM resources ORDER BY kind, name').all() as Array<{
      kind: string;
      name: string;
    }>;
  }

  /**
   * Creates or updates a resource. generation moves only when spec changes
   * (Kubernetes semantics); labels/annotations/source changes move resourceVersion only.
   */
  upsertResource(input: ResourceInput): UpsertResult {
    return this.transaction(() => {
      const now = new Date().toISOString();
      const existing = this.stmt('SELECT * FROM resources WHERE kind = ? AND name = ?')
        .get(input.kind, input.name) as ResourceRow | undefined;
      const spec = canonicalJson(input.spec);
      const labels = canonicalJson(input.labels ?? {});
      const annotations = canonicalJson(input.annotations ?? {});
      if (!existing) {
        const rv = this.recordChange(input.kind, input.name, 'upsert');
        this.stmt(
            `INSERT INTO resources (kind, name, uid, generation, resource_version, labels, annotations, spec,
             source, source_file, created_at, updated_at) VALUES (?, ?, ?, 1, ?, ?, ?, ?, ?, ?, ?, ?)`,
          )
          .run(input.kind, input.name, randomUUID(), rv, labels, annotations, spec, input.source,
            input.sourceFile ?? null, now, now);
        return this.result(input, true, true, true);
      }
      const specChanged = existing.spec !== spec;
      const metaChanged =
        existing.labels !== labels ||
        existing.annotations !== annotations ||
        existing.source !== input.source ||
        (existing.source_file ?? null) !== (input.sourceFile ?? null) ||
        existing.deletion_requested_at !== null;
      if (!specChanged && !metaChanged) {
        return this.result(input, false, specChanged, metaChanged);
      }
      const rv = this.recordChange(input.kind, input.name, 'upsert');
      this.stmt(
          `UPDATE resources SET generation = generation + ?, resource_version = ?, labels = ?, annotations = ?,
           spec = ?, source = ?, source_file = ?, updated_at = ?, deletion_requested_at = NULL
           WHERE kind = ? AND name = ?`,
        )
        .run(specChanged ? 1 : 0, rv, labels, annotations, spec, input.source, input.sourceFile ?? null, now,
          input.kind, input.name);
      return this.result(input, false, specChanged, metaChanged);
    });
  }

  private result(input: ResourceInput, created: boolean, specChanged: boolean, metaChanged: boolean): UpsertResult {
    const store = this;
    let cached: StoredResource | undefined;
    return {
      created,
      specChanged,
      metaChanged,
      get resource() {
        return (cached ??= store.getResource(input.kind, input.name)!);
      },
    };
  }

  /** Who wrote a resource, without reading the whole row. */
  getSource(kind: string, name: string): ResourceSource | undefined {
    const row = this.stmt('SELECT source FROM resources WHERE kind = ? AND name = ?').get(kind, name) as
      | { source: ResourceSource }
      | undefined;
    return row?.source;
  }

  /** Marks a resource for deletion; its controller tears down what it owns, then calls removeResource (a finalizer). */
  requestDeletion(kind: string, name: string): boolean {
    return this.transaction(() => {
      const info = this.stmt(
          `UPDATE resources SET deletion_requested_at = ? WHERE kind = ? AND name = ? AND deletion_requested_at IS NULL`,
        )
        .run(new Date().toISOString(), kind, name);
      if (info.changes > 0) {
        const rv = this.recordChange(kind, name, 'delete-requested');
        this.stmt('UPDATE resources SET resource_version = ? WHERE kind = ? AND name = ?').run(rv, kind, name);
      }
      return info.changes > 0 || this.getResource(kind, name) !== undefined;
    });
  }

  /** Removes the resource and everything stored about it except its events (they age out). */
  removeResource(kind: string, name: string): boolean {
    return this.transaction(() => {
      const info = this.stmt('DELETE FROM resources WHERE kind = ? AND name = ?').run(kind, name);
      this.stmt('DELETE FROM status WHERE kind = ? AND name = ?').run(kind, name);
      this.stmt('DELETE FROM snapshots WHERE kind = ? AND name = ?').run(kind, name);
      this.stmt('DELETE FROM backoff WHERE kind = ? AND name = ?').run(kind, name);
      if (info.changes > 0) this.recordChange(kind, name, 'deleted');
      return info.changes > 0;
    });
  }

  // ---- status ------------------------------------------------------------

  getStatus(kind: string, name: string): ResourceStatus | undefined {
    const row = this.stmt('SELECT body FROM status WHERE kind = ? AND name = ?').get(kind, name) as
      | { body: string }
      | undefined;
    return row ? (JSON.parse(row.body) as ResourceStatus) : undefined;
  }

  /** Writes status only when it differs (ignoring nothing): returns whether it changed. */
  setStatus(kind: string, name: string, status: ResourceStatus): boolean {
    const body = JSON.stringify(status);
    const info = this.stmt(
        `INSERT INTO status (kind, name, phase, body, updated_at) VALUES (?, ?, ?, ?, ?)
         ON CONFLICT (kind, name) DO UPDATE SET phase = excluded.phase, body = excluded.body,
           updated_at = excluded.updated_at WHERE status.body != excluded.body`,
      )
      .run(kind, name, status.phase, body, new Date().toISOString());
    if (info.changes > 0) {
      this.pendingStatus.push({ kind, name });
      if (this.txDepth === 0) this.flushChanges();
    }
    return info.changes > 0;
  }

  phaseCounts(): Array<{ kind: string; phase: string; n: number }> {
    return this.stmt(
        `SELECT r.kind AS kind, coalesce(s.phase, 'Pending') AS phase, count(*) AS n FROM resources r
         LEFT JOIN status s ON s.kind = r.kind AND s.name = r.name GROUP BY 1, 2`,
      )
      .all() as Array<{ kind: string; phase: string; n: number }>;
  }

  // ---- events ------------------------------------------------------------

  /** Records an event; a repeat of the resource's latest event bumps its count instead (as Kubernetes does). */
  recordEvent(e: EventInput): void {
    const now = new Date().toISOString();
    this.transaction(() => {
      const last = this.stmt('SELECT id, type, reason, message FROM events WHERE kind = ? AND name = ? ORDER BY id DESC LIMIT 1')
        .get(e.kind, e.name) as Pick<EventRow, 'id' | 'type' | 'reason' | 'message'> | undefined;
      if (last && last.type === e.type && last.reason === e.reason && last.message === e.message) {
        this.stmt('UPDATE events SET count = count + 1, last_time = ? WHERE id = ?').run(now, last.id);
        return;
      }
      const info = this.stmt(
          `INSERT INTO events (first_time, last_time, kind, name, type, reason, message) VALUES (?, ?, ?, ?, ?, ?, ?)`,
        )
        .run(now, now, e.kind, e.name, e.type, e.reason, e.message);
      if (++this.eventInserts % 100 === 0) {
        this.stmt('DELETE FROM events WHERE id <= ?').run(Number(info.lastInsertRowid) - this.eventRetention);
      }
    });
    this.emit('event', e);
  }

  listEvents(filter: { kind?: string; name?: string; limit?: number } = {}): StoredEvent[] {
    const where: string[] = [];
    const args: unknown[] = [];
    if (filter.kind) {
      where.push('kind = ?');
      args.push(filter.kind);
    }
    if (filter.name) {
      where.push('name = ?');
      args.push(filter.name);
    }
    args.push(filter.limit ?? 100);
    const rows = this.stmt(
        `SELECT * FROM (SELECT * FROM events ${where.length ? 'WHERE ' + where.join(' AND ') : ''}
         ORDER BY id DESC LIMIT ?) ORDER BY id`,
      )
      .all(...args) as EventRow[];
    return rows.map((r) => ({
      id: r.id,
      firstTimestamp: r.first_time,
      lastTimestamp: r.last_time,
      kind: r.kind,
      name: r.name,
      type: r.type,
      reason: r.reason,
      message: r.message,
      count: r.count,
    }));
  }

  // ---- snapshots and backoff ----------------------------------------------

  getSnapshot(kind: string, name: string): unknown {
    const row = this.stmt('SELECT snapshot FROM snapshots WHERE kind = ? AND name = ?').get(kind, name) as
      | { snapshot: string }
      | undefined;
    return row ? JSON.parse(row.snapshot) : undefined;
  }

  setSnapshot(kind: string, name: string, snapshot: unknown): void {
    this.stmt(
        `INSERT INTO snapshots (kind, name, snapshot, updated_at) VALUES (?, ?, ?, ?)
         ON CONFLICT (kind, name) DO UPDATE SET snapshot = excluded.snapshot, updated_at = excluded.updated_at`,
      )
      .run(kind, name, JSON.stringify(snapshot), new Date().toISOString());
  }

  getBackoff(kind: string, name: string): { failures: number; nextAttemptAt: number; lastError: string } | undefined {
    const row = this.stmt('SELECT failures, next_attempt_at, last_error FROM backoff WHERE kind = ? AND name = ?')
      .get(kind, name) as { failures: number; next_attempt_at: number; last_error: string } | undefined;
    return row ? { failures: row.failures, nextAttemptAt: row.next_attempt_at, lastError: row.last_error } : undefined;
  }

  listBackoff(): Array<{ kind: string; name: string; failures: number; nextAttemptAt: number }> {
    return (
      this.stmt('SELECT kind, name, failures, next_attempt_at FROM backoff').all() as Array<{
        kind: string;
        name: string;
        failures: number;
        next_attempt_at: number;
      }>
    ).map((r) => ({ kind: r.kind, name: r.name, failures: r.failures, nextAttemptAt: r.next_attempt_at }));
  }

  setBackoff(kind: string, name: string, failures: number, nextAttemptAt: number, lastError: string): void {
    this.stmt(
        `INSERT INTO backoff (kind, name, failures, next_attempt_at, last_error) VALUES (?, ?, ?, ?, ?)
         ON CONFLICT (kind, name) DO UPDATE SET failures = excluded.failures,
           next_attempt_at = excluded.next_attempt_at, last_error = excluded.last_error`,
      )
      .run(kind, name, failures, nextAttemptAt, lastError);
  }

  clearBackoff(kind: string, name: string): void {
    this.stmt('DELETE FROM backoff WHERE kind = ? AND name = ?').run(kind, name);
  }

  // ---- change feed (for other processes: the CLI writes, the daemon follows) --

  latestChangeSeq(): number {
    return (this.stmt('SELECT coalesce(max(seq), 0) AS s FROM changes').get() as { s: number }).s;
  }

  changesSince(seq: number, limit = 10_000): Change[] {
    return this.stmt('SELECT seq, kind, name, op FROM changes WHERE seq > ? ORDER BY seq LIMIT ?')
      .all(seq, limit) as Change[];
  }
}

function toResource(row: ResourceRow): StoredResource {
  const res: StoredResource = {
    apiVersion: API_VERSION,
    kind: row.kind,
    metadata: {
      name: row.name,
      uid: row.uid,
      generation: row.generation,
      resourceVersion: row.resource_version,
      labels: JSON.parse(row.labels) as Record<string, string>,
      annotations: JSON.parse(row.annotations) as Record<string, string>,
      creationTimestamp: row.created_at,
      ...(row.deletion_requested_at ? { deletionTimestamp: row.deletion_requested_at } : {}),
    },
    spec: JSON.parse(row.spec) as JsonObject,
    source: row.source as ResourceSource,
    ...(row.source_file ? { sourceFile: row.source_file } : {}),
  };
  if (row.status_body) res.status = JSON.parse(row.status_body) as ResourceStatus;
  return res;
}
