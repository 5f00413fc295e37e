/**
 * Reference counting over all metadata (QEMU's calculate_refcounts): the header cluster, the
 * active L1 and its L2 tables and data clusters, every snapshot's L1/L2s, the snapshot table, the
 * refcount table and blocks, the LUKS header and the persistent bitmaps. Every reference lands in
 * the IMRT; messages, counts and fixes follow QEMU 7.2 (block/qcow2-refcount.c) exactly.
 *
 * L2 tables are streamed in large windows and accounted by the l2AccountRefs kernel. A table the
 * kernel flags (invalid entries, references past the counted range, a compressed entry with the
 * COPIED bit) has the kernel's increments undone and is re-done entry by entry with QEMU's exact
 * semantics (messages, corruption counts, fix-by-zero of misaligned preallocated entries).
 */
import { QcowError } from '../../errors.js';
import { kernels, L2Stat } from '../../kernels/index.js';
import { BME_TABLE_RESERVED_MASK } from '../../format/bitmap.js';
import { beginWrite, big64, forEachTable, reftableEntries, reftableEntry, tick, u64Of, type CheckContext } from './context.js';
import type { Imrt } from './imrt.js';
import { preWriteCheck, OL_ACTIVE_L2, OL_INACTIVE_L2 } from './overlap.js';
import { CheckAborted, FIX_ERRORS, hex, type CheckCounters, type FixMode } from './types.js';
import { ENTRY_LOW_BITS, ENTRY_OFFSET_LO, L1E_RESERVED_HI, L2E_OFFSET_MASK, L2E_RESERVED_HI, L2E_RESERVED_LO, entryOffset } from '../../format/constants.js';

const MAX_EXACT = 2 ** 53;
/** QEMU's QCOW_MAX_L1_SIZE (32 MiB) in entries. */
const MAX_L1_ENTRIES = (32 * 1024 * 1024) / 8;

/** Per-pass scratch in wasm memory (allocated before streaming starts: no allocation mid-stream). */
interface Scratch {
  stats: number;
}

/** QEMU's calculate_refcounts; returns whether the refcount structure must be rebuilt. */
export async function calculateRefcounts(ctx: CheckContext, res: CheckCounters, fix: FixMode, imrt: Imrt): Promise<boolean> {
  const k = kernels();
  const scratch: Scratch = { stats: k.alloc(64) };
  try {
    // header
    imrt.addRange(0, ctx.cs, ctx.fileSize, res, ctx.report);

    // active L1
    const h = ctx.img.header;
    await checkL1(ctx, res, fix, imrt, scratch, h.l1TableOffset, h.l1Size, true, ctx.l1Raw);

    // snapshots
    if (ctx.dataFile && ctx.img.snapshots.length) {
      ctx.report(`ERROR ${ctx.img.snapshots.length} snapshots in image with data file`);
      res.corruptions++;
    }
    for (const sn of ctx.img.snapshots) {
      const l1Offset = sn.l1TableOffsetExact ?? BigInt(sn.l1TableOffset);
      if (l1Offset % BigInt(ctx.cs)) {
        ctx.report(`ERROR snapshot ${sn.id} (${sn.name}) l1_offset=0x${hex(l1Offset)}: L1 table is not cluster aligned; snapshot table entry corrupted`);
        res.corruptions++;
        continue;
      }
      if (sn.l1Size > MAX_L1_ENTRIES) {
        ctx.report(`ERROR snapshot ${sn.id} (${sn.name}) l1_size=0x${hex(sn.l1Size)}: L1 table is too large; snapshot table entry corrupted`);
        res.corruptions++;
        continue;
      }
      if (sn.l1Size > MAX_L1_ENTRIES) {
        ctx.report(`ERROR snapshot ${sn.id} (${sn.name}) l1_size=0x${hex(sn.l1Size)}: L1 table is too large; snapshot table entry corrupted`);
        res.corruptions++;
        continue;
      }
      await checkL1(ctx, res, fix, imrt, scratch, sn.l1TableOffset, sn.l1Size, false, undefined);
    }
    imrt.addRange(h.snapshotsOffset, ctx.img.snapshotTableBytes, ctx.fileSize, res, ctx.report);

    // refcount table
    imrt.addRange(ctx.reftableOffset, ctx.reftableClusters * ctx.cs, ctx.fileSize, res, ctx.report);

    // encryption header
    if (h.encryption && h.encryption.length) imrt.addRange(h.encryption.offset, h.encryption.length, ctx.fileSize, res, ctx.report);

    // bitmaps
    await checkBitmaps(ctx, res, imrt);

    return await checkRefblocks(ctx, res, fix, imrt);
  } finally {
    k.free(scratch.stats);
  }
}

/** QEMU's check_refcounts_l1 (raw: the table bytes when already read). */
async function checkL1(
  ctx: CheckContext,
  res: CheckCounters,
  fix: FixMode,
  imrt: Imrt,
  scratch: Scratch,
  l1Offset: number,
  l1Size: number,
  active: boolean,
  raw: Uint8Array | undefined,
): Promise<void> {
  if (!l1Size) return;
  imrt.addRange(l1Offset, l1Size * 8, ctx.fileSize, res, ctx.report);
  if (!raw) {
    raw = new Uint8Array(l1Size * 8);
    try {
      // QEMU reads zeros past the end of the file and fails on offsets of 2^63 and more.
      if (l1Offset >= 2 ** 63) throw new QcowError('IO', `read error at offset ${l1Offset}`, ctx.img.path);
      if (l1Offset < ctx.fileSize) await ctx.file.readAt(raw.subarray(0, Math.min(raw.length, ctx.fileSize - l1Offset)), l1Offset);
    } catch (e) {
      ctx.report('ERROR: I/O error in check_refcounts_l1');
      res.checkErrors++;
      throw new CheckAborted('Input/output error', { cause: e });
    }
  }
  const v = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
  const indices: number[] = [];
  const offsets: number[] = [];
  for (let i = 0; i < l1Size; i++) {
    const hi = v.getUint32(i * 8);
    const lo = v.getUint32(i * 8 + 4);
    if (hi === 0 && lo === 0) continue;
    indices.push(i);
    offsets.push(entryOffset(hi, lo));
  }
  ctx.progress.total += offsets.length;

  await forEachTable(ctx, offsets, 'ERROR: I/O error in check_refcounts_l2', (n, ptr) => {
    const i = indices[n]!;
    const hi = v.getUint32(i * 8);
    const lo = v.getUint32(i * 8 + 4);
    if (hi & L1E_RESERVED_HI || lo & ENTRY_LOW_BITS) {
      ctx.report(`ERROR found L1 entry with reserved bits set: ${hex(big64(hi, lo))}`);
      res.corruptions++;
    }
    const l2Offset = offsets[n]!;
    imrt.addRange(l2Offset, ctx.cs, ctx.fileSize, res, ctx.report);
    if (l2Offset % ctx.cs) {
      ctx.report(`ERROR l2_offset=${hex(l2Offset)}: Table is not cluster aligned; L1 entry corrupted`);
      res.corruptions++;
    }
    tick(ctx, 1);
    return checkL2(ctx, res, fix, imrt, scratch, l2Offset, ptr, active);
  });
}

/** Clusters below this count are counted by the kernel; references beyond go to the slow path. */
function kernelClusters(ctx: CheckContext, imrt: Imrt): number {
  return Math.min(imrt.n, Math.ceil(ctx.fileSize / ctx.cs));
}

/** QEMU's check_refcounts_l2 for the table at `ptr` (read from `l2Offset`). */
async function checkL2(ctx: CheckContext, res: CheckCounters, fix: FixMode, imrt: Imrt, scratch: Scratch, l2Offset: number, ptr: number, active: boolean): Promise<void> {
  const k = kernels();
  if (!ctx.dataFile) {
    const nk = kernelClusters(ctx, imrt);
    k.l2AccountRefs(ptr, ctx.l2Entries, ctx.extendedL2, ctx.cb, imrt.ptr, nk, scratch.stats);
    const s = new Float64Array(k.memory.buffer, scratch.stats, 8);
    let exact = s[L2Stat.Invalid] === 0 && s[L2Stat.OutOfRange] === 0;
    if (exact && s[L2Stat.Compressed]! > 0 && hasCopiedCompressed(ctx, ptr)) exact = false;
    if (exact) {
      if (active) {
        res.allocatedClusters += s[L2Stat.Allocated]!;
        res.compressedClusters += s[L2Stat.Compressed]!;
        res.fragmentedClusters += s[L2Stat.Fragmented]!;
      }
      return;
    }
    undoKernel(ctx, imrt, ptr, nk);
  }
  await checkL2Exact(ctx, res, fix, imrt, l2Offset, ptr, active);
}

/** Any compressed entry with the COPIED bit (bits 63 and 62 both set: first byte & 0xC0). */
function hasCopiedCompressed(ctx: CheckContext, ptr: number): boolean {
  const b = kernels().u8(ptr, ctx.cs);
  for (let i = 0; i < b.length; i += ctx.entryBytes) if ((b[i]! & 0xc0) === 0xc0) return true;
  return false;
}

/**
 * Removes what l2AccountRefs added for this table (its rules: entries it classifies as valid data,
 * zero-allocated or compressed; clusters below nk).
 */
function undoKernel(ctx: CheckContext, imrt: Imrt, ptr: number, nk: number): void {
  const k = kernels();
  const v = new DataView(k.memory.buffer, ptr, ctx.cs);
  const refs = imrt.view();
  const dec = (c: number) => {
    if (c < nk && refs[c]! > 0 && refs[c] !== 0xffffffff) refs[c]!--;
  };
  for (let i = 0; i < ctx.l2Entries; i++) {
    const at = i * ctx.entryBytes;
    const hi = v.getUint32(at);
    const lo = v.getUint32(at + 4);
    const bmHi = ctx.extendedL2 ? v.getUint32(at + 8) : 0;
    const bmLo = ctx.extendedL2 ? v.getUint32(at + 12) : 0;
    if (hi & 0x40000000) {
      if (ctx.extendedL2 && (bmHi || bmLo)) continue;
      const c = parseCompressed(ctx, hi, lo);
      if (c.offset >= MAX_EXACT) continue;
      const last = Math.floor((c.offset + c.size - 1) / ctx.cs);
      for (let x = Math.floor(c.offset / ctx.cs); x <= last; x++) dec(x);
      continue;
    }
    const host = entryOffset(hi, lo);
    const reserved = (hi & L2E_RESERVED_HI) !== 0 || (lo & (ctx.extendedL2 ? ENTRY_LOW_BITS : L2E_RESERVED_LO)) !== 0;
    if (reserved) continue;
    if (host !== 0 && (host % ctx.cs !== 0 || host >= MAX_EXACT)) continue;
    if (ctx.extendedL2) {
      if (bmLo & bmHi) continue;
      if (bmLo && host === 0) continue;
    }
    if (host) dec(host / ctx.cs);
  }
}

interface Compressed {
  offset: number;
  size: number;
  /** The exact offset (it may exceed 2^53 in a corrupt entry). */
  big: bigint;
}

/** QEMU's qcow2_parse_compressed_l2_entry. */
function parseCompressed(ctx: CheckContext, hi: number, lo: number): Compressed {
  const shift = BigInt(62 - (ctx.cb - 8));
  const e = big64(hi, lo);
  const big = e & ((1n << shift) - 1n);
  const sectors = Number((e >> shift) & ((1n << BigInt(ctx.cb - 8)) - 1n)) + 1;
  const offset = Number(big);
  return { offset, big, size: sectors * 512 - Number(big & 511n) };
}

/** Entry-by-entry QEMU semantics for one L2 table. */
async function checkL2Exact(ctx: CheckContext, res: CheckCounters, fix: FixMode, imrt: Imrt, l2Offset: number, ptr: number, active: boolean): Promise<void> {
  const k = kernels();
  const cs = ctx.cs;
  let next = 0;
  for (let i = 0; i < ctx.l2Entries; i++) {
    const v = new DataView(k.memory.buffer, ptr, cs); // fresh: awaits below may outlive a view
    const at = i * ctx.entryBytes;
    const hi = v.getUint32(at);
    const lo = v.getUint32(at + 4);
    const bmHi = ctx.extendedL2 ? v.getUint32(at + 8) : 0;
    const bmLo = ctx.extendedL2 ? v.getUint32(at + 12) : 0;
    const compressed = (hi & 0x40000000) !== 0;
    const offset = entryOffset(hi, lo);

    if (!compressed && ((hi & L2E_RESERVED_HI) !== 0 || (lo & L2E_RESERVED_LO) !== 0)) {
      ctx.report(`ERROR found l2 entry with reserved bits set: ${hex(big64(hi, lo))}`);
      res.corruptions++;
    }

    if (compressed) {
      const c = parseCompressed(ctx, hi, lo);
      if (hi & 0x80000000) {
        ctx.report(`ERROR: coffset=0x${hex(c.big)}: copied flag must never be set for compressed clusters`);
        res.corruptions++;
      }
      if (ctx.dataFile) {
        ctx.report(`ERROR compressed cluster ${i} with data file, entry=0x${hex(big64(hi & 0x7fffffff, lo))}`);
        res.corruptions++;
        continue;
      }
      if (bmHi || bmLo) {
        ctx.report(`ERROR compressed cluster ${i} with non-zero subcluster allocation bitmap, entry=0x${hex(big64(hi & 0x7fffffff, lo))}`);
        res.corruptions++;
        continue;
      }
      if (c.big >= BigInt(MAX_EXACT)) {
        ctx.report(`ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${hex(c.big)} size 0x${hex(c.size)}`);
        res.corruptions++;
      } else {
        imrt.addRange(c.offset, c.size, ctx.fileSize, res, ctx.report);
      }
      if (active) {
        res.allocatedClusters++;
        res.compressedClusters++;
        res.fragmentedClusters++;
      }
      continue;
    }

    const zeroFlag = !ctx.extendedL2 && (lo & 1) !== 0;
    let type: 'normal' | 'zero-alloc' | 'zero-plain' | 'unallocated';
    if (zeroFlag) type = offset ? 'zero-alloc' : 'zero-plain';
    else if (!offset) type = ctx.dataFile && hi & 0x80000000 ? 'normal' : 'unallocated';
    else type = 'normal';

    if (type === 'normal' || type === 'zero-alloc') {
      if (bmLo & bmHi) {
        res.corruptions++;
        ctx.report(`ERROR offset=${hex(offset)}: Allocated cluster has corrupted subcluster allocation bitmap`);
      }
      if (offset % cs) {
        res.corruptions++;
        const containsData = ctx.extendedL2 ? bmLo !== 0 : (lo & 1) === 0;
        if (!containsData) {
          ctx.report(`${fix & FIX_ERRORS ? 'Repairing' : 'ERROR'} offset=${hex(offset)}: Preallocated cluster is not properly aligned; L2 entry corrupted.`);
          if (fix & FIX_ERRORS) {
            const r = await fixL2EntryByZero(ctx, res, l2Offset, ptr, i, active);
            if (r === 'overlap') throw new CheckAborted('Input/output error');
            if (r === 'fixed') continue;
          }
        } else {
          ctx.report(`ERROR offset=${hex(offset)}: Data cluster is not properly aligned; L2 entry corrupted.`);
        }
      }
      if (active) {
        res.allocatedClusters++;
        if (next && offset !== next) res.fragmentedClusters++;
        next = offset + cs;
      }
      if (!ctx.dataFile) imrt.addRange(offset, cs, ctx.fileSize, res, ctx.report);
    } else if (type === 'unallocated' && bmLo) {
      res.corruptions++;
      ctx.report('ERROR: Unallocated cluster has non-zero subcluster allocation map');
    }
  }
}

/**
 * QEMU's fix_l2_entry_by_zero: a misaligned preallocated entry becomes "reads as zero, no host
 * cluster" (removing a reference only ever leaks). Written synchronously, in place.
 */
async function fixL2EntryByZero(ctx: CheckContext, res: CheckCounters, l2Offset: number, ptr: number, i: number, active: boolean): Promise<'fixed' | 'failed' | 'overlap'> {
  const k = kernels();
  const entry = new Uint8Array(ctx.entryBytes);
  const ev = new DataView(entry.buffer);
  if (ctx.extendedL2) {
    const v = new DataView(k.memory.buffer, ptr, ctx.cs);
    const bmHi = v.getUint32(i * 16 + 8);
    const bmLo = v.getUint32(i * 16 + 12);
    ev.setUint32(8, (bmHi | bmLo) >>> 0); // allocated subclusters become zero
    ev.setUint32(12, 0);
  } else {
    ev.setUint32(4, 1);
  }
  const at = l2Offset + i * ctx.entryBytes;
  if (!(await preWriteCheck(ctx, active ? OL_ACTIVE_L2 : OL_INACTIVE_L2, at, ctx.entryBytes))) {
    ctx.report('ERROR: Overlap check failed');
    res.checkErrors++;
    return 'overlap';
  }
  try {
    await beginWrite(ctx);
    await ctx.file.writeAt(entry, at);
    await ctx.file.flush();
  } catch (e) {
    ctx.report(`ERROR: Failed to overwrite L2 table entry: ${errnoText(e)}`);
    res.checkErrors++;
    return 'failed';
  }
  k.u8(ptr + i * ctx.entryBytes, ctx.entryBytes).set(entry);
  res.corruptions--;
  res.corruptionsFixed++;
  return 'fixed';
}

/** QEMU's qcow2_check_bitmaps_refcounts. */
async function checkBitmaps(ctx: CheckContext, res: CheckCounters, imrt: Imrt): Promise<void> {
  const ext = ctx.img.header.bitmaps;
  if (!ext) return;
  imrt.addRange(ext.directoryOffset, ext.directorySize, ctx.fileSize, res, ctx.report);
  for (const bm of ctx.img.bitmaps) {
    imrt.addRange(bm.tableOffset, bm.tableSize * 8, ctx.fileSize, res, ctx.report);
    const table = new Uint8Array(bm.tableSize * 8);
    try {
      await ctx.file.readAt(table, bm.tableOffset);
    } catch {
      res.corruptions++;
      return;
    }
    const v = new DataView(table.buffer);
    const offsets: number[] = [];
    for (let i = 0; i < bm.tableSize; i++) {
      const e = v.getBigUint64(i * 8);
      const off = Number(e & L2E_OFFSET_MASK);
      if (e & BME_TABLE_RESERVED_MASK || (off && (e & 1n || off % ctx.cs))) {
        // QEMU fails loading the whole table: one corruption, and no further bitmaps are counted.
        res.corruptions++;
        return;
      }
      if (off) offsets.push(off);
    }
    for (const off of offsets) imrt.addRange(off, ctx.cs, ctx.fileSize, res, ctx.report);
  }
}

/** QEMU's check_refblocks: counts the refcount blocks; returns whether a rebuild is needed. */
async function checkRefblocks(ctx: CheckContext, res: CheckCounters, fix: FixMode, imrt: Imrt): Promise<boolean> {
  let rebuild = false;
  const n = reftableEntries(ctx);
  for (let i = 0; i < n; i++) {
    const [hi, lo] = reftableEntry(ctx, i);
    if (hi === 0 && lo === 0) continue;
    const offset = u64Of(hi, lo & ENTRY_OFFSET_LO);
    if (lo & ENTRY_LOW_BITS) {
      ctx.report(`ERROR refcount table entry ${i} has reserved bits set`);
      res.corruptions++;
      rebuild = true;
      continue;
    }
    if (offset % ctx.cs) {
      ctx.report(`ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted`);
      res.corruptions++;
      rebuild = true;
      continue;
    }
    const cluster = Math.floor(offset / ctx.cs);
    if (cluster >= imrt.qemuClusters) {
      res.corruptions++;
      ctx.report(`${fix & FIX_ERRORS ? 'Repairing' : 'ERROR'} refcount block ${i} is outside image`);
      if (fix & FIX_ERRORS) {
        try {
          if (offset >= MAX_EXACT || offset + ctx.cs > 2 ** 50) throw new Error('Invalid argument');
          await beginWrite(ctx);
          await ctx.file.truncate(offset + ctx.cs);
          ctx.fileSize = await ctx.file.size();
          const clusters = Math.ceil(ctx.fileSize / ctx.cs);
          imrt.grow(clusters + 1);
          imrt.qemuClusters = Math.max(imrt.qemuClusters, clusters);
          if (cluster >= imrt.qemuClusters) throw new Error('Invalid argument');
          res.corruptions--;
          res.corruptionsFixed++;
          imrt.addRange(offset, ctx.cs, ctx.fileSize, res, ctx.report);
        } catch (e) {
          // A failed resize is QEMU's resize_fail (rebuild instead); anything else propagates.
          if (!(e instanceof QcowError) && !(e instanceof Error && e.message === 'Invalid argument')) throw e;
          rebuild = true;
          ctx.report(`ERROR could not resize image: ${errnoText(e)}`);
        }
      }
      continue;
    }
    imrt.addRange(offset, ctx.cs, ctx.fileSize, res, ctx.report);
    const r = Math.min(imrt.get(cluster), ctx.maxRefcount);
    if (r !== 1) {
      ctx.report(`ERROR refcount block ${i} refcount=${r}`);
      res.corruptions++;
      rebuild = true;
    }
  }
  return rebuild;
}

/** strerror-like text of an I/O failure. */
export function errnoText(e: unknown): string {
  const code = (e as { cause?: { code?: string } })?.cause?.code ?? (e as { code?: string })?.code;
  switch (code) {
    case 'ENOSPC':
      return 'No space left on device';
    case 'EACCES':
    case 'EPERM':
      return 'Permission denied';
    case 'EFBIG':
      return 'File too large';
    default:
      return e instanceof Error && e.message === 'Invalid argument' ? 'Invalid argument' : 'Input/output error';
  }
}
