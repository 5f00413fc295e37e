/** `map`: guest ranges and where they come from, entry for entry as qemu-img map. */
import { BackingChain, type MapEntry } from '../chain/chain.js';
import type { LayerFormat } from '../chain/layer.js';
import { kernels, MAP_ENTRY_BYTES, MAP_JSON_MAX_ENTRY_BYTES } from '../kernels/index.js';
import type { OperationOptions } from './options.js';

export interface MapOptions extends OperationOptions {
  format?: LayerFormat | undefined;
  /** Guest range to map (default: the whole disk). */
  start?: number;
  length?: number;
}

/** Streams map entries to `emit`; returns the virtual size. */
export async function mapImage(path: string, emit: (e: MapEntry) => void, opts: MapOptions = {}): Promise<{ virtualSize: number }> {
  return withChain(path, opts, (chain, start, length) => chain.map(start, length, emit, { signal: opts.signal, onProgress: opts.onProgress }));
}

/** Records per call of the JSON kernel (its output needs MAP_JSON_MAX_ENTRY_BYTES each). */
const JSON_BATCH = 4096;
/** Text is handed to `write` in chunks of about this size. */
const JSON_CHUNK = 512 * 1024;

/**
 * `map --output=json` text, byte for byte as qemu-img prints it, streamed to `write` in large
 * chunks. The chain's map records stay in wasm memory, where the kernel merges and formats them:
 * no object or string per entry, memory flat at any image size. `write` gets a fresh buffer it
 * may keep.
 */
export async function mapImageJson(path: string, write: (chunk: Uint8Array) => void, opts: MapOptions = {}): Promise<{ virtualSize: number }> {
  return withChain(path, opts, async (chain, start, length) => {
    const k = kernels();
    const outPtr = k.alloc(JSON_CHUNK + (JSON_BATCH + 2) * MAP_JSON_MAX_ENTRY_BYTES);
    let used = 0;
    const flush = () => {
      if (used) write(k.u8(outPtr, used).slice());
      used = 0;
    };
    try {
      k.mapJsonReset();
      await chain.mapWindows(
        start,
        length,
        (recs) => {
          for (let i = 0; i < recs.count; i += JSON_BATCH) {
            used += k.mapJsonFeed(recs.ptr + i * MAP_ENTRY_BYTES, Math.min(JSON_BATCH, recs.count - i), outPtr + used);
            if (used >= JSON_CHUNK) flush();
          }
        },
        { signal: opts.signal, onProgress: opts.onProgress },
      );
      used += k.mapJsonFinish(outPtr + used);
      // Nothing to map (empty image, start at or past the end): qemu-img still prints its
      // initial, empty entry.
      if (used) flush();
      else write(Buffer.from(emptyMapJson(start)));
    } finally {
      k.free(outPtr);
    }
  });
}

/** What qemu-img map --output=json prints for an empty range: one entry of length 0. */
export const emptyMapJson = (start: number): string => `[{ "start": ${start}, "length": 0, "depth": 0, "present": false, "zero": false, "data": false}]\n`;

async function withChain(path: string, opts: MapOptions, walk: (chain: BackingChain, start: number, length: number) => Promise<void>): Promise<{ virtualSize: number }> {
  const chain = await BackingChain.open(path, { format: opts.format, forceShare: opts.forceShare, onWarning: opts.onWarning, signal: opts.signal });
  try {
    const start = opts.start ?? 0;
    const length = opts.length ?? chain.virtualSize - start;
    await walk(chain, start, length);
    return { virtualSize: chain.virtualSize };
  } finally {
    await chain.close();
  }
}

export type { MapEntry };
