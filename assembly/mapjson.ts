// `map --output=json` text, as qemu-img 7.2 prints it, from map entry records (contract:
// src/kernels/api.ts). Entries are merged the way qemu-img merges them (same depth and flags,
// offsets contiguous or both absent) and written as UTF-8 into `out`; the one pending entry
// lives in globals between calls, so a map streams through any number of batches.

const PRESENT: u32 = 1;
const ZERO: u32 = 2;
const DATA: u32 = 4;

let pStart: u64 = 0;
let pLength: u64 = 0;
let pOffset: i64 = -1; // -1 = no offset
let pMeta: u32 = 0; // depth << 3 | flags
let pHave: bool = false;
let emitted: u64 = 0;

let pos: usize = 0; // write cursor while formatting

// The literal pieces of an entry, as ASCII bytes in static data.
const T_START = memory.data<u8>([123,32,34,115,116,97,114,116,34,58,32]);
const T_START_LEN: usize = 11;
const T_LENGTH = memory.data<u8>([44,32,34,108,101,110,103,116,104,34,58,32]);
const T_LENGTH_LEN: usize = 12;
const T_DEPTH = memory.data<u8>([44,32,34,100,101,112,116,104,34,58,32]);
const T_DEPTH_LEN: usize = 11;
const T_PRESENT_T = memory.data<u8>([44,32,34,112,114,101,115,101,110,116,34,58,32,116,114,117,101]);
const T_PRESENT_T_LEN: usize = 17;
const T_PRESENT_F = memory.data<u8>([44,32,34,112,114,101,115,101,110,116,34,58,32,102,97,108,115,101]);
const T_PRESENT_F_LEN: usize = 18;
const T_ZERO_T = memory.data<u8>([44,32,34,122,101,114,111,34,58,32,116,114,117,101]);
const T_ZERO_T_LEN: usize = 14;
const T_ZERO_F = memory.data<u8>([44,32,34,122,101,114,111,34,58,32,102,97,108,115,101]);
const T_ZERO_F_LEN: usize = 15;
const T_DATA_T = memory.data<u8>([44,32,34,100,97,116,97,34,58,32,116,114,117,101]);
const T_DATA_T_LEN: usize = 14;
const T_DATA_F = memory.data<u8>([44,32,34,100,97,116,97,34,58,32,102,97,108,115,101]);
const T_DATA_F_LEN: usize = 15;
const T_OFFSET = memory.data<u8>([44,32,34,111,102,102,115,101,116,34,58,32]);
const T_OFFSET_LEN: usize = 12;
const T_SEP = memory.data<u8>([44,10]);
const T_SEP_LEN: usize = 2;
const T_END = memory.data<u8>([93,10]);
const T_END_LEN: usize = 2;
const DIGITS = memory.data<u8>([48,48,48,49,48,50,48,51,48,52,48,53,48,54,48,55,48,56,48,57,49,48,49,49,49,50,49,51,49,52,49,53,49,54,49,55,49,56,49,57,50,48,50,49,50,50,50,51,50,52,50,53,50,54,50,55,50,56,50,57,51,48,51,49,51,50,51,51,51,52,51,53,51,54,51,55,51,56,51,57,52,48,52,49,52,50,52,51,52,52,52,53,52,54,52,55,52,56,52,57,53,48,53,49,53,50,53,51,53,52,53,53,53,54,53,55,53,56,53,57,54,48,54,49,54,50,54,51,54,52,54,53,54,54,54,55,54,56,54,57,55,48,55,49,55,50,55,51,55,52,55,53,55,54,55,55,55,56,55,57,56,48,56,49,56,50,56,51,56,52,56,53,56,54,56,55,56,56,56,57,57,48,57,49,57,50,57,51,57,52,57,53,57,54,57,55,57,56,57,57]); // "00" .. "99"

@inline
function byte(c: u32): void {
  store<u8>(pos, <u8>c);
  pos++;
}

/**
 * Copies a literal piece (at most 32 bytes) with two vector moves: memory.copy is a call into
 * the engine per piece, a dozen per entry. Bytes past the piece are overwritten by what follows
 * (callers leave MAP_JSON_MAX_ENTRY_BYTES of room per entry, far more than the 32 this needs).
 */
@inline
function copy(src: usize, n: usize): void {
  v128.store(pos, v128.load(src));
  if (n > 16) v128.store(pos, v128.load(src, 16), 16);
  pos += n;
}

@inline
function digitCount(v: u32): usize {
  if (v < 100000) return v < 10 ? 1 : v < 100 ? 2 : v < 1000 ? 3 : v < 10000 ? 4 : 5;
  return v < 1000000 ? 6 : v < 10000000 ? 7 : v < 100000000 ? 8 : v < 1000000000 ? 9 : 10;
}

/** Decimal of a u32, two digits per step (u32 division by a constant: a multiply). */
function decimal32(v: u32): void {
  const n = digitCount(v);
  let p = pos + n;
  while (v >= 100) {
    const q = v / 100;
    p -= 2;
    store<u16>(p, load<u16>(DIGITS + (<usize>(v - q * 100) << 1)));
    v = q;
  }
  if (v >= 10) store<u16>(p - 2, load<u16>(DIGITS + (<usize>v << 1)));
  else store<u8>(p - 1, <u8>(48 + v));
  pos += n;
}

/** Exactly 8 digits (leading zeros) of v < 10^8. */
function decimal8(v: u32): void {
  let p = pos + 8;
  for (let i = 0; i < 4; i++) {
    const q = v / 100;
    p -= 2;
    store<u16>(p, load<u16>(DIGITS + (<usize>(v - q * 100) << 1)));
    v = q;
  }
  pos += 8;
}

function decimal(v: u64): void {
  if (v <= 0xffffffff) {
    decimal32(<u32>v);
    return;
  }
  const hi = v / 100000000;
  decimal(hi);
  decimal8(<u32>(v - hi * 100000000));
}

function writePending(): void {
  if (emitted) copy(T_SEP, T_SEP_LEN);
  else byte(0x5b); // '['
  emitted++;
  copy(T_START, T_START_LEN);
  decimal(pStart);
  copy(T_LENGTH, T_LENGTH_LEN);
  decimal(pLength);
  copy(T_DEPTH, T_DEPTH_LEN);
  decimal32(pMeta >> 3);
  if (pMeta & PRESENT) copy(T_PRESENT_T, T_PRESENT_T_LEN);
  else copy(T_PRESENT_F, T_PRESENT_F_LEN);
  if (pMeta & ZERO) copy(T_ZERO_T, T_ZERO_T_LEN);
  else copy(T_ZERO_F, T_ZERO_F_LEN);
  if (pMeta & DATA) copy(T_DATA_T, T_DATA_T_LEN);
  else copy(T_DATA_F, T_DATA_F_LEN);
  if (pOffset >= 0) {
    copy(T_OFFSET, T_OFFSET_LEN);
    decimal(<u64>pOffset);
  }
  byte(0x7d); // '}'
}

/** Starts a new map (forgets the pending entry and the count). */
export function mapJsonReset(): void {
  pHave = false;
  emitted = 0;
}

/**
 * Feeds `n` entry records (32 bytes each: f64 start, f64 length, f64 offset (< 0: none),
 * f64 depth * 8 + flags (1 present, 2 zero, 4 data)) and writes the text of every entry that
 * can no longer grow to `out` (room needed: MAP_JSON_MAX_ENTRY_BYTES per record). Returns the
 * number of bytes written.
 */
export function mapJsonFeed(entries: usize, n: u32, out: usize): u32 {
  pos = out;
  for (let i: u32 = 0; i < n; i++) {
    const r = entries + (<usize>i << 5);
    const start = <u64>load<f64>(r);
    const length = <u64>load<f64>(r, 8);
    const off = load<f64>(r, 16);
    const offset: i64 = off < 0 ? -1 : <i64>off;
    const meta = <u32>load<f64>(r, 24);
    if (length == 0) continue;
    if (pHave && pMeta == meta && (pOffset < 0 ? offset < 0 : offset >= 0 && <u64>offset == <u64>pOffset + pLength)) {
      pLength += length;
      continue;
    }
    if (pHave) writePending();
    pStart = start;
    pLength = length;
    pOffset = offset;
    pMeta = meta;
    pHave = true;
  }
  return <u32>(pos - out);
}

/** Writes the pending entry and the closing "]\n"; 0 bytes when no entry was ever fed. */
export function mapJsonFinish(out: usize): u32 {
  pos = out;
  if (pHave) writePending();
  pHave = false;
  if (emitted) copy(T_END, T_END_LEN);
  return <u32>(pos - out);
}
