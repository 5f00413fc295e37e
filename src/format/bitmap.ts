/** Pure decode/encode of the persistent bitmap directory and bitmap tables. */
import { QcowError } from '../errors.js';
import { dataView, decodeUtf8, isAligned, setU64, u64 } from './bytes.js';
import type { BitmapsExtension } from './header.js';

export const BME_FLAG_IN_USE = 1;
export const BME_FLAG_AUTO = 2;
export const BME_FLAG_EXTRA_DATA_COMPATIBLE = 4;
export const BITMAP_TYPE_DIRTY = 1;
export const BME_TABLE_OFFSET_MASK = 0x00fffffffffffe00n;
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

export function decodeBitmapDirectory(buf: Uint8Array, ext: BitmapsExtension, clusterSize: number, diskSize: number, file: string): BitmapDirectoryEntry[] {
  const v = dataView(buf);
  const out: BitmapDirectoryEntry[] = [];
  const names = new Set<string>();
  let off = 0;
  const bad = (msg: string) => new QcowError('CORRUPT', `Bitmap directory: ${msg}`, file);
  while (off < ext.directorySize) {
    if (out.length >= ext.nbBitmaps) throw bad('More bitmaps found than specified in header extension');
    if (off + 24 > buf.length) throw bad('entry lies past the end of the directory');
    const nameSize = v.getUint16(off + 18);
    const extraSize = v.getUint32(off + 20);
    const end = off + 24 + extraSize + nameSize;
    if (end > buf.length) throw bad('entry lies past the end of the directory');
    const e: BitmapDirectoryEntry = {
      tableOffset: u64(v, off),
      tableSize: v.getUint32(off + 8),
      flags: v.getUint32(off + 12),
      type: buf[off + 16]!,
      granularityBits: buf[off + 17]!,
      extraData: buf.slice(off + 24, off + 24 + extraSize),
      name: decodeUtf8(buf.subarray(off + 24 + extraSize, end)),
    };
    if (nameSize === 0 || nameSize > 1023) throw bad(`invalid name length of bitmap ${out.length}`);
    if (names.has(e.name)) throw bad(`duplicate bitmap name '${e.name}'`);
    names.add(e.name);
    if (e.type !== BITMAP_TYPE_DIRTY) throw bad(`Bitmap '${e.name}' has an unknown type`);
    if (e.granularityBits < 9 || e.granularityBits > 31) throw bad(`Bitmap '${e.name}' has an unsupported granularity`);
    if (e.flags & ~(BME_FLAG_IN_USE | BME_FLAG_AUTO)) throw bad(`Bitmap '${e.name}' doesn't satisfy the constraints`);
    if (extraSize !== 0) throw bad(`Bitmap '${e.name}': Bitmap extra data is not supported`);
    if (!e.tableOffset || !isAligned(e.tableOffset, clusterSize)) throw bad(`Bitmap '${e.name}' has an invalid table offset`);
    const expected = bitmapTableSize(diskSize, e.granularityBits, clusterSize);
    if (!(e.flags & BME_FLAG_IN_USE) && e.tableSize !== expected) throw bad(`Bitmap '${e.name}' doesn't satisfy the constraints`);
    if (e.tableSize > 2 ** 27) throw bad(`Bitmap '${e.name}' is too large`);
    out.push(e);
    off = Math.ceil(end / 8) * 8;
  }
  if (off !== ext.directorySize) throw bad('directory size does not match its entries');
  if (out.length !== ext.nbBitmaps) throw bad('Less bitmaps found than specified in header extension');
  return out;
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
