/**
 * QEMU-compatible image locking (file-posix): shared OFD locks on byte 100+i ("I hold permission
 * i") and 200+i ("I don't let others have permission i"); i = 0 consistent read, 1 write,
 * 3 resize. Conflicts are found as QEMU finds them, with F_OFD_GETLK (the optional native
 * addon); without it, by reading /proc/locks — whose first read in a process waits ~10 ms in the
 * kernel, a third of a short command's run.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { QcowError } from '../errors.js';
import { tryLock } from './fsx.js';
import { ofdLockedNative } from './native.js';

export type LockMode = 'none' | 'read' | 'read-shared' | 'write';

const PERM_READ = 0;
const PERM_WRITE = 1;
const PERM_RESIZE = 3;
const PERM_NAMES = ['consistent read', 'write', 'write unchanged', 'resize'];

interface LockPlan {
  hold: number[]; // permissions we take
  forbid: number[]; // permissions we don't share
}

const PLANS: Record<Exclude<LockMode, 'none'>, LockPlan> = {
  read: { hold: [PERM_READ], forbid: [PERM_WRITE, PERM_RESIZE] },
  'read-shared': { hold: [PERM_READ], forbid: [] },
  write: { hold: [PERM_READ, PERM_WRITE, PERM_RESIZE], forbid: [PERM_WRITE, PERM_RESIZE] },
};

// Opening a long backing chain checks every layer: one read (and parse) of /proc/locks serves
// them all. The lines are indexed by inode id once: machines running many QEMUs have thousands.
const SNAPSHOT_MS = 250;
let snapshot: { holders: Map<string, [number, number][]>; at: number } | undefined;
const INODE_ID = /^[0-9a-f]+:[0-9a-f]+:\d+$/;

function procLocks(fresh = false): Map<string, [number, number][]> {
  const now = Date.now(); // (performance.now() would load perf_hooks: ~1 ms of start-up)
  if (!fresh && snapshot && now - snapshot.at < SNAPSHOT_MS) return snapshot.holders;
  let text = '';
  try {
    text = readFileSync('/proc/locks', 'utf8'); // procfs: no I/O to wait for
  } catch {
    /* not Linux, or no procfs: nothing to learn */
  }
  const holders = new Map<string, [number, number][]>();
  for (const line of text.split('\n')) {
    if (line.includes('->')) continue; // a waiter, not a holder
    const f = line.trim().split(/\s+/);
    const at = f.findIndex((x) => INODE_ID.test(x));
    if (at < 0) continue;
    const endField = f[at + 2];
    const range: [number, number] = [Number(f[at + 1]), endField === 'EOF' ? 300 : Number(endField)];
    const list = holders.get(f[at]!);
    if (list) list.push(range);
    else holders.set(f[at]!, [range]);
  }
  snapshot = { holders, at: now };
  return holders;
}

/**
 * Forgets the snapshot: called when this process releases locks (a file closed), which the
 * snapshot would still list as taken (`check -r` right after a read-only open of the same image).
 */
export function forgetLockSnapshot(): void {
  snapshot = undefined;
}

/** The inode as /proc/locks names it (major:minor:inode, hex device numbers). */
function inodeId(dev: number, ino: number): string {
  const major = ((dev >>> 8) & 0xfff) | (Math.floor(dev / 2 ** 32) & ~0xfff);
  const minor = (dev & 0xff) | ((dev >>> 12) & 0xfff00);
  return `${major.toString(16).padStart(2, '0')}:${minor.toString(16).padStart(2, '0')}:${ino}`;
}

/**
 * Processes holding OFD locks on the inode: /proc/locks shows no PID for OFD locks, but each
 * process's /proc/PID/fdinfo/FD lists the locks of that descriptor. Only read on a conflict.
 */
function lockHolders(id: string): string[] {
  const out: string[] = [];
  let pids: string[] = [];
  try {
    pids = readdirSync('/proc').filter((p) => /^\d+$/.test(p) && Number(p) !== process.pid);
  } catch {
    return out;
  }
  for (const pid of pids) {
    let fds: string[];
    try {
      fds = readdirSync(`/proc/${pid}/fdinfo`);
    } catch {
      continue;
    }
    for (const fd of fds) {
      let text = '';
      try {
        text = readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8');
      } catch {
        continue;
      }
      if (!text.includes(` ${id} `)) continue;
      let comm = '?';
      try {
        comm = readFileSync(`/proc/${pid}/comm`, 'utf8').trim();
      } catch {
        /* gone meanwhile */
      }
      out.push(`PID ${pid} (${comm})`);
      break;
    }
  }
  return out;
}

/**
 * Which of `bytes` other open file descriptions hold locks on: asked of the kernel per byte
 * (F_OFD_GETLK), null when that can't be done here.
 */
function lockedBytesGetlk(fd: number, bytes: number[]): Set<number> | null {
  const out = new Set<number>();
  for (const b of bytes) {
    const locked = ofdLockedNative(fd, b);
    if (locked === null) return null;
    if (locked) out.add(b);
  }
  return out;
}

/** Byte offsets other processes hold locks on for this inode (from /proc/locks). */
function lockedBytes(dev: number, ino: number, fresh = false): Set<number> {
  const id = inodeId(dev, ino);
  const out = new Set<number>();
  for (const [start, end] of procLocks(fresh).get(id) ?? []) {
    for (let b = Math.max(start, 100); b <= Math.min(end, 299); b++) out.add(b);
  }
  return out;
}

/**
 * Takes the locks for `mode` on an open descriptor, refusing when another process holds a
 * conflicting one (as QEMU: "Failed to get shared "write" lock").
 */
export async function lockImage(fd: number, dev: number, ino: number, mode: LockMode, path: string, forWrite = mode === 'write'): Promise<void> {
  if (mode === 'none') return;
  const plan = PLANS[mode];
  const conflicts = (t: Set<number>) => plan.hold.some((p) => t.has(200 + p)) || plan.forbid.some((p) => t.has(100 + p));
  let taken = lockedBytesGetlk(fd, [...plan.hold.map((p) => 200 + p), ...plan.forbid.map((p) => 100 + p)]);
  if (!taken) {
    taken = lockedBytes(dev, ino);
    // A remembered /proc/locks may name an inode number since freed and reused, or locks this
    // process has released: look again before calling anything a conflict.
    if (conflicts(taken)) taken = lockedBytes(dev, ino, true);
  }
  const conflict = (what: string) => lockError(path, what, forWrite, lockHolders(inodeId(dev, ino)));
  for (const p of plan.hold) if (taken.has(200 + p)) throw conflict(`Failed to get "${PERM_NAMES[p]}" lock`);
  for (const p of plan.forbid) if (taken.has(100 + p)) throw conflict(`Failed to get shared "${PERM_NAMES[p]}" lock`);
  for (const byte of [...plan.hold.map((p) => 100 + p), ...plan.forbid.map((p) => 200 + p)]) {
    if (!tryLock(fd, byte, 1, true)) throw conflict(`Failed to lock byte ${byte}`);
  }
}

function lockError(path: string, what: string, forWrite: boolean, holders: string[]): QcowError {
  const hint = forWrite ? 'stop it before changing the image' : 'use -U to read it anyway';
  const who = holders.length ? `the image is in use by ${holders.join(', ')}` : 'is another process (QEMU, qemu-nbd) using the image?';
  return new QcowError('LOCKED', `${what}: ${who}; ${hint}`, path);
}
