// The JS-side heap over wasm memory, and module loading.
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join, sep } from 'node:path';
import { describe, expect, it } from 'vitest';
import { QcowError } from '../../src/errors.js';
import { kernels } from '../../src/kernels/index.js';
import { createWasmKernels, WasmHeap, wasmPath } from '../../src/kernels/wasm.js';
import { prng } from '../helpers/prng.js';
import { tmpDir } from '../helpers/tmp.js';

// The project's lib has no DOM types: the WebAssembly constructors these tests build, typed here.
declare const WebAssembly: {
  Memory: new (d: { initial: number; maximum?: number }) => { buffer: ArrayBuffer; grow(n: number): number };
  Module: { new (b: Uint8Array): object; imports(m: object): Array<{ name: string }>; exports(m: object): Array<{ name: string }> };
};

const PAGE = 65536;

function memory(initial: number, maximum?: number): WebAssembly.Memory {
  return new WebAssembly.Memory(maximum === undefined ? { initial } : { initial, maximum });
}

describe('WasmHeap', () => {
  it('hands out 16-byte aligned blocks from the aligned base upward', () => {
    const heap = new WasmHeap(memory(1), 100);
    expect(heap.alloc(1)).toBe(112);
    expect(heap.alloc(17)).toBe(128);
    expect(heap.alloc(0)).toBe(160);
    expect(heap.usedBytes()).toBe(64);
  });

  it('reuses freed space first-fit and coalesces neighbours', () => {
    const heap = new WasmHeap(memory(1), 0);
    const [a, b, c] = [heap.alloc(100), heap.alloc(100), heap.alloc(100)];
    heap.free(a);
    heap.free(c); // merges with the top block
    expect(heap.alloc(50)).toBe(a);
    heap.free(a);
    heap.free(b); // a + b + rest become one block
    expect(heap.freeBlocks()).toEqual([[0, PAGE]]);
  });

  it('rejects bad frees and sizes', () => {
    const heap = new WasmHeap(memory(1), 0);
    const p = heap.alloc(10);
    heap.free(p);
    expect(() => heap.free(p)).toThrow(/unknown pointer/);
    expect(() => heap.free(12345)).toThrow(/unknown pointer/);
    expect(() => heap.alloc(-1)).toThrow(RangeError);
    expect(() => heap.alloc(1.5)).toThrow(RangeError);
  });

  it('grows memory in steps of at least 16 MiB, preserving contents', () => {
    const mem = memory(1);
    const heap = new WasmHeap(mem, 0);
    const small = heap.alloc(1000);
    new Uint8Array(mem.buffer, small, 1000).fill(0xab);
    const big = heap.alloc(PAGE);
    expect(mem.buffer.byteLength).toBe((1 + 256) * PAGE);
    expect(big).toBe(1008);
    expect(new Uint8Array(mem.buffer, small, 1000).every((v) => v === 0xab)).toBe(true);
    const huge = heap.alloc(40 << 20); // needs more than one default step
    expect(mem.buffer.byteLength).toBeGreaterThanOrEqual(huge + (40 << 20));
  });

  it('reserve() lets a batch of allocations proceed without detaching views', () => {
    const mem = memory(1);
    const heap = new WasmHeap(mem, 0);
    heap.alloc(30000);
    heap.reserve(10 * 4096);
    const buffer = mem.buffer;
    for (let i = 0; i < 10; i++) heap.alloc(4096);
    expect(mem.buffer).toBe(buffer);
  });

  it('throws RangeError when memory cannot grow, and falls back to minimal growth', () => {
    const mem = memory(1, 4);
    const heap = new WasmHeap(mem, 0);
    expect(heap.alloc(3 * PAGE)).toBe(0);
    expect(mem.buffer.byteLength).toBe(3 * PAGE); // the 16 MiB step failed: grew by the minimum
    expect(() => heap.alloc(2 * PAGE)).toThrow(RangeError);
  });

  it('survives random alloc/free without overlaps or lost data', () => {
    const rand = prng(21);
    const mem = memory(1);
    const heap = new WasmHeap(mem, 40);
    const live = new Map<number, { size: number; tag: number }>();
    const check = () => {
      const blocks = [...live].sort((x, y) => x[0] - y[0]);
      blocks.forEach(([ptr, { size, tag }], i) => {
        expect(ptr % 16).toBe(0);
        if (i > 0) expect(blocks[i - 1]![0] + blocks[i - 1]![1].size).toBeLessThanOrEqual(ptr);
        const bytes = new Uint8Array(mem.buffer, ptr, size);
        expect(size === 0 || (bytes[0] === tag && bytes[size - 1] === tag && bytes[size >> 1] === tag)).toBe(true);
      });
    };
    for (let step = 0; step < 5000; step++) {
      if (live.size > 0 && rand() < 0.45) {
        const ptrs = [...live.keys()];
        const ptr = ptrs[Math.floor(rand() * ptrs.length)]!;
        heap.free(ptr);
        live.delete(ptr);
      } else {
        const size = rand() < 0.02 ? Math.floor(rand() * (4 << 20)) : Math.floor(rand() * 5000);
        const ptr = heap.alloc(size);
        const tag = 1 + (step % 255);
        new Uint8Array(mem.buffer, ptr, size).fill(tag);
        live.set(ptr, { size, tag });
      }
      if (step % 250 === 0) check();
    }
    check();
    for (const ptr of live.keys()) heap.free(ptr);
    expect(heap.usedBytes()).toBe(0);
    expect(heap.freeBlocks()).toEqual([[48, mem.buffer.byteLength - 48]]);
  });
});

describe('kernels loading', () => {
  it('finds wasm/kernels.wasm from the package root (not in build/, which node-gyp rebuild empties)', () => {
    expect(wasmPath().endsWith(`${sep}wasm${sep}kernels.wasm`)).toBe(true);
    expect(wasmPath().split(sep)).not.toContain('build');
    expect(existsSync(wasmPath())).toBe(true);
  });

  /** Loads `path` and returns the KERNELS error it must throw (fails the test otherwise). */
  function loadError(path: string): QcowError {
    let caught: unknown;
    try {
      createWasmKernels(path);
    } catch (e) {
      caught = e;
    }
    expect(caught).toBeInstanceOf(QcowError);
    const e = caught as QcowError;
    expect(e.code).toBe('KERNELS');
    expect(e.file).toBe(path);
    expect(e.message).not.toContain('\n');
    return e;
  }

  it('a missing kernels file is a KERNELS error naming the file', () => {
    const path = join(tmpDir(), 'kernels.wasm');
    expect(loadError(path).message).toMatch(/^WebAssembly kernels: file missing \(reinstall qcowkit/);
  });

  it('a file that is not wasm, or a truncated one, is a KERNELS error', () => {
    const dir = tmpDir();
    const garbage = join(dir, 'garbage.wasm');
    writeFileSync(garbage, 'not wasm at all\n');
    expect(loadError(garbage).message).toContain('not a valid WebAssembly module');
    const truncated = join(dir, 'truncated.wasm');
    const real = readFileSync(wasmPath());
    writeFileSync(truncated, real.subarray(0, real.length >> 1));
    expect(loadError(truncated).message).toContain('not a valid WebAssembly module');
  });

  it('a valid module without the kernels\' exports (stale or foreign file) is a KERNELS error', () => {
    const path = join(tmpDir(), 'empty.wasm');
    writeFileSync(path, Uint8Array.from([0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00])); // empty module
    const msg = loadError(path).message;
    expect(msg).toContain('missing exports: memory, heapBase, l2Scan');
    expect(msg).toContain('zeroBlocks');
  });

  it('a directory in place of the file is a KERNELS error, not EISDIR', () => {
    expect(loadError(tmpDir()).message).toMatch(/^WebAssembly kernels: cannot read \(/);
  });

  it('an explicit path to the real file loads', () => {
    const copy = join(tmpDir(), 'kernels.wasm');
    writeFileSync(copy, readFileSync(wasmPath()));
    const k = createWasmKernels(copy);
    const p = k.allocZeroed(32);
    k.setBits(p, 3, 2);
    expect(k.popcount(p, 32)).toBe(2);
  });

  it('exports exactly the documented functions and needs no imports', () => {
    const module = new WebAssembly.Module(readFileSync(wasmPath()));
    expect(WebAssembly.Module.imports(module)).toEqual([]);
    expect(WebAssembly.Module.exports(module).map((e) => e.name).sort()).toEqual(
      [
        'memory', 'heapBase', 'l2Scan', 'scanConsumed', 'l2AccountRefs', 'l2CopiedMismatches', 'l2Fill', 'refsAddRange', 'refcountAddRange', 'refcountFind', 'refcountCompare',
        'refcountGet', 'refcountSet', 'bitmapOr', 'bitmapAnd', 'bitmapAndNot', 'popcount', 'setBits',
        'clearBits', 'extents', 'extentsNext', 'bitmapConvertOr', 'bitmapTableLoad', 'bitmapClusterKinds', 'bitmapTableBuild', 'isZero', 'firstNonZero', 'firstDifference', 'zeroBlocks', 'diffBlocks',
        'mapJsonReset', 'mapJsonFeed', 'mapJsonFinish',
        'l2Records', 'statusErrorRun', 'statusErrorStart', 'recordsDataRanges', 'recordsSplitHoles', 'mapMergeLayer', 'mapPendingLeft', 'refcountCountNonZero',
      ].sort(),
    );
  });

  it('kernels() is a lazy singleton; createWasmKernels() gives independent instances', () => {
    expect(kernels()).toBe(kernels());
    const a = createWasmKernels();
    const b = createWasmKernels();
    expect(a.memory).not.toBe(b.memory);
    expect(a.alloc(16)).toBe(b.alloc(16));
  });

  it('allocZeroed clears reused memory and u8 views see kernel writes', () => {
    const k = createWasmKernels();
    const p = k.alloc(64);
    k.u8(p, 64).fill(0xff);
    k.free(p);
    const q = k.allocZeroed(64);
    expect(q).toBe(p);
    expect(k.isZero(q, 64)).toBe(true);
    k.setBits(q, 0, 9);
    expect(Array.from(k.u8(q, 2))).toEqual([0xff, 0x01]);
  });

  it('kernels keep working on memory beyond the initial pages', () => {
    const k = createWasmKernels();
    const big = k.allocZeroed(64 << 20);
    k.u8(big + (64 << 20) - 1, 1)[0] = 7;
    expect(k.firstNonZero(big, 64 << 20)).toBe((64 << 20) - 1);
    expect(k.popcount(big, 64 << 20)).toBe(3);
  });
});
