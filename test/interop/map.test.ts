// `qcowkit map` versus `qemu-img map` 7.2: byte-identical stdout (JSON and human) for every matrix
// image and a set of hand-made ones (chains with depth / present / zero past a shorter backing
// file, raw backing files with holes, extended L2 subclusters, zero clusters of every kind,
// compressed clusters, metadata preallocation with host hole probing, holes qemu-io leaves inside
// clusters, sizes that are not a multiple of the cluster size), --start-offset / --max-length,
// and the verdict on bad input.
//
// Most runs call the CLI command in-process (src/cli/commands/map.ts through commander, as
// src/cli/main.ts does); a few go through `node bin/qcowkit.js` (needs `npm run build` first).
import { mkdirSync, writeFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { beforeAll, expect, it } from 'vitest';
import { buildMatrix, type MatrixImage } from '../helpers/matrix.js';
import { describeQemu, qemuImg, qemuIo } from '../helpers/qemu.js';
import { runCli, runCommandInProcess } from '../helpers/cli.js';
import { expectOneLineError, patchBytes, readBytesAt } from '../helpers/bytes.js';
import { sha256, tmpDir } from '../helpers/tmp.js';
import { command as mapCommand } from '../../src/cli/commands/map.js';

/** `qcowkit` with ARGS in this process with `cwd`: stdout, stderr, exit code. */
const cli = (args: string[], cwd: string) => runCommandInProcess(mapCommand, args, cwd);

const K = 1024;
const M = 1024 * K;

let dir = '';
let matrix: MatrixImage[] = [];
const names: string[] = [];
const q = (args: string[], timeout?: number) => qemuImg(args, { cwd: dir, ...(timeout ? { timeout } : {}) });
function must(r: { status: number; stderr: string; stdout: string }, what: string): void {
  if (r.status !== 0) throw new Error(`${what} failed (${r.status}): ${r.stdout}${r.stderr}`);
}
const mk = (args: string[]) => must(q(['create', '-q', ...args]), `qemu-img create ${args.join(' ')}`);
const io = (file: string, cmds: string[], format = 'qcow2') => must(qemuIo(join(dir, file), cmds, { format }), `qemu-io ${file} ${cmds.join('; ')}`);
const patch = (file: string, offset: number, bytes: number[]): void => patchBytes(join(dir, file), offset, bytes);
const readAt = (file: string, offset: number, len: number): Buffer => readBytesAt(join(dir, file), offset, len);

function buildExtras(): string[] {
  mkdirSync(join(dir, 'x'), { recursive: true });
  const x = (n: string) => `x/${n}`;
  // metadata preallocation: QEMU asks the host file for holes inside the (allocated) clusters
  mk(['-f', 'qcow2', '-o', 'preallocation=metadata', x('pm.qcow2'), '32M']);
  io(x('pm.qcow2'), ['write -P 1 1M 4k', 'write -P 2 5M 100k', 'write -z 8M 64k', 'write -P 3 20M 64k']);
  mk(['-f', 'qcow2', '-o', 'preallocation=metadata,cluster_size=4k', x('pm4k.qcow2'), '8M']);
  io(x('pm4k.qcow2'), ['write -P 1 1M 1k', 'write -P 2 7M 4k']);
  mk(['-f', 'qcow2', '-o', 'preallocation=metadata,extended_l2=on', x('pmx.qcow2'), '8M']);
  io(x('pmx.qcow2'), ['write -P 1 1M 1k', 'write -z 2M 4k']);
  mk(['-f', 'qcow2', '-o', 'preallocation=falloc', x('pfalloc.qcow2'), '4M']);
  io(x('pfalloc.qcow2'), ['write -P 1 1M 1k']);
  mk(['-f', 'qcow2', '-o', 'preallocation=full,cluster_size=16k', x('pfull.qcow2'), '4M']);
  io(x('pfull.qcow2'), ['write -P 1 1M 1k']);
  // small writes leave holes inside 64 KiB host clusters
  mk(['-f', 'qcow2', x('holes.qcow2'), '8M']);
  io(x('holes.qcow2'), ['write -P 1 0 512', 'write -P 2 100k 1k', 'write -P 3 300k 64k', 'write -P 4 1M 130k', 'write -P 5 7M 3k']);
  // a sparse raw backing file (map reports its holes as zero), and one whose size is not a multiple of 512
  writeFileSync(join(dir, x('sparse.raw')), '');
  must(q(['resize', '-q', '-f', 'raw', x('sparse.raw'), '2M']), 'resize');
  io(x('sparse.raw'), ['write -P 5 64k 4k', 'write -P 6 1M 512'], 'raw');
  mk(['-f', 'qcow2', '-b', 'sparse.raw', '-F', 'raw', '-o', 'cluster_size=4k', x('over-sparse.qcow2'), '3M']);
  io(x('over-sparse.qcow2'), ['write -P 7 0 4k', 'write -P 8 1049600 100', 'write -P 9 2M 4k']);
  writeFileSync(join(dir, x('odd.raw')), Buffer.alloc(100000, 0x42));
  mk(['-f', 'qcow2', '-b', 'odd.raw', '-F', 'raw', x('over-odd.qcow2'), '1M']);
  io(x('over-odd.qcow2'), ['write -P 1 96k 8k']);
  // virtual sizes that are not a multiple of the cluster size
  mk(['-f', 'qcow2', x('vs.qcow2'), '1000000']);
  io(x('vs.qcow2'), ['write -P 1 999424 512', 'write -z 0 4k']);
  mk(['-f', 'qcow2', '-o', 'cluster_size=2M', x('vs2m.qcow2'), '5000000']);
  io(x('vs2m.qcow2'), ['write -P 1 4194304 512']);
  mk(['-f', 'qcow2', x('empty.qcow2'), '0']);
  // overlays larger and smaller than their backing file
  mk(['-f', 'qcow2', x('small.qcow2'), '1M']);
  io(x('small.qcow2'), ['write -P 1 0 1M']);
  mk(['-f', 'qcow2', '-b', 'small.qcow2', '-F', 'qcow2', x('big.qcow2'), '5M']);
  io(x('big.qcow2'), ['write -P 2 3M 4k', 'write -z 512k 64k']);
  mk(['-f', 'qcow2', '-o', 'cluster_size=16k', x('large.qcow2'), '8M']);
  io(x('large.qcow2'), ['write -P 1 0 8M']);
  mk(['-f', 'qcow2', '-b', 'large.qcow2', '-F', 'qcow2', x('tiny.qcow2'), '2M']);
  // zero clusters of every kind, alone and over a backing file
  mk(['-f', 'qcow2', '-o', 'cluster_size=4k', x('z.qcow2'), '4M']);
  io(x('z.qcow2'), ['write -P 1 0 1M', 'write -z 0 64k', 'write -z -u 128k 64k', 'discard 256k 64k', 'write -z 2M 64k', 'write -z -u 3M 4k', 'discard 3584k 4k']);
  mk(['-f', 'qcow2', '-b', 'z.qcow2', '-F', 'qcow2', '-o', 'cluster_size=64k', x('zt.qcow2')]);
  io(x('zt.qcow2'), ['write -z 512k 64k', 'discard 0 64k', 'write -P 3 128k 2k', 'write -z -u 1M 64k']);
  // extended L2 over a backing file: subclusters from three sources in one cluster
  mk(['-f', 'qcow2', '-b', 'large.qcow2', '-F', 'qcow2', '-o', 'extended_l2=on,cluster_size=32k', x('xt.qcow2')]);
  io(x('xt.qcow2'), ['write -P 3 1k 1k', 'write -z 64k 1k', 'discard 128k 32k', 'write -z -u 200k 2k', 'write -P 4 7M 3k']);
  // compressed clusters inside an overlay, and in the middle of a raw-backed chain
  mk(['-f', 'qcow2', '-b', 'large.qcow2', '-F', 'qcow2', x('cov.qcow2')]);
  io(x('cov.qcow2'), ['write -c -P 5 0 64k', 'write -c -P 6 1M 64k']);
  writeFileSync(join(dir, x('rb.raw')), Buffer.alloc(512 * K, 9));
  mk(['-f', 'qcow2', '-b', 'rb.raw', '-F', 'raw', x('rm.qcow2'), '1M']);
  io(x('rm.qcow2'), ['write -P 1 128k 4k']);
  mk(['-f', 'qcow2', '-b', 'rm.qcow2', '-F', 'qcow2', x('rt.qcow2'), '2M']);
  io(x('rt.qcow2'), ['write -P 2 256k 4k', 'write -z 132k 4k']);
  // backing format not recorded (the extension retyped to an unknown one): probed
  mk(['-f', 'qcow2', '-b', 'small.qcow2', '-F', 'qcow2', x('nofmt.qcow2')]);
  const head = readAt(x('nofmt.qcow2'), 0, 4096);
  patch(x('nofmt.qcow2'), head.indexOf(Buffer.from([0xe2, 0x79, 0x2a, 0xca])), [0x12, 0x34, 0x56, 0x78]);
  return [
    'pm', 'pm4k', 'pmx', 'pfalloc', 'pfull', 'holes', 'over-sparse', 'over-odd', 'vs', 'vs2m', 'empty', 'small', 'big', 'large',
    'tiny', 'z', 'zt', 'xt', 'cov', 'rm', 'rt', 'nofmt',
  ].map((n) => x(`${n}.qcow2`)).concat([x('sparse.raw'), x('odd.raw'), x('rb.raw')]);
}

describeQemu('qcowkit map versus qemu-img map 7.2', () => {
  beforeAll(() => {
    dir = tmpDir('qcowkit-map-interop-');
    matrix = buildMatrix(dir);
    names.push(...matrix.map((m) => relative(dir, m.path)), ...buildExtras());
  });

  it('builds the matrix and the extras', () => {
    expect(matrix.length).toBeGreaterThanOrEqual(28);
    expect(names.length).toBeGreaterThanOrEqual(50);
  });

  it('same stdout and exit code for every image, JSON and human', async () => {
    const failures: string[] = [];
    let failing = 0;
    for (const name of names) {
      for (const opts of [['--output=json'], []]) {
        const theirs = q(['map', ...opts, name]);
        const ours = await cli([...opts, name], dir);
        const label = `${name} ${opts.join(' ') || 'human'}`;
        if (ours.stdout !== theirs.stdout || ours.status !== theirs.status) {
          failures.push(`${label}: qemu-img exit ${theirs.status}, qcowkit exit ${ours.status} ${ours.stderr}\n--- qemu-img\n${theirs.stdout}--- qcowkit\n${ours.stdout}`);
        }
        if (theirs.status !== 0) {
          // only the human map of compressed images fails, with the same message
          failing++;
          expect(theirs.stderr, label).toBe('qemu-img: File contains external, encrypted or compressed clusters.\n');
          expect(ours.stderr, label).toBe(`qcowkit: ${name}: File contains external, encrypted or compressed clusters.\n`);
        }
      }
    }
    expect(failures.join('\n\n')).toBe('');
    expect(failing).toBeGreaterThanOrEqual(5);
  });

  it('the hand-made cases show what they are meant to', async () => {
    const json = async (n: string) => JSON.parse((await cli(['--output=json', n], dir)).stdout) as { start: number; length: number; depth: number; present: boolean; zero: boolean; data: boolean; offset?: number }[];
    // host hole probing splits data clusters into data and "zero, data" parts
    expect((await json('x/pm.qcow2')).some((e) => e.zero && e.data)).toBe(true);
    // past the end of the shorter backing file: depth 0, not present
    expect((await json('x/big.qcow2')).find((e) => e.start === 1 * M)).toMatchObject({ depth: 0, present: false, zero: true, data: false });
    // the raw backing file's hole is a zero range at depth 1
    expect((await json('x/over-sparse.qcow2')).some((e) => e.depth === 1 && e.zero && !e.data && e.present)).toBe(true);
    // three depths in the raw-backed chain
    expect(new Set((await json('x/rt.qcow2')).map((e) => e.depth))).toEqual(new Set([0, 1, 2]));
    expect(await json('x/empty.qcow2')).toEqual([{ start: 0, length: 0, depth: 0, present: false, zero: false, data: false }]);
  });

  it('--start-offset and --max-length like qemu-img', async () => {
    const windows: string[][] = [
      ['--start-offset', '0', '--max-length', '1'],
      ['--start-offset', '1000', '--max-length', '3000'],
      ['--start-offset', '64k', '--max-length', '64k'],
      ['--start-offset', '100001', '--max-length', '1M'],
      ['--start-offset', '1M'],
      ['--start-offset', '3M', '--max-length', '100M'],
      ['--start-offset', '1.5M', '--max-length', '1k'],
      ['--start-offset', '1M', '--max-length', '0'],
      ['--start-offset', '100M'],
      ['--max-length', '4096'],
    ];
    const images = ['chain/sub/top.qcow2', 'extl2-c16k.qcow2', 'compressed-zlib-c64k.qcow2', 'rawback/over.qcow2', 'x/pm.qcow2', 'x/xt.qcow2', 'x/vs.qcow2'];
    const failures: string[] = [];
    for (const name of images) {
      for (const w of windows) {
        for (const opts of [['--output=json'], []]) {
          const theirs = q(['map', ...opts, ...w, name]);
          const ours = await cli([...opts, ...w, name], dir);
          if (ours.stdout !== theirs.stdout || ours.status !== theirs.status)
            failures.push(`${name} ${[...opts, ...w].join(' ')}: exit ${theirs.status}/${ours.status}\n${theirs.stdout}---\n${ours.stdout}`);
        }
      }
    }
    expect(failures.join('\n\n')).toBe('');
  });

  it('through bin/qcowkit.js too', () => {
    for (const args of [['--output=json', 'chain/sub/top.qcow2'], ['x/pm.qcow2'], ['--output=json', '--start-offset', '4k', '--max-length', '1M', 'x/xt.qcow2']]) {
      const theirs = q(['map', ...args]);
      const ours = runCli(['map', ...args], { cwd: dir });
      expect([ours.status, ours.stderr]).toEqual([0, '']);
      expect(ours.stdout, args.join(' ')).toBe(theirs.stdout);
    }
    const ours = runCli(['map', 'compressed-zstd-c64k.qcow2'], { cwd: dir });
    expect(ours.status).toBe(1);
    expect(ours.stdout).toBe(q(['map', 'compressed-zstd-c64k.qcow2']).stdout);
    expect(ours.stderr).toBe('qcowkit: compressed-zstd-c64k.qcow2: File contains external, encrypted or compressed clusters.\n');
  });

  it('encrypted and external-data-file images are refused with a clear error', () => {
    const secret = ['--object', 'secret,id=sec0,data=x'];
    mk(['-f', 'qcow2', ...secret, '-o', 'encrypt.format=aes,encrypt.key-secret=sec0', 'x/aes.qcow2', '1M']);
    must(qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'data_file=df.data', 'df.qcow2', '1M'], { cwd: join(dir, 'x') }), 'create df');
    must(qemuIo('df.qcow2', ['write -P 1 0 4k'], { cwd: join(dir, 'x') }), 'qemu-io df');
    for (const [file, msg] of [['x/aes.qcow2', /encrypted images are not supported/], ['x/df.qcow2', /external data file/]] as const) {
      const before = sha256(join(dir, file));
      const r = runCli(['map', '--output=json', file], { cwd: dir });
      expect(r.status, file).toBe(1);
      expect(r.stdout).toBe('');
      expect(r.stderr.trimEnd().split('\n')).toHaveLength(1);
      expect(r.stderr).toMatch(new RegExp(`^qcowkit: ${file}: .*${msg.source}`));
      expect(sha256(join(dir, file))).toBe(before);
    }
    // qemu-img cannot map the encrypted one without its key either; it maps the data file one
    // (qcowkit does not read external data files).
    expect(q(['map', 'x/aes.qcow2']).status).toBe(1);
  });

  it('bad input: exit 1, one line naming the file, no stack, file untouched; a backing loop fails fast', () => {
    mkdirSync(join(dir, 'bad/adir'), { recursive: true });
    writeFileSync(join(dir, 'bad/empty.img'), '');
    writeFileSync(join(dir, 'bad/short.qcow2'), readAt('v3-c4k-rc16.qcow2', 0, 50));
    writeFileSync(join(dir, 'bad/text.img'), 'not a disk image\n'.repeat(100));
    mk(['-f', 'qcow2', '-o', 'cluster_size=4k', 'bad/a.qcow2', '4M']);
    mk(['-f', 'qcow2', '-o', 'cluster_size=4k', '-b', 'a.qcow2', '-F', 'qcow2', 'bad/b.qcow2']);
    must(q(['rebase', '-u', '-b', 'b.qcow2', '-F', 'qcow2', 'bad/a.qcow2']), 'rebase');
    mk(['-f', 'qcow2', '-u', '-b', 'missing.qcow2', '-F', 'qcow2', 'bad/nobacking.qcow2', '1M']);
    mk(['-f', 'qcow2', 'bad/json.qcow2', '1M']);
    must(q(['rebase', '-u', '-f', 'qcow2', '-b', 'json:{"driver":"qcow2","file":{"driver":"file","filename":"a.qcow2"}}', '-F', 'qcow2', 'bad/json.qcow2']), 'rebase');
    mk(['-f', 'qcow2', 'bad/incompat.qcow2', '1M']);
    patch('bad/incompat.qcow2', 79, [0x80]);
    // v3-c64k-rc16 keeps its first L2 table at 256 KiB: cut the file there
    writeFileSync(join(dir, 'bad/cut-l2.qcow2'), readAt('v3-c64k-rc16.qcow2', 0, 256 * K));
    const cases: { name: string; args: string[]; file: string; qemu: number | null; message: RegExp }[] = [
      { name: 'directory', args: [], file: 'bad/adir', qemu: 1, message: /directory/i },
      { name: 'empty file as qcow2', args: ['-f', 'qcow2'], file: 'bad/empty.img', qemu: 1, message: /qcow2|header/i },
      { name: 'header cut short', args: [], file: 'bad/short.qcow2', qemu: 1, message: /header/i },
      { name: 'not qcow2, -f qcow2', args: ['-f', 'qcow2'], file: 'bad/text.img', qemu: 1, message: /not in qcow2 format/ },
      // qemu-img 7.2 never returns here (it recurses through the loop): not run
      { name: 'backing loop', args: [], file: 'bad/a.qcow2', qemu: null, message: /loop/ },
      { name: 'missing backing file', args: [], file: 'bad/nobacking.qcow2', qemu: 1, message: /missing\.qcow2.*No such file/ },
      // qemu-img follows json: names; qcowkit opens plain files only
      { name: 'json: backing name', args: [], file: 'bad/json.qcow2', qemu: null, message: /json:.*protocol/ },
      { name: 'unknown incompatible feature', args: [], file: 'bad/incompat.qcow2', qemu: 1, message: /Unknown incompatible feature: 80/ },
      { name: 'no such file', args: [], file: 'bad/nothere.qcow2', qemu: 1, message: /No such file/ },
      // qemu-img reads the missing L2 table as zeros (all unallocated, exit 0); qcowkit refuses
      { name: 'L2 table past the end of the file', args: [], file: 'bad/cut-l2.qcow2', qemu: 0, message: /L2 table .* past the end of the file/ },
    ];
    for (const c of cases) {
      const path = join(dir, c.file);
      const before = c.name === 'directory' || c.name === 'no such file' ? '' : sha256(path);
      if (c.qemu !== null) expect(q(['map', ...c.args, c.file]).status, `qemu-img: ${c.name}`).toBe(c.qemu);
      const t = Date.now();
      const r = runCli(['map', '--output=json', ...c.args, c.file], { cwd: dir, timeout: 20_000 });
      expect(Date.now() - t, c.name).toBeLessThan(10_000);
      expectOneLineError(r, c, 1);
      expect(r.stdout, c.name).toBe('');
      if (before) expect(sha256(path), c.name).toBe(before);
    }
  });
});
