/**
 * `commit`: copies what the top image (and every layer above BASE) holds into BASE, as qemu-img
 * commit 7.2 does, then empties the top unless -d/-b.
 *
 * Nothing is written before every image involved has been checked (a corrupt overlay is refused
 * with all files untouched) and the base's filesystem has room for what it will receive. The copy
 * is zero-aware (zero ranges, and data that reads as zeros, become zero flags or unmapped ranges
 * in the base, never written zero data), runs in batches (copy.ts: read from the layers' host
 * data in host order while the previous batch is written), and is durable in the base (dirty bit
 * cleared) before the top is emptied. An abort stops between batches with the base consistent;
 * running the commit again completes it.
 */
import { realpath } from 'node:fs/promises';
import { dirname, isAbsolute, join } from 'node:path';
import { QcowError, throwIfAborted } from '../errors.js';
import type { FileOpener } from '../io/file.js';
import { BackingChain, resolveBackingPath, type ChainExtent } from '../chain/chain.js';
import { isWritable, type BlockLayer, type LayerFormat, type WritableLayer } from '../chain/layer.js';
import { RawLayer } from '../chain/raw.js';
import { Qcow2Image } from '../qcow2/image.js';
import { BME_FLAG_AUTO } from '../format/bitmap.js';
import { commitBitmapClusters, markBitmapsDirty } from '../qcow2/bitmaps.js';
import type { OperationOptions } from './options.js';
import { validateForWrite } from './validate.js';
import { checkFreeSpace, copyPlan } from './copy.js';
import { emptyOpenImage, type MakeEmptyResult } from './make-empty.js';
import { applyMergeDown, planMergeDown, type MergeDownEntry, type MergeDownPlan } from './bitmap-chain.js';

export interface CommitOptions extends OperationOptions {
  /** -f: format of the top image; probed when omitted. */
  format?: LayerFormat | undefined;
  /** -b: the layer to commit into (a name as stored in the chain, or a path); implies `drop`. */
  base?: string | undefined;
  /** -d: leave the top image as it is (don't empty it). */
  drop?: boolean | undefined;
  /** Report what would be done; write nothing. */
  dryRun?: boolean | undefined;
  /** -r: at most this many bytes per second are copied (0 or absent: no limit). */
  rateLimit?: number | undefined;
  /**
   * --bitmaps: every consistent bitmap of the committed layers is created in the base when
   * missing (same granularity and flags) and merged into the base's bitmap of that name.
   */
  bitmaps?: boolean | undefined;
  openFile?: FileOpener | undefined;
}

export interface CommitResult {
  top: string;
  base: string;
  /** Depth of the base in the top's chain (1 = the immediate backing file). */
  baseDepth: number;
  dryRun: boolean;
  /** Guest bytes the layers above the base provide (data and zeros). */
  allocatedBytes: number;
  /** Guest bytes written to the base as data. */
  dataBytes: number;
  /** Guest bytes made to read as zeros in the base without writing data (zero ranges, and data that was all zeros). */
  zeroBytes: number;
  /** Base clusters that receive data (estimate before the copy, exact count of chunks after). */
  dataClusters: number;
  /** How much the base's file grows (estimated for a dry run). */
  baseGrowth: number;
  /** The base's virtual size before and after (it grows to the top's size when smaller). */
  baseSizeBefore: number;
  baseSizeAfter: number;
  /** The top's emptying (absent with -d/-b). */
  emptied?: MakeEmptyResult | undefined;
  /** --bitmaps: the base's bitmaps created and merged from the committed layers. */
  bitmaps?: MergeDownEntry[] | undefined;
  seconds: number;
}

export async function commit(top: string, opts: CommitOptions = {}): Promise<CommitResult> {
  const t0 = performance.now();
  const dryRun = opts.dryRun === true;
  const drop = opts.drop === true || opts.base !== undefined;
  const baseDepth = await findBase(top, opts);
  const write = dryRun ? [] : drop ? [baseDepth] : [0, baseDepth];
  const chain = await BackingChain.open(top, { format: opts.format, openFile: opts.openFile, write, writeOperation: !dryRun, signal: opts.signal, onWarning: opts.onWarning });
  try {
    const topLayer = chain.top;
    if (chain.layers.length <= baseDepth) throw new QcowError('INVALID_ARGUMENT', 'Image does not have a backing file', top);
    const base = chain.layers[baseDepth]!;
    for (let d = 0; d <= baseDepth; d++) await validateForWrite(chain.layers[d]!, { repairLeaks: !dryRun });

    const size = topLayer.virtualSize;
    const plan = await planCopy(chain, baseDepth, size, opts.signal);
    const cs = base instanceof Qcow2Image ? base.clusterSize : 4096;
    const growth = await estimateGrowth(base, plan, size, cs);
    let bitmaps: MergeDownPlan | undefined;
    if (opts.bitmaps) {
      bitmaps = planMergeDown(base, chain.layers.slice(0, baseDepth), Math.max(base.virtualSize, size));
      for (const s of bitmaps.skipped) opts.onWarning?.(`${s.file}: bitmap '${s.name}' is inconsistent (in use): not merged into the base`);
      growth.bytes += bitmaps.bytes;
    }
    const result: CommitResult = {
      top: topLayer.path,
      base: base.path,
      baseDepth,
      dryRun,
      allocatedBytes: plan.data + plan.zero,
      dataBytes: plan.data,
      zeroBytes: plan.zero,
      dataClusters: Math.ceil(growth.dataClusters),
      baseGrowth: growth.bytes,
      baseSizeBefore: base.virtualSize,
      baseSizeAfter: Math.max(base.virtualSize, size),
      bitmaps: bitmaps?.entries,
      seconds: 0,
    };
    if (dryRun) {
      if (!drop && topLayer instanceof Qcow2Image) result.emptied = await emptyOpenImage(topLayer, { dryRun: true });
      result.seconds = (performance.now() - t0) / 1000;
      return result;
    }
    await checkFreeSpace(base.path, growth.bytes);
    if (!isWritable(base)) throw new QcowError('INTERNAL', 'base not opened for writing', base.path);
    if (base.virtualSize < size) await grow(base, size);

    // The base's recording bitmaps learn of every range before it is written (qcow2-format.md §8.4 (b)).
    if (base instanceof Qcow2Image && base.bitmaps.some((b) => b.flags & BME_FLAG_AUTO)) await markBitmapsDirty(base, plan.extents, { signal: opts.signal });
    const copied = await copyPlan(chain, base, plan.extents, { unit: cs, signal: opts.signal, onProgress: opts.onProgress, rateLimit: opts.rateLimit });
    result.dataBytes = copied.data;
    result.zeroBytes = copied.zero;
    // The base holds the data durably, clean, before anything of the top goes.
    if (base instanceof Qcow2Image) await base.endWrites();
    else await base.flush();
    // The layers' bitmaps follow their data into the base (each store crash-safe; a rerun merges again, harmlessly).
    if (bitmaps && base instanceof Qcow2Image) await applyMergeDown(base, bitmaps, { signal: opts.signal });
    // (The top's allocated bytes are the plan's: the top is the only layer above the base here.)
    if (!drop && topLayer instanceof Qcow2Image) result.emptied = await emptyOpenImage(topLayer, { signal: opts.signal, allocatedBytes: baseDepth === 1 ? plan.data + plan.zero : undefined });
    result.seconds = (performance.now() - t0) / 1000;
    return result;
  } finally {
    await chain.close();
  }
}

/** The depth of the base: the immediate backing file (1), or the layer -b names (as qemu-img matches it). */
export async function findBase(top: string, opts: CommitOptions): Promise<number> {
  // The immediate backing file: known without a look (the open that follows finds out whether
  // there is one).
  if (opts.base === undefined) return 1;
  // Names only: a shared look (the locking open that follows refuses images in use).
  const chain = await BackingChain.open(top, { format: opts.format, forceShare: true, signal: opts.signal, onWarning: opts.onWarning });
  try {
    if (chain.layers.length < 2) throw new QcowError('INVALID_ARGUMENT', 'Image does not have a backing file', top);
    const want = opts.base;
    for (let d = 1; d < chain.layers.length; d++) {
      const parent = chain.layers[d - 1]!;
      if (parent.backingName === want) return d;
      // A path resolved against the directory of the image that refers to the layer.
      const candidate = isAbsolute(want) ? want : join(dirname(parent.path), want);
      const [a, b] = await Promise.all([realpath(candidate).catch(() => undefined), realpath(resolveBackingPath(parent.path, parent.backingName!)).catch(() => undefined)]);
      if (a !== undefined && a === b) return d;
    }
    throw new QcowError('INVALID_ARGUMENT', `Did not find '${want}' in the backing chain of '${top}'`, top);
  } finally {
    await chain.close();
  }
}

interface CopyPlan {
  extents: ChainExtent[];
  data: number;
  zero: number;
}

/** What the layers above the base provide, by guest range (metadata only, no data read). */
async function planCopy(chain: BackingChain, baseDepth: number, size: number, signal: AbortSignal | undefined): Promise<CopyPlan> {
  const plan: CopyPlan = { extents: [], data: 0, zero: 0 };
  const add = (start: number, length: number, zero: boolean, depth: number) => {
    const last = plan.extents[plan.extents.length - 1];
    // (Each extent names the one layer that provides it: the copy reads that layer's data.)
    if (last && last.zero === zero && last.depth === depth && last.start + last.length === start) last.length += length;
    else plan.extents.push({ start, length, allocated: true, zero, depth });
    if (zero) plan.zero += length;
    else plan.data += length;
  };
  if (baseDepth === 1) {
    // Only the top above the base: its own allocated extents are the plan (what
    // statusAboveDepth finds, without its walk below them: a third of the time of a commit's
    // start on a scattered top). In 1 GiB windows: bounded memory per call.
    const WINDOW = 1024 ** 3;
    for (let pos = 0; pos < size; pos += WINDOW) {
      throwIfAborted(signal, chain.top.path);
      for (const e of await chain.top.status(pos, Math.min(WINDOW, size - pos))) if (e.allocated) add(e.start, e.length, e.zero, 0);
    }
    return plan;
  }
  await chain.statusAboveDepth(baseDepth, 0, size, (e) => {
    if (!e.allocated) return;
    throwIfAborted(signal, chain.top.path);
    add(e.start, e.length, e.zero, e.depth);
  });
  return plan;
}

/** New base clusters the data needs: data ranges not already backed by base data clusters. */
async function estimateGrowth(base: BlockLayer, plan: CopyPlan, size: number, cs: number): Promise<{ bytes: number; dataClusters: number }> {
  // The base's own data clusters, from one status pass (not one per extent).
  const owned: Array<[number, number]> = [];
  if (base instanceof Qcow2Image && plan.data) {
    for (const s of await base.status(0, Math.min(size, base.virtualSize))) if (s.allocated && s.data && !s.compressed) owned.push([s.start, s.start + s.length]);
  }
  let clusters = 0;
  let j = 0;
  for (const e of plan.extents) {
    if (e.zero) continue;
    const from = Math.floor(e.start / cs) * cs;
    const to = Math.ceil((e.start + e.length) / cs) * cs;
    let mine = 0;
    if (base instanceof RawLayer) mine = to - from; // a raw file is written in place
    else {
      while (j < owned.length && owned[j]![1] <= from) j++;
      for (let i = j; i < owned.length && owned[i]![0] < to; i++) mine += Math.min(to, owned[i]![1]) - Math.max(from, owned[i]![0]);
    }
    clusters += Math.max(0, (to - from) / cs - Math.floor(mine / cs));
  }
  // The base's bitmaps, grown with the disk and marked dirty: new copies before the old ones go.
  const bitmaps = base instanceof Qcow2Image ? await commitBitmapClusters(base, plan.extents, size) : 0;
  // Metadata: an L2 table per 512 MiB-ish of new data at most, and refcount blocks; bounded above.
  const metadata = base instanceof Qcow2Image ? Math.ceil((clusters + bitmaps) / (cs / 8)) * cs * 2 + cs * 4 : 0;
  return { bytes: (clusters + bitmaps) * cs + metadata, dataClusters: clusters };
}

async function grow(base: WritableLayer, size: number): Promise<void> {
  if (base instanceof Qcow2Image) await base.resize(size);
  else if (base instanceof RawLayer) await base.resize(size);
  else throw new QcowError('UNSUPPORTED', 'cannot grow this base', base.path);
}
