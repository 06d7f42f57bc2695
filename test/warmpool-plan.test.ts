import test from 'ava';
import type { ObservedContainer } from '../src/controllers/warmpool/engine.js';
import { planOrphans, planWarmPool } from '../src/controllers/warmpool/plan.js';
import { isDriftAction, specHashOf, type WarmPoolAction, type WarmPoolDesired, type WarmPoolSpec } from '../src/controllers/warmpool/types.js';
import type { ClaimRecord, MemberState, PoolMember } from '../src/state/pools.js';

const NOW = 1_800_000_000_000;

function desired(over: Partial<WarmPoolSpec> = {}, idleTimeoutMs?: number): WarmPoolDesired {
  const spec: WarmPoolSpec = {
    provider: 'openai',
    engine: 'docker',
    image: 'polydev-openai-runtime',
    size: 3,
    maxSize: 6,
    claim: { ttl: '1h', maxPerUser: 5, onRelease: 'destroy', workspaceDir: '/workspace' },
    driftPolicy: 'correct',
    ...over,
  };
  return { name: 'p', spec, specHash: specHashOf(spec), idleTimeoutMs, claimTtlMs: 3_600_000 };
}

const HASH = desired().specHash;

interface Box {
  slot: string;
  state?: MemberState | 'none';
  container?: Partial<ObservedContainer> | 'gone';
  claimId?: string;
  readyAt?: number;
  hash?: string;
}

/** A pool as rows + containers: each box is one slot, with or without a row and a container. */
function observed(boxes: Box[], claims: Array<Partial<ClaimRecord> & { id: string }> = [], inFlight: string[] = []) {
  const members: PoolMember[] = [];
  const containers: ObservedContainer[] = [];
  for (const b of boxes) {
    const hash = b.hash ?? HASH;
    if (b.state !== 'none') {
      members.push({
        slot: b.slot,
        pool: 'p',
        engine: 'docker',
        containerId: b.container === 'gone' || b.state === 'starting' ? null : `id-${b.slot}`,
        name: `polydev-p-${b.slot}`,
        address: `container:polydev-p-${b.slot}`,
        specHash: hash,
        state: b.state ?? 'warm',
        claimId: b.claimId ?? null,
        createdAt: NOW - 60_000,
        readyAt: b.readyAt ?? NOW - 60_000,
      });
    }
    if (b.container !== 'gone') {
      containers.push({
        id: `id-${b.slot}`,
        name: `polydev-p-${b.slot}`,
        pool: 'p',
        slot: b.slot,
        specHash: hash,
        state: 'running',
        createdAt: NOW - 60_000,
        address: `container:polydev-p-${b.slot}`,
        ...(b.container ?? {}),
      });
    }
  }
  const openClaims: ClaimRecord[] = claims.map((c) => ({
    pool: 'p',
    userId: 'u1',
    slot: null,
    containerId: null,
    containerName: null,
    address: null,
    warm: true,
    state: 'bound',
    reason: null,
    createdAt: NOW - 1000,
    boundAt: NOW - 1000,
    expiresAt: NOW + 3_600_000,
    endedAt: null,
    latencyMs: 1,
    ...c,
  }));
  return { now: NOW, containers, members, claims: openClaims, inFlight: new Set(inFlight) };
}

const summary = (actions: WarmPoolAction[]) =>
  actions
    .map((a) => {
      switch (a.type) {
        case 'start':
          return 'start';
        case 'remove':
          return `remove ${a.slot} ${a.reason}`;
        case 'recycle':
          return `recycle ${a.slot}`;
        case 'adopt':
          return `adopt ${a.member.slot} ${a.member.state}`;
        case 'promote':
          return `promote ${a.slot}`;
        case 'forget':
          return `forget ${a.slot}`;
        case 'endClaim':
          return `endClaim ${a.claimId} ${a.state}`;
      }
    })
    .sort();

const starts = (n: number) => Array.from({ length: n }, () => 'start');

const table: Array<{ title: string; d?: WarmPoolDesired; o: ReturnType<typeof observed>; want: string[] }> = [
  { title: 'empty pool: start size containers', o: observed([]), want: starts(3) },
  { title: 'converged: nothing to do', o: observed([{ slot: 'a' }, { slot: 'b' }, { slot: 'c' }]), want: [] },
  {
    title: 'claimed containers count against maxSize, not size',
    o: observed([{ slot: 'a' }, { slot: 'b' }, { slot: 'c' }, { slot: 'd', state: 'claimed', claimId: 'k1' }], [{ id: 'k1', slot: 'd' }]),
    want: [],
  },
  {
    title: 'one claimed from a full pool: one start',
    o: observed([{ slot: 'a' }, { slot: 'b' }, { slot: 'c', state: 'claimed', claimId: 'k1' }], [{ id: 'k1', slot: 'c' }]),
    want: starts(1),
  },
  {
    title: 'never exceed maxSize: 5 claimed of maxSize 6 leaves room for one start',
    o: observed(
      ['a', 'b', 'c', 'd', 'e'].map((s) => ({ slot: s, state: 'claimed' as const, claimId: `k${s}` })),
      ['a', 'b', 'c', 'd', 'e'].map((s) => ({ id: `k${s}`, slot: s })),
    ),
    want: starts(1),
  },
  {
    title: 'exited and unhealthy containers are removed and replaced',
    o: observed([
      { slot: 'a', container: { state: 'exited', exitCode: 137 } },
      { slot: 'b', container: { health: 'unhealthy' } },
      { slot: 'c' },
    ]),
    want: ['remove a exited', 'remove b unhealthy', 'start', 'start'],
  },
  {
    title: 'a claimed container that died fails its claim',
    o: observed([{ slot: 'a' }, { slot: 'b' }, { slot: 'c' }, { slot: 'd', state: 'claimed', claimId: 'k1', container: { state: 'dead' } }], [{ id: 'k1', slot: 'd' }]),
    want: ['endClaim k1 failed', 'remove d exited'],
  },
  {
    title: 'a row whose container is gone is forgotten and replaced',
    o: observed([{ slot: 'a', container: 'gone' }, { slot: 'b' }, { slot: 'c' }]),
    want: ['forget a', 'start'],
  },
  {
    title: 'a claimed row whose container is gone fails the claim',
    o: observed([{ slot: 'a', state: 'claimed', claimId: 'k1', container: 'gone' }, { slot: 'b' }, { slot: 'c' }, { slot: 'd' }], [{ id: 'k1', slot: 'a' }]),
    want: ['endClaim k1 failed', 'forget a'],
  },
  {
    title: 'an owned running container without a row is adopted (crash between create and record)',
    o: observed([{ slot: 'a', state: 'none' }, { slot: 'b' }, { slot: 'c' }]),
    want: ['adopt a warm'],
  },
  {
    title: 'an unrecorded container started for a claim is removed, not adopted',
    o: observed([{ slot: 'a', state: 'none', container: { claim: 'k9' } }, { slot: 'b' }, { slot: 'c' }, { slot: 'd' }]),
    want: ['remove a untracked'],
  },
  {
    title: 'a dead container without a row is removed',
    o: observed([{ slot: 'a', state: 'none', container: { state: 'exited' } }, { slot: 'b' }, { slot: 'c' }, { slot: 'd' }]),
    want: ['remove a untracked'],
  },
  {
    title: 'a starting row in flight counts as starting: no second start',
    o: observed([{ slot: 'a', state: 'starting', container: 'gone' }, { slot: 'b' }, { slot: 'c' }], [], ['a']),
    want: [],
  },
  {
    title: 'a starting row no longer in flight (daemon died mid-start) is forgotten',
    o: observed([{ slot: 'a', state: 'starting', container: 'gone' }, { slot: 'b' }, { slot: 'c' }]),
    want: ['forget a', 'start'],
  },
  {
    title: 'a starting row whose container runs (crash after start) is promoted to warm',
    o: observed([{ slot: 'a', state: 'starting' }, { slot: 'b' }, { slot: 'c' }]),
    want: ['promote a'],
  },
  {
    title: 'a container whose health check is still starting counts as starting',
    o: observed([{ slot: 'a', state: 'starting', container: { health: 'starting' } }, { slot: 'b' }, { slot: 'c' }]),
    want: [],
  },
  {
    title: 'expired claims end and their containers are released (destroy)',
    o: observed(
      [{ slot: 'a' }, { slot: 'b' }, { slot: 'c' }, { slot: 'd', state: 'claimed', claimId: 'k1' }],
      [{ id: 'k1', slot: 'd', expiresAt: NOW - 1 }],
    ),
    want: ['endClaim k1 expired', 'remove d released'],
  },
  {
    title: 'a pending claim whose cold start is not in flight fails',
    o: observed([{ slot: 'a' }, { slot: 'b' }, { slot: 'c' }, { slot: 'd', state: 'starting', claimId: 'k1', container: 'gone' }], [
      { id: 'k1', slot: 'd', state: 'pending', boundAt: null },
    ]),
    want: ['endClaim k1 failed', 'forget d'],
  },
  {
    title: 'a pending claim whose cold start is in flight is left alone and counts as claimed',
    o: observed(
      [{ slot: 'a' }, { slot: 'b' }, { slot: 'c' }, { slot: 'd', state: 'starting', claimId: 'k1', container: 'gone' }],
      [{ id: 'k1', slot: 'd', state: 'pending', boundAt: null }],
      ['d'],
    ),
    want: [],
  },
  {
    title: 'released containers are destroyed by default',
    o: observed([{ slot: 'a' }, { slot: 'b' }, { slot: 'c' }, { slot: 'd', state: 'releasing' }]),
    want: ['remove d released'],
  },
  {
    title: 'recycle: a released container refills the pool instead of a start',
    d: desired({ claim: { ttl: '1h', maxPerUser: 5, onRelease: 'recycle', workspaceDir: '/workspace' } }),
    o: observed([{ slot: 'a' }, { slot: 'b' }, { slot: 'd', state: 'releasing' }]),
    want: ['recycle d'],
  },
  {
    title: 'recycle only while the pool needs warm ones; the rest are destroyed',
    d: desired({ claim: { ttl: '1h', maxPerUser: 5, onRelease: 'recycle', workspaceDir: '/workspace' } }),
    o: observed([{ slot: 'a' }, { slot: 'b' }, { slot: 'c' }, { slot: 'd', state: 'releasing' }]),
    want: ['remove d released'],
  },
  {
    title: 'recycle never returns a container of a stale spec',
    d: desired({ claim: { ttl: '1h', maxPerUser: 5, onRelease: 'recycle', workspaceDir: '/workspace' } }),
    o: observed([{ slot: 'a' }, { slot: 'b' }, { slot: 'd', state: 'releasing', hash: 'old' }]),
    want: ['remove d released', 'start'],
  },
  {
    title: 'recycle never returns a container started for a claim (it carries the claim label)',
    d: desired({ claim: { ttl: '1h', maxPerUser: 5, onRelease: 'recycle', workspaceDir: '/workspace' } }),
    o: observed([{ slot: 'a' }, { slot: 'b' }, { slot: 'd', state: 'releasing', container: { claim: 'k1' } }]),
    want: ['remove d released', 'start'],
  },
  {
    title: 'roll with surge room: every stale replaced at once, one stale removed (size - 1 warm kept)',
    d: desired({ size: 3, maxSize: 10 }),
    o: observed([{ slot: 'a', hash: 'old' }, { slot: 'b', hash: 'old' }, { slot: 'c', hash: 'old' }]),
    want: ['remove a stale', 'start', 'start', 'start'],
  },
  {
    title: 'roll continues: fresh ones warm, the stale rest go',
    d: desired({ size: 3, maxSize: 10 }),
    o: observed([{ slot: 'a', hash: 'old' }, { slot: 'b', hash: 'old' }, { slot: 'x' }, { slot: 'y' }, { slot: 'z' }]),
    want: ['remove a stale', 'remove b stale'],
  },
  {
    title: 'roll without room (maxSize = size): one at a time',
    d: desired({ size: 3, maxSize: 3 }),
    o: observed([{ slot: 'a', hash: 'old', readyAt: NOW - 3000 }, { slot: 'b', hash: 'old', readyAt: NOW - 2000 }, { slot: 'c', hash: 'old', readyAt: NOW - 1000 }]),
    want: ['remove a stale', 'start'],
  },
  {
    title: 'roll never touches claimed containers',
    d: desired({ size: 2, maxSize: 4 }),
    o: observed(
      [{ slot: 'a', hash: 'old', state: 'claimed', claimId: 'k1' }, { slot: 'b' }, { slot: 'c' }],
      [{ id: 'k1', slot: 'a' }],
    ),
    want: [],
  },
  {
    title: 'roll at maxSize with claims filling the room still progresses, one at a time',
    d: desired({ size: 2, maxSize: 3 }),
    o: observed(
      [{ slot: 'a', hash: 'old' }, { slot: 'b', hash: 'old' }, { slot: 'k', state: 'claimed', claimId: 'k1' }],
      [{ id: 'k1', slot: 'k' }],
    ),
    want: ['remove a stale', 'start'],
  },
  {
    title: 'idle warm containers past idleTimeout are recycled like a roll',
    d: desired({ size: 2, maxSize: 4 }, 60_000),
    o: observed([{ slot: 'a', readyAt: NOW - 120_000 }, { slot: 'b', readyAt: NOW - 1000 }]),
    want: ['remove a idle', 'start'],
  },
  {
    title: 'size lowered: the oldest warm beyond size go',
    d: desired({ size: 1, maxSize: 6 }),
    o: observed([{ slot: 'a', readyAt: NOW - 3000 }, { slot: 'b', readyAt: NOW - 2000 }, { slot: 'c', readyAt: NOW - 1000 }]),
    want: ['remove a excess', 'remove b excess'],
  },
  {
    title: 'maxSize lowered below claimed + warm: warm ones go, claimed stay',
    d: desired({ size: 2, maxSize: 2 }),
    o: observed([{ slot: 'a' }, { slot: 'b' }, { slot: 'k', state: 'claimed', claimId: 'k1' }], [{ id: 'k1', slot: 'k' }]),
    want: ['remove a excess'],
  },
  {
    title: 'size 0 keeps nothing warm',
    d: desired({ size: 0, maxSize: 5 }),
    o: observed([{ slot: 'a' }]),
    want: ['remove a excess'],
  },
  {
    title: 'two containers of one slot: the recorded one stays',
    o: observed([{ slot: 'a' }, { slot: 'b' }, { slot: 'c' }]),
    want: ['remove a duplicate'],
  },
];
// The duplicate case: a second container carrying slot a's label.
table[table.length - 1]!.o.containers.push({ ...table[table.length - 1]!.o.containers[0]!, id: 'id-a-2', createdAt: NOW - 10 });

for (const row of table) {
  test(`plan: ${row.title}`, (t) => {
    t.deepEqual(summary(planWarmPool(row.d ?? desired(), row.o)), [...row.want].sort());
  });
}

test('plan: the duplicate removed is the unrecorded one', (t) => {
  const row = table[table.length - 1]!;
  const actions = planWarmPool(desired(), row.o);
  const removal = actions.find((a) => a.type === 'remove');
  t.is(removal?.type === 'remove' ? removal.containerId : undefined, 'id-a-2');
});

test('plan: a converged pool stays converged after applying a plan (adopt then nothing)', (t) => {
  const o = observed([{ slot: 'a', state: 'none' }, { slot: 'b' }, { slot: 'c' }]);
  const actions = planWarmPool(desired(), o);
  const adopted = actions.flatMap((a) => (a.type === 'adopt' ? [a.member] : []));
  t.is(adopted.length, 1);
  t.deepEqual(planWarmPool(desired(), { ...o, members: [...o.members, ...adopted] }), []);
});

test('plan: is pure (same input, same output; input untouched)', (t) => {
  const o = observed([{ slot: 'a', hash: 'old' }, { slot: 'b', container: { state: 'exited' } }]);
  const before = JSON.stringify({ ...o, inFlight: [...o.inFlight] });
  t.deepEqual(planWarmPool(desired(), o), planWarmPool(desired(), o));
  t.is(JSON.stringify({ ...o, inFlight: [...o.inFlight] }), before);
});

test('plan: a spec hash changes with what a container is made of, not with size or claim settings', (t) => {
  const base = desired().spec;
  t.is(specHashOf({ ...base, size: 9, maxSize: 20 }), specHashOf(base));
  t.is(specHashOf({ ...base, claim: { ...base.claim, onRelease: 'recycle' } }), specHashOf(base));
  t.not(specHashOf({ ...base, image: 'other' }), specHashOf(base));
  t.not(specHashOf({ ...base, env: { A: '1' } }), specHashOf(base));
  t.not(specHashOf({ ...base, resources: { memoryMB: 256 } }), specHashOf(base));
});

test('orphans: containers of pools that do not exist, and only those', (t) => {
  const { containers } = observed([{ slot: 'a' }, { slot: 'b' }]);
  const other = { ...containers[0]!, id: 'x', pool: 'gone-pool' };
  t.deepEqual(planOrphans(new Set(['p']), [...containers, other]).map((c) => c.id), ['x']);
  t.deepEqual(planOrphans(new Set(['p', 'gone-pool']), [...containers, other]), []);
});

test('drift: a refill after a claim or a release is the pool\'s own work; a dead or vanished container is drift', (t) => {
  const claimed = observed([{ slot: 'a' }, { slot: 'b' }, { slot: 'c', state: 'claimed', claimId: 'k1' }], [{ id: 'k1', slot: 'c' }]);
  t.false(planWarmPool(desired(), claimed).some(isDriftAction));
  const released = observed([{ slot: 'a' }, { slot: 'b' }, { slot: 'c' }, { slot: 'd', state: 'releasing' }]);
  t.false(planWarmPool(desired(), released).some(isDriftAction));
  const expired = observed([{ slot: 'a' }, { slot: 'b' }, { slot: 'c' }, { slot: 'd', state: 'claimed', claimId: 'k1' }], [{ id: 'k1', slot: 'd', expiresAt: NOW - 1 }]);
  t.false(planWarmPool(desired(), expired).some(isDriftAction));
  const dead = observed([{ slot: 'a', container: { state: 'exited' } }, { slot: 'b' }, { slot: 'c' }]);
  t.true(planWarmPool(desired(), dead).some(isDriftAction));
  const vanished = observed([{ slot: 'a', container: 'gone' }, { slot: 'b' }, { slot: 'c' }]);
  t.true(planWarmPool(desired(), vanished).some(isDriftAction));
});
