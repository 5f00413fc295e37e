// The streamed extent text of `bitmap --dump` and `changes` against JSON.stringify and padEnd:
// random lists with offsets up to 2^53, chunked writes, batches of any size, empty lists.
import { describe, expect, it } from 'vitest';
import { HUMAN_EXTENT_HEADER, humanExtentRows, jsonExtentList } from '../../src/cli/extent-text.js';
import { prng } from '../helpers/prng.js';

function randomExtents(seed: number, n: number): Array<{ start: number; length: number }> {
  const r = prng(seed);
  const out: Array<{ start: number; length: number }> = [];
  for (let i = 0; i < n; i++) {
    const scale = [1, 1e3, 1e9, 2 ** 32, 2 ** 40, 2 ** 52][Math.floor(r() * 6)]!;
    out.push({ start: Math.floor(r() * scale), length: Math.floor(r() * scale) + (i % 7 === 0 ? 1e9 : 1) });
  }
  out.push({ start: 2 ** 53 - 1, length: 999_999_999 }, { start: 1e9, length: 1e9 - 1 }, { start: 0, length: 0 });
  return out;
}

function feed(list: Array<{ start: number; length: number }>, push: (p: Float64Array, n: number) => void, batch: number): void {
  for (let i = 0; i < list.length; i += batch) {
    const part = list.slice(i, i + batch);
    const pairs = new Float64Array(part.length * 2 + 6).fill(-1); // longer than the count: only `n` pairs count
    part.forEach((e, j) => {
      pairs[j * 2] = e.start;
      pairs[j * 2 + 1] = e.length;
    });
    push(pairs, part.length);
  }
}

const text = (chunks: Array<string | Uint8Array>) => chunks.map((c) => (typeof c === 'string' ? c : Buffer.from(c).toString('latin1'))).join('');

describe('extent text', () => {
  it('JSON at depth 0 and 1 is JSON.stringify(list, null, 4), whatever the batching', () => {
    for (const [seed, n, batch] of [[1, 0, 5], [2, 1, 1], [3, 1000, 7], [4, 30_000, 65536]] as const) {
      const list = randomExtents(seed, n);
      const top: Array<string | Uint8Array> = [];
      const t = jsonExtentList((c) => top.push(c), 0);
      feed(list, (p, k) => t.push(p, k), batch);
      t.end();
      expect(text(top)).toBe(JSON.stringify(list, null, 4));
      const nested: Array<string | Uint8Array> = ['{\n    "name": "x",\n    "extents": '];
      const u = jsonExtentList((c) => nested.push(c), 1);
      feed(list, (p, k) => u.push(p, k), batch);
      u.end();
      nested.push('\n}');
      expect(text(nested)).toBe(JSON.stringify({ name: 'x', extents: list }, null, 4));
    }
    const empty: Array<string | Uint8Array> = [];
    const e = jsonExtentList((c) => empty.push(c), 1);
    e.end();
    expect(text(empty)).toBe('[]');
  });

  it('human rows are start.padEnd(20) + length, chunked at about a megabyte', () => {
    const list = randomExtents(5, 60_000);
    const chunks: Array<string | Uint8Array> = [];
    const t = humanExtentRows((c) => chunks.push(c));
    feed(list, (p, k) => t.push(p, k), 4096);
    t.end();
    expect(text(chunks)).toBe(list.map((x) => `${String(x.start).padEnd(20)}${x.length}\n`).join(''));
    expect(chunks.length).toBeGreaterThan(1);
    for (const c of chunks) expect(c.length).toBeLessThan((1 << 20) + 4096);
    expect(HUMAN_EXTENT_HEADER).toBe(`${'start'.padEnd(20)}length\n`);
  });
});
