/**
 * Read access to the refcount structures (refcount table + blocks of any width).
 * Writes go through the refcount manager of the write path (roadmap); check -r uses `setRefcountAt`.
 */
import { QcowError } from '../errors.js';
import type { ImageFile } from '../io/file.js';
import { decodeRefcountTable, getRefcount, refcountBlockEntries, type DecodedTable } from '../format/tables.js';
import type { Qcow2Header } from '../format/header.js';
import { kernels } from '../kernels/index.js';

export class RefcountReader {
  readonly entriesPerBlock: number;
  #table: DecodedTable | undefined;
  readonly #blocks = new Map<number, Uint8Array>();

  private constructor(
    private readonly file: ImageFile,
    readonly header: Qcow2Header,
    readonly clusterSize: number,
    private readonly tableBytes: Uint8Array,
  ) {
    this.entriesPerBlock = refcountBlockEntries(header.clusterBits, header.refcountOrder);
  }

  /** The whole refcount table, decoded on first use (countInUse needs only its first entries). */
  get table(): DecodedTable {
    this.#table ??= decodeRefcountTable(this.tableBytes, this.tableBytes.length / 8, this.clusterSize);
    return this.#table;
  }

  static async load(file: ImageFile, header: Qcow2Header): Promise<RefcountReader> {
    const cs = 2 ** header.clusterBits;
    const buf = new Uint8Array(header.refcountTableClusters * cs);
    await file.readAt(buf, header.refcountTableOffset);
    return new RefcountReader(file, header, cs, buf);
  }

  /** The refcount block covering table index i (cached), or undefined when absent. */
  async block(i: number): Promise<Uint8Array | undefined> {
    const off = this.table.offsets[i];
    if (!off) return undefined;
    let b = this.#blocks.get(i);
    if (!b) {
      b = new Uint8Array(this.clusterSize);
      await this.file.readAt(b, off);
      this.#blocks.set(i, b);
    }
    return b;
  }

  async refcount(cluster: number): Promise<number> {
    const ti = Math.floor(cluster / this.entriesPerBlock);
    if (ti >= this.table.offsets.length) return 0;
    const b = await this.block(ti);
    return b ? getRefcount(b, cluster % this.entriesPerBlock, this.header.refcountOrder) : 0;
  }

  /**
   * Counts clusters below `endCluster` with a non-zero refcount, stopping once `limit` is reached
   * (QEMU's metadata-preallocation heuristic). Decodes only the table entries it needs and
   * counts each block in wasm.
   */
  async countInUse(endCluster: number, limit: number): Promise<number> {
    const entries = Math.min(Math.ceil(endCluster / this.entriesPerBlock), this.tableBytes.length / 8);
    const table = this.#table ?? decodeRefcountTable(this.tableBytes.subarray(0, entries * 8), entries, this.clusterSize);
    const k = kernels();
    const block = k.alloc(this.clusterSize);
    try {
      let n = 0;
      for (let ti = 0; ti < entries && n < limit; ti++) {
        const off = table.offsets[ti];
        if (!off) continue;
        await this.file.readAt(k.u8(block, this.clusterSize), off);
        n += k.refcountCountNonZero(block, 0, Math.min(this.entriesPerBlock, endCluster - ti * this.entriesPerBlock), this.header.refcountOrder);
      }
      return Math.min(n, limit);
    } finally {
      k.free(block);
    }
  }

  invalidTableEntry(file: string): QcowError | undefined {
    const i = this.table.invalid[0];
    return i === undefined ? undefined : new QcowError('CORRUPT', `Refcount table entry ${i} is invalid`, file);
  }
}
