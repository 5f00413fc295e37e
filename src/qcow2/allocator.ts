/**
 * ClusterAllocator: hands out host clusters of one image. First fit from a free hint, reusing
 * free clusters inside the file before growing it, in contiguous runs as long as possible; never
 * a cluster whose discard is pending or that another allocation has claimed. The refcounts of
 * what it returns are already raised (in the refcount cache).
 */
import { QcowError } from '../errors.js';
import type { DiscardQueue } from './discard-queue.js';
import type { FreeClusterSource, RefcountManager } from './refcount-manager.js';

export interface ClusterRun {
  first: number;
  count: number;
}

export class ClusterAllocator implements FreeClusterSource {
  /** Lowest cluster that may be free. */
  #hint = 1;
  /** One past the highest cluster allocated or claimed through this allocator. */
  #high: number;
  /** Claimed [first, end) runs whose refcounts are not raised yet. */
  readonly #claims: Array<[number, number]> = [];
  /**
   * Called with one past the last cluster of a run before its refcounts are raised: the owner
   * makes the file cover it first (a refcount past the end of the file is a leak no check sees).
   */
  beforeRaise: ((endCluster: number) => Promise<void>) | undefined;
  /** Bytes of the file that hold content (the owner may have grown the file past them, sparse). */
  contentBytes: (() => number) | undefined;

  constructor(
    private readonly refcounts: RefcountManager,
    private readonly discards: DiscardQueue,
    fileClusters: number,
    private readonly path: string,
  ) {
    this.#high = fileClusters;
    refcounts.free = this;
  }

  highWater(): number {
    let h = this.#high;
    for (const [, e] of this.#claims) h = Math.max(h, e);
    return h;
  }

  /** Clusters below `cluster` may have become free (after discards): search from there again. */
  noteFreed(cluster: number): void {
    this.#hint = Math.max(1, Math.min(this.#hint, cluster));
    // The cluster compressed data was being packed into may be among them: start a new one.
    this.#freeByte = 0;
  }

  /** Byte where the next compressed cluster may be packed (0: start a new host cluster). */
  #freeByte = 0;

  /**
   * Room for `bytes` (< one cluster) of compressed data, packed after the previous compressed
   * cluster as QEMU does (qcow2_alloc_bytes): in the same host cluster while it has room and its
   * refcount can grow, running into the next cluster only when that one is free and adjacent,
   * else at the start of a new cluster. Every host cluster the bytes touch gets +1 refcount (a
   * cluster shared by n compressed clusters has refcount n). Returns the byte offset.
   */
  async allocateCompressedBytes(bytes: number): Promise<number> {
    const cs = this.refcounts.clusterSize;
    if (!(bytes > 0 && bytes < cs)) throw new QcowError('INTERNAL', `compressed size ${bytes} out of range`, this.path);
    let at = this.#freeByte;
    if (at) {
      const c = Math.floor(at / cs);
      const rc = await this.refcounts.get(c);
      // 0: the cluster was freed meanwhile (pending discard); max: no more references fit.
      if (rc === 0 || rc >= this.refcounts.maxRefcount || this.#blockedUntil(c) !== undefined) at = 0;
    }
    if (at) {
      const c = Math.floor(at / cs);
      const room = (c + 1) * cs - at;
      if (room >= bytes) {
        await this.refcounts.update(c, 1, 1);
      } else {
        // Spill into the next cluster only when it is free.
        const next = await this.#nextFree(c + 1, 1);
        if (next.first === c + 1) {
          this.#claims.push([c + 1, c + 2]);
          try {
            await this.refcounts.update(c, 2, 1);
          } finally {
            this.#unclaim(c + 1);
          }
          this.#high = Math.max(this.#high, c + 2);
        } else at = 0;
      }
    }
    if (!at) {
      const [run] = await this.allocate(1);
      at = run!.first * cs;
    }
    const end = at + bytes;
    this.#freeByte = end % cs === 0 ? 0 : end;
    return at;
  }

  /**
   * `count` clusters, as few runs as the free space allows (one run when `contiguous`), with
   * refcount 1 each. Runs come in ascending order.
   */
  async allocate(count: number, opts: { contiguous?: boolean } = {}): Promise<ClusterRun[]> {
    if (count <= 0) return [];
    const runs = opts.contiguous ? [await this.#findRun(count, true)] : await this.#findRuns(count);
    for (const r of runs) this.#claims.push([r.first, r.first + r.count]);
    try {
      if (this.beforeRaise) await this.beforeRaise(Math.max(...runs.map((r) => r.first + r.count)));
      for (const r of runs) await this.refcounts.update(r.first, r.count, 1);
    } finally {
      for (const r of runs) this.#unclaim(r.first);
    }
    for (const r of runs) this.#high = Math.max(this.#high, r.first + r.count);
    return runs;
  }

  /** One contiguous run of `count` clusters starting at a cluster offset (bytes). */
  async allocateBytes(bytes: number): Promise<number> {
    const cs = this.refcounts.clusterSize;
    const [run] = await this.allocate(Math.ceil(bytes / cs), { contiguous: true });
    return run!.first * cs;
  }

  /** Where a contiguous run of `count` clusters would go if allocated now (from the front). */
  async peekRun(count: number): Promise<number> {
    this.#hint = 1;
    return (await this.#findRun(count, true)).first;
  }

  /**
   * A free cluster for a new refcount block, claimed until `release`. Its refcount is raised by
   * the caller, so the file is made to cover it first, as for `allocate`: a refcount block is
   * written in one flush with the block that counts it, and a crash between the two writes must
   * not leave a count past the end of the file (a leak no check sees, until the file grows).
   */
  async claimOne(): Promise<number> {
    const r = await this.#findRun(1, true);
    this.#claims.push([r.first, r.first + 1]);
    try {
      if (this.beforeRaise) await this.beforeRaise(r.first + 1);
    } catch (e) {
      this.#unclaim(r.first);
      throw e;
    }
    this.#high = Math.max(this.#high, r.first + 1);
    return r.first;
  }

  release(cluster: number): void {
    this.#unclaim(cluster);
  }

  #unclaim(first: number): void {
    const i = this.#claims.findIndex(([s]) => s === first);
    if (i >= 0) this.#claims.splice(i, 1);
  }

  /** End of the claim or pending discard covering `c`, or undefined when `c` is usable. */
  #blockedUntil(c: number): number | undefined {
    for (const [s, e] of this.#claims) if (c >= s && c < e) return e;
    return this.discards.pendingUntil(c);
  }

  /** First cluster in [c, end) that is claimed or pending discard, or end. */
  #nextBlocked(c: number, end: number): number {
    let stop = this.discards.firstPendingIn(c, end);
    for (const [s, e] of this.#claims) if (e > c && s < stop) stop = Math.max(s, c);
    return stop;
  }

  async #findRuns(count: number): Promise<ClusterRun[]> {
    const runs: ClusterRun[] = [];
    let need = count;
    let c = this.#hint;
    let firstFree: number | undefined;
    while (need > 0) {
      const r = await this.#nextFree(c, need);
      firstFree ??= r.first;
      const last = runs[runs.length - 1];
      if (last && last.first + last.count === r.first) last.count += r.count;
      else runs.push({ ...r });
      need -= r.count;
      c = r.first + r.count;
    }
    if (firstFree !== undefined) this.#hint = firstFree;
    return runs;
  }

  async #findRun(count: number, contiguous: boolean): Promise<ClusterRun> {
    let c = this.#hint;
    let firstSeen: number | undefined;
    for (;;) {
      const r = await this.#nextFree(c, count);
      firstSeen ??= r.first;
      if (!contiguous || r.count >= count) {
        // Only move the hint past space nobody else can use.
        if (firstSeen === r.first) this.#hint = r.first;
        return { first: r.first, count: Math.min(count, r.count) };
      }
      c = r.first + r.count;
    }
  }

  /** The next usable free run at or after c, at most `limit` long. */
  async #nextFree(c: number, limit: number): Promise<ClusterRun> {
    if (c < 1) c = 1;
    for (let guard = 0; ; guard++) {
      if (guard > 1e7) throw new QcowError('INTERNAL', 'allocator found no free cluster', this.path);
      const z = await this.refcounts.zeroRun(c, limit);
      const blocked = this.#blockedUntil(z.start);
      if (blocked !== undefined) {
        c = blocked;
        continue;
      }
      const stop = this.#nextBlocked(z.start, z.start + z.length);
      return { first: z.start, count: stop - z.start };
    }
  }
}
