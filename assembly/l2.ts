// L2 table scanning and reference accounting (contract: src/kernels/api.ts).
// Entries are big-endian u64 words; run records and stats are little-endian outputs.

// RunKind / InvalidReason / L2Stat values, mirrored from api.ts.
export const UNALLOCATED: u32 = 0;
export const DATA: u32 = 1;
export const ZERO_PLAIN: u32 = 2;
export const ZERO_ALLOC: u32 = 3;
export const COMPRESSED: u32 = 4;
export const INVALID: u32 = 5;

const R_RESERVED: u32 = 1;
const R_UNALIGNED: u32 = 2;
const R_TOO_LARGE: u32 = 3;
const R_ALLOC_AND_ZERO: u32 = 4;
const R_NO_HOST: u32 = 5;
const R_COMPRESSED_BITMAP: u32 = 6;

const COMPRESSED_BIT: u64 = 0x4000000000000000;
const HOST_MASK: u64 = 0x00FFFFFFFFFFFE00;
const RESERVED_STD: u64 = 0x3F000000000001FE;
const MAX_OFFSET: u64 = 0x20000000000000; // 2^53: offsets must survive the trip through f64
const SUBCLUSTERS: u32 = 32;

// Side outputs of classify() (globals instead of objects: the runtime is "stub").
let cHost: u64 = 0; // host offset; compressed: byte offset of the stream
let cExtra: u64 = 0; // compressed: byte length
let cReason: u32 = 0;

function invalid(reason: u32): u32 {
  cReason = reason;
  return INVALID;
}

/**
 * Entry-level kind of one L2 entry. With extended L2 a valid standard entry yields DATA when it
 * has a host cluster and UNALLOCATED otherwise; the subcluster bitmap refines it later.
 */
@inline
function classify(word: u64, bitmap: u64, extended: bool, clusterBits: u32): u32 {
  cReason = 0;
  cExtra = 0;
  if (word & COMPRESSED_BIT) {
    const x = <u64>(62 - (clusterBits - 8));
    const off = word & ((<u64>1 << x) - 1);
    const sectors = (word >> x) & ((<u64>1 << <u64>(clusterBits - 8)) - 1);
    cHost = off;
    cExtra = (sectors + 1) * 512 - (off & 511);
    if (extended && bitmap != 0) return invalid(R_COMPRESSED_BITMAP);
    if (off >= MAX_OFFSET) return invalid(R_TOO_LARGE);
    return COMPRESSED;
  }
  const host = word & HOST_MASK;
  cHost = host;
  // With extended L2, bit 0 is reserved instead of being the zero flag.
  if (word & (extended ? RESERVED_STD | 1 : RESERVED_STD)) return invalid(R_RESERVED);
  if (host != 0) {
    if (host & ((<u64>1 << <u64>clusterBits) - 1)) return invalid(R_UNALIGNED);
    if (host >= MAX_OFFSET) return invalid(R_TOO_LARGE);
  }
  if (extended) {
    const alloc = bitmap & 0xFFFFFFFF;
    if (alloc & (bitmap >> 32)) return invalid(R_ALLOC_AND_ZERO);
    if (alloc != 0 && host == 0) return invalid(R_NO_HOST);
  } else if (word & 1) {
    return host ? ZERO_ALLOC : ZERO_PLAIN;
  }
  return host ? DATA : UNALLOCATED;
}

/** Kind of subcluster i of a valid extended entry whose host offset is `host`. */
@inline
function subKind(bitmap: u64, i: u32, host: u64): u32 {
  if ((bitmap >> <u64>i) & 1) return DATA;
  if ((bitmap >> <u64>(i + 32)) & 1) return host ? ZERO_ALLOC : ZERO_PLAIN;
  return UNALLOCATED;
}

// --- run writer ----------------------------------------------------------------------------------

let runOut: usize = 0;
let runMax: u32 = 0;
let runN: u32 = 0;
let consumed: u32 = 0;

@inline
function record(i: u32): usize {
  return runOut + (<usize>i << 5);
}

/** Appends units to the last run when mergeable, else opens a run; false when `out` is full. */
function emit(unit: u32, count: u32, kind: u32, reason: u32, host: u64, unitSize: u64, extra: u64): bool {
  if (kind < COMPRESSED && runN > 0) {
    const last = record(runN - 1);
    // For valid kinds `reason` carries the COPIED flag: runs never mix COPIED and shared entries.
    if (load<u32>(last, 8) == kind && load<u32>(last, 12) == reason) {
      const lastCount = load<u32>(last, 4);
      const lastHost = <u64>load<f64>(last, 16);
      const contiguous = host == 0 ? lastHost == 0 : lastHost != 0 && host == lastHost + <u64>lastCount * unitSize;
      if (contiguous) {
        store<u32>(last, lastCount + count, 4);
        return true;
      }
    }
  }
  if (runN >= runMax) return false;
  const r = record(runN++);
  store<u32>(r, unit);
  store<u32>(r, count, 4);
  store<u32>(r, kind, 8);
  store<u32>(r, reason, 12);
  store<f64>(r, <f64>host, 16);
  store<f64>(r, <f64>extra, 24);
  return true;
}

/** Emits the runs of one entry; false when `out` filled up part-way. */
function scanEntry(index: u32, word: u64, bitmap: u64, extended: bool, clusterBits: u32): bool {
  const kind = classify(word, bitmap, extended, clusterBits);
  const reason = kind == INVALID ? cReason : <u32>(word >> 63);
  if (!extended) return emit(index, 1, kind, reason, cHost, <u64>1 << <u64>clusterBits, cExtra);
  const first = index * SUBCLUSTERS;
  if (kind >= COMPRESSED) return emit(first, SUBCLUSTERS, kind, reason, cHost, 0, cExtra);
  const host = cHost;
  const sub = <u64>1 << <u64>(clusterBits - 5);
  let i: u32 = 0;
  while (i < SUBCLUSTERS) {
    // Group equal neighbours: they are contiguous by construction.
    const k = subKind(bitmap, i, host);
    let j = i + 1;
    while (j < SUBCLUSTERS && subKind(bitmap, j, host) == k) j++;
    if (!emit(first + i, j - i, k, reason, host ? host + <u64>i * sub : 0, sub, 0)) return false;
    i = j;
  }
  return true;
}

/** Big-endian u64 at p: one byte shuffle instead of the shift/mask chain that bswap<u64> expands to. */
@inline
function loadBE(p: usize): u64 {
  const v = v128.load64_zero(p);
  return <u64>i64x2.extract_lane(i8x16.shuffle(v, v, 7, 6, 5, 4, 3, 2, 1, 0, 8, 9, 10, 11, 12, 13, 14, 15), 0);
}

@inline
function entryPtr(table: usize, index: u32, extended: bool): usize {
  return table + (<usize>index << (extended ? 4 : 3));
}

@inline
function bitmapWord(p: usize, extended: bool): u64 {
  return extended ? loadBE(p + 8) : 0;
}

export function l2Scan(table: usize, firstEntry: u32, entryCount: u32, extended: bool, clusterBits: u32, out: usize, maxRuns: u32): u32 {
  runOut = out;
  runMax = maxRuns;
  runN = 0;
  const cs = <u64>1 << <u64>clusterBits;
  let i: u32 = 0;
  while (i < entryCount) {
    const index = firstEntry + i;
    const p = entryPtr(table, index, extended);
    const word = loadBE(p);
    // Roll back a partially emitted entry so `consumed` stays exact.
    const savedN = runN;
    const savedCount = savedN ? load<u32>(record(savedN - 1), 4) : 0;
    if (!scanEntry(index, word, bitmapWord(p, extended), extended, clusterBits)) {
      runN = savedN;
      if (savedN) store<u32>(record(savedN - 1), savedCount, 4);
      break;
    }
    i++;
    if (!extended) i += extendRun(table, firstEntry + i, entryCount - i, word, cs);
  }
  consumed = i;
  return runN;
}

/**
 * Fast path for standard L2: counts the following entries that merely continue the last run
 * (the same word for unallocated/zero, the next host cluster for data/zero-alloc) and adds them
 * to it without classifying each one. Typical tables are a few long runs.
 */
function extendRun(table: usize, index: u32, remaining: u32, word: u64, cs: u64): u32 {
  const last = record(runN - 1);
  const kind = load<u32>(last, 8);
  if (kind >= COMPRESSED) return 0;
  const step: u64 = kind == DATA || kind == ZERO_ALLOC ? cs : 0;
  let expect = word + step;
  // The expected word must stay a valid entry of the same kind: its host offset below 2^53 (so
  // nothing carries out of the host field either). `word` itself is valid (classified above).
  let limit = remaining;
  if (step != 0) {
    const host = expect & HOST_MASK;
    if (((expect ^ word) & ~HOST_MASK) != 0 || host >= MAX_OFFSET) return 0;
    const room = (MAX_OFFSET - host + step - 1) / step;
    if (room < <u64>limit) limit = <u32>room;
  }
  const p = entryPtr(table, index, false);
  let n: u32 = 0;
  // Four entries per step: two byte-swapped vector compares against the expected words.
  let e = i64x2.replace_lane(i64x2.splat(expect), 1, expect + step);
  const inc2 = i64x2.splat(step * 2);
  const inc4 = i64x2.splat(step * 4);
  while (n + 4 <= limit) {
    const a = v128.load(p + (<usize>n << 3));
    const b = v128.load(p + (<usize>n << 3), 16);
    const ea = i64x2.eq(i8x16.shuffle(a, a, 7, 6, 5, 4, 3, 2, 1, 0, 15, 14, 13, 12, 11, 10, 9, 8), e);
    const eb = i64x2.eq(i8x16.shuffle(b, b, 7, 6, 5, 4, 3, 2, 1, 0, 15, 14, 13, 12, 11, 10, 9, 8), i64x2.add(e, inc2));
    if (!i64x2.all_true(v128.and(ea, eb))) break;
    e = i64x2.add(e, inc4);
    n += 4;
  }
  expect = i64x2.extract_lane(e, 0);
  while (n < limit && loadBE(p + (<usize>n << 3)) == expect) {
    n++;
    expect += step;
  }
  if (n) store<u32>(last, load<u32>(last, 4) + n, 4);
  return n;
}

export function scanConsumed(): u32 {
  return consumed;
}

// --- reference accounting ------------------------------------------------------------------------

let outOfRange: u32 = 0;

@inline
function bump(refs: usize, nClusters: u32, cluster: u64): void {
  if (cluster >= <u64>nClusters) {
    outOfRange++;
    return;
  }
  const p = refs + (<usize>cluster << 2);
  const v = load<u32>(p);
  if (v != u32.MAX_VALUE) store<u32>(p, v + 1);
}

export function l2AccountRefs(table: usize, entryCount: u32, extended: bool, clusterBits: u32, refs: usize, nClusters: u32, stats: usize): void {
  const cs = <u64>1 << <u64>clusterBits;
  let allocated: u32 = 0;
  let compressed: u32 = 0;
  let fragmented: u32 = 0;
  let invalidCount: u32 = 0;
  let next: u64 = 0; // QEMU's next_contiguous_offset
  outOfRange = 0;
  for (let i: u32 = 0; i < entryCount; i++) {
    const p = entryPtr(table, i, extended);
    // Sparse tables are mostly empty entries: skip 16 zero bytes (1 or 2 entries) at a time.
    if ((extended || i + 1 < entryCount) && !v128.any_true(v128.load(p))) {
      if (!extended) i++;
      continue;
    }
    const kind = classify(loadBE(p), bitmapWord(p, extended), extended, clusterBits);
    if (kind == INVALID) {
      invalidCount++;
    } else if (kind == COMPRESSED) {
      allocated++;
      compressed++;
      fragmented++; // compressed clusters are fragmented by nature (QEMU)
      const last = (cHost + cExtra - 1) >> <u64>clusterBits;
      for (let c = cHost >> <u64>clusterBits; c <= last; c++) bump(refs, nClusters, c);
    } else if (kind == DATA || kind == ZERO_ALLOC) {
      allocated++;
      if (next != 0 && cHost != next) fragmented++;
      next = cHost + cs;
      bump(refs, nClusters, cHost >> <u64>clusterBits);
    }
  }
  store<f64>(stats, <f64>allocated);
  store<f64>(stats, <f64>compressed, 8);
  store<f64>(stats, <f64>fragmented, 16);
  store<f64>(stats, <f64>invalidCount, 24);
  store<f64>(stats, <f64>outOfRange, 32);
  store<f64>(stats, 0, 40);
  store<f64>(stats, 0, 48);
  store<f64>(stats, 0, 56);
}

// --- COPIED flag audit ----------------------------------------------------------------------------

/**
 * Lists the entries whose COPIED flag disagrees with their cluster's stored refcount
 * (refs: u32 per host cluster; COPIED must be set exactly when it is 1). Compressed entries and
 * entries without a host cluster are skipped, as are clusters whose refcount equals `skipValue`
 * (unreadable). An entry whose cluster is >= nRefs is listed as (index | 0x80000000) for the
 * caller's slow path. Returns the number of indices written to `out` (room for entryCount).
 */
export function l2CopiedMismatches(table: usize, entryCount: u32, extended: bool, clusterBits: u32, refs: usize, nRefs: u32, skipValue: u32, out: usize): u32 {
  let n: u32 = 0;
  const shift = extended ? 4 : 3;
  for (let j: u32 = 0; j < entryCount; j++) {
    const p = table + (<usize>j << shift);
    // Skip 16 zero bytes (1 or 2 entries) at a time: sparse tables are mostly empty.
    if ((extended || j + 1 < entryCount) && !v128.any_true(v128.load(p))) {
      if (!extended) j++;
      continue;
    }
    const word = loadBE(p);
    const host = word & HOST_MASK;
    if (host == 0 || word & COMPRESSED_BIT) continue;
    const cluster = host >> <u64>clusterBits;
    if (cluster >= <u64>nRefs) {
      store<u32>(out + (<usize>n << 2), j | 0x80000000);
      n++;
      continue;
    }
    const r = load<u32>(refs + (<usize>cluster << 2));
    if (r == skipValue) continue;
    if ((r == 1) != ((word >> 63) != 0)) {
      store<u32>(out + (<usize>n << 2), j);
      n++;
    }
  }
  return n;
}

/**
 * Writes entries [first, first+count) of an L2 table: entry i gets host + i*step (0 stays 0) with
 * flag bits flagsHi (upper word: COPIED) and flagsLo (lower word: the zero flag); with extended L2
 * the bitmap word becomes (zeroMask << 32) | allocMask.
 */
export function l2Fill(table: usize, first: u32, count: u32, extended: bool, host: f64, step: f64, flagsHi: u32, flagsLo: u32, allocMask: u32, zeroMask: u32): void {
  let h = <u64>host;
  const st = <u64>step;
  const flags = (<u64>flagsHi << 32) | <u64>flagsLo;
  const bitmap = (<u64>zeroMask << 32) | <u64>allocMask;
  for (let i: u32 = 0; i < count; i++) {
    const p = entryPtr(table, first + i, extended);
    store<u64>(p, bswap<u64>(h | flags));
    if (extended) store<u64>(p + 8, bswap<u64>(bitmap));
    if (h) h += st;
  }
}
