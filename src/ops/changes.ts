/**
 * `changes`: which guest ranges changed, in guest bytes — from persistent bitmaps (the union of
 * the named ones) or from a backing chain (everything the layers above IMAGE provide).
 */
import { realpath } from 'node:fs/promises';
import { dirname, isAbsolute, join } from 'node:path';
import { QcowError, throwIfAborted } from '../errors.js';
import { BackingChain, resolveBackingPath } from '../chain/chain.js';
import type { LayerFormat } from '../chain/layer.js';
import { Qcow2Image } from '../qcow2/image.js';
import { kernels } from '../kernels/index.js';
import { findBitmap, loadBitmap, mergeInto, bitmapBits, type ByteExtent, type LoadedBitmap } from '../qcow2/bitmaps.js';
import type { ExtentStreamOptions, OperationOptions } from './options.js';
import { bitmapExtentResult } from './extents.js';

export interface ChangesOptions extends OperationOptions, ExtentStreamOptions<ChangesResult> {
  format?: LayerFormat | undefined;
  /** Union of these bitmaps of FILENAME. */
  bitmaps?: string[] | undefined;
  /** Everything allocated above this layer of FILENAME's backing chain (a name as stored, or a path). */
  since?: string | undefined;
}

export interface ChangesResult {
  file: string;
  source: { bitmaps: string[] } | { since: string; depth: number };
  /** Changed guest ranges, ascending, coalesced; empty when streamed (onExtents). */
  extents: ByteExtent[];
  extentCount: number;
  bytes: number;
  /** Granularity of the answer (the finest of the bitmaps; 0 for --since: exact ranges). */
  granularity: number;
}

export async function changes(file: string, opts: ChangesOptions): Promise<ChangesResult> {
  const hasBitmaps = (opts.bitmaps?.length ?? 0) > 0;
  if (hasBitmaps === (opts.since !== undefined)) throw new QcowError('INVALID_ARGUMENT', 'give either --bitmap NAME... or --since IMAGE', file);
  return hasBitmaps ? fromBitmaps(file, opts.bitmaps!, opts) : fromChain(file, opts.since!, opts);
}

async function fromBitmaps(file: string, names: string[], opts: ChangesOptions): Promise<ChangesResult> {
  const img = await Qcow2Image.open(file, { forceShare: opts.forceShare === true });
  const loaded: LoadedBitmap[] = [];
  const k = kernels();
  let acc: { ptr: number; bits: number; granularity: number } | undefined;
  try {
    const entries = [...new Set(names)].map((n) => findBitmap(img, n));
    for (const e of entries) loaded.push(await loadBitmap(img, e, opts));
    // The union at the finest granularity: coarser bitmaps are widened by the conversion kernel.
    const finest = loaded.reduce((a, b) => (b.granularity < a.granularity ? b : a));
    const bits = bitmapBits(img.virtualSize, Math.log2(finest.granularity));
    acc = { ptr: k.allocZeroed(Math.ceil(bits / 8) + 16), bits, granularity: finest.granularity };
    for (const bm of loaded) {
      throwIfAborted(opts.signal, file);
      mergeInto(acc as LoadedBitmap, bm);
    }
    const bitmaps = entries.map((e) => e.name);
    return await bitmapExtentResult(acc, img.virtualSize, opts, (extents, totals): ChangesResult => ({
      file,
      source: { bitmaps },
      extents,
      extentCount: totals.extents,
      bytes: totals.bytes,
      granularity: finest.granularity,
    }));
  } finally {
    if (acc) k.free(acc.ptr);
    for (const bm of loaded) bm.free();
    await img.close();
  }
}

async function fromChain(file: string, since: string, opts: ChangesOptions): Promise<ChangesResult> {
  const chain = await BackingChain.open(file, { format: opts.format, forceShare: opts.forceShare, signal: opts.signal, onWarning: opts.onWarning });
  try {
    const depth = await findLayer(chain, since);
    const list = new ExtentList();
    const size = chain.virtualSize;
    await chain.statusAboveDepth(depth, 0, size, (e) => {
      if (e.allocated) list.add(e.start, e.length);
    });
    opts.onProgress?.(size, size);
    const r: ChangesResult = { file, source: { since, depth }, extents: opts.onExtents ? [] : list.toArray(), extentCount: list.count, bytes: list.bytes, granularity: 0 };
    if (opts.onExtents) {
      opts.onSummary?.(r);
      await list.stream(opts.onExtents);
    }
    return r;
  } finally {
    await chain.close();
  }
}

/** Coalesced extents as [start, length] pairs in one growing Float64Array: 16 bytes each, no object per extent. */
class ExtentList {
  #pairs = new Float64Array(2048);
  count = 0;
  bytes = 0;

  add(start: number, length: number): void {
    const n = this.count;
    if (n && this.#pairs[n * 2 - 2]! + this.#pairs[n * 2 - 1]! === start) this.#pairs[n * 2 - 1]! += length;
    else {
      if (n * 2 === this.#pairs.length) {
        const grown = new Float64Array(this.#pairs.length * 2);
        grown.set(this.#pairs);
        this.#pairs = grown;
      }
      this.#pairs[n * 2] = start;
      this.#pairs[n * 2 + 1] = length;
      this.count++;
    }
    this.bytes += length;
  }

  toArray(): ByteExtent[] {
    const out: ByteExtent[] = [];
    for (let i = 0; i < this.count; i++) out.push({ start: this.#pairs[i * 2]!, length: this.#pairs[i * 2 + 1]! });
    return out;
  }

  async stream(onExtents: (pairs: Float64Array, count: number) => void | Promise<void>): Promise<void> {
    const BATCH = 65536;
    for (let i = 0; i < this.count; i += BATCH) await onExtents(this.#pairs.subarray(i * 2, Math.min(this.count, i + BATCH) * 2), Math.min(BATCH, this.count - i));
  }
}

/** Depth of IMAGE in the chain: a backing name as stored, or a path naming the same file. */
async function findLayer(chain: BackingChain, want: string): Promise<number> {
  const target = await realpath(want).catch(() => undefined);
  for (let d = 1; d < chain.layers.length; d++) {
    const parent = chain.layers[d - 1]!;
    if (parent.backingName === want) return d;
    const candidate = isAbsolute(want) ? want : join(dirname(parent.path), want);
    const [a, b] = await Promise.all([realpath(candidate).catch(() => undefined), realpath(resolveBackingPath(parent.path, parent.backingName!)).catch(() => undefined)]);
    if ((a !== undefined && a === b) || (target !== undefined && target === b)) return d;
  }
  throw new QcowError('INVALID_ARGUMENT', `'${want}' is not in the backing chain of '${chain.top.path}'`, chain.top.path);
}
