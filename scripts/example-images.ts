// `npm run example-images`: builds local stand-ins for the runtime images the bundled
// WarmPool examples name (polydev-{openai,anthropic,google}-runtime:latest), so the examples
// converge on a development machine. Each is busybox (from Debian's busybox-static) idling in
// `sleep`; no registry is contacted.
//
// The Docker engine: POLYDEV_DOCKER_SOCKET (the daemon's own setting, so the images land where
// the daemon looks), else DOCKER_HOST in its unix:// form (what the docker CLI honours), else
// /var/run/docker.sock. Only Unix sockets: the daemon talks to no other kind, so images pushed
// over tcp:// would be in an engine it cannot use. Every failure is one line and exit 1 (2 for a
// setting that cannot work); no stack trace.
import fs from 'node:fs';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { DockerClient } from '../src/drivers/docker.js';
import { BUSYBOX_BIN, importBusyboxImage } from '../test/helpers/dockerd.js';

const DEFAULT_SOCKET = '/var/run/docker.sock';

class SetupError extends Error {
  constructor(
    message: string,
    readonly exitCode: number,
  ) {
    super(message);
  }
}

/** The socket and the setting that named it. */
export function dockerSocket(env: NodeJS.ProcessEnv): { socket: string; from: string } {
  if (env.POLYDEV_DOCKER_SOCKET) return { socket: env.POLYDEV_DOCKER_SOCKET, from: 'POLYDEV_DOCKER_SOCKET' };
  const host = env.DOCKER_HOST;
  if (host) {
    if (host.startsWith('unix://')) return { socket: host.slice('unix://'.length), from: 'DOCKER_HOST' };
    throw new SetupError(
      `DOCKER_HOST=${host} is not supported: only unix:// sockets are (the daemon reaches Docker through a Unix socket only); ` +
        'set DOCKER_HOST=unix:///path/to/docker.sock or POLYDEV_DOCKER_SOCKET=/path/to/docker.sock',
      2,
    );
  }
  return { socket: DEFAULT_SOCKET, from: 'the default' };
}

/** `no such socket` rather than `Docker engine at unix:///x is not reachable: connect ENOENT /x`. */
function plainReason(message: string): string {
  if (/\bENOENT\b/.test(message)) return 'no such socket';
  if (/\bECONNREFUSED\b/.test(message)) return 'nothing is listening on it';
  if (/\bEACCES\b|\bEPERM\b/.test(message)) return 'permission denied (is this user in the docker group?)';
  return message.replace(/^Docker engine at \S+ is not reachable: /, '');
}

async function main(): Promise<void> {
  const { socket, from } = dockerSocket(process.env);
  if (!fs.existsSync(BUSYBOX_BIN)) throw new SetupError(`${BUSYBOX_BIN} is missing: install Debian's busybox-static (the images are built from it)`, 1);
  const client = new DockerClient({ socketPath: socket, requestTimeoutMs: 10_000 });
  try {
    await client.call('GET', '/_ping');
  } catch (err) {
    throw new SetupError(
      `cannot reach the Docker engine at unix://${socket} (${from}): ${plainReason((err as Error).message)}. ` +
        'Start dockerd, or point DOCKER_HOST=unix://PATH or POLYDEV_DOCKER_SOCKET=PATH at its socket',
      1,
    );
  } finally {
    client.close();
  }
  for (const provider of ['openai', 'anthropic', 'google']) {
    const tag = `polydev-${provider}-runtime:latest`;
    const id = await importBusyboxImage(socket, tag, {
      cmd: ['sleep', '2147483647'],
      changes: ['WORKDIR /workspace', `LABEL polydev.ai/stand-in=${provider}`],
    });
    console.log(`${tag} ${id}`);
  }
}

// Run as a script (npm run example-images), not when a test imports dockerSocket.
if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(path.resolve(process.argv[1])).href) {
  try {
    await main();
  } catch (err) {
    process.stderr.write(`example-images: ${(err as Error).message}\n`);
    process.exitCode = err instanceof SetupError ? err.exitCode : 1;
  }
}
