/**
 * `rebase`: gives an image another backing file, as qemu-img rebase does.
 *
 * Safe mode writes into the image exactly the guest ranges where the old backing chain and the
 * new one read differently and the image has no data of its own, so its guest view does not
 * change; then the header names the new backing file. Only ranges where the views can differ are
 * read: block status of both chains first (ranges both leave unallocated or zero are skipped;
 * with the new backing inside the old chain, only what the layers in between provide is
 * looked at), then the two views are read batch by batch, each from the layers that provide it
 * (the copy pipeline of copy.ts, shared with commit), and compared per allocation unit of the
 * image (cluster, or subcluster with extended L2) by the kernels; a batch's differing units are
 * written as one writeMany while the next batch is read. Differing units are written whole, so
 * no copy-on-write read is ever needed; units where the old view reads zeros become zero writes
 * (zero clusters on v3), never zero data, after all the data.
 *
 * The header is rewritten (one write of the header cluster, HeaderWriter.rewriteBacking) only
 * after the copied data is durable and the dirty bit cleared: a crash leaves the old name with a
 * complete copy (the view is the same) or the new name.
 *
 * `-u` rewrites only the name and the backing-format extension; `-b ""` flattens (compares with
 * an all-zero view, then drops the name); `-c` writes whole copied clusters compressed.
 */
import { realpathSync } from 'node:fs';
import { QcowError, throwIfAborted } from '../errors.js';
import type { FileOpener } from '../io/file.js';
import { BackingChain, resolveBackingPath, type ChainExtent } from '../chain/chain.js';
import type { LayerFormat } from '../chain/layer.js';
import { Qcow2Image } from '../qcow2/image.js';
import { HeaderWriter } from '../qcow2/header-writer.js';
import { assertBitmapsCanBeMarked, markBitmapsDirty, type DirtyRange } from '../qcow2/dirty-hook.js';
import { kernels } from '../kernels/index.js';
import { assertCanCompress } from '../qcow2/compressed.js';
import type { OperationOptions } from './options.js';
import { validateForWrite } from './validate.js';
import { batchesOf, checkFreeSpace, RunCursor, runBatches, UnitBits, type Batch, type BatchWrites, type Span } from './copy.js';
import { readGuestPieces, type GuestPiece } from '../chain/copy-read.js';

export interface RebaseOptions extends OperationOptions {
  /** -f: format of the image (only qcow2 has a backing file); probed when omitted. */
  format?: LayerFormat | undefined;
  /** -b: the new backing file name as it will be stored ('' = none: flatten). Required unless `unsafe`. */
  backing?: string | undefined;
  /** -F: format of the new backing file, recorded in the header (required when `backing` names a file). */
  backingFormat?: string | undefined;
  /** -u: only rewrite the name and format; copy nothing (the old backing need not exist). */
  unsafe?: boolean | undefined;
  /** -c: write copied clusters compressed. */
  compress?: boolean | undefined;
  /** Compare and count, write nothing. */
  dryRun?: boolean | undefined;
  openFile?: FileOpener | undefined;
}

export interface RebaseResult {
  filename: string;
  oldBacking: string | undefined;
  oldBackingFormat: string | undefined;
  newBacking: string | undefined;
  newBackingFormat: string | undefined;
  unsafe: boolean;
  dryRun: boolean;
  compressed: boolean;
  /** The new backing file is this depth of the old chain (only the layers above it were looked at). */
  prefixDepth: number | undefined;
  /** Guest bytes whose old and new views were read and compared (block status could not rule them out). */
  comparedBytes: number;
  /** Guest bytes written as data (differing units whose old view is not zero). */
  dataBytes: number;
  /** Guest bytes written as zeroes (differing units whose old view reads zeros). */
  zeroBytes: number;
  /** Clusters of the image that receive data (each is a new allocation: the image had none there). */
  dataClusters: number;
  /** Guest ranges written (data or zeroes), merged; what enabled bitmaps get marked dirty for. */
  writtenRanges: number;
  /** How much the image's file grows: exact after a rebase, an upper estimate for a dry run. */
  growth: number;
  seconds: number;
}

/** Formats qemu-img 7.2 knows by name (recorded by -u as given; only qcow2 and raw can be read). */
const QEMU_FORMATS = new Set(['blkdebug', 'blklogwrites', 'blkverify', 'bochs', 'cloop', 'compress', 'copy-before-write', 'copy-on-read', 'dmg', 'file', 'ftp', 'ftps', 'host_cdrom', 'host_device', 'http', 'https', 'luks', 'nbd', 'null-aio', 'null-co', 'nvme', 'parallels', 'preallocate', 'qcow', 'qcow2', 'qed', 'quorum', 'raw', 'replication', 'snapshot-access', 'ssh', 'throttle', 'vdi', 'vhdx', 'vmdk', 'vpc', 'vvfat']);

export async function rebase(filename: string, opts: RebaseOptions = {}): Promise<RebaseResult> {
  const t0 = performance.now();
  const unsafe = opts.unsafe === true;
  const dryRun = opts.dryRun === true;
  const compress = opts.compress === true;
  if (!unsafe && opts.backing === undefined) throw new QcowError('INVALID_ARGUMENT', 'Must specify backing file (-b) or use unsafe mode (-u)');
  if (compress && unsafe) throw new QcowError('INVALID_ARGUMENT', 'Cannot use -c in unsafe mode');
  if (opts.backingFormat !== undefined && !QEMU_FORMATS.has(opts.backingFormat)) throw new QcowError('INVALID_ARGUMENT', `Invalid format name: '${opts.backingFormat}'`);
  const newName = opts.backing === undefined || opts.backing === '' ? undefined : opts.backing;
  // qemu-img 7.2 fails this at the header change, after copying; here before anything is written.
  if (newName !== undefined && opts.backingFormat === undefined)
    throw new QcowError('INVALID_ARGUMENT', `Could not change the backing file to '${newName}': backing format must be specified`, filename);
  const newFormat = newName === undefined ? undefined : opts.backingFormat;

  const chain = await BackingChain.open(filename, {
    format: opts.format,
    openFile: opts.openFile,
    write: dryRun ? [] : [0],
    // Lock errors on the backing files then tell to stop the holder, not to use -U (which
    // rebase accepts without effect: it cannot write over files in use).
    writeOperation: !dryRun,
    openBacking: !unsafe,
    signal: opts.signal,
    onWarning: opts.onWarning,
  });
  try {
    const img = chain.top;
    if (!(img instanceof Qcow2Image)) throw new QcowError('UNSUPPORTED', `Operation not supported: a ${img.format} image has no backing file`, filename);
    const result: RebaseResult = {
      filename: img.path,
      oldBacking: img.backingName,
      oldBackingFormat: img.backingFormat,
      newBacking: newName,
      newBackingFormat: newFormat,
      unsafe,
      dryRun,
      compressed: compress,
      prefixDepth: undefined,
      comparedBytes: 0,
      dataBytes: 0,
      zeroBytes: 0,
      dataClusters: 0,
      writtenRanges: 0,
      growth: 0,
      seconds: 0,
    };
    const selfReal = realpath(img.path);
    // -u writes what it is told, as qemu-img 7.2 does (a self-reference then fails on every open).
    if (newName !== undefined && !unsafe) {
      const newReal = realpath(resolveBackingPath(img.path, newName));
      if (newReal !== undefined && newReal === selfReal) throw new QcowError('BACKING_LOOP', `the image cannot be its own backing file ('${newName}')`, img.path);
    }
    if (compress) assertCanCompress(img.header.compressionType, img.path);
    // -u changes only the header: a full check is needed only to repair an image left dirty.
    if (!unsafe || img.dirty) await validateForWrite(img, { repairLeaks: !dryRun });
    if (!unsafe) await safeCopy(chain, img, newName, opts, result, selfReal);
    if (!dryRun) {
      await img.endWrites(); // copied data durable, dirty bit cleared: only now the name changes
      await HeaderWriter.for(img.file, img.header).rewriteBacking(newName, newFormat);
    }
    result.seconds = (performance.now() - t0) / 1000;
    return result;
  } finally {
    await chain.close();
  }
}

/** One guest range both views must be read for. */
interface Candidate {
  start: number;
  length: number;
}

/** The new backing's view: a depth of the old chain, another chain, or all zeros (flatten). */
type NewView = { kind: 'zero' } | { kind: 'prefix'; depth: number } | { kind: 'chain'; chain: BackingChain };

async function safeCopy(chain: BackingChain, img: Qcow2Image, newName: string | undefined, opts: RebaseOptions, result: RebaseResult, selfReal: string | undefined): Promise<void> {
  const dryRun = result.dryRun;
  let view: NewView = { kind: 'zero' };
  let newChain: BackingChain | undefined;
  try {
    if (newName !== undefined) {
      const path = resolveBackingPath(img.path, newName);
      const real = realpath(path);
      for (let d = 1; d < chain.layers.length && real !== undefined; d++) {
        if (realpath(chain.layers[d]!.path) === real) {
          view = { kind: 'prefix', depth: d };
          result.prefixDepth = d;
          break;
        }
      }
      if (view.kind === 'zero') {
        const fmt = opts.backingFormat;
        if (fmt !== 'qcow2' && fmt !== 'raw') throw new QcowError('UNSUPPORTED', `Could not open new backing file '${newName}': format '${fmt}' is not supported (qcow2 and raw are)`, img.path);
        try {
          newChain = await BackingChain.open(path, { format: fmt, openFile: opts.openFile, writeOperation: !dryRun, signal: opts.signal, onWarning: opts.onWarning });
        } catch (e) {
          const msg = e instanceof QcowError ? e.message : String(e);
          throw new QcowError(e instanceof QcowError && e.code !== 'NOT_FOUND' ? e.code : 'BACKING', `Could not open new backing file '${path}': ${msg}`, img.path, { cause: e });
        }
        for (const l of newChain.layers)
          if (selfReal !== undefined && realpath(l.path) === selfReal)
            throw new QcowError('BACKING_LOOP', `the new backing chain contains the image itself ('${l.path}')`, img.path);
        view = { kind: 'chain', chain: newChain };
      }
    }
    if (!dryRun) assertBitmapsCanBeMarked(img);
    const unit = img.extendedL2 ? img.clusterSize / 32 : img.clusterSize;
    const plan = await planCompare(chain, view, img.virtualSize, unit, opts.signal);
    const candidates = plan.candidates;
    for (const c of candidates) result.comparedBytes += c.length;
    if (!dryRun) {
      // Upper bound: every cluster a candidate touches becomes a new one, plus L2 tables and refcount blocks.
      let clusters = 0;
      for (const c of candidates) clusters += Math.ceil((c.start + c.length) / img.clusterSize) - Math.floor(c.start / img.clusterSize);
      const bytes = clusters * img.clusterSize;
      await checkFreeSpace(img.path, bytes + Math.ceil(clusters / img.l2Entries + 1) * img.clusterSize * 2 + img.clusterSize * 4, 'the image');
    }
    const sizeBefore = await img.file.size();
    // Recording bitmaps learn of every range that may be written before any data is (a crash
    // in between leaves extra dirty bits, never a missing one).
    if (!dryRun) await markBitmapsDirty(img, opts.compress ? toClusters(candidates, img.clusterSize, img.virtualSize) : candidates);
    const ranges = await compareAndWrite(chain, img, view, plan, unit, opts, result);
    result.writtenRanges = ranges.length;
    if (dryRun) {
      const l2 = Math.ceil((result.dataClusters + 1) / img.l2Entries) + 1;
      result.growth = result.dataClusters ? (result.dataClusters + l2 + 1) * img.clusterSize : 0;
    } else {
      await img.flush();
      result.growth = Math.max(0, (await img.file.size()) - sizeBefore);
    }
  } finally {
    await newChain?.close();
  }
}

/** Where a view reads a guest range from: a layer (its depth in the view's chain) or one of these. */
const ZEROS = -1;
/** (Old view, new backing inside the old chain.) Read through to the new backing: as the new view. */
const AS_NEW = -2;
/** (Old view.) The image's own: never compared, never written. */
const OWN = -3;

interface Source {
  start: number;
  end: number;
  src: number;
}

/** The candidates, and where each view reads them from (lists covering the disk, guest order). */
interface ComparePlan {
  candidates: Candidate[];
  old: Source[];
  neu: Source[];
}

/**
 * Guest ranges where the old and new views may differ, by block status only, widened to whole
 * units of the image (its own allocations are unit-aligned, so widening never reaches them), and
 * the layers each view reads from.
 */
async function planCompare(chain: BackingChain, view: NewView, size: number, unit: number, signal: AbortSignal | undefined): Promise<ComparePlan> {
  // The image's own allocations (never compared, never written), then the old backing's view
  // (P = prefix depth: only layers 1..P-1, the rest is common to both views), each walked on
  // its own: a walk through the image into its backing would ask the backing once per gap
  // between the image's allocations.
  const own: Source[] = [];
  await chain.statusBetween(0, 1, 0, size, (e: ChainExtent) => {
    throwIfAborted(signal, chain.top.path);
    if (e.allocated) pushSource(own, e.start, e.start + e.length, OWN);
  });
  const limit = view.kind === 'prefix' ? view.depth : chain.layers.length;
  const backing: Source[] = [];
  await chain.statusBetween(1, limit, 0, size, (e: ChainExtent) => {
    throwIfAborted(signal, chain.top.path);
    const src = !e.allocated ? (view.kind === 'prefix' ? AS_NEW : ZEROS) : e.zero ? ZEROS : e.depth;
    pushSource(backing, e.start, e.start + e.length, src);
  });
  const old = overlay(backing, own);
  // The new view.
  const neu: Source[] = [];
  if (view.kind === 'zero') neu.push({ start: 0, end: size, src: ZEROS });
  else {
    const src = view.kind === 'prefix' ? chain : view.chain;
    const from = view.kind === 'prefix' ? view.depth : 0;
    // (statusBetween covers [0, size) entirely: past a shorter chain's end, zeros.)
    await src.statusBetween(from, src.layers.length, 0, size, (e) => pushSource(neu, e.start, e.start + e.length, e.allocated && !e.zero ? e.depth : ZEROS));
  }
  const candidates: Candidate[] = [];
  let j = 0;
  for (const o of old) {
    if (o.src === OWN || o.src === AS_NEW) continue; // the image's own, or the same in both views
    while (j < neu.length && neu[j]!.end <= o.start) j++;
    for (let k = j; k < neu.length && neu[k]!.start < o.end; k++) {
      const n = neu[k]!;
      if (o.src === ZEROS && n.src === ZEROS) continue;
      const s = Math.floor(Math.max(o.start, n.start) / unit) * unit;
      const e = Math.min(size, Math.ceil(Math.min(o.end, n.end) / unit) * unit);
      const last = candidates[candidates.length - 1];
      if (last && last.start + last.length >= s) last.length = Math.max(last.length, e - last.start);
      else candidates.push({ start: s, length: e - s });
    }
  }
  return { candidates, old, neu };
}

/** `under` (covering the disk) with the ranges of `over` (sorted, disjoint) put on top. */
function overlay(under: readonly Source[], over: readonly Source[]): Source[] {
  const out: Source[] = [];
  let j = 0;
  for (const u of under) {
    let pos = u.start;
    while (j < over.length && over[j]!.end <= pos) j++;
    for (let k = j; pos < u.end; k++) {
      const o = over[k];
      if (!o || o.start >= u.end) {
        pushSource(out, pos, u.end, u.src);
        break;
      }
      if (o.start > pos) pushSource(out, pos, o.start, u.src);
      const to = Math.min(u.end, o.end);
      pushSource(out, Math.max(pos, o.start), to, o.src);
      pos = to;
    }
  }
  return out;
}

function pushSource(list: Source[], start: number, end: number, src: number): void {
  const last = list[list.length - 1];
  if (last && last.end === start && last.src === src) last.end = end;
  else list.push({ start, end, src });
}

/** Candidates widened to whole clusters (-c writes whole clusters). */
function toClusters(candidates: Candidate[], cs: number, size: number): Candidate[] {
  const out: Candidate[] = [];
  for (const c of candidates) {
    const s = Math.floor(c.start / cs) * cs;
    const e = Math.min(size, Math.ceil((c.start + c.length) / cs) * cs);
    const last = out[out.length - 1];
    if (last && last.start + last.length >= s) last.length = Math.max(last.length, e - last.start);
    else out.push({ start: s, length: e - s });
  }
  return out;
}

/** A range each view reads from one place (a depth, or ZEROS). */
interface Piece {
  start: number;
  end: number;
  old: number;
  neu: number;
}

/**
 * Unit-aligned stretches of the candidates, each compared as a whole: 'old' where only the old
 * view has data (the new one reads zeros: the units that are not all zero differ), 'new' where
 * only the new view has data (likewise, and the old view reads zeros there), 'both' where both
 * views have data (both read, side by side). A stretch is one piece, or several when a view's
 * source changes inside a unit (layers of smaller clusters).
 */
interface Stretch extends Span {
  kind: 'old' | 'new' | 'both';
  pieces: Piece[];
}

function* stretchesOf(plan: ComparePlan, unit: number, path: string): Generator<Stretch> {
  const { old, neu } = plan;
  let i = 0;
  let j = 0;
  const done = (st: Stretch): Stretch => {
    const oldData = st.pieces.some((p) => p.old >= 0);
    const newData = st.pieces.some((p) => p.neu >= 0);
    st.kind = oldData && newData ? 'both' : newData ? 'new' : 'old';
    st.area = st.kind === 'both' ? 'two' : 'one';
    return st;
  };
  for (const c of plan.candidates) {
    const end = c.start + c.length;
    let st: Stretch | undefined;
    for (let pos = c.start; pos < end; ) {
      while (old[i] && old[i]!.end <= pos) i++;
      while (neu[j] && neu[j]!.end <= pos) j++;
      const o = old[i];
      const n = neu[j];
      if (!o || !n || o.src === OWN) throw new QcowError('INTERNAL', `rebase: no comparable source at guest offset ${pos}`, path);
      const to = Math.min(end, o.end, n.end);
      const piece: Piece = { start: pos, end: to, old: o.src === AS_NEW ? n.src : o.src, neu: n.src };
      if (st && pos % unit !== 0) {
        st.pieces.push(piece);
        st.length = to - st.start;
      } else {
        if (st) yield done(st);
        st = { start: pos, length: to - pos, area: 'one', kind: 'old', pieces: [piece] };
      }
      pos = to;
    }
    if (st) yield done(st);
  }
}

/** A written range of a batch: data at buffer offset `at`, or zeros (at -1). */
interface Written {
  start: number;
  length: number;
  at: number;
}

/**
 * Reads both views of the candidates batch by batch (copy.ts: each view from the layers that
 * provide it, vectored, into page-aligned wasm memory), finds the differing units with the
 * kernels (one pass per batch and area) and writes them (or counts them for a dry run): the
 * data as one writeMany per batch while the next batch is read, the units whose old view reads
 * zeros as zero writes after all the data (-c: compressed, batch after batch in guest order).
 * Returns the written ranges, merged.
 */
async function compareAndWrite(chain: BackingChain, img: Qcow2Image, view: NewView, plan: ComparePlan, unit: number, opts: RebaseOptions, result: RebaseResult): Promise<DirtyRange[]> {
  const k = kernels();
  const cs = img.clusterSize;
  const ranges: DirtyRange[] = [];
  let lastCluster = -1;
  const newSource = view.kind === 'prefix' ? chain : view.kind === 'chain' ? view.chain : undefined;
  const bits = new UnitBits(unit);

  /** Reads a batch's views: each stretch's old and/or new view at its buffer place(s). */
  const read = async (b: Batch<Stretch>, ptr: number): Promise<void> => {
    const oldReads: GuestPiece[] = [];
    const newReads: GuestPiece[] = [];
    const place = (list: GuestPiece[], src: number, start: number, dst: Uint8Array) => {
      if (src >= 0) list.push({ start, depth: src, dst });
      else dst.fill(0);
    };
    for (const s of b.slices) {
      const st = s.span;
      const oldAt = st.kind === 'new' ? -1 : s.at;
      const newAt = st.kind === 'old' ? -1 : st.kind === 'new' ? s.at : s.at + b.pair;
      const end = s.start + s.length;
      for (const p of st.pieces) {
        const from = Math.max(p.start, s.start);
        const to = Math.min(p.end, end);
        if (to <= from) continue;
        if (oldAt >= 0) place(oldReads, p.old, from, k.u8(ptr + oldAt + (from - s.start), to - from));
        if (newAt >= 0) place(newReads, p.neu, from, k.u8(ptr + newAt + (from - s.start), to - from));
      }
      // The disk's last partial unit is compared whole: zeros past the end in both views.
      const pad = Math.ceil(s.length / unit) * unit - s.length;
      if (pad && oldAt >= 0) k.u8(ptr + oldAt + s.length, pad).fill(0);
      if (pad && newAt >= 0) k.u8(ptr + newAt + s.length, pad).fill(0);
    }
    await Promise.all([readGuestPieces(chain, oldReads), newReads.length ? readGuestPieces(newSource!, newReads) : undefined]);
  };

  /** The differing units of a batch read at `ptr`, as written ranges in guest order. */
  const differing = (b: Batch<Stretch>, ptr: number): Written[] => {
    const zeroOne = new RunCursor(bits.zeroRuns(ptr, b.one / unit));
    const two = bits.diffRuns(ptr + b.two, ptr + b.two + b.pair, b.twoBytes / unit);
    const dataTwo = new RunCursor(two.data);
    const zeroTwo = new RunCursor(two.zero);
    const out: Written[] = [];
    for (const s of b.slices) {
      const st = s.span;
      const base = st.kind === 'both' ? b.two : 0;
      const ua = (s.at - base) / unit;
      const ub = ua + Math.ceil(s.length / unit);
      const end = s.start + s.length;
      const emit = (a: number, e: number, zero: boolean) => {
        const start = s.start + (a - ua) * unit;
        const length = Math.min(end, s.start + (e - ua) * unit) - start;
        const at = zero ? -1 : base + a * unit;
        const last = out[out.length - 1];
        if (last && last.start + last.length === start && (last.at < 0 ? at < 0 : at === last.at + last.length)) last.length += length;
        else out.push({ start, length, at });
      };
      // 'old': the units that are not all zero differ (the new view reads zeros), written as
      // data; 'new': likewise, written as zeros (the old view reads zeros).
      if (st.kind !== 'both') zeroOne.walk(ua, ub, (a, e, allZero) => allZero || emit(a, e, st.kind === 'new'));
      else {
        const parts: Array<[number, number, boolean]> = [];
        dataTwo.walk(ua, ub, (a, e, inRun) => inRun && parts.push([a, e, false]));
        zeroTwo.walk(ua, ub, (a, e, inRun) => inRun && parts.push([a, e, true]));
        parts.sort((x, y) => x[0] - y[0]);
        for (const [a, e, zero] of parts) emit(a, e, zero);
      }
    }
    return out;
  };

  const load = async (b: Batch<Stretch>, ptr: number): Promise<BatchWrites> => {
    await read(b, ptr);
    const w: BatchWrites = { items: [], zeroes: [], data: 0, zero: 0 };
    for (const r of differing(b, ptr)) {
      pushDirty(ranges, r);
      if (r.at < 0) {
        w.zeroes.push({ start: r.start, length: r.length });
        w.zero += r.length;
        continue;
      }
      w.items.push({ offset: r.start, at: r.at, length: r.length });
      w.data += r.length;
      const first = Math.max(Math.floor(r.start / cs), lastCluster + 1);
      const end = Math.ceil((r.start + r.length) / cs);
      if (end > first) {
        result.dataClusters += end - first;
        lastCluster = end - 1;
      }
    }
    result.dataBytes += w.data;
    result.zeroBytes += w.zero;
    return w;
  };

  // -c: every write of a batch in guest order (compressedWriter relies on it), batch after batch.
  const compressed = opts.compress ? compressedWriter(img, chain) : undefined;
  const writeCompressed = async (ptr: number, w: BatchWrites): Promise<void> => {
    const all: Written[] = [...w.items.map((it) => ({ start: it.offset, length: it.length, at: it.at })), ...w.zeroes.map((z) => ({ ...z, at: -1 }))];
    all.sort((x, y) => x.start - y.start);
    for (const r of all) {
      if (r.at < 0) await img.writeZeroes(r.start, r.length, { unmap: true });
      else await compressed!(r.start, k.u8(ptr + r.at, r.length));
    }
  };

  try {
    await runBatches(result.dryRun ? null : img, batchesOf(stretchesOf(plan, unit, img.path), unit, { wholeUnits: true }), {
      unit,
      total: result.comparedBytes,
      path: img.path,
      signal: opts.signal,
      onProgress: opts.onProgress,
      load,
      write: compressed && writeCompressed,
    });
  } finally {
    bits.free();
  }
  return ranges;
}

/**
 * realpath(3), or undefined when the path does not resolve. Synchronous: a path walk of
 * microseconds, where a thread-pool round trip costs more (a few of them per rebase).
 */
function realpath(path: string): string | undefined {
  try {
    return realpathSync.native(path);
  } catch {
    return undefined;
  }
}

function pushDirty(ranges: DirtyRange[], r: { start: number; length: number }): void {
  const last = ranges[ranges.length - 1];
  if (last && last.start + last.length === r.start) last.length += r.length;
  else ranges.push({ start: r.start, length: r.length });
}

/**
 * -c: every cluster a data run touches is written whole and compressed (raw deflate or zstd, as
 * QEMU 8.2's rebase -c, whose compressed writes are cluster-aligned): a run covering the cluster
 * gives its data; a partial one (extended L2 subclusters, the image's own subclusters beside
 * the differing ones) the image's own view of the whole cluster, read before it changes — the
 * same guest data, so the view stays unchanged. writeCompressed writes incompressible clusters
 * as data. Runs come in ascending order: a cluster already written whole is not written again.
 */
function compressedWriter(img: Qcow2Image, chain: BackingChain) {
  const cs = img.clusterSize;
  let lastWritten = -1;
  return async (offset: number, data: Uint8Array): Promise<void> => {
    const end = offset + data.length;
    for (let c = Math.max(Math.floor(offset / cs), lastWritten + 1); c * cs < end; c++) {
      const at = c * cs;
      const inside = Math.min(cs, img.virtualSize - at);
      let cluster: Uint8Array;
      if (offset <= at && end >= at + inside) cluster = data.subarray(at - offset, at - offset + inside);
      else {
        cluster = new Uint8Array(inside);
        await chain.read(at, cluster, 0);
      }
      // The disk's partial last cluster is compressed whole, padded with zeros (as QEMU does).
      await img.writeCompressed(at, inside === cs ? cluster : padTo(cluster, cs));
      lastWritten = c;
    }
  };
}

function padTo(part: Uint8Array, cs: number): Uint8Array {
  const out = new Uint8Array(cs);
  out.set(part);
  return out;
}
