import { timingSafeEqual } from 'node:crypto';
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import { HealthCheckError, type ProxyHealthChecker } from '../controllers/proxyport/health.js';
import { iceServersFor, NoHealthyTurnServerError } from '../controllers/turnserver/ice.js';
import { claimObject, ClaimServiceError, USER_ID, type ClaimInput, type ClaimService } from '../controllers/warmpool/claims.js';
import type { ClaimState } from '../state/pools.js';
import { ensureUserPort, findPortByUser, InvalidInputError, removeUserPort } from '../controllers/proxyport/service.js';
import { AdmissionError } from '../desired/apply.js';
import { resolveKindName } from '../desired/kinds.js';
import type { DesiredStateValidator } from '../desired/validate.js';
import type { Logger } from '../observability/logger.js';
import type { Metrics } from '../observability/metrics.js';
import type { Manager } from '../runtime/manager.js';
import type { Store } from '../state/store.js';
import type { StoredResource } from '../state/types.js';
import { registerStatusPage } from './status-page.js';

export interface ApiDeps {
  store: Store;
  validator: DesiredStateValidator;
  metrics: Metrics;
  logger: Logger;
  manager: Manager;
  health: ProxyHealthChecker;
  claims: ClaimService;
  /** The bearer token mutating calls need; undefined refuses every mutating call. */
  token: string | undefined;
  /** Set under leader election: a standby answers only /healthz, /readyz and /metrics. */
  leadership?: {
    isLeader(): boolean;
    holder(): Promise<{ identity: string; renewedAt: Date } | undefined>;
  };
}

/** What a standby still serves: a liveness probe must pass, readiness and metrics must tell the truth. */
const STANDBY_ROUTES = new Set(['/healthz', '/readyz', '/metrics']);

/** A JSON error with a stable code that clients can switch on. */
export class ApiError extends Error {
  constructor(
    readonly statusCode: number,
    readonly code: string,
    message: string,
    readonly details?: unknown,
  ) {
    super(message);
  }
}

const CONFLICT_CODES = new Set(['PORT_TAKEN', 'PORT_COOLING_DOWN', 'USER_HAS_PORT', 'SOURCE_IN_USE', 'DELETING', 'POOL_EXHAUSTED']);

/** Same shape as the resources of `get -o json`: status inside, source as an annotation-like field. */
export function publicResource(r: StoredResource): Record<string, unknown> {
  return { apiVersion: r.apiVersion, kind: r.kind, metadata: r.metadata, spec: r.spec, status: r.status ?? {} };
}

export function buildApi(deps: ApiDeps): FastifyInstance {
  // forceCloseConnections: a shutdown does not wait for keep-alive clients or slow requests.
  const app = Fastify({ logger: false, bodyLimit: 64 * 1024, forceCloseConnections: true });
  const { store, metrics, manager } = deps;

  const requireToken = async (req: FastifyRequest) => {
    if (!deps.token) throw new ApiError(403, 'API_TOKEN_NOT_CONFIGURED', 'mutating calls are disabled: set apiTokenFile in the config');
    const header = req.headers.authorization ?? '';
    const m = /^Bearer (.+)$/.exec(header);
    const given = Buffer.from(m?.[1] ?? '');
    const want = Buffer.from(deps.token);
    if (!m || given.length !== want.length || !timingSafeEqual(given, want)) {
      throw new ApiError(401, 'UNAUTHORIZED', 'a valid Authorization: Bearer token is required');
    }
  };

  app.setErrorHandler((err: unknown, req, reply) => {
    if (err instanceof ApiError) return sendError(reply, err);
    if (err instanceof InvalidInputError) return sendError(reply, new ApiError(400, 'INVALID', err.message, err.problems));
    if (err instanceof AdmissionError) {
      const status = err.code === 'POOL_NOT_FOUND' ? 404 : CONFLICT_CODES.has(err.code) ? 409 : 400;
      return sendError(reply, new ApiError(status, err.code, err.message, [{ field: err.field.join('.'), message: err.message }]));
    }
    if (err instanceof ClaimServiceError) {
      if (err.retryAfterSeconds !== undefined) reply.header('retry-after', String(err.retryAfterSeconds));
      return sendError(reply, new ApiError(err.status, err.code, err.message));
    }
    if (err instanceof NoHealthyTurnServerError) {
      reply.header('retry-after', '5');
      return sendError(reply, new ApiError(503, 'NO_HEALTHY_TURN_SERVER', err.message));
    }
    if (err instanceof HealthCheckError) {
      return sendError(reply, new ApiError(err.code === 'NOT_FOUND' ? 404 : 409, err.code, err.message));
    }
    const e = err as { statusCode?: number; code?: string; message?: string };
    if (e.statusCode && e.statusCode < 500) {
      return sendError(reply, new ApiError(e.statusCode, e.code === 'FST_ERR_CTP_INVALID_MEDIA_TYPE' ? 'UNSUPPORTED_MEDIA_TYPE' : 'BAD_REQUEST', e.message ?? 'bad request'));
    }
    deps.logger.error('API request failed', { method: req.method, url: req.url, error: e.message });
    return sendError(reply, new ApiError(500, 'INTERNAL', 'internal error; see the daemon log'));
  });
  app.setNotFoundHandler((req, reply) => sendError(reply, new ApiError(404, 'NOT_FOUND', `no route for ${req.method} ${req.url}`)));

  const { leadership } = deps;
  const standbyError = async (): Promise<ApiError> => {
    const h = await leadership?.holder().catch(() => undefined);
    return new ApiError(
      503,
      'STANDBY',
      `this daemon is a standby; ${h ? `the leader is ${h.identity}` : 'no daemon holds the lease right now'}`,
    );
  };
  if (leadership) {
    app.addHook('onRequest', async (req, reply) => {
      if (leadership.isLeader() || STANDBY_ROUTES.has(req.url.split('?')[0]!)) return;
      reply.header('retry-after', '2');
      return sendError(reply, await standbyError());
    });
  }

  app.get('/healthz', async () => ({ status: 'ok' }));
  app.get('/readyz', async (_req, reply) => {
    if (leadership && !leadership.isLeader()) {
      const err = await standbyError();
      return reply.code(503).send({ status: 'standby', error: { code: err.code, message: err.message } });
    }
    if (manager.isReady()) return { status: 'ready' };
    return reply.code(503).send({ status: 'starting', error: { code: 'NOT_READY', message: 'the first full sync is not done yet' } });
  });
  app.get('/metrics', async (_req, reply) => {
    reply.header('content-type', metrics.registry.contentType);
    return metrics.registry.metrics();
  });
  registerStatusPage(app, { store, ready: () => manager.isReady() });

  // ---- proxy ports (by user) ---------------------------------------------
  app.post('/api/v1/proxyports', { preHandler: requireToken }, async (req, reply) => {
    const body = objectBody(req.body, ['userId', 'sourceIP', 'port', 'pool']);
    const out = ensureUserPort(store, deps.validator, {
      userId: body.userId,
      sourceIP: body.sourceIP,
      port: body.port,
      pool: body.pool,
    });
    if (out.created) deps.logger.info('proxy port assigned', { resource: `ProxyPort/${out.resource.metadata.name}`, user: out.resource.spec.userId, port: out.port, pool: out.resource.spec.pool ?? 'default' });
    return reply.code(out.created ? 201 : 200).send({
      userId: out.resource.spec.userId,
      sourceIP: out.resource.spec.sourceIP,
      port: out.port,
      pool: out.resource.spec.pool ?? 'default',
      name: out.resource.metadata.name,
      created: out.created,
    });
  });
  app.post('/api/v1/proxyports/check', { preHandler: requireToken }, async (req) => {
    const body = req.body === undefined || req.body === null ? {} : objectBody(req.body, ['userIds', 'pool']);
    const userIds = body.userIds;
    if (userIds !== undefined && (!Array.isArray(userIds) || userIds.some((u) => typeof u !== 'string') || userIds.length > 10_000)) {
      throw new ApiError(400, 'INVALID', 'userIds must be an array of at most 10000 strings');
    }
    if (body.pool !== undefined && typeof body.pool !== 'string') throw new ApiError(400, 'INVALID', 'pool must be a string');
    return deps.health.check({
      ...(userIds ? { userIds: userIds as string[] } : {}),
      ...(body.pool ? { pool: body.pool as string } : {}),
    });
  });
  app.get('/api/v1/proxyports/:userId', async (req) => {
    const { userId } = req.params as { userId: string };
    // By user first (the documented route); a ProxyPort's own name works too (the generic route).
    const res = findPortByUser(store, userId) ?? store.getResource('ProxyPort', userId);
    if (!res) throw new ApiError(404, 'NOT_FOUND', `user ${userId} has no ProxyPort`);
    return publicResource(res as unknown as StoredResource);
  });
  app.delete('/api/v1/proxyports/:userId', { preHandler: requireToken }, async (req, reply) => {
    const { userId } = req.params as { userId: string };
    const res = removeUserPort(store, userId);
    if (!res) throw new ApiError(404, 'NOT_FOUND', `user ${userId} has no ProxyPort`);
    deps.logger.info('proxy port deletion requested', { resource: `ProxyPort/${res.metadata.name}`, user: userId });
    return reply.code(202).send({ userId, name: res.metadata.name, status: 'deleting' });
  });

  // ---- warm pools and claims ---------------------------------------------
  // Credentials arrive in env/files: the body limit is larger here, and nothing of the body is logged.
  app.post('/api/v1/pools/:pool/claims', { preHandler: requireToken, bodyLimit: 1024 * 1024 }, async (req, reply) => {
    const { pool } = req.params as { pool: string };
    const body = objectBody(req.body, ['userId', 'env', 'files', 'ttlSeconds']);
    for (const field of ['env', 'files'] as const) {
      const v = body[field];
      if (v !== undefined && (v === null || typeof v !== 'object' || Array.isArray(v))) {
        throw new ApiError(400, 'INVALID', `${field} must be an object of strings`);
      }
    }
    const out = await deps.claims.claim(pool, body as unknown as ClaimInput);
    // Who got what, never the credentials the body carried.
    deps.logger.info('claim granted', { resource: `WarmPool/${out.pool}`, claim: out.claimId, user: out.userId, container: out.container.name,
      warm: out.warm, latencyMs: Math.round(out.latencyMs), expiresAt: out.expiresAt });
    return reply.code(201).send(out);
  });
  app.get('/api/v1/pools/:pool/stats', async (req) => deps.claims.stats((req.params as { pool: string }).pool));
  app.get('/api/v1/claims', async (req) => {
    const q = req.query as Record<string, string | undefined>;
    const states = ['open', 'pending', 'bound', 'released', 'expired', 'failed'];
    if (q.state !== undefined && !states.includes(q.state)) throw new ApiError(400, 'INVALID', `state must be one of ${states.join(', ')}`);
    const limit = q.limit === undefined ? 1000 : Number(q.limit);
    if (!Number.isInteger(limit) || limit < 1 || limit > 10_000) throw new ApiError(400, 'INVALID', 'limit must be a whole number from 1 to 10000');
    const items = deps.claims.list({
      ...(q.pool !== undefined ? { pool: q.pool } : {}),
      ...(q.user !== undefined ? { userId: q.user } : {}),
      ...(q.state !== undefined ? { state: q.state as ClaimState | 'open' } : {}),
      limit,
    });
    return { apiVersion: 'v1', kind: 'ClaimList', items: items.map(claimObject) };
  });
  app.get('/api/v1/claims/:id', async (req) => claimObject(deps.claims.get((req.params as { id: string }).id)));
  app.delete('/api/v1/claims/:id', { preHandler: requireToken }, async (req) => {
    const claim = deps.claims.release((req.params as { id: string }).id);
    const released = claimObject(claim);
    deps.logger.info('claim released', { resource: `WarmPool/${claim.pool}`, claim: claim.id, user: claim.userId, state: released.state });
    return released;
  });

  // ---- ICE servers (TURN) ---------------------------------------------------
  // Hands out credentials (derived, short-lived): the token is required as for mutating calls.
  app.get('/api/v1/ice-servers', { preHandler: requireToken }, async (req, reply) => {
    const { userId } = req.query as { userId?: string };
    if (typeof userId !== 'string' || !USER_ID.test(userId)) {
      throw new ApiError(400, 'INVALID', 'userId: required; 1-128 of letters, digits and . _ @ -, starting with a letter or digit');
    }
    reply.header('cache-control', 'no-store');
    return iceServersFor(store, userId);
  });

  // ---- generic read access ---------------------------------------------
  app.get('/api/v1/:kind', async (req) => {
    const kind = kindOf(deps, (req.params as { kind: string }).kind);
    return { apiVersion: 'v1', kind: `${kind}List`, items: store.listResources(kind).map(publicResource) };
  });
  app.get('/api/v1/:kind/:name', async (req) => {
    const params = req.params as { kind: string; name: string };
    const kind = kindOf(deps, params.kind);
    const res = store.getResource(kind, params.name);
    if (!res) throw new ApiError(404, 'NOT_FOUND', `${kind} ${params.name} not found`);
    return publicResource(res);
  });
  return app;
}

function kindOf(deps: ApiDeps, name: string): string {
  const kind = resolveKindName(deps.validator.kinds, name);
  if (!kind) throw new ApiError(404, 'UNKNOWN_KIND', `unknown kind ${name}`);
  return kind;
}

/** A JSON object with only the given fields: a misspelt field is an error, as in YAML, not silently ignored. */
function objectBody(body: unknown, fields: string[]): Record<string, unknown> {
  if (body === null || typeof body !== 'object' || Array.isArray(body)) {
    throw new ApiError(400, 'INVALID', 'the request body must be a JSON object');
  }
  const unknown = Object.keys(body).filter((k) => !fields.includes(k));
  if (unknown.length > 0) {
    throw new ApiError(400, 'INVALID', `unknown field(s) ${unknown.map((k) => JSON.stringify(k)).join(', ')} (allowed: ${fields.join(', ')})`,
      unknown.map((k) => ({ field: k, message: 'unknown field' })));
  }
  return body as Record<string, unknown>;
}

function sendError(reply: FastifyReply, err: ApiError) {
  return reply
    .code(err.statusCode)
    .send({ error: { code: err.code, message: err.message, ...(err.details ? { details: err.details } : {}) } });
}
