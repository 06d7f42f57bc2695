// DockerEngine (src/drivers/docker.ts) against a real, private dockerd 20.10 started by
// test/helpers/dockerd.ts (vfs, no bridge, no iptables, busybox image imported from a
// local rootfs). The pure parts (create body, injection paths, event mapping, stream
// framing) are also tested without dockerd.

import test from 'ava';
import http from 'node:http';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';

import {
  DockerEngine,
  JsonLineSplitter,
  StreamDemuxer,
  buildCreateBody,
  exitCodeFromStatus,
  fromListEntry,
  healthFromStatus,
  injectedFilePath,
  renderEnvFile,
  toEngineEvent,
} from '../src/drivers/docker.js';
import { EngineError, LABELS, MANAGED_BY, type ContainerSpec, type EngineEvent, type ObservedContainer } from '../src/controllers/warmpool/engine.js';
import { TEST_LABEL, startDockerd, type Dockerd } from './helpers/dockerd.js';
import { pollUntil } from './helpers/timing.js';

let d: Dockerd;
let engine: DockerEngine;
let seq = 0;

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Polls pred every 20 ms until it holds or ms pass; resolves with its last value (a hang guard, not a speed limit). */
function uniq(prefix: string): string {
  seq++;
  return `${prefix}${seq}x${process.pid % 1000}`;
}

function spec(owner: string, slot: string, over: Partial<ContainerSpec> = {}): ContainerSpec {
  const pool = over.pool ?? 'openai';
  return {
    pool,
    provider: 'openai',
    slot,
    name: `pd-${owner}-${slot}`,
    image: d?.image ?? 'polydev-test/busybox:1',
    command: ['sleep'],
    args: ['3600'],
    env: { MODE: 'warm' },
    resources: { memoryMB: 64, cpuMHz: 500 },
    specHash: 'hash-1',
    labels: {
      [LABELS.managedBy]: MANAGED_BY,
      [LABELS.owner]: owner,
      [LABELS.pool]: pool,
      [LABELS.provider]: 'openai',
      [LABELS.specHash]: 'hash-1',
      [LABELS.slot]: slot,
    },
    ...over,
  };
}

type Json = Record<string, unknown>;

async function inspect(id: string): Promise<Json> {
  const r = await d.request('GET', `/containers/${id}/json`);
  if (r.status !== 200) throw new Error(`inspect ${id}: ${r.status}`);
  return r.json as Json;
}

/** Names of every container in the dockerd, labelled or not. */
async function allNames(): Promise<string[]> {
  const r = await d.request('GET', '/containers/json?all=1');
  return (r.json as Json[]).map((c) => String((c['Names'] as string[])[0]).replace(/^\//, ''));
}

async function sh(id: string, script: string): Promise<{ code: number; out: string; err: string }> {
  // 30 s rather than the client's 10 s default exec timeout: a hang guard for a loaded dockerd.
  const r = await engine.client.exec(id, ['sh', '-c', script], { timeoutMs: 30_000 });
  return { code: r.exitCode, out: r.stdout.toString('utf8'), err: r.stderr.toString('utf8') };
}

test.before(async (t) => {
  d = await startDockerd({ name: 'engine' });
  t.log(`dockerd ready in ${d.timings.startMs} ms, busybox image imported in ${d.timings.imageMs} ms (${d.dir})`);
  engine = new DockerEngine({ socketPath: d.socketPath });
});

test.after.always(async () => {
  await engine?.close();
  await d?.stop();
});

// ---------------------------------------------------------------------------------------
// Pure parts.

test('buildCreateBody: command/args, env, labels, resources, tmpfs, restart policy', (t) => {
  const s = spec('o', 's1', { resources: { memoryMB: 256, memoryMaxMB: 512, cpuMHz: 1500 }, env: { A: '1', B: 'x=y' } });
  const b = buildCreateBody(s, 'none');
  t.is(b['Image'], 'polydev-test/busybox:1');
  t.deepEqual(b['Entrypoint'], ['sleep']);
  t.deepEqual(b['Cmd'], ['3600']);
  t.deepEqual(b['Env'], ['A=1', 'B=x=y']);
  const labels = b['Labels'] as Json;
  t.is(labels[LABELS.owner], 'o');
  t.is(labels[LABELS.slot], 's1');
  t.is(labels[LABELS.managedBy], MANAGED_BY);
  const hc = b['HostConfig'] as Json;
  t.is(hc['NetworkMode'], 'none');
  t.deepEqual(hc['Tmpfs'], { '/run/polydev': 'rw,nosuid,nodev,noexec,size=16m,mode=0700' });
  t.is(hc['Memory'], 512 * 1024 * 1024);
  t.is(hc['MemoryReservation'], 256 * 1024 * 1024);
  t.is(hc['CpuPeriod'], 100_000);
  t.is(hc['CpuQuota'], 150_000);
  t.is(hc['CpuShares'], 1536);
  t.deepEqual(hc['RestartPolicy'], { Name: 'no' });
  t.false('DeviceRequests' in hc);
});

test('buildCreateBody: no command keeps the image entrypoint; tiny CPU gets the minimum quota; devices', (t) => {
  const s = spec('o', 's1', {
    command: undefined,
    args: ['-c', 'sleep 1'],
    resources: { memoryMB: 32, cpuMHz: 1, devices: [{ name: 'nvidia/gpu', count: 2 }, { name: 'amd.com/gpu', count: 1 }] },
  });
  const b = buildCreateBody(s, 'polydev');
  t.false('Entrypoint' in b);
  t.deepEqual(b['Cmd'], ['-c', 'sleep 1']);
  const hc = b['HostConfig'] as Json;
  t.is(hc['NetworkMode'], 'polydev');
  t.is(hc['Memory'], 32 * 1024 * 1024);
  t.false('MemoryReservation' in hc);
  t.is(hc['CpuQuota'], 1000);
  t.is(hc['CpuShares'], 2);
  t.deepEqual(hc['DeviceRequests'], [
    { Driver: 'nvidia', Count: 2, Capabilities: [['gpu']] },
    { Driver: 'amd.com', Count: 1, Capabilities: [['gpu']] },
  ]);
  const noArgs = buildCreateBody(spec('o', 's1', { command: undefined, args: undefined }), 'none');
  t.false('Cmd' in noArgs);
  const cmdOnly = buildCreateBody(spec('o', 's1', { command: ['/bin/run'], args: undefined }), 'none');
  t.deepEqual(cmdOnly['Cmd'], []);
  const err = t.throws(() => buildCreateBody(spec('o', 's1', { image: undefined }), 'none'));
  t.true(err instanceof EngineError);
});

test('injection validation: env keys/values and file paths; the value never appears', (t) => {
  t.is(renderEnvFile({ A: '1', _B2: 'x y=z' }), 'A=1\n_B2=x y=z\n');
  const e1 = t.throws(() => renderEnvFile({ '1BAD': 'topsecret' }));
  t.regex(e1.message, /1BAD/);
  t.notRegex(e1.message, /topsecret/);
  const e2 = t.throws(() => renderEnvFile({ KEY: 'top\nsecret' }));
  t.regex(e2.message, /KEY/);
  t.notRegex(e2.message, /top|secret/);
  t.is(injectedFilePath('a/b.json'), '/run/polydev/files/a/b.json');
  for (const bad of ['', '/etc/passwd', '../x', 'a/../../x', 'a//b', './a', 'a/.', 'a/..']) {
    t.throws(() => injectedFilePath(bad), undefined, bad);
  }
});

test('status text parsing and list entry mapping', (t) => {
  t.is(healthFromStatus('Up 3 seconds (healthy)'), 'healthy');
  t.is(healthFromStatus('Up 3 seconds (unhealthy)'), 'unhealthy');
  t.is(healthFromStatus('Up 1 second (health: starting)'), 'starting');
  t.is(healthFromStatus('Up 2 hours'), undefined);
  t.is(exitCodeFromStatus('Exited (137) 2 seconds ago'), 137);
  t.is(exitCodeFromStatus('Up 2 hours'), undefined);
  const c = fromListEntry(
    {
      Id: 'abc',
      Names: ['/pd-x'],
      State: 'exited',
      Status: 'Exited (3) 1 second ago',
      Created: 1700000000,
      Labels: { [LABELS.pool]: 'p', [LABELS.slot]: 's', [LABELS.specHash]: 'h', [LABELS.claim]: 'c1' },
      NetworkSettings: { Networks: { polydev: { IPAddress: '10.0.0.5' } } },
    },
    'polydev',
  );
  t.deepEqual(c, { id: 'abc', name: 'pd-x', pool: 'p', slot: 's', specHash: 'h', claim: 'c1', state: 'exited', createdAt: 1700000000000, exitCode: 3, address: '10.0.0.5' });
  t.is(fromListEntry({ Id: 'x', Names: ['/y'], Labels: { [LABELS.pool]: 'p' } }, 'none'), undefined);
});

test('event mapping and line splitting across chunks', (t) => {
  const ev = (Action: string, pool = 'p'): unknown => ({ Type: 'container', Action, Actor: { ID: 'id1', Attributes: { [LABELS.pool]: pool } } });
  t.deepEqual(toEngineEvent(ev('start')), { id: 'id1', pool: 'p', type: 'start' });
  t.deepEqual(toEngineEvent(ev('die')), { id: 'id1', pool: 'p', type: 'die' });
  t.deepEqual(toEngineEvent(ev('oom')), { id: 'id1', pool: 'p', type: 'die' });
  t.deepEqual(toEngineEvent(ev('destroy')), { id: 'id1', pool: 'p', type: 'destroy' });
  t.deepEqual(toEngineEvent(ev('health_status: healthy')), { id: 'id1', pool: 'p', type: 'health' });
  t.is(toEngineEvent(ev('exec_start: sh -c cat')), undefined);
  t.is(toEngineEvent(ev('create')), undefined);
  t.deepEqual(toEngineEvent({ ...(ev('die') as object), timeNano: 1_700_000_000_123_456_789 }), { id: 'id1', pool: 'p', type: 'die', at: 1_700_000_000_123 });
  t.is(toEngineEvent({ Type: 'container', Action: 'start', Actor: { ID: 'x', Attributes: {} } }), undefined);

  const text = Buffer.from(`${JSON.stringify(ev('start', 'pööl'))}\n${JSON.stringify(ev('die'))}\n`, 'utf8');
  const got: unknown[] = [];
  const s = new JsonLineSplitter();
  // One byte at a time: splits inside JSON and inside a multi-byte character.
  for (let i = 0; i < text.length; i++) s.push(text.subarray(i, i + 1), (v) => got.push(v));
  t.is(got.length, 2);
  t.deepEqual(toEngineEvent(got[0]), { id: 'id1', pool: 'pööl', type: 'start' });
});

test('stream demuxer: frames split anywhere', (t) => {
  const frame = (type: number, s: string): Buffer => {
    const p = Buffer.from(s);
    const h = Buffer.alloc(8);
    h[0] = type;
    h.writeUInt32BE(p.length, 4);
    return Buffer.concat([h, p]);
  };
  const all = Buffer.concat([frame(1, 'out1'), frame(2, 'err!'), frame(1, 'out2')]);
  const dm = new StreamDemuxer();
  for (let i = 0; i < all.length; i += 3) dm.push(all.subarray(i, i + 3));
  const r = dm.result();
  t.is(r.stdout.toString(), 'out1out2');
  t.is(r.stderr.toString(), 'err!');
});

// ---------------------------------------------------------------------------------------
// Against dockerd.

test('ping: ok, and EngineUnavailable on a missing socket', async (t) => {
  await t.notThrowsAsync(engine.ping());
  const dir = await mkdtemp(path.join(os.tmpdir(), 'pd-nosock-'));
  const missing = path.join(dir, 'docker.sock');
  const dead = new DockerEngine({ socketPath: missing, requestTimeoutMs: 2000 });
  try {
    const err = await t.throwsAsync(dead.ping());
    t.true(err instanceof EngineError);
    t.is((err as EngineError).reason, 'EngineUnavailable');
    t.true(err.message.startsWith(`Docker engine at unix://${missing} is not reachable: `), err.message);
    const err2 = await t.throwsAsync(dead.start(spec('o', 's')));
    t.is((err2 as EngineError).reason, 'EngineUnavailable');
    const err3 = await t.throwsAsync(dead.list('o'));
    t.is((err3 as EngineError).reason, 'EngineUnavailable');
  } finally {
    await dead.close();
    await rm(dir, { recursive: true, force: true });
  }
});

test('ping: a socket that never answers times out as EngineUnavailable', async (t) => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'pd-hang-'));
  const sock = path.join(dir, 'hang.sock');
  const srv = http.createServer(() => {
    /* never answers */
  });
  await new Promise<void>((r) => srv.listen(sock, r));
  const hung = new DockerEngine({ socketPath: sock, requestTimeoutMs: 300 });
  try {
    const t0 = performance.now();
    const err = await t.throwsAsync(hung.ping());
    const took = performance.now() - t0;
    t.is((err as EngineError).reason, 'EngineUnavailable');
    t.regex(err.message, /within 300 ms/);
    // It was the 300 ms timeout that ended the wait: not sooner (timers never fire early; 250 allows
    // for clock rounding), and not never. The upper bound is only a hang guard (a stalled event loop
    // fires the timer late); without the timeout the ping would wait for ever.
    t.true(took >= 250, `gave up after ${took.toFixed(0)} ms`);
    t.true(took < 30_000, `gave up after ${took.toFixed(0)} ms`);
  } finally {
    await hung.close();
    srv.closeAllConnections();
    await new Promise<void>((r) => srv.close(() => r()));
    await rm(dir, { recursive: true, force: true });
  }
});

test.serial('start: running, labelled, limits applied, tmpfs at /run/polydev; listed with parsed labels', async (t) => {
  const owner = uniq('own');
  const s = spec(owner, 'slot-a', {
    resources: { memoryMB: 48, memoryMaxMB: 96, cpuMHz: 250 },
    labels: { ...spec(owner, 'slot-a').labels, [LABELS.claim]: 'claim-7' },
  });
  const t0 = performance.now();
  const c = await engine.start(s);
  const startMs = performance.now() - t0;
  t.log(`create+start+inspect: ${startMs.toFixed(1)} ms`);
  t.is(c.state, 'running');
  t.is(c.name, s.name);
  t.is(c.pool, 'openai');
  t.is(c.slot, 'slot-a');
  t.is(c.specHash, 'hash-1');
  t.is(c.claim, 'claim-7');
  t.is(c.address, `container:${s.name}`);

  const listed = await engine.list(owner);
  t.is(listed.length, 1);
  const l = listed[0] as ObservedContainer;
  t.is(l.id, c.id);
  t.is(l.state, 'running');
  t.is(l.slot, 'slot-a');
  t.is(l.pool, 'openai');
  t.is(l.specHash, 'hash-1');
  t.is(l.claim, 'claim-7');
  t.is(l.name, s.name);
  t.is(l.exitCode, undefined);
  t.true(Math.abs(l.createdAt - Date.now()) < 60_000);

  const info = await inspect(c.id);
  const labels = (info['Config'] as Json)['Labels'] as Json;
  for (const [k, v] of Object.entries(s.labels)) t.is(labels[k], v, k);
  t.deepEqual((info['Config'] as Json)['Env'], ['MODE=warm', 'PATH=/bin']);
  const hc = info['HostConfig'] as Json;
  t.is(hc['Memory'], 96 * 1024 * 1024);
  t.is(hc['MemoryReservation'], 48 * 1024 * 1024);
  t.is(hc['CpuQuota'], 25_000);
  t.is(hc['CpuPeriod'], 100_000);
  t.is(hc['CpuShares'], 256);
  t.is(hc['NetworkMode'], 'none');

  // The limits reach the cgroup, and the tmpfs is there with its options.
  const mounts = await sh(c.id, 'grep " /run/polydev " /proc/mounts; stat -c %a /run/polydev');
  t.is(mounts.code, 0, mounts.err);
  t.regex(mounts.out, /^tmpfs \/run\/polydev tmpfs rw,nosuid,nodev,noexec/m);
  t.regex(mounts.out, /size=16384k/);
  t.regex(mounts.out, /^700$/m);

  await engine.remove(c.id);
  t.deepEqual(await engine.list(owner), []);
});

test('start: ImageNotFound for a missing image, nothing left behind, no pull', async (t) => {
  const owner = uniq('own');
  const s = spec(owner, 'noimg', { image: 'polydev-test/does-not-exist:9' });
  const err = await t.throwsAsync(engine.start(s));
  t.true(err instanceof EngineError);
  t.is((err as EngineError).reason, 'ImageNotFound');
  t.is(err.message, 'image polydev-test/does-not-exist:9 not found on the Docker engine (no registry pull is attempted)');
  t.false((await allNames()).includes(s.name));
  const images = await d.request('GET', '/images/json');
  t.false(JSON.stringify(images.json).includes('does-not-exist'));
});

test('start: StartFailed for a command that does not exist, nothing left behind', async (t) => {
  const owner = uniq('own');
  const s = spec(owner, 'badcmd', { command: ['nosuchbinary'], args: [] });
  const err = await t.throwsAsync(engine.start(s));
  t.is((err as EngineError).reason, 'StartFailed');
  t.regex(err.message, /nosuchbinary/);
  t.regex(err.message, new RegExp(s.name));
  t.false((await allNames()).includes(s.name));
  t.deepEqual(await engine.list(owner), []);
});

test('start: a spec dockerd rejects (400, memory below its minimum) is StartFailed, nothing left behind', async (t) => {
  const owner = uniq('own');
  const s = spec(owner, 'tiny', { resources: { memoryMB: 1 } });
  const err = await t.throwsAsync(engine.start(s));
  t.is((err as EngineError).reason, 'StartFailed');
  t.regex(err.message, /Minimum memory limit/);
  t.regex(err.message, new RegExp(s.name));
  t.false((await allNames()).includes(s.name));
});

test('start: a container that exits at once is StartFailed (or observed exited) and removed', async (t) => {
  const owner = uniq('own');
  const s = spec(owner, 'quick', { command: ['sh'], args: ['-c', 'exit 3'] });
  try {
    await engine.start(s);
    // Raced the inspect: it must be exiting now. dockerd records the exit after it happened, which
    // can take well over the half second the process needs when the machine is loaded: poll (hang guard).
    let l = await engine.list(owner);
    await pollUntil(async () => (l = await engine.list(owner))[0]?.state !== 'running', 30_000);
    t.is(l[0]?.state, 'exited');
    t.is(l[0]?.exitCode, 3);
  } catch (err) {
    t.is((err as EngineError).reason, 'StartFailed');
    t.regex((err as Error).message, /exited immediately after start with code 3/);
    t.false((await allNames()).includes(s.name));
  }
});

test('start: twice with the same slot/name adopts the existing container, also when it stopped', async (t) => {
  const owner = uniq('own');
  const s = spec(owner, 'twice');
  const a = await engine.start(s);
  const b = await engine.start(s);
  t.is(b.id, a.id);
  t.is(b.state, 'running');
  // Stopped (e.g. daemon crashed after create, before start): adopting starts it.
  const k = await d.request('POST', `/containers/${a.id}/kill`);
  t.is(k.status, 204);
  // Until dockerd shows it stopped (it may take seconds under load; a hang guard): otherwise the start
  // below would adopt a running container and this part would test nothing.
  t.true(await pollUntil(async () => (await engine.list(owner))[0]?.state === 'exited', 30_000), 'the killed container is seen stopped');
  const c = await engine.start(s);
  t.is(c.id, a.id);
  t.is(c.state, 'running');
  t.is((await engine.list(owner)).length, 1);
  // Same name, another slot: refused, and the container is left alone.
  const other = { ...s, slot: 'someone-else', labels: { ...s.labels, [LABELS.slot]: 'someone-else' } };
  const err = await t.throwsAsync(engine.start(other));
  t.is((err as EngineError).reason, 'EngineError');
  t.regex(err.message, new RegExp(s.name));
  t.is((await engine.list(owner))[0]?.id, a.id);
  await engine.remove(a.id);
});

test('start: concurrent starts of one slot end with one container', async (t) => {
  const owner = uniq('own');
  const s = spec(owner, 'race');
  const results = await Promise.allSettled([engine.start(s), engine.start(s), engine.start(s)]);
  const ok = results.filter((r): r is PromiseFulfilledResult<ObservedContainer> => r.status === 'fulfilled');
  t.true(ok.length >= 1);
  t.is(new Set(ok.map((r) => r.value.id)).size, 1);
  const listed = await engine.list(owner);
  t.is(listed.length, 1);
  await engine.remove(listed[0]!.id);
});

test('remove: idempotent, unknown ids are fine', async (t) => {
  const owner = uniq('own');
  const c = await engine.start(spec(owner, 'rm'));
  const t0 = performance.now();
  await engine.remove(c.id);
  t.log(`remove (force, running): ${(performance.now() - t0).toFixed(1)} ms`);
  await t.notThrowsAsync(engine.remove(c.id));
  await t.notThrowsAsync(engine.remove('0123456789ab'));
  await t.notThrowsAsync(Promise.all([engine.start(spec(owner, 'rm2')).then((x) => Promise.all([engine.remove(x.id), engine.remove(x.id)]))]));
  t.deepEqual(await engine.list(owner), []);
});

test('list: never returns unlabelled or foreign-owner containers, and leaves them alone', async (t) => {
  const owner = uniq('own');
  const foreignOwner = uniq('other');
  const mine = await engine.start(spec(owner, 'mine'));
  const plain = await d.request('POST', `/containers/create?name=${uniq('plain')}`, {
    Image: d.image,
    Cmd: ['sleep', '3600'],
    Labels: { [TEST_LABEL]: 'docker-engine.test' },
    HostConfig: { NetworkMode: 'none' },
  });
  t.is(plain.status, 201);
  const plainId = (plain.json as Json)['Id'] as string;
  // Looks like ours in every way except the owner.
  const foreign = await engine.start(spec(foreignOwner, 'mine'));
  // Managed-by missing but the owner matches: not ours either.
  const half = await d.request('POST', `/containers/create?name=${uniq('half')}`, {
    Image: d.image,
    Cmd: ['sleep', '3600'],
    Labels: { [LABELS.owner]: owner, [LABELS.pool]: 'openai', [LABELS.slot]: 'x', [TEST_LABEL]: '1' },
    HostConfig: { NetworkMode: 'none' },
  });
  t.is(half.status, 201);
  const halfId = (half.json as Json)['Id'] as string;

  const listed = await engine.list(owner);
  t.deepEqual(listed.map((c) => c.id), [mine.id]);
  t.deepEqual((await engine.list(foreignOwner)).map((c) => c.id), [foreign.id]);
  await engine.remove(mine.id);
  t.deepEqual(await engine.list(owner), []);
  // The others survive.
  t.is((await d.request('GET', `/containers/${plainId}/json`)).status, 200);
  t.is((await d.request('GET', `/containers/${halfId}/json`)).status, 200);
  t.is((await engine.list(foreignOwner)).length, 1);
  t.is(await d.removeByLabel(TEST_LABEL), 2);
  await engine.remove(foreign.id);
});

test.serial('inject: env and files land in /run/polydev with mode 600; bad input is rejected without echoing secrets', async (t) => {
  const owner = uniq('own');
  const c = await engine.start(spec(owner, 'inj'));
  const secret = 'sk-TOPSECRET-1234567890';
  const big = `${'ä€'.repeat(100_000)}\nlast line without newline`;
  const t0 = performance.now();
  await engine.inject(c.id, { env: { OPENAI_API_KEY: secret, OTHER: 'a b=c' } });
  const envMs = performance.now() - t0;
  const t1 = performance.now();
  await engine.inject(c.id, { files: { 'auth.json': `{"key":"${secret}"}`, 'nested/dir/config.toml': big } });
  const filesMs = performance.now() - t1;
  t.log(`inject env (1 exec): ${envMs.toFixed(1)} ms; inject 2 files (2 execs, ~500 KB): ${filesMs.toFixed(1)} ms`);

  const env = await sh(c.id, 'cat /run/polydev/env');
  t.is(env.out, `OPENAI_API_KEY=${secret}\nOTHER=a b=c\n`);
  const auth = await sh(c.id, 'cat /run/polydev/files/auth.json');
  t.is(auth.out, `{"key":"${secret}"}`);
  const cfg = await engine.client.exec(c.id, ['cat', '/run/polydev/files/nested/dir/config.toml'], { timeoutMs: 30_000 });
  t.true(cfg.stdout.equals(Buffer.from(big, 'utf8')), 'large multi-byte content arrives byte-exact');
  const modes = await sh(
    c.id,
    'stat -c "%a %n" /run/polydev/env /run/polydev/files/auth.json /run/polydev/files/nested/dir/config.toml /run/polydev/files/nested/dir',
  );
  t.is(
    modes.out,
    '600 /run/polydev/env\n600 /run/polydev/files/auth.json\n600 /run/polydev/files/nested/dir/config.toml\n700 /run/polydev/files/nested/dir\n',
  );
  // Not in the container's config/env/argv.
  const info = JSON.stringify(await inspect(c.id));
  t.false(info.includes(secret));
  const ps = await sh(c.id, 'cat /proc/[0-9]*/cmdline 2>/dev/null | tr "\\0" " "');
  t.false(ps.out.includes(secret));

  // Re-inject overwrites.
  await engine.inject(c.id, { env: { OPENAI_API_KEY: 'second' } });
  t.is((await sh(c.id, 'cat /run/polydev/env')).out, 'OPENAI_API_KEY=second\n');

  // Rejections: nothing written, the secret never in the message.
  const badFiles: Array<Record<string, string>> = [{ '../x': secret }, { '/etc/passwd': secret }, { '': secret }, { 'a/../../x': secret }];
  for (const files of badFiles) {
    const err = await t.throwsAsync(engine.inject(c.id, { files }));
    t.false(err.message.includes(secret), err.message);
  }
  t.is((await sh(c.id, 'ls /run/polydev/files')).out, 'auth.json\nnested\n');
  const badKey = await t.throwsAsync(engine.inject(c.id, { env: { 'BAD-KEY': secret } }));
  t.regex(badKey.message, /BAD-KEY/);
  t.false(badKey.message.includes(secret));
  const nl = await t.throwsAsync(engine.inject(c.id, { env: { K: `${secret}\nINJECTED=1` } }));
  t.false(nl.message.includes(secret));

  // Failures inside the container / of the engine do not echo the content either.
  await engine.remove(c.id);
  const gone = await t.throwsAsync(engine.inject(c.id, { env: { K: secret }, files: { f: secret } }));
  t.false(gone.message.includes(secret));
  t.true(gone.message.includes(c.id), gone.message);

  // The write fails inside the container (files/ is a regular file): exec exits non-zero, stderr is reported.
  const ro = await engine.start(spec(owner, 'inj-ro'));
  t.is((await sh(ro.id, 'echo > /run/polydev/files')).code, 0);
  const roErr = await t.throwsAsync(engine.inject(ro.id, { files: { 'x/y': secret } }));
  t.regex(roErr.message, new RegExp(`^injection into ${ro.id} failed: exit 1: mkdir: .*Not a directory`));
  t.false(roErr.message.includes(secret));
  await engine.remove(ro.id);
});

test.serial('recycle: wipes /run/polydev and the workspace, restarts, keeps the id', async (t) => {
  const owner = uniq('own');
  const c = await engine.start(spec(owner, 'rec'));
  await engine.inject(c.id, { env: { K: 'v' }, files: { 'a/b': 'c' } });
  const prep = await sh(c.id, 'mkdir -p /workspace/src/deep && echo x > /workspace/src/deep/f && echo y > /workspace/.hidden && echo z > /workspace/..dots && echo keep > /tmp/keep');
  t.is(prep.code, 0, prep.err);
  const before = ((await inspect(c.id))['State'] as Json)['StartedAt'];

  const t0 = performance.now();
  const r = await engine.recycle(c, '/workspace/');
  t.log(`recycle (exec wipe + restart t=0 + inspect): ${(performance.now() - t0).toFixed(1)} ms`);
  t.is(r.id, c.id);
  t.is(r.state, 'running');
  t.not(((await inspect(c.id))['State'] as Json)['StartedAt'], before);
  const after = await sh(c.id, 'ls -A /run/polydev; echo ---; ls -A /workspace; echo ---; cat /tmp/keep');
  t.is(after.out, '---\n---\nkeep\n');

  for (const bad of ['/', '', 'workspace', '//', '/a/../']) {
    await t.throwsAsync(engine.recycle(c, bad), undefined, bad);
  }
  await engine.remove(c.id);
  const gone = await t.throwsAsync(engine.recycle(c, '/workspace'));
  t.true(gone.message.includes(c.name));
});

test('rename: renames; a taken name or a gone container is ignored', async (t) => {
  const owner = uniq('own');
  const a = await engine.start(spec(owner, 'ren-a'));
  const b = await engine.start(spec(owner, 'ren-b'));
  const newName = `claimed-${owner}`;
  await engine.rename(a.id, newName);
  t.is((await engine.list(owner)).find((c) => c.id === a.id)?.name, newName);
  await t.notThrowsAsync(engine.rename(b.id, newName));
  t.is((await engine.list(owner)).find((c) => c.id === b.id)?.name, b.name);
  await engine.remove(a.id);
  await engine.remove(b.id);
  await t.notThrowsAsync(engine.rename(a.id, 'whatever'));
});

test.serial('watch: start and die events for this owner only; stop() ends the stream', async (t) => {
  const owner = uniq('own');
  const other = uniq('other');
  const events: EngineEvent[] = [];
  const errors: Error[] = [];
  // dockerd's count of event subscribers: the watch's subscription is live (and sees the start below)
  // once it went up. Serial tests run alone, and nothing else in this file watches this dockerd.
  const listeners = async (): Promise<number> => Number(((await d.request('GET', '/info')).json as Json)['NEventsListener'] ?? 0);
  const before = await listeners();
  const stop = engine.watch(owner, (e) => events.push(e), (e) => errors.push(e));
  t.true(await pollUntil(async () => (await listeners()) > before, 30_000), 'the event subscription reached dockerd');
  const c = await engine.start(spec(owner, 'w', { pool: 'watched' }));
  const foreign = await engine.start(spec(other, 'w'));
  // The deadlines below are hang guards (30 s): an event takes as long as dockerd needs under load.
  const waitFor = (pred: () => boolean, ms: number): Promise<boolean> => pollUntil(pred, ms);
  t.true(await waitFor(() => events.some((e) => e.type === 'start' && e.id === c.id), 30_000), JSON.stringify(events));
  const t0 = performance.now();
  const k = await d.request('POST', `/containers/${c.id}/kill`);
  t.is(k.status, 204);
  t.true(await waitFor(() => events.some((e) => e.type === 'die' && e.id === c.id), 30_000), JSON.stringify(events));
  t.log(`die event ${(performance.now() - t0).toFixed(1)} ms after the kill request`);
  t.true(events.every((e) => e.id === c.id && e.pool === 'watched'));
  await engine.remove(c.id);
  t.true(await waitFor(() => events.some((e) => e.type === 'destroy' && e.id === c.id), 30_000));

  stop();
  stop();
  const n = events.length;
  const c2 = await engine.start(spec(owner, 'w2'));
  await engine.remove(c2.id);
  await sleep(300); // (a short wait for events that must not come: can only pass falsely under load)
  t.is(events.length, n, 'no events after stop()');
  t.deepEqual(errors, []);
  await engine.remove(foreign.id);
});

test('watch: reconnects with backoff after the stream ends, reports it, and stop() ends the retries', async (t) => {
  // A fake engine on a unix socket: sends one event in two chunks, then ends the stream.
  const dir = await mkdtemp(path.join(os.tmpdir(), 'pd-ev-'));
  const sock = path.join(dir, 'ev.sock');
  const paths: string[] = [];
  const connectTimes: number[] = [];
  const srv = http.createServer((req, res) => {
    paths.push(req.url ?? '');
    connectTimes.push(Date.now());
    res.writeHead(200, { 'Content-Type': 'application/json' });
    const line = JSON.stringify({ Type: 'container', Action: 'die', Actor: { ID: `c${paths.length}`, Attributes: { [LABELS.pool]: 'p' } }, time: 1700000000 + paths.length }) + '\n';
    res.write(line.slice(0, 10));
    setTimeout(() => res.end(line.slice(10)), 20);
  });
  await new Promise<void>((r) => srv.listen(sock, r));
  const fake = new DockerEngine({ socketPath: sock });
  const events: EngineEvent[] = [];
  const errors: Error[] = [];
  const stop = fake.watch('own1', (e) => events.push(e), (e) => errors.push(e));
  try {
    // Three connections need 250 + 500 ms of backoff; 30 s is a hang guard for a loaded machine.
    await pollUntil(() => events.length >= 3, 30_000);
    t.true(paths.length >= 3, `reconnected ${paths.length} times`);
    stop();
    const count = paths.length;
    await sleep(1200); // (a wait for what must not happen: under load it can only pass falsely)
    t.is(paths.length, count, 'no reconnect after stop()');
    t.deepEqual(events.slice(0, 3).map((e) => e.id), ['c1', 'c2', 'c3']);
    t.true(errors.length >= 2);
    t.true(errors.every((e) => e.message.includes(sock)));
    // Backoff: 250 ms, then 500 ms.
    t.true(connectTimes[1]! - connectTimes[0]! >= 240, String(connectTimes[1]! - connectTimes[0]!));
    t.true(connectTimes[2]! - connectTimes[1]! >= 490, String(connectTimes[2]! - connectTimes[1]!));
    // The filter, and `since` on reconnect so nothing between two connections is lost.
    const q0 = new URL(paths[0]!, 'http://x').searchParams;
    t.deepEqual(JSON.parse(q0.get('filters') ?? '{}'), { type: ['container'], label: ['polydev.ai/owner=own1'] });
    t.is(q0.get('since'), null);
    t.is(new URL(paths[1]!, 'http://x').searchParams.get('since'), '1700000001');
  } finally {
    stop();
    await fake.close();
    srv.closeAllConnections();
    await new Promise<void>((r) => srv.close(() => r()));
    await rm(dir, { recursive: true, force: true });
  }
});

test('watch: an outage is reported once however many retries fail, and its end is announced', async (t) => {
  // Nothing listens on the socket at first: every retry fails (ENOENT) until the fake engine starts.
  const dir = await mkdtemp(path.join(os.tmpdir(), 'pd-ev-'));
  const sock = path.join(dir, 'ev.sock');
  const fake = new DockerEngine({ socketPath: sock });
  const errors: Error[] = [];
  let resumed = 0;
  let connects = 0;
  const srv = http.createServer((_req, res) => {
    connects++;
    res.writeHead(200, { 'Content-Type': 'application/json' });
    res.write('');
  });
  const stop = fake.watch('own1', () => undefined, (e) => errors.push(e), () => resumed++);
  try {
    // The first failed attempt is reported (polled: on a stalled event loop a fixed sleep could end
    // first); then retries after 250, 500 ms: at least three failed attempts (fewer under load, which
    // can only make this pass falsely).
    t.true(await pollUntil(() => errors.length > 0, 30_000), 'the outage is reported');
    await sleep(1200);
    t.is(errors.length, 1, 'one report for the whole outage');
    t.regex(errors[0]!.message, /not reachable/);
    t.is(resumed, 0);
    await new Promise<void>((r) => srv.listen(sock, r));
    // Hang guard: the next retry (backoff up to 10 s) finds the socket.
    await pollUntil(() => resumed > 0, 30_000);
    t.is(resumed, 1, 'the end of the outage is announced once');
    t.is(connects, 1);
    t.is(errors.length, 1);
  } finally {
    stop();
    await fake.close();
    srv.closeAllConnections();
    await new Promise<void>((r) => srv.close(() => r()));
    await rm(dir, { recursive: true, force: true });
  }
});

test('DeviceRequests for nvidia/gpu reach the container config (create only, no GPU here)', async (t) => {
  const owner = uniq('own');
  const s = spec(owner, 'gpu', { resources: { memoryMB: 64, devices: [{ name: 'nvidia/gpu', count: 1 }] } });
  const created = await d.request('POST', `/containers/create?name=${s.name}`, buildCreateBody(s, 'none'));
  t.is(created.status, 201, JSON.stringify(created.json));
  const id = (created.json as Json)['Id'] as string;
  const hc = (await inspect(id))['HostConfig'] as Json;
  t.deepEqual(hc['DeviceRequests'], [{ Driver: 'nvidia', Count: 1, DeviceIDs: null, Capabilities: [['gpu']], Options: null }]);
  // Listed as created (never started).
  t.is((await engine.list(owner))[0]?.state, 'created');
  await engine.remove(id);
});

test.serial('a second private dockerd runs at the same time without touching the first', async (t) => {
  const t0 = performance.now();
  const d2 = await startDockerd({ name: 'second' });
  t.log(`second dockerd ready in ${d2.timings.startMs} ms (+ image ${d2.timings.imageMs} ms); total ${(performance.now() - t0).toFixed(0)} ms`);
  const e2 = new DockerEngine({ socketPath: d2.socketPath });
  try {
    t.not(d2.socketPath, d.socketPath);
    const owner = uniq('own');
    const c = await e2.start(spec(owner, 'two', { image: d2.image }));
    t.is(c.state, 'running');
    t.deepEqual(await engine.list(owner), []);
    t.is((await e2.list(owner)).length, 1);
    await engine.ping();
  } finally {
    await e2.close();
    const t1 = performance.now();
    await d2.stop();
    t.log(`second dockerd stopped (with one running container) in ${(performance.now() - t1).toFixed(0)} ms`);
    await d2.stop();
  }
  await engine.ping();
});
