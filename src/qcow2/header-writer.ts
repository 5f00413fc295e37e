/**
 * In-place header updates: feature bits (dirty, corrupt, unknown autoclear bits) and the
 * refcount-table pointer. Only the bytes of the fields being changed are written, so every other
 * header byte — unknown fields up to header_length, extensions known or not, the backing file
 * name — stays exactly as it was.
 *
 * Ordering contract (qcow2-format.md §9): `markDirty()` is durable before it returns, so bulk
 * metadata changes may follow it; `markClean()` flushes everything written before it first, then
 * clears the bit durably.
 */
import { QcowError } from '../errors.js';
import type { ImageFile } from '../io/file.js';
import { encodeHeader, type BitmapsExtension, type HeaderExtension, type Qcow2Header } from '../format/header.js';
import { ExtensionType, AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW, INCOMPAT_CORRUPT, INCOMPAT_DIRTY } from '../format/constants.js';

const OFF_SIZE = 24;
const OFF_L1 = 36; // u32 l1_size + u64 l1_table_offset: one 12-byte write switches both
const OFF_REFCOUNT_TABLE = 48; // u64 offset + u32 clusters: one 12-byte write switches both
const OFF_NB_SNAPSHOTS = 60; // u32 count + u64 offset
const OFF_INCOMPATIBLE = 72;
const OFF_AUTOCLEAR = 88;
const KNOWN_AUTOCLEAR = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW;

export class HeaderWriter {
  #incompatible: bigint;
  #autoclear: bigint;

  constructor(
    private readonly file: ImageFile,
    readonly version: 2 | 3,
    incompatible: bigint,
    autoclear: bigint,
  ) {
    this.#incompatible = incompatible;
    this.#autoclear = autoclear;
  }

  /** The decoded header is kept in step with every field written. */
  #decoded: Qcow2Header | undefined;

  static for(file: ImageFile, header: Qcow2Header): HeaderWriter {
    const w = new HeaderWriter(file, header.version, header.incompatibleFeatures, header.autoclearFeatures);
    w.#decoded = header;
    return w;
  }

  get incompatibleFeatures(): bigint {
    return this.#incompatible;
  }
  get autoclearFeatures(): bigint {
    return this.#autoclear;
  }
  get dirty(): boolean {
    return (this.#incompatible & INCOMPAT_DIRTY) !== 0n;
  }
  get corrupt(): boolean {
    return (this.#incompatible & INCOMPAT_CORRUPT) !== 0n;
  }

  /** Sets and clears incompatible feature bits with one 8-byte write, then flushes (v3 only). */
  async updateIncompatible(set: bigint, clear: bigint): Promise<void> {
    if (this.version < 3) return; // v2 has no feature bits
    const next = (this.#incompatible | set) & ~clear;
    if (next === this.#incompatible) return;
    await this.#writeU64(OFF_INCOMPATIBLE, next);
    await this.file.flush();
    this.#incompatible = next;
    if (this.#decoded) this.#decoded.incompatibleFeatures = next;
  }

  /** Sets the dirty bit durably before metadata changes whose refcounts may be in flux. */
  async markDirty(): Promise<void> {
    await this.updateIncompatible(INCOMPAT_DIRTY, 0n);
  }

  /** Makes every earlier write durable, then clears the dirty bit durably. */
  async markClean(): Promise<void> {
    if (!this.dirty) return;
    await this.file.flush();
    await this.updateIncompatible(0n, INCOMPAT_DIRTY);
  }

  /** Clears the corrupt bit (after a repair that left no errors), flushing earlier writes first. */
  async clearCorrupt(): Promise<void> {
    if (!this.corrupt) return;
    await this.file.flush();
    await this.updateIncompatible(0n, INCOMPAT_CORRUPT);
  }

  /**
   * A writer must clear the autoclear bits it does not understand before modifying the file
   * (spec; QEMU does it on every read-write open).
   */
  async clearUnknownAutoclear(): Promise<void> {
    if (this.version < 3) return;
    const next = this.#autoclear & KNOWN_AUTOCLEAR;
    if (next === this.#autoclear) return;
    await this.#writeU64(OFF_AUTOCLEAR, next);
    await this.file.flush();
    this.#autoclear = next;
    if (this.#decoded) this.#decoded.autoclearFeatures = next;
  }

  /**
   * Switches the image to another refcount table: offset and cluster count change in one write
   * (they are adjacent), made durable before returning. Everything the new table points to must
   * already be durable (the caller flushes first).
   */
  async setRefcountTable(offset: number, clusters: number): Promise<void> {
    if (!Number.isSafeInteger(offset) || offset <= 0 || !Number.isInteger(clusters) || clusters <= 0 || clusters > 0xffffffff)
      throw new QcowError('INTERNAL', `bad refcount table ${offset}/${clusters}`, this.file.path);
    const buf = new Uint8Array(12);
    const v = new DataView(buf.buffer);
    v.setUint32(0, Math.floor(offset / 2 ** 32));
    v.setUint32(4, offset >>> 0);
    v.setUint32(8, clusters);
    await this.file.writeAt(buf, OFF_REFCOUNT_TABLE);
    await this.file.flush();
    if (this.#decoded) {
      this.#decoded.refcountTableOffset = offset;
      this.#decoded.refcountTableClusters = clusters;
    }
  }

  /**
   * Switches the image to another L1 table (size and offset in one write), durably. The new table
   * must already be durable.
   */
  async setL1Table(offset: number, entries: number): Promise<void> {
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isInteger(entries) || entries < 0 || entries > 0xffffffff)
      throw new QcowError('INTERNAL', `bad L1 table ${offset}/${entries}`, this.file.path);
    const buf = new Uint8Array(12);
    const v = new DataView(buf.buffer);
    v.setUint32(0, entries);
    v.setUint32(4, Math.floor(offset / 2 ** 32));
    v.setUint32(8, offset >>> 0);
    await this.file.writeAt(buf, OFF_L1);
    await this.file.flush();
    if (this.#decoded) {
      this.#decoded.l1TableOffset = offset;
      this.#decoded.l1Size = entries;
    }
  }

  /** Points the bitmaps extension at another directory (one 8-byte field), durably. */
  async setBitmapDirectory(offset: number): Promise<void> {
    const h = this.#decoded;
    if (!h?.bitmaps) throw new QcowError('INTERNAL', 'the image has no bitmaps extension', this.file.path);
    let pos = h.headerLength;
    for (const e of h.extensions) {
      if (e.type === ExtensionType.Bitmaps) {
        const buf = new Uint8Array(8);
        new DataView(buf.buffer).setBigUint64(0, BigInt(offset));
        await this.file.writeAt(buf, pos + 8 + 16);
        await this.file.flush();
        h.bitmaps.directoryOffset = offset;
        const data = new DataView(e.data.buffer, e.data.byteOffset, e.data.byteLength);
        data.setBigUint64(16, BigInt(offset));
        return;
      }
      pos += 8 + Math.ceil(e.data.length / 8) * 8;
    }
    throw new QcowError('INTERNAL', 'bitmaps extension not found in the header', this.file.path);
  }

  /**
   * Adds, updates or drops the bitmaps extension (§8.1) and keeps autoclear bit 0 in step: set
   * iff the extension is present. Durable on return; the directory it names must already be.
   *
   * With a trusted extension already in the header, an update is one in-place write of its
   * 24-byte payload. Adding or dropping it re-encodes the extension area — every other extension
   * kept byte for byte and in order (the bitmaps one goes after QEMU's own kinds, before unknown
   * ones, as QEMU writes them), the backing file name moved after the terminator — and writes
   * it with the autoclear field in one write. Fails, writing nothing, when cluster 0 is too small.
   */
  async setBitmapsExtension(ext: BitmapsExtension | undefined): Promise<void> {
    const h = this.#decoded;
    if (!h) throw new QcowError('INTERNAL', 'header writer without a decoded header', this.file.path);
    if (this.version < 3) throw new QcowError('UNSUPPORTED', 'Cannot store dirty bitmaps in qcow2 v2 files', this.file.path);
    const payload = ext ? encodeBitmapsPayload(ext) : undefined;
    const at = extensionPosition(h, ExtensionType.Bitmaps);
    if (payload && h.bitmaps && at !== undefined) {
      await this.file.writeAt(payload, at + 8);
      await this.file.flush();
      h.bitmaps = { ...ext! };
      h.extensions.find((e) => e.type === ExtensionType.Bitmaps)!.data = payload;
      return;
    }
    await this.#rewriteExtensions(ExtensionType.Bitmaps, payload, payload ? AUTOCLEAR_BITMAPS : 0n, payload ? 0n : AUTOCLEAR_BITMAPS);
    h.bitmaps = ext ? { ...ext } : undefined;
  }

  /** Replaces (or inserts, or with `data` undefined drops) one extension, and updates autoclear bits, in one write. */
  async #rewriteExtensions(type: number, data: Uint8Array | undefined, setAutoclear: bigint, clearAutoclear: bigint): Promise<void> {
    const h = this.#decoded!;
    const cs = 2 ** h.clusterBits;
    const exts: HeaderExtension[] = h.extensions.filter((e) => e.type !== type);
    if (data) {
      const ours = new Set<number>([ExtensionType.BackingFormat, ExtensionType.DataFile, ExtensionType.FullDiskEncryption, ExtensionType.FeatureTable]);
      let i = 0;
      while (i < exts.length && ours.has(exts[i]!.type)) i++;
      exts.splice(i, 0, { type, data });
    }
    const name = h.backingFile !== undefined ? new TextEncoder().encode(h.backingFile) : undefined;
    let end = h.headerLength;
    for (const e of exts) end += 8 + Math.ceil(e.data.length / 8) * 8;
    end += 8; // terminator
    const total = end + (name?.length ?? 0);
    if (total > cs) throw new QcowError('NO_SPACE', 'No space left in the file header for the bitmaps extension', this.file.path);
    // What is on disk now, so the rewrite covers every byte the old layout used.
    const oldEnd = h.backingFileOffset ? h.backingFileOffset + h.backingFileSize : extensionAreaEnd(h);
    const buf = new Uint8Array(Math.max(total, oldEnd));
    await this.file.readAt(buf.subarray(0, h.headerLength), 0);
    const v = new DataView(buf.buffer);
    let pos = h.headerLength;
    for (const e of exts) {
      v.setUint32(pos, e.type);
      v.setUint32(pos + 4, e.data.length);
      buf.set(e.data, pos + 8);
      pos += 8 + Math.ceil(e.data.length / 8) * 8;
    }
    if (name) {
      buf.set(name, end);
      v.setBigUint64(8, BigInt(end));
    }
    const autoclear = (this.#autoclear | setAutoclear) & ~clearAutoclear;
    v.setBigUint64(OFF_AUTOCLEAR, autoclear);
    await this.file.writeAt(buf, 0);
    await this.file.flush();
    this.#autoclear = autoclear;
    h.autoclearFeatures = autoclear;
    h.extensions = exts;
    if (name) h.backingFileOffset = end;
  }

  /**
   * Re-encodes the whole header cluster with another backing file name and format (undefined:
   * none) and writes it with ONE write, then flushes. Everything else is kept: every field, the
   * bytes between the known fields and header_length, the bitmaps extension and every extension
   * qcowkit does not know (in their order, after the ones it writes, as QEMU does); the feature
   * name table is rewritten as QEMU writes it.
   *
   * Why one in-place write is crash-safe enough (QEMU's qcow2_update_header does the same): the
   * bytes that change are the backing offset/size fields (bytes 8..19), the extension area and
   * the name, all inside the first `header_length + extensions + name` bytes — under 1.6 KiB
   * (name <= 1023 bytes), so inside the first 4 KiB block of the file. A single pwrite of an
   * aligned range reaches the disk through one page of the page cache: ext4/xfs/btrfs write
   * that block as a unit, and 4Kn/512e disks (every current SSD and most HDDs) write a physical
   * 4 KiB sector atomically. So after a crash the file holds the old header or the new one; the
   * guest view is the same with either, because the data that makes it so was made durable
   * before (the caller flushes first). A torn result is possible only on a 512n disk that loses
   * power between two sectors of this one write, the same exposure QEMU has.
   */
  async rewriteBacking(backingFile: string | undefined, backingFormat: string | undefined): Promise<void> {
    const h = this.#decoded;
    if (!h) throw new QcowError('INTERNAL', 'header writer without the decoded header', this.file.path);
    if (h.dataFile !== undefined || h.encryption !== undefined)
      throw new QcowError('UNSUPPORTED', 'rewriting the header of an image with an external data file or encryption is not supported', this.file.path);
    const own = new Set<number>([ExtensionType.BackingFormat, ExtensionType.FeatureTable, ExtensionType.Bitmaps, ExtensionType.DataFile, ExtensionType.FullDiskEncryption]);
    const unknown = h.extensions.filter((e) => !own.has(e.type));
    const cs = 2 ** h.clusterBits;
    // A rewrite modifies the file: unknown autoclear bits go in the same write (spec; QEMU clears
    // them on every read-write open).
    const autoclear = this.#autoclear & KNOWN_AUTOCLEAR;
    const encoded = encodeHeader(
      {
        version: h.version,
        clusterBits: h.clusterBits,
        size: h.size,
        l1Size: h.l1Size,
        l1TableOffset: h.l1TableOffset,
        refcountTableOffset: h.refcountTableOffset,
        refcountTableClusters: h.refcountTableClusters,
        refcountOrder: h.refcountOrder,
        incompatibleFeatures: this.#incompatible,
        compatibleFeatures: h.compatibleFeatures,
        autoclearFeatures: autoclear,
        compressionType: h.compressionType,
        backingFile: backingFile === '' ? undefined : backingFile,
        backingFormat: backingFile === '' || backingFile === undefined ? undefined : backingFormat,
        extraExtensions: unknown,
        bitmaps: h.bitmaps,
        nbSnapshots: h.nbSnapshots,
        snapshotsOffset: h.snapshotsOffset,
        unknownHeaderBytes: h.version === 3 ? h.unknownHeaderBytes : undefined,
      },
      this.file.path,
    );
    const cluster = new Uint8Array(cs);
    cluster.set(encoded);
    await this.file.writeAt(cluster, 0);
    await this.file.flush();
    // Keep the decoded header in step.
    this.#autoclear = autoclear;
    h.autoclearFeatures = autoclear;
    const v = new DataView(encoded.buffer, encoded.byteOffset, encoded.byteLength);
    h.backingFileOffset = Number(v.getBigUint64(8));
    h.backingFileSize = v.getUint32(16);
    h.backingFile = h.backingFileOffset ? backingFile : undefined;
    h.backingFormat = h.backingFileOffset ? backingFormat : undefined;
    if (h.version === 3) h.headerLength = v.getUint32(100);
    const exts: Array<{ type: number; data: Uint8Array }> = [];
    for (let off = h.headerLength; off + 8 <= encoded.length; ) {
      const type = v.getUint32(off);
      const len = v.getUint32(off + 4);
      if (type === ExtensionType.End) break;
      exts.push({ type, data: encoded.slice(off + 8, off + 8 + len) });
      off += 8 + Math.ceil(len / 8) * 8;
    }
    h.extensions = exts;
  }

  /** Sets the virtual disk size, durably (after the L1 table covers it). */
  async setSize(size: number): Promise<void> {
    await this.#writeU64(OFF_SIZE, BigInt(size));
    await this.file.flush();
    if (this.#decoded) this.#decoded.size = size;
  }

  /**
   * Grows the disk and points the bitmaps extension at a directory made for the new size, in ONE
   * write: bytes 24 (size) up to the end of the extension's payload, the bytes between rewritten
   * as they are. Bitmap tables must match the disk size exactly (QEMU refuses the image
   * otherwise), so size and directory must change together; the range lies in the header's first
   * 4 KiB block, which reaches the disk as a unit (see rewriteBacking). The directory must
   * already be durable; durable on return.
   */
  async setSizeAndBitmaps(size: number, ext: BitmapsExtension): Promise<void> {
    const h = this.#decoded;
    const at = h ? extensionPosition(h, ExtensionType.Bitmaps) : undefined;
    if (!h?.bitmaps || at === undefined) throw new QcowError('INTERNAL', 'the image has no bitmaps extension', this.file.path);
    const end = at + 8 + 24;
    if (end > 4096) throw new QcowError('UNSUPPORTED', 'cannot grow an image with bitmaps whose bitmaps extension lies past the first 4 KiB of the header', this.file.path);
    const payload = encodeBitmapsPayload(ext);
    const buf = new Uint8Array(end - OFF_SIZE);
    await this.file.readAt(buf, OFF_SIZE);
    new DataView(buf.buffer).setBigUint64(0, BigInt(size));
    buf.set(payload, at + 8 - OFF_SIZE);
    await this.file.writeAt(buf, OFF_SIZE);
    await this.file.flush();
    h.size = size;
    h.bitmaps = { ...ext };
    h.extensions.find((e) => e.type === ExtensionType.Bitmaps)!.data = payload;
  }

  /** Sets the snapshot count alone (dropping entries off the table's end), durably. */
  async setSnapshotCount(count: number): Promise<void> {
    const buf = new Uint8Array(4);
    new DataView(buf.buffer).setUint32(0, count);
    await this.file.writeAt(buf, OFF_NB_SNAPSHOTS);
    await this.file.flush();
    if (this.#decoded) this.#decoded.nbSnapshots = count;
  }

  /**
   * Switches to another snapshot table: count and offset change in one write (they are
   * adjacent), durably. The new table must already be durable.
   */
  async setSnapshotTable(count: number, offset: number): Promise<void> {
    const buf = new Uint8Array(12);
    const v = new DataView(buf.buffer);
    v.setUint32(0, count);
    v.setUint32(4, Math.floor(offset / 2 ** 32));
    v.setUint32(8, offset >>> 0);
    await this.file.writeAt(buf, OFF_NB_SNAPSHOTS);
    await this.file.flush();
    if (this.#decoded) {
      this.#decoded.snapshotsOffset = offset;
      this.#decoded.nbSnapshots = count;
    }
  }

  async #writeU64(at: number, value: bigint): Promise<void> {
    const buf = new Uint8Array(8);
    new DataView(buf.buffer).setBigUint64(0, value);
    await this.file.writeAt(buf, at);
  }
}

function encodeBitmapsPayload(ext: BitmapsExtension): Uint8Array {
  const b = new Uint8Array(24);
  const v = new DataView(b.buffer);
  v.setUint32(0, ext.nbBitmaps);
  v.setBigUint64(8, BigInt(ext.directorySize));
  v.setBigUint64(16, BigInt(ext.directoryOffset));
  return b;
}

/** Byte offset of the extension's 8-byte head in the header, when present. */
function extensionPosition(h: Qcow2Header, type: number): number | undefined {
  let pos = h.headerLength;
  for (const e of h.extensions) {
    if (e.type === type) return pos;
    pos += 8 + Math.ceil(e.data.length / 8) * 8;
  }
  return undefined;
}

/** One past the terminator of the extension area. */
function extensionAreaEnd(h: Qcow2Header): number {
  let pos = h.headerLength;
  for (const e of h.extensions) pos += 8 + Math.ceil(e.data.length / 8) * 8;
  return pos + 8;
}
