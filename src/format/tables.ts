/**
 * Pure decode/encode of table entries: L1 entries, refcount table entries, single L2 entries
 * (bulk L2 scans run in the wasm kernel) and refcount block entries of any width.
 */
import { dataView, isZeroBlock, ZERO_BLOCK_BYTES } from './bytes.js';
import { ENTRY_LOW_BITS, ENTRY_OFFSET_HI, ENTRY_OFFSET_LO } from './constants.js';

const TWO32 = 0x1_0000_0000;

export interface DecodedTable {
  /** Offsets (0 = none), exact for offsets < 2^53. */
  offsets: Float64Array;
  /** COPIED flag per entry (L1 only). */
  copied: Uint8Array;
  /** Indices of entries with unaligned offsets, offsets >= 2^53 or (refcount table) reserved bits set. */
  invalid: number[];
}

/**
 * Decodes an L1 table (`hiMask` = reserved high bits 0x7f000000 of the upper word, low mask
 * 0x1ff) or refcount table (no high reserved bits apart from alignment).
 */
function decodeOffsetTable(buf: Uint8Array, count: number, clusterSize: number, l1: boolean): DecodedTable {
  const v = dataView(buf);
  const offsets = new Float64Array(count);
  const copied = new Uint8Array(l1 ? count : 0);
  const invalid: number[] = [];
  const block = ZERO_BLOCK_BYTES / 8;
  for (let i = 0; i < count; i++) {
    // Empty stretches (the common case) skipped a block of entries at a time.
    if (i % block === 0 && i + block <= count && isZeroBlock(buf, i * 8)) {
      i += block - 1;
      continue;
    }
    const hi = v.getUint32(i * 8);
    const lo = v.getUint32(i * 8 + 4);
    if (hi === 0 && lo === 0) continue;
    let offHi = hi;
    // L1: reserved bits are ignored, as QEMU masks them (L1E_OFFSET_MASK); only an offset that
    // is not cluster aligned makes the entry unusable. Refcount table: reserved bits are errors.
    const bad = !l1 && (lo & ENTRY_LOW_BITS) !== 0;
    if (l1) {
      copied[i] = hi >>> 31;
      offHi = hi & ENTRY_OFFSET_HI;
    }
    const value = offHi * TWO32 + ((lo & ENTRY_OFFSET_LO) >>> 0);
    if (l1 && value === 0) continue;
    if (bad || offHi >= 0x200000 || value % clusterSize !== 0) {
      invalid.push(i);
      continue;
    }
    offsets[i] = value;
  }
  return { offsets, copied, invalid };
}

export function decodeL1Table(buf: Uint8Array, l1Size: number, clusterSize: number): DecodedTable {
  return decodeOffsetTable(buf, l1Size, clusterSize, true);
}

export function decodeRefcountTable(buf: Uint8Array, entries: number, clusterSize: number): DecodedTable {
  return decodeOffsetTable(buf, entries, clusterSize, false);
}

/** Entries per refcount block for a cluster size and refcount order. */
export function refcountBlockEntries(clusterBits: number, refcountOrder: number): number {
  return 2 ** (clusterBits + 3 - refcountOrder);
}

/** Reads entry `index` of a refcount block (any width, qcow2 packing). */
export function getRefcount(block: Uint8Array, index: number, refcountOrder: number): number {
  const bits = 1 << refcountOrder;
  if (bits < 8) {
    const perByte = 8 / bits;
    const byte = block[Math.floor(index / perByte)]!;
    return (byte >>> ((index % perByte) * bits)) & ((1 << bits) - 1);
  }
  const v = dataView(block);
  const at = (index * bits) / 8;
  switch (bits) {
    case 8:
      return block[at]!;
    case 16:
      return v.getUint16(at);
    case 32:
      return v.getUint32(at);
    default:
      return v.getUint32(at) * TWO32 + v.getUint32(at + 4);
  }
}

export function setRefcount(block: Uint8Array, index: number, refcountOrder: number, value: number): void {
  const bits = 1 << refcountOrder;
  if (bits < 8) {
    const perByte = 8 / bits;
    const at = Math.floor(index / perByte);
    const shift = (index % perByte) * bits;
    const mask = ((1 << bits) - 1) << shift;
    block[at] = (block[at]! & ~mask) | ((value << shift) & mask);
    return;
  }
  const v = dataView(block);
  const at = (index * bits) / 8;
  switch (bits) {
    case 8:
      block[at] = value;
      break;
    case 16:
      v.setUint16(at, value);
      break;
    case 32:
      v.setUint32(at, value);
      break;
    default:
      v.setUint32(at, Math.floor(value / TWO32));
      v.setUint32(at + 4, value >>> 0);
  }
}

export function maxRefcount(refcountOrder: number): number {
  return 2 ** (1 << refcountOrder) - 1;
}

/** A single L2 entry decoded (slow path: reads of compressed clusters, check's error details). */
export interface CompressedDescriptor {
  offset: number;
  length: number;
}

export function decodeCompressed(hi: number, lo: number, clusterBits: number): CompressedDescriptor {
  const x = 62 - (clusterBits - 8);
  const value = (BigInt(hi) << 32n) | BigInt(lo >>> 0);
  const offset = Number(value & ((1n << BigInt(x)) - 1n));
  const sectors = Number((value >> BigInt(x)) & ((1n << BigInt(clusterBits - 8)) - 1n));
  return { offset, length: (sectors + 1) * 512 - (offset % 512) };
}
