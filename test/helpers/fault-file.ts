/**
 * The fault-injecting, journaling file every write-path test uses (commit, make-empty, rebase,
 * bitmaps, check -r). Crashes, power losses, I/O errors and SIGKILLs, all from one place.
 *
 * ## FaultJournal: one journal for every file an operation opens
 *
 *   const j = new FaultJournal(crashAtWrite(7));          // or none(), crashAtOp(n), crashAtFlush(k),
 *   await commit(top, { openFile: j.opener() });          //   crashAfterFlush(k), failAt(n, 'EIO' | 'ENOSPC', filter?)
 *   await j.closeAll();                                   // files the crashed operation left open
 *   j.crashStates(new Map([[top, topCopy], [base, baseCopy]]), j.end, 'none');
 *
 * - `j.opener()` is a `FileOpener`: opens the real file with `openImageFile` and wraps it. An
 *   operation that takes an already open file instead uses `j.wrap(await openImageFile(...))`.
 * - Every write (data copied), truncate, punchHole and flush of a writable file is appended to
 *   `j.entries` when it completes, in completion order; `entry.index` is its position. Numbering
 *   is GLOBAL across files: `entry.write` counts writes (1-based), `entry.op` counts mutating ops
 *   (write, truncate, punch), `entry.flush` counts flushes. `j.counts` = { writes, ops, flushes }.
 *   Paths are resolved (realpath at open), so two handles on one file share one durability state.
 * - Plans (`FaultPlan`), counted globally over all files of the journal:
 *     none()                    just record (the counting dry run: read `j.counts` afterwards)
 *     crashAtWrite(n)           throws a `Crash` instead of performing the nth write
 *     crashAtOp(n)              the same at the nth mutating op (write, truncate or punch)
 *     crashAtFlush(n)           throws a `Crash` instead of performing the nth flush
 *     crashAfterFlush(n)        the nth flush completes, then it throws a `Crash`
 *     failAt(n, errno, filter?) the nth mutating op for which filter(path, offset, length, kind)
 *                               holds (default: every op) fails, once, with QcowError('IO',
 *                               '<what> error at offset N: EIO: i/o error' / 'ENOSPC: no space
 *                               left on device') exactly as a failed syscall would; later ops go
 *                               on. For a truncate, offset = the new length and length = 0.
 *   After a crash the journal is dead: every later write/truncate/punch/flush on any of its files
 *   throws the Crash again (reads still work; close works). `isCrash(e)` finds a Crash through
 *   `cause` chains; `j.crashed` / `j.injected` tell whether the planned fault fired.
 * - Points: a point is a prefix length of `j.entries` (the ops "issued before the power went").
 *   `j.end` (everything recorded), `j.pointAfterFlush(k)`, `j.pointBeforeWrite(n)`.
 * - `j.crashStates(originals, point = j.end, mode = 'none')` REWRITES each live file (the keys of
 *   `originals`; values are pristine copies, or null for a file the operation created) into what
 *   a power loss at `point` could leave: start from the pristine copy, apply every op made durable
 *   by that file's last flush before `point` (fdatasync semantics: a flush covers that file's ops
 *   completed before the flush was issued), then of the file's not-yet-durable ops: 'none', 'all'
 *   (= process death, page cache survives), 'latest' (only the file's newest one: the adversary
 *   for "pointer written before what it points to was flushed") or `{ random: seed, p? }` (each
 *   kept with probability p, default 0.5, test/helpers/prng.ts). Ops are applied in completion
 *   order; a punch writes zeros inside the current size (keeps the size); a truncate sets the
 *   size. Flushes of read-only files are not recorded. Throws if the journal touched a file
 *   missing from `originals`. Returns per-file counts { path, durable, kept, dropped }.
 *
 * ## runCrashMatrix: the driver (knows nothing about the operation)
 *
 *   const report = await runCrashMatrix({
 *     setup: (dir) => { ...build the pristine images in dir... },   // once; every file in dir is
 *                                                                     // restored for each state
 *     operation: ({ path, openFile }) => commit(path('top.qcow2'), { openFile }),
 *     check: async (s) => { ...invariant on s.path('top.qcow2'), s.pristine(...), s.after(...) },
 *     points: { ops: 24, flushes: true, modes: ['none', 'all', 'latest', { random: 1 }], end: true },
 *     ioErrors: { errnos: ['EIO', 'ENOSPC'], points: 8, filter },      // or omit
 *   });
 *
 *   1. setup(pristineDir) builds the set once (every regular file under dir belongs to it).
 *   2. A dry run (plan none) on a copy counts writes, ops and flushes (`report.counts`); its
 *      result is kept as the after-set (`s.after(rel)`) and checked as kind 'complete'.
 *   3. `end` (default true): power loss right after the operation returned (modes but 'all').
 *   4. For every flush k: crashAtFlush(k) and crashAfterFlush(k) (`flushes`, default true); for a
 *      deterministic sample of `ops` mutating ops (default 24, evenly spread, first and last
 *      included; 'all' = every one): crashAtOp(n). Each run gets a fresh copy of the set; the
 *      operation must end with the Crash (thrown, or as a `cause`), else the matrix fails. For
 *      each of `modes` (default ['none', 'all', 'latest', { random: 1 }]) the state is written in
 *      place (crashStates) and handed to `check` (kind 'crash').
 *   5. `ioErrors` (optional): failAt(n, errno, filter) for a sample (default 16) of the ops the
 *      filter matches in the dry run, e.g. metadata only: (p, off, len) => len < clusterSize;
 *      files as the failed operation left them (kind 'io-error'; `s.error` = what it threw,
 *      undefined if it completed anyway).
 * `check` throws (a failed `expect`) to fail the matrix; put `s.label` (point and mode) in its
 * messages. The operation must be deterministic (same ops for the same input). Returns
 * { counts, crashRuns, ioRuns, statesChecked }. `operation` gets { dir, path(rel), openFile,
 * journal }; `check` gets a CrashState { kind, label, plan, mode, dir, path(rel), pristine(rel),
 * after(rel), files, error, result, journal } (both typed below).
 *
 * ## runKillMatrix: real process death
 *
 *   const r = await runKillMatrix({ setup, args: ({ path }) => ['commit', path('top.qcow2')],
 *                                   check: (s) => {...}, points: range(1, 300) });
 *
 * Runs `node bin/qcowkit.js ...args` (cwd = the work dir) on a fresh copy of the set with
 * QCOWKIT_FAULT_KILL_AFTER_WRITES=k (src/io/file.ts: the process SIGKILLs itself right after its
 * kth write, whatever file) for each k of `points` (default 1, 2, ... up to 1000); the files are
 * exactly as the kill left them (real page cache). `check(s)` gets s.killed === true, or false
 * for a run that completed first (then, by default, the matrix stops: `stopWhenComplete`).
 * Returns { killed: k[], completedAt }. `ahead: n` starts the runs of the next n points (fresh
 * copies) while a state is checked (the CLI then runs on another core; checks stay in order).
 * The CLI runs dist/: `npm run build` after changing src/.
 * KillState: { k, killed, label, result (stdout, stderr, status, signal), dir, path(rel),
 * pristine(rel), files }.
 */
import { cpSync, closeSync, copyFileSync, ftruncateSync, fstatSync, mkdirSync, openSync, readdirSync, realpathSync, rmSync, writeSync } from 'node:fs';
import { spawn } from 'node:child_process';
import { dirname, join, relative, resolve } from 'node:path';
import { fromSystemError } from '../../src/errors.js';
import { openImageFile, type FileOpener, type ImageFile, type OpenFileOptions, type WriteOptions } from '../../src/io/file.js';
import { CLI_BIN } from './cli.js';
import { prng } from './prng.js';
import type { RunResult } from './qemu.js';
import { tmpDir } from './tmp.js';

// ---------------------------------------------------------------------------------------------
// plans, crashes

export type Errno = 'EIO' | 'ENOSPC';
export type MutationKind = 'write' | 'truncate' | 'punch';
/** Chooses the ops a failAt plan counts: (path, offset, length, kind). */
export type OpFilter = (path: string, offset: number, length: number, kind: MutationKind) => boolean;

export type FaultPlan =
  | { kind: 'none' }
  | { kind: 'crashAtWrite'; n: number }
  | { kind: 'crashAtOp'; n: number }
  | { kind: 'crashAtFlush'; n: number }
  | { kind: 'crashAfterFlush'; n: number }
  | { kind: 'failAt'; n: number; errno: Errno; filter?: OpFilter | undefined };

export const none = (): FaultPlan => ({ kind: 'none' });
export const crashAtWrite = (n: number): FaultPlan => ({ kind: 'crashAtWrite', n: positive(n) });
export const crashAtOp = (n: number): FaultPlan => ({ kind: 'crashAtOp', n: positive(n) });
export const crashAtFlush = (n: number): FaultPlan => ({ kind: 'crashAtFlush', n: positive(n) });
export const crashAfterFlush = (n: number): FaultPlan => ({ kind: 'crashAfterFlush', n: positive(n) });
export const failAt = (n: number, errno: Errno, filter?: OpFilter): FaultPlan => ({ kind: 'failAt', n: positive(n), errno, filter });

function positive(n: number): number {
  if (!Number.isInteger(n) || n < 1) throw new Error(`fault point must be an integer >= 1, got ${n}`);
  return n;
}

export function describePlan(p: FaultPlan): string {
  switch (p.kind) {
    case 'none':
      return 'no fault';
    case 'crashAtWrite':
      return `crash before write ${p.n}`;
    case 'crashAtOp':
      return `crash before op ${p.n}`;
    case 'crashAtFlush':
      return `crash before flush ${p.n}`;
    case 'crashAfterFlush':
      return `crash after flush ${p.n}`;
    case 'failAt':
      return `${p.errno} at op ${p.n}${p.filter ? ' (filtered)' : ''}`;
  }
}

/** The simulated power loss / process death. Operations must let it propagate (or keep it as `cause`). */
export class Crash extends Error {
  constructor(readonly at: string) {
    super(`simulated crash: ${at}`);
    this.name = 'Crash';
  }
}

/** `e` is a Crash, or was caused (through `cause` chains) by one. */
export function isCrash(e: unknown): boolean {
  for (let x = e, depth = 0; x && depth < 32; x = (x as { cause?: unknown }).cause, depth++) if (x instanceof Crash) return true;
  return false;
}

const ERRNO: Record<Errno, { errno: number; text: string }> = {
  EIO: { errno: -5, text: 'i/o error' },
  ENOSPC: { errno: -28, text: 'no space left on device' },
};

/** What a failed syscall looks like to src/io/file.ts, converted as it converts it. */
function injectedError(errno: Errno, syscall: string, path: string, what: string): Error {
  const sys = Object.assign(new Error(`${errno}: ${ERRNO[errno].text}, ${syscall}`), { code: errno, errno: ERRNO[errno].errno, syscall });
  return fromSystemError(sys, path, what);
}

// ---------------------------------------------------------------------------------------------
// the journal

export interface JournalEntry {
  /** Position in `journal.entries` (completion order, global over files). */
  index: number;
  /** Resolved path of the file. */
  path: string;
  kind: MutationKind | 'flush';
  /** write/punch: where; truncate: the new length; flush: 0. */
  offset: number;
  /** write: data length; punch: hole length; truncate/flush: 0. */
  length: number;
  /** write: a copy of the data. */
  data?: Buffer;
  /** Global 1-based numbers: writes, mutating ops, flushes (whichever applies). */
  write?: number;
  op?: number;
  flush?: number;
  /** flush: entries with index < covers (of this file) are durable once this flush completed. */
  covers?: number;
}

export type CrashMode = 'none' | 'all' | 'latest' | { random: number; p?: number };

export function describeMode(m: CrashMode): string {
  if (m === 'none') return 'unflushed ops lost';
  if (m === 'all') return 'unflushed ops kept (process death)';
  if (m === 'latest') return "only each file's latest unflushed op kept";
  return `random unflushed ops kept (seed ${m.random})`;
}

export interface FileCrashState {
  path: string;
  durable: number;
  kept: number;
  dropped: number;
}

function resolvePath(p: string): string {
  try {
    return realpathSync(p);
  } catch {
    const abs = resolve(p);
    try {
      return join(realpathSync(dirname(abs)), abs.slice(dirname(abs).length + 1));
    } catch {
      return abs;
    }
  }
}

export class FaultJournal {
  readonly entries: JournalEntry[] = [];
  readonly counts = { writes: 0, ops: 0, flushes: 0 };
  /** Set when a crash plan fired. */
  crashed: Crash | undefined;
  /** Set when a failAt plan fired: what failed. */
  injected: { path: string; kind: MutationKind; offset: number; length: number; error: Error } | undefined;
  #matching = 0;
  readonly #open = new Set<JournalFile>();

  constructor(readonly plan: FaultPlan = none()) {}

  /** A FileOpener for the operation's `openFile` option. */
  opener(): FileOpener {
    return async (path: string, opts: OpenFileOptions) => this.wrap(await openImageFile(path, opts));
  }

  /** Wraps an already opened file. */
  wrap(file: ImageFile): ImageFile {
    const j = new JournalFile(file, resolvePath(file.path), this);
    this.#open.add(j);
    return j;
  }

  /** Closes every wrapped file still open (a crashed operation may leave some). */
  async closeAll(): Promise<void> {
    const files = [...this.#open];
    this.#open.clear();
    await Promise.all(files.map((f) => f.close().catch(() => {})));
  }

  /** Resolved paths of the files with recorded entries. */
  paths(): string[] {
    return [...new Set(this.entries.map((e) => e.path))];
  }

  get end(): number {
    return this.entries.length;
  }

  /** The point right after flush k completed. */
  pointAfterFlush(k: number): number {
    const e = this.entries.find((x) => x.flush === k);
    if (!e) throw new Error(`the journal has no flush ${k} (it has ${this.counts.flushes})`);
    return e.index + 1;
  }

  /** The point just before write n (the end when write n never happened). */
  pointBeforeWrite(n: number): number {
    const e = this.entries.find((x) => x.write === n);
    return e ? e.index : this.end;
  }

  /** Mutating ops recorded, optionally filtered (e.g. to count what a failAt filter matches). */
  mutations(filter?: OpFilter): JournalEntry[] {
    return this.entries.filter((e) => e.kind !== 'flush' && (!filter || filter(e.path, e.offset, e.length, e.kind)));
  }

  /**
   * Rewrites each live file (keys) as a power loss at `point` could leave it (see the file
   * header). `originals`: live path -> pristine copy, or null for a file that did not exist.
   */
  crashStates(originals: Map<string, string | null>, point: number = this.end, mode: CrashMode = 'none'): FileCrashState[] {
    if (point < 0 || point > this.end) throw new Error(`crash point ${point} outside 0..${this.end}`);
    const byPath = new Map<string, [string, string | null]>();
    for (const [live, orig] of originals) byPath.set(resolvePath(live), [live, orig]);
    for (const p of this.paths()) {
      if (this.entries.some((e) => e.path === p && e.index < point) && !byPath.has(p)) throw new Error(`crashStates: no original given for ${p}, which the operation modified`);
    }
    const rnd = typeof mode === 'object' ? prng(mode.random) : undefined;
    const keepP = typeof mode === 'object' ? (mode.p ?? 0.5) : 0;
    const out: FileCrashState[] = [];
    for (const [p, [live, orig]] of byPath) {
      const mine = this.entries.filter((e) => e.path === p && e.index < point);
      let durableBelow = 0;
      for (const e of mine) if (e.kind === 'flush') durableBelow = Math.max(durableBelow, e.covers!);
      if (orig === null) rmSync(live, { force: true });
      else copyFileSync(orig, live);
      const st: FileCrashState = { path: live, durable: 0, kept: 0, dropped: 0 };
      let latest = -1;
      for (const e of mine) if (e.kind !== 'flush' && e.index >= durableBelow) latest = e.index;
      const apply = mine.filter((e) => {
        if (e.kind === 'flush') return false;
        if (e.index < durableBelow) return (st.durable++, true);
        const keep = mode === 'all' || (mode === 'latest' && e.index === latest) || (rnd !== undefined && rnd() < keepP);
        if (keep) st.kept++;
        else st.dropped++;
        return keep;
      });
      if (orig === null && apply.length === 0) {
        out.push(st);
        continue;
      }
      const fd = openSync(live, orig === null ? 'w' : 'r+');
      try {
        for (const e of apply) {
          if (e.kind === 'write') writeSync(fd, e.data!, 0, e.data!.length, e.offset);
          else if (e.kind === 'truncate') ftruncateSync(fd, e.offset);
          else {
            const size = fstatSync(fd).size;
            const len = Math.min(e.offset + e.length, size) - e.offset;
            if (len > 0) writeSync(fd, Buffer.alloc(len), 0, len, e.offset);
          }
        }
      } finally {
        closeSync(fd);
      }
      out.push(st);
    }
    return out;
  }

  // --- used by JournalFile ---

  /** Called before a mutating op is issued: counts it, and crashes or fails it per the plan. */
  beforeMutation(path: string, kind: MutationKind, offset: number, length: number, what: string, syscall: string): { write?: number; op: number } {
    if (this.crashed) throw new Crash(this.crashed.at);
    const op = this.counts.ops + 1;
    const write = kind === 'write' ? this.counts.writes + 1 : undefined;
    const p = this.plan;
    if ((p.kind === 'crashAtWrite' && write === p.n) || (p.kind === 'crashAtOp' && op === p.n)) {
      this.crashed = new Crash(describePlan(p));
      throw this.crashed;
    }
    if (p.kind === 'failAt' && !this.injected && (!p.filter || p.filter(path, offset, length, kind)) && ++this.#matching === p.n) {
      const error = injectedError(p.errno, syscall, path, what);
      this.injected = { path, kind, offset, length, error };
      throw error;
    }
    this.counts.ops = op;
    if (write !== undefined) this.counts.writes = write;
    return write !== undefined ? { write, op } : { op };
  }

  record(e: Omit<JournalEntry, 'index'>): void {
    this.entries.push({ ...e, index: this.entries.length });
  }

  /** Called before a flush of a writable file is issued: numbers it, crashes per the plan. */
  beforeFlush(): number {
    if (this.crashed) throw new Crash(this.crashed.at);
    const flush = this.counts.flushes + 1;
    if (this.plan.kind === 'crashAtFlush' && flush === this.plan.n) {
      this.crashed = new Crash(describePlan(this.plan));
      throw this.crashed;
    }
    return (this.counts.flushes = flush);
  }

  afterFlush(path: string, flush: number, covers: number): void {
    this.record({ path, kind: 'flush', offset: 0, length: 0, flush, covers });
    if (this.plan.kind === 'crashAfterFlush' && flush === this.plan.n) {
      this.crashed = new Crash(describePlan(this.plan));
      throw this.crashed;
    }
  }

  forget(f: JournalFile): void {
    this.#open.delete(f);
  }
}

class JournalFile implements ImageFile {
  constructor(
    private readonly inner: ImageFile,
    private readonly resolved: string,
    private readonly journal: FaultJournal,
  ) {}

  get path() {
    return this.inner.path;
  }
  get writable() {
    return this.inner.writable;
  }
  get fd() {
    return this.inner.fd;
  }
  size() {
    return this.inner.size();
  }
  allocatedBytes() {
    return this.inner.allocatedBytes();
  }
  readAt(b: Uint8Array, o: number) {
    return this.inner.readAt(b, o);
  }
  readv(b: readonly Uint8Array[], o: number, opts?: { inPool?: boolean }) {
    return this.inner.readv(b, o, opts);
  }
  dataExtents(s: number, e: number) {
    return this.inner.dataExtents(s, e);
  }
  async close() {
    this.journal.forget(this);
    await this.inner.close();
  }
  async writeAt(b: Uint8Array, o: number, opts?: WriteOptions) {
    const n = this.journal.beforeMutation(this.resolved, 'write', o, b.length, `write error at offset ${o}`, 'write');
    const data = Buffer.from(b); // copied before the await: the caller may reuse its buffer
    await this.inner.writeAt(b, o, opts);
    this.journal.record({ path: this.resolved, kind: 'write', offset: o, length: data.length, data, ...n });
  }
  /** One vectored write is one journal entry (one write), as it is one syscall. */
  async writev(bufs: readonly Uint8Array[], o: number, opts?: WriteOptions) {
    let length = 0;
    for (const b of bufs) length += b.length;
    const n = this.journal.beforeMutation(this.resolved, 'write', o, length, `write error at offset ${o}`, 'write');
    const data = Buffer.concat(bufs); // copied before the await, as writeAt does
    await this.inner.writev(bufs, o, opts);
    this.journal.record({ path: this.resolved, kind: 'write', offset: o, length, data, ...n });
  }
  async truncate(length: number) {
    const n = this.journal.beforeMutation(this.resolved, 'truncate', length, 0, 'truncate failed', 'ftruncate');
    await this.inner.truncate(length);
    this.journal.record({ path: this.resolved, kind: 'truncate', offset: length, length: 0, ...n });
  }
  async punchHole(offset: number, length: number) {
    const n = this.journal.beforeMutation(this.resolved, 'punch', offset, length, `punching a hole at ${offset} failed`, 'fallocate');
    await this.inner.punchHole(offset, length);
    this.journal.record({ path: this.resolved, kind: 'punch', offset, length, ...n });
  }
  async flush() {
    if (!this.inner.writable) return this.inner.flush();
    const n = this.journal.beforeFlush();
    const covers = this.journal.entries.length;
    await this.inner.flush();
    this.journal.afterFlush(this.resolved, n, covers);
  }
}

// ---------------------------------------------------------------------------------------------
// image sets

/** Regular files under dir, relative to it, sorted. */
export function listFiles(dir: string): string[] {
  const out: string[] = [];
  const walk = (d: string): void => {
    for (const n of readdirSync(d, { withFileTypes: true })) {
      const p = join(d, n.name);
      if (n.isDirectory()) walk(p);
      else if (n.isFile()) out.push(relative(dir, p));
    }
  };
  walk(dir);
  return out.sort();
}

function copySet(from: string, to: string): void {
  mkdirSync(to, { recursive: true });
  cpSync(from, to, { recursive: true });
}

/** 1..total if it has at most `max` elements, else `max` evenly spread points including 1 and total. */
export function samplePoints(total: number, max: number | 'all'): number[] {
  if (total <= 0) return [];
  if (max === 'all' || total <= max) return Array.from({ length: total }, (_, i) => i + 1);
  if (max <= 1) return [total];
  const s = new Set<number>();
  for (let i = 0; i < max; i++) s.add(1 + Math.round((i * (total - 1)) / (max - 1)));
  return [...s].sort((a, b) => a - b);
}

/** [from, from+1, ..., to] */
export function range(from: number, to: number): number[] {
  return Array.from({ length: Math.max(0, to - from + 1) }, (_, i) => from + i);
}

// ---------------------------------------------------------------------------------------------
// runCrashMatrix

export interface OperationContext {
  /** The work directory (a fresh copy of the pristine set). */
  dir: string;
  /** Absolute path of a file of the set, by its name relative to the set. */
  path(rel: string): string;
  /** Pass as the operation's `openFile`. */
  openFile: FileOpener;
  journal: FaultJournal;
}

export interface CrashState {
  kind: 'complete' | 'crash' | 'io-error';
  /** Which run, point and mode: put it in assertion messages. */
  label: string;
  plan: FaultPlan;
  mode?: CrashMode | undefined;
  /** The state's files live here, at the same relative names as in the pristine set. */
  dir: string;
  path(rel: string): string;
  /** The set before the operation (read-only). */
  pristine(rel: string): string;
  /** The set after a complete fault-free run (read-only). */
  after(rel: string): string;
  /** Names (relative) of the files of the set. */
  files: string[];
  /** io-error: what the operation threw (undefined: it completed anyway). complete: undefined. */
  error?: unknown;
  /** complete: what the operation returned. */
  result?: unknown;
  journal: FaultJournal;
}

export interface CrashMatrixOptions {
  /** Builds the pristine set in `dir` (called once); every regular file in dir belongs to the set. */
  setup(dir: string): unknown;
  operation(ctx: OperationContext): Promise<unknown>;
  /** The invariant: throw to fail. */
  check(state: CrashState): unknown;
  points?: {
    /** How many mutating ops to crash before (deterministic sample), or 'all'. Default 24. */
    ops?: number | 'all';
    /** Crash right before and right after every flush. Default true. */
    flushes?: boolean;
    /** Power-loss modes checked at each point. Default ['none', 'all', 'latest', { random: 1 }]. */
    modes?: CrashMode[];
    /** Also check power loss right after the operation returned (modes other than 'all'). Default true. */
    end?: boolean;
  };
  ioErrors?: {
    errnos?: Errno[];
    /** How many of the matching ops to fail (deterministic sample), or 'all'. Default 16. */
    points?: number | 'all';
    filter?: OpFilter;
  };
  /** A label prefix for the states. */
  name?: string;
}

export interface CrashMatrixReport {
  counts: { writes: number; ops: number; flushes: number };
  crashRuns: number;
  ioRuns: number;
  statesChecked: number;
}

const DEFAULT_MODES: CrashMode[] = ['none', 'all', 'latest', { random: 1 }];

export async function runCrashMatrix(o: CrashMatrixOptions): Promise<CrashMatrixReport> {
  const root = tmpDir('qcowkit-crash-matrix-');
  const pristineDir = join(root, 'pristine');
  const afterDir = join(root, 'after');
  mkdirSync(pristineDir);
  await o.setup(pristineDir);
  const files = listFiles(pristineDir);
  if (files.length === 0) throw new Error('runCrashMatrix: setup made no files');
  const prefix = o.name ? `${o.name}: ` : '';
  const modes = o.points?.modes ?? DEFAULT_MODES;
  const report: CrashMatrixReport = { counts: { writes: 0, ops: 0, flushes: 0 }, crashRuns: 0, ioRuns: 0, statesChecked: 0 };
  let runNo = 0;

  const run = async (plan: FaultPlan): Promise<{ dir: string; journal: FaultJournal; error: unknown; result: unknown; failed: boolean }> => {
    const dir = join(root, `run-${runNo++}`);
    copySet(pristineDir, dir);
    const journal = new FaultJournal(plan);
    const ctx: OperationContext = { dir, path: (rel) => join(dir, rel), openFile: journal.opener(), journal };
    let error: unknown;
    let result: unknown;
    let failed = false;
    try {
      result = await o.operation(ctx);
    } catch (e) {
      error = e;
      failed = true;
    } finally {
      await journal.closeAll();
    }
    return { dir, journal, error, result, failed };
  };
  const state = (dir: string, journal: FaultJournal, s: Pick<CrashState, 'kind' | 'label' | 'plan' | 'mode' | 'error' | 'result'>): CrashState => ({
    ...s,
    label: prefix + s.label,
    dir,
    path: (rel) => join(dir, rel),
    pristine: (rel) => join(pristineDir, rel),
    after: (rel) => join(afterDir, rel),
    files,
    journal,
  });
  const originals = (dir: string, journal: FaultJournal): Map<string, string | null> => {
    const m = new Map<string, string | null>(files.map((f) => [join(dir, f), join(pristineDir, f)]));
    const known = new Set([...m.keys()].map(resolvePath));
    for (const p of journal.paths()) if (!known.has(p)) m.set(p, null); // created by the operation
    return m;
  };
  const checkModes = async (dir: string, journal: FaultJournal, plan: FaultPlan, what: string, ms: CrashMode[]) => {
    const orig = originals(dir, journal);
    for (const mode of ms) {
      journal.crashStates(orig, journal.end, mode);
      await o.check(state(dir, journal, { kind: 'crash', label: `${what}, ${describeMode(mode)}`, plan, mode }));
      report.statesChecked++;
    }
  };

  // The dry run: counts, the after-set, the complete state.
  const dry = await run(none());
  if (dry.failed) throw new Error(`${prefix}the operation failed without faults: ${String(dry.error)}`, { cause: dry.error });
  report.counts = { ...dry.journal.counts };
  copySet(dry.dir, afterDir);
  await o.check(state(dry.dir, dry.journal, { kind: 'complete', label: 'complete run', plan: none(), result: dry.result }));
  report.statesChecked++;
  if (o.points?.end ?? true) {
    await checkModes(dry.dir, dry.journal, none(), 'power loss after the operation returned', modes.filter((m) => m !== 'all'));
  }
  rmSync(dry.dir, { recursive: true, force: true });

  const crashPlans: FaultPlan[] = [
    ...((o.points?.flushes ?? true) ? range(1, report.counts.flushes).flatMap((k) => [crashAtFlush(k), crashAfterFlush(k)]) : []),
    ...samplePoints(report.counts.ops, o.points?.ops ?? 24).map(crashAtOp),
  ];
  for (const plan of crashPlans) {
    const r = await run(plan);
    report.crashRuns++;
    if (!r.journal.crashed) throw new Error(`${prefix}${describePlan(plan)}: the crash point was never reached (the operation is not deterministic?)`);
    if (!r.failed || !isCrash(r.error))
      throw new Error(`${prefix}${describePlan(plan)}: the operation ${r.failed ? `threw ${String(r.error)} instead of the Crash` : 'completed after the crash'}; operations must let a Crash propagate (or keep it as the cause)`, { cause: r.error });
    await checkModes(r.dir, r.journal, plan, describePlan(plan), modes);
    rmSync(r.dir, { recursive: true, force: true });
  }

  if (o.ioErrors) {
    const filter = o.ioErrors.filter;
    const matching = dry.journal.mutations(filter).length;
    for (const n of samplePoints(matching, o.ioErrors.points ?? 16)) {
      for (const errno of o.ioErrors.errnos ?? ['EIO']) {
        const plan = failAt(n, errno, filter);
        const r = await run(plan);
        report.ioRuns++;
        if (!r.journal.injected) throw new Error(`${prefix}${describePlan(plan)}: the failing op was never reached (the operation is not deterministic?)`);
        await o.check(state(r.dir, r.journal, { kind: 'io-error', label: describePlan(plan), plan, error: r.failed ? r.error : undefined }));
        report.statesChecked++;
        rmSync(r.dir, { recursive: true, force: true });
      }
    }
  }
  return report;
}

// ---------------------------------------------------------------------------------------------
// runKillMatrix

export interface KillState {
  /** The kill point (QCOWKIT_FAULT_KILL_AFTER_WRITES). */
  k: number;
  /** true: the process died by SIGKILL; false: it finished first (see result.status). */
  killed: boolean;
  label: string;
  result: RunResult;
  dir: string;
  path(rel: string): string;
  pristine(rel: string): string;
  files: string[];
}

export interface KillMatrixOptions {
  setup(dir: string): unknown;
  /** CLI arguments (after `node bin/qcowkit.js`); runs with cwd = the work dir. */
  args(ctx: { dir: string; path(rel: string): string }): string[];
  check(state: KillState): unknown;
  /** Kill points; default 1, 2, ... 1000. */
  points?: Iterable<number>;
  /** Stop at the first run that completes without being killed. Default true. */
  stopWhenComplete?: boolean;
  env?: NodeJS.ProcessEnv;
  /** Per run, milliseconds; default 60 000. */
  timeout?: number;
  name?: string;
  /**
   * Runs of the next kill points started (each on its own fresh copy) while a state is checked,
   * so the CLI runs on another core meanwhile; default 0 (one run at a time). Checks stay in
   * order; runs started past the point that completes are discarded.
   */
  ahead?: number;
}

export interface KillMatrixReport {
  killed: number[];
  /** The first k at which the command completed, if any. */
  completedAt: number | undefined;
}

function runAsync(args: string[], cwd: string, env: NodeJS.ProcessEnv, timeout: number): Promise<RunResult> {
  return new Promise((done) => {
    const child = spawn(process.execPath, [CLI_BIN, ...args], { cwd, env: { ...process.env, LC_ALL: 'C', TZ: 'UTC', ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    let error: string | undefined;
    const timer = setTimeout(() => {
      error = `timed out after ${timeout} ms`;
      child.kill('SIGKILL');
    }, timeout);
    child.on('error', (e) => (error = e.message));
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      done({ stdout, stderr, status: typeof code === 'number' ? code : -1, signal: signal ?? null, ...(error ? { error } : {}) });
    });
  });
}

export async function runKillMatrix(o: KillMatrixOptions): Promise<KillMatrixReport> {
  const root = tmpDir('qcowkit-kill-matrix-');
  const pristineDir = join(root, 'pristine');
  mkdirSync(pristineDir);
  await o.setup(pristineDir);
  const files = listFiles(pristineDir);
  const prefix = o.name ? `${o.name}: ` : '';
  const report: KillMatrixReport = { killed: [], completedAt: undefined };
  const points = [...(o.points ?? range(1, 1000))];
  const runs = new Map<number, Promise<RunResult>>();
  const dirOf = (k: number) => join(root, `kill-${k}`);
  const start = (i: number) => {
    const k = points[i];
    if (k === undefined || runs.has(i)) return;
    positive(k);
    const dir = dirOf(k);
    copySet(pristineDir, dir);
    runs.set(i, runAsync(o.args({ dir, path: (rel: string) => join(dir, rel) }), dir, { ...o.env, QCOWKIT_FAULT_KILL_AFTER_WRITES: String(k) }, o.timeout ?? 60_000));
  };
  try {
    for (let i = 0; i < points.length; i++) {
      for (let j = i; j <= i + Math.max(0, o.ahead ?? 0); j++) start(j);
      const k = points[i]!;
      const dir = dirOf(k);
      const path = (rel: string) => join(dir, rel);
      const result = await runs.get(i)!;
      runs.delete(i);
      const killed = result.signal === 'SIGKILL';
      if (result.error) throw new Error(`${prefix}kill point ${k}: could not run the CLI: ${result.error}`);
      await o.check({ k, killed, label: `${prefix}${killed ? `SIGKILL after write ${k}` : `completed (kill point ${k} not reached)`}`, result, dir, path, pristine: (rel) => join(pristineDir, rel), files });
      rmSync(dir, { recursive: true, force: true });
      if (killed) report.killed.push(k);
      else {
        report.completedAt ??= k;
        if (o.stopWhenComplete ?? true) break;
      }
    }
  } finally {
    // Runs started ahead and not checked (past the completing point, or after a failed check).
    for (const [i, r] of runs) {
      await r;
      rmSync(dirOf(points[i]!), { recursive: true, force: true });
    }
  }
  return report;
}
