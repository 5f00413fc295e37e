// Refcount arrays (computed u32 counts) and qcow2 refcount blocks (width 1 << order bits).
// Widths >= 8 are big-endian integers; narrower widths pack the lowest entry in the low bits.

@inline
function sat1(v: u32): u32 {
  return v == u32.MAX_VALUE ? v : v + 1;
}

/** refs[c] += 1 over [first, first+count) clipped to nClusters; returns the clipped-off count. */
export function refsAddRange(refs: usize, nClusters: u32, firstCluster: f64, count: f64): f64 {
  const first = <u64>firstCluster;
  const end = first + <u64>count;
  const limit = <u64>nClusters;
  const inEnd = min<u64>(end, limit);
  let p = refs + (<usize>min<u64>(first, limit) << 2);
  const stop = refs + (<usize>inEnd << 2);
  const one = i32x4.splat(1);
  const all = i32x4.splat(-1);
  // Saturating +1: a lane at u32 max wraps to 0, and OR-ing the "was max" mask restores it.
  for (; p + 16 <= stop; p += 16) {
    const v = v128.load(p);
    v128.store(p, v128.or(i32x4.add(v, one), i32x4.eq(v, all)));
  }
  for (; p < stop; p += 4) store<u32>(p, sat1(load<u32>(p)));
  const outStart = max<u64>(first, limit);
  return end > outStart ? <f64>(end - outStart) : 0;
}

export function getEntry(block: usize, index: u32, order: u32): u64 {
  if (order >= 3) {
    const p = block + (<usize>index << (order - 3));
    if (order == 3) return load<u8>(p);
    if (order == 4) return bswap<u16>(load<u16>(p));
    if (order == 5) return bswap<u32>(load<u32>(p));
    return bswap<u64>(load<u64>(p));
  }
  const bit = index << order;
  const mask: u32 = (1 << (1 << order)) - 1;
  return (<u32>load<u8>(block + (bit >> 3)) >> (bit & 7)) & mask;
}

function setEntry(block: usize, index: u32, order: u32, value: u64): void {
  if (order >= 3) {
    const p = block + (<usize>index << (order - 3));
    if (order == 3) store<u8>(p, <u8>value);
    else if (order == 4) store<u16>(p, bswap<u16>(<u16>value));
    else if (order == 5) store<u32>(p, bswap<u32>(<u32>value));
    else store<u64>(p, bswap<u64>(value));
    return;
  }
  const bit = index << order;
  const shift = bit & 7;
  const mask: u32 = ((1 << (1 << order)) - 1) << shift;
  const p = block + (bit >> 3);
  store<u8>(p, (<u32>load<u8>(p) & ~mask) | ((<u32>value << shift) & mask));
}

export function refcountGet(block: usize, index: u32, refcountOrder: u32): f64 {
  return <f64>getEntry(block, index, refcountOrder);
}

export function refcountSet(block: usize, index: u32, refcountOrder: u32, value: f64): void {
  setEntry(block, index, refcountOrder, <u64>value);
}

/** Scalar comparison of entries [from, to); records mismatch indices after the first `found`. */
function compareRange(refs: usize, block: usize, order: u32, from: u32, to: u32, out: usize, maxOut: u32, found: u32): u32 {
  for (let i = from; i < to; i++) {
    if (getEntry(block, i, order) != <u64>load<u32>(refs + (<usize>i << 2))) {
      if (found < maxOut) store<u32>(out + (<usize>found << 2), i);
      found++;
    }
  }
  return found;
}

/** True when 8 big-endian u16 entries equal 8 u32 counts (the common 16-bit layout). */
@inline
function equal16x8(block: usize, refs: usize): bool {
  const be = v128.load(block);
  const le = i8x16.shuffle(be, be, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  const lo = i32x4.eq(i32x4.extend_low_i16x8_u(le), v128.load(refs));
  const hi = i32x4.eq(i32x4.extend_high_i16x8_u(le), v128.load(refs, 16));
  return i32x4.all_true(v128.and(lo, hi));
}

export function refcountCompare(refs: usize, firstCluster: u32, count: u32, block: usize, refcountOrder: u32, out: usize, maxOut: u32): u32 {
  const r = refs + (<usize>firstCluster << 2);
  let found: u32 = 0;
  let i: u32 = 0;
  if (refcountOrder == 4) {
    for (; i + 8 <= count; i += 8) {
      if (!equal16x8(block + (<usize>i << 1), r + (<usize>i << 2))) {
        found = compareRange(r, block, 4, i, i + 8, out, maxOut, found);
      }
    }
  }
  return compareRange(r, block, refcountOrder, i, count, out, maxOut, found);
}

/**
 * Adds delta to entries [first, first+count) of a refcount block. Nothing changes when any entry
 * would leave [0, maxValue]: the index of the first such entry is returned, else -1.
 */
export function refcountAddRange(block: usize, first: u32, count: u32, refcountOrder: u32, delta: f64, maxValue: f64): i32 {
  const end = first + count;
  const d = <i64>delta;
  const max = <i64>maxValue;
  for (let i = first; i < end; i++) {
    const v = <i64>getEntry(block, i, refcountOrder) + d;
    if (v < 0 || v > max) return <i32>i;
  }
  for (let i = first; i < end; i++) setEntry(block, i, refcountOrder, <u64>(<i64>getEntry(block, i, refcountOrder) + d));
  return -1;
}

/** First index in [from, to) whose entry is zero (wantZero) or non-zero (!wantZero); `to` when none. */
export function refcountFind(block: usize, from: u32, to: u32, refcountOrder: u32, wantZero: bool): u32 {
  let i = from;
  if (refcountOrder >= 3) {
    // Whole zero 16-byte groups decide 128 / width entries at once.
    const perVec: u32 = 128 >> refcountOrder;
    while (i < to && i % perVec != 0) {
      if ((getEntry(block, i, refcountOrder) == 0) == wantZero) return i;
      i++;
    }
    for (; i + perVec <= to; i += perVec) {
      const allZero = !v128.any_true(v128.load(block + (<usize>i << (refcountOrder - 3))));
      if (allZero == wantZero) break; // the answer is inside this group (or starts it)
      if (!wantZero) continue; // all zero: no non-zero here
      // wantZero and not all zero: check entries one by one
      for (let j = i; j < i + perVec; j++) if (getEntry(block, j, refcountOrder) == 0) return j;
    }
  }
  for (; i < to; i++) if ((getEntry(block, i, refcountOrder) == 0) == wantZero) return i;
  return to;
}
