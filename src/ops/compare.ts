/**
 * `compare`: guest-visible comparison of two images through their chains, as qemu-img compare:
 * ranges both chains report as zero are skipped unread; the rest is read in large chunks into
 * wasm memory and compared there. Mismatch offsets are the first differing 512-byte sector.
 */
import { BackingChain, type MapEntry } from '../chain/chain.js';
import type { LayerFormat } from '../chain/layer.js';
import { throwIfAborted } from '../errors.js';
import { kernels } from '../kernels/index.js';
import type { OperationOptions } from './options.js';

export interface CompareOptions extends OperationOptions {
  format1?: LayerFormat | undefined;
  format2?: LayerFormat | undefined;
  /** qemu-img -s: sizes and allocation status must match too. */
  strict?: boolean;
}

export type CompareResult =
  | { identical: true; sizeMismatch: boolean }
  | { identical: false; reason: 'content'; offset: number; sizeMismatch: boolean }
  | { identical: false; reason: 'size' }
  | { identical: false; reason: 'status'; offset: number };

const WINDOW = 1024 ** 3;
const CHUNK = 4 * 1024 * 1024;
const SECTOR = 512;

export async function compare(path1: string, path2: string, opts: CompareOptions = {}): Promise<CompareResult> {
  const a = await BackingChain.open(path1, { format: opts.format1, forceShare: opts.forceShare, onWarning: opts.onWarning, signal: opts.signal });
  let b: BackingChain;
  try {
    b = await BackingChain.open(path2, { format: opts.format2, forceShare: opts.forceShare, onWarning: opts.onWarning, signal: opts.signal });
  } catch (e) {
    await a.close();
    throw e;
  }
  const k = kernels();
  const buf1 = k.alloc(CHUNK);
  const buf2 = k.alloc(CHUNK);
  try {
    const size1 = a.virtualSize;
    const size2 = b.virtualSize;
    const sizeMismatch = size1 !== size2;
    if (opts.strict && sizeMismatch) return { identical: false, reason: 'size' };
    const common = Math.min(size1, size2);
    const total = Math.max(size1, size2);
    const report = (done: number) => opts.onProgress?.(done, total);

    for (let pos = 0; pos < common; pos += WINDOW) {
      throwIfAborted(opts.signal, path1);
      const end = Math.min(common, pos + WINDOW);
      const m1 = await a.blockStatus(pos, end - pos);
      const m2 = await b.blockStatus(pos, end - pos);
      let i = 0;
      let j = 0;
      for (let off = pos; off < end; ) {
        while (m1[i]!.start + m1[i]!.length <= off) i++;
        while (m2[j]!.start + m2[j]!.length <= off) j++;
        const e1 = m1[i]!;
        const e2 = m2[j]!;
        const stop = Math.min(e1.start + e1.length, e2.start + e2.length);
        if (opts.strict && !sameStatus(e1, e2)) return { identical: false, reason: 'status', offset: off };
        if (!(e1.zero && e2.zero)) {
          const at = await compareRange(a, b, e1.zero, e2.zero, off, stop - off, buf1, buf2);
          if (at >= 0) return { identical: false, reason: 'content', offset: at, sizeMismatch: false };
        }
        off = stop;
      }
      report(end);
    }
    // Past the smaller image, the larger one must read as zeros.
    const over = size1 > size2 ? a : b;
    for (let pos = common; pos < total; pos += WINDOW) {
      const end = Math.min(total, pos + WINDOW);
      for (const e of await over.blockStatus(pos, end - pos)) {
        if (e.zero || !e.present) continue;
        const at = await compareRange(over, over, false, true, e.start, e.length, buf1, buf2);
        if (at >= 0) return { identical: false, reason: 'content', offset: at, sizeMismatch };
      }
      report(end);
    }
    return { identical: true, sizeMismatch };
  } finally {
    k.free(buf1);
    k.free(buf2);
    await Promise.all([a.close(), b.close()]);
  }
}

/** Same flags as QEMU's block status (allocated, data, zero, offset valid). */
function sameStatus(e1: MapEntry, e2: MapEntry): boolean {
  return e1.present === e2.present && e1.data === e2.data && e1.zero === e2.zero && (e1.offset === undefined) === (e2.offset === undefined);
}

/**
 * Compares [off, off+len) of a and b (a side known to be zero is not read); returns the first
 * differing sector's guest offset or -1.
 */
async function compareRange(a: BackingChain, b: BackingChain, aZero: boolean, bZero: boolean, off: number, len: number, p1: number, p2: number): Promise<number> {
  const k = kernels();
  for (let pos = off; pos < off + len; pos += CHUNK) {
    const n = Math.min(CHUNK, off + len - pos);
    const reads: Promise<void>[] = [];
    if (!aZero) reads.push(a.read(pos, k.u8(p1, n)));
    if (!bZero) reads.push(b.read(pos, k.u8(p2, n)));
    await Promise.all(reads);
    let idx: number;
    if (aZero) idx = k.firstNonZero(p2, n);
    else if (bZero) idx = k.firstNonZero(p1, n);
    else idx = k.firstDifference(p1, p2, n);
    if (idx >= 0) return pos + Math.floor(idx / SECTOR) * SECTOR;
  }
  return -1;
}
