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

@inline
function byte(c: u32): void {
  store<u8>(pos, <u8>c);
  pos++;
}

/** Copies an ASCII string literal (static data) to the cursor. */
function text(s: string): void {
  const n = s.length;
  const p = changetype<usize>(s);
  for (let i = 0; i < n; i++) store<u8>(pos + i, <u8>load<u16>(p + (<usize>i << 1)));
  pos += n;
}

function decimal(v: u64): void {
  if (v < 10) {
    byte(48 + <u32>v);
    return;
  }
  let digits: usize = 0;
  let t = v;
  while (t) {
    digits++;
    t /= 10;
  }
  let p = pos + digits;
  while (v) {
    p--;
    store<u8>(p, <u8>(48 + <u32>(v % 10)));
    v /= 10;
  }
  pos += digits;
}

function flag(set: bool): void {
  if (set) text('true');
  else text('false');
}

function writePending(): void {
  if (emitted) text(',\n');
  else byte(0x5b); // '['
  emitted++;
  text('{ "start": ');
  decimal(pStart);
  text(', "length": ');
  decimal(pLength);
  text(', "depth": ');
  decimal(<u64>(pMeta >> 3));
  text(', "present": ');
  flag((pMeta & PRESENT) != 0);
  text(', "zero": ');
  flag((pMeta & ZERO) != 0);
  text(', "data": ');
  flag((pMeta & DATA) != 0);
  if (pOffset >= 0) {
    text(', "offset": ');
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
  if (emitted) text(']\n');
  return <u32>(pos - out);
}
