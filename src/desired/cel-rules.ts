// The CRDs' x-kubernetes-validations (CEL) rules, mirrored in TypeScript so local YAML and API
// input meet the same rules as Kubernetes custom resources. The CRD stays the source of each rule
// and its message: a rule that appears in crds/ without an entry here fails at start-up (and in
// the test suite), so the two cannot drift apart silently.

type Obj = Record<string, unknown>;
const has = (o: unknown, key: string): boolean => o !== null && typeof o === 'object' && (o as Obj)[key] !== undefined;
const get = (o: unknown, key: string): unknown => (o !== null && typeof o === 'object' ? (o as Obj)[key] : undefined);

export const CEL_RULES: Record<string, (self: unknown) => boolean> = {
  // Transition rules compare with the stored object; local applies check immutability in the apply step.
  'self == oldSelf': () => true,
  'self.chains.nat != self.chains.postrouting': (s) => get(get(s, 'chains'), 'nat') !== get(get(s, 'chains'), 'postrouting'),
  'self.min <= self.max': (s) => Number(get(s, 'min')) <= Number(get(s, 'max')),
  "!(self.mode == 'forward' && self.url.startsWith('https://'))": (s) =>
    !(get(s, 'mode') === 'forward' && String(get(s, 'url')).startsWith('https://')),
  "!('tls' in self.transports) || has(self.ports.tls)": (s) => {
    const transports = get(s, 'transports');
    return !(Array.isArray(transports) && transports.includes('tls')) || has(get(s, 'ports'), 'tls');
  },
  "self.mode != 'longTerm' || (has(self.username) && has(self.passwordFile))": (s) =>
    get(s, 'mode') !== 'longTerm' || (has(s, 'username') && has(s, 'passwordFile')),
  "self.mode != 'restSecret' || has(self.secretFile)": (s) => get(s, 'mode') !== 'restSecret' || has(s, 'secretFile'),
  '(has(self.command) ? 1 : 0) + (has(self.systemdUnit) ? 1 : 0) + (has(self.nomadJob) ? 1 : 0) <= 1': (s) =>
    ['command', 'systemdUnit', 'nomadJob'].filter((k) => has(s, k)).length <= 1,
  "(has(self.engine) && self.engine == 'process') || has(self.image)": (s) =>
    get(s, 'engine') === 'process' || has(s, 'image'),
  "!has(self.engine) || self.engine != 'process' || (has(self.command) && size(self.command) > 0)": (s) =>
    get(s, 'engine') !== 'process' || (Array.isArray(get(s, 'command')) && (get(s, 'command') as unknown[]).length > 0),
  'self.maxSize >= self.size': (s) => Number(get(s, 'maxSize')) >= Number(get(s, 'size')),
  "!has(self.idleResources) || !has(self.engine) || self.engine != 'nomad'": (s) => !has(s, 'idleResources') || get(s, 'engine') !== 'nomad',
  '!has(self.memoryMaxMB) || !has(self.memoryMB) || self.memoryMaxMB >= self.memoryMB': (s) =>
    !has(s, 'memoryMaxMB') || !has(s, 'memoryMB') || Number(get(s, 'memoryMaxMB')) >= Number(get(s, 'memoryMB')),
};

export interface CelViolation {
  path: Array<string | number>;
  message: string;
}

interface CelRule {
  rule: string;
  message?: string;
}

/** Every CEL rule text used in a schema, for the start-up completeness check. */
export function celRulesIn(schema: unknown, out: string[] = []): string[] {
  if (Array.isArray(schema)) schema.forEach((s) => celRulesIn(s, out));
  else if (schema !== null && typeof schema === 'object') {
    for (const [k, v] of Object.entries(schema)) {
      if (k === 'x-kubernetes-validations' && Array.isArray(v)) out.push(...(v as CelRule[]).map((r) => r.rule));
      else celRulesIn(v, out);
    }
  }
  return out;
}

/** Walks value and schema together and evaluates the rules where the value is present. */
export function checkCelRules(schema: unknown, value: unknown, path: Array<string | number> = []): CelViolation[] {
  const out: CelViolation[] = [];
  if (schema === null || typeof schema !== 'object' || value === undefined || value === null) return out;
  const s = schema as Obj;
  for (const r of (s['x-kubernetes-validations'] as CelRule[] | undefined) ?? []) {
    const fn = CEL_RULES[r.rule];
    if (!fn) throw new Error(`CEL rule ${JSON.stringify(r.rule)} has no TypeScript mirror in src/desired/cel-rules.ts`);
    if (!fn(value)) out.push({ path, message: r.message ?? `failed rule ${r.rule}` });
  }
  if (s.properties && typeof value === 'object' && !Array.isArray(value)) {
    for (const [k, sub] of Object.entries(s.properties as Obj)) {
      out.push(...checkCelRules(sub, (value as Obj)[k], [...path, k]));
    }
  }
  if (s.items && Array.isArray(value)) value.forEach((v, i) => out.push(...checkCelRules(s.items, v, [...path, i])));
  return out;
}
