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

export type LogFormat = 'auto' | 'json' | 'text';

/** A value in a text line: bare when it is one word, else JSON-quoted, so a line stays one line. */
function textValue(v: unknown): string {
  if (typeof v === 'string') return /^[^\s"=]+$/.test(v) ? v : JSON.stringify(v);
  return JSON.stringify(v) ?? String(v);
}

/**
 * For a person at a terminal: local time, level, the resource, the message, then the other
 * fields as key=value (sorted, so the same entry reads the same way each time).
 */
const textFormat = winston.format.printf((info) => {
  const { level, message, timestamp, resource, ...rest } = info as Record<string, unknown>;
  const at = new Date(typeof timestamp === 'string' ? timestamp : Date.now());
  const time = `${String(at.getHours()).padStart(2, '0')}:${String(at.getMinutes()).padStart(2, '0')}:${String(at.getSeconds()).padStart(2, '0')}.${String(at.getMilliseconds()).padStart(3, '0')}`;
  const fields = Object.keys(rest)
    .filter((k) => typeof k === 'string' && rest[k] !== undefined)
    .sort()
    .map((k) => `${k}=${textValue(rest[k])}`);
  return [time, String(level).toUpperCase().padEnd(5), ...(resource ? [String(resource)] : []), String(message), ...fields].join(' ');
});

/** Whether `auto` means text: only when the log goes to a terminal. */
export function resolveLogFormat(format: LogFormat, stream: 'stdout' | 'stderr' | NodeJS.WritableStream): 'json' | 'text' {
  if (format !== 'auto') return format;
  const target = stream === 'stdout' ? process.stdout : stream === 'stderr' ? process.stderr : stream;
  return (target as { isTTY?: boolean }).isTTY === true ? 'text' : 'json';
}

/**
 * One entry per line: JSON (journald and log shippers take it as it is) or, at a terminal, text
 * for a person (see LogFormat). The daemon logs to stdout; CLI commands log to stderr so their
 * output stays clean; tests pass any writable stream and read what was logged.
 */
export function createLogger(level: LogLevel, stream: 'stdout' | 'stderr' | NodeJS.WritableStream = 'stdout', format: LogFormat = 'json'): Logger {
  return winston.createLogger({
    level,
    format: winston.format.combine(
      redactFormat(),
      winston.format.timestamp(),
      resolveLogFormat(format, stream) === 'text' ? textFormat : winston.format.json(),
    ),
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
