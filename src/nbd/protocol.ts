/**
 * The NBD protocol, as far as a block-status client needs it (the fixed newstyle handshake,
 * structured replies, meta contexts, NBD_CMD_BLOCK_STATUS): constants and pure encoders and
 * decoders. Every number on the wire is big-endian. Socket I/O lives in client.ts.
 */

export const NBD_MAGIC = 0x4e42444d41474943n; // "NBDMAGIC"
export const NBD_IHAVEOPT = 0x49484156454f5054n; // "IHAVEOPT"
export const NBD_OPT_REPLY_MAGIC = 0x3e889045565a9n;
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** Handshake flags (server) and client flags. */
export const NBD_FLAG_FIXED_NEWSTYLE = 1;
export const NBD_FLAG_NO_ZEROES = 2;

export const NBD_OPT_ABORT = 2;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;
export const NBD_OPT_SET_META_CONTEXT = 10;

export const NBD_REP_ACK = 1;
export const NBD_REP_INFO = 3;
export const NBD_REP_META_CONTEXT = 4;
const NBD_REP_FLAG_ERROR = 0x80000000;
export const NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR + 1;
export const NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR + 2;
export const NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR + 5;
export const NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR + 6;

export const NBD_INFO_EXPORT = 0;

export const NBD_CMD_DISC = 2;
export const NBD_CMD_BLOCK_STATUS = 7;

export const NBD_REPLY_FLAG_DONE = 1;
export const NBD_REPLY_TYPE_NONE = 0;
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5;
/** Structured reply types with this bit are errors. */
export const NBD_REPLY_TYPE_ERROR_BIT = 0x8000;

/** base:allocation flags; a dirty-bitmap context uses bit 0 for "dirty". */
export const NBD_STATE_HOLE = 1;
export const NBD_STATE_ZERO = 2;

export const BASE_ALLOCATION = 'base:allocation';

/** The header every client option starts with, followed by `data`. */
export function encodeOption(option: number, data: Uint8Array = new Uint8Array(0)): Uint8Array {
  const buf = new Uint8Array(16 + data.length);
  const v = new DataView(buf.buffer);
  v.setBigUint64(0, NBD_IHAVEOPT);
  v.setUint32(8, option);
  v.setUint32(12, data.length);
  buf.set(data, 16);
  return buf;
}

const utf8 = (s: string): Uint8Array => new TextEncoder().encode(s);

/** NBD_OPT_SET_META_CONTEXT's data: the export name and the context queries. */
export function encodeMetaContextQuery(exportName: string, queries: readonly string[]): Uint8Array {
  const name = utf8(exportName);
  const qs = queries.map(utf8);
  const buf = new Uint8Array(4 + name.length + 4 + qs.reduce((n, q) => n + 4 + q.length, 0));
  const v = new DataView(buf.buffer);
  v.setUint32(0, name.length);
  buf.set(name, 4);
  let at = 4 + name.length;
  v.setUint32(at, qs.length);
  at += 4;
  for (const q of qs) {
    v.setUint32(at, q.length);
    buf.set(q, at + 4);
    at += 4 + q.length;
  }
  return buf;
}

/** NBD_OPT_GO's data: the export name and no information requests (the export's size comes anyway). */
export function encodeGo(exportName: string): Uint8Array {
  const name = utf8(exportName);
  const buf = new Uint8Array(4 + name.length + 2);
  new DataView(buf.buffer).setUint32(0, name.length);
  buf.set(name, 4);
  return buf;
}

export interface OptionReplyHeader {
  option: number;
  type: number;
  length: number;
}

/** The 20-byte header of an option reply (the magic is checked). */
export function decodeOptionReplyHeader(b: Uint8Array): OptionReplyHeader {
  const v = view(b);
  if (v.getBigUint64(0) !== NBD_OPT_REPLY_MAGIC) throw new NbdProtocolError('bad option reply magic');
  return { option: v.getUint32(8), type: v.getUint32(12), length: v.getUint32(16) };
}

/** NBD_REP_META_CONTEXT's data: the context id the server chose, and the context's name. */
export function decodeMetaContext(b: Uint8Array): { id: number; name: string } {
  if (b.length < 4) throw new NbdProtocolError('short meta context reply');
  return { id: view(b).getUint32(0), name: new TextDecoder().decode(b.subarray(4)) };
}

/** NBD_REP_INFO of type NBD_INFO_EXPORT: size and transmission flags (undefined for other types). */
export function decodeInfoExport(b: Uint8Array): { size: bigint; flags: number } | undefined {
  const v = view(b);
  if (b.length < 2 || v.getUint16(0) !== NBD_INFO_EXPORT) return undefined;
  if (b.length < 12) throw new NbdProtocolError('short export information');
  return { size: v.getBigUint64(2), flags: v.getUint16(10) };
}

/** A 28-byte transmission request. */
export function encodeRequest(type: number, cookie: bigint, offset: number, length: number, flags = 0): Uint8Array {
  const buf = new Uint8Array(28);
  const v = new DataView(buf.buffer);
  v.setUint32(0, NBD_REQUEST_MAGIC);
  v.setUint16(4, flags);
  v.setUint16(6, type);
  v.setBigUint64(8, cookie);
  v.setBigUint64(16, BigInt(offset));
  v.setUint32(24, length);
  return buf;
}

export interface StructuredChunkHeader {
  flags: number;
  type: number;
  cookie: bigint;
  length: number;
}

/** The first 4 bytes of any transmission reply: its magic. */
export function replyMagic(b: Uint8Array): number {
  return view(b).getUint32(0);
}

/** The 20-byte header of a structured reply chunk. */
export function decodeStructuredChunkHeader(b: Uint8Array): StructuredChunkHeader {
  const v = view(b);
  if (v.getUint32(0) !== NBD_STRUCTURED_REPLY_MAGIC) throw new NbdProtocolError('bad structured reply magic');
  return { flags: v.getUint16(4), type: v.getUint16(6), cookie: v.getBigUint64(8), length: v.getUint32(16) };
}

/** The 16-byte simple reply: its error (0: success) and cookie. */
export function decodeSimpleReply(b: Uint8Array): { error: number; cookie: bigint } {
  const v = view(b);
  if (v.getUint32(0) !== NBD_SIMPLE_REPLY_MAGIC) throw new NbdProtocolError('bad simple reply magic');
  return { error: v.getUint32(4), cookie: v.getBigUint64(8) };
}

export interface StatusDescriptor {
  length: number;
  flags: number;
}

/** NBD_REPLY_TYPE_BLOCK_STATUS's payload: the context id and its extent descriptors. */
export function decodeBlockStatus(b: Uint8Array): { contextId: number; descriptors: StatusDescriptor[] } {
  if (b.length < 12 || (b.length - 4) % 8 !== 0) throw new NbdProtocolError(`block status payload of ${b.length} bytes`);
  const v = view(b);
  const descriptors: StatusDescriptor[] = [];
  for (let at = 4; at < b.length; at += 8) descriptors.push({ length: v.getUint32(at), flags: v.getUint32(at + 4) });
  return { contextId: v.getUint32(0), descriptors };
}

/** An error chunk's payload: the errno-like code and the server's message. */
export function decodeErrorChunk(b: Uint8Array): { error: number; message: string } {
  if (b.length < 6) throw new NbdProtocolError('short error chunk');
  const v = view(b);
  const len = v.getUint16(4);
  return { error: v.getUint32(0), message: new TextDecoder().decode(b.subarray(6, 6 + len)) };
}

/** NBD error numbers (the protocol's errno values) as text. */
export function nbdErrorText(error: number): string {
  const names: Record<number, string> = { 1: 'Operation not permitted', 5: 'Input/output error', 12: 'Cannot allocate memory', 22: 'Invalid argument', 28: 'No space left on device', 75: 'Value too large', 95: 'Operation not supported', 108: 'Server is shutting down' };
  return names[error] ?? `error ${error}`;
}

export class NbdProtocolError extends Error {}

function view(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}
