/**
 * Reading the internal snapshot table as QEMU 7.2 does (block/qcow2-snapshot.c), in two modes:
 *
 * - plain open (info, map, reads): only what QEMU itself refuses on open is refused — an entry
 *   with more than 1 KiB of extra data, a table longer than 64 MiB. Entries with an unaligned or
 *   oversized L1 table, or v3 entries without the disk-size extra data, open fine (QEMU complains
 *   only when such a snapshot is used, and `check` reports them);
 * - repair (`check -r all`): oversized extra data is cut to 1 KiB and entries past the 64 MiB
 *   limit are dropped off the end, so the good snapshots survive; the caller rewrites the table.
 *
 * Entries are read one field at a time at QEMU's offsets (an entry starts on an 8-byte boundary;
 * unknown extra data is skipped over in full even when truncated), so `bytes` — the extent the
 * table occupies in the file — is the range QEMU accounts for in its refcount check.
 */
import type { ImageFile } from '../io/file.js';
import { dataView, decodeUtf8, u64 } from '../format/bytes.js';
import type { SnapshotEntry } from '../format/snapshot.js';

/** QCOW_MAX_SNAPSHOT_EXTRA_DATA */
export const MAX_SNAPSHOT_EXTRA = 1024;
/** QCOW_MAX_SNAPSHOTS_SIZE: 64 MiB of table. */
export const MAX_SNAPSHOTS_SIZE = 1024 * 65536;
/** QCOW_MAX_SNAPSHOTS */
export const MAX_SNAPSHOTS = 65536;
const ENTRY_HEADER = 40;
/** sizeof(QCowSnapshotExtraData) in QEMU 7.2 (VM state size, disk size, icount). */
const KNOWN_EXTRA = 24;
const INT_MAX = 2 ** 31 - 1;

/** The table could not be read (QEMU's error, its hint, and the errno text `check` ends with). */
export class SnapshotTableError extends Error {
  constructor(
    message: string,
    readonly hint: string,
    readonly errnoText: string,
  ) {
    super(message);
    this.name = 'SnapshotTableError';
  }
}

export interface SnapshotTable {
  entries: SnapshotEntry[];
  /** Bytes from the table offset to the end of the last entry read (QEMU's snapshots_size). */
  bytes: number;
  /** Repair mode: snapshots dropped off the end (the header count must shrink by this much). */
  reduced: number;
  /** Repair mode: entries whose extra data was cut to 1 KiB (the table must be rewritten). */
  extraDropped: number;
}

/** QEMU keeps ID and name as C strings: they end at the first NUL byte. */
function cString(b: Uint8Array): string {
  const end = b.indexOf(0);
  return decodeUtf8(end < 0 ? b : b.subarray(0, end));
}

/**
 * Reads through a window that never extends past the cluster holding the last byte asked for:
 * the clusters after the table may be data clusters, and reading a host-file hole can make the
 * filesystem report it as data afterwards (ext4 and unwritten extents), which `map` would see.
 */
class WindowReader {
  #start = 0;
  #buf = new Uint8Array(0);
  constructor(
    private readonly file: ImageFile,
    private readonly clusterSize: number,
  ) {}

  async read(offset: number, length: number): Promise<Uint8Array> {
    if (offset >= this.#start && offset + length <= this.#start + this.#buf.length) return this.#buf.subarray(offset - this.#start, offset - this.#start + length);
    const end = Math.max(offset + length, Math.min(offset + (1 << 20), Math.ceil((offset + length) / this.clusterSize) * this.clusterSize));
    this.#start = offset;
    this.#buf = new Uint8Array(end - offset);
    await this.file.readAt(this.#buf, offset);
    return this.#buf.subarray(0, length);
  }
}

/**
 * Reads `count` entries from `tableOffset` (an entry without the disk-size extra data gets
 * diskSize undefined). `report` receives QEMU's repair notices.
 */
export async function readSnapshotTable(
  file: ImageFile,
  tableOffset: number,
  count: number,
  clusterSize: number,
  opts: { repair?: boolean; report?: (line: string) => void } = {},
): Promise<SnapshotTable> {
  const repair = opts.repair === true;
  const report = opts.report ?? (() => {});
  const r = new WindowReader(file, clusterSize);
  const entries: SnapshotEntry[] = [];
  let offset = tableOffset;
  let tableLength = 0;
  let reduced = 0;
  let extraDropped = 0;
  for (let i = 0; i < count; i++) {
    const preOffset = offset;
    tableLength = Math.ceil(tableLength / 8) * 8;
    offset = Math.ceil(offset / 8) * 8;
    const h = dataView((await r.read(offset, ENTRY_HEADER)).slice());
    offset += ENTRY_HEADER;
    let extraSize = h.getUint32(36);
    const idLen = h.getUint16(12);
    const nameLen = h.getUint16(14);
    let truncate = false;
    if (extraSize > MAX_SNAPSHOT_EXTRA) {
      if (!repair)
        throw new SnapshotTableError(`Too much extra metadata in snapshot table entry ${i}`, 'You can force-remove this extra metadata with qemu-img check -r all', 'File too large');
      report(`Discarding too much extra metadata in snapshot table entry ${i} (${extraSize} > ${MAX_SNAPSHOT_EXTRA})`);
      extraDropped++;
      truncate = true;
    }
    const known = (await r.read(offset, Math.min(KNOWN_EXTRA, extraSize))).slice();
    offset += known.length;
    let unknown = new Uint8Array(0);
    if (extraSize > KNOWN_EXTRA) {
      const extraEnd = offset + extraSize - KNOWN_EXTRA;
      if (truncate) extraSize = MAX_SNAPSHOT_EXTRA;
      unknown = (await r.read(offset, extraSize - KNOWN_EXTRA)).slice();
      offset = extraEnd;
    }
    const id = cString(await r.read(offset, idLen));
    offset += idLen;
    const name = cString(await r.read(offset, nameLen));
    offset += nameLen;

    tableLength += ENTRY_HEADER + extraSize + idLen + nameLen;
    if (tableLength > MAX_SNAPSHOTS_SIZE || offset - tableOffset > INT_MAX) {
      if (!repair)
        throw new SnapshotTableError('Snapshot table is too big', `You can force-remove all ${count - i} overhanging snapshots with qemu-img check -r all`, 'File too large');
      report(`Discarding ${count - i} overhanging snapshots (snapshot table is too big)`);
      reduced += count - i;
      offset = preOffset;
      break;
    }

    const extra = new Uint8Array(known.length + unknown.length);
    extra.set(known);
    extra.set(unknown, known.length);
    const ev = dataView(extra);
    const exact = h.getBigUint64(0);
    entries.push({
      l1TableOffset: u64(h, 0),
      ...(exact >= 2n ** 53n ? { l1TableOffsetExact: exact } : {}),
      l1Size: h.getUint32(8),
      id,
      name,
      dateSec: h.getUint32(16),
      dateNsec: h.getUint32(20),
      vmClockNsec: u64(h, 24),
      vmStateSize: extra.length >= 8 ? u64(ev, 0) : h.getUint32(32),
      diskSize: extra.length >= 16 ? u64(ev, 8) : undefined,
      icount: extra.length >= 24 ? (ev.getBigInt64(16) === -1n ? undefined : Number(ev.getBigInt64(16))) : undefined,
      extraData: extra,
    });
  }
  return { entries, bytes: offset - tableOffset, reduced, extraDropped };
}
