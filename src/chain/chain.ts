/**
 * BackingChain: the top image and its backing files, opened read-only (the write path will open
 * chosen layers writable). Resolves backing names relative to the image that stores them,
 * refuses protocol names, loops and over-deep chains, reads guest data through the layers and
 * reports block status by depth exactly as qemu-img map does.
 */
import { realpathSync } from 'node:fs';
import { isAbsolute } from 'node:path';
import { QcowError, throwIfAborted } from '../errors.js';
import { openImageFile, inParallel, type FileOpener, type ImageFile } from '../io/file.js';
import { Qcow2Image } from '../qcow2/image.js';
import { RawLayer } from './raw.js';
import type { BlockLayer, LayerExtent, LayerFormat } from './layer.js';
import { QCOW2_MAGIC } from '../format/constants.js';
import { kernels, MAP_ENTRY_BYTES, MAP_PENDING, reserveForLargeWork } from '../kernels/index.js';
import { extentBuffer, RecordBuffer } from './records.js';

export const MAX_CHAIN_DEPTH = 1000;
/** Allocation units per map window (see #mapWindowBytes). */
const MAP_WINDOW_UNITS = 65536;

export interface OpenChainOptions {
  /** Format of the top image (-f); probed when absent. */
  format?: LayerFormat | undefined;
  /** Open the backing files too (default true). `info` without --backing-chain doesn't. */
  openBacking?: boolean;
  /** Allow images whose data qcowkit can't read (encryption, data file): metadata only. */
  metadataOnly?: boolean;
  maxDepth?: number;
  /** -U: open even when another process (QEMU) holds a write lock. */
  forceShare?: boolean | undefined;
  onWarning?: (message: string) => void;
  signal?: AbortSignal | undefined;
  /** Opens the layers' files (tests inject faulty files here); default openImageFile. */
  openFile?: FileOpener | undefined;
  /**
   * Layers to open read-write (with QEMU's write locks, taken on this first open): depths (0 =
   * the top) or file paths (matched by real path). The others stay read-only.
   */
  write?: ReadonlyArray<number | string> | undefined;
  /** Opened for an operation that writes some layer (lock errors say so). */
  writeOperation?: boolean | undefined;
}

/** One entry of `map`, with qemu-img's semantics (depth = layer index that answered). */
export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number | undefined;
  /** Path of the layer the offset refers to. */
  filename: string;
}

/** One extent of `statusAboveDepth`. */
export interface ChainExtent {
  start: number;
  length: number;
  /** Provided by layer `depth` (< the depth asked about); false: falls through below. */
  allocated: boolean;
  zero: boolean;
  depth: number;
}

/** Flags of a map record (MapSink): the entry's present / zero / data. */
export const MAP_PRESENT = 1;
export const MAP_ZERO = 2;
export const MAP_DATA = 4;

/** Receives map entries as plain numbers: offset < 0 means none; flags are MAP_* bits. */
export type MapSink = (start: number, length: number, depth: number, flags: number, offset: number) => void;

export interface MapWalkOptions {
  signal?: AbortSignal | undefined;
  onProgress?: ((done: number, total: number) => void) | undefined;
}

const flagsOf = (e: MapEntry): number => (e.present ? MAP_PRESENT : 0) | (e.zero ? MAP_ZERO : 0) | (e.data ? MAP_DATA : 0);

/** `proto:...` names (json:, nbd:, file:, http: ...) would make qcowkit reach beyond files. */
export function hasProtocolPrefix(name: string): boolean {
  const colon = name.indexOf(':');
  if (colon <= 0) return false;
  const slash = name.indexOf('/');
  return slash < 0 || colon < slash;
}

/**
 * Where a backing file name stored in `imagePath` points: relative names are joined to the
 * image's directory without normalising (as QEMU's path_combine, so paths print the same).
 */
export function resolveBackingPath(imagePath: string, name: string): string {
  if (isAbsolute(name)) return name;
  const slash = imagePath.lastIndexOf('/');
  return slash < 0 ? name : imagePath.slice(0, slash + 1) + name;
}

export async function probeFormat(path: string): Promise<LayerFormat> {
  const f = await openImageFile(path, { lock: 'none' });
  try {
    return await probeFile(f);
  } finally {
    await f.close();
  }
}

/**
 * QEMU's probe: the qcow2 magic with a version of at least 2 is qcow2, with version 1 the old
 * qcow format (refused); anything else is raw (a version 0 header opens as raw, as in QEMU).
 */
export async function probeFile(f: ImageFile): Promise<LayerFormat> {
  const b = new Uint8Array(8);
  await f.readAt(b, 0); // zero-padded past the end of the file
  const v = new DataView(b.buffer);
  if (v.getUint32(0) !== QCOW2_MAGIC) return 'raw';
  const version = v.getUint32(4);
  // Version 1 is QEMU's older "qcow" format, which qemu-img opens with another driver.
  if (version === 1) throw new QcowError('UNSUPPORTED', 'qcow (version 1) images are not supported', f.path);
  return version >= 2 ? 'qcow2' : 'raw';
}

/** Opens one layer; without a `format` it is probed from the opened file (one open, not two). */
export async function openLayer(
  path: string,
  format: LayerFormat | undefined,
  opts: { metadataOnly?: boolean | undefined; forceShare?: boolean | undefined; openFile?: FileOpener | undefined; writable?: boolean | undefined; writeOperation?: boolean | undefined } = {},
): Promise<BlockLayer> {
  const forceShare = opts.forceShare === true && !opts.writable;
  const writable = opts.writable === true;
  const lock = writable ? ('write' as const) : forceShare ? ('read-shared' as const) : ('read' as const);
  const file = await (opts.openFile ?? openImageFile)(path, { writable, lock, forWrite: writable || opts.writeOperation === true });
  try {
    format ??= await probeFile(file);
    if (format === 'raw') return await RawLayer.open(path, { forceShare, writable, file });
    return await Qcow2Image.open(path, { metadataOnly: opts.metadataOnly ?? false, forceShare, writable, file });
  } catch (e) {
    await file?.close();
    throw e;
  }
}

export class BackingChain {
  private constructor(readonly layers: BlockLayer[]) {}

  get top(): BlockLayer {
    return this.layers[0]!;
  }
  get virtualSize(): number {
    return this.top.virtualSize;
  }

  static async open(path: string, opts: OpenChainOptions = {}): Promise<BackingChain> {
    const layers: BlockLayer[] = [];
    let chain: BackingChain;
    try {
      layers.push(await openLayer(path, opts.format, { ...opts, writable: wantsWrite(opts.write, 0, path) }));
      if (opts.openBacking !== false) await BackingChain.#openBacking(layers, opts);
      chain = new BackingChain(layers);
      chain.#connectWriters();
    } catch (e) {
      await Promise.all(layers.map((l) => l.close().catch(() => {})));
      throw e;
    }
    return chain;
  }

  /** Copy-on-write in a writable qcow2 layer reads the guest view of the layers below it. */
  #connectWriters(): void {
    this.layers.forEach((layer, depth) => {
      if (layer instanceof Qcow2Image && layer.file.writable) {
        layer.backingReader = depth + 1 < this.layers.length ? (o, dst) => this.read(o, dst, depth + 1) : async (_o, dst) => void dst.fill(0);
      }
    });
  }

  /**
   * Opens the backing chain below an already opened layer (read-only, shared locks or -U) and
   * returns those layers, top first; the caller closes them. Fails as opening a chain does.
   */
  static async openBackingOf(top: BlockLayer, opts: OpenChainOptions = {}): Promise<BlockLayer[]> {
    const layers: BlockLayer[] = [top];
    try {
      await BackingChain.#openBacking(layers, opts);
    } catch (e) {
      await Promise.all(layers.slice(1).map((l) => l.close().catch(() => {})));
      throw e;
    }
    return layers.slice(1);
  }

  static async #openBacking(layers: BlockLayer[], opts: OpenChainOptions): Promise<void> {
    const maxDepth = opts.maxDepth ?? MAX_CHAIN_DEPTH;
    // realpath(3) directly and synchronously: one syscall-level walk per layer, no thread-pool trip.
    const realpath = (p: string): string => realpathSync.native(p);
    const seen = new Map<string, string>([[realpath(layers[0]!.path), layers[0]!.path]]);
    for (let layer = layers[0]!; layer.backingName !== undefined; layer = layers[layers.length - 1]!) {
      throwIfAborted(opts.signal, layer.path);
      const name = layer.backingName;
      if (name === '') break;
      if (hasProtocolPrefix(name))
        throw new QcowError('BACKING', `backing file name '${name}' uses a protocol prefix; only plain files are supported`, layer.path);
      if (layers.length > maxDepth) throw new QcowError('BACKING', `backing chain is deeper than ${maxDepth} images`, layers[0]!.path);
      const path = resolveBackingPath(layer.path, name);
      let real: string;
      try {
        real = realpath(path);
      } catch {
        throw new QcowError('BACKING', `Could not open backing file '${path}': No such file or directory`, layer.path);
      }
      if (seen.has(real)) {
        const names = [...layers.map((l) => l.path), path].join(' -> ');
        throw new QcowError('BACKING_LOOP', `backing chain contains a loop: ${names}`, layers[0]!.path);
      }
      seen.set(real, path);
      let format = layer.backingFormat as LayerFormat | undefined;
      if (format === undefined) {
        format = await probeFormat(path);
        opts.onWarning?.(`backing format of '${layer.path}' is not recorded; probed '${path}' as ${format} (read-only use only)`);
      } else if (format !== 'qcow2' && format !== 'raw') {
        throw new QcowError('UNSUPPORTED', `backing file format '${format}' is not supported (qcow2 and raw are)`, layer.path);
      }
      layers.push(await openLayer(path, format, { ...opts, writable: wantsWrite(opts.write, layers.length, path) }));
    }
  }

  /** Reads `length` guest bytes at `offset` into a new buffer. */
  async readBytes(offset: number, length: number): Promise<Uint8Array> {
    const dst = new Uint8Array(length);
    await this.read(offset, dst);
    return dst;
  }

  /** Block status by depth of a guest range, collected (see `map` for streaming). */
  async blockStatus(start: number, length: number): Promise<MapEntry[]> {
    const out: MapEntry[] = [];
    await this.map(start, length, (e) => out.push(e));
    return out;
  }

  /** Reads guest bytes [offset, offset + dst.length) as the top image's guest sees them. */
  async read(offset: number, dst: Uint8Array, depth = 0): Promise<void> {
    if (depth === 0) reserveForLargeWork(); // several table reads in flight: no growth under them
    const layer = this.layers[depth]!;
    const inside = Math.max(0, Math.min(dst.length, layer.virtualSize - offset));
    if (inside < dst.length) dst.fill(0, inside);
    if (inside === 0) return;
    const extents = await layer.status(offset, inside);
    await inParallel(extents, 4, async (e: LayerExtent) => {
      const sub = dst.subarray(e.start - offset, e.start - offset + e.length);
      if (e.allocated) await layer.readExtent(e, 0, sub);
      else if (depth + 1 < this.layers.length) await this.read(e.start, sub, depth + 1);
      else sub.fill(0);
    });
  }

  /**
   * Block status of [start, start+length) by depth, streamed to `emit` in order and merged the
   * way qemu-img map merges (same attributes, contiguous offsets in the same file).
   */
  async map(start: number, length: number, emit: (e: MapEntry) => void, opts: MapWalkOptions = {}): Promise<void> {
    let pending: MapEntry | undefined;
    await this.mapRecords(
      start,
      length,
      (s, len, depth, flags, offset) => {
        const p = pending;
        if (p && p.depth === depth && flagsOf(p) === flags && (p.offset === undefined ? offset < 0 : offset === p.offset + p.length)) {
          p.length += len;
          return;
        }
        if (p) emit(p);
        const e: MapEntry = { start: s, length: len, depth, present: (flags & MAP_PRESENT) !== 0, zero: (flags & MAP_ZERO) !== 0, data: (flags & MAP_DATA) !== 0, offset: offset < 0 ? undefined : offset, filename: this.layers[depth]!.path };
        pending = e;
      },
      opts,
    );
    if (pending) emit(pending);
  }

  /**
   * The entries of `map` without objects: `sink(start, length, depth, flags, offset)` with MAP_*
   * flags and offset < 0 for none (the depth names the file), in guest order, merged within each
   * window (`map` merges across windows). Streams through bounded windows, so memory stays flat
   * at any image size.
   */
  async mapRecords(start: number, length: number, sink: MapSink, opts: MapWalkOptions = {}): Promise<void> {
    await this.mapWindows(
      start,
      length,
      (recs) => {
        const v = recs.f64().slice(); // the sink may use the kernels (growing memory detaches views)
        for (let r = 0; r < v.length; r += 4) sink(v[r]!, v[r + 1]!, Math.floor(v[r + 3]! / 8), v[r + 3]! % 8, v[r + 2]! < 0 ? -1 : v[r + 2]!);
      },
      opts,
    );
  }

  /**
   * Block status by depth as map records in wasm memory (MAP_ENTRY_BYTES each: start, length,
   * offset (< 0: none), depth * 8 + MAP_* flags), window by window in guest order; `onWindow`
   * reads the buffer before it returns (it is reused). Each layer is asked for its extents over
   * the whole window once, as records, and only if some range falls through to it; the mapJson
   * and mapMergeLayer kernels do the rest, so no object is made per extent.
   */
  async mapWindows(start: number, length: number, onWindow: (recs: RecordBuffer) => void, opts: MapWalkOptions = {}): Promise<void> {
    const end = Math.min(start + length, this.virtualSize);
    if (start >= end) return;
    const k = kernels();
    const window = this.#mapWindowBytes();
    let cur = new RecordBuffer(MAP_ENTRY_BYTES);
    let next = new RecordBuffer(MAP_ENTRY_BYTES);
    const layer = extentBuffer();
    try {
      for (let pos = start; pos < end; pos += window) {
        throwIfAborted(opts.signal, this.top.path);
        const len = Math.min(window, end - pos);
        cur.count = 0;
        cur.reserve(1);
        new Float64Array(k.memory.buffer, cur.ptr, 4).set([pos, len, -1, MAP_PENDING]);
        cur.count = 1;
        for (let depth = 0, pending = 1; pending > 0; depth++) {
          layer.count = 0;
          await this.layers[depth]!.statusRecords(pos, len, layer, { probeHost: true, stream: true });
          // Every (pending range, extent) overlap gives at most two records.
          next.count = 0;
          next.reserve(3 * cur.count + 2 * layer.count + 1);
          const below = this.layers[depth + 1]?.virtualSize ?? -1;
          const n = k.mapMergeLayer(cur.ptr, cur.count, layer.ptr, layer.count, depth, below, next.ptr, next.capacity);
          if (n < 0) throw new QcowError('INTERNAL', 'internal error: map records overflowed their buffer', this.top.path);
          next.count = n;
          pending = k.mapPendingLeft();
          [cur, next] = [next, cur];
        }
        onWindow(cur);
        opts.onProgress?.(pos + len - start, end - start);
      }
    } finally {
      cur.free();
      next.free();
      layer.free();
    }
  }

  /**
   * Guest bytes per map window: 64 Ki of the smallest allocation unit (cluster, or subcluster
   * with extended L2) among the layers, so a window's records stay a few MiB whatever the layout.
   */
  #mapWindowBytes(): number {
    let unit = 65536;
    for (const l of this.layers) if (l instanceof Qcow2Image) unit = Math.min(unit, l.extendedL2 ? l.clusterSize / 32 : l.clusterSize);
    return MAP_WINDOW_UNITS * unit;
  }

  /**
   * What the layers above `depth` (0 .. depth-1) provide for [start, start+length), in order:
   * `allocated` extents name the top-most layer that has them (data or zero; past the end of a
   * shorter layer the range reads as zeros and counts as that layer's), the rest falls through to
   * layer `depth` and below. This is what commit copies and what a rebase onto `depth` keeps.
   */
  async statusAboveDepth(depth: number, start: number, length: number, emit: (e: ChainExtent) => void): Promise<void> {
    await this.statusBetween(0, depth, start, length, emit);
  }

  /**
   * `statusAboveDepth` for the layers from..to-1 only: what the chain seen from depth `from`
   * takes from those layers (rebase compares the views of two depths with it).
   */
  async statusBetween(from: number, depth: number, start: number, length: number, emit: (e: ChainExtent) => void): Promise<void> {
    const found: ChainExtent[] = [];
    const walk = async (d: number, s: number, len: number): Promise<void> => {
      if (d >= depth) return void found.push({ start: s, length: len, allocated: false, zero: false, depth: d });
      const layer = this.layers[d]!;
      const inside = Math.max(0, Math.min(len, layer.virtualSize - s));
      if (inside < len) found.push({ start: s + inside, length: len - inside, allocated: true, zero: true, depth: d });
      if (!inside) return;
      for (const e of await layer.status(s, inside)) {
        if (e.allocated) found.push({ start: e.start, length: e.length, allocated: true, zero: e.zero, depth: d });
        else await walk(d + 1, e.start, e.length);
      }
    };
    const WINDOW = 1024 ** 3; // bounded memory at any disk size
    for (let pos = start; pos < start + length; pos += WINDOW) {
      await walk(from, pos, Math.min(WINDOW, start + length - pos));
      // A layer's past-the-end piece was found before what lies inside it: restore guest order.
      found.sort((x, y) => x.start - y.start);
      let last: ChainExtent | undefined;
      for (const e of found) {
        if (last && last.start + last.length === e.start && last.allocated === e.allocated && last.zero === e.zero && last.depth === e.depth) last.length += e.length;
        else {
          if (last) emit(last);
          last = { ...e };
        }
      }
      if (last) emit(last);
      found.length = 0;
    }
  }

  /**
   * QEMU's bdrv_block_status_above(top, NULL, offset, bytes): the status flags of the range
   * starting at `offset` through the whole chain and how far it extends (`pnum`), with QEMU's
   * extent boundaries (a qcow2 answer stops at the end of an L2 table and after one compressed
   * cluster) and its EOF flag. `compare -s` compares exactly these values.
   */
  async statusAbove(offset: number, bytes: number): Promise<{ status: number; pnum: number }> {
    let { status, pnum } = await this.#layerStatus(0, offset, bytes);
    if (pnum === 0 || status & BDRV_BLOCK_ALLOCATED) return { status, pnum };
    const eof = status & BDRV_BLOCK_EOF ? offset + pnum : -1;
    bytes = pnum;
    for (let depth = 1; depth < this.layers.length; depth++) {
      ({ status, pnum } = await this.#layerStatus(depth, offset, bytes));
      if (pnum === 0) {
        // Past the end of a shorter backing file: zeros that count as allocated there.
        pnum = bytes;
        status = BDRV_BLOCK_ZERO | BDRV_BLOCK_ALLOCATED;
        break;
      }
      if (status & BDRV_BLOCK_ALLOCATED) {
        status &= ~BDRV_BLOCK_EOF;
        break;
      }
      bytes = pnum;
    }
    if (offset + pnum === eof) status |= BDRV_BLOCK_EOF;
    return { status, pnum };
  }

  /** QEMU's bdrv_co_block_status of one layer (want_zero). */
  async #layerStatus(depth: number, offset: number, bytes: number): Promise<{ status: number; pnum: number }> {
    const layer = this.layers[depth]!;
    const total = layer.virtualSize;
    if (offset >= total) return { status: BDRV_BLOCK_EOF, pnum: 0 };
    let limit = Math.min(bytes, total - offset);
    // qcow2 answers for at most INT_MAX bytes and never past the end of the current L2 table.
    if (layer instanceof Qcow2Image) limit = Math.min(limit, 0x7fffffff, (Math.floor(offset / layer.l2Span) + 1) * layer.l2Span - offset);
    // Only the first extent matters: look at a few clusters first, more only while it runs on.
    let window = layer instanceof Qcow2Image ? 64 * layer.clusterSize : limit;
    let e = (await layer.status(offset, Math.min(window, limit), { probeHost: true }))[0]!;
    while (e.length === window && window < limit) {
      window = Math.min(limit, window * 8);
      e = (await layer.status(offset, window, { probeHost: true }))[0]!;
    }
    let status = 0;
    if (e.data) status |= BDRV_BLOCK_DATA;
    if (e.zero) status |= BDRV_BLOCK_ZERO;
    if (e.allocated && e.offset !== undefined) status |= BDRV_BLOCK_OFFSET_VALID;
    if (e.allocated) status |= BDRV_BLOCK_ALLOCATED;
    else {
      const backing = this.layers[depth + 1];
      if (!backing || offset >= backing.virtualSize) status |= BDRV_BLOCK_ZERO;
    }
    if (offset + e.length === total) status |= BDRV_BLOCK_EOF;
    return { status, pnum: e.length };
  }

  /** Closes every layer, even when one fails (its error is thrown once all are closed). */
  async close(): Promise<void> {
    const results = await Promise.allSettled(this.layers.map((l) => l.close()));
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
  }
}

function wantsWrite(write: ReadonlyArray<number | string> | undefined, depth: number, path: string): boolean {
  if (!write?.length) return false;
  if (write.includes(depth)) return true;
  const names = write.filter((w): w is string => typeof w === 'string');
  if (!names.length) return false;
  const real = (p: string): string => {
    try {
      return realpathSync.native(p);
    } catch {
      return p;
    }
  };
  const want = real(path);
  for (const n of names) if (real(n) === want) return true;
  return false;
}

/** QEMU's BDRV_BLOCK_* status bits (include/block/block-common.h). */
export const BDRV_BLOCK_DATA = 0x01;
export const BDRV_BLOCK_ZERO = 0x02;
export const BDRV_BLOCK_OFFSET_VALID = 0x04;
export const BDRV_BLOCK_ALLOCATED = 0x10;
export const BDRV_BLOCK_EOF = 0x20;
