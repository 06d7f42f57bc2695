// Prints the README's configuration table from src/config.ts's SETTINGS; test/config.test.ts checks the README holds it.
import { configReference } from '../src/config.js';

process.stdout.write(`${configReference()}\n`);
