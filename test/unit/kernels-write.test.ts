// Write-path kernels (l2Fill, refcountAddRange, refcountFind, COPIED-aware l2Scan runs) versus
// the plain-TS reference on seeded random inputs.
import { afterEach, describe, expect, it } from 'vitest';
import { kernels, L2_RUN_BYTES } from '../../src/kernels/index.js';
import { referenceKernels } from '../helpers/kernel-reference.js';
import { prng } from '../helpers/prng.js';

const k = kernels();
const ref = referenceKernels(k);
const live: number[] = [];
afterEach(() => {
  for (const p of live.splice(0)) k.free(p);
});
function put(bytes: Uint8Array): number {
  const ptr = k.alloc(bytes.length);
  live.push(ptr);
  k.u8(ptr, bytes.length).set(bytes);
  return ptr;
}
function randomBytes(next: () => number, n: number, density = 1): Uint8Array {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = next() < density ? Math.floor(next() * 256) : 0;
  return b;
}
const int = (next: () => number, n: number) => Math.floor(next() * n);

describe('l2Fill', () => {
  it('writes the same entries as the reference (standard and extended L2)', () => {
    const next = prng(91);
    for (let round = 0; round < 200; round++) {
      const extended = next() < 0.5;
      const entries = 64;
      const init = randomBytes(next, entries * (extended ? 16 : 8));
      const a = put(init);
      const b = put(init);
      const first = int(next, entries);
      const count = int(next, entries - first + 1);
      const host = next() < 0.2 ? 0 : (1 + int(next, 2 ** 20)) * 65536;
      const flagsHi = next() < 0.5 ? 0x80000000 : 0;
      const flagsLo = next() < 0.3 ? 1 : 0;
      const allocMask = int(next, 2 ** 32);
      const zeroMask = int(next, 2 ** 32) & ~allocMask;
      k.l2Fill(a, first, count, extended, host, 65536, flagsHi, flagsLo, allocMask, zeroMask);
      ref.l2Fill(b, first, count, extended, host, 65536, flagsHi, flagsLo, allocMask, zeroMask);
      expect(Buffer.from(k.u8(a, init.length))).toEqual(Buffer.from(k.u8(b, init.length)));
    }
  });

  it('round-trips through l2Scan with the COPIED flag in the run records', () => {
    const cs = 65536;
    const table = put(new Uint8Array(cs));
    k.l2Fill(table, 0, 10, false, 10 * cs, cs, 0x80000000, 0, 0, 0);
    k.l2Fill(table, 10, 5, false, 20 * cs, cs, 0, 0, 0, 0); // contiguous, but not COPIED
    const out = k.alloc(16 * L2_RUN_BYTES);
    live.push(out);
    const n = k.l2Scan(table, 0, 15, false, 16, out, 16);
    const u32 = new Uint32Array(k.memory.buffer, out, n * 8);
    const f64 = new Float64Array(k.memory.buffer, out, n * 4);
    expect(n).toBe(2);
    expect([u32[0], u32[1], u32[3], f64[2]]).toEqual([0, 10, 1, 10 * cs]);
    expect([u32[8], u32[9], u32[11], f64[6]]).toEqual([10, 5, 0, 20 * cs]);
  });
});

describe('refcount ranges', () => {
  it('refcountAddRange matches the reference, all or nothing', () => {
    const next = prng(92);
    for (let round = 0; round < 300; round++) {
      const order = int(next, 7);
      const size = 512;
      const init = randomBytes(next, size, 0.3);
      const a = put(init);
      const b = put(init);
      const entries = (size * 8) >> order;
      const first = int(next, entries);
      const count = int(next, Math.min(64, entries - first) + 1);
      const delta = next() < 0.5 ? -1 : 1 + int(next, 3);
      const max = Math.min(2 ** (1 << order) - 1, Number.MAX_SAFE_INTEGER);
      const ra = k.refcountAddRange(a, first, count, order, delta, max);
      const rb = ref.refcountAddRange(b, first, count, order, delta, max);
      expect(ra).toBe(rb);
      expect(Buffer.from(k.u8(a, size))).toEqual(Buffer.from(k.u8(b, size)));
      if (ra >= 0) expect(Buffer.from(k.u8(a, size))).toEqual(Buffer.from(init));
    }
  });

  it('refcountFind finds the same zero and non-zero entries as the reference', () => {
    const next = prng(93);
    for (let round = 0; round < 400; round++) {
      const order = int(next, 7);
      const size = 1024;
      const init = randomBytes(next, size, next() < 0.5 ? 0.02 : 0.7);
      const a = put(init);
      const entries = (size * 8) >> order;
      const from = int(next, entries);
      const to = from + int(next, entries - from + 1);
      const wantZero = next() < 0.5;
      expect(k.refcountFind(a, from, to, order, wantZero)).toBe(ref.refcountFind(a, from, to, order, wantZero));
    }
  });
});
