import { runCli } from './cli/main.js';

const code = await runCli(process.argv.slice(2));
// The daemon has closed everything by now; exit explicitly so no stray handle keeps the process.
process.exit(code);
