// Bitmaps in qcow2 bit order: bit n lives in byte n >> 3 at position n & 7 (LSB first), which is
// also bit n & 63 of the little-endian u64 at byte (n >> 6) * 8. Bit positions are f64 from JS.

const OR: i32 = 0;
const AND: i32 = 1;
const AND_NOT: i32 = 2;

// Inlined with a constant op, so each export gets its own branch-free loop.
@inline
function combine(dst: usize, src: usize, n: usize, op: i32): void {
  let i: usize = 0;
  for (; i + 16 <= n; i += 16) {
    const a = v128.load(dst + i);
    const b = v128.load(src + i);
    v128.store(dst + i, op == OR ? v128.or(a, b) : op == AND ? v128.and(a, b) : v128.andnot(a, b));
  }
  for (; i < n; i++) {
    const a = load<u8>(dst + i);
    const b = load<u8>(src + i);
    store<u8>(dst + i, op == OR ? a | b : op == AND ? a & b : a & ~b);
  }
}

export function bitmapOr(dst: usize, src: usize, nBytes: usize): void {
  combine(dst, src, nBytes, OR);
}

export function bitmapAnd(dst: usize, src: usize, nBytes: usize): void {
  combine(dst, src, nBytes, AND);
}

export function bitmapAndNot(dst: usize, src: usize, nBytes: usize): void {
  combine(dst, src, nBytes, AND_NOT);
}

@inline
function sumBytes(v: v128): u64 {
  const s = i32x4.extadd_pairwise_i16x8_u(i16x8.extadd_pairwise_i8x16_u(v));
  return <u64>(<u32>i32x4.extract_lane(s, 0)) + <u64>(<u32>i32x4.extract_lane(s, 1)) +
    <u64>(<u32>i32x4.extract_lane(s, 2)) + <u64>(<u32>i32x4.extract_lane(s, 3));
}

export function popcount(ptr: usize, nBytes: usize): f64 {
  let total: u64 = 0;
  let i: usize = 0;
  const vectorEnd = nBytes & ~15;
  while (i < vectorEnd) {
    // Byte lanes gain at most 8 per vector: flush every 31 vectors, before they can overflow.
    const stop = min<usize>(vectorEnd, i + 31 * 16);
    let acc = i8x16.splat(0);
    for (; i < stop; i += 16) acc = i8x16.add(acc, i8x16.popcnt(v128.load(ptr + i)));
    total += sumBytes(acc);
  }
  for (; i < nBytes; i++) total += <u64>popcnt<u32>(load<u8>(ptr + i));
  return <f64>total;
}

@inline
function maskByte(p: usize, mask: u32, set: bool): void {
  const b = <u32>load<u8>(p);
  store<u8>(p, set ? b | mask : b & ~mask);
}

function fillBits(ptr: usize, start: u64, n: u64, set: bool): void {
  if (n == 0) return;
  const last = start + n - 1;
  const firstByte = <usize>(start >> 3);
  const lastByte = <usize>(last >> 3);
  const head: u32 = (0xFF << <u32>(start & 7)) & 0xFF;
  const tail: u32 = 0xFF >> <u32>(7 - (last & 7));
  if (firstByte == lastByte) {
    maskByte(ptr + firstByte, head & tail, set);
    return;
  }
  maskByte(ptr + firstByte, head, set);
  memory.fill(ptr + firstByte + 1, set ? 0xFF : 0, lastByte - firstByte - 1);
  maskByte(ptr + lastByte, tail, set);
}

export function setBits(ptr: usize, startBit: f64, nBits: f64): void {
  fillBits(ptr, <u64>startBit, <u64>nBits, true);
}

export function clearBits(ptr: usize, startBit: f64, nBits: f64): void {
  fillBits(ptr, <u64>startBit, <u64>nBits, false);
}

/** The u64 at byte offset `at`, zero-padded past `endByte` so we never read beyond the bitmap. */
@inline
function loadWord(ptr: usize, at: usize, endByte: usize): u64 {
  if (at + 8 <= endByte) return load<u64>(ptr + at);
  let w: u64 = 0;
  for (let i: usize = at; i < endByte; i++) w |= <u64>load<u8>(ptr + i) << (<u64>(i - at) << 3);
  return w;
}

/** First bit in [from, end) equal to `want`, or end. */
function findBit(ptr: usize, from: u64, end: u64, want: bool): u64 {
  const endByte = <usize>((end + 7) >> 3);
  const flip: u64 = want ? 0 : u64.MAX_VALUE;
  const flipV = i64x2.splat(<i64>flip);
  let bit = from;
  while (bit < end) {
    const at = <usize>(bit >> 6) << 3;
    const word = (loadWord(ptr, at, endByte) ^ flip) & (u64.MAX_VALUE << (bit & 63));
    if (word) return min<u64>((<u64>at << 3) + ctz<u64>(word), end);
    // Skip uninteresting 16-byte blocks in one go.
    let next = at + 8;
    while (next + 16 <= endByte && !v128.any_true(v128.xor(v128.load(ptr + next), flipV))) next += 16;
    bit = <u64>next << 3;
  }
  return end;
}

let nextBit: u64 = 0;

export function extents(ptr: usize, startBit: f64, endBit: f64, out: usize, maxOut: u32): u32 {
  const end = <u64>endBit;
  let pos = findBit(ptr, <u64>startBit, end, true);
  let n: u32 = 0;
  while (pos < end && n < maxOut) {
    const stop = findBit(ptr, pos, end, false);
    const rec = out + (<usize>n << 4);
    store<f64>(rec, <f64>pos);
    store<f64>(rec, <f64>(stop - pos), 8);
    n++;
    pos = findBit(ptr, stop, end, true);
  }
  nextBit = pos; // end when done: findBit never returns more than end
  return n;
}

export function extentsNext(): f64 {
  return <f64>nextBit;
}

/**
 * Granularity conversion fused with a merge: dst |= src seen at dst's granularity. `shift` is
 * log2(dst granularity / src granularity): > 0, dst is coarser (a dst bit is set when any src
 * bit of its 2^shift is); < 0, dst is finer (every dst bit a src bit covers is set); 0, plain OR.
 * Works run by run over src's set bits (zero stretches are skipped 128 bits at a time), so the
 * cost follows the number of dirty runs, not the size. Results past dstBits are clipped.
 */
export function bitmapConvertOr(dst: usize, dstBits: f64, src: usize, srcBits: f64, shift: i32): void {
  const dEnd = <u64>dstBits;
  const sEnd = <u64>srcBits;
  let pos = findBit(src, 0, sEnd, true);
  while (pos < sEnd) {
    const stop = findBit(src, pos, sEnd, false);
    let a: u64, b: u64;
    if (shift >= 0) {
      a = pos >> <u64>shift;
      b = ((stop - 1) >> <u64>shift) + 1;
    } else {
      a = pos << <u64>(-shift);
      b = stop << <u64>(-shift);
    }
    if (a >= dEnd) break;
    if (b > dEnd) b = dEnd;
    fillBits(dst, a, b - a, true);
    pos = findBit(src, stop, sEnd, true);
  }
}

// --- bitmap tables (qcow2-format.md §8.3): big-endian u64 entries, one per cluster of bitmap data.
// Bits 9..55 are the data cluster's offset; with no offset, bit 0 says "all ones" (else all zeros).
// Reserved bits were checked when the image was opened; here they are ignored.

const TABLE_OFFSET_MASK: u64 = 0x00FFFFFFFFFFFE00;

/** Appends cluster `index` at host byte `host` to the f64 triples (index, count, host) at `runs`. */
@inline
function pushRun(runs: usize, n: u32, index: u32, host: u64, clusterBits: u32, maxRunClusters: u32): u32 {
  if (n > 0) {
    const last = runs + <usize>(n - 1) * 24;
    const lastIndex = <u32>load<f64>(last);
    const lastCount = <u32>load<f64>(last, 8);
    const lastHost = <u64>load<f64>(last, 16);
    if (lastIndex + lastCount == index && lastHost + (<u64>lastCount << clusterBits) == host && lastCount < maxRunClusters) {
      store<f64>(last, <f64>(lastCount + 1), 8);
      return n;
    }
  }
  const rec = runs + <usize>n * 24;
  store<f64>(rec, <f64>index);
  store<f64>(rec, 1.0, 8);
  store<f64>(rec, <f64>host, 16);
  return n + 1;
}

/**
 * Loading a bitmap: for each of the n table entries, the cluster of bitmap data at `data` is
 * filled (all-zero and all-ones entries; nothing is filled when `data` is 0, for callers that
 * only want the data clusters) or its read is planned: entries whose data clusters
 * follow each other on the host coalesce into one run of at most maxRunClusters clusters,
 * written as f64 triples (first table index, clusters, host byte offset) to `runs` (room for n).
 * Returns the number of runs.
 */
export function bitmapTableLoad(table: usize, n: u32, data: usize, clusterBits: u32, maxRunClusters: u32, runs: usize): u32 {
  const cs: usize = <usize>1 << clusterBits;
  let nRuns: u32 = 0;
  for (let i: u32 = 0; i < n; i++) {
    const e = bswap<u64>(load<u64>(table + (<usize>i << 3)));
    const host = e & TABLE_OFFSET_MASK;
    if (host == 0) {
      if (data) memory.fill(data + (<usize>i << clusterBits), e & 1 ? 0xFF : 0, cs);
    } else nRuns = pushRun(runs, nRuns, i, host, clusterBits, maxRunClusters);
  }
  return nRuns;
}

/** 0: every byte is 0; 1: every byte is 0xFF; 2: anything else. */
@inline
function clusterKind(p: usize, size: usize): u8 {
  const first = load<u8>(p);
  if (first != 0 && first != 0xFF) return 2;
  const want = i8x16.splat(<i8>first);
  let i: usize = 0;
  for (; i + 64 <= size; i += 64) {
    const d = v128.or(
      v128.or(v128.xor(v128.load(p + i), want), v128.xor(v128.load(p + i, 16), want)),
      v128.or(v128.xor(v128.load(p + i, 32), want), v128.xor(v128.load(p + i, 48), want)),
    );
    if (v128.any_true(d)) return 2;
  }
  for (; i < size; i++) if (load<u8>(p + i) != first) return 2;
  return first ? 1 : 0;
}

/**
 * Storing a bitmap: kinds[i] (u8) of each of the n clusters of bitmap data: 0 all zeros, 1 all
 * ones, 2 mixed (needs a data cluster). Returns the number of mixed clusters.
 */
export function bitmapClusterKinds(data: usize, n: u32, clusterBits: u32, kinds: usize): u32 {
  const cs: usize = <usize>1 << clusterBits;
  let mixed: u32 = 0;
  for (let i: u32 = 0; i < n; i++) {
    const kind = clusterKind(data + (<usize>i << clusterBits), cs);
    store<u8>(kinds + i, kind);
    if (kind == 2) mixed++;
  }
  return mixed;
}

/**
 * Storing a bitmap: the table for kinds[0..n) (bitmapClusterKinds), the mixed clusters taking
 * the host clusters of `hosts` (f64 pairs: first cluster, count) in order. Writes the n
 * big-endian entries to `table` (0, the all-ones form 1, or the data cluster's offset) and the
 * writes to make as f64 triples (first table index, clusters, host byte offset) to `writes`
 * (room for the number of mixed clusters), coalesced up to maxRunClusters. Returns the number of
 * writes, or -1 when `hosts` holds fewer clusters than there are mixed ones.
 */
export function bitmapTableBuild(kinds: usize, n: u32, clusterBits: u32, hosts: usize, nHosts: u32, maxRunClusters: u32, table: usize, writes: usize): i32 {
  let nWrites: u32 = 0;
  let h: u32 = 0; // current host run
  let used: u64 = 0; // clusters of it taken
  for (let i: u32 = 0; i < n; i++) {
    const kind = load<u8>(kinds + i);
    let e: u64 = <u64>kind; // 0: zeros, 1: all ones
    if (kind == 2) {
      while (h < nHosts && used >= <u64>load<f64>(hosts + (<usize>h << 4), 8)) {
        h++;
        used = 0;
      }
      if (h >= nHosts) return -1;
      const host = (<u64>load<f64>(hosts + (<usize>h << 4)) + used) << clusterBits;
      used++;
      e = host;
      nWrites = pushRun(writes, nWrites, i, host, clusterBits, maxRunClusters);
    }
    store<u64>(table + (<usize>i << 3), bswap<u64>(e));
  }
  return <i32>nWrites;
}
