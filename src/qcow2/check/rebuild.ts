/**
 * QEMU's rebuild_refcount_structure: new refcount blocks and a new refcount table built solely
 * from the IMRT, placed with QEMU's allocation rules (first clusters the IMRT says are free; a
 * block never lies before the range it covers), so the result has QEMU's layout.
 *
 * Crash safety: only clusters nothing references are written until the header switch, which is a
 * single 12-byte write made after everything it points to is durable. A crash before it leaves the
 * old structure in charge (nothing lost); after it the new one is complete. The old table and
 * blocks become leaks, which the caller's leak repair then frees.
 *
 * Unlike QEMU, clusters that an old refcount table entry points to are never reused even when the
 * entry is invalid (QEMU 7.2 then fails its own overlap check and gives up).
 */
import { kernels } from '../../kernels/index.js';
import { reftableEntries, reftableEntry, u64Of, type CheckContext } from './context.js';
import type { Imrt } from './imrt.js';
import { preWriteCheck, invalidateOverlapMap } from './overlap.js';
import { CheckAborted, type CheckCounters } from './types.js';
import { ENTRY_OFFSET_LO, entryOffset } from '../../format/constants.js';

const CHUNK = 65536;
const TWO32 = 2 ** 32;

export async function rebuildRefcountStructure(ctx: CheckContext, res: CheckCounters, imrt: Imrt): Promise<void> {
  const k = kernels();
  const cs = ctx.cs;
  const per = ctx.perBlock;
  if (imrt.sparse.size) imrt.grow(Math.max(...imrt.sparse.keys()) + 1);
  imrt.grow(imrt.qemuClusters);

  // Clusters the old structure names as refcount blocks, valid or not: never written.
  const avoid = new Set<number>();
  for (let i = 0; i < reftableEntries(ctx); i++) {
    const [hi, lo] = reftableEntry(ctx, i);
    const off = u64Of(hi, lo & ENTRY_OFFSET_LO);
    if (off) avoid.add(Math.floor(off / cs));
  }
  // ... nor the clusters active L2 tables are said to be in (counted or not).
  const l1 = new DataView(ctx.l1Raw.buffer, ctx.l1Raw.byteOffset, ctx.l1Raw.byteLength);
  for (let i = 0; i < ctx.l1Raw.length / 8; i++) {
    const off = entryOffset(l1.getUint32(i * 8), l1.getUint32(i * 8 + 4));
    if (off) avoid.add(Math.floor(off / cs));
  }

  const out = k.alloc(CHUNK * 4);
  const zero = k.allocZeroed(CHUNK * 4);
  const blockBuf = k.alloc(cs);
  try {
    const state = { table: [] as number[], entries: 0 };

    /** Next cluster in [from, end) with a non-zero count, or -1. */
    const nextUsed = (from: number, end: number): number => {
      for (let s = from; s < Math.min(end, imrt.n); s += CHUNK) {
        const n = Math.min(CHUNK, Math.min(end, imrt.n) - s);
        const total = k.refcountCompare(imrt.ptr, s, n, zero, 5, out, 1);
        if (total > 0) return s + new Uint32Array(k.memory.buffer, out, 1)[0]!;
      }
      return -1;
    };
    const isFree = (c: number) => (c >= imrt.n || imrt.get(c) === 0) && !avoid.has(c);

    /** QEMU's alloc_clusters_imrt (first-fit from *firstFree, growing the IMRT at the end). */
    const allocImrt = (count: number, firstFree: { c: number }): number => {
      let cluster = firstFree.c;
      let firstGap = true;
      let contiguous = 0;
      for (; cluster < imrt.qemuClusters && contiguous < count; cluster++) {
        if (isFree(cluster)) {
          contiguous++;
          if (firstGap) {
            firstFree.c = cluster;
            firstGap = false;
          }
        } else if (contiguous) {
          contiguous = 0;
        }
      }
      if (contiguous < count) {
        imrt.qemuClusters = cluster + count - contiguous;
        imrt.grow(imrt.qemuClusters);
      }
      cluster -= contiguous;
      for (let i = 0; i < count; i++) imrt.set(cluster + i, 1);
      return cluster * cs;
    };

    /** Writes the refcount block ri: a slice of the IMRT in the image's width. */
    const writeBlock = async (ri: number, offset: number): Promise<void> => {
      if (!(await preWriteCheck(ctx, 0, offset, cs))) throw new CheckAborted('ERROR writing refblock: Input/output error');
      k.u8(blockBuf, cs).fill(0);
      const first = ri * per;
      const end = Math.min(first + per, imrt.n);
      for (let s = first; s < end; s += CHUNK) {
        const n = Math.min(CHUNK, end - s);
        const total = k.refcountCompare(imrt.ptr, s, n, zero, 5, out, CHUNK);
        const idx = new Uint32Array(k.memory.buffer, out, total);
        const refs = imrt.view();
        for (let m = 0; m < total; m++) {
          const c = s + idx[m]!;
          k.refcountSet(blockBuf, c - first, ctx.order, Math.min(refs[c]!, ctx.maxRefcount));
        }
      }
      await ctx.file.writeAt(k.u8(blockBuf, cs), offset);
    };

    /** QEMU's rebuild_refcounts_write_refblocks; returns whether the table grew. */
    const writeRefblocks = async (firstCluster: number, endCluster: number): Promise<boolean> => {
      let grown = false;
      const firstFree = { c: 0 };
      let cluster = firstCluster;
      while (cluster < endCluster) {
        const c = nextUsed(cluster, endCluster);
        if (c < 0) break;
        const ri = Math.floor(c / per);
        const rstart = ri * per;
        let offset: number;
        if (state.entries > ri && state.table[ri]) {
          offset = state.table[ri]!;
        } else {
          if (firstFree.c < rstart) firstFree.c = rstart;
          offset = allocImrt(1, firstFree);
          const rc = offset / cs;
          if (rc >= endCluster) endCluster = rc + 1;
          if (state.entries <= ri) {
            state.entries = Math.ceil(((ri + 1) * 8) / cs) * (cs / 8);
            while (state.table.length < state.entries) state.table.push(0);
            grown = true;
          }
          state.table[ri] = offset;
        }
        await writeBlock(ri, offset);
        cluster = rstart + per;
      }
      return grown;
    };

    try {
      let changed = await writeRefblocks(0, imrt.qemuClusters);
      let tableOffset = -1;
      let tableClusters = 0;
      do {
        tableClusters = Math.ceil((state.entries * 8) / cs);
        tableOffset = allocImrt(tableClusters, { c: 0 });
        const start = tableOffset / cs;
        changed = await writeRefblocks(start, start + tableClusters);
      } while (changed);

      const table = new Uint8Array(tableClusters * cs);
      const tv = new DataView(table.buffer);
      state.table.forEach((off, i) => {
        tv.setUint32(i * 8, Math.floor(off / TWO32));
        tv.setUint32(i * 8 + 4, off >>> 0);
      });
      if (!(await preWriteCheck(ctx, 0, tableOffset, table.length))) throw new CheckAborted('ERROR writing reftable: Input/output error');
      await ctx.file.writeAt(table, tableOffset);
      // Blocks and table durable before the header points to them.
      await ctx.file.flush();
      await ctx.header!.setRefcountTable(tableOffset, tableClusters);

      ctx.reftableOffset = tableOffset;
      ctx.reftableClusters = tableClusters;
      ctx.reftableRaw = table;
      ctx.fileSize = await ctx.file.size();
      invalidateOverlapMap(ctx);
    } catch (e) {
      res.checkErrors++;
      if (e instanceof CheckAborted) {
        ctx.report(e.reason);
        throw new CheckAborted('Input/output error', { cause: e });
      }
      ctx.report(`ERROR writing refcount structures: ${e instanceof Error ? e.message : String(e)}`);
      throw new CheckAborted('Input/output error', { cause: e });
    }
  } finally {
    k.free(out);
    k.free(zero);
    k.free(blockBuf);
  }
}
