// Block status as typed records (contract: src/kernels/api.ts): L2 runs to layer extent
// records, host-hole splitting of data extents (metadata preallocation), the merge of one
// backing-chain layer into the map records of a window, and the refcount count of QEMU's
// preallocation heuristic. No JS object per extent or per cluster on the map path.

import { getEntry } from "./refcount";
import { UNALLOCATED, DATA, ZERO_PLAIN, ZERO_ALLOC, COMPRESSED, INVALID } from "./l2";

// Extent flags (LayerExtent's booleans; the low three are also the map record flags).
const F_ALLOCATED: u32 = 1;
const F_ZERO: u32 = 2;
const F_DATA: u32 = 4;
const F_COMPRESSED: u32 = 8;

// Layer extent record: six f64 (start, length, offset (< 0: none), flags, compressed offset,
// compressed length).
const EXT_BYTES: usize = 48;
// Map record: four f64 (start, length, offset (< 0: none), depth * 8 + flags; < 0: pending).
const MAP_BYTES: usize = 32;

let errRun: u32 = 0;
let errStart: f64 = 0;
let pendingLeft: u32 = 0;

export function statusErrorRun(): u32 {
  return errRun;
}
export function statusErrorStart(): f64 {
  return errStart;
}
export function mapPendingLeft(): u32 {
  return pendingLeft;
}

// --- layer extent records ----------------------------------------------------------------------

@inline
function ext(p: usize, i: u32): usize {
  return p + <usize>i * EXT_BYTES;
}

/** Not merged with neighbours: a compressed extent is one cluster (QEMU answers one at a time). */
@inline
function mergeable(flags: u32): bool {
  return (flags & F_COMPRESSED) == 0;
}

/**
 * Appends an extent to out[0..n), merging it into the last one when both are mergeable, adjacent,
 * alike and their offsets continue (or both are absent). Returns the new count (maxOut caps it:
 * a full buffer returns maxOut + 1, which the caller reports as an internal error).
 */
function pushExt(out: usize, n: u32, maxOut: u32, start: f64, length: f64, offset: f64, flags: u32, cOff: f64, cLen: f64): u32 {
  if (n > 0 && mergeable(flags)) {
    const last = ext(out, n - 1);
    const lFlags = <u32>load<f64>(last, 24);
    const lStart = load<f64>(last);
    const lLength = load<f64>(last, 8);
    const lOffset = load<f64>(last, 16);
    if (lFlags == flags && lStart + lLength == start && (lOffset < 0 ? offset < 0 : offset >= 0 && offset == lOffset + lLength)) {
      store<f64>(last, lLength + length, 8);
      return n;
    }
  }
  if (n >= maxOut) return maxOut + 1;
  const r = ext(out, n);
  store<f64>(r, start);
  store<f64>(r, length, 8);
  store<f64>(r, offset, 16);
  store<f64>(r, <f64>flags, 24);
  store<f64>(r, cOff, 32);
  store<f64>(r, cLen, 40);
  return n + 1;
}

/**
 * Turns `nRuns` l2Scan run records of the table whose first unit is at guest byte `tableStart`
 * into extent records clipped to [clipStart, clipEnd), appended to out[0..nOut) with merging.
 * Returns the new count; -1: run `statusErrorRun()` is Invalid; -2: a zero cluster in a version 2
 * image (`v2`) at guest byte `statusErrorStart()`; -3: out is full.
 */
export function l2Records(runs: usize, nRuns: u32, unitBits: u32, tableStart: f64, clipStart: f64, clipEnd: f64, v2: bool, out: usize, nOut: u32, maxOut: u32): i32 {
  const unit = <f64>(<u64>1 << <u64>unitBits);
  let n = nOut;
  for (let i: u32 = 0; i < nRuns; i++) {
    const r = runs + (<usize>i << 5);
    const kind = load<u32>(r, 8);
    if (kind == INVALID) {
      errRun = i;
      return -1;
    }
    let gs = tableStart + <f64>load<u32>(r) * unit;
    let len = <f64>load<u32>(r, 4) * unit;
    let host = load<f64>(r, 16);
    const cut = max<f64>(0, clipStart - gs);
    gs += cut;
    len = min<f64>(len - cut, clipEnd - gs);
    if (len <= 0) continue;
    if (host != 0) host += cut;
    let flags: u32 = 0;
    let offset: f64 = -1;
    let cOff: f64 = 0;
    let cLen: f64 = 0;
    if (kind == UNALLOCATED) {
      if (host != 0) offset = host;
    } else if (kind == DATA) {
      flags = F_ALLOCATED | F_DATA;
      offset = host;
    } else if (kind == ZERO_PLAIN) {
      flags = F_ALLOCATED | F_ZERO;
    } else if (kind == ZERO_ALLOC) {
      flags = F_ALLOCATED | F_ZERO;
      offset = host;
    } else {
      flags = F_ALLOCATED | F_DATA | F_COMPRESSED;
      cOff = load<f64>(r, 16);
      cLen = load<f64>(r, 24);
    }
    // Version 2 has no zero flag: QEMU fails the read and marks the image corrupt.
    if (v2 && (flags & F_ZERO) != 0) {
      errStart = gs;
      return -2;
    }
    n = pushExt(out, n, maxOut, gs, len, offset, flags, cOff, cLen);
    if (n > maxOut) return -3;
  }
  return <i32>n;
}

@inline
function plainData(flags: u32, offset: f64): bool {
  return (flags & F_DATA) != 0 && (flags & F_COMPRESSED) == 0 && offset >= 0;
}

/**
 * Host ranges of the plain data extents among recs[0..n) (not compressed, with an offset), as f64
 * pairs [offset, min(offset + length, fileSize)) written to `out`; returns how many pairs.
 */
export function recordsDataRanges(recs: usize, n: u32, fileSize: f64, out: usize): u32 {
  let m: u32 = 0;
  for (let i: u32 = 0; i < n; i++) {
    const r = ext(recs, i);
    const offset = load<f64>(r, 16);
    if (!plainData(<u32>load<f64>(r, 24), offset)) continue;
    const p = out + (<usize>m << 4);
    store<f64>(p, offset);
    store<f64>(p, min<f64>(offset + load<f64>(r, 8), fileSize), 8);
    m++;
  }
  return m;
}

/**
 * Splits every plain data extent of recs[0..n) at the host-file holes `probed` lists for it (per
 * extent in order: a count c, then c data pairs [start, end) of host offsets, as the host probe
 * returns them): data parts stay data, the rest becomes "data, zero" (QEMU reports holes inside
 * allocated clusters so). Other extents are copied. Returns the count written to `out`, or -3
 * when out is full.
 */
export function recordsSplitHoles(recs: usize, n: u32, probed: usize, out: usize, maxOut: u32): i32 {
  let m: u32 = 0;
  let at: usize = probed;
  for (let i: u32 = 0; i < n; i++) {
    const r = ext(recs, i);
    const start = load<f64>(r);
    const length = load<f64>(r, 8);
    const offset = load<f64>(r, 16);
    const flags = <u32>load<f64>(r, 24);
    if (!plainData(flags, offset)) {
      m = pushExt(out, m, maxOut, start, length, offset, flags, load<f64>(r, 32), load<f64>(r, 40));
      if (m > maxOut) return -3;
      continue;
    }
    const c = <u32>load<f64>(at);
    at += 8;
    const hostEnd = offset + length;
    let pos = offset;
    for (let j: u32 = 0; j <= c; j++) {
      // Piece j: the hole before data pair j (the last one: the rest of the extent), then the pair.
      const ds = j < c ? load<f64>(at) : hostEnd;
      const de = j < c ? load<f64>(at, 8) : hostEnd;
      if (ds > pos) {
        m = pushExt(out, m, maxOut, start + (pos - offset), ds - pos, pos, F_ALLOCATED | F_DATA | F_ZERO, 0, 0);
        if (m > maxOut) return -3;
      }
      if (de > ds) {
        m = pushExt(out, m, maxOut, start + (ds - offset), de - ds, ds, F_ALLOCATED | F_DATA, 0, 0);
        if (m > maxOut) return -3;
      }
      if (j < c) {
        pos = de;
        at += 16;
      }
    }
  }
  return <i32>m;
}

// --- map records ---------------------------------------------------------------------------------

@inline
function rec(p: usize, i: u32): usize {
  return p + (<usize>i << 5);
}

/**
 * Appends a map record, merging it into the last one as qemu-img map merges (same depth and flags,
 * offsets continuing or both absent; pending ranges when adjacent). maxOut + 1 when full.
 */
function pushMap(out: usize, n: u32, maxOut: u32, start: f64, length: f64, offset: f64, meta: f64): u32 {
  if (length <= 0) return n;
  if (n > 0) {
    const last = rec(out, n - 1);
    const lLength = load<f64>(last, 8);
    const lOffset = load<f64>(last, 16);
    if (load<f64>(last, 24) == meta && load<f64>(last) + lLength == start && (lOffset < 0 ? offset < 0 : offset >= 0 && offset == lOffset + lLength)) {
      store<f64>(last, lLength + length, 8);
      return n;
    }
  }
  if (n >= maxOut) return maxOut + 1;
  const r = rec(out, n);
  store<f64>(r, start);
  store<f64>(r, length, 8);
  store<f64>(r, offset, 16);
  store<f64>(r, meta, 24);
  return n + 1;
}

/**
 * Resolves the pending ranges of cur[0..nCur) (map records in guest order, meta < 0) with layer
 * `depth`'s extents lay[0..nLay) (guest order, covering them): what the layer provides becomes a
 * record at `depth`; what it leaves unallocated stays pending for the next layer where that layer
 * reaches (`belowEnd`: its virtual size, < 0 without a backing file), and past its end reads as
 * zeros reported at `depth`. Writes to `out`; returns the count (-3 when out is full);
 * `mapPendingLeft()` tells how many pending records remain.
 */
export function mapMergeLayer(cur: usize, nCur: u32, lay: usize, nLay: u32, depth: u32, belowEnd: f64, out: usize, maxOut: u32): i32 {
  let n: u32 = 0;
  let pending: u32 = 0;
  let j: u32 = 0;
  const base = <f64>(depth << 3);
  for (let i: u32 = 0; i < nCur; i++) {
    const c = rec(cur, i);
    const s = load<f64>(c);
    const e = s + load<f64>(c, 8);
    const meta = load<f64>(c, 24);
    if (meta >= 0) {
      n = pushMap(out, n, maxOut, s, e - s, load<f64>(c, 16), meta);
      if (n > maxOut) return -3;
      continue;
    }
    while (j < nLay && load<f64>(ext(lay, j)) + load<f64>(ext(lay, j), 8) <= s) j++;
    let k = j;
    for (; k < nLay; k++) {
      const x = ext(lay, k);
      const xs = load<f64>(x);
      if (xs >= e) break;
      const from = max<f64>(s, xs);
      const to = min<f64>(e, xs + load<f64>(x, 8));
      const xo = load<f64>(x, 16);
      const offset = xo < 0 ? -1 : xo + (from - xs);
      const flags = <u32>load<f64>(x, 24);
      if (flags & F_ALLOCATED) {
        n = pushMap(out, n, maxOut, from, to - from, offset, base + <f64>(flags & 7));
        if (n > maxOut) return -3;
        continue;
      }
      const below = belowEnd >= 0 ? max<f64>(from, min<f64>(to, belowEnd)) : from;
      if (below > from) {
        const before = n;
        n = pushMap(out, n, maxOut, from, below - from, -1, -1);
        if (n > maxOut) return -3;
        if (n > before) pending++;
      }
      // Nothing below: reads as zeros, reported at this depth (QEMU: past the backing file's end).
      if (to > below) {
        n = pushMap(out, n, maxOut, below, to - below, offset < 0 ? -1 : offset + (below - from), base + <f64>F_ZERO);
        if (n > maxOut) return -3;
      }
    }
    // The last extent may reach past `e`: the next pending range may start inside it.
    if (k > j) j = k - 1;
  }
  pendingLeft = pending;
  return <i32>n;
}

// --- refcounts -----------------------------------------------------------------------------------

/** Entries in [from, to) of a refcount block (width 1 << order bits) that are not zero. */
export function refcountCountNonZero(block: usize, from: u32, to: u32, refcountOrder: u32): u32 {
  let n: u32 = 0;
  let i = from;
  if (refcountOrder == 4) {
    // The common 16-bit width: eight entries per vector.
    const zero = i16x8.splat(0);
    for (; i < to && (i & 7) != 0; i++) if (getEntry(block, i, 4) != 0) n++;
    for (; i + 8 <= to; i += 8) {
      const nz = v128.not(i16x8.eq(v128.load(block + (<usize>i << 1)), zero));
      n += <u32>popcnt<u32>(i16x8.bitmask(nz));
    }
  }
  for (; i < to; i++) if (getEntry(block, i, refcountOrder) != 0) n++;
  return n;
}
