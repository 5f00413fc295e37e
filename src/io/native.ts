/** Loads the optional SEEK_DATA/SEEK_HOLE addon (native/extents.c) on first use. */
import { createRequire } from 'node:module';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

type Addon = { dataExtents(fd: number, start: number, end: number, max: number): Float64Array | null };
let addon: Addon | null | undefined;

function load(): Addon | null {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 4; i++) {
    const p = join(dir, 'build', 'Release', 'qcowkit_extents.node');
    if (existsSync(p)) {
      try {
        return createRequire(import.meta.url)(p) as Addon;
      } catch {
        return null;
      }
    }
    dir = dirname(dir);
  }
  return null;
}

export function dataExtentsNative(fd: number, start: number, end: number): Float64Array | null {
  if (addon === undefined) addon = load();
  if (!addon) return null;
  const out: number[] = [];
  let pos = start;
  for (;;) {
    const part = addon.dataExtents(fd, pos, end, 65536);
    if (!part) return null;
    for (const v of part) out.push(v);
    if (part.length < 2 * 65536) break;
    pos = part[part.length - 1]!;
  }
  return Float64Array.from(out);
}
