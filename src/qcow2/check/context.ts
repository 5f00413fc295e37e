/**
 * What every check pass works on: the open image and file, the geometry, the raw active L1 and
 * refcount table (raw, because check must see reserved bits and unaligned offsets exactly as
 * stored), and the streaming reader that brings cluster-sized tables into wasm memory.
 */
import { throwIfAborted } from '../../errors.js';
import type { ImageFile } from '../../io/file.js';
import { hasDataFile } from '../../format/header.js';
import { maxRefcount, refcountBlockEntries } from '../../format/tables.js';
import type { Qcow2Image } from '../image.js';
import { RefcountManager } from '../refcount-manager.js';
import { HeaderWriter } from '../header-writer.js';
import { CheckAborted, type Reporter } from './types.js';
import { INCOMPAT_CORRUPT } from '../../format/constants.js';

const TWO32 = 2 ** 32;
/** Tables per streaming window (bytes): two windows are in memory at once. */
const WINDOW_BYTES = 4 * 1024 * 1024;

export interface CheckContext {
  readonly path: string;
  readonly file: ImageFile;
  readonly img: Qcow2Image;
  readonly cs: number;
  readonly cb: number;
  readonly order: number;
  readonly perBlock: number;
  readonly maxRefcount: number;
  readonly extendedL2: boolean;
  readonly entryBytes: number;
  readonly l2Entries: number;
  readonly dataFile: boolean;
  readonly writable: boolean;
  readonly report: Reporter;
  readonly signal: AbortSignal | undefined;
  /** Current file length (grows when a repair writes past the end). */
  fileSize: number;
  /** Active L1 table as stored (l1Size * 8 bytes). */
  l1Raw: Uint8Array;
  reftableOffset: number;
  reftableClusters: number;
  /** Refcount table as stored (reftableClusters * cs bytes). */
  reftableRaw: Uint8Array;
  /** Header writes (dirty/corrupt bits, table switch); undefined when read-only. */
  readonly header: HeaderWriter | undefined;
  /** Set once a repair wrote anything (the dirty bit goes up before the first write). */
  wroteSomething: boolean;
  /** The dirty bit was set by this check (not found on entry). */
  dirtiedByUs: boolean;
  /** "Image is corrupt" was already reported once (QEMU suppresses repeats). */
  corruptionSignalled: boolean;
  progress: { done: number; total: number; emit: ((done: number, total: number) => void) | undefined };
}

export async function createContext(
  img: Qcow2Image,
  file: ImageFile,
  opts: { writable: boolean; report: Reporter; signal: AbortSignal | undefined; onProgress: ((d: number, t: number) => void) | undefined; header?: HeaderWriter | undefined },
): Promise<CheckContext> {
  const h = img.header;
  const cs = img.clusterSize;
  const l1Raw = new Uint8Array(h.l1Size * 8);
  await readOrAbort(file, l1Raw, h.l1TableOffset, opts.report, 'ERROR: I/O error in check_refcounts_l1');
  const reftableRaw = new Uint8Array(h.refcountTableClusters * cs);
  await readOrAbort(file, reftableRaw, h.refcountTableOffset, opts.report, 'ERROR: could not read the refcount table');
  return {
    path: img.path,
    file,
    img,
    cs,
    cb: img.clusterBits,
    order: h.refcountOrder,
    perBlock: refcountBlockEntries(h.clusterBits, h.refcountOrder),
    maxRefcount: maxRefcount(h.refcountOrder),
    extendedL2: img.extendedL2,
    entryBytes: img.extendedL2 ? 16 : 8,
    l2Entries: img.l2Entries,
    dataFile: hasDataFile(h),
    writable: opts.writable,
    report: opts.report,
    signal: opts.signal,
    fileSize: await file.size(),
    l1Raw,
    reftableOffset: h.refcountTableOffset,
    reftableClusters: h.refcountTableClusters,
    reftableRaw,
    header: opts.header ?? (opts.writable ? HeaderWriter.for(file, h) : undefined),
    wroteSomething: false,
    dirtiedByUs: false,
    corruptionSignalled: false,
    progress: { done: 0, total: 0, emit: opts.onProgress },
  };
}

async function readOrAbort(file: ImageFile, buf: Uint8Array, offset: number, report: Reporter, msg: string): Promise<void> {
  try {
    await file.readAt(buf, offset);
  } catch (e) {
    report(msg);
    throw new CheckAborted('Input/output error', { cause: e });
  }
}

/** Raw u64 table entry as [hi, lo] words. */
export function entryWords(view: DataView, at: number): [number, number] {
  return [view.getUint32(at), view.getUint32(at + 4)];
}

export const u64Of = (hi: number, lo: number): number => hi * TWO32 + (lo >>> 0);
export const big64 = (hi: number, lo: number): bigint => (BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0);

/** Entries in the refcount table. */
export function reftableEntries(ctx: CheckContext): number {
  return ctx.reftableRaw.length / 8;
}

/** Raw refcount table entry i. */
export function reftableEntry(ctx: CheckContext, i: number): [number, number] {
  return entryWords(new DataView(ctx.reftableRaw.buffer, ctx.reftableRaw.byteOffset, ctx.reftableRaw.byteLength), i * 8);
}

/** Before the first repair write: the dirty bit goes up (v3), durably. */
export async function beginWrite(ctx: CheckContext): Promise<void> {
  if (ctx.wroteSomething) return;
  if (!ctx.header) throw new CheckAborted('internal error: write in a read-only check');
  if (!ctx.header.dirty && ctx.header.version >= 3) {
    await ctx.header.markDirty();
    ctx.dirtiedByUs = true;
  }
  await ctx.header.clearUnknownAutoclear();
  ctx.wroteSomething = true;
}

/** The engine's refcount manager over the current refcount table (repairs write through it). */
export function refcountWriter(ctx: CheckContext): RefcountManager {
  return RefcountManager.standalone(
    ctx.file,
    { clusterBits: ctx.cb, refcountOrder: ctx.order, refcountTableOffset: ctx.reftableOffset, refcountTableClusters: ctx.reftableClusters },
    ctx.reftableRaw.slice(),
    ctx.header,
    ctx.fileSize,
  );
}

export function tick(ctx: CheckContext, n: number): void {
  ctx.progress.done += n;
  ctx.progress.emit?.(Math.min(ctx.progress.done, ctx.progress.total), ctx.progress.total);
}

/**
 * Streams cluster-sized tables at `offsets` into wasm memory, a window at a time with the next
 * window's reads in flight, and calls `fn` for each table in order. `fn` must not allocate wasm
 * memory (reads of the next window are in flight). A read error reports `ioMessage` and aborts.
 */
export async function forEachTable(
  ctx: CheckContext,
  offsets: number[],
  ioMessage: string,
  fn: (index: number, ptr: number) => Promise<void> | void,
): Promise<void> {
  const per = Math.max(1, Math.floor(WINDOW_BYTES / ctx.cs));
  const load = (start: number) => {
    const p = ctx.img.l2Tables.load(offsets.slice(start, start + per));
    p.catch(() => undefined); // observed below; avoids an unhandled rejection while it waits
    return p;
  };
  let next = offsets.length ? load(0) : undefined;
  for (let start = 0; start < offsets.length; start += per) {
    throwIfAborted(ctx.signal, ctx.path);
    let win: { ptrs: number[]; release: () => void };
    try {
      win = await next!;
    } catch (e) {
      ctx.report(ioMessage);
      throw new CheckAborted('Input/output error', { cause: e });
    }
    // The next window is allocated now (no reads in flight), its reads overlap our processing.
    next = start + per < offsets.length ? load(start + per) : undefined;
    let ok = false;
    try {
      for (let i = 0; i < win.ptrs.length; i++) await fn(start + i, win.ptrs[i]!);
      ok = true;
    } finally {
      win.release();
      if (!ok && next) {
        try {
          (await next).release();
        } catch {
          /* the first error wins */
        }
      }
    }
  }
}

/**
 * QEMU's qcow2_signal_corruption: reported once per check; a writable image also gets the corrupt
 * bit (a repair that ends with no errors clears it again).
 */
export async function signalCorruption(ctx: CheckContext, msg: string): Promise<void> {
  if (ctx.corruptionSignalled) return;
  ctx.corruptionSignalled = true;
  if (!ctx.header) {
    ctx.report(`qcow2: Image is corrupt: ${msg}; further non-fatal corruption events will be suppressed`);
    return;
  }
  ctx.report(`qcow2: Marking image as corrupt: ${msg}; further corruption events will be suppressed`);
  await ctx.header.clearUnknownAutoclear();
  await ctx.header.updateIncompatible(INCOMPAT_CORRUPT, 0n);
}
