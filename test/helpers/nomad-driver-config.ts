// What a Nomad client does with a task's driver `Config` before it runs the task: decode it
// against the driver's declared HCL spec. The fake Nomad (fake-nomad.ts) uses this so that it
// is never laxer than a real client: a Config that does not decode fails the allocation there.
//
// Nomad does NOT check driver config at registration (nomad/job_endpoint_hooks.go, v1.7.3: the
// validate hooks never see a driver's schema); the client does it when it starts the task
// (client/allocrunner/taskrunner/task_runner.go, runDriver, v1.7.3):
//
//   val, diag, diagErrs := hclutils.ParseHclInterface(tr.task.Config, tr.taskSchema, vars)
//   if diag.HasErrors() {
//     parseErr := multierror.Append(errors.New("failed to parse config: "), diagErrs...)
//     tr.EmitEvent(structs.NewTaskEvent(structs.TaskFailedValidation).SetValidationError(parseErr))
//
// ParseHclInterface (helper/pluginutils/hclutils/util.go, v1.7.3) encodes the Config as JSON,
// parses it with hcl/v2's JSON syntax and decodes it with hcldec against the spec; Nomad 1.7.3
// pins hcl/v2 v2.9.2-0.20220525143345-ab3cae0737bc and go-cty v1.12.1. The messages below are
// those libraries' texts: hcldec/spec.go ("Incorrect attribute value type", "Inappropriate value
// for attribute %q: %s."), hcl/json/structure.go ("Missing required argument", "Extraneous JSON
// object property", which hclutils renames "Invalid label"), cty/convert/mismatch_msg.go and
// conversion_primitive.go (the "… required" reasons).
//
// Not modelled: HCL template interpolation inside strings ("${NOMAD_META_x}" is taken as a
// string, as it is after interpolation), functions, and the exact order of several diagnostics
// (Go map order in hcldec; here: the order of the keys in the Config).

/** A cty type constraint, as written in hclspec.NewAttr's type string. */
export type CtyType = 'string' | 'number' | 'bool' | { list: CtyType } | { map: CtyType };

export type HclSpec =
  | { attr: CtyType; required?: boolean }
  | { block: HclObjectSpec }
  | { blockList: HclObjectSpec }
  | { blockAttrs: CtyType };

export type HclObjectSpec = Record<string, HclSpec>;

const attr = (type: CtyType, required = false): HclSpec => ({ attr: type, required });
const list = (e: CtyType): CtyType => ({ list: e });
const map = (e: CtyType): CtyType => ({ map: e });

// drivers/docker/config.go, Nomad v1.7.3: mountBodySpec.
const DOCKER_MOUNT: HclObjectSpec = {
  type: attr('string'),
  target: attr('string'),
  source: attr('string'),
  readonly: attr('bool'),
  bind_options: { block: { propagation: attr('string') } },
  tmpfs_options: { block: { size: attr('number'), mode: attr('number') } },
  volume_options: {
    block: {
      no_copy: attr('bool'),
      labels: attr(list(map('string'))),
      driver_config: { block: { name: attr('string'), options: attr(list(map('string'))) } },
    },
  },
};

/** drivers/docker/config.go, Nomad v1.7.3: taskConfigSpec (every key, transcribed). */
export const DOCKER_TASK_CONFIG_SPEC: HclObjectSpec = {
  image: attr('string', true),
  advertise_ipv6_address: attr('bool'),
  args: attr(list('string')),
  auth: { block: { username: attr('string'), password: attr('string'), email: attr('string'), server_address: attr('string') } },
  auth_soft_fail: attr('bool'),
  cap_add: attr(list('string')),
  cap_drop: attr(list('string')),
  command: attr('string'),
  cpuset_cpus: attr('string'),
  cpu_hard_limit: attr('bool'),
  cpu_cfs_period: attr('number'),
  devices: { blockList: { host_path: attr('string'), container_path: attr('string'), cgroup_permissions: attr('string') } },
  dns_search_domains: attr(list('string')),
  dns_options: attr(list('string')),
  dns_servers: attr(list('string')),
  entrypoint: attr(list('string')),
  extra_hosts: attr(list('string')),
  force_pull: attr('bool'),
  group_add: attr(list('string')),
  healthchecks: { block: { disable: attr('bool') } },
  hostname: attr('string'),
  init: attr('bool'),
  interactive: attr('bool'),
  ipc_mode: attr('string'),
  ipv4_address: attr('string'),
  ipv6_address: attr('string'),
  isolation: attr('string'),
  labels: attr(list(map('string'))),
  load: attr('string'),
  logging: { block: { type: attr('string'), driver: attr('string'), config: attr(list(map('string'))) } },
  mac_address: attr('string'),
  memory_hard_limit: attr('number'),
  mount: { blockList: DOCKER_MOUNT },
  mounts: { blockList: DOCKER_MOUNT },
  network_aliases: attr(list('string')),
  network_mode: attr('string'),
  runtime: attr('string'),
  pids_limit: attr('number'),
  pid_mode: attr('string'),
  ports: attr(list('string')),
  port_map: attr(list(map('number'))),
  privileged: attr('bool'),
  image_pull_timeout: attr('string'),
  readonly_rootfs: attr('bool'),
  security_opt: attr(list('string')),
  shm_size: attr('number'),
  storage_opt: { blockAttrs: 'string' },
  sysctl: attr(list(map('string'))),
  tty: attr('bool'),
  ulimit: attr(list(map('string'))),
  uts_mode: attr('string'),
  userns_mode: attr('string'),
  volumes: attr(list('string')),
  volume_driver: attr('string'),
  work_dir: attr('string'),
};

/** drivers/qemu/driver.go, Nomad v1.7.3: taskConfigSpec. */
export const QEMU_TASK_CONFIG_SPEC: HclObjectSpec = {
  image_path: attr('string', true),
  drive_interface: attr('string'),
  accelerator: attr('string'),
  graceful_shutdown: attr('bool'),
  guest_agent: attr('bool'),
  args: attr(list('string')),
  port_map: attr(list(map('number'))),
};

export const DRIVER_SPECS: Record<string, HclObjectSpec> = { docker: DOCKER_TASK_CONFIG_SPEC, qemu: QEMU_TASK_CONFIG_SPEC };

/** drivers/shared/capabilities/defaults.go, Nomad v1.7.3: HCLSpecLiteral, the docker plugin's default allow_caps. */
export const DOCKER_DEFAULT_ALLOW_CAPS = ['AUDIT_WRITE', 'CHOWN', 'DAC_OVERRIDE', 'FOWNER', 'FSETID', 'KILL', 'MKNOD', 'NET_BIND_SERVICE', 'SETFCAP', 'SETGID', 'SETPCAP', 'SETUID', 'SYS_CHROOT'];

// ---- cty types of JSON values, and go-cty's conversion rules -------------------------------

type ValType = 'string' | 'number' | 'bool' | 'null' | { tuple: ValType[] } | { object: Array<[string, ValType]> };

function typeOf(v: unknown): ValType {
  if (v === null || v === undefined) return 'null';
  if (typeof v === 'string') return 'string';
  if (typeof v === 'number') return 'number';
  if (typeof v === 'boolean') return 'bool';
  if (Array.isArray(v)) return { tuple: v.map(typeOf) };
  return { object: Object.entries(v as Record<string, unknown>).map(([k, x]) => [k, typeOf(x)]) };
}

function friendly(t: CtyType): string {
  if (typeof t === 'string') return t;
  if ('list' in t) return `list of ${friendly(t.list)}`;
  return `map of ${friendly(t.map)}`;
}

/** go-cty convert.GetConversionUnsafe(got, want) != nil. */
function convertible(got: ValType, want: CtyType): boolean {
  if (got === 'null') return true;
  if (typeof want === 'string') {
    if (typeof got !== 'string') return false;
    if (got === want) return true;
    if (want === 'string') return true; // number and bool convert to string
    return got === 'string'; // string → number/bool: decided by the value
  }
  if ('list' in want) return typeof got === 'object' && 'tuple' in got && got.tuple.every((e) => convertible(e, want.list));
  return typeof got === 'object' && 'object' in got && got.object.every(([, e]) => convertible(e, want.map));
}

/** go-cty convert.MismatchMessage(got, want) for the cases a JSON value can reach. */
function mismatch(got: ValType, want: CtyType): string {
  if (typeof want !== 'string' && typeof got === 'object') {
    if ('list' in want) {
      if (!('tuple' in got)) return `${friendly(want)} required`;
      const i = got.tuple.findIndex((e) => !convertible(e, want.list));
      return i >= 0 ? `element ${i}: ${mismatch(got.tuple[i]!, want.list)}` : `all elements must be ${friendly(want.list)}`;
    }
    if (!('object' in got)) return `${friendly(want)} required`;
    const bad = got.object.find(([, e]) => !convertible(e, want.map));
    return bad ? `element ${JSON.stringify(bad[0])}: ${mismatch(bad[1], want.map)}` : `all elements must be ${friendly(want.map)}`;
  }
  return `${friendly(want)} required`;
}

/** Value-level conversion errors (string → number/bool), cty/convert/conversion_primitive.go. */
function valueError(v: unknown, want: CtyType): string | undefined {
  if (v === null || v === undefined) return undefined;
  if (want === 'number' && typeof v === 'string') return /^-?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$/.test(v.trim()) ? undefined : 'a number is required';
  if (want === 'bool' && typeof v === 'string') {
    if (v === 'true' || v === 'false') return undefined;
    if (v.toLowerCase() === 'true') return 'a bool is required; to convert from string, use lowercase "true"';
    if (v.toLowerCase() === 'false') return 'a bool is required; to convert from string, use lowercase "false"';
    return 'a bool is required';
  }
  if (typeof want === 'object' && 'list' in want && Array.isArray(v)) {
    for (const e of v) {
      const err = valueError(e, want.list);
      if (err) return err;
    }
  }
  if (typeof want === 'object' && 'map' in want && v && typeof v === 'object') {
    for (const e of Object.values(v)) {
      const err = valueError(e, want.map);
      if (err) return err;
    }
  }
  return undefined;
}

function levenshtein(a: string, b: string): number {
  const d = Array.from({ length: a.length + 1 }, (_, i) => [i, ...Array<number>(b.length).fill(0)]);
  for (let j = 1; j <= b.length; j++) d[0]![j] = j;
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      d[i]![j] = Math.min(d[i - 1]![j]! + 1, d[i]![j - 1]! + 1, d[i - 1]![j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1));
    }
  }
  return d[a.length]![b.length]!;
}

/** hcl's nameSuggestion: the first name within edit distance 2. */
function suggestion(name: string, names: string[]): string {
  const near = names.find((n) => levenshtein(name, n) < 3);
  return near ? ` Did you mean ${JSON.stringify(near)}?` : '';
}

/** The "Summary: Detail" errors hclutils.formattedDiagnosticErrors makes of hcldec's diagnostics. */
export function decodeHclJson(value: unknown, spec: HclObjectSpec): string[] {
  const errs: string[] = [];
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    return ['Incorrect JSON value type: A JSON object is required here, setting the arguments for this block.'];
  }
  const body = value as Record<string, unknown>;
  for (const [k, v] of Object.entries(body)) {
    if (k === '//') continue;
    const s = spec[k];
    if (!s) {
      errs.push(`Invalid label: No argument or block type is named ${JSON.stringify(k)}.${suggestion(k, Object.keys(spec))}`);
      continue;
    }
    if ('attr' in s || 'blockAttrs' in s) {
      const want = 'attr' in s ? s.attr : { map: s.blockAttrs };
      const got = typeOf(v);
      const why = convertible(got, want) ? valueError(v, want) : mismatch(got, want);
      if (why) errs.push(`Incorrect attribute value type: Inappropriate value for attribute ${JSON.stringify(k)}: ${why}.`);
      continue;
    }
    const inner = 'block' in s ? s.block : s.blockList;
    const items = Array.isArray(v) ? v : [v];
    if (!Array.isArray(v) && (v === null || typeof v !== 'object')) {
      errs.push(`Incorrect JSON value type: Either a JSON object or a JSON array is required, representing the contents of one or more ${JSON.stringify(k)} blocks.`);
      continue;
    }
    if ('block' in s && items.length > 1) {
      errs.push(`Duplicate ${k} block: Only one ${k} block is allowed.`);
      continue;
    }
    for (const item of items) errs.push(...decodeHclJson(item, inner));
  }
  for (const [k, s] of Object.entries(spec)) {
    if ('attr' in s && s.required && (body[k] === undefined || body[k] === null)) {
      errs.push(`Missing required argument: The argument ${JSON.stringify(k)} is required, but no definition was found.`);
    }
  }
  return errs;
}

/** hashicorp/go-multierror v1.1.1 ListFormatFunc. */
export function multierror(errs: string[]): string {
  if (errs.length === 1) return `1 error occurred:\n\t* ${errs[0]}\n\n`;
  return `${errs.length} errors occurred:\n\t${errs.map((e) => `* ${e}`).join('\n\t')}\n\n`;
}

/**
 * The task event's ValidationError a Nomad 1.7.3 client records for a driver Config that does
 * not decode, or undefined when it decodes (or the driver is one the fake does not know).
 */
export function driverConfigError(driver: string, config: unknown): string | undefined {
  const spec = DRIVER_SPECS[driver];
  if (!spec) return undefined;
  const errs = decodeHclJson(config ?? {}, spec);
  return errs.length ? multierror(['failed to parse config: ', ...errs]) : undefined;
}

/**
 * drivers/shared/capabilities/defaults.go (Delta), Nomad v1.7.3: the docker driver refuses to
 * create a container that adds capabilities outside the plugin's allow_caps.
 */
export function disallowedCaps(capAdd: unknown, allowCaps: string[]): string[] {
  const norm = (c: string): string => c.trim().toLowerCase().replace(/^cap_/, '');
  const allow = new Set(allowCaps.map(norm));
  const want = Array.isArray(capAdd) ? capAdd.filter((c): c is string => typeof c === 'string').map(norm) : [];
  return [...new Set(want.filter((c) => !allow.has(c)))].sort();
}
