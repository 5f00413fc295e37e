/**
 * Where everything of a freshly created qcow2 image goes, and the bytes of its tables (pure).
 *
 * Plain images use QEMU's layout: cluster 0 header, then the refcount table, the refcount
 * block(s) and the L1 table; the file ends right after the L1 entries. Preallocated images keep
 * that order and append every L2 table, then every data cluster, so the metadata is one
 * contiguous area that can be written with a few large writes and the guest data is one host run
 * (QEMU interleaves L2 tables, data and refcount blocks instead; both are valid).
 *
 * The used clusters are always 0 .. usedClusters-1, each with refcount 1, so the refcount blocks
 * (contiguous, each covering the clusters that follow the previous one's) are one long array of
 * entries whose first usedClusters entries are 1.
 */
import { QcowError } from '../errors.js';
import { dataView } from '../format/bytes.js';
import { MAX_HOST_OFFSET, MAX_L1_BYTES, MAX_REFTABLE_BYTES } from '../format/constants.js';
import { minL1Size } from '../format/header.js';
import { refcountBlockEntries } from '../format/tables.js';

export interface FreshLayoutParams {
  clusterBits: number;
  refcountOrder: number;
  extendedL2: boolean;
  /** Virtual size in bytes (a multiple of 512). */
  size: number;
  /** Allocate every L2 table and data cluster (preallocation=metadata/full). */
  preallocate: boolean;
  /**
   * The data lives in an external data file: preallocated L2 entries map each guest cluster to
   * the same offset there, and no data cluster takes room (or a refcount) in the image file.
   */
  externalData?: boolean | undefined;
}

export interface FreshLayout extends FreshLayoutParams {
  clusterSize: number;
  l1Size: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  refcountBlockOffset: number;
  refcountBlocks: number;
  /** 0 when l1Size is 0 (as QEMU writes it). */
  l1TableOffset: number;
  l1Clusters: number;
  l2TableOffset: number;
  l2Tables: number;
  /** Host offset of guest cluster 0 when preallocated (data clusters are contiguous); 0 in an external data file. */
  dataOffset: number;
  /** Data clusters the preallocated L2 tables map (in the image file unless externalData). */
  dataClusters: number;
  usedClusters: number;
  /**
   * [clusterSize, tablesEnd) holds every non-zero table byte (fillMetadata fills it); a plain
   * image's L1 table is all zeros and stays a hole.
   */
  tablesEnd: number;
  /** Length of the finished file: after the L1 entries (plain) or after the last data cluster. */
  fileLength: number;
}

const COPIED_HI = 0x80000000;
const TWO32 = 0x1_0000_0000;

export const SIZE_TOO_LARGE = "The image size is too large for file format 'qcow2' (try using a larger cluster size)";

/** Computes the layout; `file` names the image in errors (size too large for the tables). */
export function freshLayout(p: FreshLayoutParams, file?: string): FreshLayout {
  const cs = 2 ** p.clusterBits;
  const l1Size = minL1Size(p.size, p.clusterBits, p.extendedL2);
  if (l1Size * 8 > MAX_L1_BYTES || p.size > MAX_HOST_OFFSET) throw new QcowError('INVALID_ARGUMENT', SIZE_TOO_LARGE, file);
  const l1Clusters = Math.ceil((l1Size * 8) / cs);
  const l2Tables = p.preallocate ? l1Size : 0;
  const dataClusters = p.preallocate ? Math.ceil(p.size / cs) : 0;

  // The refcount structures count themselves: grow table and blocks until they cover everything.
  const perBlock = refcountBlockEntries(p.clusterBits, p.refcountOrder);
  const inFile = p.externalData ? 0 : dataClusters;
  const others = 1 + l1Clusters + l2Tables + inFile;
  let blocks = 1;
  let tableClusters = 1;
  for (;;) {
    const needBlocks = Math.ceil((others + tableClusters + blocks) / perBlock);
    const needTable = Math.ceil((needBlocks * 8) / cs);
    if (needBlocks <= blocks && needTable <= tableClusters) break;
    blocks = Math.max(blocks, needBlocks);
    tableClusters = Math.max(tableClusters, needTable);
  }
  if (tableClusters * cs > MAX_REFTABLE_BYTES)
    throw new QcowError('INVALID_ARGUMENT', 'The preallocated image needs a refcount table above 8 MiB (try using a larger cluster size or refcount width)', file);

  const refcountTableOffset = cs;
  const refcountBlockOffset = refcountTableOffset + tableClusters * cs;
  const l1Start = refcountBlockOffset + blocks * cs;
  const l2TableOffset = l1Start + l1Clusters * cs;
  const l2End = l2TableOffset + l2Tables * cs;
  const dataOffset = p.externalData ? 0 : l2End;
  const usedClusters = others + tableClusters + blocks;
  const fileLength = p.preallocate ? usedClusters * cs : l1Start + l1Size * 8;
  if (usedClusters * cs > MAX_HOST_OFFSET) throw new QcowError('INVALID_ARGUMENT', SIZE_TOO_LARGE, file);
  return {
    ...p,
    clusterSize: cs,
    l1Size,
    refcountTableOffset,
    refcountTableClusters: tableClusters,
    refcountBlockOffset,
    refcountBlocks: blocks,
    l1TableOffset: l1Size ? l1Start : 0,
    l1Clusters,
    l2TableOffset,
    l2Tables,
    dataOffset,
    dataClusters,
    usedClusters,
    tablesEnd: p.preallocate ? l2End : l1Start,
    fileLength,
  };
}

/**
 * Fills `buf` (zeroed by the caller) with the table bytes at host offsets
 * [offset, offset + buf.length) of the table area [clusterSize, tablesEnd): refcount
 * table, refcount blocks and, when preallocated, L1 and L2 entries. offset and buf.length must be
 * multiples of 16 (cluster-sized chunks are).
 */
export function fillMetadata(l: FreshLayout, offset: number, buf: Uint8Array): void {
  const v = dataView(buf);
  const end = offset + buf.length;
  // Writes entries [first, count) of an array of u64 offsets base + i * step at arrayStart.
  const offsets = (arrayStart: number, count: number, entryBytes: number, base: number, step: number, copied: boolean) => {
    const from = Math.max(0, Math.ceil((offset - arrayStart) / entryBytes));
    const to = Math.min(count, Math.floor((end - arrayStart) / entryBytes));
    const flag = copied ? COPIED_HI : 0;
    for (let i = from, at = arrayStart + from * entryBytes - offset; i < to; i++, at += entryBytes) {
      const value = base + i * step;
      v.setUint32(at, (Math.floor(value / TWO32) | flag) >>> 0);
      v.setUint32(at + 4, value >>> 0);
    }
  };
  offsets(l.refcountTableOffset, l.refcountBlocks, 8, l.refcountBlockOffset, l.clusterSize, false);
  fillRefcounts(buf, offset - l.refcountBlockOffset, l.usedClusters, l.refcountOrder);
  if (l.preallocate) {
    offsets(l.l1TableOffset, l.l1Size, 8, l.l2TableOffset, l.clusterSize, true);
    // Extended L2: the second word (subcluster bitmap) stays 0, as QEMU preallocates it.
    offsets(l.l2TableOffset, l.dataClusters, l.extendedL2 ? 16 : 8, l.dataOffset, l.clusterSize, true);
  }
}

/**
 * Sets refcount 1 for entries [0, ones) of a packed refcount array, of which `buf` holds the
 * bytes starting at byte `at` (may be negative or past the array: only the overlap is written).
 * Widths below 8 bits pack the lowest-numbered entry into the least significant bits.
 */
function fillRefcounts(buf: Uint8Array, at: number, ones: number, refcountOrder: number): void {
  const bits = 1 << refcountOrder;
  if (bits >= 8) {
    const entryBytes = bits / 8;
    const from = Math.max(0, Math.ceil(at / entryBytes));
    const to = Math.min(ones, Math.floor((at + buf.length) / entryBytes));
    for (let i = from; i < to; i++) buf[i * entryBytes + entryBytes - 1 - at] = 1;
    return;
  }
  const perByte = 8 / bits;
  let pattern = 0;
  for (let s = 0; s < perByte; s++) pattern |= 1 << (s * bits);
  const fullBytes = Math.floor(ones / perByte);
  const lo = Math.max(0, at);
  const hi = Math.min(fullBytes, at + buf.length);
  if (hi > lo) buf.fill(pattern, lo - at, hi - at);
  const rest = ones % perByte;
  if (rest && fullBytes >= at && fullBytes < at + buf.length) buf[fullBytes - at] = pattern & ((1 << (rest * bits)) - 1);
}
