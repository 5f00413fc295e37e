// bitmapDump and changes with onSummary/onExtents: the same extents and totals as the returned
// lists, the totals before the first batch, batches across the kernel's 65536-extent steps, and
// back-pressure (a slow consumer) honoured. Library only: no QEMU needed.
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { create } from '../../src/ops/create.js';
import { bitmap, bitmapDump } from '../../src/ops/bitmap.js';
import { changes } from '../../src/ops/changes.js';
import { Qcow2Image } from '../../src/qcow2/image.js';
import { markBitmapsDirty } from '../../src/qcow2/bitmaps.js';
import { tmpDir } from '../helpers/tmp.js';

const G = 65536;

describe('streamed extents', () => {
  it('equal the returned lists, across batch boundaries, waiting for the consumer', async () => {
    const file = join(tmpDir('qcowkit-extent-stream-'), 'd.qcow2');
    await create(file, { format: 'qcow2', size: 2 ** 40 + 3 * 512 });
    await bitmap(file, 'b0', [{ action: 'add' }]);
    await bitmap(file, 'b1', [{ action: 'add', granularity: 4 * G }]);
    // 150 000 isolated dirty granules, runs of two, and the clipped last granule.
    const ranges = [];
    for (let i = 0; i < 150_000; i++) ranges.push({ start: i * 7 * G, length: (i % 3 === 0 ? 2 : 1) * G });
    ranges.push({ start: 2 ** 40, length: 1536 });
    const img = await Qcow2Image.open(file, { writable: true });
    await markBitmapsDirty(img, ranges);
    await img.close();

    const whole = await bitmapDump(file, 'b0');
    expect(whole.extentCount).toBe(150_001);
    let summary: number | undefined;
    const streamed: number[] = [];
    let batches = 0;
    const r = await bitmapDump(file, 'b0', {
      onSummary: (s) => (summary = s.extentCount),
      onExtents: async (pairs, n) => {
        expect(summary).toBe(150_001);
        batches++;
        for (let i = 0; i < 2 * n; i++) streamed.push(pairs[i]!);
        await new Promise((ok) => setTimeout(ok, 5)); // a slow pipe
      },
    });
    expect(batches).toBe(3);
    expect(r.extents).toEqual([]);
    expect([r.dirtyBytes, r.bitsSet, r.extentCount]).toEqual([whole.dirtyBytes, whole.bitsSet, whole.extentCount]);
    expect(streamed).toEqual(whole.extents.flatMap((e) => [e.start, e.length]));
    expect(whole.extents.at(-1)).toEqual({ start: 2 ** 40, length: 1536 });

    const union = await changes(file, { bitmaps: ['b0', 'b1'] });
    const got: number[] = [];
    const s = await changes(file, { bitmaps: ['b0', 'b1'], onExtents: (pairs, n) => {
        for (let i = 0; i < 2 * n; i++) got.push(pairs[i]!);
      },
    });
    expect([s.bytes, s.extentCount, s.extents.length]).toEqual([union.bytes, union.extents.length, 0]);
    expect(got).toEqual(union.extents.flatMap((e) => [e.start, e.length]));
  }, 60_000);
});
