/**
 * Comparison of the computed refcounts (IMRT) with the stored ones, block by block with the
 * refcountCompare kernel (QEMU's compare_refcounts), classification of the differences (leak:
 * stored > computed; corruption: stored < computed; stored 0 → the structure must be rebuilt) and
 * the in-place repair with a crash-safe order: every too-low count is raised and flushed before any
 * leaked count is lowered (and flushed), and freed clusters are discarded only after that.
 */
import { kernels } from '../../kernels/index.js';
import { forEachTable, reftableEntries, reftableEntry, refcountWriter, beginWrite, signalCorruption, tick, u64Of, type CheckContext } from './context.js';
import type { Imrt } from './imrt.js';
import { CheckAborted, FIX_ERRORS, FIX_LEAKS, hex, type CheckCounters, type FixMode } from './types.js';
import { ENTRY_OFFSET_LO } from '../../format/constants.js';

/** Marks a cluster whose stored refcount could not be read (in the stored view of the IMRT). */
export const UNREADABLE = 0xffffffff;
const CHUNK = 65536;

/** Differences in cluster order; stored = NaN when the refcount could not be read. */
export interface CompareScan {
  clusters: number[];
  stored: number[];
  computed: number[];
  /** Exact decimal text of stored values a double can't hold (64-bit refcounts), by scan index. */
  exact: Map<number, string>;
  /** Highest cluster with a stored or computed refcount (-1: none). */
  highest: number;
}

interface Buffers {
  out: number;
  zero: number;
  zeroBytes: number;
}

function buffers(ctx: CheckContext): Buffers {
  const k = kernels();
  const zeroBytes = Math.max(ctx.cs, CHUNK * 4);
  return { out: k.alloc(CHUNK * 4), zero: k.allocZeroed(zeroBytes), zeroBytes };
}

function freeBuffers(b: Buffers): void {
  const k = kernels();
  k.free(b.out);
  k.free(b.zero);
}

/**
 * Reads the stored refcounts of [0, compared range) and lists where they differ from the IMRT.
 * Computed counts above the width's maximum are reported as QEMU's overflow corruptions (and
 * capped, as QEMU's own in-memory table is).
 */
export async function scanRefcounts(ctx: CheckContext, res: CheckCounters, imrt: Imrt): Promise<CompareScan> {
  const k = kernels();
  const per = ctx.perBlock;
  const nCmp = Math.min(imrt.qemuClusters, imrt.n);
  const scan: CompareScan = { clusters: [], stored: [], computed: [], exact: new Map(), highest: -1 };
  const nBlocks = Math.ceil(nCmp / per);
  const tableN = reftableEntries(ctx);
  const offsets: number[] = [];
  const unaligned: boolean[] = [];
  for (let ti = 0; ti < nBlocks; ti++) {
    let off = 0;
    let bad = false;
    if (ti < tableN) {
      const [hi, lo] = reftableEntry(ctx, ti);
      off = u64Of(hi, lo & ENTRY_OFFSET_LO);
      if (off % ctx.cs) {
        bad = true;
        off = 0;
      }
    }
    offsets.push(off);
    unaligned.push(bad);
  }
  ctx.progress.total += nBlocks;
  const buf = buffers(ctx);
  const overflowed: number[] = [];
  try {
    await forEachTable(ctx, offsets, 'ERROR: could not read a refcount block', async (ti, ptr) => {
      tick(ctx, 1);
      const first = ti * per;
      const count = Math.min(per, nCmp - first);
      if (unaligned[ti]) {
        const [hi, lo] = reftableEntry(ctx, ti);
        await signalCorruption(ctx, `Refblock offset ${cHex(u64Of(hi, lo & ENTRY_OFFSET_LO))} unaligned (reftable index: ${cHex(ti)})`);
        for (let c = first; c < first + count; c++) {
          scan.clusters.push(c);
          scan.stored.push(NaN);
          scan.computed.push(0);
        }
        return;
      }
      const block = ptr || buf.zero;
      let from = 0;
      while (from < count) {
        // Sub-block starts must be byte aligned in the block: restart at a multiple of 8 entries.
        const base = from - (from % 8);
        const total = k.refcountCompare(imrt.ptr, first + base, count - base, blockAt(block, base, ctx.order), ctx.order, buf.out, CHUNK);
        if (total === 0) break;
        const got = Math.min(total, CHUNK);
        const idx = new Uint32Array(k.memory.buffer, buf.out, got);
        const refs = imrt.view();
        for (let m = 0; m < got; m++) {
          const j = base + idx[m]!;
          if (j < from) continue;
          const c = first + j;
          const stored = k.refcountGet(block, j, ctx.order);
          let computed = refs[c]!;
          if (computed > ctx.maxRefcount) {
            overflowed.push(c, computed - ctx.maxRefcount);
            computed = ctx.maxRefcount;
            refs[c] = computed;
            if (stored === computed) continue;
          }
          if (stored >= UNREADABLE - 1 && ctx.order === 6) scan.exact.set(scan.clusters.length, new DataView(k.memory.buffer, block + j * 8, 8).getBigUint64(0).toString());
          scan.clusters.push(c);
          scan.stored.push(stored);
          scan.computed.push(computed);
        }
        if (total <= CHUNK) break;
        from = base + idx[got - 1]! + 1;
      }
    });

    // Overflows are calculation errors in QEMU (reported before the comparison).
    for (let i = 0; i < overflowed.length; i += 2) {
      for (let n = 0; n < overflowed[i + 1]!; n++) {
        ctx.report(`ERROR: overflow cluster offset=0x${hex(overflowed[i]! * ctx.cs)}`);
        ctx.report('Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing');
        res.corruptions++;
      }
    }

    // References beyond the dense table (bounded tables of huge sparse files).
    if (imrt.sparse.size) {
      const writer = refcountWriter(ctx);
      for (const c of [...imrt.sparse.keys()].sort((a, b) => a - b)) {
        let stored: number;
        try {
          stored = await writer.get(c);
        } catch {
          stored = NaN;
        }
        const computed = Math.min(imrt.sparse.get(c)!, ctx.maxRefcount);
        if (stored !== computed) {
          scan.clusters.push(c);
          scan.stored.push(stored);
          scan.computed.push(computed);
        }
        if (!Number.isNaN(stored)) scan.highest = Math.max(scan.highest, c);
      }
    }

    // Highest cluster in use: the last non-zero computed count, or a leak above it.
    scan.highest = Math.max(scan.highest, lastNonZero(imrt, nCmp, per, unaligned, buf));
    for (let i = 0; i < scan.clusters.length; i++) if (scan.stored[i]! > 0) scan.highest = Math.max(scan.highest, scan.clusters[i]!);
  } finally {
    freeBuffers(buf);
  }
  return scan;
}

/** Pointer to entry `index` of a block (index is a multiple of 8 entries). */
function blockAt(block: number, index: number, order: number): number {
  return block + (index * 2 ** order) / 8;
}

/** Highest cluster below n whose computed count is non-zero (unreadable blocks skipped). */
function lastNonZero(imrt: Imrt, n: number, per: number, unaligned: boolean[], buf: Buffers): number {
  const k = kernels();
  for (let ti = Math.ceil(n / per) - 1; ti >= 0; ti--) {
    if (unaligned[ti]) continue;
    const lo = ti * per;
    for (let end = Math.min(n, lo + per); end > lo; ) {
      const start = Math.max(lo, end - CHUNK);
      const total = k.refcountCompare(imrt.ptr, start, end - start, buf.zero, 5, buf.out, CHUNK);
      if (total > 0) return start + new Uint32Array(k.memory.buffer, buf.out, total)[total - 1]!;
      end = start;
    }
  }
  return -1;
}

/** What one comparison decided to write. */
export interface RepairPlan {
  raise: { clusters: number[]; values: number[] };
  lower: { clusters: number[]; values: number[] };
  /** Indices (into the scan) of the differences the plan fixes. */
  fixed: Set<number>;
}

/**
 * QEMU's compare_refcounts over a scan: prints the per-cluster lines, counts leaks/corruptions
 * (or plans their fix), and returns whether the structure must be rebuilt.
 */
export function classify(ctx: CheckContext, scan: CompareScan, res: CheckCounters, fix: FixMode): { rebuild: boolean; plan: RepairPlan } {
  let rebuild = false;
  const plan: RepairPlan = { raise: { clusters: [], values: [] }, lower: { clusters: [], values: [] }, fixed: new Set() };
  for (let i = 0; i < scan.clusters.length; i++) {
    const c = scan.clusters[i]!;
    const r1 = scan.stored[i]!;
    const r2 = scan.computed[i]!;
    if (Number.isNaN(r1)) {
      ctx.report(`Can't get refcount for cluster ${c}: Input/output error`);
      res.checkErrors++;
      continue;
    }
    let kind: 'leak' | 'corruption' | undefined;
    if (r1 === 0) rebuild = true;
    else if (r1 > r2 && fix & FIX_LEAKS) kind = 'leak';
    else if (r1 < r2 && fix & FIX_ERRORS) kind = 'corruption';
    ctx.report(`${kind ? 'Repairing' : r1 < r2 ? 'ERROR' : 'Leaked'} cluster ${c} refcount=${scan.exact.get(i) ?? r1} reference=${r2}`);
    if (kind) {
      (kind === 'leak' ? plan.lower : plan.raise).clusters.push(c);
      (kind === 'leak' ? plan.lower : plan.raise).values.push(r2);
      plan.fixed.add(i);
      if (kind === 'leak') res.leaksFixed++;
      else res.corruptionsFixed++;
    } else if (r1 < r2) res.corruptions++;
    else res.leaks++;
  }
  return { rebuild, plan };
}

/** Writes a plan: raises, flush, lowers, flush; clusters that reach 0 are punched after that. */
export async function applyPlan(ctx: CheckContext, plan: RepairPlan): Promise<void> {
  if (!plan.raise.clusters.length && !plan.lower.clusters.length) return;
  try {
    await beginWrite(ctx);
    const writer = refcountWriter(ctx);
    if (plan.raise.clusters.length) {
      await writer.setMany(plan.raise.clusters, plan.raise.values);
      await writer.commit();
    }
    if (plan.lower.clusters.length) {
      await writer.setMany(plan.lower.clusters, plan.lower.values);
      await writer.commit();
    }
  } catch (e) {
    ctx.report(`ERROR: could not update refcounts: ${e instanceof Error ? e.message : String(e)}`);
    throw new CheckAborted('Input/output error', { cause: e });
  }
}

/**
 * Turns the IMRT into the stored view the COPIED check needs: differences left unfixed take their
 * stored value, unreadable ones the UNREADABLE mark; everything else already equals the disk.
 */
export function storedView(imrt: Imrt, scan: CompareScan, fixed: Set<number>): Map<number, string> {
  const big = new Map<number, string>();
  for (let i = 0; i < scan.clusters.length; i++) {
    if (fixed.has(i)) continue;
    const s = scan.stored[i]!;
    if (s >= UNREADABLE - 1) big.set(scan.clusters[i]!, scan.exact.get(i) ?? String(s));
    imrt.set(scan.clusters[i]!, Number.isNaN(s) ? UNREADABLE : Math.min(s, UNREADABLE - 1));
  }
  return big;
}

/** C's %#x: "0" for zero, else 0x-prefixed hex. */
function cHex(n: number): string {
  return n === 0 ? '0' : `0x${hex(n)}`;
}
