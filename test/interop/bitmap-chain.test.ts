// Bitmap-aware chain operations: `commit --bitmaps` (the committed layers' bitmaps created in the
// base when missing and merged into it) and `create -b ... --bitmaps` (the backing file's
// recording bitmaps re-created in the new overlay). Bitmaps are made and dirtied by QEMU's tools;
// the results are read back by QEMU (qemu-img info/check, qemu-nbd -B + nbdinfo).
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { expect, it } from 'vitest';
import { commit, create } from '../../src/index.js';
import { describeQemu, qemuImg, qemuImgJson, qemuIo } from '../helpers/qemu.js';
import { nbdDirtyMaps, atGranularity, coalesce, type Extent } from '../helpers/nbd.js';
import { runCli } from '../helpers/cli.js';
import { sha256, tmpDir } from '../helpers/tmp.js';

const K = 1024;
const M = 1024 * K;

function must(r: { status: number; stdout: string; stderr: string }, what: string): void {
  if (r.status !== 0) throw new Error(`${what} failed (${r.status}): ${r.stdout}${r.stderr}`);
}

interface InfoBitmap {
  name: string;
  granularity: number;
  flags: string[];
}

function infoBitmaps(file: string): InfoBitmap[] {
  const j = qemuImgJson(['info', file]);
  return (j['format-specific']?.data?.bitmaps ?? []) as InfoBitmap[];
}

/** A qemu-io holding the image open read-write is SIGKILLed: its bitmaps stay marked in use. */
async function leaveInUse(file: string): Promise<void> {
  const child = spawn('qemu-io', ['-f', 'qcow2', '-c', 'sleep 20000', file], { stdio: 'ignore' });
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  for (let i = 0; i < 200; i++) {
    await new Promise((r) => setTimeout(r, 25));
    if (infoBitmapsShared(file).some((b) => b.flags.includes('in-use'))) break;
  }
  child.kill('SIGKILL');
  await exited;
}

function infoBitmapsShared(file: string): InfoBitmap[] {
  const r = qemuImg(['info', '-U', '--output=json', file]);
  if (r.status !== 0) return [];
  return (JSON.parse(r.stdout)['format-specific']?.data?.bitmaps ?? []) as InfoBitmap[];
}

function union(...lists: Extent[][]): Extent[] {
  return coalesce(lists.flat().sort((a, b) => a.start - b.start));
}

describeQemu('bitmap-aware chain operations', () => {
  it('commit --bitmaps creates missing bitmaps in the base and merges every consistent one (any granularity); QEMU reads the result', async () => {
    const dir = tmpDir();
    const base = join(dir, 'base.qcow2');
    const mid = join(dir, 'mid.qcow2');
    const top = join(dir, 'top.qcow2');
    const size = 256 * M;
    must(qemuImg(['create', '-q', '-f', 'qcow2', base, String(size)]), 'base');
    must(qemuImg(['bitmap', '--add', '-g', '1M', '--disable', base, 'weekly']), 'base bitmap');
    must(qemuIo(base, ['write -P 1 0 4M']), 'base data');
    must(qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', mid]), 'mid');
    must(qemuImg(['bitmap', '--add', mid, 'weekly']), 'mid bitmap');
    must(qemuImg(['bitmap', '--add', '-g', '128k', mid, 'daily']), 'mid bitmap');
    must(qemuIo(mid, ['write -P 2 10M 192k', 'write -P 3 100M 64k']), 'mid data');
    must(qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', top]), 'top');
    must(qemuImg(['bitmap', '--add', top, 'daily']), 'top bitmap');
    must(qemuImg(['bitmap', '--add', '-g', '64k', '--disable', top, 'archive']), 'top bitmap');
    must(qemuIo(top, ['write -P 4 20M 64k', 'write -P 5 200M 1M']), 'top data');
    // What QEMU holds before (the layers' own bitmaps).
    const midMaps = await nbdDirtyMaps(mid, ['weekly', 'daily']);
    const topMaps = await nbdDirtyMaps(top, ['daily']);
    must(qemuImg(['convert', '-O', 'raw', top, join(dir, 'before.raw')]), 'convert');

    const dry = await commit(top, { base: 'base.qcow2', bitmaps: true, dryRun: true });
    expect(dry.bitmaps?.map((b) => [b.name, b.created])).toEqual([
      ['daily', true],
      ['archive', true],
      ['weekly', false],
    ]);
    const r = await commit(top, { base: 'base.qcow2', bitmaps: true });
    expect(r.bitmaps).toEqual(dry.bitmaps);
    for (const f of [base, mid, top]) expect(qemuImg(['check', f]).status, f).toBe(0);
    must(qemuImg(['convert', '-O', 'raw', top, join(dir, 'after.raw')]), 'convert');
    expect(sha256(join(dir, 'after.raw'))).toBe(sha256(join(dir, 'before.raw')));

    const info = infoBitmaps(base);
    expect(info.map((b) => [b.name, b.granularity, b.flags])).toEqual([
      ['weekly', 1 * M, []],
      ['daily', 64 * K, ['auto']], // created as the topmost source: top's daily, 64 KiB, recording
      ['archive', 64 * K, []],
    ]);
    // weekly (1 MiB, disabled in the base): the base's own bits (none) | mid's weekly, coarsened.
    // daily: top's daily | mid's daily (128 KiB bits, each covering two 64 KiB bits).
    const got = await nbdDirtyMaps(base, ['weekly', 'daily', 'archive']);
    expect(got.weekly).toEqual(atGranularity(midMaps.weekly!, M, size));
    expect(got.daily).toEqual(union(topMaps.daily!, midMaps.daily!));
    expect(got.archive).toEqual([]);
  });

  it('commit --bitmaps leaves out an in-use source (with a warning) and refuses an in-use target before writing anything', async () => {
    const dir = tmpDir();
    const base = join(dir, 'base.qcow2');
    const top = join(dir, 'top.qcow2');
    must(qemuImg(['create', '-q', '-f', 'qcow2', base, '64M']), 'base');
    must(qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top]), 'top');
    must(qemuImg(['bitmap', '--add', top, 'good']), 'bitmap');
    must(qemuImg(['bitmap', '--add', top, 'crashed']), 'bitmap');
    must(qemuIo(top, ['write -P 7 1M 1M']), 'data');
    await leaveInUse(top);
    // (qemu-io marks every bitmap in use: make 'good' good again through qemu-img.)
    must(qemuImg(['bitmap', '--remove', top, 'good']), 'remove');
    must(qemuImg(['bitmap', '--add', top, 'good']), 'add');
    must(qemuIo(top, ['write -P 8 5M 64k']), 'data');

    const cli = runCli(['commit', '-d', '--bitmaps', top]);
    expect(cli.status, cli.stderr).toBe(0);
    expect(cli.stderr).toMatch(/bitmap 'crashed' is inconsistent \(in use\): not merged/);
    expect(infoBitmaps(base).map((b) => b.name)).toEqual(['good']);
    expect((await nbdDirtyMaps(base, ['good'])).good).toEqual([{ start: 5 * M, length: 64 * K }]);

    // The base's bitmap of a merged name left in use: refused, every file byte-identical.
    must(qemuImg(['bitmap', '--add', base, 'busy']), 'bitmap');
    await leaveInUse(base);
    must(qemuImg(['bitmap', '--remove', top, 'crashed']), 'remove');
    must(qemuImg(['bitmap', '--add', top, 'busy']), 'bitmap');
    const before = [sha256(base), sha256(top)];
    const bad = runCli(['commit', '--bitmaps', top]);
    expect(bad.status).toBe(1);
    expect(bad.stderr).toMatch(/^qcowkit: .*base\.qcow2: Bitmap '(good|busy)' of the base is inconsistent/);
    expect([sha256(base), sha256(top)]).toEqual(before);
  });

  it('create -b --bitmaps re-creates the recording bitmaps of the backing file, empty; refuses v2 and -u', async () => {
    const dir = tmpDir();
    const base = join(dir, 'base.qcow2');
    must(qemuImg(['create', '-q', '-f', 'qcow2', base, '1G']), 'base');
    must(qemuImg(['bitmap', '--add', base, 'b0']), 'bitmap');
    must(qemuImg(['bitmap', '--add', '-g', '2M', base, 'b1']), 'bitmap');
    must(qemuImg(['bitmap', '--add', '--disable', base, 'old']), 'bitmap');
    must(qemuIo(base, ['write 0 8M']), 'dirty the base bitmaps');
    const top = join(dir, 'top.qcow2');
    const r = runCli(['create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', '--bitmaps', top]);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^Formatting '.*top\.qcow2', fmt=qcow2 /);
    expect(r.stdout).toContain('Bitmaps re-created from the backing file: b0, b1');
    expect(qemuImg(['check', top]).status).toBe(0);
    expect(infoBitmaps(top).map((b) => [b.name, b.granularity, b.flags])).toEqual([
      ['b0', 64 * K, ['auto']],
      ['b1', 2 * M, ['auto']],
    ]);
    const maps = await nbdDirtyMaps(top, ['b0', 'b1']);
    expect(maps).toEqual({ b0: [], b1: [] });
    // Guest writes through QEMU are recorded in them.
    must(qemuIo(top, ['write -P 9 100M 64k']), 'write');
    expect((await nbdDirtyMaps(top, ['b0'])).b0).toEqual([{ start: 100 * M, length: 64 * K }]);

    const json = runCli(['create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', '--bitmaps', '--output', 'json', join(dir, 't2.qcow2')]);
    expect(json.status, json.stderr).toBe(0);
    expect((JSON.parse(json.stdout) as { bitmaps: unknown }).bitmaps).toEqual([
      { name: 'b0', granularity: 64 * K },
      { name: 'b1', granularity: 2 * M },
    ]);
    await expect(create(join(dir, 'v2.qcow2'), { format: 'qcow2', backing: { file: 'base.qcow2', format: 'qcow2' }, options: { compat: '0.10' }, bitmaps: true })).rejects.toThrow(/v2/);
    await expect(create(join(dir, 'u.qcow2'), { format: 'qcow2', size: M, unsafe: true, backing: { file: 'base.qcow2', format: 'qcow2' }, bitmaps: true })).rejects.toThrow(/-u/);
    expect(runCli(['info', join(dir, 'v2.qcow2')]).status).not.toBe(0); // nothing was created
  });
});
