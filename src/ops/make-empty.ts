/**
 * `make-empty`: drops all guest data of a qcow2 overlay and gives the space back, keeping what
 * makes it the same image: header fields, backing file name and format, persistent bitmaps
 * (names, flags, contents) and internal snapshots (their data still restorable). qemu-img has
 * no such command; `qemu-img commit` does it to the top image, and when bitmaps or snapshots are
 * present it keeps every L2 table and the file length. Here the freed space is released: the
 * surviving metadata moves toward the front, the file is cut after it and free ranges inside are
 * punched.
 */
import { QcowError, throwIfAborted } from '../errors.js';
import type { FileOpener } from '../io/file.js';
import { BackingChain } from '../chain/chain.js';
import { Qcow2Image } from '../qcow2/image.js';
import { compactImage } from '../qcow2/compact.js';
import type { OperationOptions } from './options.js';
import { validateForWrite } from './validate.js';

export interface MakeEmptyOptions extends OperationOptions {
  format?: 'qcow2' | 'raw' | undefined;
  /** Empty an image without a backing file (it then reads as all zeros). */
  force?: boolean | undefined;
  /** Report what would be freed; write nothing. */
  dryRun?: boolean | undefined;
  openFile?: FileOpener | undefined;
}

export interface SpaceFigures {
  /** File length in bytes. */
  length: number;
  /** Bytes the filesystem allocated (du). */
  allocated: number;
}

export interface MakeEmptyResult {
  filename: string;
  dryRun: boolean;
  /** Guest bytes that were mapped by the image itself (now dropped). */
  droppedBytes: number;
  l2Tables: number;
  before: SpaceFigures;
  after: SpaceFigures;
  reclaimedBytes: number;
  bitmaps: number;
  snapshots: number;
  seconds: number;
}

export async function makeEmpty(path: string, opts: MakeEmptyOptions = {}): Promise<MakeEmptyResult> {
  if (opts.format === 'raw') throw new QcowError('UNSUPPORTED', 'make-empty works on qcow2 images (a raw file has no backing file to fall back on)', path);
  const chain = await BackingChain.open(path, { format: 'qcow2', openBacking: false, openFile: opts.openFile, write: opts.dryRun ? [] : [0], signal: opts.signal });
  try {
    const img = chain.top as Qcow2Image;
    if (!img.backingName && !opts.force)
      throw new QcowError('INVALID_ARGUMENT', 'the image has no backing file: emptying it would make the whole disk read as zeros (use --force to do it anyway)', path);
    await validateForWrite(img, { repairLeaks: !opts.dryRun });
    return await emptyOpenImage(img, opts);
  } finally {
    await chain.close();
  }
}

/** Empties an image already open for writing (and validated): make-empty, or commit's last step. */
export async function emptyOpenImage(
  img: Qcow2Image,
  opts: {
    dryRun?: boolean | undefined;
    signal?: AbortSignal | undefined;
    onProgress?: ((done: number, total: number) => void) | undefined;
    /** Guest bytes the image maps, when the caller knows them (commit's plan): no status walk. */
    allocatedBytes?: number | undefined;
  } = {},
): Promise<MakeEmptyResult> {
  const t0 = performance.now();
  const before = await space(img);
  let dropped = opts.allocatedBytes ?? 0;
  if (opts.allocatedBytes === undefined) for (const e of await img.status(0, img.virtualSize)) if (e.allocated) dropped += e.length;
  if (opts.dryRun) {
    return result(img, true, dropped, img.l1.offsets.filter((o) => o !== 0).length, before, before, t0);
  }
  throwIfAborted(opts.signal, img.path);
  const w = await img.writer();
  opts.onProgress?.(0, 3);
  const { tables } = await w.emptyActive({ signal: opts.signal });
  opts.onProgress?.(1, 3);
  await compactImage(img, w, { signal: opts.signal });
  opts.onProgress?.(2, 3);
  await w.trim();
  await img.endWrites();
  opts.onProgress?.(3, 3);
  return result(img, false, dropped, tables, before, await space(img), t0);
}

async function space(img: Qcow2Image): Promise<SpaceFigures> {
  return { length: await img.file.size(), allocated: await img.file.allocatedBytes() };
}

function result(img: Qcow2Image, dryRun: boolean, droppedBytes: number, l2Tables: number, before: SpaceFigures, after: SpaceFigures, t0: number): MakeEmptyResult {
  return {
    filename: img.path,
    dryRun,
    droppedBytes,
    l2Tables,
    before,
    after,
    reclaimedBytes: Math.max(0, before.allocated - after.allocated),
    bitmaps: img.bitmaps.length,
    snapshots: img.snapshots.length,
    seconds: (performance.now() - t0) / 1000,
  };
}
