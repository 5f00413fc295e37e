/**
 * Entry point of the WebAssembly kernels: `kernels()` instantiates wasm/kernels.wasm on first use
 * (a missing or broken file throws QcowError KERNELS).
 * Imports only node:fs/node:path/node:url (through wasm.ts) to keep startup cheap.
 */
import type { Kernels } from './api.js';
import { createWasmKernels } from './wasm.js';

export * from './api.js';

// api.ts names WebAssembly.Memory, but tsconfig's lib (ES2022, no DOM) has no WebAssembly types.
// Declared here as an interface identical to lib.dom's, so it merges cleanly if DOM is added.
declare global {
  namespace WebAssembly {
    interface Memory {
      readonly buffer: ArrayBuffer;
      grow(delta: number): number;
    }
  }
}

let shared: Kernels | undefined;

/**
 * Address space set aside when large or concurrent work starts (`reserveForLargeWork`: check,
 * compare, guest reads). Growing wasm memory detaches every view of it, and views are handed to
 * in-flight reads (data lands straight in wasm memory), so growth must not happen in the middle
 * of such work. Untouched pages cost no RSS: the OS backs them only when written.
 */
const LARGE_WORK_HEAP_BYTES = 1024 * 1024 * 1024;
/**
 * What the heap starts with (asconfig.json's initialMemory, 257 pages, is this plus the static
 * data): enough for info, create and the bitmap commands (two 1 TiB bitmaps at 64 KiB
 * granularity are 4 MiB), and for map (whose table reads are small and synchronous, or awaited
 * one batch at a time after `reserve`). V8 counts wasm memory as external memory: once a
 * process's array buffers and wasm memory pass 32 MiB, it collects garbage (a scavenge, ~1 ms,
 * again with every few MiB more; growing by 1 GiB costs a mark-compact and ~2 ms). 16 MiB keeps
 * a short command below that.
 */
const INITIAL_HEAP_BYTES = 16 * 1024 * 1024;

/** The process-wide kernels instance (lazy singleton). */
export function kernels(): Kernels {
  if (!shared) {
    shared = createWasmKernels();
    reserveAtMost(shared, INITIAL_HEAP_BYTES);
  }
  return shared;
}

let largeReserved = false;

/** Sets the large work reservation aside (once per process), before any read of that work starts. */
export function reserveForLargeWork(): void {
  if (largeReserved) return;
  largeReserved = true;
  reserveAtMost(kernels(), LARGE_WORK_HEAP_BYTES);
}

/** Where address space is scarce (strict overcommit), settle for less rather than fail. */
function reserveAtMost(k: Kernels, bytes: number): void {
  for (; bytes >= 16 * 1024 * 1024; bytes /= 4) {
    try {
      k.reserve(bytes);
      return;
    } catch {
      /* try a smaller reservation */
    }
  }
}
