// RefcountManager (the one place that changes on-disk refcounts; check -r uses it standalone)
// and HeaderWriter, verified by
// qcowkit's own check and, when installed, by qemu-img check: set refcounts of unused clusters
// (leaks of exactly that many clusters, nothing corrupt), in existing blocks, in missing blocks
// (self-describing or described by another block), beyond the refcount table (new area).
import { readFileSync, truncateSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { check, create } from '../../src/index.js';
import { openImageFile } from '../../src/io/file.js';
import { RefcountManager } from '../../src/qcow2/refcount-manager.js';
import { HeaderWriter } from '../../src/qcow2/header-writer.js';
import { Qcow2Image } from '../../src/qcow2/image.js';
import { INCOMPAT_CORRUPT, INCOMPAT_DIRTY } from '../../src/format/constants.js';
import { hasQemu, qemuImgJson } from '../helpers/qemu.js';
import { tmpDir } from '../helpers/tmp.js';

const WIDTHS = [1, 2, 4, 8, 16, 32, 64];

async function newImage(dir: string, name: string, clusterSize: number, refcountBits: number, fileBytes: number): Promise<string> {
  const path = join(dir, name);
  await create(path, { format: 'qcow2', size: 64 * 1024 * 1024, options: { clusterSize, refcountBits } });
  truncateSync(path, fileBytes); // room for "used" clusters inside the file
  return path;
}

async function withWriter<T>(path: string, fn: (w: RefcountManager) => Promise<T>): Promise<T> {
  const file = await openImageFile(path, { writable: true });
  try {
    const img = await Qcow2Image.open(path, { file, writable: true });
    const table = new Uint8Array(img.header.refcountTableClusters * img.clusterSize);
    await file.readAt(table, img.header.refcountTableOffset);
    const w = RefcountManager.standalone(file, img.header, table, HeaderWriter.for(file, img.header), await file.size());
    const r = await fn(w);
    await w.commit();
    return r;
  } finally {
    await file.close();
  }
}

/** Our check and (when available) qemu-img's agree: exactly `leaks` leaked clusters, no errors. */
async function expectLeaks(path: string, leaks: number): Promise<void> {
  const r = await check(path);
  expect(r.corruptions ?? 0).toBe(0);
  expect(r['check-errors']).toBe(0);
  expect(r.leaks ?? 0).toBe(leaks);
  if (hasQemu()) {
    const q = qemuImgJson(['check', path], { allowStatus: [0, 3] });
    expect(q.corruptions ?? 0).toBe(0);
    expect(q.leaks ?? 0).toBe(leaks);
  }
}

describe('RefcountManager (standalone, as check -r uses it)', () => {
  for (const bits of WIDTHS) {
    it(`${bits}-bit refcounts: set/get round trip and leaks in an existing block`, async () => {
      const dir = tmpDir();
      const path = await newImage(dir, 'a.qcow2', 4096, bits, 64 * 4096);
      const max = Math.min(2 ** bits - 1, Number.MAX_SAFE_INTEGER);
      const values = [1, max, Math.min(max, 3), 1];
      await withWriter(path, async (w) => {
        expect(w.maxRefcount).toBe(max);
        for (let i = 0; i < values.length; i++) await w.set(10 + i, values[i]!);
        for (let i = 0; i < values.length; i++) expect(await w.get(10 + i)).toBe(values[i]);
        expect(await w.get(9)).toBe(0);
        await expect(w.set(9, max + 1)).rejects.toThrow();
      });
      await expectLeaks(path, values.length);
      await withWriter(path, async (w) => {
        for (let i = 0; i < values.length; i++) expect(await w.get(10 + i)).toBe(values[i]);
        await w.update(10, 4, 0);
        await w.set(11, 0);
      });
      await expectLeaks(path, values.length - 1);
    });
  }

  it('allocates a missing block in a free cluster described by another block', async () => {
    const dir = tmpDir();
    // 512-byte clusters, 16-bit: 256 clusters per block.
    const path = await newImage(dir, 'b.qcow2', 512, 16, 600 * 512);
    await withWriter(path, async (w) => {
      expect(w.blockOffset(1)).toBe(0);
      await w.set(300, 1);
      expect(w.blockOffset(1)).toBeGreaterThan(0);
      expect(Math.floor(w.blockOffset(1) / 512)).toBeLessThan(256); // placed in block 0's range
    });
    await expectLeaks(path, 1);
  });

  it('allocates a self-describing block when the first free cluster lies in its own range', async () => {
    const dir = tmpDir();
    // 512-byte clusters, 64-bit: 64 clusters per block. Fill block 0, then need block 1.
    const path = await newImage(dir, 'c.qcow2', 512, 64, 200 * 512);
    let used = 0;
    await withWriter(path, async (w) => {
      for (let c = 0; c < 64; c++) {
        if ((await w.get(c)) === 0) {
          await w.set(c, 1);
          used++;
        }
      }
      await w.commit();
      await w.set(100, 1);
      const at = w.blockOffset(1) / 512;
      expect(at).toBeGreaterThanOrEqual(64);
      expect(at).toBeLessThan(128);
      expect(await w.get(at)).toBe(1);
    });
    await expectLeaks(path, used + 1);
  });

  for (const bits of [16, 64]) {
    it(`${bits}-bit: grows the refcount table with a new area (old table freed)`, async () => {
      const dir = tmpDir();
      const per = (512 * 8) / bits;
      const covered = 64 * per; // one 512-byte table cluster holds 64 entries
      const path = await newImage(dir, 'd.qcow2', 512, bits, (covered + 3 * per) * 512);
      const target = covered + per + 7;
      const before = readFileSync(path).subarray(48, 60);
      await withWriter(path, async (w) => {
        expect(w.tableEntries).toBe(64);
        await w.set(target, 2);
        expect(w.tableEntries).toBeGreaterThan(64);
        expect(await w.get(target)).toBe(2);
      });
      expect(readFileSync(path).subarray(48, 60).equals(before)).toBe(false);
      await expectLeaks(path, 1);
    });
  }
});

describe('HeaderWriter', () => {
  it('changes only the bytes of the fields it writes (extensions and unknown bytes kept)', async () => {
    const dir = tmpDir();
    const path = join(dir, 'h.qcow2');
    await create(path, { format: 'qcow2', size: 1 << 20, backing: { file: 'base.qcow2', format: 'qcow2' }, unsafe: true });
    const before = readFileSync(path);
    const file = await openImageFile(path, { writable: true });
    try {
      const img = await Qcow2Image.open(path, { file, writable: true, metadataOnly: true });
      const h = HeaderWriter.for(file, img.header);
      await h.markDirty();
      expect(readFileSync(path).readBigUInt64BE(72) & INCOMPAT_DIRTY).toBe(INCOMPAT_DIRTY);
      await h.updateIncompatible(INCOMPAT_CORRUPT, 0n);
      await h.markClean();
      await h.clearCorrupt();
      await h.setRefcountTable(img.header.refcountTableOffset, img.header.refcountTableClusters);
    } finally {
      await file.close();
    }
    expect(readFileSync(path).equals(before)).toBe(true);
  });

  it('does nothing to a v2 header (no feature bits)', async () => {
    const dir = tmpDir();
    const path = join(dir, 'v2.qcow2');
    await create(path, { format: 'qcow2', size: 1 << 20, options: { compat: '0.10' } });
    const before = readFileSync(path);
    const file = await openImageFile(path, { writable: true });
    try {
      const img = await Qcow2Image.open(path, { file, writable: true });
      const h = HeaderWriter.for(file, img.header);
      await h.markDirty();
      expect(h.dirty).toBe(false);
    } finally {
      await file.close();
    }
    expect(readFileSync(path).equals(before)).toBe(true);
  });
});
