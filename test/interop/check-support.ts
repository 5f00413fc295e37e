// Shared by the check tests: a tiny independent qcow2 patcher (no qcowkit code, so the tests do
// not check the implementation with itself), corruption recipes, and helpers that run the same
// check through qcowkit and qemu-img.
import { closeSync, copyFileSync, fstatSync, openSync, readSync, writeSync } from 'node:fs';
import { basename } from 'node:path';
import { runCli } from '../helpers/cli.js';
import { qemuImg, type RunResult } from '../helpers/qemu.js';
import { prng } from '../helpers/prng.js';

export interface Geometry {
  version: number;
  cb: number;
  cs: number;
  l1Size: number;
  l1Offset: number;
  rtOffset: number;
  rtClusters: number;
  order: number;
  extended: boolean;
  size: number;
}

function readAt(fd: number, off: number, len: number): Buffer {
  const b = Buffer.alloc(len);
  readSync(fd, b, 0, len, off);
  return b;
}

export function withFile<T>(path: string, fn: (fd: number) => T): T {
  const fd = openSync(path, 'r+');
  try {
    return fn(fd);
  } finally {
    closeSync(fd);
  }
}

export function geometry(path: string): Geometry {
  return withFile(path, (fd) => {
    const h = readAt(fd, 0, 112);
    const version = h.readUInt32BE(4);
    const cb = h.readUInt32BE(20);
    return {
      version,
      cb,
      cs: 2 ** cb,
      l1Size: h.readUInt32BE(36),
      l1Offset: Number(h.readBigUInt64BE(40)),
      rtOffset: Number(h.readBigUInt64BE(48)),
      rtClusters: h.readUInt32BE(56),
      order: version === 3 ? h.readUInt32BE(96) : 4,
      extended: version === 3 && (h.readBigUInt64BE(72) & 16n) !== 0n,
      size: fstatSync(fd).size,
    };
  });
}

export const u64 = (path: string, off: number): bigint => withFile(path, (fd) => readAt(fd, off, 8).readBigUInt64BE(0));
export function setU64(path: string, off: number, v: bigint): void {
  withFile(path, (fd) => {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(BigInt.asUintN(64, v));
    writeSync(fd, b, 0, 8, off);
  });
}
export function setBytes(path: string, off: number, bytes: Buffer): void {
  withFile(path, (fd) => void writeSync(fd, bytes, 0, bytes.length, off));
}

/** Where cluster c's refcount lives: [byte offset, bit shift] or undefined when no block. */
function refcountSlot(path: string, g: Geometry, c: number): { at: number; bits: number; shift: number } | undefined {
  const bits = 2 ** g.order;
  const per = (g.cs * 8) / bits;
  const block = Number(u64(path, g.rtOffset + 8 * Math.floor(c / per)) & ~0x1ffn);
  if (!block) return undefined;
  const i = c % per;
  return { at: block + Math.floor((i * bits) / 8), bits, shift: (i * bits) % 8 };
}

export function getRefcount(path: string, c: number): number | undefined {
  const g = geometry(path);
  const s = refcountSlot(path, g, c);
  if (!s) return undefined;
  return withFile(path, (fd) => {
    const b = readAt(fd, s.at, Math.max(1, s.bits / 8));
    if (s.bits >= 8) return Number(BigInt(`0x${b.toString('hex')}`));
    return (b[0]! >> s.shift) & (2 ** s.bits - 1);
  });
}

export function setRefcount(path: string, c: number, v: number): boolean {
  const g = geometry(path);
  const s = refcountSlot(path, g, c);
  if (!s) return false;
  withFile(path, (fd) => {
    if (s.bits >= 8) {
      const b = Buffer.alloc(s.bits / 8);
      let x = BigInt(v);
      for (let i = b.length - 1; i >= 0; i--, x >>= 8n) b[i] = Number(x & 0xffn);
      writeSync(fd, b, 0, b.length, s.at);
    } else {
      const b = readAt(fd, s.at, 1);
      const mask = (2 ** s.bits - 1) << s.shift;
      b[0] = (b[0]! & ~mask) | ((v << s.shift) & mask);
      writeSync(fd, b, 0, 1, s.at);
    }
  });
  return true;
}

export interface L2Entry {
  table: number;
  index: number;
  /** Offset of the entry in the file. */
  at: number;
  value: bigint;
}

/** Every entry of every active L2 table. */
export function activeL2Entries(path: string): L2Entry[] {
  const g = geometry(path);
  const eb = g.extended ? 16 : 8;
  const out: L2Entry[] = [];
  withFile(path, (fd) => {
    const l1 = readAt(fd, g.l1Offset, g.l1Size * 8);
    for (let i = 0; i < g.l1Size; i++) {
      const t = Number(l1.readBigUInt64BE(i * 8) & 0x00fffffffffffe00n);
      if (!t) continue;
      const tb = readAt(fd, t, g.cs);
      for (let j = 0; j < g.cs / eb; j++) out.push({ table: t, index: j, at: t + j * eb, value: tb.readBigUInt64BE(j * eb) });
    }
  });
  return out;
}

export const COPIED = 1n << 63n;
export const COMPRESSED = 1n << 62n;
export const OFFSET_MASK = 0x00fffffffffffe00n;
const isData = (e: bigint) => e !== 0n && !(e & COMPRESSED) && (e & OFFSET_MASK) !== 0n;

export type Mutation =
  | 'refcount-up'
  | 'refcount-down'
  | 'refcount-zero'
  | 'copied-flip'
  | 'l1-copied'
  | 'l2-past-eof'
  | 'l2-unaligned'
  | 'zero-unaligned'
  | 'l2-reserved'
  | 'l1-reserved'
  | 'l1-past-eof'
  | 'refblock-on-data'
  | 'refblock-on-l2'
  | 'reftable-outside'
  | 'reftable-unaligned'
  | 'reftable-reserved'
  | 'l2-shared'
  | 'compressed-copied';

/**
 * Applies one corruption recipe (deterministic for a seed); returns false when the image has
 * nothing it applies to (e.g. no compressed cluster).
 */
export function mutate(path: string, kind: Mutation, seed = 1): boolean {
  const rnd = prng(seed);
  const g = geometry(path);
  const pick = <T>(xs: T[]): T | undefined => (xs.length ? xs[Math.floor(rnd() * xs.length)] : undefined);
  const clusters = Math.ceil(g.size / g.cs);
  const maxRc = 2 ** 2 ** g.order - 1;
  const inUse = () => {
    const out: number[] = [];
    for (let c = 1; c < clusters; c++) {
      const r = getRefcount(path, c);
      if (r !== undefined && r > 0) out.push(c);
    }
    return out;
  };
  switch (kind) {
    case 'refcount-up': {
      const c = pick(inUse().filter((x) => getRefcount(path, x)! < maxRc));
      return c !== undefined && setRefcount(path, c, getRefcount(path, c)! + 1);
    }
    case 'refcount-down': {
      const c = pick(inUse().filter((x) => getRefcount(path, x)! > 1));
      if (c === undefined) {
        // No shared cluster: make one look shared to qemu first? No — lower a count of 1 to 0.
        return false;
      }
      return setRefcount(path, c, getRefcount(path, c)! - 1);
    }
    case 'refcount-zero': {
      const c = pick(inUse());
      return c !== undefined && setRefcount(path, c, 0);
    }
    case 'copied-flip': {
      const e = pick(activeL2Entries(path).filter((x) => isData(x.value)));
      if (!e) return false;
      setU64(path, e.at, e.value ^ COPIED);
      return true;
    }
    case 'l1-copied': {
      for (let i = 0; i < g.l1Size; i++) {
        const v = u64(path, g.l1Offset + i * 8);
        if (v) {
          setU64(path, g.l1Offset + i * 8, v ^ COPIED);
          return true;
        }
      }
      return false;
    }
    case 'l2-past-eof': {
      const e = pick(activeL2Entries(path).filter((x) => isData(x.value)));
      if (!e) return false;
      setU64(path, e.at, (e.value & COPIED) | BigInt((clusters + 50) * g.cs));
      return true;
    }
    case 'l2-unaligned': {
      if (g.cs === 512) return false;
      const e = pick(activeL2Entries(path).filter((x) => isData(x.value) && !(x.value & 1n)));
      if (!e) return false;
      setU64(path, e.at, e.value | 0x200n);
      return true;
    }
    case 'zero-unaligned': {
      if (g.cs === 512 || g.version < 3) return false;
      const e = pick(activeL2Entries(path).filter((x) => isData(x.value)));
      if (!e) return false;
      if (g.extended) {
        setU64(path, e.at, e.value | 0x200n);
        setU64(path, e.at + 8, 0xffffffff00000000n); // all subclusters zero: no data
      } else {
        setU64(path, e.at, e.value | 0x201n);
      }
      return true;
    }
    case 'l2-reserved': {
      const e = pick(activeL2Entries(path).filter((x) => isData(x.value)));
      if (!e) return false;
      setU64(path, e.at, e.value | (1n << 57n));
      return true;
    }
    case 'compressed-copied': {
      const e = pick(activeL2Entries(path).filter((x) => (x.value & COMPRESSED) !== 0n));
      if (!e) return false;
      setU64(path, e.at, e.value | COPIED);
      return true;
    }
    case 'l1-reserved':
    case 'l1-past-eof': {
      for (let i = g.l1Size - 1; i >= 0; i--) {
        const v = u64(path, g.l1Offset + i * 8);
        if (!v) continue;
        setU64(path, g.l1Offset + i * 8, kind === 'l1-reserved' ? v | (1n << 60n) : (v & COPIED) | BigInt((clusters + 20) * g.cs));
        return true;
      }
      return false;
    }
    case 'refblock-on-data': {
      const e = pick(activeL2Entries(path).filter((x) => isData(x.value)));
      if (!e) return false;
      setU64(path, g.rtOffset, e.value & OFFSET_MASK);
      return true;
    }
    case 'refblock-on-l2': {
      const e = activeL2Entries(path)[0];
      if (!e) return false;
      setU64(path, g.rtOffset, BigInt(e.table));
      return true;
    }
    case 'reftable-outside':
      setU64(path, g.rtOffset, BigInt((clusters + 100) * g.cs));
      return true;
    case 'reftable-unaligned':
      if (g.cs === 512) return false;
      setU64(path, g.rtOffset, u64(path, g.rtOffset) | 0x200n);
      return true;
    case 'reftable-reserved':
      setU64(path, g.rtOffset, u64(path, g.rtOffset) | 1n);
      return true;
    case 'l2-shared': {
      const data = activeL2Entries(path).filter((x) => isData(x.value));
      if (data.length < 2) return false;
      const a = data[Math.floor(rnd() * data.length)]!;
      const b = data.filter((x) => x.at !== a.at)[Math.floor(rnd() * (data.length - 1))]!;
      setU64(path, b.at, a.value);
      return true;
    }
  }
}

/** Output of one tool, stderr normalised to qemu-img's prefix. */
export interface ToolRun {
  status: number;
  stdout: string;
  stderr: string;
}

/** `qcowkit check ARGS FILE` with the "qcowkit: FILE: " error prefix turned into "qemu-img: ". */
export function ourCheck(args: string[], file: string, opts: { env?: NodeJS.ProcessEnv; cwd?: string } = {}): ToolRun {
  const r = runCli(['check', ...args, file], { ...opts, timeout: 300_000 });
  return { status: r.status, stdout: r.stdout, stderr: normalise(r, file) };
}

export function qemuCheck(args: string[], file: string, opts: { cwd?: string } = {}): ToolRun {
  const r = qemuImg(['check', ...args, file], { ...opts, timeout: 300_000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

function normalise(r: RunResult, file: string): string {
  return r.stderr
    .split('\n')
    .map((l) => l.replace(`qcowkit: ${file}: `, 'qemu-img: ').replace(`qcowkit: ${basename(file)}: `, 'qemu-img: '))
    .join('\n');
}

export function copy(src: string, dst: string): string {
  copyFileSync(src, dst);
  return dst;
}

/**
 * The same as `ourCheck` but in-process through the library (what the CLI prints, without the
 * process start-up): for the big matrices.
 */
export async function ourCheckLib(args: string[], file: string): Promise<ToolRun> {
  const { check, checkExitCode, NO_CHECKS } = await import('../../src/ops/check.js');
  const { human, repairedText } = await import('../../src/cli/commands/check.js');
  const { QcowError } = await import('../../src/errors.js');
  const json = args.includes('--output') && args[args.indexOf('--output') + 1] === 'json';
  const r = args.indexOf('-r');
  const repair = r >= 0 ? (args[r + 1] as 'leaks' | 'all') : undefined;
  let stdout = '';
  let stderr = '';
  let status: number;
  try {
    const res = await check(file, {
      repair,
      onMessage: (l) => (stderr += `${l}\n`),
      onRepaired: ({ leaks, corruptions }) => {
        if (!json) stdout += repairedText(leaks, corruptions);
      },
    });
    stdout += json ? `${JSON.stringify(res, null, 4)}\n` : human(res);
    status = checkExitCode(res);
    if (status === 1) stderr += 'qemu-img: Check failed\n';
  } catch (e) {
    if (!(e instanceof QcowError)) throw e;
    stderr += `qemu-img: ${e.message}\n`;
    status = e.message === NO_CHECKS ? 63 : 1;
  }
  return { status, stdout, stderr };
}
