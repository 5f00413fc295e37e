/**
 * Persistent dirty bitmaps (qcow2-format.md §8): contents loaded into wasm memory, changed there
 * by the bitmap kernels, and stored crash-safely through the write engine.
 *
 * Storing follows copy, switch, free — the bitmap is valid on disk at every instant:
 * 1. new data clusters (only for bitmap clusters that are neither all zeros — table entries of 0,
 *    as QEMU writes them — nor all ones — the all-ones entry) and a new table are allocated
 *    (refcounts raised in the refcount cache) and written. The switch depends on the refcount
 *    cache: its write-back and one flush make all of it durable (the writer adds one flush before
 *    the refcount blocks when the file had to grow to cover the new clusters);
 * 2. the directory entry is switched to the new table: one 8-byte in-place write of its
 *    table_offset for a content change, or a whole new directory copy plus one header write
 *    (`HeaderWriter.setBitmapsExtension`, durable on return) for directory changes (add, remove,
 *    flags);
 * 3. the old table, data clusters and directory lose their reference in the refcount cache, which
 *    was declared to depend on a flush after an in-place switch: its next write-back makes the
 *    switch durable first (a store is durable when it returns), then writes the lowered counts.
 *    They need no flush of their own: nothing durable points at those clusters any more, so a
 *    crash before the counts reach the disk only leaks them. `close()` therefore ends the batch
 *    without a final flush, and punches the freed clusters (the discard queue).
 * Flushes per store: 2 (3 when the file grows). A crash at any point leaves either the old or the
 * new bitmap, at worst with leaked clusters; no dirty bit is needed for that (leaks are what a
 * qcow2 image may always have after a crash). Bitmaps are never marked in_use by qcowkit: each
 * change is a complete store of its own, so the autoclear bit only changes with the extension
 * itself (first bitmap added, last one removed).
 */
import { QcowError, throwIfAborted } from '../errors.js';
import { inParallel } from '../io/file.js';
import { kernels } from '../kernels/index.js';
import {
  BITMAP_TYPE_DIRTY,
  BME_FLAG_AUTO,
  BME_FLAG_IN_USE,
  bitmapTableSize,
  encodeBitmapDirectory,
  validateBitmapTable,
  type BitmapDirectoryEntry,
} from '../format/bitmap.js';
import type { BitmapsExtension } from '../format/header.js';
import type { Qcow2Image } from './image.js';
import type { Qcow2Writer } from './writer.js';
import type { ClusterRun } from './allocator.js';

/** QEMU's limits (block/qcow2.h, block/qcow2-bitmap.c). */
export const MAX_BITMAPS = 65535;
export const MAX_BITMAP_DIRECTORY_SIZE = 1024 * MAX_BITMAPS;
export const MAX_BITMAP_NAME_BYTES = 1023;
export const MIN_GRANULARITY_BITS = 9;
export const MAX_GRANULARITY_BITS = 31;
/** Bitmap data QEMU keeps in RAM at most (BME_MAX_PHYS_SIZE). */
export const MAX_BITMAP_DATA_BYTES = 0x20000000;

const IO_CHUNK = 8 * 1024 * 1024;
const IO_IN_FLIGHT = 4;

/** A bitmap's contents in wasm memory (qcow2 bit order), with what it was loaded from. */
export interface LoadedBitmap {
  readonly entry: BitmapDirectoryEntry;
  /** Start of the data in wasm memory: `tableSize * clusterSize` bytes, bits past `bits` zero. */
  readonly ptr: number;
  readonly bytes: number;
  /** Number of meaningful bits: ceil(virtual size / granularity). */
  readonly bits: number;
  readonly granularity: number;
  /** Host data clusters the loaded table referenced (released when a new copy is stored). */
  readonly dataClusters: ClusterRun[];
  free(): void;
}

/** One guest-byte extent. */
export interface ByteExtent {
  start: number;
  length: number;
}

export function bitmapBits(diskSize: number, granularityBits: number): number {
  return Math.ceil(diskSize / 2 ** granularityBits);
}

export function isInUse(e: BitmapDirectoryEntry): boolean {
  return (e.flags & BME_FLAG_IN_USE) !== 0;
}
export function isEnabled(e: BitmapDirectoryEntry): boolean {
  return (e.flags & BME_FLAG_AUTO) !== 0;
}

/** Encoded size of a directory entry with this name (8-byte aligned). */
export function directoryEntrySize(name: string): number {
  return Math.ceil((24 + Buffer.byteLength(name)) / 8) * 8;
}

/**
 * The error QEMU gives for using a bitmap a crashed QEMU left in use, its advice on a second line
 * (remove the bitmap: QEMU names its QMP command) put on the same one, naming qcowkit's. `why`:
 * what needed the bitmap, where the operation does not say (a commit growing its base).
 */
export function inconsistent(name: string, path: string, why?: string): QcowError {
  const remove = `qcowkit bitmap --remove ${shellWord(path)} ${shellWord(name)}`;
  return new QcowError('INVALID_ARGUMENT', `Bitmap '${name}' is inconsistent and cannot be used${why ? ` (${why})` : ''}; try '${remove}' to delete this bitmap from disk`, path);
}

/** A command-line word as typed in a POSIX shell (quoted when needed). */
function shellWord(s: string): string {
  return /^[\w@%+=:,./-]+$/.test(s) ? s : `"${s.replace(/(["\\$`])/g, '\\$1')}"`;
}

export function findBitmap(img: Qcow2Image, name: string): BitmapDirectoryEntry {
  const e = img.bitmaps.find((b) => b.name === name);
  if (!e) throw new QcowError('NOT_FOUND', `Dirty bitmap '${name}' not found`, img.path);
  return e;
}

/** Clusters of one I/O (reads and writes of bitmap data are coalesced up to this size). */
function runLimit(cs: number): number {
  return Math.max(1, IO_CHUNK / cs);
}

/** The clusters a bitmap's table occupies. */
function tableRun(e: BitmapDirectoryEntry, cs: number): ClusterRun {
  return { first: e.tableOffset / cs, count: Math.ceil((e.tableSize * 8) / cs) };
}

/** f64 triples (table index, clusters, host byte offset) a table kernel wrote at `ptr`. */
function readTriples(ptr: number, n: number): Array<{ index: number; count: number; host: number }> {
  const f = new Float64Array(kernels().memory.buffer, ptr, n * 3);
  const out: Array<{ index: number; count: number; host: number }> = [];
  for (let i = 0; i < n; i++) out.push({ index: f[i * 3]!, count: f[i * 3 + 1]!, host: f[i * 3 + 2]! });
  return out;
}

/**
 * Reads `entries` entries of a bitmap's table into wasm memory and runs the table kernel over
 * them: all-zero and all-ones clusters of `data` are filled (unless `data` is 0), and the reads
 * of the data clusters come back coalesced. Past the end of the file the table reads as zeros, as
 * in QEMU. The entries were validated when the image was opened (tables qcowkit writes are valid
 * by construction); callers that may meet an in-use bitmap's table validate it first.
 */
async function scanTable(img: Qcow2Image, e: BitmapDirectoryEntry, entries: number, data: number): Promise<Array<{ index: number; count: number; host: number }>> {
  const k = kernels();
  const table = k.alloc(entries * 8);
  const runs = k.alloc(24 * Math.max(1, entries));
  try {
    await img.file.readAt(k.u8(table, entries * 8), e.tableOffset);
    const n = k.bitmapTableLoad(table, entries, data, img.clusterBits, runLimit(img.clusterSize), runs);
    return readTriples(runs, n);
  } finally {
    k.free(runs);
    k.free(table);
  }
}

/**
 * Host clusters holding a bitmap's data (table order, merged where contiguous). An in-use
 * bitmap's table (never validated: QEMU does not load it) is checked first, by the open path's
 * rules; an invalid one throws CORRUPT.
 */
export async function bitmapDataClusters(img: Qcow2Image, e: BitmapDirectoryEntry): Promise<ClusterRun[]> {
  if (isInUse(e)) {
    const raw = new Uint8Array(e.tableSize * 8);
    await img.file.readAt(raw, e.tableOffset);
    validateBitmapTable(raw, e, img.clusterSize, img.path);
  }
  const cs = img.clusterSize;
  return (await scanTable(img, e, e.tableSize, 0)).map((r) => ({ first: r.host / cs, count: r.count }));
}

/**
 * Loads a bitmap's contents into wasm memory: one kernel pass over the table fills the all-zero
 * and all-ones clusters and plans the reads, which go straight into wasm memory, coalesced over
 * host-contiguous data clusters, several in flight.
 */
export async function loadBitmap(img: Qcow2Image, e: BitmapDirectoryEntry, opts: { signal?: AbortSignal | undefined; allowInUse?: boolean } = {}): Promise<LoadedBitmap> {
  if (isInUse(e) && !opts.allowInUse) throw inconsistent(e.name, img.path);
  const cs = img.clusterSize;
  const bits = bitmapBits(img.virtualSize, e.granularityBits);
  const expected = bitmapTableSize(img.virtualSize, e.granularityBits, cs);
  const bytes = Math.max(expected, 1) * cs;
  const usable = Math.min(e.tableSize, expected);
  const k = kernels();
  const ptr = k.alloc(bytes);
  let freed = false;
  const free = () => {
    if (!freed) k.free(ptr);
    freed = true;
  };
  let reads: Array<{ index: number; count: number; host: number }>;
  try {
    reads = await scanTable(img, e, usable, ptr);
    if (usable < bytes / cs) k.u8(ptr + usable * cs, bytes - usable * cs).fill(0);
    for (const r of reads) {
      if (r.host + r.count * cs > img.fileSize)
        throw new QcowError('CORRUPT', `Bitmap '${e.name}': bitmap data cluster ${r.index} lies past the end of the file`, img.path);
    }
    await inParallel(reads, IO_IN_FLIGHT, async (r) => {
      throwIfAborted(opts.signal, img.path);
      await img.file.readAt(k.u8(ptr + r.index * cs, r.count * cs), r.host);
    });
    // QEMU keeps the bits past the disk's end zero; an all-ones cluster or a sloppy writer may not.
    if (bytes * 8 > bits) k.clearBits(ptr, bits, bytes * 8 - bits);
  } catch (err) {
    free();
    throw err;
  }
  const dataClusters = reads.map((r) => ({ first: r.host / cs, count: r.count }));
  return { entry: e, ptr, bytes, bits, granularity: 2 ** e.granularityBits, dataClusters, free };
}

/** Dirty extents of a loaded bitmap in guest bytes (ascending, coalesced, clipped to the disk). */
export function bitmapExtents(bm: { ptr: number; bits: number; granularity: number }, diskSize: number): ByteExtent[] {
  const result: ByteExtent[] = [];
  forEachBitmapExtent(bm, diskSize, (pairs, n) => {
    for (let i = 0; i < n; i++) result.push({ start: pairs[i * 2]!, length: pairs[i * 2 + 1]! });
  });
  return result;
}

/** Extents per batch of forEachBitmapExtent (and per call of the extents kernel). */
const EXTENT_BATCH = 65536;

/**
 * A bitmap's dirty extents in guest bytes, streamed: `onBatch` gets [start, length] pairs
 * (ascending, coalesced across batches, clipped to the disk) in a buffer it may only read during
 * the call. Memory stays flat however fragmented the bitmap is. Returns the totals.
 */
export function forEachBitmapExtent(
  bm: { ptr: number; bits: number; granularity: number },
  diskSize: number,
  onBatch?: (pairs: Float64Array, count: number) => void,
): { extents: number; bytes: number } {
  const totals = { extents: 0, bytes: 0 };
  for (const b of bitmapExtentBatches(bm, diskSize, totals)) onBatch?.(b.pairs, b.count);
  return totals;
}

/**
 * forEachBitmapExtent as a generator, for consumers that wait between batches (output with
 * back-pressure): `totals` is complete once the generator is done. The bitmap must stay loaded
 * until then; wasm memory may grow between batches.
 */
export function* bitmapExtentBatches(
  bm: { ptr: number; bits: number; granularity: number },
  diskSize: number,
  totals: { extents: number; bytes: number } = { extents: 0, bytes: 0 },
): Generator<{ pairs: Float64Array; count: number }, void, undefined> {
  const k = kernels();
  const out = k.alloc(16 * EXTENT_BATCH);
  const batch = new Float64Array(2 * EXTENT_BATCH);
  let n = 0;
  let pendingStart = -1;
  let pendingLength = 0;
  try {
    let from = 0;
    for (;;) {
      const got = k.extents(bm.ptr, from, bm.bits, out, EXTENT_BATCH);
      // Copied out of wasm memory at once: it may grow while a batch is being consumed.
      const f = new Float64Array(k.memory.buffer, out, got * 2).slice();
      const next = got < EXTENT_BATCH ? bm.bits : k.extentsNext();
      for (let i = 0; i < got; i++) {
        const start = f[i * 2]! * bm.granularity;
        const length = Math.min(diskSize, (f[i * 2]! + f[i * 2 + 1]!) * bm.granularity) - start;
        if (length <= 0) continue;
        if (pendingStart >= 0 && pendingStart + pendingLength === start) {
          pendingLength += length;
          continue;
        }
        if (pendingStart >= 0) {
          batch[n * 2] = pendingStart;
          batch[n * 2 + 1] = pendingLength;
          totals.extents++;
          totals.bytes += pendingLength;
          if (++n === EXTENT_BATCH) {
            yield { pairs: batch, count: n };
            n = 0;
          }
        }
        pendingStart = start;
        pendingLength = length;
      }
      if (got < EXTENT_BATCH || next >= bm.bits) break;
      from = next;
    }
    if (pendingStart >= 0) {
      batch[n * 2] = pendingStart;
      batch[n * 2 + 1] = pendingLength;
      totals.extents++;
      totals.bytes += pendingLength;
      n++;
    }
    if (n) yield { pairs: batch, count: n };
  } finally {
    k.free(out);
  }
}

/** Marks guest byte ranges dirty in a loaded bitmap (every granule they touch). */
export function setRanges(bm: LoadedBitmap, ranges: ReadonlyArray<ByteExtent>): void {
  const k = kernels();
  for (const r of ranges) {
    if (r.length <= 0) continue;
    const a = Math.floor(r.start / bm.granularity);
    const b = Math.min(bm.bits, Math.ceil((r.start + r.length) / bm.granularity));
    if (b > a) k.setBits(bm.ptr, a, b - a);
  }
}

/** Clears the granules lying wholly inside the guest byte ranges. */
export function clearRanges(bm: LoadedBitmap, ranges: ReadonlyArray<ByteExtent>, diskSize: number): void {
  const k = kernels();
  for (const r of ranges) {
    const a = Math.ceil(r.start / bm.granularity);
    const end = r.start + r.length;
    const b = end >= diskSize ? bm.bits : Math.floor(end / bm.granularity);
    if (b > a) k.clearBits(bm.ptr, a, b - a);
  }
}

/** dst |= src, converting granularity as QEMU's merge does (both bitmaps cover the same disk size). */
export function mergeInto(dst: LoadedBitmap, src: { ptr: number; bits: number; granularity: number }): void {
  const k = kernels();
  const shift = Math.log2(dst.granularity / src.granularity);
  if (shift === 0) k.bitmapOr(dst.ptr, src.ptr, Math.ceil(dst.bits / 8));
  else k.bitmapConvertOr(dst.ptr, dst.bits, src.ptr, src.bits, shift);
}

/**
 * `target` (a bitmap of `img`) merged with the loaded `src` (same disk size), ready to store; takes
 * `src` over (freed, or its buffer reused). A target that is empty (every table entry 0: a fresh
 * or cleared bitmap) at the source's granularity is the source's contents: the source's buffer
 * becomes the result, with no second buffer to fill and no OR (a bitmap copied into a fresh one).
 */
export async function loadMerged(img: Qcow2Image, target: BitmapDirectoryEntry, src: LoadedBitmap, opts: { signal?: AbortSignal | undefined } = {}): Promise<LoadedBitmap> {
  try {
    if (src.granularity === 2 ** target.granularityBits && src.bits === bitmapBits(img.virtualSize, target.granularityBits) && (await tableIsEmpty(img, target)))
      return { entry: target, ptr: src.ptr, bytes: src.bytes, bits: src.bits, granularity: src.granularity, dataClusters: [], free: src.free };
    const dst = await loadBitmap(img, target, opts);
    mergeInto(dst, src);
    src.free();
    return dst;
  } catch (e) {
    src.free();
    throw e;
  }
}

/** Whether every entry of a bitmap's table is 0 (all its clusters read as zeros, none stored). */
async function tableIsEmpty(img: Qcow2Image, e: BitmapDirectoryEntry): Promise<boolean> {
  const k = kernels();
  const n = e.tableSize * 8;
  const p = k.alloc(n);
  try {
    await img.file.readAt(k.u8(p, n), e.tableOffset);
    return k.isZero(p, n);
  } finally {
    k.free(p);
  }
}

/**
 * A writable image's bitmaps: directory changes and crash-safe stores of contents. The image's
 * `bitmaps` array and header are kept in step with what is on disk.
 */
export class BitmapStore {
  private constructor(
    readonly img: Qcow2Image,
    readonly w: Qcow2Writer,
  ) {}

  static async open(img: Qcow2Image): Promise<BitmapStore> {
    if (!img.file.writable) throw new QcowError('INTERNAL', 'image was not opened for writing', img.path);
    if (img.header.version < 3) throw new QcowError('UNSUPPORTED', 'Cannot store dirty bitmaps in qcow2 v2 files', img.path);
    const w = await img.writer();
    // The spec's rule for writers: autoclear bits we don't understand go before the first change.
    await w.header.clearUnknownAutoclear();
    return new BitmapStore(img, w);
  }

  /** The bitmaps of an image whose writer is already at work (a resize in progress). */
  static forWriter(img: Qcow2Image, w: Qcow2Writer): BitmapStore {
    return new BitmapStore(img, w);
  }

  get cs(): number {
    return this.img.clusterSize;
  }

  /** Checks QEMU's rules for a new bitmap (qcow2_co_can_store_new_dirty_bitmap and the QMP add). */
  checkNew(name: string, granularity: number): void {
    assertCanAddBitmap(this.img.path, this.img.bitmaps, name, granularity, this.img.virtualSize);
  }

  /** Adds an empty bitmap (all-zero table), enabled unless `disabled`. */
  async add(name: string, granularity: number, opts: { disabled?: boolean } = {}): Promise<BitmapDirectoryEntry> {
    this.checkNew(name, granularity);
    const gbits = Math.log2(granularity);
    const tableSize = bitmapTableSize(this.img.virtualSize, gbits, this.cs);
    const tableOffset = await this.#writeTable(new Uint8Array(tableSize * 8));
    const entry: BitmapDirectoryEntry = { name, tableOffset, tableSize, flags: opts.disabled ? 0 : BME_FLAG_AUTO, type: BITMAP_TYPE_DIRTY, granularityBits: gbits, extraData: new Uint8Array(0) };
    await this.#writeDirectory([...this.img.bitmaps, entry], []);
    return entry;
  }

  /** Drops a bitmap (in use or not) and releases its table and data clusters. */
  async remove(name: string): Promise<void> {
    const e = findBitmap(this.img, name);
    const release: ClusterRun[] = [];
    // An in-use bitmap's table may be anything QEMU left; release only what is valid.
    try {
      release.push(...(await bitmapDataClusters(this.img, e)));
    } catch (err) {
      if (!(err instanceof QcowError && err.code === 'CORRUPT')) throw err;
    }
    release.push(tableRun(e, this.cs));
    await this.#writeDirectory(
      this.img.bitmaps.filter((b) => b !== e),
      release,
    );
  }

  /** Enables (auto flag) or disables recording. */
  async setEnabled(name: string, enabled: boolean): Promise<void> {
    const e = findBitmap(this.img, name);
    if (isInUse(e)) throw inconsistent(name, this.img.path);
    const flags = enabled ? e.flags | BME_FLAG_AUTO : e.flags & ~BME_FLAG_AUTO;
    if (flags === e.flags) return;
    await this.#writeDirectory(
      this.img.bitmaps.map((b) => (b === e ? { ...b, flags } : b)),
      [],
    );
  }

  /** Clears every bit: a fresh all-zero table, the data clusters released. */
  async clear(name: string): Promise<void> {
    const e = findBitmap(this.img, name);
    if (isInUse(e)) throw inconsistent(name, this.img.path);
    const old = await bitmapDataClusters(this.img, e);
    const tableOffset = await this.#writeTable(new Uint8Array(e.tableSize * 8));
    await this.#durable();
    await this.#switchTables([{ e, tableOffset }]);
    await this.#release([...old, tableRun(e, this.cs)]);
    await this.#settle();
  }

  /**
   * Stores new contents of a loaded bitmap crash-safely (see the module comment). The loaded
   * bitmap then describes the stored copy.
   */
  async store(bm: LoadedBitmap, opts: { signal?: AbortSignal | undefined } = {}): Promise<void> {
    await this.storeMany([bm], opts);
  }

  /**
   * Stores several loaded bitmaps at once: their new clusters are written together and made
   * durable by one flush, one more flush makes the switch of every table pointer durable (before
   * this returns: commit writes guest data in place after it). Each bitmap is the old or the new
   * one after a crash at any point.
   */
  async storeMany(bms: ReadonlyArray<LoadedBitmap>, opts: { signal?: AbortSignal | undefined } = {}): Promise<void> {
    const img = this.img;
    const entries = bms.map((bm) => {
      const e = img.bitmaps.find((b) => b.name === bm.entry.name);
      if (!e || e.tableOffset !== bm.entry.tableOffset) throw new QcowError('INTERNAL', `bitmap '${bm.entry.name}' changed since it was loaded`, img.path);
      if (e.tableSize * this.cs > bm.bytes) throw new QcowError('INTERNAL', `bitmap '${e.name}': its table is larger than the loaded data`, img.path);
      return e;
    });
    const written = await this.#writeContents(
      bms.map((bm, i) => ({ ptr: bm.ptr, entries: entries[i]!.tableSize })),
      opts.signal,
    );
    await this.#durable();
    await this.#switchTables(entries.map((e, i) => ({ e, tableOffset: written[i]!.tableOffset })));
    await this.#release([...bms.flatMap((bm) => bm.dataClusters), ...entries.map((e) => tableRun(e, this.cs))]);
    await this.#settle();
    // The loaded copies now describe what is on disk.
    bms.forEach((bm, i) => {
      const m = bm as { entry: BitmapDirectoryEntry; dataClusters: ClusterRun[] };
      m.entry = img.bitmaps.find((b) => b.name === bm.entry.name)!;
      m.dataClusters = written[i]!.dataClusters;
    });
  }

  /**
   * Growing the disk (the writer's resize): every bitmap gets contents for the new size — the
   * old bits, the new range clean, as QEMU's resize leaves them — in new data clusters, new tables
   * and a new directory, all durable when this returns. `commit()` then switches the header's
   * size and bitmaps extension together (one header write: no instant where the tables and the
   * size disagree, which QEMU would refuse to open) and releases the old clusters. A crash before
   * the switch leaves the old image with leaked clusters.
   */
  async prepareGrowth(size: number, opts: { signal?: AbortSignal | undefined } = {}): Promise<{ commit(): Promise<void> }> {
    const img = this.img;
    const cs = this.cs;
    const k = kernels();
    assertCanGrow(img, size);
    const grown: Array<{ ptr: number; entries: number }> = [];
    const release: ClusterRun[] = [];
    try {
      for (const e of img.bitmaps) {
        throwIfAborted(opts.signal, img.path);
        const bm = await loadBitmap(img, e, opts);
        try {
          const entries = bitmapTableSize(size, e.granularityBits, cs);
          const ptr = k.alloc(entries * cs);
          grown.push({ ptr, entries });
          const to = k.u8(ptr, entries * cs);
          to.set(k.u8(bm.ptr, Math.min(bm.bytes, entries * cs)));
          to.fill(0, Math.min(bm.bytes, entries * cs));
          release.push(...bm.dataClusters, tableRun(e, cs));
        } finally {
          bm.free();
        }
      }
      const written = await this.#writeContents(grown, opts.signal);
      const entries = img.bitmaps.map((e, i) => ({ ...e, tableOffset: written[i]!.tableOffset, tableSize: grown[i]!.entries }));
      const dir = await this.#placeDirectory(entries);
      await this.#durable();
      const old = img.header.bitmaps!;
      release.push({ first: old.directoryOffset / cs, count: Math.ceil(old.directorySize / cs) });
      return {
        commit: async () => {
          await this.w.header.setSizeAndBitmaps(size, dir);
          img.bitmaps.splice(0, img.bitmaps.length, ...entries);
          await this.#release(release);
        },
      };
    } finally {
      for (const g of grown) k.free(g.ptr);
    }
  }

  /**
   * Writes new data clusters (only for bitmap clusters that are neither all zeros — a table entry
   * of 0, as QEMU writes them — nor all ones — the spec's all-ones entry, which QEMU reads) and a
   * new table for each item (`entries` clusters of bitmap data at `ptr`). The clusters come from
   * the allocator with their refcounts raised; nothing is durable yet and nothing points at them.
   * Kernels classify the clusters and build the tables; the writes are coalesced over clusters
   * contiguous on the host, several in flight.
   */
  async #writeContents(items: ReadonlyArray<{ ptr: number; entries: number }>, signal: AbortSignal | undefined): Promise<Array<{ tableOffset: number; dataClusters: ClusterRun[] }>> {
    const img = this.img;
    const cs = this.cs;
    const k = kernels();
    const scratch: number[] = [];
    const take = (bytes: number) => {
      const p = k.alloc(Math.max(bytes, 16));
      scratch.push(p);
      return p;
    };
    try {
      const plans = items.map((it) => {
        const kinds = take(it.entries);
        return { ...it, kinds, mixed: k.bitmapClusterKinds(it.ptr, it.entries, img.clusterBits, kinds), tableBytes: Math.ceil((it.entries * 8) / cs) * cs };
      });
      // Each table is one contiguous run; the data clusters of all items come from one allocation.
      const tables: number[] = [];
      for (const p of plans) {
        const at = await this.w.allocator.allocateBytes(p.tableBytes);
        img.noteFileEnd(at + p.tableBytes);
        tables.push(at);
      }
      const runs = await this.w.allocator.allocate(plans.reduce((n, p) => n + p.mixed, 0));
      for (const r of runs) img.noteFileEnd((r.first + r.count) * cs);
      const writes: Array<{ ptr: number; bytes: number; at: number }> = [];
      const out: Array<{ tableOffset: number; dataClusters: ClusterRun[] }> = [];
      let ri = 0;
      let used = 0;
      plans.forEach((p, i) => {
        // This item's share of the runs, in order.
        const mine: ClusterRun[] = [];
        for (let need = p.mixed; need > 0; ) {
          const r = runs[ri]!;
          const n = Math.min(need, r.count - used);
          mine.push({ first: r.first + used, count: n });
          need -= n;
          used += n;
          if (used === r.count) [ri, used] = [ri + 1, 0];
        }
        const hosts = take(16 * mine.length);
        const table = take(p.tableBytes);
        const plan = take(24 * p.mixed);
        const hv = new Float64Array(k.memory.buffer, hosts, mine.length * 2);
        mine.forEach((r, j) => hv.set([r.first, r.count], j * 2));
        k.u8(table, p.tableBytes).fill(0);
        const n = k.bitmapTableBuild(p.kinds, p.entries, img.clusterBits, hosts, mine.length, runLimit(cs), table, plan);
        if (n < 0) throw new QcowError('INTERNAL', 'bitmap store: fewer clusters allocated than needed', img.path);
        for (const wr of readTriples(plan, n)) writes.push({ ptr: p.ptr + wr.index * cs, bytes: wr.count * cs, at: wr.host });
        writes.push({ ptr: table, bytes: p.tableBytes, at: tables[i]! });
        out.push({ tableOffset: tables[i]!, dataClusters: mine });
      });
      // Nothing allocates in wasm memory while these views are being written. Through the page
      // cache: the next user of the image (QEMU loads every bitmap when it opens it, a backup
      // reads it) reads it back, and the flush that follows makes it durable either way.
      await inParallel(writes, IO_IN_FLIGHT, async (wr) => {
        throwIfAborted(signal, img.path);
        await img.file.writeAt(k.u8(wr.ptr, wr.bytes), wr.at, { cached: true });
      });
      return out;
    } finally {
      for (const p of scratch) k.free(p);
    }
  }

  /** Allocates and writes a table (not yet durable: the switch makes it so). */
  async #writeTable(table: Uint8Array): Promise<number> {
    const cs = this.cs;
    const clusters = Math.max(1, Math.ceil(table.length / cs));
    const at = await this.w.allocator.allocateBytes(clusters * cs);
    this.img.noteFileEnd(at + clusters * cs);
    const padded = new Uint8Array(clusters * cs);
    padded.set(table);
    await this.img.file.writeAt(padded, at);
    return at;
  }

  /**
   * What a switch depends on: everything written so far durable, refcounts of the new clusters
   * included — a flush of the refcount cache (one write-back and one flush, after the flush its
   * dependency asks for when the file grew to cover the new clusters).
   */
  async #durable(): Promise<void> {
    await this.w.refcountCache.flush();
  }

  /**
   * Points each entry at its new table with one 8-byte in-place write of its table_offset (the
   * caller made the tables durable before). Not durable yet: the refcount cache now depends on a
   * flush, so nothing it releases after this reaches the file before the switch does.
   */
  async #switchTables(list: ReadonlyArray<{ e: BitmapDirectoryEntry; tableOffset: number }>): Promise<void> {
    const img = this.img;
    const at = new Map<BitmapDirectoryEntry, number>();
    let pos = img.header.bitmaps!.directoryOffset;
    for (const b of img.bitmaps) {
      at.set(b, pos);
      pos += directoryEntrySize(b.name);
    }
    for (const { e, tableOffset } of list) {
      const buf = new Uint8Array(8);
      new DataView(buf.buffer).setBigUint64(0, BigInt(tableOffset));
      await img.file.writeAt(buf, at.get(e)!);
    }
    this.w.refcountCache.dependsOnFlush();
    for (const { e, tableOffset } of list) img.bitmaps[img.bitmaps.indexOf(e)] = { ...e, tableOffset };
  }

  /**
   * Ends an in-place store: a write-back of the refcount cache satisfies its dependency (the flush
   * that makes the switch durable), then writes the lowered refcounts, which need no flush.
   */
  async #settle(): Promise<void> {
    await this.w.refcountCache.writeBack();
  }

  /** Allocates and writes a directory holding `entries` (not durable yet, nothing points at it). */
  async #placeDirectory(entries: BitmapDirectoryEntry[]): Promise<BitmapsExtension> {
    const img = this.img;
    const cs = this.cs;
    for (const e of entries) {
      if (e.flags & ~(BME_FLAG_IN_USE | BME_FLAG_AUTO) || e.type !== BITMAP_TYPE_DIRTY || e.extraData.length)
        throw new QcowError('INTERNAL', `bitmap '${e.name}' would not satisfy QEMU's constraints`, img.path);
    }
    const dir = encodeBitmapDirectory(entries);
    const clusters = Math.ceil(dir.length / cs);
    const at = await this.w.allocator.allocateBytes(clusters * cs);
    img.noteFileEnd(at + clusters * cs);
    const padded = new Uint8Array(clusters * cs);
    padded.set(dir);
    await img.file.writeAt(padded, at);
    return { nbBitmaps: entries.length, directorySize: dir.length, directoryOffset: at };
  }

  /**
   * Writes a new directory with `entries` (or drops the extension when empty), switches the
   * header to it durably, then releases the old directory and `release`.
   */
  async #writeDirectory(entries: BitmapDirectoryEntry[], release: ClusterRun[]): Promise<void> {
    const img = this.img;
    const cs = this.cs;
    const old = img.header.bitmaps;
    const ext = entries.length ? await this.#placeDirectory(entries) : undefined;
    await this.#durable();
    await this.w.header.setBitmapsExtension(ext);
    img.bitmaps.splice(0, img.bitmaps.length, ...entries);
    const all = [...release];
    if (old) all.push({ first: old.directoryOffset / cs, count: Math.ceil(old.directorySize / cs) });
    await this.#release(all);
  }

  /** Drops one reference from each run (after the switch that made them unreachable is durable). */
  async #release(runs: ClusterRun[]): Promise<void> {
    for (const r of runs) if (r.count > 0) await this.w.refcounts.update(r.first, r.count, -1);
  }

  /**
   * Ends the write batch (caches freed, freed clusters punched). Every change was durable when its
   * store returned; what is left (lowered refcounts) is written without a final flush.
   */
  async close(): Promise<void> {
    await this.img.endWrites({ durable: false });
  }
}

/** QEMU's rules for a new bitmap beside `existing` on a disk of `size` bytes (names, granularity, count, directory and data size). */
export function assertCanAddBitmap(path: string, existing: readonly BitmapDirectoryEntry[], name: string, granularity: number, size: number): void {
  if (!name) throw new QcowError('INVALID_ARGUMENT', 'Bitmap name cannot be empty', path);
  if (Buffer.byteLength(name) > MAX_BITMAP_NAME_BYTES) throw new QcowError('INVALID_ARGUMENT', 'Bitmap name is too long', path);
  if (existing.some((b) => b.name === name)) throw new QcowError('INVALID_ARGUMENT', `Bitmap already exists: ${name}`, path);
  if (!Number.isSafeInteger(granularity) || granularity < 512 || granularity > 2 ** 31 || (granularity & (granularity - 1)) !== 0)
    throw new QcowError('INVALID_ARGUMENT', 'Granularity must be power of 2 and at least 512', path);
  if (existing.length >= MAX_BITMAPS) throw new QcowError('INVALID_ARGUMENT', 'Maximum number of persistent bitmaps is already reached', path);
  const dirSize = existing.reduce((n, b) => n + directoryEntrySize(b.name), 0);
  if (dirSize + directoryEntrySize(name) > MAX_BITMAP_DIRECTORY_SIZE) throw new QcowError('INVALID_ARGUMENT', 'Not enough space in the bitmap directory', path);
  assertDataFits(size, Math.log2(granularity), path);
}

/** QEMU keeps at most 512 MiB of bitmap data per bitmap. */
function assertDataFits(diskSize: number, granularityBits: number, path: string): void {
  const bytes = Math.ceil(bitmapBits(diskSize, granularityBits) / 8);
  if (bytes > MAX_BITMAP_DATA_BYTES) throw new QcowError('INVALID_ARGUMENT', `Too large bitmap: its data would take ${bytes} bytes (QEMU's limit is ${MAX_BITMAP_DATA_BYTES})`, path);
}

/**
 * Why the disk of `img` can't grow to `size` because of its bitmaps, checked before anything is
 * written: an in-use bitmap refuses the resize as in QEMU (its contents can't be carried over),
 * and so does a bitmap whose data would pass QEMU's size limit.
 */
export function assertCanGrow(img: Qcow2Image, size: number): void {
  for (const e of img.bitmaps) {
    if (isInUse(e)) throw inconsistent(e.name, img.path, `growing the disk to ${size} bytes resizes every bitmap`);
    assertDataFits(size, e.granularityBits, img.path);
  }
}

/** See BitmapStore.prepareGrowth: the writer's resize calls this when the image has bitmaps. */
export async function prepareBitmapGrowth(img: Qcow2Image, w: Qcow2Writer, size: number): Promise<{ commit(): Promise<void> }> {
  return BitmapStore.forWriter(img, w).prepareGrowth(size);
}

/**
 * Clusters a commit into `img` may take for its bitmaps besides the data (its free-space check and
 * dry-run growth): growing the disk to `size` stores every bitmap again (its data clusters and a
 * table for the new size, plus a directory), and marking `ranges` dirty stores every recording
 * one again (its data clusters, those the ranges touch, a table). Each store writes the new copy
 * before the old one is released, and what a batch releases is not reused before it ends: the
 * counts add up. In-use bitmaps take nothing: a resize refuses them, marking skips them.
 */
export async function commitBitmapClusters(img: Qcow2Image, ranges: ReadonlyArray<ByteExtent>, size: number): Promise<number> {
  const cs = img.clusterSize;
  const grows = size > img.virtualSize;
  const marking = ranges.some((r) => r.length > 0);
  let clusters = 0;
  for (const e of img.bitmaps) {
    if (isInUse(e) || !(grows || (marking && isEnabled(e)))) continue;
    const entries = bitmapTableSize(Math.max(size, img.virtualSize), e.granularityBits, cs);
    const table = Math.ceil((entries * 8) / cs);
    const data = await scanTable(img, e, Math.min(e.tableSize, entries), 0);
    const mixed = data.reduce((n, r) => n + r.count, 0);
    if (grows) clusters += mixed + table;
    if (marking && isEnabled(e)) clusters += Math.min(entries, mixed + touchedClusters(ranges, cs * 8 * 2 ** e.granularityBits, data)) + table;
  }
  if (grows && img.header.bitmaps) clusters += Math.ceil(img.header.bitmaps.directorySize / cs);
  return clusters;
}

/** Bitmap clusters (each covering `span` guest bytes) the ranges touch, those in `data` runs (table order) not counted. */
function touchedClusters(ranges: ReadonlyArray<ByteExtent>, span: number, data: ReadonlyArray<{ index: number; count: number }>): number {
  const touched = ranges.filter((r) => r.length > 0).map((r) => [Math.floor(r.start / span), Math.floor((r.start + r.length - 1) / span) + 1] as [number, number]);
  touched.sort((a, b) => a[0] - b[0]);
  let n = 0;
  let end = 0; // clusters below this are counted
  let d = 0;
  for (const [a0, b] of touched) {
    for (let c = Math.max(a0, end); c < b; ) {
      while (d < data.length && data[d]!.index + data[d]!.count <= c) d++;
      const run = data[d];
      if (run && run.index <= c) c = run.index + run.count; // already a data cluster
      else {
        const next = Math.min(b, run ? run.index : b);
        n += next - c;
        c = next;
      }
    }
    end = Math.max(end, b);
  }
  return n;
}

/**
 * Marks every enabled, not in-use bitmap of a writable image dirty for the guest ranges (call it
 * before the data is written: a superset of dirty bits is harmless, a missing one loses data).
 * All of them are stored together (one flush for their new clusters, one for the switches).
 * Returns the names of the bitmaps marked.
 */
export async function markBitmapsDirty(img: Qcow2Image, ranges: ReadonlyArray<ByteExtent>, opts: { signal?: AbortSignal | undefined } = {}): Promise<string[]> {
  const targets = img.bitmaps.filter((b) => isEnabled(b) && !isInUse(b));
  if (!targets.length || !ranges.some((r) => r.length > 0)) return [];
  const store = await BitmapStore.open(img);
  const loaded: LoadedBitmap[] = [];
  try {
    for (const t of targets) {
      const bm = await loadBitmap(img, t, opts);
      loaded.push(bm);
      setRanges(bm, ranges);
    }
    await store.storeMany(loaded, opts);
  } finally {
    for (const bm of loaded) bm.free();
  }
  return targets.map((t) => t.name);
}
