// Spec and status shapes of the ProxyPool and ProxyPort kinds. crds/proxypool.yaml and
// crds/proxyport.yaml are the source of truth: they validate every write and fill in the
// defaults, so code that reads a stored spec sees every defaulted field set.

export interface PortRange {
  min: number;
  max: number;
}

export interface ProxyChains {
  /** nat chain holding one DNAT rule per user; jumped to from PREROUTING and OUTPUT. */
  nat: string;
  /** nat chain jumped to from POSTROUTING; masquerades forwarded traffic to the upstream. */
  postrouting: string;
  /** filter chain jumped to from FORWARD; accepts forwarded traffic to and from the upstream. */
  filter: string;
}

export interface HealthCheckSpec {
  /** URL that answers with the caller's IP (plain text, or JSON with an `ip` or `origin` field). */
  url: string;
  /** `connect` tunnels with HTTP CONNECT (needed for https URLs); `forward` sends a plain proxy request. */
  mode: 'connect' | 'forward';
  interval: string;
  timeout: string;
  failureThreshold: number;
  concurrency: number;
}

export interface ProxyPoolSpec {
  portRange: PortRange;
  upstream: {
    /** Hostname or IPv4 address; resolved at reconcile time and every resolveInterval. */
    host: string;
    scheme: 'http';
    /** File holding `username:password` for Proxy-Authorization; never logged or stored. */
    credentialsFile?: string;
    resolveInterval: string;
  };
  destinationPorts: number[];
  chains: ProxyChains;
  ipForward: boolean;
  portReuseCooldown: string;
  healthCheck?: HealthCheckSpec;
  driftPolicy: 'correct' | 'warn' | 'ignore';
}

export interface ProxyPortSpec {
  userId: string;
  sourceIP: string;
  port?: number;
  pool?: string;
}

export interface ProxyPortHealth {
  healthy: boolean;
  latencyMs: number | null;
  egressIP: string | null;
  lastVerifiedAt: string;
  consecutiveFailures: number;
  error?: string;
}

export const DEFAULT_CHAINS: ProxyChains = {
  nat: 'POLYDEV-PROXY',
  postrouting: 'POLYDEV-PROXY-MASQ',
  filter: 'POLYDEV-PROXY-FWD',
};
