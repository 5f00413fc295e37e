/** On-disk constants of the qcow2 format (docs: shared/docs/qcow2-format.md). */
export const QCOW2_MAGIC = 0x514649fb;
export const V2_HEADER_LENGTH = 72;
export const V3_MIN_HEADER_LENGTH = 104;
export const V3_HEADER_LENGTH = 112; // what QEMU 7.2 writes

export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
export const MAX_REFCOUNT_ORDER = 6;
export const MAX_L1_BYTES = 32 * 1024 * 1024;
export const MAX_REFTABLE_BYTES = 8 * 1024 * 1024;
export const MAX_SNAPSHOTS = 65536;
export const MAX_BACKING_NAME = 1023;
/** Host offsets above this can't be addressed exactly by a JS number; QEMU's own limit is 2^56. */
export const MAX_HOST_OFFSET = 2 ** 53;

export const enum ExtensionType {
  End = 0,
  BackingFormat = 0xe2792aca,
  FeatureTable = 0x6803f857,
  Bitmaps = 0x23852875,
  FullDiskEncryption = 0x0537be77,
  DataFile = 0x44415441,
}

export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION = 1n << 3n;
export const INCOMPAT_EXTL2 = 1n << 4n;
export const INCOMPAT_KNOWN = 0x1fn;
export const COMPAT_LAZY_REFCOUNTS = 1n << 0n;
export const AUTOCLEAR_BITMAPS = 1n << 0n;
export const AUTOCLEAR_DATA_FILE_RAW = 1n << 1n;

/** Bytes of one feature-name table entry: type, bit number, a name of up to 46 bytes. */
export const FEATURE_ENTRY_BYTES = 48;

/** Names QEMU puts in the feature-name table, in the order it writes them. */
export const FEATURE_NAMES: ReadonlyArray<readonly [kind: 0 | 1 | 2, bit: number, name: string]> = [
  [0, 0, 'dirty bit'],
  [0, 1, 'corrupt bit'],
  [0, 2, 'external data file'],
  [0, 3, 'compression type'],
  [0, 4, 'extended L2 entries'],
  [1, 0, 'lazy refcounts'],
  [2, 0, 'bitmaps'],
  [2, 1, 'raw external data'],
];

export const L1E_OFFSET_MASK = 0x00fffffffffffe00n;
export const L1E_RESERVED_MASK = 0x7f000000000001ffn;
export const REFT_OFFSET_MASK = 0xfffffffffffffe00n;
export const REFT_RESERVED_MASK = 0x1ffn;
export const ENTRY_COPIED = 1n << 63n;
export const ENTRY_COMPRESSED = 1n << 62n;
export const L2E_ZERO = 1n;
export const L2E_OFFSET_MASK = 0x00fffffffffffe00n;

/**
 * The same fields on the two 32-bit words JavaScript reads an entry as (hi, lo): the host offset
 * of L1/L2/bitmap-table entries is bits 9..55, refcount-table entries use bits 9..63.
 */
export const ENTRY_OFFSET_HI = 0x00ffffff;
export const ENTRY_OFFSET_LO = 0xfffffe00;
/** Bits 0..8: below a 512-byte aligned offset (flags or reserved). */
export const ENTRY_LOW_BITS = 0x1ff;
export const L1E_RESERVED_HI = 0x7f000000;
export const L2E_RESERVED_HI = 0x3f000000;
/** Standard L2: bits 1..8 (bit 0 is the zero flag; with extended L2 it is reserved too). */
export const L2E_RESERVED_LO = 0x1fe;

/** Host offset of an L1, L2 or bitmap-table entry from its two words. */
export function entryOffset(hi: number, lo: number): number {
  return (hi & ENTRY_OFFSET_HI) * 2 ** 32 + ((lo & ENTRY_OFFSET_LO) >>> 0);
}
