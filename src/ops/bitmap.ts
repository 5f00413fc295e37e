/**
 * `bitmap`: persistent dirty bitmap management as qemu-img 7.2 does it (several actions on one
 * bitmap, applied in order, each durable before the next), plus `--dump` of a bitmap's dirty
 * extents and `--check` of the bitmaps along a backing chain.
 */
import { realpathSync } from 'node:fs';
import { QcowError, throwIfAborted } from '../errors.js';
import { probeFile, BackingChain } from '../chain/chain.js';
import type { LayerFormat } from '../chain/layer.js';
import { openImageFile, type FileOpener } from '../io/file.js';
import { Qcow2Image } from '../qcow2/image.js';
import { kernels } from '../kernels/index.js';
import type { BitmapDirectoryEntry } from '../format/bitmap.js';
import {
  BitmapStore,
  forEachBitmapExtent,
  findBitmap,
  inconsistent,
  isEnabled,
  isInUse,
  bitmapDataClusters,
  loadBitmap,
  loadMerged,
  type ByteExtent,
} from '../qcow2/bitmaps.js';
import type { ExtentStreamOptions, OperationOptions } from './options.js';
import { validateForWrite } from './validate.js';
import { bitmapExtentResult } from './extents.js';

export type BitmapAction =
  | { action: 'add'; granularity?: number | undefined; disabled?: boolean | undefined }
  | { action: 'remove' }
  | { action: 'clear' }
  | { action: 'enable' }
  | { action: 'disable' }
  | { action: 'merge'; source: string; sourceFile?: string | undefined; sourceFormat?: LayerFormat | undefined };

export interface BitmapOptions extends OperationOptions {
  /** -f: format of FILENAME (must be qcow2); probed when omitted. */
  format?: LayerFormat | undefined;
  /** Opens the files (tests inject faulty ones); default openImageFile. */
  openFile?: FileOpener | undefined;
}

/**
 * Opens FILENAME once, with QEMU's locks for the mode (through `openFile` when given), and makes
 * sure it is qcow2: the format given, else the one probed on the opened file.
 */
async function openQcow2(path: string, writable: boolean, format: LayerFormat | undefined, opts: BitmapOptions): Promise<Qcow2Image> {
  const lock = writable ? ('write' as const) : opts.forceShare ? ('read-shared' as const) : ('read' as const);
  const file = await (opts.openFile ?? openImageFile)(path, { writable, lock, forWrite: writable });
  try {
    const fmt = format ?? (await probeFile(file));
    if (fmt !== 'qcow2') throw new QcowError('UNSUPPORTED', `Block format '${fmt}' does not support persistent dirty bitmaps`, path);
    return await Qcow2Image.open(path, { writable, file });
  } catch (e) {
    await file.close();
    throw e;
  }
}

/** A bitmap as `qemu-img info` lists it, plus its state in qcowkit's words. */
export interface BitmapSummary {
  name: string;
  granularity: number;
  /** Records guest writes (the auto flag). */
  enabled: boolean;
  /** Left in use by a QEMU that did not close the image: contents unusable. */
  inUse: boolean;
}

export interface BitmapResult {
  file: string;
  bitmap: string;
  /** The actions applied, in order. */
  actions: BitmapAction['action'][];
  /** The image's bitmaps afterwards, in directory order. */
  bitmaps: BitmapSummary[];
}

export function summary(e: BitmapDirectoryEntry): BitmapSummary {
  return { name: e.name, granularity: 2 ** e.granularityBits, enabled: isEnabled(e), inUse: isInUse(e) };
}

/** QEMU's default granularity: the cluster size, clamped to 4 KiB .. 64 KiB. */
export function defaultGranularity(clusterSize: number): number {
  return Math.min(65536, Math.max(4096, clusterSize));
}

/** Whether two names reach one file (realpath(3), synchronous: node:fs/promises costs ~1 ms to load). */
function sameFile(a: string, b: string): boolean {
  const real = (p: string): string => {
    try {
      return realpathSync.native(p);
    } catch {
      return p;
    }
  };
  return real(a) === real(b);
}

/**
 * Applies `actions` to bitmap `name` of `file`, in order, as `qemu-img bitmap` does. Each action
 * is stored crash-safely before the next starts; a failing action stops the run (earlier ones
 * stay done, as with qemu-img) with "Operation ACT on bitmap NAME failed: reason".
 */
export async function bitmap(file: string, name: string, actions: BitmapAction[], opts: BitmapOptions = {}): Promise<BitmapResult> {
  if (!actions.length) throw new QcowError('INVALID_ARGUMENT', 'Need at least one of --add, --remove, --clear, --enable, --disable, or --merge', file);
  const img = await openQcow2(file, true, opts.format, opts);
  const sources = new Map<string, Qcow2Image>();
  try {
    if (img.dirty) await validateForWrite(img, { repairLeaks: true });
    const store = await BitmapStore.open(img);
    const done: BitmapAction['action'][] = [];
    for (const act of actions) {
      throwIfAborted(opts.signal, file);
      try {
        await apply(store, img, name, act, sources, opts);
      } catch (e) {
        if (e instanceof QcowError && e.code !== 'IO' && e.code !== 'INTERNAL' && e.code !== 'ABORTED' && e.code !== 'CORRUPT')
          throw new QcowError(e.code, `Operation ${act.action} on bitmap ${name} failed: ${e.message}`, e.file ?? file, { cause: e });
        throw e;
      }
      done.push(act.action);
      opts.onProgress?.(done.length, actions.length);
    }
    await store.close();
    return { file, bitmap: name, actions: done, bitmaps: img.bitmaps.map(summary) };
  } finally {
    for (const s of sources.values()) if (s !== img) await s.close().catch(() => {});
    await img.close();
  }
}

async function apply(store: BitmapStore, img: Qcow2Image, name: string, act: BitmapAction, sources: Map<string, Qcow2Image>, opts: BitmapOptions): Promise<void> {
  switch (act.action) {
    case 'add':
      await store.add(name, act.granularity ?? defaultGranularity(img.clusterSize), { disabled: act.disabled === true });
      return;
    case 'remove':
      await store.remove(name);
      return;
    case 'clear':
      await store.clear(name);
      return;
    case 'enable':
    case 'disable':
      await store.setEnabled(name, act.action === 'enable');
      return;
    case 'merge': {
      let src = img;
      if (act.sourceFile !== undefined && !sameFile(act.sourceFile, img.path)) {
        let s = sources.get(act.sourceFile);
        if (!s) {
          s = await openQcow2(act.sourceFile, false, act.sourceFormat, opts);
          sources.set(act.sourceFile, s);
        }
        src = s;
      }
      const target = findBitmap(img, name);
      if (isInUse(target)) throw inconsistent(name, img.path);
      const se = findBitmap(src, act.source);
      if (isInUse(se)) throw inconsistent(act.source, src.path);
      if (src.virtualSize !== img.virtualSize) throw new QcowError('INVALID_ARGUMENT', "Bitmaps are incompatible and can't be merged", img.path);
      const dst = await loadMerged(img, target, await loadBitmap(src, se, opts), opts);
      try {
        await store.store(dst, opts);
      } finally {
        dst.free();
      }
      return;
    }
  }
}

// --- dump -----------------------------------------------------------------------------------------

export interface BitmapDump {
  file: string;
  bitmap: string;
  granularity: number;
  enabled: boolean;
  /** Dirty guest ranges, ascending and coalesced (clipped to the disk); empty when streamed (onExtents). */
  extents: ByteExtent[];
  extentCount: number;
  dirtyBytes: number;
  bitsSet: number;
}

export type BitmapDumpOptions = BitmapOptions & ExtentStreamOptions<BitmapDump>;

/** The dirty extents of one bitmap (what `qemu-nbd -B NAME` serves as qemu:dirty-bitmap:NAME). */
export async function bitmapDump(file: string, name: string, opts: BitmapDumpOptions = {}): Promise<BitmapDump> {
  const img = await openQcow2(file, false, opts.format, opts);
  try {
    const e = findBitmap(img, name);
    const bm = await loadBitmap(img, e, opts);
    try {
      const bitsSet = kernels().popcount(bm.ptr, Math.ceil(bm.bits / 8));
      return await bitmapExtentResult(bm, img.virtualSize, opts, (extents, totals): BitmapDump => ({
        file,
        bitmap: name,
        granularity: bm.granularity,
        enabled: isEnabled(e),
        extents,
        extentCount: totals.extents,
        dirtyBytes: totals.bytes,
        bitsSet,
      }));
    } finally {
      bm.free();
    }
  } finally {
    await img.close();
  }
}

// --- check along the chain --------------------------------------------------------------------------

export interface BitmapCheckEntry {
  /** Layer depth (0 = FILENAME) and its path. */
  depth: number;
  file: string;
  name: string;
  granularity: number;
  /** in_use flag: a QEMU died with the image open; the contents can't be trusted. */
  inUse: boolean;
  inconsistent: boolean;
  /** Recording (auto flag) or disabled. */
  recording: boolean;
  /** A bitmap of this name exists on the top image. */
  onTop: boolean;
  /** Present in every layer from the top down to this one (a continuous history of changes). */
  continuous: boolean;
  /** Dirty guest bytes (undefined when in use: unknown). */
  dirtyBytes: number | undefined;
  /** Clusters the bitmap uses on disk (table and data) and their bytes. */
  clusters: number;
  diskBytes: number;
  /** Removed by --repair. */
  removed: boolean;
}

export interface BitmapCheckResult {
  file: string;
  bitmaps: BitmapCheckEntry[];
  inconsistent: number;
  removed: number;
}

/** Every bitmap of every qcow2 layer of the chain; `repair` removes the inconsistent ones. */
export async function bitmapCheck(file: string, opts: BitmapOptions & { repair?: boolean } = {}): Promise<BitmapCheckResult> {
  const result: BitmapCheckResult = { file, bitmaps: [], inconsistent: 0, removed: 0 };
  const toRepair: number[] = [];
  const chain = await BackingChain.open(file, { format: opts.format, forceShare: opts.forceShare, signal: opts.signal, onWarning: opts.onWarning });
  try {
    const names = chain.layers.map((l) => new Set(l instanceof Qcow2Image ? l.bitmaps.map((b) => b.name) : []));
    for (let d = 0; d < chain.layers.length; d++) {
      const layer = chain.layers[d]!;
      if (!(layer instanceof Qcow2Image)) continue;
      for (const e of layer.bitmaps) {
        throwIfAborted(opts.signal, file);
        const inUse = isInUse(e);
        let dirtyBytes: number | undefined;
        let clusters = Math.ceil((e.tableSize * 8) / layer.clusterSize);
        try {
          for (const r of await bitmapDataClusters(layer, e)) clusters += r.count;
        } catch (err) {
          if (!(err instanceof QcowError && err.code === 'CORRUPT') || !inUse) throw err;
        }
        if (!inUse) {
          const bm = await loadBitmap(layer, e, opts);
          try {
            dirtyBytes = forEachBitmapExtent(bm, layer.virtualSize).bytes;
          } finally {
            bm.free();
          }
        }
        let continuous = true;
        for (let u = 0; u < d; u++) if (!names[u]!.has(e.name)) continuous = false;
        result.bitmaps.push({
          depth: d,
          file: layer.path,
          name: e.name,
          granularity: 2 ** e.granularityBits,
          inUse,
          inconsistent: inUse,
          recording: isEnabled(e),
          onTop: names[0]!.has(e.name),
          continuous,
          dirtyBytes,
          clusters,
          diskBytes: clusters * layer.clusterSize,
          removed: false,
        });
        if (inUse) {
          result.inconsistent++;
          if (!toRepair.includes(d)) toRepair.push(d);
        }
      }
    }
  } finally {
    await chain.close();
  }
  if (!opts.repair || !toRepair.length) return result;
  for (const d of toRepair) {
    const path = result.bitmaps.find((b) => b.depth === d)!.file;
    const img = await Qcow2Image.open(path, { writable: true });
    try {
      if (img.dirty) await validateForWrite(img, { repairLeaks: true });
      const store = await BitmapStore.open(img);
      for (const b of result.bitmaps) {
        if (b.depth !== d || !b.inconsistent) continue;
        await store.remove(b.name);
        b.removed = true;
        result.removed++;
      }
      await store.close();
    } finally {
      await img.close();
    }
  }
  return result;
}
