/**
 * Qcow2Writer: everything an image opened for writing needs, owned in one place — the metadata
 * caches (L2 tables, refcount blocks) with their declared ordering, the refcount manager, the
 * allocator, the discard queue and the header writer — and the guest-level primitives built on
 * them: write, writeZeroes, discard. COPIED flags, subclusters (extended L2), compressed clusters
 * (always replaced, never written in place) and copy-on-write from the backing chain are handled
 * here and nowhere else.
 *
 * Crash safety comes from the order of durable states, never from where a caller flushes:
 * - new clusters: refcount raised (refcount cache) -> data written -> L2 entry (the L2 cache
 *   depends on the refcount cache and on a data flush);
 * - dropped references: L2 entry changed -> refcount lowered (the refcount cache depends on the
 *   L2 cache) -> freed clusters punched only after the lowered refcount is durable;
 * - L1 entries and header fields are written straight to the file, after the tables they point
 *   at are durable, and flushed before anything they used to point at is released.
 * The v3 dirty bit is set before the first change and cleared by a clean `close`.
 */
import { QcowError, throwIfAborted } from '../errors.js';
import type { ImageFile } from '../io/file.js';
import { hostRuns } from '../io/host-runs.js';
import { WriteFence } from '../io/write-fence.js';
import { kernels, L2_RUN_BYTES, reserveForLargeWork, RunKind } from '../kernels/index.js';
import { dataView, setU64 } from '../format/bytes.js';
import { INCOMPAT_CORRUPT } from '../format/constants.js';
import { minL1Size } from '../format/header.js';
import { MetadataCache } from './cache.js';
import { ClusterAllocator, type ClusterRun } from './allocator.js';
import { DiscardQueue } from './discard-queue.js';
import { HeaderWriter } from './header-writer.js';
import { RefcountManager } from './refcount-manager.js';
import { compressCluster } from './compressed.js';
import { assertCanGrow, prepareBitmapGrowth } from './bitmaps.js';
import type { Qcow2Image } from './image.js';

const COPIED_HI = 0x80000000;
const L2_CACHE_TABLES = 256;
const REFCOUNT_CACHE_BLOCKS = 256;
const MAX_RUNS = 1024;
/** How far the file grows ahead of need (see #cover). */
const GROW_AHEAD_MIN = 64 * 1024 * 1024;
const GROW_AHEAD_MAX = 1024 * 1024 * 1024;
const ALL_SUBCLUSTERS = 0xffffffff;

/** One L2 run as the scan kernel reports it. */
interface Run {
  unit: number;
  units: number;
  kind: RunKind;
  copied: boolean;
  host: number;
  extra: number;
}

/** What a round of writes does to one L2 table. */
interface TablePlan {
  tableOff: number;
  tableStart: number;
  newMaps: Array<{ seg: Segment; runs: ClusterRun[]; from: number; to: number }>;
  inPlaceFixes: Array<{ seg: Segment; xs: number; xe: number }>;
}

/** Consecutive clusters of one table that a write treats alike. */
interface Segment {
  firstCluster: number;
  count: number;
  /** Allocated here with refcount 1 (COPIED), not compressed: written where it is. */
  inPlace: boolean;
  /** In place: host offset of the first cluster (contiguous). */
  host: number;
  /** Standard L2 in place: the cluster carries the zero flag. */
  zeroFlag: boolean;
  /** References the new mapping drops: host cluster runs and compressed byte ranges. */
  oldClusters: ClusterRun[];
}

export interface ZeroOptions {
  /** Release the host clusters (the range reads as zeros either way). */
  unmap?: boolean;
}

export class Qcow2Writer {
  readonly l2Cache: MetadataCache;
  readonly refcountCache: MetadataCache;
  readonly discards: DiscardQueue;
  readonly header: HeaderWriter;
  readonly refcounts: RefcountManager;
  readonly allocator: ClusterAllocator;
  readonly cs: number;
  readonly #img: Qcow2Image;
  #queue: Promise<unknown> = Promise.resolve();
  #started = false;
  #failed = false;

  /** The image's file with write-behind for guest data (see #writeData); every write and flush goes through it. */
  readonly #fence: WriteFence;

  private constructor(img: Qcow2Image, fence: WriteFence, header: HeaderWriter, refcounts: RefcountManager, discards: DiscardQueue) {
    this.#img = img;
    this.#fence = fence;
    this.cs = img.clusterSize;
    this.header = header;
    this.refcounts = refcounts;
    this.discards = discards;
    this.l2Cache = refcounts.l2Cache!;
    this.refcountCache = refcounts.cache;
    this.allocator = new ClusterAllocator(refcounts, discards, Math.ceil(img.fileSize / img.clusterSize), img.path);
    this.#fileEnd = img.fileSize;
    this.#needed = img.fileSize;
    this.allocator.beforeRaise = (end) => this.#cover(end);
    this.allocator.contentBytes = () => this.#needed;
  }

  /** Bytes the file is known to cover. */
  #fileEnd: number;
  /** Bytes the allocations made so far need (the file may cover more: see #cover). */
  #needed: number;

  /**
   * Clusters handed out past the end of the file: the file is extended to cover them, and that
   * is durable before any raised refcount reaches the file. Otherwise a crash could leave a
   * refcount of 1 past the end of the file, a leak that no check reports or repairs (qemu-img
   * check looks only inside the file) and that shows up once the file grows over it.
   *
   * The file grows ahead of need (a quarter of its size, 64 MiB to 1 GiB, sparse): on ext4 a
   * size change waits for every direct write in flight on the file (inode_dio_wait), so one per
   * batch of a copy stalled the copy behind its own writes. close() cuts what was not used; a
   * crash leaves a sparse tail of free clusters, which checks accept and allocations reuse.
   */
  async #cover(endCluster: number): Promise<void> {
    const bytes = endCluster * this.cs;
    this.#needed = Math.max(this.#needed, bytes);
    if (bytes <= this.#fileEnd) return;
    const size = await this.file.size();
    if (bytes <= size) {
      this.#fileEnd = size;
      return;
    }
    const ahead = Math.min(GROW_AHEAD_MAX, Math.max(GROW_AHEAD_MIN, Math.floor(size / 4)));
    const target = Math.max(bytes, Math.ceil((size + ahead) / this.cs) * this.cs);
    await this.file.truncate(target);
    this.#fileEnd = target;
    this.refcountCache.dependsOnFlush();
  }

  /**
   * Cuts the part of the file grown ahead and not used: after the last flush, up to the last
   * cluster with a refcount (a refcount area built meanwhile may lie in that part).
   */
  async #trimAhead(): Promise<void> {
    if (this.#fileEnd <= this.#needed) return;
    const cs = this.cs;
    const size = await this.file.size();
    const to = Math.ceil(size / cs);
    let used = Math.ceil(this.#needed / cs); // one past the last cluster in use
    for (let c = used; c < to; ) {
      const z = await this.refcounts.zeroRun(c, to - c);
      if (z.start > c) used = Math.min(z.start, to);
      if (z.start >= to) break;
      c = z.start + z.length;
    }
    const length = Math.max(this.#needed, used * cs);
    if (length < size) await this.file.truncate(length);
    this.#fileEnd = this.#needed = Math.min(size, length);
  }

  static async open(img: Qcow2Image): Promise<Qcow2Writer> {
    const file = img.file;
    if (!file.writable) throw new QcowError('INTERNAL', 'image was not opened for writing', img.path);
    if (img.header.incompatibleFeatures & INCOMPAT_CORRUPT)
      throw new QcowError('CORRUPT', 'Image is marked corrupt; repair it first (qcowkit check -r all)', img.path);
    const cs = img.clusterSize;
    const fence = new WriteFence(file);
    const header = HeaderWriter.for(fence, img.header);
    const l2Cache = new MetadataCache('L2', fence, cs, L2_CACHE_TABLES);
    const refcountCache = new MetadataCache('refcount', fence, cs, REFCOUNT_CACHE_BLOCKS);
    const discards = new DiscardQueue();
    const refcounts = await RefcountManager.open(fence, img.header, refcountCache, l2Cache, header, discards);
    return new Qcow2Writer(img, fence, header, refcounts, discards);
  }

  get file(): ImageFile {
    return this.#fence;
  }

  /** An operation failed: nothing more is written (see `abandon`). */
  get failed(): boolean {
    return this.#failed;
  }

  /** Runs one operation at a time (callers may fire several; the engine is not re-entrant). */
  #serial<T>(fn: () => Promise<T>, start = true): Promise<T> {
    const run = this.#queue.then(async () => {
      if (this.#failed) throw new QcowError('IO', 'an earlier write failed; the image must be reopened', this.#img.path);
      try {
        if (start && !this.#started) await this.#start();
        return await fn();
      } catch (e) {
        this.#failed = true;
        throw e;
      }
    });
    this.#queue = run.catch(() => {});
    return run;
  }

  /** Before the first change: the dirty bit (v3) and the spec's rule on unknown autoclear bits. */
  async #start(): Promise<void> {
    this.#started = true;
    // Guest-level work has metadata and data reads landing in wasm memory while others are in
    // flight: no growth under them. Bitmap stores and other step-by-step metadata changes never
    // get here: they allocate before their I/O starts, and skip the reservation (growing wasm
    // memory by 1 GiB costs V8 a mark-compact GC, a few ms of a short command).
    reserveForLargeWork();
    await this.header.clearUnknownAutoclear();
    await this.header.markDirty();
  }

  // --- public primitives ---------------------------------------------------------------------------

  write(offset: number, data: Uint8Array): Promise<void> {
    return this.#serial(async () => {
      this.#checkRange(offset, data.length);
      await this.#forEachTable(offset, data.length, (l1i, s, e) => this.#writeInTable(l1i, s, data.subarray(s - offset, e - offset)));
    });
  }

  /**
   * Writes several disjoint guest ranges as one batch: one allocation for all the clusters the
   * batch needs (they come out contiguous, in guest order, where the free space allows), one
   * vectored write per contiguous host run, all in flight together, then the table updates.
   * Ranges that share a cluster go in separate rounds (the later one sees the earlier one's
   * result). Same result as one `write` per item.
   */
  writeMany(items: ReadonlyArray<{ offset: number; data: Uint8Array }>): Promise<void> {
    // The data is written behind: the next operation may start while it is in flight (flushes
    // wait for it, see WriteFence); this call returns once it has been written.
    const behind: Array<Promise<void>> = [];
    const op = this.#serial(async () => {
      const sorted = items.filter((i) => i.data.length).sort((a, b) => a.offset - b.offset);
      sorted.forEach((it, i) => {
        this.#checkRange(it.offset, it.data.length);
        const prev = sorted[i - 1];
        if (prev && prev.offset + prev.data.length > it.offset)
          throw new QcowError('INVALID_ARGUMENT', `writeMany: ranges at ${prev.offset} and ${it.offset} overlap`, this.#img.path);
      });
      const span = this.#img.l2Span;
      const cs = this.cs;
      let round: Array<{ l1i: number; ranges: Array<{ s: number; data: Uint8Array }> }> = [];
      let lastCluster = -1;
      for (const it of sorted) {
        for (let s = it.offset; s < it.offset + it.data.length; ) {
          const l1i = Math.floor(s / span);
          const e = Math.min(it.offset + it.data.length, (l1i + 1) * span);
          const piece = { s, data: it.data.subarray(s - it.offset, e - it.offset) };
          if (Math.floor(s / cs) <= lastCluster) {
            await this.#writeRound(round, behind);
            round = [];
          }
          const group = round[round.length - 1];
          if (group && group.l1i === l1i) group.ranges.push(piece);
          else round.push({ l1i, ranges: [piece] });
          lastCluster = Math.ceil(e / cs) - 1;
          s = e;
        }
      }
      if (round.length) await this.#writeRound(round, behind);
    });
    return op.then(
      async () => {
        for (const d of await Promise.allSettled(behind)) if (d.status === 'rejected') throw d.reason;
      },
      async (e: unknown) => {
        await Promise.allSettled(behind); // the caller's buffers are in use until then
        throw e;
      },
    );
  }

  /**
   * Writes one whole guest cluster compressed (QEMU's compressed-cluster encoding). The
   * compressed bytes go to newly allocated bytes packed after the previous compressed cluster
   * (never in place); every host cluster they touch gets a reference; the old mapping of the
   * guest cluster (data, zero, compressed, shared or not) is dropped after the new entry, as for
   * any write. Clusters that do not compress to less than a cluster are written as plain data.
   * `cluster` is always a full cluster; for the disk's partial last cluster the bytes past the
   * end are ignored by readers (QEMU pads with zeros the same way).
   */
  writeCompressed(offset: number, cluster: Uint8Array): Promise<void> {
    return this.#serial(async () => {
      const img = this.#img;
      const cs = this.cs;
      if (offset % cs !== 0 || cluster.length !== cs || offset < 0 || offset >= img.virtualSize)
        throw new QcowError('INVALID_ARGUMENT', `compressed writes take one whole cluster at a cluster boundary (offset ${offset}, ${cluster.length} bytes)`, img.path);
      const packed = await compressCluster(cluster, img.header.compressionType, img.path);
      const inside = Math.min(cs, img.virtualSize - offset);
      if (!packed) {
        await this.#forEachTable(offset, inside, (l1i, s, e) => this.#writeInTable(l1i, s, cluster.subarray(0, e - s)));
        return;
      }
      const l1i = Math.floor(offset / img.l2Span);
      const index = (offset - l1i * img.l2Span) / cs;
      const tableOff = await this.#l2ForWrite(l1i);
      this.l2Cache.pin(tableOff);
      try {
        const [seg] = this.#segments(await this.l2Cache.get(tableOff), index, 1);
        const old = seg!.inPlace ? [{ first: seg!.host / cs, count: 1 }] : seg!.oldClusters;
        const at = await this.allocator.allocateCompressedBytes(packed.length);
        const x = 62 - (img.clusterBits - 8);
        if (at + packed.length > 2 ** x) throw new QcowError('UNSUPPORTED', `compressed data would lie beyond the ${2 ** x}-byte limit of this cluster size`, img.path);
        img.noteFileEnd(at + packed.length);
        await this.file.writeAt(packed, at);
        // The entry may point at the bytes only once they and their refcounts are durable.
        this.l2Cache.dependsOnFlush();
        await this.l2Cache.dependsOn(this.refcountCache);
        const sectors = Math.floor((at + packed.length - 1) / 512) - Math.floor(at / 512);
        const entry = (1n << 62n) | (BigInt(sectors) << BigInt(x)) | BigInt(at);
        const tptr = await this.l2Cache.get(tableOff);
        const v = new DataView(kernels().memory.buffer);
        const pos = tptr + index * (img.extendedL2 ? 16 : 8);
        v.setBigUint64(pos, entry);
        if (img.extendedL2) v.setBigUint64(pos + 8, 0n);
        this.l2Cache.markDirty(tableOff);
        for (const r of old) await this.refcounts.update(r.first, r.count, -1);
        img.invalidateReadCaches();
      } finally {
        this.l2Cache.unpin(tableOff);
      }
    });
  }

  writeZeroes(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    return this.#serial(async () => {
      this.#checkRange(offset, length);
      await this.#zeroOrDiscard(offset, length, opts.unmap ? 'zero-unmap' : 'zero');
    });
  }

  /** Drops the mapping of whole clusters (subclusters with extended L2): they read from the backing file again. */
  discard(offset: number, length: number): Promise<void> {
    return this.#serial(async () => {
      this.#checkRange(offset, length);
      await this.#zeroOrDiscard(offset, length, 'discard');
    });
  }

  /**
   * Grows the virtual disk to `size` bytes: a bigger L1 table when needed (written, made durable,
   * then switched to by one header write; the old one is released after), then the size field.
   */
  resize(size: number): Promise<void> {
    // What the bitmaps refuse (in-use ones, as QEMU) is refused before anything is written.
    try {
      if (size > this.#img.virtualSize) assertCanGrow(this.#img, size);
    } catch (e) {
      return Promise.reject(e);
    }
    return this.#serial(async () => {
      const img = this.#img;
      if (size < img.virtualSize) throw new QcowError('UNSUPPORTED', 'shrinking an image is not supported', img.path);
      if (size === img.virtualSize) return;
      if (img.header.version === 2 && img.snapshots.length) throw new QcowError('UNSUPPORTED', "can't resize a v2 image which has snapshots", img.path);
      // Persistent bitmaps grow with the disk, the new range clean (as QEMU's resize): their new
      // tables and directory are durable first, then one header write switches the size and the
      // directory together (bitmaps.ts).
      const bitmaps = img.bitmaps.length ? await prepareBitmapGrowth(img, this, size) : undefined;
      const need = minL1Size(size, img.clusterBits, img.extendedL2);
      const oldSize = img.l1.offsets.length;
      if (need > oldSize) {
        const at = await this.allocator.allocateBytes(need * 8);
        img.noteFileEnd(at + Math.ceil((need * 8) / this.cs) * this.cs);
        const buf = new Uint8Array(Math.ceil((need * 8) / this.cs) * this.cs);
        const v = dataView(buf);
        const offsets = new Float64Array(need);
        const copied = new Uint8Array(need);
        offsets.set(img.l1.offsets);
        copied.set(img.l1.copied);
        for (let i = 0; i < oldSize; i++) {
          if (!offsets[i]) continue;
          setU64(v, i * 8, offsets[i]!);
          if (copied[i]) v.setUint32(i * 8, v.getUint32(i * 8) | COPIED_HI);
        }
        // The new table's clusters are counted durably before the header points at them.
        await this.refcountCache.flush();
        await this.file.writeAt(buf, at);
        await this.file.flush();
        // (Read before the switch: the header writer updates img.header in place.)
        const oldOffset = img.header.l1TableOffset;
        await this.header.setL1Table(at, need);
        img.l1 = { offsets, copied, invalid: img.l1.invalid };
        if (oldOffset && oldSize) await this.refcounts.update(oldOffset / this.cs, Math.ceil((oldSize * 8) / this.cs), -1);
      }
      const oldVirtual = img.virtualSize;
      if (bitmaps) await bitmaps.commit();
      else await this.header.setSize(size);
      // As QEMU: the grown area reads as zeros, not as whatever the backing file has there.
      if (img.backingName) await this.#zeroOrDiscard(oldVirtual, img.virtualSize - oldVirtual, 'zero');
    });
  }

  /**
   * Drops every guest mapping of the active L1 table (snapshots keep theirs): the L1 table is
   * zeroed durably first, then the L2 tables and the data clusters they reached lose one
   * reference each (clusters a snapshot still uses stay), and what reaches 0 is punched after the
   * lowered refcounts are durable. Returns the guest-visible clusters dropped.
   */
  emptyActive(opts: { signal?: AbortSignal | undefined } = {}): Promise<{ tables: number; clusters: number }> {
    return this.#serial(async () => {
      const img = this.#img;
      const tables: Array<{ offset: number; refs: ClusterRun[] }> = [];
      let clusters = 0;
      for (let i = 0; i < img.l1.offsets.length; i++) {
        throwIfAborted(opts.signal, img.path);
        const off = img.l2Offset(i);
        if (!off) continue;
        const ptr = await this.l2Cache.get(off);
        const refs = this.#tableRefs(ptr);
        for (const r of refs) clusters += r.count;
        tables.push({ offset: off, refs });
      }
      if (!tables.length) return { tables: 0, clusters: 0 };
      // Unreachable first (a crash from here on leaks, never corrupts).
      const l1Bytes = img.l1.offsets.length * 8;
      await this.file.writeAt(new Uint8Array(l1Bytes), img.header.l1TableOffset);
      await this.file.flush();
      img.l1.offsets.fill(0);
      img.l1.copied.fill(0);
      // In host order, runs joined: guest order is scattered on the host (one run per cluster),
      // sorted the data of a whole image is a few runs (one refcount update and discard each).
      // Runs of compressed clusters sharing a host cluster stay separate: one reference each.
      const all: ClusterRun[] = [];
      for (const t of tables) for (const r of t.refs) all.push(r);
      all.sort((a, b) => a.first - b.first);
      const runs: ClusterRun[] = [];
      mergeRuns(runs, all);
      for (let i = 0; i < runs.length; i++) {
        if (i % 4096 === 0) throwIfAborted(opts.signal, img.path);
        await this.refcounts.update(runs[i]!.first, runs[i]!.count, -1);
      }
      for (const t of tables) {
        await this.refcounts.update(t.offset / this.cs, 1, -1);
        if ((await this.refcounts.get(t.offset / this.cs)) === 0) this.l2Cache.forget(t.offset);
      }
      img.invalidateReadCaches();
      await this.#flushAll();
      return { tables: tables.length, clusters };
    });
  }

  /**
   * Gives unused space back: the file is cut after the last cluster in use, and every free range
   * inside is punched. Returns the new file length.
   */
  trim(): Promise<number> {
    return this.#serial(async () => {
      await this.#flushAll();
      const cs = this.cs;
      const holes: ClusterRun[] = [];
      const fileClusters = Math.ceil((await this.file.size()) / cs);
      for (let c = 1; c < fileClusters; ) {
        const z = await this.refcounts.zeroRun(c, fileClusters - c);
        if (z.start >= fileClusters || z.length <= 0) break;
        holes.push({ first: z.start, count: Math.min(z.length, fileClusters - z.start) });
        c = z.start + z.length;
      }
      const end = lastUsed(holes, fileClusters);
      for (const h of holes) {
        if (h.first >= end) break;
        try {
          await this.file.punchHole(h.first * cs, Math.min(h.count, end - h.first) * cs);
        } catch {
          // advisory
        }
      }
      const length = end * cs;
      if (length < (await this.file.size())) await this.file.truncate(length);
      this.#fileEnd = this.#needed = length;
      return length;
    });
  }

  /**
   * Makes everything written so far durable, then punches the clusters freed meanwhile and cuts
   * what the file grew ahead of need (the file's length is then the operation's result).
   */
  flush(): Promise<void> {
    return this.#serial(async () => {
      await this.#flushAll();
      await this.#trimAhead();
    });
  }

  /**
   * Flushes, clears the dirty bit and frees the caches. A writer whose batch never started (only
   * metadata changes ordered step by step, as bitmap stores make them) is flushed without ever
   * setting the dirty bit. `durable: false` is for such a writer whose every change was made
   * durable when it was switched to (bitmap stores): what is left to write is lowered refcounts
   * of clusters nothing durable points at any more, written (and those clusters punched) without
   * a final flush — a crash can only leak them.
   */
  close(opts: { durable?: boolean } = {}): Promise<void> {
    return this.#serial(async () => {
      await this.#flushAll(opts.durable !== false || this.#started);
      await this.#trimAhead();
      await this.header.markClean();
      this.l2Cache.clear();
      this.refcountCache.clear();
    }, false);
  }

  /** After a failure: frees memory, writes nothing more (the image stays dirty: check -r repairs leaks). */
  abandon(): void {
    this.#failed = true;
    this.l2Cache.discardAll();
    this.refcountCache.discardAll();
  }

  async #flushAll(durable = true): Promise<void> {
    await this.l2Cache.writeBack();
    await this.refcountCache.writeBack();
    if (durable) await this.file.flush();
    for (const [first, end] of this.discards.take()) {
      try {
        await this.file.punchHole(first * this.cs, (end - first) * this.cs);
      } catch (e) {
        // Advisory: the clusters are free either way. Only a failed punch is ignored; anything
        // else (the process dying under a fault harness) goes on.
        if (!(e instanceof QcowError)) throw e;
      }
      this.allocator.noteFreed(first);
    }
  }

  // --- structure ------------------------------------------------------------------------------------

  #checkRange(offset: number, length: number): void {
    const size = this.#img.virtualSize;
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > size)
      throw new QcowError('INVALID_ARGUMENT', `guest range ${offset}+${length} lies outside the disk (${size} bytes)`, this.#img.path);
  }

  async #forEachTable(offset: number, length: number, fn: (l1Index: number, start: number, end: number) => Promise<void>): Promise<void> {
    const span = this.#img.l2Span;
    for (let s = offset; s < offset + length; ) {
      const l1i = Math.floor(s / span);
      const e = Math.min(offset + length, (l1i + 1) * span);
      await fn(l1i, s, e);
      s = e;
    }
  }

  /** Writes L1 entry i (its 512-byte sector) and flushes. */
  async #setL1Entry(i: number, offset: number, copied: boolean): Promise<void> {
    const img = this.#img;
    img.l1.offsets[i] = offset;
    img.l1.copied[i] = copied && offset ? 1 : 0;
    const first = Math.floor(i / 64) * 64;
    const n = Math.min(64, img.l1.offsets.length - first);
    const buf = new Uint8Array(n * 8);
    const v = dataView(buf);
    for (let j = 0; j < n; j++) {
      const off = img.l1.offsets[first + j]!;
      if (!off) continue;
      setU64(v, j * 8, off);
      if (img.l1.copied[first + j]) v.setUint32(j * 8, v.getUint32(j * 8) | COPIED_HI);
    }
    await this.file.writeAt(buf, img.header.l1TableOffset + first * 8);
    await this.file.flush();
  }

  /** The host offset of a writable (refcount 1) L2 table for L1 entry i, created or copied as needed. */
  async #l2ForWrite(i: number): Promise<number> {
    const img = this.#img;
    if (i >= img.l1.offsets.length) throw new QcowError('INTERNAL', `L1 index ${i} beyond the L1 table`, img.path);
    const old = img.l2Offset(i);
    if (old && img.l1.copied[i]) return old;
    if (old && (await this.refcounts.get(old / this.cs)) === 1) {
      await this.#setL1Entry(i, old, true); // the COPIED flag was merely missing
      return old;
    }
    // A new table: empty, or a copy of one shared with a snapshot (its data stays shared).
    const at = await this.allocator.allocateBytes(this.cs);
    img.noteFileEnd(at + this.cs);
    const ptr = await this.l2Cache.create(at);
    if (old) {
      const src = await this.l2Cache.get(old);
      kernels().u8(this.l2Cache.peek(at)!, this.cs).set(kernels().u8(src, this.cs));
    }
    void ptr;
    await this.l2Cache.dependsOn(this.refcountCache);
    await this.l2Cache.flush();
    await this.#setL1Entry(i, at, true);
    if (old) {
      await this.refcounts.update(old / this.cs, 1, -1);
    }
    return at;
  }

  /**
   * Runs the scan kernel over entries [first, first+count) of the table at ptr and hands each run
   * to `visit` as the kernel wrote it (run r: u32[r*8 ..] unit, units, kind, copied; f64[r*4 + 2]
   * host, f64[r*4 + 3] extra); invalid entries throw.
   */
  #scanRuns(ptr: number, first: number, count: number, visit: (u32: Uint32Array, f64: Float64Array, r: number) => void): void {
    const img = this.#img;
    const k = kernels();
    const out = k.alloc(MAX_RUNS * L2_RUN_BYTES);
    try {
      while (count > 0) {
        const n = k.l2Scan(ptr, first, count, img.extendedL2, img.clusterBits, out, MAX_RUNS);
        const consumed = k.scanConsumed();
        const u32 = new Uint32Array(k.memory.buffer, out, n * 8);
        const f64 = new Float64Array(k.memory.buffer, out, n * 4);
        for (let r = 0; r < n; r++) {
          if ((u32[r * 8 + 2]! as RunKind) === RunKind.Invalid) throw new QcowError('CORRUPT', `Invalid L2 entry (index ${Math.floor(u32[r * 8]! / (img.extendedL2 ? 32 : 1))})`, img.path);
          visit(u32, f64, r);
        }
        if (consumed === 0) throw new QcowError('INTERNAL', 'L2 scan made no progress', img.path);
        first += consumed;
        count -= consumed;
      }
    } finally {
      k.free(out);
    }
  }

  /** The kernel's runs for entries [first, first+count) of the table at ptr. */
  #runs(ptr: number, first: number, count: number): Run[] {
    const runs: Run[] = [];
    this.#scanRuns(ptr, first, count, (u32, f64, r) => {
      runs.push({ unit: u32[r * 8]!, units: u32[r * 8 + 1]!, kind: u32[r * 8 + 2]! as RunKind, copied: u32[r * 8 + 3] === 1, host: f64[r * 4 + 2]!, extra: f64[r * 4 + 3]! });
    });
    return runs;
  }

  /**
   * The host clusters a table's entries reference, one reference per entry, as runs (adjacent
   * ones joined; the clusters of compressed entries sharing a host cluster stay separate runs).
   * Straight from the scan kernel's output (no Run objects): an emptied image has one run per
   * scattered cluster.
   */
  #tableRefs(ptr: number): ClusterRun[] {
    const cs = this.cs;
    const per = this.#img.extendedL2 ? 32 : 1;
    const sub = cs / per;
    const refs: ClusterRun[] = [];
    let doneTo = 0; // guest clusters below this are counted (extended L2: several runs per cluster)
    this.#scanRuns(ptr, 0, this.#img.l2Entries, (u32, f64, r) => {
      const unit = u32[r * 8]!;
      const host = f64[r * 4 + 2]!;
      if ((u32[r * 8 + 2]! as RunKind) === RunKind.Compressed) {
        const a = Math.floor(host / cs);
        mergeRun(refs, a, Math.floor((host + f64[r * 4 + 3]! - 1) / cs) - a + 1);
        doneTo = Math.max(doneTo, Math.floor(unit / per) + 1);
        return;
      }
      if (!host) return;
      let c0 = Math.floor(unit / per);
      const c1 = Math.ceil((unit + u32[r * 8 + 1]!) / per);
      let clusterHost = (host - (unit % per) * sub) / cs;
      if (c0 < doneTo) {
        clusterHost += doneTo - c0;
        c0 = doneTo;
      }
      if (c1 > c0) mergeRun(refs, clusterHost, c1 - c0);
      doneTo = Math.max(doneTo, c1);
    });
    return refs;
  }

  /** Clusters [first, first+count) of a table grouped by how a write treats them. */
  #segments(ptr: number, first: number, count: number): Segment[] {
    const img = this.#img;
    const cs = this.cs;
    const per = img.extendedL2 ? 32 : 1;
    const sub = cs / per;
    const segs: Segment[] = [];
    // oldHost: first old host cluster of a shared mapping, 0 for none, -1 for compressed.
    const add = (cluster: number, n: number, inPlace: boolean, host: number, zeroFlag: boolean, old: ClusterRun[], oldHost: number) => {
      const last = segs[segs.length - 1];
      if (last && last.firstCluster + last.count > cluster) {
        // Extended L2: another run of the same cluster (same host, same COPIED): already counted.
        const overlap = last.firstCluster + last.count - cluster;
        if (n <= overlap) return;
        cluster += overlap;
        n -= overlap;
        if (inPlace) host += overlap * cs;
        old = shiftRuns(old, overlap);
        if (oldHost > 0) oldHost += overlap;
      }
      const lastOld = last?.oldClusters[0];
      const mergeable =
        last &&
        last.firstCluster + last.count === cluster &&
        last.inPlace === inPlace &&
        last.zeroFlag === zeroFlag &&
        (inPlace
          ? host === last.host + last.count * cs
          : oldHost === 0
            ? last.oldClusters.length === 0
            : oldHost > 0 && last.oldClusters.length === 1 && lastOld!.count === last.count && lastOld!.first + lastOld!.count === oldHost);
      if (mergeable) {
        last.count += n;
        mergeRuns(last.oldClusters, old);
        return;
      }
      segs.push({ firstCluster: cluster, count: n, inPlace, host, zeroFlag, oldClusters: old.map((r) => ({ ...r })) });
    };
    for (const r of this.#runs(ptr, first, count)) {
      const c0 = Math.floor(r.unit / per);
      const c1 = Math.ceil((r.unit + r.units) / per);
      const n = c1 - c0;
      if (r.kind === RunKind.Compressed) {
        const firstHost = Math.floor(r.host / cs);
        const lastHost = Math.floor((r.host + r.extra - 1) / cs);
        add(c0, 1, false, 0, false, [{ first: firstHost, count: lastHost - firstHost + 1 }], -1);
        continue;
      }
      // Host of the first cluster of the run (extended runs may start inside a cluster).
      const clusterHost = r.host ? r.host - (r.unit % per) * sub : 0;
      if (clusterHost && r.copied) {
        add(c0, n, true, clusterHost, !img.extendedL2 && r.kind === RunKind.ZeroAlloc, [], 0);
      } else {
        add(c0, n, false, 0, false, clusterHost ? [{ first: clusterHost / cs, count: n }] : [], clusterHost / cs);
      }
    }
    return segs;
  }

  /** Reads the image's current guest view of [offset, offset+dst.length) (for copy-on-write). */
  async #readView(offset: number, dst: Uint8Array): Promise<void> {
    if (!dst.length) return;
    const img = this.#img;
    for (const e of await img.status(offset, dst.length)) {
      const part = dst.subarray(e.start - offset, e.start - offset + e.length);
      if (e.allocated) await img.readExtent(e, 0, part);
      else await img.readBacking(e.start, part);
    }
  }

  // --- writes ---------------------------------------------------------------------------------------

  async #writeInTable(l1i: number, s: number, data: Uint8Array): Promise<void> {
    await this.#writeRound([{ l1i, ranges: [{ s, data }] }]);
  }

  /**
   * Disjoint ranges that share no cluster, grouped by L2 table (ascending): every table is
   * planned first (copy-on-write reads see the tables before any entry changes), then one
   * allocation serves all the new clusters, in guest order, so the data of the whole round lands
   * in few host runs; all its writes are in flight at once (vectored, no coalescing copy); only
   * then are the entries switched, table by table. The entries may change in the cache while
   * the data is in flight: no table reaches the file before a flush, and every flush waits for
   * the data first (WriteFence). With `behind`, the data's promise goes there instead of being
   * awaited.
   */
  async #writeRound(groups: ReadonlyArray<{ l1i: number; ranges: ReadonlyArray<{ s: number; data: Uint8Array }> }>, behind?: Array<Promise<void>>): Promise<void> {
    const img = this.#img;
    const cs = this.cs;
    const unit = img.extendedL2 ? cs / 32 : cs;
    const tables: TablePlan[] = [];
    const writes: Array<{ host: number; buf: Uint8Array }> = [];
    const fresh: Array<{ table: TablePlan; seg: Segment; buf: Uint8Array; from: number; to: number }> = [];
    try {
      for (const { l1i, ranges } of groups) {
        const tableStart = l1i * img.l2Span;
        const tableOff = await this.#l2ForWrite(l1i);
        this.l2Cache.pin(tableOff);
        const table: TablePlan = { tableOff, tableStart, newMaps: [], inPlaceFixes: [] };
        tables.push(table);
        const ptr = await this.l2Cache.get(tableOff);
        let claimedUpTo = -1; // last cluster a segment of an earlier range covered
        for (const { s, data } of ranges) {
          const e = s + data.length;
          const firstCluster = Math.floor((s - tableStart) / cs);
          const endCluster = Math.ceil((e - tableStart) / cs);
          if (firstCluster <= claimedUpTo) throw new QcowError('INTERNAL', 'batched writes share a cluster: write them separately', img.path);
          claimedUpTo = endCluster - 1;
          for (const seg of this.#segments(ptr, firstCluster, endCluster - firstCluster)) {
            const segStart = tableStart + seg.firstCluster * cs;
            const segEnd = segStart + seg.count * cs;
            const ws = Math.max(s, segStart);
            const we = Math.min(e, segEnd);
            if (seg.inPlace) {
              // Only units that don't already hold data need their untouched part filled.
              const expand = img.extendedL2 || seg.zeroFlag;
              const xs = expand ? Math.floor(ws / unit) * unit : ws;
              const xe = expand ? Math.ceil(we / unit) * unit : we;
              const buf = await this.#assemble(xs, xe, ws, data.subarray(ws - s, we - s));
              writes.push({ host: seg.host + (xs - segStart), buf });
              if (expand) table.inPlaceFixes.push({ seg, xs, xe });
            } else if (img.extendedL2 && seg.oldClusters.length === 0) {
              // Extended L2, nothing mapped here yet: only the subclusters written get allocated
              // (the others keep reading from the backing file or as zeros), as QEMU does; no
              // copy-on-write beyond the partial subclusters at the ends.
              const xs = Math.floor(ws / unit) * unit;
              const xe = Math.min(segEnd, Math.ceil(we / unit) * unit);
              const buf = await this.#assemble(xs, xe, ws, data.subarray(ws - s, we - s));
              fresh.push({ table, seg, buf, from: xs - segStart, to: xe - segStart });
            } else {
              const buf = await this.#assemble(segStart, segEnd, ws, data.subarray(ws - s, we - s));
              fresh.push({ table, seg, buf, from: 0, to: segEnd - segStart });
            }
          }
        }
      }
      // New clusters: refcounts raised now (cache), data written, entries switched after.
      // One allocation for the whole round, handed out to the segments in order.
      let total = 0;
      for (const f of fresh) total += f.seg.count;
      const pool = total ? await this.allocator.allocate(total) : [];
      for (const { table, seg, buf, from, to } of fresh) {
        const runs = takeRuns(pool, seg.count);
        table.newMaps.push({ seg, runs, from, to });
        let at = 0; // segment byte offset of the run's first cluster
        for (const r of runs) {
          // The part of [from, to) that lies in this run.
          const a = Math.max(from, at);
          const b = Math.min(to, at + r.count * cs);
          img.noteFileEnd((r.first + r.count) * cs);
          if (b > a) writes.push({ host: r.first * cs + (a - at), buf: buf.subarray(a - from, b - from) });
          at += r.count * cs;
        }
      }
      const written = this.#writeData(writes);
      if (behind) {
        // Awaited by writeMany once the operation ends; a failure before then is not unhandled.
        written.catch(() => {});
        behind.push(written);
      }
      const newMaps = tables.some((t) => t.newMaps.length);
      try {
        if (newMaps || tables.some((t) => t.inPlaceFixes.length)) await this.#switchRound(tables, newMaps);
      } catch (e) {
        if (!behind) await written.catch(() => {}); // the caller's buffers are in use until then
        throw e;
      }
      if (!behind) await written;
    } finally {
      for (const t of tables) this.l2Cache.unpin(t.tableOff);
    }
  }

  /** After a round's data writes were issued: its entries, then the references it drops. */
  async #switchRound(tables: TablePlan[], newMaps: boolean): Promise<void> {
    // Entries may now point at the data: it must be durable first, and so must the refcounts.
    this.l2Cache.dependsOnFlush();
    if (newMaps) await this.l2Cache.dependsOn(this.refcountCache);
    for (const t of tables) await this.#switchEntries(t);
    // Old references go only after the new entries (the refcount cache depends on the L2 cache).
    for (const t of tables) for (const { seg } of t.newMaps) for (const r of seg.oldClusters) await this.refcounts.update(r.first, r.count, -1);
    this.#img.invalidateReadCaches();
  }

  /** Points a table's entries at the round's new clusters and marks in-place writes. */
  async #switchEntries(t: TablePlan): Promise<void> {
    if (!t.newMaps.length && !t.inPlaceFixes.length) return;
    const img = this.#img;
    const cs = this.cs;
    const unit = img.extendedL2 ? cs / 32 : cs;
    const k = kernels();
    const tptr = await this.l2Cache.get(t.tableOff);
    for (const { seg, runs, from, to } of t.newMaps) {
      // Extended L2, partly written first/last cluster: its old zero bits (still valid where
      // not written) before the fill below overwrites them.
      const partial = img.extendedL2 && (from > 0 || to < seg.count * cs);
      const v = partial ? new DataView(k.memory.buffer) : undefined;
      const edges = partial ? [...new Set([seg.firstCluster + Math.floor(from / cs), seg.firstCluster + Math.ceil(to / cs) - 1])] : [];
      const oldZero = edges.map((c) => v!.getUint32(tptr + c * 16 + 8));
      let c = seg.firstCluster;
      for (const r of runs) {
        k.l2Fill(tptr, c, r.count, img.extendedL2, r.first * cs, cs, COPIED_HI, 0, img.extendedL2 ? ALL_SUBCLUSTERS : 0, 0);
        c += r.count;
      }
      edges.forEach((cl, i) => {
        const cStart = (cl - seg.firstCluster) * cs;
        const a = Math.max(0, Math.floor((from - cStart) / unit));
        const b = Math.min(32, Math.ceil((to - cStart) / unit));
        const mask = b - a >= 32 ? ALL_SUBCLUSTERS : ((2 ** Math.max(0, b - a) - 1) * 2 ** a) >>> 0;
        v!.setUint32(tptr + cl * 16 + 8, (oldZero[i]! & ~mask) >>> 0);
        v!.setUint32(tptr + cl * 16 + 12, mask);
      });
    }
    for (const fix of t.inPlaceFixes) this.#markWritten(tptr, fix.seg, t.tableStart, fix.xs, fix.xe);
    this.l2Cache.markDirty(t.tableOff);
  }

  /**
   * Guest data to its host places, written behind (WriteFence): host-contiguous pieces go as one
   * vectored write each, all in flight at once. The promise settles once every write has ended,
   * with the first error; a failed write fails the writer (its entries must never be flushed).
   */
  #writeData(writes: Array<{ host: number; buf: Uint8Array }>): Promise<void> {
    const runs = hostRuns(writes.map((w) => ({ file: 0, at: w.host, buf: w.buf })));
    return Promise.allSettled(runs.map((r) => this.#fence.writeBehind(r.bufs, r.at))).then((done) => {
      for (const d of done) {
        if (d.status === 'rejected') {
          this.#failed = true;
          throw d.reason;
        }
      }
    });
  }

  /** [from, to) as the guest will see it: `data` at `dataAt`, the current view around it. */
  async #assemble(from: number, to: number, dataAt: number, data: Uint8Array): Promise<Uint8Array> {
    if (from === dataAt && to === dataAt + data.length) return data;
    // The image's reads do not go through the fence: data still being written is waited for.
    await this.#fence.drain();
    const buf = new Uint8Array(to - from);
    await this.#readView(from, buf.subarray(0, dataAt - from));
    await this.#readView(dataAt + data.length, buf.subarray(dataAt + data.length - from));
    buf.set(data, dataAt - from);
    return buf;
  }

  /** In-place writes over [xs, xe): clear the zero flag / mark the subclusters allocated. */
  #markWritten(tptr: number, seg: Segment, tableStart: number, xs: number, xe: number): void {
    const img = this.#img;
    const cs = this.cs;
    const k = kernels();
    const c0 = Math.floor((xs - tableStart) / cs);
    const c1 = Math.ceil((xe - tableStart) / cs);
    if (!img.extendedL2) {
      k.l2Fill(tptr, c0, c1 - c0, false, seg.host + (c0 - seg.firstCluster) * cs, cs, COPIED_HI, 0, 0, 0);
      return;
    }
    const sub = cs / 32;
    const v = new DataView(k.memory.buffer);
    for (let c = c0; c < c1; c++) {
      const cStart = tableStart + c * cs;
      const a = Math.max(0, Math.floor((xs - cStart) / sub));
      const b = Math.min(32, Math.ceil((xe - cStart) / sub));
      const mask = b - a >= 32 ? ALL_SUBCLUSTERS : (((2 ** (b - a) - 1) * 2 ** a) >>> 0);
      const at = tptr + c * 16 + 8;
      const zero = v.getUint32(at) & ~mask;
      const alloc = (v.getUint32(at + 4) | mask) >>> 0;
      v.setUint32(at, zero >>> 0);
      v.setUint32(at + 4, alloc);
    }
  }

  // --- zeroes and discards ----------------------------------------------------------------------------

  async #zeroOrDiscard(offset: number, length: number, mode: 'zero' | 'zero-unmap' | 'discard'): Promise<void> {
    const img = this.#img;
    const unit = img.extendedL2 ? this.cs / 32 : this.cs;
    const end = offset + length;
    // Whole units get metadata changes; partial ones at the ends are written (zeroes) or left
    // alone (a discard of part of a cluster is a no-op, as in QEMU).
    const a = Math.min(end, Math.ceil(offset / unit) * unit);
    let b = Math.max(a, Math.floor(end / unit) * unit);
    if (end === img.virtualSize && end % unit) b = end; // the disk's partial last unit counts as whole
    const zeroes = mode !== 'discard';
    const canFlag = img.header.version === 3;
    if (zeroes && a > offset) await this.#writeZeroData(offset, a - offset);
    if (b > a) {
      if (zeroes && !canFlag && img.backingName !== undefined) {
        await this.#writeZeroData(a, b - a); // v2 over a backing file: zeroes must be data
      } else {
        const action = mode === 'discard' || (!canFlag && zeroes) ? 'discard' : mode;
        await this.#forEachTable(a, b - a, (l1i, s, e) => this.#unitsInTable(l1i, s, e, action));
      }
    }
    if (zeroes && end > b) await this.#writeZeroData(b, end - b);
  }

  async #writeZeroData(offset: number, length: number): Promise<void> {
    const CHUNK = 4 * 1024 * 1024;
    const zeros = new Uint8Array(Math.min(CHUNK, length));
    for (let at = offset; at < offset + length; at += CHUNK) {
      const n = Math.min(CHUNK, offset + length - at);
      await this.#forEachTable(at, n, (l1i, s, e) => this.#writeInTable(l1i, s, zeros.subarray(0, e - s)));
    }
  }

  /** Zero flags or unmapping for whole units [s, e) of one table. */
  async #unitsInTable(l1i: number, s: number, e: number, mode: 'zero' | 'zero-unmap' | 'discard'): Promise<void> {
    const img = this.#img;
    const cs = this.cs;
    const tableStart = l1i * img.l2Span;
    const existing = img.l2Offset(l1i);
    if (!existing && mode === 'discard') return; // nothing mapped here
    const tableOff = await this.#l2ForWrite(l1i);
    this.l2Cache.pin(tableOff);
    try {
      const ptr = await this.l2Cache.get(tableOff);
      const k = kernels();
      const c0 = Math.floor((s - tableStart) / cs);
      const c1 = Math.ceil((e - tableStart) / cs);
      const segs = this.#segments(ptr, c0, c1 - c0);
      const drops: ClusterRun[] = [];
      for (const seg of segs) {
        for (const part of splitPartialClusters(seg, tableStart, cs, s, e)) {
          const { first, count, from, to } = part;
          const whole = from === tableStart + first * cs && to === tableStart + (first + count) * cs;
          if (!img.extendedL2 || whole) {
            // Whole clusters: the zero flag (or an empty entry), keeping an in-place allocation
            // only for a plain zero write.
            const keep = seg.inPlace && mode === 'zero';
            const host = keep ? seg.host + (first - seg.firstCluster) * cs : 0;
            if (img.extendedL2) k.l2Fill(ptr, first, count, true, host, cs, keep ? COPIED_HI : 0, 0, 0, mode === 'discard' ? 0 : ALL_SUBCLUSTERS);
            else k.l2Fill(ptr, first, count, false, host, cs, keep ? COPIED_HI : 0, mode === 'discard' ? 0 : 1, 0, 0);
            if (!keep) {
              if (seg.inPlace) drops.push({ first: (seg.host + (first - seg.firstCluster) * cs) / cs, count });
              else drops.push(...sliceRuns(seg, first, count));
            }
            continue;
          }
          // Extended L2, part of one cluster: subcluster bits when the entry allows it.
          const sub = cs / 32;
          const cStart = tableStart + first * cs;
          const a = (from - cStart) / sub;
          const b = (to - cStart) / sub;
          const mask = (((2 ** (b - a) - 1) * 2 ** a) >>> 0);
          const v = new DataView(k.memory.buffer);
          const at = ptr + first * 16;
          const word = v.getUint32(at) * 2 ** 32 + v.getUint32(at + 4);
          const compressed = (v.getUint32(at) & 0x40000000) !== 0;
          if (compressed || (!seg.inPlace && word !== 0)) {
            // Shared or compressed: only a full rewrite can change part of it.
            if (mode !== 'discard') await this.#writeInTable(l1i, from, new Uint8Array(to - from));
            continue;
          }
          const zero = v.getUint32(at + 8);
          const alloc = v.getUint32(at + 12);
          v.setUint32(at + 8, (mode === 'discard' ? zero & ~mask : zero | mask) >>> 0);
          v.setUint32(at + 12, (alloc & ~mask) >>> 0);
        }
      }
      this.l2Cache.markDirty(tableOff);
      for (const r of drops) await this.refcounts.update(r.first, r.count, -1);
      img.invalidateReadCaches();
    } finally {
      this.l2Cache.unpin(tableOff);
    }
  }
}

/** The parts of a segment inside [s, e): whole-cluster runs, and partial single clusters. */
function splitPartialClusters(seg: Segment, tableStart: number, cs: number, s: number, e: number): Array<{ first: number; count: number; from: number; to: number }> {
  const out: Array<{ first: number; count: number; from: number; to: number }> = [];
  const segStart = tableStart + seg.firstCluster * cs;
  const from = Math.max(s, segStart);
  const to = Math.min(e, segStart + seg.count * cs);
  let c = Math.floor((from - tableStart) / cs);
  const cEnd = Math.ceil((to - tableStart) / cs);
  if (from > tableStart + c * cs) {
    out.push({ first: c, count: 1, from, to: Math.min(to, tableStart + (c + 1) * cs) });
    c++;
  }
  const wholeEnd = Math.floor((to - tableStart) / cs);
  if (wholeEnd > c) {
    out.push({ first: c, count: wholeEnd - c, from: tableStart + c * cs, to: tableStart + wholeEnd * cs });
    c = wholeEnd;
  }
  if (c < cEnd) out.push({ first: c, count: 1, from: tableStart + c * cs, to });
  return out;
}

/** The old references of clusters [first, first+count) of a not-in-place segment. */
function sliceRuns(seg: Segment, first: number, count: number): ClusterRun[] {
  if (!seg.oldClusters.length || (first === seg.firstCluster && count === seg.count)) return seg.oldClusters;
  // Segments that drop references are either one compressed cluster or host-contiguous runs.
  if (seg.oldClusters.length === 1 && seg.oldClusters[0]!.count === seg.count) {
    const r = seg.oldClusters[0]!;
    return [{ first: r.first + (first - seg.firstCluster), count }];
  }
  if (seg.count === 1) return seg.oldClusters;
  throw new QcowError('INTERNAL', 'cannot split the references of a merged segment');
}

/** Takes `count` clusters off the front of `pool` (runs, ascending), splitting a run if needed. */
function takeRuns(pool: ClusterRun[], count: number): ClusterRun[] {
  const out: ClusterRun[] = [];
  while (count > 0) {
    const r = pool[0];
    if (!r) throw new QcowError('INTERNAL', 'batched allocation ran short');
    const n = Math.min(count, r.count);
    out.push({ first: r.first, count: n });
    if (n === r.count) pool.shift();
    else pool[0] = { first: r.first + n, count: r.count - n };
    count -= n;
  }
  return out;
}

/** One past the last cluster not inside a hole (holes sorted, disjoint). */
function lastUsed(holes: ClusterRun[], fileClusters: number): number {
  let end = fileClusters;
  for (let i = holes.length - 1; i >= 0; i--) {
    const h = holes[i]!;
    if (h.first + h.count >= end) end = h.first;
    else break;
  }
  return Math.max(1, end);
}

function mergeRun(into: ClusterRun[], first: number, count: number): void {
  const last = into[into.length - 1];
  if (last && last.first + last.count === first) last.count += count;
  else into.push({ first, count });
}

function mergeRuns(into: ClusterRun[], more: ClusterRun[]): void {
  for (const r of more) {
    const last = into[into.length - 1];
    if (last && last.first + last.count === r.first) last.count += r.count;
    else into.push({ ...r });
  }
}

function shiftRuns(runs: ClusterRun[], by: number): ClusterRun[] {
  if (!runs.length) return runs;
  const [r] = runs;
  return r!.count > by ? [{ first: r!.first + by, count: r!.count - by }] : [];
}
