// Growing an image that has persistent bitmaps (issue 11): QEMU 7.2 resizes such images and the
// bitmaps grow with them, the old bits kept and the new range clean. qcowkit grows images in the
// writer's resize (what `commit` calls when the top is bigger than the base); each case is
// checked against QEMU on a copy of the same image — `qemu-img resize`, `qemu-img commit` — by
// qemu-img check, qemu-img info and the bitmap contents QEMU serves (qemu-nbd -B + nbdinfo).
import { copyFileSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { expect, it } from 'vitest';
import { command as commitCommand } from '../../src/cli/commands/commit.js';
import { openImage } from '../../src/index.js';
import { runCommandInProcess } from '../helpers/cli.js';
import { nbdDirtyMaps } from '../helpers/nbd.js';
import { describeQemu, qemuImg, qemuIo } from '../helpers/qemu.js';
import { tmpDir } from '../helpers/tmp.js';
import { commitBothWays, expectClean, G, imageInfo as info, M, must, qemuBitmapImage, type BitmapSpec } from '../helpers/bitmaps.js';

interface Case {
  name: string;
  cluster: string;
  size: number;
  grown: number;
  bitmaps: BitmapSpec[];
  writes: string[];
  backing?: boolean;
}

const CASES: Case[] = [
  {
    // Tables grow from 50 to 150 clusters of bitmap data at 512 B granularity; the old size ends
    // inside a granule of every bitmap, and that granule is dirty.
    name: '512 B clusters, 100 MiB + 1.5 KiB -> 300 MiB',
    cluster: '512',
    size: 100 * M + 1536,
    grown: 300 * M,
    bitmaps: [
      { name: 'fine', granularity: '512' },
      { name: 'dflt', granularity: '4k' },
      { name: 'coarse', granularity: '1M', disabled: true },
    ],
    writes: ['write 0 64k', 'write 7M 3k', 'write 104857600 1536'],
  },
  {
    name: '64 KiB clusters, 4 GiB -> 1 TiB, one bitmap enabled, one disabled',
    cluster: '64k',
    size: 4 * G,
    grown: 1024 * G,
    bitmaps: [
      { name: 'on', granularity: '64k' },
      { name: 'off', granularity: '2M', disabled: true },
    ],
    writes: ['write 0 1M', 'write 3G 64k', 'write 4294901760 65536'],
  },
  {
    name: '4 KiB clusters over a backing file (the grown range is zeroed), 64 MiB -> 65 MiB',
    cluster: '4k',
    size: 64 * M,
    grown: 65 * M,
    bitmaps: [{ name: 'b', granularity: '4k' }],
    writes: ['write 1M 4k', 'write 67104768 4096'],
    backing: true,
  },
];

describeQemu('growing images with persistent bitmaps, as QEMU does', () => {
  it.each(CASES)('$name: resize equals qemu-img resize on a copy', async (c) => {
    const dir = tmpDir();
    const img = join(dir, 'd.qcow2');
    if (c.backing) qemuBitmapImage(join(dir, 'base.qcow2'), { size: c.grown, bitmaps: [], writes: [`write -P 7 0 ${c.grown}`] });
    qemuBitmapImage(img, { size: c.size, cluster: c.cluster, backing: c.backing ? 'base.qcow2' : undefined, bitmaps: c.bitmaps, writes: c.writes });
    must(qemuIo(img, ['write 2M 512']), 'write while some are disabled');
    const before = await nbdDirtyMaps(img, c.bitmaps.map((b) => b.name));
    const copy = join(dir, 'q.qcow2');
    copyFileSync(img, copy);

    must(qemuImg(['resize', copy, String(c.grown)]), 'qemu-img resize');
    const h = await openImage(img, { writable: true });
    try {
      await h.resize(c.grown);
    } finally {
      await h.close();
    }

    expectClean(img);
    expect(info(img)).toEqual(info(copy));
    expect(info(img).size).toBe(c.grown);
    const names = c.bitmaps.map((b) => b.name);
    const ours = await nbdDirtyMaps(img, names);
    expect(ours).toEqual(await nbdDirtyMaps(copy, names));
    // The old bits are all there (a granule cut by the old end now covers the whole granule).
    for (const n of names) expect(ours[n]!.length, n).toBe(before[n]!.length);
    expect(ours[names[0]!]!.length).toBeGreaterThan(0);
    // Guest data as QEMU leaves it (with a backing file the grown range reads zeros).
    expect(qemuImg(['compare', '-f', 'qcow2', '-F', 'qcow2', img, copy]).status).toBe(0);
    // QEMU records into the grown bitmaps past the old end afterwards.
    must(qemuIo(img, [`write ${c.grown - 4096} 4096`]), 'write at the new end');
    must(qemuIo(copy, [`write ${c.grown - 4096} 4096`]), 'write at the new end');
    expect(await nbdDirtyMaps(img, names)).toEqual(await nbdDirtyMaps(copy, names));
    expectClean(img);
  }, 120_000);

  it('commit into a smaller base with bitmaps grows it and marks the recording ones, as qemu-img commit', async () => {
    const results = await commitBothWays({
      base: { size: 100 * M, bitmaps: [{ name: 'rec', granularity: '128k' }, { name: 'off', granularity: '64k', disabled: true }], writes: ['write 0 4M', 'write 99M 1M'] },
      top: { size: 300 * M, writes: ['write 50M 1M', 'write 150M 64k', 'write 299M 1M', 'write -z 200M 2M'] },
    });
    expect(results['qcowkit']).toEqual(results['qemu-img']);
    expect(results['qcowkit'].info.size).toBe(300 * M);
  }, 120_000);

  it('an in-use bitmap refuses the growth, as in QEMU, and the image is left untouched', async () => {
    const dir = tmpDir();
    const base = join(dir, 'base.qcow2');
    const top = join(dir, 'top.qcow2');
    must(qemuImg(['create', '-f', 'qcow2', base, String(100 * M)]), 'base');
    must(qemuImg(['bitmap', '--add', base, 'ok']), 'add');
    must(qemuImg(['bitmap', '--add', base, 'live']), 'add');
    qemuIo(base, ['write 0 64k', 'abort']); // QEMU dies: both bitmaps stay in use
    must(qemuImg(['bitmap', '--remove', base, 'ok']), 'remove');
    must(qemuImg(['create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top, String(200 * M)]), 'top');
    must(qemuIo(top, ['write 150M 64k']), 'top write');
    const q = join(dir, 'q.qcow2');
    copyFileSync(base, q);
    const theirs = qemuImg(['resize', q, String(200 * M)]);
    expect(theirs.status).toBe(1);
    expect(theirs.stderr).toContain("Bitmap 'live' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk");
    const bytes = readFileSync(base);

    const h = await openImage(base, { writable: true });
    try {
      await expect(h.resize(200 * M)).rejects.toThrow("Bitmap 'live' is inconsistent and cannot be used");
    } finally {
      await h.close();
    }
    const r = await runCommandInProcess(commitCommand, [top], dir);
    expect(r.status).toBe(1);
    // qemu-img resize's two lines in one, its advice naming qcowkit's command, and why commit needs the bitmap.
    expect(r.stderr).toMatch(
      /^qcowkit: \S*base\.qcow2: Bitmap 'live' is inconsistent and cannot be used \(growing the disk to 209715200 bytes resizes every bitmap\); try 'qcowkit bitmap --remove \S*base\.qcow2 live' to delete this bitmap from disk\n$/,
    );
    // Nothing was written: not even the dirty bit.
    expect(Buffer.compare(readFileSync(base), bytes)).toBe(0);
    expectClean(base);
    expect(info(base).size).toBe(100 * M);
  }, 60_000);
});
