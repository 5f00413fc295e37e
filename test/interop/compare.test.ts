// `qcowkit compare` versus `qemu-img compare` 7.2: same stdout and exit code for identical images
// (qcow2 vs its raw and flattened copies, chains vs flat copies), one-byte differences at many
// offsets (first differing 512-byte sector), size mismatches with zero and non-zero excess,
// strict mode (size and block-status mismatches at QEMU's offsets), -f/-F, -q, and errors (exit 2
// when an image can't be opened, 4 when its data can't be read).
//
// Most runs call the CLI command in-process (src/cli/commands/compare.ts through commander, as
// src/cli/main.ts does); the error cases go through `node bin/qcowkit.js` (needs `npm run build`).
import { closeSync, mkdirSync, openSync, readSync, writeFileSync, writeSync } from 'node:fs';
import { join, relative } from 'node:path';
import { beforeAll, expect, it } from 'vitest';
import { buildMatrix, type MatrixImage } from '../helpers/matrix.js';
import { describeQemu, qemuImg, qemuIo, run } from '../helpers/qemu.js';
import { runCli, runCommandInProcess } from '../helpers/cli.js';
import { expectOneLineError } from '../helpers/bytes.js';
import { sha256, tmpDir } from '../helpers/tmp.js';
import { command as compareCommand } from '../../src/cli/commands/compare.js';

/** `qcowkit` with ARGS in this process with `cwd`: stdout, stderr, exit code. */
const cli = (args: string[], cwd: string) => runCommandInProcess(compareCommand, args, cwd);

const K = 1024;
const M = 1024 * K;

let dir = '';
let matrix: MatrixImage[] = [];
const q = (args: string[]) => qemuImg(args, { cwd: dir });
function must(r: { status: number; stderr: string; stdout: string }, what: string): void {
  if (r.status !== 0) throw new Error(`${what} failed (${r.status}): ${r.stdout}${r.stderr}`);
}
const mk = (args: string[]) => must(q(['create', '-q', ...args]), `qemu-img create ${args.join(' ')}`);
const io = (file: string, cmds: string[], format = 'qcow2') => must(qemuIo(join(dir, file), cmds, { format }), `qemu-io ${file}`);
const convert = (src: string, fmt: 'raw' | 'qcow2', dst: string) => must(q(['convert', '-O', fmt, src, dst]), `convert ${src}`);
function poke(file: string, offset: number, value: number): number {
  const fd = openSync(join(dir, file), 'r+');
  const old = Buffer.alloc(1);
  readSync(fd, old, 0, 1, offset);
  writeSync(fd, Buffer.from([value]), 0, 1, offset);
  closeSync(fd);
  return old[0]!;
}

/** One run's output and exit code. */
type Out = { stdout: string; stderr: string; status: number };

let lastOurs: Out = { stdout: '', stderr: '', status: 0 };

/** Compares with both tools; returns a description of the difference or '' (our run: lastOurs). */
async function same(args: string[]): Promise<string> {
  const theirs = q(['compare', ...args]);
  const ours = (lastOurs = await cli(args, dir));
  if (theirs.status === ours.status && theirs.stdout === ours.stdout) return '';
  return `compare ${args.join(' ')}:\n  qemu-img (${theirs.status}): ${JSON.stringify(theirs.stdout)} ${theirs.stderr.trim()}\n  qcowkit  (${ours.status}): ${JSON.stringify(ours.stdout)} ${ours.stderr.trim()}`;
}

const WANT = ['v3-c4k-rc16', 'v2-c64k-rc16', 'v3-c512-rc64', 'extl2-c64k', 'compressed-zlib-c64k', 'compressed-zstd-c64k', 'compressed-zstd-c2m', 'rawback-base', 'rawback-over',
  'overlay-base', 'overlay-top', 'chain3-base', 'chain3-mid', 'chain3-top', 'snapshots-c64k', 'bitmaps-c64k', 'lazy-c64k'];
const path = (name: string): string => relative(dir, matrix.find((m) => m.name === name)!.path);

describeQemu('qcowkit compare versus qemu-img compare 7.2', () => {
  beforeAll(() => {
    dir = tmpDir('qcowkit-compare-interop-');
    matrix = buildMatrix(dir, { only: (n) => WANT.includes(n) });
    mkdirSync(join(dir, 'c'));
    for (const m of matrix) {
      if (m.format !== 'qcow2') continue;
      convert(path(m.name), 'raw', `c/${m.name}.raw`);
      convert(path(m.name), 'qcow2', `c/${m.name}.flat.qcow2`);
    }
    // sizes: an empty 1M, an empty 2M, a 2M raw with data past 1M, a 2M qcow2 with zeros written past 1M
    mk(['-f', 'qcow2', 'c/e1.qcow2', '1M']);
    mk(['-f', 'qcow2', 'c/e2.qcow2', '2M']);
    writeFileSync(join(dir, 'c/e2data.raw'), Buffer.alloc(2 * M));
    poke('c/e2data.raw', 1536 * K + 100, 7);
    mk(['-f', 'qcow2', '-o', 'cluster_size=4k', 'c/e2zero.qcow2', '2M']);
    io('c/e2zero.qcow2', ['write -z 1M 1M']);
    // an overlay smaller than its backing file, and the backing file itself
    mk(['-f', 'qcow2', '-b', '../overlay/base.qcow2', '-F', 'qcow2', 'c/short.qcow2', '2M']);
  });

  it('builds its images', () => expect(matrix.length).toBe(WANT.length));

  it('identical: every image against its raw and its flattened qcow2 copy, strict and not, -f/-F', async () => {
    const failures: string[] = [];
    for (const m of matrix.filter((x) => x.format === 'qcow2')) {
      const img = path(m.name);
      for (const args of [
        [img, `c/${m.name}.raw`],
        [`c/${m.name}.raw`, img],
        [img, `c/${m.name}.flat.qcow2`],
        ['-s', img, `c/${m.name}.flat.qcow2`],
        ['-s', img, `c/${m.name}.raw`],
        ['-f', 'qcow2', '-F', 'raw', img, `c/${m.name}.raw`],
        ['-s', img, img],
      ]) {
        const d = await same(args);
        if (d) failures.push(d);
      }
    }
    expect(failures.join('\n')).toBe('');
    // and they really are identical
    expect((await cli([path('chain3-top'), 'c/chain3-top.raw'], dir)).stdout).toBe('Images are identical.\n');
  });

  it('a one-byte difference is reported at its 512-byte sector, wherever it is', async () => {
    const failures: string[] = [];
    const spots: [string, number[]][] = [
      ['overlay-top', [0, 1, 511, 512, 4095, 4096, 65535, 130000, 131071, 2129920, 8 * M - 1, 8 * M, 10 * M + 5, 12 * M - 1]],
      ['chain3-top', [100 * K + 3, 160 * K, 200 * K + 1, 4 * M, 7 * M + 4095, 8 * M - 513]],
      ['compressed-zlib-c64k', [300 * K + 5, M + 7, 2 * M + 64 * K - 1, 4 * M - 1]],
      ['extl2-c64k', [4 * M + 2 * K - 1, 4 * M + 2 * K, 5 * M + 100, 6 * M + 2 * K + 1, 7 * M + 100]],
    ];
    for (const [name, offsets] of spots) {
      const raw = `c/${name}.raw`;
      for (const off of offsets) {
        const old = poke(raw, off, 0x5a);
        if (old === 0x5a) poke(raw, off, 0xa5);
        for (const args of [[path(name), raw], [raw, path(name)], ['-s', path(name), raw]]) {
          const d = await same(args);
          if (d) failures.push(`byte ${off}: ${d}`);
        }
        const ours = await cli([path(name), raw], dir);
        expect(ours.stdout, `${name} byte ${off}`).toBe(`Content mismatch at offset ${off - (off % 512)}!\n`);
        poke(raw, off, old);
      }
    }
    expect(failures.join('\n')).toBe('');
  });

  it('raw files that end mid-sector: qemu-img counts sectors from the end of the data extent', async () => {
    const data = Buffer.alloc(1000, 0x11);
    writeFileSync(join(dir, 'c/odd1000.raw'), data);
    writeFileSync(join(dir, 'c/odd1001.raw'), Buffer.concat([data, Buffer.from('x')]));
    const tail = Buffer.alloc(3000);
    data.copy(tail);
    tail[2900] = 0x79;
    writeFileSync(join(dir, 'c/odd3000.raw'), tail);
    const plain = Buffer.alloc(5000);
    data.copy(plain);
    plain[4000] = 1;
    writeFileSync(join(dir, 'c/odd5000.raw'), plain);
    must(q(['convert', '-O', 'qcow2', 'c/odd1001.raw', 'c/odd1001.qcow2']), 'convert');
    const failures: string[] = [];
    for (const args of [
      ['c/odd1000.raw', 'c/odd1001.raw'], // "Content mismatch at offset 1000!"
      ['c/odd1001.raw', 'c/odd1000.raw'],
      ['c/odd1000.raw', 'c/odd1001.qcow2'],
      ['c/odd1001.qcow2', 'c/odd1000.raw'],
      ['c/odd1000.raw', 'c/odd3000.raw'],
      ['c/odd3000.raw', 'c/odd5000.raw'],
      ['c/odd5000.raw', 'c/odd1000.raw'],
      ['-s', 'c/odd1001.raw', 'c/odd1001.qcow2'],
    ]) {
      const d = await same(args);
      if (d) failures.push(d);
    }
    expect(failures.join('\n')).toBe('');
    expect((await cli(['c/odd1000.raw', 'c/odd1001.raw'], dir)).stdout).toBe('Content mismatch at offset 1000!\n');
  });

  it('different sizes: zero excess is a warning, data in the excess a mismatch; -s refuses', async () => {
    const failures: string[] = [];
    for (const args of [
      ['c/e1.qcow2', 'c/e2.qcow2'],
      ['c/e2.qcow2', 'c/e1.qcow2'],
      ['c/e1.qcow2', 'c/e2zero.qcow2'],
      ['c/e1.qcow2', 'c/e2data.raw'],
      ['c/e2data.raw', 'c/e1.qcow2'],
      ['-s', 'c/e1.qcow2', 'c/e2.qcow2'],
      ['-s', 'c/e2data.raw', 'c/e1.qcow2'],
      ['c/short.qcow2', path('overlay-base')],
      [path('overlay-base'), 'c/short.qcow2'],
      [path('overlay-top'), path('overlay-base')],
      [path('rawback-over'), path('rawback-base')],
      [path('rawback-base'), 'c/rawback-base.raw'],
      ['-q', 'c/e1.qcow2', 'c/e2data.raw'],
      ['-q', '-s', 'c/e1.qcow2', 'c/e2.qcow2'],
    ]) {
      const d = await same(args);
      if (d) failures.push(d);
    }
    expect(failures.join('\n')).toBe('');
    expect((await cli(['c/e1.qcow2', 'c/e2.qcow2'], dir)).stdout).toBe('Warning: Image size mismatch!\nImages are identical.\n');
    expect((await cli(['c/e1.qcow2', 'c/e2data.raw'], dir)).stdout).toBe(`Warning: Image size mismatch!\nContent mismatch at offset ${1536 * K}!\n`);
    expect((await cli(['-s', 'c/e1.qcow2', 'c/e2.qcow2'], dir)).stdout).toBe('Strict mode: Image size mismatch!\n');
  });

  it('strict and plain mode agree with qemu-img across pairs of same-size images', async () => {
    const groups = [
      ['v3-c4k-rc16', 'v2-c64k-rc16', 'v3-c512-rc64', 'extl2-c64k', 'snapshots-c64k', 'bitmaps-c64k', 'lazy-c64k'],
      ['overlay-base', 'chain3-base', 'chain3-mid', 'chain3-top'],
    ];
    const failures: string[] = [];
    let statusMismatches = 0;
    const pairs: string[][] = [];
    for (const g of groups) {
      const files = g.flatMap((n) => [path(n), `c/${n}.flat.qcow2`]);
      files.forEach((a, i) => {
        pairs.push(...files.slice(i + 1).map((b, j) => ((i + j) % 2 ? [a, b] : [b, a])));
      });
    }
    for (const [a, b] of pairs) {
      for (const args of [['-s', a!, b!], [a!, b!]]) {
        const d = await same(args);
        if (d) failures.push(d);
        if (lastOurs.stdout.includes('block status mismatch')) statusMismatches++;
      }
    }
    expect(failures.join('\n')).toBe('');
    expect(statusMismatches).toBeGreaterThan(10);
  });

  it('strict mode: the block-status details QEMU compares (EOF, past-the-backing-end zeros, compressed)', async () => {
    const failures: string[] = [];
    for (const args of [
      ['-s', 'c/short.qcow2', 'c/short.qcow2'],
      ['-s', path('rawback-over'), 'c/rawback-over.flat.qcow2'], // zeros past the raw backing's end count as allocated
      ['-s', path('overlay-top'), 'c/overlay-top.flat.qcow2'],
      ['-s', path('compressed-zlib-c64k'), path('compressed-zstd-c64k')],
      ['-s', path('compressed-zlib-c64k'), 'c/compressed-zlib-c64k.raw'],
      ['-s', path('rawback-base'), 'c/rawback-base.raw'],
      ['-s', 'c/e1.qcow2', 'c/e1.qcow2'],
    ]) {
      const d = await same(args);
      if (d) failures.push(d);
    }
    expect(failures.join('\n')).toBe('');
  });

  it('-f / -F override probing', async () => {
    const failures: string[] = [];
    for (const args of [
      ['-f', 'raw', '-F', 'raw', path('v3-c4k-rc16'), 'c/v3-c4k-rc16.raw'],
      ['-F', 'raw', path('v3-c4k-rc16'), 'c/v3-c4k-rc16.raw'],
      ['-f', 'qcow2', '-F', 'qcow2', path('v3-c4k-rc16'), 'c/v3-c4k-rc16.flat.qcow2'],
    ]) {
      const d = await same(args);
      if (d) failures.push(d);
    }
    expect(failures.join('\n')).toBe('');
  });

  it('a data error during the comparison is exit 4, as in qemu-img', async () => {
    // garble the first compressed cluster of a copy (its L2 entry is the first of the first L2 table)
    const img = 'c/garbled.qcow2';
    must(run('cp', [path('compressed-zlib-c64k'), img], { cwd: dir }), 'cp');
    const fd = openSync(join(dir, img), 'r');
    const head = Buffer.alloc(72);
    readSync(fd, head, 0, 72, 0);
    const l1 = Buffer.alloc(8);
    readSync(fd, l1, 0, 8, Number(head.readBigUInt64BE(40)));
    const l2 = Buffer.alloc(8);
    readSync(fd, l2, 0, 8, Number(l1.readBigUInt64BE(0) & 0x00ff_ffff_ffff_fe00n));
    closeSync(fd);
    const entry = l2.readBigUInt64BE(0);
    expect(entry >> 62n, 'compressed entry').toBe(1n);
    const host = Number(entry & ((1n << 46n) - 1n)); // 64 KiB clusters: 62 - (16 - 8) offset bits
    for (let i = 0; i < 64; i++) poke(img, host + 8 + i, 0xff);
    const failures: string[] = [];
    for (const args of [[img, 'c/compressed-zlib-c64k.raw'], ['c/compressed-zlib-c64k.raw', img]]) {
      const d = await same(args);
      if (d) failures.push(d);
      expect(lastOurs.status).toBe(4);
      expect(lastOurs.stderr).toMatch(/^qcowkit: c\/garbled\.qcow2: Could not decompress/);
    }
    expect(failures.join('\n')).toBe('');
  });

  it('errors: exit 2, one line naming the file, no stack, files untouched', () => {
    mkdirSync(join(dir, 'bad/adir'), { recursive: true });
    writeFileSync(join(dir, 'bad/short.qcow2'), Buffer.from([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3]));
    mk(['-f', 'qcow2', '-o', 'cluster_size=4k', 'bad/a.qcow2', '4M']);
    mk(['-f', 'qcow2', '-o', 'cluster_size=4k', '-b', 'a.qcow2', '-F', 'qcow2', 'bad/b.qcow2']);
    must(q(['rebase', '-u', '-b', 'b.qcow2', '-F', 'qcow2', 'bad/a.qcow2']), 'rebase');
    mk(['-f', 'qcow2', '-u', '-b', 'missing.qcow2', '-F', 'qcow2', 'bad/nobacking.qcow2', '4M']);
    mk(['-f', 'qcow2', 'bad/incompat.qcow2', '4M']);
    poke('bad/incompat.qcow2', 79, 0x80);
    writeFileSync(join(dir, 'bad/empty.img'), '');
    mk(['-f', 'qcow2', 'bad/json.qcow2', '4M']);
    must(q(['rebase', '-u', '-f', 'qcow2', '-b', 'json:{"driver":"qcow2","file":{"driver":"file","filename":"a.qcow2"}}', '-F', 'qcow2', 'bad/json.qcow2']), 'rebase');
    const other = 'c/e1.qcow2';
    const cases: { name: string; args: string[]; file: string; qemu: number | null; message: RegExp }[] = [
      { name: 'first file missing', args: ['bad/nothere.qcow2', other], file: 'bad/nothere.qcow2', qemu: 2, message: /No such file/ },
      { name: 'second file missing', args: [other, 'bad/nothere'], file: 'bad/nothere', qemu: 2, message: /No such file/ },
      { name: 'directory', args: [other, 'bad/adir'], file: 'bad/adir', qemu: 2, message: /directory/i },
      { name: 'header cut short', args: ['bad/short.qcow2', other], file: 'bad/short.qcow2', qemu: 2, message: /Unsupported cluster size: 2\^0/ }, // zeros past EOF, as qemu-img reads them
      { name: 'raw file as qcow2 (-F qcow2)', args: ['-F', 'qcow2', other, 'c/e2data.raw'], file: 'c/e2data.raw', qemu: 2, message: /not in qcow2 format/ },
      // qemu-img 7.2 never returns on a backing loop: not run
      { name: 'backing loop', args: ['bad/a.qcow2', other], file: 'bad/a.qcow2', qemu: null, message: /loop/ },
      { name: 'missing backing file', args: [other, 'bad/nobacking.qcow2'], file: 'bad/nobacking.qcow2', qemu: 2, message: /missing\.qcow2.*No such file/ },
      { name: 'unknown incompatible feature', args: ['bad/incompat.qcow2', other], file: 'bad/incompat.qcow2', qemu: 2, message: /Unknown incompatible feature: 80/ },
      { name: 'empty file as qcow2', args: ['-F', 'qcow2', other, 'bad/empty.img'], file: 'bad/empty.img', qemu: 2, message: /not in qcow2 format/ },
      // qemu-img follows json: names; qcowkit opens plain files only
      { name: 'json: backing name', args: ['bad/json.qcow2', other], file: 'bad/json.qcow2', qemu: null, message: /json:.*protocol/ },
      { name: 'unknown format name', args: ['-f', 'vpc', 'bad/incompat.qcow2', other], file: 'bad/incompat.qcow2', qemu: 2, message: /format 'vpc'/ },
    ];
    for (const c of cases) {
      const p = join(dir, c.file);
      const before = ['first file missing', 'second file missing', 'directory'].includes(c.name) ? '' : sha256(p);
      if (c.qemu !== null) {
        const theirs = q(['compare', ...c.args]);
        expect([theirs.status, theirs.stdout], `qemu-img: ${c.name}`).toEqual([c.qemu, '']);
      }
      const t = Date.now();
      const r = runCli(['compare', ...c.args], { cwd: dir, timeout: 20_000 });
      expect(Date.now() - t, c.name).toBeLessThan(10_000);
      expectOneLineError(r, c, 2);
      expect(r.stdout, c.name).toBe('');
      if (before) expect(sha256(p), c.name).toBe(before);
    }
    // the exit codes of a normal run through the binary
    expect(runCli(['compare', other, other], { cwd: dir }).status).toBe(0);
    expect(runCli(['compare', '-q', other, 'c/e2data.raw'], { cwd: dir })).toMatchObject({ status: 1, stdout: '', stderr: '' });
  });
});
