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
 * Address space set aside at start. Growing wasm memory detaches every view of it, and views are
 * handed to in-flight reads (data lands straight in wasm memory), so growth must not happen in
 * normal work. Untouched pages cost no RSS: the OS backs them only when written.
 */
const INITIAL_HEAP_BYTES = 1024 * 1024 * 1024;

/** The process-wide kernels instance (lazy singleton). */
export function kernels(): Kernels {
  if (!shared) {
    shared = createWasmKernels();
    // Where address space is scarce (strict overcommit), settle for less rather than fail.
    for (let bytes = INITIAL_HEAP_BYTES; bytes >= 16 * 1024 * 1024; bytes /= 4) {
      try {
        shared.reserve(bytes);
        break;
      } catch {
        /* try a smaller reservation */
      }
    }
  }
  return shared;
}
