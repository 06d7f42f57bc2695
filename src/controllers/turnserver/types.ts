import fs from 'node:fs';
import type { DriftPolicy } from '../../runtime/convergence-machine.js';
import type { StoredResource } from '../../state/types.js';
import { parseDuration } from '../../util/duration.js';
import type { RestartPolicy } from './machine.js';

export type TurnTransportName = 'udp' | 'tcp' | 'tls';

/** The TurnServer spec as the CRD (crds/turnserver.yaml) defines it, after defaults. */
export interface TurnServerSpec {
  host: string;
  /** Host browsers are told to use (ICE servers, rendered config); default host. */
  publicHost?: string;
  ports: { stun: number; tls?: number };
  transports: TurnTransportName[];
  tls?: { caFile?: string; serverName?: string };
  realm: string;
  auth:
    | { mode: 'longTerm'; username: string; passwordFile: string; credentialTTL: string }
    | { mode: 'restSecret'; secretFile: string; credentialTTL: string };
  probe: { interval: string; timeout: string; failureThreshold: number };
  remediation: {
    command?: string[];
    systemdUnit?: string;
    nomadJob?: string;
    backoff: string;
    maxRestarts: number;
    window: string;
    /** How long a restart command may run. */
    timeout: string;
    /** Wait after a restart before the first probe (the server needs a moment to listen). */
    settle: string;
  };
  relayPortRange?: { min: number; max: number };
  prometheusPort?: number;
  driftPolicy: DriftPolicy;
}

export interface TurnServerDesired {
  name: string;
  generation: number;
  spec: TurnServerSpec;
  intervalMs: number;
  timeoutMs: number;
  credentialTtlMs: number;
  restartTimeoutMs: number;
  settleMs: number;
  policy: RestartPolicy;
}

export function turnServerDesired(resource: StoredResource): TurnServerDesired {
  const spec = resource.spec as unknown as TurnServerSpec;
  const r = spec.remediation;
  const canRestart = spec.driftPolicy === 'correct' && Boolean(r.command || r.systemdUnit || r.nomadJob);
  return {
    name: resource.metadata.name,
    generation: resource.metadata.generation,
    spec,
    intervalMs: parseDuration(spec.probe.interval),
    timeoutMs: parseDuration(spec.probe.timeout),
    credentialTtlMs: parseDuration(spec.auth.credentialTTL),
    restartTimeoutMs: parseDuration(r.timeout),
    settleMs: parseDuration(r.settle),
    policy: {
      failureThreshold: spec.probe.failureThreshold,
      canRestart,
      maxRestarts: r.maxRestarts,
      windowMs: parseDuration(r.window),
      backoffMs: parseDuration(r.backoff),
    },
  };
}

/** A secret the spec points at could not be read: reported as such (never its content). */
export class CredentialsError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'CredentialsError';
  }
}

/**
 * Reads a secret file: the first line, without its line ending (how such files are written by
 * hand and by `openssl rand`). An empty or missing file is an error naming the path only.
 */
export function readSecretFile(file: string, field: string): string {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    throw new CredentialsError(`${field} ${file} cannot be read: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  const secret = text.split(/\r?\n/, 1)[0] ?? '';
  if (secret === '') throw new CredentialsError(`${field} ${file} is empty`);
  return secret;
}
