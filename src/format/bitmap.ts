/** Pure decode/encode of the persistent bitmap directory and bitmap tables. */
import { QcowError } from '../errors.js';
import { dataView, decodeUtf8, setU64 } from './bytes.js';
import type { BitmapsExtension } from './header.js';
import { L2E_OFFSET_MASK } from './constants.js';

export const BME_FLAG_IN_USE = 1;
export const BME_FLAG_AUTO = 2;
export const BME_FLAG_EXTRA_DATA_COMPATIBLE = 4;
export const BITMAP_TYPE_DIRTY = 1;
export const BME_TABLE_OFFSET_MASK = L2E_OFFSET_MASK; // same bits 9..55 as L1/L2 entries
export const BME_TABLE_RESERVED_MASK = 0xff000000000001fen;

export interface BitmapDirectoryEntry {
  name: string;
  tableOffset: number;
  tableSize: number;
  flags: number;
  type: number;
  granularityBits: number;
  extraData: Uint8Array;
}

/** Number of bitmap table entries a bitmap of this granularity needs for the disk size. */
export function bitmapTableSize(diskSize: number, granularityBits: number, clusterSize: number): number {
  const bits = Math.ceil(diskSize / 2 ** granularityBits);
  return Math.ceil(Math.ceil(bits / 8) / clusterSize);
}

/** QEMU 7.2 limits (block/qcow2-bitmap.c): table entries, bytes of bitmap data, name length. */
const MAX_TABLE_ENTRIES = 0x8000000;
const MAX_PHYS_BYTES = 0x20000000;
const MAX_NAME = 1023;

/**
 * Decodes and validates the bitmap directory the way QEMU 7.2 does when it opens an image (it
 * refuses to open the image when any of this fails). `diskSize` is the virtual size (whole
 * 512-byte sectors). Bitmap tables are checked separately (validateBitmapTable).
 */
export function decodeBitmapDirectory(buf: Uint8Array, ext: BitmapsExtension, clusterSize: number, diskSize: number, file: string): BitmapDirectoryEntry[] {
  const v = dataView(buf);
  const out: BitmapDirectoryEntry[] = [];
  const names = new Set<string>();
  let off = 0;
  const bad = (msg: string) => new QcowError('CORRUPT', `Bitmap directory: ${msg}`, file);
  if (ext.directorySize === 0) throw bad('Requested bitmap directory size is zero');
  const end = Math.min(ext.directorySize, buf.length);
  while (off < end) {
    if (off + 24 > end) throw bad('Broken bitmap directory');
    if (out.length >= ext.nbBitmaps) throw bad('More bitmaps found than specified in header extension');
    const nameSize = v.getUint16(off + 18);
    const extraSize = v.getUint32(off + 20);
    const next = Math.ceil((off + 24 + extraSize + nameSize) / 8) * 8;
    if (next > end) throw bad('Broken bitmap directory');
    const rawOffset = v.getBigUint64(off);
    const e: BitmapDirectoryEntry = {
      tableOffset: Number(rawOffset),
      tableSize: v.getUint32(off + 8),
      flags: v.getUint32(off + 12),
      type: buf[off + 16]!,
      granularityBits: buf[off + 17]!,
      extraData: buf.slice(off + 24, off + 24 + extraSize),
      name: decodeUtf8(buf.subarray(off + 24 + extraSize, off + 24 + extraSize + nameSize)),
    };
    if (extraSize !== 0) throw bad(`Bitmap '${e.name}': Bitmap extra data is not supported`);
    const phys = e.tableSize * clusterSize;
    const violates =
      e.tableSize === 0 ||
      rawOffset === 0n ||
      rawOffset % BigInt(clusterSize) !== 0n ||
      e.tableSize > MAX_TABLE_ENTRIES ||
      e.granularityBits > 31 ||
      e.granularityBits < 9 ||
      (e.flags & ~(BME_FLAG_IN_USE | BME_FLAG_AUTO)) !== 0 ||
      nameSize > MAX_NAME ||
      e.type !== BITMAP_TYPE_DIRTY ||
      phys > MAX_PHYS_BYTES ||
      (!(e.flags & BME_FLAG_IN_USE) && diskSize > phys * 8 * 2 ** e.granularityBits);
    if (violates) throw bad(`Bitmap '${e.name}' doesn't satisfy the constraints`);
    // QEMU creates the in-memory bitmaps by name: a repeated name fails the open.
    if (names.has(e.name)) throw bad(`Bitmap already exists: ${e.name}`);
    names.add(e.name);
    // Loading a bitmap that is not in use needs a table of exactly the right size.
    if (!(e.flags & BME_FLAG_IN_USE) && e.tableSize !== bitmapTableSize(diskSize, e.granularityBits, clusterSize))
      throw bad(`Could not read bitmap '${e.name}' from image: table size does not match the disk size`);
    out.push(e);
    off = next;
  }
  if (out.length !== ext.nbBitmaps) throw bad('Less bitmaps found than specified in header extension');
  if (off !== ext.directorySize) throw bad('Broken bitmap directory');
  return out;
}

/**
 * Checks the entries of a bitmap table as QEMU does when it loads a bitmap that is not in use
 * (the image is refused otherwise): no reserved bits, data offsets cluster aligned, and the
 * "all ones" bit only on entries without a data cluster.
 */
export function validateBitmapTable(buf: Uint8Array, entry: BitmapDirectoryEntry, clusterSize: number, file: string): void {
  const v = dataView(buf);
  const cs = BigInt(clusterSize);
  for (let i = 0; i < entry.tableSize; i++) {
    const e = v.getBigUint64(i * 8);
    const offset = e & BME_TABLE_OFFSET_MASK;
    if (e & BME_TABLE_RESERVED_MASK || (offset !== 0n && (e & 1n || offset % cs !== 0n)))
      throw new QcowError('CORRUPT', `Could not read bitmap_table table from image for bitmap '${entry.name}': entry ${i} (0x${e.toString(16)}) is invalid`, file);
  }
}

export function encodeBitmapDirectory(entries: BitmapDirectoryEntry[]): Uint8Array {
  const enc = new TextEncoder();
  const names = entries.map((e) => enc.encode(e.name));
  let total = 0;
  entries.forEach((e, i) => (total += Math.ceil((24 + e.extraData.length + names[i]!.length) / 8) * 8));
  const buf = new Uint8Array(total);
  const v = dataView(buf);
  let off = 0;
  entries.forEach((e, i) => {
    setU64(v, off, e.tableOffset);
    v.setUint32(off + 8, e.tableSize);
    v.setUint32(off + 12, e.flags);
    buf[off + 16] = e.type;
    buf[off + 17] = e.granularityBits;
    v.setUint16(off + 18, names[i]!.length);
    v.setUint32(off + 20, e.extraData.length);
    buf.set(e.extraData, off + 24);
    buf.set(names[i]!, off + 24 + e.extraData.length);
    off += Math.ceil((24 + e.extraData.length + names[i]!.length) / 8) * 8;
  });
  return buf;
}
