// A small STUN/TURN client for health probes: RFC 5389 Binding, RFC 5766 Allocate
// with the long-term credential mechanism (also TURN REST credentials, coturn's
// use-auth-secret), and Refresh with LIFETIME 0 to release the allocation again.
//
// Only node built-ins. One socket per probe (UDP, TCP or TLS), always closed.
// probeTurn never throws for network or server problems: they become an
// errorClass. Secrets (password, REST secret, derived keys) never appear in any
// returned string.
//
// Not implemented (not needed by a probe): SASLprep of passwords (passwords are
// used byte for byte as UTF-8), channels, permissions, data relaying, DTLS,
// RFC 8489 SHA-256 integrity and USERHASH.

import dgram from 'node:dgram';
import dns from 'node:dns';
import net from 'node:net';
import tls from 'node:tls';
import { createHash, createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { performance } from 'node:perf_hooks';

// ---------------------------------------------------------------------------
// Public API types

export type TurnTransport = 'udp' | 'tcp' | 'tls';

export type TurnCredentials =
  | { mode: 'longTerm'; username: string; password: string }
  | { mode: 'restSecret'; secret: string; id: string; ttlSeconds: number };

export type ProbeErrorClass = 'unreachable' | 'timeout' | 'auth_rejected' | 'allocation_refused' | 'malformed';

export interface TurnProbeOptions {
  host: string;
  port: number;
  transport: TurnTransport;
  /** Expected realm (the server's REALM attribute is used for the key; a mismatch is reported in `error` but still tried). */
  realm: string;
  credentials: TurnCredentials;
  /** Budget for EACH step (binding incl. connect, allocate, release); never waits longer. */
  timeoutMs: number;
  /** Default true: binding only when false. */
  allocate?: boolean;
  tls?: { ca?: string | Buffer; servername?: string; rejectUnauthorized?: boolean };
  signal?: AbortSignal;
}

export interface TurnProbeResult {
  transport: TurnTransport;
  /** Got any valid STUN response. */
  reachable: boolean;
  /** RFC 5389 Binding request -> success response (excludes the TCP/TLS connect). */
  bindingMs?: number;
  /** RFC 5766 Allocate incl. the 401 (REALM+NONCE) round and the authenticated retry. */
  allocationMs?: number;
  /** Refresh with LIFETIME 0 (so probes leak no allocations). */
  releaseMs?: number;
  /** "ip:port" from XOR-MAPPED-ADDRESS ("[ip]:port" for IPv6). */
  mappedAddress?: string;
  /** "ip:port" from XOR-RELAYED-ADDRESS ("[ip]:port" for IPv6). */
  relayedAddress?: string;
  errorClass?: ProbeErrorClass;
  /** STUN ERROR-CODE when the server sent one. */
  errorCode?: number;
  /** Human message; never contains the password/secret/derived key. */
  error?: string;
}

// ---------------------------------------------------------------------------
// Codec: RFC 5389 message format

export const STUN_MAGIC_COOKIE = 0x2112a442;
export const STUN_HEADER_LENGTH = 20;
export const STUN_FINGERPRINT_XOR = 0x5354554e;
/** REQUESTED-TRANSPORT protocol number for UDP relaying. */
export const TRANSPORT_UDP = 17;

export const StunMethod = {
  Binding: 0x001,
  Allocate: 0x003,
  Refresh: 0x004,
} as const;

export const StunClass = {
  Request: 0,
  Indication: 1,
  Success: 2,
  Error: 3,
} as const;

export const StunAttr = {
  MappedAddress: 0x0001,
  Username: 0x0006,
  MessageIntegrity: 0x0008,
  ErrorCode: 0x0009,
  UnknownAttributes: 0x000a,
  Lifetime: 0x000d,
  XorPeerAddress: 0x0012,
  Data: 0x0013,
  Realm: 0x0014,
  Nonce: 0x0015,
  XorRelayedAddress: 0x0016,
  RequestedTransport: 0x0019,
  XorMappedAddress: 0x0020,
  Software: 0x8022,
  AlternateServer: 0x8023,
  Fingerprint: 0x8028,
} as const;

export const SOFTWARE = 'polydev-reconciler turn-probe';

export interface StunAttribute {
  type: number;
  value: Buffer;
}

export interface StunMessage {
  method: number;
  cls: number;
  /** 12 bytes. */
  transactionId: Buffer;
  /** In wire order; never MESSAGE-INTEGRITY or FINGERPRINT (those are options of the encoder / fields of the decoded message). */
  attributes: StunAttribute[];
}

export interface DecodedStunMessage extends StunMessage {
  /** The whole message as received (a private copy). */
  raw: Buffer;
  /** Byte offset of the MESSAGE-INTEGRITY attribute header in `raw`, when present. */
  integrityOffset?: number;
  /** Byte offset of the FINGERPRINT attribute header in `raw`, when present (already verified by the decoder). */
  fingerprintOffset?: number;
}

export class StunDecodeError extends Error {
  override name = 'StunDecodeError';
}

export function stunMessageType(method: number, cls: number): number {
  if (!Number.isInteger(method) || method < 0 || method > 0xfff) throw new RangeError(`bad STUN method ${method}`);
  if (!Number.isInteger(cls) || cls < 0 || cls > 3) throw new RangeError(`bad STUN class ${cls}`);
  return (method & 0x000f) | ((method & 0x0070) << 1) | ((method & 0x0f80) << 2) | ((cls & 1) << 4) | ((cls & 2) << 7);
}

export function splitStunMessageType(type: number): { method: number; cls: number } {
  const method = (type & 0x000f) | ((type & 0x00e0) >> 1) | ((type & 0x3e00) >> 2);
  const cls = ((type >> 4) & 1) | ((type >> 7) & 2);
  return { method, cls };
}

const CRC32_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

/** CRC-32 (ISO-HDLC, as in zlib), unsigned. */
export function crc32(buf: Uint8Array): number {
  let c = 0xffffffff;
  for (let i = 0; i < buf.length; i++) c = CRC32_TABLE[(c ^ buf[i]!) & 0xff]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

/** Long-term credential key: MD5(username ":" realm ":" password) (no SASLprep). */
export function longTermKey(username: string, realm: string, password: string): Buffer {
  return createHash('md5').update(`${username}:${realm}:${password}`, 'utf8').digest();
}

/**
 * HMAC-SHA1 MESSAGE-INTEGRITY over `message[0, offset)` (offset = where the
 * MESSAGE-INTEGRITY attribute header starts or will start), with the header's
 * length field adjusted to end right after the MESSAGE-INTEGRITY attribute.
 */
export function computeMessageIntegrity(message: Buffer, offset: number, key: Buffer): Buffer {
  if (offset < STUN_HEADER_LENGTH || offset > message.length) throw new RangeError('bad MESSAGE-INTEGRITY offset');
  const head = Buffer.from(message.subarray(0, offset));
  head.writeUInt16BE(offset - STUN_HEADER_LENGTH + 24, 2);
  return createHmac('sha1', key).update(head).digest();
}

/** FINGERPRINT value over `message[0, offset)` with the length field adjusted to end after the FINGERPRINT attribute. */
export function computeFingerprint(message: Buffer, offset: number): number {
  if (offset < STUN_HEADER_LENGTH || offset > message.length) throw new RangeError('bad FINGERPRINT offset');
  const head = Buffer.from(message.subarray(0, offset));
  head.writeUInt16BE(offset - STUN_HEADER_LENGTH + 8, 2);
  return (crc32(head) ^ STUN_FINGERPRINT_XOR) >>> 0;
}

export interface EncodeOptions {
  /** Append MESSAGE-INTEGRITY computed with this key. */
  integrityKey?: Buffer;
  /** Append FINGERPRINT (after MESSAGE-INTEGRITY). */
  fingerprint?: boolean;
}

function pad4(n: number): number {
  return (n + 3) & ~3;
}

export function encodeStunMessage(msg: StunMessage, opts: EncodeOptions = {}): Buffer {
  if (msg.transactionId.length !== 12) throw new RangeError('STUN transaction id must be 12 bytes');
  let bodyLen = 0;
  for (const a of msg.attributes) {
    if (a.type === StunAttr.MessageIntegrity || a.type === StunAttr.Fingerprint) {
      throw new Error('MESSAGE-INTEGRITY and FINGERPRINT are added by encodeStunMessage options');
    }
    if (!Number.isInteger(a.type) || a.type < 0 || a.type > 0xffff) throw new RangeError(`bad attribute type ${a.type}`);
    if (a.value.length > 0xffff) throw new RangeError('attribute value too long');
    bodyLen += 4 + pad4(a.value.length);
  }
  const total = STUN_HEADER_LENGTH + bodyLen + (opts.integrityKey ? 24 : 0) + (opts.fingerprint ? 8 : 0);
  if (total - STUN_HEADER_LENGTH > 0xffff) throw new RangeError('STUN message too long');
  const buf = Buffer.alloc(total);
  buf.writeUInt16BE(stunMessageType(msg.method, msg.cls), 0);
  buf.writeUInt16BE(bodyLen, 2);
  buf.writeUInt32BE(STUN_MAGIC_COOKIE, 4);
  msg.transactionId.copy(buf, 8);
  let off = STUN_HEADER_LENGTH;
  for (const a of msg.attributes) {
    buf.writeUInt16BE(a.type, off);
    buf.writeUInt16BE(a.value.length, off + 2);
    a.value.copy(buf, off + 4);
    off += 4 + pad4(a.value.length);
  }
  if (opts.integrityKey) {
    const mac = computeMessageIntegrity(buf, off, opts.integrityKey);
    buf.writeUInt16BE(StunAttr.MessageIntegrity, off);
    buf.writeUInt16BE(20, off + 2);
    mac.copy(buf, off + 4);
    off += 24;
  }
  if (opts.fingerprint) {
    const fp = computeFingerprint(buf, off);
    buf.writeUInt16BE(StunAttr.Fingerprint, off);
    buf.writeUInt16BE(4, off + 2);
    buf.writeUInt32BE(fp, off + 4);
    off += 8;
  }
  buf.writeUInt16BE(off - STUN_HEADER_LENGTH, 2);
  return buf;
}

/** True when `buf` starts like a STUN message (first two bits zero, magic cookie). */
export function looksLikeStun(buf: Buffer): boolean {
  return buf.length >= STUN_HEADER_LENGTH && (buf[0]! & 0xc0) === 0 && buf.readUInt32BE(4) === STUN_MAGIC_COOKIE;
}

/**
 * Decodes one complete STUN message. Throws StunDecodeError when it is not a
 * well-formed RFC 5389 message or its FINGERPRINT (when present) is wrong.
 * Attributes after MESSAGE-INTEGRITY other than FINGERPRINT are ignored (RFC 5389 15.4).
 */
export function decodeStunMessage(input: Buffer): DecodedStunMessage {
  if (input.length < STUN_HEADER_LENGTH) throw new StunDecodeError(`message too short (${input.length} bytes)`);
  if ((input[0]! & 0xc0) !== 0) throw new StunDecodeError('not a STUN message (first two bits are not zero)');
  const len = input.readUInt16BE(2);
  if (len % 4 !== 0) throw new StunDecodeError(`message length ${len} is not a multiple of 4`);
  if (input.readUInt32BE(4) !== STUN_MAGIC_COOKIE) throw new StunDecodeError('bad magic cookie');
  if (STUN_HEADER_LENGTH + len !== input.length) {
    throw new StunDecodeError(`length field says ${STUN_HEADER_LENGTH + len} bytes, got ${input.length}`);
  }
  const raw = Buffer.from(input);
  const { method, cls } = splitStunMessageType(raw.readUInt16BE(0));
  const attributes: StunAttribute[] = [];
  let integrityOffset: number | undefined;
  let fingerprintOffset: number | undefined;
  let off = STUN_HEADER_LENGTH;
  while (off < raw.length) {
    if (fingerprintOffset !== undefined) throw new StunDecodeError('attribute after FINGERPRINT');
    if (off + 4 > raw.length) throw new StunDecodeError('truncated attribute header');
    const type = raw.readUInt16BE(off);
    const vlen = raw.readUInt16BE(off + 2);
    if (off + 4 + pad4(vlen) > raw.length) throw new StunDecodeError(`attribute 0x${type.toString(16)} overruns the message`);
    const value = raw.subarray(off + 4, off + 4 + vlen);
    if (type === StunAttr.Fingerprint) {
      if (vlen !== 4) throw new StunDecodeError('FINGERPRINT must be 4 bytes');
      if (value.readUInt32BE(0) !== computeFingerprint(raw, off)) throw new StunDecodeError('FINGERPRINT mismatch');
      fingerprintOffset = off;
    } else if (type === StunAttr.MessageIntegrity) {
      if (vlen !== 20) throw new StunDecodeError('MESSAGE-INTEGRITY must be 20 bytes');
      if (integrityOffset === undefined) integrityOffset = off;
    } else if (integrityOffset === undefined) {
      attributes.push({ type, value });
    }
    off += 4 + pad4(vlen);
  }
  const out: DecodedStunMessage = { method, cls, transactionId: raw.subarray(8, 20), attributes, raw };
  if (integrityOffset !== undefined) out.integrityOffset = integrityOffset;
  if (fingerprintOffset !== undefined) out.fingerprintOffset = fingerprintOffset;
  return out;
}

/** Checks MESSAGE-INTEGRITY of a decoded message; false when absent or wrong. */
export function verifyMessageIntegrity(msg: DecodedStunMessage, key: Buffer): boolean {
  if (msg.integrityOffset === undefined) return false;
  const expected = computeMessageIntegrity(msg.raw, msg.integrityOffset, key);
  const got = msg.raw.subarray(msg.integrityOffset + 4, msg.integrityOffset + 24);
  return got.length === 20 && timingSafeEqual(expected, got);
}

export function getAttribute(msg: StunMessage, type: number): Buffer | undefined {
  return msg.attributes.find((a) => a.type === type)?.value;
}

export function getStringAttribute(msg: StunMessage, type: number): string | undefined {
  const v = getAttribute(msg, type);
  return v === undefined ? undefined : v.toString('utf8');
}

export interface TransportAddress {
  family: 4 | 6;
  address: string;
  port: number;
}

export function formatAddress(a: TransportAddress): string {
  return a.family === 6 ? `[${a.address}]:${a.port}` : `${a.address}:${a.port}`;
}

function ipv6ToString(b: Buffer): string {
  const groups: string[] = [];
  for (let i = 0; i < 16; i += 2) groups.push(b.readUInt16BE(i).toString(16));
  // Compress the longest run (>= 2) of zero groups.
  let best = -1;
  let bestLen = 0;
  for (let i = 0; i < 8; ) {
    if (groups[i] !== '0') {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && groups[j] === '0') j++;
    if (j - i > bestLen && j - i >= 2) {
      best = i;
      bestLen = j - i;
    }
    i = j;
  }
  if (best < 0) return groups.join(':');
  return `${groups.slice(0, best).join(':')}::${groups.slice(best + bestLen).join(':')}`;
}

function ipv6ToBuffer(addr: string): Buffer {
  const out = Buffer.alloc(16);
  let s = addr;
  const v4 = /(\d+\.\d+\.\d+\.\d+)$/.exec(s);
  let tail: number[] = [];
  if (v4) {
    const parts = v4[1]!.split('.').map(Number);
    tail = [(parts[0]! << 8) | parts[1]!, (parts[2]! << 8) | parts[3]!];
    s = s.slice(0, -v4[1]!.length) + '0:0';
  }
  const [headS, tailS] = s.includes('::') ? (s.split('::') as [string, string]) : [s, undefined];
  const head = headS ? headS.split(':').map((g) => parseInt(g, 16)) : [];
  const rest = tailS !== undefined ? (tailS ? tailS.split(':').map((g) => parseInt(g, 16)) : []) : [];
  const groups = tailS !== undefined ? [...head, ...new Array(8 - head.length - rest.length).fill(0), ...rest] : head;
  if (tail.length) {
    groups[6] = tail[0]!;
    groups[7] = tail[1]!;
  }
  if (groups.length !== 8 || groups.some((g) => !Number.isInteger(g) || g < 0 || g > 0xffff)) throw new RangeError(`bad IPv6 address ${addr}`);
  groups.forEach((g, i) => out.writeUInt16BE(g, i * 2));
  return out;
}

/** Decodes MAPPED-ADDRESS (xor=false) or XOR-*-ADDRESS (xor=true). Throws StunDecodeError. */
export function decodeAddress(value: Buffer, transactionId: Buffer, xor: boolean): TransportAddress {
  if (value.length < 4) throw new StunDecodeError('address attribute too short');
  const family = value[1];
  let port = value.readUInt16BE(2);
  if (xor) port ^= STUN_MAGIC_COOKIE >>> 16;
  if (family === 0x01) {
    if (value.length !== 8) throw new StunDecodeError('IPv4 address attribute must be 8 bytes');
    let a = value.readUInt32BE(4);
    if (xor) a = (a ^ STUN_MAGIC_COOKIE) >>> 0;
    return { family: 4, address: [a >>> 24, (a >>> 16) & 0xff, (a >>> 8) & 0xff, a & 0xff].join('.'), port };
  }
  if (family === 0x02) {
    if (value.length !== 20) throw new StunDecodeError('IPv6 address attribute must be 20 bytes');
    const a = Buffer.from(value.subarray(4, 20));
    if (xor) {
      const mask = Buffer.alloc(16);
      mask.writeUInt32BE(STUN_MAGIC_COOKIE, 0);
      transactionId.copy(mask, 4);
      for (let i = 0; i < 16; i++) a[i] = a[i]! ^ mask[i]!;
    }
    return { family: 6, address: ipv6ToString(a), port };
  }
  throw new StunDecodeError(`unknown address family ${family}`);
}

/** Encodes MAPPED-ADDRESS (xor=false) or XOR-*-ADDRESS (xor=true) values. */
export function encodeAddress(addr: { address: string; port: number }, transactionId: Buffer, xor: boolean): Buffer {
  const fam = net.isIP(addr.address);
  if (fam === 0) throw new RangeError(`not an IP address: ${addr.address}`);
  const port = xor ? addr.port ^ (STUN_MAGIC_COOKIE >>> 16) : addr.port;
  if (fam === 4) {
    const out = Buffer.alloc(8);
    out[1] = 0x01;
    out.writeUInt16BE(port, 2);
    const a = addr.address.split('.').reduce((acc, p) => ((acc << 8) | Number(p)) >>> 0, 0);
    out.writeUInt32BE(xor ? (a ^ STUN_MAGIC_COOKIE) >>> 0 : a, 4);
    return out;
  }
  const out = Buffer.alloc(20);
  out[1] = 0x02;
  out.writeUInt16BE(port, 2);
  const a = ipv6ToBuffer(addr.address);
  if (xor) {
    const mask = Buffer.alloc(16);
    mask.writeUInt32BE(STUN_MAGIC_COOKIE, 0);
    transactionId.copy(mask, 4);
    for (let i = 0; i < 16; i++) a[i] = a[i]! ^ mask[i]!;
  }
  a.copy(out, 4);
  return out;
}

export function decodeErrorCode(value: Buffer): { code: number; reason: string } {
  if (value.length < 4) throw new StunDecodeError('ERROR-CODE too short');
  const cls = value[2]! & 0x07;
  const num = value[3]!;
  if (cls < 3 || cls > 6 || num > 99) throw new StunDecodeError(`bad ERROR-CODE ${cls}/${num}`);
  return { code: cls * 100 + num, reason: value.subarray(4).toString('utf8') };
}

export function encodeErrorCode(code: number, reason: string): Buffer {
  if (!Number.isInteger(code) || code < 300 || code > 699) throw new RangeError(`bad error code ${code}`);
  const r = Buffer.from(reason, 'utf8');
  const out = Buffer.alloc(4 + r.length);
  out[2] = Math.floor(code / 100);
  out[3] = code % 100;
  r.copy(out, 4);
  return out;
}

export function u32Attribute(type: number, v: number): StunAttribute {
  const value = Buffer.alloc(4);
  value.writeUInt32BE(v >>> 0, 0);
  return { type, value };
}

export function stringAttribute(type: number, v: string): StunAttribute {
  return { type, value: Buffer.from(v, 'utf8') };
}

export function newTransactionId(): Buffer {
  return randomBytes(12);
}

// ---------------------------------------------------------------------------
// TURN REST credentials

/** TURN REST credentials (coturn use-auth-secret): username `<expiry unix s>:<id>`, password base64(HMAC-SHA1(secret, username)). */
export function restCredentials(
  secret: string,
  id: string,
  ttlSeconds: number,
  nowMs: number = Date.now(),
): { username: string; password: string; expiresAt: number } {
  if (typeof secret !== 'string' || secret === '') throw new TypeError('restCredentials: secret must be a non-empty string');
  if (typeof id !== 'string') throw new TypeError('restCredentials: id must be a string');
  if (!Number.isInteger(ttlSeconds) || ttlSeconds <= 0) throw new RangeError('restCredentials: ttlSeconds must be a positive integer');
  if (!Number.isFinite(nowMs)) throw new RangeError('restCredentials: nowMs must be finite');
  const expiry = Math.floor(nowMs / 1000) + ttlSeconds;
  const username = id === '' ? String(expiry) : `${expiry}:${id}`;
  const password = createHmac('sha1', secret).update(username, 'utf8').digest('base64');
  return { username, password, expiresAt: expiry * 1000 };
}

// ---------------------------------------------------------------------------
// Failures

/** Internal: every expected failure of a session step. */
export class TurnProbeFailure extends Error {
  override name = 'TurnProbeFailure';
  constructor(
    readonly errorClass: ProbeErrorClass,
    message: string,
    readonly errorCode?: number,
  ) {
    super(message);
  }
}

function errnoOf(err: unknown): string | undefined {
  const c = (err as { code?: unknown } | null)?.code;
  return typeof c === 'string' ? c : undefined;
}

function describe(err: unknown): string {
  if (err instanceof Error) {
    const code = errnoOf(err);
    return code && !err.message.includes(code) ? `${code}: ${err.message}` : err.message;
  }
  return String(err);
}

function networkFailure(err: unknown, what: string): TurnProbeFailure {
  if (err instanceof TurnProbeFailure) return err;
  // ETIMEDOUT is the kernel giving up (e.g. unanswered SYNs); everything else a socket
  // reports (ECONNREFUSED incl. ICMP port unreachable on UDP, resets, DNS and TLS
  // handshake/certificate errors) means we cannot talk to the server.
  return new TurnProbeFailure(errnoOf(err) === 'ETIMEDOUT' ? 'timeout' : 'unreachable', `${what}: ${describe(err)}`);
}

// ---------------------------------------------------------------------------
// Session: one socket, one outstanding transaction at a time

/** Initial UDP retransmission timeout (RFC 5389 7.2.1 recommends > 500 ms on the Internet; probes want to notice loss sooner). */
export const INITIAL_RTO_MS = 250;
/** RFC 5389 Rc: transmissions of one request over UDP. */
export const MAX_UDP_TRANSMISSIONS = 7;
const MAX_STREAM_BUFFER = 256 * 1024;

export interface TurnSessionOptions {
  host: string;
  port: number;
  transport: TurnTransport;
  tls?: { ca?: string | Buffer; servername?: string; rejectUnauthorized?: boolean };
  signal?: AbortSignal;
  /** Initial RTO for UDP (default INITIAL_RTO_MS). */
  initialRtoMs?: number;
}

export interface LongTermAuth {
  username: string;
  password: string;
  /** The realm the caller expects; the server's REALM is used for the key regardless. */
  expectedRealm?: string;
}

interface Pending {
  transactionId: Buffer;
  method: number;
  resolve: (m: DecodedStunMessage) => void;
  reject: (e: TurnProbeFailure) => void;
  garbage: number;
}

interface AuthState {
  username: string;
  realm: string;
  nonce: string;
  key: Buffer;
  password: string;
}

const METHOD_NAMES: Record<number, string> = { 1: 'Binding', 3: 'Allocate', 4: 'Refresh' };

function methodName(m: number): string {
  return METHOD_NAMES[m] ?? `method 0x${m.toString(16)}`;
}

function sameId(a: Buffer, b: Buffer): boolean {
  return a.length === b.length && a.equals(b);
}

/**
 * One STUN/TURN client connection. Methods throw TurnProbeFailure; close() is
 * idempotent and releases the socket and every timer. Used by probeTurn; also
 * handy to hold an allocation open (tests).
 */
export class TurnSession {
  readonly transport: TurnTransport;
  /** Set once any valid STUN response for one of our transactions arrived. */
  reachable = false;
  /** True once the server answered an Allocate with success (until released). */
  allocated = false;
  /**
   * True once an authenticated Allocate went out without an answer we could use (it timed out,
   * was aborted, or its answer came late): the server may hold an allocation we never heard of,
   * which would otherwise live out its lifetime (10 min on coturn) and hold a relay port.
   */
  allocationUnconfirmed = false;
  /** Realm mismatch note, when the server's realm differs from the expected one. */
  realmNote: string | undefined;

  private udp: dgram.Socket | undefined;
  private stream: net.Socket | undefined;
  private pending: Pending | undefined;
  private failure: TurnProbeFailure | undefined;
  private closed = false;
  private flushOnClose = false;
  private streamBuf: Buffer = Buffer.alloc(0);
  private auth: AuthState | undefined;
  private readonly initialRtoMs: number;
  private readonly signal: AbortSignal | undefined;

  private constructor(opts: TurnSessionOptions) {
    this.transport = opts.transport;
    this.signal = opts.signal;
    this.initialRtoMs = opts.initialRtoMs ?? INITIAL_RTO_MS;
  }

  /** Resolves the host and connects (TCP/TLS) within `deadline` (performance.now() ms). */
  static async open(opts: TurnSessionOptions, deadline: number): Promise<TurnSession> {
    const s = new TurnSession(opts);
    try {
      await s.connect(opts, deadline);
    } catch (e) {
      s.close();
      throw e instanceof TurnProbeFailure ? e : networkFailure(e, 'connect');
    }
    return s;
  }

  /** Races `p` against the deadline and the abort signal (a loser's later settlement is ignored). */
  private race<T>(p: Promise<T>, deadline: number, what: string): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      let done = false;
      const finish = (): void => {
        done = true;
        clearTimeout(timer);
        this.signal?.removeEventListener('abort', onAbort);
      };
      const onAbort = (): void => {
        if (done) return;
        finish();
        reject(new TurnProbeFailure('timeout', `${what}: aborted`));
      };
      const timer = setTimeout(
        () => {
          if (done) return;
          finish();
          reject(new TurnProbeFailure('timeout', `${what}: no result within the step budget`));
        },
        Math.max(0, deadline - performance.now()),
      );
      if (this.signal?.aborted) {
        onAbort();
        return;
      }
      this.signal?.addEventListener('abort', onAbort, { once: true });
      p.then(
        (v) => {
          if (done) return;
          finish();
          resolve(v);
        },
        (e: unknown) => {
          if (done) return;
          finish();
          reject(e);
        },
      );
    });
  }

  private async connect(opts: TurnSessionOptions, deadline: number): Promise<void> {
    let address = opts.host;
    let family = net.isIP(opts.host);
    if (family === 0) {
      const lookup = dns.promises.lookup(opts.host).catch((e: unknown) => {
        throw new TurnProbeFailure('unreachable', `cannot resolve ${opts.host}: ${describe(e)}`);
      });
      lookup.catch(() => undefined); // may lose the race
      const r = await this.race(lookup, deadline, `resolving ${opts.host}`);
      address = r.address;
      family = r.family;
    }
    if (this.closed) throw this.failure ?? new TurnProbeFailure('timeout', 'closed');
    if (opts.transport === 'udp') {
      const sock = dgram.createSocket(family === 6 ? 'udp6' : 'udp4');
      this.udp = sock;
      sock.on('error', (err) => this.fail(networkFailure(err, 'udp')));
      sock.on('message', (msg) => this.onDatagram(msg));
      const connected = new Promise<void>((resolve, reject) => {
        sock.once('connect', () => resolve());
        sock.once('error', reject);
      });
      connected.catch(() => undefined);
      sock.connect(opts.port, address);
      await this.race(connected, deadline, `udp connect to ${address}:${opts.port}`);
      return;
    }
    let sock: net.Socket;
    let readyEvent: string;
    if (opts.transport === 'tls') {
      const servername = opts.tls?.servername ?? (net.isIP(opts.host) ? undefined : opts.host);
      sock = tls.connect({
        host: address,
        port: opts.port,
        ...(servername !== undefined ? { servername } : {}),
        ...(opts.tls?.ca !== undefined ? { ca: opts.tls.ca } : {}),
        rejectUnauthorized: opts.tls?.rejectUnauthorized ?? true,
      });
      readyEvent = 'secureConnect';
    } else {
      sock = net.connect({ host: address, port: opts.port });
      readyEvent = 'connect';
    }
    this.stream = sock;
    sock.setNoDelay(true);
    const connected = new Promise<void>((resolve, reject) => {
      sock.once(readyEvent, () => resolve());
      sock.once('error', reject);
    });
    connected.catch(() => undefined);
    sock.on('error', (err) => this.fail(networkFailure(err, opts.transport)));
    sock.on('close', () => this.fail(new TurnProbeFailure('unreachable', `${opts.transport} connection closed by the server`)));
    sock.on('data', (chunk: Buffer) => this.onStreamData(chunk));
    await this.race(
      connected.catch((e: unknown) => {
        throw networkFailure(e, `${opts.transport} connect to ${address}:${opts.port}`);
      }),
      deadline,
      `${opts.transport} connect to ${address}:${opts.port}`,
    );
  }

  private fail(f: TurnProbeFailure): void {
    if (this.closed) return;
    if (!this.failure) this.failure = f;
    const p = this.pending;
    if (p) {
      this.pending = undefined;
      p.reject(f);
    }
  }

  private onDatagram(buf: Buffer): void {
    const p = this.pending;
    if (!p) return; // stray
    let msg: DecodedStunMessage;
    try {
      msg = decodeStunMessage(buf);
    } catch (e) {
      if (looksLikeStun(buf) && sameId(buf.subarray(8, 20), p.transactionId)) {
        this.pending = undefined;
        p.reject(new TurnProbeFailure('malformed', `undecodable ${methodName(p.method)} response: ${describe(e)}`));
      } else {
        p.garbage++;
      }
      return;
    }
    this.onMessage(msg);
  }

  private onStreamData(chunk: Buffer): void {
    if (this.closed) return;
    this.streamBuf = this.streamBuf.length ? Buffer.concat([this.streamBuf, chunk]) : chunk;
    for (;;) {
      if (this.streamBuf.length < 4) return;
      if ((this.streamBuf[0]! & 0xc0) !== 0) {
        this.fail(new TurnProbeFailure('malformed', 'server sent non-STUN data on the stream'));
        return;
      }
      if (this.streamBuf.length >= 8 && this.streamBuf.readUInt32BE(4) !== STUN_MAGIC_COOKIE) {
        this.fail(new TurnProbeFailure('malformed', 'server sent a frame without the STUN magic cookie'));
        return;
      }
      const total = STUN_HEADER_LENGTH + this.streamBuf.readUInt16BE(2);
      if (this.streamBuf.length < total) {
        if (this.streamBuf.length > MAX_STREAM_BUFFER) this.fail(new TurnProbeFailure('malformed', 'stream buffer overflow'));
        return;
      }
      const frame = this.streamBuf.subarray(0, total);
      this.streamBuf = this.streamBuf.subarray(total);
      let msg: DecodedStunMessage;
      try {
        msg = decodeStunMessage(frame);
      } catch (e) {
        this.fail(new TurnProbeFailure('malformed', `undecodable message from the server: ${describe(e)}`));
        return;
      }
      this.onMessage(msg);
    }
  }

  private onMessage(msg: DecodedStunMessage): void {
    const p = this.pending;
    if (!p || !sameId(msg.transactionId, p.transactionId)) return; // stray or late
    if (msg.cls !== StunClass.Success && msg.cls !== StunClass.Error) return; // requests/indications: not ours
    this.pending = undefined;
    if (msg.method !== p.method) {
      p.reject(new TurnProbeFailure('malformed', `response method ${methodName(msg.method)} does not match request ${methodName(p.method)}`));
      return;
    }
    this.reachable = true;
    p.resolve(msg);
  }

  /** Sends one request and waits for its response (UDP: with retransmissions) until `deadline`. */
  transact(method: number, attributes: StunAttribute[], deadline: number, key?: Buffer): Promise<DecodedStunMessage> {
    if (this.closed) return Promise.reject(this.failure ?? new TurnProbeFailure('timeout', 'session closed'));
    if (this.failure) return Promise.reject(this.failure);
    if (this.pending) return Promise.reject(new Error('TurnSession: one transaction at a time'));
    const transactionId = newTransactionId();
    const request = encodeStunMessage(
      { method, cls: StunClass.Request, transactionId, attributes },
      { ...(key ? { integrityKey: key } : {}), fingerprint: true },
    );
    const name = methodName(method);
    return new Promise<DecodedStunMessage>((resolve, reject) => {
      let sends = 0;
      let rto = this.initialRtoMs;
      let retransmitTimer: NodeJS.Timeout | undefined;
      const cleanup = (): void => {
        clearTimeout(deadlineTimer);
        if (retransmitTimer) clearTimeout(retransmitTimer);
        this.signal?.removeEventListener('abort', onAbort);
        if (this.pending === pending) this.pending = undefined;
      };
      const pending: Pending = {
        transactionId,
        method,
        garbage: 0,
        resolve: (m) => {
          cleanup();
          resolve(m);
        },
        reject: (e) => {
          cleanup();
          reject(e);
        },
      };
      const onAbort = (): void => pending.reject(new TurnProbeFailure('timeout', `${name}: aborted`));
      const budget = Math.max(0, deadline - performance.now());
      const deadlineTimer = setTimeout(() => {
        if (pending.garbage > 0) {
          pending.reject(new TurnProbeFailure('malformed', `${name}: only undecodable replies (${pending.garbage}) within ${Math.round(budget)} ms`));
        } else {
          const tx = this.udp ? ` (${sends} transmission${sends === 1 ? '' : 's'})` : '';
          pending.reject(new TurnProbeFailure('timeout', `no response to ${name} within ${Math.round(budget)} ms${tx}`));
        }
      }, budget);
      this.pending = pending;
      if (this.signal?.aborted) {
        onAbort();
        return;
      }
      this.signal?.addEventListener('abort', onAbort, { once: true });
      const send = (): void => {
        if (this.pending !== pending) return;
        sends++;
        if (this.udp) {
          this.udp.send(request, (err) => {
            if (err) this.fail(networkFailure(err, 'udp send'));
          });
          // Next retransmission after RTO (doubling), at most Rc transmissions, and only inside the step budget.
          if (sends < MAX_UDP_TRANSMISSIONS && rto < deadline - performance.now()) retransmitTimer = setTimeout(send, rto);
          rto *= 2;
        } else if (this.stream) {
          this.stream.write(request);
        }
      };
      send();
    });
  }

  private buildAuthAttrs(): StunAttribute[] {
    const a = this.auth!;
    return [
      stringAttribute(StunAttr.Username, a.username),
      stringAttribute(StunAttr.Realm, a.realm),
      stringAttribute(StunAttr.Nonce, a.nonce),
    ];
  }

  private setAuth(creds: LongTermAuth, realm: string, nonce: string): void {
    if (creds.expectedRealm !== undefined && realm !== creds.expectedRealm) {
      this.realmNote = `realm mismatch: server says "${realm}", expected "${creds.expectedRealm}"`;
    }
    this.auth = { username: creds.username, password: creds.password, realm, nonce, key: longTermKey(creds.username, realm, creds.password) };
  }

  /**
   * A request with the long-term credential mechanism: unauthenticated first
   * (unless a nonce is known), 401 -> authenticated retry, 438 -> one retry with
   * the new nonce. Authenticated success responses must carry a valid
   * MESSAGE-INTEGRITY. Error responses become TurnProbeFailure.
   */
  async request(
    method: number,
    attributes: StunAttribute[],
    deadline: number,
    creds: LongTermAuth | undefined,
    refuseClass: ProbeErrorClass,
  ): Promise<DecodedStunMessage> {
    const name = methodName(method);
    let challenged = false;
    let staleRetries = 0;
    for (;;) {
      const authed = this.auth !== undefined;
      const attrs = [stringAttribute(StunAttr.Software, SOFTWARE), ...attributes, ...(authed ? this.buildAuthAttrs() : [])];
      if (method === StunMethod.Allocate && authed) this.allocationUnconfirmed = true;
      const res = await this.transact(method, attrs, deadline, authed ? this.auth!.key : undefined);
      if (method === StunMethod.Allocate && authed) this.allocationUnconfirmed = false;
      if (res.cls === StunClass.Success) {
        if (authed && !verifyMessageIntegrity(res, this.auth!.key)) {
          if (method === StunMethod.Allocate) this.allocated = true; // the server did allocate: still release
          throw new TurnProbeFailure(
            'malformed',
            res.integrityOffset === undefined ? `${name} success response without MESSAGE-INTEGRITY` : `${name} success response with a bad MESSAGE-INTEGRITY`,
          );
        }
        return res;
      }
      const ecRaw = getAttribute(res, StunAttr.ErrorCode);
      if (!ecRaw) throw new TurnProbeFailure('malformed', `${name} error response without ERROR-CODE`);
      let ec: { code: number; reason: string };
      try {
        ec = decodeErrorCode(ecRaw);
      } catch (e) {
        throw new TurnProbeFailure('malformed', `${name} error response: ${describe(e)}`);
      }
      const reason = ec.reason ? ` ${sanitizeReason(ec.reason)}` : '';
      if (ec.code === 401) {
        if (authed || challenged || !creds) {
          const who = this.auth ? ` (user "${this.auth.username}", realm "${this.auth.realm}")` : '';
          throw new TurnProbeFailure('auth_rejected', `${name}: 401${reason}: credentials rejected${who}`, 401);
        }
        challenged = true;
        const realm = getStringAttribute(res, StunAttr.Realm);
        const nonce = getStringAttribute(res, StunAttr.Nonce);
        if (realm === undefined || nonce === undefined) {
          throw new TurnProbeFailure('malformed', `${name}: 401 without ${realm === undefined ? 'REALM' : 'NONCE'}`, 401);
        }
        this.setAuth(creds, realm, nonce);
        continue;
      }
      if (ec.code === 438) {
        if (!this.auth || staleRetries >= 1) {
          throw new TurnProbeFailure('auth_rejected', `${name}: 438${reason}: nonce rejected twice`, 438);
        }
        staleRetries++;
        const nonce = getStringAttribute(res, StunAttr.Nonce);
        if (nonce === undefined) throw new TurnProbeFailure('malformed', `${name}: 438 without NONCE`, 438);
        const realm = getStringAttribute(res, StunAttr.Realm) ?? this.auth.realm;
        this.setAuth({ username: this.auth.username, password: this.auth.password, ...(creds?.expectedRealm !== undefined ? { expectedRealm: creds.expectedRealm } : {}) }, realm, nonce);
        continue;
      }
      throw new TurnProbeFailure(refuseClass, `${name} refused: ${ec.code}${reason}`, ec.code);
    }
  }

  /**
   * RFC 5389 Binding; returns the mapped address. Authenticates only when challenged (coturn's
   * secure-stun). A STUN error other than 401/438 is reported as allocation_refused (the server
   * refuses service; there is no better class).
   */
  async binding(deadline: number, creds?: LongTermAuth): Promise<{ mappedAddress: string }> {
    const res = await this.request(StunMethod.Binding, [], deadline, creds, 'allocation_refused');
    return { mappedAddress: formatAddress(mappedAddressOf(res, 'Binding')) };
  }

  /** RFC 5766 Allocate (UDP relay). */
  async allocate(deadline: number, creds: LongTermAuth): Promise<{ relayedAddress: string; mappedAddress?: string; lifetime: number }> {
    const res = await this.request(
      StunMethod.Allocate,
      [u32Attribute(StunAttr.RequestedTransport, TRANSPORT_UDP << 24)],
      deadline,
      creds,
      'allocation_refused',
    );
    this.allocated = true;
    const relayed = getAttribute(res, StunAttr.XorRelayedAddress);
    if (!relayed) throw new TurnProbeFailure('malformed', 'Allocate success response without XOR-RELAYED-ADDRESS');
    const lifetime = getAttribute(res, StunAttr.Lifetime);
    if (!lifetime || lifetime.length !== 4) throw new TurnProbeFailure('malformed', 'Allocate success response without a valid LIFETIME');
    let relayedAddress: string;
    try {
      relayedAddress = formatAddress(decodeAddress(relayed, res.transactionId, true));
    } catch (e) {
      throw new TurnProbeFailure('malformed', `Allocate: XOR-RELAYED-ADDRESS: ${describe(e)}`);
    }
    const out: { relayedAddress: string; mappedAddress?: string; lifetime: number } = { relayedAddress, lifetime: lifetime.readUInt32BE(0) };
    try {
      const m = getAttribute(res, StunAttr.XorMappedAddress);
      if (m) out.mappedAddress = formatAddress(decodeAddress(m, res.transactionId, true));
    } catch (e) {
      throw new TurnProbeFailure('malformed', `Allocate: XOR-MAPPED-ADDRESS: ${describe(e)}`);
    }
    return out;
  }

  /** Refresh with the given LIFETIME (0 releases the allocation), authenticated with the allocation's nonce and key. */
  async refresh(deadline: number, lifetimeSeconds: number): Promise<{ lifetime?: number }> {
    const res = await this.request(StunMethod.Refresh, [u32Attribute(StunAttr.Lifetime, lifetimeSeconds)], deadline, undefined, 'allocation_refused');
    if (lifetimeSeconds === 0) this.allocated = false;
    const lt = getAttribute(res, StunAttr.Lifetime);
    return lt && lt.length === 4 ? { lifetime: lt.readUInt32BE(0) } : {};
  }

  /**
   * Fire-and-forget Refresh(0): for when there is no time to wait (abort), or when an Allocate may
   * have succeeded unheard (a server without that allocation answers 437, which nobody reads).
   */
  sendReleaseNoWait(): void {
    if (this.closed || !this.auth || !(this.allocated || this.allocationUnconfirmed)) return;
    try {
      const req = encodeStunMessage(
        {
          method: StunMethod.Refresh,
          cls: StunClass.Request,
          transactionId: newTransactionId(),
          attributes: [stringAttribute(StunAttr.Software, SOFTWARE), u32Attribute(StunAttr.Lifetime, 0), ...this.buildAuthAttrs()],
        },
        { integrityKey: this.auth.key, fingerprint: true },
      );
      if (this.udp) this.udp.send(req, () => undefined);
      else if (this.stream) {
        this.stream.write(req);
        this.flushOnClose = true;
      }
    } catch {
      /* best effort */
    }
  }

  /** Secrets this session derived (for scrubbing messages). */
  derivedSecrets(): string[] {
    if (!this.auth) return [];
    return [this.auth.key.toString('hex'), this.auth.key.toString('base64')];
  }

  close(): void {
    if (this.closed) return;
    const p = this.pending;
    this.pending = undefined;
    if (p) p.reject(this.failure ?? new TurnProbeFailure('timeout', 'session closed'));
    this.closed = true;
    if (this.udp) {
      const u = this.udp;
      this.udp = undefined;
      u.removeAllListeners('message');
      u.on('error', () => undefined);
      try {
        u.close();
      } catch {
        /* already closed */
      }
    }
    if (this.stream) {
      const s = this.stream;
      this.stream = undefined;
      s.removeAllListeners('data');
      s.removeAllListeners('close');
      s.on('error', () => undefined);
      if (this.flushOnClose) {
        // end() flushes the fire-and-forget release; destroy soon after regardless.
        s.end();
        const t = setTimeout(() => s.destroy(), 200);
        s.once('close', () => clearTimeout(t));
      } else {
        s.destroy();
      }
    }
  }
}

function mappedAddressOf(res: DecodedStunMessage, name: string): TransportAddress {
  const x = getAttribute(res, StunAttr.XorMappedAddress);
  const m = getAttribute(res, StunAttr.MappedAddress);
  try {
    if (x) return decodeAddress(x, res.transactionId, true);
    if (m) return decodeAddress(m, res.transactionId, false);
  } catch (e) {
    throw new TurnProbeFailure('malformed', `${name}: mapped address: ${describe(e)}`);
  }
  throw new TurnProbeFailure('malformed', `${name} success response without XOR-MAPPED-ADDRESS`);
}

/** Server-provided reason phrases go into our messages: keep them short and printable. */
function sanitizeReason(s: string): string {
  return `(${s.replace(/[^\x20-\x7e]/g, '?').slice(0, 120)})`;
}

// ---------------------------------------------------------------------------
// probeTurn

function validateOptions(opts: TurnProbeOptions): void {
  if (!opts || typeof opts !== 'object') throw new TypeError('probeTurn: options required');
  if (typeof opts.host !== 'string' || opts.host.trim() === '') throw new TypeError('probeTurn: host must be a non-empty string');
  if (!Number.isInteger(opts.port) || opts.port < 1 || opts.port > 65535) throw new RangeError(`probeTurn: bad port ${String(opts.port)}`);
  if (opts.transport !== 'udp' && opts.transport !== 'tcp' && opts.transport !== 'tls') {
    throw new TypeError(`probeTurn: bad transport ${String(opts.transport)}`);
  }
  if (typeof opts.realm !== 'string') throw new TypeError('probeTurn: realm must be a string');
  if (!Number.isFinite(opts.timeoutMs) || opts.timeoutMs <= 0 || opts.timeoutMs > 2_147_483_647) {
    throw new RangeError(`probeTurn: timeoutMs must be a positive number`);
  }
  const c = opts.credentials as TurnCredentials | undefined;
  if (!c || typeof c !== 'object') throw new TypeError('probeTurn: credentials required');
  if (c.mode === 'longTerm') {
    if (typeof c.username !== 'string' || c.username === '') throw new TypeError('probeTurn: credentials.username must be a non-empty string');
    if (typeof c.password !== 'string') throw new TypeError('probeTurn: credentials.password must be a string');
  } else if (c.mode === 'restSecret') {
    if (typeof c.secret !== 'string' || c.secret === '') throw new TypeError('probeTurn: credentials.secret must be a non-empty string');
    if (typeof c.id !== 'string') throw new TypeError('probeTurn: credentials.id must be a string');
    if (!Number.isInteger(c.ttlSeconds) || c.ttlSeconds <= 0) throw new RangeError('probeTurn: credentials.ttlSeconds must be a positive integer');
  } else {
    throw new TypeError(`probeTurn: bad credentials mode`);
  }
  if (opts.allocate !== undefined && typeof opts.allocate !== 'boolean') throw new TypeError('probeTurn: allocate must be a boolean');
}

function roundMs(ms: number): number {
  return Math.round(ms * 100) / 100;
}

/** Replaces every secret (and its obvious encodings) in `s`. */
function scrub(s: string, secrets: string[]): string {
  let out = s;
  for (const sec of secrets) {
    if (sec.length >= 1) out = out.split(sec).join('***');
  }
  return out;
}

/** Never throws for network or server problems: they become errorClass. Throws only on programmer errors (bad options). */
export async function probeTurn(opts: TurnProbeOptions): Promise<TurnProbeResult> {
  validateOptions(opts);
  const result: TurnProbeResult = { transport: opts.transport, reachable: false };
  const c = opts.credentials;
  const auth: LongTermAuth =
    c.mode === 'longTerm'
      ? { username: c.username, password: c.password, expectedRealm: opts.realm }
      : { ...pick(restCredentials(c.secret, c.id, c.ttlSeconds)), expectedRealm: opts.realm };
  const secrets = [auth.password, ...(c.mode === 'restSecret' ? [c.secret] : [])].filter((x) => x.length > 0);
  let session: TurnSession | undefined;
  let failure: TurnProbeFailure | undefined;
  const notes: string[] = [];
  let realmNote: string | undefined;
  try {
    const t0 = performance.now();
    session = await TurnSession.open(
      {
        host: opts.host,
        port: opts.port,
        transport: opts.transport,
        ...(opts.tls ? { tls: opts.tls } : {}),
        ...(opts.signal ? { signal: opts.signal } : {}),
      },
      t0 + opts.timeoutMs,
    );
    const tb = performance.now();
    const b = await session.binding(t0 + opts.timeoutMs, auth);
    result.bindingMs = roundMs(performance.now() - tb);
    result.mappedAddress = b.mappedAddress;
    if (opts.allocate !== false) {
      const t1 = performance.now();
      const a = await session.allocate(t1 + opts.timeoutMs, auth);
      result.allocationMs = roundMs(performance.now() - t1);
      result.relayedAddress = a.relayedAddress;
      if (a.mappedAddress && !result.mappedAddress) result.mappedAddress = a.mappedAddress;
      const t2 = performance.now();
      await session.refresh(t2 + opts.timeoutMs, 0);
      result.releaseMs = roundMs(performance.now() - t2);
    }
  } catch (e) {
    failure = e instanceof TurnProbeFailure ? e : networkFailure(e, 'probe');
    // Anything after a successful allocation failed: release it (own budget) unless the
    // connection itself is gone or the caller aborted (then fire and forget). An Allocate that
    // got no usable answer may have allocated all the same: release that one without waiting.
    if (session?.allocationUnconfirmed && !session.allocated) {
      session.sendReleaseNoWait();
    } else if (session?.allocated) {
      if (opts.signal?.aborted) {
        session.sendReleaseNoWait();
      } else {
        try {
          await session.refresh(performance.now() + opts.timeoutMs, 0);
          notes.push('allocation released');
        } catch (re) {
          notes.push(`release failed too: ${re instanceof Error ? re.message : String(re)}`);
        }
      }
    }
  } finally {
    if (session) {
      result.reachable = session.reachable;
      realmNote = session.realmNote;
      secrets.push(...session.derivedSecrets());
      session.close();
    }
  }
  if (failure) {
    result.errorClass = failure.errorClass;
    if (failure.errorCode !== undefined) result.errorCode = failure.errorCode;
  }
  const msg = [...(realmNote ? [realmNote] : []), ...(failure ? [failure.message] : []), ...notes];
  if (msg.length) result.error = scrub(msg.join('; '), secrets);
  return result;
}

function pick(r: { username: string; password: string }): { username: string; password: string } {
  return { username: r.username, password: r.password };
}
