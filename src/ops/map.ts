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

/** Entries per batch handed to the JSON kernel (~0.5 MB of text per write). */
const JSON_BATCH = 4096;

/**
 * `map --output=json` text, byte for byte as qemu-img prints it, streamed to `write` in large
 * chunks. Entries go from the chain walk into a typed batch, and the wasm kernel merges and
 * formats them: no object or string per entry, memory flat at any image size. `write` gets a
 * fresh buffer it may keep.
 */
export async function mapImageJson(path: string, write: (chunk: Uint8Array) => void, opts: MapOptions = {}): Promise<{ virtualSize: number }> {
  return withChain(path, opts, async (chain, start, length) => {
    const k = kernels();
    const batch = new Float64Array(JSON_BATCH * 4);
    const batchBytes = new Uint8Array(batch.buffer);
    const entriesPtr = k.alloc(JSON_BATCH * MAP_ENTRY_BYTES);
    const outPtr = k.alloc((JSON_BATCH + 2) * MAP_JSON_MAX_ENTRY_BYTES);
    let n = 0;
    const feed = () => {
      k.u8(entriesPtr, n * MAP_ENTRY_BYTES).set(batchBytes.subarray(0, n * MAP_ENTRY_BYTES));
      const len = k.mapJsonFeed(entriesPtr, n, outPtr);
      n = 0;
      if (len) write(k.u8(outPtr, len).slice());
    };
    try {
      k.mapJsonReset();
      await chain.mapRecords(
        start,
        length,
        (s, len, depth, flags, offset) => {
          const i = n * 4;
          batch[i] = s;
          batch[i + 1] = len;
          batch[i + 2] = offset;
          batch[i + 3] = depth * 8 + flags;
          if (++n === JSON_BATCH) feed();
        },
        { signal: opts.signal, onProgress: opts.onProgress },
      );
      feed();
      const len = k.mapJsonFinish(outPtr);
      // Nothing to map (empty image, start at or past the end): qemu-img still prints its
      // initial, empty entry.
      if (len) write(k.u8(outPtr, len).slice());
      else write(Buffer.from(`[{ "start": ${start}, "length": 0, "depth": 0, "present": false, "zero": false, "data": false}]\n`));
    } finally {
      k.free(entriesPtr);
      k.free(outPtr);
    }
  });
}

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
