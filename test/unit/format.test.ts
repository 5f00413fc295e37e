import { describe, expect, it } from 'vitest';
import { decodeHeader, encodeHeader, minL1Size, type NewHeaderSpec } from '../../src/format/header.js';
import { decodeL1Table, decodeRefcountTable, getRefcount, setRefcount, decodeCompressed, refcountBlockEntries } from '../../src/format/tables.js';
import { decodeSnapshotTable, encodeSnapshotTable, type SnapshotEntry } from '../../src/format/snapshot.js';
import { decodeBitmapDirectory, encodeBitmapDirectory, bitmapTableSize } from '../../src/format/bitmap.js';
import { QcowError } from '../../src/errors.js';

const base: NewHeaderSpec = {
  version: 3,
  clusterBits: 16,
  size: 1 << 30,
  l1Size: 2,
  l1TableOffset: 3 * 65536,
  refcountTableOffset: 65536,
  refcountTableClusters: 1,
  refcountOrder: 4,
  incompatibleFeatures: 0n,
  compatibleFeatures: 0n,
  autoclearFeatures: 0n,
  compressionType: 0,
};

function roundTrip(spec: NewHeaderSpec, fileSize = 4 * 65536) {
  const bytes = encodeHeader(spec, 'x');
  const cluster = new Uint8Array(2 ** spec.clusterBits);
  cluster.set(bytes);
  return { bytes, h: decodeHeader(cluster, fileSize, 'x') };
}

function errorOf(fn: () => unknown): QcowError {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(QcowError);
    return e as QcowError;
  }
  throw new Error('expected an error');
}

describe('header', () => {
  it('round-trips a v3 header with backing file, format and feature table like QEMU lays it out', () => {
    const { bytes, h } = roundTrip({ ...base, backingFile: 'base.qcow2', backingFormat: 'qcow2' });
    expect(h.version).toBe(3);
    expect(h.headerLength).toBe(112);
    expect(h.backingFile).toBe('base.qcow2');
    expect(h.backingFormat).toBe('qcow2');
    expect(h.featureNames.map((f) => f.name)).toContain('extended L2 entries');
    // QEMU: format ext at 112 (16 B), feature table at 128 (392 B), terminator at 520, name at 528.
    expect(h.backingFileOffset).toBe(528);
    expect(bytes.length).toBe(538);
  });

  it('omits the feature table for clusters of 4 KiB or less', () => {
    const { h } = roundTrip({ ...base, size: 1 << 28, clusterBits: 9, l1Size: 8192, l1TableOffset: 3 * 512, refcountTableOffset: 512, backingFile: 'b', backingFormat: 'raw' }, 3 * 512 + 8192 * 8);
    expect(h.featureNames).toEqual([]);
    expect(h.backingFileOffset).toBe(0x88);
  });

  it('round-trips v2 (72-byte header, refcount order 4)', () => {
    const { h } = roundTrip({ ...base, version: 2 });
    expect(h.headerLength).toBe(72);
    expect(h.refcountOrder).toBe(4);
    expect(h.incompatibleFeatures).toBe(0n);
  });

  it('rejects bad magic, versions, cluster sizes and tables past EOF with clear messages', () => {
    const { bytes } = roundTrip(base);
    const c = new Uint8Array(65536);
    c.set(bytes);
    const mut = (f: (v: DataView) => void) => {
      const b = c.slice();
      f(new DataView(b.buffer));
      return b;
    };
    expect(errorOf(() => decodeHeader(new Uint8Array(10), 10, 'f')).code).toBe('NOT_QCOW2');
    expect(errorOf(() => decodeHeader(mut((v) => v.setUint32(0, 0x12345678)), 1 << 18, 'f')).message).toMatch(/not in qcow2 format/);
    expect(errorOf(() => decodeHeader(mut((v) => v.setUint32(4, 4)), 1 << 18, 'f')).message).toMatch(/Unsupported qcow2 version 4/);
    expect(errorOf(() => decodeHeader(mut((v) => v.setUint32(20, 22)), 1 << 18, 'f')).message).toMatch(/cluster size/);
    expect(errorOf(() => decodeHeader(mut((v) => v.setUint32(20, 8)), 1 << 18, 'f')).message).toMatch(/cluster size/);
    expect(errorOf(() => decodeHeader(c, 3 * 65536 + 4, 'f')).message).toMatch(/L1 table lies past the end/);
    expect(errorOf(() => decodeHeader(mut((v) => v.setUint32(36, 1)), 1 << 18, 'f')).message).toMatch(/L1 table is too small/);
    expect(errorOf(() => decodeHeader(mut((v) => v.setUint32(56, 0)), 1 << 18, 'f')).message).toMatch(/reference count table/);
    expect(errorOf(() => decodeHeader(mut((v) => v.setUint32(96, 7)), 1 << 18, 'f')).message).toMatch(/width too large/);
    expect(errorOf(() => decodeHeader(mut((v) => v.setBigUint64(72, 1n << 7n)), 1 << 18, 'f')).message).toMatch(/Unknown incompatible feature: 80/);
    expect(errorOf(() => decodeHeader(mut((v) => v.setUint32(44, 0x10001)), 1 << 18, 'f')).message).toMatch(/L1 table offset invalid/);
  });

  it('names known incompatible features from the feature table', () => {
    const { bytes } = roundTrip(base);
    const c = new Uint8Array(65536);
    c.set(bytes);
    new DataView(c.buffer).setBigUint64(72, (1n << 4n) | (1n << 9n));
    expect(errorOf(() => decodeHeader(c, 1 << 18, 'f')).message).toBe('Unsupported qcow2 feature(s): Unknown incompatible feature: 200');
  });

  it('reads the feature-name table as QEMU does: short entries padded, table order, an empty name ends it', () => {
    const withTable = (bits: bigint, table: number[]) => {
      const c = new Uint8Array(65536);
      c.set(encodeHeader(base, 'x'));
      const v = new DataView(c.buffer);
      v.setBigUint64(72, bits);
      const at = v.getUint32(100); // the first extension (the feature table qcowkit writes is replaced)
      v.setUint32(at, 0x6803f857);
      v.setUint32(at + 4, table.length);
      c.set(table, at + 8);
      c.fill(0, at + 8 + table.length, at + 16 + Math.ceil(table.length / 8) * 8);
      return errorOf(() => decodeHeader(c, 1 << 18, 'f')).message.replace('Unsupported qcow2 feature(s): ', '');
    };
    const entry = (type: number, bit: number, name: string, pad = true) => [type, bit, ...Buffer.from(name), ...(pad ? new Array(46 - name.length).fill(0) : [])];
    expect(withTable(1n << 63n, entry(0, 63, 'Test feature', false))).toBe('Test feature');
    expect(withTable(3n << 61n, [...entry(0, 62, 'b'), ...entry(0, 61, 'a')])).toBe('b, a');
    expect(withTable(7n << 61n, [...entry(0, 61, 'x'), ...entry(0, 62, ''), ...entry(0, 63, 'y')])).toBe('x, Unknown incompatible feature: c000000000000000');
    expect(withTable(1n << 63n, [...entry(2, 63, 'autoclear'), ...entry(0, 127, 'wide')])).toBe('wide');
  });

  it('refuses a size needing more than INT_MAX L1 entries as QEMU does ("Image is too big")', () => {
    const c = new Uint8Array(65536);
    c.set(encodeHeader(base, 'x'));
    new DataView(c.buffer).setBigUint64(24, 1n << 60n);
    expect(errorOf(() => decodeHeader(c, 1 << 18, 'f')).message).toBe('Image is too big');
  });

  it('computes the minimum L1 size', () => {
    expect(minL1Size(1 << 30, 16, false)).toBe(2);
    expect(minL1Size(1 << 30, 16, true)).toBe(4);
    expect(minL1Size(1, 9, false)).toBe(1);
  });
});

describe('tables', () => {
  it('decodes L1 entries with COPIED, ignores reserved bits as QEMU and flags unaligned ones', () => {
    const b = new Uint8Array(32);
    const v = new DataView(b.buffer);
    v.setBigUint64(0, (1n << 63n) | 0x50000n);
    v.setBigUint64(8, 0n);
    v.setBigUint64(16, (1n << 60n) | 0x50001n); // reserved bits: masked, as QEMU does
    v.setBigUint64(24, 0x58000n); // unaligned for 64 KiB clusters
    const t = decodeL1Table(b, 4, 65536);
    expect([...t.offsets]).toEqual([0x50000, 0, 0x50000, 0]);
    expect([...t.copied]).toEqual([1, 0, 0, 0]);
    expect(t.invalid).toEqual([3]);
    const r = decodeRefcountTable(b.subarray(0, 16), 2, 65536);
    expect(r.invalid).toEqual([0]); // bit 63 is part of a refcount table offset: far past 2^53
  });

  it('decodes long, mostly empty tables the same as entry by entry (empty blocks skipped, entries at block edges, an odd tail)', () => {
    const n = 64 * 5 + 37;
    const b = new Uint8Array(n * 8);
    const v = new DataView(b.buffer);
    // Entries on the first and last index of blocks, in the tail, and invalid ones among empties.
    const set: Array<[number, bigint]> = [
      [0, 0x10000n], [63, (1n << 63n) | 0x20000n], [64, 0x30001n], [191, 0x40000n], [192, 0x50000n],
      [255, 1n << 55n], [320, 0x60000n], [n - 1, (1n << 63n) | 0x70000n],
    ];
    for (const [i, x] of set) v.setBigUint64(i * 8, x);
    for (const l1 of [true, false]) {
      const t = l1 ? decodeL1Table(b, n, 65536) : decodeRefcountTable(b, n, 65536);
      const offsets = new Array<number>(n).fill(0);
      const copied = new Array<number>(n).fill(0);
      const invalid: number[] = [];
      for (const [i, x] of set) {
        // L1: COPIED apart, the offset bits 9..55 (others ignored, as QEMU masks them).
        const raw = l1 ? x & 0x00ff_ffff_ffff_fe00n : x;
        if (l1) copied[i] = Number(x >> 63n);
        if ((!l1 && raw & 0x1ffn) || raw % 65536n !== 0n || raw >= 1n << 53n) invalid.push(i);
        else offsets[i] = Number(raw);
      }
      expect([...t.offsets], `l1 ${l1}`).toEqual(offsets);
      if (l1) expect([...t.copied]).toEqual(copied);
      expect(t.invalid, `l1 ${l1}`).toEqual(invalid);
    }
  });

  it('packs refcounts of every width as QEMU does', () => {
    for (let order = 0; order <= 6; order++) {
      const block = new Uint8Array(512);
      const n = refcountBlockEntries(9, order);
      const max = order === 6 ? 2 ** 53 - 1 : 2 ** (1 << order) - 1;
      const vals = Array.from({ length: n }, (_, i) => (i * 7919) % (max + 1));
      vals.forEach((x, i) => setRefcount(block, i, order, x));
      vals.forEach((x, i) => expect(getRefcount(block, i, order)).toBe(x));
    }
    const b4 = new Uint8Array(4);
    setRefcount(b4, 0, 2, 1);
    setRefcount(b4, 1, 2, 1);
    expect(b4[0]).toBe(0x11);
    const b1 = new Uint8Array(1);
    for (let i = 0; i < 4; i++) setRefcount(b1, i, 0, 1);
    expect(b1[0]).toBe(0x0f);
  });

  it('decodes compressed descriptors', () => {
    expect(decodeCompressed(0x40400000, 0x000501da, 16)).toEqual({ offset: 0x501da, length: 550 });
  });
});

describe('snapshot table and bitmap directory', () => {
  it('round-trips snapshot entries, keeping extra data', () => {
    const extra = new Uint8Array(24);
    new DataView(extra.buffer).setBigUint64(8, 1n << 30n);
    const e: SnapshotEntry = { l1TableOffset: 0x60000, l1Size: 2, id: '1', name: 'before upgrade', dateSec: 1700000000, dateNsec: 5, vmClockNsec: 1.5e9, vmStateSize: 0, diskSize: 1 << 30, icount: 0, extraData: extra };
    const buf = encodeSnapshotTable([e, { ...e, id: '2', name: 'after' }]);
    const { entries, bytes } = decodeSnapshotTable(buf, 2, 'f');
    expect(bytes).toBe(buf.length);
    expect(entries[1]!.name).toBe('after');
    expect(entries[0]!.diskSize).toBe(1 << 30);
    expect(entries[0]!.vmClockNsec).toBe(1.5e9);
  });

  it('round-trips a bitmap directory and enforces QEMU 7.2 constraints', () => {
    const size = 1 << 30;
    const entries = [
      { name: 'b0', tableOffset: 0x70000, tableSize: bitmapTableSize(size, 16, 65536), flags: 2, type: 1, granularityBits: 16, extraData: new Uint8Array(0) },
      { name: 'nightly', tableOffset: 0x80000, tableSize: bitmapTableSize(size, 12, 65536), flags: 0, type: 1, granularityBits: 12, extraData: new Uint8Array(0) },
    ];
    const dir = encodeBitmapDirectory(entries);
    const ext = { nbBitmaps: 2, directorySize: dir.length, directoryOffset: 0x90000 };
    expect(decodeBitmapDirectory(dir, ext, 65536, size, 'f').map((e) => e.name)).toEqual(['b0', 'nightly']);
    const bad = encodeBitmapDirectory([{ ...entries[0]!, flags: 4 }]);
    expect(() => decodeBitmapDirectory(bad, { ...ext, nbBitmaps: 1, directorySize: bad.length }, 65536, size, 'f')).toThrow(/constraints/);
    expect(() => decodeBitmapDirectory(dir, { ...ext, nbBitmaps: 3 }, 65536, size, 'f')).toThrow(/Less bitmaps/);
  });
});
