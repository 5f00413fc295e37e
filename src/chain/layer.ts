/**
 * What a backing chain is made of: a qcow2 image or a raw file, seen through one interface.
 * Status follows QEMU's block-status model so `map` can reproduce qemu-img exactly.
 */
import type { ImageFile } from '../io/file.js';
import type { RecordBuffer } from './records.js';

export type LayerFormat = 'qcow2' | 'raw';

/** Status of a guest range within one layer (QEMU's BDRV_BLOCK_* flags, as booleans). */
export interface LayerExtent {
  start: number;
  length: number;
  /** The layer itself provides these bytes (data or zeros); false = ask the backing file. */
  allocated: boolean;
  /** Reads come from host bytes (normal data or compressed). */
  data: boolean;
  /** Reads as zeros. */
  zero: boolean;
  /** Host offset in this layer's file when the mapping is 1:1 (not for compressed clusters). */
  offset: number | undefined;
  /** For a compressed cluster (always one cluster per extent): where its compressed bytes are. */
  compressed?: { offset: number; length: number } | undefined;
}

/** Appends `e` to `out`, merging it into the last extent when every attribute matches. */
export function pushExtent(out: LayerExtent[], e: LayerExtent): void {
  const last = out[out.length - 1];
  if (
    last &&
    !last.compressed &&
    !e.compressed &&
    last.start + last.length === e.start &&
    last.allocated === e.allocated &&
    last.data === e.data &&
    last.zero === e.zero &&
    (last.offset === undefined ? e.offset === undefined : e.offset === last.offset + last.length)
  ) {
    last.length += e.length;
    return;
  }
  out.push(e);
}

export interface BlockLayer {
  readonly path: string;
  readonly format: LayerFormat;
  readonly virtualSize: number;
  readonly file: ImageFile;
  /** Backing file name as stored in the image (undefined for none / raw). */
  readonly backingName: string | undefined;
  readonly backingFormat: string | undefined;
  /**
   * Allocation status of [start, start+length) (clipped to virtualSize), as contiguous extents.
   * `probeHost` refines data extents by host-file holes the way qemu-img map does.
   */
  status(start: number, length: number, opts?: { probeHost?: boolean }): Promise<LayerExtent[]>;
  /**
   * `status` appended to `out` as layer extent records (records.ts), for the map path. `stream`:
   * one pass over a large range (no table caching).
   */
  statusRecords(start: number, length: number, out: RecordBuffer, opts?: { probeHost?: boolean; stream?: boolean }): Promise<void>;
  /** Reads allocated bytes described by an extent from `status` into dst (dst.length <= extent). */
  readExtent(extent: LayerExtent, offsetInExtent: number, dst: Uint8Array): Promise<void>;
  close(): Promise<void>;
}

/** What commit and rebase write through: a qcow2 image or a raw file opened read-write. */
export interface WritableLayer extends BlockLayer {
  write(offset: number, data: Uint8Array): Promise<void>;
  /** Several disjoint ranges as one batch (same result as one `write` each). */
  writeMany(items: ReadonlyArray<{ offset: number; data: Uint8Array }>): Promise<void>;
  /** The range reads as zeros afterwards; `unmap` releases host space where the format can. */
  writeZeroes(offset: number, length: number, opts?: { unmap?: boolean }): Promise<void>;
  flush(): Promise<void>;
}

export function isWritable(layer: BlockLayer): layer is WritableLayer {
  return layer.file.writable && typeof (layer as Partial<WritableLayer>).write === 'function';
}
