/** How operations hand out a bitmap's extents: as a list in their result, or streamed (ExtentStreamOptions). */
import { bitmapExtentBatches, forEachBitmapExtent, type ByteExtent } from '../qcow2/bitmaps.js';
import type { ExtentStreamOptions } from './options.js';

/**
 * Builds an operation's result from a loaded bitmap's extents. Without `onExtents` the result
 * holds them all; with it, one kernel pass gives the totals (`make` gets an empty list and
 * `onSummary` the result), a second streams the batches (a returned promise is waited for).
 */
export async function bitmapExtentResult<R>(
  bm: { ptr: number; bits: number; granularity: number },
  diskSize: number,
  stream: ExtentStreamOptions<R>,
  make: (extents: ByteExtent[], totals: { extents: number; bytes: number }) => R,
): Promise<R> {
  const extents: ByteExtent[] = [];
  const collect = (pairs: Float64Array, n: number) => {
    for (let i = 0; i < n; i++) extents.push({ start: pairs[i * 2]!, length: pairs[i * 2 + 1]! });
  };
  const r = make(extents, forEachBitmapExtent(bm, diskSize, stream.onExtents ? undefined : collect));
  if (stream.onExtents) {
    stream.onSummary?.(r);
    for (const b of bitmapExtentBatches(bm, diskSize)) await stream.onExtents(b.pairs, b.count);
  }
  return r;
}
