/**
 * L2 tables: batched, coalesced reads straight into wasm memory, scanned by the l2Scan kernel
 * into guest extents. Big scans stream through a bounded window; single-table lookups (random
 * reads) go through a small LRU cache.
 */
import { QcowError } from '../errors.js';
import type { ImageFile } from '../io/file.js';
import { inParallel } from '../io/file.js';
import { kernels, L2_RUN_BYTES, RunKind, InvalidReason, StatusError } from '../kernels/index.js';
import type { RecordBuffer } from '../chain/records.js';
import type { MetadataCache } from './cache.js';

const WINDOW_BYTES = 16 * 1024 * 1024;
const MAX_READ_BYTES = 8 * 1024 * 1024;
const CACHE_TABLES = 64;
/** Scans of at most this many tables use the cache (see #cachedTables). */
const CACHED_SCAN_TABLES = 16;
const MAX_RUNS = 4096;
const READS_IN_FLIGHT = 4;

/** What a scan needs to know about the image. */
export interface L2Geometry {
  readonly path: string;
  readonly clusterSize: number;
  readonly clusterBits: number;
  readonly extendedL2: boolean;
  readonly l2Span: number;
  readonly l2Entries: number;
  l2Offset(l1Index: number): number;
}

const REASONS: Record<number, string> = {
  [InvalidReason.ReservedBits]: 'reserved bits are set',
  [InvalidReason.Unaligned]: 'host offset is not cluster aligned',
  [InvalidReason.OffsetTooLarge]: 'host offset is too large',
  [InvalidReason.SubclusterAllocAndZero]: 'a subcluster is both allocated and zero',
  [InvalidReason.SubclusterNoHost]: 'subclusters are allocated but the host offset is 0',
  [InvalidReason.CompressedBitmap]: 'compressed cluster with a non-zero subcluster bitmap',
};

export class L2Tables {
  readonly #cache = new Map<number, number>();
  #runs = 0;
  /** When the image is being written: tables come from the writer's metadata cache. */
  source: MetadataCache | undefined;

  constructor(
    private readonly file: ImageFile,
    private readonly clusterSize: number,
  ) {}

  /**
   * Reads the tables at `offsets` (0 = none) into wasm memory, coalescing tables adjacent on disk;
   * returns their pointers (0 for none). Uncached: the caller releases them after use.
   */
  async load(offsets: number[]): Promise<{ ptrs: number[]; release: () => void }> {
    const k = kernels();
    const cs = this.clusterSize;
    const ptrs = offsets.map(() => 0);
    const owned: number[] = [];
    const groups: { first: number; count: number; ptr: number }[] = [];
    for (let i = 0; i < offsets.length; i++) {
      const off = offsets[i]!;
      if (!off) continue;
      const g = groups[groups.length - 1];
      if (g && offsets[g.first + g.count - 1]! + cs === off && g.first + g.count === i && (g.count + 1) * cs <= MAX_READ_BYTES) g.count++;
      else groups.push({ first: i, count: 1, ptr: 0 });
    }
    let total = 0;
    for (const g of groups) total += g.count * cs;
    k.reserve(total);
    for (const g of groups) {
      g.ptr = k.alloc(g.count * cs);
      owned.push(g.ptr);
      for (let j = 0; j < g.count; j++) ptrs[g.first + j] = g.ptr + j * cs;
    }
    try {
      await inParallel(groups, READS_IN_FLIGHT, async (g) => {
        await this.file.readAt(k.u8(g.ptr, g.count * cs), offsets[g.first]!);
      });
    } catch (e) {
      for (const p of owned) k.free(p);
      throw e;
    }
    return { ptrs, release: () => owned.forEach((p) => k.free(p)) };
  }

  /** Pointer to one table, cached (for random access). */
  async table(offset: number): Promise<number> {
    const hit = this.#cache.get(offset);
    if (hit !== undefined) {
      this.#cache.delete(offset);
      this.#cache.set(offset, hit);
      return hit;
    }
    const k = kernels();
    const ptr = k.alloc(this.clusterSize);
    try {
      await this.file.readAt(k.u8(ptr, this.clusterSize), offset);
    } catch (e) {
      k.free(ptr);
      throw e;
    }
    this.#cache.set(offset, ptr);
    if (this.#cache.size > CACHE_TABLES) {
      const [oldOff, oldPtr] = this.#cache.entries().next().value as [number, number];
      this.#cache.delete(oldOff);
      k.free(oldPtr);
    }
    return ptr;
  }

  /**
   * Pointers to the tables at `offsets` (0 = none) through the cache, all present at once when it
   * returns (a table evicted while another was read is read again). Small scans go this way: a
   * backing chain's lower layers are asked for the gaps of the layers above, many short ranges
   * in the same few tables.
   */
  async #cachedTables(offsets: number[]): Promise<number[]> {
    for (;;) {
      for (const off of offsets) if (off) await this.table(off);
      if (offsets.every((off) => !off || this.#cache.has(off))) return offsets.map((off) => (off ? this.#cache.get(off)! : 0));
    }
  }

  /**
   * Appends the extents of guest range [start, end) to `out` as layer extent records, in order and
   * merged (LayerExtent rules). `stream`: a one-pass scan of a large range (map), read in batches
   * that are released at once instead of going through the table cache. `v2`: zero clusters are
   * errors (version 2 images have no zero flag).
   */
  async scanRecords(g: L2Geometry, start: number, end: number, out: RecordBuffer, opts: { v2: boolean; stream?: boolean }): Promise<void> {
    const firstL1 = Math.floor(start / g.l2Span);
    const lastL1 = Math.floor((end - 1) / g.l2Span);
    const perWindow = Math.max(1, Math.floor(WINDOW_BYTES / g.clusterSize));
    for (let w = firstL1; w <= lastL1; w += perWindow) {
      const n = Math.min(perWindow, lastL1 + 1 - w);
      const offsets = Array.from({ length: n }, (_, i) => g.l2Offset(w + i));
      const span = (i: number): [number, number, number] => {
        const tableStart = (w + i) * g.l2Span;
        return [tableStart, Math.max(start, tableStart), Math.min(end, tableStart + g.l2Span)];
      };
      if (this.source) {
        for (let i = 0; i < n; i++) this.#tableRecords(g, offsets[i] ? await this.source.get(offsets[i]!) : 0, ...span(i), out, opts.v2);
        continue;
      }
      let ptrs: number[];
      let release = (): void => {};
      if (n <= CACHED_SCAN_TABLES && !opts.stream) ptrs = await this.#cachedTables(offsets);
      else ({ ptrs, release } = await this.load(offsets));
      try {
        for (let i = 0; i < n; i++) this.#tableRecords(g, ptrs[i]!, ...span(i), out, opts.v2);
      } finally {
        release();
      }
    }
  }

  /** Forgets the single-table read cache (tables may have changed on disk). */
  dropReadCache(): void {
    const k = kernels();
    for (const p of this.#cache.values()) k.free(p);
    this.#cache.clear();
  }

  /**
   * Records of the table at `ptr` (0: no table, all unallocated) for [s, e): the l2Scan kernel
   * turns entries into runs, l2Records turns runs into clipped, merged extent records.
   */
  #tableRecords(g: L2Geometry, ptr: number, tableStart: number, s: number, e: number, out: RecordBuffer, v2: boolean): void {
    const k = kernels();
    if (!this.#runs) this.#runs = k.alloc(MAX_RUNS * L2_RUN_BYTES);
    const unitBits = g.extendedL2 ? g.clusterBits - 5 : g.clusterBits;
    if (!ptr) {
      // One unallocated run over the whole table, clipped and merged like any other.
      const run = new Uint32Array(k.memory.buffer, this.#runs, 8);
      run.set([0, g.l2Span / 2 ** unitBits, RunKind.Unallocated, 0, 0, 0, 0, 0]);
      this.#appendRuns(g, 1, unitBits, tableStart, s, e, out, v2);
      return;
    }
    let first = Math.floor((s - tableStart) / g.clusterSize);
    let count = Math.ceil((e - tableStart) / g.clusterSize) - first;
    while (count > 0) {
      const n = k.l2Scan(ptr, first, count, g.extendedL2, g.clusterBits, this.#runs, MAX_RUNS);
      const consumed = k.scanConsumed();
      this.#appendRuns(g, n, unitBits, tableStart, s, e, out, v2);
      first += consumed;
      count -= consumed;
      if (consumed === 0) throw new QcowError('CORRUPT', 'internal error: L2 scan made no progress', g.path);
    }
  }

  #appendRuns(g: L2Geometry, n: number, unitBits: number, tableStart: number, s: number, e: number, out: RecordBuffer, v2: boolean): void {
    const k = kernels();
    out.reserve(n); // a run makes at most one record
    const r = k.l2Records(this.#runs, n, unitBits, tableStart, s, e, v2, out.ptr, out.count, out.capacity);
    if (r >= 0) {
      out.count = r;
      return;
    }
    if (r === StatusError.InvalidRun) {
      const run = new Uint32Array(k.memory.buffer, this.#runs + k.statusErrorRun() * L2_RUN_BYTES, 4);
      const gs = tableStart + run[0]! * 2 ** unitBits;
      throw new QcowError('CORRUPT', `Invalid L2 entry for guest offset ${gs}: ${REASONS[run[3]!] ?? 'bad entry'}`, g.path);
    }
    // QEMU fails the read and marks the image corrupt.
    if (r === StatusError.V2Zero) throw new QcowError('CORRUPT', `Zero cluster entry found in pre-v3 image (guest offset ${k.statusErrorStart()})`, g.path);
    throw new QcowError('INTERNAL', 'internal error: status records overflowed their buffer', g.path);
  }

  clear(): void {
    // Nothing in wasm memory (info, a closed chain): don't instantiate the kernels just to free.
    if (this.#cache.size === 0 && !this.#runs) return;
    const k = kernels();
    for (const p of this.#cache.values()) k.free(p);
    this.#cache.clear();
    if (this.#runs) k.free(this.#runs);
    this.#runs = 0;
  }
}
