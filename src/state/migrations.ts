import type Database from 'better-sqlite3';

// Append-only: a released migration is never edited, a change is a new entry.
export const MIGRATIONS: ReadonlyArray<{ version: number; name: string; sql: string }> = [
  {
    version: 1,
    name: 'initial',
    sql: `
CREATE TABLE resources (
  kind TEXT NOT NULL,
  name TEXT NOT NULL,
  uid TEXT NOT NULL,
  generation INTEGER NOT NULL,
  resource_version INTEGER NOT NULL,
  labels TEXT NOT NULL DEFAULT '{}',
  annotations TEXT NOT NULL DEFAULT '{}',
  spec TEXT NOT NULL,
  source TEXT NOT NULL,
  source_file TEXT,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL,
  deletion_requested_at TEXT,
  PRIMARY KEY (kind, name)
) WITHOUT ROWID;

-- ProxyPort admission looks users and source addresses up on every write.
CREATE INDEX proxyport_user ON resources (json_extract(spec, '$.userId')) WHERE kind = 'ProxyPort';
CREATE INDEX proxyport_source ON resources (json_extract(spec, '$.sourceIP')) WHERE kind = 'ProxyPort';

CREATE TABLE status (
  kind TEXT NOT NULL,
  name TEXT NOT NULL,
  phase TEXT NOT NULL,
  body TEXT NOT NULL,
  updated_at TEXT NOT NULL,
  PRIMARY KEY (kind, name)
) WITHOUT ROWID;

CREATE TABLE events (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  first_time TEXT NOT NULL,
  last_time TEXT NOT NULL,
  kind TEXT NOT NULL,
  name TEXT NOT NULL,
  type TEXT NOT NULL,
  reason TEXT NOT NULL,
  message TEXT NOT NULL,
  count INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX events_by_resource ON events (kind, name, id);

CREATE TABLE allocations (
  pool TEXT NOT NULL,
  port INTEGER NOT NULL,
  user_id TEXT NOT NULL,
  resource_name TEXT,
  state TEXT NOT NULL CHECK (state IN ('bound', 'cooldown')),
  bound_at TEXT NOT NULL,
  released_at TEXT,
  PRIMARY KEY (pool, port)
) WITHOUT ROWID;
CREATE UNIQUE INDEX allocations_one_bound_port_per_user ON allocations (user_id) WHERE state = 'bound';
CREATE INDEX allocations_by_user ON allocations (pool, user_id);

CREATE TABLE snapshots (
  kind TEXT NOT NULL,
  name TEXT NOT NULL,
  snapshot TEXT NOT NULL,
  updated_at TEXT NOT NULL,
  PRIMARY KEY (kind, name)
) WITHOUT ROWID;

CREATE TABLE backoff (
  kind TEXT NOT NULL,
  name TEXT NOT NULL,
  failures INTEGER NOT NULL,
  next_attempt_at INTEGER NOT NULL,
  last_error TEXT NOT NULL,
  PRIMARY KEY (kind, name)
) WITHOUT ROWID;

CREATE TABLE changes (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  kind TEXT NOT NULL,
  name TEXT NOT NULL,
  op TEXT NOT NULL,
  time TEXT NOT NULL
);

CREATE TABLE leases (
  name TEXT PRIMARY KEY,
  holder TEXT NOT NULL,
  pid INTEGER NOT NULL,
  hostname TEXT NOT NULL,
  acquired_at TEXT NOT NULL,
  renewed_at INTEGER NOT NULL
);
`,
  },
  {
    version: 2,
    name: 'warm pools and claims',
    sql: `
-- Facts about this installation. installation_id marks what this database owns in shared
-- engines (Docker label polydev.ai/owner), so two daemons on one engine never touch each other's.
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
INSERT INTO meta (key, value) VALUES ('installation_id', lower(hex(randomblob(6))));

-- One row per container of a WarmPool, keyed by the daemon's own id for it (the slot), which is
-- chosen before the engine is asked: a crash between create and record is adopted by slot.
CREATE TABLE pool_members (
  slot TEXT PRIMARY KEY,
  pool TEXT NOT NULL,
  engine TEXT NOT NULL,
  container_id TEXT,
  name TEXT NOT NULL,
  address TEXT,
  spec_hash TEXT NOT NULL,
  state TEXT NOT NULL CHECK (state IN ('starting', 'warm', 'claimed', 'releasing')),
  claim_id TEXT,
  created_at INTEGER NOT NULL,
  ready_at INTEGER
) WITHOUT ROWID;
CREATE INDEX pool_members_by_state ON pool_members (pool, state, ready_at);

CREATE TABLE claims (
  id TEXT PRIMARY KEY,
  pool TEXT NOT NULL,
  user_id TEXT NOT NULL,
  slot TEXT,
  container_id TEXT,
  container_name TEXT,
  address TEXT,
  warm INTEGER NOT NULL,
  state TEXT NOT NULL CHECK (state IN ('pending', 'bound', 'released', 'expired', 'failed')),
  reason TEXT,
  created_at INTEGER NOT NULL,
  bound_at INTEGER,
  expires_at INTEGER NOT NULL,
  ended_at INTEGER,
  latency_ms REAL
) WITHOUT ROWID;
-- The store-level guarantee behind "no container is ever given to two claims".
CREATE UNIQUE INDEX claims_one_open_per_slot ON claims (slot) WHERE state IN ('pending', 'bound');
CREATE INDEX claims_open_by_user ON claims (pool, user_id) WHERE state IN ('pending', 'bound');
CREATE INDEX claims_open_by_expiry ON claims (expires_at) WHERE state IN ('pending', 'bound');
CREATE INDEX claims_by_pool ON claims (pool, created_at);
`,
  },
  {
    version: 3,
    name: 'ports of warm containers and claims',
    sql: `
-- Port name → port (JSON object) where the engine maps ports (Nomad dynamic ports).
ALTER TABLE pool_members ADD COLUMN ports TEXT;
ALTER TABLE claims ADD COLUMN ports TEXT;
`,
  },
  {
    version: 4,
    name: 'built-in notifier',
    sql: `
-- Alerts the built-in notifier has seen active (pending or firing), by Alertmanager fingerprint.
-- active_at survives a restart so 'for' does not start over; a cleared alert that fired keeps
-- its row (resolved_at set) until every target that may have heard of it got the resolve.
CREATE TABLE notify_alerts (
  fingerprint TEXT PRIMARY KEY,
  alertname TEXT NOT NULL,
  labels TEXT NOT NULL,
  annotations TEXT NOT NULL,
  active_at INTEGER NOT NULL,
  starts_at INTEGER NOT NULL,
  firing INTEGER NOT NULL,
  resolved_at INTEGER
) WITHOUT ROWID;

-- What each webhook target is owed about each alert. notified: a firing notice may have reached
-- it (set before the first attempt: a timed-out request may still have arrived), so a resolve is
-- owed when the alert clears. due: a notice (status) is waiting to be sent at next_attempt_at.
CREATE TABLE notify_deliveries (
  target TEXT NOT NULL,
  fingerprint TEXT NOT NULL REFERENCES notify_alerts (fingerprint) ON DELETE CASCADE,
  status TEXT NOT NULL CHECK (status IN ('firing', 'resolved')),
  notified INTEGER NOT NULL DEFAULT 0,
  due INTEGER NOT NULL,
  sent_at INTEGER,
  attempts INTEGER NOT NULL DEFAULT 0,
  first_attempt_at INTEGER,
  next_attempt_at INTEGER NOT NULL,
  last_error TEXT,
  PRIMARY KEY (target, fingerprint)
) WITHOUT ROWID;
CREATE INDEX notify_deliveries_due ON notify_deliveries (target, next_attempt_at) WHERE due = 1;
CREATE INDEX notify_deliveries_by_alert ON notify_deliveries (fingerprint);
`,
  },
];

export function migrate(db: Database.Database): number {
  db.exec(`CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)`);
  const applied = new Set(
    (db.prepare('SELECT version FROM schema_migrations').all() as Array<{ version: number }>).map((r) => r.version),
  );
  const newest = Math.max(0, ...applied);
  const known = Math.max(...MIGRATIONS.map((m) => m.version));
  if (newest > known) {
    throw new Error(
      `database schema version ${newest} is newer than this build understands (${known}); refusing to touch it`,
    );
  }
  const insert = db.prepare('INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)');
  for (const m of MIGRATIONS) {
    if (applied.has(m.version)) continue;
    db.transaction(() => {
      db.exec(m.sql);
      insert.run(m.version, m.name, new Date().toISOString());
    })();
  }
  return known;
}
