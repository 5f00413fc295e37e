/**
 * Qcow2Image: opens and validates a qcow2 file, keeps its metadata (header, L1, snapshot table,
 * bitmap directory) and maps guest ranges to host ranges through L2 tables scanned in wasm.
 */
import { QcowError } from '../errors.js';
import { openImageFile, type ImageFile } from '../io/file.js';
import { dataView } from '../format/bytes.js';
import { assertIoConsistent, decodeHeader, hasDataFile, isExtendedL2, type Qcow2Header } from '../format/header.js';
import { decodeL1Table, type DecodedTable } from '../format/tables.js';
import type { SnapshotEntry } from '../format/snapshot.js';
import { readSnapshotTable, SnapshotTableError } from './snapshot-table.js';
import { BME_FLAG_IN_USE, decodeBitmapDirectory, validateBitmapTable, type BitmapDirectoryEntry } from '../format/bitmap.js';
import { COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, L2E_OFFSET_MASK } from '../format/constants.js';
import type { BlockLayer, LayerExtent } from '../chain/layer.js';
import { extentBuffer, recordsToExtents, type RecordBuffer } from '../chain/records.js';
import { kernels, LAYER_EXTENT_BYTES } from '../kernels/index.js';
import { L2Tables } from './l2.js';
import { RefcountReader } from './refcounts.js';
import { decompressCluster, loadDecoder } from './compressed.js';
import { Qcow2Writer, type ZeroOptions } from './writer.js';

/** Reads the guest view below an image (its backing chain) for copy-on-write. */
export type BackingReader = (offset: number, dst: Uint8Array) => Promise<void>;

export interface OpenQcow2Options {
  writable?: boolean;
  /** Open images qcowkit can't read data from (encryption, external data file) for `info`. */
  metadataOnly?: boolean;
  /** An already opened file (tests inject faulty ones). */
  file?: ImageFile;
  /** Read even when another process holds a write lock (-U). */
  forceShare?: boolean;
  /** `check -r`: a writable open is allowed even when the corrupt bit is set. */
  forRepair?: boolean;
  /**
   * `check`: open as QEMU does in check mode — no refcount table is no error, and the snapshot
   * table is not read (check reads it itself and reports what is wrong with it).
   */
  check?: boolean;
}

export class Qcow2Image implements BlockLayer {
  readonly format = 'qcow2' as const;
  readonly clusterSize: number;
  readonly clusterBits: number;
  readonly extendedL2: boolean;
  /** Guest bytes one L2 table maps. */
  readonly l2Span: number;
  readonly l2Entries: number;
  readonly #l2: L2Tables;
  #refcounts: RefcountReader | undefined;
  #metadataPrealloc: boolean | undefined;
  #fileSize: number;
  #writer: Qcow2Writer | undefined;
  /** Set by the chain when the image is written: the guest view of its backing file. */
  backingReader: BackingReader | undefined;

  private constructor(
    readonly path: string,
    readonly file: ImageFile,
    readonly header: Qcow2Header,
    fileSize: number,
    public l1: DecodedTable,
    readonly l1Raw: Uint8Array,
    snapshots: SnapshotEntry[],
    snapshotTableBytes: number,
    readonly bitmaps: BitmapDirectoryEntry[],
  ) {
    this.clusterBits = header.clusterBits;
    this.clusterSize = 2 ** header.clusterBits;
    this.extendedL2 = isExtendedL2(header);
    this.l2Entries = this.clusterSize / (this.extendedL2 ? 16 : 8);
    this.l2Span = this.l2Entries * this.clusterSize;
    this.#l2 = new L2Tables(file, this.clusterSize);
    this.#snapshots = snapshots;
    this.#snapshotTableBytes = snapshotTableBytes;
    this.#fileSize = fileSize;
  }

  /** File length as known to qcowkit (grows as the writer allocates past the end). */
  get fileSize(): number {
    return this.#fileSize;
  }
  /** The writer allocated up to `bytes`. */
  noteFileEnd(bytes: number): void {
    if (bytes > this.#fileSize) this.#fileSize = bytes;
  }

  // --- writing ---------------------------------------------------------------------------------

  /** The write engine of an image opened with `writable: true` (created on first use). */
  async writer(): Promise<Qcow2Writer> {
    if (this.#writer) return this.#writer;
    // Concurrent first writes must share one engine (one cache, one allocator).
    this.#opening ??= Qcow2Writer.open(this).then(
      (w) => {
        this.#writer = w;
        this.#l2.source = w.l2Cache; // reads see unwritten changes
        this.#opening = undefined;
        return w;
      },
      (e) => {
        this.#opening = undefined;
        throw e;
      },
    );
    return this.#opening;
  }
  #opening: Promise<Qcow2Writer> | undefined;

  /** Writes guest data (copy-on-write from the backing chain where clusters are partly written). */
  async write(offset: number, data: Uint8Array): Promise<void> {
    await (await this.writer()).write(offset, data);
  }
  /** Writes one whole cluster compressed (see Qcow2Writer.writeCompressed). */
  async writeCompressed(offset: number, cluster: Uint8Array): Promise<void> {
    await (await this.writer()).writeCompressed(offset, cluster);
  }
  /** Writes several disjoint guest ranges as one batch (one allocation and table update per L2 table). */
  async writeMany(items: ReadonlyArray<{ offset: number; data: Uint8Array }>): Promise<void> {
    await (await this.writer()).writeMany(items);
  }
  /** Makes a guest range read as zeros: zero flags (v3) or unmapped clusters, data only at the edges. */
  async writeZeroes(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    await (await this.writer()).writeZeroes(offset, length, opts);
  }
  /** Drops whole clusters' data: the range reads from the backing file again. */
  async discard(offset: number, length: number): Promise<void> {
    await (await this.writer()).discard(offset, length);
  }
  /** Grows the virtual disk (a bigger L1 table when needed). */
  async resize(size: number): Promise<void> {
    await (await this.writer()).resize(size);
  }
  /** Everything written so far is durable on return. */
  async flush(): Promise<void> {
    await this.#writer?.flush();
  }

  /**
   * Finishes a batch of writes: everything durable, the dirty bit cleared, caches freed. The
   * image stays open (a later write starts a new batch). `durable: false`: see Qcow2Writer.close.
   */
  async endWrites(opts: { durable?: boolean } = {}): Promise<void> {
    const w = this.#writer;
    if (!w) return;
    this.#writer = undefined;
    this.#l2.source = undefined;
    try {
      await w.close(opts);
    } catch (e) {
      w.abandon();
      throw e;
    }
    this.invalidateReadCaches();
  }

  /** Reads the backing chain's guest view (zeros without a backing file). */
  async readBacking(offset: number, dst: Uint8Array): Promise<void> {
    if (this.backingReader) return this.backingReader(offset, dst);
    if (this.backingName === undefined || this.backingName === '') return void dst.fill(0);
    throw new QcowError('INTERNAL', 'copy-on-write needs the backing chain: open the image through openChain', this.path);
  }

  /** Drops read-side caches that may describe metadata the writer changed. */
  invalidateReadCaches(): void {
    this.#lastCompressed = undefined;
    this.#l2.dropReadCache();
  }

  #snapshots: SnapshotEntry[];
  #snapshotTableBytes: number;
  get snapshots(): SnapshotEntry[] {
    return this.#snapshots;
  }
  /** Bytes the snapshot table occupies from the header's snapshots_offset. */
  get snapshotTableBytes(): number {
    return this.#snapshotTableBytes;
  }
  /** `check`: the snapshot table as check read it (a check-mode open reads none). */
  useSnapshotTable(entries: SnapshotEntry[], bytes: number): void {
    this.#snapshots = entries;
    this.#snapshotTableBytes = bytes;
  }

  static async open(path: string, opts: OpenQcow2Options = {}): Promise<Qcow2Image> {
    const file = opts.file ?? (await openImageFile(path, { writable: opts.writable ?? false, ...(opts.forceShare ? { lock: 'read-shared' as const } : {}) }));
    try {
      return await Qcow2Image.#load(path, file, opts);
    } catch (e) {
      if (!opts.file) await file.close();
      throw e;
    }
  }

  static async #load(path: string, file: ImageFile, opts: OpenQcow2Options): Promise<Qcow2Image> {
    const fileSize = await file.size();
    // An overlay keeps all the header decoder reads (header, extensions up to the backing file
    // name, the name) in its first few hundred bytes: one small read, not cluster 0 (a 100-deep
    // chain reads 100 headers). Otherwise one read covers cluster 0 of the common cluster
    // sizes; larger ones take a second. Bytes past the end of the file read as zeros, as in
    // QEMU (cluster 0 is always whole).
    let head = new Uint8Array(HEAD_PROBE_BYTES);
    await file.readAt(head, 0);
    if (!headerWithin(head)) {
      head = new Uint8Array(65536);
      await file.readAt(head, 0);
    }
    if (head.length === 65536 && fileSize >= 24) {
      const bits = dataView(head).getUint32(20);
      if (bits > 16 && bits <= 21) {
        head = new Uint8Array(2 ** bits);
        await file.readAt(head, 0);
      }
    }
    const header = decodeHeader(head, fileSize, path, { checkMode: opts.check === true });
    if (!opts.metadataOnly) assertReadable(header, path);
    if (!opts.metadataOnly || opts.forRepair) assertIoConsistent(header, path);
    if (opts.writable && !opts.forRepair && header.incompatibleFeatures & INCOMPAT_CORRUPT)
      throw new QcowError('CORRUPT', 'Image is corrupt; cannot be opened read/write (run check -r all first)', path);
    const cs = 2 ** header.clusterBits;

    const l1Bytes = new Uint8Array(header.l1Size * 8);
    await file.readAt(l1Bytes, header.l1TableOffset);
    const l1 = decodeL1Table(l1Bytes, header.l1Size, cs);

    const { entries: snapshots, bytes: snapshotTableBytes } = opts.check ? { entries: [], bytes: 0 } : await readSnapshots(file, header, path);
    let bitmaps: BitmapDirectoryEntry[] = [];
    if (header.bitmaps) {
      // As QEMU: bytes past the end of the file read as zeros; every bitmap that is not in use
      // is loaded, so a bad bitmap table refuses the whole image.
      const dir = await readZeroPadded(file, header.bitmaps.directoryOffset, header.bitmaps.directorySize, fileSize);
      const virtualSize = Math.floor(header.size / 512) * 512;
      bitmaps = decodeBitmapDirectory(dir, header.bitmaps, cs, virtualSize, path);
      for (const b of bitmaps) {
        if (b.flags & BME_FLAG_IN_USE) continue;
        if (b.tableOffset + b.tableSize * 8 >= 2 ** 63)
          throw new QcowError('CORRUPT', `Could not read bitmap_table table from image for bitmap '${b.name}': offset out of range`, path);
        validateBitmapTable(await readZeroPadded(file, b.tableOffset, b.tableSize * 8, fileSize), b, cs, path);
      }
    }
    return new Qcow2Image(path, file, header, fileSize, l1, l1Bytes, snapshots, snapshotTableBytes, bitmaps);
  }

  /** QEMU counts whole 512-byte sectors of the header's size. */
  get virtualSize(): number {
    return Math.floor(this.header.size / 512) * 512;
  }
  get backingName(): string | undefined {
    return this.header.backingFile;
  }
  get backingFormat(): string | undefined {
    return this.header.backingFormat;
  }
  get dirty(): boolean {
    return (this.header.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n;
  }
  get corrupt(): boolean {
    return (this.header.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n;
  }
  get lazyRefcounts(): boolean {
    return (this.header.compatibleFeatures & COMPAT_LAZY_REFCOUNTS) !== 0n;
  }
  get l2Tables(): L2Tables {
    return this.#l2;
  }

  async refcounts(): Promise<RefcountReader> {
    this.#refcounts ??= await RefcountReader.load(this.file, this.header);
    return this.#refcounts;
  }

  /** Host offset of the L2 table for L1 index i (0 = none); throws on an invalid L1 entry. */
  l2Offset(l1Index: number): number {
    if (l1Index >= this.l1.offsets.length) return 0;
    const off = this.l1.offsets[l1Index]!;
    if (off === 0 && this.l1.invalid.includes(l1Index)) {
      const raw = new DataView(this.l1Raw.buffer, this.l1Raw.byteOffset).getBigUint64(l1Index * 8) & L2E_OFFSET_MASK;
      if (raw >= 2n ** 53n) throw new QcowError('CORRUPT', `L2 table at offset ${raw} (L1 index ${l1Index}) lies past the end of the file`, this.path);
      throw new QcowError('CORRUPT', `L2 table offset 0x${raw.toString(16)} unaligned (L1 index ${l1Index})`, this.path);
    }
    if (off !== 0 && off + this.clusterSize > this.fileSize)
      throw new QcowError('CORRUPT', `L2 table at offset ${off} (L1 index ${l1Index}) lies past the end of the file`, this.path);
    return off;
  }

  /**
   * QEMU only asks the host file for holes inside data clusters when the image looks
   * metadata-preallocated: many more clusters in use by refcount than the filesystem allocated.
   */
  async metadataPreallocated(): Promise<boolean> {
    if (this.#metadataPrealloc === undefined) {
      const realClusters = Math.floor((await this.file.allocatedBytes()) / this.clusterSize);
      const threshold = Math.max(Math.floor((realClusters * 10) / 9), realClusters + 2);
      const endCluster = Math.ceil(this.fileSize / this.clusterSize);
      const rc = await this.refcounts();
      this.#metadataPrealloc = (await rc.countInUse(endCluster, threshold)) >= threshold;
    }
    return this.#metadataPrealloc;
  }

  async status(start: number, length: number, opts: { probeHost?: boolean } = {}): Promise<LayerExtent[]> {
    const buf = extentBuffer();
    try {
      await this.statusRecords(start, length, buf, opts);
      return recordsToExtents(buf);
    } finally {
      buf.free();
    }
  }

  async statusRecords(start: number, length: number, out: RecordBuffer, opts: { probeHost?: boolean; stream?: boolean } = {}): Promise<void> {
    const end = Math.min(start + length, this.virtualSize);
    if (start >= end) return;
    const from = out.count;
    await this.#l2.scanRecords(this, start, end, out, { v2: this.header.version === 2, stream: opts.stream ?? false });
    if (opts.probeHost) await this.#probeHostHoles(out, from);
  }

  /**
   * Splits the plain data extents among out's records [from, count) at holes of the host file,
   * as qemu-img map does for images that look metadata-preallocated: one probe of the host file
   * for all of them (one native call), the split in wasm.
   */
  async #probeHostHoles(out: RecordBuffer, from: number): Promise<void> {
    const k = kernels();
    const n = out.count - from;
    const at = (b: RecordBuffer, i: number) => b.ptr + i * LAYER_EXTENT_BYTES;
    let ranges = k.alloc(n * 16);
    let probedPtr = 0;
    const split = extentBuffer();
    try {
      const m = k.recordsDataRanges(at(out, from), n, this.fileSize, ranges);
      // The preallocation heuristic reads refcounts: only worth it when there is data to refine.
      if (m === 0 || !(await this.metadataPreallocated())) return;
      const view = new Float64Array(k.memory.buffer, ranges, 2 * m);
      const probed = this.file.dataExtentsMany ? this.file.dataExtentsMany(view) : perRange(this.file, view);
      if (!probed) return;
      k.free(ranges);
      ranges = 0;
      probedPtr = k.alloc(probed.length * 8);
      new Float64Array(k.memory.buffer, probedPtr, probed.length).set(probed);
      // Each data pair adds at most two pieces (its count adds none).
      split.reserve(n + probed.length);
      const r = k.recordsSplitHoles(at(out, from), n, probedPtr, split.ptr, split.capacity);
      if (r < 0) throw new QcowError('INTERNAL', 'internal error: status records overflowed their buffer', this.path);
      out.count = from;
      out.reserve(r);
      k.u8(at(out, from), r * LAYER_EXTENT_BYTES).set(k.u8(split.ptr, r * LAYER_EXTENT_BYTES));
      out.count = from + r;
    } finally {
      if (ranges) k.free(ranges);
      if (probedPtr) k.free(probedPtr);
      split.free();
    }
  }

  async readExtent(extent: LayerExtent, offsetInExtent: number, dst: Uint8Array): Promise<void> {
    if (extent.zero || !extent.data) {
      dst.fill(0);
      return;
    }
    if (extent.compressed) {
      const cluster = await this.#readCompressed(extent);
      // The extent may start inside the cluster (a read that doesn't begin on a cluster boundary).
      const from = (extent.start + offsetInExtent) % this.clusterSize;
      dst.set(cluster.subarray(from, from + dst.length));
      return;
    }
    await this.file.readAt(dst, extent.offset! + offsetInExtent);
  }

  #lastCompressed: { offset: number; data: Uint8Array } | undefined;

  async #readCompressed(extent: LayerExtent): Promise<Uint8Array> {
    const { offset, length } = extent.compressed!;
    if (this.#lastCompressed?.offset === offset) return this.#lastCompressed.data;
    if (offset + length > this.fileSize + 512)
      throw new QcowError('CORRUPT', `Compressed cluster at guest offset ${extent.start} lies past the end of the file`, this.path);
    const src = new Uint8Array(length);
    await Promise.all([this.file.readAt(src, offset), loadDecoder(this.header.compressionType)]);
    const data = new Uint8Array(this.clusterSize);
    // QEMU packs compressed clusters byte by byte: the sectors read may end with the start of the
    // next cluster's zstd frame, which QEMU never decodes (it stops once the cluster is full).
    const input = this.header.compressionType === 1 ? src.subarray(0, zstdFrameLength(src)) : src;
    decompressCluster(input, data, this.header.compressionType, this.path, extent.start);
    this.#lastCompressed = { offset, data };
    return data;
  }

  async close(): Promise<void> {
    try {
      // After a failed write the caller already has that error: closing releases the image
      // without writing more (and without throwing a vaguer error in place of the real one).
      if (this.#writer?.failed) this.#writer.abandon();
      else if (this.#writer) await this.#writer.close();
    } catch (e) {
      this.#writer?.abandon();
      throw e;
    } finally {
      this.#writer = undefined;
      this.#l2.source = undefined;
      this.#l2.clear();
      await this.file.close();
    }
  }
}

/** `dataExtentsMany` layout from per-range `dataExtents` (files that lack the batch call). */
function perRange(file: ImageFile, ranges: Float64Array): Float64Array | null {
  const out: number[] = [];
  for (let i = 0; i < ranges.length; i += 2) {
    const ext = file.dataExtents(ranges[i]!, ranges[i + 1]!);
    if (!ext) return null;
    out.push(ext.length / 2, ...ext);
  }
  return Float64Array.from(out);
}

/**
 * Length of the zstd frame at the start of `src` (header, blocks, optional checksum), found from
 * the block headers without decoding; src.length when it can't tell (the decoder then complains).
 */
export function zstdFrameLength(src: Uint8Array): number {
  if (src.length < 6 || src[0] !== 0x28 || src[1] !== 0xb5 || src[2] !== 0x2f || src[3] !== 0xfd) return src.length;
  const fhd = src[4]!;
  const fcsFlag = fhd >> 6;
  const singleSegment = (fhd >> 5) & 1;
  const dictIdFlag = fhd & 3;
  let pos = 5 + (singleSegment ? 0 : 1) + [0, 1, 2, 4][dictIdFlag]! + (fcsFlag === 0 ? singleSegment : 2 ** fcsFlag);
  for (;;) {
    if (pos + 3 > src.length) return src.length;
    const bh = src[pos]! | (src[pos + 1]! << 8) | (src[pos + 2]! << 16);
    const type = (bh >> 1) & 3;
    pos += 3 + (type === 1 ? 1 : type === 3 ? 0 : bh >>> 3);
    if (type === 3) return src.length; // reserved block type: corrupt
    if (bh & 1) break;
  }
  if (fhd & 4) pos += 4; // content checksum
  return Math.min(pos, src.length);
}

/** `length` bytes at `offset`; what lies past the end of the file reads as zeros (never read). */
async function readZeroPadded(file: ImageFile, offset: number, length: number, fileSize: number): Promise<Uint8Array> {
  const buf = new Uint8Array(length);
  if (offset < fileSize) await file.readAt(buf.subarray(0, Math.min(length, fileSize - offset)), offset);
  return buf;
}

const HEAD_PROBE_BYTES = 4096;

/**
 * Whether `head` (the file's first bytes) holds everything decodeHeader reads: with a backing
 * file name, the extension area ends where the name starts; without one it runs to the end of
 * cluster 0.
 */
function headerWithin(head: Uint8Array): boolean {
  const v = dataView(head);
  const clusterBits = v.getUint32(20);
  const backingOffset = v.getUint32(8) * 2 ** 32 + v.getUint32(12);
  if (clusterBits < 9 || clusterBits > 21 || backingOffset === 0 || backingOffset > 2 ** clusterBits) return false;
  const headerLength = v.getUint32(4) === 3 ? v.getUint32(100) : 72;
  return Math.max(headerLength, backingOffset + v.getUint32(16)) <= head.length;
}

function assertReadable(h: Qcow2Header, path: string): void {
  if (h.cryptMethod !== 0)
    throw new QcowError('UNSUPPORTED', `encrypted images are not supported (encryption method ${h.cryptMethod === 1 ? 'aes' : 'luks'})`, path);
  if (hasDataFile(h)) throw new QcowError('UNSUPPORTED', `images with an external data file are not supported (data file '${h.dataFile ?? '?'}')`, path);
}

async function readSnapshots(file: ImageFile, h: Qcow2Header, path: string): Promise<{ entries: SnapshotEntry[]; bytes: number }> {
  if (h.nbSnapshots === 0) return { entries: [], bytes: 0 };
  try {
    return await readSnapshotTable(file, h.snapshotsOffset, h.nbSnapshots, 2 ** h.clusterBits);
  } catch (e) {
    if (e instanceof SnapshotTableError) throw new QcowError('CORRUPT', `${e.message} (${e.hint})`, path);
    throw e;
  }
}
