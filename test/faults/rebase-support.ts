// Shared by the rebase fault suites (rebase-faults, rebase-kill, rebase-locks): the scenarios
// (chains built with qemu-img/qemu-io), the qemu-img based invariants, the "run it again and it
// completes" check, and the crash / I/O-error / SIGKILL drivers over test/helpers/fault-file.ts.
//
// Every scenario is a directory: top.qcow2 (the image rebased) and its backing files under fixed
// relative names (base.qcow2, mid.qcow2, new.qcow2), so a copy of the directory is a
// self-contained set. rebase writes only top.qcow2: every other file stays byte-identical.
//
// What must hold in any state an interrupted rebase leaves (crash, power loss, I/O error, kill):
// - `qemu-img check` of the top passes (leaked clusters allowed);
// - the header names the old backing file (and format) or the new one (none for a flatten),
//   never anything else, and the top's guest view through whatever chain it names is the view it
//   had before (the old view, which safe rebase keeps: the after-view reads the same);
// - every range the top itself maps differently from before (written data, zero clusters,
//   clusters rewritten compressed) is dirty in the enabled bitmap; a disabled one is unchanged;
// - the internal snapshot still reads its own clusters (its view with no backing file);
// - running the rebase again (no faults) completes: clean, the new name, the same view, and the
//   same top-only view as the fault-free run.
import { readFileSync, rmSync } from 'node:fs';
import { basename, join } from 'node:path';
import { expect } from 'vitest';
import { Qcow2Image, bitmapExtents, loadBitmap, rebase, type RebaseResult } from '../../src/index.js';
import { findBitmap } from '../../src/qcow2/bitmaps.js';
import type { FileOpener } from '../../src/io/file.js';
import { listFiles, runCrashMatrix, runKillMatrix, type CrashMode, type CrashState, type Errno, type OpFilter } from '../helpers/fault-file.js';
import { qemuImg, qemuIo } from '../helpers/qemu.js';
import { tmpDir } from '../helpers/tmp.js';
import { K, M, copyDir, expectClean, expectConsistent, expectNoLocks, must, sha256 } from './commit-support.js';

export { K, M };
export const TOP = 'top.qcow2';

function create(path: string, opts: string, size: string, backing?: string): void {
  const args = ['create', '-q', '-f', 'qcow2', '-o', opts];
  if (backing) args.push('-b', backing, '-F', 'qcow2');
  args.push(path, size);
  must(qemuImg(args), `create ${path}`);
}

function io(path: string, cmds: string[]): void {
  // -d unmap: discards reach the image (qemu-io ignores them otherwise).
  must(qemuIo(path, cmds, { extraArgs: ['-d', 'unmap'] }), `qemu-io ${path} ${cmds.join('; ')}`);
}

export interface RebaseScenario {
  name: string;
  /** Builds top.qcow2 and its backing files in dir. */
  build(dir: string): void;
  /** -b: the new backing name as stored ('' flattens). */
  backing: string;
  /** -c */
  compress?: boolean;
  /** The top has an enabled persistent bitmap b0 and a disabled one "off". */
  bitmaps?: boolean;
  /** The top has an internal snapshot s1. */
  snapshot?: boolean;
}

/**
 * base <- mid: the middle layer's own data over the base (whole and partial clusters, zero writes
 * and discards over base data, all-zero data, compressed clusters, data where the base has none,
 * data equal to the base's), for the drop and flatten scenarios.
 */
function baseAndMid(dir: string, midCluster = '64k'): void {
  create(join(dir, 'base.qcow2'), 'cluster_size=64k', '4M');
  io(join(dir, 'base.qcow2'), [`write -P 0x11 0 1M`, `write -c -P 0x12 1536k 64k`, `write -P 0x13 3M 128k`]);
  create(join(dir, 'mid.qcow2'), `cluster_size=${midCluster}`, '4M', 'base.qcow2');
  io(join(dir, 'mid.qcow2'), [
    `write -P 0x31 128k 192k`, // over base data
    `write -P 0x32 ${384 * K + 512} 3k`, // a partial cluster over base data
    `write -z 512k 128k`, // zeroes over base data
    `discard 704k 64k`, // a discard over base data: a zero flag
    `write -P 0 832k 64k`, // data that is all zeros over base data
    `write -P 0x39 1540k 4k`, // part of a compressed base cluster
    `write -c -P 0x33 2M 64k`, // compressed where the base has nothing
    `write -P 0x34 2304k 128k`, // where the base has nothing
    `write -P 0x11 0 64k`, // the same bytes as the base: compared, not written
    `write -P 0x35 3136k 64k`, // inside base data
  ]);
}

/** The top's own data beside and over what the rebase copies (those ranges are never written). */
function topOver(dir: string, backing: string): void {
  create(join(dir, TOP), 'cluster_size=64k', '4M', backing);
  io(join(dir, TOP), [`write -P 0x41 192k 64k`, `write -P 0x42 2368k 4k`, `write -z 576k 64k`, `write -c -P 0x43 3584k 64k`]);
}

/** An unrelated image with other data, shorter than the top (past its end: zeros). */
function unrelatedNew(dir: string): void {
  create(join(dir, 'new.qcow2'), 'cluster_size=64k', '3M');
  io(join(dir, 'new.qcow2'), [`write -P 0x11 0 256k`, `write -P 0x51 256k 512k`, `write -c -P 0x52 1M 128k`, `write -P 0x53 2052k 8k`, `write -P 0x13 2560k 64k`]);
}

/**
 * The top with extended L2 (2 KiB subclusters) over a middle layer of 4 KiB clusters: the
 * differences are subclusters, some beside subclusters the top has itself.
 */
function extl2(dir: string): void {
  baseAndMid(dir, '4k');
  io(join(dir, 'mid.qcow2'), [`write -P 0x36 1032k 4k`, `write -P 0x37 1124k 4k`, `write -P 0x38 3112k 12k`]);
  create(join(dir, TOP), 'cluster_size=64k,extended_l2=on', '4M', 'mid.qcow2');
  io(join(dir, TOP), [`write -P 0x44 1034k 2k`, `write -P 0x45 130k 2k`, `write -P 0x46 3114k 2k`, `write -z 2308k 2k`]);
}

export const SCENARIOS: Record<string, RebaseScenario> = {
  drop: {
    name: 'safe rebase dropping the middle layer (new backing inside the old chain)',
    backing: 'base.qcow2',
    build(dir) {
      baseAndMid(dir);
      topOver(dir, 'mid.qcow2');
    },
  },
  unrelated: {
    name: 'onto an unrelated, shorter image with other data (both chains compared)',
    backing: 'new.qcow2',
    build(dir) {
      baseAndMid(dir);
      topOver(dir, 'mid.qcow2');
      unrelatedNew(dir);
    },
  },
  flatten: {
    name: 'flatten (-b ""): the whole old view into the top',
    backing: '',
    build(dir) {
      baseAndMid(dir);
      topOver(dir, 'mid.qcow2');
    },
  },
  compressed: {
    name: '-c: dropping the middle layer, copied clusters compressed',
    backing: 'base.qcow2',
    compress: true,
    build(dir) {
      baseAndMid(dir);
      topOver(dir, 'mid.qcow2');
    },
  },
  extl2: {
    name: 'extended L2 top (2 KiB subclusters): subcluster differences beside its own subclusters',
    backing: 'base.qcow2',
    build: extl2,
  },
  extl2c: {
    // A cluster rewritten whole (its own subclusters too) must be dirty whole in b0, whose
    // 4 KiB granularity is finer than the cluster.
    name: 'extended L2 top with -c: partly differing clusters rewritten whole and compressed, a 4 KiB bitmap',
    backing: 'base.qcow2',
    compress: true,
    bitmaps: true,
    build(dir) {
      extl2(dir);
      const top = join(dir, TOP);
      must(qemuImg(['bitmap', '--add', '-g', '4k', top, 'b0']), 'bitmap b0');
      must(qemuImg(['bitmap', '--add', '-g', '4k', '--disable', top, 'off']), 'bitmap off');
      io(top, [`write -P 0x47 1044k 2k`]);
    },
  },
  snapbitmap: {
    // 4 KiB clusters in the top: marking the bitmap dirty stores new bitmap clusters and a new
    // table (then the directory), the copy allocates among the snapshot's clusters.
    name: 'top with an internal snapshot, an enabled and a disabled bitmap, onto an unrelated image',
    backing: 'new.qcow2',
    bitmaps: true,
    snapshot: true,
    build(dir) {
      baseAndMid(dir);
      unrelatedNew(dir);
      const top = join(dir, TOP);
      create(top, 'cluster_size=4k', '4M', 'mid.qcow2');
      io(top, [`write -P 0x61 192k 64k`, `write -c -P 0x62 3584k 16k`]);
      must(qemuImg(['snapshot', '-c', 's1', top]), 'snapshot');
      must(qemuImg(['bitmap', '--add', '-g', '64k', top, 'b0']), 'bitmap b0');
      must(qemuImg(['bitmap', '--add', '-g', '16k', top, 'off']), 'bitmap off');
      io(top, [`write -P 0x63 200k 8k`, `write -P 0x64 2368k 4k`, `discard 3584k 16k`, `write -P 0x65 520k 4k`]);
      must(qemuImg(['bitmap', '--disable', top, 'off']), 'disable off');
      io(top, [`write -P 0x66 3M 4k`]);
    },
  },
  /**
   * Scattered differences over a large disk: the middle layer has data (or zeroes) at 16 ranges
   * 256 MiB apart; the top (64 KiB clusters) needs a new L2 table for each (written, flushed,
   * then its L1 entry).
   */
  scattered: {
    name: 'scattered differences: a new L2 table in the top for each of 16 ranges',
    backing: 'base.qcow2',
    build(dir) {
      create(join(dir, 'base.qcow2'), 'cluster_size=64k', '4G');
      io(join(dir, 'base.qcow2'), [`write -P 0x11 0 64k`, `write -P 0x12 ${2 * 1024 * M} 1M`]);
      create(join(dir, 'mid.qcow2'), 'cluster_size=64k', '4G', 'base.qcow2');
      io(
        join(dir, 'mid.qcow2'),
        Array.from({ length: 16 }, (_, i) => (i % 5 === 4 ? `write -z ${i * 256 * M} 64k` : `write -P ${0x20 + i} ${i * 256 * M + (i % 3) * 64 * K} ${i % 2 ? 4 : 68}k`)),
      );
      create(join(dir, TOP), 'cluster_size=64k', '4G', 'mid.qcow2');
      io(join(dir, TOP), [`write -P 0x41 ${256 * M} 64k`]);
    },
  },
  /**
   * Many separate differences inside one L2 table of the top (4 KiB clusters): 70 runs of the
   * middle layer 4 KiB apart, each its own data write into a new cluster (the kill tests' bulk:
   * one kill point per run, few flushes).
   */
  runs: {
    name: 'runs: 70 separate differing clusters in one L2 table of the top',
    backing: 'base.qcow2',
    build(dir) {
      create(join(dir, 'base.qcow2'), 'cluster_size=64k', '8M');
      io(join(dir, 'base.qcow2'), [`write -P 0x11 0 64k`]);
      create(join(dir, 'mid.qcow2'), 'cluster_size=4k', '8M', 'base.qcow2');
      io(
        join(dir, 'mid.qcow2'),
        Array.from({ length: 70 }, (_, i) => (i % 15 === 7 ? `write -z ${i * 8}k 4k` : `write -P ${0x20 + (i % 64)} ${i * 8}k 4k`)),
      );
      create(join(dir, TOP), 'cluster_size=4k', '8M', 'mid.qcow2');
      io(join(dir, TOP), [`write -P 0x41 80k 4k`, `write -P 0x42 ${4 * M} 4k`]);
    },
  },
  /**
   * Differences in 60 different L2 tables' ranges of the top (4 KiB clusters: a table covers
   * 2 MiB), one already there: the rebase creates 59 tables (each written and flushed, then its
   * L1 entry), the path a batch takes table by table. (The kill tests' bulk: a batch writes its
   * data in a few vectored writes, so the tables give the kill points.)
   */
  tables: {
    name: 'tables: a new L2 table in the top for each of 59 differing ranges',
    backing: 'base.qcow2',
    build(dir) {
      create(join(dir, 'base.qcow2'), 'cluster_size=64k', '128M');
      io(join(dir, 'base.qcow2'), [`write -P 0x11 0 64k`, `write -P 0x12 ${64 * M} 64k`]);
      create(join(dir, 'mid.qcow2'), 'cluster_size=4k', '128M', 'base.qcow2');
      io(
        join(dir, 'mid.qcow2'),
        Array.from({ length: 60 }, (_, i) => (i === 32 ? `write -z ${64 * M} 8k` : `write -P ${0x20 + i} ${i * 2 * M + (i % 4) * 4 * K} ${i % 3 ? 4 : 12}k`)),
      );
      create(join(dir, TOP), 'cluster_size=4k', '128M', 'mid.qcow2');
      io(join(dir, TOP), [`write -P 0x41 ${2 * M} 4k`]);
    },
  },
};

// ---------------------------------------------------------------------------------------------
// views

/** A qemu `json:` filename opening a qcow2 image without its backing file. */
export function alone(file: string): string {
  return `json:${JSON.stringify({ driver: 'qcow2', backing: null, file: { driver: 'file', filename: file } })}`;
}

interface MapEntry {
  start: number;
  length: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

/** qemu-img map of the image alone (what it maps itself: subclusters with extended L2). */
function mapAlone(file: string): MapEntry[] {
  const r = qemuImg(['map', '--output=json', alone(file)]);
  must(r, `map ${file}`);
  return JSON.parse(r.stdout) as MapEntry[];
}

/** The raw guest view of `src` (a path, or a json: filename), with extra convert options. */
function rawView(src: string, dir: string, extra: string[] = []): Buffer {
  const out = join(dir, `view-${process.pid}.raw`);
  try {
    must(qemuImg(['convert', ...extra, '-O', 'raw', src, out]), `convert ${src}`);
    return readFileSync(out);
  } finally {
    rmSync(out, { force: true });
  }
}

/** `qemu-img compare` of two guest views (paths through their chains, or json: filenames). */
function sameView(a: string, b: string): boolean {
  const r = qemuImg(['compare', a, b]);
  if (r.status > 1) throw new Error(`qemu-img compare ${a} ${b} failed (${r.status}): ${r.stderr}`);
  return r.status === 0;
}

/**
 * Guest ranges where the image alone maps something other than it did: data or zero written
 * where it had nothing, a cluster rewritten (compressed: no host offset any more, or moved).
 */
export function changedRanges(before: MapEntry[], now: MapEntry[]): Array<{ start: number; length: number }> {
  const cuts = [...new Set([...before, ...now].flatMap((e) => [e.start, e.start + e.length]))].sort((a, b) => a - b);
  const at = (list: MapEntry[], pos: number) => list.find((e) => e.start <= pos && pos < e.start + e.length);
  const out: Array<{ start: number; length: number }> = [];
  for (let i = 0; i + 1 < cuts.length; i++) {
    const [s, e] = [cuts[i]!, cuts[i + 1]!];
    const a = at(before, s);
    const b = at(now, s);
    const host = (x: MapEntry | undefined) => (x?.offset === undefined ? -1 : x.offset + (s - x.start));
    if (!a || !b || a.present !== b.present || a.zero !== b.zero || a.data !== b.data || host(a) !== host(b)) {
      const last = out[out.length - 1];
      if (last && last.start + last.length === s) last.length += e - s;
      else out.push({ start: s, length: e - s });
    }
  }
  return out;
}

interface Header {
  backing: string | undefined;
  format: string | undefined;
}

function header(file: string): Header {
  const r = qemuImg(['info', '-U', '--output=json', file]);
  must(r, `info ${file}`);
  const j = JSON.parse(r.stdout) as { 'backing-filename'?: string; 'backing-filename-format'?: string };
  return { backing: j['backing-filename'], format: j['backing-filename-format'] };
}

/** Dirty extents of a bitmap, read with the library (the disabled one must not change). */
async function dirtyExtents(file: string, name: string): Promise<Array<{ start: number; length: number }>> {
  const img = await Qcow2Image.open(file, { forceShare: true });
  try {
    const bm = await loadBitmap(img, findBitmap(img, name));
    try {
      return bitmapExtents(bm, img.virtualSize).map((e) => ({ start: e.start, length: e.length }));
    } finally {
      bm.free();
    }
  } finally {
    await img.close();
  }
}

export interface Views {
  scenario: RebaseScenario;
  /** The pristine set (its top's view is the before-view, and the after-view). */
  pristine: string;
  /** A fault-free run's set. */
  after: string;
  /** The header before and after the rebase. */
  oldHeader: Header;
  newHeader: Header;
  /** The bytes of every file but the top. */
  others: Map<string, Buffer>;
  /** What the top maps itself, before. */
  mapBefore: MapEntry[];
  /** The snapshot's view without a backing file; the disabled bitmap's extents. */
  snapAlone?: Buffer;
  off?: string;
}

/** Views of the pristine set and of a fault-free run's result (`after`, a copy rebased). */
export async function makeViews(s: RebaseScenario, pristine: string, after: string, files: string[]): Promise<Views> {
  const top = join(pristine, TOP);
  const v: Views = {
    scenario: s,
    pristine,
    after,
    oldHeader: header(top),
    newHeader: s.backing === '' ? { backing: undefined, format: undefined } : { backing: s.backing, format: 'qcow2' },
    others: new Map(files.filter((f) => f !== TOP).map((f) => [f, readFileSync(join(pristine, f))])),
    mapBefore: mapAlone(top),
  };
  if (s.snapshot) v.snapAlone = rawView(alone(top), pristine, ['-l', 'snapshot.name=s1']);
  if (s.bitmaps) v.off = JSON.stringify(await dirtyExtents(top, 'off'));
  return v;
}

/** rebase writes nothing but the top. */
export function expectOthersUntouched(dir: string, v: Views, label: string): void {
  for (const [f, bytes] of v.others) expect(readFileSync(join(dir, f)).equals(bytes), `${label}: rebase wrote ${f}`).toBe(true);
}

/** What must hold in any state (see the file header). */
export async function expectSafeState(dir: string, v: Views, label: string): Promise<void> {
  const top = join(dir, TOP);
  expectOthersUntouched(dir, v, label);
  expectConsistent(top, label);
  const h = header(top);
  expect([v.oldHeader, v.newHeader].map((x) => JSON.stringify(x)), `${label}: the header names ${JSON.stringify(h)}`).toContain(JSON.stringify(h));
  expect(sameView(top, join(v.pristine, TOP)), `${label}: the guest view through ${h.backing ?? 'no backing file'} changed`).toBe(true);
  await expectBitmapsAndSnapshot(dir, v, label);
}

/** The scenario's snapshot (if `snapshot`) and bitmaps, if it has them. */
async function expectBitmapsAndSnapshot(dir: string, v: Views, label: string, snapshot = true): Promise<void> {
  const top = join(dir, TOP);
  if (snapshot && v.scenario.snapshot) expect(rawView(alone(top), dir, ['-l', 'snapshot.name=s1']).equals(v.snapAlone!), `${label}: the snapshot's own clusters`).toBe(true);
  if (!v.scenario.bitmaps) return;
  expect(JSON.stringify(await dirtyExtents(top, 'off')), `${label}: the disabled bitmap changed`).toBe(v.off);
  const dirty = await dirtyExtents(top, 'b0');
  for (const w of changedRanges(v.mapBefore, mapAlone(top))) {
    const covered = dirty.some((d) => d.start <= w.start && w.start + w.length <= d.start + d.length);
    expect(covered, `${label}: written range ${w.start}+${w.length} not dirty in b0 (dirty: ${JSON.stringify(dirty)})`).toBe(true);
  }
}

/**
 * The result of a complete run (fault-free, or run again after a fault). `thorough` (default):
 * also the top alone reads as after the fault-free run, and the snapshot's own clusters.
 */
export async function expectComplete(dir: string, v: Views, label: string, opts: { thorough?: boolean } = {}): Promise<void> {
  const top = join(dir, TOP);
  expectOthersUntouched(dir, v, label);
  expectClean(top, label);
  expect(header(top), `${label}: the header names the new backing file`).toEqual(v.newHeader);
  expect(sameView(top, join(v.pristine, TOP)), `${label}: the guest view changed`).toBe(true);
  if (dir !== v.after && (opts.thorough ?? true)) expect(sameView(alone(top), alone(join(v.after, TOP))), `${label}: the top alone reads as after a fault-free rebase`).toBe(true);
  await expectBitmapsAndSnapshot(dir, v, label, opts.thorough ?? true);
}

export function runRebase(s: RebaseScenario, dir: string, openFile?: FileOpener): Promise<RebaseResult> {
  return rebase(join(dir, TOP), { backing: s.backing, backingFormat: s.backing === '' ? undefined : 'qcow2', compress: s.compress, openFile });
}

export function cliArgs(s: RebaseScenario, dir: string): string[] {
  return ['rebase', '-q', '-b', s.backing, ...(s.backing === '' ? [] : ['-F', 'qcow2']), ...(s.compress ? ['-c'] : []), join(dir, TOP)];
}

/**
 * Runs the rebase again (no faults): it completes, as the fault-free run. `verified`: the tops
 * (sha256) of results already checked (many interrupted runs, run again, end byte-identical;
 * the checks depend on the bytes only, and the other files were checked untouched).
 */
export async function expectRerunCompletes(s: RebaseScenario, dir: string, v: Views, label: string, opts: { thorough?: boolean; verified?: Set<string> } = {}): Promise<void> {
  try {
    await runRebase(s, dir);
  } catch (e) {
    throw new Error(`${label}: running rebase again failed: ${String(e)}`, { cause: e });
  }
  const key = opts.verified && `${sha256(join(dir, TOP))}/${opts.thorough ?? true}`;
  if (key && opts.verified!.has(key)) return expectOthersUntouched(dir, v, label);
  await expectComplete(dir, v, `${label}, then run again`, opts);
  if (key) opts.verified!.add(key);
}

// ---------------------------------------------------------------------------------------------
// data / metadata filters for injected I/O errors

/**
 * Host ranges of the top that hold guest data (plain or compressed) after a fault-free rebase:
 * writes inside them are data writes, every other write (L2 tables, refcounts, L1, header,
 * bitmap clusters, tables and directory) is metadata. The rebase is deterministic, so the
 * fault-free run made on a copy allocates exactly what every run of the matrix does.
 */
async function hostDataRanges(top: string): Promise<Array<[number, number]>> {
  const img = await Qcow2Image.open(top, { forceShare: true });
  try {
    const r: Array<[number, number]> = [];
    for (const e of await img.status(0, img.virtualSize)) {
      if (!e.data) continue;
      if (e.compressed) r.push([e.compressed.offset, e.compressed.offset + e.compressed.length]);
      else if (e.offset !== undefined) r.push([e.offset, e.offset + e.length]);
    }
    r.sort((a, b) => a[0] - b[0]);
    const merged: Array<[number, number]> = [];
    for (const x of r) {
      const last = merged[merged.length - 1];
      if (last && last[1] >= x[0]) last[1] = Math.max(last[1], x[1]);
      else merged.push([...x]);
    }
    return merged;
  } finally {
    await img.close();
  }
}

// ---------------------------------------------------------------------------------------------
// the drivers

export interface MatrixPlan {
  /** Mutating ops to crash before (sample), or 'all'. Flushes: always every one. */
  ops: number | 'all';
  modes: CrashMode[];
  /** Injected errors on data writes / metadata writes: how many matching ops to fail (sample). */
  io?: Array<{ on: 'data' | 'metadata'; points: number | 'all'; errnos: Errno[] }>;
}

export interface MatrixTotals {
  flushes: number;
  ops: number;
  crashRuns: number;
  ioRuns: number;
  states: number;
  /** States byte-identical to one verified before (not checked again). */
  duplicates: number;
}

/** A scenario built once into a temp dir, a fault-free run of it, and the views. */
async function prepare(s: RebaseScenario): Promise<{ built: string; after: string; views: Views }> {
  const built = tmpDir('qcowkit-rebase-scenario-');
  s.build(built);
  const after = tmpDir('qcowkit-rebase-after-');
  copyDir(built, after);
  await runRebase(s, after);
  const views = await makeViews(s, built, after, listFiles(built));
  await expectComplete(after, views, `${s.name}: fault-free run`);
  return { built, after, views };
}

/** runCrashMatrix of rebase on one scenario (every flush, sampled ops), plus injected errors. */
export async function crashMatrix(s: RebaseScenario, plan: MatrixPlan): Promise<MatrixTotals> {
  const { built, after, views } = await prepare(s);
  const data = await hostDataRanges(join(after, TOP));
  const isData: OpFilter = (path, offset, length, kind) => kind === 'write' && basename(path) === TOP && data.some(([a, b]) => offset >= a && offset + length <= b);
  const isMetadata: OpFilter = (path, offset, length, kind) => kind === 'write' && !isData(path, offset, length, kind);
  const totals: MatrixTotals = { flushes: 0, ops: 0, crashRuns: 0, ioRuns: 0, states: 0, duplicates: 0 };
  // The checks depend on the top's bytes only (the rest never changes, checked every time before
  // the dedup): a state identical to one verified before is not checked again.
  const verified = new Set<string>();
  const rerun = new Set<string>();
  const check = async (st: CrashState) => {
    if (st.kind === 'complete') return expectComplete(st.dir, views, st.label);
    if (st.kind === 'io-error') {
      // Punching freed clusters is advisory: the rebase may then complete, as a fault-free one.
      if (st.error === undefined && st.journal.injected?.kind === 'punch') return expectComplete(st.dir, views, st.label);
      // The injected error itself reaches the caller (not a later, vaguer one).
      expect(st.error, `${st.label}: the rebase completed despite the failed ${st.journal.injected?.kind}`).toBeDefined();
      expect(st.error, st.label).toMatchObject({ code: 'IO', message: expect.stringMatching(/EIO: i\/o error|ENOSPC: no space left on device/) });
    }
    expectOthersUntouched(st.dir, views, st.label);
    const key = sha256(st.path(TOP));
    if (verified.has(key)) return void totals.duplicates++;
    await expectSafeState(st.dir, views, st.label);
    await expectRerunCompletes(s, st.dir, views, st.label, { verified: rerun });
    verified.add(key);
  };
  const operation = async ({ dir, openFile }: { dir: string; openFile: FileOpener }) => {
    try {
      return await runRebase(s, dir, openFile);
    } catch (e) {
      // A failed rebase leaves no file open, hence no lock (checked before the matrix closes
      // whatever the operation left open).
      for (const f of listFiles(dir)) expectNoLocks(join(dir, f), `rebase failed with ${String(e)}`);
      throw e;
    }
  };
  const setup = (dir: string) => copyDir(built, dir);
  const r = await runCrashMatrix({ name: `rebase: ${s.name}`, setup, operation, check, points: { ops: plan.ops, flushes: true, modes: plan.modes, end: true } });
  totals.flushes = r.counts.flushes;
  totals.ops = r.counts.ops;
  totals.crashRuns = r.crashRuns;
  totals.states = r.statesChecked;
  expect(r.crashRuns, 'a stop before and after every flush').toBeGreaterThanOrEqual(2 * r.counts.flushes);
  for (const io of plan.io ?? []) {
    const ri = await runCrashMatrix({
      name: `rebase: ${s.name}: errors on ${io.on} writes`,
      setup,
      operation,
      check,
      points: { ops: 1, flushes: false, modes: ['none'], end: false },
      ioErrors: { errnos: io.errnos, points: io.points, filter: io.on === 'data' ? isData : isMetadata },
    });
    expect(ri.ioRuns, `${io.on} writes: some ops matched`).toBeGreaterThan(0);
    totals.ioRuns += ri.ioRuns;
    totals.states += ri.statesChecked;
  }
  return totals;
}

/**
 * runKillMatrix: the CLI SIGKILLed right after its kth write for each k of `points` until it
 * completes. Returns the kill count. `qemuRw(k)`: also check that QEMU opens every file
 * read-write afterwards (no lock outlives the process).
 */
export async function killMatrix(s: RebaseScenario, points: number[], opts: { qemuRw?: (k: number) => boolean } = {}): Promise<{ killed: number; completedAt: number | undefined }> {
  let views: Views | undefined;
  const rerun = new Set<string>();
  const r = await runKillMatrix({
    name: `rebase (CLI): ${s.name}`,
    setup: async (dir) => {
      const p = await prepare(s);
      copyDir(p.built, dir);
      views = p.views;
    },
    args: ({ dir }) => cliArgs(s, dir),
    points,
    timeout: 120_000,
    // The next point's CLI runs while this one's state is checked.
    ahead: 1,
    check: async (st) => {
      if (!st.killed) {
        expect(st.result.status, `${st.label}: ${st.result.stderr}`).toBe(0);
        await expectComplete(st.dir, views!, st.label);
        return;
      }
      await expectSafeState(st.dir, views!, st.label);
      if (opts.qemuRw?.(st.k) ?? true) for (const f of st.files) must(qemuIo(join(st.dir, f), ['read 0 512']), `${st.label}: qemu-io opening ${f} read-write`);
      // (The top alone as after a fault-free run, and the snapshot after the rerun: checked by the
      // crash matrices; the safe-state checks above cover the snapshot per kill point.)
      await expectRerunCompletes(s, st.dir, views!, st.label, { thorough: false, verified: rerun });
    },
  });
  return { killed: r.killed.length, completedAt: r.completedAt };
}
