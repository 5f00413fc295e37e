// Self-test of the shared fault harness (test/helpers/fault-file.ts): the journal's replay against
// an independent in-memory model and against the real files, global numbering across files, the
// fault plans, the crash-matrix driver on a toy operation (a correct one passes, an ordering bug,
// a swallowed crash and a broken invariant are caught) and the SIGKILL driver on the real CLI.
import { copyFileSync, existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { openImageFile, type FileOpener, type ImageFile } from '../../src/io/file.js';
import {
  Crash,
  crashAfterFlush,
  crashAtFlush,
  crashAtOp,
  crashAtWrite,
  failAt,
  FaultJournal,
  isCrash,
  none,
  range,
  runCrashMatrix,
  runKillMatrix,
  samplePoints,
  type CrashMode,
  type FaultPlan,
} from '../helpers/fault-file.js';
import { prng } from '../helpers/prng.js';
import { tmpDir } from '../helpers/tmp.js';

// ---------------------------------------------------------------------------------------------
// a random program over two files, and an independent model of what it leaves

type Step =
  | { f: 0 | 1; kind: 'write'; offset: number; data: Buffer }
  | { f: 0 | 1; kind: 'truncate'; length: number }
  | { f: 0 | 1; kind: 'punch'; offset: number; length: number }
  | { f: 0 | 1; kind: 'flush' };

const INITIAL = [Buffer.alloc(40_000, 0xa1), Buffer.alloc(20_000, 0xb2)];

function program(seed: number, steps = 60): Step[] {
  const r = prng(seed);
  const int = (n: number) => Math.floor(r() * n);
  const out: Step[] = [];
  for (let i = 0; i < steps; i++) {
    const f = (r() < 0.5 ? 0 : 1) as 0 | 1;
    const x = r();
    if (x < 0.55) {
      const data = Buffer.alloc(1 + int(6000));
      for (let j = 0; j < data.length; j++) data[j] = int(256);
      out.push({ f, kind: 'write', offset: int(60_000), data });
    } else if (x < 0.65) out.push({ f, kind: 'truncate', length: int(70_000) });
    else if (x < 0.75) out.push({ f, kind: 'punch', offset: 4096 * int(14), length: 4096 * (1 + int(4)) });
    else out.push({ f, kind: 'flush' });
  }
  return out;
}

/** Plain Buffer model of a file. */
class Model {
  constructor(public b: Buffer) {}
  apply(s: Step): void {
    if (s.kind === 'write') {
      const end = s.offset + s.data.length;
      if (end > this.b.length) this.b = Buffer.concat([this.b, Buffer.alloc(end - this.b.length)]);
      s.data.copy(this.b, s.offset);
    } else if (s.kind === 'truncate') {
      this.b = s.length <= this.b.length ? Buffer.from(this.b.subarray(0, s.length)) : Buffer.concat([this.b, Buffer.alloc(s.length - this.b.length)]);
    } else if (s.kind === 'punch') {
      this.b.fill(0, Math.min(s.offset, this.b.length), Math.min(s.offset + s.length, this.b.length));
    }
  }
  copy(): Buffer {
    return Buffer.from(this.b);
  }
}

interface Setup {
  dir: string;
  live: [string, string];
  pristine: [string, string];
  originals: Map<string, string>;
}

function twoFiles(): Setup {
  const dir = tmpDir('qcowkit-fault-file-');
  const live: [string, string] = [join(dir, 'a.img'), join(dir, 'b.img')];
  const pristine: [string, string] = [join(dir, 'a.orig'), join(dir, 'b.orig')];
  for (const i of [0, 1]) {
    writeFileSync(pristine[i]!, INITIAL[i]!);
    copyFileSync(pristine[i]!, live[i]!);
  }
  return { dir, live, pristine, originals: new Map([[live[0], pristine[0]], [live[1], pristine[1]]]) };
}

function restore(s: Setup): void {
  for (const i of [0, 1]) copyFileSync(s.pristine[i]!, s.live[i]!);
}

/** Runs the program through the journal's opener, sequentially; returns how many steps completed. */
async function execute(steps: Step[], open: FileOpener, live: [string, string]): Promise<{ done: number; error: unknown }> {
  const files: ImageFile[] = [await open(live[0], { writable: true }), await open(live[1], { writable: true })];
  let done = 0;
  try {
    for (const s of steps) {
      const f = files[s.f]!;
      if (s.kind === 'write') await f.writeAt(s.data, s.offset);
      else if (s.kind === 'truncate') await f.truncate(s.length);
      else if (s.kind === 'punch') await f.punchHole(s.offset, s.length);
      else await f.flush();
      done++;
    }
    return { done, error: undefined };
  } catch (e) {
    return { done, error: e };
  } finally {
    await Promise.all(files.map((f) => f.close()));
  }
}

/**
 * The model after the first `issued` steps: per file, the durable content (ops up to its last
 * flush among them), the full content, and the durable content plus only the newest unflushed op.
 */
function modelAt(steps: Step[], issued: number): { durable: Buffer[]; all: Buffer[]; latest: Buffer[]; unflushed: number[] } {
  const all = INITIAL.map((b) => new Model(Buffer.from(b)));
  const durable: Buffer[] = INITIAL.map((b) => Buffer.from(b));
  const pending: Step[][] = [[], []];
  for (const s of steps.slice(0, issued)) {
    if (s.kind === 'flush') {
      durable[s.f] = all[s.f]!.copy();
      pending[s.f] = [];
    } else {
      all[s.f]!.apply(s);
      pending[s.f]!.push(s);
    }
  }
  const latest = [0, 1].map((f) => {
    const m = new Model(Buffer.from(durable[f]!));
    const p = pending[f]!;
    if (p.length) m.apply(p[p.length - 1]!);
    return m.b;
  });
  return { durable, all: all.map((m) => m.b), latest, unflushed: pending.map((p) => p.length) };
}

const read = (p: string) => readFileSync(p);

describe('FaultJournal: replay', () => {
  it('after a full run, the "all ops" state equals the real files (writes, truncates, punches across EOF, two files)', async () => {
    for (const seed of [1, 2, 3]) {
      const s = twoFiles();
      const steps = program(seed);
      const j = new FaultJournal(none());
      const r = await execute(steps, j.opener(), s.live);
      expect(r.error).toBeUndefined();
      await j.closeAll();
      const model = modelAt(steps, steps.length);
      const real = s.live.map(read);
      // The model describes the real file system (sanity of the model itself).
      expect(real[0]!.equals(model.all[0]!), `seed ${seed}: model vs real a`).toBe(true);
      expect(real[1]!.equals(model.all[1]!), `seed ${seed}: model vs real b`).toBe(true);
      const states = j.crashStates(s.originals, j.end, 'all');
      expect(read(s.live[0]).equals(real[0]!), `seed ${seed}: replay of a`).toBe(true);
      expect(read(s.live[1]).equals(real[1]!), `seed ${seed}: replay of b`).toBe(true);
      expect(states.reduce((n, x) => n + x.durable + x.kept, 0)).toBe(steps.filter((x) => x.kind !== 'flush').length);
      expect(states.every((x) => x.dropped === 0)).toBe(true);
      // 'none' at the end: only what each file's last flush covered.
      j.crashStates(s.originals, j.end, 'none');
      expect(read(s.live[0]).equals(model.durable[0]!)).toBe(true);
      expect(read(s.live[1]).equals(model.durable[1]!)).toBe(true);
    }
  });

  it('a crash state after flush k contains exactly the flushed ops (per file, fdatasync semantics)', async () => {
    const steps = program(11);
    const flushes = steps.filter((x) => x.kind === 'flush').length;
    expect(flushes).toBeGreaterThan(5);
    const s = twoFiles();
    for (const k of range(1, flushes)) {
      restore(s);
      const j = new FaultJournal(crashAfterFlush(k));
      const r = await execute(steps, j.opener(), s.live);
      expect(isCrash(r.error), `flush ${k}`).toBe(true);
      // The crash came right after the kth flush: steps up to and including it were issued.
      const issued = steps.findIndex((x, i) => x.kind === 'flush' && steps.slice(0, i + 1).filter((y) => y.kind === 'flush').length === k) + 1;
      expect(r.done).toBe(issued - 1); // the flush itself completed, then threw
      const model = modelAt(steps, issued);
      const live = s.live.map(read);
      expect(live[0]!.equals(model.all[0]!) && live[1]!.equals(model.all[1]!), `flush ${k}: files as the crash left them`).toBe(true);
      j.crashStates(s.originals, j.end, 'none');
      expect(read(s.live[0]).equals(model.durable[0]!), `flush ${k}: a = exactly its flushed ops`).toBe(true);
      expect(read(s.live[1]).equals(model.durable[1]!), `flush ${k}: b = exactly its flushed ops`).toBe(true);
      j.crashStates(s.originals, j.end, 'latest');
      expect(read(s.live[0]).equals(model.latest[0]!), `flush ${k}: a, latest`).toBe(true);
      expect(read(s.live[1]).equals(model.latest[1]!), `flush ${k}: b, latest`).toBe(true);
      // An earlier point of the same journal: right after flush k-1.
      if (k > 1) {
        const issuedBefore = steps.findIndex((x, i) => x.kind === 'flush' && steps.slice(0, i + 1).filter((y) => y.kind === 'flush').length === k - 1) + 1;
        const m = modelAt(steps, issuedBefore);
        j.crashStates(s.originals, j.pointAfterFlush(k - 1), 'none');
        expect(read(s.live[0]).equals(m.durable[0]!) && read(s.live[1]).equals(m.durable[1]!), `point after flush ${k - 1}`).toBe(true);
        j.crashStates(s.originals, j.pointAfterFlush(k - 1), 'all');
        expect(read(s.live[0]).equals(m.all[0]!) && read(s.live[1]).equals(m.all[1]!), `point after flush ${k - 1}, all`).toBe(true);
      }
    }
  });

  it('crashAtFlush: the flush does not happen, so nothing since the previous flush of that file is durable', async () => {
    const steps = program(5);
    const s = twoFiles();
    const idx = steps.map((x, i) => (x.kind === 'flush' ? i : -1)).filter((i) => i >= 0);
    for (const [n, at] of idx.slice(0, 6).entries()) {
      restore(s);
      const j = new FaultJournal(crashAtFlush(n + 1));
      const r = await execute(steps, j.opener(), s.live);
      expect(isCrash(r.error)).toBe(true);
      expect(r.done).toBe(at);
      const model = modelAt(steps, at);
      j.crashStates(s.originals, j.end, 'none');
      expect(read(s.live[0]).equals(model.durable[0]!) && read(s.live[1]).equals(model.durable[1]!), `flush ${n + 1}`).toBe(true);
    }
  });

  it('random subsets are seeded: the same seed gives the same state, each unflushed op kept or dropped', async () => {
    const steps = program(21).filter((x) => x.kind !== 'flush' && x.kind !== 'truncate');
    const s = twoFiles();
    const j = new FaultJournal();
    await execute(steps, j.opener(), s.live);
    const state = (mode: CrashMode) => {
      const counts = j.crashStates(s.originals, j.end, mode);
      return { a: read(s.live[0]), b: read(s.live[1]), counts };
    };
    const one = state({ random: 3 });
    const again = state({ random: 3 });
    expect(one.a.equals(again.a) && one.b.equals(again.b)).toBe(true);
    const total = steps.length;
    expect(one.counts.reduce((n, c) => n + c.kept + c.dropped, 0)).toBe(total);
    const kept = one.counts.reduce((n, c) => n + c.kept, 0);
    expect(kept).toBeGreaterThan(0);
    expect(kept).toBeLessThan(total);
    const seeds = [4, 5, 6, 7].map((seed) => state({ random: seed }));
    expect(seeds.some((x) => !x.a.equals(one.a) || !x.b.equals(one.b)), 'other seeds give other states').toBe(true);
    const latest = state('latest').counts;
    expect(latest.map((c) => c.kept)).toEqual([1, 1]);
    expect(state({ random: 9, p: 1 }).a.equals(state('all').a)).toBe(true);
    expect(state({ random: 9, p: 0 }).a.equals(INITIAL[0]!)).toBe(true);
  });

  it('refuses a state for a file it has no original of; null originals are files the operation created', async () => {
    const s = twoFiles();
    const j = new FaultJournal();
    await execute([{ f: 0, kind: 'write', offset: 0, data: Buffer.from('x') }, { f: 1, kind: 'write', offset: 5, data: Buffer.from('yz') }], j.opener(), s.live);
    expect(() => j.crashStates(new Map([[s.live[0], s.pristine[0]]]), j.end, 'all')).toThrow(/no original given for .*b\.img/);
    j.crashStates(new Map<string, string | null>([[s.live[0], s.pristine[0]], [s.live[1], null]]), j.end, 'all');
    expect(read(s.live[1]).equals(Buffer.from([0, 0, 0, 0, 0, 0x79, 0x7a]))).toBe(true);
    j.crashStates(new Map<string, string | null>([[s.live[0], s.pristine[0]], [s.live[1], null]]), j.end, 'none');
    expect(existsSync(s.live[1])).toBe(false);
  });
});

describe('FaultJournal: numbering and plans', () => {
  const alternating = (n: number): Step[] => range(1, n).map((i) => ({ f: ((i - 1) % 2) as 0 | 1, kind: 'write', offset: 100 * i, data: Buffer.alloc(10, i) }));

  it('numbers writes, ops and flushes globally across files; a crash stops every file', async () => {
    const s = twoFiles();
    const j = new FaultJournal(crashAtWrite(4));
    const open = j.opener();
    const a = await open(s.live[0], { writable: true });
    const b = await open(s.live[1], { writable: true });
    await a.writeAt(Buffer.alloc(10, 1), 0); // write 1
    await b.writeAt(Buffer.alloc(10, 2), 0); // write 2
    await b.flush(); // flush 1
    await a.truncate(50_000); // op 3, not a write
    await a.writeAt(Buffer.alloc(10, 3), 10); // write 3
    await a.flush(); // flush 2
    const crash = await b.writeAt(Buffer.alloc(10, 4), 10).catch((e: unknown) => e); // write 4: crash
    expect(crash).toBeInstanceOf(Crash);
    expect(j.crashed).toBe(crash);
    // Dead: nothing more reaches any file.
    await expect(a.writeAt(Buffer.alloc(1), 0)).rejects.toBeInstanceOf(Crash);
    await expect(a.punchHole(0, 4096)).rejects.toBeInstanceOf(Crash);
    await expect(b.flush()).rejects.toBeInstanceOf(Crash);
    expect(j.counts).toEqual({ writes: 3, ops: 4, flushes: 2 });
    expect(j.entries.map((e) => [e.kind, e.path.endsWith('a.img') ? 'a' : 'b', e.write, e.op, e.flush])).toEqual([
      ['write', 'a', 1, 1, undefined],
      ['write', 'b', 2, 2, undefined],
      ['flush', 'b', undefined, undefined, 1],
      ['truncate', 'a', undefined, 3, undefined],
      ['write', 'a', 3, 4, undefined],
      ['flush', 'a', undefined, undefined, 2],
    ]);
    expect(j.pointAfterFlush(1)).toBe(3);
    expect(j.pointBeforeWrite(3)).toBe(4);
    expect(j.pointBeforeWrite(4)).toBe(j.end);
    expect(read(s.live[1]).subarray(10, 20).equals(INITIAL[1]!.subarray(10, 20))).toBe(true);
    // Reads and close still work; closeAll closes what is left.
    const buf = Buffer.alloc(10);
    await a.readAt(buf, 0);
    expect(buf.equals(Buffer.alloc(10, 1))).toBe(true);
    await j.closeAll();
    // The files are closed (their write locks released): a new writable open succeeds.
    const again = await openImageFile(s.live[0], { writable: true });
    await again.close();
  });

  it('crashAtWrite(n) and crashAtOp(n) count across files', async () => {
    for (const n of [1, 2, 5, 6]) {
      const s = twoFiles();
      const j = new FaultJournal(crashAtWrite(n));
      const r = await execute(alternating(6), j.opener(), s.live);
      expect(isCrash(r.error)).toBe(true);
      expect(r.done).toBe(n - 1);
      expect(j.entries.map((e) => e.write)).toEqual(range(1, n - 1));
      expect(j.entries.map((e) => (e.path.endsWith('a.img') ? 0 : 1))).toEqual(range(1, n - 1).map((i) => (i - 1) % 2));
    }
    const s = twoFiles();
    const steps: Step[] = [...alternating(2), { f: 1, kind: 'punch', offset: 0, length: 4096 }, ...alternating(2)];
    const j = new FaultJournal(crashAtOp(3));
    const r = await execute(steps, j.opener(), s.live);
    expect(r.done).toBe(2);
    expect(j.crashed?.message).toMatch(/crash before op 3/);
  });

  it('failAt: the nth op matching the filter fails once with the errno text, as a failed syscall', async () => {
    const s = twoFiles();
    const onlyB4k = (p: string, _o: number, len: number) => p.endsWith('b.img') && len === 4096;
    const j = new FaultJournal(failAt(2, 'ENOSPC', onlyB4k));
    const open = j.opener();
    const a = await open(s.live[0], { writable: true });
    const b = await open(s.live[1], { writable: true });
    await a.writeAt(Buffer.alloc(4096, 1), 0); // a: not matching
    await b.writeAt(Buffer.alloc(4096, 2), 0); // match 1
    await b.writeAt(Buffer.alloc(512, 3), 8192); // not matching (length)
    const err = await b.writeAt(Buffer.alloc(4096, 4), 4096).catch((e: unknown) => e); // match 2: fails
    expect(err).toMatchObject({ name: 'QcowError', code: 'IO', file: s.live[1] });
    expect((err as Error).message).toBe('write error at offset 4096: ENOSPC: no space left on device, write');
    expect(isCrash(err)).toBe(false);
    expect(j.injected).toMatchObject({ kind: 'write', offset: 4096, length: 4096 });
    expect(read(s.live[1]).subarray(4096, 8192).equals(INITIAL[1]!.subarray(4096, 8192)), 'the failed write did nothing').toBe(true);
    await b.writeAt(Buffer.alloc(4096, 5), 12288); // later ops go on
    expect(j.entries.map((e) => e.offset)).toEqual([0, 0, 8192, 12288]);
    await j.closeAll();

    const eio = new FaultJournal(failAt(1, 'EIO', (_p, _o, _l, kind) => kind === 'truncate'));
    const f = await eio.opener()(s.live[0], { writable: true });
    await f.writeAt(Buffer.alloc(1), 0);
    await expect(f.truncate(10)).rejects.toThrow('truncate failed: EIO: i/o error, ftruncate');
    await eio.closeAll();
  });

  it('samplePoints is deterministic, bounded, and keeps the first and the last', () => {
    expect(samplePoints(5, 24)).toEqual([1, 2, 3, 4, 5]);
    expect(samplePoints(0, 24)).toEqual([]);
    expect(samplePoints(1000, 'all')).toHaveLength(1000);
    const p = samplePoints(1000, 24);
    expect(p).toHaveLength(24);
    expect(p[0]).toBe(1);
    expect(p[23]).toBe(1000);
    expect(samplePoints(1000, 24)).toEqual(p);
  });
});

// ---------------------------------------------------------------------------------------------
// the driver on a toy operation: a 4-byte pointer at offset 0 names one of two 4 KiB slots; a
// slot is a value repeated. The update writes the other slot, flushes, then switches the pointer.

const SLOT = 4096;
function toyPristine(dir: string): void {
  const b = Buffer.alloc(3 * SLOT);
  b.writeUInt32LE(1, 0);
  b.fill(0x11, SLOT, 2 * SLOT);
  writeFileSync(join(dir, 'toy.img'), b);
}
function toyValue(path: string): number {
  const b = readFileSync(path);
  const slot = b.readUInt32LE(0);
  if (slot !== 1 && slot !== 2) throw new Error(`bad pointer ${slot}`);
  const data = b.subarray(slot * SLOT, (slot + 1) * SLOT);
  if (!data.every((x) => x === data[0])) throw new Error(`slot ${slot} torn`);
  return data[0]!;
}
async function toyUpdate(open: FileOpener, path: string, value: number, opts: { flushBeforeSwitch?: boolean; swallowCrash?: boolean } = {}): Promise<void> {
  const f = await open(path, { writable: true });
  try {
    const ptr = Buffer.alloc(4);
    await f.readAt(ptr, 0);
    const next = ptr.readUInt32LE(0) === 1 ? 2 : 1;
    for (let i = 0; i < 4; i++) await f.writeAt(Buffer.alloc(SLOT / 4, value), next * SLOT + (i * SLOT) / 4);
    if (opts.flushBeforeSwitch ?? true) await f.flush();
    ptr.writeUInt32LE(next, 0);
    await f.writeAt(ptr, 0);
    await f.flush();
  } catch (e) {
    if (!opts.swallowCrash) throw e;
  } finally {
    await f.close();
  }
}

describe('runCrashMatrix', () => {
  const before = 0x11;
  const after = 0x22;
  const invariant = (seen: { kinds: Set<string>; labels: string[] }) => (st: Parameters<Parameters<typeof runCrashMatrix>[0]['check']>[0]) => {
    seen.kinds.add(st.kind);
    seen.labels.push(st.label);
    expect(toyValue(st.pristine('toy.img'))).toBe(before);
    expect(toyValue(st.after('toy.img'))).toBe(after);
    if (st.kind === 'io-error') expect(st.error).toMatchObject({ code: 'IO' });
    expect([before, after], st.label).toContain(toyValue(st.path('toy.img')));
  };

  it('runs every point of a correct operation and reports what it ran', async () => {
    const seen = { kinds: new Set<string>(), labels: [] as string[] };
    const r = await runCrashMatrix({
      setup: toyPristine,
      operation: ({ path, openFile }) => toyUpdate(openFile, path('toy.img'), after),
      check: invariant(seen),
      ioErrors: { errnos: ['EIO', 'ENOSPC'], points: 'all' },
    });
    expect(r.counts).toEqual({ writes: 5, ops: 5, flushes: 2 });
    // 2 flushes x (before, after) + 5 ops; 4 modes each; the end point with 3 modes; the complete run.
    expect(r.crashRuns).toBe(4 + 5);
    expect(r.ioRuns).toBe(10);
    expect(r.statesChecked).toBe(1 + 3 + 9 * 4 + 10);
    expect([...seen.kinds].sort()).toEqual(['complete', 'crash', 'io-error']);
    expect(seen.labels).toContain("crash before flush 2, only each file's latest unflushed op kept");
  });

  it('catches a missing flush before the pointer switch (power loss keeping only the newest write)', async () => {
    const seen = { kinds: new Set<string>(), labels: [] as string[] };
    await expect(
      runCrashMatrix({
        setup: toyPristine,
        operation: ({ path, openFile }) => toyUpdate(openFile, path('toy.img'), after, { flushBeforeSwitch: false }),
        check: invariant(seen),
      }),
    ).rejects.toThrow(/crash before flush 1, only each file's latest unflushed op kept: expected \[ 17, 34 \] to include \+0/);
    // Process death alone would not have found it.
    const deathOnly = await runCrashMatrix({
      setup: toyPristine,
      operation: ({ path, openFile }) => toyUpdate(openFile, path('toy.img'), after, { flushBeforeSwitch: false }),
      check: invariant(seen),
      points: { modes: ['all'], end: false },
    });
    expect(deathOnly.crashRuns).toBeGreaterThan(0);
  });

  it('fails when the operation swallows the crash, or when the check fails', async () => {
    await expect(
      runCrashMatrix({
        setup: toyPristine,
        operation: ({ path, openFile }) => toyUpdate(openFile, path('toy.img'), after, { swallowCrash: true }),
        check: () => {},
      }),
    ).rejects.toThrow(/completed after the crash/);
    await expect(
      runCrashMatrix({
        setup: toyPristine,
        operation: ({ path, openFile }) => toyUpdate(openFile, path('toy.img'), after),
        check: (st) => expect(toyValue(st.path('toy.img')), st.label).toBe(after),
      }),
    ).rejects.toThrow(/^crash before flush 1, unflushed ops lost: expected 17 to be 34/);
  });

  it('covers a second file the operation opens, with one global numbering', async () => {
    const plans: FaultPlan[] = [];
    const r = await runCrashMatrix({
      setup: (dir) => {
        toyPristine(dir);
        copyFileSync(join(dir, 'toy.img'), join(dir, 'other.img'));
      },
      operation: async ({ path, openFile, journal }) => {
        plans.push(journal.plan);
        await toyUpdate(openFile, path('toy.img'), after);
        await toyUpdate(openFile, path('other.img'), 0x33);
      },
      check: (st) => {
        const a = toyValue(st.path('toy.img'));
        const b = toyValue(st.path('other.img'));
        expect([before, after], st.label).toContain(a);
        expect([before, 0x33], st.label).toContain(b);
        // The second file is only touched once the first is done, and that order survives any crash.
        if (b === 0x33) expect(a, st.label).toBe(after);
      },
      points: { ops: 'all' },
    });
    expect(r.counts).toEqual({ writes: 10, ops: 10, flushes: 4 });
    expect(plans.filter((p) => p.kind === 'crashAtOp').map((p) => (p as { n: number }).n)).toEqual(range(1, 10));
  });
});

describe('runKillMatrix', () => {
  it('kills the CLI after each write until it completes; the files are as the kill left them', async () => {
    const finals: Buffer[] = [];
    const states: { k: number; file: Buffer | undefined }[] = [];
    const r = await runKillMatrix({
      setup: (dir) => writeFileSync(join(dir, 'README'), 'pristine set'),
      args: ({ path }) => ['create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata,cluster_size=4k', path('new.qcow2'), '64M'],
      check: (st) => {
        expect(readFileSync(st.pristine('README'), 'utf8')).toBe('pristine set');
        const p = st.path('new.qcow2');
        if (st.killed) {
          expect(st.result.signal).toBe('SIGKILL');
          states.push({ k: st.k, file: existsSync(p) ? readFileSync(p) : undefined });
        } else {
          expect(st.result.status, st.result.stderr).toBe(0);
          finals.push(readFileSync(p));
        }
      },
    });
    expect(r.completedAt).toBeGreaterThanOrEqual(3);
    expect(r.killed).toEqual(range(1, r.completedAt! - 1));
    expect(finals).toHaveLength(1);
    // Killed after its first write, the file is unfinished; killed after its last write (before
    // the flush), it is complete: the page cache outlives the process.
    expect(states[0]!.file?.equals(finals[0]!), 'kill after write 1').toBe(false);
    expect(states[states.length - 1]!.file?.equals(finals[0]!), 'kill after the last write').toBe(true);
  });
});
