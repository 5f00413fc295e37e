/**
 * Pieces shared by the operations that copy guest data into an image (commit, rebase): the
 * free-space check before the first write, and the zero-aware writer of one chunk read into wasm
 * memory (whole all-zero units become zero writes, never zero data; the rest is written as data,
 * optionally only the units a bitmap selects and optionally compressed).
 */
import { statfs } from 'node:fs/promises';
import { dirname } from 'node:path';
import { QcowError } from '../errors.js';
import { kernels } from '../kernels/index.js';
import type { WritableLayer } from '../chain/layer.js';

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
