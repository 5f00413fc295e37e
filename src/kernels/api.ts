/**
 * Contract of the WebAssembly kernels (assembly/) as seen from TypeScript.
 * Every pointer is a byte offset into the kernels' wasm memory; buffers come from `Kernels.alloc`.
 * All multi-byte qcow2 data inside buffers is big-endian as on disk; kernel *outputs* are
 * little-endian records meant to be read through Uint32Array / Float64Array views.
 */

/** Kinds of guest units (clusters, or subclusters with extended L2) as the L2 scan reports them. */
export const enum RunKind {
  Unallocated = 0, // reads from backing (host offset may be non-zero: unallocated subcluster in an allocated cluster)
  Data = 1, // host data at hostOffset
  ZeroPlain = 2, // reads as zero, no host cluster
  ZeroAlloc = 3, // reads as zero, host cluster reserved at hostOffset
  Compressed = 4, // compressed cluster: hostOffset = byte offset of compressed stream, extra = byte length
  Invalid = 5, // entry violates the spec: reason in the record's `reason` field
}

/** Why an L2 entry was reported Invalid. */
export const enum InvalidReason {
  ReservedBits = 1, // reserved bits set (standard entry mask 0x3F000000000001FE, or bit 0 with extended L2)
  Unaligned = 2, // host offset not cluster aligned (data / zero-alloc)
  OffsetTooLarge = 3, // host offset >= 2^53 (cannot be addressed here)
  SubclusterAllocAndZero = 4, // extended L2: a subcluster both allocated and zero
  SubclusterNoHost = 5, // extended L2: allocation bits set but host offset 0
  CompressedBitmap = 6, // extended L2: compressed entry with non-zero bitmap word
}

/**
 * One L2 run record = 32 bytes: u32[0] firstUnit, u32[1] unitCount, u32[2] kind (RunKind),
 * u32[3] reason (Invalid: InvalidReason; otherwise the entry's COPIED flag, 1 or 0), f64[2]
 * hostOffset, f64[3] extra.
 * A unit is a cluster (standard L2) or a subcluster (extended L2, cs/32 bytes).
 * Consecutive units merge into one run when kind matches and host offsets are contiguous
 * (or both 0) and the COPIED flag is the same. Compressed and Invalid records are never merged
 * (one per entry).
 */
export const L2_RUN_BYTES = 32;

/** Stats block written by `l2AccountRefs` = 8 f64 values, in this order. */
export const enum L2Stat {
  Allocated = 0, // data + zero-alloc + compressed entries (QEMU's allocated_clusters)
  Compressed = 1,
  Fragmented = 2, // QEMU rule: data/zero-alloc entry whose offset != previous one + cs (within this table), plus every compressed entry
  Invalid = 3, // entries the scan would report Invalid (not counted as references)
  OutOfRange = 4, // references to clusters >= nClusters (not counted)
}

/**
 * One map entry record for the map JSON writer = 32 bytes, four f64: start, length, host offset
 * (negative: none), depth * 8 + flags (1 present, 2 zero, 4 data: chain.ts's MAP_* bits).
 */
export const MAP_ENTRY_BYTES = 32;
/** Most bytes the JSON writer produces per record (",\n" + one entry with 16-digit numbers). */
export const MAP_JSON_MAX_ENTRY_BYTES = 192;
/** `meta` of a map record whose range is still to be resolved by a lower layer (mapMergeLayer). */
export const MAP_PENDING = -1;

/**
 * One layer extent record (a LayerExtent as numbers) = 48 bytes, six f64: start, length, host
 * offset (negative: none), flags (ExtentFlag bits), compressed offset, compressed length (both 0
 * unless Compressed).
 */
export const LAYER_EXTENT_BYTES = 48;

/** Bits of a layer extent record's flags (the low three are also the map record flags). */
export const enum ExtentFlag {
  Allocated = 1,
  Zero = 2,
  Data = 4,
  Compressed = 8,
}

/** Negative results of the status kernels. */
export const enum StatusError {
  InvalidRun = -1, // l2Records: run statusErrorRun() is Invalid
  V2Zero = -2, // l2Records: zero cluster in a version 2 image at guest byte statusErrorStart()
  Full = -3, // the output buffer is full
}

export interface Kernels {
  readonly memory: WebAssembly.Memory;
  /** Allocates `size` bytes (16-byte aligned) in wasm memory; contents unspecified. */
  alloc(size: number): number;
  /** Allocates and zero-fills. */
  allocZeroed(size: number): number;
  free(ptr: number): void;
  /** Grows memory ahead of a batch so no view is detached mid-batch. */
  reserve(bytes: number): void;
  /** A fresh view (views are invalidated when memory grows: never keep one across an alloc). */
  u8(ptr: number, length: number): Uint8Array;

  // --- L2 tables -------------------------------------------------------------------------------
  /**
   * Scans entries [firstEntry, firstEntry+entryCount) of the L2 table at `table` into run records
   * at `out` (at most maxRuns). Returns the number of runs written; `scanConsumed()` then tells how
   * many entries were fully consumed (less than entryCount only when `out` filled up).
   */
  l2Scan(table: number, firstEntry: number, entryCount: number, extended: boolean, clusterBits: number, out: number, maxRuns: number): number;
  scanConsumed(): number;
  /**
   * Adds +1 to refs[hostCluster] (u32 array of nClusters, saturating) for every host cluster the
   * table's entries reference (data, zero-alloc: its cluster; compressed: every cluster its byte
   * range touches) and writes L2Stat values to `stats` (8 f64, overwritten).
   */
  l2AccountRefs(table: number, entryCount: number, extended: boolean, clusterBits: number, refs: number, nClusters: number, stats: number): void;
  /**
   * COPIED audit of an active L2 table: writes to `out` (u32, room for entryCount) the index of
   * every entry with a host cluster (not compressed) whose COPIED flag disagrees with
   * refs[cluster] == 1 (refs: stored refcounts, u32); clusters >= nRefs are listed as
   * (index | 0x80000000); clusters whose refcount equals skipValue are ignored. Returns the count.
   */
  l2CopiedMismatches(table: number, entryCount: number, extended: boolean, clusterBits: number, refs: number, nRefs: number, skipValue: number, out: number): number;

  /**
   * Writes entries [first, first+count) of an L2 table: entry i = (host + i*step, or 0 when host is
   * 0) | flagsHi << 32 | flagsLo; extended L2 also gets the bitmap word (zeroMask << 32) | allocMask.
   */
  l2Fill(table: number, first: number, count: number, extended: boolean, host: number, step: number, flagsHi: number, flagsLo: number, allocMask: number, zeroMask: number): void;

  // --- refcounts ------------------------------------------------------------------------------
  /** refs[c] += 1 for c in [firstCluster, firstCluster+count) (saturating); returns how many were >= nClusters. */
  refsAddRange(refs: number, nClusters: number, firstCluster: number, count: number): number;
  /**
   * Compares computed refs[firstCluster + i] (u32) with entry i of the refcount block at `block`
   * (width 1 << refcountOrder bits, packing as qcow2) for i < count. Writes the indices i (u32) of
   * the first maxOut mismatches to `out`; returns the total number of mismatches.
   */
  refcountCompare(refs: number, firstCluster: number, count: number, block: number, refcountOrder: number, out: number, maxOut: number): number;
  /** Entry `index` of a refcount block of the given order (as a double; exact below 2^53). */
  refcountGet(block: number, index: number, refcountOrder: number): number;
  /** Sets entry `index` of a refcount block (value must fit the width). */
  refcountSet(block: number, index: number, refcountOrder: number, value: number): void;
  /**
   * Adds `delta` to entries [first, first+count) of a refcount block; when any entry would leave
   * [0, maxValue] nothing changes and that entry's index is returned, else -1.
   */
  refcountAddRange(block: number, first: number, count: number, refcountOrder: number, delta: number, maxValue: number): number;
  /** First index in [from, to) whose entry is zero (wantZero) or non-zero; `to` when none. */
  refcountFind(block: number, from: number, to: number, refcountOrder: number, wantZero: boolean): number;

  // --- bitmaps (qcow2 bit order: bit n in byte n>>3 at position n&7, LSB first) -------------------
  bitmapOr(dst: number, src: number, nBytes: number): void;
  bitmapAnd(dst: number, src: number, nBytes: number): void;
  bitmapAndNot(dst: number, src: number, nBytes: number): void; // dst &= ~src
  popcount(ptr: number, nBytes: number): number;
  setBits(ptr: number, startBit: number, nBits: number): void;
  clearBits(ptr: number, startBit: number, nBits: number): void;
  /**
   * Extents of set bits in [startBit, endBit): writes f64 pairs (start, length) to `out`, at most
   * maxOut pairs; returns the count. When full, `extentsNext()` is the bit to resume from
   * (endBit when done).
   */
  extents(ptr: number, startBit: number, endBit: number, out: number, maxOut: number): number;
  extentsNext(): number;
  /**
   * dst |= src converted to dst's granularity; shift = log2(dst granularity / src granularity).
   * Coarser dst (shift > 0): a dst bit is set when any src bit it covers is set. Finer dst
   * (shift < 0): every dst bit inside a set src bit is set. Bits at or past dstBits are untouched.
   */
  bitmapConvertOr(dst: number, dstBits: number, src: number, srcBits: number, shift: number): void;
  /**
   * Loading a bitmap from its table (n big-endian entries at `table`): the all-zero and all-ones
   * clusters of the data at `data` are filled (nothing when `data` is 0), the reads of the others planned as f64 triples
   * (first table index, clusters, host byte offset) at `runs` (room for n), host-contiguous
   * clusters coalesced up to maxRunClusters. Returns the number of runs.
   */
  bitmapTableLoad(table: number, n: number, data: number, clusterBits: number, maxRunClusters: number, runs: number): number;
  /** kinds[i] (u8) of the n data clusters at `data`: 0 all zeros, 1 all ones, 2 mixed; returns the mixed count. */
  bitmapClusterKinds(data: number, n: number, clusterBits: number, kinds: number): number;
  /**
   * The table of a bitmap to store: entries 0 / 1 (all ones) / the host offset of the next cluster
   * of `hosts` (f64 pairs: first cluster, count) for mixed clusters, big-endian at `table`; the
   * writes as f64 triples (first table index, clusters, host byte offset) at `writes` (room for
   * the mixed count), coalesced up to maxRunClusters. Returns the write count, -1 if hosts run out.
   */
  bitmapTableBuild(kinds: number, n: number, clusterBits: number, hosts: number, nHosts: number, maxRunClusters: number, table: number, writes: number): number;

  // --- zero detection and comparison -----------------------------------------------------------
  isZero(ptr: number, nBytes: number): boolean;
  /** Index of the first non-zero byte, or -1. */
  firstNonZero(ptr: number, nBytes: number): number;
  /** Index of the first byte where a and b differ, or -1. */
  firstDifference(a: number, b: number, nBytes: number): number;
  /** Sets bit i of `outBitmap` (cleared first) when block i (1 << blockBits bytes) of ptr is all zero; nBytes is a multiple of the block. */
  zeroBlocks(ptr: number, nBytes: number, blockBits: number, outBitmap: number): void;

  // --- map JSON text ------------------------------------------------------------------------------
  /** Starts a new map: forgets the pending entry and the entry count. */
  mapJsonReset(): void;
  /**
   * Merges `n` map entry records (MAP_ENTRY_BYTES each) as qemu-img map merges entries and writes
   * the `--output=json` text of every finished entry to `out` (room: n * MAP_JSON_MAX_ENTRY_BYTES);
   * returns the bytes written. The last entry stays pending for the next call.
   */
  mapJsonFeed(entries: number, n: number, out: number): number;
  /** Writes the pending entry and "]\n" (room: 2 * MAP_JSON_MAX_ENTRY_BYTES); 0 when nothing was fed. */
  mapJsonFinish(out: number): number;
  /** Sets bit i of `outBitmap` when block i of a differs from block i of b (clears it when equal); bits past the last block are kept. */
  diffBlocks(a: number, b: number, nBytes: number, blockBits: number, outBitmap: number): void;

  // --- block status records (map) ----------------------------------------------------------------
  /**
   * Turns `nRuns` l2Scan run records (unit = 1 << unitBits bytes; the table's first unit at guest
   * byte `tableStart`) into layer extent records clipped to [clipStart, clipEnd), appended to
   * out[0..nOut) (room: maxOut) and merged as LayerExtents merge (never compressed ones). Returns
   * the new count, or a StatusError: InvalidRun, V2Zero (`v2`: a zero cluster in a version 2
   * image), Full.
   */
  l2Records(runs: number, nRuns: number, unitBits: number, tableStart: number, clipStart: number, clipEnd: number, v2: boolean, out: number, nOut: number, maxOut: number): number;
  /** The run index of the last InvalidRun error of l2Records. */
  statusErrorRun(): number;
  /** The guest byte of the last V2Zero error of l2Records. */
  statusErrorStart(): number;
  /**
   * Writes f64 pairs [offset, min(offset + length, fileSize)) for the plain data extents (data with
   * an offset, not compressed) among n layer extent records to `out`; returns the pair count.
   */
  recordsDataRanges(recs: number, n: number, fileSize: number, out: number): number;
  /**
   * Splits each plain data extent of n records at the host-file holes listed in `probed` (f64, per
   * plain data extent in order: a count c and c data pairs, as ImageFile.dataExtentsMany returns):
   * holes become "allocated, data, zero" pieces. Writes to `out` (room: maxOut) with merging;
   * returns the count or StatusError.Full.
   */
  recordsSplitHoles(recs: number, n: number, probed: number, out: number, maxOut: number): number;
  /**
   * Merges one backing-chain layer into map records: the pending records (meta MAP_PENDING) of
   * cur[0..nCur) take the extents of layer `depth` (records lay[0..nLay), covering them): provided
   * ranges become records at `depth`, unallocated ones stay pending where the next layer reaches
   * (`belowEnd`: its virtual size; negative: no next layer) and read as zeros at `depth` past it.
   * Records merge as qemu-img map merges. Writes to `out` (room: maxOut); returns the count or
   * StatusError.Full; `mapPendingLeft()` is the number of pending records written.
   */
  mapMergeLayer(cur: number, nCur: number, lay: number, nLay: number, depth: number, belowEnd: number, out: number, maxOut: number): number;
  mapPendingLeft(): number;
  /** Entries in [from, to) of a refcount block that are not zero. */
  refcountCountNonZero(block: number, from: number, to: number, refcountOrder: number): number;
}
