/**
 * `rebase`: gives an image another backing file, as qemu-img rebase does.
 *
 * Safe mode writes into the image exactly the guest ranges where the old backing chain and the
 * new one read differently and the image has no data of its own, so its guest view does not
 * change; then the header names the new backing file. Only ranges where the views can differ are
 * read: block status of both chains first (ranges both leave unallocated or zero are skipped;
 * with the new backing inside the old chain, only what the layers in between provide is
 * looked at), then the two views are read chunk by chunk (reads in flight into wasm memory) and
 * compared per allocation unit of the image (cluster, or subcluster with extended L2) by a
 * kernel. Differing units are written whole, so no copy-on-write read is ever needed; units
 * where the old view reads zeros become zero writes (zero clusters on v3), never zero data.
 *
 * The header is rewritten (one write of the header cluster, HeaderWriter.rewriteBacking) only
 * after the copied data is durable and the dirty bit cleared: a crash leaves the old name with a
 * complete copy (the view is the same) or the new name.
 *
 * `-u` rewrites only the name and the backing-format extension; `-b ""` flattens (compares with
 * an all-zero view, then drops the name); `-c` writes whole copied clusters compressed.
 */
import { realpath } from 'node:fs/promises';
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
import { checkFreeSpace, chunkRuns, writeRuns, type ChunkRun } from './copy.js';

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

const CHUNK = 8 * 1024 * 1024;
const READS_AHEAD = 3;
const WRITES_BEHIND = 3;

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
    const selfReal = await realpath(img.path);
    // -u writes what it is told, as qemu-img 7.2 does (a self-reference then fails on every open).
    if (newName !== undefined && !unsafe) {
      const newReal = await realpath(resolveBackingPath(img.path, newName)).catch(() => undefined);
      if (newReal === selfReal) throw new QcowError('BACKING_LOOP', `the image cannot be its own backing file ('${newName}')`, img.path);
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

async function safeCopy(chain: BackingChain, img: Qcow2Image, newName: string | undefined, opts: RebaseOptions, result: RebaseResult, selfReal: string): Promise<void> {
  const dryRun = result.dryRun;
  let view: NewView = { kind: 'zero' };
  let newChain: BackingChain | undefined;
  try {
    if (newName !== undefined) {
      const path = resolveBackingPath(img.path, newName);
      const real = await realpath(path).catch(() => undefined);
      for (let d = 1; d < chain.layers.length && real !== undefined; d++) {
        if ((await realpath(chain.layers[d]!.path).catch(() => '')) === real) {
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
          if ((await realpath(l.path).catch(() => '')) === selfReal)
            throw new QcowError('BACKING_LOOP', `the new backing chain contains the image itself ('${l.path}')`, img.path);
        view = { kind: 'chain', chain: newChain };
      }
    }
    if (!dryRun) assertBitmapsCanBeMarked(img);
    const unit = img.extendedL2 ? img.clusterSize / 32 : img.clusterSize;
    const candidates = await findCandidates(chain, view, img.virtualSize, unit, opts.signal);
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
    const ranges = await compareAndWrite(chain, img, view, candidates, unit, opts, result);
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

/**
 * Guest ranges where the old and new views may differ, by block status only, widened to whole
 * units of the image (its own allocations are unit-aligned, so widening never reaches them).
 */
async function findCandidates(chain: BackingChain, view: NewView, size: number, unit: number, signal: AbortSignal | undefined): Promise<Candidate[]> {
  // The old view where the image has nothing of its own: what layers 1.. provide (P = prefix
  // depth: only layers 1..P-1, the rest is common to both views).
  const limit = view.kind === 'prefix' ? view.depth : chain.layers.length;
  const old: Array<{ start: number; end: number; zero: boolean }> = [];
  await chain.statusBetween(0, limit, 0, size, (e: ChainExtent) => {
    throwIfAborted(signal, chain.top.path);
    if (e.allocated && e.depth === 0) return; // the image's own data
    if (!e.allocated && view.kind === 'prefix') return; // falls through to the new backing itself
    pushRange(old, e.start, e.start + e.length, e.allocated ? e.zero : true);
  });
  // The new view where it matters.
  const neu: Array<{ start: number; end: number; zero: boolean }> = [];
  if (view.kind === 'zero') neu.push({ start: 0, end: size, zero: true });
  else {
    const src = view.kind === 'prefix' ? chain : view.chain;
    const from = view.kind === 'prefix' ? view.depth : 0;
    await src.statusBetween(from, src.layers.length, 0, size, (e) => pushRange(neu, e.start, e.start + e.length, e.allocated ? e.zero : true));
    // statusBetween covers [0, size) entirely; guard against gaps anyway.
  }
  const out: Candidate[] = [];
  let j = 0;
  for (const o of old) {
    while (j < neu.length && neu[j]!.end <= o.start) j++;
    for (let k = j; k < neu.length && neu[k]!.start < o.end; k++) {
      const n = neu[k]!;
      if (o.zero && n.zero) continue;
      const s = Math.floor(Math.max(o.start, n.start) / unit) * unit;
      const e = Math.min(size, Math.ceil(Math.min(o.end, n.end) / unit) * unit);
      const last = out[out.length - 1];
      if (last && last.start + last.length >= s) last.length = Math.max(last.length, e - last.start);
      else out.push({ start: s, length: e - s });
    }
  }
  return out;
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

function pushRange(list: Array<{ start: number; end: number; zero: boolean }>, start: number, end: number, zero: boolean): void {
  const last = list[list.length - 1];
  if (last && last.end === start && last.zero === zero) last.end = end;
  else list.push({ start, end, zero });
}

/** Chunks of candidates, ending on unit boundaries. */
function chunksOf(candidates: Candidate[], unit: number): Candidate[] {
  const chunks: Candidate[] = [];
  const step = Math.max(unit, Math.floor(CHUNK / unit) * unit);
  for (const c of candidates) for (let s = c.start; s < c.start + c.length; s += step) chunks.push({ start: s, length: Math.min(step, c.start + c.length - s) });
  return chunks;
}

/**
 * Reads both views of every candidate chunk (several in flight), marks the differing units with
 * the diffBlocks kernel and writes them (or counts them for a dry run). Returns the written
 * ranges, merged.
 */
async function compareAndWrite(chain: BackingChain, img: Qcow2Image, view: NewView, candidates: Candidate[], unit: number, opts: RebaseOptions, result: RebaseResult): Promise<DirtyRange[]> {
  const k = kernels();
  const chunks = chunksOf(candidates, unit);
  const total = result.comparedBytes;
  const size = img.virtualSize;
  const cs = img.clusterSize;
  const target = result.dryRun ? null : img;
  const ranges: DirtyRange[] = [];
  let lastCluster = -1;
  k.reserve((READS_AHEAD + WRITES_BEHIND + 2) * 2 * (CHUNK + unit) + 64 * 1024 * 1024);
  const readNew = async (offset: number, dst: Uint8Array): Promise<void> => {
    if (view.kind === 'zero') dst.fill(0);
    else if (view.kind === 'prefix') await chain.read(offset, dst, view.depth);
    else await view.chain.read(offset, dst);
  };
  // The old view: the old backing chain, or zeros when the image has no backing file.
  const readOld = async (offset: number, dst: Uint8Array): Promise<void> => {
    if (chain.layers.length > 1) await chain.read(offset, dst, 1);
    else dst.fill(0);
  };
  type Bufs = { old: number; neu: number; padded: number };
  const reads = new Map<number, Promise<Bufs>>();
  const startRead = (i: number) => {
    const c = chunks[i];
    if (!c || reads.has(i)) return;
    const padded = Math.ceil(c.length / unit) * unit;
    const old = k.alloc(padded);
    const neu = k.alloc(padded);
    const p = (async () => {
      try {
        await Promise.all([readOld(c.start, k.u8(old, c.length)), readNew(c.start, k.u8(neu, c.length))]);
      } catch (e) {
        k.free(old);
        k.free(neu);
        throw e;
      }
      if (padded > c.length) {
        k.u8(old + c.length, padded - c.length).fill(0);
        k.u8(neu + c.length, padded - c.length).fill(0);
      }
      return { old, neu, padded };
    })();
    p.catch(() => {});
    reads.set(i, p);
  };
  const compressed = opts.compress ? compressedWriter(img, chain) : undefined;
  let done = 0;
  const writes: Array<Promise<unknown>> = [];
  try {
    for (let i = 0; i < chunks.length; i++) {
      throwIfAborted(opts.signal, img.path);
      for (let j = i; j <= i + READS_AHEAD; j++) startRead(j);
      const c = chunks[i]!;
      const bufs = await reads.get(i)!;
      reads.delete(i);
      const units = bufs.padded / unit;
      const bits = k.allocZeroed(Math.ceil(units / 8) + 16);
      let handedOff = false;
      try {
        k.diffBlocks(bufs.old, bufs.neu, bufs.padded, Math.log2(unit), bits);
        k.free(bufs.neu);
        bufs.neu = 0;
        const runs = chunkRuns(c.start, bufs.padded, bufs.old, unit, bits)
          .map((r) => ({ ...r, length: Math.min(r.start + r.length, size) - r.start }))
          .filter((r) => r.length > 0);
        // The writes of a chunk run while the next chunks are compared (at most WRITES_BEHIND
        // chunks wait, their buffers freed once written). A chunk's writes start once the
        // previous chunk's are done: runs reach the engine in ascending order (compressedWriter
        // relies on it), and after a failed write no later chunk's write is issued, so the
        // failure itself (not the engine's "an earlier write failed") reaches the caller.
        const old = bufs.old;
        const prev = writes[writes.length - 1] ?? Promise.resolve();
        const p = prev.then(() => writeRuns(target, runs, c.start, old, { compressed: compressed && ((o, d) => compressed(o, d, target)) })).finally(() => k.free(old));
        p.catch(() => {});
        handedOff = true;
        writes.push(p);
        while (writes.length > WRITES_BEHIND) await writes.shift();
        for (const r of runs) {
          if (r.zero) result.zeroBytes += r.length;
          else result.dataBytes += r.length;
        }
        for (const r of runs) {
          pushDirty(ranges, r);
          if (r.zero) continue;
          const first = Math.max(Math.floor(r.start / cs), lastCluster + 1);
          const end = Math.ceil((r.start + r.length) / cs);
          if (end > first) {
            result.dataClusters += end - first;
            lastCluster = end - 1;
          }
        }
      } finally {
        k.free(bits);
        if (!handedOff) k.free(bufs.old);
        if (bufs.neu) k.free(bufs.neu);
      }
      done += c.length;
      opts.onProgress?.(done, total);
    }
    while (writes.length) await writes.shift();
  } finally {
    await Promise.allSettled(writes);
    for (const p of reads.values())
      await p.then(
        (b) => {
          k.free(b.old);
          k.free(b.neu);
        },
        () => {},
      );
  }
  if (!total) opts.onProgress?.(0, 0);
  return ranges;
}

function pushDirty(ranges: DirtyRange[], r: ChunkRun): void {
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
  return async (offset: number, data: Uint8Array, target: Qcow2Image | null): Promise<void> => {
    if (!target) return;
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
      await target.writeCompressed(at, inside === cs ? cluster : padTo(cluster, cs));
      lastWritten = c;
    }
  };
}

function padTo(part: Uint8Array, cs: number): Uint8Array {
  const out = new Uint8Array(cs);
  out.set(part);
  return out;
}
