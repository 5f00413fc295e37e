// rebase against qemu-img 7.2 on chains built by qemu-img/qemu-io: the result reads exactly as
// qemu-img's rebase of a copy (qemu-img compare), the guest view is unchanged, qemu-img check is
// clean, qemu-img info names the backing file as qemu-img writes it, and qcowkit allocates no
// more bytes than qemu-img. The dry run's figures equal what the real rebase then writes, and
// plan's figures equal what commit -d / rebase then copy.
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { expect, it } from 'vitest';
import { nbdDirtyMaps } from '../helpers/nbd.js';
import { describeQemu, qemuImg, qemuImgJson, qemuIo } from '../helpers/qemu.js';
import { tmpDir } from '../helpers/tmp.js';
import { runCommandInProcess } from '../helpers/cli.js';
import { command as rebaseCommand } from '../../src/cli/commands/rebase.js';
import { command as planCommand } from '../../src/cli/commands/plan.js';
import { command as commitCommand } from '../../src/cli/commands/commit.js';
import { rebase, plan, openImage } from '../../src/index.js';
import type { RebaseResult } from '../../src/ops/rebase.js';

function must(r: { status: number; stderr: string; stdout: string }, what: string): string {
  if (r.status !== 0) throw new Error(`${what} failed (${r.status}): ${r.stdout}${r.stderr}`);
  return r.stdout;
}

/** Runs "qemu-img ..." / "qemu-io FILE cmd; cmd" lines in dir. */
function build(dir: string, lines: string[]): void {
  for (const line of lines) {
    const [tool, ...rest] = line.split(' ');
    if (tool === 'qemu-img') must(qemuImg(rest.map((a) => (a === '""' ? '' : a)), { cwd: dir }), line);
    else if (tool === 'qemu-io') {
      const file = rest[0]!;
      const cmds = rest.slice(1).join(' ').split(';').map((c) => c.trim()).filter(Boolean);
      must(qemuIo(join(dir, file), cmds), line);
    } else if (tool === 'raw') {
      // raw FILE SIZE BYTE@OFFSET,...
      const [file, size, fills] = rest as [string, string, string | undefined];
      const buf = Buffer.alloc(Number(size));
      for (const f of (fills ?? '').split(',').filter(Boolean)) {
        const [b, at, len] = f.split(/[@+]/).map(Number) as [number, number, number];
        buf.fill(b, at, at + len);
      }
      writeFileSync(join(dir, file), buf);
    } else throw new Error(`bad build line ${line}`);
  }
}

/** Guest bytes the image maps itself as data (allocated, not zero), from qemu-img map. */
function ownDataBytes(file: string): number {
  const map = qemuImgJson<Array<{ depth: number; data: boolean; zero: boolean; length: number; present: boolean }>>(['map', '-f', 'qcow2', file]);
  return map.filter((e) => e.depth === 0 && e.data).reduce((s, e) => s + e.length, 0);
}

function infoOf(file: string): { 'backing-filename'?: string; 'backing-filename-format'?: string } {
  return qemuImgJson(['info', '-U', file]);
}

interface Case {
  name: string;
  build: string[];
  /** The image to rebase (relative to the case dir) and the rebase arguments. */
  image: string;
  args: string[];
  /** qemu-img's arguments when they differ (e.g. -c, which 7.2 lacks). */
  qemuArgs?: string[];
  /** Expect these at least (sanity that the case really copies). */
  minData?: number;
  compressed?: boolean;
  /** -c: exactly this many compressed clusters in the result. */
  compressedClusters?: number;
}

const M = 1024 * 1024;

const CASES: Case[] = [
  {
    name: 'v3 64k: drop the middle layer (new backing in the old chain)',
    build: [
      'qemu-img create -q -f qcow2 b0.qcow2 16M',
      'qemu-io b0.qcow2 write -P 1 0 4M; write -P 2 8M 1M',
      'qemu-img create -q -f qcow2 -b b0.qcow2 -F qcow2 b1.qcow2',
      'qemu-io b1.qcow2 write -P 3 1M 2M; write -z 8M 64k; write -P 0 12M 512k; write -P 6 5M 3000',
      'qemu-img create -q -f qcow2 -b b1.qcow2 -F qcow2 top.qcow2',
      'qemu-io top.qcow2 write -P 4 1536k 1M; write -P 5 10M 100k',
    ],
    image: 'top.qcow2',
    args: ['-b', 'b0.qcow2', '-F', 'qcow2'],
    minData: M,
  },
  {
    name: 'v3 64k: onto an unrelated image (both chains compared), new backing larger',
    build: [
      'qemu-img create -q -f qcow2 b0.qcow2 16M',
      'qemu-io b0.qcow2 write -P 1 0 4M; write -P 2 8M 1M',
      'qemu-img create -q -f qcow2 n0.qcow2 24M',
      'qemu-io n0.qcow2 write -P 1 0 2M; write -P 9 2M 64k; write -P 7 9M 1M; write -P 8 20M 1M',
      'qemu-img create -q -f qcow2 -b b0.qcow2 -F qcow2 top.qcow2 24M',
      'qemu-io top.qcow2 write -P 4 3M 128k',
    ],
    image: 'top.qcow2',
    args: ['-b', 'n0.qcow2', '-F', 'qcow2'],
    minData: M,
  },
  {
    name: 'old backing shorter than the image: past its end the new data becomes zero clusters',
    build: [
      'qemu-img create -q -f qcow2 b0.qcow2 4M',
      'qemu-io b0.qcow2 write -P 1 0 1M',
      'qemu-img create -q -f qcow2 n0.qcow2 16M',
      'qemu-io n0.qcow2 write -P 2 0 512k; write -P 3 6M 2M; write -P 0 10M 1M',
      'qemu-img create -q -f qcow2 -b b0.qcow2 -F qcow2 top.qcow2 16M',
      'qemu-io top.qcow2 write -P 4 7M 64k',
    ],
    image: 'top.qcow2',
    args: ['-b', 'n0.qcow2', '-F', 'qcow2'],
  },
  {
    name: 'flatten (-b ""), v3 with a zero cluster in the top',
    build: [
      'qemu-img create -q -f qcow2 b0.qcow2 8M',
      'qemu-io b0.qcow2 write -P 1 0 3M; write -P 0 4M 1M',
      'qemu-img create -q -f qcow2 -b b0.qcow2 -F qcow2 top.qcow2',
      'qemu-io top.qcow2 write -z 1M 64k; write -P 4 2M 100k',
    ],
    image: 'top.qcow2',
    args: ['-b', '""'],
    minData: 2 * M,
  },
  {
    name: 'v2 64k, drop the middle layer',
    build: [
      'qemu-img create -q -f qcow2 -o compat=0.10 b0.qcow2 8M',
      'qemu-io b0.qcow2 write -P 1 0 2M',
      'qemu-img create -q -f qcow2 -o compat=0.10 -b b0.qcow2 -F qcow2 b1.qcow2',
      'qemu-io b1.qcow2 write -P 2 1M 2M; write -z 4M 64k',
      'qemu-img create -q -f qcow2 -o compat=0.10 -b b1.qcow2 -F qcow2 top.qcow2',
      'qemu-io top.qcow2 write -P 3 2M 64k',
    ],
    image: 'top.qcow2',
    args: ['-b', 'b0.qcow2', '-F', 'qcow2'],
    minData: M,
  },
  {
    name: 'mixed cluster sizes: 512 B top over 64k and 4k layers',
    build: [
      'qemu-img create -q -f qcow2 -o cluster_size=64k b0.qcow2 4M',
      'qemu-io b0.qcow2 write -P 1 0 1M',
      'qemu-img create -q -f qcow2 -o cluster_size=4k -b b0.qcow2 -F qcow2 b1.qcow2',
      'qemu-io b1.qcow2 write -P 2 4k 8k; write -P 3 1000k 48k; write -P 1 2M 4k',
      'qemu-img create -q -f qcow2 -o cluster_size=512 -b b1.qcow2 -F qcow2 top.qcow2',
      'qemu-io top.qcow2 write -P 5 6k 1k',
    ],
    image: 'top.qcow2',
    args: ['-b', 'b0.qcow2', '-F', 'qcow2'],
  },
  {
    name: 'mixed cluster sizes: 2M top over 4k layers',
    build: [
      'qemu-img create -q -f qcow2 -o cluster_size=4k b0.qcow2 8M',
      'qemu-io b0.qcow2 write -P 1 0 3M',
      'qemu-img create -q -f qcow2 -o cluster_size=4k -b b0.qcow2 -F qcow2 b1.qcow2',
      'qemu-io b1.qcow2 write -P 2 100k 8k; write -P 3 5M 4k',
      'qemu-img create -q -f qcow2 -o cluster_size=2M -b b1.qcow2 -F qcow2 top.qcow2',
      'qemu-io top.qcow2 write -P 5 2M 4k',
    ],
    image: 'top.qcow2',
    args: ['-b', 'b0.qcow2', '-F', 'qcow2'],
  },
  {
    name: 'extended L2 top (128k clusters, 4k subclusters)',
    build: [
      'qemu-img create -q -f qcow2 b0.qcow2 8M',
      'qemu-io b0.qcow2 write -P 1 0 1M',
      'qemu-img create -q -f qcow2 -o cluster_size=4k -b b0.qcow2 -F qcow2 b1.qcow2',
      'qemu-io b1.qcow2 write -P 2 4k 4k; write -P 3 140k 20k; write -P 4 3M 8k',
      'qemu-img create -q -f qcow2 -o cluster_size=128k,extended_l2=on -b b1.qcow2 -F qcow2 top.qcow2',
      'qemu-io top.qcow2 write -P 5 8k 4k; write -P 6 144k 4k',
    ],
    image: 'top.qcow2',
    args: ['-b', 'b0.qcow2', '-F', 'qcow2'],
  },
  {
    name: 'compressed clusters in the old backing layer',
    build: [
      'qemu-img create -q -f qcow2 b0.qcow2 8M',
      'qemu-io b0.qcow2 write -P 1 0 1M',
      'qemu-img create -q -f qcow2 -b b0.qcow2 -F qcow2 b1src.qcow2',
      'qemu-io b1src.qcow2 write -P 2 512k 1M',
      'qemu-img create -q -f qcow2 -b b0.qcow2 -F qcow2 b1.qcow2',
      'qemu-io b1.qcow2 write -c -P 2 512k 64k; write -c -P 3 640k 64k; write -c -P 4 4M 64k',
      'qemu-img create -q -f qcow2 -b b1.qcow2 -F qcow2 top.qcow2',
      'qemu-io top.qcow2 write -P 5 0 64k',
    ],
    image: 'top.qcow2',
    args: ['-b', 'b0.qcow2', '-F', 'qcow2'],
  },
  {
    name: 'raw old backing, onto a qcow2 copy with differences',
    build: [
      'raw old.raw 4194304 1@0+1048576,2@2097152+65536',
      'qemu-img create -q -f qcow2 new.qcow2 4M',
      'qemu-io new.qcow2 write -P 1 0 512k; write -P 7 3M 64k',
      'qemu-img create -q -f qcow2 -b old.raw -F raw top.qcow2',
      'qemu-io top.qcow2 write -P 5 128k 64k',
    ],
    image: 'top.qcow2',
    args: ['-b', 'new.qcow2', '-F', 'qcow2'],
  },
  {
    name: 'qcow2 old backing onto a raw file',
    build: [
      'qemu-img create -q -f qcow2 b0.qcow2 4M',
      'qemu-io b0.qcow2 write -P 1 0 1M',
      'raw new.raw 4194304 1@0+524288,9@3145728+4096',
      'qemu-img create -q -f qcow2 -b b0.qcow2 -F qcow2 top.qcow2',
    ],
    image: 'top.qcow2',
    args: ['-b', 'new.raw', '-F', 'raw'],
  },
  {
    name: 'relative names from a subdirectory (stored as given)',
    build: [
      'qemu-img create -q -f qcow2 b0.qcow2 4M',
      'qemu-io b0.qcow2 write -P 1 0 1M',
      'qemu-img create -q -f qcow2 -b b0.qcow2 -F qcow2 b1.qcow2',
      'qemu-io b1.qcow2 write -P 2 256k 256k',
      'qemu-img create -q -f qcow2 -b ../b1.qcow2 -F qcow2 sub/top.qcow2',
      'qemu-io sub/top.qcow2 write -P 3 0 64k',
    ],
    image: 'sub/top.qcow2',
    args: ['-b', '../b0.qcow2', '-F', 'qcow2'],
  },
  {
    name: '-u: only the name changes (old backing missing is fine)',
    build: [
      'qemu-img create -q -f qcow2 b0.qcow2 4M',
      'qemu-img create -q -f qcow2 sub/base.qcow2 4M',
      'qemu-img create -q -f qcow2 -b b0.qcow2 -F qcow2 top.qcow2',
      'qemu-io top.qcow2 write -P 3 0 64k',
    ],
    image: 'top.qcow2',
    args: ['-u', '-b', 'sub/base.qcow2', '-F', 'qcow2'],
  },
  {
    name: '-c: copied clusters compressed (zlib), 64k',
    build: [
      'qemu-img create -q -f qcow2 b0.qcow2 8M',
      'qemu-io b0.qcow2 write -P 1 0 2M',
      'qemu-img create -q -f qcow2 -b b0.qcow2 -F qcow2 b1.qcow2',
      'qemu-io b1.qcow2 write -P 2 1M 2M; write -P 3 5M 1000',
      'qemu-img create -q -f qcow2 -b b1.qcow2 -F qcow2 top.qcow2',
      'qemu-io top.qcow2 write -P 4 1536k 64k',
    ],
    image: 'top.qcow2',
    args: ['-c', '-b', 'b0.qcow2', '-F', 'qcow2'],
    qemuArgs: ['-b', 'b0.qcow2', '-F', 'qcow2'],
    compressed: true,
  },
  {
    name: '-c with 512 B clusters and refcount_bits=1 (no packing into shared clusters)',
    build: [
      'qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=1 b0.qcow2 1M',
      'qemu-io b0.qcow2 write -P 1 0 64k',
      'qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=1 -b b0.qcow2 -F qcow2 top.qcow2',
    ],
    image: 'top.qcow2',
    args: ['-c', '-b', '""'],
    qemuArgs: ['-b', '""'],
    compressed: true,
  },
  {
    name: '-c with extended L2: clusters with differing subclusters beside the image\'s own are compressed whole',
    build: [
      'qemu-img create -q -f qcow2 -o extended_l2=on b0.qcow2 1M',
      'qemu-io b0.qcow2 write -P 1 0 512k',
      'qemu-img create -q -f qcow2 -o extended_l2=on -b b0.qcow2 -F qcow2 b1.qcow2',
      'qemu-io b1.qcow2 write -P 2 0 10k; write -P 3 200k 100k',
      'qemu-img create -q -f qcow2 -o extended_l2=on -b b1.qcow2 -F qcow2 top.qcow2',
      'qemu-io top.qcow2 write -P 4 16k 4k; write -P 5 256k 8k',
    ],
    image: 'top.qcow2',
    args: ['-c', '-b', 'b0.qcow2', '-F', 'qcow2'],
    qemuArgs: ['-b', 'b0.qcow2', '-F', 'qcow2'],
    compressed: true,
    // Clusters 0, 3 and 4 (64 KiB) hold differing subclusters; 0 and 4 also the image's own.
    compressedClusters: 3,
  },
];

describeQemu('rebase against qemu-img', () => {
  it.each(CASES)('$name', { timeout: 300_000 }, async (c) => {
    const t = (what: string) => process.env.REBASE_TEST_TIMING && process.stderr.write(`${what} ${performance.now().toFixed(0)}\n`);
    const dir = tmpDir();
    mkdirSync(join(dir, 'sub'));
    build(dir, c.build);
    const image = join(dir, c.image);
    const qCopy = image.replace(/\.qcow2$/, '.q.qcow2');
    const kCopy = image.replace(/\.qcow2$/, '.k.qcow2');
    copyFileSync(image, qCopy);
    copyFileSync(image, kCopy);
    const unsafe = c.args.includes('-u');
    const before = join(dir, 'before.raw');
    if (!unsafe) must(qemuImg(['convert', '-O', 'raw', image, before]), 'convert');
    const args = c.args.map((a) => (a === '""' ? '' : a));
    t('converted');
    must(qemuImg(['rebase', ...(c.qemuArgs ?? c.args).map((a) => (a === '""' ? '' : a)), qCopy]), 'qemu-img rebase');

    t('built');
    // Dry run first: its figures must be those of the real rebase.
    const dry = await runCommandInProcess(rebaseCommand, ['--dry-run', '--output', 'json', ...args, kCopy], dir);
    expect(dry.status, dry.stderr).toBe(0);
    const dryR = JSON.parse(dry.stdout) as RebaseResult;
    t('dry');
    expect(readFileSync(kCopy).equals(readFileSync(image))).toBe(true); // the dry run wrote nothing
    const real = await runCommandInProcess(rebaseCommand, ['--output', 'json', ...args, kCopy], dir);
    expect(real.status, real.stderr).toBe(0);
    const r = JSON.parse(real.stdout) as RebaseResult;
    for (const key of ['comparedBytes', 'dataBytes', 'zeroBytes', 'dataClusters', 'writtenRanges'] as const) expect(dryR[key], key).toBe(r[key]);
    if (c.minData) expect(r.dataBytes).toBeGreaterThanOrEqual(c.minData);

    t('rebased');
    // Header as qemu-img writes it.
    const qi = infoOf(qCopy);
    const ki = infoOf(kCopy);
    expect(ki['backing-filename']).toBe(qi['backing-filename']);
    expect(ki['backing-filename-format']).toBe(qi['backing-filename-format']);
    const check = qemuImgJson<{ corruptions?: number; leaks?: number; 'check-errors': number; 'compressed-clusters'?: number }>(['check', kCopy], { allowStatus: [0] });
    expect(check.corruptions ?? 0).toBe(0);
    expect(check.leaks ?? 0).toBe(0);
    if (unsafe) return;
    // Same content as qemu-img's result, and as before.
    expect(must(qemuImg(['compare', qCopy, kCopy]), 'compare')).toContain('Images are identical.');
    expect(must(qemuImg(['compare', '-F', 'raw', kCopy, before]), 'compare before')).toContain('Images are identical.');
    if (c.compressed) {
      expect(check['compressed-clusters'] ?? 0).toBeGreaterThan(0);
      if (c.compressedClusters !== undefined) expect(check['compressed-clusters']).toBe(c.compressedClusters);
      // QEMU reads every compressed cluster back (qemu-io read -P of the whole disk via convert).
      const back = join(dir, 'back.raw');
      must(qemuImg(['convert', '-O', 'raw', kCopy, back]), 'convert back');
      expect(readFileSync(back).equals(readFileSync(before).subarray(0, readFileSync(back).length))).toBe(true);
    } else {
      expect(ownDataBytes(kCopy)).toBeLessThanOrEqual(ownDataBytes(qCopy));
    }
  });

  it('keeps unknown header extensions and persistent bitmaps; enabled bitmaps marked as qemu-img marks them', async () => {
    const dir = tmpDir();
    build(dir, [
      'qemu-img create -q -f qcow2 b0.qcow2 4M',
      'qemu-io b0.qcow2 write -P 1 0 1M',
      'qemu-img create -q -f qcow2 -b b0.qcow2 -F qcow2 top.qcow2',
      'qemu-io top.qcow2 write -P 2 0 64k',
      'qemu-img bitmap --add --disable top.qcow2 off',
      'qemu-img bitmap --add -f qcow2 top.qcow2 on',
    ]);
    const top = join(dir, 'top.qcow2');
    // The enabled bitmap is marked for every range the rebase writes, as qemu-img rebase marks it.
    const [k, q] = [join(dir, 'k.qcow2'), join(dir, 'q.qcow2')];
    copyFileSync(top, k);
    copyFileSync(top, q);
    const marked = await runCommandInProcess(rebaseCommand, ['-b', '', k], dir);
    expect(marked.status, marked.stderr).toBe(0);
    must(qemuImg(['rebase', '-b', '', q]), 'qemu-img rebase');
    const km = await nbdDirtyMaps(k, ['on', 'off']);
    expect(km).toEqual(await nbdDirtyMaps(q, ['on', 'off']));
    expect(km['on']!.length).toBeGreaterThan(0);
    must(qemuImg(['check', k]), 'check');
    must(qemuImg(['bitmap', '--remove', top, 'on']), 'remove bitmap');
    // An unknown extension after the known ones (type 0x12345678, 5 bytes).
    const buf = readFileSync(top);
    const img = await openImage(top);
    const hl = img.header.headerLength;
    let off = hl;
    for (const e of img.header.extensions) off += 8 + Math.ceil(e.data.length / 8) * 8;
    await img.close();
    const nameOff = Number(buf.readBigUInt64BE(8));
    const name = buf.subarray(nameOff, nameOff + buf.readUInt32BE(16));
    const ext = Buffer.alloc(16);
    ext.writeUInt32BE(0x12345678, 0);
    ext.writeUInt32BE(5, 4);
    ext.write('hello', 8);
    const tail = Buffer.concat([ext, Buffer.alloc(8), name]);
    buf.fill(0, off, nameOff + name.length);
    tail.copy(buf, off);
    buf.writeBigUInt64BE(BigInt(off + 24), 8);
    writeFileSync(top, buf);
    must(qemuImg(['check', top]), 'check patched');
    await rebase(top, { backing: '' });
    const after = await openImage(top);
    expect(after.backingName).toBeUndefined();
    expect(after.header.extensions.find((e) => e.type === 0x12345678)?.data).toEqual(new Uint8Array(Buffer.from('hello')));
    expect(after.bitmaps.map((b) => b.name)).toEqual(['off']);
    await after.close();
    const info = qemuImgJson(['info', top]);
    expect(info['format-specific'].data.bitmaps.map((b: { name: string }) => b.name)).toEqual(['off']);
    must(qemuImg(['check', top]), 'check');
  });

  it('plan: the figures equal what commit -d and rebase then copy', async () => {
    const dir = tmpDir();
    build(dir, [
      'qemu-img create -q -f qcow2 b0.qcow2 16M',
      'qemu-io b0.qcow2 write -P 1 0 4M',
      'qemu-img create -q -f qcow2 -b b0.qcow2 -F qcow2 mid.qcow2',
      'qemu-io mid.qcow2 write -P 2 1M 3M; write -P 3 8M 1M; write -z 12M 128k',
      'qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2',
      'qemu-io top.qcow2 write -P 4 1M 2M',
    ]);
    const top = join(dir, 'top.qcow2');
    const p = await plan(top, { drop: 'mid.qcow2' });
    expect(p.layerDepth).toBe(1);
    expect(p.commit.possible).toBe(true);
    // pull copies only what top doesn't cover: 1 MiB of 3 MiB at 1M..4M, and 8M..9M
    expect(p.pull.dataBytes).toBe(2 * M);
    expect(p.commit.dataBytes).toBe(4 * M);
    expect(p.lessData).toBe('pull');
    const cli = await runCommandInProcess(planCommand, ['--output', 'json', 'top.qcow2', '--drop', 'mid.qcow2'], dir);
    expect(cli.status, cli.stderr).toBe(0);
    expect(JSON.parse(cli.stdout).pull.dataBytes).toBe(p.pull.dataBytes);

    // Pull for real on a copy.
    for (const f of ['top', 'mid', 'b0']) copyFileSync(join(dir, `${f}.qcow2`), join(dir, `${f}.bak`));
    const r = await rebase(top, { backing: 'b0.qcow2', backingFormat: 'qcow2' });
    expect([r.dataBytes, r.zeroBytes, r.dataClusters]).toEqual([p.pull.dataBytes, p.pull.zeroBytes, p.pull.dataClusters]);
    expect(r.growth).toBeLessThanOrEqual(p.pull.growth);
    // Commit for real on the originals.
    for (const f of ['top', 'mid', 'b0']) copyFileSync(join(dir, `${f}.bak`), join(dir, `${f}.qcow2`));
    const c = await runCommandInProcess(commitCommand, ['-d', '--output', 'json', 'mid.qcow2'], dir);
    expect(c.status, c.stderr).toBe(0);
    const cr = JSON.parse(c.stdout);
    expect([cr.dataBytes, cr.zeroBytes]).toEqual([p.commit.dataBytes, p.commit.zeroBytes]);
    must(qemuImg(['check', join(dir, 'b0.qcow2')]), 'check b0');
  });

  it('option rules and errors as qemu-img 7.2 (one line, exit 1)', async () => {
    const dir = tmpDir();
    build(dir, ['qemu-img create -q -f qcow2 b0.qcow2 1M', 'qemu-img create -q -f qcow2 -b b0.qcow2 -F qcow2 top.qcow2']);
    const cases: Array<[string[], RegExp]> = [
      [['top.qcow2'], /Must specify backing file \(-b\) or use unsafe mode \(-u\)/],
      [['-b', 'b0.qcow2', 'top.qcow2'], /Could not change the backing file to 'b0.qcow2': backing format must be specified/],
      [['-u', '-b', 'b0.qcow2', 'top.qcow2'], /backing format must be specified/],
      [['-b', 'nope.qcow2', '-F', 'qcow2', 'top.qcow2'], /Could not open new backing file '.*nope.qcow2'/],
      [['-u', '-b', 'b0.qcow2', '-F', 'foo', 'top.qcow2'], /Invalid format name: 'foo'/],
      [['-c', '-u', '-b', 'b0.qcow2', '-F', 'qcow2', 'top.qcow2'], /Cannot use -c in unsafe mode/],
      [['-b', 'top.qcow2', '-F', 'qcow2', 'top.qcow2'], /its own backing file/],
    ];
    const orig = readFileSync(join(dir, 'top.qcow2'));
    for (const [args, msg] of cases) {
      const r = await runCommandInProcess(rebaseCommand, args, dir);
      expect(r.status, args.join(' ')).toBe(1);
      expect(r.stderr).toMatch(msg);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      expect(readFileSync(join(dir, 'top.qcow2')).equals(orig), args.join(' ')).toBe(true);
    }
    // -u without -b drops the backing file, as qemu-img 7.2 does.
    const r = await runCommandInProcess(rebaseCommand, ['-u', 'top.qcow2'], dir);
    expect(r.status, r.stderr).toBe(0);
    expect(infoOf(join(dir, 'top.qcow2'))['backing-filename']).toBeUndefined();
  });

  it('an image without a backing file onto one (old view: zeros); data there becomes zero clusters (iotest 252)', async () => {
    const dir = tmpDir();
    build(dir, [
      'qemu-img create -q -f qcow2 top.qcow2 384k',
      'qemu-img create -q -f qcow2 new.qcow2 384k',
      'qemu-io top.qcow2 write -P 0x22 0 128k; write -P 0x11 128k 128k',
      'qemu-io new.qcow2 write -P 0x11 0 64k; write -P 0x11 128k 64k; write -P 0x11 256k 64k',
    ]);
    const top = join(dir, 'top.qcow2');
    const r = await rebase(top, { backing: 'new.qcow2', backingFormat: 'qcow2' });
    expect([r.dataBytes, r.zeroBytes]).toEqual([0, 65536]);
    const map = qemuImgJson<Array<{ start: number; depth: number; zero: boolean; present: boolean }>>(['map', top]);
    expect(map.find((e) => e.start === 262144)).toMatchObject({ depth: 0, zero: true, present: true });
    must(qemuIo(top, ['read -P 0x22 0 128k', 'read -P 0x11 128k 128k', 'read -P 0 256k 128k']), 'read back');
  });

  it('-u may point an image at itself, as qemu-img 7.2 (every later open reports the loop)', async () => {
    const dir = tmpDir();
    build(dir, ['qemu-img create -q -f qcow2 top.qcow2 1M']);
    const r = await runCommandInProcess(rebaseCommand, ['-u', '-b', 'top.qcow2', '-F', 'qcow2', 'top.qcow2'], dir);
    expect(r.status, r.stderr).toBe(0);
    expect(qemuImg(['info', '--backing-chain', join(dir, 'top.qcow2')]).stderr).toMatch(/infinite loop/);
  });

  it('zstd images: -c is refused in one line, nothing written', async () => {
    const dir = tmpDir();
    build(dir, [
      'qemu-img create -q -f qcow2 b0.qcow2 1M',
      'qemu-io b0.qcow2 write -P 1 0 64k',
      'qemu-img create -q -f qcow2 -o compression_type=zstd -b b0.qcow2 -F qcow2 top.qcow2',
    ]);
    const orig = readFileSync(join(dir, 'top.qcow2'));
    const r = await runCommandInProcess(rebaseCommand, ['-c', '-b', '', 'top.qcow2'], dir);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/zstd.*no maintained pure-JS zstd encoder/);
    expect(readFileSync(join(dir, 'top.qcow2')).equals(orig)).toBe(true);
  });
});
