/**
 * The snapshot-table part of a check, as QEMU 7.2 (qcow2_check_read_snapshot_table before the
 * refcount check, qcow2_check_fix_snapshot_table after it):
 *
 * - read: the table pointer is validated (count, offset); the entries are read in repair mode
 *   under `-r all` (entries past the 64 MiB limit dropped off the end — the header count shrinks
 *   at once, which only leaks clusters the refcount check then frees; extra data over 1 KiB cut)
 *   and v3 entries without the disk-size extra data are counted as corruptions;
 * - fix (`-r all`, after the refcounts are sound): when anything was wrong the whole table is
 *   rewritten to newly allocated clusters, written and flushed before one header write points
 *   at it; then the old table's clusters are freed (a crash in between only leaks them).
 */
import { dataView, setU64 } from '../../format/bytes.js';
import { encodeSnapshotTable, type SnapshotEntry } from '../../format/snapshot.js';
import { MAX_SNAPSHOTS, readSnapshotTable, SnapshotTableError } from '../snapshot-table.js';
import { beginWrite, refcountWriter, type CheckContext } from './context.js';
import { invalidateOverlapMap, preWriteCheck } from './overlap.js';
import { CheckAborted, FIX_ERRORS, type CheckCounters, type FixMode } from './types.js';

const ENTRY_HEADER = 40;
/** sizeof(QCowSnapshotExtraData) in QEMU 7.2: vm_state_size_large, disk_size, icount. */
const KNOWN_EXTRA = 24;
const INT64_MAX = (1n << 63n) - 1n;

/** qcow2_check_read_snapshot_table: counts go to `res`; aborts the check when unreadable. */
export async function checkReadSnapshotTable(ctx: CheckContext, res: CheckCounters, fix: FixMode): Promise<void> {
  const h = ctx.img.header;
  const offset = h.snapshotsOffset;
  let count = h.nbSnapshots;
  let reduced = 0;
  if (count > MAX_SNAPSHOTS && fix & FIX_ERRORS) {
    ctx.report(`Discarding ${count - MAX_SNAPSHOTS} overhanging snapshots`);
    reduced += count - MAX_SNAPSHOTS;
    count = MAX_SNAPSHOTS;
  }
  // qcow2_validate_table
  let invalid: [string, string] | undefined;
  if (count > MAX_SNAPSHOTS) invalid = ['snapshot table too large', 'File too large'];
  // Exact (BigInt): an offset of 2^63 or more is invalid, and doubles round INT64_MAX up to 2^63.
  else if (BigInt(offset) + BigInt(count * ENTRY_HEADER) > INT64_MAX || offset % ctx.cs) invalid = ['snapshot table offset invalid', 'Invalid argument'];
  if (invalid) {
    res.checkErrors++;
    ctx.report(`ERROR ${invalid[0]}`);
    if (count > MAX_SNAPSHOTS) ctx.report(`You can force-remove all ${count - MAX_SNAPSHOTS} overhanging snapshots with qemu-img check -r all`);
    throw new CheckAborted(invalid[1]);
  }

  let table;
  try {
    table = await readSnapshotTable(ctx.file, offset, count, ctx.cs, { repair: (fix & FIX_ERRORS) !== 0, report: ctx.report });
  } catch (e) {
    res.checkErrors++;
    if (e instanceof SnapshotTableError) {
      ctx.report(`ERROR failed to read the snapshot table: ${e.message}`);
      ctx.report(e.hint);
      throw new CheckAborted(e.errnoText);
    }
    ctx.report(`ERROR failed to read the snapshot table: ${e instanceof Error ? e.message : String(e)}`);
    throw new CheckAborted('Input/output error', { cause: e });
  }
  reduced += table.reduced;
  ctx.img.useSnapshotTable(table.entries, table.bytes);
  res.corruptions += reduced + table.extraDropped;

  if (reduced) {
    // The refcount check relies on the header's count: shrink it now (leaks only).
    await beginWrite(ctx);
    try {
      await ctx.header!.setSnapshotCount(table.entries.length);
    } catch (e) {
      res.checkErrors++;
      ctx.report(`ERROR failed to update the snapshot count in the image header: ${e instanceof Error ? e.message : String(e)}`);
      throw new CheckAborted('Input/output error', { cause: e });
    }
    res.corruptionsFixed += reduced;
    res.corruptions -= reduced;
  }

  if (h.version >= 3) {
    table.entries.forEach((sn, i) => {
      if (sn.extraData.length < 16) {
        res.corruptions++;
        ctx.report(`${fix & FIX_ERRORS ? 'Repairing' : 'ERROR'} snapshot table entry ${i} is incomplete`);
      }
    });
  }
}

/** qcow2_check_fix_snapshot_table: under -r all, rewrites the table when it had corruptions. */
export async function checkFixSnapshotTable(ctx: CheckContext, res: CheckCounters, fix: FixMode): Promise<void> {
  if (!res.corruptions || !(fix & FIX_ERRORS)) return;
  try {
    await writeSnapshots(ctx);
  } catch (e) {
    res.checkErrors++;
    ctx.report(`ERROR failed to update snapshot table: ${e instanceof CheckAborted ? e.reason : e instanceof Error ? e.message : String(e)}`);
    throw e instanceof CheckAborted ? e : new CheckAborted('Input/output error', { cause: e });
  }
  res.corruptionsFixed += res.corruptions;
  res.corruptions = 0;
}

/**
 * Every entry with QEMU 7.2's 24 bytes of known extra data in front (VM state size, disk size —
 * the image's when the entry had none —, icount, -1 for none); unknown extra data is kept.
 */
function normalized(sn: SnapshotEntry, diskSize: number): SnapshotEntry {
  const extra = new Uint8Array(Math.max(KNOWN_EXTRA, sn.extraData.length));
  if (sn.extraData.length > KNOWN_EXTRA) extra.set(sn.extraData.subarray(KNOWN_EXTRA), KNOWN_EXTRA);
  const v = dataView(extra);
  setU64(v, 0, sn.vmStateSize);
  setU64(v, 8, sn.diskSize ?? diskSize);
  v.setBigInt64(16, BigInt(sn.icount ?? -1));
  return { ...sn, extraData: extra, diskSize: sn.diskSize ?? diskSize };
}

/** qcow2_write_snapshots in the crash-safe order. */
async function writeSnapshots(ctx: CheckContext): Promise<void> {
  const h = ctx.img.header;
  const entries = ctx.img.snapshots.map((sn) => normalized(sn, ctx.img.virtualSize));
  const bytes = encodeSnapshotTable(entries);
  await beginWrite(ctx);
  const rc = refcountWriter(ctx);
  let newOffset = 0;
  if (bytes.length) {
    const first = await rc.allocateRun(Math.ceil(bytes.length / ctx.cs));
    newOffset = first * ctx.cs;
    invalidateOverlapMap(ctx);
    if (!(await preWriteCheck(ctx, 0, newOffset, bytes.length))) throw new CheckAborted('Input/output error');
    await ctx.file.writeAt(bytes, newOffset);
    await ctx.file.flush();
  }
  const oldOffset = h.snapshotsOffset; // the header writer keeps `h` in step with the switch
  await ctx.header!.setSnapshotTable(entries.length, newOffset);

  // The old table is garbage now: free its clusters (errors only leak them, as in QEMU).
  const oldBytes = ctx.img.snapshotTableBytes;
  if (oldBytes > 0) {
    const firstOld = Math.floor(oldOffset / ctx.cs);
    const endOld = Math.ceil((oldOffset + oldBytes) / ctx.cs);
    try {
      for (let c = firstOld; c < endOld; c++) {
        const v = await rc.get(c);
        if (v === 0) throw new Error('Invalid argument');
        await rc.set(c, v - 1);
      }
    } catch (e) {
      ctx.report(`qcow2_free_clusters failed: ${e instanceof Error ? e.message : String(e)}`);
    }
    await rc.commit();
  }
  ctx.img.useSnapshotTable(entries, bytes.length);
  ctx.fileSize = await ctx.file.size();
  invalidateOverlapMap(ctx);
}
