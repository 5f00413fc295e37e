// Crash safety of bitmap stores: a power loss (or crash, or I/O error) at any write or flush of
// `bitmap --merge` / `--add` / `--remove` leaves an image QEMU opens, whose check finds at most
// leaked clusters, and whose bitmaps are exactly the before- or the after-state (or, for several
// actions in one call, the state after one of them). The CLI is also SIGKILLed after each write.
import { createHash } from 'node:crypto';
import { copyFileSync } from 'node:fs';
import { join } from 'node:path';
import { expect, it } from 'vitest';
import { bitmap, openImage, type BitmapAction } from '../../src/index.js';
import { Qcow2Image } from '../../src/qcow2/image.js';
import { findBitmap, loadBitmap } from '../../src/qcow2/bitmaps.js';
import { kernels } from '../../src/kernels/index.js';
import { describeQemu, qemuImg, qemuImgJson, qemuIo } from '../helpers/qemu.js';
import { range, runCrashMatrix, runKillMatrix, type CrashState } from '../helpers/fault-file.js';
import { tmpDir } from '../helpers/tmp.js';

function must(r: { status: number; stderr: string; stdout: string }, what: string): void {
  if (r.status !== 0) throw new Error(`${what} failed (${r.status}): ${r.stdout}${r.stderr}`);
}

/** name:granularity:flags of every bitmap, and a hash of each consistent one's contents. */
async function bitmapState(file: string): Promise<string[]> {
  const img = await openImage(file, { forceShare: true });
  try {
    const out: string[] = [];
    for (const e of img.bitmaps) {
      let h = 'in-use';
      if (!(e.flags & 1)) {
        const bm = await loadBitmap(img, findBitmap(img, e.name));
        h = createHash('sha256').update(kernels().u8(bm.ptr, Math.ceil(bm.bits / 8))).digest('hex').slice(0, 16);
        bm.free();
      }
      out.push(`${e.name}:${e.granularityBits}:${e.flags}:${h}`);
    }
    return out;
  } finally {
    await img.close();
  }
}

async function expectBeforeOrAfter(s: CrashState, rel: string, alsoValid: string[][] = []): Promise<void> {
  const r = qemuImg(['check', '--output=json', s.path(rel)]);
  // 0 clean, 3 leaked clusters only: never corruptions, never an image QEMU can't open.
  expect([0, 3], `${s.label}: qemu-img check exit ${r.status}: ${r.stdout}${r.stderr}`).toContain(r.status);
  if (r.status === 3) expect(JSON.parse(r.stdout).corruptions ?? 0, s.label).toBe(0);
  const now = await bitmapState(s.path(rel));
  const before = await bitmapState(s.pristine(rel));
  const after = await bitmapState(s.after(rel));
  expect([before, after, ...alsoValid].map((x) => JSON.stringify(x)), `${s.label}: ${now.join(' ')}`).toContain(JSON.stringify(now));
  // QEMU agrees on the directory (names, flags, granularities).
  expect(qemuImgJson(['info', s.path(rel)])['format-specific'].data.bitmaps?.length ?? 0, s.label).toBe(now.length);
}

/** Checked as expectBeforeOrAfter does, on any file (a killed CLI's). */
async function expectValidState(file: string, label: string, valid: string[][]): Promise<string[]> {
  const r = qemuImg(['check', '--output=json', file]);
  expect([0, 3], `${label}: qemu-img check exit ${r.status}: ${r.stdout}${r.stderr}`).toContain(r.status);
  if (r.status === 3) expect(JSON.parse(r.stdout).corruptions ?? 0, label).toBe(0);
  const now = await bitmapState(file);
  expect(valid.map((x) => JSON.stringify(x)), `${label}: ${now.join(' ')}`).toContain(JSON.stringify(now));
  return now;
}

/**
 * Three stores in one call — merge, clear, merge — each ending with its switch made durable by
 * the flush the refcount cache was declared to wait for (the next store's refcount changes come
 * after it), and no flush at the end: the lowered refcounts of the last one are written unflushed.
 */
const SEVERAL: BitmapAction[] = [
  { action: 'merge', source: 'src' },
  { action: 'clear' },
  { action: 'merge', source: 'other' },
];

function severalSetup(dir: string): void {
  const f = `${dir}/d.qcow2`;
  must(qemuImg(['create', '-f', 'qcow2', '-o', 'cluster_size=4k', f, '1G']), 'create');
  must(qemuImg(['bitmap', '--add', '-g', '64k', f, 'src']), 'add');
  must(qemuIo(f, ['write 0 1M', 'write 700M 64k']), 'writes');
  must(qemuImg(['bitmap', '--add', '-g', '4k', f, 'other']), 'add');
  must(qemuImg(['bitmap', '--add', '-g', '512', '--disable', f, 'dst']), 'add');
  must(qemuIo(f, ['write 300M 4k', 'write 900M 2M']), 'writes');
  must(qemuImg(['bitmap', '--enable', f, 'dst']), 'enable');
  must(qemuIo(f, ['write 100M 8k']), 'writes');
}

/** The bitmap states after each prefix of SEVERAL (none of them, ..., all of them), from a pristine copy. */
async function severalStates(pristine: string): Promise<string[][]> {
  const out = [await bitmapState(pristine)];
  for (let n = 1; n <= SEVERAL.length; n++) {
    const f = join(tmpDir(), 'd.qcow2');
    copyFileSync(pristine, f);
    await bitmap(f, 'dst', SEVERAL.slice(0, n));
    out.push(await bitmapState(f));
  }
  return out;
}

describeQemu('bitmap stores are crash-safe', () => {
  it('merge (new data clusters, new table, pointer switch, old clusters freed)', async () => {
    const report = await runCrashMatrix({
      name: 'merge',
      setup(dir) {
        const f = `${dir}/d.qcow2`;
        must(qemuImg(['create', '-f', 'qcow2', '-o', 'cluster_size=4k', f, '2G']), 'create');
        must(qemuImg(['bitmap', '--add', '-g', '64k', f, 'src']), 'add');
        must(qemuImg(['bitmap', '--add', '-g', '512', '--disable', f, 'dst']), 'add');
        must(qemuIo(f, ['write 0 1M', 'write 700M 64k', 'write 1500M 8M']), 'writes');
        must(qemuImg(['bitmap', '--enable', f, 'dst']), 'enable');
        must(qemuIo(f, ['write 300M 4k', 'write 1G 2M']), 'writes');
      },
      operation: ({ path, openFile }) => bitmap(path('d.qcow2'), 'dst', [{ action: 'merge', source: 'src' }], { openFile }),
      check: (s) => expectBeforeOrAfter(s, 'd.qcow2'),
      points: { ops: 16, modes: ['none', 'all', 'latest'] },
      ioErrors: { errnos: ['EIO', 'ENOSPC'], points: 6 },
    });
    expect(report.counts.flushes).toBeGreaterThan(1);
    expect(report.statesChecked).toBeGreaterThan(20);
  }, 600_000);

  it('several actions in one call (merge, clear, merge): each store durable before the next one changes refcounts', async () => {
    let states: string[][] | undefined;
    const report = await runCrashMatrix({
      name: 'several',
      setup: severalSetup,
      operation: ({ path, openFile }) => bitmap(path('d.qcow2'), 'dst', SEVERAL, { openFile }),
      check: async (s) => {
        states ??= await severalStates(s.pristine('d.qcow2'));
        await expectBeforeOrAfter(s, 'd.qcow2', states);
      },
      points: { ops: 'all', modes: ['none', 'all', 'latest', { random: 3 }] },
    });
    // Each store: its new clusters and refcounts, its switch (the file grows for the first one).
    expect(report.counts.flushes).toBeGreaterThanOrEqual(2 * SEVERAL.length);
    expect(new Set(states!.map((x) => JSON.stringify(x))).size, 'every action changes dst').toBe(SEVERAL.length + 1);
  }, 600_000);

  it('the CLI killed after each write of `bitmap --merge --clear --merge`', async () => {
    let states: string[][] | undefined;
    const r = await runKillMatrix({
      name: 'bitmap kill',
      setup: severalSetup,
      args: ({ path }) => ['bitmap', '--merge', 'src', '--clear', '--merge', 'other', path('d.qcow2'), 'dst'],
      check: async (s) => {
        states ??= await severalStates(s.pristine('d.qcow2'));
        if (!s.killed) {
          // Completed: the library's result of the same actions, nothing leaked.
          expect(s.result.status, `${s.label}: ${s.result.stderr}`).toBe(0);
          await expectValidState(s.path('d.qcow2'), s.label, [states[SEVERAL.length]!]);
          expect(qemuImg(['check', s.path('d.qcow2')]).status, `${s.label}: a completed run leaks nothing`).toBe(0);
          return;
        }
        await expectValidState(s.path('d.qcow2'), s.label, states);
        // No lock outlives the process.
        must(qemuIo(s.path('d.qcow2'), ['read 0 4k']), `${s.label}: qemu-io opens it read-write`);
      },
      points: range(1, 400),
      ahead: 1,
    });
    expect(r.completedAt, 'the command completes once the kill point lies past its last write').toBeDefined();
    console.log(`bitmap kill: ${r.killed.length} kill points, completed at ${r.completedAt}`);
    expect(r.killed.length).toBeGreaterThan(10);
  }, 900_000);

  it('grow the disk (new tables and directory, then size and directory switched by one header write)', async () => {
    const report = await runCrashMatrix({
      name: 'grow',
      setup(dir) {
        const f = `${dir}/g.qcow2`;
        must(qemuImg(['create', '-f', 'qcow2', '-o', 'cluster_size=512', f, String(40 * 2 ** 20 + 1024)]), 'create');
        must(qemuImg(['bitmap', '--add', '-g', '512', f, 'fine']), 'add');
        must(qemuImg(['bitmap', '--add', '-g', '64k', '--disable', f, 'off']), 'add');
        must(qemuIo(f, ['write 0 64k', 'write 20M 3k', `write ${40 * 2 ** 20} 1024`]), 'writes');
      },
      async operation({ path, openFile }) {
        const file = await openFile(path('g.qcow2'), { writable: true, lock: 'write', forWrite: true });
        const img = await Qcow2Image.open(path('g.qcow2'), { writable: true, file });
        try {
          await img.resize(100 * 2 ** 20);
        } finally {
          await img.close();
        }
      },
      check: async (s) => {
        await expectBeforeOrAfter(s, 'g.qcow2');
        // Size and bitmap tables switch together: QEMU serves the bitmaps (it refuses tables of
        // another size), and the size is the old or the new one.
        const size = qemuImgJson(['info', s.path('g.qcow2')])['virtual-size'];
        expect([40 * 2 ** 20 + 1024, 100 * 2 ** 20], s.label).toContain(size);
      },
      points: { ops: 'all', modes: ['none', 'all', 'latest'] },
      ioErrors: { errnos: ['EIO', 'ENOSPC'], points: 6 },
    });
    expect(report.counts.flushes).toBeGreaterThan(2);
    expect(report.statesChecked).toBeGreaterThan(20);
  }, 600_000);

  it('add the first bitmap (extension appears) and remove the last (extension goes), over a backing file', async () => {
    for (const [name, actions] of [
      ['add', [{ action: 'add' as const }]],
      ['add+remove', [{ action: 'add' as const }, { action: 'remove' as const }]],
    ] as const) {
      const report = await runCrashMatrix({
        name,
        setup(dir) {
          must(qemuImg(['create', '-f', 'qcow2', `${dir}/base.qcow2`, '1G']), 'base');
          must(qemuImg(['create', '-f', 'qcow2', '-o', 'cluster_size=512', '-b', 'base.qcow2', '-F', 'qcow2', `${dir}/top.qcow2`]), 'top');
        },
        operation: ({ path, openFile }) => bitmap(path('top.qcow2'), 'new', [...actions], { openFile }),
        check: async (s) => {
          // Actions are applied one by one: after the add and before the remove is a valid state too.
          const emptyNew = `new:12:2:${createHash('sha256').update(new Uint8Array(Math.ceil(2 ** 30 / 4096 / 8))).digest('hex').slice(0, 16)}`;
          await expectBeforeOrAfter(s, 'top.qcow2', name === 'add+remove' ? [[emptyNew]] : []);
          expect(qemuImgJson(['info', s.path('top.qcow2')])['backing-filename'], s.label).toBe('base.qcow2');
        },
        points: { ops: 'all', modes: ['none', 'all', 'latest'] },
      });
      expect(report.statesChecked).toBeGreaterThan(5);
    }
  }, 600_000);
});
