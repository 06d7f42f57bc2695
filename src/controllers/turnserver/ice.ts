import { restCredentials } from '../../drivers/turn.js';
import type { Store } from '../../state/store.js';
import type { StoredResource } from '../../state/types.js';
import { readSecretFile, turnServerDesired } from './types.js';

const KIND_TURN = 'TurnServer';

/** One entry of a browser's RTCConfiguration.iceServers. */
export interface IceServer {
  urls: string[];
  username?: string;
  credential?: string;
}

export interface IceServersAnswer {
  iceServers: IceServer[];
  /** Seconds the TURN credentials in the answer stay valid. */
  ttlSeconds: number | null;
  expiresAt: string | null;
  /** The TurnServers the answer comes from. */
  servers: string[];
}

export class NoHealthyTurnServerError extends Error {
  constructor(readonly considered: number) {
    super(considered === 0 ? 'no TurnServer is declared' : `none of the ${considered} TurnServer(s) is healthy right now`);
    this.name = 'NoHealthyTurnServerError';
  }
}

/** IPv6 literals go in brackets in a STUN/TURN URI (RFC 7064/7065). */
const uriHost = (h: string) => (h.includes(':') ? `[${h}]` : h);

/**
 * The ICE servers of every healthy TurnServer for one user. TURN REST servers get TURN URIs
 * with credentials derived for this user (username `<expiry>:<userId>`); a long-term server's
 * password is never handed out, so such a server is offered for STUN only.
 */
export function iceServersFor(store: Store, userId: string, now = Date.now()): IceServersAnswer {
  const all = store.listResources(KIND_TURN) as StoredResource[];
  const usable = all.filter((r) => !r.metadata.deletionTimestamp && r.status?.healthy === true);
  if (usable.length === 0) throw new NoHealthyTurnServerError(all.length);
  const iceServers: IceServer[] = [];
  let ttlSeconds: number | null = null;
  let expiresAt: number | null = null;
  for (const r of usable) {
    const d = turnServerDesired(r);
    const { spec } = d;
    const host = uriHost(spec.publicHost ?? spec.host);
    iceServers.push({ urls: [`stun:${host}:${spec.ports.stun}`] });
    if (spec.auth.mode !== 'restSecret') continue;
    const ttl = Math.max(60, Math.round(d.credentialTtlMs / 1000));
    let secret: string;
    try {
      secret = readSecretFile(spec.auth.secretFile, 'auth.secretFile');
    } catch {
      // Unreadable since the last probe: no credentials can be derived, so no TURN entry (its probe will say why).
      continue;
    }
    const creds = restCredentials(secret, userId, ttl, now);
    const urls: string[] = [];
    if (spec.transports.includes('udp')) urls.push(`turn:${host}:${spec.ports.stun}?transport=udp`);
    if (spec.transports.includes('tcp')) urls.push(`turn:${host}:${spec.ports.stun}?transport=tcp`);
    if (spec.transports.includes('tls') && spec.ports.tls) urls.push(`turns:${host}:${spec.ports.tls}?transport=tcp`);
    if (urls.length) iceServers.push({ urls, username: creds.username, credential: creds.password });
    ttlSeconds = ttlSeconds === null ? ttl : Math.min(ttlSeconds, ttl);
    expiresAt = expiresAt === null ? creds.expiresAt : Math.min(expiresAt, creds.expiresAt);
  }
  return {
    iceServers,
    ttlSeconds,
    expiresAt: expiresAt === null ? null : new Date(expiresAt).toISOString(),
    servers: usable.map((r) => r.metadata.name),
  };
}

