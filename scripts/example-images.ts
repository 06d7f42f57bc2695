// `npm run example-images`: builds local stand-ins for the runtime images the bundled
// WarmPool examples name (polydev-{openai,anthropic,google}-runtime:latest), so the examples
// converge on a development machine. Each is busybox (from Debian's busybox-static) idling in
// `sleep`; no registry is contacted. Docker socket: POLYDEV_DOCKER_SOCKET or /var/run/docker.sock.
import { importBusyboxImage } from '../test/helpers/dockerd.js';

const socket = process.env.POLYDEV_DOCKER_SOCKET ?? '/var/run/docker.sock';
for (const provider of ['openai', 'anthropic', 'google']) {
  const tag = `polydev-${provider}-runtime:latest`;
  const id = await importBusyboxImage(socket, tag, {
    cmd: ['sleep', '2147483647'],
    changes: ['WORKDIR /workspace', `LABEL polydev.ai/stand-in=${provider}`],
  });
  console.log(`${tag} ${id}`);
}
