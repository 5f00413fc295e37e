// Shared by the commit / commit -d / make-empty fault suites (commit-faults, commit-drop-faults,
// make-empty-faults): the scenarios (base <- top chains built with qemu-img/qemu-io), the
// qemu-img based invariants and the "run it again and it completes" check.
//
// Every scenario is a set of two files in one directory: base.qcow2 and top.qcow2, whose backing
// file name is the relative "base.qcow2" (so a copy of the directory is a self-contained chain).
import { createHash } from 'node:crypto';
import { copyFileSync, existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { expect } from 'vitest';
import { commit, makeEmpty, Qcow2Image } from '../../src/index.js';
import type { OpFilter } from '../helpers/fault-file.js';
import type { FileOpener } from '../../src/io/file.js';
import { qemuImg, qemuIo, type RunResult } from '../helpers/qemu.js';

export const K = 1024;
export const M = 1024 * 1024;
export const BASE = 'base.qcow2';
export const TOP = 'top.qcow2';

export function must(r: RunResult, what: string): void {
  if (r.status !== 0) throw new Error(`${what} failed (${r.status}): ${r.stdout}${r.stderr}`);
}

function create(path: string, opts: string, size: string, backing?: string): void {
  const args = ['create', '-q', '-f', 'qcow2', '-o', opts];
  if (backing) args.push('-b', backing, '-F', 'qcow2');
  args.push(path, size);
  must(qemuImg(args), `create ${basename(path)}`);
}

function io(path: string, cmds: string[]): void {
  // -d unmap: discards reach the image (qemu-io ignores them otherwise).
  must(qemuIo(path, cmds, { extraArgs: ['-d', 'unmap'] }), `qemu-io ${basename(path)} ${cmds.join('; ')}`);
}

export interface Scenario {
  name: string;
  build(dir: string): void;
  /** Cluster size of the base (for the scenario's own arithmetic). */
  baseCluster: number;
  /** The top has an internal snapshot s1 and a persistent bitmap b0. */
  snapshotAndBitmap?: boolean;
}

/**
 * The common guest pattern of a top over a base with data: overwrites of base data (whole and
 * partial clusters: copy-on-write), zero writes over base data, discards (zero flags: a backing
 * file is visible), data that is all zeros, compressed clusters, and data where the base has none.
 */
function topPattern(c: number): string[] {
  return [
    `write -P 0x21 ${64 * K} ${Math.max(c, 128 * K)}`, // over base data
    `write -P 0x22 ${300 * K + 512} 3k`, // partial clusters (COW from the base)
    `write -z ${1 * M} ${Math.max(2 * c, 128 * K)}`, // zeroes over base data
    `discard ${2 * M} ${Math.max(2 * c, 128 * K)}`, // discard over base data -> zero flags
    `write -P 0 ${3 * M} ${Math.max(2 * c, 192 * K)}`, // data that is all zeros
    `write -c -P 0x23 ${3 * M + 512 * K} ${Math.max(c, 64 * K)}`, // compressed in the top
    `write -P 0x24 ${5 * M + 4 * K} ${Math.max(c, 200 * K)}`, // where the base has nothing
    `write -P 0x25 ${5 * M + 700 * K} 1k`, // a partial cluster where the base has nothing
  ];
}

/** Base data: plain, compressed, and some clusters the top overwrites in part. */
function basePattern(c: number): string[] {
  return [`write -P 0x11 0 ${3 * M}`, `write -c -P 0x12 ${3 * M + 512 * K} ${Math.max(c, 64 * K)}`, `write -c -P 0x13 ${4 * M} ${Math.max(c, 64 * K)}`, `write -P 0x14 ${6 * M} 256k`];
}

/**
 * A top with 512-byte clusters and refcount_bits=64 (a refcount block covers 32 KiB of file) or 16
 * (128 KiB): emptying it lowers refcounts in many blocks, drops the idle ones and shrinks and moves
 * the refcount table; the snapshot keeps some L2 tables and data, the bitmap its table and data.
 */
function top512(bits: number): Scenario {
  return {
    name: `top with 512 B clusters, refcount_bits=${bits}, a snapshot and a bitmap (many refcount blocks)`,
    baseCluster: 64 * K,
    snapshotAndBitmap: true,
    build(dir) {
      const base = join(dir, BASE);
      const top = join(dir, TOP);
      create(base, 'cluster_size=64k', '8M');
      io(base, basePattern(64 * K));
      create(top, `cluster_size=512,refcount_bits=${bits}`, '8M', BASE);
      const more = bits === 64 ? 1 : 0.5;
      io(top, [`write -P 0x41 ${256 * K} ${Math.round(200 * more)}k`, `write -z ${1 * M} 16k`, `write -c -P 0x42 ${2 * M} 8k`]);
      must(qemuImg(['snapshot', '-c', 's1', top]), 'snapshot');
      must(qemuImg(['bitmap', '--add', '-g', '64k', top, 'b0']), 'bitmap');
      io(top, [`write -P 0x43 ${300 * K} 40k`, `write -P 0x44 ${3 * M} ${Math.round(300 * more)}k`, `write -P 0x45 ${5 * M + 512} 1k`, `discard ${6 * M} 64k`, `write -P 0x46 ${7 * M} ${Math.round(200 * more)}k`]);
    },
  };
}

export const SCENARIOS: Record<string, Scenario> = {
  plain64k: {
    name: '64 KiB clusters: data, zero writes, discards, partial clusters, compressed in base and top',
    baseCluster: 64 * K,
    build(dir) {
      const base = join(dir, BASE);
      const top = join(dir, TOP);
      create(base, 'cluster_size=64k', '8M');
      io(base, basePattern(64 * K));
      create(top, 'cluster_size=64k', '8M', BASE);
      io(top, topPattern(64 * K));
    },
  },
  rc1: {
    // 1-bit refcounts with 512-byte clusters: a block covers 2 MiB of host file. The base file is
    // brought near that boundary first, so the commit needs a new refcount block.
    name: '512 B clusters, refcount_bits=1 base (a new refcount block during the commit)',
    baseCluster: 512,
    build(dir) {
      const base = join(dir, BASE);
      const top = join(dir, TOP);
      create(base, 'cluster_size=512,refcount_bits=1', '8M');
      io(base, [`write -P 0x11 0 1900k`, `write -c -P 0x12 ${4 * M} 4k`]);
      create(top, 'cluster_size=64k', '8M', BASE);
      io(top, [`write -P 0x21 ${64 * K} 20k`, `write -P 0x22 ${300 * K + 512} 3k`, `write -z ${1 * M} 8k`, `write -c -P 0x23 ${4 * M} 64k`, `write -P 0x24 ${6 * M} 192k`, `write -P 0 ${7 * M} 64k`]);
    },
  },
  rc64: {
    // 64-bit refcounts with 512-byte clusters: a block covers 64 clusters (32 KiB) and the
    // one-cluster table 64 blocks (2 MiB): committing ~200 KiB past ~1.9 MiB of host file grows
    // the table (a new refcount area, header switch) and adds blocks.
    name: '512 B clusters, refcount_bits=64 base (refcount blocks and table growth during the commit)',
    baseCluster: 512,
    build(dir) {
      const base = join(dir, BASE);
      const top = join(dir, TOP);
      create(base, 'cluster_size=512,refcount_bits=64', '8M');
      io(base, [`write -P 0x11 0 1700k`, `write -c -P 0x12 ${4 * M} 4k`]);
      create(top, 'cluster_size=64k', '8M', BASE);
      io(top, [`write -P 0x21 ${64 * K} 20k`, `write -P 0x22 ${300 * K + 512} 3k`, `write -z ${1 * M} 8k`, `write -c -P 0x23 ${4 * M} 64k`, `write -P 0x24 ${6 * M} 192k`, `write -P 0 ${7 * M} 64k`]);
    },
  },
  grow: {
    // The base is 8 MiB (one L1 entry); the top 1.5 GiB with data past 1 GiB: the base's L1 table
    // grows (copy, switch, free) and its size field changes.
    name: 'base smaller than the top (L1 growth and resize of the base)',
    baseCluster: 64 * K,
    build(dir) {
      const base = join(dir, BASE);
      const top = join(dir, TOP);
      create(base, 'cluster_size=64k', '8M');
      io(base, [`write -P 0x11 0 1M`, `write -c -P 0x12 ${2 * M} 64k`]);
      create(top, 'cluster_size=64k', '1536M', BASE);
      io(top, [`write -P 0x21 ${512 * K} 128k`, `write -P 0x22 ${7 * M} 2M`, `write -P 0x23 ${1100 * M} 256k`, `write -z ${1200 * M} 1M`, `write -P 0x24 ${1536 * M - 3 * K} 3k`]);
    },
  },
  snapbitmap: {
    // The top has an internal snapshot and a persistent bitmap with dirty bits; 4 KiB clusters
    // (so the metadata the compaction moves is scattered): emptying it moves the L1 table,
    // refcount blocks and table, the snapshot table and the snapshot's L1, the bitmap directory,
    // table and data toward the front. Committing its 4 KiB clusters into the base's 64 KiB ones
    // needs copy-on-write in the base (a new cluster for part of a compressed one).
    name: 'top with an internal snapshot and a persistent bitmap (4 KiB clusters)',
    baseCluster: 64 * K,
    snapshotAndBitmap: true,
    build(dir) {
      const base = join(dir, BASE);
      const top = join(dir, TOP);
      create(base, 'cluster_size=64k', '8M');
      // ... and a zeroed cluster that keeps its allocation (zero flag + host offset): written in
      // place by the commit, which must make the data durable before clearing the flag.
      io(base, [...basePattern(64 * K), `write -P 0x15 ${6 * M + 512 * K} 64k`, `write -z ${6 * M + 512 * K} 64k`]);
      create(top, 'cluster_size=4k', '8M', BASE);
      io(top, [`write -P 0x31 ${64 * K} 256k`, `write -z ${1 * M} 64k`, `write -c -P 0x32 ${2 * M} 16k`]);
      must(qemuImg(['snapshot', '-c', 's1', top]), 'snapshot');
      must(qemuImg(['bitmap', '--add', '-g', '64k', top, 'b0']), 'bitmap');
      io(top, [`write -P 0x33 ${128 * K} 64k`, `write -P 0x34 ${4 * M} 300k`, `discard ${3 * M} 64k`, `write -P 0x35 ${5 * M + 512} 1k`, `write -P 0x36 ${3 * M + 520 * K} 4k`, `write -P 0x37 ${6 * M + 520 * K} 4k`]);
    },
  },
  zeroalloc: {
    // Only in-place writes into the base: a zeroed cluster that kept its allocation (stale data
    // underneath) receives 4 KiB of the top's. Nothing is allocated, so nothing but the declared
    // "L2 after a data flush" orders the data before the entry that clears the zero flag.
    name: 'in-place write into a zero-flagged allocated base cluster (stale data underneath)',
    baseCluster: 64 * K,
    build(dir) {
      const base = join(dir, BASE);
      const top = join(dir, TOP);
      create(base, 'cluster_size=64k', '8M');
      must(qemuIo(base, [`write -P 0x15 ${1 * M} 128k`, `write -z ${1 * M} 128k`, `write -P 0x16 0 64k`]), 'base');
      create(top, 'cluster_size=4k', '8M', BASE);
      io(top, [`write -P 0x51 ${1 * M + 8 * K} 4k`, `write -P 0x52 ${1 * M + 100 * K} 8k`, `write -P 0x53 ${8 * K} 4k`]);
    },
  },
  tables: {
    // Data in 36 different L2 tables' ranges of an empty base: the commit creates 36 L2 tables
    // (each written and flushed, then its L1 entry), the path a batch takes table by table. (36:
    // a batch writes its data in a few vectored writes, so the tables give the kill points.)
    name: 'a new L2 table in the base for each of 36 scattered writes',
    baseCluster: 64 * K,
    build(dir) {
      const base = join(dir, BASE);
      const top = join(dir, TOP);
      create(base, 'cluster_size=64k', '18G');
      io(base, [`write -P 0x17 0 64k`]);
      create(top, 'cluster_size=64k', '18G', BASE);
      io(top, Array.from({ length: 36 }, (_, i) => `write -P ${0x60 + i} ${i * 512 * M + (i % 3) * 64 * K} ${i % 2 ? 64 : 128}k`));
    },
  },
  top512: top512(64),
  top512rc16: top512(16),
};

// ---------------------------------------------------------------------------------------------
// qemu-img based views and checks

/** `qemu-img check` exit status, with its output for messages. */
export function qcheck(file: string): { status: number; out: string } {
  const r = qemuImg(['check', file]);
  return { status: r.status, out: `${r.stdout}${r.stderr}`.trim().split('\n').slice(0, 8).join(' | ') };
}

export function expectConsistent(file: string, label: string): void {
  const r = qcheck(file);
  expect([0, 3], `${label}: qemu-img check ${basename(file)} (leaks allowed): ${r.out}`).toContain(r.status);
}

export function expectClean(file: string, label: string): void {
  const r = qcheck(file);
  expect(r.status, `${label}: qemu-img check ${basename(file)} must be clean: ${r.out}`).toBe(0);
}

/** Guest views of two images (through their chains) are equal. */
export function sameView(a: string, b: string): boolean {
  const r = qemuImg(['compare', '-f', 'qcow2', '-F', 'qcow2', a, b]);
  if (r.status > 1) throw new Error(`qemu-img compare ${a} ${b} failed (${r.status}): ${r.stderr}`);
  return r.status === 0;
}

/** The image maps nothing itself (every guest range comes from the backing file). */
export function isEmptied(file: string): boolean {
  const r = qemuImg(['map', '--output=json', file]);
  must(r, 'map');
  // (Past the end of a shorter backing file, qemu-img map reports depth 0, not present.)
  return (JSON.parse(r.stdout) as Array<{ depth: number; present: boolean }>).every((e) => e.depth !== 0 || !e.present);
}

export function sha256(file: string): string {
  return createHash('sha256').update(readFileSync(file)).digest('hex');
}

/**
 * Snapshot `snap` of `top`'s guest view over `base` (the pristine base: a commit changes what the
 * snapshot reads from the backing file, never the snapshot itself), hashed.
 */
export function snapshotView(top: string, base: string, snap = 's1'): string {
  const d = mkdtempSync(join(tmpdir(), 'qcowkit-snapview-'));
  try {
    copyFileSync(top, join(d, TOP));
    copyFileSync(base, join(d, BASE));
    must(qemuImg(['convert', '-l', `snapshot.name=${snap}`, '-O', 'raw', join(d, TOP), join(d, 'snap.raw')]), `convert -l ${snap}`);
    return sha256(join(d, 'snap.raw'));
  } finally {
    rmSync(d, { recursive: true, force: true });
  }
}

/** Names, flags, granularity and bit contents of the persistent bitmaps, read from the file. */
export async function bitmapContents(file: string): Promise<string> {
  const img = await Qcow2Image.open(file, { forceShare: true });
  try {
    const cs = img.clusterSize;
    const h = createHash('sha256');
    for (const b of img.bitmaps) {
      const e = b as unknown as { name: string; flags: number; granularityBits: number; tableOffset: number; tableSize: number };
      h.update(`${e.name}/${e.flags}/${e.granularityBits}/${e.tableSize}:`);
      const table = new Uint8Array(e.tableSize * 8);
      await img.file.readAt(table, e.tableOffset);
      const v = new DataView(table.buffer);
      const cluster = new Uint8Array(cs);
      for (let j = 0; j < e.tableSize; j++) {
        const entry = v.getBigUint64(j * 8);
        const off = Number(entry & 0x00fffffffffffe00n);
        if (off) {
          await img.file.readAt(cluster, off);
          h.update(cluster);
        } else h.update(entry & 1n ? 'ones' : 'zeros');
      }
    }
    return h.digest('hex');
  } finally {
    await img.close();
  }
}

/** No lock (OFD or POSIX, any process) is held on the file: nothing of a failed run stays open. */
export function expectNoLocks(file: string, label: string): void {
  const ino = String(statSync(file).ino);
  const held = readFileSync('/proc/locks', 'utf8')
    .split('\n')
    .filter((l) => l.split(/\s+/).some((f) => /^[0-9a-f]+:[0-9a-f]+:\d+$/.test(f) && f.split(':')[2] === ino));
  expect(held, `${label}: locks left on ${basename(file)}`).toEqual([]);
}

// ---------------------------------------------------------------------------------------------
// metadata / data filters for injected I/O errors

/**
 * Data writes of a run are writes into host ranges that the complete run's image (the after-set)
 * maps as guest data; the after-set lies next to the run directories of the matrix (root/after).
 * Everything else written (L2 tables, refcount blocks and table, L1, header, snapshot and bitmap
 * metadata) is metadata.
 */
const dataRanges = new Map<string, Array<[number, number]>>();
function hostDataRanges(afterFile: string): Array<[number, number]> {
  let r = dataRanges.get(afterFile);
  if (!r) {
    const m = qemuImg(['map', '--output=json', afterFile]);
    must(m, 'map of the after-set');
    r = (JSON.parse(m.stdout) as Array<{ depth: number; data: boolean; offset?: number; length: number }>)
      .filter((e) => e.depth === 0 && e.data && e.offset !== undefined)
      .map((e) => [e.offset!, e.offset! + e.length] as [number, number]);
    dataRanges.set(afterFile, r);
  }
  return r;
}

function afterOf(path: string): string {
  return join(dirname(dirname(path)), 'after', basename(path));
}

export const isDataWrite: OpFilter = (path, offset, length, kind) => {
  if (kind !== 'write') return false;
  const after = afterOf(path);
  if (!existsSync(after)) return false;
  return hostDataRanges(after).some(([s, e]) => offset >= s && offset + length <= e);
};
export const isMetadataWrite: OpFilter = (path, offset, length, kind) => kind === 'write' && !isDataWrite(path, offset, length, kind);
/** Truncates and punches (make-empty gives space back with them). */
export const isSpaceOp: OpFilter = (_p, _o, _l, kind) => kind !== 'write';

// ---------------------------------------------------------------------------------------------
// the operations and their invariants

export type Op = 'commit' | 'commit-d' | 'make-empty';

export function runOp(op: Op, dir: string, openFile?: FileOpener): Promise<unknown> {
  const top = join(dir, TOP);
  if (op === 'make-empty') return makeEmpty(top, { openFile });
  return commit(top, { drop: op === 'commit-d', openFile });
}

export function cliArgs(op: Op, dir: string): string[] {
  const top = join(dir, TOP);
  if (op === 'make-empty') return ['make-empty', '-q', top];
  return op === 'commit-d' ? ['commit', '-q', '-d', top] : ['commit', '-q', top];
}

export interface Views {
  /** The pristine set's directory. */
  pristine: string;
  /** The directory of a complete, fault-free run (the after-set). */
  after: string;
  scenario: Scenario;
  /** Pristine snapshot view and bitmap contents of the top (snapshot scenarios). */
  snap?: string;
  bitmaps?: string;
}

export async function pristineViews(pristine: string, after: string, scenario: Scenario): Promise<Views> {
  const v: Views = { pristine, after, scenario };
  if (scenario.snapshotAndBitmap) {
    v.snap = snapshotView(join(pristine, TOP), join(pristine, BASE));
    v.bitmaps = await bitmapContents(join(pristine, TOP));
  }
  return v;
}

/** What must hold in any state an interrupted operation leaves (crash, kill, I/O error). */
export async function expectSafeState(op: Op, dir: string, v: Views, label: string): Promise<void> {
  const top = join(dir, TOP);
  const base = join(dir, BASE);
  expectConsistent(base, label);
  expectConsistent(top, label);
  if (op === 'make-empty') {
    expect(sha256(base), `${label}: make-empty never writes the backing file`).toBe(sha256(join(v.pristine, BASE)));
    const old = sameView(top, join(v.pristine, TOP));
    expect(old || sameView(top, base), `${label}: the top reads neither its old contents nor its backing file's`).toBe(true);
  } else {
    // The top's guest view never changes: whenever the top has lost data, the base holds it.
    expect(sameView(top, join(v.pristine, TOP)), `${label}: the guest view of the top changed`).toBe(true);
    if (op === 'commit-d') expect(sha256(top), `${label}: commit -d never writes the top`).toBe(sha256(join(v.pristine, TOP)));
    // The direct form: once the top maps nothing of its own, the base holds everything.
    else if (sha256(top) !== sha256(join(v.pristine, TOP)) && isEmptied(top)) expect(sameView(base, join(v.after, BASE)), `${label}: the top was emptied before the base held its data`).toBe(true);
  }
  if (v.scenario.snapshotAndBitmap) {
    expect(snapshotView(top, join(v.pristine, BASE)), `${label}: the snapshot's view changed`).toBe(v.snap);
    expect(await bitmapContents(top), `${label}: bitmap changed`).toBe(v.bitmaps);
  }
}

/** Runs the operation again on the state in `dir` (no faults): it completes, as the fault-free run. */
export async function expectRerunCompletes(op: Op, dir: string, v: Views, label: string, qemuReadWrite: boolean): Promise<void> {
  const top = join(dir, TOP);
  const base = join(dir, BASE);
  try {
    await runOp(op, dir);
  } catch (e) {
    throw new Error(`${label}: running ${op} again failed: ${String(e)}`, { cause: e });
  }
  await expectComplete(op, dir, v, `${label}, then run again`);
  if (!qemuReadWrite) return;
  // No lock outlives the (killed) operation: QEMU can open both images read-write.
  must(qemuIo(base, ['read 0 512']), `${label}: qemu-io opening the base read-write`);
  must(qemuIo(top, ['read 0 512']), `${label}: qemu-io opening the top read-write`);
}

/** The result of a complete run equals the fault-free run's. */
export async function expectComplete(op: Op, dir: string, v: Views, label: string): Promise<void> {
  const top = join(dir, TOP);
  const base = join(dir, BASE);
  expectClean(base, label);
  expectClean(top, label);
  // (commit: the base equal to the fault-free run's and the top emptied imply the top's view.)
  if (op === 'commit-d') expect(sameView(top, join(v.pristine, TOP)), `${label}: guest view of the top`).toBe(true);
  if (op === 'make-empty') {
    expect(isEmptied(top), `${label}: the top maps nothing`).toBe(true);
    expect(sameView(top, base), `${label}: the top reads its backing file`).toBe(true);
    expect(sha256(base), `${label}: the base untouched`).toBe(sha256(join(v.pristine, BASE)));
  } else {
    expect(sameView(base, join(v.after, BASE)), `${label}: the base equals the fault-free run's base`).toBe(true);
    if (op === 'commit') expect(isEmptied(top), `${label}: the top was emptied`).toBe(true);
    else expect(sha256(top), `${label}: the top untouched`).toBe(sha256(join(v.pristine, TOP)));
  }
  if (v.scenario.snapshotAndBitmap) {
    expect(snapshotView(top, join(v.pristine, BASE)), `${label}: the snapshot's view`).toBe(v.snap);
    expect(await bitmapContents(top), `${label}: bitmap contents`).toBe(v.bitmaps);
  }
}

/** Copies the pristine set of a matrix into `to` (for the views). */
export function copyDir(from: string, to: string): void {
  for (const f of readdirSync(from)) copyFileSync(join(from, f), join(to, f));
}
