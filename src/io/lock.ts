/**
 * QEMU-compatible image locking (file-posix): shared OFD locks on byte 100+i ("I hold permission
 * i") and 200+i ("I don't let others have permission i"); i = 0 consistent read, 1 write,
 * 3 resize. Conflicts are found the way QEMU's F_OFD_GETLK finds them, by reading /proc/locks
 * (an exclusive test lock would need a writable descriptor and would block QEMU's readers).
 */
import { readFile } from 'node:fs/promises';
import { QcowError } from '../errors.js';
import { tryLock } from './fsx.js';

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

// Opening a long backing chain checks every layer: one read of /proc/locks serves them all.
const SNAPSHOT_MS = 250;
let snapshot: { text: string; at: number } | undefined;

async function procLocks(fresh: boolean): Promise<string> {
  const now = performance.now();
  if (!fresh && snapshot && now - snapshot.at < SNAPSHOT_MS) return snapshot.text;
  let text = '';
  try {
    text = await readFile('/proc/locks', 'utf8');
  } catch {
    /* not Linux, or no procfs: nothing to learn */
  }
  snapshot = { text, at: now };
  return text;
}

/** Byte offsets other processes hold locks on for this inode (from /proc/locks). */
async function lockedBytes(dev: number, ino: number, fresh: boolean): Promise<Set<number>> {
  const text = await procLocks(fresh);
  const major = ((dev >>> 8) & 0xfff) | (Math.floor(dev / 2 ** 32) & ~0xfff);
  const minor = (dev & 0xff) | ((dev >>> 12) & 0xfff00);
  const id = `${major.toString(16).padStart(2, '0')}:${minor.toString(16).padStart(2, '0')}:${ino}`;
  const out = new Set<number>();
  for (const line of text.split('\n')) {
    if (line.includes('->')) continue; // a waiter, not a holder
    const f = line.trim().split(/\s+/);
    const at = f.indexOf(id);
    if (at < 0) continue;
    const start = Number(f[at + 1]);
    const endField = f[at + 2];
    const end = endField === 'EOF' ? 300 : Number(endField);
    for (let b = Math.max(start, 100); b <= Math.min(end, 299); b++) out.add(b);
  }
  return out;
}

/**
 * Takes the locks for `mode` on an open descriptor, refusing when another process holds a
 * conflicting one (as QEMU: "Failed to get shared "write" lock").
 */
export async function lockImage(fd: number, dev: number, ino: number, mode: LockMode, path: string): Promise<void> {
  if (mode === 'none') return;
  const plan = PLANS[mode];
  // A write lock never trusts a snapshot: locks this process released since (a read-only pass
  // just before, e.g. a dry run) would still be listed and look like another holder.
  const taken = await lockedBytes(dev, ino, mode === 'write');
  for (const p of plan.hold)
    if (taken.has(200 + p)) throw lockError(path, `Failed to get "${PERM_NAMES[p]}" lock`, mode);
  for (const p of plan.forbid)
    if (taken.has(100 + p)) throw lockError(path, `Failed to get shared "${PERM_NAMES[p]}" lock`, mode);
  for (const byte of [...plan.hold.map((p) => 100 + p), ...plan.forbid.map((p) => 200 + p)]) {
    if (!tryLock(fd, byte, 1, true)) throw lockError(path, `Failed to lock byte ${byte}`, mode);
  }
}

function lockError(path: string, what: string, mode: LockMode): QcowError {
  const hint = mode === 'write' ? 'stop it before changing the image' : 'use -U to read it anyway';
  return new QcowError('LOCKED', `${what}: is another process (QEMU, qemu-nbd) using the image? ${hint}`, path);
}
