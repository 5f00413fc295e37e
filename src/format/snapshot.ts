/** Pure decode/encode of the internal snapshot table. */
import { QcowError } from '../errors.js';
import { dataView, decodeUtf8, setU64, u64 } from './bytes.js';

export interface SnapshotEntry {
  l1TableOffset: number;
  /** The field exactly, when it does not fit a double (>= 2^53; only a corrupt table has that). */
  l1TableOffsetExact?: bigint | undefined;
  l1Size: number;
  id: string;
  name: string;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number;
  vmStateSize: number;
  diskSize: number | undefined;
  icount: number | undefined;
  /** Extra data bytes as stored (unknown parts are kept on rewrite). */
  extraData: Uint8Array;
}

const MAX_EXTRA = 1024;

/** Decodes `count` entries from the table bytes; returns entries and the table's byte length. */
export function decodeSnapshotTable(buf: Uint8Array, count: number, file: string): { entries: SnapshotEntry[]; bytes: number } {
  const v = dataView(buf);
  const entries: SnapshotEntry[] = [];
  let off = 0;
  const bad = (msg: string) => new QcowError('CORRUPT', `Snapshot table: ${msg}`, file);
  for (let i = 0; i < count; i++) {
    if (off + 40 > buf.length) throw bad('entry lies past the end of the file');
    const extraSize = v.getUint32(off + 36);
    const idLen = v.getUint16(off + 12);
    const nameLen = v.getUint16(off + 14);
    if (extraSize > MAX_EXTRA) throw bad(`too much extra metadata in snapshot ${i}`);
    const end = off + 40 + extraSize + idLen + nameLen;
    if (end > buf.length) throw bad('entry lies past the end of the file');
    const extra = buf.slice(off + 40, off + 40 + extraSize);
    const ev = dataView(extra);
    const e: SnapshotEntry = {
      l1TableOffset: u64(v, off),
      l1Size: v.getUint32(off + 8),
      dateSec: v.getUint32(off + 16),
      dateNsec: v.getUint32(off + 20),
      vmClockNsec: u64(v, off + 24),
      vmStateSize: extraSize >= 8 ? u64(ev, 0) : v.getUint32(off + 32),
      diskSize: extraSize >= 16 ? u64(ev, 8) : undefined,
      icount: extraSize >= 24 ? (ev.getBigInt64(16) === -1n ? undefined : Number(ev.getBigInt64(16))) : undefined,
      extraData: extra,
      id: decodeUtf8(buf.subarray(off + 40 + extraSize, off + 40 + extraSize + idLen)),
      name: decodeUtf8(buf.subarray(off + 40 + extraSize + idLen, end)),
    };
    // As QEMU 7.2, opening accepts entries with an unaligned or oversized L1 table and v3 entries
    // without the disk size (then the current disk size): `check` reports them as corruptions.
    const exact = v.getBigUint64(off);
    if (exact >= 2n ** 53n) e.l1TableOffsetExact = exact;
    entries.push(e);
    off = Math.ceil(end / 8) * 8;
    if (off > MAX_SNAPSHOT_TABLE_BYTES) throw bad('Snapshot table is too big');
  }
  return { entries, bytes: off };
}

/** Upper bound used to read the table: QEMU caps it at 64 MiB. */
export const MAX_SNAPSHOT_TABLE_BYTES = 64 * 1024 * 1024;

export function encodeSnapshotTable(entries: SnapshotEntry[]): Uint8Array {
  const enc = new TextEncoder();
  const parts = entries.map((e) => ({ e, id: enc.encode(e.id), name: enc.encode(e.name) }));
  let total = 0;
  for (const p of parts) total += Math.ceil((40 + p.e.extraData.length + p.id.length + p.name.length) / 8) * 8;
  const buf = new Uint8Array(total);
  const v = dataView(buf);
  let off = 0;
  for (const { e, id, name } of parts) {
    setU64(v, off, e.l1TableOffset);
    v.setUint32(off + 8, e.l1Size);
    v.setUint16(off + 12, id.length);
    v.setUint16(off + 14, name.length);
    v.setUint32(off + 16, e.dateSec);
    v.setUint32(off + 20, e.dateNsec);
    setU64(v, off + 24, e.vmClockNsec);
    v.setUint32(off + 32, e.vmStateSize > 0xffffffff ? 0 : e.vmStateSize);
    v.setUint32(off + 36, e.extraData.length);
    buf.set(e.extraData, off + 40);
    buf.set(id, off + 40 + e.extraData.length);
    buf.set(name, off + 40 + e.extraData.length + id.length);
    off += Math.ceil((40 + e.extraData.length + id.length + name.length) / 8) * 8;
  }
  return buf;
}
