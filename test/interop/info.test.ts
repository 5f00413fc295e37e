// `qcowkit info` versus `qemu-img info` 7.2 on the interop matrix and hand-made images: the same
// stdout byte for byte (JSON key order, human layout, sizes, snapshot table, paths exactly as
// given), and the same verdict on bad input (one `qcowkit: FILE: ...` line, exit 1, file untouched).
//
// Most runs call the CLI command in-process (src/cli/commands/info.ts through commander, as
// src/cli/main.ts does) to keep the file fast; a few go through `node bin/qcowkit.js` (the built
// bundle: needs `npm run build` first).
import { chmodSync, copyFileSync, mkdirSync, writeFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { beforeAll, expect, it } from 'vitest';
import { buildMatrix, type MatrixImage } from '../helpers/matrix.js';
import { describeQemu, qemuImg, qemuIo, run } from '../helpers/qemu.js';
import { runCli, runCommandInProcess } from '../helpers/cli.js';
import { expectOneLineError, patchBytes, readBytesAt } from '../helpers/bytes.js';
import { sha256, tmpDir } from '../helpers/tmp.js';
import { command as infoCommand } from '../../src/cli/commands/info.js';

const COMMANDS: Record<string, () => ReturnType<typeof infoCommand>> = { info: infoCommand };

/** `qcowkit ARGS` in this process with `cwd`: stdout, stderr, exit code. */
const cli = (args: string[], cwd: string) => runCommandInProcess(COMMANDS[args[0]!]!, args.slice(1), cwd);

const K = 1024;

let dir = '';
const names: string[] = []; // image paths relative to dir
const q = (args: string[]) => qemuImg(args, { cwd: dir });
function must(r: { status: number; stderr: string; stdout: string }, what: string): void {
  if (r.status !== 0) throw new Error(`${what} failed (${r.status}): ${r.stdout}${r.stderr}`);
}
const mk = (args: string[]) => must(q(['create', '-q', ...args]), `qemu-img create ${args.join(' ')}`);
const io = (file: string, cmds: string[], format = 'qcow2') => must(qemuIo(join(dir, file), cmds, { format }), `qemu-io ${file}`);
/** qemu-io that dies with abort(): what it had open stays "in use" / dirty. */
const ioAbort = (file: string, cmds: string[], extra = '') =>
  run('bash', ['-c', `ulimit -c 0; qemu-io ${extra} -f qcow2 ${cmds.map((c) => `-c '${c}'`).join(' ')} -c abort '${file}'; exit 0`], { cwd: dir });

const patch = (file: string, offset: number, bytes: number[]): void => patchBytes(join(dir, file), offset, bytes);
const readAt = (file: string, offset: number, len: number): Buffer => readBytesAt(join(dir, file), offset, len);

/** Patches fields of internal snapshot `index` (v3 layout: extra data holds vm_state_size_large and icount). */
function patchSnapshot(file: string, index: number, f: { dateSec?: number; dateNsec?: number; clockNsec?: bigint; vmState?: bigint; icount?: bigint }): void {
  const h = readAt(file, 0, 72);
  const n = h.readUInt32BE(60);
  let off = Number(h.readBigUInt64BE(64));
  for (let i = 0; i < n; i++) {
    const e = readAt(file, off, 40);
    const extra = e.readUInt32BE(36);
    if (i === index) {
      const u32 = (v: number) => [...Buffer.from([v >>> 24, (v >>> 16) & 255, (v >>> 8) & 255, v & 255])];
      const u64 = (v: bigint) => {
        const b = Buffer.alloc(8);
        b.writeBigUInt64BE(v);
        return [...b];
      };
      if (f.dateSec !== undefined) patch(file, off + 16, u32(f.dateSec));
      if (f.dateNsec !== undefined) patch(file, off + 20, u32(f.dateNsec));
      if (f.clockNsec !== undefined) patch(file, off + 24, u64(f.clockNsec));
      if (f.vmState !== undefined) {
        patch(file, off + 32, u32(Number(f.vmState & 0xffffffffn)));
        if (extra >= 8) patch(file, off + 40, u64(f.vmState));
      }
      if (f.icount !== undefined && extra >= 24) patch(file, off + 56, u64(f.icount));
      return;
    }
    off = Math.ceil((off + 40 + extra + e.readUInt16BE(12) + e.readUInt16BE(14)) / 8) * 8;
  }
  throw new Error(`no snapshot ${index} in ${file}`);
}

/** Hand-made images on top of the matrix: every info feature qemu-img 7.2 shows. */
function buildExtras(): string[] {
  const x: string[] = [];
  mkdirSync(join(dir, 'x', 'd1', 'd2'), { recursive: true });
  // bitmaps left "in-use" by a writer that died
  mk(['-f', 'qcow2', '-o', 'cluster_size=64k', 'x/bm-inuse.qcow2', '16M']);
  must(q(['bitmap', '--add', 'x/bm-inuse.qcow2', 'b0']), 'bitmap');
  must(q(['bitmap', '--add', '-g', '4k', '--disable', 'x/bm-inuse.qcow2', 'b1']), 'bitmap');
  ioAbort('x/bm-inuse.qcow2', ['write -P 0x10 0 64k']);
  x.push('x/bm-inuse.qcow2');
  // dirty flag: lazy refcounts and a crashed writer
  mk(['-f', 'qcow2', '-o', 'lazy_refcounts=on,cluster_size=4k', 'x/dirty.qcow2', '8M']);
  ioAbort('x/dirty.qcow2', ['write -P 0x11 0 16k'], '-t writethrough');
  x.push('x/dirty.qcow2');
  // corrupt bit (incompatible feature bit 1, byte 79)
  mk(['-f', 'qcow2', 'x/corrupt.qcow2', '8M']);
  patch('x/corrupt.qcow2', 79, [readAt('x/corrupt.qcow2', 79, 1)[0]! | 2]);
  x.push('x/corrupt.qcow2');
  // raw files: sizes round up to whole sectors
  writeFileSync(join(dir, 'x/odd1000.raw'), Buffer.alloc(1000, 1));
  writeFileSync(join(dir, 'x/odd511.raw'), Buffer.alloc(511, 1));
  writeFileSync(join(dir, 'x/empty.raw'), '');
  x.push('x/odd1000.raw', 'x/odd511.raw', 'x/empty.raw');
  // encryption (info needs no key): legacy AES and LUKS headers
  const secret = ['--object', 'secret,id=sec0,data=x'];
  mk(['-f', 'qcow2', ...secret, '-o', 'encrypt.format=aes,encrypt.key-secret=sec0', 'x/aes.qcow2', '8M']);
  // QEMU's PBKDF benchmark sometimes fails on a busy machine ("Unable to get accurate CPU usage"): retry
  const luksArgs = ['create', '-q', '-f', 'qcow2', ...secret, '-o', 'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10', 'x/luks.qcow2', '8M'];
  let luks = q(luksArgs);
  for (let i = 0; i < 5 && luks.status !== 0 && /accurate CPU usage/.test(luks.stderr); i++) luks = q(luksArgs);
  must(luks, 'qemu-img create (luks)');
  // Creating a LUKS image costs seconds (PBKDF benchmark): the second one is a copy whose LUKS
  // header names other algorithms (info reads the header only).
  copyFileSync(join(dir, 'x/luks.qcow2'), join(dir, 'x/luks-essiv.qcow2'));
  const head = readAt('x/luks.qcow2', 0, 4096);
  let luksAt = -1;
  for (let p = head.readUInt32BE(100); p + 8 <= head.length && head.readUInt32BE(p) !== 0; p += 8 + Math.ceil(head.readUInt32BE(p + 4) / 8) * 8)
    if (head.readUInt32BE(p) === 0x0537be77) luksAt = Number(head.readBigUInt64BE(p + 8));
  const field = (s: string) => [...Buffer.concat([Buffer.from(s), Buffer.alloc(32 - s.length)])];
  patch('x/luks-essiv.qcow2', luksAt + 8, field('twofish'));
  patch('x/luks-essiv.qcow2', luksAt + 40, field('cbc-essiv:sha256'));
  patch('x/luks-essiv.qcow2', luksAt + 72, field('sha512'));
  patch('x/luks-essiv.qcow2', luksAt + 108, [0, 0, 0, 16]);
  x.push('x/aes.qcow2', 'x/luks.qcow2', 'x/luks-essiv.qcow2');
  // external data files
  // (qemu-img create makes the data file relative to its cwd, the image resolves it relative to itself)
  const inX = (args: string[]) => must(qemuImg(['create', '-q', ...args], { cwd: join(dir, 'x') }), `qemu-img create ${args.join(' ')}`);
  inX(['-f', 'qcow2', '-o', 'data_file=df.data', 'df.qcow2', '1M']);
  // (QEMU 7.2 opens a relative data file name relative to the current directory, not the image)
  must(qemuIo('df.qcow2', ['write -P 0x12 0 64k'], { cwd: join(dir, 'x') }), 'qemu-io df.qcow2');
  inX(['-f', 'qcow2', '-o', 'data_file=dfraw.data,data_file_raw=on', 'dfraw.qcow2', '1M']);
  x.push('x/df.qcow2', 'x/dfraw.qcow2');
  // snapshots: v2, names needing JSON escapes and wider than the table columns, patched fields
  mk(['-f', 'qcow2', '-o', 'compat=0.10', 'x/snapv2.qcow2', '8M']);
  for (const n of ['first', 'ünïcödé "q" \\ tab\tend', 'a-very-long-snapshot-name-exceeding-16']) must(q(['snapshot', '-c', n, 'x/snapv2.qcow2']), 'snapshot');
  for (let i = 0; i < 3; i++) patchSnapshot('x/snapv2.qcow2', i, { dateSec: 1700000000 + 86400 * 400 * i, dateNsec: 5 });
  mk(['-f', 'qcow2', 'x/snapv3.qcow2', '8M']);
  must(q(['snapshot', '-c', 's', 'x/snapv3.qcow2']), 'snapshot');
  must(q(['snapshot', '-c', 't', 'x/snapv3.qcow2']), 'snapshot');
  patchSnapshot('x/snapv3.qcow2', 0, { dateSec: 1700000000, dateNsec: 999999999, clockNsec: 3723456789012n, vmState: 1610612736n, icount: 12345n });
  patchSnapshot('x/snapv3.qcow2', 1, { dateSec: 1, clockNsec: 360000n * 10n ** 9n + 1n, vmState: 1023488n });
  x.push('x/snapv2.qcow2', 'x/snapv3.qcow2');
  // backing names: relative through subdirectories, "./", absolute, json:, no recorded format
  mk(['-f', 'qcow2', 'x/base.qcow2', '4M']);
  io('x/base.qcow2', ['write -P 0x20 0 1M']);
  mk(['-f', 'qcow2', '-b', './../base.qcow2', '-F', 'qcow2', 'x/d1/dot.qcow2']);
  mk(['-f', 'qcow2', '-b', '../dot.qcow2', '-F', 'qcow2', 'x/d1/d2/top.qcow2', '6M']);
  mk(['-f', 'qcow2', '-b', join(dir, 'x/base.qcow2'), '-F', 'qcow2', 'x/abs.qcow2']);
  mk(['-f', 'qcow2', 'x/json.qcow2', '1M']);
  must(q(['rebase', '-u', '-f', 'qcow2', '-b', 'json:{"driver":"qcow2","file":{"driver":"file","filename":"base.qcow2"}}', '-F', 'qcow2', 'x/json.qcow2']), 'rebase');
  mk(['-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'x/nofmt.qcow2']);
  // retype the backing-format header extension (0xe2792aca) to an unknown one: QEMU ignores it
  const nofmt = readAt('x/nofmt.qcow2', 0, 4096);
  patch('x/nofmt.qcow2', nofmt.indexOf(Buffer.from([0xe2, 0x79, 0x2a, 0xca])), [0x12, 0x34, 0x56, 0x78]);
  x.push('x/d1/d2/top.qcow2', 'x/d1/dot.qcow2', 'x/abs.qcow2', 'x/nofmt.qcow2');
  return x;
}

let matrix: MatrixImage[] = [];

describeQemu('qcowkit info versus qemu-img info 7.2', () => {
  beforeAll(() => {
    process.env.TZ = 'UTC'; // human snapshot dates are local time; qemu runs with TZ=UTC
    dir = tmpDir('qcowkit-info-interop-');
    matrix = buildMatrix(dir);
    names.push(...matrix.map((m) => relative(dir, m.path)), ...buildExtras());
    chmodSync(dir, 0o755);
  });

  const variants: [string, string[]][] = [
    ['json', ['--output=json']],
    ['json --backing-chain', ['--output=json', '--backing-chain']],
    ['human', []],
    ['human --backing-chain', ['--backing-chain']],
  ];

  it('the matrix and the extras are all there', () => {
    expect(matrix.length).toBeGreaterThanOrEqual(28);
    expect(names.length).toBeGreaterThanOrEqual(45);
  });

  it('same stdout for every image, output format and --backing-chain', async () => {
    const failures: string[] = [];
    let compared = 0;
    for (const name of names) {
      for (const [label, opts] of variants) {
        const theirs = q(['info', ...opts, name]);
        const ours = await cli(['info', ...opts, name], dir);
        if (theirs.status !== 0) {
          failures.push(`${name} (${label}): qemu-img failed: ${theirs.stderr}`);
          continue;
        }
        compared++;
        if (ours.status !== 0 || ours.stdout !== theirs.stdout) {
          failures.push(`${name} (${label}): exit ${ours.status} ${ours.stderr}\n--- qemu-img\n${theirs.stdout}\n--- qcowkit\n${ours.stdout}`);
        }
      }
    }
    expect(failures.join('\n\n')).toBe('');
    expect(compared).toBe(names.length * variants.length);
  });

  it('paths print exactly as given (./, //, absolute, .. inside)', async () => {
    const spellings = ['./v3-c4k-rc16.qcow2', 'chain//sub/top.qcow2', join(dir, 'chain/sub/top.qcow2'), 'chain/../chain/sub/top.qcow2', 'rawback/./over.qcow2', './x/d1/d2/top.qcow2'];
    for (const name of spellings) {
      for (const [label, opts] of variants) {
        const theirs = q(['info', ...opts, name]);
        expect(theirs.status, `${name} ${label}`).toBe(0);
        expect((await cli(['info', ...opts, name], dir)).stdout, `${name} ${label}`).toBe(theirs.stdout);
      }
    }
    // from inside a subdirectory, with a backing name that climbs out of it
    const sub = join(dir, 'x/d1/d2');
    for (const [label, opts] of variants) {
      const theirs = qemuImg(['info', ...opts, 'top.qcow2'], { cwd: sub });
      expect((await cli(['info', ...opts, 'top.qcow2'], sub)).stdout, label).toBe(theirs.stdout);
    }
  });

  it('what the extras show: in-use bitmaps, dirty and corrupt flags, LUKS header, data file, snapshots', async () => {
    const j = async (n: string) => JSON.parse((await cli(['info', '--output=json', n], dir)).stdout);
    const bm = (await j('x/bm-inuse.qcow2'))['format-specific'].data.bitmaps;
    expect(bm.map((b: { flags: string[] }) => b.flags)).toEqual([['in-use', 'auto'], ['in-use']]);
    expect((await j('x/dirty.qcow2'))['dirty-flag']).toBe(true);
    expect((await j('x/corrupt.qcow2'))['format-specific'].data.corrupt).toBe(true);
    expect((await j('x/odd1000.raw'))['virtual-size']).toBe(1024);
    expect((await j('x/odd511.raw'))['virtual-size']).toBe(512);
    const luks = (await j('x/luks-essiv.qcow2'))['format-specific'].data.encrypt;
    expect(luks).toMatchObject({ format: 'luks', 'cipher-alg': 'twofish-128', 'cipher-mode': 'cbc', 'ivgen-alg': 'essiv', 'ivgen-hash-alg': 'sha256', 'hash-alg': 'sha512' });
    expect(luks.slots).toHaveLength(8);
    expect((await j('x/dfraw.qcow2'))['format-specific'].data).toMatchObject({ 'data-file': 'dfraw.data', 'data-file-raw': true });
    const human = (await cli(['info', 'x/snapv3.qcow2'], dir)).stdout;
    expect(human).toContain('1         s                 1.5 GiB 2023-11-14 22:13:20 01:02:03.456      12345');
    expect((await cli(['info', 'x/json.qcow2'], dir)).stdout).toContain('backing file: json:{');
  });

  it('through bin/qcowkit.js too (bundle, exit code, stdout)', () => {
    for (const args of [['--output=json', 'chain/sub/top.qcow2'], ['--backing-chain', 'rawback/over.qcow2'], ['x/snapv2.qcow2'], ['--output=json', 'x/luks.qcow2']]) {
      const theirs = q(['info', ...args]);
      const ours = runCli(['info', ...args], { cwd: dir });
      expect([ours.status, ours.stderr]).toEqual([0, '']);
      expect(ours.stdout, args.join(' ')).toBe(theirs.stdout);
    }
  });

  // --- bad input ----------------------------------------------------------------------------------

  interface Bad {
    name: string;
    args: string[];
    file: string;
    /** Exit status of qemu-img (null: don't run it); it hangs on none of these for info. */
    qemu: number | null;
    message: RegExp;
  }

  it('bad input: exit 1, one line naming the file, no stack, file untouched', () => {
    mkdirSync(join(dir, 'bad/adir'), { recursive: true });
    writeFileSync(join(dir, 'bad/empty.img'), '');
    writeFileSync(join(dir, 'bad/short.qcow2'), readAt('v3-c4k-rc16.qcow2', 0, 50));
    writeFileSync(join(dir, 'bad/text.img'), 'not a disk image\n'.repeat(100));
    mk(['-f', 'qcow2', '-o', 'cluster_size=4k', 'bad/a.qcow2', '4M']);
    mk(['-f', 'qcow2', '-o', 'cluster_size=4k', '-b', 'a.qcow2', '-F', 'qcow2', 'bad/b.qcow2']);
    must(q(['rebase', '-u', '-b', 'b.qcow2', '-F', 'qcow2', 'bad/a.qcow2']), 'rebase');
    mk(['-f', 'qcow2', '-u', '-b', 'missing.qcow2', '-F', 'qcow2', 'bad/nobacking.qcow2', '1M']);
    mk(['-f', 'qcow2', 'bad/incompat.qcow2', '1M']);
    patch('bad/incompat.qcow2', 79, [0x80]);
    // cut before the L1 table (192 KiB for 64 KiB clusters)
    writeFileSync(join(dir, 'bad/cut-l1.qcow2'), readAt('v3-c64k-rc16.qcow2', 0, 128 * K));
    const cases: Bad[] = [
      { name: 'directory', args: [], file: 'bad/adir', qemu: 1, message: /directory/i },
      { name: 'empty file as qcow2', args: ['-f', 'qcow2'], file: 'bad/empty.img', qemu: 1, message: /qcow2|header/i },
      { name: 'header cut short', args: [], file: 'bad/short.qcow2', qemu: 1, message: /header/i },
      { name: 'not qcow2, -f qcow2', args: ['-f', 'qcow2'], file: 'bad/text.img', qemu: 1, message: /not in qcow2 format/ },
      { name: 'backing loop', args: ['--backing-chain'], file: 'bad/a.qcow2', qemu: 1, message: /loop/ },
      { name: 'missing backing file', args: ['--backing-chain'], file: 'bad/nobacking.qcow2', qemu: 1, message: /missing\.qcow2.*No such file/ },
      // qemu-img follows json: names; qcowkit opens plain files only
      { name: 'json: backing name', args: ['--backing-chain'], file: 'x/json.qcow2', qemu: null, message: /json:.*protocol/ },
      { name: 'unknown incompatible feature', args: [], file: 'bad/incompat.qcow2', qemu: 1, message: /Unknown incompatible feature: 80/ },
      { name: 'no such file', args: [], file: 'bad/nothere.qcow2', qemu: 1, message: /No such file/ },
      // qemu-img reads the missing L1 table as zeros and reports the image (exit 0); qcowkit refuses
      { name: 'L1 table past the end of the file', args: [], file: 'bad/cut-l1.qcow2', qemu: 0, message: /L1 table lies past the end of the file/ },
    ];
    for (const c of cases) {
      const path = join(dir, c.file);
      const before = c.name === 'directory' || c.name === 'no such file' ? '' : sha256(path);
      if (c.qemu !== null) expect(q(['info', ...c.args, c.file]).status, `qemu-img: ${c.name}`).toBe(c.qemu);
      const r = runCli(['info', ...c.args, c.file], { cwd: dir, timeout: 20_000 });
      expectOneLineError(r, c, 1);
      expect(r.stdout, c.name).toBe('');
      if (before) expect(sha256(path), c.name).toBe(before);
    }
  });
});
