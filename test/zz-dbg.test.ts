import test from 'ava';
import { e2eEnv, manifest, EXAMPLE_USERS, startDaemon, saveNat, userRules, sleep, ruleOf, deleteSavedRule } from './helpers/e2e-env.js';
test('dbg', async (t) => {
  const env = await e2eEnv(t);
  env.writeDesired('proxy.yaml', manifest({}, EXAMPLE_USERS));
  const cfg = env.writeConfig({ desiredStateDir: env.desiredDir, logLevel: 'debug' });
  const { createLogger } = await import('../src/observability/logger.js');
  const d = await startDaemon(t, cfg, { logger: createLogger('info') });
  console.log(await d.waitConverged(10000));
  await deleteSavedRule(env.ns, 'nat', ruleOf(await saveNat(env.ns), 'alice')!);
  d.manager.resync();
  await sleep(2000);
  console.log(userRules(await saveNat(env.ns)));
  console.log(d.store.listEvents({}).map(e => `${e.kind}/${e.name} ${e.reason} ${e.message}`).join('\n'));
  t.pass();
});
