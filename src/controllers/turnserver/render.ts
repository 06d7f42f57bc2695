import type { TurnServerSpec } from './types.js';

export interface RenderedConf {
  text: string;
  /** True when the text holds a credential (it then goes only to a 0600 file). */
  hasSecrets: boolean;
}

/**
 * A coturn config (turnserver.conf) matching a TurnServer, so the daemon's probe and the
 * server are configured from one source: ports, realm, relay range, auth mode and Prometheus.
 * Credentials come from the files the spec names: written into the text only when `secret`
 * is given (the CLI does so only with -o FILE); otherwise a commented line says what goes there.
 */
export function renderTurnserverConf(name: string, spec: TurnServerSpec, secret?: string): RenderedConf {
  const lines: string[] = [
    `# coturn configuration for TurnServer ${name}, rendered by polydev-reconciler.`,
    '# Edit the TurnServer resource and render again rather than editing this file.',
    `listening-port=${spec.ports.stun}`,
  ];
  if (isIpv4(spec.host)) lines.push(`listening-ip=${spec.host}`);
  if (spec.ports.tls) {
    lines.push(`tls-listening-port=${spec.ports.tls}`, '# TLS needs cert= and pkey= (paths of your certificate and key).');
  } else {
    lines.push('no-tls', 'no-dtls');
  }
  if (!spec.transports.includes('udp')) lines.push('no-udp');
  if (!spec.transports.includes('tcp') && !spec.transports.includes('tls')) lines.push('no-tcp');
  lines.push(`realm=${spec.realm}`);
  if (spec.publicHost && isIpv4(spec.publicHost)) lines.push(`external-ip=${spec.publicHost}`);
  if (spec.relayPortRange) lines.push(`min-port=${spec.relayPortRange.min}`, `max-port=${spec.relayPortRange.max}`);
  const { auth } = spec;
  if (auth.mode === 'longTerm') {
    lines.push('lt-cred-mech');
    lines.push(secret !== undefined ? `user=${auth.username}:${secret}` : `# user=${auth.username}:<the first line of ${auth.passwordFile}>   (render with -o FILE to fill it in)`);
  } else {
    lines.push('use-auth-secret');
    lines.push(secret !== undefined ? `static-auth-secret=${secret}` : `# static-auth-secret=<the first line of ${auth.secretFile}>   (render with -o FILE to fill it in)`);
  }
  if (spec.prometheusPort) lines.push('prometheus', `prometheus-port=${spec.prometheusPort}`);
  lines.push('fingerprint', 'no-cli', 'no-multicast-peers');
  return { text: lines.join('\n') + '\n', hasSecrets: secret !== undefined };
}

function isIpv4(h: string): boolean {
  return /^(\d{1,3}\.){3}\d{1,3}$/.test(h);
}
