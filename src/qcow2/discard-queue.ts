/**
 * Clusters whose refcount dropped to 0 but whose new refcount may not be durable yet. They are
 * punched out of the host file only after the refcount change is flushed (a crash before that
 * leaves them referenced with their data intact), and the allocator must not hand them out while
 * they wait (the punch would destroy whatever was written there). QEMU: update_refcount queues,
 * qcow2_process_discards punches after the flush.
 */
export class DiscardQueue {
  /** Disjoint, sorted [first, end) cluster ranges. */
  #ranges: Array<[number, number]> = [];

  get size(): number {
    return this.#ranges.length;
  }

  add(first: number, count: number): void {
    if (count <= 0) return;
    let end = first + count;
    const out: Array<[number, number]> = [];
    let placed = false;
    for (const [s, e] of this.#ranges) {
      if (e < first) out.push([s, e]);
      else if (s > end) {
        if (!placed) out.push([first, end]);
        placed = true;
        out.push([s, e]);
      } else {
        first = Math.min(first, s);
        end = Math.max(end, e);
      }
    }
    if (!placed) out.push([first, end]);
    this.#ranges = out;
  }

  /** End of the pending range containing `cluster`, or undefined when it is not pending. */
  pendingUntil(cluster: number): number | undefined {
    for (const [s, e] of this.#ranges) {
      if (cluster < s) return undefined;
      if (cluster < e) return e;
    }
    return undefined;
  }

  /** First pending cluster in [first, end), or `end`. */
  firstPendingIn(first: number, end: number): number {
    for (const [s, e] of this.#ranges) {
      if (e <= first) continue;
      return s >= end ? end : Math.max(s, first);
    }
    return end;
  }

  /** Takes every pending range (the caller punches them, after the refcounts are durable). */
  take(): Array<[number, number]> {
    const r = this.#ranges;
    this.#ranges = [];
    return r;
  }
}
