/**
 * Where operations that write guest data report what they wrote, so the image's enabled
 * persistent bitmaps are marked dirty for it: a thin seam over the bitmap engine
 * (src/qcow2/bitmaps.ts). Bitmaps a crashed QEMU left in use are skipped (QEMU does not update
 * them either); disabled ones are never touched.
 *
 * Ordering (qcow2-format.md §8.4 (b)): call `markBitmapsDirty` BEFORE the data is written — a
 * superset of dirty bits only costs a backup extra work, a missing bit loses data. Each call is
 * durable on return (new bitmap clusters and table, then the directory pointer switch).
 */
import { markBitmapsDirty as mark } from './bitmaps.js';
import type { Qcow2Image } from './image.js';

export interface DirtyRange {
  start: number;
  length: number;
}

/** Before the first write: every enabled bitmap can be marked (kept for callers; nothing to refuse now). */
export function assertBitmapsCanBeMarked(img: Qcow2Image): void {
  void img;
}

/** Marks `ranges` (guest bytes) dirty in every enabled, consistent bitmap of `img`. */
export async function markBitmapsDirty(img: Qcow2Image, ranges: readonly DirtyRange[]): Promise<void> {
  await mark(img, ranges);
}
