/**
 * One check pass over an open image: QEMU's qcow2_check_refcounts (reference counting, comparison,
 * repairs or rebuild, COPIED flags, image end offset) followed by qcow2_co_check_locked's ending
 * (after a repair that leaves no corruption, the dirty and corrupt bits are cleared).
 */
import type { CheckContext } from './context.js';
import { calculateRefcounts } from './account.js';
import { applyPlan, classify, scanRefcounts, storedView, type CompareScan } from './compare.js';
import { checkOflagCopied } from './copied.js';
import { Imrt } from './imrt.js';
import { rebuildRefcountStructure } from './rebuild.js';
import { checkFixSnapshotTable, checkReadSnapshotTable } from './snapshots.js';
import { CheckAborted, FIX_ERRORS, FIX_LEAKS, newCounters, type CheckCounters, type FixMode } from './types.js';
import { kernels } from '../../kernels/index.js';
import { reftableEntries, reftableEntry, u64Of } from './context.js';
import { ENTRY_OFFSET_LO } from '../../format/constants.js';

export async function runCheckPass(ctx: CheckContext, fix: FixMode): Promise<CheckCounters> {
  // QEMU's qcow2_co_check_locked: the snapshot table's findings are counted apart and added to
  // the refcount check's result (whose allocation figures are kept).
  const snap = newCounters();
  // An exception leaves the header as it is: a dirty bit we raised stays up, like after a crash.
  await checkReadSnapshotTable(ctx, snap, fix);
  const res = newCounters();
  await checkRefcounts(ctx, res, fix);
  await checkFixSnapshotTable(ctx, snap, fix);
  res.corruptions += snap.corruptions;
  res.leaks += snap.leaks;
  res.checkErrors += snap.checkErrors;
  res.corruptionsFixed += snap.corruptionsFixed;
  res.leaksFixed += snap.leaksFixed;
  if (fix && ctx.header) {
    if (!res.checkErrors && !res.corruptions) {
      if (ctx.header.dirty || ctx.header.corrupt) await ctx.header.clearUnknownAutoclear();
      await ctx.header.markClean();
      await ctx.header.clearCorrupt();
    } else if (ctx.dirtiedByUs) {
      // Our writes kept the refcounts ordered: put the header back as we found it.
      await ctx.header.markClean();
    }
  }
  return res;
}

/** Files up to this many clusters get a dense IMRT over all of them without further ado. */
const SMALL_FILE_CLUSTERS = 1 << 20;

/**
 * Dense IMRT size: the file's clusters (+1 for a reference ending just past EOF) — for big files
 * bounded by the last cluster the metadata or the stored refcounts name, so a huge sparse file
 * costs no more than its contents. References beyond go to the IMRT's sparse map; their stored
 * refcount is 0 by construction, so they are corruptions either way.
 */
async function imrtSize(ctx: CheckContext): Promise<{ dense: number; fileClusters: number }> {
  const fileClusters = Math.ceil(ctx.fileSize / ctx.cs);
  if (fileClusters + 1 <= SMALL_FILE_CLUSTERS) return { dense: fileClusters + 1, fileClusters };
  // Huge (sparse) file: cover what the metadata and the stored refcounts can name; references
  // beyond (all of them corruptions: their stored refcount is 0) go to the sparse map.
  let end = 1;
  const h = ctx.img.header;
  const cl = (off: number, bytes: number) => Math.ceil((off + bytes) / ctx.cs);
  end = Math.max(end, cl(h.l1TableOffset, h.l1Size * 8), cl(ctx.reftableOffset, ctx.reftableClusters * ctx.cs), cl(h.snapshotsOffset, ctx.img.snapshotTableBytes));
  for (const sn of ctx.img.snapshots) end = Math.max(end, cl(sn.l1TableOffset, sn.l1Size * 8));
  if (h.bitmaps) end = Math.max(end, cl(h.bitmaps.directoryOffset, h.bitmaps.directorySize));
  const k = kernels();
  const block = k.alloc(ctx.cs);
  try {
    for (let ti = reftableEntries(ctx) - 1; ti >= 0; ti--) {
      const [hi, lo] = reftableEntry(ctx, ti);
      const off = u64Of(hi, lo & ENTRY_OFFSET_LO);
      if (!off || off % ctx.cs) continue;
      end = Math.max(end, Math.floor(off / ctx.cs) + 1);
      if (ti * ctx.perBlock >= fileClusters) continue;
      await ctx.file.readAt(k.u8(block, ctx.cs), off);
      let last = -1;
      for (let j = ctx.perBlock - 1; j >= 0 && last < 0; j--) if (k.refcountGet(block, j, ctx.order) !== 0) last = j;
      if (last >= 0) {
        end = Math.max(end, ti * ctx.perBlock + last + 1);
        break;
      }
    }
  } finally {
    k.free(block);
  }
  return { dense: Math.min(fileClusters + 1, end + 1), fileClusters };
}

/** QEMU's qcow2_check_refcounts. */
async function checkRefcounts(ctx: CheckContext, res: CheckCounters, fix: FixMode): Promise<void> {
  const { dense, fileClusters } = await imrtSize(ctx);
  res.totalClusters = Math.ceil(ctx.img.virtualSize / ctx.cs);
  const imrt = new Imrt(dense, fileClusters, ctx.cs, ctx.path);
  try {
    let rebuild = await calculateRefcounts(ctx, res, fix, imrt);
    let scan: CompareScan = await scanRefcounts(ctx, res, imrt);
    const preCompare = { ...res };
    const first = classify(ctx, scan, res, 0);
    rebuild ||= first.rebuild;
    let highest = scan.highest;
    let fixed = new Set<number>();

    if (rebuild && fix & FIX_ERRORS) {
      const old = { ...res };
      let freshLeaks = 0;
      ctx.report('Rebuilding refcount structure');
      await rebuildRefcountStructure(ctx, res, imrt);
      res.corruptions = 0;
      res.leaks = 0;
      imrt.clear();
      imrt.qemuClusters = Math.max(imrt.qemuClusters, Math.ceil(ctx.fileSize / ctx.cs));
      let again = await calculateRefcounts(ctx, res, 0, imrt);
      if (fix & FIX_LEAKS) {
        const saved = { ...res };
        const tmp = newCounters();
        scan = await scanRefcounts(ctx, tmp, imrt);
        const second = classify(ctx, scan, tmp, FIX_LEAKS);
        await applyPlan(ctx, second.plan);
        fixed = second.plan.fixed;
        again ||= second.rebuild;
        highest = scan.highest;
        if (again) ctx.report('ERROR rebuilt refcount structure is still broken');
        freshLeaks = tmp.leaks;
        Object.assign(res, saved);
      }
      if (res.corruptions < old.corruptions) res.corruptionsFixed += old.corruptions - res.corruptions;
      if (res.leaks < old.leaks) res.leaksFixed += old.leaks - res.leaks;
      res.leaks += freshLeaks;
    } else if (fix) {
      if (rebuild) {
        ctx.report('ERROR need to rebuild refcount structures');
        res.checkErrors++;
        throw new CheckAborted('Input/output error');
      }
      if (res.leaks || res.corruptions) {
        Object.assign(res, preCompare);
        const second = classify(ctx, scan, res, fix);
        await applyPlan(ctx, second.plan);
        fixed = second.plan.fixed;
      }
    }

    const big = storedView(imrt, scan, fixed);
    await checkOflagCopied(ctx, res, fix, imrt, Math.min(imrt.qemuClusters, imrt.n), big);
    res.imageEndOffset = (Math.max(highest, 0) + 1) * ctx.cs;
  } finally {
    imrt.free();
  }
}
