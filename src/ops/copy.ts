/**
 * The machinery shared by the operations that copy guest data into an image (commit, rebase):
 * the free-space check before the first write; `copyPlan`, the pipelined copy of a plan of guest
 * ranges (read from the providing layers' host data, zero-detected, written in batches while
 * the next batch is read); and the zero-aware writer of one chunk read into wasm memory (whole
 * all-zero units become zero writes, never zero data; the rest is written as data, optionally
 * only the units a bitmap selects and optionally compressed).
 */
import { statfs } from 'node:fs/promises';
import { dirname } from 'node:path';
import { QcowError, throwIfAborted } from '../errors.js';
import { kernels } from '../kernels/index.js';
import type { WritableLayer } from '../chain/layer.js';
import type { BackingChain } from '../chain/chain.js';
import { readGuestPieces } from '../chain/copy-read.js';

/** Refuses (nothing written) when `need` bytes more than the filesystem of `path` has free. */
export async function checkFreeSpace(path: string, need: number, what = 'the base'): Promise<void> {
  let avail: number;
  try {
    const st = await statfs(dirname(path));
    avail = st.bavail * st.bsize;
  } catch {
    return; // unknown: let the writes tell
  }
  if (need > avail)
    throw new QcowError('NO_SPACE', `${what} needs up to ${need} more bytes but its filesystem has ${avail} free; nothing was written (free space or write elsewhere)`, path);
}

export interface ChunkRun {
  start: number;
  length: number;
  /** The run reads as zeros: a zero write (zero flag / unmapped), never zero data. */
  zero: boolean;
}

/**
 * Splits the chunk [start, start+length) at `ptr` into runs: whole `unit`-aligned blocks that are
 * all zero become zero runs, everything else data. With `select` (a bitmap over the whole units
 * inside the chunk, bit i = unit i), units whose bit is clear are left out entirely.
 */
export function chunkRuns(start: number, length: number, ptr: number, unit: number, select?: number): ChunkRun[] {
  const k = kernels();
  const a = Math.ceil(start / unit) * unit; // whole units: [a, b)
  const b = Math.floor((start + length) / unit) * unit;
  const runs: ChunkRun[] = [];
  const push = (s: number, e: number, z: boolean) => {
    if (e <= s) return;
    const last = runs[runs.length - 1];
    if (last && last.zero === z && last.start + last.length === s) last.length += e - s;
    else runs.push({ start: s, length: e - s, zero: z });
  };
  push(start, Math.min(a, start + length), false);
  if (b > a) {
    const blocks = (b - a) / unit;
    const bitBytes = Math.ceil(blocks / 8) + 16;
    const zeroBits = k.allocZeroed(bitBytes);
    const dataBits = select === undefined ? 0 : k.alloc(bitBytes);
    const ext = k.alloc(16 * Math.max(1, blocks));
    try {
      k.zeroBlocks(ptr + (a - start), b - a, Math.log2(unit), zeroBits);
      const collect = (bits: number, zero: boolean, out: Array<[number, number, boolean]>) => {
        for (let from = 0; from < blocks; ) {
          const n = k.extents(bits, from, blocks, ext, blocks);
          const pairs = new Float64Array(k.memory.buffer, ext, n * 2);
          for (let i = 0; i < n; i++) out.push([pairs[i * 2]!, pairs[i * 2 + 1]!, zero]);
          from = k.extentsNext();
          if (n === 0) break;
        }
      };
      const parts: Array<[number, number, boolean]> = [];
      if (select === undefined) {
        // Zero runs from the bitmap; the gaps between them are data.
        collect(zeroBits, true, parts);
        let prev = 0;
        for (const [zs, zl] of parts) {
          push(a + prev * unit, a + zs * unit, false);
          push(a + zs * unit, a + (zs + zl) * unit, true);
          prev = zs + zl;
        }
        push(a + prev * unit, b, false);
      } else {
        // Selected units only: selected & zero, selected & ~zero.
        k.u8(dataBits, bitBytes).set(k.u8(select, bitBytes));
        k.bitmapAndNot(dataBits, zeroBits, bitBytes);
        k.bitmapAnd(zeroBits, select, bitBytes);
        collect(zeroBits, true, parts);
        collect(dataBits, false, parts);
        parts.sort((x, y) => x[0] - y[0]);
        for (const [s, l, z] of parts) push(a + s * unit, a + (s + l) * unit, z);
      }
    } finally {
      k.free(zeroBits);
      if (dataBits) k.free(dataBits);
      k.free(ext);
    }
  }
  push(Math.max(b, a, start), start + length, false);
  return runs;
}

/** Writes runs of a chunk at `ptr` (guest offset `start`) into `target`; null = count only (dry run). */
export async function writeRuns(
  target: WritableLayer | null,
  runs: ChunkRun[],
  start: number,
  ptr: number,
  opts: { compressed?: ((offset: number, data: Uint8Array) => Promise<void>) | undefined } = {},
): Promise<{ data: number; zero: number }> {
  const k = kernels();
  let data = 0;
  let zero = 0;
  for (const r of runs) {
    if (r.zero) {
      if (target) await target.writeZeroes(r.start, r.length, { unmap: true });
      zero += r.length;
    } else {
      if (target) {
        const bytes = k.u8(ptr + (r.start - start), r.length);
        if (opts.compressed) await opts.compressed(r.start, bytes);
        else await target.write(r.start, bytes);
      }
      data += r.length;
    }
  }
  return { data, zero };
}

/** Writes one chunk read into wasm memory: all-zero whole units as zeroes, the rest as data. */
export async function writeDataChunk(target: WritableLayer, start: number, length: number, ptr: number, unit: number): Promise<{ data: number; zero: number }> {
  return writeRuns(target, chunkRuns(start, length, ptr, unit), start, ptr);
}

/** One range of a copy plan (guest order): zeros, or data as layer `depth` of the chain provides it. */
export interface CopyExtent {
  start: number;
  length: number;
  zero: boolean;
  depth: number;
}

export interface CopyPlanOptions {
  /** Granularity of zero detection: the target's cluster (all-zero ones become zero writes). */
  unit: number;
  signal?: AbortSignal | undefined;
  onProgress?: ((done: number, total: number) => void) | undefined;
  /** At most this many guest bytes per second (0 or absent: no limit). */
  rateLimit?: number | undefined;
}

/** Data read and written as one batch (one writeMany: one allocation, few large writes). */
const WINDOW_BYTES = 16 * 1024 * 1024;
/** Ranges in one batch at most (bounds the per-batch bookkeeping). */
const WINDOW_RANGES = 1024;
/** Batches being written while the next one is read. */
const WINDOWS_WRITING = 2;
/** Zero-run pairs collected per kernel call. */
const ZERO_RUNS = 1024;
const PAGE = 4096;

/** A batch: data pieces at byte `at` of one buffer (unit-aligned as in the guest), and zero ranges. */
interface Window {
  pieces: Array<{ start: number; length: number; depth: number; at: number }>;
  zeroes: Array<{ start: number; length: number }>;
  /** Buffer bytes (data and alignment padding). */
  bytes: number;
  /** Guest bytes the batch covers (progress). */
  guest: number;
}

/**
 * Copies the plan into `target`: batches of data are read from the layers that provide them
 * (host order, vectored, see readGuestPieces) into wasm memory, split by a kernel into all-zero
 * units and data, and written as one `writeMany` per batch while the next batch is read. The
 * zero ranges (the plan's and the all-zero units) are written after all the data: a zero write
 * that drops a cluster makes the refcounts wait for the L2 tables, a data write makes the L2
 * tables wait for the refcounts, and alternating the two costs a pair of flushes each time.
 * Returns the guest bytes written as data and as zeros. On an error or abort, nothing is left
 * in flight.
 */
export async function copyPlan(chain: BackingChain, target: WritableLayer, extents: readonly CopyExtent[], opts: CopyPlanOptions): Promise<{ data: number; zero: number }> {
  const unit = opts.unit;
  const window = Math.max(WINDOW_BYTES, 4 * unit);
  let total = 0;
  for (const e of extents) total += e.length;
  const k = kernels();
  // No memory growth while reads and writes hold views of wasm memory.
  k.reserve((WINDOWS_WRITING + 1) * (window + PAGE) + 16 * 1024 * 1024);
  const maxUnits = Math.ceil(window / unit) + 2 * WINDOW_RANGES;
  const bits = k.alloc(Math.ceil(maxUnits / 8) + 16);
  const pairs = k.alloc(16 * ZERO_RUNS);
  const started = performance.now();
  let read = 0;
  let done = 0;
  let data = 0;
  let zero = 0;
  const writing: Array<Promise<void>> = [];
  const zeroes: Array<{ start: number; length: number }> = [];
  try {
    for (const w of windows(extents, unit, window)) {
      throwIfAborted(opts.signal, chain.top.path);
      if (writing.length >= WINDOWS_WRITING) await writing.shift();
      // The reads below are mostly synchronous: the write engine gets to issue the batch just
      // handed to it first (its steps are promise continuations), so the disk is never idle
      // while this thread reads.
      await new Promise((r) => setImmediate(r));
      if (opts.rateLimit) {
        // Sleep until the average since the start is back under the limit.
        const ahead = (read / opts.rateLimit) * 1000 - (performance.now() - started);
        if (ahead > 0) await new Promise((r) => setTimeout(r, ahead));
      }
      read += w.guest;
      // Page-aligned, so that the writes of whole clusters can bypass the page cache (file.ts).
      const mem = w.bytes ? k.alloc(w.bytes + PAGE) : 0;
      const ptr = mem && Math.ceil(mem / PAGE) * PAGE;
      let handed = false;
      try {
        if (w.pieces.length) await readGuestPieces(chain, w.pieces.map((p) => ({ start: p.start, depth: p.depth, dst: k.u8(ptr + p.at, p.length) })));
        const split = splitWindow(w, ptr, unit, bits, pairs);
        data += split.data;
        zero += split.zero;
        for (const z of split.zeroes) {
          const last = zeroes[zeroes.length - 1];
          if (last && last.start + last.length === z.start) last.length += z.length;
          else zeroes.push(z);
        }
        const p = writeData(target, ptr, split.items)
          .then(() => {
            done += split.data;
            opts.onProgress?.(done, total);
          })
          .finally(() => {
            if (mem) k.free(mem); // (a batch of zero ranges only has no buffer)
          });
        p.catch(() => {}); // awaited in order below; a failure while an earlier one is awaited is not unhandled
        writing.push(p);
        handed = true;
      } finally {
        if (!handed && mem) k.free(mem);
      }
    }
    // The zero ranges go in while the last batches are still being written.
    try {
      for (const z of zeroes) {
        throwIfAborted(opts.signal, chain.top.path);
        await target.writeZeroes(z.start, z.length, { unmap: true });
        done += z.length;
        opts.onProgress?.(done, total);
      }
    } catch (e) {
      for (const w of writing) await w; // a failed data write is the error to report
      throw e;
    }
    while (writing.length) await writing.shift();
  } finally {
    await Promise.allSettled(writing); // never leave writes running behind an error
    k.free(bits);
    k.free(pairs);
  }
  if (!total) opts.onProgress?.(0, 0);
  return { data, zero };
}

/**
 * The plan cut into batches of at most `max` buffer bytes and WINDOW_RANGES ranges. The first
 * batches are smaller (1 MiB, doubling): the disk gets its first write after a short read.
 */
function* windows(extents: readonly CopyExtent[], unit: number, max: number): Generator<Window> {
  let limit = Math.min(max, Math.max(4 * unit, 1024 * 1024));
  let w: Window = { pieces: [], zeroes: [], bytes: 0, guest: 0 };
  const full = () => w.pieces.length + w.zeroes.length >= WINDOW_RANGES;
  for (const e of extents) {
    if (e.zero) {
      if (full()) {
        yield w;
        w = { pieces: [], zeroes: [], bytes: 0, guest: 0 };
      }
      w.zeroes.push({ start: e.start, length: e.length });
      w.guest += e.length;
      continue;
    }
    const end = e.start + e.length;
    for (let s = e.start; s < end; ) {
      // Placed so that the buffer's unit boundaries are the guest's (one zero scan per batch).
      const pad = (((s - w.bytes) % unit) + unit) % unit;
      const room = limit - w.bytes - pad;
      // Cut at a unit boundary when the range does not fit.
      const to = end - s <= room ? end : Math.floor((s + room) / unit) * unit;
      if (to <= s || full()) {
        yield w;
        w = { pieces: [], zeroes: [], bytes: 0, guest: 0 };
        limit = Math.min(max, 2 * limit);
        continue;
      }
      w.pieces.push({ start: s, length: to - s, depth: e.depth, at: w.bytes + pad });
      w.bytes += pad + (to - s);
      w.guest += to - s;
      s = to;
    }
  }
  if (w.pieces.length || w.zeroes.length) yield w;
}

/**
 * A batch read into memory at `ptr` as data items (buffer offsets) and zero ranges: whole units
 * that are all zero become zero ranges (one kernel pass over the buffer), the rest is data.
 */
function splitWindow(
  w: Window,
  ptr: number,
  unit: number,
  bits: number,
  pairs: number,
): { items: Array<{ offset: number; at: number; length: number }>; zeroes: Array<{ start: number; length: number }>; data: number; zero: number } {
  const k = kernels();
  const units = Math.floor(w.bytes / unit);
  // Zero units of the buffer, as runs [first, end) of unit indexes, ascending.
  const runs: number[] = [];
  if (units) {
    k.zeroBlocks(ptr, units * unit, Math.log2(unit), bits);
    for (let from = 0; from < units; ) {
      const n = k.extents(bits, from, units, pairs, ZERO_RUNS);
      const f = new Float64Array(k.memory.buffer, pairs, n * 2);
      for (let i = 0; i < n; i++) runs.push(f[2 * i]!, f[2 * i]! + f[2 * i + 1]!);
      if (n === 0) break;
      from = k.extentsNext();
    }
  }
  const items: Array<{ offset: number; at: number; length: number }> = [];
  const zeroes: Array<{ start: number; length: number }> = [];
  let data = 0;
  let zero = 0;
  const pushZero = (start: number, length: number) => {
    if (length <= 0) return;
    zero += length;
    const last = zeroes[zeroes.length - 1];
    if (last && last.start + last.length === start) last.length += length;
    else zeroes.push({ start, length });
  };
  const pushData = (start: number, at: number, length: number) => {
    if (length <= 0) return;
    data += length;
    items.push({ offset: start, at, length });
  };
  let r = 0;
  for (const p of w.pieces) {
    const b0 = p.at;
    const b1 = p.at + p.length;
    // Only whole units inside the piece can be zero runs (padding around it is not its data).
    const ua = Math.ceil(b0 / unit);
    const ub = Math.floor(b1 / unit);
    let pos = b0;
    while (r < runs.length && runs[r + 1]! <= ua) r += 2;
    for (let i = r; i < runs.length && runs[i]! < ub; i += 2) {
      const za = Math.max(ua, runs[i]!) * unit;
      const zb = Math.min(ub, runs[i + 1]!) * unit;
      if (zb <= za) continue;
      pushData(p.start + (pos - b0), pos, za - pos);
      pushZero(p.start + (za - b0), zb - za);
      pos = zb;
    }
    pushData(p.start + (pos - b0), pos, b1 - pos);
  }
  for (const z of w.zeroes) pushZero(z.start, z.length);
  zeroes.sort((a, b) => a.start - b.start);
  return { items, zeroes, data, zero };
}

/** One batch's data into the target as one writeMany (views of wasm memory made now). */
async function writeData(target: WritableLayer, ptr: number, items: Array<{ offset: number; at: number; length: number }>): Promise<void> {
  const k = kernels();
  if (items.length) await target.writeMany(items.map((it) => ({ offset: it.offset, data: k.u8(ptr + it.at, it.length) })));
}
