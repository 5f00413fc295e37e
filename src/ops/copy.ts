/**
 * The machinery shared by the operations that copy guest data into an image (commit, rebase):
 * the free-space check before the first write; `batchesOf`, a plan of guest ranges cut into
 * batches laid out in one buffer each (unit boundaries where the guest has them); `runBatches`,
 * the pipeline that reads a batch into wasm memory, has it classified into data and zero ranges,
 * and writes its data as one `writeMany` while the next batch is read, the zero ranges after all
 * the data; the unit classification kernels' runs (`UnitBits`, `RunCursor`); and `copyPlan`,
 * commit's copy of the ranges the layers above the base provide.
 */
import { statfsSync } from 'node:fs';
import { dirname } from 'node:path';
import { QcowError, throwIfAborted } from '../errors.js';
import { kernels } from '../kernels/index.js';
import type { WritableLayer } from '../chain/layer.js';
import type { BackingChain } from '../chain/chain.js';
import { readGuestPieces } from '../chain/copy-read.js';
import { adviseHugePagesNative } from '../io/native.js';

/** Refuses (nothing written) when `need` bytes more than the filesystem of `path` has free. */
export async function checkFreeSpace(path: string, need: number, what = 'the base'): Promise<void> {
  let avail: number;
  try {
    const st = statfsSync(dirname(path)); // (microseconds: no thread-pool round trip)
    avail = st.bavail * st.bsize;
  } catch {
    return; // unknown: let the writes tell
  }
  if (need > avail)
    throw new QcowError('NO_SPACE', `${what} needs up to ${need} more bytes but its filesystem has ${avail} free; nothing was written (free space or write elsewhere)`, path);
}

/** Where a planned range goes in its batch's buffer. */
export type Area =
  /** Nothing is read: the range is only counted (a zero range of a copy plan). */
  | 'none'
  /** One copy of the range. */
  | 'one'
  /** Two copies side by side (rebase: the old and the new view), `pair` bytes apart. */
  | 'two';

/** A guest range of a plan; a batch takes it whole or cut at unit boundaries. */
export interface Span {
  start: number;
  length: number;
  area: Area;
}

/** The part of a span one batch holds, at buffer offset `at` (-1 for area 'none'). */
export interface Slice<T extends Span> {
  span: T;
  start: number;
  length: number;
  at: number;
}

/**
 * One batch: its slices in guest order, laid out in a page-aligned buffer of `bytes` bytes.
 * Area 'one' is [0, one); area 'two' is [two, two + twoBytes) and its second copy lies `pair`
 * bytes after it. Every slice's `at` is congruent to its guest start modulo the unit, so the
 * buffer's unit boundaries are the guest's (one kernel pass classifies a whole area).
 */
export interface Batch<T extends Span> {
  slices: Array<Slice<T>>;
  bytes: number;
  one: number;
  two: number;
  twoBytes: number;
  pair: number;
  /** Guest bytes the batch covers (progress, rate limit). */
  guest: number;
}

/** What a batch writes: data (guest offset, buffer offset, length) and zero ranges, each in guest order. */
export interface BatchWrites {
  items: Array<{ offset: number; at: number; length: number }>;
  zeroes: Array<{ start: number; length: number }>;
  /** Guest bytes of the items and of the zero ranges. */
  data: number;
  zero: number;
}

/**
 * Buffer bytes of one batch at most (one writeMany: one allocation, few large writes). Larger
 * batches gain nothing once the disk is kept busy, and cost more wasm memory touched for the
 * first time (a fault per page, several times dearer on virtual machines). Measured with the
 * huge-page buffers (runBatches; alternating runs on a loaded machine): rebase dropping a middle
 * layer (400 MiB) copies in ~290 ms with 8 MiB, ~300 with 16, ~330 with 4; commit -d of 1.1 GiB
 * 0.64x qemu-img's time with 8 MiB, 0.76x with 4.
 */
const WINDOW_BYTES = 8 * 1024 * 1024;
/** Slices in one batch at most (bounds the per-batch bookkeeping). */
const WINDOW_RANGES = 1024;
/** Batches being written while the next one is read. */
const WINDOWS_WRITING = 2;
/** Run pairs collected per kernel call. */
const RUN_PAIRS = 1024;
const PAGE = 4096;
/** Transparent huge pages (x86-64, arm64 with 4 KiB pages). */
const HUGE_PAGE = 2 * 1024 * 1024;

const windowBytes = (unit: number): number => Math.max(WINDOW_BYTES, 4 * unit);
const roundUp = (n: number, to: number): number => Math.ceil(n / to) * to;

/**
 * The spans (guest order) cut into batches of at most one window of buffer bytes (area 'two'
 * counts twice) and WINDOW_RANGES slices. A span is cut only at unit boundaries. The first
 * batches are smaller (1 MiB, doubling): the disk gets its first write after a short read.
 * `wholeUnits`: every slice gets whole units of buffer (a slice ending inside a unit, at the
 * end of the disk, is followed by padding up to the unit's end).
 */
export function* batchesOf<T extends Span>(spans: Iterable<T>, unit: number, opts: { wholeUnits?: boolean } = {}): Generator<Batch<T>> {
  const max = windowBytes(unit);
  const align = Math.max(unit, PAGE);
  let limit = Math.min(max, Math.max(4 * unit, 1024 * 1024));
  let slices: Array<Slice<T>> = [];
  let one = 0;
  let two = 0;
  let guest = 0;
  const finish = (): Batch<T> => {
    // Area 'two' starts aligned (its writes may bypass the page cache); its second copy too.
    const at = two ? roundUp(one, align) : one;
    const pair = roundUp(two, align);
    for (const s of slices) if (s.span.area === 'two') s.at += at;
    const b: Batch<T> = { slices, bytes: two ? at + 2 * pair : one, one, two: at, twoBytes: two, pair, guest };
    slices = [];
    one = two = guest = 0;
    return b;
  };
  for (const span of spans) {
    if (span.area === 'none') {
      if (slices.length >= WINDOW_RANGES) yield finish();
      slices.push({ span, start: span.start, length: span.length, at: -1 });
      guest += span.length;
      continue;
    }
    const paired = span.area === 'two';
    const end = span.start + span.length;
    for (let s = span.start; s < end; ) {
      const used = paired ? two : one;
      // Placed so that the buffer's unit boundaries are the guest's.
      const pad = (((s - used) % unit) + unit) % unit;
      const room = Math.floor((limit - one - 2 * two) / (paired ? 2 : 1)) - pad;
      const need = (to: number) => (opts.wholeUnits ? roundUp(to - s, unit) : to - s);
      // Cut at a unit boundary when the range does not fit.
      const to = need(end) <= room ? end : Math.floor((s + room) / unit) * unit;
      if (to <= s || slices.length >= WINDOW_RANGES) {
        yield finish();
        limit = Math.min(max, 2 * limit);
        continue;
      }
      slices.push({ span, start: s, length: to - s, at: used + pad });
      if (paired) two += pad + need(to);
      else one += pad + need(to);
      guest += to - s;
      s = to;
    }
  }
  if (slices.length) yield finish();
}

export interface RunBatchesOptions<T extends Span> {
  /** The batches' unit (the target's cluster, or subcluster): sizes the buffers. */
  unit: number;
  /** Guest bytes of all batches (progress). */
  total: number;
  /** The file named by an abort. */
  path: string;
  /** Reads a batch into the buffer at `ptr` and says what it writes. */
  load(batch: Batch<T>, ptr: number): Promise<BatchWrites>;
  /**
   * Writes one batch itself, data and zero ranges in guest order (rebase -c: compressed), one
   * batch at a time. Default: the data as one writeMany, the zero ranges after all the data.
   */
  write?: ((ptr: number, w: BatchWrites) => Promise<void>) | undefined;
  signal?: AbortSignal | undefined;
  onProgress?: ((done: number, total: number) => void) | undefined;
  /** At most this many guest bytes per second (0 or absent: no limit). */
  rateLimit?: number | undefined;
}

/**
 * The copy pipeline: each batch is read into page-aligned wasm memory (so whole-cluster writes
 * can bypass the page cache, file.ts) and classified by `load`, then its data is written as one
 * `writeMany` while the next batch is read. The zero ranges are written after all the data: a
 * zero write that drops a cluster makes the refcounts wait for the L2 tables, a data write
 * makes the L2 tables wait for the refcounts, and alternating the two costs a pair of flushes
 * each time. `target` null: a dry run (everything loaded and classified, nothing written).
 * Returns the guest bytes written as data and as zeros. On an error or abort, nothing is left
 * in flight.
 */
export async function runBatches<T extends Span>(target: WritableLayer | null, batches: Iterable<Batch<T>>, opts: RunBatchesOptions<T>): Promise<{ data: number; zero: number }> {
  const k = kernels();
  // The batches' buffers: slots of one region, reused (a batch's buffer is at most a window
  // plus the alignment of its areas), aligned to huge pages and backed by them where the
  // kernel allows: a direct write from huge pages goes out as a few large requests instead of
  // ~1 MiB ones (measured: 400 MiB in ~210 ms instead of ~300 on a virtual disk), and touching
  // the buffers the first time costs a fault per 2 MiB instead of per 4 KiB.
  const slotBytes = roundUp(windowBytes(opts.unit) + 3 * Math.max(opts.unit, PAGE), HUGE_PAGE);
  const slots = WINDOWS_WRITING + 1;
  // No memory growth while reads and writes hold views of wasm memory.
  k.reserve(slots * slotBytes + HUGE_PAGE + 16 * 1024 * 1024);
  const region = k.alloc(slots * slotBytes + HUGE_PAGE);
  const base = roundUp(region, HUGE_PAGE);
  adviseHugePagesNative(k.memory.buffer, base, slots * slotBytes);
  const free = Array.from({ length: slots }, (_, i) => base + i * slotBytes);
  const started = performance.now();
  const report = () => opts.onProgress?.(done, opts.total);
  let read = 0;
  let done = 0;
  let data = 0;
  let zero = 0;
  const writing: Array<Promise<void>> = [];
  /** The last self-written batch: the next one starts after it (guest order, and nothing after a failure). */
  let last: Promise<void> = Promise.resolve();
  const zeroes: Array<{ start: number; length: number }> = [];
  try {
    for (const b of batches) {
      throwIfAborted(opts.signal, opts.path);
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
      read += b.guest;
      // (At most WINDOWS_WRITING batches are being written: a slot is free.)
      const ptr = b.bytes ? free.pop() : 0;
      if (ptr === undefined) throw new QcowError('INTERNAL', 'copy: no free batch buffer', opts.path);
      let handed = false;
      try {
        const w = await opts.load(b, ptr);
        data += w.data;
        zero += w.zero;
        let p: Promise<void>;
        if (!target) {
          done += b.guest;
          report();
          p = Promise.resolve();
        } else if (opts.write) {
          const write = opts.write;
          p = last.then(() => write(ptr, w));
          last = p;
          p = p.then(() => {
            done += b.guest;
            report();
          });
        } else {
          for (const z of w.zeroes) {
            const prev = zeroes[zeroes.length - 1];
            if (prev && prev.start + prev.length === z.start) prev.length += z.length;
            else zeroes.push({ ...z });
          }
          // Progress: everything but the zero ranges once the data is written, those as written.
          p = writeData(target, ptr, w.items).then(() => {
            done += b.guest - w.zero;
            report();
          });
        }
        p = p.finally(() => ptr && free.push(ptr));
        p.catch(() => {}); // awaited in order below; a failure while an earlier one is awaited is not unhandled
        writing.push(p);
        handed = true;
      } finally {
        if (!handed && ptr) free.push(ptr);
      }
    }
    // The zero ranges go in while the last batches are still being written.
    try {
      for (const z of zeroes) {
        throwIfAborted(opts.signal, opts.path);
        await target!.writeZeroes(z.start, z.length, { unmap: true });
        done += z.length;
        report();
      }
    } catch (e) {
      for (const w of writing) await w; // a failed data write is the error to report
      throw e;
    }
    while (writing.length) await writing.shift();
  } finally {
    await Promise.allSettled(writing); // never leave writes running behind an error
    k.free(region);
  }
  if (!opts.total) opts.onProgress?.(0, 0);
  return { data, zero };
}

/** One batch's data into the target as one writeMany (views of wasm memory made now). */
async function writeData(target: WritableLayer, ptr: number, items: BatchWrites['items']): Promise<void> {
  const k = kernels();
  if (items.length) await target.writeMany(items.map((it) => ({ offset: it.offset, data: k.u8(ptr + it.at, it.length) })));
}

/**
 * Kernel scratch for classifying the units of one batch's buffer (bitmaps for the most units a
 * batch holds, run pairs): all-zero units, and units that differ between two copies.
 */
export class UnitBits {
  readonly #units: number;
  readonly #a: number;
  readonly #b: number;
  readonly #c: number;
  readonly #pairs: number;
  constructor(readonly unit: number) {
    const k = kernels();
    this.#units = Math.ceil(windowBytes(unit) / unit) + 8;
    const bytes = Math.ceil(this.#units / 8) + 16;
    this.#a = k.alloc(bytes);
    this.#b = k.alloc(bytes);
    this.#c = k.alloc(bytes);
    this.#pairs = k.alloc(16 * RUN_PAIRS);
  }

  /** The all-zero units among the `units` at `ptr`, as runs. */
  zeroRuns(ptr: number, units: number): number[] {
    if (!units) return [];
    this.#fits(units);
    kernels().zeroBlocks(ptr, units * this.unit, Math.log2(this.unit), this.#a);
    return this.#runs(this.#a, units);
  }

  /**
   * The units that differ between the `units` at `a` and at `b`, as runs: `data` where `a` is
   * not all zero, `zero` where it is.
   */
  diffRuns(a: number, b: number, units: number): { data: number[]; zero: number[] } {
    if (!units) return { data: [], zero: [] };
    this.#fits(units);
    const k = kernels();
    const bits = Math.log2(this.unit);
    const n = Math.ceil(units / 8);
    k.diffBlocks(a, b, units * this.unit, bits, this.#a);
    k.zeroBlocks(a, units * this.unit, bits, this.#b);
    k.u8(this.#c, n).set(k.u8(this.#a, n));
    k.bitmapAnd(this.#c, this.#b, n); // differ & zero
    k.bitmapAndNot(this.#a, this.#b, n); // differ & data
    return { data: this.#runs(this.#a, units), zero: this.#runs(this.#c, units) };
  }

  free(): void {
    const k = kernels();
    for (const p of [this.#a, this.#b, this.#c, this.#pairs]) k.free(p);
  }

  #fits(units: number): void {
    if (units > this.#units) throw new QcowError('INTERNAL', `a batch of ${units} units exceeds its scratch (${this.#units})`);
  }

  /** Runs [first, end) of set bits among [0, units), flat. */
  #runs(bits: number, units: number): number[] {
    const k = kernels();
    const runs: number[] = [];
    for (let from = 0; from < units; ) {
      const n = k.extents(bits, from, units, this.#pairs, RUN_PAIRS);
      const f = new Float64Array(k.memory.buffer, this.#pairs, n * 2);
      for (let i = 0; i < n; i++) runs.push(f[2 * i]!, f[2 * i]! + f[2 * i + 1]!);
      if (n === 0) break;
      from = k.extentsNext();
    }
    return runs;
  }
}

/** Walks runs (flat [first, end) pairs, ascending) range by ascending range. */
export class RunCursor {
  #i = 0;
  constructor(private readonly runs: readonly number[]) {}

  /**
   * Calls `fn(a, b, inRun)` for [ua, ub) cut into consecutive parts inside and outside the
   * runs, in order. Later calls must not start before earlier ones.
   */
  walk(ua: number, ub: number, fn: (a: number, b: number, inRun: boolean) => void): void {
    const r = this.runs;
    while (this.#i < r.length && r[this.#i + 1]! <= ua) this.#i += 2;
    let pos = ua;
    for (let i = this.#i; i < r.length && r[i]! < ub; i += 2) {
      const a = Math.max(pos, r[i]!);
      const b = Math.min(ub, r[i + 1]!);
      if (b <= a) continue;
      if (a > pos) fn(pos, a, false);
      fn(a, b, true);
      pos = b;
    }
    if (ub > pos) fn(pos, ub, false);
  }
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

type PlanSpan = Span & { depth: number };

/**
 * Copies the plan into `target` (commit): the data ranges are read from the layers that provide
 * them (host order, vectored, see readGuestPieces), whole units that are all zero become zero
 * writes, the rest is written as data; the plan's zero ranges are zero writes.
 */
export async function copyPlan(chain: BackingChain, target: WritableLayer, extents: readonly CopyExtent[], opts: CopyPlanOptions): Promise<{ data: number; zero: number }> {
  const unit = opts.unit;
  let total = 0;
  for (const e of extents) total += e.length;
  const spans = function* (): Generator<PlanSpan> {
    for (const e of extents) yield { start: e.start, length: e.length, area: e.zero ? 'none' : 'one', depth: e.depth };
  };
  const k = kernels();
  const bits = new UnitBits(unit);
  try {
    return await runBatches(target, batchesOf(spans(), unit), {
      unit,
      total,
      path: chain.top.path,
      signal: opts.signal,
      onProgress: opts.onProgress,
      rateLimit: opts.rateLimit,
      load: async (b, ptr) => {
        const pieces = b.slices.filter((s) => s.at >= 0);
        if (pieces.length) await readGuestPieces(chain, pieces.map((s) => ({ start: s.start, depth: s.span.depth, dst: k.u8(ptr + s.at, s.length) })));
        return splitZeroUnits(b, bits.zeroRuns(ptr, Math.floor(b.one / unit)), unit);
      },
    });
  } finally {
    bits.free();
  }
}

/**
 * A copy batch as writes: whole units inside a data slice that are all zero (`zeroRuns`, of the
 * buffer) become zero ranges, the rest of the slice data; area 'none' slices are zero ranges.
 */
function splitZeroUnits(b: Batch<PlanSpan>, zeroRuns: number[], unit: number): BatchWrites {
  const w: BatchWrites = { items: [], zeroes: [], data: 0, zero: 0 };
  const pushZero = (start: number, length: number) => {
    if (length <= 0) return;
    w.zero += length;
    const last = w.zeroes[w.zeroes.length - 1];
    if (last && last.start + last.length === start) last.length += length;
    else w.zeroes.push({ start, length });
  };
  const pushData = (start: number, at: number, length: number) => {
    if (length <= 0) return;
    w.data += length;
    const last = w.items[w.items.length - 1];
    if (last && last.offset + last.length === start && last.at + last.length === at) last.length += length;
    else w.items.push({ offset: start, at, length });
  };
  const cursor = new RunCursor(zeroRuns);
  for (const s of b.slices) {
    if (s.at < 0) {
      pushZero(s.start, s.length);
      continue;
    }
    const b0 = s.at;
    const b1 = s.at + s.length;
    // Only whole units inside the slice can be zero (padding around it is not its data).
    const ua = Math.ceil(b0 / unit);
    const ub = Math.floor(b1 / unit);
    if (ub <= ua) {
      pushData(s.start, b0, s.length);
      continue;
    }
    pushData(s.start, b0, ua * unit - b0);
    cursor.walk(ua, ub, (a, e, zero) => {
      const start = s.start + (a * unit - b0);
      if (zero) pushZero(start, (e - a) * unit);
      else pushData(start, a * unit, (e - a) * unit);
    });
    pushData(s.start + (ub * unit - b0), ub * unit, b1 - ub * unit);
  }
  return w; // (slices and runs come in guest order: so do the writes)
}
