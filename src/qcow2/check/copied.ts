/**
 * QEMU's check_oflag_copied: in the active L1 and its L2 tables, COPIED must be set exactly when
 * the stored refcount of the cluster is 1. Stored refcounts come from the IMRT turned into the
 * stored view (compare.ts `storedView`) — refcounts the comparison found equal need no block
 * reads — with a lookup on disk for the rare clusters outside the compared range.
 *
 * Repairs (with -r all, or -r leaks when nothing else is wrong, as QEMU) rewrite the L1 entry's
 * 512-byte sector synchronously, or the whole L2 table, after an overlap check.
 */
import { kernels } from '../../kernels/index.js';
import { beginWrite, big64, forEachTable, refcountWriter, type CheckContext } from './context.js';
import type { Imrt } from './imrt.js';
import { UNREADABLE } from './compare.js';
import { preWriteCheck, OL_ACTIVE_L1, OL_ACTIVE_L2 } from './overlap.js';
import { errnoText } from './account.js';
import { CheckAborted, FIX_ERRORS, FIX_LEAKS, hex, type CheckCounters, type FixMode } from './types.js';
import { ENTRY_OFFSET_HI, ENTRY_OFFSET_LO, entryOffset } from '../../format/constants.js';


export async function checkOflagCopied(
  ctx: CheckContext,
  res: CheckCounters,
  fix: FixMode,
  imrt: Imrt,
  comparedClusters: number,
  bigStored: Map<number, string> = new Map(),
): Promise<void> {
  const repair = fix & FIX_ERRORS ? true : fix & FIX_LEAKS ? !res.checkErrors && !res.corruptions && !res.leaks : false;
  const cs = ctx.cs;
  const writer = refcountWriter(ctx);
  const denseEnd = Math.min(comparedClusters, imrt.n);
  /** Stored refcount, or undefined when it cannot be read (QEMU then skips silently). */
  const storedSlow = async (c: number): Promise<number | undefined> => {
    if (imrt.sparse.has(c)) {
      const v = imrt.sparse.get(c)!;
      return v === UNREADABLE ? undefined : v;
    }
    try {
      return await writer.get(c);
    } catch {
      return undefined;
    }
  };
  const stored = async (c: number): Promise<number | undefined> => {
    if (c < denseEnd) {
      const v = imrt.get(c);
      return v === UNREADABLE ? undefined : v;
    }
    return storedSlow(c);
  };

  const l1 = new DataView(ctx.l1Raw.buffer, ctx.l1Raw.byteOffset, ctx.l1Raw.byteLength);
  const indices: number[] = [];
  const offsets: number[] = [];
  for (let i = 0; i < ctx.l1Raw.length / 8; i++) {
    const hi = l1.getUint32(i * 8);
    const lo = l1.getUint32(i * 8 + 4);
    const off = entryOffset(hi, lo);
    if (!off) continue;
    indices.push(i);
    offsets.push(off);
  }

  const k = kernels();
  const mismatches = k.alloc(ctx.l2Entries * 4);
  try {
    await forEachTable(ctx, offsets, 'ERROR: Could not read L2 table: Input/output error', async (n, ptr) => {
      const i = indices[n]!;
      const l2Offset = offsets[n]!;
      const hi = l1.getUint32(i * 8);
      const lo = l1.getUint32(i * 8 + 4);
      const rc = await stored(Math.floor(l2Offset / cs));
      if (rc !== undefined && (rc === 1) !== hi >>> 31 > 0) {
        res.corruptions++;
        ctx.report(`${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${hex(big64(hi, lo))} refcount=${bigStored.get(Math.floor(l2Offset / cs)) ?? rc}`);
        if (repair) {
          l1.setUint32(i * 8, rc === 1 ? (hi | 0x80000000) >>> 0 : hi & 0x7fffffff);
          try {
            await writeL1Entry(ctx, i);
          } catch (e) {
            res.checkErrors++;
            throw e instanceof CheckAborted ? e : new CheckAborted('Input/output error', { cause: e });
          }
          res.corruptions--;
          res.corruptionsFixed++;
        }
      }

      // Entries whose COPIED bit disagrees with the refcount of their cluster.
      const bad: number[] = [];
      const badRc: (number | string)[] = [];
      const slow: number[] = [];
      {
        const v = new DataView(k.memory.buffer, ptr, cs);
        if (ctx.dataFile) scanDataFile(v, ctx.l2Entries, ctx.entryBytes, bad, badRc);
        else {
          // The kernel lists the disagreeing entries; JS only looks at those.
          const n = k.l2CopiedMismatches(ptr, ctx.l2Entries, ctx.entryBytes === 16, ctx.cb, imrt.ptr, denseEnd, UNREADABLE, mismatches);
          const found = new Uint32Array(k.memory.buffer, mismatches, n).slice();
          const refs = imrt.view();
          for (const x of found) {
            if (x & 0x80000000) slow.push(x & 0x7fffffff);
            else {
              bad.push(x);
              badRc.push(refs[entryCluster(v, x * ctx.entryBytes, ctx.cb)]!);
            }
          }
        }
        for (let m = 0; m < badRc.length; m++) {
          if (badRc[m] !== UNREADABLE - 1) continue;
          const at = bad[m]! * ctx.entryBytes;
          const c = (v.getUint32(at) & ENTRY_OFFSET_HI) * 2 ** (32 - ctx.cb) + ((v.getUint32(at + 4) & ENTRY_OFFSET_LO) >>> ctx.cb);
          badRc[m] = bigStored.get(c) ?? badRc[m]!;
        }
      }
      for (const j of slow) {
        const v = new DataView(k.memory.buffer, ptr, cs);
        const ehi = v.getUint32(j * ctx.entryBytes);
        const elo = v.getUint32(j * ctx.entryBytes + 4);
        const r = await storedSlow(Math.floor((entryOffset(ehi, elo)) / cs));
        if (r !== undefined && (r === 1) !== ehi >>> 31 > 0) {
          bad.push(j);
          badRc.push(r);
        }
      }
      if (slow.length) {
        const order = bad.map((_, x) => x).sort((a, b) => bad[a]! - bad[b]!);
        const b2 = order.map((x) => bad[x]!);
        const r2 = order.map((x) => badRc[x]!);
        bad.splice(0, bad.length, ...b2);
        badRc.splice(0, badRc.length, ...r2);
      }
      if (!bad.length) return;

      {
        const v = new DataView(k.memory.buffer, ptr, cs);
        for (let m = 0; m < bad.length; m++) {
          const at = bad[m]! * ctx.entryBytes;
          const ehi = v.getUint32(at);
          res.corruptions++;
          ctx.report(`${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED data cluster: l2_entry=${hex(big64(ehi, v.getUint32(at + 4)))} refcount=${badRc[m]}`);
          if (repair) v.setUint32(at, badRc[m] === 1 ? (ehi | 0x80000000) >>> 0 : ehi & 0x7fffffff);
        }
      }
      if (!repair) return;
      if (!(await preWriteCheck(ctx, OL_ACTIVE_L2, l2Offset, cs))) {
        ctx.report('ERROR: Could not write L2 table; metadata overlap check failed: Input/output error');
        res.checkErrors++;
        throw new CheckAborted('Input/output error');
      }
      try {
        await beginWrite(ctx);
        await ctx.file.writeAt(k.u8(ptr, cs), l2Offset);
      } catch (e) {
        ctx.report(`ERROR: Could not write L2 table: ${errnoText(e)}`);
        res.checkErrors++;
        throw new CheckAborted('Input/output error', { cause: e });
      }
      res.corruptions -= bad.length;
      res.corruptionsFixed += bad.length;
    });
  } finally {
    k.free(mismatches);
  }
  if (ctx.wroteSomething) await ctx.file.flush();
}

/** QEMU's qcow2_write_l1_entry: the 512-byte sector holding entry i, synchronously. */
async function writeL1Entry(ctx: CheckContext, i: number): Promise<void> {
  const h = ctx.img.header;
  const first = Math.floor((i * 8) / 512) * 512;
  const end = Math.min(first + 512, h.l1Size * 8);
  if (!(await preWriteCheck(ctx, OL_ACTIVE_L1, h.l1TableOffset + first, end - first))) throw new CheckAborted('Input/output error');
  await beginWrite(ctx);
  await ctx.file.writeAt(ctx.l1Raw.subarray(first, end), h.l1TableOffset + first);
  await ctx.file.flush();
}

/**
 * The hot loop: entries (normal or zero-allocated) whose COPIED bit disagrees with "stored
 * refcount == 1" (refs: the stored view). Entries beyond the compared range go to `slow`.
 */
/** Host cluster of the L2 entry at byte `at` of a table. */
function entryCluster(v: DataView, at: number, cb: number): number {
  return (v.getUint32(at) & ENTRY_OFFSET_HI) * 2 ** (32 - cb) + ((v.getUint32(at + 4) & ENTRY_OFFSET_LO) >>> cb);
}

/** With an external data file every cluster has refcount 1: COPIED must be set on all of them. */
function scanDataFile(v: DataView, n: number, eb: number, bad: number[], badRc: (number | string)[]): void {
  for (let j = 0, at = 0; j < n; j++, at += eb) {
    const ehi = v.getUint32(at);
    if (ehi & 0x40000000) continue;
    // Offset 0 is a normal cluster only with COPIED set: never wrong. Others need COPIED.
    if ((ehi & ENTRY_OFFSET_HI) === 0 && (v.getUint32(at + 4) & ENTRY_OFFSET_LO) === 0) continue;
    if (ehi < 0x80000000) {
      bad.push(j);
      badRc.push(1);
    }
  }
}
