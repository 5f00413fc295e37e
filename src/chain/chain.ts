/**
 * BackingChain: the top image and its backing files, opened read-only (the write path will open
 * chosen layers writable). Resolves backing names relative to the image that stores them,
 * refuses protocol names, loops and over-deep chains, reads guest data through the layers and
 * reports block status by depth exactly as qemu-img map does.
 */
import { realpath } from 'node:fs/promises';
import { isAbsolute } from 'node:path';
import { QcowError, throwIfAborted } from '../errors.js';
import { openImageFile, inParallel, type FileOpener } from '../io/file.js';
import { Qcow2Image } from '../qcow2/image.js';
import { RawLayer } from './raw.js';
import type { BlockLayer, LayerExtent, LayerFormat } from './layer.js';
import { QCOW2_MAGIC } from '../format/constants.js';

export const MAX_CHAIN_DEPTH = 1000;

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
    const b = new Uint8Array(4);
    await f.readAt(b, 0);
    return new DataView(b.buffer).getUint32(0) === QCOW2_MAGIC ? 'qcow2' : 'raw';
  } finally {
    await f.close();
  }
}

export async function openLayer(
  path: string,
  format: LayerFormat,
  opts: { metadataOnly?: boolean | undefined; forceShare?: boolean | undefined; openFile?: FileOpener | undefined; writable?: boolean | undefined; writeOperation?: boolean | undefined } = {},
): Promise<BlockLayer> {
  const forceShare = opts.forceShare === true && !opts.writable;
  const writable = opts.writable === true;
  const lock = writable ? ('write' as const) : forceShare ? ('read-shared' as const) : ('read' as const);
  const file = await (opts.openFile ?? openImageFile)(path, { writable, lock, forWrite: writable || opts.writeOperation === true });
  try {
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
      const format = opts.format ?? (await probeFormat(path));
      layers.push(await openLayer(path, format, { ...opts, writable: await wantsWrite(opts.write, 0, path) }));
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

  static async #openBacking(layers: BlockLayer[], opts: OpenChainOptions): Promise<void> {
    const maxDepth = opts.maxDepth ?? MAX_CHAIN_DEPTH;
    const seen = new Map<string, string>([[await realpath(layers[0]!.path), layers[0]!.path]]);
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
        real = await realpath(path);
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
      layers.push(await openLayer(path, format, { ...opts, writable: await wantsWrite(opts.write, layers.length, path) }));
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
  async map(start: number, length: number, emit: (e: MapEntry) => void, opts: { signal?: AbortSignal | undefined; onProgress?: ((done: number, total: number) => void) | undefined } = {}): Promise<void> {
    const end = Math.min(start + length, this.virtualSize);
    const WINDOW = 4 * 1024 ** 3;
    let pending: MapEntry | undefined;
    const push = (e: MapEntry) => {
      if (
        pending &&
        pending.depth === e.depth &&
        pending.present === e.present &&
        pending.zero === e.zero &&
        pending.data === e.data &&
        pending.filename === e.filename &&
        (pending.offset === undefined ? e.offset === undefined : e.offset === pending.offset + pending.length)
      ) {
        pending.length += e.length;
        return;
      }
      if (pending) emit(pending);
      pending = { ...e };
    };
    for (let pos = start; pos < end; pos += WINDOW) {
      throwIfAborted(opts.signal, this.top.path);
      await this.#status(pos, Math.min(WINDOW, end - pos), 0, push);
      opts.onProgress?.(Math.min(pos + WINDOW, end) - start, end - start);
    }
    if (pending) emit(pending);
  }

  async #status(start: number, length: number, depth: number, push: (e: MapEntry) => void): Promise<void> {
    const layer = this.layers[depth]!;
    const backing = this.layers[depth + 1];
    for (const e of await layer.status(start, length, { probeHost: true })) {
      const base = { depth, filename: layer.path, offset: e.offset };
      if (e.allocated) {
        push({ ...base, start: e.start, length: e.length, present: true, zero: e.zero, data: e.data });
        continue;
      }
      const eEnd = e.start + e.length;
      const below = backing ? Math.max(e.start, Math.min(eEnd, backing.virtualSize)) : e.start;
      if (below > e.start) await this.#status(e.start, below - e.start, depth + 1, push);
      if (eEnd > below) {
        // Nothing below: reads as zeros, reported at this depth (QEMU: past the backing file's end).
        const cut = below - e.start;
        push({ ...base, start: below, length: eEnd - below, present: false, zero: true, data: false, offset: e.offset === undefined ? undefined : e.offset + cut });
      }
    }
  }

  /**
   * What the layers above `depth` (0 .. depth-1) provide for [start, start+length), in order:
   * `allocated` extents name the top-most layer that has them (data or zero; past the end of a
   * shorter layer the range reads as zeros and counts as that layer's), the rest falls through to
   * layer `depth` and below. This is what commit copies and what a rebase onto `depth` keeps.
   */
  async statusAboveDepth(depth: number, start: number, length: number, emit: (e: ChainExtent) => void): Promise<void> {
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
      await walk(0, pos, Math.min(WINDOW, start + length - pos));
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

  async close(): Promise<void> {
    await Promise.all(this.layers.map((l) => l.close()));
  }
}

async function wantsWrite(write: ReadonlyArray<number | string> | undefined, depth: number, path: string): Promise<boolean> {
  if (!write?.length) return false;
  if (write.includes(depth)) return true;
  const names = write.filter((w): w is string => typeof w === 'string');
  if (!names.length) return false;
  const real = await realpath(path).catch(() => path);
  for (const n of names) if ((await realpath(n).catch(() => n)) === real) return true;
  return false;
}

/** QEMU's BDRV_BLOCK_* status bits (include/block/block-common.h). */
export const BDRV_BLOCK_DATA = 0x01;
export const BDRV_BLOCK_ZERO = 0x02;
export const BDRV_BLOCK_OFFSET_VALID = 0x04;
export const BDRV_BLOCK_ALLOCATED = 0x10;
export const BDRV_BLOCK_EOF = 0x20;
