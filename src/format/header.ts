/**
 * Pure decode/encode of the qcow2 header, its extensions and the backing file name, with every
 * field validated against the spec, QEMU 7.2's limits and the file size.
 */
import { QcowError } from '../errors.js';
import { dataView, decodeUtf8, setU64, u64 } from './bytes.js';
import {
  AUTOCLEAR_BITMAPS,
  AUTOCLEAR_DATA_FILE_RAW,
  ExtensionType,
  FEATURE_ENTRY_BYTES,
  FEATURE_NAMES,
  INCOMPAT_COMPRESSION,
  INCOMPAT_DATA_FILE,
  INCOMPAT_EXTL2,
  INCOMPAT_KNOWN,
  MAX_BACKING_NAME,
  MAX_CLUSTER_BITS,
  MAX_HOST_OFFSET,
  MAX_L1_BYTES,
  MAX_REFCOUNT_ORDER,
  MAX_REFTABLE_BYTES,
  MAX_SNAPSHOTS,
  MIN_CLUSTER_BITS,
  QCOW2_MAGIC,
  V2_HEADER_LENGTH,
  V3_HEADER_LENGTH,
  V3_MIN_HEADER_LENGTH,
} from './constants.js';

export interface HeaderExtension {
  type: number;
  data: Uint8Array;
}

export interface FeatureName {
  kind: number;
  bit: number;
  name: string;
}

export interface BitmapsExtension {
  nbBitmaps: number;
  directorySize: number;
  directoryOffset: number;
}

export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  /** Bytes between the fields qcowkit knows and header_length, kept verbatim. */
  unknownHeaderBytes: Uint8Array;
  /** All extensions in file order except the terminator (known ones too). */
  extensions: HeaderExtension[];
  backingFile: string | undefined;
  backingFormat: string | undefined;
  dataFile: string | undefined;
  featureNames: FeatureName[];
  bitmaps: BitmapsExtension | undefined;
  encryption: { offset: number; length: number } | undefined;
}

const corrupt = (file: string, msg: string): QcowError => new QcowError('CORRUPT', msg, file);

/** Minimum number of L1 entries for a disk of `size` bytes. */
export function minL1Size(size: number, clusterBits: number, extendedL2: boolean): number {
  const l2Bits = clusterBits - (extendedL2 ? 4 : 3);
  return Math.ceil(size / 2 ** (clusterBits + l2Bits));
}

/**
 * The "Unsupported qcow2 feature(s)" list as QEMU builds it: names in feature-table order for the
 * incompatible bits they cover (the bit number taken modulo 64, as the C shift does on x86-64),
 * then one hex mask of the bits no entry named.
 */
function describeFeatures(mask: bigint, names: FeatureName[]): string {
  const parts: string[] = [];
  let left = mask;
  for (const f of names) {
    const bit = 1n << BigInt(f.bit & 63);
    if (f.kind !== 0 || !(left & bit)) continue;
    parts.push(f.name);
    left &= ~bit;
  }
  if (left) parts.push(`Unknown incompatible feature: ${left.toString(16)}`);
  return parts.join(', ');
}

/**
 * Decodes the header from the first bytes of the file (at least min(fileSize, cluster size);
 * pass cluster 0 when available). `fileSize` bounds every table offset.
 */
export interface DecodeHeaderOptions {
  /** `check`: an image without a refcount table is opened (QEMU's BDRV_O_CHECK). */
  checkMode?: boolean;
}

export function decodeHeader(buf: Uint8Array, fileSize: number, file: string, opts: DecodeHeaderOptions = {}): Qcow2Header {
  // `buf` is zero-padded past the end of the file (QEMU reads zeros there), so only a short
  // buffer is a truncated header.
  if (buf.length < V2_HEADER_LENGTH) {
    if (buf.length >= 4 && dataView(buf).getUint32(0) === QCOW2_MAGIC)
      throw corrupt(file, `truncated qcow2 header (file is ${fileSize} bytes)`);
    throw new QcowError('NOT_QCOW2', 'Image is not in qcow2 format', file);
  }
  const v = dataView(buf);
  if (v.getUint32(0) !== QCOW2_MAGIC) throw new QcowError('NOT_QCOW2', 'Image is not in qcow2 format', file);
  const version = v.getUint32(4);
  if (version !== 2 && version !== 3) throw new QcowError('UNSUPPORTED', `Unsupported qcow2 version ${version}`, file);

  const clusterBits = v.getUint32(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS)
    throw new QcowError('UNSUPPORTED', `Unsupported cluster size: 2^${clusterBits}`, file);
  const cs = 2 ** clusterBits;

  const h: Qcow2Header = {
    version,
    backingFileOffset: u64(v, 8),
    backingFileSize: v.getUint32(16),
    clusterBits,
    size: u64(v, 24),
    cryptMethod: v.getUint32(32),
    l1Size: v.getUint32(36),
    l1TableOffset: u64(v, 40),
    refcountTableOffset: u64(v, 48),
    refcountTableClusters: v.getUint32(56),
    nbSnapshots: v.getUint32(60),
    snapshotsOffset: u64(v, 64),
    incompatibleFeatures: 0n,
    compatibleFeatures: 0n,
    autoclearFeatures: 0n,
    refcountOrder: 4,
    headerLength: V2_HEADER_LENGTH,
    compressionType: 0,
    unknownHeaderBytes: new Uint8Array(0),
    extensions: [],
    backingFile: undefined,
    backingFormat: undefined,
    dataFile: undefined,
    featureNames: [],
    bitmaps: undefined,
    encryption: undefined,
  };

  if (version === 3) {
    if (buf.length < V3_MIN_HEADER_LENGTH) throw corrupt(file, 'truncated qcow2 v3 header');
    h.incompatibleFeatures = v.getBigUint64(72);
    h.compatibleFeatures = v.getBigUint64(80);
    h.autoclearFeatures = v.getBigUint64(88);
    h.refcountOrder = v.getUint32(96);
    h.headerLength = v.getUint32(100);
    if (h.headerLength < V3_MIN_HEADER_LENGTH) throw corrupt(file, 'qcow2 header too short');
    if (h.headerLength > cs) throw corrupt(file, 'qcow2 header exceeds cluster size');
    if (h.headerLength > buf.length) throw corrupt(file, 'qcow2 header extends past the end of the file');
    if (h.headerLength > 104) h.compressionType = buf[104]!;
    if (h.headerLength > V3_HEADER_LENGTH) h.unknownHeaderBytes = buf.slice(V3_HEADER_LENGTH, h.headerLength);
  }

  if (h.backingFileOffset > cs) throw corrupt(file, 'Invalid backing file offset');

  // Checked in QEMU's order: compression type, then unknown incompatible features, then the rest.
  const compressionBit = (h.incompatibleFeatures & INCOMPAT_COMPRESSION) !== 0n;
  if (h.compressionType > 1) throw new QcowError('UNSUPPORTED', `Unknown compression type ${h.compressionType}`, file);
  if (h.compressionType !== 0 && !compressionBit)
    throw corrupt(file, 'Invalid compression type: the compression type incompatible bit is not set');
  if (h.compressionType === 0 && compressionBit)
    throw corrupt(file, 'Corrupted compression type: the compression type incompatible bit is set for zlib');

  const unknownIncompat = h.incompatibleFeatures & ~INCOMPAT_KNOWN;
  if (unknownIncompat) {
    // The feature-name table names the bits; QEMU reads the extensions only for it here, and an
    // invalid extension just ends the search (what was read up to it still counts).
    const scratch: Qcow2Header = { ...h, extensions: [], featureNames: [] };
    try {
      decodeExtensions(buf, scratch, cs, fileSize, file);
    } catch {
      // keep the names found before the bad extension
    }
    throw new QcowError('UNSUPPORTED', `Unsupported qcow2 feature(s): ${describeFeatures(unknownIncompat, scratch.featureNames)}`, file);
  }

  if (h.backingFileOffset) {
    if (h.backingFileSize > MAX_BACKING_NAME || h.backingFileOffset + h.backingFileSize > cs)
      throw corrupt(file, 'Backing file name too long');
    // Bytes past the end of the file read as zeros (as in QEMU): pass cluster 0 zero-padded.
    if (h.backingFileOffset + h.backingFileSize > buf.length) throw corrupt(file, 'backing file name extends past the end of the file');
  }

  decodeExtensions(buf, h, cs, fileSize, file);

  if (h.refcountOrder > MAX_REFCOUNT_ORDER)
    throw new QcowError('UNSUPPORTED', 'Reference count entry width too large; may not exceed 64 bits', file);
  if (h.cryptMethod > 2) throw new QcowError('UNSUPPORTED', `Unsupported encryption method: ${h.cryptMethod}`, file);

  const extendedL2 = isExtendedL2(h);
  if (extendedL2 && clusterBits < 14) throw corrupt(file, 'Extended L2 entries are only supported with cluster sizes of at least 16384 bytes');

  // In QEMU's order: refcount table, snapshot table, L1 table, then the size it must cover.
  // `check` opens images without a refcount table (and reports every cluster), as QEMU does.
  if (h.refcountTableClusters === 0 && !opts.checkMode) throw corrupt(file, 'Image does not contain a reference count table');
  // QEMU validates the table offsets only for alignment and range (an offset of 0 is accepted);
  // qcowkit also refuses tables past the end of the file (README: deliberate differences).
  checkTable(file, 'Reference count table', v, 48, h.refcountTableClusters * cs, cs, fileSize, MAX_REFTABLE_BYTES, 'Reference count table too large');

  // Validated even without snapshots, as QEMU does; the entries are checked when the table is read.
  // In check mode QEMU leaves count and offset to the check, which reports (and -r all repairs) them.
  if (!opts.checkMode) {
    if (h.nbSnapshots > MAX_SNAPSHOTS) throw corrupt(file, 'Snapshot table too large');
    const snapshotsRaw = v.getBigUint64(64);
    if (snapshotsRaw % BigInt(cs) !== 0n || snapshotsRaw >= 1n << 63n) throw corrupt(file, 'Snapshot table offset invalid');
  }
  if (h.nbSnapshots && h.snapshotsOffset >= fileSize) throw corrupt(file, 'Snapshot table lies past the end of the file');

  checkTable(file, 'L1 table', v, 40, h.l1Size * 8, cs, fileSize, MAX_L1_BYTES, 'Active L1 table too large');
  // Exact on the 64-bit size: QEMU refuses a size needing more than INT_MAX L1 entries.
  const l2Bits = BigInt(clusterBits - (extendedL2 ? 4 : 3));
  const span = 1n << (BigInt(clusterBits) + l2Bits);
  const sizeRaw = v.getBigUint64(24);
  const l1Needed = (sizeRaw + span - 1n) / span;
  if (l1Needed > 0x7fffffffn) throw new QcowError('UNSUPPORTED', 'Image is too big', file);
  if (BigInt(h.l1Size) < l1Needed) throw corrupt(file, 'L1 table is too small');
  // qcowkit's own limit (offsets are JavaScript numbers); only large clusters get this far.
  if (sizeRaw > BigInt(MAX_HOST_OFFSET)) throw new QcowError('UNSUPPORTED', `Image size too large: ${sizeRaw} (qcowkit supports up to ${MAX_HOST_OFFSET} bytes)`, file);

  // QEMU crashes on LUKS images without the encryption header extension; refuse them.
  if (h.cryptMethod === 2 && !h.encryption) throw corrupt(file, 'LUKS encryption header extension missing');
  if (h.cryptMethod !== 2 && h.encryption) throw corrupt(file, 'Encryption header extension present but the image is not LUKS-encrypted');
  return h;
}

/**
 * Refusals QEMU makes only when it opens an image for I/O (map, check, reads), not for `info`:
 * the raw-external-data autoclear bit needs an external data file.
 */
export function assertIoConsistent(h: Qcow2Header, file: string): void {
  if (h.autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW && !hasDataFile(h)) throw corrupt(file, 'data-file-raw requires a data file');
  if (hasDataFile(h) && h.dataFile === undefined) throw corrupt(file, "'data-file' is required for this image (external data file feature set without a data file name)");
}

function checkTable(file: string, name: string, v: DataView, at: number, bytes: number, cs: number, fileSize: number, max: number, tooLarge: string): void {
  if (bytes > max) throw corrupt(file, tooLarge);
  // Exact on the 64-bit field: unaligned or >= 2^63 is "offset invalid" in QEMU.
  const raw = v.getBigUint64(at);
  if (raw % BigInt(cs) !== 0n || raw >= 1n << 63n) throw corrupt(file, `${name} offset invalid`);
  if (bytes === 0) return;
  const offset = u64(v, at);
  if (offset + bytes > fileSize) throw corrupt(file, `${name} lies past the end of the file (offset ${offset}, ${bytes} bytes, file is ${fileSize} bytes)`);
}

export function isExtendedL2(h: Qcow2Header): boolean {
  return (h.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n;
}

export function hasDataFile(h: Qcow2Header): boolean {
  return (h.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n;
}


function decodeExtensions(buf: Uint8Array, h: Qcow2Header, cs: number, fileSize: number, file: string): void {
  const v = dataView(buf);
  // The area ends at the backing file name or at the end of cluster 0; `buf` is cluster 0
  // zero-padded past the end of the file (QEMU reads zeros there).
  const limit = Math.min(h.backingFileOffset || cs, cs);
  if (buf.length < limit) throw corrupt(file, 'truncated header cluster');
  let off = h.headerLength;
  for (;;) {
    // QEMU tolerates a missing terminator at the very end of the area.
    if (off >= limit) break;
    if (off + 8 > limit) throw corrupt(file, 'Header extension too large');
    const type = v.getUint32(off);
    const len = v.getUint32(off + 4);
    // Checked for the terminator too, as QEMU does. A repeated extension replaces the earlier one.
    if (len > limit - off - 8) throw corrupt(file, 'Header extension too large');
    if (type === ExtensionType.End) break;
    const data = buf.slice(off + 8, off + 8 + len);
    h.extensions.push({ type, data });
    decodeKnownExtension(type, data, h, cs, fileSize, file);
    off += 8 + Math.ceil(len / 8) * 8;
  }
  if (h.backingFileOffset) {
    h.backingFile = cString(buf.subarray(h.backingFileOffset, h.backingFileOffset + h.backingFileSize));
  }
}

/** QEMU keeps names as C strings: the first NUL ends them. */
function cString(b: Uint8Array): string {
  const nul = b.indexOf(0);
  return decodeUtf8(nul < 0 ? b : b.subarray(0, nul));
}

function decodeKnownExtension(type: number, data: Uint8Array, h: Qcow2Header, cs: number, fileSize: number, file: string): void {
  const v = dataView(data);
  switch (type) {
    case ExtensionType.BackingFormat:
      if (data.length > 15) throw corrupt(file, 'Backing file format name too long');
      // A C string for QEMU: it ends at the first NUL, and an empty name means "not recorded".
      h.backingFormat = cString(data) || undefined;
      break;
    case ExtensionType.FeatureTable:
      h.featureNames = decodeFeatureTable(data);
      break;
    case ExtensionType.Bitmaps: {
      if (data.length !== 24) throw corrupt(file, 'Invalid bitmaps extension length');
      // Trusted only while the autoclear bit says a bitmap-aware program wrote the file last.
      if (!(h.autoclearFeatures & AUTOCLEAR_BITMAPS)) break;
      const ext = { nbBitmaps: v.getUint32(0), directorySize: u64(v, 8), directoryOffset: u64(v, 16) };
      if (v.getUint32(4) !== 0) throw corrupt(file, 'Reserved field of the bitmaps extension is not zero');
      if (ext.nbBitmaps === 0) throw corrupt(file, 'Bitmaps extension declares no bitmaps');
      if (ext.nbBitmaps > 65535) throw corrupt(file, 'Too many persistent bitmaps');
      if (ext.directorySize > 1024 * 65535) throw corrupt(file, 'Bitmap directory too large');
      if (v.getBigUint64(16) % BigInt(cs) !== 0n) throw corrupt(file, 'Invalid bitmap directory offset');
      if (ext.directoryOffset + ext.directorySize > MAX_HOST_OFFSET) throw corrupt(file, 'Bitmap directory offset invalid');
      h.bitmaps = ext;
      break;
    }
    case ExtensionType.FullDiskEncryption:
      if (data.length !== 16) throw corrupt(file, 'Invalid encryption header extension length');
      h.encryption = { offset: u64(v, 0), length: u64(v, 8) };
      break;
    case ExtensionType.DataFile:
      h.dataFile = decodeUtf8(data);
      break;
    default:
      break; // unknown: kept in h.extensions, preserved on rewrite
  }
}

/**
 * Entries of 48 bytes (type, bit, name of up to 46 bytes); as QEMU reads it, a short last entry
 * is zero-padded and the table ends at the first entry with an empty name. A repeated table
 * replaces the earlier one.
 */
function decodeFeatureTable(data: Uint8Array): FeatureName[] {
  const out: FeatureName[] = [];
  for (let i = 0; i < data.length; i += FEATURE_ENTRY_BYTES) {
    const entry = new Uint8Array(FEATURE_ENTRY_BYTES);
    entry.set(data.subarray(i, i + FEATURE_ENTRY_BYTES));
    const raw = entry.subarray(2);
    const end = raw.indexOf(0);
    if (end === 0) break;
    out.push({ kind: entry[0]!, bit: entry[1]!, name: decodeUtf8(end < 0 ? raw : raw.subarray(0, end)) });
  }
  return out;
}

/** Options for building a new header (create). */
export interface NewHeaderSpec {
  version: 2 | 3;
  clusterBits: number;
  size: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  refcountOrder: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  compressionType: number;
  backingFile?: string | undefined;
  backingFormat?: string | undefined;
  /** External data file name (stored verbatim; set INCOMPAT_DATA_FILE with it). */
  dataFile?: string | undefined;
  /** Extensions to keep after the ones qcowkit writes (e.g. unknown ones from an old header). */
  extraExtensions?: HeaderExtension[];
  bitmaps?: BitmapsExtension | undefined;
  nbSnapshots?: number;
  snapshotsOffset?: number;
  unknownHeaderBytes?: Uint8Array;
}

/** Encodes the header in QEMU's layout (§3 "What QEMU writes"); fails when cluster 0 is too small. */
export function encodeHeader(spec: NewHeaderSpec, file: string): Uint8Array {
  const cs = 2 ** spec.clusterBits;
  const headerLength = spec.version === 3 ? V3_HEADER_LENGTH + (spec.unknownHeaderBytes?.length ?? 0) : V2_HEADER_LENGTH;
  const exts: HeaderExtension[] = [];
  const enc = new TextEncoder();
  // QEMU's order: backing format, data file, feature table, bitmaps, then unknown ones.
  if (spec.backingFormat !== undefined) exts.push({ type: ExtensionType.BackingFormat, data: enc.encode(spec.backingFormat) });
  if (spec.dataFile !== undefined) exts.push({ type: ExtensionType.DataFile, data: enc.encode(spec.dataFile) });
  if (spec.version === 3 && cs > 4096) exts.push({ type: ExtensionType.FeatureTable, data: featureTable() });
  if (spec.bitmaps) {
    const b = new Uint8Array(24);
    const v = dataView(b);
    v.setUint32(0, spec.bitmaps.nbBitmaps);
    setU64(v, 8, spec.bitmaps.directorySize);
    setU64(v, 16, spec.bitmaps.directoryOffset);
    exts.push({ type: ExtensionType.Bitmaps, data: b });
  }
  for (const e of spec.extraExtensions ?? []) exts.push(e);

  let extBytes = 0;
  for (const e of exts) extBytes += 8 + Math.ceil(e.data.length / 8) * 8;
  extBytes += 8; // terminator
  const name = spec.backingFile !== undefined ? enc.encode(spec.backingFile) : undefined;
  const total = headerLength + extBytes + (name?.length ?? 0);
  if (total > cs) throw new QcowError('INVALID_ARGUMENT', 'No space left in the file header (backing file name or extensions too large)', file);
  if (name && name.length > MAX_BACKING_NAME) throw new QcowError('INVALID_ARGUMENT', 'Backing file name too long', file);

  const buf = new Uint8Array(total);
  const v = dataView(buf);
  v.setUint32(0, QCOW2_MAGIC);
  v.setUint32(4, spec.version);
  if (name) {
    setU64(v, 8, headerLength + extBytes);
    v.setUint32(16, name.length);
  }
  v.setUint32(20, spec.clusterBits);
  setU64(v, 24, spec.size);
  v.setUint32(36, spec.l1Size);
  setU64(v, 40, spec.l1TableOffset);
  setU64(v, 48, spec.refcountTableOffset);
  v.setUint32(56, spec.refcountTableClusters);
  v.setUint32(60, spec.nbSnapshots ?? 0);
  setU64(v, 64, spec.snapshotsOffset ?? 0);
  if (spec.version === 3) {
    v.setBigUint64(72, spec.incompatibleFeatures);
    v.setBigUint64(80, spec.compatibleFeatures);
    v.setBigUint64(88, spec.autoclearFeatures);
    v.setUint32(96, spec.refcountOrder);
    v.setUint32(100, headerLength);
    buf[104] = spec.compressionType;
    if (spec.unknownHeaderBytes) buf.set(spec.unknownHeaderBytes, V3_HEADER_LENGTH);
  }
  let off = headerLength;
  for (const e of exts) {
    v.setUint32(off, e.type);
    v.setUint32(off + 4, e.data.length);
    buf.set(e.data, off + 8);
    off += 8 + Math.ceil(e.data.length / 8) * 8;
  }
  off += 8; // terminator (zeros)
  if (name) buf.set(name, off);
  return buf;
}

function featureTable(): Uint8Array {
  const t = new Uint8Array(FEATURE_NAMES.length * FEATURE_ENTRY_BYTES);
  const enc = new TextEncoder();
  FEATURE_NAMES.forEach(([kind, bit, name], i) => {
    t[i * FEATURE_ENTRY_BYTES] = kind;
    t[i * FEATURE_ENTRY_BYTES + 1] = bit;
    t.set(enc.encode(name), i * FEATURE_ENTRY_BYTES + 2);
  });
  return t;
}
