/**
 * Metadata overlap detection (QEMU's qcow2_check_metadata_overlap with the default "cached"
 * template): before a repair writes a range, it must not hit metadata other than the structure
 * being rewritten. Built from the current header, L1 and refcount table, without refcounts.
 */
import { entryWords, reftableEntries, reftableEntry, signalCorruption, u64Of, type CheckContext } from './context.js';
import { ENTRY_OFFSET_LO, entryOffset } from '../../format/constants.js';

export const OL_MAIN_HEADER = 1 << 0;
export const OL_ACTIVE_L1 = 1 << 1;
export const OL_ACTIVE_L2 = 1 << 2;
export const OL_REFCOUNT_TABLE = 1 << 3;
export const OL_REFCOUNT_BLOCK = 1 << 4;
export const OL_SNAPSHOT_TABLE = 1 << 5;
export const OL_INACTIVE_L1 = 1 << 6;
export const OL_INACTIVE_L2 = 1 << 7;
export const OL_BITMAP_DIRECTORY = 1 << 8;

interface Range {
  kind: number;
  name: string;
  start: number;
  end: number;
}

interface MetadataMap {
  key: string;
  ranges: Range[];
  activeL2: Set<number>;
  refblocks: Set<number>;
}

const maps = new WeakMap<CheckContext, MetadataMap>();

function build(ctx: CheckContext, key: string): MetadataMap {
  const h = ctx.img.header;
  const ranges: Range[] = [];
  const add = (kind: number, name: string, offset: number, size: number) => {
    if (size > 0) ranges.push({ kind, name, start: offset, end: offset + size });
  };
  add(OL_ACTIVE_L1, 'active L1 table', h.l1TableOffset, h.l1Size * 8);
  add(OL_REFCOUNT_TABLE, 'refcount table', ctx.reftableOffset, ctx.reftableClusters * ctx.cs);
  add(OL_SNAPSHOT_TABLE, 'snapshot table', h.snapshotsOffset, ctx.img.snapshotTableBytes);
  for (const sn of ctx.img.snapshots) add(OL_INACTIVE_L1, 'inactive L1 table', sn.l1TableOffset, sn.l1Size * 8);
  if (h.bitmaps) add(OL_BITMAP_DIRECTORY, 'bitmap directory', h.bitmaps.directoryOffset, h.bitmaps.directorySize);

  const activeL2 = new Set<number>();
  const l1 = new DataView(ctx.l1Raw.buffer, ctx.l1Raw.byteOffset, ctx.l1Raw.byteLength);
  for (let i = 0; i < h.l1Size; i++) {
    const [hi, lo] = entryWords(l1, i * 8);
    const off = entryOffset(hi, lo);
    if (off) activeL2.add(Math.floor(off / ctx.cs));
  }
  const refblocks = new Set<number>();
  for (let i = 0; i < reftableEntries(ctx); i++) {
    const [hi, lo] = reftableEntry(ctx, i);
    const off = u64Of(hi, lo & ENTRY_OFFSET_LO);
    if (off) refblocks.add(Math.floor(off / ctx.cs));
  }
  return { key, ranges, activeL2, refblocks };
}

/**
 * Name of the metadata structure [offset, offset+size) would overwrite (structures in `ignore`
 * excluded), or undefined when the write is safe.
 */
export async function metadataOverlap(ctx: CheckContext, ignore: number, offset: number, size: number): Promise<string | undefined> {
  if (size <= 0) return undefined;
  if (!(ignore & OL_MAIN_HEADER) && offset < ctx.cs) return 'qcow2_header';
  const key = `${ctx.reftableOffset}:${ctx.reftableClusters}`;
  let map = maps.get(ctx);
  if (!map || map.key !== key) {
    map = build(ctx, key);
    maps.set(ctx, map);
  }
  const start = Math.floor(offset / ctx.cs) * ctx.cs;
  const end = Math.ceil((offset + size) / ctx.cs) * ctx.cs;
  for (const r of map.ranges) {
    if (ignore & r.kind) continue;
    if (start < r.end && r.start < end) return r.name;
  }
  for (let c = start / ctx.cs; c < end / ctx.cs; c++) {
    if (!(ignore & OL_ACTIVE_L2) && map.activeL2.has(c)) return 'active L2 table';
    if (!(ignore & OL_REFCOUNT_BLOCK) && map.refblocks.has(c)) return 'refcount block';
  }
  return undefined;
}

/** Forgets the cached map (after the structures moved). */
export function invalidateOverlapMap(ctx: CheckContext): void {
  maps.delete(ctx);
}

/**
 * QEMU's qcow2_pre_write_overlap_check: false (after signalling the corruption) when the write
 * would hit other metadata.
 */
export async function preWriteCheck(ctx: CheckContext, ignore: number, offset: number, size: number): Promise<boolean> {
  const hit = await metadataOverlap(ctx, ignore, offset, size);
  if (!hit) return true;
  await signalCorruption(ctx, `Preventing invalid write on metadata (overlaps with ${hit})`);
  return false;
}
