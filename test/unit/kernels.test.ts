// WebAssembly kernels versus the plain-TS reference: spec examples plus seeded random inputs.
import { afterEach, describe, expect, it } from 'vitest';
import { ExtentFlag, InvalidReason, kernels, L2_RUN_BYTES, L2Stat, LAYER_EXTENT_BYTES, MAP_ENTRY_BYTES, MAP_JSON_MAX_ENTRY_BYTES, MAP_PENDING, RunKind } from '../../src/kernels/index.js';
import { referenceKernels } from '../helpers/kernel-reference.js';

const k = kernels();
const ref = referenceKernels(k);

/** mulberry32: small deterministic PRNG. */
function prng(seed: number) {
  let s = seed >>> 0;
  const next = () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = Math.imul(s ^ (s >>> 15), s | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
  return { next, int: (n: number) => Math.floor(next() * n), chance: (p: number) => next() < p };
}

/** Test allocations, released after each test (or each round of the big loops). */
const live: number[] = [];
function alloc(size: number, zeroed = false): number {
  const ptr = zeroed ? k.allocZeroed(size) : k.alloc(size);
  live.push(ptr);
  return ptr;
}
function release(): void {
  for (const ptr of live.splice(0)) k.free(ptr);
}
afterEach(release);

const COPIED = 1n << 63n;
const COMPRESSED = 1n << 62n;

/** Allocates and writes big-endian u64 words. */
function putWords(words: bigint[]): number {
  const ptr = alloc(words.length * 8);
  const dv = new DataView(k.memory.buffer);
  words.forEach((w, i) => dv.setBigUint64(ptr + i * 8, BigInt.asUintN(64, w)));
  return ptr;
}

function putBytes(bytes: Uint8Array, offset = 0): number {
  const ptr = alloc(bytes.length + offset) + offset;
  k.u8(ptr, bytes.length).set(bytes);
  return ptr;
}

/** Byte-wise equality of two wasm ranges (toEqual on MiB-sized arrays is very slow). */
function expectSameBytes(a: number, b: number, n: number): void {
  const x = k.u8(a, n);
  const y = k.u8(b, n);
  const diff = Buffer.compare(x, y) === 0 ? -1 : x.findIndex((v, i) => v !== y[i]);
  expect(diff, 'first differing byte').toBe(-1);
}

function randomBytes(r: ReturnType<typeof prng>, n: number, density = 0.5): Uint8Array {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = r.chance(density) ? r.int(256) : 0;
  return b;
}

interface RunRecord {
  firstUnit: number;
  unitCount: number;
  kind: number;
  reason: number;
  hostOffset: number;
  extra: number;
}

function readRuns(out: number, n: number): RunRecord[] {
  const dv = new DataView(k.memory.buffer);
  return Array.from({ length: n }, (_, i) => {
    const at = out + i * L2_RUN_BYTES;
    return {
      firstUnit: dv.getUint32(at, true),
      unitCount: dv.getUint32(at + 4, true),
      kind: dv.getUint32(at + 8, true),
      reason: dv.getUint32(at + 12, true),
      hostOffset: dv.getFloat64(at + 16, true),
      extra: dv.getFloat64(at + 24, true),
    };
  });
}

function scan(impl = k, table: number, first: number, count: number, extended: boolean, cb: number, maxRuns = 4096) {
  const out = k.alloc(maxRuns * L2_RUN_BYTES);
  const n = impl.l2Scan(table, first, count, extended, cb, out, maxRuns);
  const result = { runs: readRuns(out, n), consumed: impl.scanConsumed() };
  k.free(out);
  return result;
}

function run(firstUnit: number, unitCount: number, kind: RunKind, hostOffset = 0, extra = 0, reason = 0): RunRecord {
  return { firstUnit, unitCount, kind, reason, hostOffset, extra };
}

// --- random L2 tables -------------------------------------------------------------------------

/** A word1 drawn from the interesting shapes (valid, invalid, edge cases). */
function randomWord(r: ReturnType<typeof prng>, cb: number, prevHost: bigint): bigint {
  const cs = 1n << BigInt(cb);
  const host = r.chance(0.5) && prevHost ? prevHost + cs : BigInt(r.int(4096)) * cs;
  const copied = r.chance(0.5) ? COPIED : 0n;
  switch (r.int(12)) {
    case 0:
    case 1:
      return 0n;
    case 2:
      return 1n;
    case 3:
      return copied | host | 1n;
    case 4: {
      const x = BigInt(62 - (cb - 8));
      const sectors = BigInt(r.int(1 << (cb - 8)));
      const offset = BigInt(r.int(2 ** 30)) + (r.chance(0.05) ? 1n << (x - 1n) : 0n);
      return COMPRESSED | (sectors << x) | offset;
    }
    case 5:
      return copied | host | (1n << BigInt(r.chance(0.5) ? 1 + r.int(8) : 56 + r.int(6)));
    case 6:
      return copied | (host + 512n * BigInt(1 + r.int(Math.max(1, Number(cs / 512n) - 1))));
    case 7:
      return r.chance(0.5) ? copied | (1n << 53n) : COPIED;
    default:
      return copied | host;
  }
}

function randomBitmap(r: ReturnType<typeof prng>): bigint {
  const rand32 = () => BigInt(r.int(2 ** 32));
  switch (r.int(8)) {
    case 0:
    case 1:
      return 0n;
    case 2:
      return 0xffff_ffffn;
    case 3: {
      const alloc = rand32();
      return ((~alloc & 0xffff_ffffn & rand32()) << 32n) | alloc; // disjoint zero and alloc bits
    }
    case 4:
      return rand32() << 32n;
    case 5:
      return (rand32() << 32n) | rand32(); // likely overlapping
    default: {
      const run = BigInt(r.int(33));
      return (1n << run) - 1n;
    }
  }
}

function randomTable(r: ReturnType<typeof prng>, entries: number, extended: boolean, cb: number): number {
  const words: bigint[] = [];
  let prevHost = 0n;
  for (let i = 0; i < entries; i++) {
    const w = randomWord(r, cb, prevHost);
    prevHost = w & 0x00ff_ffff_ffff_fe00n;
    words.push(w);
    if (extended) words.push(r.chance(0.9) ? randomBitmap(r) : 0n);
  }
  return putWords(words);
}

/** Merges runs that a batched scan split at batch boundaries. */
function mergeRuns(runs: RunRecord[], unitSize: number): RunRecord[] {
  const merged: RunRecord[] = [];
  for (const r of runs) {
    const last = merged[merged.length - 1];
    const contiguous =
      last &&
      last.kind === r.kind &&
      last.reason === r.reason &&
      r.kind < RunKind.Compressed &&
      (r.hostOffset === 0 ? last.hostOffset === 0 : last.hostOffset !== 0 && r.hostOffset === last.hostOffset + last.unitCount * unitSize);
    if (contiguous) last.unitCount += r.unitCount;
    else merged.push({ ...r });
  }
  return merged;
}

describe('l2Scan: spec examples', () => {
  it('decodes the verified compressed descriptor (64 KiB clusters)', () => {
    const t = putWords([0x4040_0000_0005_01dan]);
    expect(scan(k, t, 0, 1, false, 16).runs).toEqual([run(0, 1, RunKind.Compressed, 0x501da, 550)]);
  });

  it('classifies the standard cluster states and merges contiguous runs', () => {
    const cs = 0x10000;
    const t = putWords([0n, 0n, 1n, 1n, COPIED | 0x50000n, COPIED | 0x60000n, 0x80000n, COPIED | 0x90001n, 0xa0001n, COPIED, 1n]);
    // Valid runs carry the COPIED flag in `reason` and never merge across a COPIED change.
    expect(scan(k, t, 0, 11, false, 16).runs).toEqual([
      run(0, 2, RunKind.Unallocated),
      run(2, 2, RunKind.ZeroPlain),
      run(4, 2, RunKind.Data, 5 * cs, 0, 1),
      run(6, 1, RunKind.Data, 8 * cs),
      run(7, 1, RunKind.ZeroAlloc, 9 * cs, 0, 1),
      run(8, 1, RunKind.ZeroAlloc, 10 * cs),
      run(9, 1, RunKind.Unallocated, 0, 0, 1), // COPIED without an offset still maps nothing
      run(10, 1, RunKind.ZeroPlain),
    ]);
  });

  it('never merges compressed entries', () => {
    const t = putWords([0x4040_0000_0005_01dan, 0x4040_0000_0005_01dan]);
    expect(scan(k, t, 0, 2, false, 16).runs.map((r) => r.unitCount)).toEqual([1, 1]);
  });

  it('expands extended L2 entries (128 KiB clusters, 4 KiB subclusters)', () => {
    const host = 0xa0000;
    const t = putWords([COPIED | 0xa0000n, 0b10n, COPIED | 0xc0000n, 0b1111n, 0n, 0b11n << 32n]);
    expect(scan(k, t, 0, 3, true, 17).runs).toEqual([
      run(0, 1, RunKind.Unallocated, host, 0, 1),
      run(1, 1, RunKind.Data, host + 4096, 0, 1),
      run(2, 30, RunKind.Unallocated, host + 8192, 0, 1),
      run(32, 4, RunKind.Data, 0xc0000, 0, 1),
      run(36, 28, RunKind.Unallocated, 0xc0000 + 4 * 4096, 0, 1),
      run(64, 2, RunKind.ZeroPlain),
      run(66, 30, RunKind.Unallocated),
    ]);
  });

  it('reports zero subclusters of an allocated cluster as ZeroAlloc and merges across entries', () => {
    const t = putWords([0x20000n, 0xffff_ffffn, 0x40000n, 0xffffn << 32n, 0x60000n, 0n, 0x80000n, 0xffff_ffffn]);
    expect(scan(k, t, 0, 4, true, 17).runs).toEqual([
      run(0, 32, RunKind.Data, 0x20000),
      run(32, 16, RunKind.ZeroAlloc, 0x40000),
      run(48, 48, RunKind.Unallocated, 0x50000), // entry 2's host range continues entry 1's tail
      run(96, 32, RunKind.Data, 0x80000),
    ]);
  });

  it('does not merge host-less units into a following host range', () => {
    // Entry 1's host (one cluster = 32 subclusters) equals what entry 0's run would "continue".
    const t = putWords([0n, 0n, 0x20000n, 0n]);
    expect(scan(k, t, 0, 2, true, 17).runs).toEqual([run(0, 32, RunKind.Unallocated), run(32, 32, RunKind.Unallocated, 0x20000)]);
  });

  it('reports every kind of invalid entry, one record per entry', () => {
    const std = putWords([0x50002n, 1n << 56n, 0x50200n, 1n << 53n]);
    expect(scan(k, std, 0, 4, false, 16).runs).toEqual([
      run(0, 1, RunKind.Invalid, 0x50000, 0, InvalidReason.ReservedBits),
      run(1, 1, RunKind.Invalid, 0, 0, InvalidReason.ReservedBits),
      run(2, 1, RunKind.Invalid, 0x50200, 0, InvalidReason.Unaligned),
      run(3, 1, RunKind.Invalid, 2 ** 53, 0, InvalidReason.OffsetTooLarge),
    ]);
    const ext = putWords([0x20001n, 0n, 0x20000n, 0x1_0000_0001n, 0n, 1n, 0x4040_0000_0005_01dan, 1n << 40n, 0n, 0n]);
    expect(scan(k, ext, 0, 5, true, 17).runs).toEqual([
      run(0, 32, RunKind.Invalid, 0x20000, 0, InvalidReason.ReservedBits),
      run(32, 32, RunKind.Invalid, 0x20000, 0, InvalidReason.SubclusterAllocAndZero),
      run(64, 32, RunKind.Invalid, 0, 0, InvalidReason.SubclusterNoHost),
      // 128 KiB clusters: x = 53, so bit 54 lands in the sector field (2 => 3 sectors).
      run(96, 32, RunKind.Invalid, 0x501da, 3 * 512 - 0x1da, InvalidReason.CompressedBitmap),
      run(128, 32, RunKind.Unallocated),
    ]);
  });

  it('offsets firstUnit by firstEntry and stops cleanly when out fills up', () => {
    const t = putWords([0x10000n, 0x30000n, 0x50000n, 0x70000n]);
    const out = alloc(2 * L2_RUN_BYTES);
    expect(k.l2Scan(t, 1, 3, false, 16, out, 2)).toBe(2);
    expect(k.scanConsumed()).toBe(2);
    expect(readRuns(out, 2)).toEqual([run(1, 1, RunKind.Data, 0x30000), run(2, 1, RunKind.Data, 0x50000)]);
    expect(k.l2Scan(t, 0, 4, false, 16, out, 0)).toBe(0);
    expect(k.scanConsumed()).toBe(0);
  });

  it('rolls back a partially emitted extended entry', () => {
    // Entry 1 would first extend run 0 (contiguous Data), then need 31 more runs.
    const t = putWords([0x20000n, 0xffff_ffffn, 0x40000n, 0x5555_5555n]);
    const out = alloc(16 * L2_RUN_BYTES);
    expect(k.l2Scan(t, 0, 2, true, 17, out, 16)).toBe(1);
    expect(k.scanConsumed()).toBe(1);
    expect(readRuns(out, 1)).toEqual([run(0, 32, RunKind.Data, 0x20000)]);
  });
});

describe('l2Scan: random tables against the reference', () => {
  it.each([false, true])('extended=%s', (extended) => {
    const r = prng(extended ? 2 : 1);
    for (let round = 0; round < 150; round++) {
      const cb = extended ? 14 + r.int(8) : 9 + r.int(13);
      const entries = 1 + r.int(600);
      const table = randomTable(r, entries, extended, cb);
      const first = r.int(entries);
      const count = entries - first - r.int(entries - first);
      const maxRuns = r.chance(0.5) ? 4096 : 32 + r.int(40);
      const got = scan(k, table, first, count, extended, cb, maxRuns);
      expect(got).toEqual(scan(ref, table, first, count, extended, cb, maxRuns));
      if (maxRuns === 4096) expect(got.consumed).toBe(count);
      release();
    }
  });

  it.each([false, true])('batched scans resume without losing units (extended=%s)', (extended) => {
    const r = prng(extended ? 4 : 3);
    for (let round = 0; round < 40; round++) {
      const cb = extended ? 14 + r.int(8) : 9 + r.int(13);
      const entries = 1 + r.int(500);
      const table = randomTable(r, entries, extended, cb);
      const maxRuns = (extended ? 32 : 1) + r.int(20);
      const batches: RunRecord[] = [];
      for (let at = 0; at < entries; ) {
        const { runs, consumed } = scan(k, table, at, entries - at, extended, cb, maxRuns);
        expect(consumed).toBeGreaterThan(0);
        batches.push(...runs);
        at += consumed;
      }
      const unitSize = 2 ** (extended ? cb - 5 : cb);
      expect(mergeRuns(batches, unitSize)).toEqual(scan(k, table, 0, entries, extended, cb, 1 << 16).runs);
      release();
    }
  });
});

describe('l2Scan: long runs (the vectorised run extension)', () => {
  it.each([false, true])('matches the reference on tables of long contiguous runs, near 2^53 too (copied=%s)', (copiedRuns) => {
    const r = prng(copiedRuns ? 12 : 11);
    for (let round = 0; round < 60; round++) {
      const cb = 9 + r.int(13);
      const cs = 1n << BigInt(cb);
      const words: bigint[] = [];
      const entries = 1 + r.int(700);
      while (words.length < entries) {
        const len = 1 + r.int(r.chance(0.5) ? 9 : 120);
        const kind = r.int(4); // 0 unallocated, 1 data, 2 zero-alloc, 3 zero-plain
        const flags = (copiedRuns || r.chance(0.3) ? COPIED : 0n) | (kind >= 2 ? 1n : 0n);
        // Host offsets ending just below, at or past 2^53: the run must stop where entries turn invalid.
        let host = r.chance(0.2) ? (1n << 53n) - BigInt(r.int(6)) * cs : BigInt(1 + r.int(1 << 20)) * cs;
        for (let i = 0; i < len && words.length < entries; i++, host += cs) {
          if (kind === 0 || kind === 3) words.push(kind === 0 ? 0n : 1n);
          else words.push(flags | host);
        }
        // Sometimes a lone break inside the run (a different word where the next was expected).
        if (r.chance(0.3) && words.length) words[r.int(words.length)] = r.chance(0.5) ? 0n : BigInt(r.int(1 << 20)) * cs;
      }
      const table = putWords(words);
      const first = r.int(entries);
      expect(scan(k, table, first, entries - first, false, cb)).toEqual(scan(ref, table, first, entries - first, false, cb));
      release();
    }
  });
});

// --- block status records ----------------------------------------------------------------------

/** Records as arrays of numbers (f64 fields). */
function readF64(ptr: number, n: number, fields: number): number[][] {
  const v = new Float64Array(k.memory.buffer.slice(ptr, ptr + n * fields * 8));
  return Array.from({ length: n }, (_, i) => Array.from(v.subarray(i * fields, (i + 1) * fields)));
}
function putF64(rows: number[][], fields: number, room = rows.length): number {
  const ptr = alloc(Math.max(1, room) * fields * 8);
  new Float64Array(k.memory.buffer, ptr, rows.length * fields).set(rows.flat());
  return ptr;
}

/** Random layer extent records in guest order from `start`, covering `length` bytes. */
function randomExtents(r: ReturnType<typeof prng>, start: number, length: number, unit: number): number[][] {
  const out: number[][] = [];
  let pos = start;
  let host = r.int(1 << 20) * unit;
  while (pos < start + length) {
    const len = Math.min(start + length - pos, (1 + r.int(r.chance(0.2) ? 200 : 8)) * unit);
    const kind = r.int(6);
    const contiguous = r.chance(0.5);
    if (!contiguous) host = r.int(1 << 20) * unit;
    let row: number[];
    if (kind === 0) row = [pos, len, -1, 0, 0, 0];
    else if (kind === 1) row = [pos, len, host, ExtentFlag.Allocated | ExtentFlag.Data, 0, 0];
    else if (kind === 2) row = [pos, len, -1, ExtentFlag.Allocated | ExtentFlag.Zero, 0, 0];
    else if (kind === 3) row = [pos, len, host, ExtentFlag.Allocated | ExtentFlag.Zero, 0, 0];
    else if (kind === 4) row = [pos, len, -1, ExtentFlag.Allocated | ExtentFlag.Data | ExtentFlag.Compressed, r.int(1 << 30), 1 + r.int(70000)];
    else row = [pos, len, host, 0, 0, 0]; // unallocated with a host offset (extended L2)
    out.push(row);
    pos += len;
    host += len;
  }
  return out;
}

describe('block status records', () => {
  const E = LAYER_EXTENT_BYTES / 8;

  it('l2Records turns l2Scan runs into clipped, merged extents like the reference (errors too)', () => {
    const r = prng(31);
    for (let round = 0; round < 200; round++) {
      const extended = r.chance(0.3);
      const cb = extended ? 14 + r.int(8) : 9 + r.int(13);
      const entries = 1 + r.int(400);
      const table = randomTable(r, entries, extended, cb);
      const unitBits = extended ? cb - 5 : cb;
      const tableStart = r.chance(0.2) ? 2 ** 45 : r.int(1000) * entries * 2 ** cb;
      const span = entries * 2 ** cb;
      const clipStart = tableStart + (r.chance(0.5) ? 0 : r.int(span));
      const clipEnd = Math.min(tableStart + span, clipStart + 1 + r.int(span));
      const first = Math.floor((clipStart - tableStart) / 2 ** cb);
      const count = Math.ceil((clipEnd - tableStart) / 2 ** cb) - first;
      const maxRuns = 40 + r.int(64); // an extended entry may need 32 runs
      const runs = alloc(maxRuns * L2_RUN_BYTES);
      const v2 = r.chance(0.2);
      // Feed the scan in batches into one record list, as L2Tables does.
      const results = [k, ref].map((impl) => {
        const out = alloc(count * (extended ? 32 : 1) * LAYER_EXTENT_BYTES + 64);
        let n = 0;
        let at = first;
        const trace: number[] = [];
        while (at < first + count) {
          const nr = k.l2Scan(table, at, first + count - at, extended, cb, runs, maxRuns);
          expect(k.scanConsumed()).toBeGreaterThan(0);
          at += k.scanConsumed();
          const got = impl.l2Records(runs, nr, unitBits, tableStart, clipStart, clipEnd, v2, out, n, 1 << 20);
          if (got < 0) {
            trace.push(got, got === -1 ? impl.statusErrorRun() : impl.statusErrorStart());
            break;
          }
          n = got;
        }
        return { records: readF64(out, n, E), trace };
      });
      expect(results[0]).toEqual(results[1]);
      release();
    }
  });

  it('l2Records reports a full buffer', () => {
    const runs = alloc(2 * L2_RUN_BYTES);
    new Uint32Array(k.memory.buffer, runs, 16).set([0, 1, RunKind.ZeroPlain, 0, 0, 0, 0, 0, 1, 1, RunKind.ZeroAlloc, 0, 0, 0, 0, 0]);
    new Float64Array(k.memory.buffer, runs + L2_RUN_BYTES + 16, 1)[0] = 65536;
    const out = alloc(2 * LAYER_EXTENT_BYTES);
    expect(k.l2Records(runs, 2, 16, 0, 0, 1 << 30, false, out, 0, 1)).toBe(-3);
    expect(k.l2Records(runs, 2, 16, 0, 0, 1 << 30, false, out, 0, 2)).toBe(2);
  });

  it('recordsDataRanges / recordsSplitHoles split data extents at host holes like the reference', () => {
    const r = prng(32);
    for (let round = 0; round < 150; round++) {
      const unit = 512 * 2 ** r.int(8);
      const rows = randomExtents(r, r.int(1000) * unit, (1 + r.int(300)) * unit, unit);
      const recs = putF64(rows, E);
      const fileSize = r.chance(0.5) ? 2 ** 40 : r.int(1 << 21) * unit;
      const ranges = alloc(rows.length * 16 + 16);
      const m = k.recordsDataRanges(recs, rows.length, fileSize, ranges);
      expect(m).toBe(ref.recordsDataRanges(recs, rows.length, fileSize, ranges));
      // A probe result: sorted data pairs inside each range.
      const probed: number[] = [];
      for (const [s, e] of readF64(ranges, m, 2)) {
        const pairs: number[] = [];
        let pos = s!;
        while (pos < e! && r.chance(0.7)) {
          const ds = pos + (r.chance(0.5) ? 0 : r.int(4) * 512);
          const de = Math.min(e!, ds + (1 + r.int(8)) * 512);
          if (ds >= de) break;
          pairs.push(ds, de);
          pos = de + (r.chance(0.5) ? 0 : 512);
        }
        probed.push(pairs.length / 2, ...pairs);
      }
      const p = putF64([probed], probed.length || 1);
      const room = rows.length + probed.length + 1;
      const [a, b] = [k, ref].map((impl) => {
        const out = alloc(room * LAYER_EXTENT_BYTES);
        const n = impl.recordsSplitHoles(recs, rows.length, p, out, room);
        return n < 0 ? n : readF64(out, n, E);
      });
      expect(a).toEqual(b);
      release();
    }
  });

  it('mapMergeLayer resolves pending ranges like the reference', () => {
    const r = prng(33);
    for (let round = 0; round < 200; round++) {
      const unit = 512 * 2 ** r.int(8);
      const start = r.int(1000) * unit;
      const length = (1 + r.int(400)) * unit;
      // The current records: finals and pending ranges alternating at random.
      const cur: number[][] = [];
      for (let pos = start; pos < start + length; ) {
        const len = Math.min(start + length - pos, (1 + r.int(40)) * unit - (unit > 512 && r.chance(0.1) ? 512 : 0));
        cur.push(r.chance(0.5) ? [pos, len, -1, MAP_PENDING] : [pos, len, r.chance(0.5) ? -1 : r.int(1 << 20) * 512, r.int(3) * 8 + r.int(8)]);
        pos += len;
      }
      const lay = randomExtents(r, start, length, unit);
      const depth = r.int(5);
      const belowEnd = r.chance(0.3) ? -1 : r.chance(0.5) ? 2 ** 50 : start + r.int(length + unit);
      const c = putF64(cur, 4);
      const l = putF64(lay, E);
      const room = 3 * cur.length + 2 * lay.length + 1;
      const [a, b] = [k, ref].map((impl) => {
        const out = alloc(room * MAP_ENTRY_BYTES);
        const n = impl.mapMergeLayer(c, cur.length, l, lay.length, depth, belowEnd, out, room);
        return { recs: n < 0 ? n : readF64(out, n, 4), pending: impl.mapPendingLeft() };
      });
      expect(a).toEqual(b);
      // Output covers exactly the input range, in order.
      if (Array.isArray(a.recs)) {
        let pos = start;
        for (const [s, len] of a.recs) {
          expect(s).toBe(pos);
          pos += len!;
        }
        expect(pos).toBe(start + length);
      }
      release();
    }
  });

  it('refcountCountNonZero counts like the reference for every order', () => {
    const r = prng(34);
    for (let order = 0; order <= 6; order++) {
      for (let round = 0; round < 20; round++) {
        const bytes = randomBytes(r, 512 + r.int(4096), r.chance(0.5) ? 0.05 : 0.6);
        const block = putBytes(bytes);
        const entries = (bytes.length * 8) >> order;
        const from = r.int(entries);
        const to = from + r.int(entries - from + 1);
        expect(k.refcountCountNonZero(block, from, to, order)).toBe(ref.refcountCountNonZero(block, from, to, order));
      }
      release();
    }
  });
});

// --- accounting -------------------------------------------------------------------------------

function account(impl: typeof k, table: number, entries: number, extended: boolean, cb: number, refsInit: Uint32Array) {
  const refs = putBytes(new Uint8Array(refsInit.buffer.slice(0)));
  const stats = alloc(64);
  impl.l2AccountRefs(table, entries, extended, cb, refs, refsInit.length, stats);
  const result = {
    refs: new Uint32Array(k.u8(refs, refsInit.length * 4).slice().buffer),
    stats: Array.from(new Float64Array(k.u8(stats, 64).slice().buffer)),
  };
  return result;
}

describe('l2AccountRefs', () => {
  it('counts references and QEMU fragmentation stats', () => {
    const cs = 0x10000n;
    const compressed = COMPRESSED | (1n << 54n) | 0xcff00n; // 768 bytes spanning clusters 12 and 13
    const t = putWords([COPIED | (5n * cs), COPIED | (6n * cs), 10n * cs, (11n * cs) | 1n, compressed, 12n * cs, 2n, 1n, 0n, 100n * cs]);
    const refs = new Uint32Array(20);
    refs[5] = 0xffff_ffff; // saturates
    const { refs: got, stats } = account(k, t, 10, false, 16, refs);
    const expected = new Uint32Array(20);
    expected[5] = 0xffff_ffff;
    expected[6] = expected[10] = expected[11] = expected[13] = 1;
    expected[12] = 2;
    expect(got).toEqual(expected);
    expect(stats.slice(0, 5)).toEqual([7, 1, 3, 1, 1]);
    expect(stats[L2Stat.Fragmented]).toBe(3);
    expect(stats.slice(5)).toEqual([0, 0, 0]);
  });

  it('counts an extended entry once whatever its bitmap, and skips invalid ones', () => {
    const t = putWords([0x20000n, 0n, 0x40000n, 0xffn, 0x60000n, 0xfn << 32n, 0n, 1n, 0n, 0x3n << 32n]);
    const { refs, stats } = account(k, t, 5, true, 17, new Uint32Array(8));
    expect(Array.from(refs)).toEqual([0, 1, 1, 1, 0, 0, 0, 0]);
    expect(stats.slice(0, 5)).toEqual([3, 0, 0, 1, 0]);
  });

  it.each([false, true])('matches the reference on random tables (extended=%s)', (extended) => {
    const r = prng(extended ? 6 : 5);
    for (let round = 0; round < 150; round++) {
      const cb = extended ? 14 + r.int(8) : 9 + r.int(13);
      const entries = 1 + r.int(600);
      const table = randomTable(r, entries, extended, cb);
      const refs = new Uint32Array(1 + r.int(5000)).map(() => (r.chance(0.01) ? 0xffff_ffff : r.int(3)));
      expect(account(k, table, entries, extended, cb, refs)).toEqual(account(ref, table, entries, extended, cb, refs));
      release();
    }
  });
});

function copiedMismatches(impl: typeof k, table: number, entries: number, extended: boolean, cb: number, refsInit: Uint32Array, skip: number): number[] {
  const refs = alloc(refsInit.length * 4);
  k.u8(refs, refsInit.length * 4).set(new Uint8Array(refsInit.buffer));
  const out = alloc(entries * 4);
  const n = impl.l2CopiedMismatches(table, entries, extended, cb, refs, refsInit.length, skip, out);
  return Array.from(new Uint32Array(k.u8(out, n * 4).slice().buffer));
}

describe('l2CopiedMismatches', () => {
  it('lists entries whose COPIED flag disagrees with refcount == 1', () => {
    const cs = 0x10000n;
    const compressed = COMPRESSED | 0x50000n;
    // 0: COPIED, rc 1 (ok); 1: no COPIED, rc 1 (bad); 2: COPIED, rc 2 (bad); 3: rc 2 no COPIED (ok);
    // 4: compressed (skipped); 5: unallocated; 6: zero-alloc COPIED rc 1 (ok); 7: past refs; 8: unreadable
    const t = putWords([COPIED | (1n * cs), 2n * cs, COPIED | (3n * cs), 4n * cs, compressed, 0n, COPIED | (5n * cs) | 1n, 50n * cs, COPIED | (6n * cs)]);
    const refs = new Uint32Array([0, 1, 1, 2, 2, 1, 0xfffffffe]);
    expect(copiedMismatches(k, t, 9, false, 16, refs, 0xfffffffe)).toEqual([1, 2, (7 | 0x80000000) >>> 0]);
  });

  it.each([false, true])('matches the reference on random tables (extended=%s)', (extended) => {
    const r = prng(extended ? 8 : 7);
    for (let round = 0; round < 150; round++) {
      const cb = extended ? 14 + r.int(8) : 9 + r.int(13);
      const entries = 1 + r.int(600);
      const table = randomTable(r, entries, extended, cb);
      const refs = new Uint32Array(1 + r.int(5000)).map(() => r.int(3));
      expect(copiedMismatches(k, table, entries, extended, cb, refs, 2)).toEqual(copiedMismatches(ref, table, entries, extended, cb, refs, 2));
      release();
    }
  });
});

// --- refcounts --------------------------------------------------------------------------------

describe('refcount blocks', () => {
  it('packs narrow widths lowest entry first and wide widths big-endian', () => {
    const block = alloc(64, true);
    const byte0 = (order: number, n: number) => {
      k.u8(block, 64).fill(0);
      for (let i = 0; i < n; i++) k.refcountSet(block, i, order, 1);
      return k.u8(block, 1)[0];
    };
    expect(byte0(2, 2)).toBe(0x11);
    expect(byte0(1, 4)).toBe(0x55);
    expect(byte0(0, 4)).toBe(0x0f);
    k.u8(block, 64).fill(0);
    k.refcountSet(block, 1, 4, 0x1234);
    expect(Array.from(k.u8(block, 4))).toEqual([0, 0, 0x12, 0x34]);
    k.refcountSet(block, 1, 6, 2 ** 40 + 5);
    expect(Array.from(k.u8(block + 8, 8))).toEqual([0, 0, 1, 0, 0, 0, 0, 5]);
    expect(k.refcountGet(block, 1, 6)).toBe(2 ** 40 + 5);
    k.refcountSet(block, 3, 1, 3);
    expect(k.refcountGet(block, 3, 1)).toBe(3);
    expect(k.refcountGet(block, 2, 1)).toBe(0);
  });

  it('get/set match the reference for every order', () => {
    const r = prng(7);
    const size = 4096;
    for (let order = 0; order <= 6; order++) {
      const initial = randomBytes(r, size);
      const a = putBytes(initial);
      const b = putBytes(initial);
      const entries = (size * 8) >> order;
      for (let i = 0; i < 2000; i++) {
        const index = r.int(entries);
        const value = order === 6 ? r.int(2 ** 53) : r.int(2 ** Math.min(32, 1 << order));
        k.refcountSet(a, index, order, value);
        ref.refcountSet(b, index, order, value);
        expect(k.refcountGet(a, index, order)).toBe(value);
        const probe = r.int(entries);
        expect(k.refcountGet(a, probe, order)).toBe(ref.refcountGet(b, probe, order));
      }
      expectSameBytes(a, b, size);
    }
  });

  it('refcountCompare finds the same mismatches as the reference', () => {
    const r = prng(8);
    for (let round = 0; round < 140; round++) {
      const order = round % 7;
      const count = 1 + r.int(3000);
      const first = r.int(100);
      const maxCount = order === 6 ? 2 ** 32 : 2 ** Math.min(32, 1 << order);
      const counts = new Uint32Array(first + count).map(() => (r.chance(0.02) ? 0xffff_ffff : r.int(Math.min(maxCount, 4))));
      const refs = putBytes(new Uint8Array(counts.buffer));
      const block = alloc(Math.ceil((count << order) / 8) + 16, true);
      for (let i = 0; i < count; i++) {
        const want = counts[first + i]! % maxCount;
        const stored = r.chance(0.05) ? r.int(maxCount) : order === 6 && r.chance(0.01) ? want + 2 ** 32 : want;
        k.refcountSet(block, i, order, stored);
      }
      const maxOut = r.chance(0.5) ? count : r.int(8);
      const results = [k, ref].map((impl) => {
        const out = alloc(4 * Math.max(1, maxOut));
        const total = impl.refcountCompare(refs, first, count, block, order, out, maxOut);
        return { total, indices: Array.from(new Uint32Array(k.u8(out, 4 * Math.min(total, maxOut)).slice().buffer)) };
      });
      expect(results[0]).toEqual(results[1]);
      release();
    }
  });

  it('a 64-bit count above 2^32-1 never equals a computed count', () => {
    const refs = putBytes(new Uint8Array(new Uint32Array([0xffff_ffff, 7]).buffer));
    const block = alloc(16, true);
    k.refcountSet(block, 0, 6, 0xffff_ffff);
    k.refcountSet(block, 1, 6, 2 ** 32 + 7);
    const out = alloc(16);
    expect(k.refcountCompare(refs, 0, 2, block, 6, out, 4)).toBe(1);
    expect(new Uint32Array(k.memory.buffer, out, 1)[0]).toBe(1);
  });

  it('refsAddRange saturates, clips to nClusters and matches the reference', () => {
    const r = prng(9);
    for (let round = 0; round < 200; round++) {
      const n = 1 + r.int(300);
      const counts = new Uint32Array(n).map(() => (r.chance(0.1) ? 0xffff_ffff : r.int(5)));
      const a = putBytes(new Uint8Array(counts.buffer));
      const b = putBytes(new Uint8Array(counts.buffer));
      const first = r.chance(0.05) ? 2 ** 40 : r.int(n + 20);
      const count = r.chance(0.05) ? 2 ** 45 : r.int(n + 20);
      expect(k.refsAddRange(a, n, first, count)).toBe(ref.refsAddRange(b, n, first, count));
      expectSameBytes(a, b, n * 4);
      release();
    }
    const p = putBytes(new Uint8Array(new Uint32Array([0xffff_fffe, 0xffff_ffff, 0]).buffer));
    expect(k.refsAddRange(p, 3, 0, 5)).toBe(2);
    expect(Array.from(new Uint32Array(k.memory.buffer, p, 3))).toEqual([0xffff_ffff, 0xffff_ffff, 1]);
  });
});

// --- bitmaps ----------------------------------------------------------------------------------

describe('bitmaps', () => {
  it('uses qcow2 bit order (LSB first)', () => {
    const p = alloc(16, true);
    k.setBits(p, 3, 1); // 12 KiB with 4 KiB granularity
    k.setBits(p, 80, 1); // 5 MiB with 64 KiB granularity
    expect(k.u8(p, 16)[0]).toBe(0x08);
    expect(k.u8(p, 16)[10]).toBe(0x01);
    expect(k.popcount(p, 16)).toBe(2);
  });

  it('or / and / andNot match the reference for any length and alignment', () => {
    const r = prng(10);
    const ops = ['bitmapOr', 'bitmapAnd', 'bitmapAndNot'] as const;
    for (let round = 0; round < 150; round++) {
      const n = round < 140 ? r.int(300) : 1 << 20;
      const dst = randomBytes(r, n);
      const src = randomBytes(r, n);
      const op = ops[round % 3]!;
      const [d1, d2, s] = [putBytes(dst, r.int(16)), putBytes(dst, r.int(16)), putBytes(src, r.int(16))];
      k[op](d1, s, n);
      ref[op](d2, s, n);
      expectSameBytes(d1, d2, n);
      release();
    }
  });

  it('popcount matches the reference (unaligned heads/tails, large buffers)', () => {
    const r = prng(11);
    for (let round = 0; round < 100; round++) {
      const n = round < 95 ? r.int(2000) : (1 << 20) + r.int(100);
      const p = putBytes(randomBytes(r, n, r.next()), r.int(16));
      expect(k.popcount(p, n)).toBe(ref.popcount(p, n));
      release();
    }
    const ones = putBytes(new Uint8Array(8 << 20).fill(0xff));
    expect(k.popcount(ones, 8 << 20)).toBe(64 << 20);
  });

  it('setBits / clearBits touch exactly the range', () => {
    const r = prng(12);
    for (let round = 0; round < 300; round++) {
      const n = 1 + r.int(200);
      const init = randomBytes(r, n);
      const a = putBytes(init);
      const b = putBytes(init);
      const start = r.int(n * 8);
      const len = r.int(n * 8 - start + 1);
      const op = round % 2 ? 'setBits' : 'clearBits';
      k[op](a, start, len);
      ref[op](b, start, len);
      expectSameBytes(a, b, n);
    }
  });

  it('bitmapConvertOr matches the reference at every granularity ratio (random runs, random sizes)', () => {
    const r = prng(13);
    for (let round = 0; round < 400; round++) {
      // A disk of `units` units of the finer granularity; bitmaps of both granularities cover it.
      const shift = r.int(15) - 7;
      const units = 1 + r.int(round < 380 ? 3000 : 200_000);
      const fine = Math.abs(shift);
      const coarseBits = Math.ceil(units / 2 ** fine);
      const [srcBits, dstBits] = shift >= 0 ? [units, coarseBits] : [coarseBits, units];
      const srcBytes = Math.ceil(srcBits / 8);
      const dstBytes = Math.ceil(dstBits / 8);
      // Runs of set bits (dense, sparse, alternating) in src, clean tail bits as QEMU keeps them.
      const src = new Uint8Array(srcBytes);
      const density = [0, 0.001, 0.05, 0.5, 1][round % 5]!;
      for (let i = 0; i < srcBits; ) {
        const len = 1 + r.int(round % 7 === 0 ? 2 : 40);
        if (r.next() < density) for (let j = i; j < Math.min(srcBits, i + len); j++) src[j >> 3]! |= 1 << (j & 7);
        i += len + r.int(round % 7 === 0 ? 2 : 60);
      }
      const init = randomBytes(r, dstBytes, round % 3 === 0 ? 0 : 0.2);
      // Bits past dstBits stay as they were.
      const s = putBytes(src, r.int(16));
      const a = putBytes(init, r.int(16));
      const b = putBytes(init, r.int(16));
      k.bitmapConvertOr(a, dstBits, s, srcBits, shift);
      ref.bitmapConvertOr(b, dstBits, s, srcBits, shift);
      expectSameBytes(a, b, dstBytes);
      release();
    }
  });

  it('bitmapConvertOr: coarser sets a bit for any source bit, finer sets every covered bit', () => {
    const s = alloc(8, true);
    k.setBits(s, 5, 1); // unit 5 at the fine granularity
    const coarse = alloc(8, true);
    k.bitmapConvertOr(coarse, 16, s, 64, 2); // 4 fine bits per coarse bit
    expect(Array.from(k.u8(coarse, 2))).toEqual([0x02, 0]);
    const fine = alloc(8, true);
    k.bitmapConvertOr(fine, 64, coarse, 16, -2);
    expect(Array.from(k.u8(fine, 2))).toEqual([0xf0, 0]);
    const clipped = alloc(8, true);
    k.bitmapConvertOr(clipped, 6, coarse, 16, -2); // only 6 destination bits exist
    expect(Array.from(k.u8(clipped, 1))).toEqual([0x30]);
  });

  /** Random bitmap data of n clusters: each all zeros, all ones, or mixed (sometimes one odd byte). */
  function clusterData(r: ReturnType<typeof prng>, n: number, cs: number): Uint8Array {
    const b = new Uint8Array(n * cs);
    for (let i = 0; i < n; i++) {
      const c = b.subarray(i * cs, (i + 1) * cs);
      const kind = r.int(3);
      if (kind === 1) c.fill(0xff);
      if (kind === 2) {
        if (r.chance(0.5)) c.fill(r.chance(0.5) ? 0xff : 0);
        c[r.int(cs)] = 1 + r.int(254); // neither 0 nor 0xff: the cluster is mixed
      }
    }
    return b;
  }

  const triples = (p: number, n: number) => Array.from(new Float64Array(k.u8(p, 24 * n).slice().buffer));

  it('bitmapTableLoad fills zero and all-ones clusters and plans coalesced reads, as the reference', () => {
    const r = prng(21);
    for (let round = 0; round < 300; round++) {
      const clusterBits = 9 + r.int(4);
      const cs = 2 ** clusterBits;
      const n = 1 + r.int(60);
      // Host clusters that often follow each other, entries of every form (reserved bits ignored).
      let next = 1 + r.int(1000);
      const words = Array.from({ length: n }, () => {
        const form = r.int(4);
        if (form === 0) return r.chance(0.2) ? 0x1fen : 0n;
        if (form === 1) return 1n;
        next = r.chance(0.7) ? next + 1 : 1 + r.int(2 ** 20);
        return BigInt(next) << BigInt(clusterBits);
      });
      const table = putWords(words);
      const init = randomBytes(r, n * cs);
      const [d1, d2] = [putBytes(init), putBytes(init)];
      const [o1, o2] = [alloc(24 * n), alloc(24 * n)];
      const maxRun = 1 + r.int(8);
      // Without a data buffer (0) only the reads are planned.
      const [x1, x2] = round % 5 ? [d1, d2] : [0, 0];
      const n1 = k.bitmapTableLoad(table, n, x1, clusterBits, maxRun, o1);
      const n2 = ref.bitmapTableLoad(table, n, x2, clusterBits, maxRun, o2);
      expect(n1).toBe(n2);
      expect(triples(o1, n1)).toEqual(triples(o2, n2));
      expectSameBytes(d1, d2, n * cs);
      release();
    }
  });

  it('bitmapClusterKinds tells zero, all-ones and mixed clusters apart, as the reference', () => {
    const r = prng(22);
    for (let round = 0; round < 200; round++) {
      const clusterBits = 9 + r.int(8);
      const n = 1 + r.int(round < 190 ? 40 : 3);
      const data = putBytes(clusterData(r, n, 2 ** clusterBits), r.int(16));
      const [a, b] = [alloc(n), alloc(n)];
      expect(k.bitmapClusterKinds(data, n, clusterBits, a)).toBe(ref.bitmapClusterKinds(data, n, clusterBits, b));
      expectSameBytes(a, b, n);
      release();
    }
  });

  it('bitmapTableBuild assigns host clusters in order and coalesces writes, as the reference', () => {
    const r = prng(23);
    for (let round = 0; round < 300; round++) {
      const clusterBits = 9 + r.int(8);
      const n = 1 + r.int(80);
      const kinds = putBytes(Uint8Array.from({ length: n }, () => r.int(3)));
      let mixed = 0;
      for (let i = 0; i < n; i++) if (k.u8(kinds + i, 1)[0] === 2) mixed++;
      // Host runs with room for the mixed clusters (sometimes one short: -1), some empty.
      const runs: number[] = [];
      let room = mixed - (r.chance(0.1) && mixed ? 1 : 0);
      let at = 1 + r.int(100);
      while (room > 0 || r.chance(0.2)) {
        const len = r.chance(0.1) ? 0 : Math.min(Math.max(room, 1), 1 + r.int(6));
        runs.push(at, len);
        at += len + r.int(3);
        room -= len;
      }
      const hosts = putBytes(new Uint8Array(new Float64Array(runs).buffer));
      const [t1, t2] = [alloc(8 * n), alloc(8 * n)];
      const [w1, w2] = [alloc(24 * Math.max(1, mixed)), alloc(24 * Math.max(1, mixed))];
      const maxRun = 1 + r.int(8);
      const n1 = k.bitmapTableBuild(kinds, n, clusterBits, hosts, runs.length / 2, maxRun, t1, w1);
      const n2 = ref.bitmapTableBuild(kinds, n, clusterBits, hosts, runs.length / 2, maxRun, t2, w2);
      expect(n1).toBe(n2);
      if (n1 < 0) continue;
      expectSameBytes(t1, t2, 8 * n);
      expect(triples(w1, n1)).toEqual(triples(w2, n2));
      release();
    }
  });

  it('a stored table loads back to the same data (kinds, build, load round trip)', () => {
    const r = prng(24);
    for (let round = 0; round < 50; round++) {
      const clusterBits = 9 + r.int(4);
      const cs = 2 ** clusterBits;
      const n = 1 + r.int(30);
      const src = clusterData(r, n, cs);
      const data = putBytes(src);
      const kinds = alloc(n);
      const mixed = k.bitmapClusterKinds(data, n, clusterBits, kinds);
      const hosts = putBytes(new Uint8Array(new Float64Array([100, mixed]).buffer));
      const table = alloc(8 * n);
      const writes = alloc(24 * Math.max(1, mixed));
      const nw = k.bitmapTableBuild(kinds, n, clusterBits, hosts, 1, 1 << 20, table, writes);
      // "Write" the mixed clusters to a fake host file, then load from the table.
      const file = new Uint8Array((100 + mixed) * cs);
      for (let i = 0; i < nw; i++) {
        const [index, count, host] = triples(writes, nw).slice(i * 3, i * 3 + 3) as [number, number, number];
        file.set(src.subarray(index * cs, (index + count) * cs), host);
      }
      const out = putBytes(randomBytes(r, n * cs));
      const runs = alloc(24 * n);
      const nr = k.bitmapTableLoad(table, n, out, clusterBits, 1 << 20, runs);
      for (let i = 0; i < nr; i++) {
        const [index, count, host] = triples(runs, nr).slice(i * 3, i * 3 + 3) as [number, number, number];
        k.u8(out + index * cs, count * cs).set(file.subarray(host, host + count * cs));
      }
      expect(Buffer.compare(k.u8(out, n * cs), src)).toBe(0);
      release();
    }
  });

  function extentsOf(impl: typeof k, p: number, start: number, end: number, maxOut: number) {
    const out = k.alloc(16 * Math.max(1, maxOut));
    const n = impl.extents(p, start, end, out, maxOut);
    const result = { pairs: Array.from(new Float64Array(k.u8(out, 16 * n).slice().buffer)), next: impl.extentsNext() };
    k.free(out);
    return result;
  }

  /** Bitmap of random-length runs, so long 0 and 1 stretches (SIMD skips) both occur. */
  function runBitmap(r: ReturnType<typeof prng>, nBytes: number): Uint8Array {
    const b = new Uint8Array(nBytes);
    let bit = 0;
    let on = r.chance(0.5);
    while (bit < nBytes * 8) {
      const len = 1 + r.int(r.chance(0.3) ? 2000 : 20);
      for (let i = bit; i < Math.min(bit + len, nBytes * 8); i++) if (on) b[i >> 3] |= 1 << (i & 7);
      bit += len;
      on = !on;
    }
    return b;
  }

  it('extents match the reference, including resumption', () => {
    const r = prng(13);
    for (let round = 0; round < 200; round++) {
      const n = 1 + r.int(round < 190 ? 400 : 20000);
      const p = putBytes(runBitmap(r, n), r.int(16));
      const start = r.int(n * 8);
      const end = start + r.int(n * 8 - start + 1);
      const maxOut = r.chance(0.5) ? 1 << 20 : r.int(5);
      expect(extentsOf(k, p, start, end, maxOut)).toEqual(extentsOf(ref, p, start, end, maxOut));
      if (maxOut === 0) continue;
      const all: number[] = [];
      for (let at = start; at < end; ) {
        const { pairs, next } = extentsOf(k, p, at, end, maxOut);
        all.push(...pairs);
        at = next;
      }
      expect(all).toEqual(extentsOf(k, p, start, end, 1 << 20).pairs);
      release();
    }
  });

  it('extents: edge cases', () => {
    const p = putBytes(new Uint8Array([0xff, 0x00, 0x0f, 0xf0]));
    expect(extentsOf(k, p, 0, 32, 10)).toEqual({ pairs: [0, 8, 16, 4, 28, 4], next: 32 });
    expect(extentsOf(k, p, 2, 20, 10)).toEqual({ pairs: [2, 6, 16, 4], next: 20 });
    expect(extentsOf(k, p, 0, 32, 1)).toEqual({ pairs: [0, 8], next: 16 });
    expect(extentsOf(k, p, 8, 8, 1)).toEqual({ pairs: [], next: 8 });
  });
});

// --- zero detection ---------------------------------------------------------------------------

describe('zero detection and comparison', () => {
  it('isZero / firstNonZero find a single byte anywhere', () => {
    const r = prng(14);
    for (let round = 0; round < 300; round++) {
      const n = round < 280 ? r.int(1000) : (1 << 22) + r.int(64);
      const p = alloc(n + 16, true) + r.int(16);
      const pos = n === 0 || r.chance(0.2) ? -1 : r.int(n);
      if (pos >= 0) k.u8(p + pos, 1)[0] = 1 + r.int(255);
      expect(k.firstNonZero(p, n)).toBe(pos);
      expect(k.isZero(p, n)).toBe(pos < 0);
      if (n < 5000) expect(k.firstNonZero(p, n)).toBe(ref.firstNonZero(p, n));
      release();
    }
  });

  it('firstDifference finds the first differing byte', () => {
    const r = prng(15);
    for (let round = 0; round < 300; round++) {
      const n = round < 295 ? r.int(1000) : (1 << 22) + r.int(64);
      const data = randomBytes(r, n);
      const a = putBytes(data, r.int(16));
      const b = putBytes(data, r.int(16));
      const pos = r.chance(0.2) || n === 0 ? -1 : r.int(n);
      if (pos >= 0) k.u8(b + pos, 1)[0] ^= 1 << r.int(8);
      expect(k.firstDifference(a, b, n)).toBe(pos);
      if (n < 5000) expect(ref.firstDifference(a, b, n)).toBe(pos);
      release();
    }
  });

  it('zeroBlocks marks all-zero blocks and keeps bits past the last block', () => {
    const r = prng(16);
    for (let round = 0; round < 200; round++) {
      const blockBits = r.int(13);
      const blocks = r.int(70);
      const n = blocks << blockBits;
      const data = new Uint8Array(n);
      for (let i = 0; i < blocks; i++) if (r.chance(0.5)) data[(i << blockBits) + r.int(1 << blockBits)] = 1;
      const p = putBytes(data, r.int(16));
      const bitmap = randomBytes(r, Math.ceil(blocks / 8) + 1, 1);
      const [o1, o2] = [putBytes(bitmap), putBytes(bitmap)];
      k.zeroBlocks(p, n, blockBits, o1);
      ref.zeroBlocks(p, n, blockBits, o2);
      expectSameBytes(o1, o2, bitmap.length);
      release();
    }
  });

  it('diffBlocks marks differing blocks and keeps bits past the last block', () => {
    const r = prng(17);
    for (let round = 0; round < 200; round++) {
      const blockBits = r.int(13);
      const blocks = r.int(70);
      const n = blocks << blockBits;
      const a = new Uint8Array(n);
      for (let i = 0; i < n; i += 1 + r.int(64)) a[i] = r.int(256);
      const b = a.slice();
      for (let i = 0; i < blocks; i++) if (r.chance(0.4)) b[(i << blockBits) + r.int(1 << blockBits)] ^= 1 + r.int(255);
      const pa = putBytes(a, r.int(16));
      const pb = putBytes(b, r.int(16));
      const bitmap = randomBytes(r, Math.ceil(blocks / 8) + 1, 1);
      const [o1, o2] = [putBytes(bitmap), putBytes(bitmap)];
      k.diffBlocks(pa, pb, n, blockBits, o1);
      ref.diffBlocks(pa, pb, n, blockBits, o2);
      expectSameBytes(o1, o2, bitmap.length);
      let differing = 0;
      for (let i = 0; i < blocks; i++) if (k.u8(o1 + (i >> 3), 1)[0]! & (1 << (i & 7))) differing++;
      let expected = 0;
      for (let i = 0; i < blocks; i++) if (a.subarray(i << blockBits, (i + 1) << blockBits).some((v, j) => v !== b[(i << blockBits) + j])) expected++;
      expect(differing).toBe(expected);
      release();
    }
  });
});

describe('map JSON writer', () => {
  /** Feeds entries in random batch sizes through a kernel; returns the whole text. */
  function render(kk: typeof k, entries: number[][]): string {
    const recs = alloc(entries.length * MAP_ENTRY_BYTES + 32);
    const out = alloc((entries.length + 2) * MAP_JSON_MAX_ENTRY_BYTES);
    const r = prng(entries.length);
    kk.mapJsonReset();
    let text = '';
    for (let i = 0; i < entries.length; ) {
      const n = Math.min(entries.length - i, 1 + r.int(50));
      k.u8(recs, n * MAP_ENTRY_BYTES).set(new Uint8Array(Float64Array.from(entries.slice(i, i + n).flat()).buffer));
      const len = kk.mapJsonFeed(recs, n, out);
      text += Buffer.from(k.u8(out, len)).toString('latin1');
      i += n;
    }
    const len = kk.mapJsonFinish(out);
    return text + Buffer.from(k.u8(out, len)).toString('latin1');
  }

  it('prints what qemu-img prints (merging, offsets, large numbers) and matches the reference', () => {
    const r = prng(77);
    for (let round = 0; round < 50; round++) {
      const entries: number[][] = [];
      let pos = r.chance(0.2) ? 2 ** 52 : r.int(1000) * 512;
      let host = r.chance(0.3) ? 2 ** 50 : 0;
      for (let i = 0; i < r.int(400); i++) {
        const length = (1 + r.int(4)) * 512 * (r.chance(0.1) ? 2 ** 20 : 1);
        const flags = r.int(8);
        const depth = r.chance(0.8) ? r.int(3) : r.int(1001);
        const offset = r.chance(0.4) ? -1 : r.chance(0.6) ? host : r.int(2 ** 30) * 512;
        entries.push([pos, length, offset, depth * 8 + flags]);
        pos += length;
        if (offset >= 0) host = offset + length;
      }
      // Expected: qemu-img's merge rule and layout, in plain TS.
      const merged: number[][] = [];
      for (const e of entries) {
        const p = merged[merged.length - 1];
        if (p && p[3] === e[3] && (p[2]! < 0 ? e[2]! < 0 : e[2] === p[2]! + p[1]!)) p[1]! += e[1]!;
        else merged.push([...e]);
      }
      const want = merged.length
        ? `[${merged
            .map(([s, l, o, m]) => `{ "start": ${s}, "length": ${l}, "depth": ${Math.floor(m! / 8)}, "present": ${(m! & 1) !== 0}, "zero": ${(m! & 2) !== 0}, "data": ${(m! & 4) !== 0}${o! >= 0 ? `, "offset": ${o}` : ''}}`)
            .join(',\n')}]\n`
        : '';
      expect(render(k, entries)).toBe(want);
      expect(render(ref, entries)).toBe(want);
      release();
    }
  });
});
