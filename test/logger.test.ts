// The log formats: JSON lines for machines, text for a person at a terminal (logFormat auto picks
// by whether the stream is a terminal), secrets redacted in both.

import test from 'ava';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { PassThrough } from 'node:stream';

import { createLogger, resolveLogFormat } from '../src/observability/logger.js';
import { BUILT_MAIN, requireCurrentBuild } from './helpers/build.js';

function capture(): { stream: PassThrough; lines: () => string[] } {
  const stream = new PassThrough();
  let text = '';
  stream.setEncoding('utf8').on('data', (d: string) => (text += d));
  return { stream, lines: () => text.split('\n').filter(Boolean) };
}

const settle = (): Promise<void> => new Promise((r) => setImmediate(r));

test('json: one object per line, secrets redacted', async (t) => {
  const c = capture();
  const log = createLogger('info', c.stream, 'json');
  log.info('claim granted', { resource: 'WarmPool/openai', user: 'alice', token: 'tok-123456', detail: 'Bearer abc.def' });
  await settle();
  const [line] = c.lines();
  const entry = JSON.parse(line!) as Record<string, unknown>;
  t.is(entry['message'], 'claim granted');
  t.is(entry['level'], 'info');
  t.is(entry['token'], '[REDACTED]');
  t.is(entry['detail'], 'Bearer [REDACTED]');
  t.regex(String(entry['timestamp']), /^\d{4}-\d\d-\d\dT/);
});

test('text: time, level, resource, message, then sorted key=value; secrets redacted; one line per entry', async (t) => {
  const c = capture();
  const log = createLogger('debug', c.stream, 'text');
  log.warn('pool cannot start containers', { resource: 'WarmPool/openai', reason: 'EngineUnavailable', error: 'connect ENOENT /run/docker.sock\nsecond line', password: 'hunter2', count: 3 });
  log.debug('no resource here', { secret: 'x' });
  await settle();
  const [first, second] = c.lines();
  t.regex(first!, /^\d\d:\d\d:\d\d\.\d{3} WARN  WarmPool\/openai pool cannot start containers count=3 error="connect ENOENT \/run\/docker.sock\\nsecond line" password=\[REDACTED\] reason=EngineUnavailable$/);
  t.notRegex(first!, /hunter2/);
  t.regex(second!, /^\d\d:\d\d:\d\d\.\d{3} DEBUG no resource here secret=\[REDACTED\]$/);
  t.is(c.lines().length, 2, 'a newline inside a value does not split the entry');
});

test('auto: text at a terminal, JSON otherwise; explicit formats win', (t) => {
  const tty = Object.assign(new PassThrough(), { isTTY: true });
  t.is(resolveLogFormat('auto', tty), 'text');
  t.is(resolveLogFormat('auto', new PassThrough()), 'json');
  t.is(resolveLogFormat('json', tty), 'json');
  t.is(resolveLogFormat('text', new PassThrough()), 'text');
});

test('the compiled daemon logs text at a real terminal (script(1) gives it one) and JSON into a pipe', (t) => {
  requireCurrentBuild();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pd-logfmt-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const config = path.join(dir, 'config.yaml');
  fs.writeFileSync(config, `database: ${path.join(dir, 'p.db')}\n`);
  const args = [BUILT_MAIN, '--config', config, 'run', '--once'];
  const atTerminal = spawnSync('script', ['-qec', [process.execPath, ...args].map((a) => `'${a}'`).join(' '), '/dev/null'], { encoding: 'utf8', timeout: 60_000 });
  t.is(atTerminal.status, 0, atTerminal.stdout + atTerminal.stderr);
  t.regex(atTerminal.stdout, /^\d\d:\d\d:\d\d\.\d{3} INFO  /m, atTerminal.stdout);
  t.notRegex(atTerminal.stdout, /^\{"/m);
  const piped = spawnSync(process.execPath, args, { encoding: 'utf8', timeout: 60_000 });
  t.is(piped.status, 0, piped.stderr);
  t.regex(piped.stderr, /^\{".*"level":"info"/m, piped.stderr);
});
