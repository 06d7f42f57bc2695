// Leader election on a coordination.k8s.io/v1 Lease (src/runtime/kubernetes-lease.ts) against the
// fake API server in helpers/fake-kube.ts. Each elector has its own token, so the fake can cut one
// off (a killed or partitioned holder) while the other carries on.

import test, { type ExecutionContext } from 'ava';
import { KubernetesClient, loadKubeConfig } from '../src/drivers/kubernetes.js';
import { KubernetesLeaseElector } from '../src/runtime/kubernetes-lease.js';
import { AbortError, type LeaderElectionTimings } from '../src/runtime/leader.js';
import { capturedLogger, startFakeKube, writeKubeconfig, type FakeKube } from './helpers/fake-kube.js';
import { eventually, within } from './helpers/unit-fixtures.js';

const NS = 'polydev';
// Scaled up from 1500/800/200: every elector and the fake API server share one event loop, and on a
// loaded machine a stall of a second (longer than renewDeadline − retryPeriod was) made the leader
// lose its lease for real, or the standby take an unexpired one. The relations under test (renew
// within renewDeadline, take over after leaseDuration, lose before anyone takes over) are the same.
// 4.5 s is stored as 5 whole seconds: the rounding up is still exercised.
const TIMINGS: LeaderElectionTimings = { leaseDurationMs: 4500, renewDeadlineMs: 3000, retryPeriodMs: 300 };
/** The lease duration as stored (whole seconds, rounded up), which a standby honours. */
const STORED_LEASE_MS = 5000;
/** Hang guard of waits for an election step (a passing wait costs only its own time). */
const WAIT_MS = 30_000;
const MICRO = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$/;

interface Candidate {
  elector: KubernetesLeaseElector;
  token: string;
  lost: number[];
}

async function setup(t: ExecutionContext, n: number): Promise<{ fake: FakeKube; candidates: Candidate[]; logs: () => string }> {
  const tokens = Array.from({ length: n }, (_, i) => `candidate-${i}-token-${Math.random().toString(36).slice(2)}`);
  const { fake, dir } = await startFakeKube(t, { token: tokens[0]!, extraTokens: tokens.slice(1) });
  const { logger, text } = capturedLogger();
  const candidates = tokens.map((token, i) => {
    const kubeconfig = writeKubeconfig(dir, fake.address, token, { file: `kc-${i}.yaml` });
    const elector = new KubernetesLeaseElector({
      client: new KubernetesClient(loadKubeConfig({ kubeconfig })),
      namespace: NS,
      identity: `candidate-${i}`,
      timings: TIMINGS,
      logger,
    });
    const c: Candidate = { elector, token, lost: [] };
    elector.onLost(() => c.lost.push(Date.now()));
    t.teardown(() => elector.release());
    return c;
  });
  return { fake, candidates, logs: text };
}

type LeaseSpec = { holderIdentity?: string; leaseTransitions?: number; leaseDurationSeconds?: number; acquireTime?: string; renewTime?: string };
const spec = (fake: FakeKube) => fake.lease(NS, 'polydev-reconciler')?.spec as LeaseSpec | undefined;

/** Starts acquire for each candidate; returns when each finished (or the test's abort). */
function acquireAll(t: ExecutionContext, candidates: Candidate[]): Array<Promise<number>> {
  const abort = new AbortController();
  t.teardown(() => abort.abort());
  return candidates.map((c) => c.elector.acquire(abort.signal).then(() => Date.now(), () => -1));
}

test('two candidates on one Lease: exactly one leads, with a client-go shaped record', async (t) => {
  const { fake, candidates } = await setup(t, 2);
  const [a, b] = candidates as [Candidate, Candidate];
  const acquired = acquireAll(t, [a, b]);
  await within(Promise.race(acquired), WAIT_MS, 'a leader');
  await new Promise((r) => setTimeout(r, STORED_LEASE_MS + 1500)); // the leader keeps renewing past a lease duration
  t.is([a, b].filter((c) => c.elector.isLeader()).length, 1);
  const leader = a.elector.isLeader() ? a : b;
  const s = spec(fake)!;
  t.is(s.holderIdentity, leader.elector.identity);
  t.is(s.leaseDurationSeconds, 5, '4.5 s, rounded up');
  t.is(s.leaseTransitions, 0);
  t.regex(s.acquireTime!, MICRO);
  t.regex(s.renewTime!, MICRO);
  t.true(Date.parse(s.renewTime!) > Date.parse(s.acquireTime!), 'renewed since acquired');
  t.is((await b.elector.holder())?.identity, leader.elector.identity);
  t.deepEqual([a.lost, b.lost], [[], []]);
});

test('release hands the lease over at once, with leaseTransitions incremented', async (t) => {
  const { fake, candidates } = await setup(t, 2);
  const [a, b] = candidates as [Candidate, Candidate];
  const [aDone] = acquireAll(t, [a]);
  await within(aDone!, WAIT_MS, 'a leads');
  const [bDone] = acquireAll(t, [b]);
  await new Promise((r) => setTimeout(r, 500));
  t.false(b.elector.isLeader(), 'b waits while a renews');
  const releasedAt = Date.now();
  await a.elector.release();
  t.false(a.elector.isLeader());
  t.is(spec(fake)!.holderIdentity, '');
  t.is(spec(fake)!.leaseDurationSeconds, 5, 'the duration is kept');
  const bAt = await within(bDone!, WAIT_MS, 'b leads');
  t.true(bAt - releasedAt < STORED_LEASE_MS, `a released lease is not waited out (b led ${bAt - releasedAt} ms after the release)`);
  t.is(spec(fake)!.holderIdentity, 'candidate-1');
  t.is(spec(fake)!.leaseTransitions, 1);
  t.deepEqual(a.lost, [], 'giving the lease up is not losing it');
});

test('a holder that stops renewing is taken over after the lease duration; it reports the loss first', async (t) => {
  const { fake, candidates } = await setup(t, 2);
  const [a, b] = candidates as [Candidate, Candidate];
  const [aDone] = acquireAll(t, [a]);
  await within(aDone!, WAIT_MS, 'a leads');
  const [bDone] = acquireAll(t, [b]);
  await new Promise((r) => setTimeout(r, 400));
  t.false(b.elector.isLeader());
  // a is cut off from the API server (killed, frozen or partitioned): it cannot renew.
  fake.blockToken(a.token);
  // Measured from a's last renewal in the record, not from the cut: on a loaded machine that
  // renewal may lie well before the cut (and b's reads of it late after it was written).
  const lastRenewal = Date.parse(spec(fake)!.renewTime!);
  const bAt = await within(bDone!, WAIT_MS, 'b takes over');
  t.true(bAt - lastRenewal >= TIMINGS.leaseDurationMs, `not before the lease duration has passed (${bAt - lastRenewal} ms after the last renewal)`);
  t.is(spec(fake)!.holderIdentity, 'candidate-1');
  t.is(spec(fake)!.leaseTransitions, 1);
  await eventually(() => a.lost.length === 1, 'a notices', WAIT_MS);
  t.false(a.elector.isLeader());
  t.true(a.lost[0]! <= bAt, 'the old leader stopped acting before the new one started');
});

test('a leader that finds another holder in the record loses at once (onLost once)', async (t) => {
  const { fake, candidates, logs } = await setup(t, 1);
  const [a] = candidates as [Candidate];
  const [aDone] = acquireAll(t, [a]);
  await within(aDone!, WAIT_MS, 'a leads');
  fake.putLease(NS, 'polydev-reconciler', (s) => {
    s.holderIdentity = 'someone-else';
    s.renewTime = new Date().toISOString().replace('Z', '000Z');
  });
  await eventually(() => a.lost.length > 0, 'onLost', WAIT_MS);
  t.false(a.elector.isLeader());
  await new Promise((r) => setTimeout(r, 3 * TIMINGS.retryPeriodMs));
  t.is(a.lost.length, 1);
  t.is(spec(fake)!.holderIdentity, 'someone-else', 'the lost leader does not fight for it');
  t.regex(logs(), /lost leadership.*someone-else/);
  t.false(logs().includes(a.token));
});

test('acquire rejects with an AbortError when the signal aborts first', async (t) => {
  const { candidates } = await setup(t, 2);
  const [a, b] = candidates as [Candidate, Candidate];
  const [aDone] = acquireAll(t, [a]);
  await within(aDone!, WAIT_MS, 'a leads');
  const abort = new AbortController();
  const pending = b.elector.acquire(abort.signal);
  setTimeout(() => abort.abort(), 300);
  const err = await t.throwsAsync(within(pending, WAIT_MS, 'the abort'));
  t.true(err instanceof AbortError);
  t.false(b.elector.isLeader());
});

test('timings that would let two leaders overlap are refused', (t) => {
  const client = {} as KubernetesClient;
  const { logger } = capturedLogger();
  t.throws(() => new KubernetesLeaseElector({ client, namespace: NS, timings: { leaseDurationMs: 1000, renewDeadlineMs: 1000, retryPeriodMs: 100 }, logger }), { message: /leaseDuration must be greater/ });
  t.throws(() => new KubernetesLeaseElector({ client, namespace: NS, timings: { leaseDurationMs: 3000, renewDeadlineMs: 1000, retryPeriodMs: 900 }, logger }), { message: /retryPeriod/ });
});
