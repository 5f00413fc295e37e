/**
 * Qcow2Image: opens and validates a qcow2 file, keeps its metadata (header, L1, snapshot table,
 * bitmap directory) and maps guest ranges to host ranges through L2 tables scanned in wasm.
 */
import { QcowError } from '../errors.js';
import { openImageFile, type ImageFile } from '../io/file.js';
import { dataView } from '../format/bytes.js';
import { decodeHeader, hasDataFile, isExtendedL2, type Qcow2Header } from '../format/header.js';
import { decodeL1Table, type DecodedTable } from '../format/tables.js';
import type { SnapshotEntry } from '../format/snapshot.js';
import { readSnapshotTable, SnapshotTableError } from './snapshot-table.js';
import { decodeBitmapDirectory, type BitmapDirectoryEntry } from '../format/bitmap.js';
import { INCOMPAT_CORRUPT, INCOMPAT_DIRTY, COMPAT_LAZY_REFCOUNTS } from '../format/constants.js';
import { pushExtent, type BlockLayer, type LayerExtent } from '../chain/layer.js';
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
    if (!this.#writer) {
      this.#writer = await Qcow2Writer.open(this);
      this.#l2.source = this.#writer.l2Cache; // reads see unwritten changes
    }
    return this.#writer;
  }

  /** Writes guest data (copy-on-write from the backing chain where clusters are partly written). */
  async write(offset: number, data: Uint8Array): Promise<void> {
    await (await this.writer()).write(offset, data);
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
   * image stays open (a later write starts a new batch).
   */
  async endWrites(): Promise<void> {
    const w = this.#writer;
    if (!w) return;
    this.#writer = undefined;
    this.#l2.source = undefined;
    try {
      await w.close();
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
    // One read covers cluster 0 of the common cluster sizes; larger ones take a second.
    let head = new Uint8Array(Math.min(fileSize, 65536));
    await file.readAt(head, 0);
    if (head.length >= 24) {
      const bits = dataView(head).getUint32(20);
      if (bits > 16 && bits <= 21 && fileSize > head.length) {
        head = new Uint8Array(Math.min(fileSize, 2 ** bits));
        await file.readAt(head, 0);
      }
    }
    const header = decodeHeader(head, fileSize, path, { check: opts.check === true });
    if (!opts.metadataOnly) assertReadable(header, path);
    if (opts.writable && !opts.forRepair && header.incompatibleFeatures & INCOMPAT_CORRUPT)
      throw new QcowError('CORRUPT', 'Image is corrupt; cannot be opened read/write (run check -r all first)', path);
    const cs = 2 ** header.clusterBits;

    const l1Bytes = new Uint8Array(header.l1Size * 8);
    await file.readAt(l1Bytes, header.l1TableOffset);
    const l1 = decodeL1Table(l1Bytes, header.l1Size, cs);

    const { entries: snapshots, bytes: snapshotTableBytes } = opts.check ? { entries: [], bytes: 0 } : await readSnapshots(file, header, path);
    let bitmaps: BitmapDirectoryEntry[] = [];
    if (header.bitmaps) {
      const dir = new Uint8Array(header.bitmaps.directorySize);
      await file.readAt(dir, header.bitmaps.directoryOffset);
      bitmaps = decodeBitmapDirectory(dir, header.bitmaps, cs, header.size, path);
    }
    return new Qcow2Image(path, file, header, fileSize, l1, snapshots, snapshotTableBytes, bitmaps);
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
    if (off === 0 && this.l1.invalid.includes(l1Index))
      throw new QcowError('CORRUPT', `L1 entry ${l1Index} is invalid (reserved bits set or unaligned offset)`, this.path);
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
    const end = Math.min(start + length, this.virtualSize);
    const out: LayerExtent[] = [];
    if (start >= end) return out;
    await this.#l2.scan(this, start, end, (e) => pushExtent(out, e));
    const plainData = (e: LayerExtent) => e.data && !e.compressed && e.offset !== undefined;
    // The preallocation heuristic reads refcounts: only worth it when there is data to refine.
    if (!opts.probeHost || !out.some(plainData) || !(await this.metadataPreallocated())) return out;
    const refined: LayerExtent[] = [];
    for (const e of out) {
      if (plainData(e)) this.#splitByHostHoles(e, refined);
      else pushExtent(refined, e);
    }
    return refined;
  }

  #splitByHostHoles(e: LayerExtent, out: LayerExtent[]): void {
    const host = e.offset!;
    const hostEnd = host + e.length;
    const ext = this.file.dataExtents(host, Math.min(hostEnd, this.fileSize));
    if (!ext) return pushExtent(out, e);
    let pos = host;
    const piece = (from: number, to: number, zero: boolean) => {
      if (to > from) pushExtent(out, { ...e, start: e.start + (from - host), length: to - from, offset: from, zero });
    };
    for (let i = 0; i < ext.length; i += 2) {
      piece(pos, ext[i]!, true);
      piece(ext[i]!, ext[i + 1]!, false);
      pos = ext[i + 1]!;
    }
    piece(pos, hostEnd, true);
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
      if (this.#writer) await this.#writer.close();
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
