#!/usr/bin/env node
// In a development checkout (sources and tsx present) this runs the TypeScript sources, so a
// stale build can never shadow them; an installed package or the container image, which ship
// only the compiled build (no tsx), run dist/.
import { existsSync } from 'node:fs';
import { fileURLToPath, pathToFileURL } from 'node:url';

const sources = fileURLToPath(new URL('../src/main.ts', import.meta.url));
let tsx = null;
if (existsSync(sources)) {
  try {
    tsx = await import('tsx/esm/api');
  } catch {
    tsx = null;
  }
}
if (tsx) {
  tsx.register();
  await import(pathToFileURL(sources).href);
} else {
  await import(new URL('../dist/src/main.js', import.meta.url).href);
}
