/**
 * Loads wasm/kernels.wasm (synchronously, once per process) and wraps it as `Kernels`, with a
 * JS-side heap over the wasm memory. The file lives in its own folder, not in build/: a native
 * rebuild (`node-gyp rebuild`, the package's install script) empties build/.
 *
 * Memory growth detaches every ArrayBuffer view of `memory.buffer`: after any `alloc`,
 * `allocZeroed` or `reserve`, re-create views with `u8()` (or `new DataView(memory.buffer)`).
 */
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { QcowError } from '../errors.js';
import type { Kernels } from './api.js';

const ALIGN = 16;
const PAGE = 65536;
const MAX_PAGES = 65536; // wasm32: 4 GiB
const MIN_GROW_PAGES = 256; // 16 MiB
const MAX_DOUBLING_PAGES = 4096; // past 256 MiB, grow by 256 MiB steps instead of doubling

/**
 * First-fit free-list allocator with coalescing over `memory` from `base` upward. Bookkeeping
 * lives in JS, so a buffer overrun in wasm cannot corrupt the heap structure.
 */
export class WasmHeap {
  // Free blocks sorted by address (parallel arrays); allocated blocks by pointer.
  private readonly starts: number[] = [];
  private readonly sizes: number[] = [];
  private readonly used = new Map<number, number>();

  constructor(
    readonly memory: WebAssembly.Memory,
    base: number,
  ) {
    const start = roundUp(base, ALIGN);
    const end = memory.buffer.byteLength;
    if (end > start) this.insertFree(start, end - start);
  }

  alloc(size: number): number {
    const need = blockSize(size);
    let i = this.firstFit(need);
    if (i < 0) {
      this.grow(need);
      i = this.firstFit(need);
    }
    const ptr = this.starts[i]!;
    if (this.sizes[i] === need) {
      this.starts.splice(i, 1);
      this.sizes.splice(i, 1);
    } else {
      this.starts[i] = ptr + need;
      this.sizes[i]! -= need;
    }
    this.used.set(ptr, need);
    return ptr;
  }

  free(ptr: number): void {
    const size = this.used.get(ptr);
    if (size === undefined) throw new Error(`kernels heap: free of unknown pointer ${ptr}`);
    this.used.delete(ptr);
    this.insertFree(ptr, size);
  }

  /** Makes the top free block at least `bytes` long, so allocations totalling that much (after 16-byte rounding) never grow memory. */
  reserve(bytes: number): void {
    const need = blockSize(bytes);
    if (this.topFree() < need) this.grow(need);
  }

  /** Bytes currently allocated (after rounding). */
  usedBytes(): number {
    let total = 0;
    for (const size of this.used.values()) total += size;
    return total;
  }

  /** Free blocks as [start, size] pairs, by address (for tests and diagnostics). */
  freeBlocks(): Array<[number, number]> {
    return this.starts.map((s, i): [number, number] => [s, this.sizes[i]!]);
  }

  private firstFit(need: number): number {
    for (let i = 0; i < this.sizes.length; i++) if (this.sizes[i]! >= need) return i;
    return -1;
  }

  /** Size of the free block touching the end of memory (0 if the last byte is allocated). */
  private topFree(): number {
    const last = this.starts.length - 1;
    if (last < 0 || this.starts[last]! + this.sizes[last]! !== this.memory.buffer.byteLength) return 0;
    return this.sizes[last]!;
  }

  private grow(need: number): void {
    const end = this.memory.buffer.byteLength;
    const pages = end / PAGE;
    const minPages = Math.ceil((need - this.topFree()) / PAGE);
    const step = Math.max(minPages, MIN_GROW_PAGES, Math.min(pages, MAX_DOUBLING_PAGES));
    const fits = minPages <= MAX_PAGES - pages;
    if (!fits || !(this.tryGrow(Math.min(step, MAX_PAGES - pages)) || this.tryGrow(minPages))) {
      throw new RangeError(`kernels heap: cannot grow wasm memory for ${need} bytes`);
    }
    this.insertFree(end, this.memory.buffer.byteLength - end);
  }

  private tryGrow(pages: number): boolean {
    try {
      this.memory.grow(pages);
      return true;
    } catch {
      return false;
    }
  }

  /** Inserts a free block, merging it with adjacent free neighbours. */
  private insertFree(start: number, size: number): void {
    const { starts, sizes } = this;
    let lo = 0;
    let hi = starts.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (starts[mid]! < start) lo = mid + 1;
      else hi = mid;
    }
    const mergesPrev = lo > 0 && starts[lo - 1]! + sizes[lo - 1]! === start;
    const mergesNext = lo < starts.length && start + size === starts[lo]!;
    if (mergesPrev && mergesNext) {
      sizes[lo - 1]! += size + sizes[lo]!;
      starts.splice(lo, 1);
      sizes.splice(lo, 1);
    } else if (mergesPrev) {
      sizes[lo - 1]! += size;
    } else if (mergesNext) {
      starts[lo] = start;
      sizes[lo]! += size;
    } else {
      starts.splice(lo, 0, start);
      sizes.splice(lo, 0, size);
    }
  }
}

function roundUp(n: number, align: number): number {
  return Math.ceil(n / align) * align;
}

function blockSize(size: number): number {
  if (!Number.isSafeInteger(size) || size < 0) throw new RangeError(`kernels heap: bad size ${size}`);
  return roundUp(Math.max(size, 1), ALIGN);
}

/** Raw exports of assembly/index.ts (bool params are i32; u32 results come back signed). */
interface RawExports {
  memory: WebAssembly.Memory;
  heapBase(): number;
  l2Scan(table: number, firstEntry: number, entryCount: number, extended: number, clusterBits: number, out: number, maxRuns: number): number;
  scanConsumed(): number;
  l2AccountRefs(table: number, entryCount: number, extended: number, clusterBits: number, refs: number, nClusters: number, stats: number): void;
  l2CopiedMismatches(table: number, entryCount: number, extended: number, clusterBits: number, refs: number, nRefs: number, skipValue: number, out: number): number;
  l2Fill(table: number, first: number, count: number, extended: number, host: number, step: number, flagsHi: number, flagsLo: number, allocMask: number, zeroMask: number): void;
  refsAddRange(refs: number, nClusters: number, firstCluster: number, count: number): number;
  refcountAddRange(block: number, first: number, count: number, refcountOrder: number, delta: number, maxValue: number): number;
  refcountFind(block: number, from: number, to: number, refcountOrder: number, wantZero: number): number;
  refcountCompare(refs: number, firstCluster: number, count: number, block: number, refcountOrder: number, out: number, maxOut: number): number;
  refcountGet(block: number, index: number, refcountOrder: number): number;
  refcountSet(block: number, index: number, refcountOrder: number, value: number): void;
  bitmapOr(dst: number, src: number, nBytes: number): void;
  bitmapAnd(dst: number, src: number, nBytes: number): void;
  bitmapAndNot(dst: number, src: number, nBytes: number): void;
  popcount(ptr: number, nBytes: number): number;
  setBits(ptr: number, startBit: number, nBits: number): void;
  clearBits(ptr: number, startBit: number, nBits: number): void;
  extents(ptr: number, startBit: number, endBit: number, out: number, maxOut: number): number;
  extentsNext(): number;
  bitmapConvertOr(dst: number, dstBits: number, src: number, srcBits: number, shift: number): void;
  bitmapTableLoad(table: number, n: number, data: number, clusterBits: number, maxRunClusters: number, runs: number): number;
  bitmapClusterKinds(data: number, n: number, clusterBits: number, kinds: number): number;
  bitmapTableBuild(kinds: number, n: number, clusterBits: number, hosts: number, nHosts: number, maxRunClusters: number, table: number, writes: number): number;
  isZero(ptr: number, nBytes: number): number;
  firstNonZero(ptr: number, nBytes: number): number;
  firstDifference(a: number, b: number, nBytes: number): number;
  zeroBlocks(ptr: number, nBytes: number, blockBits: number, outBitmap: number): void;
  mapJsonReset(): void;
  mapJsonFeed(entries: number, n: number, out: number): number;
  mapJsonFinish(out: number): number;
  diffBlocks(a: number, b: number, nBytes: number, blockBits: number, outBitmap: number): void;
  l2Records(runs: number, nRuns: number, unitBits: number, tableStart: number, clipStart: number, clipEnd: number, v2: number, out: number, nOut: number, maxOut: number): number;
  statusErrorRun(): number;
  statusErrorStart(): number;
  recordsDataRanges(recs: number, n: number, fileSize: number, out: number): number;
  recordsSplitHoles(recs: number, n: number, probed: number, out: number, maxOut: number): number;
  mapMergeLayer(cur: number, nCur: number, lay: number, nLay: number, depth: number, belowEnd: number, out: number, maxOut: number): number;
  mapPendingLeft(): number;
  refcountCountNonZero(block: number, from: number, to: number, refcountOrder: number): number;
}

/** wasm/kernels.wasm of the package this file belongs to (works from src/, dist/ and dist/cli-bundle/). */
export function wasmPath(): string {
  // import.meta.filename: no URL to build and parse; Node < 20.11 lacks it.
  const here = import.meta.filename ?? fileURLToPath(import.meta.url);
  let dir = dirname(here);
  while (!existsSync(join(dir, 'package.json'))) {
    const parent = dirname(dir);
    if (parent === dir) throw kernelsError(`package.json not found above ${here}`, here);
    dir = parent;
  }
  return join(dir, 'wasm', 'kernels.wasm');
}

/** Every export createWasmKernels() wraps: a file missing one is stale or not ours. */
const REQUIRED_EXPORTS = [
  'heapBase', 'l2Scan', 'scanConsumed', 'l2AccountRefs', 'l2CopiedMismatches', 'refsAddRange', 'refcountCompare',
  'refcountGet', 'refcountSet', 'bitmapOr', 'bitmapAnd', 'bitmapAndNot', 'popcount', 'setBits', 'clearBits', 'extents',
  'extentsNext', 'bitmapConvertOr', 'bitmapTableLoad', 'bitmapClusterKinds', 'bitmapTableBuild', 'isZero', 'firstNonZero', 'firstDifference', 'zeroBlocks',
  'l2Records', 'statusErrorRun', 'statusErrorStart', 'recordsDataRanges', 'recordsSplitHoles', 'mapMergeLayer', 'mapPendingLeft',
  'refcountCountNonZero',
] as const satisfies ReadonlyArray<keyof RawExports>;

const REINSTALL = 'reinstall qcowkit, or run `npm run build:wasm` in a checkout';

function kernelsError(message: string, file: string, cause?: unknown): QcowError {
  return new QcowError('KERNELS', `WebAssembly kernels: ${message} (${REINSTALL})`, file, cause === undefined ? undefined : { cause });
}

/** Reads and compiles the kernels file; any failure is one KERNELS error naming the file. */
function compileKernels(path: string): object {
  let bytes: Uint8Array;
  try {
    bytes = readFileSync(path);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    const why = code === 'ENOENT' ? 'file missing' : code === 'EACCES' || code === 'EPERM' ? 'permission denied' : `cannot read (${(e as Error).message})`;
    throw kernelsError(why, path, e);
  }
  let module: object;
  try {
    module = new wasmApi.Module(bytes);
  } catch (e) {
    throw kernelsError(`not a valid WebAssembly module (${(e as Error).message})`, path, e);
  }
  const names = new Set(wasmApi.Module.exports(module).map((x) => x.name));
  const missing = ['memory', ...REQUIRED_EXPORTS].filter((n) => !names.has(n));
  if (missing.length > 0) throw kernelsError(`stale or foreign file, missing exports: ${missing.join(', ')}`, path);
  return module;
}

/** The part of the WebAssembly JS API used here (the project's `lib` has no DOM types). */
interface WasmApi {
  Module: { new (bytes: Uint8Array): object; exports(module: object): Array<{ name: string; kind: string }> };
  Instance: new (module: object, imports: object) => { readonly exports: unknown };
}

const wasmApi = (globalThis as unknown as { WebAssembly: WasmApi }).WebAssembly;
const compiled = new Map<string, object>();

/**
 * A fresh kernels instance with its own memory and heap (each file is compiled once). `path`
 * (default: the package's wasm/kernels.wasm) is there for tests. A missing, unreadable or broken
 * file throws QcowError KERNELS naming it.
 */
export function createWasmKernels(path: string = wasmPath()): Kernels {
  let module = compiled.get(path);
  if (!module) {
    module = compileKernels(path);
    compiled.set(path, module);
  }
  let x: RawExports;
  try {
    x = new wasmApi.Instance(module, {}).exports as RawExports;
  } catch (e) {
    throw kernelsError(`cannot instantiate (${(e as Error).message})`, path, e);
  }
  const heap = new WasmHeap(x.memory, x.heapBase());
  const memory = x.memory;
  return {
    memory,
    alloc: (size) => heap.alloc(size),
    allocZeroed: (size) => {
      const ptr = heap.alloc(size);
      new Uint8Array(memory.buffer, ptr, size).fill(0);
      return ptr;
    },
    free: (ptr) => heap.free(ptr),
    reserve: (bytes) => heap.reserve(bytes),
    u8: (ptr, length) => new Uint8Array(memory.buffer, ptr, length),

    l2Scan: (table, firstEntry, entryCount, extended, clusterBits, out, maxRuns) =>
      x.l2Scan(table, firstEntry, entryCount, extended ? 1 : 0, clusterBits, out, maxRuns) >>> 0,
    scanConsumed: () => x.scanConsumed() >>> 0,
    l2AccountRefs: (table, entryCount, extended, clusterBits, refs, nClusters, stats) =>
      x.l2AccountRefs(table, entryCount, extended ? 1 : 0, clusterBits, refs, nClusters, stats),
    l2CopiedMismatches: (table, entryCount, extended, clusterBits, refs, nRefs, skipValue, out) =>
      x.l2CopiedMismatches(table, entryCount, extended ? 1 : 0, clusterBits, refs, nRefs, skipValue | 0, out) >>> 0,

    l2Fill: (table, first, count, extended, host, step, flagsHi, flagsLo, allocMask, zeroMask) =>
      x.l2Fill(table, first, count, extended ? 1 : 0, host, step, flagsHi | 0, flagsLo | 0, allocMask | 0, zeroMask | 0),

    refsAddRange: x.refsAddRange,
    refcountAddRange: x.refcountAddRange,
    refcountFind: (block, from, to, refcountOrder, wantZero) => x.refcountFind(block, from, to, refcountOrder, wantZero ? 1 : 0) >>> 0,
    refcountCompare: (refs, firstCluster, count, block, refcountOrder, out, maxOut) =>
      x.refcountCompare(refs, firstCluster, count, block, refcountOrder, out, maxOut) >>> 0,
    refcountGet: x.refcountGet,
    refcountSet: x.refcountSet,

    bitmapOr: x.bitmapOr,
    bitmapAnd: x.bitmapAnd,
    bitmapAndNot: x.bitmapAndNot,
    popcount: x.popcount,
    setBits: x.setBits,
    clearBits: x.clearBits,
    extents: (ptr, startBit, endBit, out, maxOut) => x.extents(ptr, startBit, endBit, out, maxOut) >>> 0,
    extentsNext: x.extentsNext,
    bitmapConvertOr: x.bitmapConvertOr,
    bitmapTableLoad: (table, n, data, clusterBits, maxRunClusters, runs) => x.bitmapTableLoad(table, n, data, clusterBits, maxRunClusters, runs) >>> 0,
    bitmapClusterKinds: (data, n, clusterBits, kinds) => x.bitmapClusterKinds(data, n, clusterBits, kinds) >>> 0,
    bitmapTableBuild: x.bitmapTableBuild,

    isZero: (ptr, nBytes) => x.isZero(ptr, nBytes) !== 0,
    firstNonZero: x.firstNonZero,
    firstDifference: x.firstDifference,
    zeroBlocks: x.zeroBlocks,

    mapJsonReset: x.mapJsonReset,
    mapJsonFeed: (entries, n, out) => x.mapJsonFeed(entries, n, out) >>> 0,
    mapJsonFinish: (out) => x.mapJsonFinish(out) >>> 0,
    diffBlocks: x.diffBlocks,

    l2Records: (runs, nRuns, unitBits, tableStart, clipStart, clipEnd, v2, out, nOut, maxOut) =>
      x.l2Records(runs, nRuns, unitBits, tableStart, clipStart, clipEnd, v2 ? 1 : 0, out, nOut, maxOut),
    statusErrorRun: () => x.statusErrorRun() >>> 0,
    statusErrorStart: x.statusErrorStart,
    recordsDataRanges: (recs, n, fileSize, out) => x.recordsDataRanges(recs, n, fileSize, out) >>> 0,
    recordsSplitHoles: x.recordsSplitHoles,
    mapMergeLayer: x.mapMergeLayer,
    mapPendingLeft: () => x.mapPendingLeft() >>> 0,
    refcountCountNonZero: (block, from, to, refcountOrder) => x.refcountCountNonZero(block, from, to, refcountOrder) >>> 0,
  };
}
