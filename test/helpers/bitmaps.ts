// Fixtures of the bitmap interop tests (bitmaps.test.ts, bitmaps-grow.test.ts): qcow2 images
// whose persistent bitmaps QEMU made and dirtied, the chain a commit runs on, and what QEMU says
// of the result (qemu-img check and info, the dirty extents qemu-nbd serves).
import { join } from 'node:path';
import { expect } from 'vitest';
import { command as commitCommand } from '../../src/cli/commands/commit.js';
import { runCommandInProcess } from './cli.js';
import { nbdDirtyMaps, type Extent } from './nbd.js';
import { prng } from './prng.js';
import { qemuImg, qemuImgJson, qemuIo } from './qemu.js';
import { tmpDir } from './tmp.js';

export const K = 1024;
export const M = 1024 * K;
export const G = 1024 * M;
export const T = 1024 * G;

export function must(r: { status: number; stderr: string; stdout: string }, what: string): string {
  if (r.status !== 0) throw new Error(`${what} failed (${r.status}): ${r.stdout}${r.stderr}`);
  return r.stdout;
}

/** qemu-img check must be clean: exit 0, no leaks, no corruptions. */
export function expectClean(file: string): void {
  const r = qemuImg(['check', '--output=json', file]);
  expect(r.status, r.stdout + r.stderr).toBe(0);
  const j = JSON.parse(r.stdout);
  expect(j['leaks'] ?? 0).toBe(0);
  expect(j['corruptions'] ?? 0).toBe(0);
}

export interface InfoBitmap {
  name: string;
  granularity: number;
  flags: string[];
}

/** The bitmaps qemu-img info lists. */
export function infoBitmaps(file: string): InfoBitmap[] {
  return imageInfo(file).bitmaps;
}

/** qemu-img info's virtual size and bitmaps. */
export function imageInfo(file: string): { size: number; bitmaps: InfoBitmap[] } {
  const j = qemuImgJson(['info', file]);
  return { size: j['virtual-size'], bitmaps: (j['format-specific']?.data?.bitmaps ?? []) as InfoBitmap[] };
}

/** A bitmap QEMU adds: granularity as qemu-img takes it (its default when absent). */
export interface BitmapSpec {
  name: string;
  granularity?: string;
  /** Disabled after the writes: it holds what they dirtied and records nothing more. */
  disabled?: boolean;
}

/**
 * A qcow2 image whose bitmaps QEMU made and dirtied: created (over `backing`, a name relative to
 * the image's directory, when given), the bitmaps added, `writes` made through qemu-io (recorded
 * by every bitmap), then the `disabled` ones disabled.
 */
export function qemuBitmapImage(file: string, o: { size: number; cluster?: string; backing?: string; bitmaps: BitmapSpec[]; writes?: string[] }): void {
  const opts = o.cluster ? ['-o', `cluster_size=${o.cluster}`] : [];
  const backing = o.backing ? ['-b', o.backing, '-F', 'qcow2'] : [];
  must(qemuImg(['create', '-q', '-f', 'qcow2', ...opts, ...backing, file, String(o.size)]), `create ${file}`);
  for (const b of o.bitmaps) must(qemuImg(['bitmap', '--add', ...(b.granularity ? ['-g', b.granularity] : []), file, b.name]), `add ${b.name}`);
  if (o.writes?.length) must(qemuIo(file, o.writes), 'qemu-io writes');
  for (const b of o.bitmaps) if (b.disabled) must(qemuImg(['bitmap', '--disable', file, b.name]), `disable ${b.name}`);
}

/** Random guest writes through QEMU (recorded into the enabled persistent bitmaps). */
export function qemuWrites(file: string, size: number, n: number, rnd: () => number): Extent[] {
  const cmds: string[] = [];
  const writes: Extent[] = [];
  for (let i = 0; i < n; i++) {
    const len = 512 * (1 + Math.floor(rnd() * (rnd() < 0.8 ? 64 : 8192)));
    const start = Math.min(size - len, 512 * Math.floor((rnd() * size) / 512));
    cmds.push(`write -P ${1 + (i % 250)} ${start} ${len}`);
    writes.push({ start, length: len });
  }
  must(qemuIo(file, cmds), 'qemu-io writes');
  return writes;
}

export interface CommitChain {
  /** The base: its size, bitmaps and writes (qemuBitmapImage). */
  base: { size: number; bitmaps: BitmapSpec[]; writes: string[] };
  /** The top's size (default: the base's) and its writes: qemu-io commands, or random writes (count, seed). */
  top: { size?: number; writes: string[]; random?: { count: number; seed: number } };
}

/**
 * The same chain (base.qcow2 with bitmaps <- top.qcow2) committed by qemu-img and by qcowkit,
 * each in a directory of its own; per tool, qemu-img info of the base and the dirty extents of
 * its bitmaps as QEMU serves them. The base passes qemu-img check clean after both.
 */
export async function commitBothWays(c: CommitChain): Promise<Record<'qemu-img' | 'qcowkit', { info: ReturnType<typeof imageInfo>; maps: Record<string, Extent[]> }>> {
  const out: Partial<Record<'qemu-img' | 'qcowkit', { info: ReturnType<typeof imageInfo>; maps: Record<string, Extent[]> }>> = {};
  for (const tool of ['qemu-img', 'qcowkit'] as const) {
    const dir = tmpDir();
    const base = join(dir, 'base.qcow2');
    const top = join(dir, 'top.qcow2');
    qemuBitmapImage(base, { size: c.base.size, bitmaps: c.base.bitmaps, writes: c.base.writes });
    qemuBitmapImage(top, { size: c.top.size ?? c.base.size, backing: 'base.qcow2', bitmaps: [] });
    if (c.top.random) qemuWrites(top, c.top.size ?? c.base.size, c.top.random.count, prng(c.top.random.seed));
    if (c.top.writes.length) must(qemuIo(top, c.top.writes), 'top writes');
    if (tool === 'qemu-img') must(qemuImg(['commit', top]), 'qemu-img commit');
    else {
      const r = await runCommandInProcess(commitCommand, [top], dir);
      expect(r.status, r.stderr).toBe(0);
    }
    expectClean(base);
    out[tool] = { info: imageInfo(base), maps: await nbdDirtyMaps(base, c.base.bitmaps.map((b) => b.name)) };
  }
  return out as Record<'qemu-img' | 'qcowkit', { info: ReturnType<typeof imageInfo>; maps: Record<string, Extent[]> }>;
}
