// Builds the qemu interop matrix in a temp dir with qemu-img / qemu-io (needs hasQemu()).
//
//   const images = buildMatrix(tmpDir());
//   for (const img of images.filter((i) => i.format === 'qcow2')) ...
//
// ~30 images (v2/v3 x 512 B/4 KiB/64 KiB/2 MiB clusters x refcount_bits 1/16/64, extended L2,
// lazy refcounts, compressed zlib/zstd, raw and qcow2 backing files, a 3-deep relative chain in
// subdirectories, bitmaps, internal snapshots), each with a few qemu-io writes: patterns,
// unaligned sub-cluster writes (which leave holes inside host clusters), write -z, write -z -u,
// discard. Builds in ~3 s into ~50 MB (the 2 MiB-cluster images dominate).
import { mkdirSync, openSync, writeSync, closeSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { dirname, join } from 'node:path';
import { hasQemu, run } from './qemu.js';

export interface MatrixImage {
  /** Unique id, e.g. "v3-c64k-rc16" or "chain3-top". */
  name: string;
  /** Absolute path. */
  path: string;
  /** "raw" only for backing files (rawback-base). */
  format: 'qcow2' | 'raw';
  description: string;
  /** Filterable properties: v2|v3, c512|c4k|c16k|c64k|c2m, rc1|rc16|rc64, extl2, lazy,
   *  compressed, zlib, zstd, backing, backing-raw, chain, bitmaps, snapshots, base (is a backing
   *  file of another matrix image). */
  tags: string[];
  /** Virtual size in bytes. */
  size: number;
  clusterSize?: number;
  /** Path of the immediate backing file, if any. */
  backing?: string;
}

const K = 1024;
const M = 1024 * K;

function must(cmd: string, args: string[], cwd?: string): string {
  const r = run(cmd, args, { cwd, timeout: 30_000 });
  if (r.status !== 0) {
    throw new Error(`buildMatrix: ${cmd} ${args.join(' ')} failed (${r.status}${r.error ? `, ${r.error}` : ''}):\n${r.stdout}${r.stderr}`);
  }
  return r.stdout;
}

function create(path: string, size: number | null, opts: string, backing?: { file: string; fmt: string }): void {
  mkdirSync(dirname(path), { recursive: true });
  const args = ['create', '-q', '-f', 'qcow2'];
  if (opts) args.push('-o', opts);
  if (backing) args.push('-b', backing.file, '-F', backing.fmt);
  args.push(path);
  if (size !== null) args.push(String(size));
  must('qemu-img', args);
}

function io(path: string, cmds: string[], format = 'qcow2'): void {
  const args = ['-f', format];
  for (const c of cmds) args.push('-c', c);
  args.push(path);
  must('qemu-io', args);
}

/** Deterministic incompressible bytes. */
function randomBytes(len: number, seed: string): Buffer {
  const out = Buffer.alloc(len);
  for (let i = 0, pos = 0; pos < len; i++) pos += createHash('sha256').update(`${seed}:${i}`).digest().copy(out, pos);
  return out;
}

const sizeTag = (cs: number): string => (cs >= M ? `c${cs / M}m` : cs >= K ? `c${cs / K}k` : `c${cs}`);

/**
 * The standard write set: full and partial clusters, an unaligned sub-cluster write, zero writes
 * on data and on unallocated ranges, write -z -u and discard inside data, the last 4 KiB.
 */
function basicWrites(size: number, seed: number): string[] {
  const p = (n: number): string => `0x${((seed * 16 + n) & 0xff).toString(16).padStart(2, '0')}`;
  return [
    `write -P ${p(1)} 0 64k`,
    `write -P ${p(2)} ${M + 512} 3k`,
    `write -z 8k 4k`,
    `write -z ${2 * M} 128k`,
    `write -P ${p(3)} ${3 * M} 256k`,
    `write -z -u ${3 * M} 64k`,
    `discard ${3 * M + 128 * K} 64k`,
    `write -P ${p(4)} ${size - 4 * K} 4k`,
  ];
}

interface Combo {
  compat: '0.10' | '1.1';
  cs: number;
  rc: 1 | 16 | 64;
}

// Every cluster size >= 3 times, every refcount width >= 4 times, v2 4 times.
const COMBOS: Combo[] = [
  { compat: '0.10', cs: 512, rc: 16 },
  { compat: '0.10', cs: 4 * K, rc: 16 },
  { compat: '0.10', cs: 64 * K, rc: 16 },
  { compat: '0.10', cs: 2 * M, rc: 16 },
  { compat: '1.1', cs: 512, rc: 1 },
  { compat: '1.1', cs: 512, rc: 64 },
  { compat: '1.1', cs: 4 * K, rc: 1 },
  { compat: '1.1', cs: 4 * K, rc: 16 },
  { compat: '1.1', cs: 4 * K, rc: 64 },
  { compat: '1.1', cs: 64 * K, rc: 1 },
  { compat: '1.1', cs: 64 * K, rc: 16 },
  { compat: '1.1', cs: 64 * K, rc: 64 },
  { compat: '1.1', cs: 2 * M, rc: 1 },
  { compat: '1.1', cs: 2 * M, rc: 64 },
];

/**
 * Builds the interop matrix under `dir` (which should be empty, e.g. tmpDir()) and returns its
 * images in creation order (backing files before their overlays). `only` limits the build to the
 * images whose name it accepts (plus nothing else: callers must include backing files).
 * Throws if qemu is missing or any qemu command fails.
 */
export function buildMatrix(dir: string, opts: { only?: (name: string) => boolean } = {}): MatrixImage[] {
  if (!hasQemu()) throw new Error('buildMatrix needs qemu-img and qemu-io on PATH');
  const want = opts.only ?? (() => true);
  const out: MatrixImage[] = [];
  const add = (img: MatrixImage): void => {
    out.push(img);
  };
  let seed = 0;

  // --- format combinations --------------------------------------------------------------------
  for (const c of COMBOS) {
    seed++;
    const v = c.compat === '0.10' ? 'v2' : 'v3';
    const name = `${v}-${sizeTag(c.cs)}-rc${c.rc}`;
    if (!want(name)) continue;
    const size = c.cs >= 2 * M ? 4 * M : 16 * M; // 2 MiB clusters: keep to two data clusters
    const path = join(dir, `${name}.qcow2`);
    create(path, size, `compat=${c.compat},cluster_size=${c.cs},refcount_bits=${c.rc}`);
    io(path, basicWrites(size, seed));
    add({
      name, path, format: 'qcow2', size, clusterSize: c.cs,
      description: `${v}, ${c.cs} B clusters, refcount_bits=${c.rc}, ${size / M} MiB, standard write set`,
      tags: [v, sizeTag(c.cs), `rc${c.rc}`],
    });
  }

  // --- extended L2 ------------------------------------------------------------------------------
  for (const cs of [64 * K, 16 * K]) {
    seed++;
    const name = `extl2-${sizeTag(cs)}`;
    if (!want(name)) continue;
    const sc = cs / 32;
    const size = 16 * M;
    const path = join(dir, `${name}.qcow2`);
    create(path, size, `cluster_size=${cs},extended_l2=on`);
    io(path, [
      ...basicWrites(size, seed),
      `write -P 0x61 ${4 * M} ${sc}`, // first subcluster only
      `write -P 0x62 ${4 * M + 4 * sc} ${2 * sc}`, // subclusters 4-5
      `write -z ${4 * M + 8 * sc} ${sc}`, // zero subcluster in an allocated cluster
      `write -z ${5 * M} ${3 * sc}`, // zero subclusters in an unallocated cluster
      `write -P 0x63 ${6 * M} ${cs}`,
      `write -z -u ${6 * M + sc} ${sc}`,
      `discard ${6 * M + 3 * sc} ${2 * sc}`,
      `write -P 0x64 ${7 * M + 100} 1000`, // unaligned inside one subcluster range
    ]);
    add({
      name, path, format: 'qcow2', size, clusterSize: cs,
      description: `v3, extended_l2=on, ${cs} B clusters (${sc} B subclusters), subcluster writes / zeroes / discards`,
      tags: ['v3', sizeTag(cs), 'rc16', 'extl2'],
    });
  }

  // --- lazy refcounts ---------------------------------------------------------------------------
  seed++;
  if (want('lazy-c64k')) {
    const size = 16 * M;
    const path = join(dir, 'lazy-c64k.qcow2');
    create(path, size, 'cluster_size=64k,lazy_refcounts=on');
    io(path, basicWrites(size, seed));
    add({ name: 'lazy-c64k', path, format: 'qcow2', size, clusterSize: 64 * K,
      description: 'v3, lazy_refcounts=on, 64 KiB clusters, cleanly closed', tags: ['v3', 'c64k', 'rc16', 'lazy'] });
  }

  // --- compressed -------------------------------------------------------------------------------
  const compressed: Array<{ name: string; opts: string; cs: number; type: 'zlib' | 'zstd' }> = [
    { name: 'compressed-zlib-c64k', opts: 'cluster_size=64k', cs: 64 * K, type: 'zlib' },
    { name: 'compressed-zstd-c64k', opts: 'cluster_size=64k,compression_type=zstd', cs: 64 * K, type: 'zstd' },
    { name: 'compressed-zlib-c512', opts: 'cluster_size=512', cs: 512, type: 'zlib' },
    { name: 'compressed-zstd-c2m', opts: 'cluster_size=2M,compression_type=zstd', cs: 2 * M, type: 'zstd' },
  ].filter((c) => want(c.name)) as Array<{ name: string; opts: string; cs: number; type: 'zlib' | 'zstd' }>;
  if (compressed.length > 0) {
    const raw = join(dir, 'compress-src.raw');
    must('qemu-img', ['create', '-q', '-f', 'raw', raw, String(4 * M)]);
    io(raw, ['write -P 0x71 0 192k', 'write -P 0x72 300k 5k', `write -P 0x73 ${2 * M} 64k`, `write -P 0x74 ${4 * M - 512} 512`], 'raw');
    const fd = openSync(raw, 'r+');
    writeSync(fd, randomBytes(128 * K, 'matrix'), 0, 128 * K, 1 * M); // incompressible: stored uncompressed
    closeSync(fd);
    for (const c of compressed) {
      const path = join(dir, `${c.name}.qcow2`);
      must('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', '-c', '-o', c.opts, raw, path]);
      add({ name: c.name, path, format: 'qcow2', size: 4 * M, clusterSize: c.cs,
        description: `qemu-img convert -c (${c.type}), ${c.cs} B clusters, 4 MiB: patterns, an incompressible 128 KiB run, zero ranges`,
        tags: ['v3', sizeTag(c.cs), 'rc16', 'compressed', c.type] });
    }
  }

  // --- raw backing ------------------------------------------------------------------------------
  if (want('rawback-base') || want('rawback-over')) {
    const base = join(dir, 'rawback', 'base.raw');
    mkdirSync(dirname(base), { recursive: true });
    must('qemu-img', ['create', '-q', '-f', 'raw', base, String(1 * M)]);
    io(base, ['write -P 0x81 0 1M', 'write -P 0x82 128k 4k'], 'raw');
    add({ name: 'rawback-base', path: base, format: 'raw', size: 1 * M,
      description: 'raw backing file, 1 MiB of 0x81 with 0x82 @ [128k,+4k)', tags: ['raw', 'base'] });
    const over = join(dir, 'rawback', 'over.qcow2');
    create(over, 4 * M, 'cluster_size=4k', { file: 'base.raw', fmt: 'raw' });
    io(over, ['write -P 0x83 8k 4k', 'write -z 16k 8k', 'discard 32k 4k', 'write -z -u 40k 4k',
      `write -P 0x84 ${64 * K + 512} 1k`, `write -P 0x85 ${1 * M - 2 * K} 4k`, `write -P 0x86 ${3 * M} 4k`]);
    add({ name: 'rawback-over', path: over, format: 'qcow2', size: 4 * M, clusterSize: 4 * K, backing: base,
      description: '4 KiB clusters, 4 MiB over a 1 MiB raw backing file (relative name base.raw); writes straddling the backing end',
      tags: ['v3', 'c4k', 'rc16', 'backing', 'backing-raw'] });
  }

  // --- qcow2 backing ------------------------------------------------------------------------------
  if (want('overlay-base') || want('overlay-top')) {
    const base = join(dir, 'overlay', 'base.qcow2');
    create(base, 8 * M, 'cluster_size=64k');
    io(base, ['write -P 0x91 0 512k', `write -P 0x92 ${2 * M} 64k`, `write -P 0x93 ${6 * M} 128k`]);
    add({ name: 'overlay-base', path: base, format: 'qcow2', size: 8 * M, clusterSize: 64 * K,
      description: 'backing of overlay-top: 64 KiB clusters, 8 MiB', tags: ['v3', 'c64k', 'rc16', 'base'] });
    const top = join(dir, 'overlay', 'top.qcow2');
    create(top, 12 * M, 'cluster_size=4k', { file: 'base.qcow2', fmt: 'qcow2' });
    io(top, ['write -P 0x94 4k 4k', 'write -P 0x95 130000 3000', 'write -z 64k 64k', 'write -z -u 192k 8k',
      'discard 256k 4k', `write -P 0x96 ${2 * M + 32 * K} 4k`, `write -P 0x97 ${10 * M} 8k`]);
    add({ name: 'overlay-top', path: top, format: 'qcow2', size: 12 * M, clusterSize: 4 * K, backing: base,
      description: '4 KiB-cluster overlay (12 MiB) over the 8 MiB 64 KiB-cluster overlay-base; COW, zero and discard over backing data, writes past the backing end',
      tags: ['v3', 'c4k', 'rc16', 'backing'] });
  }

  // --- 3-deep chain with relative names in subdirectories -------------------------------------------
  if (want('chain3-base') || want('chain3-mid') || want('chain3-top')) {
    const base = join(dir, 'chain', 'base.qcow2');
    create(base, 8 * M, 'compat=0.10,cluster_size=64k');
    io(base, ['write -P 0xa1 0 256k', `write -P 0xa2 ${4 * M} 64k`]);
    const mid = join(dir, 'chain', 'mid.qcow2');
    create(mid, null, 'cluster_size=16k', { file: 'base.qcow2', fmt: 'qcow2' });
    io(mid, ['write -P 0xa3 64k 64k', 'write -z 160k 16k', `write -P 0xa4 ${1 * M} 16k`]);
    const top = join(dir, 'chain', 'sub', 'top.qcow2');
    create(top, null, 'cluster_size=4k', { file: '../mid.qcow2', fmt: 'qcow2' });
    io(top, ['write -P 0xa5 100k 10k', 'discard 200k 4k', `write -z -u ${4 * M} 4k`, `write -P 0xa6 ${7 * M} 4k`]);
    add({ name: 'chain3-base', path: base, format: 'qcow2', size: 8 * M, clusterSize: 64 * K,
      description: 'chain bottom: v2, 64 KiB clusters, 8 MiB', tags: ['v2', 'c64k', 'rc16', 'base'] });
    add({ name: 'chain3-mid', path: mid, format: 'qcow2', size: 8 * M, clusterSize: 16 * K, backing: base,
      description: "chain middle: 16 KiB clusters, backing 'base.qcow2'", tags: ['v3', 'c16k', 'rc16', 'backing', 'chain', 'base'] });
    add({ name: 'chain3-top', path: top, format: 'qcow2', size: 8 * M, clusterSize: 4 * K, backing: mid,
      description: "chain top in sub/: 4 KiB clusters, backing '../mid.qcow2'", tags: ['v3', 'c4k', 'rc16', 'backing', 'chain'] });
  }

  // --- bitmaps ------------------------------------------------------------------------------------
  seed++;
  if (want('bitmaps-c64k')) {
    const size = 16 * M;
    const path = join(dir, 'bitmaps-c64k.qcow2');
    create(path, size, 'cluster_size=64k');
    io(path, ['write -P 0xb1 0 128k']);
    must('qemu-img', ['bitmap', '--add', path, 'b0']);
    must('qemu-img', ['bitmap', '--add', '-g', '4k', path, 'b1']);
    must('qemu-img', ['bitmap', '--add', '--disable', path, 'b2']);
    io(path, basicWrites(size, seed)); // qemu-io loads the persistent bitmaps: dirties b0, b1
    add({ name: 'bitmaps-c64k', path, format: 'qcow2', size, clusterSize: 64 * K,
      description: '64 KiB clusters, bitmaps b0 (auto), b1 (auto, 4 KiB granularity), b2 (disabled); standard write set after adding them',
      tags: ['v3', 'c64k', 'rc16', 'bitmaps'] });
  }

  // --- internal snapshots ---------------------------------------------------------------------------
  seed++;
  if (want('snapshots-c64k')) {
    const size = 16 * M;
    const path = join(dir, 'snapshots-c64k.qcow2');
    create(path, size, 'cluster_size=64k');
    io(path, ['write -P 0xc1 0 192k', `write -P 0xc2 ${M} 64k`]);
    must('qemu-img', ['snapshot', '-c', 's1', path]);
    io(path, ['write -P 0xc3 64k 4k', `write -P 0xc4 ${2 * M} 64k`, `discard ${M} 64k`]);
    must('qemu-img', ['snapshot', '-c', 's2', path]);
    io(path, basicWrites(size, seed));
    add({ name: 'snapshots-c64k', path, format: 'qcow2', size, clusterSize: 64 * K,
      description: '64 KiB clusters, snapshots s1 and s2 with data changed between and after them (COW of shared clusters)',
      tags: ['v3', 'c64k', 'rc16', 'snapshots'] });
  }

  return out;
}
