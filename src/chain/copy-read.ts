/**
 * The read side of a copy (commit, rebase): guest ranges whose providing layer is known (from a
 * status pass such as `statusAboveDepth`) are read straight from that layer's host data, in
 * host order, host-adjacent pieces as one vectored read, instead of one guest read through the
 * chain per range. Each layer is asked for its mapping once per batch, over the span of the
 * batch's ranges it provides.
 */
import type { BackingChain } from './chain.js';
import { hostRuns, type IoPiece } from '../io/host-runs.js';

/** A guest range to read as layer `depth` of the chain provides it, into `dst` (its length). */
export interface GuestPiece {
  start: number;
  depth: number;
  dst: Uint8Array;
}

/**
 * Fills every piece's `dst` with guest data as layer `depth` of `chain` provides it (pieces of
 * one depth in ascending guest order, disjoint). Plain data clusters are read from the layer's
 * file directly; anything else (compressed clusters, ranges the layer does not map) through the
 * chain's guest read.
 */
export async function readGuestPieces(chain: BackingChain, pieces: readonly GuestPiece[]): Promise<void> {
  const byDepth = new Map<number, GuestPiece[]>();
  for (const p of pieces) {
    if (!p.dst.length) continue;
    const list = byDepth.get(p.depth);
    if (list) list.push(p);
    else byDepth.set(p.depth, [p]);
  }
  const direct: IoPiece[] = [];
  const other: Array<Promise<void>> = [];
  for (const [depth, list] of byDepth) {
    const layer = chain.layers[depth]!;
    const first = list[0]!.start;
    const last = list[list.length - 1]!;
    const extents = await layer.status(first, last.start + last.dst.length - first);
    let i = 0;
    for (const p of list) {
      const end = p.start + p.dst.length;
      let pos = p.start;
      while (i < extents.length && extents[i]!.start + extents[i]!.length <= pos) i++;
      for (let j = i; pos < end; ) {
        const e = extents[j];
        if (!e || e.start > pos) {
          // Not described (never expected): the guest read decides.
          const to = e ? Math.min(end, e.start) : end;
          other.push(chain.read(pos, p.dst.subarray(pos - p.start, to - p.start), depth));
          pos = to;
          continue;
        }
        const to = Math.min(end, e.start + e.length);
        const dst = p.dst.subarray(pos - p.start, to - p.start);
        if (e.allocated && e.data && !e.zero && !e.compressed && e.offset !== undefined) direct.push({ file: depth, at: e.offset + (pos - e.start), buf: dst });
        else if (e.allocated && e.zero) dst.fill(0);
        else other.push(chain.read(pos, dst, depth)); // compressed, or unallocated here: the guest read
        pos = to;
        if (to === e.start + e.length) j++;
      }
    }
  }
  // Page-cached reads cost their memcpy: every other run goes to the thread pool (issued first),
  // the others are read on this thread meanwhile, so two cores copy.
  const runs = hostRuns(direct);
  const inPool = runs.filter((_, i) => i % 2 === 0);
  const here = runs.filter((_, i) => i % 2 === 1);
  const read = (r: (typeof runs)[number], pool: boolean) => chain.layers[r.file]!.file.readv(r.bufs, r.at, { inPool: pool });
  const reads = [...inPool.map((r) => read(r, true)), ...here.map((r) => read(r, false))];
  // Every read ends before this returns (the buffers are the caller's to reuse or free).
  const done = await Promise.allSettled([...other, ...reads]);
  for (const d of done) if (d.status === 'rejected') throw d.reason;
}
