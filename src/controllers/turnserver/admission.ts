import type { SemanticCheck } from '../../desired/validate.js';

/** What the schema allows but this build cannot do yet is refused at apply time, not failed at 3 a.m. */
export const turnServerDocumentsCheck: SemanticCheck = (resources, report) => {
  for (const r of resources) {
    if (r.kind !== 'TurnServer') continue;
    const remediation = (r.spec as { remediation?: { nomadJob?: unknown } } | undefined)?.remediation;
    if (remediation?.nomadJob !== undefined) {
      report(r, ['spec', 'remediation', 'nomadJob'], 'restarting through Nomad needs the nomad engine, which this build does not have yet: use command or systemdUnit');
    }
  }
};
