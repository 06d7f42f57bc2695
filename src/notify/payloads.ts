// The two webhook bodies the built-in notifier sends. 'alertmanager' is exactly what
// Alertmanager's webhook_config posts (version 4), so a receiver written for Alertmanager needs
// no change; 'slack' is a Slack incoming-webhook message (also accepted by Mattermost and
// Rocket.Chat's Slack-compatible hooks).

export type NoticeStatus = 'firing' | 'resolved';

export interface NoticeAlert {
  status: NoticeStatus;
  labels: Record<string, string>;
  annotations: Record<string, string>;
  /** Epoch ms. */
  startsAt: number;
  /** Epoch ms when resolved; null while firing. */
  endsAt: number | null;
  fingerprint: string;
}

/** One message: alerts of one alertname (Alertmanager's group_by: [alertname]) for one target. */
export interface NoticeGroup {
  receiver: string;
  alertname: string;
  alerts: NoticeAlert[];
  /** Alerts of the group left for the next message (the message size is bounded). */
  truncated: number;
  externalURL: string;
}

export interface AlertmanagerWebhookAlert {
  status: NoticeStatus;
  labels: Record<string, string>;
  annotations: Record<string, string>;
  startsAt: string;
  endsAt: string;
  generatorURL: string;
  fingerprint: string;
}

export interface AlertmanagerWebhook {
  version: '4';
  groupKey: string;
  truncatedAlerts: number;
  status: NoticeStatus;
  receiver: string;
  groupLabels: Record<string, string>;
  commonLabels: Record<string, string>;
  commonAnnotations: Record<string, string>;
  externalURL: string;
  alerts: AlertmanagerWebhookAlert[];
}

export interface SlackAttachment {
  color: string;
  fallback: string;
  title: string;
  text: string;
  fields: Array<{ title: string; value: string; short: boolean }>;
  footer: string;
  ts: number;
}

export interface SlackMessage {
  text: string;
  attachments: SlackAttachment[];
}

/** Go's zero time.Time, which Alertmanager sends as endsAt of a firing alert. */
export const ZERO_TIME = '0001-01-01T00:00:00Z';

/** Slack caps attachments per message; more alerts are summed up in the text. */
export const SLACK_MAX_ATTACHMENTS = 20;

/** firing when any alert of the message fires (Alertmanager's rule). */
function groupStatus(alerts: readonly NoticeAlert[]): NoticeStatus {
  return alerts.some((a) => a.status === 'firing') ? 'firing' : 'resolved';
}

function common(maps: ReadonlyArray<Record<string, string>>): Record<string, string> {
  if (maps.length === 0) return {};
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(maps[0]!)) if (maps.every((m) => m[k] === v)) out[k] = v;
  return out;
}

export function alertmanagerPayload(g: NoticeGroup): AlertmanagerWebhook {
  return {
    version: '4',
    // Route path (the root) and the group labels, as Alertmanager spells it.
    groupKey: `{}:{alertname=${JSON.stringify(g.alertname)}}`,
    truncatedAlerts: g.truncated,
    status: groupStatus(g.alerts),
    receiver: g.receiver,
    groupLabels: { alertname: g.alertname },
    commonLabels: common(g.alerts.map((a) => a.labels)),
    commonAnnotations: common(g.alerts.map((a) => a.annotations)),
    externalURL: g.externalURL,
    alerts: g.alerts.map((a) => ({
      status: a.status,
      labels: a.labels,
      annotations: a.annotations,
      startsAt: new Date(a.startsAt).toISOString(),
      endsAt: a.endsAt === null ? ZERO_TIME : new Date(a.endsAt).toISOString(),
      generatorURL: g.externalURL,
      fingerprint: a.fingerprint,
    })),
  };
}

/** Slack treats &, < and > as control characters in message text. */
export function slackEscape(text: string): string {
  return text.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

function colour(a: NoticeAlert): string {
  if (a.status === 'resolved') return 'good';
  return a.labels.severity === 'critical' ? 'danger' : 'warning';
}

export function slackPayload(g: NoticeGroup): SlackMessage {
  const firing = g.alerts.filter((a) => a.status === 'firing').length;
  const resolved = g.alerts.length - firing;
  const counts = [firing ? `FIRING:${firing}` : '', resolved ? `RESOLVED:${resolved}` : ''].filter(Boolean).join(' ');
  const shown = g.alerts.slice(0, SLACK_MAX_ATTACHMENTS);
  const more = g.alerts.length - shown.length + g.truncated;
  return {
    text: slackEscape(`[${counts}] ${g.alertname}${more > 0 ? ` (and ${more} more)` : ''}`),
    attachments: shown.map((a) => {
      const summary = a.annotations.summary ?? a.labels.alertname ?? g.alertname;
      const resource = a.labels.kind && a.labels.name ? `${a.labels.kind}/${a.labels.name}` : (a.labels.instance ?? '');
      const title = `[${a.status.toUpperCase()}] ${summary}`;
      return {
        color: colour(a),
        fallback: slackEscape(title),
        title: slackEscape(title),
        text: slackEscape(a.annotations.description ?? ''),
        fields: [
          { title: 'severity', value: slackEscape(a.labels.severity ?? ''), short: true },
          { title: 'resource', value: slackEscape(resource), short: true },
        ],
        footer: 'polydev-reconciler',
        ts: Math.floor((a.status === 'resolved' && a.endsAt !== null ? a.endsAt : a.startsAt) / 1000),
      };
    }),
  };
}
