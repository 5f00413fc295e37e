/**
 * `compare`: guest-visible comparison of two images through their chains, as qemu-img compare:
 * ranges both chains report as zero are skipped unread; the rest is read in large chunks into
 * wasm memory and compared there. Mismatch offsets are the first differing 512-byte sector.
 */
import { BackingChain } from '../chain/chain.js';
import type { LayerFormat } from '../chain/layer.js';
import { throwIfAborted } from '../errors.js';
import { kernels, reserveForLargeWork } from '../kernels/index.js';
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
  reserveForLargeWork(); // before any read lands in wasm memory
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

    // Strict mode: qemu-img walks both chains extent by extent and stops at the first extent whose
    // block status differs, after comparing the contents of the extents before it.
    const statusAt = opts.strict ? await firstStatusMismatch(a, b, common, opts.signal, path1) : -1;
    const limit = statusAt >= 0 ? statusAt : common;
    for (let pos = 0; pos < limit; pos += WINDOW) {
      throwIfAborted(opts.signal, path1);
      const end = Math.min(limit, pos + WINDOW);
      const m1 = await inPhase('status', a.blockStatus(pos, end - pos));
      const m2 = await inPhase('status', b.blockStatus(pos, end - pos));
      let i = 0;
      let j = 0;
      // Consecutive ranges that need reading are compared together (fewer, larger reads); a
      // side counts as known zero only if it is zero over the whole run.
      let run: { start: number; end: number; aZero: boolean; bZero: boolean } | undefined;
      const flush = async (): Promise<number> => {
        const r = run;
        run = undefined;
        return r ? inPhase('read', compareRange(a, b, r.aZero, r.bZero, r.start, r.end - r.start, buf1, buf2)) : -1;
      };
      for (let off = pos; off < end; ) {
        while (m1[i]!.start + m1[i]!.length <= off) i++;
        while (m2[j]!.start + m2[j]!.length <= off) j++;
        const e1 = m1[i]!;
        const e2 = m2[j]!;
        const stop = Math.min(e1.start + e1.length, e2.start + e2.length);
        if (e1.zero && e2.zero) {
          const at = await flush();
          if (at >= 0) return { identical: false, reason: 'content', offset: await mismatchOffset([a, b], 0, at), sizeMismatch: false };
        } else if (run && run.end === off && run.end - run.start < CHUNK) {
          run.end = stop;
          run.aZero &&= e1.zero;
          run.bZero &&= e2.zero;
        } else {
          const at = await flush();
          if (at >= 0) return { identical: false, reason: 'content', offset: await mismatchOffset([a, b], 0, at), sizeMismatch: false };
          run = { start: off, end: stop, aZero: e1.zero, bZero: e2.zero };
        }
        off = stop;
      }
      const at = await flush();
      if (at >= 0) return { identical: false, reason: 'content', offset: await mismatchOffset([a, b], 0, at), sizeMismatch: false };
      report(end);
    }
    if (statusAt >= 0) return { identical: false, reason: 'status', offset: statusAt };
    // Past the smaller image, the larger one must read as zeros.
    const over = size1 > size2 ? a : b;
    for (let pos = common; pos < total; pos += WINDOW) {
      const end = Math.min(total, pos + WINDOW);
      for (const e of await inPhase('status', over.blockStatus(pos, end - pos))) {
        if (e.zero || !e.present) continue;
        const at = await inPhase('read', compareRange(over, over, false, true, e.start, e.length, buf1, buf2));
        if (at >= 0) return { identical: false, reason: 'content', offset: await mismatchOffset([over], common, at), sizeMismatch };
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

const phases = new WeakMap<object, 'status' | 'read'>();

/**
 * Where a compare error came from: 'open' (opening either chain; qemu-img exit 2), 'status'
 * (allocation status, i.e. metadata; exit 3) or 'read' (guest data; exit 4).
 */
export function comparePhase(e: unknown): 'open' | 'status' | 'read' {
  return (typeof e === 'object' && e !== null && phases.get(e)) || 'open';
}

async function inPhase<T>(phase: 'status' | 'read', p: Promise<T>): Promise<T> {
  try {
    return await p;
  } catch (e) {
    if (typeof e === 'object' && e !== null && !phases.has(e)) phases.set(e, phase);
    throw e;
  }
}

/**
 * First offset below `end` where the two chains' block status (QEMU's flags, extent by extent as
 * qemu-img compare queries them) differs, or -1.
 */
async function firstStatusMismatch(a: BackingChain, b: BackingChain, end: number, signal: AbortSignal | undefined, path: string): Promise<number> {
  for (let off = 0, n = 0; off < end; n++) {
    if ((n & 1023) === 0) throwIfAborted(signal, path);
    const [s1, s2] = await inPhase('status', Promise.all([a.statusAbove(off, a.virtualSize - off), b.statusAbove(off, b.virtualSize - off)]));
    if (s1.status !== s2.status) return off;
    off += Math.min(s1.pnum, s2.pnum);
  }
  return -1;
}

/**
 * Compares [off, off+len) of a and b (a side known to be zero is not read); returns the guest
 * offset of the first differing byte or -1.
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
    if (idx >= 0) return pos + idx;
  }
  return -1;
}

const IO_BUF_SIZE = 2 * 1024 * 1024;

/**
 * The offset qemu-img reports for a first differing byte at `x`: the start of its 512-byte block
 * counted from the start of the chunk qemu-img was comparing. Chunks run from one block-status
 * boundary of either chain to the next (at most 2 MiB when read), so they are sector-aligned
 * unless a file ends mid-sector (a raw file of odd size, a truncated qcow2 file): only then is the
 * walk over the chunks needed.
 */
async function mismatchOffset(chains: BackingChain[], from: number, x: number): Promise<number> {
  const sizes = await Promise.all(chains.flatMap((c) => c.layers.map((l) => l.file.size())));
  if (sizes.every((n) => n % SECTOR === 0)) return x - (x % SECTOR);
  return inPhase('status', (async () => {
    for (let off = from; ; ) {
      const st = await Promise.all(chains.map((c) => c.statusAbove(off, c.virtualSize - off)));
      const chunk = Math.min(IO_BUF_SIZE, ...st.map((v) => v.pnum));
      if (chunk <= 0 || off + chunk > x) return off + Math.floor((x - off) / SECTOR) * SECTOR;
      off += chunk;
    }
  })());
}
