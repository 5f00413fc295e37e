/**
 * Entry point of the WebAssembly kernels: `kernels()` instantiates build/kernels.wasm on first use.
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

/** The process-wide kernels instance (lazy singleton). */
export function kernels(): Kernels {
  return (shared ??= createWasmKernels());
}
