/** Loads the optional SEEK_DATA/SEEK_HOLE, OFD-lock-test and huge-page addon (native/extents.c) on first use. */
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

type Addon = {
  dataExtents(fd: number, start: number, end: number, max: number): Float64Array | null;
  /** Older builds of the addon lack it. */
  dataExtentsMany?(fd: number, ranges: Float64Array): Float64Array | null;
  /** Older builds of the addon lack it. */
  ofdLocked?(fd: number, byte: number): boolean | null;
  /** Older builds of the addon lack it. */
  adviseHugePages?(buffer: ArrayBuffer, offset: number, length: number): boolean;
};
let addon: Addon | null | undefined;

function load(): Addon | null {
  // import.meta.dirname: no URL to build and parse (~0.4 ms the first time); Node < 20.11 lacks it.
  let dir = import.meta.dirname ?? dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 4; i++) {
    const p = join(dir, 'build', 'Release', 'qcowkit_extents.node');
    if (existsSync(p)) {
      try {
        return dlopen<Addon>(p);
      } catch {
        return null;
      }
    }
    dir = dirname(dir);
  }
  return null;
}

/**
 * Loads a native addon by its path with process.dlopen: require() would add its resolution,
 * realpath and package.json lookups and its module-cache bookkeeping (~0.5 ms of a short
 * command, more than the dlopen itself). Loading one file twice is harmless (Node-API modules
 * register once per call).
 */
export function dlopen<T>(path: string): T {
  const m = { exports: {} as T };
  process.dlopen(m, path);
  return m.exports;
}

export function dataExtentsNative(fd: number, start: number, end: number): Float64Array | null {
  if (addon === undefined) addon = load();
  if (!addon) return null;
  const MAX = 65536;
  const first = addon.dataExtents(fd, start, end, MAX);
  // The common case: everything in one call, returned as the addon made it (no copies).
  if (!first || first.length < 2 * MAX) return first;
  const parts = [first];
  let total = first.length;
  for (let part = first; part.length === 2 * MAX; ) {
    const next = addon.dataExtents(fd, part[part.length - 1]!, end, MAX);
    if (!next) return null;
    parts.push(next);
    total += next.length;
    part = next;
  }
  const out = new Float64Array(total);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/**
 * Data extents of many ranges in one call: `ranges` = [s0, e0, s1, e1, ...]; the result holds,
 * per range in order, a count c and c pairs [dataStart, dataEnd). null when the platform can't
 * tell.
 */
export function dataExtentsManyNative(fd: number, ranges: Float64Array): Float64Array | null {
  if (addon === undefined) addon = load();
  if (!addon) return null;
  if (addon.dataExtentsMany) return addon.dataExtentsMany(fd, ranges);
  const parts: Float64Array[] = [];
  let total = 0;
  for (let i = 0; i < ranges.length; i += 2) {
    const p = dataExtentsNative(fd, ranges[i]!, ranges[i + 1]!);
    if (!p) return null;
    parts.push(p);
    total += 1 + p.length;
  }
  const out = new Float64Array(total);
  let at = 0;
  for (const p of parts) {
    out[at++] = p.length / 2;
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/**
 * Whether another open file description holds an OFD lock on `byte` of the file (F_OFD_GETLK);
 * null when the addon or the kernel can't tell.
 */
export function ofdLockedNative(fd: number, byte: number): boolean | null {
  if (addon === undefined) addon = load();
  if (!addon?.ofdLocked) return null;
  return addon.ofdLocked(fd, byte);
}

/**
 * Asks the kernel for transparent huge pages behind [offset, offset+length) of `buffer` (its
 * 2 MiB-aligned part, before it is first touched): direct writes from it then go out as fewer,
 * larger requests. false when the addon or the kernel can't.
 */
export function adviseHugePagesNative(buffer: ArrayBuffer, offset: number, length: number): boolean {
  if (addon === undefined) addon = load();
  return addon?.adviseHugePages?.(buffer, offset, length) ?? false;
}
