// `qcowkit create` (the built CLI) checked by QEMU 7.2: every image passes `qemu-img check`,
// `qemu-img info` reports what was asked, qemu-io writes and reads data back, the
// "Formatting ..." line equals qemu-img's, and plain images are byte-identical to qemu-img's.
// Needs `npm run build` first. Skipped (loudly) without qemu-img/qemu-io, except under CI=true.
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { describeQemu, qemuImg as qemuImgIn, qemuImgJson, qemuIo, run as runIn, type RunResult } from '../helpers/qemu.js';

const ROOT = resolve(fileURLToPath(new URL('../..', import.meta.url)));
const BIN = join(ROOT, 'bin/qcowkit.js');

let dir = '';
const run = (cmd: string, args: string[]): RunResult => runIn(cmd, args, { cwd: dir });
const qcowkit = (args: string[]) => run(process.execPath, [BIN, 'create', ...args]);
const qemuImg = (args: string[]) => qemuImgIn(args, { cwd: dir });
const qemuJson = <T>(args: string[]): T => qemuImgJson<T>(args, { cwd: dir });
const io = (file: string, format: string, cmds: string[]) => qemuIo(file, cmds, { cwd: dir, format });

interface Info {
  'virtual-size': number;
  'cluster-size'?: number;
  format: string;
  'backing-filename'?: string;
  'backing-filename-format'?: string;
  'full-backing-filename'?: string;
  'format-specific'?: { data: Record<string, unknown> };
}

describeQemu('qcowkit create versus qemu-img 7.2', () => {
  beforeAll(() => {
    if (runIn(process.execPath, [BIN, 'create', '--help']).status !== 0) throw new Error('the CLI does not run: `npm run build` first');
    dir = mkdtempSync(join(tmpdir(), 'qcowkit-create-interop-'));
    mkdirSync(join(dir, 'sub'));
    mkdirSync(join(dir, 'data'));
    // Backing files made by QEMU, with data the overlays must show.
    expect(qemuImg(['create', '-q', '-f', 'qcow2', 'sub/base.qcow2', '64M']).status).toBe(0);
    expect(io('sub/base.qcow2', 'qcow2', ['write -P 0xcd 1M 64k']).status).toBe(0);
    expect(qemuImg(['create', '-q', '-f', 'raw', 'data/base.raw', '5M']).status).toBe(0);
    expect(io('data/base.raw', 'raw', ['write -P 0xcd 1M 64k']).status).toBe(0);
  });
  afterAll(() => {
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  interface Case {
    name: string;
    /** create arguments; @ is the image name (ours / qemu's). */
    args: string;
    info: Record<string, unknown>;
    /** Byte-identical to qemu-img's image. */
    same?: boolean;
    /** Data the backing file shows through (read before writing). */
    backingData?: boolean;
    /** The backing file is missing: only `info` can open the image. */
    noOpen?: boolean;
  }
  const G = 2 ** 30;
  const v3 = (extra: Record<string, unknown> = {}) => ({ compat: '1.1', 'refcount-bits': 16, 'extended-l2': false, 'lazy-refcounts': false, 'compression-type': 'zlib', ...extra });
  const cases: Case[] = [
    { name: 'v3 defaults', args: '-f qcow2 @ 1G', info: { 'virtual-size': G, 'cluster-size': 65536, data: v3() }, same: true },
    { name: 'v2', args: '-f qcow2 -o compat=0.10 @ 100M', info: { 'virtual-size': 100 * 2 ** 20, data: { compat: '0.10', 'refcount-bits': 16 } }, same: true },
    { name: 'v2 alias', args: '-f qcow2 -o compat=v2 @ 100M', info: { data: { compat: '0.10' } }, same: true },
    { name: 'v3 alias', args: '-f qcow2 -o compat=v3 @ 100M', info: { data: v3() }, same: true },
    { name: 'cluster 512', args: '-f qcow2 -o cluster_size=512 @ 1G', info: { 'cluster-size': 512 } },
    { name: 'cluster 512 small', args: '-f qcow2 -o cluster_size=512 @ 4M', info: { 'cluster-size': 512 }, same: true },
    { name: 'cluster 4k', args: '-f qcow2 -o cluster_size=4k @ 256M', info: { 'cluster-size': 4096 }, same: true },
    { name: 'cluster 2M', args: '-f qcow2 -o cluster_size=2M @ 1T', info: { 'cluster-size': 2 ** 21, 'virtual-size': 2 ** 40 }, same: true },
    { name: 'refcount 1', args: '-f qcow2 -o refcount_bits=1 @ 1G', info: { data: v3({ 'refcount-bits': 1 }) }, same: true },
    { name: 'refcount 64', args: '-f qcow2 -o refcount_bits=64 @ 1G', info: { data: v3({ 'refcount-bits': 64 }) }, same: true },
    { name: 'extended L2', args: '-f qcow2 -o extended_l2=on @ 1G', info: { data: v3({ 'extended-l2': true }) }, same: true },
    { name: 'extended L2 16k', args: '-f qcow2 -o extended_l2=on,cluster_size=16k @ 1G', info: { 'cluster-size': 16384, data: v3({ 'extended-l2': true }) }, same: true },
    { name: 'lazy refcounts', args: '-f qcow2 -o lazy_refcounts=on @ 1G', info: { data: v3({ 'lazy-refcounts': true }) }, same: true },
    { name: 'zstd', args: '-f qcow2 -o compression_type=zstd @ 1G', info: { data: v3({ 'compression-type': 'zstd' }) }, same: true },
    {
      name: 'all v3 features',
      args: '-f qcow2 -o compat=v3,cluster_size=16k,refcount_bits=2,extended_l2=on,lazy_refcounts=on,compression_type=zstd @ 3G',
      info: { 'virtual-size': 3 * G, 'cluster-size': 16384, data: v3({ 'refcount-bits': 2, 'extended-l2': true, 'lazy-refcounts': true, 'compression-type': 'zstd' }) },
      same: true,
    },
    { name: 'preallocation metadata', args: '-f qcow2 -o preallocation=metadata @ 1G', info: { 'virtual-size': G } },
    { name: 'preallocation metadata odd size', args: '-f qcow2 -o preallocation=metadata @ 100000', info: { 'virtual-size': 100352 } },
    { name: 'preallocation metadata 512', args: '-f qcow2 -o preallocation=metadata,cluster_size=512 @ 16M', info: { 'cluster-size': 512 } },
    {
      name: 'preallocation metadata extended 2M rc64',
      args: '-f qcow2 -o preallocation=metadata,extended_l2=on,cluster_size=2M,refcount_bits=64 @ 4G',
      info: { 'cluster-size': 2 ** 21, data: v3({ 'extended-l2': true, 'refcount-bits': 64 }) },
    },
    { name: 'preallocation metadata rc1', args: '-f qcow2 -o preallocation=metadata,refcount_bits=1 @ 5G', info: { data: v3({ 'refcount-bits': 1 }) } },
    { name: 'preallocation full', args: '-f qcow2 -o preallocation=full @ 8M', info: { 'virtual-size': 8 * 2 ** 20 } },
    {
      name: 'qcow2 backing, relative, in a subdirectory, size from the backing file',
      args: '-f qcow2 -b base.qcow2 -F qcow2 sub/@',
      info: { 'virtual-size': 64 * 2 ** 20, 'backing-filename': 'base.qcow2', 'backing-filename-format': 'qcow2', 'full-backing-filename': 'sub/base.qcow2' },
      same: true,
      backingData: true,
    },
    {
      name: 'raw backing, relative to the image directory',
      args: '-f qcow2 -b ../data/base.raw -F raw sub/@',
      info: { 'virtual-size': 5 * 2 ** 20, 'backing-filename': '../data/base.raw', 'backing-filename-format': 'raw', 'full-backing-filename': 'sub/../data/base.raw' },
      same: true,
      backingData: true,
    },
    {
      name: 'backing via -o, v2, larger size',
      args: '-f qcow2 -o backing_file=sub/base.qcow2,backing_fmt=qcow2,compat=0.10 @ 2G',
      info: { 'virtual-size': 2 * G, 'backing-filename': 'sub/base.qcow2', data: { compat: '0.10' } },
      same: true,
      backingData: true,
    },
    { name: 'backing, 512-byte clusters', args: '-f qcow2 -b sub/base.qcow2 -F qcow2 -o cluster_size=512 @', info: { 'cluster-size': 512, 'virtual-size': 64 * 2 ** 20 }, same: true, backingData: true },
    {
      name: 'backing, preallocated with extended L2',
      args: '-f qcow2 -b sub/base.qcow2 -F qcow2 -o preallocation=metadata,extended_l2=on @',
      info: { 'virtual-size': 64 * 2 ** 20, data: v3({ 'extended-l2': true }) },
      backingData: true,
    },
    { name: 'unsafe with an existing backing file', args: '-f qcow2 -u -b sub/base.qcow2 -F qcow2 @ 32M', info: { 'virtual-size': 32 * 2 ** 20 }, same: true, backingData: true },
    { name: 'unsafe with a missing backing file', args: '-f qcow2 -u -b missing.qcow2 -F qcow2 @ 5G', info: { 'virtual-size': 5 * G, 'backing-filename': 'missing.qcow2' }, same: true, noOpen: true },
    { name: 'size 1.5G', args: '-f qcow2 @ 1.5G', info: { 'virtual-size': 1.5 * G }, same: true },
    { name: 'size 4096k', args: '-f qcow2 @ 4096k', info: { 'virtual-size': 4 * 2 ** 20 }, same: true },
    { name: 'size 64T', args: '-f qcow2 @ 64T', info: { 'virtual-size': 2 ** 46 }, same: true },
    { name: 'size via -o', args: '-f qcow2 -o size=3G @', info: { 'virtual-size': 3 * G }, same: true },
    { name: 'size 1000 rounds up', args: '-f qcow2 @ 1000', info: { 'virtual-size': 1024 }, same: true },
    { name: 'raw 1M', args: '-f raw @ 1M', info: { format: 'raw', 'virtual-size': 2 ** 20 }, same: true },
    { name: 'raw 1000', args: '-f raw @ 1000', info: { format: 'raw', 'virtual-size': 1024 }, same: true },
    { name: 'raw full', args: '-f raw -o preallocation=full @ 2M', info: { format: 'raw', 'virtual-size': 2 * 2 ** 20 }, same: true },
  ];

  it.each(cases)('$name', (c) => {
    const tag = c.name.replace(/\W+/g, '-');
    const ours = c.args.includes('sub/@') ? `sub/${tag}.ours` : `${tag}.ours`;
    const theirs = ours.replace(/\.ours$/, '.qemu');
    const argv = (name: string) => c.args.split(' ').map((a) => a.replace(/^(sub\/)?@$/, name));
    const r = qcowkit(argv(ours));
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    const q = qemuImg(['create', ...argv(theirs)]);
    expect(q.status, q.stderr).toBe(0);
    expect(r.stdout).toBe(q.stdout.replace(theirs, ours));
    if (c.same) expect(readFileSync(join(dir, ours)).equals(readFileSync(join(dir, theirs))), 'bytes equal to qemu-img create').toBe(true);
    else expect(statSync(join(dir, ours)).size).toBeGreaterThan(0);

    const raw = c.info.format === 'raw';
    const info = qemuJson<Info>(['info', ours]);
    const { data, ...top } = c.info;
    expect(info).toMatchObject(top);
    if (data) expect(info['format-specific']?.data).toMatchObject(data as object);
    if (c.noOpen) return;
    if (!raw) {
      const check = qemuImg(['check', ours]);
      expect(check.status, check.stdout + check.stderr).toBe(0);
      expect(check.stdout).toContain('No errors were found on the image.');
    }
    const fmt = raw ? 'raw' : 'qcow2';
    if (c.backingData) {
      const back = io(ours, fmt, ['read -P 0xcd 1M 64k']);
      expect(back.status, back.stdout + back.stderr).toBe(0);
    }
    const rw = io(ours, fmt, info['virtual-size'] >= 2 ** 20 ? ['write -P 0xab 0 64k', 'read -P 0xab 0 64k', 'write -P 0x5a 768k 4k', 'read -P 0x5a 768k 4k'] : ['write -P 0xab 0 512', 'read -P 0xab 0 512']);
    expect(rw.status, rw.stdout + rw.stderr).toBe(0);
    expect(rw.stdout).not.toMatch(/fail/i);
    if (!raw) expect(qemuImg(['check', ours]).status).toBe(0);
  });

  it('preallocates 256 GiB of metadata quickly, in one host run, check-clean', () => {
    const t0 = Date.now();
    const r = qcowkit(['-q', '-f', 'qcow2', '-o', 'preallocation=metadata', 'big.qcow2', '256G']);
    const ms = Date.now() - t0;
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toBe('');
    expect(ms).toBeLessThan(20_000);
    const st = statSync(join(dir, 'big.qcow2'));
    expect(st.blocks * 512).toBeLessThan(64 * 2 ** 20); // ~41 MiB of tables, the rest sparse
    const check = qemuJson<{ 'allocated-clusters': number; 'total-clusters': number; 'image-end-offset': number }>(['check', 'big.qcow2']);
    expect(check['allocated-clusters']).toBe(2 ** 22);
    expect(check['total-clusters']).toBe(2 ** 22);
    expect(check['image-end-offset']).toBe(st.size);
    const map = qemuImg(['map', '--output', 'json', 'big.qcow2']);
    expect(map.stdout.trim().split('\n')).toHaveLength(1);
    expect(io('big.qcow2', 'qcow2', ['write -P 0x11 200G 64k', 'read -P 0x11 200G 64k']).status).toBe(0);
    rmSync(join(dir, 'big.qcow2'));
  });

  it('-o help lists the options; -q prints nothing', () => {
    const h = qcowkit(['-f', 'qcow2', '-o', 'help']);
    expect(h.status).toBe(0);
    for (const k of ['cluster_size', 'compat', 'lazy_refcounts', 'refcount_bits', 'extended_l2', 'preallocation', 'compression_type', 'backing_file', 'backing_fmt', 'size'])
      expect(h.stdout).toContain(`  ${k}=<`);
    expect(qcowkit(['-f', 'raw', '-o', '?']).stdout).toMatch(/^Supported raw options:\n {2}preallocation=<str>/);
    const q = qcowkit(['-q', '-f', 'qcow2', 'quiet.qcow2', '1M']);
    expect(q.status).toBe(0);
    expect(q.stdout + q.stderr).toBe('');
  });

  const errors: Array<[string, string, RegExp]> = [
    ['-b without -F', '-f qcow2 -b sub/base.qcow2 @', /Backing file specified without backing format \(detected qcow2: add -F qcow2\)/],
    // As qemu-img: the backing file is opened (format probed) before -F is asked for.
    ['-b missing without -F', '-f qcow2 -b nope.qcow2 @ 1G', /Could not open backing image 'nope.qcow2'.*No such file or directory/],
    ['-u -b missing without -F', '-f qcow2 -u -b nope.qcow2 @ 1G', /without backing format \(add -F qcow2 or -F raw\)/],
    ['missing backing', '-f qcow2 -b nope.qcow2 -F qcow2 @', /Could not open backing image 'nope.qcow2'/],
    ['bad cluster size', '-f qcow2 -o cluster_size=1000 @ 1G', /Cluster size must be a power of two between 512 and 2048k/],
    ['cluster size too large', '-f qcow2 -o cluster_size=4M @ 1G', /between 512 and 2048k/],
    ['extended_l2 with 4k clusters', '-f qcow2 -o extended_l2=on,cluster_size=4k @ 1G', /at least 16384 bytes/],
    ['v2 with lazy_refcounts', '-f qcow2 -o compat=0.10,lazy_refcounts=on @ 1G', /Lazy refcounts only supported with compatibility level 1.1/],
    ['v2 with refcount_bits', '-f qcow2 -o compat=0.10,refcount_bits=8 @ 1G', /Different refcount widths than 16 bits/],
    ['bad refcount_bits', '-f qcow2 -o refcount_bits=3 @ 1G', /power of two and may not exceed 64 bits/],
    ['unknown option', '-f qcow2 -o foo=bar @ 1G', /Invalid parameter 'foo'/],
    ['raw with a qcow2 option', '-f raw -o cluster_size=4k @ 1G', /Invalid parameter 'cluster_size'/],
    ['bad compat', '-f qcow2 -o compat=1.0 @ 1G', /Parameter 'compat' does not accept value '1.0'/],
    ['bad bool', '-f qcow2 -o lazy_refcounts=1 @ 1G', /Parameter 'lazy_refcounts' expects 'on' or 'off'/],
    ['missing size', '-f qcow2 @', /Image creation needs a size parameter/],
    ['unsafe without size', '-f qcow2 -u -b sub/base.qcow2 -F qcow2 @', /Image creation needs a size parameter/],
    ['size twice', '-f qcow2 -o size=1G @ 1G', /The image size must be specified only once/],
    ['bad size', '-f qcow2 @ 1X', /Invalid image size specified/],
    ['too large', '-f qcow2 @ 3P', /The image size is too large for file format 'qcow2'/],
    ['-F without -b', '-f qcow2 -F qcow2 @ 1G', /Backing format cannot be used without backing file/],
    ['raw with backing', '-f raw -b sub/base.qcow2 -F qcow2 @ 1G', /Backing file not supported for file format 'raw'/],
    ['backing is the image', '-f qcow2 -b @ -F qcow2 @ 1G', /same filename as the backing file/],
    ['protocol backing', '-f qcow2 -b nbd:localhost:10809 -F raw @ 1G', /protocol prefix/],
    ['encryption', '-f qcow2 -o encrypt.format=luks @ 1G', /does not support 'encrypt.format'/],
    ['backing with preallocation', '-f qcow2 -b sub/base.qcow2 -F qcow2 -o preallocation=metadata @', /Backing file and preallocation can only be used at the same time if extended_l2 is on/],
    ['raw metadata', '-f raw -o preallocation=metadata @ 1G', /Unsupported preallocation mode: metadata/],
  ];
  it.each(errors)('error: %s', (_name, args, message) => {
    const name = 'err.qcow2';
    const r = qcowkit(args.split(' ').map((a) => (a === '@' ? name : a)));
    expect(r.status).toBe(1);
    // As qemu-img: errors of the format's own checks come after the "Formatting" line (qemu-img
    // needs an --object secret for encryption, which qcowkit refuses before it).
    const q = qemuImg(['create', ...args.split(' ').map((a) => (a === '@' ? 'err-q.qcow2' : a))]);
    expect(q.status).toBe(1);
    if (_name !== 'encryption') expect(r.stdout).toBe(q.stdout.replace('err-q.qcow2', name));
    else expect(r.stdout).toBe('');
    expect(r.stderr).toMatch(/^qcowkit: [^\n]+\n$/);
    expect(r.stderr).toMatch(message);
    expect(r.stderr).not.toMatch(/\bat .*\.js:\d+/);
    expect(existsSync(join(dir, name))).toBe(false);
  });
});
