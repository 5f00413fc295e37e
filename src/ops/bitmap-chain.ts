/**
 * Bitmap-aware chain operations (the steps libvirt documents for incremental backup across
 * overlays, done here as part of the operation): `commit --bitmaps` carries the bitmaps of the
 * committed layers down into the base, `create -b ... --bitmaps` starts the new overlay with the
 * backing file's recording bitmaps. Both are planned (and every rule checked) before anything is
 * written, and written through the bitmap store (each change crash-safe).
 */
import { QcowError } from '../errors.js';
import { bitmapTableSize, type BitmapDirectoryEntry } from '../format/bitmap.js';
import { Qcow2Image } from '../qcow2/image.js';
import type { BlockLayer } from '../chain/layer.js';
import { BitmapStore, assertCanAddBitmap, isEnabled, isInUse, loadBitmap, mergeInto, type LoadedBitmap } from '../qcow2/bitmaps.js';

/** One bitmap of the base after `commit --bitmaps`: created (when missing) and merged from the layers that have it. */
export interface MergeDownEntry {
  name: string;
  granularity: number;
  /** The base had no bitmap of this name: it is created (flags as the topmost source's). */
  created: boolean;
  enabled: boolean;
  /** Files whose bitmap of this name is merged in, top first. */
  from: string[];
}

export interface MergeDownPlan {
  entries: MergeDownEntry[];
  /** Bitmaps of committed layers left out: in use (left by a QEMU that died), contents unknown. */
  skipped: Array<{ file: string; name: string }>;
  /** Upper bound of the base clusters the new bitmaps and their merged copies need (bytes). */
  bytes: number;
  sources: Array<{ name: string; img: Qcow2Image; entry: BitmapDirectoryEntry }>;
}

/**
 * What `commit --bitmaps` will do to `base` for the bitmaps of `layers` (the committed layers,
 * top first), checked against QEMU's rules (v3 base, names, counts, sizes, no in-use target)
 * before anything is written.
 */
export function planMergeDown(base: BlockLayer, layers: readonly BlockLayer[], size: number): MergeDownPlan {
  const plan: MergeDownPlan = { entries: [], skipped: [], bytes: 0, sources: [] };
  const byName = new Map<string, MergeDownEntry>();
  for (const layer of layers) {
    if (!(layer instanceof Qcow2Image)) continue;
    for (const e of layer.bitmaps) {
      if (isInUse(e)) {
        plan.skipped.push({ file: layer.path, name: e.name });
        continue;
      }
      let entry = byName.get(e.name);
      if (!entry) {
        entry = { name: e.name, granularity: 2 ** e.granularityBits, created: false, enabled: isEnabled(e), from: [] };
        byName.set(e.name, entry);
        plan.entries.push(entry);
      }
      entry.from.push(layer.path);
      plan.sources.push({ name: e.name, img: layer, entry: e });
    }
  }
  if (!plan.entries.length) return plan;
  if (!(base instanceof Qcow2Image)) throw new QcowError('UNSUPPORTED', '--bitmaps needs a qcow2 base (a raw file has no bitmaps)', base.path);
  if (base.header.version < 3) throw new QcowError('UNSUPPORTED', 'Cannot store dirty bitmaps in qcow2 v2 files (--bitmaps)', base.path);
  let added = 0;
  for (const entry of plan.entries) {
    const own = base.bitmaps.find((b) => b.name === entry.name);
    if (own) {
      if (isInUse(own)) throw new QcowError('INVALID_ARGUMENT', `Bitmap '${own.name}' of the base is inconsistent (in use) and cannot take the merge; remove it first (qcowkit bitmap --remove)`, base.path);
      entry.granularity = 2 ** own.granularityBits;
      entry.enabled = isEnabled(own);
    } else {
      entry.created = true;
      added++;
    }
    // New table and data clusters for the merged copy (copy, switch, free).
    const dataClusters = bitmapTableSize(size, Math.log2(entry.granularity), base.clusterSize);
    plan.bytes += (dataClusters + Math.ceil((dataClusters * 8) / base.clusterSize)) * base.clusterSize;
  }
  // QEMU's rules for the bitmaps to create, all at once (count and directory size included).
  const existing = [...base.bitmaps];
  for (const e of plan.entries) {
    if (!e.created) continue;
    assertCanAddBitmap(base.path, existing, e.name, e.granularity, size);
    existing.push({ name: e.name } as BitmapDirectoryEntry);
  }
  plan.bytes += (added + 2) * base.clusterSize; // directories
  return plan;
}

/**
 * Carries out a merge-down plan on the (writable) base: missing bitmaps created, then every
 * target loaded, OR-ed with its sources (any granularity) and stored together.
 */
export async function applyMergeDown(base: Qcow2Image, plan: MergeDownPlan, opts: { signal?: AbortSignal | undefined } = {}): Promise<void> {
  if (!plan.entries.length) return;
  const store = await BitmapStore.open(base);
  const loaded: LoadedBitmap[] = [];
  try {
    for (const e of plan.entries) if (e.created) await store.add(e.name, e.granularity, { disabled: !e.enabled });
    for (const e of plan.entries) {
      const target = base.bitmaps.find((b) => b.name === e.name)!;
      const dst = await loadBitmap(base, target, opts);
      loaded.push(dst);
      for (const s of plan.sources) {
        if (s.name !== e.name) continue;
        const src = await loadBitmap(s.img, s.entry, opts);
        try {
          mergeInto(dst, src);
        } finally {
          src.free();
        }
      }
    }
    await store.storeMany(loaded, opts);
  } finally {
    for (const bm of loaded) bm.free();
  }
  await store.close();
}

/** The recording (enabled, consistent) bitmaps of a backing image: what `create --bitmaps` re-creates. */
export function recordingBitmaps(backing: BlockLayer): Array<{ name: string; granularity: number }> {
  if (!(backing instanceof Qcow2Image)) return [];
  return backing.bitmaps.filter((e) => isEnabled(e) && !isInUse(e)).map((e) => ({ name: e.name, granularity: 2 ** e.granularityBits }));
}

/** Adds empty, enabled bitmaps to a writable image (a new overlay: nothing has changed yet). */
export async function addRecordingBitmaps(img: Qcow2Image, list: ReadonlyArray<{ name: string; granularity: number }>): Promise<void> {
  if (!list.length) return;
  const store = await BitmapStore.open(img);
  for (const b of list) await store.add(b.name, b.granularity);
  await store.close();
}

/**
 * `create --bitmaps`, before the overlay is written: the recording bitmaps of the backing image
 * at `backingPath`, checked against QEMU's rules for an image of `size` bytes.
 */
export async function planRecordingBitmaps(overlayPath: string, backingPath: string, size: number): Promise<Array<{ name: string; granularity: number }>> {
  const backing = await Qcow2Image.open(backingPath, { forceShare: true });
  let list: Array<{ name: string; granularity: number }>;
  try {
    list = recordingBitmaps(backing);
  } finally {
    await backing.close();
  }
  const existing: BitmapDirectoryEntry[] = [];
  for (const b of list) {
    assertCanAddBitmap(overlayPath, existing, b.name, b.granularity, size);
    existing.push({ name: b.name } as BitmapDirectoryEntry);
  }
  return list;
}

/** `create --bitmaps`, once the overlay exists: its empty recording bitmaps. Returns the file's new length. */
export async function writeRecordingBitmaps(overlayPath: string, list: ReadonlyArray<{ name: string; granularity: number }>): Promise<number> {
  const img = await Qcow2Image.open(overlayPath, { writable: true });
  try {
    await addRecordingBitmaps(img, list);
    return await img.file.size();
  } finally {
    await img.close();
  }
}
