// The spec that manifests/nomad/warm-container.json is rendered from (test/nomad-manifests.test.ts
// keeps the file equal to what the nomad engine would register for it).

import { LABELS, MANAGED_BY, type ContainerSpec } from '../../src/controllers/warmpool/engine.js';

export const WARM_TEMPLATE_SPEC: ContainerSpec = {
  pool: 'openai',
  provider: 'openai',
  slot: '0123456789',
  name: 'polydev-openai-0123456789',
  image: 'polydev-openai-runtime:latest',
  command: ['/usr/local/bin/runtime-agent'],
  args: ['--listen', '0.0.0.0:8080'],
  env: { POLYDEV_PROVIDER: 'openai' },
  resources: { cpuMHz: 1000, memoryMB: 1024, memoryMaxMB: 2048 },
  ports: [{ name: 'http', containerPort: 8080 }],
  specHash: '5f1c0a7e9b2d',
  labels: {
    [LABELS.managedBy]: MANAGED_BY,
    [LABELS.owner]: '0a1b2c3d4e5f',
    [LABELS.pool]: 'openai',
    [LABELS.provider]: 'openai',
    [LABELS.specHash]: '5f1c0a7e9b2d',
    [LABELS.slot]: '0123456789',
  },
};
