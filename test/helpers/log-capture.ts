// The daemon's real logger (winston, JSON lines) at debug, writing into memory for assertions.
import { Writable } from 'node:stream';

import { createLogger, type Logger } from '../../src/observability/logger.js';

export interface LogLine {
  level: string;
  message: string;
  [k: string]: unknown;
}

export function capturingLogger(): { logger: Logger; lines: LogLine[] } {
  const lines: LogLine[] = [];
  const stream = new Writable({
    write(chunk: Buffer, _enc, cb) {
      for (const l of chunk.toString('utf8').split('\n')) if (l.trim()) lines.push(JSON.parse(l) as LogLine);
      cb();
    },
  });
  return { logger: createLogger('debug', stream), lines };
}
