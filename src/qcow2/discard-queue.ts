/**
 * Clusters whose refcount dropped to 0 but whose new refcount may not be durable yet. They are
 * punched out of the host file only after the refcount change is flushed (a crash before that
 * leaves them referenced with their data intact), and the allocator must not hand them out while
 * they wait (the punch would destroy whatever was written there). QEMU: update_refcount queues,
 * qcow2_process_discards punches after the flush. (A writer closed with `durable: false` punches
 * them after the lowered refcounts are written, unflushed: its callers release only clusters no
 * durable pointer reaches any more, see Qcow2Writer.close.)
 */
export class DiscardQueue {
  /** Disjoint, sorted [first, end) cluster ranges. */
  #ranges: Array<[number, number]> = [];

  get size(): number {
    return this.#ranges.length;
  }

  /** Index of the first range whose end is > `cluster` (or >= it with `touching`); binary search. */
  #firstEndingAfter(cluster: number, touching: boolean): number {
    const r = this.#ranges;
    let lo = 0;
    let hi = r.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      const e = r[mid]![1];
      if (e > cluster || (touching && e === cluster)) hi = mid;
      else lo = mid + 1;
    }
    return lo;
  }

  /** Adds [first, first+count), merged with the ranges it overlaps or touches. O(log n) search + one splice
   * (emptying an image queues one range per freed run, in guest order: a rebuild per add was O(n^2)). */
  add(first: number, count: number): void {
    if (count <= 0) return;
    const r = this.#ranges;
    let end = first + count;
    const i = this.#firstEndingAfter(first, true);
    let j = i;
    while (j < r.length && r[j]![0] <= end) {
      first = Math.min(first, r[j]![0]);
      end = Math.max(end, r[j]![1]);
      j++;
    }
    if (j === i && i === r.length) r.push([first, end]);
    else r.splice(i, j - i, [first, end]);
  }

  /** End of the pending range containing `cluster`, or undefined when it is not pending. */
  pendingUntil(cluster: number): number | undefined {
    const x = this.#ranges[this.#firstEndingAfter(cluster, false)];
    return x && x[0] <= cluster ? x[1] : undefined;
  }

  /** First pending cluster in [first, end), or `end`. */
  firstPendingIn(first: number, end: number): number {
    const x = this.#ranges[this.#firstEndingAfter(first, false)];
    if (!x) return end;
    return x[0] >= end ? end : Math.max(x[0], first);
  }

  /** Takes every pending range (the caller punches them, after the refcounts are durable). */
  take(): Array<[number, number]> {
    const r = this.#ranges;
    this.#ranges = [];
    return r;
  }
}
