/**
 * Compaction: moves the metadata that survives an emptied image (refcount table and blocks, the
 * L1 table, the snapshot table and snapshots' L1 tables, the bitmap directory, bitmap tables and
 * bitmap data) into the lowest free clusters, and drops refcount blocks that describe nothing in
 * use, so the file can then be cut short.
 *
 * Every move is copy, switch, free: the copy is written to newly counted clusters and made
 * durable, one pointer write (a header field, a table entry, a directory field) switches to it
 * durably, and only then is the old place released. The on-disk tree is valid at every instant.
 * L2 tables and data clusters that snapshots still reference stay where they are.
 */
import { throwIfAborted } from '../errors.js';
import { dataView } from '../format/bytes.js';
import { kernels } from '../kernels/index.js';
import type { Qcow2Image } from './image.js';
import type { Qcow2Writer } from './writer.js';
import { L2E_OFFSET_MASK } from '../format/constants.js';

/** A contiguous structure with one pointer to it. */
interface Movable {
  offset: number;
  bytes: number;
  /** Durably points the one reference at the copy at `to`. */
  repoint(to: number): Promise<void>;
  /** Reads the current content (default: the file). */
  read?(): Promise<Uint8Array>;
}

const MAX_MOVES = 100_000;

export async function compactImage(img: Qcow2Image, w: Qcow2Writer, opts: { signal?: AbortSignal | undefined } = {}): Promise<void> {
  const cs = img.clusterSize;
  for (let moves = 0; moves < MAX_MOVES; moves++) {
    throwIfAborted(opts.signal, img.path);
    // Farthest first: what goes frees the tail the truncation will cut. Pointers of the other
    // items may live in what just moved, so they are collected again after every move.
    const items = (await movables(img, w)).sort((a, b) => b.offset - a.offset);
    let item: Movable | undefined;
    for (const it of items) {
      if ((await w.allocator.peekRun(Math.ceil(it.bytes / cs))) * cs < it.offset) {
        item = it;
        break;
      }
    }
    if (!item) break;
    const clusters = Math.ceil(item.bytes / cs);
    const [run] = await w.allocator.allocate(clusters, { contiguous: true });
    const to = run!.first * cs;
    // The refcounts of the copy (and anything the move counts) are durable before the switch.
    await w.refcountCache.flush();
    const data = item.read ? await item.read() : await readAt(img, item.offset, clusters * cs);
    // Trailing zeroes stay holes (a bitmap table of a clean bitmap is all zeroes): the copy takes
    // no more disk than a freshly written structure.
    const used = Math.ceil((lastNonZero(data) + 1) / 4096) * 4096;
    if (used) await img.file.writeAt(data.subarray(0, Math.min(used, data.length)), to);
    if (used < clusters * cs) await img.file.punchHole(to + used, clusters * cs - used).catch(() => {});
    img.noteFileEnd(to + clusters * cs);
    await img.file.flush();
    await item.repoint(to);
    await w.refcounts.update(item.offset / cs, clusters, -1);
    await w.flush(); // the old place is free for the next move
  }
  // Blocks that describe nothing in use, then a table no bigger than needed, as low as it goes.
  for (const { ti } of w.refcounts.blockList().reverse()) {
    if (ti === 0) continue;
    await w.refcounts.dropIdleBlock(ti);
  }
  const clusters = w.refcounts.neededTableClusters();
  const current = w.refcounts.tableOffset;
  if (clusters < w.refcounts.tableClusters || (await w.allocator.peekRun(clusters)) * cs < current) {
    const [run] = await w.allocator.allocate(clusters, { contiguous: true });
    if (run!.first * cs < current || clusters < w.refcounts.tableClusters) await w.refcounts.moveTable(run!.first * cs, clusters);
    else await w.refcounts.update(run!.first, clusters, -1);
  }
  await w.flush();
}

function lastNonZero(b: Uint8Array): number {
  const k = kernels();
  const ptr = k.alloc(b.length);
  try {
    k.u8(ptr, b.length).set(b);
    for (let end = b.length; end > 0; ) {
      const from = Math.max(0, end - 65536);
      const first = k.firstNonZero(ptr + from, end - from);
      if (first >= 0) {
        let i = end - 1;
        while (b[i] === 0) i--; // within the last non-zero 64 KiB window
        return i;
      }
      end = from;
    }
    return -1;
  } finally {
    k.free(ptr);
  }
}

async function readAt(img: Qcow2Image, offset: number, length: number): Promise<Uint8Array> {
  const buf = new Uint8Array(length);
  await img.file.readAt(buf, offset);
  return buf;
}

/** Writes an 8-byte big-endian pointer field (keeping the bits outside `mask`), durably. */
async function writePointer(img: Qcow2Image, at: number, value: number, keepMask = 0n): Promise<void> {
  const buf = new Uint8Array(8);
  await img.file.readAt(buf, at);
  const v = dataView(buf);
  const old = v.getBigUint64(0);
  v.setBigUint64(0, (old & keepMask) | BigInt(value));
  await img.file.writeAt(buf, at);
  await img.file.flush();
}

async function movables(img: Qcow2Image, w: Qcow2Writer): Promise<Movable[]> {
  const h = img.header;
  const cs = img.clusterSize;
  const out: Movable[] = [];
  // The L1 table.
  if (h.l1TableOffset && h.l1Size)
    out.push({ offset: h.l1TableOffset, bytes: h.l1Size * 8, repoint: (to) => w.header.setL1Table(to, h.l1Size) });
  // Refcount blocks (their cached copy is current: flushed before the copy is read).
  for (const { ti, offset } of w.refcounts.blockList()) {
    out.push({
      offset,
      bytes: cs,
      read: async () => {
        await w.refcountCache.flush();
        return readAt(img, offset, cs);
      },
      repoint: (to) => w.refcounts.repointBlock(ti, offset, to),
    });
  }
  // The snapshot table and each snapshot's L1 table.
  if (h.nbSnapshots && h.snapshotsOffset) {
    out.push({ offset: h.snapshotsOffset, bytes: img.snapshotTableBytes, repoint: (to) => w.header.setSnapshotTable(h.nbSnapshots, to) });
    let pos = 0;
    for (const s of img.snapshots) {
      const entryAt = pos;
      if (s.l1TableOffset && s.l1Size)
        out.push({
          offset: s.l1TableOffset,
          bytes: s.l1Size * 8,
          repoint: async (to) => {
            await writePointer(img, h.snapshotsOffset + entryAt, to);
            s.l1TableOffset = to;
          },
        });
      pos += Math.ceil((40 + s.extraData.length + new TextEncoder().encode(s.id).length + new TextEncoder().encode(s.name).length) / 8) * 8;
    }
  }
  // Bitmaps: the directory, each bitmap's table and the bitmap data clusters it points to.
  if (h.bitmaps && h.bitmaps.nbBitmaps) {
    const dir = h.bitmaps;
    out.push({ offset: dir.directoryOffset, bytes: dir.directorySize, repoint: (to) => w.header.setBitmapDirectory(to) });
    let pos = 0;
    for (const b of img.bitmaps) {
      const entryAt = pos;
      out.push({
        offset: b.tableOffset,
        bytes: b.tableSize * 8,
        repoint: async (to) => {
          await writePointer(img, dir.directoryOffset + entryAt, to);
          b.tableOffset = to;
        },
      });
      const table = await readAt(img, b.tableOffset, b.tableSize * 8);
      const tv = dataView(table);
      for (let j = 0; j < b.tableSize; j++) {
        const entry = tv.getBigUint64(j * 8);
        const off = Number(entry & L2E_OFFSET_MASK);
        if (!off) continue;
        const tableOffset = b.tableOffset;
        out.push({ offset: off, bytes: cs, repoint: (to) => writePointer(img, tableOffset + j * 8, to, ~L2E_OFFSET_MASK & 0xffffffffffffffffn) });
      }
      pos += Math.ceil((24 + b.extraData.length + new TextEncoder().encode(b.name).length) / 8) * 8;
    }
  }
  return out;
}
