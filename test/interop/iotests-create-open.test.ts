// QEMU iotests whose diffs were more than wording (issue 8, part 3), each checked against
// qemu-img 7.2 on the same image or command line:
//   036: unknown incompatible bits named from the feature-name table; unknown autoclear bits
//        cleared by a read-write open (check -r);
//   054: a size too large for the format still gets its "Formatting" line; "Image is too big";
//   061: create -o data_file / data_file_raw, and check of such images (the data file is opened);
//   111: a missing backing file is reported before the missing -F;
//   112: number options read as strtoull does (-1 wraps) and then as a signed 64-bit integer;
//   261: more than 65536 snapshots: check reports them and -r all discards the overhanging ones;
//   271: check -r prints its repair summary after the verification pass's messages when stdout
//        is not a terminal (qemu-img's stdout is block-buffered);
//   rebase -u, like every read-write open of qemu-img, clears unknown autoclear bits.
import { copyFileSync, existsSync, readFileSync, statSync, unlinkSync } from 'node:fs';
import { join } from 'node:path';
import { beforeEach, expect, it } from 'vitest';
import { patchBytes, readBytesAt } from '../helpers/bytes.js';
import { CLI_BIN, runCli } from '../helpers/cli.js';
import { describeQemu, qemuImg, qemuIo, run } from '../helpers/qemu.js';
import { tmpDir } from '../helpers/tmp.js';

let dir = '';
const at = (name: string) => join(dir, name);
const ours = (args: string[]) => runCli(args, { cwd: dir });
const theirs = (args: string[]) => qemuImg(args, { cwd: dir });
const must = (r: { status: number; stderr: string }) => expect(r.status, r.stderr).toBe(0);

/**
 * The message of a one-line error without the program's prefix (`qcowkit: FILE: ` where qemu-img
 * says `qemu-img: FILE: ` or `qemu-img: Could not open 'FILE': `), with the file names unified.
 */
function message(stderr: string, names: Record<string, string> = {}): string {
  let m = stderr.trim().split('\n')[0]!.replace(/^(qcowkit|qemu-img): /, '');
  m = m.replace(/^Could not open '[^']*': /, '').replace(/^[\w./-]+\.qcow2: /, '');
  for (const [from, to] of Object.entries(names)) m = m.replaceAll(from, to);
  // qcowkit names the -o option where QEMU names the QAPI field (deliberate wording).
  return m.replace('(use version=v3 or greater)', '(use compat=1.1)');
}

/** Both programs run `args` with `mine`/`theirs` file names: same exit code, stdout and message. */
function sameCreate(args: (name: string) => string[], opts: { sameMessage?: boolean } = {}): { status: number; stdout: string; stderr: string } {
  const k = ours(args('k.qcow2'));
  const q = theirs(args('q.qcow2'));
  expect(k.status, k.stderr).toBe(q.status);
  expect(k.stdout.replaceAll('k.qcow2', 'q.qcow2').replaceAll('k.data', 'q.data')).toBe(q.stdout);
  if (opts.sameMessage !== false && q.status !== 0) expect(message(k.stderr, { 'k.qcow2': 'q.qcow2', 'k.data': 'q.data' })).toBe(message(q.stderr));
  expect(existsSync(at('k.qcow2'))).toBe(existsSync(at('q.qcow2')));
  for (const f of ['k.qcow2', 'q.qcow2']) if (existsSync(at(f))) unlinkSync(at(f));
  return k;
}

/** Header extensions (type, data) written over the extension area of a v3 image, terminated. */
function setExtensions(file: string, exts: Array<[number, Uint8Array]>): void {
  const parts: number[] = [];
  for (const [type, data] of exts) {
    const head = Buffer.alloc(8);
    head.writeUInt32BE(type, 0);
    head.writeUInt32BE(data.length, 4);
    parts.push(...head, ...data, ...new Uint8Array((8 - (data.length % 8)) % 8));
  }
  parts.push(...new Uint8Array(8));
  const headerLength = readBytesAt(file, 100, 4).readUInt32BE(0);
  patchBytes(file, headerLength, parts);
}

/** A feature-name table entry: type, bit, name (NUL-padded to 46 bytes unless `raw`). */
function feature(type: number, bit: number, name: string, raw = false): Uint8Array {
  const b = Buffer.alloc(raw ? 2 + name.length : 48);
  b[0] = type;
  b[1] = bit;
  b.write(name, 2, 'latin1');
  return b;
}

const FEATURE_TABLE = 0x6803f857;
const BACKING_FORMAT = 0xe2792aca;
const cat = (...parts: Uint8Array[]) => Buffer.concat(parts);

function setIncompatible(file: string, bits: bigint): void {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(bits);
  patchBytes(file, 72, b);
}

describeQemu('qemu-iotests parity: feature names, sizes, data files, backing and number options', () => {
  beforeEach(() => {
    dir = tmpDir('qcowkit-iotests-create-open-');
  });

  it('unknown incompatible bits are named from the feature-name table as qemu-img names them (036)', () => {
    const cases: Array<[string, bigint, Array<[number, Uint8Array]>]> = [
      ['no table', 1n << 63n, []],
      ['a short last entry', 1n << 63n, [[FEATURE_TABLE, feature(0, 63, 'Test feature', true)]]],
      ['one of three bits named', 7n << 61n, [[FEATURE_TABLE, feature(0, 61, 'Test feature', true)]]],
      ['table order, not bit order', 7n << 61n, [[FEATURE_TABLE, cat(feature(0, 62, 'second'), feature(0, 61, 'first'))]]],
      ['other kinds ignored', 7n << 61n, [[FEATURE_TABLE, cat(feature(1, 61, 'compat'), feature(0, 62, 'incompat'), feature(2, 63, 'autoclear'))]]],
      ['an empty name ends the table', 3n << 62n, [[FEATURE_TABLE, cat(feature(0, 62, ''), feature(0, 63, 'never read'))]]],
      ['bit numbers taken modulo 64', 1n << 63n, [[FEATURE_TABLE, feature(0, 127, 'wide bit')]]],
      ['the first name for a bit wins', 1n << 63n, [[FEATURE_TABLE, cat(feature(0, 63, 'one'), feature(0, 63, 'two'))]]],
      ['a repeated table replaces the first', 1n << 63n, [[FEATURE_TABLE, feature(0, 63, 'first table')], [FEATURE_TABLE, feature(0, 63, 'second table')]]],
      ['a bad extension ends the search', 1n << 63n, [[BACKING_FORMAT, Buffer.alloc(20, 0x61)], [FEATURE_TABLE, feature(0, 63, 'after the bad one')]]],
      ['names before a bad extension count', 1n << 63n, [[FEATURE_TABLE, feature(0, 63, 'before')], [BACKING_FORMAT, Buffer.alloc(20, 0x61)]]],
      ['a 46-byte name', 1n << 63n, [[FEATURE_TABLE, feature(0, 63, 'n'.repeat(46))]]],
    ];
    must(theirs(['create', '-q', '-f', 'qcow2', 'base.qcow2', '64M']));
    for (const [what, bits, exts] of cases) {
      copyFileSync(at('base.qcow2'), at('t.qcow2'));
      setIncompatible(at('t.qcow2'), bits);
      setExtensions(at('t.qcow2'), exts);
      for (const cmd of ['info', 'check']) {
        const k = ours([cmd, 't.qcow2']);
        const q = theirs([cmd, 't.qcow2']);
        expect(k.status, `${what}: ${k.stderr}`).toBe(q.status);
        expect(message(k.stderr), what).toBe(message(q.stderr));
        expect(k.stderr, what).toMatch(/Unsupported qcow2 feature\(s\): /);
      }
    }
  });

  it('check -r clears unknown autoclear bits as qemu-img does; a read-only check leaves them (036)', () => {
    must(theirs(['create', '-q', '-f', 'qcow2', 'k.qcow2', '64M']));
    patchBytes(at('k.qcow2'), 88, [0x80, 0, 0, 0, 0, 0, 0, 0]);
    copyFileSync(at('k.qcow2'), at('q.qcow2'));
    const autoclear = (f: string) => readBytesAt(at(f), 88, 8).readBigUInt64BE(0);
    must(ours(['check', 'k.qcow2']));
    expect(autoclear('k.qcow2')).toBe(1n << 63n);
    const k = ours(['check', '-r', 'all', 'k.qcow2']);
    const q = theirs(['check', '-r', 'all', 'q.qcow2']);
    expect(k.status).toBe(q.status);
    expect(k.stdout).toBe(q.stdout);
    expect(autoclear('k.qcow2')).toBe(autoclear('q.qcow2'));
    expect(autoclear('k.qcow2')).toBe(0n);
    expect(readFileSync(at('k.qcow2')).equals(readFileSync(at('q.qcow2')))).toBe(true);
  });

  it('a size too large for qcow2 is refused after the Formatting line; past 2^63 - 1 before it (054)', () => {
    for (const size of ['1048576T', '7E', '9007199254740993', '2251799813685249']) {
      const r = sameCreate((f) => ['create', '-f', 'qcow2', f, size]);
      expect(r.status, size).toBe(1);
      expect(r.stdout, size).toMatch(/^Formatting /);
    }
    for (const size of ['8E', '9223372036854775808']) {
      const r = sameCreate((f) => ['create', '-f', 'qcow2', f, size], { sameMessage: false });
      expect(r.stdout, size).toBe('');
      expect(r.stderr, size).toContain('9223372036854775807');
    }
    // Bigger clusters hold more: 2 MiB clusters take 2^52.
    sameCreate((f) => ['create', '-f', 'qcow2', '-o', 'cluster_size=2M', f, String(2 ** 52)]);
  });

  it('an image whose size needs more than INT_MAX L1 entries: "Image is too big", as qemu-img (054)', () => {
    must(theirs(['create', '-q', '-f', 'qcow2', 't.qcow2', '4G']));
    const size = Buffer.alloc(8);
    size.writeBigUInt64BE(1n << 60n);
    patchBytes(at('t.qcow2'), 24, size);
    for (const cmd of ['info', 'check', 'map']) {
      const k = ours([cmd, 't.qcow2']);
      const q = theirs([cmd, 't.qcow2']);
      expect(k.status, cmd).toBe(q.status);
      expect(message(k.stderr), cmd).toBe('Image is too big');
      expect(message(q.stderr), cmd).toBe('Image is too big');
    }
  });

  it('create -b with a backing file that cannot be opened reports it before asking for -F (111)', () => {
    must(theirs(['create', '-q', '-f', 'qcow2', 'base.qcow2', '1M']));
    for (const [args, size] of [
      [['-b', 'missing.qcow2'], []],
      [['-b', 'missing.qcow2', '-F', 'qcow2'], []],
      [['-b', 'missing.qcow2'], ['1M']],
    ]) {
      const k = ours(['create', '-f', 'qcow2', ...args!, 'k.qcow2', ...size!]);
      const q = theirs(['create', '-f', 'qcow2', ...args!, 'q.qcow2', ...size!]);
      expect(k.status).toBe(q.status);
      expect(q.stderr).toContain("Could not open 'missing.qcow2': No such file or directory");
      expect(k.stderr).toContain('missing.qcow2');
      expect(k.stderr).toContain('No such file or directory');
      expect(existsSync(at('k.qcow2'))).toBe(false);
    }
    // An existing backing file without -F, or -u: then -F is what is missing.
    for (const extra of [[], ['-u']]) {
      const k = ours(['create', '-f', 'qcow2', ...extra, '-b', 'base.qcow2', 'k.qcow2', '1M']);
      const q = theirs(['create', '-f', 'qcow2', ...extra, '-b', 'base.qcow2', 'q.qcow2', '1M']);
      expect(k.status).toBe(q.status);
      expect(k.stderr).toContain('Backing file specified without backing format');
      expect(q.stderr).toContain('Backing file specified without backing format');
    }
  });

  it('number options read as qemu-img reads them: -1 wraps, 2^64 is out of range, then int64 (112)', () => {
    for (const v of ['-1', '-0', ' -16', '0x10', '010', '+16', '99999999999999999999', '18446744073709551615', '-18446744073709551600', '16 ', '08', '0x', '', '42', '128', '0', '64']) {
      const r = sameCreate((f) => ['create', '-f', 'qcow2', '-o', `refcount_bits=${v}`, f, '1M']);
      if (r.status) expect(r.stderr.split('\n').filter(Boolean), v).toHaveLength(1);
    }
    for (const o of ['compat=0.10,refcount_bits=1', 'compat=0.10,refcount_bits=64']) {
      const r = sameCreate((f) => ['create', '-f', 'qcow2', '-o', o, f, '64M'], { sameMessage: false });
      expect(r.status).toBe(1);
      expect(r.stderr).toContain('Different refcount widths than 16 bits require compatibility level 1.1 or above');
    }
  });

  it('create -o data_file makes the image and data file qemu-img makes, byte for byte (061)', () => {
    const sizes = ['1000', '100k', '70M'];
    const options = ['', ',data_file_raw=on', ',preallocation=metadata', ',preallocation=full', ',preallocation=falloc', ',extended_l2=on,data_file_raw=on', ',lazy_refcounts=on,refcount_bits=1', ',cluster_size=4k,data_file_raw=on'];
    for (const size of sizes) {
      for (const o of options) {
        const what = `${size}${o}`;
        const k = ours(['create', '-f', 'qcow2', '-o', `data_file=k.data${o}`, 'k.qcow2', size]);
        const q = theirs(['create', '-f', 'qcow2', '-o', `data_file=q.data${o}`, 'q.qcow2', size]);
        expect(k.status, `${what}: ${k.stderr}`).toBe(0);
        expect(q.status, what).toBe(0);
        expect(k.stdout.replaceAll('k.', 'q.'), what).toBe(q.stdout);
        const image = readFileSync(at('k.qcow2'));
        const ref = readFileSync(at('q.qcow2'));
        // The names differ in one letter; everything else is the same.
        expect(Buffer.from(image.toString('latin1').replaceAll('k.data', 'q.data'), 'latin1').equals(ref), what).toBe(true);
        expect(statSync(at('k.data')).size, what).toBe(statSync(at('q.data')).size);
        expect(readFileSync(at('k.data')).equals(readFileSync(at('q.data'))), what).toBe(true);
      }
    }
  });

  it('data-file images: info, check and qemu-io agree with qemu-img; check opens the data file (061)', () => {
    must(ours(['create', '-q', '-f', 'qcow2', '-o', 'data_file=t.data', 't.qcow2', '64M']));
    // A relative data file name is taken from the current directory (QEMU 7.2).
    must(qemuIo(at('t.qcow2'), ['write -P 7 64k 128k'], { format: 'qcow2', cwd: dir }));
    for (const args of [['info', 't.qcow2'], ['info', '--output=json', 't.qcow2'], ['check', 't.qcow2'], ['check', '--output=json', 't.qcow2']]) {
      const k = ours(args);
      const q = theirs(args);
      expect(k.status, k.stderr).toBe(q.status);
      expect(k.stdout.replace(/disk size: .*/, '').replace(/"actual-size": \d+/, '')).toBe(q.stdout.replace(/disk size: .*/, '').replace(/"actual-size": \d+/, ''));
    }
    must(qemuIo(at('t.qcow2'), ['read -P 7 64k 128k', 'read -P 0 0 64k'], { format: 'qcow2', cwd: dir }));
    // QEMU 7.2 takes a relative data file name from the current directory: from elsewhere (or
    // with the data file gone, or a directory in its place) check fails as qemu-img's does.
    const up = (args: string[]) => [runCli(args, { cwd: join(dir, '..') }), qemuImg(args, { cwd: join(dir, '..') })] as const;
    const sub = join(dir.split('/').pop()!, 't.qcow2');
    for (const [k, q] of [up(['check', sub]), up(['info', sub])]) expect(k.status, k.stderr).toBe(q.status);
    unlinkSync(at('t.data'));
    const k = ours(['check', 't.qcow2']);
    expect(k.status).toBe(theirs(['check', 't.qcow2']).status);
    expect(message(k.stderr)).toBe("Could not open 't.data': No such file or directory");
    expect(ours(['check', '-r', 'all', 't.qcow2']).status).toBe(theirs(['check', '-r', 'all', 't.qcow2']).status);
    must(ours(['info', 't.qcow2']));
  });

  it('data_file option errors: same order, Formatting line and exit code as qemu-img (061)', () => {
    must(theirs(['create', '-q', '-f', 'qcow2', 'base.qcow2', '1M']));
    for (const o of [
      ['-o', 'data_file=k.data,compat=0.10'],
      ['-o', 'data_file_raw=on'],
      ['-o', 'data_file_raw=on,compat=0.10,refcount_bits=8'],
      ['-o', 'data_file=k.data,data_file_raw=on', '-b', 'base.qcow2', '-F', 'qcow2'],
      ['-o', 'data_file=k.data,data_file_raw=on,compat=0.10', '-b', 'base.qcow2', '-F', 'qcow2'],
      ['-o', 'data_file=k.data,data_file_raw=on,preallocation=metadata', '-b', 'base.qcow2', '-F', 'qcow2'],
      ['-o', 'compat=0.10,data_file=k.data,compression_type=zstd'],
      ['-o', 'data_file=k.data,data_file_raw=on,encryption=off'],
    ]) {
      sameCreate((f) => ['create', '-f', 'qcow2', ...o.map((a) => (f === 'q.qcow2' ? a.replace('k.data', 'q.data') : a)), f, '1M']);
      expect(existsSync(at('k.data'))).toBe(existsSync(at('q.data')));
    }
  });

  it('more than 65536 snapshots: info refuses, check reports, -r all discards the overhanging ones (261)', () => {
    must(theirs(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', 'k.qcow2', '64M']));
    // 131072 all-zero 40-byte entries (valid in v2) at 1 MiB, the clusters they use allocated.
    patchBytes(at('k.qcow2'), 60, [0, 2, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0]);
    patchBytes(at('k.qcow2'), 1048576 + 40 * 131072 - 1, [0]);
    const refblock = Number(readBytesAt(at('k.qcow2'), Number(readBytesAt(at('k.qcow2'), 48, 8).readBigUInt64BE(0)), 8).readBigUInt64BE(0));
    const first = 1048576 / 65536;
    const last = Math.ceil((1048576 + 40 * 131072) / 65536);
    for (let c = first; c < last; c++) patchBytes(at('k.qcow2'), refblock + 2 * c, [0, 1]);
    copyFileSync(at('k.qcow2'), at('q.qcow2'));
    for (const args of [['info'], ['check'], ['check', '-r', 'all']]) {
      const k = ours([...args, 'k.qcow2']);
      const q = theirs([...args, 'q.qcow2']);
      expect(k.status, `${args.join(' ')}: ${k.stderr}`).toBe(q.status);
      expect(k.stdout.replaceAll('k.qcow2', 'q.qcow2'), args.join(' ')).toBe(q.stdout);
    }
    // The same repair, byte for byte (qemu-img also punches the freed clusters: only the host
    // allocation differs).
    expect(readBytesAt(at('k.qcow2'), 60, 4).readUInt32BE(0)).toBe(65536);
    expect(readFileSync(at('k.qcow2')).equals(readFileSync(at('q.qcow2')))).toBe(true);
  });

  it('check -r into a pipe: the repair summary follows the verification pass, as qemu-img prints it (271)', () => {
    must(theirs(['create', '-q', '-f', 'qcow2', 'k.qcow2', '1M']));
    must(qemuIo(at('k.qcow2'), ['write -P 1 0 64k'], { format: 'qcow2' }));
    // Misalign the data cluster's L2 entry: an error -r all can't fix, reported by both passes,
    // after a leak it does fix.
    const l1 = Number(readBytesAt(at('k.qcow2'), 40, 8).readBigUInt64BE(0));
    const l2 = Number(readBytesAt(at('k.qcow2'), l1, 8).readBigUInt64BE(0) & 0x00fffffffffffe00n);
    const entry = readBytesAt(at('k.qcow2'), l2, 8).readBigUInt64BE(0);
    const moved = Buffer.alloc(8);
    moved.writeBigUInt64BE(entry + 0x200n);
    patchBytes(at('k.qcow2'), l2, moved);
    copyFileSync(at('k.qcow2'), at('q.qcow2'));
    const both = (cmd: string) => run('sh', ['-c', `${cmd} check -r all ${cmd.includes('qemu-img') ? 'q' : 'k'}.qcow2 2>&1`], { cwd: dir });
    const k = both(`"${process.execPath}" "${CLI_BIN}"`);
    const q = both('qemu-img');
    expect(k.status).toBe(q.status);
    const lines = (out: string) => out.split('\n').filter((l) => !/^(qcowkit|qemu-img): /.test(l));
    expect(lines(k.stdout)).toEqual(lines(q.stdout));
    expect(q.stdout.indexOf('The following inconsistencies')).toBeGreaterThan(q.stdout.lastIndexOf('ERROR offset='));
  });

  it('rebase -u clears unknown autoclear bits as qemu-img does (a read-write open)', () => {
    must(theirs(['create', '-q', '-f', 'qcow2', 'base.qcow2', '1M']));
    must(theirs(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'k.qcow2']));
    patchBytes(at('k.qcow2'), 88, [0x80, 0, 0, 0, 0, 0, 0, 0]);
    copyFileSync(at('k.qcow2'), at('q.qcow2'));
    must(ours(['rebase', '-u', '-b', 'base.qcow2', '-F', 'qcow2', 'k.qcow2']));
    must(theirs(['rebase', '-u', '-b', 'base.qcow2', '-F', 'qcow2', 'q.qcow2']));
    expect(readBytesAt(at('k.qcow2'), 88, 8).readBigUInt64BE(0)).toBe(0n);
    expect(readBytesAt(at('q.qcow2'), 88, 8).readBigUInt64BE(0)).toBe(0n);
    expect(readFileSync(at('k.qcow2')).equals(readFileSync(at('q.qcow2')))).toBe(true);
  });
});
