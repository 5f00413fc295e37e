// Issue 8 (parts 3 and 4): cases where QEMU's iotests showed qcowkit answering differently from
// qemu-img 7.2 — each checked against qemu-img on the same image or command line.
//   060/108: no refcount table (check reports, -r all rebuilds); 080/261: bad snapshot tables;
//   214/049/082: size and -o syntax; 126: file: prefix; 114: repeated backing-format extension;
//   074/089/110/204: json:/protocol names and --image-opts refused in one line; create without -f.
import { copyFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { beforeEach, expect, it } from 'vitest';
import { patchBytes, readBytesAt } from '../helpers/bytes.js';
import { runCli } from '../helpers/cli.js';
import { describeQemu, qemuImg, qemuImgJson, qemuIo } from '../helpers/qemu.js';
import { tmpDir } from '../helpers/tmp.js';

let dir = '';
const at = (name: string) => join(dir, name);
const ours = (args: string[]) => runCli(args, { cwd: dir });
const theirs = (args: string[]) => qemuImg(args, { cwd: dir });
const must = (r: { status: number; stderr: string }) => expect(r.status, r.stderr).toBe(0);

/** qcowkit and qemu-img on two copies of the same image: exit code and stdout agree. */
function sameAnswer(args: (file: string) => string[], file: string, opts: { stderr?: boolean } = {}): { status: number; stdout: string; stderr: string } {
  copyFileSync(at(file), at(`q-${file}`));
  const k = ours(args(file));
  const q = theirs(args(`q-${file}`));
  expect(k.status, k.stderr).toBe(q.status);
  // The copy is not sparse: what the host file occupies may differ.
  const norm = (out: string) => out.replaceAll(`q-${file}`, file).replace(/disk size: .*/, '').replace(/"actual-size": \d+/, '');
  expect(norm(k.stdout)).toBe(norm(q.stdout));
  if (opts.stderr) expect(k.stderr).toBe(q.stderr);
  return k;
}

/** Snapshot table entry offsets of a (v2/v3) image. */
function snapshotEntries(file: string): number[] {
  const count = readBytesAt(at(file), 60, 4).readUInt32BE(0);
  let off = Number(readBytesAt(at(file), 64, 8).readBigUInt64BE(0));
  const out: number[] = [];
  for (let i = 0; i < count; i++) {
    out.push(off);
    const h = readBytesAt(at(file), off, 40);
    off += Math.ceil((40 + h.readUInt32BE(36) + h.readUInt16BE(12) + h.readUInt16BE(14)) / 8) * 8;
  }
  return out;
}

describeQemu('qemu-iotests parity (issue 8)', () => {
  beforeEach(() => {
    dir = tmpDir('qcowkit-iotests-parity-');
  });

  it('check of an image without a refcount table: corruptions (exit 2); -r all rebuilds it (060, 108)', () => {
    must(theirs(['create', '-q', '-f', 'qcow2', 'a.qcow2', '64M']));
    must(qemuIo(at('a.qcow2'), ['write -P 42 0 64k'], { format: 'qcow2' }));
    patchBytes(at('a.qcow2'), 48, new Uint8Array(12)); // refcount_table_offset and _clusters
    const r = sameAnswer((f) => ['check', f], 'a.qcow2', { stderr: true });
    expect(r.status).toBe(2);
    expect(r.stderr).toContain('ERROR cluster 0 refcount=0 reference=1');
    copyFileSync(at('a.qcow2'), at('b.qcow2'));
    const fix = ours(['check', '-r', 'all', 'a.qcow2']);
    const ref = theirs(['check', '-r', 'all', 'b.qcow2']);
    expect(fix.status).toBe(0);
    expect(fix.stdout).toBe(ref.stdout);
    expect(fix.stderr).toBe(ref.stderr);
    must(theirs(['check', 'a.qcow2']));
    must(qemuIo(at('a.qcow2'), ['read -P 42 0 64k'], { format: 'qcow2' }));
    // The header points at the new table only once it is there: it lies inside the file.
    const table = Number(readBytesAt(at('a.qcow2'), 48, 8).readBigUInt64BE(0));
    expect(table).toBeGreaterThan(0);
  });

  it('snapshot entries with an unaligned or oversized L1 table: info opens, check reports (080)', () => {
    for (const [name, field, bytes] of [
      ['l1off.qcow2', 0, [0, 0, 0, 0, 0, 0x40, 0x02, 0x00]],
      ['l1size.qcow2', 8, [0x10, 0, 0, 0]],
    ] as const) {
      must(theirs(['create', '-q', '-f', 'qcow2', name, '64M']));
      must(qemuIo(at(name), ['write 0 512'], { format: 'qcow2' }));
      must(theirs(['snapshot', '-c', 'test', name]));
      patchBytes(at(name), snapshotEntries(name)[0]! + field, [...bytes]);
      sameAnswer((f) => ['info', f], name);
      sameAnswer((f) => ['info', '--output=json', f], name);
      sameAnswer((f) => ['map', '--output=json', f], name);
      const r = sameAnswer((f) => ['check', f], name, { stderr: true });
      expect(r.status).toBe(2);
    }
  });

  it('v3 snapshot entries without disk-size extra data: check reports, -r all rewrites the table keeping every snapshot (261)', () => {
    must(theirs(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', 'v2.qcow2', '64M']));
    for (const sn of ['sn0', 'sn1', 'sn2']) must(theirs(['snapshot', '-c', sn, 'v2.qcow2']));
    // Rewrite the table with entry 0 and 2 lacking extra data, then claim v3.
    const entries = snapshotEntries('v2.qcow2');
    const table = Number(readBytesAt(at('v2.qcow2'), 64, 8).readBigUInt64BE(0));
    const parts: Buffer[] = [];
    entries.forEach((off, i) => {
      const h = Buffer.from(readBytesAt(at('v2.qcow2'), off, 40));
      const extra = h.readUInt32BE(36);
      const ids = readBytesAt(at('v2.qcow2'), off + 40 + extra, h.readUInt16BE(12) + h.readUInt16BE(14));
      const keep = i === 1 ? readBytesAt(at('v2.qcow2'), off + 40, extra) : Buffer.alloc(0);
      h.writeUInt32BE(keep.length, 36);
      const e = Buffer.concat([h, keep, ids]);
      parts.push(Buffer.concat([e, Buffer.alloc((8 - (e.length % 8)) % 8)]));
    });
    patchBytes(at('v2.qcow2'), table, Buffer.concat(parts));
    patchBytes(at('v2.qcow2'), 4, [0, 0, 0, 3]);
    patchBytes(at('v2.qcow2'), 96, [0, 0, 0, 4]);
    patchBytes(at('v2.qcow2'), 100, [0, 0, 0, 0x68]);
    sameAnswer((f) => ['info', f], 'v2.qcow2');
    const r = sameAnswer((f) => ['check', f], 'v2.qcow2', { stderr: true });
    expect(r.stderr).toContain('ERROR snapshot table entry 0 is incomplete');
    copyFileSync(at('v2.qcow2'), at('ref.qcow2'));
    const fix = ours(['check', '-r', 'all', 'v2.qcow2']);
    const ref = theirs(['check', '-r', 'all', 'ref.qcow2']);
    expect(fix.status).toBe(0);
    expect(fix.stdout).toBe(ref.stdout);
    expect(fix.stderr).toBe(ref.stderr);
    must(theirs(['check', 'v2.qcow2']));
    const names = (f: string) => qemuImgJson<{ snapshots: { name: string }[] }>(['info', f], { cwd: dir }).snapshots.map((s) => s.name);
    expect(names('v2.qcow2')).toEqual(['sn0', 'sn1', 'sn2']);
    for (const off of snapshotEntries('v2.qcow2')) expect(readBytesAt(at('v2.qcow2'), off + 36, 4).readUInt32BE(0)).toBe(24);
  });

  it('too much extra data in a snapshot entry: open refused, check exit 1, -r all drops the extra data (261)', () => {
    must(theirs(['create', '-q', '-f', 'qcow2', 'x.qcow2', '64M']));
    for (const sn of ['a', 'b']) must(theirs(['snapshot', '-c', sn, 'x.qcow2']));
    patchBytes(at('x.qcow2'), snapshotEntries('x.qcow2')[1]! + 36, [0, 1, 0, 0]);
    sameAnswer((f) => ['info', f], 'x.qcow2');
    const r = sameAnswer((f) => ['check', f], 'x.qcow2');
    expect(r.status).toBe(1);
    expect(r.stderr).toContain('Too much extra metadata in snapshot table entry 1');
    copyFileSync(at('x.qcow2'), at('ref.qcow2'));
    const fix = ours(['check', '-r', 'all', 'x.qcow2']);
    const ref = theirs(['check', '-r', 'all', 'ref.qcow2']);
    expect(fix.status).toBe(ref.status);
    expect(fix.stdout).toBe(ref.stdout);
    expect(fix.stderr).toBe(ref.stderr);
    must(theirs(['check', 'x.qcow2']));
  });

  it('a repeated backing-format extension opens, the last one wins (114)', () => {
    must(theirs(['create', '-q', '-f', 'qcow2', 'base.qcow2', '64M']));
    must(theirs(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2']));
    // Header extensions start at header_length: the backing-format one first. Append a second one ("foo")
    // in place of the terminator (the backing name lies further on, past 8 more bytes of room).
    const first = readBytesAt(at('top.qcow2'), 100, 4).readUInt32BE(0); // header_length
    const ext = readBytesAt(at('top.qcow2'), first, 8);
    expect(ext.readUInt32BE(0)).toBe(0xe2792aca);
    const len = ext.readUInt32BE(4);
    let end = first + 8 + Math.ceil(len / 8) * 8;
    while (readBytesAt(at('top.qcow2'), end, 4).readUInt32BE(0) !== 0) end += 8 + Math.ceil(readBytesAt(at('top.qcow2'), end + 4, 4).readUInt32BE(0) / 8) * 8;
    const nameOff = Number(readBytesAt(at('top.qcow2'), 8, 8).readBigUInt64BE(0));
    const name = readBytesAt(at('top.qcow2'), nameOff, readBytesAt(at('top.qcow2'), 16, 4).readUInt32BE(0));
    const add = Buffer.from([0xe2, 0x79, 0x2a, 0xca, 0, 0, 0, 3, 0x66, 0x6f, 0x6f, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    patchBytes(at('top.qcow2'), end, Buffer.concat([add, name]));
    const nb = Buffer.alloc(8);
    nb.writeBigUInt64BE(BigInt(end + add.length));
    patchBytes(at('top.qcow2'), 8, nb);
    const r = sameAnswer((f) => ['info', f], 'top.qcow2');
    expect(r.stdout).toContain('backing file format: foo');
  });

  it('sizes and size options in hex, fractions with a unit, the Formatting line as qemu-img (214, 049)', () => {
    for (const args of [
      ['-o', 'cluster_size=0x10000', '@', '0x100000'],
      ['@', '1.5k'],
      ['@', '1.k'],
      ['@', '+12'],
      ['-o', 'refcount_bits=0x10', '@', '1M'],
      ['-o', 'refcount_bits=010', '@', '1M'],
      ['-o', 'encryption=off', '@', '1M'],
      ['-u', '-o', 'backing_file=a,,b,backing_fmt=raw', '@', '1M'],
      ['-o', 'compat=foobar', '@', '1M'],
      ['-o', 'preallocation=1234', '@', '1M'],
      ['-o', 'compat=0.10,lazy_refcounts=on', '@', '1M'],
    ]) {
      const k = ours(['create', '-f', 'qcow2', ...args.map((a) => (a === '@' ? 'k.qcow2' : a))]);
      const q = theirs(['create', '-f', 'qcow2', ...args.map((a) => (a === '@' ? 'k.qcow2' : a))]);
      expect(k.status, `${args.join(' ')}: ${k.stderr}`).toBe(q.status);
      expect(k.stdout, args.join(' ')).toBe(q.stdout);
    }
    for (const bad of ['1.5', '1e3', '0x', '0x1.5', '1kB', '-1k', 'foobar']) {
      expect(ours(['create', '-f', 'qcow2', 'k.qcow2', bad]).status, bad).toBe(1);
      expect(theirs(['create', '-f', 'qcow2', 'k.qcow2', bad]).status, bad).toBe(1);
    }
  });

  it('option lists: leading, trailing and empty -o refused; a repeated -f, last wins (082)', () => {
    for (const o of [',cluster_size=64k', 'cluster_size=64k,', '']) {
      const k = ours(['create', '-f', 'qcow2', '-o', o, 'k.qcow2', '1M']);
      expect(k.status).toBe(1);
      expect(k.stderr).toBe(`qcowkit: Invalid option list: ${o}\n`);
      expect(theirs(['create', '-f', 'qcow2', '-o', o, 'k.qcow2', '1M']).status).toBe(1);
    }
    const k = ours(['create', '-f', 'foo', '-f', 'qcow2', 'k.qcow2', '1M']);
    const q = theirs(['create', '-f', 'foo', '-f', 'qcow2', 'q.qcow2', '1M']);
    expect(k.status).toBe(0);
    expect(k.stdout.replace('k.qcow2', 'q.qcow2')).toBe(q.stdout);
  });

  it('file: prefixes are stripped as QEMU does; json: names of plain files are taken; protocol names and --image-opts outside info/map/bitmap are refused in one line (126, 074, 089, 110, 204, 279)', () => {
    must(theirs(['create', '-q', '-f', 'qcow2', 'file:image:top.qcow2', '64M']));
    must(theirs(['create', '-q', '-f', 'qcow2', 'plain.qcow2', '64M']));
    expect(ours(['info', 'file:image:top.qcow2']).stdout).toBe(theirs(['info', 'file:image:top.qcow2']).stdout);
    expect(ours(['info', `file:${at('plain.qcow2')}`]).stdout).toBe(theirs(['info', `file:${at('plain.qcow2')}`]).stdout);
    const k = ours(['create', '-f', 'qcow2', 'file:image:new.qcow2', '1M']);
    expect(k.stdout).toBe("Formatting 'file:image:new.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size=1048576 lazy_refcounts=off refcount_bits=16\n");
    must(theirs(['check', 'file:image:new.qcow2']));

    // json: names of plain files are taken as qemu-img takes them (089, 110); create refuses them.
    const json = 'json:{"file":{"driver":"file","filename":"plain.qcow2"}}';
    for (const args of [['info', json], ['map', json], ['check', json], ['compare', json, 'plain.qcow2']]) {
      const [k, q] = [ours(args), theirs(args)];
      expect([k.status, k.stdout], args.join(' ')).toEqual([q.status, q.stdout]);
    }
    const made = ours(['create', '-f', 'qcow2', json, '1M']);
    expect(made.status).toBe(1);
    expect(made.stderr).toBe(`qcowkit: ${json}: json: pseudo-protocol filenames are not supported here; pass the image file name (and -f) instead\n`);
    const proto = ours(['info', 'blkdebug::plain.qcow2']);
    expect(proto.stderr).toBe('qcowkit: blkdebug::plain.qcow2: blkdebug: protocol filenames are not supported; qcowkit opens plain image files only\n');
    const io = ours(['check', '--image-opts', 'driver=qcow2,file.filename=plain.qcow2']);
    expect(io.status).toBe(1);
    expect(io.stderr).toBe('qcowkit: --image-opts is not supported; pass the image file name (and -f) instead\n');
    // info takes the plain-file form (279), as map and bitmap do; other drivers are refused by name.
    for (const output of ['human', 'json']) {
      const opts = ['info', '--output', output, '--backing-chain', '--image-opts', 'driver=qcow2,file.driver=file,file.filename=plain.qcow2'];
      expect(ours(opts).stdout).toBe(theirs(opts).stdout);
    }
    const blk = ours(['info', '--image-opts', 'driver=blkdebug,image.driver=qcow2,image.file.filename=plain.qcow2']);
    expect(blk.stderr).toBe("qcowkit: driver=blkdebug,image.driver=qcow2,image.file.filename=plain.qcow2: driver 'blkdebug' is not supported (qcow2, raw and file)\n");
    expect(ours(['info', '-f', 'qcow2', '--image-opts', 'driver=qcow2,file.filename=plain.qcow2']).stderr).toBe('qcowkit: --image-opts and --format are mutually exclusive\n');
  });

  it('create without -f makes a qcow2 image (qemu-img would make a raw one)', () => {
    const k = ours(['create', 'disk.qcow2', '10G']);
    expect(k.status, k.stderr).toBe(0);
    expect(k.stdout).toMatch(/fmt=qcow2 /);
    expect(qemuImgJson<{ format: string }>(['info', 'disk.qcow2'], { cwd: dir }).format).toBe('qcow2');
    writeFileSync(at('unused'), '');
  });
});
