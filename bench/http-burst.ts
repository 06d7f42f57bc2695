// A load generator's client, as wrk or h2load have one: N keep-alive connections opened
// beforehand, one request per connection written in a single loop, and each response read
// with the least work (status line, Content-Length, body). node:http's client spends about
// as much CPU per request as the server does, and on a 2-CPU machine that time is taken
// from the server under test; this client keeps the measurement about the server.

import net from 'node:net';

export interface BurstResponse {
  status: number;
  body: string;
  /** The request's first byte written → the response's last byte read. */
  ms: number;
}

export interface HttpRequestSpec {
  method: string;
  path: string;
  headers?: Record<string, string>;
  body?: unknown;
}

export function encodeRequest(r: HttpRequestSpec): Buffer {
  const body = r.body === undefined ? undefined : Buffer.from(JSON.stringify(r.body));
  const head = [`${r.method} ${r.path} HTTP/1.1`, 'Host: 127.0.0.1', 'Connection: keep-alive'];
  for (const [k, v] of Object.entries(r.headers ?? {})) head.push(`${k}: ${v}`);
  if (body) head.push('Content-Type: application/json', `Content-Length: ${body.length}`);
  const headBuf = Buffer.from(`${head.join('\r\n')}\r\n\r\n`);
  return body ? Buffer.concat([headBuf, body]) : headBuf;
}

const HEADER_END = Buffer.from('\r\n\r\n');

/** Where a complete response ends in buf (-1: not yet); only Content-Length framing is accepted. */
function responseEnd(buf: Buffer): { end: number; status: number; bodyStart: number } | undefined {
  const h = buf.indexOf(HEADER_END);
  if (h < 0) return undefined;
  const head = buf.subarray(0, h).toString('latin1');
  const status = Number(head.slice(9, 12));
  const m = /\r\ncontent-length:\s*(\d+)/i.exec(head);
  if (!m) throw new Error(`response without Content-Length (chunked framing is not supported here): ${head.slice(0, 200)}`);
  const end = h + 4 + Number(m[1]);
  return buf.length >= end ? { end, status, bodyStart: h + 4 } : undefined;
}

export class RawConnections {
  private constructor(private readonly sockets: net.Socket[]) {}

  static async open(port: number, count: number, timeoutMs = 10_000): Promise<RawConnections> {
    const sockets = await Promise.all(
      Array.from(
        { length: count },
        () =>
          new Promise<net.Socket>((resolve, reject) => {
            const s = net.connect({ host: '127.0.0.1', port, noDelay: true });
            const timer = setTimeout(() => s.destroy(new Error(`connect to 127.0.0.1:${port}: no answer within ${timeoutMs} ms`)), timeoutMs);
            s.once('connect', () => {
              clearTimeout(timer);
              resolve(s);
            });
            s.once('error', (err) => {
              clearTimeout(timer);
              reject(err);
            });
          }),
      ),
    );
    return new RawConnections(sockets);
  }

  get size(): number {
    return this.sockets.length;
  }

  /** Sockets the server closed (a burst over a closed one would measure a reconnect, so it fails instead). */
  get closed(): number {
    return this.sockets.filter((s) => s.destroyed || s.readyState !== 'open').length;
  }

  /** Writes requests[i] on connection i, all in one loop, and waits for every response. */
  burst(requests: Buffer[], timeoutMs = 60_000): Promise<BurstResponse[]> {
    if (requests.length > this.sockets.length) throw new Error(`${requests.length} requests for ${this.sockets.length} connections`);
    if (this.closed > 0) throw new Error(`${this.closed} of the connections were closed by the server`);
    return new Promise((resolve, reject) => {
      const out: BurstResponse[] = new Array(requests.length);
      const started: number[] = new Array(requests.length);
      const cleanups: Array<() => void> = [];
      let pending = requests.length;
      const finish = (err?: Error) => {
        clearTimeout(timer);
        for (const c of cleanups) c();
        if (err) reject(err);
        else resolve(out);
      };
      const timer = setTimeout(() => finish(new Error(`burst: ${pending} of ${requests.length} responses missing after ${timeoutMs} ms`)), timeoutMs);
      requests.forEach((_, i) => {
        const s = this.sockets[i]!;
        let buf: Buffer = Buffer.alloc(0);
        const onData = (chunk: Buffer) => {
          const now = performance.now();
          buf = buf.length ? Buffer.concat([buf, chunk]) : chunk;
          let r;
          try {
            r = responseEnd(buf);
          } catch (err) {
            finish(err as Error);
            return;
          }
          if (!r) return;
          out[i] = { status: r.status, body: buf.subarray(r.bodyStart, r.end).toString('utf8'), ms: now - started[i]! };
          s.off('data', onData);
          if (--pending === 0) finish();
        };
        const onClose = () => finish(new Error(`connection ${i} closed during the burst`));
        s.on('data', onData);
        s.once('close', onClose);
        cleanups.push(() => {
          s.off('data', onData);
          s.off('close', onClose);
        });
      });
      for (let i = 0; i < requests.length; i++) {
        started[i] = performance.now();
        this.sockets[i]!.write(requests[i]!);
      }
    });
  }

  close(): void {
    for (const s of this.sockets) s.destroy();
  }
}
