import type { SemanticCheck } from '../../desired/validate.js';

/**
 * Claims bind a user to a running container and carry credentials: they are made through the
 * API (or `polydev-reconciler claim`), one transaction each, never from desired-state YAML.
 */
export const claimDocumentsCheck: SemanticCheck = (resources, report) => {
  for (const r of resources) {
    if (r.kind !== 'Claim') continue;
    report(
      r,
      ['kind'],
      'Claims are not desired state: create them with POST /api/v1/pools/{pool}/claims or `polydev-reconciler claim POOL --user U`',
    );
  }
};
