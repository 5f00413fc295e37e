// Persistent dirty bitmaps against QEMU: bitmaps made by qemu-img and dirtied by QEMU's block
// layer (qemu-io writes record into enabled persistent bitmaps), changed by qcowkit (add, merge
// within and across files and granularities, clear, enable/disable, remove), then checked by
// QEMU: qemu-img check clean, qemu-img info names/granularities/flags, and the contents QEMU
// serves (qemu-nbd -B + nbdinfo --map=qemu:dirty-bitmap:NAME) equal to the model — and equal to
// what `bitmap --dump` and `changes --bitmap` print.
import { copyFileSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { expect, it } from 'vitest';
import { command as bitmapCommand } from '../../src/cli/commands/bitmap.js';
import { command as changesCommand } from '../../src/cli/commands/changes.js';
import { command as checkCommand } from '../../src/cli/commands/check.js';
import { patchBytes } from '../helpers/bytes.js';
import { markBitmapsDirty, openImage } from '../../src/index.js';
import { runCommandInProcess } from '../helpers/cli.js';
import { describeQemu, qemuImg, qemuImgJson, qemuIo } from '../helpers/qemu.js';
import { tmpDir } from '../helpers/tmp.js';
import { prng } from '../helpers/prng.js';
import { atGranularity, coalesce, nbdDirtyMaps, type Extent } from '../helpers/nbd.js';
import { commitBothWays, expectClean, G, infoBitmaps, K, M, must, qemuBitmapImage, qemuWrites, T } from '../helpers/bitmaps.js';

async function qcowkit(cmd: typeof bitmapCommand, args: string[], dir: string) {
  return runCommandInProcess(cmd, args, dir);
}

async function ok(cmd: typeof bitmapCommand, args: string[], dir: string): Promise<string> {
  const r = await qcowkit(cmd, args, dir);
  if (r.status !== 0) throw new Error(`qcowkit ${args.join(' ')} exited ${r.status}: ${r.stderr}`);
  return r.stdout;
}

interface Case {
  name: string;
  cluster: string;
  size: number;
  writes: number;
}

const CASES: Case[] = [
  { name: '512 B clusters, 64 MiB', cluster: '512', size: 64 * M, writes: 25 },
  { name: '4 KiB clusters, 256 MiB', cluster: '4k', size: 256 * M, writes: 25 },
  { name: '64 KiB clusters, 4 GiB', cluster: '64k', size: 4 * G, writes: 30 },
  { name: '2 MiB clusters, 8 GiB', cluster: '2M', size: 8 * G, writes: 20 },
  { name: '64 KiB clusters, 1 TiB', cluster: '64k', size: T, writes: 30 },
];

describeQemu('persistent bitmaps: qcowkit and QEMU read and write each other', () => {
  it.each(CASES)('$name: QEMU-made bitmaps, qcowkit add/merge/clear/disable/remove, read back by QEMU', async (c) => {
    const dir = tmpDir();
    const img = join(dir, 'disk.qcow2');
    const rnd = prng(c.size % 1000003);
    // QEMU's bitmaps: default granularity and 1 MiB.
    qemuBitmapImage(img, { size: c.size, cluster: c.cluster, bitmaps: [{ name: 'q0' }, { name: 'q1', granularity: '1M' }] });
    const cs = infoBitmaps(img)[0]!.granularity;
    expect(cs).toBe(Math.min(65536, Math.max(4096, qemuImgJson(['info', img])['cluster-size'])));
    let writes = qemuWrites(img, c.size, c.writes, rnd);

    // qcowkit: coarser and finer bitmaps filled by merges (granularity conversion), one disabled.
    await ok(bitmapCommand, ['--add', '-g', '512k', '--merge', 'q0', img, 'k0'], dir);
    await ok(bitmapCommand, ['--add', '-g', '4k', '--merge', 'q1', '--disable', img, 'k1'], dir);
    expectClean(img);
    expect(infoBitmaps(img)).toEqual([
      { name: 'q0', granularity: cs, flags: ['auto'] },
      { name: 'q1', granularity: M, flags: ['auto'] },
      { name: 'k0', granularity: 512 * K, flags: ['auto'] },
      { name: 'k1', granularity: 4 * K, flags: [] },
    ]);
    // More writes by QEMU: recorded in q0, q1, k0 (enabled), not k1 (disabled).
    const first = writes;
    const more = qemuWrites(img, c.size, 10, rnd);
    writes = [...first, ...more];
    const expected: Record<string, Extent[]> = {
      q0: atGranularity(writes, cs, c.size),
      q1: atGranularity(writes, M, c.size),
      k0: atGranularity(writes, 512 * K, c.size),
      k1: atGranularity(first, M, c.size),
    };
    const served = await nbdDirtyMaps(img, Object.keys(expected));
    expect(served).toEqual(expected);
    // --dump and changes --bitmap print exactly what QEMU serves.
    for (const name of Object.keys(expected)) {
      const dump = JSON.parse(await ok(bitmapCommand, ['--dump', '--output', 'json', img, name], dir));
      expect(dump.extents).toEqual(served[name]);
      expect(dump['dirty-bytes']).toBe(served[name]!.reduce((n, e) => n + e.length, 0));
    }
    const union = JSON.parse(await ok(changesCommand, ['--output', 'json', '--bitmap', 'q0', '--bitmap', 'k1', img], dir));
    expect(union).toEqual(coalesce([...served['q0']!, ...served['k1']!]));

    // clear, enable, remove; the last removal drops the extension and the autoclear bit.
    await ok(bitmapCommand, ['--clear', '--enable', img, 'k1'], dir);
    await ok(bitmapCommand, ['--remove', img, 'q1'], dir);
    expectClean(img);
    expect(infoBitmaps(img).map((b) => [b.name, b.flags])).toEqual([
      ['q0', ['auto']],
      ['k0', ['auto']],
      ['k1', ['auto']],
    ]);
    expect(await nbdDirtyMaps(img, ['k1', 'k0'])).toEqual({ k1: [], k0: expected['k0'] });
    await ok(bitmapCommand, ['--remove', img, 'q0'], dir);
    await ok(bitmapCommand, ['--remove', img, 'k0'], dir);
    await ok(bitmapCommand, ['--remove', img, 'k1'], dir);
    expectClean(img);
    expect(infoBitmaps(img)).toEqual([]);
    const header = readFileSync(img).subarray(0, 104);
    expect(header.readBigUInt64BE(88) & 1n).toBe(0n);
    // QEMU writes into it again afterwards and is happy.
    must(qemuImg(['bitmap', '--add', img, 'again']), 'qemu-img bitmap after qcowkit');
    expectClean(img);
  }, 300_000);

  it('merges across files and granularities (-b/-F), as qemu-img does', async () => {
    const dir = tmpDir();
    const a = join(dir, 'a.qcow2');
    const b = join(dir, 'b.qcow2');
    const size = 2 * G;
    const rnd = prng(77);
    for (const f of [a, b]) must(qemuImg(['create', '-f', 'qcow2', f, String(size)]), 'create');
    must(qemuImg(['bitmap', '--add', '-g', '8k', b, 'src']), 'add src');
    const writes = qemuWrites(b, size, 40, rnd);
    await ok(bitmapCommand, ['--add', '-g', '256k', '--merge', 'src', '-b', b, '-F', 'qcow2', a, 'coarse'], dir);
    await ok(bitmapCommand, ['--add', '-g', '512', '--merge', 'src', '-b', b, a, 'fine'], dir);
    expectClean(a);
    expectClean(b);
    expect(await nbdDirtyMaps(a, ['coarse', 'fine'])).toEqual({ coarse: atGranularity(writes, 256 * K, size), fine: atGranularity(writes, 8 * K, size) });
    // Same result as qemu-img's own merge.
    must(qemuImg(['bitmap', '--add', '-g', '256k', '--merge', 'src', '-b', b, '-F', 'qcow2', a, 'byqemu']), 'qemu-img merge');
    const m = await nbdDirtyMaps(a, ['coarse', 'byqemu']);
    expect(m['coarse']).toEqual(m['byqemu']);
    // Into empty bitmaps of the source's granularity (the source's contents are the result: a
    // fresh one across files, then within the file, a cleared one); then into a non-empty one.
    await ok(bitmapCommand, ['--add', '-g', '8k', '--merge', 'src', '-b', b, a, 'copy'], dir);
    await ok(bitmapCommand, ['--add', '-g', '8k', '--merge', 'copy', a, 'copy2'], dir);
    await ok(bitmapCommand, ['--clear', '--merge', 'copy', a, 'coarse'], dir); // 256k: converted
    await ok(bitmapCommand, ['--add', '-g', '8k', '--disable', a, 'dst'], dir);
    const more = [...writes, { start: 100 * M, length: 64 * K }];
    must(qemuIo(a, ['write 100M 64k']), 'a write'); // recorded by the enabled ones, not dst
    await ok(bitmapCommand, ['--clear', '--merge', 'copy2', a, 'dst'], dir);
    await ok(bitmapCommand, ['--merge', 'src', '-b', b, a, 'dst'], dir); // into a non-empty one: OR
    expectClean(a);
    const withWrite = atGranularity(more, 8 * K, size);
    expect(await nbdDirtyMaps(a, ['copy', 'copy2', 'coarse', 'dst'])).toEqual({ copy: withWrite, copy2: withWrite, coarse: atGranularity(more, 256 * K, size), dst: withWrite });
    expect(atGranularity(writes, 8 * K, size)).not.toEqual(withWrite);
  }, 120_000);

  it('refuses what qemu-img refuses, with its messages', async () => {
    const dir = tmpDir();
    const img = join(dir, 'd.qcow2');
    must(qemuImg(['create', '-f', 'qcow2', img, '1G']), 'create');
    const fails = async (args: string[], msg: RegExp) => {
      const r = await qcowkit(bitmapCommand, args, dir);
      expect(r.status, r.stderr).toBe(1);
      expect(r.stderr).toMatch(msg);
    };
    await fails([img, 'x'], /Need at least one of --add, --remove, --clear, --enable, --disable, or --merge/);
    await fails(['--add', img], /Expecting filename and bitmap name/);
    await fails(['--add', '-g', '256', img, 'x'], /Operation add on bitmap x failed: Granularity must be power of 2 and at least 512/);
    await fails(['--add', '-g', '3000', img, 'x'], /Granularity must be power of 2/);
    await fails(['--add', '-g', '4G', img, 'x'], /Granularity must be power of 2/);
    await fails(['--clear', '-g', '64k', img, 'x'], /granularity only supported with --add/);
    await fails(['--merge', 'x', '-F', 'qcow2', img, 'y'], /-F only supported with -b/);
    await fails(['--add', '-b', img, img, 'y'], /Merge bitmap source file only supported with --merge/);
    await fails(['--remove', img, 'nope'], /Operation remove on bitmap nope failed: Dirty bitmap 'nope' not found/);
    await fails(['--add', img, ''], /Bitmap name cannot be empty/);
    await fails(['--add', img, 'n'.repeat(1024)], /too long/);
    await ok(bitmapCommand, ['--add', '-g', '2G', img, 'big'], dir);
    await fails(['--add', img, 'big'], /Bitmap already exists: big/);
    // Actions run in order: the add happens, the failing merge stops the run.
    await fails(['--add', '--merge', 'nope', img, 'half'], /Operation merge on bitmap half failed: Dirty bitmap 'nope' not found/);
    expect(infoBitmaps(img).map((b) => b.name)).toEqual(['big', 'half']);
    expectClean(img);
    // v2 images can't hold bitmaps.
    const v2 = join(dir, 'v2.qcow2');
    must(qemuImg(['create', '-f', 'qcow2', '-o', 'compat=0.10', v2, '1G']), 'create v2');
    await fails(['--add', v2, 'x'], /Cannot store dirty bitmaps in qcow2 v2 files/);
  });

  it('in-use bitmaps (QEMU died): inconsistent, refused as merge sources and for dumps, removable; --check --repair', async () => {
    const dir = tmpDir();
    const img = join(dir, 'crashed.qcow2');
    must(qemuImg(['create', '-f', 'qcow2', img, '256M']), 'create');
    must(qemuImg(['bitmap', '--add', img, 'live']), 'add');
    must(qemuImg(['bitmap', '--add', img, 'other']), 'add');
    qemuIo(img, ['write 0 64k', 'abort']);
    expect(infoBitmaps(img).map((b) => b.flags)).toEqual([['in-use', 'auto'], ['in-use', 'auto']]);
    const dump = await qcowkit(bitmapCommand, ['--dump', img, 'live'], dir);
    expect(dump.status).toBe(1);
    expect(dump.stderr).toMatch(/Bitmap 'live' is inconsistent and cannot be used/);
    const merge = await qcowkit(bitmapCommand, ['--add', '--merge', 'live', img, 'fresh'], dir);
    // QEMU's second line (remove the bitmap, by its QMP command) on the same line, naming qcowkit's.
    const copy = join(dir, 'copy.qcow2');
    copyFileSync(img, copy);
    expect(qemuImg(['bitmap', '--merge', 'live', copy, 'fresh']).stderr).toContain("Bitmap 'live' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk\n");
    expect(merge.stderr).toBe(`qcowkit: ${img}: Operation merge on bitmap fresh failed: Bitmap 'live' is inconsistent and cannot be used; try 'qcowkit bitmap --remove ${img} live' to delete this bitmap from disk\n`);
    // The advice works.
    copyFileSync(img, copy);
    await ok(bitmapCommand, ['--remove', copy, 'live'], dir);
    expect(infoBitmaps(copy).map((b) => b.name)).toEqual(['other', 'fresh']);
    const chk = await qcowkit(bitmapCommand, ['--check', '--output', 'json', img], dir);
    expect(chk.status).toBe(2);
    const report = JSON.parse(chk.stdout);
    expect(report.bitmaps.map((b: { name: string; inconsistent: boolean }) => [b.name, b.inconsistent])).toEqual([
      ['live', true],
      ['other', true],
      ['fresh', false],
    ]);
    await ok(bitmapCommand, ['--remove', img, 'other'], dir);
    expectClean(img);
    const rep = await qcowkit(bitmapCommand, ['--check', '--repair', '--output', 'json', img], dir);
    expect(rep.status, rep.stderr).toBe(0);
    expect(JSON.parse(rep.stdout).removed).toBe(1);
    expectClean(img);
    expect(infoBitmaps(img)).toEqual([{ name: 'fresh', granularity: 65536, flags: ['auto'] }]);
    // QEMU uses the survivor again.
    qemuWrites(img, 256 * M, 3, prng(5));
    expect((await nbdDirtyMaps(img, ['fresh']))['fresh']!.length).toBeGreaterThan(0);
  });

  it('the first bitmap of an overlay with 512 B clusters: extension added, backing name moved', async () => {
    const dir = tmpDir();
    const base = join(dir, 'base.qcow2');
    const top = join(dir, 'top.qcow2');
    must(qemuImg(['create', '-f', 'qcow2', base, '64M']), 'create base');
    must(qemuImg(['create', '-f', 'qcow2', '-o', 'cluster_size=512', '-b', 'base.qcow2', '-F', 'qcow2', top]), 'create top');
    await ok(bitmapCommand, ['--add', top, 'b'], dir);
    const info = qemuImgJson(['info', top]);
    expect(info['backing-filename']).toBe('base.qcow2');
    expect(info['backing-filename-format']).toBe('qcow2');
    expect(infoBitmaps(top)).toEqual([{ name: 'b', granularity: 4096, flags: ['auto'] }]);
    expectClean(top);
    must(qemuIo(top, ['write 1M 4k']), 'write');
    expect(await nbdDirtyMaps(top, ['b'])).toEqual({ b: [{ start: M, length: 4096 }] });
    await ok(bitmapCommand, ['--remove', top, 'b'], dir);
    expectClean(top);
    expect(qemuImgJson(['info', top])['backing-filename']).toBe('base.qcow2');
  });

  it('markBitmapsDirty marks enabled, consistent bitmaps only (the library call commit and rebase use)', async () => {
    const dir = tmpDir();
    const img = join(dir, 'm.qcow2');
    const size = 16 * G;
    must(qemuImg(['create', '-f', 'qcow2', img, String(size)]), 'create');
    must(qemuImg(['bitmap', '--add', '-g', '128k', img, 'on']), 'add');
    must(qemuImg(['bitmap', '--add', '--disable', img, 'off']), 'add');
    const ranges = [
      { start: 0, length: 1 },
      { start: 5 * M + 100, length: 300 * K },
      { start: 3 * G, length: 2 * G },
      { start: size - 512, length: 512 },
    ];
    const h = await openImage(img, { writable: true });
    try {
      expect(await markBitmapsDirty(h, ranges)).toEqual(['on']);
    } finally {
      await h.close();
    }
    expectClean(img);
    expect(await nbdDirtyMaps(img, ['on', 'off'])).toEqual({ on: atGranularity(ranges, 128 * K, size), off: [] });
  });

  it('check: bitmap tables, data clusters and directory flags judged and counted as qemu-img check does', async () => {
    const dir = tmpDir();
    const img = join(dir, 'c.qcow2');
    must(qemuImg(['create', '-f', 'qcow2', img, '1G']), 'create');
    must(qemuImg(['bitmap', '--add', img, 'b0']), 'add');
    must(qemuImg(['bitmap', '--add', '-g', '4k', img, 'b1']), 'add');
    must(qemuIo(img, ['write 0 1M', 'write 500M 64k']), 'write');
    const h = await openImage(img);
    const [b0, b1] = h.bitmaps.map((b) => ({ ...b }));
    const dirOffset = h.header.bitmaps!.directoryOffset;
    await h.close();
    const b0Data = readFileSync(img).readBigUInt64BE(b0!.tableOffset);
    const u64 = (v: bigint) => {
      const b = Buffer.alloc(8);
      b.writeBigUInt64BE(v);
      return b;
    };
    const cases: Array<[string, number, Buffer]> = [
      ['clean', 0, Buffer.alloc(0)],
      ['table entry with a reserved bit', b1!.tableOffset, u64(b0Data | 2n)],
      ['data cluster shared with another bitmap', b1!.tableOffset, u64(b0Data)],
      ['data cluster past the end of the file', b1!.tableOffset, u64(0x10000000n)],
      ['all-ones entry (its data cluster leaks)', b1!.tableOffset, u64(1n)],
      ['reserved flag bit', dirOffset + 12, Buffer.from([0, 0, 0, 8])],
      ['table size not matching the disk', dirOffset + 8, Buffer.from([0, 0, 0, 2])],
    ];
    for (const [what, at, bytes] of cases) {
      const f = join(dir, `${what.replace(/\W+/g, '-')}.qcow2`);
      copyFileSync(img, f);
      if (bytes.length) patchBytes(f, at, bytes);
      const q = qemuImg(['check', '--output=json', f]);
      const k = await qcowkit(checkCommand, ['--output', 'json', f], dir);
      expect(k.status, `${what}: ${k.stderr}`).toBe(q.status);
      if (q.status !== 1) expect(JSON.parse(k.stdout), what).toEqual(JSON.parse(q.stdout));
      if (what.startsWith('all-ones')) {
        // The all-ones form (QEMU reads it, never writes it): one cluster of bits at 4 KiB
        // granularity covers the whole 1 GiB disk, all dirty, as QEMU serves it.
        const dump = JSON.parse(await ok(bitmapCommand, ['--dump', '--output', 'json', f, 'b1'], dir));
        expect(dump.extents).toEqual((await nbdDirtyMaps(f, ['b1']))['b1']);
        expect(dump.extents).toEqual([{ start: 0, length: G }]);
      }
    }
  });

  it('bitmap tables are validated where the image is opened: every operation refuses a bad one as QEMU does; an in-use one is not loaded', async () => {
    const dir = tmpDir();
    const img = join(dir, 't.qcow2');
    must(qemuImg(['create', '-f', 'qcow2', img, '1G']), 'create');
    must(qemuImg(['bitmap', '--add', img, 'b0']), 'add');
    must(qemuImg(['bitmap', '--add', img, 'b1']), 'add');
    must(qemuIo(img, ['write 0 1M']), 'write');
    const h = await openImage(img);
    const b1 = h.bitmaps.find((b) => b.name === 'b1')!.tableOffset;
    await h.close();
    const entry = readFileSync(img).readBigUInt64BE(b1);
    const bad = Buffer.alloc(8);
    bad.writeBigUInt64BE(entry | 0x100n); // a reserved bit
    const broken = join(dir, 'broken.qcow2');
    copyFileSync(img, broken);
    patchBytes(broken, b1, bad);
    const message = /Could not read bitmap_table table from image for bitmap 'b1'/;
    expect(qemuImg(['check', broken]).stderr).toMatch(message);
    for (const args of [['check', broken], ['bitmap', '--dump', broken, 'b0'], ['bitmap', '--clear', broken, 'b0'], ['changes', '--bitmap', 'b0', broken]]) {
      const cmd = args[0] === 'check' ? checkCommand : args[0] === 'changes' ? changesCommand : bitmapCommand;
      const r = await qcowkit(cmd, args.slice(1), dir);
      expect(r.status, args.join(' ')).toBe(1);
      expect(r.stderr, args.join(' ')).toMatch(message);
    }
    await expect(openImage(broken)).rejects.toThrow(message);
    // The same entry in a bitmap QEMU left in use: the image opens (the table is not loaded), and
    // removing the bitmap releases its table but none of the clusters a bad table names.
    const inUse = join(dir, 'in-use.qcow2');
    copyFileSync(broken, inUse);
    const h2 = await openImage(img);
    const dirOffset = h2.header.bitmaps!.directoryOffset;
    await h2.close();
    const flagsAt = dirOffset + Math.ceil((24 + 2) / 8) * 8 + 12; // b1's flags: second entry
    patchBytes(inUse, flagsAt, Buffer.from([0, 0, 0, 3]));
    expect(infoBitmaps(inUse).map((b) => b.flags)).toEqual([['auto'], ['in-use', 'auto']]);
    await ok(bitmapCommand, ['--remove', inUse, 'b1'], dir);
    const r = qemuImg(['check', '--output=json', inUse]);
    expect([0, 3]).toContain(r.status);
    expect(JSON.parse(r.stdout)['corruptions'] ?? 0).toBe(0);
    expect(infoBitmaps(inUse).map((b) => b.name)).toEqual(['b0']);
  });

  it("commit marks the base's recording bitmaps for every range it writes, as qemu-img commit does", async () => {
    const results = await commitBothWays({
      base: { size: G, bitmaps: [{ name: 'rec', granularity: '128k' }, { name: 'off', disabled: true }], writes: ['write 0 4M'] },
      top: { writes: ['write -z 300M 2M', 'write -z -u 600M 1M'], random: { count: 25, seed: 11 } },
    });
    expect(results['qcowkit']).toEqual(results['qemu-img']);
    expect(results['qcowkit'].maps['rec']!.length).toBeGreaterThan(1);
  });

  it('changes --since equals the union of what qemu-img map shows allocated above that layer', async () => {
    const dir = tmpDir();
    const [base, mid, top] = ['base', 'mid', 'top'].map((n) => join(dir, `${n}.qcow2`)) as [string, string, string];
    const size = 512 * M;
    must(qemuImg(['create', '-f', 'qcow2', base, String(size)]), 'base');
    must(qemuImg(['create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', '-o', 'cluster_size=4k', mid]), 'mid');
    must(qemuImg(['create', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', top]), 'top');
    const rnd = prng(3);
    qemuWrites(base, size, 20, rnd);
    qemuWrites(mid, size, 20, rnd);
    qemuWrites(top, size, 20, rnd);
    must(qemuIo(top, ['write -z 100M 3M', 'write -z -u 200M 1M']), 'zero writes');
    const map = qemuImgJson<Array<{ start: number; length: number; depth: number; present: boolean }>>(['map', top]);
    for (const [since, depth] of [
      ['base.qcow2', 2],
      [mid, 1],
    ] as const) {
      const expected = coalesce(map.filter((e) => e.present && e.depth < depth).map((e) => ({ start: e.start, length: e.length })));
      const got = JSON.parse(await ok(changesCommand, ['--output', 'json', '--since', since, top], dir));
      expect(got).toEqual(expected);
    }
  });
});
