/**
 * RefcountManager: the one place that reads and changes refcounts of an image opened for writing
 * (any width, 1..64 bits). Refcount blocks live in the refcount MetadataCache; the refcount
 * table is kept in memory and written entry by entry (a new block) or replaced whole (growth).
 *
 * Growth keeps QEMU's crash-safe order (qcow2-format.md §5.4/§5.5):
 * - a missing block takes a free cluster; a block that lies inside the range it covers describes
 *   itself, otherwise its own refcount is raised through the block covering it first. The block is
 *   written and flushed before its table entry, and the entry is flushed before anything counted
 *   in the block can be relied on;
 * - when the table has no slot left, a new refcount area goes past everything in use: the block
 *   asked for, the blocks describing the area, and a table with 50 % headroom holding the old
 *   entries and the new ones. All of it is flushed, one header write switches the table, and only
 *   then are the old table's clusters released.
 *
 * Decrements declare "the refcount cache depends on the L2 cache" before lowering anything, and a
 * cluster that reaches 0 goes to the discard queue (punched only after the change is durable).
 */
import { QcowError } from '../errors.js';
import type { ImageFile } from '../io/file.js';
import { kernels } from '../kernels/index.js';
import { MAX_REFTABLE_BYTES, REFT_OFFSET_MASK } from '../format/constants.js';
import { maxRefcount, refcountBlockEntries } from '../format/tables.js';
import { dataView, setU64 } from '../format/bytes.js';
import type { HeaderWriter } from './header-writer.js';
import { MetadataCache } from './cache.js';
import { DiscardQueue } from './discard-queue.js';
import { ClusterAllocator } from './allocator.js';

const TWO32 = 2 ** 32;

export interface RefcountGeometry {
  clusterBits: number;
  refcountOrder: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
}

/** Finds free clusters for new refcount blocks; the allocator provides it. */
export interface FreeClusterSource {
  /** A free cluster not handed out yet, claimed until `release` (its refcount is still 0). */
  claimOne(): Promise<number>;
  release(cluster: number): void;
  /** One past the highest cluster in use or claimed (new refcount areas go beyond it). */
  highWater(): number;
  /** Bytes of the file that hold content, when the file may be longer (grown ahead, sparse). */
  contentBytes?: (() => number) | undefined;
}

export class RefcountManager {
  readonly clusterSize: number;
  readonly clusterBits: number;
  readonly refcountOrder: number;
  readonly perBlock: number;
  readonly maxRefcount: number;
  #tableOffset: number;
  #tableClusters: number;
  #table: Uint8Array;
  free: FreeClusterSource | undefined;

  constructor(
    private readonly file: ImageFile,
    geometry: RefcountGeometry,
    tableBytes: Uint8Array,
    readonly cache: MetadataCache,
    readonly l2Cache: MetadataCache | undefined,
    private readonly headerWriter: HeaderWriter | undefined,
    private readonly discards: DiscardQueue,
  ) {
    this.clusterBits = geometry.clusterBits;
    this.clusterSize = 2 ** geometry.clusterBits;
    this.refcountOrder = geometry.refcountOrder;
    this.perBlock = refcountBlockEntries(geometry.clusterBits, geometry.refcountOrder);
    // 64-bit counts are handled as doubles: exact up to 2^53 - 1, which is plenty.
    this.maxRefcount = Math.min(maxRefcount(geometry.refcountOrder), Number.MAX_SAFE_INTEGER);
    this.#tableOffset = geometry.refcountTableOffset;
    this.#tableClusters = geometry.refcountTableClusters;
    this.#table = tableBytes;
  }

  static async open(
    file: ImageFile,
    geometry: RefcountGeometry,
    cache: MetadataCache,
    l2Cache: MetadataCache | undefined,
    header: HeaderWriter,
    discards: DiscardQueue,
  ): Promise<RefcountManager> {
    const table = new Uint8Array(geometry.refcountTableClusters * 2 ** geometry.clusterBits);
    await file.readAt(table, geometry.refcountTableOffset);
    return new RefcountManager(file, geometry, table, cache, l2Cache, header, discards);
  }

  /**
   * A manager of its own for `check -r` (no L2 cache: check orders its own table writes): its own
   * refcount cache, discard queue and allocator.
   */
  static standalone(file: ImageFile, geometry: RefcountGeometry, tableBytes: Uint8Array, header: HeaderWriter | undefined, fileBytes: number): RefcountManager {
    const cs = 2 ** geometry.clusterBits;
    const discards = new DiscardQueue();
    const m = new RefcountManager(file, geometry, tableBytes, new MetadataCache('refcount', file, cs, 64), undefined, header, discards);
    new ClusterAllocator(m, discards, Math.ceil(fileBytes / cs), file.path);
    return m;
  }

  /** Sets one refcount to `value` (buffered in the cache until `commit`). */
  async set(cluster: number, value: number): Promise<void> {
    if (!Number.isInteger(value) || value < 0 || value > this.maxRefcount)
      throw new QcowError('CORRUPT', `refcount ${value} of cluster ${cluster} does not fit in ${2 ** this.refcountOrder} bits`, this.file.path);
    const now = await this.get(cluster);
    if (now !== value) await this.update(cluster, 1, value - now);
  }

  /** Sets refcounts[i] of clusters[i] for every i. */
  async setMany(clusters: ArrayLike<number>, values: ArrayLike<number>): Promise<void> {
    for (let i = 0; i < clusters.length; i++) await this.set(clusters[i]!, values[i]!);
  }

  /** Every buffered change durable; then the clusters that reached 0 are punched. */
  async commit(): Promise<void> {
    await this.cache.flush();
    for (const [first, end] of this.discards.take()) {
      await this.file.punchHole(first * this.clusterSize, (end - first) * this.clusterSize).catch(() => {});
      (this.free as ClusterAllocator | undefined)?.noteFreed?.(first);
    }
  }

  /** A contiguous run of `count` free clusters, counted (refcount 1) durably; returns the first. */
  async allocateRun(count: number): Promise<number> {
    const alloc = this.free as ClusterAllocator | undefined;
    if (!alloc?.allocate) throw new QcowError('INTERNAL', 'refcount manager has no allocator', this.file.path);
    const [run] = await alloc.allocate(count, { contiguous: true });
    await this.commit();
    return run!.first;
  }

  get tableOffset(): number {
    return this.#tableOffset;
  }
  get tableClusters(): number {
    return this.#tableClusters;
  }
  get tableEntries(): number {
    return (this.#tableClusters * this.clusterSize) / 8;
  }
  /** Clusters the current table can describe. */
  get coverage(): number {
    return this.tableEntries * this.perBlock;
  }

  /** Host offset of refcount block `ti` (0 = none); reserved low bits are ignored as QEMU does. */
  blockOffset(ti: number): number {
    if (ti >= this.tableEntries) return 0;
    const v = dataView(this.#table);
    const hi = v.getUint32(ti * 8);
    const lo = v.getUint32(ti * 8 + 4);
    const off = hi * TWO32 + ((lo & Number(REFT_OFFSET_MASK & 0xffffffffn)) >>> 0);
    if (off === 0) return 0;
    if (off % this.clusterSize !== 0 || hi >= 0x200000)
      throw new QcowError('CORRUPT', `Refcount block ${ti} has an invalid offset 0x${off.toString(16)}`, this.file.path);
    return off;
  }

  /** Pointer to refcount block `ti` in the cache, or 0 when the block does not exist. */
  async block(ti: number): Promise<number> {
    const off = this.blockOffset(ti);
    return off ? this.cache.get(off) : 0;
  }

  async get(cluster: number): Promise<number> {
    const ti = Math.floor(cluster / this.perBlock);
    const ptr = await this.block(ti);
    return ptr ? kernels().refcountGet(ptr, cluster % this.perBlock, this.refcountOrder) : 0;
  }

  /**
   * Adds `delta` to the refcounts of clusters [first, first+count). Raising a count in a missing
   * block allocates the block; lowering one below 0 or raising it past the width's maximum fails
   * before anything changes in that block. Clusters reaching 0 are queued for discard.
   */
  async update(first: number, count: number, delta: number): Promise<void> {
    if (count <= 0 || delta === 0) return;
    if (delta < 0 && this.l2Cache) await this.cache.dependsOn(this.l2Cache);
    const k = kernels();
    for (let c = first; c < first + count; ) {
      const ti = Math.floor(c / this.perBlock);
      const index = c % this.perBlock;
      const n = Math.min(first + count - c, this.perBlock - index);
      let off = this.blockOffset(ti);
      if (!off) {
        if (delta < 0) throw new QcowError('CORRUPT', `refcount of cluster ${c} would drop below zero (no refcount block)`, this.file.path);
        off = await this.#allocateBlock(ti);
      }
      const ptr = await this.cache.get(off);
      const bad = k.refcountAddRange(ptr, index, n, this.refcountOrder, delta, this.maxRefcount);
      if (bad >= 0) {
        const at = ti * this.perBlock + bad;
        const now = k.refcountGet(ptr, bad, this.refcountOrder);
        throw new QcowError(
          delta < 0 ? 'CORRUPT' : 'UNSUPPORTED',
          delta < 0 ? `refcount of cluster ${at} would drop below zero` : `refcount of cluster ${at} (${now}) would exceed the ${2 ** this.refcountOrder}-bit maximum`,
          this.file.path,
        );
      }
      this.cache.markDirty(off);
      if (delta < 0) this.#queueFreed(ptr, ti, index, index + n);
      c += n;
    }
  }

  /** Queues the zero entries of block ti in [from, to) for discard. */
  #queueFreed(ptr: number, ti: number, from: number, to: number): void {
    const k = kernels();
    for (let i = from; i < to; ) {
      const z = k.refcountFind(ptr, i, to, this.refcountOrder, true);
      if (z >= to) break;
      const nz = k.refcountFind(ptr, z, to, this.refcountOrder, false);
      this.discards.add(ti * this.perBlock + z, nz - z);
      i = nz;
    }
  }

  /**
   * First cluster >= from whose refcount is 0, and the length of the zero run there (clipped to
   * `limit` clusters), looking at blocks only (claims and pending discards are the allocator's).
   */
  async zeroRun(from: number, limit: number): Promise<{ start: number; length: number }> {
    const k = kernels();
    let c = from;
    // Find the start.
    for (;;) {
      const ti = Math.floor(c / this.perBlock);
      if (ti >= this.tableEntries) break; // nothing described past the table: free
      const off = this.blockOffset(ti);
      if (!off) break; // a missing block describes nothing: free
      const ptr = await this.cache.get(off);
      const z = k.refcountFind(ptr, c % this.perBlock, this.perBlock, this.refcountOrder, true);
      if (z < this.perBlock) {
        c = ti * this.perBlock + z;
        break;
      }
      c = (ti + 1) * this.perBlock;
    }
    // Measure the run.
    let end = c;
    while (end - c < limit) {
      const ti = Math.floor(end / this.perBlock);
      if (ti >= this.tableEntries) return { start: c, length: limit };
      const off = this.blockOffset(ti);
      if (!off) {
        end = (ti + 1) * this.perBlock;
        continue;
      }
      const ptr = await this.cache.get(off);
      // Up to the limit, not the end of the block: a 64 KiB block of 16-bit counts is 32768
      // entries, and allocations ask for a few clusters.
      const stop = Math.min(this.perBlock, (end % this.perBlock) + limit - (end - c));
      const nz = k.refcountFind(ptr, end % this.perBlock, stop, this.refcountOrder, false);
      end = ti * this.perBlock + nz;
      if (nz < stop) break;
    }
    return { start: c, length: Math.min(limit, end - c) };
  }

  // --- growth --------------------------------------------------------------------------------------

  /** Header writes (table switches): only an image opened for writing has them. */
  get header(): HeaderWriter {
    if (!this.headerWriter) throw new QcowError('INTERNAL', 'refcount structure change on a read-only image', this.file.path);
    return this.headerWriter;
  }

  #source(): FreeClusterSource {
    if (!this.free) throw new QcowError('INTERNAL', 'refcount manager has no allocator', this.file.path);
    return this.free;
  }

  /** Creates refcount block `ti`; returns its host offset. */
  async #allocateBlock(ti: number): Promise<number> {
    if (ti >= this.tableEntries) return this.#growArea(ti);
    const src = this.#source();
    const c = await src.claimOne();
    try {
      const off = c * this.clusterSize;
      if (Math.floor(c / this.perBlock) === ti) {
        // Describes itself.
        const ptr = await this.cache.create(off);
        kernels().refcountSet(ptr, c % this.perBlock, this.refcountOrder, 1);
      } else {
        // Its own refcount lives in another block: raise it there first.
        await this.update(c, 1, 1);
        await this.cache.create(off);
      }
      // The block (and any count of it elsewhere) must be durable before the table points at it.
      await this.cache.flush();
      await this.#writeTableEntry(ti, off);
      return off;
    } finally {
      src.release(c);
    }
  }

  /** Writes the 512-byte table sector holding entry ti, durably. */
  async #writeTableEntry(ti: number, offset: number): Promise<void> {
    setU64(dataView(this.#table), ti * 8, offset);
    const sector = Math.floor((ti * 8) / 512) * 512;
    await this.file.writeAt(this.#table.slice(sector, sector + 512), this.#tableOffset + sector);
    await this.file.flush();
  }

  /** Builds a new refcount area with a bigger table; returns the offset of the (new) block ti. */
  async #growArea(ti: number): Promise<number> {
    const cs = this.clusterSize;
    const per = this.perBlock;
    // Past the file's content (not past a sparse tail grown ahead of need: it holds nothing).
    const fileClusters = Math.ceil((this.#source().contentBytes?.() ?? (await this.file.size())) / cs);
    const start = Math.ceil(Math.max(fileClusters, this.#source().highWater(), (ti + 1) * per) / per) * per;
    const firstAreaBlock = start / per;
    // Area: [block for ti][area blocks...][table clusters...]; iterate until the sizes settle.
    let areaBlocks = 1;
    let tableClusters = this.#tableClusters;
    for (;;) {
      const len = 1 + areaBlocks + tableClusters;
      const lastIndex = Math.floor((start + len - 1) / per);
      const entries = Math.max(this.tableEntries, lastIndex + 1);
      const wantClusters = Math.ceil((Math.ceil(entries * 1.5) * 8) / cs);
      const wantBlocks = lastIndex - firstAreaBlock + 1;
      if (wantBlocks === areaBlocks && wantClusters === tableClusters) break;
      areaBlocks = Math.max(areaBlocks, wantBlocks);
      tableClusters = Math.max(tableClusters, wantClusters);
    }
    if (tableClusters * cs > MAX_REFTABLE_BYTES) throw new QcowError('UNSUPPORTED', 'Refcount table would exceed its 8 MiB limit', this.file.path);
    const len = 1 + areaBlocks + tableClusters;
    const tableAt = start + 1 + areaBlocks;
    const k = kernels();

    // Blocks describing the area (every area cluster has refcount 1), written straight to the file.
    const blockBuf = k.alloc(cs);
    try {
      for (let b = 0; b < areaBlocks; b++) {
        k.u8(blockBuf, cs).fill(0);
        const first = (firstAreaBlock + b) * per;
        const from = Math.max(first, start);
        const to = Math.min(first + per, start + len);
        if (to > from) k.refcountAddRange(blockBuf, from - first, to - from, this.refcountOrder, 1, this.maxRefcount);
        await this.file.writeAt(k.u8(blockBuf, cs).slice(), (start + 1 + b) * cs);
      }
    } finally {
      k.free(blockBuf);
    }
    await this.file.writeAt(new Uint8Array(cs), start * cs); // the block asked for: empty
    const table = new Uint8Array(tableClusters * cs);
    table.set(this.#table);
    const tv = dataView(table);
    setU64(tv, ti * 8, start * cs);
    for (let b = 0; b < areaBlocks; b++) setU64(tv, (firstAreaBlock + b) * 8, (start + 1 + b) * cs);
    await this.file.writeAt(table, tableAt * cs);
    await this.file.flush();
    await this.header.setRefcountTable(tableAt * cs, tableClusters);

    const oldOffset = this.#tableOffset;
    const oldClusters = this.#tableClusters;
    this.#table = table;
    this.#tableOffset = tableAt * cs;
    this.#tableClusters = tableClusters;
    // The old table is garbage now (a crash before this only leaks it).
    await this.update(oldOffset / cs, oldClusters, -1);
    return start * cs;
  }

  // --- compaction ---------------------------------------------------------------------------------

  /** Table indices that have a block, with the block's host offset. */
  blockList(): Array<{ ti: number; offset: number }> {
    const out: Array<{ ti: number; offset: number }> = [];
    for (let ti = 0; ti < this.tableEntries; ti++) {
      const off = this.blockOffset(ti);
      if (off) out.push({ ti, offset: off });
    }
    return out;
  }

  /** Points entry ti at a copy of its block (written and flushed by the caller), durably. */
  async repointBlock(ti: number, from: number, to: number): Promise<void> {
    await this.#writeTableEntry(ti, to);
    this.cache.forget(from);
  }

  /**
   * Removes block ti when nothing in its range is in use but itself: its table entry is cleared
   * durably, then its cluster (if another block counts it) is released. Returns whether it went.
   */
  async dropIdleBlock(ti: number): Promise<boolean> {
    const off = this.blockOffset(ti);
    if (!off) return false;
    const k = kernels();
    const ptr = await this.cache.get(off);
    const own = off / this.clusterSize;
    const selfIndex = Math.floor(own / this.perBlock) === ti ? own % this.perBlock : -1;
    for (let i = 0; i < this.perBlock; ) {
      const nz = k.refcountFind(ptr, i, this.perBlock, this.refcountOrder, false);
      if (nz >= this.perBlock) break;
      if (nz !== selfIndex) return false;
      i = nz + 1;
    }
    await this.cache.flush();
    await this.#writeTableEntry(ti, 0);
    this.cache.forget(off);
    if (selfIndex < 0) await this.update(own, 1, -1);
    return true;
  }

  /**
   * Moves the refcount table to `at` (clusters allocated by the caller), keeping only the first
   * `clusters` clusters of entries (the rest must be empty), durably; the old table is released.
   */
  async moveTable(at: number, clusters: number): Promise<void> {
    for (let ti = (clusters * this.clusterSize) / 8; ti < this.tableEntries; ti++)
      if (this.blockOffset(ti)) throw new QcowError('INTERNAL', 'refcount table would drop a block', this.file.path);
    await this.cache.flush(); // the new table's own refcounts
    const table = this.#table.slice(0, clusters * this.clusterSize);
    await this.file.writeAt(table, at);
    await this.file.flush();
    await this.header.setRefcountTable(at, clusters);
    const oldOffset = this.#tableOffset;
    const oldClusters = this.#tableClusters;
    this.#table = table;
    this.#tableOffset = at;
    this.#tableClusters = clusters;
    await this.update(oldOffset / this.clusterSize, oldClusters, -1);
  }

  /** Clusters the table needs for the blocks it has (at least one). */
  neededTableClusters(): number {
    let last = -1;
    for (let ti = 0; ti < this.tableEntries; ti++) if (this.blockOffset(ti)) last = ti;
    return Math.max(1, Math.ceil(((last + 1) * 8) / this.clusterSize));
  }

  /**
   * Replaces the whole refcount structure by one already written and flushed at `tableOffset`
   * (check -r's rebuild): one header write switches, the caches forget the old blocks.
   */
  async switchTable(tableOffset: number, tableClusters: number, tableBytes: Uint8Array): Promise<void> {
    await this.header.setRefcountTable(tableOffset, tableClusters);
    this.cache.discardAll();
    this.#table = tableBytes;
    this.#tableOffset = tableOffset;
    this.#tableClusters = tableClusters;
  }
}
