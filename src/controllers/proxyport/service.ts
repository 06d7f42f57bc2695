import { createHash } from 'node:crypto';
import { AdmissionError } from '../../desired/apply.js';
import type { DesiredStateValidator } from '../../desired/validate.js';
import type { Store } from '../../state/store.js';
import type { JsonObject, ResourceSource, StoredResource } from '../../state/types.js';
import type { ProxyPortSpec } from '../proxypool/types.js';
import { proxyPortAdmission } from './admission.js';

const DNS1123_LABEL = /^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$/;

/** The ProxyPort name the API gives a user: the userId when it is a valid name, else a stable digest. */
export function portNameFor(userId: string): string {
  return DNS1123_LABEL.test(userId) ? userId : `u-${createHash('sha256').update(userId).digest('hex').slice(0, 16)}`;
}

export function findPortByUser(store: Store, userId: string): StoredResource<ProxyPortSpec> | undefined {
  const row = store.stmt(`SELECT name FROM resources WHERE kind = 'ProxyPort' AND json_extract(spec, '$.userId') = ? LIMIT 1`)
    .get(userId) as { name: string } | undefined;
  return row ? store.getResource<ProxyPortSpec>('ProxyPort', row.name) : undefined;
}

export class InvalidInputError extends Error {
  constructor(readonly problems: Array<{ field: string; message: string }>) {
    super(problems.map((p) => `${p.field}: ${p.message}`).join('; '));
    this.name = 'InvalidInputError';
  }
}

export interface PortRequest {
  userId: unknown;
  sourceIP: unknown;
  port?: unknown;
  pool?: unknown;
}

/**
 * Gives a user a port (the API's and the CLI's `proxyport add`): idempotent per user. Asking
 * again returns the same port; a new sourceIP moves the user's rule to the new address.
 */
export function ensureUserPort(
  store: Store,
  validator: DesiredStateValidator,
  req: PortRequest,
  source: ResourceSource = 'api',
): { resource: StoredResource<ProxyPortSpec>; created: boolean; port: number } {
  const spec: JsonObject = { userId: req.userId, sourceIP: req.sourceIP };
  if (req.port !== undefined && req.port !== null) spec.port = req.port;
  if (req.pool !== undefined && req.pool !== null) spec.pool = req.pool;
  const problems = validator.validateSpec('ProxyPort', spec);
  if (problems.length > 0) throw new InvalidInputError(problems);
  const userId = spec.userId as string;
  return store.transaction(() => {
    const existing = findPortByUser(store, userId);
    if (existing?.metadata.deletionTimestamp) {
      throw new AdmissionError(['spec', 'userId'], `the port of user ${userId} is being removed; try again when it is gone`, 'DELETING');
    }
    const name = existing?.metadata.name ?? portNameFor(userId);
    if (existing && spec.pool === undefined) spec.pool = existing.spec.pool;
    if (existing && spec.port === undefined && existing.spec.port !== undefined) spec.port = existing.spec.port;
    proxyPortAdmission.prepare(store)({ kind: 'ProxyPort', name, spec });
    const out = store.upsertResource({
      kind: 'ProxyPort',
      name,
      spec,
      source: existing?.source ?? source,
      labels: existing?.metadata.labels ?? {},
      annotations: existing?.metadata.annotations ?? {},
      ...(existing?.sourceFile ? { sourceFile: existing.sourceFile } : {}),
    });
    const port = (
      store.stmt(`SELECT port FROM allocations WHERE user_id = ? AND state = 'bound'`).get(userId) as { port: number }
    ).port;
    return { resource: out.resource as unknown as StoredResource<ProxyPortSpec>, created: out.created, port };
  });
}

/** Starts removing a user's port: the pool removes the rule, then the port goes into cooldown. */
export function removeUserPort(store: Store, userId: string): StoredResource<ProxyPortSpec> | undefined {
  const existing = findPortByUser(store, userId);
  if (!existing) return undefined;
  store.requestDeletion('ProxyPort', existing.metadata.name);
  return existing;
}
