// Tiny "what is my IP" server for proxy health-check tests: answers every
// request with the caller's remote address, as seen by this server.

import http from 'node:http';
import type { AddressInfo } from 'node:net';

export interface IpEchoOptions {
  /** Listen address (default 127.0.0.1). */
  host?: string;
  /** Listen port (default 0: any free one). */
  port?: number;
  /** `text`: "1.2.3.4\n"; `json`: {"ip":"1.2.3.4"}. Default text. */
  format?: 'text' | 'json';
  /** Overrides the body entirely (e.g. garbage for badResponse tests); gets the caller's address. */
  body?: (remoteAddress: string) => string;
}

export interface IpEcho {
  url: string;
  port: number;
  /** Number of requests answered so far (live). */
  readonly requests: number;
  close(): Promise<void>;
}

export async function startIpEcho(opts: IpEchoOptions = {}): Promise<IpEcho> {
  const host = opts.host ?? '127.0.0.1';
  const format = opts.format ?? 'text';
  let requests = 0;
  const server = http.createServer((req, res) => {
    requests++;
    const addr = req.socket.remoteAddress ?? '';
    let body: string;
    let type: string;
    if (opts.body) {
      body = opts.body(addr);
      type = 'text/plain; charset=utf-8';
    } else if (format === 'json') {
      body = JSON.stringify({ ip: addr });
      type = 'application/json';
    } else {
      body = `${addr}\n`;
      type = 'text/plain; charset=utf-8';
    }
    req.resume();
    res.writeHead(200, { 'Content-Type': type, 'Content-Length': Buffer.byteLength(body), Connection: 'close' });
    res.end(body);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(opts.port ?? 0, host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  const port = (server.address() as AddressInfo).port;
  const urlHost = host.includes(':') ? `[${host}]` : host;
  return {
    url: `http://${urlHost}:${port}/`,
    port,
    get requests() {
      return requests;
    },
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}
