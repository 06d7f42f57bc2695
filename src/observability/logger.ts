import winston from 'winston';

export type LogLevel = 'error' | 'warn' | 'info' | 'debug';
export type Logger = winston.Logger;

const SECRET_KEY = /pass(word)?|secret|token|authorization|credential|cookie|apikey|api_key/i;
const SECRET_IN_TEXT = /(Bearer\s+|Basic\s+|password=|secret=|token=)[^\s"',;]+/gi;

/** Replaces values under secret-looking keys, and secret-looking fragments inside strings, before anything is written. */
export function redact(value: unknown, depth = 0): unknown {
  if (depth > 8) return '[…]';
  if (typeof value === 'string') return value.replace(SECRET_IN_TEXT, '$1[REDACTED]');
  if (Array.isArray(value)) return value.map((v) => redact(v, depth + 1));
  if (value instanceof Error) return { name: value.name, message: redact(value.message, depth + 1) };
  if (value !== null && typeof value === 'object') {
    const out: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(value)) out[k] = SECRET_KEY.test(k) ? '[REDACTED]' : redact(v, depth + 1);
    return out;
  }
  return value;
}

const redactFormat = winston.format((info) => {
  for (const key of Object.keys(info)) {
    if (key === 'level' || key === 'timestamp') continue;
    info[key] = SECRET_KEY.test(key) ? '[REDACTED]' : redact(info[key]);
  }
  return info;
});

/**
 * JSON lines, one per entry: journald and log shippers take them as they are.
 * The daemon logs to stdout; CLI commands log to stderr so their output stays clean.
 */
/** JSON lines to stdout, stderr, or any writable stream (tests read what was logged). */
export function createLogger(level: LogLevel, stream: 'stdout' | 'stderr' | NodeJS.WritableStream = 'stdout'): Logger {
  return winston.createLogger({
    level,
    format: winston.format.combine(redactFormat(), winston.format.timestamp(), winston.format.json()),
    transports: [
      typeof stream === 'string'
        ? new winston.transports.Console({ stderrLevels: stream === 'stderr' ? ['error', 'warn', 'info', 'debug'] : [] })
        : new winston.transports.Stream({ stream }),
    ],
  });
}

export function silentLogger(): Logger {
  return winston.createLogger({ silent: true, transports: [new winston.transports.Console({ silent: true })] });
}
