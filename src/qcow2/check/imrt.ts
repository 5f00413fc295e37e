/**
 * The in-memory refcount table (QEMU's "IMRT"): one u32 per host cluster in wasm memory, filled
 * by the kernels (l2AccountRefs, refsAddRange). Dense over [0, n); a sparse map takes the rare
 * references beyond n when n had to be bounded (huge sparse files).
 */
import { kernels, type Kernels } from '../../kernels/index.js';
import { QcowError } from '../../errors.js';
import { hex, type CheckCounters, type Reporter } from './types.js';

/** Largest dense table (clusters): 1 GiB of u32 in wasm memory. */
export const MAX_DENSE_CLUSTERS = 256 * 1024 * 1024;

export class Imrt {
  readonly #k: Kernels;
  #ptr: number;
  #n: number;
  /** QEMU's nb_clusters: file clusters, grown by references ending less than a cluster past EOF. */
  qemuClusters: number;
  readonly sparse = new Map<number, number>();

  constructor(
    n: number,
    qemuClusters: number,
    private readonly clusterSize: number,
    private readonly path: string,
  ) {
    if (n > MAX_DENSE_CLUSTERS) throw new QcowError('UNSUPPORTED', `image too large to check: ${n} clusters`, path);
    this.#k = kernels();
    this.#n = n;
    this.#ptr = this.#k.allocZeroed(Math.max(16, n * 4));
    this.qemuClusters = qemuClusters;
  }

  get ptr(): number {
    return this.#ptr;
  }
  /** Clusters covered by the dense table. */
  get n(): number {
    return this.#n;
  }

  /** A fresh view of the dense table (views die when wasm memory grows). */
  view(): Uint32Array {
    return new Uint32Array(this.#k.memory.buffer, this.#ptr, this.#n);
  }

  get(c: number): number {
    if (c < this.#n) return new Uint32Array(this.#k.memory.buffer, this.#ptr + c * 4, 1)[0]!;
    return this.sparse.get(c) ?? 0;
  }

  set(c: number, v: number): void {
    if (c < this.#n) new Uint32Array(this.#k.memory.buffer, this.#ptr + c * 4, 1)[0] = v;
    else if (v) this.sparse.set(c, v);
    else this.sparse.delete(c);
  }

  /** +1 on clusters [first, first+count) (saturating at u32 max). */
  addClusters(first: number, count: number): void {
    if (count <= 0) return;
    if (first < this.#n) this.#k.refsAddRange(this.#ptr, this.#n, first, count);
    for (let c = Math.max(first, this.#n); c < first + count; c++) this.sparse.set(c, (this.sparse.get(c) ?? 0) + 1);
    this.qemuClusters = Math.max(this.qemuClusters, first + count);
  }

  /**
   * QEMU's qcow2_inc_refcounts_imrt: counts a byte range, or reports it as a corruption when it
   * ends a cluster or more past the end of the file.
   */
  addRange(offset: number, size: number, fileSize: number, res: CheckCounters, report: Reporter): void {
    if (size <= 0) return;
    if (offset + size - fileSize >= this.clusterSize) {
      report(`ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${hex(offset)} size 0x${hex(size)}`);
      res.corruptions++;
      return;
    }
    const first = Math.floor(offset / this.clusterSize);
    const last = Math.floor((offset + size - 1) / this.clusterSize);
    this.addClusters(first, last - first + 1);
  }

  /** Makes the dense table cover [0, n) (copying; sparse entries below n move in). */
  grow(n: number): void {
    if (n <= this.#n) return;
    if (n > MAX_DENSE_CLUSTERS) throw new QcowError('UNSUPPORTED', `image too large to check: ${n} clusters`, this.path);
    const k = this.#k;
    const ptr = k.allocZeroed(n * 4);
    k.u8(ptr, this.#n * 4).set(k.u8(this.#ptr, this.#n * 4));
    k.free(this.#ptr);
    this.#ptr = ptr;
    const old = this.#n;
    this.#n = n;
    for (const [c, v] of [...this.sparse]) {
      if (c < n && c >= old) {
        this.set(c, v);
        this.sparse.delete(c);
      }
    }
  }

  /** Zeroes everything (a recount after the refcount structure was rebuilt). */
  clear(): void {
    this.#k.u8(this.#ptr, this.#n * 4).fill(0);
    this.sparse.clear();
  }

  free(): void {
    if (this.#ptr) this.#k.free(this.#ptr);
    this.#ptr = 0;
  }
}
