/**
 * RefcountWriter: the one place that changes on-disk refcounts.
 *
 * Updates are buffered per refcount block (any width, 1..64 bits) and written back as whole
 * blocks by `writeBack()`; the caller decides where the flushes go (e.g. "raise too-low counts,
 * flush, then lower leaked ones, flush"). Growing the structures keeps QEMU's crash-safe order
 * (qcow2-format.md §5.4/§5.5):
 *
 * - a cluster whose refcount block is missing gets a new block taken from the first free cluster
 *   (stored refcount 0); a block that lies inside the range it covers describes itself, otherwise
 *   its own refcount is set through the block covering it (recursively). The block is written and
 *   flushed before its table entry is written and flushed;
 * - when the table has no slot for the block, a new refcount area is built at the first
 *   refcount-block boundary past the file end and past the block's range: the missing block, the
 *   blocks describing the area, then a table with 50 % headroom holding the old entries plus the
 *   new ones. Everything is flushed, then one header write switches the table, then the old
 *   table's clusters are freed.
 */
import { QcowError } from '../errors.js';
import type { ImageFile } from '../io/file.js';
import type { Qcow2Header } from '../format/header.js';
import { getRefcount, maxRefcount, refcountBlockEntries, setRefcount } from '../format/tables.js';
import type { HeaderWriter } from './header-writer.js';

const TWO32 = 2 ** 32;
const REFT_RESERVED_LO = 0x1ff;

export interface RefcountLayout {
  clusterBits: number;
  refcountOrder: number;
  tableOffset: number;
  tableClusters: number;
}

export class RefcountWriter {
  readonly clusterSize: number;
  readonly clusterBits: number;
  readonly refcountOrder: number;
  readonly perBlock: number;
  readonly maxRefcount: number;
  #tableOffset: number;
  #tableClusters: number;
  #table: Uint8Array;
  #tableView: DataView;
  readonly #blocks = new Map<number, Uint8Array>();
  readonly #dirty = new Set<number>();
  /** Clusters handed out by the allocator whose refcount is not written yet. */
  readonly #claimed = new Set<number>();
  #freeHint = 1;

  constructor(
    private readonly file: ImageFile,
    layout: RefcountLayout,
    tableBytes: Uint8Array,
    private readonly header: HeaderWriter | undefined,
  ) {
    this.clusterBits = layout.clusterBits;
    this.clusterSize = 2 ** layout.clusterBits;
    this.refcountOrder = layout.refcountOrder;
    this.perBlock = refcountBlockEntries(layout.clusterBits, layout.refcountOrder);
    // 64-bit counts are handled as doubles: exact up to 2^53 - 1, which is plenty.
    this.maxRefcount = Math.min(maxRefcount(layout.refcountOrder), Number.MAX_SAFE_INTEGER);
    this.#tableOffset = layout.tableOffset;
    this.#tableClusters = layout.tableClusters;
    this.#table = tableBytes;
    this.#tableView = new DataView(tableBytes.buffer, tableBytes.byteOffset, tableBytes.byteLength);
  }

  /** Reads the refcount table named by `header`. */
  static async open(file: ImageFile, header: Pick<Qcow2Header, 'clusterBits' | 'refcountOrder' | 'refcountTableOffset' | 'refcountTableClusters'>, headerWriter?: HeaderWriter): Promise<RefcountWriter> {
    const cs = 2 ** header.clusterBits;
    const table = new Uint8Array(header.refcountTableClusters * cs);
    await file.readAt(table, header.refcountTableOffset);
    return new RefcountWriter(
      file,
      { clusterBits: header.clusterBits, refcountOrder: header.refcountOrder, tableOffset: header.refcountTableOffset, tableClusters: header.refcountTableClusters },
      table,
      headerWriter,
    );
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

  /** Offset of refcount block `ti` (0 = none). Reserved low bits are ignored as QEMU does. */
  blockOffset(ti: number): number {
    if (ti >= this.tableEntries) return 0;
    const hi = this.#tableView.getUint32(ti * 8);
    const lo = this.#tableView.getUint32(ti * 8 + 4) & ~REFT_RESERVED_LO;
    const off = hi * TWO32 + (lo >>> 0);
    if (off === 0) return 0;
    if (off % this.clusterSize !== 0 || hi >= 0x200000)
      throw new QcowError('CORRUPT', `Refcount block ${ti} has an invalid offset 0x${off.toString(16)}`, this.file.path);
    return off;
  }

  async #block(ti: number): Promise<Uint8Array | undefined> {
    const cached = this.#blocks.get(ti);
    if (cached) return cached;
    const off = this.blockOffset(ti);
    if (!off) return undefined;
    const b = new Uint8Array(this.clusterSize);
    await this.file.readAt(b, off);
    this.#blocks.set(ti, b);
    return b;
  }

  /** Stored refcount of `cluster` (pending updates included). */
  async get(cluster: number): Promise<number> {
    const b = await this.#block(Math.floor(cluster / this.perBlock));
    return b ? getRefcount(b, cluster % this.perBlock, this.refcountOrder) : 0;
  }

  /** Sets one refcount (buffered until `writeBack`); a missing block is allocated when value > 0. */
  async set(cluster: number, value: number): Promise<void> {
    if (!Number.isInteger(value) || value < 0 || value > this.maxRefcount)
      throw new QcowError('CORRUPT', `refcount ${value} of cluster ${cluster} does not fit in ${2 ** this.refcountOrder} bits`, this.file.path);
    const ti = Math.floor(cluster / this.perBlock);
    let b = await this.#block(ti);
    if (!b) {
      if (value === 0) return;
      b = await this.#allocateBlock(ti);
    }
    setRefcount(b, cluster % this.perBlock, this.refcountOrder, value);
    this.#dirty.add(ti);
    this.#claimed.delete(cluster);
  }

  /** Sets refcounts[i] of clusters[i] for every i (buffered until `writeBack`). */
  async setMany(clusters: ArrayLike<number>, values: ArrayLike<number>): Promise<void> {
    for (let i = 0; i < clusters.length; i++) await this.set(clusters[i]!, values[i]!);
  }

  /** Adds `delta` to the refcounts of [first, first+count); fails on underflow or overflow. */
  async adjust(first: number, count: number, delta: number): Promise<void> {
    for (let c = first; c < first + count; c++) {
      const v = (await this.get(c)) + delta;
      if (v < 0) throw new QcowError('CORRUPT', `refcount of cluster ${c} would drop below zero`, this.file.path);
      await this.set(c, v);
    }
  }

  /** Blocks with pending updates. */
  get pendingBlocks(): number {
    return this.#dirty.size;
  }

  /** Writes every modified block (in table order); no flush. */
  async writeBack(): Promise<void> {
    const order = [...this.#dirty].sort((a, b) => a - b);
    for (const ti of order) {
      await this.file.writeAt(this.#blocks.get(ti)!, this.blockOffset(ti));
      this.#dirty.delete(ti);
    }
  }

  /** writeBack + flush: every buffered update is durable on return. */
  async commit(): Promise<void> {
    await this.writeBack();
    await this.file.flush();
  }

  /** Drops cached blocks (after the structures were changed behind the writer's back). */
  invalidate(): void {
    if (this.#dirty.size) throw new QcowError('IO', 'internal error: refcount cache dropped with pending updates', this.file.path);
    this.#blocks.clear();
  }

  /** Punches the host ranges of freed clusters; best effort, as QEMU's discards. */
  async discard(clusters: ArrayLike<number>): Promise<void> {
    const sorted = Array.from(clusters).sort((a, b) => a - b);
    for (let i = 0; i < sorted.length; ) {
      let j = i + 1;
      while (j < sorted.length && sorted[j] === sorted[j - 1]! + 1) j++;
      try {
        await this.file.punchHole(sorted[i]! * this.clusterSize, (j - i) * this.clusterSize);
      } catch {
        // discard is advisory: the cluster is free either way
      }
      i = j;
    }
  }

  /**
   * QEMU's qcow2_alloc_clusters: the first run of `count` clusters with stored refcount 0 (from
   * the start of the image, possibly past its end), given refcount 1; the refcounts are durable
   * on return. Returns the first cluster.
   */
  async allocateRun(count: number): Promise<number> {
    let start = 1;
    for (;;) {
      let n = 0;
      while (n < count && !this.#claimed.has(start + n) && (await this.get(start + n)) === 0) n++;
      if (n === count) break;
      start += n + 1;
    }
    for (let c = start; c < start + count; c++) this.#claimed.add(c);
    for (let c = start; c < start + count; c++) await this.set(c, 1);
    await this.commit();
    return start;
  }

  // --- allocation --------------------------------------------------------------------------------

  /** First cluster with stored refcount 0 that nobody claimed (allocator of last resort). */
  async #findFree(): Promise<number> {
    let c = this.#freeHint;
    for (;;) {
      const ti = Math.floor(c / this.perBlock);
      const b = await this.#block(ti);
      const end = (ti + 1) * this.perBlock;
      for (; c < end; c++) {
        if (c === 0 || this.#claimed.has(c)) continue;
        if (!b || getRefcount(b, c % this.perBlock, this.refcountOrder) === 0) {
          this.#freeHint = c;
          return c;
        }
      }
    }
  }

  async #allocateBlock(ti: number): Promise<Uint8Array> {
    if (ti >= this.tableEntries) return this.#growArea(ti);
    const c = await this.#findFree();
    this.#claimed.add(c);
    const block = new Uint8Array(this.clusterSize);
    if (Math.floor(c / this.perBlock) === ti) {
      // Describes itself.
      setRefcount(block, c % this.perBlock, this.refcountOrder, 1);
    } else {
      // Its own refcount lives in another block: make that durable first.
      await this.set(c, 1);
      await this.commit();
    }
    this.#claimed.delete(c);
    await this.file.writeAt(block, c * this.clusterSize);
    await this.file.flush();
    await this.#writeTableEntry(ti, c * this.clusterSize);
    this.#blocks.set(ti, block);
    return block;
  }

  /** Writes the 512-byte table sector holding entry ti, durably. */
  async #writeTableEntry(ti: number, offset: number): Promise<void> {
    this.#tableView.setUint32(ti * 8, Math.floor(offset / TWO32));
    this.#tableView.setUint32(ti * 8 + 4, offset >>> 0);
    const sector = Math.floor((ti * 8) / 512) * 512;
    await this.file.writeAt(this.#table.subarray(sector, sector + 512), this.#tableOffset + sector);
    await this.file.flush();
  }

  /** Builds a new refcount area with a bigger table; returns the (new, zeroed) block for ti. */
  async #growArea(ti: number): Promise<Uint8Array> {
    if (!this.header) throw new QcowError('IO', 'internal error: growing the refcount table needs a header writer', this.file.path);
    const cs = this.clusterSize;
    const per = this.perBlock;
    const fileClusters = Math.ceil((await this.file.size()) / cs);
    const start = Math.ceil(Math.max(fileClusters, (ti + 1) * per) / per) * per;
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
    if (tableClusters * cs > 8 * 1024 * 1024) throw new QcowError('UNSUPPORTED', 'Refcount table would exceed its 8 MiB limit', this.file.path);
    const len = 1 + areaBlocks + tableClusters;
    const tableAt = start + 1 + areaBlocks;

    // Blocks describing the area (every area cluster has refcount 1).
    const blocks: Uint8Array[] = [];
    for (let k = 0; k < areaBlocks; k++) {
      const b = new Uint8Array(cs);
      const first = (firstAreaBlock + k) * per;
      for (let c = Math.max(first, start); c < Math.min(first + per, start + len); c++) setRefcount(b, c - first, this.refcountOrder, 1);
      blocks.push(b);
    }
    const tiBlock = new Uint8Array(cs);
    const table = new Uint8Array(tableClusters * cs);
    table.set(this.#table);
    const tv = new DataView(table.buffer);
    const put = (index: number, cluster: number) => {
      tv.setUint32(index * 8, Math.floor((cluster * cs) / TWO32));
      tv.setUint32(index * 8 + 4, (cluster * cs) >>> 0);
    };
    put(ti, start);
    for (let k = 0; k < areaBlocks; k++) put(firstAreaBlock + k, start + 1 + k);

    await this.file.writeAt(tiBlock, start * cs);
    for (let k = 0; k < areaBlocks; k++) await this.file.writeAt(blocks[k]!, (start + 1 + k) * cs);
    await this.file.writeAt(table, tableAt * cs);
    await this.file.flush();
    await this.header.setRefcountTable(tableAt * cs, tableClusters);

    const oldOffset = this.#tableOffset;
    const oldClusters = this.#tableClusters;
    this.#table = table;
    this.#tableView = tv;
    this.#tableOffset = tableAt * cs;
    this.#tableClusters = tableClusters;
    this.#blocks.set(ti, tiBlock);
    for (let k = 0; k < areaBlocks; k++) this.#blocks.set(firstAreaBlock + k, blocks[k]!);

    // The old table is garbage now: free it (a crash before this only leaks it).
    const freed: number[] = [];
    for (let c = oldOffset / cs; c < oldOffset / cs + oldClusters; c++) {
      if ((await this.get(c)) > 0) {
        await this.set(c, (await this.get(c)) - 1);
        if ((await this.get(c)) === 0) freed.push(c);
      }
    }
    await this.commit();
    await this.discard(freed);
    return tiBlock;
  }
}
