// A real Alertmanager (Debian's prometheus-alertmanager) on loopback, clustering off, with a temp
// storage dir, stopped by PID at teardown; and a webhook receiver of the test's own (node:http on
// 127.0.0.1) that records every notification Alertmanager sends.

import type { ExecutionContext } from 'ava';
import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import { startServer, type Server } from './prometheus.js';

export const ALERTMANAGER_BIN = '/usr/bin/prometheus-alertmanager';

/** Starts Alertmanager with `config` (alertmanager.yml) on a free 127.0.0.1 port. */
export async function startAlertmanager(t: ExecutionContext, config: string): Promise<Server> {
  return startServer(t, {
    name: 'alertmanager',
    bin: ALERTMANAGER_BIN,
    debianPackage: 'prometheus-alertmanager',
    setup: (dir) => {
      fs.writeFileSync(path.join(dir, 'alertmanager.yml'), config);
      fs.mkdirSync(path.join(dir, 'data'));
    },
    args: (port, dir) => [
      `--config.file=${path.join(dir, 'alertmanager.yml')}`,
      `--storage.path=${path.join(dir, 'data')}`,
      `--web.listen-address=127.0.0.1:${port}`,
      // Empty: no cluster listener (it would bind 0.0.0.0:9094 and gossip).
      '--cluster.listen-address=',
      '--log.level=warn',
    ],
    readyPath: '/-/ready',
  });
}

/** One alert of a webhook notification (Alertmanager's webhook payload, version 4). */
export interface WebhookAlert {
  status: 'firing' | 'resolved';
  labels: Record<string, string>;
  annotations: Record<string, string>;
  startsAt: string;
  endsAt: string;
}

export interface WebhookNotification {
  version: string;
  status: 'firing' | 'resolved';
  receiver: string;
  groupLabels: Record<string, string>;
  alerts: WebhookAlert[];
}

export interface WebhookReceiver {
  url: string;
  notifications: WebhookNotification[];
  /** Resolves with the first alert (in any notification so far or to come) that matches; throws after timeoutMs. */
  waitForAlert(what: string, match: (a: WebhookAlert, n: WebhookNotification) => boolean, timeoutMs: number): Promise<WebhookAlert>;
}

/** A webhook receiver on 127.0.0.1 (a free port); closed in t.teardown. */
export async function startWebhookReceiver(t: ExecutionContext): Promise<WebhookReceiver> {
  const notifications: WebhookNotification[] = [];
  const waiters = new Set<() => void>();
  const server = http.createServer((req, res) => {
    let body = '';
    req.setEncoding('utf8');
    req.on('data', (d: string) => {
      if (body.length < 1024 * 1024) body += d;
    });
    req.on('end', () => {
      try {
        notifications.push(JSON.parse(body) as WebhookNotification);
        res.writeHead(200).end();
      } catch {
        res.writeHead(400).end();
      }
      for (const w of waiters) w();
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  t.teardown(
    () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  );
  const addr = server.address();
  const port = typeof addr === 'object' && addr ? addr.port : 0;
  const find = (match: (a: WebhookAlert, n: WebhookNotification) => boolean): WebhookAlert | undefined => {
    for (const n of notifications) for (const a of n.alerts) if (match(a, n)) return a;
    return undefined;
  };
  return {
    url: `http://127.0.0.1:${port}/alerts`,
    notifications,
    waitForAlert(what, match, timeoutMs) {
      const found = find(match);
      if (found) return Promise.resolve(found);
      return new Promise<WebhookAlert>((resolve, reject) => {
        const check = () => {
          const a = find(match);
          if (!a) return;
          waiters.delete(check);
          clearTimeout(timer);
          resolve(a);
        };
        const timer = setTimeout(() => {
          waiters.delete(check);
          reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}; notifications so far: ${JSON.stringify(notifications).slice(0, 3000)}`));
        }, timeoutMs);
        waiters.add(check);
      });
    },
  };
}
