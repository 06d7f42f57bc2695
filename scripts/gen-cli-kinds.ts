// `npx tsx scripts/gen-cli-kinds.ts [--check]`: writes src/cli/kinds-snapshot.ts, the kinds'
// names and printer columns that the CLI's read commands use instead of parsing crds/ at every
// call (src/cli/kinds.ts says why). Run it after editing a CRD; test/cli-kinds.test.ts fails while
// the snapshot differs (the CLI itself falls back to parsing the CRDs meanwhile). `--check`: exit
// 1 if the file is stale, change nothing.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { crdDigest, renderKindsSnapshot } from '../src/cli/kinds.js';
import { loadKinds } from '../src/desired/kinds.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const crdDir = path.join(ROOT, 'crds');
const target = path.join(ROOT, 'src', 'cli', 'kinds-snapshot.ts');
const text = renderKindsSnapshot(loadKinds(crdDir).values(), crdDigest(crdDir));
const current = fs.existsSync(target) ? fs.readFileSync(target, 'utf8') : '';
if (process.argv.includes('--check')) {
  if (current !== text) {
    console.error(`${path.relative(ROOT, target)} is stale: run npx tsx scripts/gen-cli-kinds.ts`);
    process.exit(1);
  }
} else if (current !== text) {
  fs.writeFileSync(target, text);
  console.log(`wrote ${path.relative(ROOT, target)}`);
} else {
  console.log(`${path.relative(ROOT, target)} is current`);
}
