// ImageFile's synchronous mode (OpenFileOptions.synchronous, used by the CLI's bitmap actions):
// every operation on the main thread gives the same file as the thread-pool paths, through each
// of its branches (small and large reads and writes, vectored ones, direct-sized aligned writes,
// growing and shrinking truncates, punches, flushes), and reads past EOF as zeros.
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { openImageFile } from '../../src/io/file.js';
import { prng } from '../helpers/prng.js';
import { tmpDir } from '../helpers/tmp.js';

const K = 1024;
const M = 1024 * K;

type Step =
  | { kind: 'write'; offset: number; data: Buffer }
  | { kind: 'writev'; offset: number; data: Buffer[] }
  | { kind: 'truncate'; length: number }
  | { kind: 'punch'; offset: number; length: number }
  | { kind: 'flush' };

function bytes(r: () => number, n: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i += 97) b[i] = Math.floor(r() * 256);
  return b;
}

function program(seed: number): Step[] {
  const r = prng(seed);
  const int = (n: number) => Math.floor(r() * n);
  const out: Step[] = [];
  for (let i = 0; i < 40; i++) {
    const x = r();
    // Small (<= 64 KiB), large buffered, and direct-sized aligned writes; vectored ones.
    if (x < 0.25) out.push({ kind: 'write', offset: int(3 * M), data: bytes(r, 1 + int(64 * K)) });
    else if (x < 0.4) out.push({ kind: 'write', offset: int(3 * M), data: bytes(r, 64 * K + int(M)) });
    else if (x < 0.5) out.push({ kind: 'write', offset: 4 * K * int(512), data: bytes(r, 4 * K * (128 + int(128))) });
    else if (x < 0.65) out.push({ kind: 'writev', offset: int(3 * M), data: [bytes(r, 1 + int(100 * K)), bytes(r, 1 + int(300 * K)), bytes(r, 1 + int(10))] });
    else if (x < 0.75) out.push({ kind: 'truncate', length: int(4 * M) });
    else if (x < 0.85) out.push({ kind: 'punch', offset: 4 * K * int(700), length: 4 * K * (1 + int(64)) });
    else out.push({ kind: 'flush' });
  }
  return out;
}

async function run(path: string, steps: Step[], synchronous: boolean): Promise<Buffer[]> {
  const f = await openImageFile(path, { writable: true, synchronous });
  const reads: Buffer[] = [];
  try {
    for (const s of steps) {
      if (s.kind === 'write') await f.writeAt(s.data, s.offset);
      else if (s.kind === 'writev') await f.writev(s.data, s.offset);
      else if (s.kind === 'truncate') await f.truncate(s.length);
      else if (s.kind === 'punch') await f.punchHole(s.offset, s.length);
      else await f.flush();
      // A small and a large read across the end of the file after each step.
      const size = await f.size();
      for (const n of [333, 2 * M + 5]) {
        const b = Buffer.alloc(n, 0xee);
        await f.readAt(b, Math.max(0, size - Math.floor(n / 2)));
        reads.push(b);
      }
      const v = [Buffer.alloc(70 * K, 0xee), Buffer.alloc(3, 0xee), Buffer.alloc(2 * M, 0xee)];
      await f.readv(v, Math.max(0, size - M));
      reads.push(...v);
    }
    await f.flush();
  } finally {
    await f.close();
  }
  return reads;
}

describe('ImageFile, synchronous mode', () => {
  it('leaves the same file and reads the same bytes as the thread-pool paths', async () => {
    for (const seed of [1, 2, 3]) {
      const dir = tmpDir('qcowkit-image-file-');
      const steps = program(seed);
      const paths = [join(dir, 'pool.img'), join(dir, 'sync.img')];
      for (const p of paths) writeFileSync(p, bytes(prng(seed + 100), 300 * K));
      const poolReads = await run(paths[0]!, steps, false);
      const syncReads = await run(paths[1]!, steps, true);
      expect(readFileSync(paths[1]!).equals(readFileSync(paths[0]!)), `seed ${seed}: file contents`).toBe(true);
      expect(syncReads.length).toBe(poolReads.length);
      syncReads.forEach((b, i) => expect(b.equals(poolReads[i]!), `seed ${seed}: read ${i}`).toBe(true));
    }
  });

  it('fails as the thread-pool paths do (a truncate or a punch of a file opened read-only)', async () => {
    const dir = tmpDir('qcowkit-image-file-');
    const p = join(dir, 'a.img');
    writeFileSync(p, Buffer.alloc(8192));
    const messages: string[][] = [];
    for (const synchronous of [false, true]) {
      const f = await openImageFile(p, { synchronous });
      const got: string[] = [];
      for (const op of [() => f.truncate(4096), () => f.punchHole(0, 4096)]) {
        try {
          await op();
          got.push('no error');
        } catch (e) {
          got.push(String((e as Error).message));
        }
      }
      await f.close();
      messages.push(got);
    }
    expect(messages[0]!.every((m) => m !== 'no error')).toBe(true);
    expect(messages[1]).toEqual(messages[0]);
    expect(readFileSync(p).length).toBe(8192);
  });
});
