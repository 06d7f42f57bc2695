// A webhook receiver of the notifier tests: node:http on 127.0.0.1 (a free port) that records
// every request (arrival time, path, parsed JSON body) and answers as the test scripts it:
// a status (with headers), or 'hang' (never answers). Closed, connections and all, in t.teardown.

import type { ExecutionContext } from 'ava';
import http from 'node:http';
import type { AddressInfo } from 'node:net';

export interface ReceivedRequest {
  /** performance.now() at arrival of the whole body. */
  at: number;
  method: string;
  path: string;
  contentType: string | undefined;
  body: unknown;
  /** For a request answered 'hang': performance.now() when the client closed its connection (an abort or its timeout). */
  closedAt?: number;
}

export type Answer = { status: number; headers?: Record<string, string> } | 'hang';

export interface Receiver {
  /** The URL of path on this receiver. */
  url(path?: string): string;
  port: number;
  received: ReceivedRequest[];
  /** Resolves once n requests have arrived; throws after timeoutMs. */
  waitFor(n: number, timeoutMs: number): Promise<ReceivedRequest[]>;
  close(): Promise<void>;
}

/** answer(i) decides the answer to the i-th request (0-based); default 200. */
export async function startReceiver(t: ExecutionContext, answer: (i: number) => Answer = () => ({ status: 200 })): Promise<Receiver> {
  const received: ReceivedRequest[] = [];
  const waiters = new Set<() => void>();
  const server = http.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const text = Buffer.concat(chunks).toString('utf8');
      let body: unknown = text;
      try {
        body = JSON.parse(text);
      } catch {
        // Not JSON: kept as text, the test's assertions will say so.
      }
      const i = received.length;
      const rec: ReceivedRequest = { at: performance.now(), method: req.method ?? '', path: req.url ?? '', contentType: req.headers['content-type'], body };
      received.push(rec);
      for (const w of [...waiters]) w();
      const a = answer(i);
      if (a === 'hang') {
        res.once('close', () => (rec.closedAt = performance.now()));
        return;
      }
      res.writeHead(a.status, { 'content-type': 'text/plain', ...(a.headers ?? {}) });
      res.end(a.status < 300 ? 'ok' : 'no');
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const port = (server.address() as AddressInfo).port;
  let closed = false;
  const close = async (): Promise<void> => {
    if (closed) return;
    closed = true;
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  };
  t.teardown(close);
  return {
    port,
    received,
    url: (path = '/') => `http://127.0.0.1:${port}${path}`,
    close,
    waitFor: (n, timeoutMs) =>
      new Promise((resolve, reject) => {
        const check = (): boolean => {
          if (received.length < n) return false;
          waiters.delete(check);
          clearTimeout(timer);
          resolve(received.slice(0, n));
          return true;
        };
        const timer = setTimeout(() => {
          waiters.delete(check);
          reject(new Error(`waited ${timeoutMs} ms for ${n} request(s), got ${received.length}`));
        }, timeoutMs);
        waiters.add(check);
        check();
      }),
  };
}
