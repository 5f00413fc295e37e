// Backing chains from declarative specs, the commit / make-empty interop matrix, and the drivers
// that check a commit (or make-empty) implementation against qemu-img's.
//
//   const chain = buildChain(tmpDir(), COMMIT_MATRIX[0]);           // qemu-img create + qemu-io
//   const rep = await compareCommit(spec, (top, args, ctx) => cli(['commit', ...args, top], ctx.dir), ['-d']);
//   const rep2 = await checkMakeEmpty(spec, (top, ctx) => cli(['make-empty', top], ctx.dir));
//
// Both drivers collect every violated property in `report.problems` and, unless
// `{ assert: false }`, fail the current test with all of them (vitest expect). Needs qemu-img,
// qemu-io, and for bitmap contents qemu-nbd + nbdinfo (see qemu-oracles.ts).
import { createHash } from 'node:crypto';
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { basename, dirname, join, relative, resolve } from 'node:path';
import { expect } from 'vitest';
import { hasQemu, qemuImg, run, type RunResult } from './qemu.js';
import { tmpDir } from './tmp.js';
import {
  allocatedInTop,
  bitmapsExtents,
  bitmapsFromInfo,
  fileLengthAndDu,
  guestDigest,
  qemuCheck,
  qemuCompare,
  qemuImgInfo,
  qemuImgInfoChain,
  snapshotRestores,
  snapshotsFromInfo,
  topAllocation,
  type BitmapExtent,
  type BitmapInfo,
  type FileSizes,
} from './qemu-oracles.js';

export const K = 1024;
export const M = 1024 * K;
export const G = 1024 * M;

// ---------------------------------------------------------------------------------------------
// specs

/** One guest-level operation on a layer, in order. Offsets/lengths in bytes. */
export type GuestOp =
  /** qemu-io `write -P pattern off len` (any alignment: partial clusters, L2-crossing ranges). */
  | { op: 'write'; offset: number; length: number; pattern: number }
  /** qemu-io `write -s FILE off len` with deterministic incompressible bytes from `seed`. */
  | { op: 'random'; offset: number; length: number; seed: number }
  /** qemu-io `write -z [-u] off len` (zero flag / unmapped zero; v2: allocated zeros). */
  | { op: 'zero'; offset: number; length: number; unmap?: boolean }
  /** qemu-io `discard off len`. */
  | { op: 'discard'; offset: number; length: number }
  /** qemu-io `write -c` (cluster-aligned) with a pattern, or incompressible data when `seed` is set
   *  (stored uncompressed by QEMU then). */
  | { op: 'compressed'; offset: number; length: number; pattern: number; seed?: number }
  /** `qemu-img snapshot -c NAME` (internal snapshot of the layer as it is now). */
  | { op: 'snapshot'; name: string }
  /** `qemu-img bitmap --add [-g G] [--disable] FILE NAME`; later writes (qemu-io) dirty it when enabled. */
  | { op: 'bitmap'; name: string; granularity?: number; disabled?: boolean };

export interface LayerSpec {
  /** Path relative to the chain dir, e.g. "base.raw", "sub/top.qcow2". */
  file: string;
  /** Default qcow2. raw is only valid for the bottom layer. */
  format?: 'qcow2' | 'raw';
  /** qcow2 compat: '0.10' (v2) or '1.1' (v3, default). */
  compat?: '0.10' | '1.1';
  clusterSize?: number;
  refcountBits?: 1 | 2 | 4 | 8 | 16 | 32 | 64;
  extendedL2?: boolean;
  compressionType?: 'zlib' | 'zstd';
  /** Virtual size; required for the bottom layer, else the backing file's size is inherited. */
  size?: number;
  /** How this layer names the layer below it in its header (-b): default 'relative'. */
  backingName?: 'relative' | 'absolute';
  ops?: GuestOp[];
}

export interface ChainSpec {
  /** Unique id, used as test name. */
  name: string;
  description: string;
  /** Bottom first; the last layer is the top. */
  layers: LayerSpec[];
  /** Argument sets to run `commit` with ({DIR} is replaced by the chain dir); default [[]]. */
  commits?: string[][];
  /** Filterable: v2, v3, c512, c64k, c2m, rc1, rc16, rc64, extl2, compressed, zstd, raw-base, chain3,
   *  chain4, abs, base-smaller, base-larger, bitmaps, base-bitmaps, snapshots, l2-cross. */
  tags: string[];
}

export interface BuiltLayer {
  spec: LayerSpec;
  /** Absolute path. */
  path: string;
  format: 'qcow2' | 'raw';
  /** The backing string stored in this layer's header (undefined for the bottom). */
  backingString?: string;
  size: number;
  clusterSize: number;
}

export interface BuiltChain {
  spec: ChainSpec;
  dir: string;
  /** Bottom first. */
  layers: BuiltLayer[];
  top: BuiltLayer;
  /** Milliseconds spent building. */
  ms: number;
}

// ---------------------------------------------------------------------------------------------
// builder

function must(cmd: string, args: string[], cwd?: string): RunResult {
  const r = run(cmd, args, { cwd, timeout: 60_000 });
  if (r.status !== 0) {
    throw new Error(`buildChain: ${cmd} ${args.join(' ')} failed (${r.status}${r.error ? `, ${r.error}` : ''}):\n${r.stdout}${r.stderr}`);
  }
  return r;
}

/** Deterministic incompressible bytes. */
export function detBytes(len: number, seed: number | string): Buffer {
  const out = Buffer.alloc(len);
  for (let i = 0, pos = 0; pos < len; i++) pos += createHash('sha256').update(`${seed}:${i}`).digest().copy(out, pos);
  return out;
}

function createOpts(l: LayerSpec): string {
  const o: string[] = [];
  if (l.compat) o.push(`compat=${l.compat}`);
  if (l.clusterSize !== undefined) o.push(`cluster_size=${l.clusterSize}`);
  if (l.refcountBits !== undefined) o.push(`refcount_bits=${l.refcountBits}`);
  if (l.extendedL2) o.push('extended_l2=on');
  if (l.compressionType) o.push(`compression_type=${l.compressionType}`);
  return o.join(',');
}

/**
 * Creates the chain of `spec` under `dir` (qemu-img create, qemu-io, qemu-img snapshot/bitmap)
 * and returns the layers, bottom first. Consecutive qemu-io ops on a layer run in one qemu-io
 * session; a layer's ops run right after it is created (before the next layer exists).
 * Deterministic: two builds of one spec give identical guest views, bitmaps and snapshot data.
 */
export function buildChain(dir: string, spec: ChainSpec): BuiltChain {
  if (!hasQemu()) throw new Error('buildChain needs qemu-img and qemu-io on PATH');
  const t0 = Date.now();
  const layers: BuiltLayer[] = [];
  const scratch = join(dir, '.ops');
  mkdirSync(scratch, { recursive: true });
  let nfile = 0;
  spec.layers.forEach((l, i) => {
    const path = resolve(dir, l.file);
    mkdirSync(dirname(path), { recursive: true });
    const format = l.format ?? 'qcow2';
    const below = layers[i - 1];
    if (format === 'raw' && below) throw new Error(`${spec.name}: raw layer ${l.file} must be the bottom`);
    if (!below && l.size === undefined) throw new Error(`${spec.name}: bottom layer ${l.file} needs a size`);
    const args = ['create', '-q', '-f', format];
    const o = format === 'qcow2' ? createOpts(l) : '';
    if (o) args.push('-o', o);
    let backingString: string | undefined;
    if (below) {
      backingString = l.backingName === 'absolute' ? below.path : relative(dirname(path), below.path);
      args.push('-b', backingString, '-F', below.format);
    }
    args.push(path);
    if (l.size !== undefined) args.push(String(l.size));
    must('qemu-img', args);
    const layer: BuiltLayer = {
      spec: l, path, format, size: l.size ?? below!.size, clusterSize: format === 'raw' ? 512 : (l.clusterSize ?? 64 * K),
      ...(backingString !== undefined ? { backingString } : {}),
    };
    // ops: batch consecutive qemu-io commands
    let batch: string[] = [];
    const flush = (): void => {
      if (batch.length === 0) return;
      const a = ['-f', format];
      for (const c of batch) a.push('-c', c);
      a.push(path);
      must('qemu-io', a);
      batch = [];
    };
    for (const op of l.ops ?? []) {
      switch (op.op) {
        case 'write':
          batch.push(`write -P 0x${(op.pattern & 0xff).toString(16)} ${op.offset} ${op.length}`);
          break;
        case 'random': {
          const f = join(scratch, `r${nfile++}.bin`);
          writeFileSync(f, detBytes(op.length, `${spec.name}:${op.seed}`));
          batch.push(`write -s ${f} ${op.offset} ${op.length}`);
          break;
        }
        case 'zero':
          batch.push(`write -z${op.unmap ? ' -u' : ''} ${op.offset} ${op.length}`);
          break;
        case 'discard':
          batch.push(`discard ${op.offset} ${op.length}`);
          break;
        case 'compressed':
          if (format !== 'qcow2') throw new Error(`${spec.name}: compressed write into raw layer`);
          if (op.seed !== undefined) {
            const f = join(scratch, `r${nfile++}.bin`);
            writeFileSync(f, detBytes(op.length, `${spec.name}:${op.seed}`));
            batch.push(`write -c -s ${f} ${op.offset} ${op.length}`);
          } else {
            batch.push(`write -c -P 0x${(op.pattern & 0xff).toString(16)} ${op.offset} ${op.length}`);
          }
          break;
        case 'snapshot':
          flush();
          must('qemu-img', ['snapshot', '-c', op.name, path]);
          break;
        case 'bitmap': {
          flush();
          const a = ['bitmap', '--add'];
          if (op.granularity !== undefined) a.push('-g', String(op.granularity));
          if (op.disabled) a.push('--disable');
          must('qemu-img', [...a, path, op.name]);
          break;
        }
      }
    }
    flush();
    layers.push(layer);
  });
  rmSync(scratch, { recursive: true, force: true });
  return { spec, dir, layers, top: layers[layers.length - 1]!, ms: Date.now() - t0 };
}

// ---------------------------------------------------------------------------------------------
// the matrix

/** Bytes one L2 table maps: cs * cs / 8 (extended L2: / 16). */
export const l2Span = (cs: number, extl2 = false): number => (cs * cs) / (extl2 ? 16 : 8);

/**
 * The standard top-layer write set for a layer of `size` bytes and cluster size `cs` (pattern
 * bytes derived from `seed`): a partial-cluster write at an odd offset, a full cluster, a zero
 * write over data, write -z -u, a discard inside data, a write spanning 3 clusters, the last 4 KiB
 * (or less), and a write across the first L2 boundary when the image is large enough.
 */
export function standardOps(size: number, cs: number, seed: number, opts: { extl2?: boolean } = {}): GuestOp[] {
  const p = (n: number): number => (seed * 16 + n) & 0xff || 1;
  const ops: GuestOp[] = [
    { op: 'write', offset: 1536, length: 3000, pattern: p(1) }, // partial cluster, unaligned
    { op: 'write', offset: 4 * cs, length: cs, pattern: p(2) },
    { op: 'random', offset: 6 * cs + 512, length: Math.max(cs, 8 * K), seed: p(3) },
    { op: 'zero', offset: 4 * cs, length: Math.max(512, cs / 2) }, // zero over part of the data just written
    { op: 'zero', offset: 16 * cs, length: 2 * cs }, // zero over backing data / unallocated
    { op: 'zero', offset: 20 * cs, length: cs, unmap: true },
    { op: 'write', offset: 24 * cs + 512, length: 3 * cs, pattern: p(4) }, // spans 4 clusters
    { op: 'discard', offset: 25 * cs, length: cs },
    { op: 'write', offset: size - Math.min(4 * K, cs), length: Math.min(4 * K, cs), pattern: p(5) },
  ];
  const span = l2Span(cs, opts.extl2);
  if (span + 2 * cs <= size - 8 * K && span >= 28 * cs) {
    ops.push({ op: 'write', offset: span - cs - 512, length: 2 * cs + 1024, pattern: p(6) }); // crosses the L2 boundary
  }
  return ops;
}

/** Base-layer data that the top overlaps partly: COW of base data, zeroes over it, etc. */
export function baseOps(size: number, cs: number, seed: number): GuestOp[] {
  const p = (n: number): number => (seed * 16 + 8 + n) & 0xff || 1;
  return [
    { op: 'write', offset: 0, length: 8 * cs, pattern: p(1) },
    { op: 'random', offset: 14 * cs, length: 4 * cs, seed: p(2) },
    { op: 'write', offset: 20 * cs, length: 6 * cs, pattern: p(3) },
    { op: 'write', offset: size - 2 * Math.min(cs, 64 * K), length: Math.min(cs, 64 * K), pattern: p(4) },
  ];
}

const v3 = (cs: number, extra: Partial<LayerSpec> = {}): Partial<LayerSpec> => ({ compat: '1.1', clusterSize: cs, ...extra });

/**
 * The commit / make-empty interop matrix. Every spec keeps data to a few MiB (virtual sizes may
 * be larger, to cross L2 boundaries). The top of every spec has a backing file.
 */
export const COMMIT_MATRIX: ChainSpec[] = [
  {
    name: 'v3-c64k',
    description: 'v3 64 KiB clusters over a v3 64 KiB base; 1 GiB virtual so a write crosses the first L2 boundary (512 MiB)',
    tags: ['v3', 'c64k', 'rc16', 'l2-cross'],
    commits: [[], ['-d']],
    layers: [
      { file: 'base.qcow2', size: 1 * G, ...v3(64 * K), ops: baseOps(1 * G, 64 * K, 1) },
      { file: 'top.qcow2', ...v3(64 * K), ops: standardOps(1 * G, 64 * K, 2) },
    ],
  },
  {
    name: 'v2-c64k',
    description: 'compat=0.10 top over a compat=0.10 base (no zero flag: zero writes allocate)',
    tags: ['v2', 'c64k', 'rc16'],
    layers: [
      { file: 'base.qcow2', size: 16 * M, compat: '0.10', clusterSize: 64 * K, ops: baseOps(16 * M, 64 * K, 3) },
      { file: 'top.qcow2', compat: '0.10', clusterSize: 64 * K, ops: standardOps(16 * M, 64 * K, 4) },
    ],
  },
  {
    name: 'v3-top-over-v2-base',
    description: 'v3 top (zero flags, unmapped zeroes) committed into a v2 base',
    tags: ['v2', 'v3', 'c64k', 'rc16'],
    layers: [
      { file: 'base.qcow2', size: 16 * M, compat: '0.10', clusterSize: 64 * K, ops: baseOps(16 * M, 64 * K, 5) },
      { file: 'top.qcow2', ...v3(64 * K), ops: standardOps(16 * M, 64 * K, 6) },
    ],
  },
  {
    name: 'c512-rc1',
    description: '512 B clusters, refcount_bits=1 top and base; writes cross L2 boundaries (32 KiB)',
    tags: ['v3', 'c512', 'rc1', 'l2-cross'],
    commits: [[], ['-d']],
    layers: [
      { file: 'base.qcow2', size: 2 * M, ...v3(512, { refcountBits: 1 }), ops: baseOps(2 * M, 512, 7) },
      {
        file: 'top.qcow2', ...v3(512, { refcountBits: 1 }),
        ops: [...standardOps(2 * M, 512, 8), { op: 'write', offset: 3 * l2Span(512) - 700, length: 5000, pattern: 0x5a }],
      },
    ],
  },
  {
    name: 'c2m-rc64',
    description: '2 MiB clusters, refcount_bits=64 top over a 64 KiB base (cluster sizes differ)',
    tags: ['v3', 'c2m', 'c64k', 'rc64'],
    layers: [
      { file: 'base.qcow2', size: 12 * M, ...v3(64 * K), ops: baseOps(12 * M, 64 * K, 9) },
      {
        file: 'top.qcow2', ...v3(2 * M, { refcountBits: 64 }),
        ops: [
          { op: 'write', offset: 100 * K, length: 30 * K, pattern: 0x21 },
          { op: 'random', offset: 3 * M - 4 * K, length: 12 * K, seed: 1 },
          { op: 'zero', offset: 4 * M, length: 2 * M },
          { op: 'zero', offset: 6 * M + 64 * K, length: 512 * K, unmap: true },
          { op: 'write', offset: 12 * M - 4 * K, length: 4 * K, pattern: 0x22 },
        ],
      },
    ],
  },
  {
    name: 'c64k-over-c2m-rc64',
    description: '64 KiB top committed into a 2 MiB-cluster, refcount_bits=64 base (partial base-cluster writes)',
    tags: ['v3', 'c2m', 'c64k', 'rc64'],
    layers: [
      {
        file: 'base.qcow2', size: 8 * M, ...v3(2 * M, { refcountBits: 64 }),
        ops: [{ op: 'write', offset: 0, length: 2 * M + 4 * K, pattern: 0x31 }, { op: 'random', offset: 6 * M, length: 64 * K, seed: 2 }],
      },
      { file: 'top.qcow2', ...v3(64 * K), ops: standardOps(8 * M, 64 * K, 10) },
    ],
  },
  {
    name: 'extl2',
    description: 'extended L2 (64 KiB clusters, 2 KiB subclusters) top and base; subcluster writes, zeroes and discards',
    tags: ['v3', 'c64k', 'rc16', 'extl2'],
    commits: [[], ['-d']],
    layers: [
      { file: 'base.qcow2', size: 16 * M, ...v3(64 * K, { extendedL2: true }), ops: baseOps(16 * M, 64 * K, 11) },
      {
        file: 'top.qcow2', ...v3(64 * K, { extendedL2: true }),
        ops: [
          ...standardOps(16 * M, 64 * K, 12, { extl2: true }),
          { op: 'write', offset: 4 * M, length: 2 * K, pattern: 0x41 }, // one subcluster
          { op: 'write', offset: 4 * M + 8 * K, length: 4 * K, pattern: 0x42 },
          { op: 'zero', offset: 4 * M + 16 * K, length: 2 * K },
          { op: 'zero', offset: 5 * M, length: 6 * K }, // zero subclusters in an unallocated cluster
          { op: 'write', offset: 14 * 64 * K + 6 * K, length: 2 * K, pattern: 0x43 }, // over random base data
          { op: 'discard', offset: 6 * 64 * K + 2 * K, length: 4 * K },
        ],
      },
    ],
  },
  {
    name: 'extl2-top-over-plain-base',
    description: 'extended-L2 top (16 KiB clusters, 512 B subclusters) over a plain 4 KiB-cluster base',
    tags: ['v3', 'c16k', 'c4k', 'extl2'],
    layers: [
      { file: 'base.qcow2', size: 8 * M, ...v3(4 * K), ops: baseOps(8 * M, 4 * K, 13) },
      {
        file: 'top.qcow2', ...v3(16 * K, { extendedL2: true }),
        ops: [...standardOps(8 * M, 16 * K, 14, { extl2: true }), { op: 'write', offset: 64 * K + 512, length: 512, pattern: 0x44 }],
      },
    ],
  },
  {
    name: 'compressed-top',
    description: 'compressed clusters (zlib, compressible and incompressible) in the top, partly overwritten',
    tags: ['v3', 'c64k', 'rc16', 'compressed'],
    commits: [[], ['-d']],
    layers: [
      { file: 'base.qcow2', size: 16 * M, ...v3(64 * K), ops: baseOps(16 * M, 64 * K, 15) },
      {
        file: 'top.qcow2', ...v3(64 * K),
        ops: [
          { op: 'compressed', offset: 0, length: 256 * K, pattern: 0x51 },
          { op: 'compressed', offset: 1 * M, length: 64 * K, pattern: 0, seed: 3 }, // incompressible
          { op: 'compressed', offset: 2 * M, length: 128 * K, pattern: 0x52 },
          { op: 'write', offset: 64 * K + 1000, length: 2000, pattern: 0x53 }, // COW of a compressed cluster
          { op: 'zero', offset: 2 * M + 64 * K, length: 64 * K },
          { op: 'compressed', offset: 16 * M - 64 * K, length: 64 * K, pattern: 0x54 },
        ],
      },
    ],
  },
  {
    name: 'compressed-base-zstd',
    description: 'zstd-compressed clusters in the base, partly overwritten by a 4 KiB-cluster top (base clusters must be rewritten)',
    tags: ['v3', 'c64k', 'c4k', 'rc16', 'compressed', 'zstd'],
    layers: [
      {
        file: 'base.qcow2', size: 8 * M, ...v3(64 * K, { compressionType: 'zstd' }),
        ops: [
          { op: 'compressed', offset: 0, length: 512 * K, pattern: 0x61 },
          { op: 'compressed', offset: 1 * M, length: 128 * K, pattern: 0, seed: 4 },
          { op: 'compressed', offset: 4 * M, length: 64 * K, pattern: 0x62 },
        ],
      },
      {
        file: 'top.qcow2', ...v3(4 * K, { compressionType: 'zstd' }),
        ops: [
          { op: 'write', offset: 68 * K, length: 4 * K, pattern: 0x63 },
          { op: 'zero', offset: 128 * K, length: 64 * K },
          { op: 'write', offset: 1 * M + 60 * K, length: 8 * K, pattern: 0x64 },
          { op: 'compressed', offset: 4 * M, length: 4 * K, pattern: 0x65 },
          { op: 'discard', offset: 4 * M + 8 * K, length: 4 * K },
        ],
      },
    ],
  },
  {
    name: 'compressed-zlib-c512',
    description: '512 B clusters with compressed clusters in top and base (several per host sector)',
    tags: ['v3', 'c512', 'rc16', 'compressed'],
    layers: [
      {
        file: 'base.qcow2', size: 1 * M, ...v3(512),
        ops: [{ op: 'compressed', offset: 0, length: 32 * K, pattern: 0x71 }, { op: 'write', offset: 64 * K, length: 4 * K, pattern: 0x72 }],
      },
      {
        file: 'top.qcow2', ...v3(512),
        ops: [
          { op: 'compressed', offset: 16 * K, length: 32 * K, pattern: 0x73 },
          { op: 'write', offset: 20 * K + 100, length: 300, pattern: 0x74 },
          { op: 'zero', offset: 30 * K, length: 1 * K },
        ],
      },
    ],
  },
  {
    name: 'raw-base',
    description: 'qcow2 top over a raw base',
    tags: ['v3', 'c64k', 'rc16', 'raw-base'],
    commits: [[], ['-d']],
    layers: [
      { file: 'base.raw', format: 'raw', size: 16 * M, ops: baseOps(16 * M, 64 * K, 16) },
      { file: 'top.qcow2', ...v3(64 * K), ops: standardOps(16 * M, 64 * K, 17) },
    ],
  },
  {
    name: 'chain3-relative',
    description: '3-deep chain, relative names, top in a subdirectory (sub/top -> ../mid -> base); commit into mid, and -b into base',
    tags: ['v3', 'v2', 'c64k', 'c16k', 'chain3'],
    commits: [[], ['-b', 'base.qcow2'], ['-b', '{DIR}/base.qcow2']],
    layers: [
      { file: 'base.qcow2', size: 8 * M, compat: '0.10', clusterSize: 64 * K, ops: baseOps(8 * M, 64 * K, 18) },
      {
        file: 'mid.qcow2', ...v3(16 * K),
        ops: [{ op: 'write', offset: 64 * K, length: 64 * K, pattern: 0x81 }, { op: 'zero', offset: 160 * K, length: 16 * K }, { op: 'write', offset: 1 * M, length: 16 * K, pattern: 0x82 }],
      },
      { file: 'sub/top.qcow2', ...v3(64 * K), ops: standardOps(8 * M, 64 * K, 19) },
    ],
  },
  {
    name: 'chain4-absolute',
    description: '4-deep chain with absolute backing names (raw bottom); commit into l2, -b l1, -b l0',
    tags: ['v3', 'c64k', 'c4k', 'chain4', 'abs', 'raw-base'],
    commits: [[], ['-b', '{DIR}/l1.qcow2'], ['-b', '{DIR}/l0.raw']],
    layers: [
      { file: 'l0.raw', format: 'raw', size: 8 * M, ops: baseOps(8 * M, 64 * K, 20) },
      { file: 'l1.qcow2', backingName: 'absolute', ...v3(4 * K), ops: [{ op: 'write', offset: 12 * K, length: 40 * K, pattern: 0x91 }, { op: 'zero', offset: 1 * M, length: 256 * K }] },
      { file: 'l2.qcow2', backingName: 'absolute', ...v3(64 * K, { refcountBits: 1 }), ops: [{ op: 'write', offset: 2 * M, length: 200 * K, pattern: 0x92 }, { op: 'discard', offset: 0, length: 64 * K }] },
      { file: 'l3.qcow2', backingName: 'absolute', ...v3(64 * K), ops: standardOps(8 * M, 64 * K, 21) },
    ],
  },
  {
    name: 'base-smaller',
    description: '4 MiB base under a 12 MiB top with data beyond the base end (commit grows the base)',
    tags: ['v3', 'c64k', 'rc16', 'base-smaller'],
    layers: [
      { file: 'base.qcow2', size: 4 * M, ...v3(64 * K), ops: baseOps(4 * M, 64 * K, 22) },
      {
        file: 'top.qcow2', size: 12 * M, ...v3(64 * K),
        ops: [...standardOps(12 * M, 64 * K, 23), { op: 'write', offset: 4 * M - 4 * K, length: 8 * K, pattern: 0xa1 }, { op: 'zero', offset: 6 * M, length: 64 * K }],
      },
    ],
  },
  {
    name: 'base-smaller-raw',
    description: '3 MiB raw base under an 8 MiB top with data beyond the base end',
    tags: ['v3', 'c64k', 'rc16', 'base-smaller', 'raw-base'],
    layers: [
      { file: 'base.raw', format: 'raw', size: 3 * M, ops: [{ op: 'write', offset: 0, length: 1 * M, pattern: 0xa2 }] },
      { file: 'top.qcow2', size: 8 * M, ...v3(64 * K), ops: standardOps(8 * M, 64 * K, 24) },
    ],
  },
  {
    name: 'base-larger',
    description: '16 MiB base under a 4 MiB top: base data beyond the top end must survive',
    tags: ['v3', 'c64k', 'rc16', 'base-larger'],
    layers: [
      { file: 'base.qcow2', size: 16 * M, ...v3(64 * K), ops: [...baseOps(16 * M, 64 * K, 25), { op: 'write', offset: 4 * M - 64 * K, length: 192 * K, pattern: 0xa3 }] },
      { file: 'top.qcow2', size: 4 * M, ...v3(64 * K), ops: standardOps(4 * M, 64 * K, 26) },
    ],
  },
  {
    name: 'bitmaps-top',
    description: 'top with persistent bitmaps b0 (64 KiB), b1 (4 KiB granularity), b2 (disabled), dirtied by the writes',
    tags: ['v3', 'c64k', 'rc16', 'bitmaps'],
    commits: [[], ['-d']],
    layers: [
      { file: 'base.qcow2', size: 16 * M, ...v3(64 * K), ops: baseOps(16 * M, 64 * K, 27) },
      {
        file: 'top.qcow2', ...v3(64 * K),
        ops: [
          { op: 'write', offset: 12 * M, length: 128 * K, pattern: 0xb1 }, // before the bitmaps: not dirty
          { op: 'bitmap', name: 'b0' },
          { op: 'bitmap', name: 'b1', granularity: 4 * K },
          { op: 'bitmap', name: 'b2', disabled: true },
          ...standardOps(16 * M, 64 * K, 28),
        ],
      },
    ],
  },
  {
    name: 'bitmaps-base',
    description: 'base with persistent bitmaps (enabled 64 KiB, enabled 4 KiB, disabled): commit must dirty the enabled ones wherever it changes the base',
    tags: ['v3', 'c64k', 'rc16', 'bitmaps', 'base-bitmaps'],
    commits: [[], ['-d']],
    layers: [
      {
        file: 'base.qcow2', size: 16 * M, ...v3(64 * K),
        ops: [
          { op: 'write', offset: 0, length: 1 * M, pattern: 0xe1 },
          { op: 'bitmap', name: 'enabled' },
          { op: 'bitmap', name: 'fine', granularity: 4 * K },
          { op: 'bitmap', name: 'frozen', disabled: true },
          { op: 'write', offset: 8 * M, length: 100 * K, pattern: 0xe2 }, // dirty before the commit
        ],
      },
      { file: 'top.qcow2', ...v3(64 * K), ops: [...standardOps(16 * M, 64 * K, 36), { op: 'write', offset: 512 * K, length: 4 * K, pattern: 0xe1 }] },
    ],
  },
  {
    name: 'bitmaps-extl2-c2m',
    description: '2 MiB-cluster extended-L2 top with a 512 KiB-granularity bitmap, over a 64 KiB base',
    tags: ['v3', 'c2m', 'c64k', 'extl2', 'bitmaps'],
    layers: [
      { file: 'base.qcow2', size: 8 * M, ...v3(64 * K), ops: baseOps(8 * M, 64 * K, 29) },
      {
        file: 'top.qcow2', ...v3(2 * M, { extendedL2: true }),
        ops: [
          { op: 'bitmap', name: 'gran512k', granularity: 512 * K },
          { op: 'write', offset: 70 * K, length: 64 * K, pattern: 0xb2 },
          { op: 'zero', offset: 2 * M + 128 * K, length: 64 * K },
          { op: 'write', offset: 6 * M + 10 * K, length: 4 * K, pattern: 0xb3 },
        ],
      },
    ],
  },
  {
    name: 'snapshots-top',
    description: 'top with internal snapshots s1, s2 taken between writes (shared clusters, COW after them)',
    tags: ['v3', 'c64k', 'rc16', 'snapshots'],
    layers: [
      { file: 'base.qcow2', size: 16 * M, ...v3(64 * K), ops: baseOps(16 * M, 64 * K, 30) },
      {
        file: 'top.qcow2', ...v3(64 * K),
        ops: [
          { op: 'write', offset: 0, length: 192 * K, pattern: 0xc1 },
          { op: 'write', offset: 1 * M, length: 64 * K, pattern: 0xc2 },
          { op: 'snapshot', name: 's1' },
          { op: 'write', offset: 64 * K, length: 4 * K, pattern: 0xc3 },
          { op: 'discard', offset: 1 * M, length: 64 * K },
          { op: 'snapshot', name: 's2' },
          ...standardOps(16 * M, 64 * K, 31),
        ],
      },
    ],
  },
  {
    name: 'snapshots-v2-top',
    description: 'v2 top with an internal snapshot, over a v3 base',
    tags: ['v2', 'v3', 'c64k', 'rc16', 'snapshots'],
    layers: [
      { file: 'base.qcow2', size: 8 * M, ...v3(64 * K), ops: baseOps(8 * M, 64 * K, 32) },
      {
        file: 'top.qcow2', compat: '0.10', clusterSize: 64 * K,
        ops: [{ op: 'write', offset: 0, length: 128 * K, pattern: 0xc4 }, { op: 'snapshot', name: 'snap' }, ...standardOps(8 * M, 64 * K, 33)],
      },
    ],
  },
  {
    name: 'bitmaps-snapshots-rc16-base-rc1',
    description: 'top with a bitmap and a snapshot over a refcount_bits=1 base',
    tags: ['v3', 'c64k', 'rc1', 'rc16', 'bitmaps', 'snapshots'],
    layers: [
      { file: 'base.qcow2', size: 8 * M, ...v3(64 * K, { refcountBits: 1 }), ops: baseOps(8 * M, 64 * K, 34) },
      {
        file: 'top.qcow2', ...v3(64 * K),
        ops: [
          { op: 'write', offset: 0, length: 128 * K, pattern: 0xd1 },
          { op: 'snapshot', name: 'before-bitmap' },
          { op: 'bitmap', name: 'backup', granularity: 16 * K },
          ...standardOps(8 * M, 64 * K, 35),
        ],
      },
    ],
  },
];

/** Spec by name (throws if unknown). */
export function commitSpec(name: string): ChainSpec {
  const s = COMMIT_MATRIX.find((x) => x.name === name);
  if (!s) throw new Error(`no COMMIT_MATRIX spec ${name}`);
  return s;
}

/** Every (spec, args) pair of the matrix, labelled "name [args]". */
export function commitCases(specs: readonly ChainSpec[] = COMMIT_MATRIX): Array<{ label: string; spec: ChainSpec; args: string[] }> {
  return specs.flatMap((spec) => (spec.commits ?? [[]]).map((args) => ({ label: `${spec.name} [${args.join(' ')}]`, spec, args })));
}

// ---------------------------------------------------------------------------------------------
// template chains: each spec is built once per test file and copied (cp --sparse=always) for
// every case, together with its "before" state. Specs with absolute backing names are built in
// place every time (a copy would point at the template's files).

export interface ChainState {
  /** `qemu-img info --backing-chain` entries, bottom first (same order as chain.layers). */
  infos: any[];
  /** Guest digest of the top. */
  topDigest: string;
  /** sha256 of every layer file. */
  fileHashes: string[];
  /** Own allocation of every qcow2 layer ([] for raw). */
  allocs: Array<ReturnType<typeof topAllocation>>;
  extras: TopExtras;
}

export interface TopExtras {
  bitmaps: BitmapInfo[];
  bitmapData: Record<string, BitmapExtent[]>;
  snapshots: string[];
  /** snapshot name -> digest of the snapshot restored with the backing detached */
  snapDigests: Record<string, string>;
}

const usesAbsolute = (spec: ChainSpec): boolean => spec.layers.some((l) => l.backingName === 'absolute');
const templates = new Map<string, { chain: BuiltChain; state: ChainState }>();

function copyChain(tpl: BuiltChain, dir: string): BuiltChain {
  mkdirSync(dir, { recursive: true });
  const r = run('cp', ['-a', '--sparse=always', `${tpl.dir}/.`, dir]);
  if (r.status !== 0) throw new Error(`cp ${tpl.dir} ${dir} failed: ${r.stderr}`);
  const layers = tpl.layers.map((l) => ({ ...l, path: resolve(dir, l.spec.file) }));
  return { ...tpl, dir, layers, top: layers[layers.length - 1]!, ms: 0 };
}

/**
 * A fresh copy of `spec`'s chain in `dir` plus its state before any operation. The first call
 * for a spec builds a template (in a tmpDir removed after the test file) and records its state.
 */
export function preparedChain(spec: ChainSpec, dir: string): { chain: BuiltChain; before: ChainState } {
  if (usesAbsolute(spec)) {
    const chain = buildChain(dir, spec);
    return { chain, before: chainState(chain) };
  }
  let t = templates.get(spec.name);
  if (!t || t.chain.spec !== spec) {
    const d = tmpDir('qcowkit-tpl-');
    const chain = buildChain(join(d, 'build'), spec);
    // The state is taken from a copy: cp turns qemu's allocated-but-zero host blocks into holes,
    // which `qemu-img map` reports (zero: true), so only copies compare equal with copies.
    t = { chain, state: chainState(copyChain(chain, join(d, 'ref'))) };
    templates.set(spec.name, t);
  }
  const t0 = Date.now();
  const chain = copyChain(t.chain, dir);
  chain.ms = Date.now() - t0;
  return { chain, before: t.state };
}

const fileHash = (p: string): string => createHash('sha256').update(readFileSync(p)).digest('hex');

function chainInfos(chain: BuiltChain): any[] {
  const infos = qemuImgInfoChain(chain.top.path, { format: chain.top.format }).reverse();
  if (infos.length !== chain.layers.length) throw new Error(`${chain.top.path}: backing chain has ${infos.length} layers, expected ${chain.layers.length}`);
  return infos;
}

/** Full state of a chain (what the drivers compare before/after). */
export function chainState(chain: BuiltChain): ChainState {
  const infos = chainInfos(chain);
  return {
    infos,
    topDigest: guestDigest(chain.top.path, { format: chain.top.format }),
    fileHashes: chain.layers.map((l) => fileHash(l.path)),
    allocs: chain.layers.map((l) => (l.format === 'qcow2' ? topAllocation(l.path, { format: 'qcow2' }) : [])),
    extras: topExtras(chain.top, infos[infos.length - 1]),
  };
}

function topExtras(top: BuiltLayer, info: any): TopExtras {
  if (top.format !== 'qcow2') return { bitmaps: [], bitmapData: {}, snapshots: [], snapDigests: {} };
  const bitmaps = bitmapsFromInfo(info);
  const bitmapData = bitmapsExtents(top.path, bitmaps.map((b) => b.name), { format: 'qcow2' });
  const snapshots = snapshotsFromInfo(info).map((s) => s.name);
  const snapDigests: Record<string, string> = {};
  for (const s of snapshots) snapDigests[s] = snapshotRestores(top.path, s, undefined, { detachBacking: true }).digest;
  return { bitmaps, bitmapData, snapshots, snapDigests };
}

function compareExtras(before: TopExtras, after: TopExtras, who: string, problems: string[]): void {
  if (JSON.stringify(after.bitmaps) !== JSON.stringify(before.bitmaps)) {
    problems.push(`${who}: bitmaps changed: ${JSON.stringify(before.bitmaps)} -> ${JSON.stringify(after.bitmaps)}`);
  }
  for (const [name, ext] of Object.entries(before.bitmapData)) {
    const got = after.bitmapData[name];
    if (got && JSON.stringify(got) !== JSON.stringify(ext)) {
      problems.push(`${who}: contents of bitmap ${name} changed: ${JSON.stringify(ext)} -> ${JSON.stringify(got)}`);
    }
  }
  if (JSON.stringify(after.snapshots) !== JSON.stringify(before.snapshots)) {
    problems.push(`${who}: snapshots changed: ${before.snapshots.join(',')} -> ${after.snapshots.join(',')}`);
  }
  for (const [s, d] of Object.entries(before.snapDigests)) {
    const got = after.snapDigests[s];
    if (got !== undefined && got !== d) problems.push(`${who}: snapshot ${s} no longer restores its own data (digest ${d.slice(0, 12)} -> ${got.slice(0, 12)})`);
  }
}

function checkAll(chain: BuiltChain, who: string, problems: string[]): string[] {
  const out: string[] = [];
  for (const l of chain.layers) {
    if (l.format === 'raw') continue; // qemu-img check: 63, nothing to check
    const c = qemuCheck(l.path, { format: l.format });
    out.push(c.summary);
    if (!c.ok) problems.push(`${who}: ${c.summary}`);
  }
  return out;
}

function restoreLive(top: BuiltLayer, snaps: readonly string[]): Record<string, string> {
  const out: Record<string, string> = {};
  for (const s of snaps) {
    const r = snapshotRestores(top.path, s);
    out[s] = r.checkOk ? r.digest : `check failed: ${r.check}`;
  }
  return out;
}

const backingOf = (info: any): string | undefined => info?.['backing-filename'];

// ---------------------------------------------------------------------------------------------
// compareCommit

export interface RunContext {
  /** The chain dir (use it as cwd: args may be relative to it). */
  dir: string;
  chain: BuiltChain;
}

export type CommitRunner = (topPath: string, args: string[], ctx: RunContext) => Promise<void> | void;

/** `qemu-img commit ARGS TOP` (cwd = chain dir), throwing on failure: the reference runner. */
export const qemuImgCommit: CommitRunner = (top, args, ctx) => {
  const r = qemuImg(['commit', '-q', '-f', ctx.chain.top.format, ...args, top], { cwd: ctx.dir, timeout: 120_000 });
  if (r.status !== 0) throw new Error(`qemu-img commit ${args.join(' ')} ${top} failed (${r.status}): ${r.stderr.trim()}`);
};

export interface SideReport {
  dir: string;
  /** Milliseconds the runner took. */
  runMs: number;
  base: FileSizes & { virtualSize: number; file: string };
  top: FileSizes & { allocated: number };
  checks: string[];
}

export interface CommitReport {
  spec: string;
  args: string[];
  /** Index (bottom = 0) of the layer committed into. */
  baseIndex: number;
  /** -d or -b given: the top must stay as it was. */
  keepTop: boolean;
  qemu: SideReport;
  candidate: SideReport;
  /** Every violated property; empty = pass. */
  problems: string[];
}

/** Resolves the commit base (index into chain.layers) from commit args the way qemu-img does. */
export function commitBaseIndex(chain: BuiltChain, args: readonly string[]): number {
  const i = args.indexOf('-b');
  const n = chain.layers.length;
  if (i < 0) return n - 2;
  const v = args[i + 1]!;
  for (let k = n - 2; k >= 0; k--) {
    const l = chain.layers[k]!;
    const above = chain.layers[k + 1]!;
    if (above.backingString === v || resolve(chain.dir, v) === l.path) return k;
  }
  throw new Error(`commit -b ${v}: not in the chain of ${chain.top.path}`);
}

const substDir = (args: readonly string[], dir: string): string[] => args.map((a) => a.split('{DIR}').join(dir));

export interface CompareCommitOptions {
  /** Fail the current test with all problems (default true). */
  assert?: boolean;
  /** Where to put the candidate's chain (default: a fresh tmpDir()). */
  dir?: string;
  /** Where to put qemu-img's chain (default: a fresh tmpDir(); the result is cached per spec+args
   *  only when this is not given). */
  referenceDir?: string;
}

/**
 * Prepares two copies of `spec`'s chain; runs `qemu-img commit ARGS top` on one (cached per
 * spec+args: see qemuReference) and `runCommit(top, ARGS, ctx)` on the other (ARGS = qemuArgs
 * with {DIR} replaced by each chain's dir; cwd = that dir), then checks the candidate:
 *   - the top's guest view is unchanged, every qcow2 layer passes qemu-img check (leaks fail),
 *   - without -d/-b nothing is allocated in the top; with -d/-b its own allocation is unchanged,
 *   - layers between base and top (-b) keep their own allocation, layers below the base are
 *     byte-identical, no backing name changed,
 *   - the top's bitmaps (names, flags, granularity, contents) and snapshots (list, and the data
 *     each restores with the backing detached) are unchanged;
 * and against qemu-img's result:
 *   - `qemu-img compare` of the two bases says identical, and their virtual sizes agree,
 *   - each snapshot restored with the (committed) backing attached gives the same guest view,
 *   - the candidate's top length and du are at most qemu-img's plus one cluster of the top.
 */
export async function compareCommit(spec: ChainSpec, runCommit: CommitRunner, qemuArgs: readonly string[] = [], opts: CompareCommitOptions = {}): Promise<CommitReport> {
  const problems: string[] = [];
  const keepTop = qemuArgs.includes('-d') || qemuArgs.includes('-b');
  const ref = qemuReference(spec, qemuArgs, opts.referenceDir);
  problems.push(...ref.problems);
  const { chain, before } = preparedChain(spec, opts.dir ?? tmpDir('qcowkit-commit-cand-'));
  const args = substDir(qemuArgs, chain.dir);
  const baseIndex = commitBaseIndex(chain, args);
  // bitmaps of the base: keep a pristine copy of the base to compute what the commit changed
  const baseLayer = chain.layers[baseIndex]!;
  const baseBitmaps = baseLayer.format === 'qcow2' ? bitmapsFromInfo(before.infos[baseIndex]) : [];
  const baseBitmapsBefore = baseBitmaps.length ? bitmapsExtents(baseLayer.path, baseBitmaps.map((b) => b.name), { format: 'qcow2' }) : {};
  const pristineBase = join(dirname(baseLayer.path), `.pristine-${basename(baseLayer.path)}`);
  if (baseBitmaps.length) {
    const r = run('cp', ['--sparse=always', baseLayer.path, pristineBase]);
    if (r.status !== 0) throw new Error(`cp ${baseLayer.path}: ${r.stderr}`);
  }
  const t = Date.now();
  try {
    await runCommit(chain.top.path, args, { dir: chain.dir, chain });
  } catch (e) {
    problems.push(`candidate: commit ${args.join(' ')} failed: ${(e as Error).message}`);
  }
  const runMs = Date.now() - t;
  const who = 'candidate';
  const n = chain.layers.length;
  const top = chain.top;
  const infos = chainInfos(chain);
  if (guestDigest(top.path, { format: top.format }) !== before.topDigest) problems.push(`${who}: the top's guest view changed`);
  for (let k = 0; k < n; k++) {
    const l = chain.layers[k]!;
    if (backingOf(infos[k]) !== backingOf(before.infos[k])) problems.push(`${who}: backing name of ${l.spec.file} changed: ${backingOf(before.infos[k])} -> ${backingOf(infos[k])}`);
    if (k < baseIndex && fileHash(l.path) !== before.fileHashes[k]) problems.push(`${who}: layer ${l.spec.file} below the base was modified`);
    if (k > baseIndex && k < n - 1 && JSON.stringify(topAllocation(l.path, { format: l.format })) !== JSON.stringify(before.allocs[k])) {
      problems.push(`${who}: intermediate ${l.spec.file} allocation changed`);
    }
  }
  const checks = checkAll(chain, who, problems);
  const alloc = topAllocation(top.path, { format: top.format });
  const allocated = alloc.reduce((s, e) => s + e.length, 0);
  if (keepTop) {
    if (JSON.stringify(alloc) !== JSON.stringify(before.allocs[n - 1])) problems.push(`${who}: top allocation changed although -d/-b`);
  } else if (allocated !== 0) {
    problems.push(`${who}: ${allocated} bytes still allocated in the top after commit`);
  }
  const extras = topExtras(top, infos[n - 1]);
  compareExtras(before.extras, extras, who, problems);
  if (baseBitmaps.length) {
    checkBaseBitmaps(baseLayer, pristineBase, baseBitmaps, baseBitmapsBefore, who, problems);
    rmSync(pristineBase, { force: true });
  }
  const base = chain.layers[baseIndex]!;
  const cand: SideReport = {
    dir: chain.dir,
    runMs,
    base: { file: base.spec.file, virtualSize: infos[baseIndex]['virtual-size'], ...fileLengthAndDu(base.path) },
    top: { ...fileLengthAndDu(top.path), allocated },
    checks,
  };

  // against qemu-img's result
  const refBase = ref.chain.layers[baseIndex]!;
  const cmp = qemuCompare(refBase.path, base.path, { formatA: refBase.format, formatB: base.format });
  if (cmp.status !== 0) problems.push(`bases differ (qemu-img compare ${cmp.status}): ${cmp.output}`);
  if (ref.rep.base.virtualSize !== cand.base.virtualSize) problems.push(`base virtual size: qemu-img ${ref.rep.base.virtualSize}, candidate ${cand.base.virtualSize}`);
  const live = restoreLive(top, extras.snapshots);
  for (const [s, d] of Object.entries(ref.live)) {
    if (live[s] !== d) problems.push(`snapshot ${s} restored over the committed chain differs from qemu-img's`);
  }
  const slack = top.clusterSize;
  if (cand.top.length > ref.rep.top.length + slack) problems.push(`top length ${cand.top.length} > qemu-img's ${ref.rep.top.length} + one cluster (${slack})`);
  if (cand.top.du > ref.rep.top.du + slack) problems.push(`top du ${cand.top.du} > qemu-img's ${ref.rep.top.du} + one cluster (${slack})`);

  const report: CommitReport = { spec: spec.name, args: [...qemuArgs], baseIndex, keepTop, qemu: ref.rep, candidate: cand, problems };
  if (opts.assert !== false) expect(problems, `${spec.name} commit ${qemuArgs.join(' ')}`).toEqual([]);
  return report;
}

/**
 * The base's persistent bitmaps after a commit: names/flags/granularity unchanged; disabled
 * bitmaps unchanged; enabled bitmaps keep every bit they had and are dirty wherever the base's
 * guest content changed (granularity blocks of `pristine` vs the committed base; a superset is
 * fine: it only costs an incremental backup extra work, a missing bit loses data).
 */
function checkBaseBitmaps(base: BuiltLayer, pristine: string, bitmaps: BitmapInfo[], before: Record<string, BitmapExtent[]>, who: string, problems: string[]): void {
  const now = bitmapsFromInfo(qemuImgInfo(base.path, { format: 'qcow2' }));
  if (JSON.stringify(now) !== JSON.stringify(bitmaps)) {
    problems.push(`${who}: base bitmaps changed: ${JSON.stringify(bitmaps)} -> ${JSON.stringify(now)}`);
    return;
  }
  const after = bitmapsExtents(base.path, bitmaps.map((b) => b.name), { format: 'qcow2' });
  const isDirty = (ext: BitmapExtent[], off: number): boolean => ext.some((e) => e.dirty && e.start <= off && off < e.start + e.length);
  for (const b of bitmaps) {
    const a = after[b.name]!;
    const prev = before[b.name]!;
    if (!b.flags.includes('auto')) {
      if (JSON.stringify(a) !== JSON.stringify(prev)) problems.push(`${who}: disabled base bitmap ${b.name} changed`);
      continue;
    }
    for (const e of prev) {
      if (e.dirty && !a.some((x) => x.dirty && x.start <= e.start && e.start + e.length <= x.start + x.length)) {
        problems.push(`${who}: base bitmap ${b.name} lost dirty bits at ${e.start}+${e.length}`);
      }
    }
    const missing = changedBlocks(pristine, base.path, b.granularity).filter((off) => !isDirty(a, off));
    if (missing.length) problems.push(`${who}: base bitmap ${b.name} is clean at ${missing.length} changed block(s), first at ${missing[0]}`);
  }
}

/** Offsets of the `gran`-sized blocks whose guest content differs between two qcow2 images. */
export function changedBlocks(a: string, b: string, gran: number): number[] {
  const d = tmpDir('qcowkit-changed-');
  try {
    const ra = join(d, 'a.raw');
    const rb = join(d, 'b.raw');
    for (const [src, dst] of [[a, ra], [b, rb]] as const) {
      const r = qemuImg(['convert', '-f', 'qcow2', '-O', 'raw', src, dst], { timeout: 60_000 });
      if (r.status !== 0) throw new Error(`qemu-img convert ${src}: ${r.stderr}`);
    }
    const x = readFileSync(ra);
    const y = readFileSync(rb);
    const len = Math.max(x.length, y.length);
    const zero = Buffer.alloc(gran);
    const out: number[] = [];
    for (let off = 0; off < len; off += gran) {
      const bx = off < x.length ? x.subarray(off, Math.min(off + gran, x.length)) : zero.subarray(0, 0);
      const by = off < y.length ? y.subarray(off, Math.min(off + gran, y.length)) : zero.subarray(0, 0);
      const pad = (buf: Buffer): Buffer => (buf.length === Math.min(gran, len - off) ? buf : Buffer.concat([buf, zero.subarray(0, Math.min(gran, len - off) - buf.length)]));
      if (!pad(bx).equals(pad(by))) out.push(off);
    }
    return out;
  } finally {
    rmSync(d, { recursive: true, force: true });
  }
}

interface Reference {
  chain: BuiltChain;
  rep: SideReport;
  /** snapshot -> digest restored over the committed chain */
  live: Record<string, string>;
  /** qemu-img commit itself failed (reported into every comparison) */
  problems: string[];
}

const references = new Map<string, Reference>();

/**
 * qemu-img's result for (spec, args): a prepared copy committed with qemu-img, its sizes and
 * snapshot views. Cached per test file (the qcowkit cases reuse the harness-proof runs). Only
 * what the comparison needs is measured here: qemu-img's own correctness is established by
 * running compareCommit with qemuImgCommit as the candidate.
 */
export function qemuReference(spec: ChainSpec, qemuArgs: readonly string[], dir?: string): Reference {
  const key = `${spec.name}\0${qemuArgs.join('\0')}`;
  const hit = references.get(key);
  if (hit && hit.chain.spec === spec && !dir) return hit;
  const { chain } = preparedChain(spec, dir ?? tmpDir('qcowkit-commit-qemu-'));
  const args = substDir(qemuArgs, chain.dir);
  const baseIndex = commitBaseIndex(chain, args);
  const problems: string[] = [];
  const t = Date.now();
  try {
    qemuImgCommit(chain.top.path, args, { dir: chain.dir, chain });
  } catch (e) {
    problems.push(`qemu-img: ${(e as Error).message}`);
  }
  const runMs = Date.now() - t;
  const base = chain.layers[baseIndex]!;
  const info = qemuImgInfo(base.path, { format: base.format });
  const snaps = chain.top.format === 'qcow2' ? snapshotsFromInfo(qemuImgInfo(chain.top.path, { format: 'qcow2' })).map((s) => s.name) : [];
  const ref: Reference = {
    chain,
    rep: {
      dir: chain.dir,
      runMs,
      base: { file: base.spec.file, virtualSize: info['virtual-size'], ...fileLengthAndDu(base.path) },
      top: { ...fileLengthAndDu(chain.top.path), allocated: allocatedInTop(chain.top.path, { format: chain.top.format }) },
      checks: [],
    },
    live: restoreLive(chain.top, snaps),
    problems,
  };
  if (!dir) references.set(key, ref);
  return ref;
}

// ---------------------------------------------------------------------------------------------
// make-empty

export type MakeEmptyRunner = (topPath: string, ctx: RunContext) => Promise<void> | void;

/**
 * A make-empty done with QEMU's own code, to prove the harness: the top is pointed (rebase -u) at
 * a scratch overlay of its backing, `qemu-img commit` copies its data there and runs QEMU's
 * make_empty on the top, then the top is pointed back at its original backing name (rebase -u).
 * QEMU's slow path (v2, bitmaps, snapshots) neither truncates the file nor frees L2 tables, so the
 * size criteria of checkMakeEmpty fail for v2/bitmap tops: see `qemuMakeEmptyFastPath`.
 */
export const qemuMakeEmpty: MakeEmptyRunner = (top, ctx) => {
  const t = ctx.chain.top;
  const below = ctx.chain.layers[ctx.chain.layers.length - 2]!;
  const scratch = join(ctx.dir, '.make-empty-scratch.qcow2');
  const img = (args: string[]): void => {
    const r = qemuImg(args, { cwd: ctx.dir, timeout: 120_000 });
    if (r.status !== 0) throw new Error(`qemu-img ${args.join(' ')} failed (${r.status}): ${r.stderr.trim()}`);
  };
  img(['create', '-q', '-f', 'qcow2', '-b', below.path, '-F', below.format, scratch, String(t.size)]);
  try {
    img(['rebase', '-u', '-f', 'qcow2', '-b', scratch, '-F', 'qcow2', top]);
    img(['commit', '-q', '-f', 'qcow2', top]);
  } finally {
    img(['rebase', '-u', '-f', 'qcow2', '-b', t.backingString!, '-F', below.format, top]);
    rmSync(scratch, { force: true });
  }
};

/** Whether QEMU's make_empty takes the fast path (v3, no snapshots, no bitmaps) and truncates. */
export function qemuMakeEmptyFastPath(spec: ChainSpec): boolean {
  const top = spec.layers[spec.layers.length - 1]!;
  const ops = top.ops ?? [];
  return top.compat !== '0.10' && !ops.some((o) => o.op === 'bitmap' || o.op === 'snapshot');
}

export interface MakeEmptyReport {
  spec: string;
  runMs: number;
  before: FileSizes;
  after: FileSizes & { allocated: number };
  /** A fresh overlay with the same options, backing and bitmaps (same contents): the size target. */
  fresh: FileSizes;
  /** Length/du compared with `fresh` (not when the top has snapshots: their data stays). */
  sizeChecked: boolean;
  checks: string[];
  problems: string[];
}

/**
 * Prepares `spec`'s chain, runs `runMakeEmpty(top, ctx)`, and checks: nothing allocated in the
 * top; the top's guest view equals its backing file's over the top's size (digests; plus
 * `qemu-img compare` when the backing is not larger); backing name, bitmaps (list and contents)
 * and snapshots (list, data) preserved; every qcow2 layer passes qemu-img check (leaks fail) and
 * the layers below are byte-identical; and, unless the top has snapshots, its length and du are
 * at most those of a freshly created overlay (same create options, backing, and bitmaps with the
 * same granularity, flags and contents: qemu-img create + bitmap --add + bitmap --merge) plus one
 * cluster; with snapshots, du must not grow.
 */
export async function checkMakeEmpty(spec: ChainSpec, runMakeEmpty: MakeEmptyRunner, opts: { assert?: boolean; dir?: string } = {}): Promise<MakeEmptyReport> {
  const { chain, before } = preparedChain(spec, opts.dir ?? tmpDir('qcowkit-mkempty-'));
  const dir = chain.dir;
  const top = chain.top;
  const n = chain.layers.length;
  const below = chain.layers[n - 2]!;
  const problems: string[] = [];
  const sizesBefore = fileLengthAndDu(top.path);

  // the size target, built before the run (from the bitmaps as they are now)
  const freshPath = join(dir, '.fresh-overlay.qcow2');
  const o = createOpts(top.spec);
  const img = (args: string[]): void => {
    const r = qemuImg(args, { timeout: 60_000 });
    if (r.status !== 0) throw new Error(`checkMakeEmpty: qemu-img ${args.join(' ')} failed: ${r.stderr.trim()}`);
  };
  img(['create', '-q', '-f', 'qcow2', ...(o ? ['-o', o] : []), '-b', below.path, '-F', below.format, freshPath, String(top.size)]);
  for (const b of before.extras.bitmaps) {
    img(['bitmap', '--add', '-g', String(b.granularity), ...(b.flags.includes('auto') ? [] : ['--disable']), freshPath, b.name]);
    img(['bitmap', '--merge', b.name, '-b', top.path, '-F', 'qcow2', freshPath, b.name]);
  }
  const fresh = fileLengthAndDu(freshPath);
  rmSync(freshPath);

  const t = Date.now();
  try {
    await runMakeEmpty(top.path, { dir, chain });
  } catch (e) {
    problems.push(`make-empty failed: ${(e as Error).message}`);
  }
  const runMs = Date.now() - t;

  const infos = chainInfos(chain);
  const allocated = allocatedInTop(top.path, { format: 'qcow2' });
  if (allocated !== 0) problems.push(`${allocated} bytes still allocated in the top`);
  if (guestDigest(top.path, { format: 'qcow2' }) !== guestDigest(below.path, { format: below.format, size: top.size })) {
    problems.push("top's guest view differs from the backing file's (digest over the top's size)");
  }
  if (below.size <= top.size) {
    const cmp = qemuCompare(top.path, below.path, { formatA: 'qcow2', formatB: below.format });
    if (cmp.status !== 0) problems.push(`top's guest view differs from the backing file's (qemu-img compare ${cmp.status}): ${cmp.output}`);
  }
  for (let k = 0; k < n; k++) {
    if (backingOf(infos[k]) !== backingOf(before.infos[k])) problems.push(`backing name of ${chain.layers[k]!.spec.file} changed: ${backingOf(before.infos[k])} -> ${backingOf(infos[k])}`);
    if (k < n - 1 && fileHash(chain.layers[k]!.path) !== before.fileHashes[k]) problems.push(`layer ${chain.layers[k]!.spec.file} below the top was modified`);
  }
  const checks = checkAll(chain, 'make-empty', problems);
  compareExtras(before.extras, topExtras(top, infos[n - 1]), 'make-empty', problems);
  const sizes = fileLengthAndDu(top.path);
  const sizeChecked = before.extras.snapshots.length === 0;
  if (sizeChecked) {
    const cs = top.clusterSize;
    if (sizes.length > fresh.length + cs) problems.push(`top length ${sizes.length} > fresh overlay's ${fresh.length} + one cluster (${cs})`);
    if (sizes.du > fresh.du + cs) problems.push(`top du ${sizes.du} > fresh overlay's ${fresh.du} + one cluster (${cs})`);
  } else if (sizes.du > sizesBefore.du) {
    problems.push(`top du grew: ${sizesBefore.du} -> ${sizes.du}`);
  }
  const report: MakeEmptyReport = { spec: spec.name, runMs, before: sizesBefore, after: { ...sizes, allocated }, fresh, sizeChecked, checks, problems };
  if (opts.assert !== false) expect(problems, `${spec.name} make-empty`).toEqual([]);
  return report;
}
