// The built-in notifier inside a running daemon: a WarmPool whose Docker socket is missing has
// been EngineUnavailable for an hour (the status the daemon finds in its database), so the
// PolydevEngineUnavailable alert is due at once; the daemon's own reconcile keeps that condition,
// the notifier delivers it to a real webhook in both formats, and a resolve follows the pool's removal.

import test from 'ava';
import fs from 'node:fs';
import path from 'node:path';
import YAML from 'yaml';
import { ADMISSIONS, createValidator } from '../src/controllers/registry.js';
import { applyPath } from '../src/desired/apply.js';
import { Store } from '../src/state/store.js';
import { e2eEnv, startDaemon, waitFor } from './helpers/e2e-env.js';
import { startReceiver } from './helpers/webhook-receiver.js';

test.serial('a daemon with notify.targets sends a firing alert of its own state, then its resolve', async (t) => {
  const env = await e2eEnv(t);
  const am = await startReceiver(t);
  const slack = await startReceiver(t);
  const cfgFile = env.writeConfig({
    // A Docker socket nobody listens on: the pool's engine is unavailable.
    docker: { socket: path.join(env.dir, 'no-dockerd.sock') },
    notify: {
      targets: [
        { name: 'pager', format: 'alertmanager', url: am.url('/hook') },
        { name: 'chat', format: 'slack', url: slack.url('/services/T0/B0/not-a-real-token') },
      ],
      evaluationInterval: '200ms',
    },
  });

  // The state a previous run left: the pool, not Ready because its engine is missing, since an hour ago.
  const hourAgo = new Date(Date.now() - 3_600_000).toISOString();
  const seed = new Store(env.db);
  const poolFile = path.join(env.dir, 'gpu.yaml');
  fs.writeFileSync(poolFile, YAML.stringify({
    apiVersion: 'polydev.ai/v1alpha1',
    kind: 'WarmPool',
    metadata: { name: 'gpu' },
    spec: { provider: 'openai', engine: 'docker', image: 'example/worker:1', command: ['sleep', '1000'], size: 1, maxSize: 1 },
  }));
  const applied = applyPath(seed, createValidator(), ADMISSIONS, poolFile);
  t.true(applied.ok, JSON.stringify(applied.problems));
  seed.setStatus('WarmPool', 'gpu', {
    phase: 'Backoff',
    conditions: [{ type: 'Ready', status: 'False', reason: 'EngineUnavailable', message: 'cannot reach the Docker socket', lastTransitionTime: hourAgo }],
  });
  seed.close();

  const daemon = await startDaemon(t, cfgFile);
  // The waits below are hang guards (a passing wait costs only its own time): generous for a
  // loaded machine, where the daemon's start and first evaluations take many times longer.
  const WAIT_MS = 90_000;
  const [firing] = await am.waitFor(1, WAIT_MS);
  const body = firing!.body as { status: string; alerts: Array<{ status: string; labels: Record<string, string>; startsAt: string }> };
  t.is(body.status, 'firing');
  const alert = body.alerts.find((a) => a.labels.alertname === 'PolydevEngineUnavailable');
  t.truthy(alert, JSON.stringify(body));
  t.is(alert!.labels.name, 'gpu');
  t.is(alert!.labels.kind, 'WarmPool');
  // Fired once the condition had lasted the rule's `for` (2m), as Prometheus's startsAt does: counted
  // from when the condition began an hour ago, not from when this daemon started.
  t.is(alert!.startsAt, new Date(Date.parse(hourAgo) + 120_000).toISOString());
  const [chat] = await slack.waitFor(1, WAIT_MS);
  t.regex(JSON.stringify(chat!.body), /PolydevEngineUnavailable|gpu/);
  t.is(daemon.store.getStatus('WarmPool', 'gpu')?.conditions.find((c) => c.type === 'Ready')?.reason, 'EngineUnavailable',
    'the daemon reconciled the pool and it is still without its engine');

  // No duplicates while it keeps firing.
  await new Promise((r) => setTimeout(r, 1500));
  t.is(am.received.filter((r) => (r.body as { status: string }).status === 'firing').length, 1);

  // The pool goes away (removed outright: its teardown would wait for the missing engine): the alert resolves, once.
  daemon.store.removeResource('WarmPool', 'gpu');
  await waitFor('the resolve', () => am.received.some((r) => (r.body as { status: string }).status === 'resolved'), WAIT_MS, 100);
  const resolved = am.received.find((r) => (r.body as { status: string }).status === 'resolved')!.body as typeof body;
  t.is(resolved.alerts[0]!.labels.alertname, 'PolydevEngineUnavailable');
  t.is(resolved.alerts[0]!.status, 'resolved');
  await waitFor('the slack resolve', () => slack.received.length >= 2, WAIT_MS, 100);
  await new Promise((r) => setTimeout(r, 1000));
  t.is(am.received.length, 2, 'one firing, one resolved');
});
