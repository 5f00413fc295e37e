/**
 * Where operations that write guest data report what they wrote, so the image's enabled
 * persistent bitmaps can be marked dirty for it. The bitmap engine (src/qcow2/bitmaps.ts) is
 * being written in parallel; until it is wired here, an image with enabled bitmaps is refused
 * before anything is written (`assertBitmapsCanBeMarked`), and `markBitmapsDirty` does nothing
 * only when there is no enabled bitmap to mark.
 */
import { QcowError } from '../errors.js';
import { BME_FLAG_AUTO } from '../format/bitmap.js';
import type { Qcow2Image } from './image.js';

export interface DirtyRange {
  start: number;
  length: number;
}

function enabledBitmaps(img: Qcow2Image): string[] {
  return img.bitmaps.filter((b) => b.flags & BME_FLAG_AUTO).map((b) => b.name);
}

function refusal(img: Qcow2Image, names: string[]): QcowError {
  return new QcowError(
    'UNSUPPORTED',
    `the image has enabled persistent bitmaps (${names.join(', ')}); marking them dirty is not supported yet, nothing was written`,
    img.path,
  );
}

/** Before the first write: throws UNSUPPORTED when written ranges could not be marked. */
export function assertBitmapsCanBeMarked(img: Qcow2Image): void {
  const names = enabledBitmaps(img);
  if (names.length) throw refusal(img, names);
}

/** Marks `ranges` (guest bytes written) dirty in every enabled bitmap of `img`. */
export async function markBitmapsDirty(img: Qcow2Image, ranges: readonly DirtyRange[]): Promise<void> {
  const names = enabledBitmaps(img);
  if (!names.length) return;
  void ranges;
  throw refusal(img, names);
}
