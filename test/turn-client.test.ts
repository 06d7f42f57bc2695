// STUN/TURN client (src/drivers/turn.ts): codec against the RFC 5769 test vectors,
// then probes against a real coturn 4.6.1 (test/helpers/coturn.ts) in both auth
// modes, and a few server misbehaviours coturn will not produce, played by a tiny
// fake STUN server on 127.0.0.1.

import test, { type ExecutionContext } from 'ava';
import dgram from 'node:dgram';
import net from 'node:net';
import { createHmac } from 'node:crypto';
import { performance } from 'node:perf_hooks';

import {
  StunAttr,
  StunClass,
  StunDecodeError,
  StunMethod,
  TurnSession,
  computeFingerprint,
  decodeAddress,
  decodeErrorCode,
  decodeStunMessage,
  encodeAddress,
  encodeErrorCode,
  encodeStunMessage,
  getAttribute,
  getStringAttribute,
  longTermKey,
  probeTurn,
  restCredentials,
  splitStunMessageType,
  stringAttribute,
  stunMessageType,
  u32Attribute,
  verifyMessageIntegrity,
  type DecodedStunMessage,
  type TurnProbeOptions,
  type TurnProbeResult,
} from '../src/drivers/turn.js';
import { startCoturn, type Coturn } from './helpers/coturn.js';
import { controlTimer, pollUntil } from './helpers/timing.js';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

// Probe budget for servers that answer (healthy coturn, a fake that replies): such a probe takes a few
// ms, but under the suite's load (2 cores, event loops stalled for seconds) 2 s budgets ran out. Only a
// hung server costs the budget, and the tests about timeouts set their own, so this is a hang guard.
// Probe speed is measured by bench/turn.ts (probe cost, binding and full allocation, UDP and TCP).
const ANSWERED_TIMEOUT_MS = 20_000;

const hex = (...lines: string[]): Buffer => Buffer.from(lines.join('').replace(/\s+/g, ''), 'hex');

// ---------------------------------------------------------------------------
// RFC 5769 test vectors (typed in from the RFC, 4 bytes per line as printed there)

const RFC5769_PASSWORD = 'VOkJxbRl1RmTxUk/WvJxBt';
const RFC5769_TXID = hex('b7e7a701 bc34d686 fa87dfae');

// 2.1 Sample Request
const REQ_2_1 = hex(
  '00010058', '2112a442', 'b7e7a701', 'bc34d686', 'fa87dfae',
  '80220010', '5354554e', '20746573', '7420636c', '69656e74', // SOFTWARE "STUN test client"
  '00240004', '6e0001ff', // PRIORITY
  '80290008', '932ff9b1', '51263b36', // ICE-CONTROLLED
  '00060009', '6576746a', '3a683676', '59202020', // USERNAME "evtj:h6vY" + 3 bytes padding (spaces)
  '00080014', '9aeaa70c', 'bfd8cb56', '781ef2b5', 'b2d3f249', 'c1b571a2', // MESSAGE-INTEGRITY
  '80280004', 'e57a3bcf', // FINGERPRINT
);

// 2.2 Sample IPv4 Response
const RESP_2_2 = hex(
  '0101003c', '2112a442', 'b7e7a701', 'bc34d686', 'fa87dfae',
  '8022000b', '74657374', '20766563', '746f7220', // SOFTWARE "test vector" + 1 byte padding (space)
  '00200008', '0001a147', 'e112a643', // XOR-MAPPED-ADDRESS 192.0.2.1:32853
  '00080014', '2b91f599', 'fd9e90c3', '8c7489f9', '2af9ba53', 'f06be7d7',
  '80280004', 'c07d4c96',
);

// 2.3 Sample IPv6 Response
const RESP_2_3 = hex(
  '01010048', '2112a442', 'b7e7a701', 'bc34d686', 'fa87dfae',
  '8022000b', '74657374', '20766563', '746f7220',
  '00200014', '0002a147', '0113a9fa', 'a5d3f179', 'bc25f4b5', 'bed2b9d9', // 2001:db8:1234:5678:11:2233:4455:6677 port 32853
  '00080014', 'a382954e', '4be67bf1', '1784c97c', '8292c275', 'bfe3ed41',
  '80280004', 'c8fb0b4c',
);

// 2.4 Sample Request with Long-Term Authentication (no FINGERPRINT)
const REQ_2_4 = hex(
  '00010060', '2112a442', '78ad3433', 'c6ad72c0', '29da412e',
  '00060012', 'e3839ee3', '8388e383', 'aae38383', 'e382afe3', '82b90000', // USERNAME "マトリックス"
  '0015001c', '662f2f34', '39396b39', '35346436', '4f4c3334', '6f4c3946', '53547679', '36347341', // NONCE
  '0014000b', '6578616d', '706c652e', '6f726700', // REALM "example.org"
  '00080014', 'f6702465', '6dd64a3e', '02b8e071', '2e85c9a2', '8ca89666',
);
const RFC5769_LT_USER = '\u30de\u30c8\u30ea\u30c3\u30af\u30b9';
const RFC5769_LT_PASSWORD_SASLPREPPED = 'TheMatrIX'; // "The<U+00AD>M<U+00AA>tr<U+2168>" after SASLprep
const RFC5769_LT_NONCE = 'f//499k954d6OL34oL9FSTvy64sA';

test('RFC 5769 2.1: sample request decodes, MESSAGE-INTEGRITY and FINGERPRINT verify', (t) => {
  const m = decodeStunMessage(REQ_2_1); // throws on a wrong FINGERPRINT
  t.is(m.method, StunMethod.Binding);
  t.is(m.cls, StunClass.Request);
  t.deepEqual(m.transactionId, RFC5769_TXID);
  t.is(getStringAttribute(m, StunAttr.Software), 'STUN test client');
  t.is(getStringAttribute(m, StunAttr.Username), 'evtj:h6vY');
  t.deepEqual(getAttribute(m, 0x0024), hex('6e0001ff'));
  t.is(m.integrityOffset, 76);
  t.is(m.fingerprintOffset, 100);
  t.is(computeFingerprint(m.raw, 100), 0xe57a3bcf);
  t.true(verifyMessageIntegrity(m, Buffer.from(RFC5769_PASSWORD)));
  t.false(verifyMessageIntegrity(m, Buffer.from(RFC5769_PASSWORD + 'x')));
});

test('RFC 5769 2.2 / 2.3: sample responses, XOR-MAPPED-ADDRESS IPv4 and IPv6', (t) => {
  const v4 = decodeStunMessage(RESP_2_2);
  t.is(v4.method, StunMethod.Binding);
  t.is(v4.cls, StunClass.Success);
  t.is(getStringAttribute(v4, StunAttr.Software), 'test vector');
  t.deepEqual(decodeAddress(getAttribute(v4, StunAttr.XorMappedAddress)!, v4.transactionId, true), { family: 4, address: '192.0.2.1', port: 32853 });
  t.true(verifyMessageIntegrity(v4, Buffer.from(RFC5769_PASSWORD)));

  const v6 = decodeStunMessage(RESP_2_3);
  t.deepEqual(decodeAddress(getAttribute(v6, StunAttr.XorMappedAddress)!, v6.transactionId, true), {
    family: 6,
    address: '2001:db8:1234:5678:11:2233:4455:6677',
    port: 32853,
  });
  t.true(verifyMessageIntegrity(v6, Buffer.from(RFC5769_PASSWORD)));
  // The encoder produces the same attribute values.
  t.deepEqual(encodeAddress({ address: '192.0.2.1', port: 32853 }, RFC5769_TXID, true), getAttribute(v4, StunAttr.XorMappedAddress));
  t.deepEqual(encodeAddress({ address: '2001:db8:1234:5678:11:2233:4455:6677', port: 32853 }, RFC5769_TXID, true), getAttribute(v6, StunAttr.XorMappedAddress));

  // One flipped bit anywhere: the FINGERPRINT no longer matches and decoding fails.
  const bad = Buffer.from(RESP_2_2);
  bad[30] = bad[30]! ^ 0x01;
  t.throws(() => decodeStunMessage(bad), { instanceOf: StunDecodeError, message: /FINGERPRINT/ });
});

test('RFC 5769 2.4: long-term key, and the encoder reproduces the sample byte for byte', (t) => {
  const key = longTermKey(RFC5769_LT_USER, 'example.org', RFC5769_LT_PASSWORD_SASLPREPPED);
  t.is(key.toString('hex'), 'e8ca7ad59d5eb0518e312911d2dab2a9'); // MD5, computed independently (python hashlib)
  const m = decodeStunMessage(REQ_2_4);
  t.is(getStringAttribute(m, StunAttr.Username), RFC5769_LT_USER);
  t.is(getStringAttribute(m, StunAttr.Nonce), RFC5769_LT_NONCE);
  t.is(getStringAttribute(m, StunAttr.Realm), 'example.org');
  t.is(m.fingerprintOffset, undefined);
  t.true(verifyMessageIntegrity(m, key));
  t.false(verifyMessageIntegrity(m, longTermKey(RFC5769_LT_USER, 'example.org', 'The\u00adM\u00aatr\u2168'))); // no SASLprep here

  const encoded = encodeStunMessage(
    {
      method: StunMethod.Binding,
      cls: StunClass.Request,
      transactionId: hex('78ad3433 c6ad72c0 29da412e'),
      attributes: [
        stringAttribute(StunAttr.Username, RFC5769_LT_USER),
        stringAttribute(StunAttr.Nonce, RFC5769_LT_NONCE),
        stringAttribute(StunAttr.Realm, 'example.org'),
      ],
    },
    { integrityKey: key },
  );
  t.is(encoded.toString('hex'), REQ_2_4.toString('hex'));
});

test('codec: round trip with MESSAGE-INTEGRITY and FINGERPRINT; message types; error codes; malformed input', (t) => {
  t.is(stunMessageType(StunMethod.Binding, StunClass.Success), 0x0101);
  t.is(stunMessageType(StunMethod.Allocate, StunClass.Request), 0x0003);
  t.is(stunMessageType(StunMethod.Allocate, StunClass.Success), 0x0103);
  t.is(stunMessageType(StunMethod.Allocate, StunClass.Error), 0x0113);
  t.is(stunMessageType(StunMethod.Refresh, StunClass.Request), 0x0004);
  t.deepEqual(splitStunMessageType(0x0113), { method: StunMethod.Allocate, cls: StunClass.Error });

  const key = longTermKey('user', 'realm', 'pass');
  const txid = Buffer.from('0123456789ab');
  const buf = encodeStunMessage(
    {
      method: StunMethod.Allocate,
      cls: StunClass.Request,
      transactionId: txid,
      attributes: [u32Attribute(StunAttr.RequestedTransport, 17 << 24), stringAttribute(StunAttr.Username, 'user'), stringAttribute(StunAttr.Realm, 'realm')],
    },
    { integrityKey: key, fingerprint: true },
  );
  t.is(buf.length % 4, 0);
  t.is(buf.readUInt16BE(2), buf.length - 20);
  t.is(buf.readUInt32BE(4), 0x2112a442);
  const m = decodeStunMessage(buf);
  t.is(m.method, StunMethod.Allocate);
  t.deepEqual(m.transactionId, txid);
  t.deepEqual(getAttribute(m, StunAttr.RequestedTransport), hex('11000000'));
  t.is(getStringAttribute(m, StunAttr.Username), 'user');
  t.is(getAttribute(m, StunAttr.Username)!.length, 4);
  t.true(verifyMessageIntegrity(m, key));
  t.false(verifyMessageIntegrity(m, longTermKey('user', 'realm', 'wrong')));
  t.is(m.fingerprintOffset, buf.length - 8);

  t.deepEqual(decodeErrorCode(encodeErrorCode(438, 'Stale Nonce')), { code: 438, reason: 'Stale Nonce' });
  t.deepEqual(decodeErrorCode(hex('000004 01')), { code: 401, reason: '' });

  t.throws(() => decodeStunMessage(buf.subarray(0, 19)), { instanceOf: StunDecodeError });
  t.throws(() => decodeStunMessage(buf.subarray(0, buf.length - 4)), { instanceOf: StunDecodeError, message: /length/ });
  const noCookie = Buffer.from(buf);
  noCookie.writeUInt32BE(0x2112a443, 4);
  t.throws(() => decodeStunMessage(noCookie), { instanceOf: StunDecodeError, message: /cookie/ });
  const overrun = Buffer.from(REQ_2_4);
  overrun.writeUInt16BE(0x0100, 22); // USERNAME claims 256 bytes
  t.throws(() => decodeStunMessage(overrun), { instanceOf: StunDecodeError, message: /overruns/ });
});

test('restCredentials: coturn username format and password (vector computed with python hmac)', (t) => {
  const c = restCredentials('k3y-s3cret', 'alice', 3600, 1_700_000_000_123);
  t.deepEqual(c, { username: '1700003600:alice', password: 'ArDTUKeuO75HqemBmu5GxBq58h4=', expiresAt: 1_700_003_600_000 });
  t.is(restCredentials('k3y-s3cret', '', 60, 1_000_000).username, '1060');
  t.throws(() => restCredentials('', 'a', 60));
  t.throws(() => restCredentials('s', 'a', 0));
  t.is(restCredentials('s', 'team:a', 60, 0).username, '60:team:a'); // coturn splits at the first ':'
});

test('probeTurn throws only on programmer errors (bad options)', async (t) => {
  const base: TurnProbeOptions = {
    host: '127.0.0.1',
    port: 3478,
    transport: 'udp',
    realm: 'r',
    credentials: { mode: 'longTerm', username: 'u', password: 'p' },
    timeoutMs: 100,
  };
  await t.throwsAsync(probeTurn({ ...base, port: 0 }));
  await t.throwsAsync(probeTurn({ ...base, port: 70000 }));
  await t.throwsAsync(probeTurn({ ...base, timeoutMs: 0 }));
  await t.throwsAsync(probeTurn({ ...base, host: '' }));
  await t.throwsAsync(probeTurn({ ...base, transport: 'sctp' as never }));
  await t.throwsAsync(probeTurn({ ...base, credentials: { mode: 'restSecret', secret: 's', id: 'x', ttlSeconds: -1 } }));
});

// ---------------------------------------------------------------------------
// Helpers for the coturn tests

function ltOpts(c: Coturn, over: Partial<TurnProbeOptions> = {}): TurnProbeOptions {
  return {
    host: '127.0.0.1',
    port: c.port,
    transport: 'udp',
    realm: c.realm,
    credentials: c.mode === 'longTerm' ? { mode: 'longTerm', username: c.username!, password: c.password! } : { mode: 'restSecret', secret: c.secret!, id: 'probe', ttlSeconds: 600 },
    timeoutMs: ANSWERED_TIMEOUT_MS,
    ...over,
  };
}

function assertNoSecrets(t: ExecutionContext, r: TurnProbeResult, secrets: string[]): void {
  for (const s of secrets) t.false((r.error ?? '').includes(s), `error leaks a secret: ${r.error}`);
  t.false(JSON.stringify(r).includes(secrets[0]!));
}

function inRelayRange(c: Coturn, addr: string | undefined): boolean {
  const m = /^127\.0\.0\.1:(\d+)$/.exec(addr ?? '');
  if (!m) return false;
  const p = Number(m[1]);
  return p >= c.relayRange.min && p <= c.relayRange.max;
}

function assertHealthy(t: ExecutionContext, r: TurnProbeResult, c: Coturn, allocate = true): void {
  t.is(r.errorClass, undefined, r.error);
  t.is(r.error, undefined);
  t.true(r.reachable);
  t.regex(r.mappedAddress ?? '', /^127\.0\.0\.1:\d+$/);
  // The step durations are reported; how small they are is not asserted here (a loaded machine makes
  // them anything up to the budget): bench/turn.ts measures the probe cost.
  t.true(typeof r.bindingMs === 'number' && r.bindingMs >= 0);
  if (allocate) {
    t.true(inRelayRange(c, r.relayedAddress), `relayed ${r.relayedAddress} not in ${c.relayRange.min}-${c.relayRange.max}`);
    t.true(typeof r.allocationMs === 'number' && r.allocationMs > 0);
    t.true(typeof r.releaseMs === 'number' && r.releaseMs > 0);
  } else {
    t.is(r.relayedAddress, undefined);
    t.is(r.allocationMs, undefined);
    t.is(r.releaseMs, undefined);
  }
}

/**
 * A port on 127.0.0.1 with nothing listening (TCP and UDP), held for the test: a UDP socket bound to it and
 * connected elsewhere (127.0.0.1:9) takes no datagram from anyone else, so probes still get ICMP port
 * unreachable (ECONNREFUSED), but no other UDP socket (the file's tests run concurrently, and every probe
 * socket takes an ephemeral port) can bind it meanwhile and swallow the probe's datagrams. TCP needs no
 * hold: a client socket that happens to take the port refuses connections all the same.
 */
async function deadPort(t: ExecutionContext): Promise<number> {
  for (;;) {
    const port = await new Promise<number>((resolve, reject) => {
      const s = net.createServer();
      s.once('error', reject);
      s.listen(0, '127.0.0.1', () => {
        const p = (s.address() as net.AddressInfo).port;
        s.close(() => resolve(p));
      });
    });
    const u = dgram.createSocket('udp4');
    const held = await new Promise<boolean>((resolve) => {
      const onError = (): void => {
        u.close();
        resolve(false);
      };
      u.once('error', onError);
      u.bind(port, '127.0.0.1', () => {
        u.off('error', onError);
        resolve(true);
      });
    });
    if (!held) continue;
    t.teardown(() => new Promise<void>((resolve) => u.close(() => resolve())));
    await new Promise<void>((resolve, reject) => {
      u.once('error', reject);
      u.connect(9, '127.0.0.1', () => {
        u.off('error', reject);
        resolve();
      });
    });
    return port;
  }
}

// ---------------------------------------------------------------------------
// Real coturn

test('coturn lt-cred-mech: binding over UDP and TCP, mapped address is 127.0.0.1', async (t) => {
  const c = await startCoturn(t, { mode: 'longTerm' });
  for (const transport of ['udp', 'tcp'] as const) {
    const r = await probeTurn(ltOpts(c, { transport, allocate: false }));
    t.is(r.transport, transport);
    assertHealthy(t, r, c, false);
  }
  t.is(await c.allocations(), 0);
});

test('coturn lt-cred-mech: allocate + release over UDP and TCP, relayed address in the relay range, nothing left', async (t) => {
  const c = await startCoturn(t, { mode: 'longTerm' });
  for (const transport of ['udp', 'tcp'] as const) {
    const r = await probeTurn(ltOpts(c, { transport }));
    t.is(r.transport, transport);
    assertHealthy(t, r, c);
    assertNoSecrets(t, r, [c.password!]);
  }
  t.is(await c.waitAllocations(0), 0);
});

test('coturn use-auth-secret: allocate + release with REST credentials (UDP and TCP)', async (t) => {
  const c = await startCoturn(t, { mode: 'restSecret' });
  for (const transport of ['udp', 'tcp'] as const) {
    const r = await probeTurn(ltOpts(c, { transport }));
    assertHealthy(t, r, c);
  }
  // The controller's way: credentials minted with restCredentials, used as long-term ones.
  const rc = restCredentials(c.secret!, 'team:alice', 300); // an id with the separator in it: coturn splits at the first ':'
  t.true(rc.expiresAt > Date.now() + 290_000);
  const r = await probeTurn(ltOpts(c, { credentials: { mode: 'longTerm', username: rc.username, password: rc.password } }));
  assertHealthy(t, r, c);
  t.is(await c.waitAllocations(0), 0);
});

test('coturn lt-cred-mech: a wrong password is auth_rejected (401) and never echoed', async (t) => {
  const c = await startCoturn(t, { mode: 'longTerm' });
  const wrong = 'Wr0ng-Passw0rd-7731';
  for (const transport of ['udp', 'tcp'] as const) {
    const r = await probeTurn(ltOpts(c, { transport, credentials: { mode: 'longTerm', username: c.username!, password: wrong } }));
    t.true(r.reachable);
    t.is(r.errorClass, 'auth_rejected', r.error);
    t.is(r.errorCode, 401);
    t.is(r.relayedAddress, undefined);
    t.regex(r.error ?? '', /401/);
    assertNoSecrets(t, r, [wrong, c.password!, longTermKey(c.username!, c.realm, wrong).toString('hex')]);
  }
  // An unknown user, too.
  const r = await probeTurn(ltOpts(c, { credentials: { mode: 'longTerm', username: 'nobody', password: c.password! } }));
  t.is(r.errorClass, 'auth_rejected');
  assertNoSecrets(t, r, [c.password!]);
  t.is(await c.allocations(), 0);
});

test('coturn use-auth-secret: a wrong secret and an expired username are auth_rejected', async (t) => {
  const c = await startCoturn(t, { mode: 'restSecret' });
  const wrongSecret = 'not-the-secret-0815';
  const r1 = await probeTurn(ltOpts(c, { credentials: { mode: 'restSecret', secret: wrongSecret, id: 'probe', ttlSeconds: 600 } }));
  t.is(r1.errorClass, 'auth_rejected', r1.error);
  t.is(r1.errorCode, 401);
  assertNoSecrets(t, r1, [wrongSecret, c.secret!]);

  const expired = restCredentials(c.secret!, 'probe', 3600, Date.now() - 2 * 3600_000);
  t.true(expired.expiresAt < Date.now());
  const r2 = await probeTurn(ltOpts(c, { credentials: { mode: 'longTerm', username: expired.username, password: expired.password } }));
  t.is(r2.errorClass, 'auth_rejected', r2.error);
  t.is(r2.errorCode, 401);
  assertNoSecrets(t, r2, [expired.password, c.secret!]);

  // Control: the same shape, not expired, works (so the 401 above is about the expiry).
  const fresh = restCredentials(c.secret!, 'probe', 3600);
  const r3 = await probeTurn(ltOpts(c, { credentials: { mode: 'longTerm', username: fresh.username, password: fresh.password } }));
  assertHealthy(t, r3, c);
});

test('nothing listening: unreachable, fast, over UDP (ICMP port unreachable) and TCP (refused)', async (t) => {
  const port = await deadPort(t);
  // "Fast" = on the refusal, not at the deadline: errorClass unreachable (a timeout would be 'timeout'),
  // and far below a long budget. The bound is a hang guard, not a speed figure (a loaded machine stalls).
  const timeoutMs = 30_000;
  for (const transport of ['udp', 'tcp'] as const) {
    const t0 = performance.now();
    const r = await probeTurn({
      host: '127.0.0.1',
      port,
      transport,
      realm: 'x',
      credentials: { mode: 'longTerm', username: 'u', password: 'p4ss-word' },
      timeoutMs,
    });
    const ms = performance.now() - t0;
    t.is(r.errorClass, 'unreachable', `${transport}: ${r.error}`);
    t.false(r.reachable);
    t.regex(r.error ?? '', /ECONNREFUSED/);
    t.true(ms < timeoutMs / 2, `${transport} took ${ms} ms`);
  }
});

test('SIGSTOPped coturn: timeout within about timeoutMs (UDP and TCP), healthy again after SIGCONT', async (t) => {
  const c = await startCoturn(t, { mode: 'longTerm' });
  t.teardown(() => c.resume());
  c.pause();
  const timeoutMs = 800; // the behaviour under test: only the (stopped) server is slow
  for (const transport of ['udp', 'tcp'] as const) {
    // "Within about timeoutMs": settled before a timer of timeoutMs + 400 ms started just before the probe
    // fires. Event-loop time, so a loaded machine (where 800 ms of wall clock can hold seconds of stalls)
    // delays both alike; a wall-clock upper bound failed there although the probe's deadline was right.
    const late = controlTimer(timeoutMs + 400);
    t.teardown(late.cancel);
    const t0 = performance.now();
    const r = await probeTurn(ltOpts(c, { transport, timeoutMs }));
    const ms = performance.now() - t0;
    t.is(r.errorClass, 'timeout', `${transport}: ${r.error}`);
    t.false(r.reachable);
    t.is(r.bindingMs, undefined);
    t.true(ms >= timeoutMs - 5, `${transport} returned after ${ms} ms, before the deadline`);
    t.false(late.fired, `${transport} returned after ${ms} ms, later than timeoutMs + 400 ms of event-loop time`);
  }
  c.resume();
  const r = await probeTurn(ltOpts(c));
  assertHealthy(t, r, c);
  t.is(await c.waitAllocations(0), 0);
});

test('an abort signal ends a hanging probe at once', async (t) => {
  const c = await startCoturn(t, { mode: 'longTerm' });
  t.teardown(() => c.resume());
  c.pause();
  const ac = new AbortController();
  setTimeout(() => ac.abort(), 150);
  // "At once" = on the abort, long before the budget: the message names the abort, and a probe that
  // ignored it would take the whole 30 s. The bound is a hang guard, not a speed figure.
  const timeoutMs = 30_000;
  const t0 = performance.now();
  const r = await probeTurn(ltOpts(c, { timeoutMs, signal: ac.signal }));
  const ms = performance.now() - t0;
  t.is(r.errorClass, 'timeout');
  t.regex(r.error ?? '', /abort/);
  t.true(ms < timeoutMs / 3, `took ${ms} ms`);
});

test('probes leak no allocations: a held allocation counts 1, ten probes leave 0', async (t) => {
  const c = await startCoturn(t, { mode: 'longTerm' });
  t.is(await c.allocations(), 0);

  // Hold one allocation open: the counter must see it.
  const s = await TurnSession.open({ host: '127.0.0.1', port: c.port, transport: 'udp' }, performance.now() + ANSWERED_TIMEOUT_MS);
  t.teardown(() => s.close());
  const a = await s.allocate(performance.now() + ANSWERED_TIMEOUT_MS, { username: c.username!, password: c.password! });
  t.true(inRelayRange(c, a.relayedAddress));
  t.is(await c.allocations(), 1);

  const results = await Promise.all(
    Array.from({ length: 10 }, (_, i) => probeTurn(ltOpts(c, { transport: i % 2 === 0 ? 'udp' : 'tcp' }))),
  );
  for (const r of results) assertHealthy(t, r, c);
  t.is(await c.liveAllocations(), 1, 'right away, only the held allocation is not released');
  t.is(await c.waitAllocations(1), 1); // and within coturn's 1-s tick only the held one is left at all

  await s.refresh(performance.now() + ANSWERED_TIMEOUT_MS, 0);
  s.close();
  t.is(await c.waitAllocations(0), 0);
});

test('coturn user-quota reached: 486 is allocation_refused, and coturn comes back after restart()', async (t) => {
  const c = await startCoturn(t, { mode: 'longTerm', userQuota: 1 });
  const s = await TurnSession.open({ host: '127.0.0.1', port: c.port, transport: 'tcp' }, performance.now() + ANSWERED_TIMEOUT_MS);
  t.teardown(() => s.close());
  await s.allocate(performance.now() + ANSWERED_TIMEOUT_MS, { username: c.username!, password: c.password! });

  const r = await probeTurn(ltOpts(c));
  t.true(r.reachable);
  t.is(r.errorClass, 'allocation_refused', r.error);
  t.is(r.errorCode, 486);
  t.is(typeof r.bindingMs, 'number');
  t.is(r.allocationMs, undefined);
  t.is(await c.allocations(), 1);

  const oldPid = c.pid;
  t.is(c.currentPid(), oldPid, 'coturn runs in the foreground: the pidfile holds the child PID');
  await c.restart();
  t.not(c.pid, oldPid);
  t.is(c.currentPid(), c.pid);
  t.is(await c.allocations(), 0); // a restart loses every allocation
  assertHealthy(t, await probeTurn(ltOpts(c)), c);
});

test('coturn: a realm mismatch is reported in error but the probe still works with the server realm', async (t) => {
  const c = await startCoturn(t, { mode: 'longTerm', realm: 'real.example' });
  const r = await probeTurn(ltOpts(c, { realm: 'expected.example' }));
  t.is(r.errorClass, undefined, r.error);
  t.true(inRelayRange(c, r.relayedAddress));
  t.regex(r.error ?? '', /realm mismatch: server says "real\.example", expected "expected\.example"/);
});

test('coturn over TLS: works with the CA, unreachable (certificate) without it', async (t) => {
  const c = await startCoturn(t, { mode: 'longTerm', tls: true });
  const r = await probeTurn(ltOpts(c, { transport: 'tls', port: c.tlsPort!, tls: { ca: c.tlsCert! } }));
  assertHealthy(t, r, c);
  const r2 = await probeTurn(ltOpts(c, { transport: 'tls', port: c.tlsPort! }));
  t.is(r2.errorClass, 'unreachable');
  t.regex(r2.error ?? '', /self[- ]signed|certificate/i);
  const r3 = await probeTurn(ltOpts(c, { transport: 'tls', port: c.tlsPort!, tls: { ca: c.tlsCert!, servername: 'turn.test' } }));
  t.is(r3.errorClass, undefined, r3.error);
  t.is(await c.waitAllocations(0), 0);
});

test.serial('no leaked sockets or timers after successful, timed-out and refused probes', async (t) => {
  const c = await startCoturn(t, { mode: 'longTerm' });
  const port = await deadPort(t);
  const count = (): Record<string, number> => {
    const out: Record<string, number> = {};
    for (const k of process.getActiveResourcesInfo()) out[k] = (out[k] ?? 0) + 1;
    return out;
  };
  await sleep(50);
  const before = count();
  await probeTurn(ltOpts(c));
  await probeTurn(ltOpts(c, { transport: 'tcp' }));
  await probeTurn(ltOpts(c, { port }));
  await probeTurn(ltOpts(c, { port, transport: 'tcp' }));
  c.pause();
  const hung = await Promise.all([probeTurn(ltOpts(c, { timeoutMs: 300 })), probeTurn(ltOpts(c, { timeoutMs: 300, transport: 'tcp' }))]);
  c.resume();
  t.deepEqual(hung.map((r) => r.errorClass), ['timeout', 'timeout']);
  // Closed handles leave the list once libuv has run their close callbacks: poll (a leak never goes, so
  // the wait only guards a hang) instead of one fixed 50 ms nap, which a stalled event loop can outlast.
  // "No more than before": something of startCoturn's still closing when `before` was taken is no leak.
  const kinds = ['UDPWRAP', 'UDPWrap', 'TCPSocketWrap', 'TCPWRAP', 'Timeout', 'TLSWrap'];
  let after = count();
  await pollUntil(() => {
    after = count();
    return kinds.every((k) => (after[k] ?? 0) <= (before[k] ?? 0));
  });
  for (const k of kinds) {
    t.true((after[k] ?? 0) <= (before[k] ?? 0), `${k}: before ${JSON.stringify(before)} after ${JSON.stringify(after)}`);
  }
});

// ---------------------------------------------------------------------------
// A fake STUN/TURN server for behaviour coturn does not show

interface Fake {
  port: number;
  requests: DecodedStunMessage[];
  close(): Promise<void>;
}

type Reply = (buf: Buffer) => void;

async function fakeServer(t: ExecutionContext, handler: (m: DecodedStunMessage, reply: Reply, n: number) => void): Promise<Fake> {
  const sock = dgram.createSocket('udp4');
  const requests: DecodedStunMessage[] = [];
  sock.on('message', (buf, rinfo) => {
    let m: DecodedStunMessage;
    try {
      m = decodeStunMessage(buf);
    } catch {
      return;
    }
    requests.push(m);
    handler(m, (out) => sock.send(out, rinfo.port, rinfo.address), requests.length);
  });
  await new Promise<void>((resolve) => sock.bind(0, '127.0.0.1', resolve));
  const close = (): Promise<void> => new Promise((resolve) => sock.close(() => resolve()));
  t.teardown(() => close().catch(() => undefined));
  return { port: sock.address().port, requests, close };
}

const FAKE_USER = 'fake-user';
const FAKE_PASS = 'fake-Pass-9922';
const FAKE_REALM = 'fake.realm';
const FAKE_KEY = longTermKey(FAKE_USER, FAKE_REALM, FAKE_PASS);

function respond(m: DecodedStunMessage, cls: number, attributes: Array<{ type: number; value: Buffer }>, key?: Buffer): Buffer {
  return encodeStunMessage({ method: m.method, cls, transactionId: m.transactionId, attributes }, { ...(key ? { integrityKey: key } : {}), fingerprint: true });
}

function bindingOk(m: DecodedStunMessage): Buffer {
  return respond(m, StunClass.Success, [{ type: StunAttr.XorMappedAddress, value: encodeAddress({ address: '127.0.0.1', port: 5555 }, m.transactionId, true) }]);
}

function challenge(m: DecodedStunMessage, code = 401, nonce = 'nonce-1'): Buffer {
  return respond(m, StunClass.Error, [
    { type: StunAttr.ErrorCode, value: encodeErrorCode(code, code === 401 ? 'Unauthorized' : 'Stale Nonce') },
    stringAttribute(StunAttr.Realm, FAKE_REALM),
    stringAttribute(StunAttr.Nonce, nonce),
  ]);
}

function allocateOk(m: DecodedStunMessage, key: Buffer | undefined, opts: { relayed?: boolean } = {}): Buffer {
  return respond(
    m,
    StunClass.Success,
    [
      ...(opts.relayed === false ? [] : [{ type: StunAttr.XorRelayedAddress, value: encodeAddress({ address: '127.0.0.1', port: 40000 }, m.transactionId, true) }]),
      { type: StunAttr.XorMappedAddress, value: encodeAddress({ address: '127.0.0.1', port: 5555 }, m.transactionId, true) },
      u32Attribute(StunAttr.Lifetime, 600),
    ],
    key,
  );
}

function fakeOpts(f: Fake, over: Partial<TurnProbeOptions> = {}): TurnProbeOptions {
  return {
    host: '127.0.0.1',
    port: f.port,
    transport: 'udp',
    realm: FAKE_REALM,
    credentials: { mode: 'longTerm', username: FAKE_USER, password: FAKE_PASS },
    timeoutMs: ANSWERED_TIMEOUT_MS, // the fakes answer; tests about the deadline set their own
    ...over,
  };
}

/**
 * One message per transaction (the first transmission): over UDP the client retransmits a request whose
 * answer it has not read within the RTO (250 ms), which a stalled event loop on a loaded machine makes
 * happen although the fake answered at once. Counting transactions, not datagrams, keeps these tests
 * about what the client asked for.
 */
const distinct = (ms: DecodedStunMessage[]): DecodedStunMessage[] => ms.filter((m, i) => ms.findIndex((x) => x.transactionId.equals(m.transactionId)) === i);
const refreshes = (f: Fake): DecodedStunMessage[] => distinct(f.requests.filter((m) => m.method === StunMethod.Refresh));

test('fake server: UDP retransmits (RTO 250 ms, doubling) with the same transaction id; strays are ignored', async (t) => {
  // A reference chain of timers, 250 ms then 500 ms, started when the first transmission arrives: the
  // client's own RTO timers (250, then 500 from the second send) are due no later, so with the right
  // schedule the third transmission arrives within a loop turn of the chain's end, whatever the load.
  // (A wall-clock bound, bindingMs < 1300, failed on a loaded machine: 1657 ms with the right schedule.)
  const arrivals: number[] = [];
  let chainDoneAt: number | undefined;
  const timers: NodeJS.Timeout[] = [];
  t.teardown(() => timers.forEach((x) => clearTimeout(x)));
  const f = await fakeServer(t, (m, reply, n) => {
    arrivals.push(performance.now());
    if (n === 1) timers.push(setTimeout(() => timers.push(setTimeout(() => (chainDoneAt = performance.now()), 500)), 250));
    if (n <= 2) return; // lose the first two transmissions
    // A stray response with another transaction id first, then garbage, then the answer.
    reply(respond({ ...m, transactionId: Buffer.alloc(12, 7) }, StunClass.Success, []));
    reply(Buffer.from('hello, not stun'));
    reply(bindingOk(m));
  });
  // A budget far beyond the third transmission (750 ms): the schedule may not be cut short by the budget
  // when the machine stalls (the third is only sent if 500 ms still fit after the second).
  const r = await probeTurn(fakeOpts(f, { allocate: false, timeoutMs: 10_000 }));
  t.is(r.errorClass, undefined, r.error);
  t.is(r.mappedAddress, '127.0.0.1:5555');
  // Three, or more when the answer to the third was held up past the fourth's RTO (1750 ms) by a stall.
  t.true(f.requests.length >= 3, `${f.requests.length} requests`);
  t.true(f.requests.every((m) => m.transactionId.equals(f.requests[0]!.transactionId)));
  t.true(f.requests.every((m) => m.fingerprintOffset !== undefined), 'requests carry FINGERPRINT');
  t.true(r.bindingMs! >= 700, `bindingMs ${r.bindingMs}`); // sends at 0, 250, 750 ms: never sooner
  // ... and not later (e.g. an RTO of 500 ms would send the third at 1500 ms, 750 ms after the chain).
  t.true(chainDoneAt === undefined || arrivals[2]! - chainDoneAt < 400, `third transmission ${chainDoneAt === undefined ? '' : arrivals[2]! - chainDoneAt} ms after the 250+500 ms reference`);
});

test('fake server: retransmissions never outlast timeoutMs; only garbage back is malformed', async (t) => {
  const timeoutMs = 600; // the behaviour under test: the server never answers
  // "Never outlast": settled before a timer of timeoutMs + 100 ms started when the first transmission
  // arrives fires. The client armed its deadline (at most timeoutMs) before that send, so this holds in
  // event-loop time under any load; a wall-clock bound (ms < 900) failed on a loaded machine.
  let late: ReturnType<typeof controlTimer> | undefined;
  t.teardown(() => late?.cancel());
  const silent = await fakeServer(t, (_m, _reply, n) => {
    if (n === 1) late = controlTimer(timeoutMs + 100);
  });
  const t0 = performance.now();
  const r = await probeTurn(fakeOpts(silent, { timeoutMs }));
  const ms = performance.now() - t0;
  t.is(r.errorClass, 'timeout');
  t.true(ms >= timeoutMs - 5, `${ms} ms`);
  t.false(late?.fired ?? true, `settled ${ms} ms after the start, later than timeoutMs + 100 ms of event-loop time`);
  // Sent at 0 and 250 ms; the next (750 ms) would be past the budget. The budget is timeoutMs minus the
  // socket set-up, which a stalled event loop can stretch past 350 ms: then 250 ms no longer fits and one
  // transmission is right. The client reports both figures in its message.
  const m = /within (\d+) ms \((\d+) transmissions?\)/.exec(r.error ?? '');
  t.truthy(m, r.error);
  const budget = Number(m?.[1]);
  const sends = Number(m?.[2]);
  t.is(sends, budget > 250 ? 2 : 1, r.error);
  // The server gets them all: the last may still be in its socket when the probe settles.
  await pollUntil(() => silent.requests.length >= sends);
  await sleep(50);
  t.is(silent.requests.length, sends);

  const garbage = await fakeServer(t, (_m, reply) => reply(Buffer.from('not a stun message at all')));
  // Garbage is only judged at the deadline; it must have come back by then, so the budget is generous
  // (400 ms ran out under load before the first garbage reply was read).
  const r2 = await probeTurn(fakeOpts(garbage, { timeoutMs: 2000 }));
  t.is(r2.errorClass, 'malformed', r2.error);
});

test('fake server: a reply with our transaction id but a broken FINGERPRINT is malformed at once', async (t) => {
  const f = await fakeServer(t, (m, reply) => {
    const out = bindingOk(m);
    out[out.length - 1] = out[out.length - 1]! ^ 0xff;
    reply(out);
  });
  // "At once" = on the reply, not at the deadline: a client that treated it as garbage would wait out
  // the whole budget. The bound is a hang guard far below that budget, not a speed figure.
  const timeoutMs = 30_000;
  const t0 = performance.now();
  const r = await probeTurn(fakeOpts(f, { timeoutMs }));
  t.is(r.errorClass, 'malformed');
  t.regex(r.error ?? '', /FINGERPRINT/);
  t.true(performance.now() - t0 < timeoutMs / 3);
});

test('fake server: full long-term flow; a bad MESSAGE-INTEGRITY on Allocate success is malformed and still released', async (t) => {
  let goodIntegrity = true;
  const f = await fakeServer(t, (m, reply) => {
    if (m.method === StunMethod.Binding) return reply(bindingOk(m));
    if (m.integrityOffset === undefined) return reply(challenge(m));
    if (!verifyMessageIntegrity(m, FAKE_KEY)) return reply(challenge(m));
    if (m.method === StunMethod.Allocate) return reply(allocateOk(m, goodIntegrity ? FAKE_KEY : longTermKey('x', 'y', 'z')));
    if (m.method === StunMethod.Refresh) return reply(respond(m, StunClass.Success, [u32Attribute(StunAttr.Lifetime, 0)], FAKE_KEY));
  });
  const ok = await probeTurn(fakeOpts(f));
  t.is(ok.errorClass, undefined, ok.error);
  t.is(ok.relayedAddress, '127.0.0.1:40000');
  const refresh = refreshes(f)[0]!;
  t.deepEqual(getAttribute(refresh, StunAttr.Lifetime), hex('00000000'));
  t.is(getStringAttribute(refresh, StunAttr.Nonce), 'nonce-1');
  t.is(getStringAttribute(refresh, StunAttr.Username), FAKE_USER);
  t.true(verifyMessageIntegrity(refresh, FAKE_KEY));

  goodIntegrity = false;
  const before = refreshes(f).length;
  const bad = await probeTurn(fakeOpts(f));
  t.is(bad.errorClass, 'malformed');
  t.regex(bad.error ?? '', /MESSAGE-INTEGRITY/);
  t.is(bad.relayedAddress, undefined);
  t.is(refreshes(f).length, before + 1, 'the allocation the server made is released');
  assertNoSecrets(t, bad, [FAKE_PASS, FAKE_KEY.toString('hex'), FAKE_KEY.toString('base64')]);
});

test('fake server: an authenticated Allocate that gets no answer in time is released anyway (the server may have allocated)', async (t) => {
  // The server allocates but never answers the Allocate (as a loaded server answering after the
  // probe's deadline looks from the client): the probe times out and must still send Refresh(0),
  // or the allocation would hold a relay port for its whole lifetime.
  const f = await fakeServer(t, (m, reply) => {
    if (m.method === StunMethod.Binding) return reply(bindingOk(m));
    if (m.integrityOffset === undefined) return reply(challenge(m));
    if (m.method === StunMethod.Refresh) return reply(respond(m, StunClass.Success, [u32Attribute(StunAttr.Lifetime, 0)], FAKE_KEY));
    // An authenticated Allocate: silence.
  });
  const r = await probeTurn(fakeOpts(f, { timeoutMs: 1500 }));
  t.is(r.errorClass, 'timeout', r.error);
  t.true(await pollUntil(() => refreshes(f).length === 1), 'a Refresh(0) followed the unanswered Allocate');
  const refresh = refreshes(f)[0]!;
  t.deepEqual(getAttribute(refresh, StunAttr.Lifetime), hex('00000000'));
  t.true(verifyMessageIntegrity(refresh, FAKE_KEY), 'authenticated with the allocation\'s key');
  // A probe whose Allocate was never sent with credentials (refused at the challenge) sends none.
  const g = await fakeServer(t, (m, reply) => {
    if (m.method === StunMethod.Binding) return reply(bindingOk(m));
    return reply(respond(m, StunClass.Error, [{ type: StunAttr.ErrorCode, value: encodeErrorCode(403, 'Forbidden') }]));
  });
  const refused = await probeTurn(fakeOpts(g));
  t.is(refused.errorClass, 'allocation_refused', refused.error);
  await new Promise((resolve) => setTimeout(resolve, 300));
  t.is(refreshes(g).length, 0, 'nothing to release');
});

test('fake server: 438 once is retried with the new nonce, twice is auth_rejected', async (t) => {
  let staleTimes = 1;
  let stale = 0;
  const f = await fakeServer(t, (m, reply) => {
    if (m.method === StunMethod.Binding) return reply(bindingOk(m));
    if (m.integrityOffset === undefined) return reply(challenge(m));
    if (m.method === StunMethod.Allocate && stale < staleTimes) {
      stale++;
      return reply(challenge(m, 438, `nonce-${stale + 1}`));
    }
    if (m.method === StunMethod.Allocate) return reply(allocateOk(m, FAKE_KEY));
    return reply(respond(m, StunClass.Success, [], FAKE_KEY));
  });
  const r = await probeTurn(fakeOpts(f));
  t.is(r.errorClass, undefined, r.error);
  const allocs = distinct(f.requests.filter((m) => m.method === StunMethod.Allocate));
  t.deepEqual(allocs.map((m) => getStringAttribute(m, StunAttr.Nonce) ?? null), [null, 'nonce-1', 'nonce-2']);
  t.is(getStringAttribute(refreshes(f)[0]!, StunAttr.Nonce), 'nonce-2');

  staleTimes = 100;
  const r2 = await probeTurn(fakeOpts(f));
  t.is(r2.errorClass, 'auth_rejected');
  t.is(r2.errorCode, 438);
});

test('fake server: 508 / 403 / 437 are allocation_refused; a missing XOR-RELAYED-ADDRESS is malformed and released', async (t) => {
  let mode: number | 'norelay' = 508;
  const f = await fakeServer(t, (m, reply) => {
    if (m.method === StunMethod.Binding) return reply(bindingOk(m));
    if (m.integrityOffset === undefined) return reply(challenge(m));
    if (m.method === StunMethod.Allocate) {
      if (mode === 'norelay') return reply(allocateOk(m, FAKE_KEY, { relayed: false }));
      return reply(respond(m, StunClass.Error, [{ type: StunAttr.ErrorCode, value: encodeErrorCode(mode, 'Nope') }], FAKE_KEY));
    }
    return reply(respond(m, StunClass.Success, [], FAKE_KEY));
  });
  for (const code of [508, 403, 437]) {
    mode = code;
    const r = await probeTurn(fakeOpts(f));
    t.is(r.errorClass, 'allocation_refused');
    t.is(r.errorCode, code);
    t.true(r.reachable);
  }
  t.is(refreshes(f).length, 0);
  mode = 'norelay';
  const r = await probeTurn(fakeOpts(f));
  t.is(r.errorClass, 'malformed');
  t.regex(r.error ?? '', /XOR-RELAYED-ADDRESS/);
  t.is(refreshes(f).length, 1);
});

test('fake server: a 401 without NONCE is malformed; 401 after credentials is auth_rejected', async (t) => {
  let withNonce = false;
  const f = await fakeServer(t, (m, reply) => {
    if (m.method === StunMethod.Binding) return reply(bindingOk(m));
    if (!withNonce) {
      return reply(respond(m, StunClass.Error, [{ type: StunAttr.ErrorCode, value: encodeErrorCode(401, 'Unauthorized') }, stringAttribute(StunAttr.Realm, FAKE_REALM)]));
    }
    return reply(challenge(m)); // rejects every attempt, also the authenticated one
  });
  const r = await probeTurn(fakeOpts(f));
  t.is(r.errorClass, 'malformed');
  t.regex(r.error ?? '', /NONCE/);
  withNonce = true;
  const r2 = await probeTurn(fakeOpts(f));
  t.is(r2.errorClass, 'auth_rejected');
  t.is(r2.errorCode, 401);
  t.is(distinct(f.requests.filter((m) => m.method === StunMethod.Allocate && m.integrityOffset !== undefined)).length, 1);
  assertNoSecrets(t, r2, [FAKE_PASS]);
});

// Sanity for the REST password derivation used by coturn: HMAC-SHA1 base64 of the username.
test('restCredentials password is base64(HMAC-SHA1(secret, username))', (t) => {
  const c = restCredentials('s3', 'id', 10, 5_000);
  t.is(c.password, createHmac('sha1', 's3').update('15:id').digest('base64'));
});

test('fake TCP server: responses split across segments and after a stray are framed right; non-STUN bytes are malformed', async (t) => {
  let garbage = false;
  const server = net.createServer((sock) => {
    let buf = Buffer.alloc(0);
    sock.on('error', () => undefined);
    sock.on('data', (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      while (buf.length >= 20 && buf.length >= 20 + buf.readUInt16BE(2)) {
        const m = decodeStunMessage(buf.subarray(0, 20 + buf.readUInt16BE(2)));
        buf = buf.subarray(20 + buf.readUInt16BE(2));
        if (garbage) {
          sock.write(Buffer.from('HTTP/1.1 400 Bad Request\r\n\r\n'));
          continue;
        }
        const stray = respond({ ...m, transactionId: Buffer.alloc(12, 9) }, StunClass.Success, []);
        const out = Buffer.concat([stray, bindingOk(m)]);
        // stray + answer, cut at odd places, in three writes
        sock.write(out.subarray(0, 3));
        setTimeout(() => sock.write(out.subarray(3, stray.length + 7)), 20);
        setTimeout(() => sock.write(out.subarray(stray.length + 7)), 40);
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.teardown(() => new Promise<void>((resolve) => server.close(() => resolve())));
  const port = (server.address() as net.AddressInfo).port;
  const opts: TurnProbeOptions = { ...fakeOpts({ port, requests: [], close: async () => undefined }), transport: 'tcp', allocate: false };
  const r = await probeTurn(opts);
  t.is(r.errorClass, undefined, r.error);
  t.is(r.mappedAddress, '127.0.0.1:5555');
  t.true(r.bindingMs! >= 35, `bindingMs ${r.bindingMs}`);
  garbage = true;
  const r2 = await probeTurn(opts);
  t.is(r2.errorClass, 'malformed');
  t.true(r2.reachable === false);
});
