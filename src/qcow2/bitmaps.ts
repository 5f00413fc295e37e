/**
 * Persistent dirty bitmaps (qcow2-format.md §8): contents loaded into wasm memory, changed there
 * by the bitmap kernels, and stored crash-safely through the write engine.
 *
 * Storing follows copy, switch, free — the bitmap is valid on disk at every instant:
 * 1. new data clusters (only for bitmap clusters holding a set bit; all-zero ones stay table
 *    entries of 0, as QEMU writes them) and a new table are allocated (refcounts raised in the
 *    refcount cache), written, and made durable together with those refcounts;
 * 2. the directory entry is switched to the new table: one 8-byte in-place write of its
 *    table_offset for a content change, or a whole new directory copy plus one header write
 *    (`HeaderWriter.setBitmapsExtension`) for directory changes (add, remove, flags);
 * 3. the old table, data clusters and directory lose their reference, and are punched once that
 *    is durable (the engine's discard queue).
 * A crash at any point leaves either the old or the new bitmap, at worst with leaked clusters.
 * Bitmaps are never marked in_use by qcowkit: each change is a complete store of its own.
 */
import { QcowError, throwIfAborted } from '../errors.js';
import { inParallel } from '../io/file.js';
import { kernels } from '../kernels/index.js';
import {
  BITMAP_TYPE_DIRTY,
  BME_FLAG_AUTO,
  BME_FLAG_IN_USE,
  BME_TABLE_OFFSET_MASK,
  BME_TABLE_RESERVED_MASK,
  bitmapTableSize,
  encodeBitmapDirectory,
  type BitmapDirectoryEntry,
} from '../format/bitmap.js';
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

/** The error QEMU gives for using a bitmap a crashed QEMU left in use. */
export function inconsistent(name: string, path: string): QcowError {
  return new QcowError('INVALID_ARGUMENT', `Bitmap '${name}' is inconsistent and cannot be used`, path);
}

export function findBitmap(img: Qcow2Image, name: string): BitmapDirectoryEntry {
  const e = img.bitmaps.find((b) => b.name === name);
  if (!e) throw new QcowError('NOT_FOUND', `Dirty bitmap '${name}' not found`, img.path);
  return e;
}

/** Reads and validates a bitmap table: host cluster offset per entry (0: zeros, -1: all ones). */
export async function readBitmapTable(img: Qcow2Image, e: BitmapDirectoryEntry): Promise<Float64Array> {
  const cs = img.clusterSize;
  const raw = new Uint8Array(e.tableSize * 8);
  if (e.tableOffset + raw.length > img.fileSize)
    throw new QcowError('CORRUPT', `Bitmap '${e.name}': bitmap table lies past the end of the file`, img.path);
  await img.file.readAt(raw, e.tableOffset);
  const v = new DataView(raw.buffer);
  const out = new Float64Array(e.tableSize);
  for (let i = 0; i < e.tableSize; i++) {
    const word = v.getBigUint64(i * 8);
    const off = Number(word & BME_TABLE_OFFSET_MASK);
    if (word & BME_TABLE_RESERVED_MASK || off % cs || (off && word & 1n))
      throw new QcowError('CORRUPT', `Bitmap '${e.name}': invalid bitmap table entry ${i} (0x${word.toString(16)})`, img.path);
    if (off && off + cs > img.fileSize) throw new QcowError('CORRUPT', `Bitmap '${e.name}': bitmap data cluster ${i} lies past the end of the file`, img.path);
    out[i] = off ? off : word & 1n ? -1 : 0;
  }
  return out;
}

/**
 * What QEMU checks when it opens an image (it loads every bitmap not in use): each such bitmap's
 * table must be readable with valid entries (no reserved bits, aligned offsets, the all-ones flag
 * only without an offset), else the open fails. Data clusters past the end of the file are left
 * to `check`, which counts them as QEMU does.
 */
export async function validateBitmapTables(img: Qcow2Image): Promise<void> {
  for (const e of img.bitmaps) {
    if (isInUse(e)) continue;
    const fail = () => new QcowError('CORRUPT', `Could not read bitmap_table table from image for bitmap '${e.name}': Invalid argument`, img.path);
    // Past the end of the file the table reads as zeros, as in QEMU (check then reports it).
    const raw = new Uint8Array(e.tableSize * 8);
    await img.file.readAt(raw, e.tableOffset);
    const v = new DataView(raw.buffer);
    for (let i = 0; i < e.tableSize; i++) {
      const word = v.getBigUint64(i * 8);
      const off = word & BME_TABLE_OFFSET_MASK;
      if (word & BME_TABLE_RESERVED_MASK || off % BigInt(img.clusterSize) || (off && word & 1n)) throw fail();
    }
  }
}

/** Host cluster runs (ascending table order, merged where contiguous) of a decoded table. */
function dataRuns(table: Float64Array, cs: number): ClusterRun[] {
  const runs: ClusterRun[] = [];
  for (let i = 0; i < table.length; i++) {
    const off = table[i]!;
    if (off <= 0) continue;
    const c = off / cs;
    const last = runs[runs.length - 1];
    if (last && last.first + last.count === c) last.count++;
    else runs.push({ first: c, count: 1 });
  }
  return runs;
}

/**
 * Loads a bitmap's contents into wasm memory. Reads are coalesced over host-contiguous data
 * clusters, several in flight; all-zero entries are never read, all-ones entries are filled.
 */
export async function loadBitmap(img: Qcow2Image, e: BitmapDirectoryEntry, opts: { signal?: AbortSignal | undefined; allowInUse?: boolean } = {}): Promise<LoadedBitmap> {
  if (isInUse(e) && !opts.allowInUse) throw inconsistent(e.name, img.path);
  const cs = img.clusterSize;
  const bits = bitmapBits(img.virtualSize, e.granularityBits);
  const expected = bitmapTableSize(img.virtualSize, e.granularityBits, cs);
  const table = await readBitmapTable(img, e);
  const bytes = Math.max(expected, 1) * cs;
  const k = kernels();
  const ptr = k.allocZeroed(bytes);
  let freed = false;
  const free = () => {
    if (!freed) k.free(ptr);
    freed = true;
  };
  try {
    // Coalesced reads: consecutive entries whose clusters are consecutive on the host.
    const reads: Array<{ index: number; count: number; host: number }> = [];
    const usable = Math.min(table.length, expected);
    for (let i = 0; i < usable; i++) {
      const off = table[i]!;
      if (off === 0) continue;
      if (off < 0) {
        k.u8(ptr + i * cs, cs).fill(0xff);
        continue;
      }
      const last = reads[reads.length - 1];
      if (last && last.index + last.count === i && last.host + last.count * cs === off && (last.count + 1) * cs <= IO_CHUNK) last.count++;
      else reads.push({ index: i, count: 1, host: off });
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
  return { entry: e, ptr, bytes, bits, granularity: 2 ** e.granularityBits, dataClusters: dataRuns(table, cs), free };
}

/** Dirty extents of a loaded bitmap in guest bytes (ascending, coalesced, clipped to the disk). */
export function bitmapExtents(bm: { ptr: number; bits: number; granularity: number }, diskSize: number): ByteExtent[] {
  const k = kernels();
  const MAX = 65536;
  const out = k.alloc(16 * MAX);
  const result: ByteExtent[] = [];
  try {
    let from = 0;
    for (;;) {
      const n = k.extents(bm.ptr, from, bm.bits, out, MAX);
      const f = new Float64Array(k.memory.buffer, out, n * 2);
      for (let i = 0; i < n; i++) {
        const start = f[i * 2]! * bm.granularity;
        const length = Math.min(diskSize, (f[i * 2]! + f[i * 2 + 1]!) * bm.granularity) - start;
        const last = result[result.length - 1];
        if (last && last.start + last.length === start) last.length += length;
        else result.push({ start, length });
      }
      if (n < MAX) break;
      from = k.extentsNext();
      if (from >= bm.bits) break;
    }
  } finally {
    k.free(out);
  }
  return result;
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

  get cs(): number {
    return this.img.clusterSize;
  }

  /** Checks QEMU's rules for a new bitmap (qcow2_co_can_store_new_dirty_bitmap and the QMP add). */
  checkNew(name: string, granularity: number): void {
    const img = this.img;
    if (!name) throw new QcowError('INVALID_ARGUMENT', 'Bitmap name cannot be empty', img.path);
    if (Buffer.byteLength(name) > MAX_BITMAP_NAME_BYTES) throw new QcowError('INVALID_ARGUMENT', 'Bitmap name is too long', img.path);
    if (img.bitmaps.some((b) => b.name === name)) throw new QcowError('INVALID_ARGUMENT', `Bitmap already exists: ${name}`, img.path);
    if (!Number.isSafeInteger(granularity) || granularity < 512 || granularity > 2 ** 31 || (granularity & (granularity - 1)) !== 0)
      throw new QcowError('INVALID_ARGUMENT', 'Granularity must be power of 2 and at least 512', img.path);
    if (img.bitmaps.length >= MAX_BITMAPS) throw new QcowError('INVALID_ARGUMENT', 'Maximum number of persistent bitmaps is already reached', img.path);
    const dirSize = img.bitmaps.reduce((n, b) => n + directoryEntrySize(b.name), 0);
    if (dirSize + directoryEntrySize(name) > MAX_BITMAP_DIRECTORY_SIZE) throw new QcowError('INVALID_ARGUMENT', 'Not enough space in the bitmap directory', img.path);
    const bytes = Math.ceil(bitmapBits(img.virtualSize, Math.log2(granularity)) / 8);
    if (bytes > MAX_BITMAP_DATA_BYTES) throw new QcowError('INVALID_ARGUMENT', `Too large bitmap: its data would take ${bytes} bytes (QEMU's limit is ${MAX_BITMAP_DATA_BYTES})`, img.path);
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
      release.push(...dataRuns(await readBitmapTable(this.img, e), this.cs));
    } catch (err) {
      if (!(err instanceof QcowError && err.code === 'CORRUPT')) throw err;
    }
    release.push({ first: e.tableOffset / this.cs, count: Math.ceil((e.tableSize * 8) / this.cs) });
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
    const old = await readBitmapTable(this.img, e);
    const tableOffset = await this.#writeTable(new Uint8Array(e.tableSize * 8));
    await this.#switchTable(e, tableOffset, [...dataRuns(old, this.cs)]);
  }

  /**
   * Stores new contents of a loaded bitmap crash-safely (see the module comment). The loaded
   * bitmap then describes the stored copy.
   */
  async store(bm: LoadedBitmap, opts: { signal?: AbortSignal | undefined } = {}): Promise<void> {
    const img = this.img;
    const e = img.bitmaps.find((b) => b.name === bm.entry.name);
    if (!e || e.tableOffset !== bm.entry.tableOffset) throw new QcowError('INTERNAL', `bitmap '${bm.entry.name}' changed since it was loaded`, img.path);
    const cs = this.cs;
    const k = kernels();
    const n = e.tableSize;
    // Which bitmap clusters hold a set bit: one kernel pass.
    const zmap = k.allocZeroed(Math.ceil(n / 8) + 16);
    let nonZero: number[];
    try {
      k.zeroBlocks(bm.ptr, n * cs, Math.log2(cs), zmap);
      const z = k.u8(zmap, Math.ceil(n / 8));
      nonZero = [];
      for (let i = 0; i < n; i++) if (!(z[i >> 3]! & (1 << (i & 7)))) nonZero.push(i);
    } finally {
      k.free(zmap);
    }
    const table = new Uint8Array(n * 8);
    const tv = new DataView(table.buffer);
    const writes: Array<{ index: number; count: number; host: number }> = [];
    if (nonZero.length) {
      const runs = await this.w.allocator.allocate(nonZero.length);
      let j = 0;
      for (const r of runs) {
        img.noteFileEnd((r.first + r.count) * cs);
        for (let c = 0; c < r.count; c++, j++) {
          const i = nonZero[j]!;
          const host = (r.first + c) * cs;
          tv.setBigUint64(i * 8, BigInt(host));
          const last = writes[writes.length - 1];
          if (last && last.index + last.count === i && last.host + last.count * cs === host && (last.count + 1) * cs <= IO_CHUNK) last.count++;
          else writes.push({ index: i, count: 1, host });
        }
      }
    }
    await inParallel(writes, IO_IN_FLIGHT, async (wr) => {
      throwIfAborted(opts.signal, img.path);
      await img.file.writeAt(k.u8(bm.ptr + wr.index * cs, wr.count * cs), wr.host);
    });
    const tableOffset = await this.#writeTable(table);
    const old = bm.dataClusters.map((r) => ({ ...r }));
    await this.#switchTable(e, tableOffset, old);
    // The loaded copy now describes what is on disk.
    (bm as { entry: BitmapDirectoryEntry }).entry = img.bitmaps.find((b) => b.name === e.name)!;
    (bm as { dataClusters: ClusterRun[] }).dataClusters = dataRuns(readTableBytes(table, cs), cs);
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

  /** Everything written so far durable, refcounts of the new clusters included. */
  async #durable(): Promise<void> {
    await this.w.refcountCache.writeBack();
    await this.img.file.flush();
  }

  /**
   * Points entry `e` at a new table with one 8-byte in-place write of its table_offset, durably,
   * then releases the old table and `oldData`.
   */
  async #switchTable(e: BitmapDirectoryEntry, tableOffset: number, oldData: ClusterRun[]): Promise<void> {
    const img = this.img;
    const ext = img.header.bitmaps!;
    await this.#durable();
    let pos = ext.directoryOffset;
    for (const b of img.bitmaps) {
      if (b === e) break;
      pos += directoryEntrySize(b.name);
    }
    const buf = new Uint8Array(8);
    new DataView(buf.buffer).setBigUint64(0, BigInt(tableOffset));
    await img.file.writeAt(buf, pos);
    await img.file.flush();
    const oldTable = { first: e.tableOffset / this.cs, count: Math.ceil((e.tableSize * 8) / this.cs) };
    const i = img.bitmaps.indexOf(e);
    img.bitmaps[i] = { ...e, tableOffset };
    await this.#release([...oldData, oldTable]);
  }

  /**
   * Writes a new directory with `entries` (or drops the extension when empty), switches the
   * header to it durably, then releases the old directory and `release`.
   */
  async #writeDirectory(entries: BitmapDirectoryEntry[], release: ClusterRun[]): Promise<void> {
    const img = this.img;
    const cs = this.cs;
    const old = img.header.bitmaps;
    for (const e of entries) {
      if (e.flags & ~(BME_FLAG_IN_USE | BME_FLAG_AUTO) || e.type !== BITMAP_TYPE_DIRTY || e.extraData.length)
        throw new QcowError('INTERNAL', `bitmap '${e.name}' would not satisfy QEMU's constraints`, img.path);
    }
    if (entries.length) {
      const dir = encodeBitmapDirectory(entries);
      const clusters = Math.ceil(dir.length / cs);
      const at = await this.w.allocator.allocateBytes(clusters * cs);
      img.noteFileEnd(at + clusters * cs);
      const padded = new Uint8Array(clusters * cs);
      padded.set(dir);
      await img.file.writeAt(padded, at);
      await this.#durable();
      await this.w.header.setBitmapsExtension({ nbBitmaps: entries.length, directorySize: dir.length, directoryOffset: at });
    } else {
      await this.#durable();
      await this.w.header.setBitmapsExtension(undefined);
    }
    img.bitmaps.splice(0, img.bitmaps.length, ...entries);
    const all = [...release];
    if (old) all.push({ first: old.directoryOffset / cs, count: Math.ceil(old.directorySize / cs) });
    await this.#release(all);
  }

  /** Drops one reference from each run (after the switch that made them unreachable is durable). */
  async #release(runs: ClusterRun[]): Promise<void> {
    for (const r of runs) if (r.count > 0) await this.w.refcounts.update(r.first, r.count, -1);
  }

  /** Makes everything durable and ends the write batch (dirty bit cleared, caches freed). */
  async close(): Promise<void> {
    await this.img.endWrites();
  }
}

function readTableBytes(table: Uint8Array, cs: number): Float64Array {
  const v = new DataView(table.buffer, table.byteOffset, table.byteLength);
  const out = new Float64Array(table.length / 8);
  for (let i = 0; i < out.length; i++) out[i] = Number(v.getBigUint64(i * 8) & BME_TABLE_OFFSET_MASK);
  void cs;
  return out;
}

/**
 * Marks every enabled, not in-use bitmap of a writable image dirty for the guest ranges (call it
 * before the data is written: a superset of dirty bits is harmless, a missing one loses data).
 * Returns the names of the bitmaps marked.
 */
export async function markBitmapsDirty(img: Qcow2Image, ranges: ReadonlyArray<ByteExtent>, opts: { signal?: AbortSignal | undefined } = {}): Promise<string[]> {
  const targets = img.bitmaps.filter((b) => isEnabled(b) && !isInUse(b));
  if (!targets.length || !ranges.some((r) => r.length > 0)) return [];
  const store = await BitmapStore.open(img);
  const done: string[] = [];
  for (const t of targets) {
    const bm = await loadBitmap(img, t, opts);
    try {
      setRanges(bm, ranges);
      await store.store(bm, opts);
      done.push(t.name);
    } finally {
      bm.free();
    }
  }
  return done;
}
