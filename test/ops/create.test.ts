// create(): images built in a temp dir, read back through Qcow2Image / BackingChain; the pure
// layout checked on its own (fixed point of the refcount structures, packing of every width).
import { mkdtemp, mkdir, readFile, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BackingChain, create, Qcow2Image, QcowError } from '../../src/index.js';
import { COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION, INCOMPAT_EXTL2 } from '../../src/format/constants.js';
import { getRefcount, refcountBlockEntries } from '../../src/format/tables.js';
import { fillMetadata, freshLayout, type FreshLayoutParams } from '../../src/qcow2/layout.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'qcowkit-create-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});
const p = (name: string) => join(dir, name);

async function expectError(promise: Promise<unknown>, code: string, message: RegExp): Promise<void> {
  const e = await promise.then(
    () => undefined,
    (err: unknown) => err,
  );
  expect(e).toBeInstanceOf(QcowError);
  expect((e as QcowError).code).toBe(code);
  expect((e as QcowError).message).toMatch(message);
}

/** Every cluster of the file: refcount 1 below usedClusters, 0 after. */
async function expectRefcounts(img: Qcow2Image, used: number): Promise<void> {
  const rc = await img.refcounts();
  const per = rc.entriesPerBlock;
  for (let c = 0; c < Math.ceil(used / per) * per; c++) {
    const want = c < used ? 1 : 0;
    if ((await rc.refcount(c)) !== want) throw new Error(`cluster ${c}: refcount ${await rc.refcount(c)}, want ${want}`);
  }
}

describe('freshLayout', () => {
  it("matches QEMU's layout for a plain 1 GiB image", () => {
    const l = freshLayout({ clusterBits: 16, refcountOrder: 4, extendedL2: false, size: 2 ** 30, preallocate: false });
    expect(l).toMatchObject({ l1Size: 2, refcountTableOffset: 65536, refcountTableClusters: 1, refcountBlockOffset: 131072, refcountBlocks: 1, l1TableOffset: 196608, usedClusters: 4, fileLength: 196624, tablesEnd: 196608 });
  });

  it('ends after the refcount block and stores L1 offset 0 for an empty disk', () => {
    const l = freshLayout({ clusterBits: 16, refcountOrder: 4, extendedL2: false, size: 0, preallocate: false });
    expect(l).toMatchObject({ l1Size: 0, l1TableOffset: 0, fileLength: 3 * 65536 });
  });

  it('sizes refcount table and blocks to cover every cluster, themselves included', () => {
    const cases: FreshLayoutParams[] = [];
    for (const clusterBits of [9, 12, 16, 21])
      for (const refcountOrder of [0, 3, 4, 6])
        for (const size of [0, 512, 10 ** 8, 2 ** 34 + 512])
          for (const preallocate of [false, true]) cases.push({ clusterBits, refcountOrder, extendedL2: clusterBits >= 14, size, preallocate });
    for (const c of cases) {
      const l = freshLayout(c);
      const per = refcountBlockEntries(c.clusterBits, c.refcountOrder);
      const cs = l.clusterSize;
      expect(l.usedClusters).toBeLessThanOrEqual(l.refcountBlocks * per);
      expect(l.refcountBlocks * 8).toBeLessThanOrEqual(l.refcountTableClusters * cs);
      // No spare block: one block less would not cover the used clusters.
      expect((l.refcountBlocks - 1) * per).toBeLessThan(l.usedClusters);
      expect(l.usedClusters).toBe(1 + l.refcountTableClusters + l.refcountBlocks + l.l1Clusters + l.l2Tables + l.dataClusters);
      expect(Math.ceil(l.fileLength / cs)).toBe(l.usedClusters);
      if (c.preallocate) expect(l.dataClusters * cs).toBeGreaterThanOrEqual(c.size);
    }
  });

  it('packs refcount 1 for exactly the used clusters, at every width', () => {
    for (let order = 0; order <= 6; order++) {
      const l = freshLayout({ clusterBits: 9, refcountOrder: order, extendedL2: false, size: 3 * 2 ** 20 + 1536, preallocate: true });
      const area = new Uint8Array(l.tablesEnd - l.clusterSize);
      // Filled in uneven chunks (multiples of 16 bytes) to cross every boundary.
      for (let at = 0, step = 48; at < area.length; at += step, step = step === 48 ? 1024 : 48) {
        const chunk = new Uint8Array(Math.min(step, area.length - at));
        fillMetadata(l, l.clusterSize + at, chunk);
        area.set(chunk, at);
      }
      const blocks = area.subarray(l.refcountBlockOffset - l.clusterSize, l.refcountBlockOffset - l.clusterSize + l.refcountBlocks * l.clusterSize);
      const per = refcountBlockEntries(9, order);
      for (let c = 0; c < l.refcountBlocks * per; c++) {
        const block = blocks.subarray(Math.floor(c / per) * 512, Math.floor(c / per) * 512 + 512);
        expect(getRefcount(block, c % per, order)).toBe(c < l.usedClusters ? 1 : 0);
      }
    }
  });
});

describe('create qcow2', () => {
  it('writes a default v3 image that opens with the requested geometry', async () => {
    const r = await create(p('plain.qcow2'), { format: 'qcow2', size: 10 * 2 ** 30 });
    expect(r).toMatchObject({ format: 'qcow2', size: 10 * 2 ** 30, clusterSize: 65536, compat: '1.1', refcountBits: 16, extendedL2: false, lazyRefcounts: false, compressionType: 'zlib', preallocation: 'off', fileLength: 3 * 65536 + 20 * 8 });
    expect((await stat(p('plain.qcow2'))).size).toBe(r.fileLength);
    const img = await Qcow2Image.open(p('plain.qcow2'));
    try {
      const h = img.header;
      expect(h).toMatchObject({ version: 3, clusterBits: 16, size: 10 * 2 ** 30, l1Size: 20, l1TableOffset: 3 * 65536, refcountTableOffset: 65536, refcountTableClusters: 1, refcountOrder: 4, headerLength: 112, compressionType: 0 });
      expect(h.incompatibleFeatures).toBe(0n);
      expect(h.featureNames.map((f) => f.name)).toContain('extended L2 entries');
      expect(h.backingFile).toBeUndefined();
      await expectRefcounts(img, 4);
      const st = await img.status(0, img.virtualSize);
      expect(st).toHaveLength(1);
      expect(st[0]).toMatchObject({ allocated: false, length: 10 * 2 ** 30 });
    } finally {
      await img.close();
    }
  });

  it('encodes compat, refcount width, extended L2, lazy refcounts and zstd in the header', async () => {
    await create(p('feat.qcow2'), { format: 'qcow2', size: 2 ** 30, options: { clusterSize: 32768, refcountBits: 64, extendedL2: true, lazyRefcounts: true, compressionType: 'zstd' } });
    const img = await Qcow2Image.open(p('feat.qcow2'));
    try {
      expect(img.header.refcountOrder).toBe(6);
      expect(img.header.incompatibleFeatures).toBe(INCOMPAT_EXTL2 | INCOMPAT_COMPRESSION);
      expect(img.header.compatibleFeatures).toBe(COMPAT_LAZY_REFCOUNTS);
      expect(img.header.compressionType).toBe(1);
      expect(img.extendedL2).toBe(true);
      // 32 KiB clusters with 16-byte L2 entries: one L2 table maps 64 MiB -> 16 L1 entries.
      expect(img.header.l1Size).toBe(16);
      await expectRefcounts(img, 4);
    } finally {
      await img.close();
    }

    await create(p('v2.qcow2'), { format: 'qcow2', size: 2 ** 20, options: { compat: '0.10', clusterSize: 512 } });
    const v2 = await Qcow2Image.open(p('v2.qcow2'));
    try {
      expect(v2.header).toMatchObject({ version: 2, headerLength: 72, refcountOrder: 4, clusterBits: 9, l1Size: 32 });
      expect(v2.header.featureNames).toHaveLength(0);
      await expectRefcounts(v2, 4);
    } finally {
      await v2.close();
    }
  });

  it('adds refcount blocks before the L1 table when one block does not cover it', async () => {
    const r = await create(p('c512.qcow2'), { format: 'qcow2', size: 2 ** 30, options: { clusterSize: 512 } });
    const img = await Qcow2Image.open(p('c512.qcow2'));
    try {
      // L1: 32768 entries = 512 clusters; 256 clusters per 16-bit block -> 3 blocks.
      expect(img.header.l1TableOffset).toBe(5 * 512);
      expect(r.fileLength).toBe(5 * 512 + 32768 * 8);
      await expectRefcounts(img, 5 + 512);
    } finally {
      await img.close();
    }
  });

  it('preallocates metadata: every guest cluster mapped to one contiguous run, sparse file', async () => {
    const size = 3 * 2 ** 30 + 12345;
    const r = await create(p('prealloc.qcow2'), { format: 'qcow2', size, options: { preallocation: 'metadata', refcountBits: 1 } });
    const cs = 65536;
    const dataClusters = Math.ceil(r.size / cs);
    expect(r.size).toBe(size + 512 - (size % 512));
    const st = await stat(p('prealloc.qcow2'));
    expect(st.size).toBe(r.fileLength);
    expect(st.blocks * 512).toBeLessThan(4 * 2 ** 20); // only the tables were written
    const img = await Qcow2Image.open(p('prealloc.qcow2'));
    try {
      // header, reftable, 1 block (1-bit: 524288 clusters), L1, 7 L2 tables, then data.
      const dataOffset = (4 + 7) * cs;
      expect(img.header.l1Size).toBe(7);
      for (let i = 0; i < 7; i++) expect(img.l2Offset(i)).toBe((4 + i) * cs);
      expect(img.l1.copied.every((c) => c === 1)).toBe(true);
      const ext = await img.status(0, img.virtualSize);
      expect(ext).toEqual([{ start: 0, length: r.size, allocated: true, data: true, zero: false, offset: dataOffset }]);
      expect(r.fileLength).toBe(dataOffset + dataClusters * cs);
      const rc = await img.refcounts();
      for (const c of [0, 3, 4, 10, 11, 11 + dataClusters - 1]) expect(await rc.refcount(c)).toBe(1);
      expect(await rc.refcount(11 + dataClusters)).toBe(0);
    } finally {
      await img.close();
    }
  });

  it('preallocates extended L2 entries with an empty subcluster bitmap (as QEMU)', async () => {
    await create(p('pre-ext.qcow2'), { format: 'qcow2', size: 2 ** 30, options: { preallocation: 'metadata', extendedL2: true, clusterSize: 2 ** 21 } });
    const img = await Qcow2Image.open(p('pre-ext.qcow2'));
    try {
      const l2 = new Uint8Array(64);
      await img.file.readAt(l2, img.l2Offset(0));
      const v = new DataView(l2.buffer);
      // entry 0 -> data at cluster 5 (header, reftable, block, L1, L2), COPIED; bitmap 0
      expect(v.getBigUint64(0)).toBe((1n << 63n) | (5n << 21n));
      expect(v.getBigUint64(8)).toBe(0n);
      expect(v.getBigUint64(16)).toBe((1n << 63n) | (6n << 21n));
    } finally {
      await img.close();
    }
  });

  it('preallocation=full writes zeros to the data clusters', async () => {
    const r = await create(p('full.qcow2'), { format: 'qcow2', size: 10 * 2 ** 20, options: { preallocation: 'full' } });
    const st = await stat(p('full.qcow2'));
    expect(st.blocks * 512).toBeGreaterThanOrEqual(10 * 2 ** 20);
    expect(st.size).toBe(r.fileLength);
  });

  it('overwrites (truncates) an existing file, as qemu-img does', async () => {
    await writeFile(p('old.qcow2'), new Uint8Array(5 * 2 ** 20).fill(7));
    const r = await create(p('old.qcow2'), { format: 'qcow2', size: 2 ** 20 });
    expect((await stat(p('old.qcow2'))).size).toBe(r.fileLength);
    const bytes = await readFile(p('old.qcow2'));
    expect(bytes.subarray(0x400, 0x10000).every((b) => b === 0)).toBe(true);
  });

  it('rounds the size up to 512 bytes', async () => {
    const r = await create(p('odd.qcow2'), { format: 'qcow2', size: 1000 });
    expect(r.size).toBe(1024);
    const img = await Qcow2Image.open(p('odd.qcow2'));
    expect(img.header.size).toBe(1024);
    await img.close();
  });
});

describe('create with a backing file', () => {
  beforeAll(async () => {
    await mkdir(p('sub'), { recursive: true });
    await create(p('sub/base.qcow2'), { format: 'qcow2', size: 3 * 2 ** 20 });
    await writeFile(p('sub/base.raw'), new Uint8Array(1000));
  });

  it('stores the name verbatim, resolves it from the image directory and takes its size', async () => {
    const r = await create(p('sub/top.qcow2'), { format: 'qcow2', backing: { file: 'base.qcow2', format: 'qcow2' } });
    expect(r.size).toBe(3 * 2 ** 20);
    expect(r.backing).toEqual({ file: 'base.qcow2', format: 'qcow2' });
    const chain = await BackingChain.open(p('sub/top.qcow2'));
    try {
      expect(chain.layers.map((l) => l.path)).toEqual([p('sub/top.qcow2'), p('sub/base.qcow2')]);
      expect(chain.top.backingName).toBe('base.qcow2');
      expect(chain.top.backingFormat).toBe('qcow2');
    } finally {
      await chain.close();
    }
    const raw = await create(p('sub/over-raw.qcow2'), { format: 'qcow2', backing: { file: 'base.raw', format: 'raw' } });
    expect(raw.size).toBe(1024); // QEMU sees whole sectors
    const up = await create(p('up.qcow2'), { format: 'qcow2', size: 2 ** 30, backing: { file: 'sub/top.qcow2', format: 'qcow2' } });
    expect(up.size).toBe(2 ** 30);
  });

  it('with unsafe, neither opens nor needs the backing file, but needs a size', async () => {
    await create(p('unsafe.qcow2'), { format: 'qcow2', size: 2 ** 20, unsafe: true, backing: { file: 'missing.qcow2', format: 'qcow2' } });
    const img = await Qcow2Image.open(p('unsafe.qcow2'));
    expect(img.backingName).toBe('missing.qcow2');
    await img.close();
    await expectError(create(p('unsafe2.qcow2'), { format: 'qcow2', unsafe: true, backing: { file: 'missing.qcow2', format: 'qcow2' } }), 'INVALID_ARGUMENT', /needs a size/);
  });

  it('refuses bad backing files before touching the target', async () => {
    await writeFile(p('keep.qcow2'), 'precious');
    const keep = (backing: { file: string; format?: 'qcow2' | 'raw' }, extra: object = {}) => create(p('keep.qcow2'), { format: 'qcow2', size: 2 ** 20, backing, ...extra });
    await expectError(keep({ file: 'sub/base.qcow2' }), 'INVALID_ARGUMENT', /without backing format \(detected qcow2: add -F qcow2\)/);
    // As qemu-img 7.2: a backing file that can't be opened is reported before the missing -F.
    await expectError(keep({ file: 'nope.qcow2' }), 'BACKING', /Could not open backing image/);
    await expectError(keep({ file: 'nope.qcow2' }, { unsafe: true }), 'INVALID_ARGUMENT', /add -F qcow2 or -F raw/);
    await expectError(keep({ file: 'nope.qcow2', format: 'qcow2' }), 'BACKING', /Could not open backing image/);
    await expectError(keep({ file: 'nbd:localhost:10809', format: 'raw' }), 'BACKING', /protocol prefix/);
    await expectError(keep({ file: 'keep.qcow2', format: 'qcow2' }), 'INVALID_ARGUMENT', /same filename as the backing file/);
    await expectError(keep({ file: './sub/../keep.qcow2', format: 'qcow2' }, { unsafe: true }), 'INVALID_ARGUMENT', /same filename/);
    await symlink(p('keep.qcow2'), p('link.qcow2'));
    await expectError(keep({ file: 'link.qcow2', format: 'qcow2' }), 'INVALID_ARGUMENT', /same filename/);
    await expectError(keep({ file: '', format: 'qcow2' }), 'INVALID_ARGUMENT', /empty string/);
    await expectError(keep({ file: 'sub/base.qcow2', format: 'qcow2' }, { options: { preallocation: 'metadata' } }), 'INVALID_ARGUMENT', /only be used at the same time if extended_l2 is on/);
    await expectError(create(p('keep.qcow2'), { format: 'raw', size: 1, backing: { file: 'sub/base.raw', format: 'raw' } }), 'INVALID_ARGUMENT', /not supported for file format 'raw'/);
    expect(await readFile(p('keep.qcow2'), 'utf8')).toBe('precious');
  });
});

describe('create: option and size validation (QEMU wording)', () => {
  const cases: Array<[string, Parameters<typeof create>[1], RegExp]> = [
    ['no size', { format: 'qcow2' }, /Image creation needs a size parameter/],
    ['negative size', { format: 'qcow2', size: -1 }, /Invalid image size/],
    ['cluster 1000', { format: 'qcow2', size: 1, options: { clusterSize: 1000 } }, /power of two between 512 and 2048k/],
    ['cluster 4M', { format: 'qcow2', size: 1, options: { clusterSize: 4 * 2 ** 20 } }, /power of two between 512 and 2048k/],
    ['refcount 3', { format: 'qcow2', size: 1, options: { refcountBits: 3 } }, /may not exceed 64 bits/],
    ['refcount 128', { format: 'qcow2', size: 1, options: { refcountBits: 128 } }, /may not exceed 64 bits/],
    ['v2 lazy', { format: 'qcow2', size: 1, options: { compat: '0.10', lazyRefcounts: true } }, /Lazy refcounts only supported with compatibility level 1.1/],
    ['v2 refcount 8', { format: 'qcow2', size: 1, options: { compat: '0.10', refcountBits: 8 } }, /Different refcount widths than 16 bits/],
    ['v2 extended', { format: 'qcow2', size: 1, options: { compat: '0.10', extendedL2: true } }, /Extended L2 entries are only supported with compatibility level/],
    ['v2 zstd', { format: 'qcow2', size: 1, options: { compat: '0.10', compressionType: 'zstd' } }, /Non-zlib compression type/],
    ['extended 4k', { format: 'qcow2', size: 1, options: { extendedL2: true, clusterSize: 4096 } }, /at least 16384 bytes/],
    ['too large', { format: 'qcow2', size: 2 ** 51 + 512 }, /image size is too large for file format 'qcow2'/],
    ['too large 512', { format: 'qcow2', size: 2 ** 37 + 512, options: { clusterSize: 512 } }, /too large/],
    ['raw metadata', { format: 'raw', size: 1, options: { preallocation: 'metadata' } }, /Unsupported preallocation mode: metadata/],
    ['raw cluster', { format: 'raw', size: 1, options: { clusterSize: 4096 } }, /Invalid parameter 'clusterSize'/],
  ];
  it.each(cases)('%s', async (_name, opts, message) => {
    await expectError(create(p('invalid.qcow2'), opts), 'INVALID_ARGUMENT', message);
    await expect(stat(p('invalid.qcow2'))).rejects.toThrow();
  });

  it('accepts the largest size the L1 table can map (2 PiB with 64 KiB clusters)', async () => {
    const r = await create(p('huge.qcow2'), { format: 'qcow2', size: 2 ** 51 });
    expect(r.fileLength).toBe(3 * 65536 + 2 ** 22 * 8);
    await rm(p('huge.qcow2'));
  });

  it('falloc allocates the data clusters as full does (Node has no fallocate)', async () => {
    const f = await create(p('f.qcow2'), { format: 'qcow2', size: 1 << 20, options: { preallocation: 'falloc' } });
    const g = await create(p('g.qcow2'), { format: 'qcow2', size: 1 << 20, options: { preallocation: 'full' } });
    expect(f.fileLength).toBe(g.fileLength);
    expect((await stat(p('f.qcow2'))).blocks).toBe((await stat(p('g.qcow2'))).blocks);
  });

  it('stops on abort and removes the half-written file', async () => {
    const ac = new AbortController();
    ac.abort();
    await expectError(create(p('aborted.qcow2'), { format: 'qcow2', size: 2 ** 30, options: { preallocation: 'metadata' }, signal: ac.signal }), 'ABORTED', /aborted/);
    await expect(stat(p('aborted.qcow2'))).rejects.toThrow();
  });
});

describe('create raw', () => {
  it('makes a sparse file of SIZE bytes rounded to 512', async () => {
    const r = await create(p('disk.raw'), { format: 'raw', size: 1000 });
    expect(r).toMatchObject({ format: 'raw', size: 1024, fileLength: 1024 });
    const st = await stat(p('disk.raw'));
    expect(st.size).toBe(1024);
    await create(p('big.raw'), { format: 'raw', size: 2 ** 40 });
    const big = await stat(p('big.raw'));
    expect(big.size).toBe(2 ** 40);
    expect(big.blocks).toBe(0);
    await rm(p('big.raw'));
  });

  it('preallocation=full writes the zeros', async () => {
    await create(p('full.raw'), { format: 'raw', size: 3 * 2 ** 20, options: { preallocation: 'full' } });
    const st = await stat(p('full.raw'));
    expect(st.size).toBe(3 * 2 ** 20);
    expect(st.blocks * 512).toBeGreaterThanOrEqual(3 * 2 ** 20);
  });
});
