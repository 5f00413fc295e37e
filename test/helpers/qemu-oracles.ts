// Oracles built on qemu-img / qemu-nbd / nbdinfo for the write-path interop tests (commit,
// make-empty, ...). Everything here is synchronous, deterministic and throws a descriptive Error
// when a qemu tool fails unexpectedly. Temp files live in private mkdtemp dirs that are removed
// before the function returns.
//
//   guestDigest(path)                  sha256 of the guest view (sparse-aware, fast on big sparse images)
//   qemuImgInfo(path)                  qemu-img info --output=json
//   qemuCheck(path, {allowLeaks})      qemu-img check --output=json: status, parsed JSON, ok
//   qemuMap(path) / allocatedInTop()   qemu-img map --output=json; bytes with depth 0 && present
//   fileLengthAndDu(path)              st_size and st_blocks * 512
//   bitmapsOf(path) / snapshotsOf()    from qemu-img info
//   bitmapExtents(path, name)          bitmap contents via qemu-nbd -B NAME + nbdinfo --map
//   snapshotRestores(path, snap, dig)  copy, qemu-img snapshot -a, digest
//   qemuCompare(a, b)                  qemu-img compare status
//
// Making persistent bitmaps dirty (verified with qemu 7.2): plain qemu-io is enough. A read-write
// qemu-io session loads the image's persistent bitmaps, every write / write -z / discard it does
// sets bits in the enabled ("auto") ones at their granularity, and they are stored back on close
// (in_use cleared). `qemu-img bitmap --add [-g G] [--disable]` creates them; disabled bitmaps
// stay clean; `qemu-img bitmap --merge SRC -b OTHER_FILE DST_FILE DST` copies contents between
// files. No qemu-nbd/NBD write or convert trick is needed. qemu-img commit sets bits in the
// base's enabled bitmaps for everything it writes (checked by the bitmaps-base matrix case).
// Reading bitmap contents: `qemu-nbd -r -B NAME` exports qemu:dirty-bitmap:NAME, which
// `nbdinfo --map=qemu:dirty-bitmap:NAME` prints as "start length 1 dirty|0 clean" lines.
// Caveat: `qemu-img snapshot -a` refuses images with bitmaps ("Device has active dirty
// bitmaps"); snapshotRestores removes them from its scratch copy first.
import { createHash, randomBytes } from 'node:crypto';
import { closeSync, copyFileSync, existsSync, mkdtempSync, openSync, readdirSync, readFileSync, readSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { hasQemu, qemuImg, run, type RunResult } from './qemu.js';

const ORACLE_TIMEOUT = 60_000;

function fail(what: string, r: RunResult): never {
  throw new Error(`${what} failed (status ${r.status}${r.signal ? `, ${r.signal}` : ''}${r.error ? `, ${r.error}` : ''}):\n${r.stdout}${r.stderr}`.trimEnd());
}

function mustImg(args: string[], what = `qemu-img ${args.join(' ')}`, timeout = ORACLE_TIMEOUT): string {
  const r = qemuImg(args, { timeout });
  if (r.status !== 0) fail(what, r);
  return r.stdout;
}

function withTmp<T>(prefix: string, fn: (dir: string) => T): T {
  const d = mkdtempSync(join(tmpdir(), prefix));
  try {
    return fn(d);
  } finally {
    rmSync(d, { recursive: true, force: true });
  }
}

const fmtArgs = (format?: string): string[] => (format ? ['-f', format] : []);

// ---------------------------------------------------------------------------------------------
// info / map / check / compare

export interface ImgOptions {
  /** Image format (-f); probed by qemu-img when absent. */
  format?: string;
}

/** `qemu-img info --output=json [-U]` (first image only; `backingChain` returns the array). */
export function qemuImgInfo(path: string, opts: ImgOptions & { forceShare?: boolean } = {}): any {
  const out = mustImg(['info', '--output=json', ...fmtArgs(opts.format), ...(opts.forceShare ? ['-U'] : []), path]);
  return JSON.parse(out);
}

/** `qemu-img info --backing-chain --output=json`: one entry per layer, top first. */
export function qemuImgInfoChain(path: string, opts: ImgOptions = {}): any[] {
  return JSON.parse(mustImg(['info', '--output=json', '--backing-chain', ...fmtArgs(opts.format), path])) as any[];
}

export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

/** `qemu-img map --output=json` of the whole chain. */
export function qemuMap(path: string, opts: ImgOptions = {}): MapEntry[] {
  return JSON.parse(mustImg(['map', '--output=json', ...fmtArgs(opts.format), path])) as MapEntry[];
}

/** Guest bytes the top layer itself answers for (map entries with depth 0 and present). */
export function allocatedInTop(path: string, opts: ImgOptions = {}): number {
  return qemuMap(path, opts)
    .filter((e) => e.depth === 0 && e.present)
    .reduce((n, e) => n + e.length, 0);
}

/**
 * The top layer's own allocation as coalesced ranges (start, length, zero, data), host offsets
 * dropped: what "the top was not modified" compares.
 */
export function topAllocation(path: string, opts: ImgOptions = {}): Array<{ start: number; length: number; zero: boolean; data: boolean }> {
  const out: Array<{ start: number; length: number; zero: boolean; data: boolean }> = [];
  for (const e of qemuMap(path, opts)) {
    if (e.depth !== 0 || !e.present) continue;
    const last = out[out.length - 1];
    if (last && last.start + last.length === e.start && last.zero === e.zero && last.data === e.data) last.length += e.length;
    else out.push({ start: e.start, length: e.length, zero: e.zero, data: e.data });
  }
  return out;
}

export interface CheckResult {
  /** qemu-img check exit status: 0 clean, 2 corruptions, 3 leaks only, 63 no check (raw), 1 error. */
  status: number;
  /** Parsed --output=json (absent for raw / open failures). */
  json?: any;
  /** status 0, or 3 with allowLeaks, or 63 (format without checks, i.e. raw). */
  ok: boolean;
  /** One-line summary for assertion messages. */
  summary: string;
}

/** `qemu-img check --output=json`; never throws for a failing check (only for a missing tool). */
export function qemuCheck(path: string, opts: ImgOptions & { allowLeaks?: boolean } = {}): CheckResult {
  const r = qemuImg(['check', '--output=json', ...fmtArgs(opts.format), path], { timeout: ORACLE_TIMEOUT });
  if (r.status < 0) fail(`qemu-img check ${path}`, r);
  let json: any;
  try {
    json = r.stdout.trim() ? JSON.parse(r.stdout) : undefined;
  } catch {
    json = undefined;
  }
  const ok = r.status === 0 || r.status === 63 || (opts.allowLeaks === true && r.status === 3);
  const parts = json
    ? ['corruptions', 'leaks', 'check-errors', 'corruptions-fixed', 'leaks-fixed'].filter((k) => json[k]).map((k) => `${k}=${json[k]}`)
    : [];
  const summary = `qemu-img check ${basename(path)}: status ${r.status}${parts.length ? ` (${parts.join(', ')})` : ''}${r.stderr.trim() ? `: ${r.stderr.trim().split('\n')[0]}` : ''}`;
  return { status: r.status, json, ok, summary };
}

/** `qemu-img compare [-s] -f FA -F FB a b` exit status (0 identical, 1 different, 2+ errors) and output. */
export function qemuCompare(a: string, b: string, opts: { formatA?: string; formatB?: string; strict?: boolean } = {}): { status: number; output: string } {
  const args = ['compare'];
  if (opts.strict) args.push('-s');
  if (opts.formatA) args.push('-f', opts.formatA);
  if (opts.formatB) args.push('-F', opts.formatB);
  const r = qemuImg([...args, a, b], { timeout: ORACLE_TIMEOUT });
  if (r.status < 0) fail(`qemu-img compare ${a} ${b}`, r);
  return { status: r.status, output: (r.stdout + r.stderr).trim() };
}

// ---------------------------------------------------------------------------------------------
// guest digest

const BLOCK = 4096;
const SMALL_VIEW = 64 * 1024 * 1024;

/**
 * sha256 of the guest view of `path` (through its backing chain), canonical and sparse-aware:
 * `qemu-img convert -O raw` into a private temp file (sparse: zero runs stay holes), the data
 * extents of that file from `qemu-img map -f raw` (SEEK_DATA/SEEK_HOLE), then
 * sha256("size:N\n" + for every 4 KiB block that is not all zeros: u64le offset + bytes).
 * Two guest views get the same digest iff they have the same size and the same bytes, however
 * the raw copy was laid out. Views up to 64 MiB are read whole instead of mapped. A 2 GiB image
 * with a few MiB of data takes ~50 ms.
 * `size` overrides the virtual size (bytes beyond it are ignored, missing bytes read as zeros),
 * so images of different sizes can be compared on a common range.
 */
export function guestDigest(path: string, opts: ImgOptions & { size?: number; snapshot?: string } = {}): string {
  return withTmp('qcowkit-digest-', (d) => {
    const raw = join(d, 'view.raw');
    const args = ['convert', '-O', 'raw', ...fmtArgs(opts.format)];
    if (opts.snapshot) args.push('-l', `snapshot.name=${opts.snapshot}`);
    mustImg([...args, path, raw]);
    const rawSize = statSync(raw).size;
    const size = opts.size ?? rawSize;
    // Small views are read whole (holes read as zeros, cheaper than another qemu-img run); big
    // sparse ones only where `qemu-img map -f raw` (SEEK_DATA/SEEK_HOLE) finds data.
    const extents: Array<Pick<MapEntry, 'start' | 'length' | 'data'>> =
      rawSize <= SMALL_VIEW ? [{ start: 0, length: rawSize, data: true }] : (JSON.parse(mustImg(['map', '--output=json', '-f', 'raw', raw])) as MapEntry[]);
    const h = createHash('sha256').update(`size:${size}\n`);
    const buf = Buffer.alloc(1024 * 1024);
    const zero = Buffer.alloc(BLOCK);
    const off = Buffer.alloc(8);
    const fd = openSync(raw, 'r');
    try {
      for (const e of extents) {
        if (!e.data) continue;
        // whole blocks covering the extent (extents are 4 KiB aligned on ext4/xfs/tmpfs anyway)
        let pos = Math.floor(e.start / BLOCK) * BLOCK;
        const end = Math.min(e.start + e.length, size);
        while (pos < end) {
          const n = Math.min(buf.length, end - pos, rawSize - pos);
          if (n <= 0) break;
          const got = readSync(fd, buf, 0, n, pos);
          if (got !== n) throw new Error(`guestDigest: short read of ${raw} at ${pos}`);
          for (let i = 0; i < n; i += BLOCK) {
            const len = Math.min(BLOCK, n - i);
            const blk = buf.subarray(i, i + len);
            if (blk.equals(zero.subarray(0, len))) continue;
            off.writeBigUInt64LE(BigInt(pos + i));
            h.update(off).update(blk);
          }
          pos += n;
        }
      }
    } finally {
      closeSync(fd);
    }
    return h.digest('hex');
  });
}

// ---------------------------------------------------------------------------------------------
// sizes

export interface FileSizes {
  /** st_size */
  length: number;
  /** st_blocks * 512 (what du counts) */
  du: number;
}

export function fileLengthAndDu(path: string): FileSizes {
  const st = statSync(path);
  return { length: st.size, du: st.blocks * 512 };
}

// ---------------------------------------------------------------------------------------------
// bitmaps and snapshots (metadata)

export interface BitmapInfo {
  name: string;
  granularity: number;
  /** e.g. ["auto"], [] (disabled), ["in-use", "auto"] */
  flags: string[];
}

/** Persistent bitmaps of a qcow2 image (qemu-img info), sorted by name. */
export function bitmapsOf(path: string, opts: ImgOptions = {}): BitmapInfo[] {
  return bitmapsFromInfo(qemuImgInfo(path, opts));
}

/** Bitmaps (sorted by name, flags sorted) from a parsed `qemu-img info --output=json` entry. */
export function bitmapsFromInfo(info: any): BitmapInfo[] {
  const bms = (info?.['format-specific']?.data?.bitmaps ?? []) as BitmapInfo[];
  return bms.map((b) => ({ name: b.name, granularity: b.granularity, flags: [...b.flags].sort() })).sort((a, b) => (a.name < b.name ? -1 : 1));
}

export interface SnapshotInfo {
  id: string;
  name: string;
  'vm-state-size': number;
  'date-sec': number;
  'date-nsec': number;
  'vm-clock-sec': number;
  'vm-clock-nsec': number;
  icount?: number;
}

/** Internal snapshots (qemu-img info), in table order. */
export function snapshotsOf(path: string, opts: ImgOptions = {}): SnapshotInfo[] {
  return snapshotsFromInfo(qemuImgInfo(path, opts));
}

/** Snapshots from a parsed `qemu-img info --output=json` entry. */
export function snapshotsFromInfo(info: any): SnapshotInfo[] {
  return (info?.snapshots ?? []) as SnapshotInfo[];
}

// ---------------------------------------------------------------------------------------------
// bitmap contents through qemu-nbd + nbdinfo

export interface BitmapExtent {
  start: number;
  length: number;
  dirty: boolean;
}

let nbdCache: boolean | undefined;

/** qemu-nbd and nbdinfo are runnable (bitmapExtents needs both). */
export function hasNbdTools(): boolean {
  nbdCache ??=
    hasQemu() &&
    run('qemu-nbd', ['--version'], { timeout: 10_000 }).status === 0 &&
    run('nbdinfo', ['--version'], { timeout: 10_000 }).status === 0;
  return nbdCache;
}

// Live qemu-nbd servers started here: pid -> unique socket path (to recognise our own process).
const liveServers = new Map<number, string>();
let exitHookInstalled = false;

function pidIsOurs(pid: number, sock: string): boolean {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').includes(sock);
  } catch {
    return false; // gone
  }
}

function sleepMs(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

/** SIGTERM, wait up to `graceMs` for the process to go, then SIGKILL and wait again. */
function stopServer(pid: number, sock: string, graceMs = 5_000): void {
  for (const sig of ['SIGTERM', 'SIGKILL'] as const) {
    if (!pidIsOurs(pid, sock)) break;
    try {
      process.kill(pid, sig);
    } catch {
      break;
    }
    const until = Date.now() + graceMs;
    while (pidIsOurs(pid, sock) && Date.now() < until) sleepMs(10);
  }
  if (pidIsOurs(pid, sock)) throw new Error(`qemu-nbd (pid ${pid}, ${sock}) did not exit after SIGKILL`);
  liveServers.delete(pid);
}

/** Our qemu-nbd processes serving `sock`, found by their (unique) socket path in /proc. */
function serversOn(sock: string): number[] {
  const out: number[] = [];
  for (const p of readdirSafe('/proc')) {
    if (!/^\d+$/.test(p)) continue;
    const pid = Number(p);
    if (pid !== process.pid && pidIsOurs(pid, sock)) out.push(pid);
  }
  return out;
}

function readdirSafe(dir: string): string[] {
  try {
    return readdirSync(dir);
  } catch {
    return [];
  }
}

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.once('exit', () => {
    for (const [pid, sock] of liveServers) {
      if (pidIsOurs(pid, sock)) {
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          /* gone */
        }
      }
    }
  });
}

/** Number of qemu-nbd servers started by this process that are still alive (tests assert 0). */
export function liveNbdServers(): number {
  for (const [pid, sock] of [...liveServers]) if (!pidIsOurs(pid, sock)) liveServers.delete(pid);
  return liveServers.size;
}

/**
 * Runs `fn(uri)` with `qemu-nbd -r -f FMT [-B bitmap]... --fork` serving `path` on a unix socket
 * in a private temp dir. The server is always stopped (SIGTERM, then SIGKILL) and the dir removed,
 * whatever `fn` does; an exit hook kills it if the process dies first.
 */
export function withNbdServer<T>(path: string, opts: ImgOptions & { bitmaps?: string[]; timeoutMs?: number }, fn: (uri: string) => T): T {
  installExitHook();
  const d = mkdtempSync(join(tmpdir(), 'qcowkit-nbd-'));
  const sock = join(d, 'nbd.sock');
  const pidFile = join(d, 'nbd.pid');
  const timeout = opts.timeoutMs ?? 20_000;
  const pids = new Set<number>();
  const collect = (): void => {
    if (existsSync(pidFile)) {
      const pid = Number(readFileSync(pidFile, 'utf8').trim());
      if (Number.isInteger(pid) && pid > 0) pids.add(pid);
    }
    for (const pid of serversOn(sock)) pids.add(pid);
    for (const pid of pids) liveServers.set(pid, sock);
  };
  /** Stops every server started here; the first failure to stop one is returned, not thrown. */
  const cleanup = (): unknown => {
    collect();
    let err: unknown;
    for (const pid of pids) {
      try {
        stopServer(pid, sock);
      } catch (e) {
        err ??= e;
      }
    }
    rmSync(d, { recursive: true, force: true });
    return err;
  };
  let result: T;
  try {
    const args = ['-r', '-f', opts.format ?? 'qcow2', '-k', sock, '--fork', `--pid-file=${pidFile}`, '--persistent', '--shared=4'];
    for (const b of opts.bitmaps ?? []) args.push('-B', b);
    args.push(path);
    const r = run('qemu-nbd', args, { timeout });
    collect();
    if (r.status !== 0) fail(`qemu-nbd ${args.join(' ')}`, r);
    if (!existsSync(sock)) throw new Error(`qemu-nbd reported success but ${sock} does not exist`);
    result = fn(`nbd+unix:///?socket=${sock}`);
  } catch (e) {
    cleanup(); // the original error is what matters
    throw e;
  }
  const err = cleanup();
  if (err) throw err;
  return result;
}

/** Parses `nbdinfo --map=qemu:dirty-bitmap:NAME` text output into coalesced extents. */
export function parseNbdinfoMap(text: string): BitmapExtent[] {
  const out: BitmapExtent[] = [];
  for (const line of text.split('\n')) {
    if (!line.trim()) continue;
    const m = /^\s*(\d+)\s+(\d+)\s+(\d+)(?:\s+(.*))?$/.exec(line);
    if (!m) throw new Error(`nbdinfo --map: unexpected line ${JSON.stringify(line)}`);
    const start = Number(m[1]);
    const length = Number(m[2]);
    const dirty = (Number(m[3]) & 1) === 1;
    const last = out[out.length - 1];
    if (last && last.start + last.length !== start) throw new Error(`nbdinfo --map: gap/overlap before ${start}`);
    if (last && last.dirty === dirty) last.length += length;
    else out.push({ start, length, dirty });
  }
  return out;
}

/**
 * Contents of persistent bitmap `name` of `path` as coalesced [{start, length, dirty}] extents
 * covering the whole virtual disk (read-only qemu-nbd export with -B NAME, queried with
 * `nbdinfo --map=qemu:dirty-bitmap:NAME`). Works for enabled and disabled bitmaps.
 */
export function bitmapExtents(path: string, name: string, opts: ImgOptions & { timeoutMs?: number } = {}): BitmapExtent[] {
  return bitmapsExtents(path, [name], opts)[name]!;
}

/** bitmapExtents for several bitmaps through one qemu-nbd server. */
export function bitmapsExtents(path: string, names: readonly string[], opts: ImgOptions & { timeoutMs?: number } = {}): Record<string, BitmapExtent[]> {
  const out: Record<string, BitmapExtent[]> = {};
  if (names.length === 0) return out;
  const timeout = opts.timeoutMs ?? 20_000;
  withNbdServer(path, { ...opts, bitmaps: [...names] }, (uri) => {
    for (const n of names) {
      const r = run('nbdinfo', [`--map=qemu:dirty-bitmap:${n}`, uri], { timeout });
      if (r.status !== 0) fail(`nbdinfo --map=qemu:dirty-bitmap:${n} (${path})`, r);
      out[n] = parseNbdinfoMap(r.stdout);
    }
  });
  return out;
}

/** Total dirty bytes of a bitmap's extents. */
export const dirtyBytes = (ext: readonly BitmapExtent[]): number => ext.filter((e) => e.dirty).reduce((n, e) => n + e.length, 0);

// ---------------------------------------------------------------------------------------------
// snapshots

export interface SnapshotRestore {
  /** Digest of the guest view after `qemu-img snapshot -a` on a copy. */
  digest: string;
  /** digest === expectedDigest (true when none was given). */
  ok: boolean;
  /** The restored copy passed qemu-img check. */
  checkOk: boolean;
  check: string;
}

/**
 * Copies `path` next to itself (so relative backing names still resolve), applies snapshot
 * `snapName` to the copy with `qemu-img snapshot -a`, and digests the copy's guest view (then
 * removes it). `detachBacking` first makes the copy standalone (`qemu-img rebase -u -b ''`), so
 * the digest covers only what the snapshot itself stores: it does not change when the backing
 * file does (e.g. after a commit into it).
 */
export function snapshotRestores(path: string, snapName: string, expectedDigest?: string, opts: { detachBacking?: boolean } = {}): SnapshotRestore {
  const copy = join(dirname(path), `.snapcheck-${randomBytes(6).toString('hex')}-${basename(path)}`);
  try {
    copyFileSync(path, copy);
    if (opts.detachBacking) mustImg(['rebase', '-u', '-f', 'qcow2', '-b', '', copy]);
    // QEMU refuses to apply a snapshot while the image has (enabled) bitmaps ("Device has active
    // dirty bitmaps"): drop them from the scratch copy first.
    let r = qemuImg(['snapshot', '-a', snapName, copy], { timeout: ORACLE_TIMEOUT });
    if (r.status !== 0 && /dirty bitmaps/.test(r.stderr)) {
      for (const b of bitmapsOf(copy, { format: 'qcow2' })) mustImg(['bitmap', '--remove', '-f', 'qcow2', copy, b.name]);
      r = qemuImg(['snapshot', '-a', snapName, copy], { timeout: ORACLE_TIMEOUT });
    }
    if (r.status !== 0) fail(`qemu-img snapshot -a ${snapName} (copy of ${path})`, r);
    const c = qemuCheck(copy, { format: 'qcow2' });
    const digest = guestDigest(copy, { format: 'qcow2' });
    return { digest, ok: expectedDigest === undefined || digest === expectedDigest, checkOk: c.ok, check: c.summary };
  } finally {
    rmSync(copy, { force: true });
  }
}
