// A child process of test/allocation.test.ts: opens the shared database, says "ready", waits
// for "go" on stdin (so that every worker starts at once), then gives `count` users a port
// each through ensureUserPort and prints one JSON line with what it got.
//
//   node dist/test/helpers/unit-allocate-worker.js DB PREFIX COUNT OCTET   (compiled, as the test runs it)
//   node --import tsx test/helpers/unit-allocate-worker.ts DB PREFIX COUNT OCTET

import { ensureUserPort } from '../../src/controllers/proxyport/service.js';
import { createValidator } from '../../src/controllers/registry.js';
import { Store } from '../../src/state/store.js';

const [db, prefix, countText, octet] = process.argv.slice(2);
const count = Number(countText);
const store = new Store(db!);
const validator = createValidator();

process.stdout.write('ready\n');
process.stdin.once('data', () => {
  const ports: Array<{ userId: string; port: number }> = [];
  const errors: string[] = [];
  for (let i = 0; i < count; i++) {
    const userId = `${prefix}-${i}`;
    try {
      const out = ensureUserPort(store, validator, { userId, sourceIP: `10.${octet}.${Math.floor(i / 250)}.${(i % 250) + 1}` });
      ports.push({ userId, port: out.port });
    } catch (err) {
      errors.push(`${userId}: ${(err as Error).name}: ${(err as Error).message}`);
    }
  }
  store.close();
  process.stdout.write(JSON.stringify({ ports, errors }) + '\n');
  process.exit(0);
});
