/** `map`: guest ranges and where they come from, entry for entry as qemu-img map. */
import { BackingChain, type MapEntry } from '../chain/chain.js';
import type { LayerFormat } from '../chain/layer.js';
import type { OperationOptions } from './options.js';

export interface MapOptions extends OperationOptions {
  format?: LayerFormat | undefined;
  /** Guest range to map (default: the whole disk). */
  start?: number;
  length?: number;
}

/** Streams map entries to `emit`; returns the virtual size. */
export async function mapImage(path: string, emit: (e: MapEntry) => void, opts: MapOptions = {}): Promise<{ virtualSize: number }> {
  const chain = await BackingChain.open(path, { format: opts.format, forceShare: opts.forceShare, onWarning: opts.onWarning, signal: opts.signal });
  try {
    const start = opts.start ?? 0;
    const length = opts.length ?? chain.virtualSize - start;
    await chain.map(start, length, emit, { signal: opts.signal, onProgress: opts.onProgress });
    return { virtualSize: chain.virtualSize };
  } finally {
    await chain.close();
  }
}

export type { MapEntry };
