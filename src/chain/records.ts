/**
 * Block status as records in wasm memory: the map path's currency. Layer extents (LayerExtent as
 * six f64) and map records (four f64) live in growable buffers the status kernels read and write
 * in place, so mapping a disk creates no JavaScript object per extent or per cluster.
 */
import { ExtentFlag, kernels, LAYER_EXTENT_BYTES } from '../kernels/index.js';
import type { LayerExtent } from './layer.js';

/** A growable array of fixed-size records in the kernels' wasm memory. */
export class RecordBuffer {
  ptr = 0;
  count = 0;
  capacity = 0;

  constructor(readonly recordBytes: number) {}

  /** Makes room for `n` more records (the pointer may move: never keep it across this call). */
  reserve(n: number): void {
    const need = this.count + n;
    if (need <= this.capacity) return;
    const k = kernels();
    const capacity = Math.max(need, this.capacity * 2, 64);
    const ptr = k.alloc(capacity * this.recordBytes);
    if (this.count) k.u8(ptr, this.count * this.recordBytes).set(k.u8(this.ptr, this.count * this.recordBytes));
    if (this.ptr) k.free(this.ptr);
    this.ptr = ptr;
    this.capacity = capacity;
  }

  /** A fresh f64 view of the records (views die when wasm memory grows). */
  f64(): Float64Array {
    return new Float64Array(kernels().memory.buffer, this.ptr, (this.count * this.recordBytes) / 8);
  }

  free(): void {
    if (this.ptr) kernels().free(this.ptr);
    this.ptr = 0;
    this.count = 0;
    this.capacity = 0;
  }
}

/** A buffer of layer extent records. */
export function extentBuffer(): RecordBuffer {
  return new RecordBuffer(LAYER_EXTENT_BYTES);
}

const F = LAYER_EXTENT_BYTES / 8;

/** Layer extent records [from, count) as LayerExtents. */
export function recordsToExtents(buf: RecordBuffer, from = 0): LayerExtent[] {
  const v = buf.f64();
  const out: LayerExtent[] = [];
  for (let i = from; i < buf.count; i++) {
    const r = i * F;
    const flags = v[r + 3]!;
    const e: LayerExtent = {
      start: v[r]!,
      length: v[r + 1]!,
      allocated: (flags & ExtentFlag.Allocated) !== 0,
      data: (flags & ExtentFlag.Data) !== 0,
      zero: (flags & ExtentFlag.Zero) !== 0,
      offset: v[r + 2]! < 0 ? undefined : v[r + 2]!,
    };
    if (flags & ExtentFlag.Compressed) e.compressed = { offset: v[r + 4]!, length: v[r + 5]! };
    out.push(e);
  }
  return out;
}

/** Appends LayerExtents (already merged, as a layer's status returns them) as records. */
export function appendExtents(buf: RecordBuffer, extents: readonly LayerExtent[]): void {
  buf.reserve(extents.length);
  const v = new Float64Array(kernels().memory.buffer, buf.ptr + buf.count * LAYER_EXTENT_BYTES, extents.length * F);
  extents.forEach((e, i) => {
    const r = i * F;
    v[r] = e.start;
    v[r + 1] = e.length;
    v[r + 2] = e.offset ?? -1;
    v[r + 3] = (e.allocated ? ExtentFlag.Allocated : 0) | (e.zero ? ExtentFlag.Zero : 0) | (e.data ? ExtentFlag.Data : 0) | (e.compressed ? ExtentFlag.Compressed : 0);
    v[r + 4] = e.compressed?.offset ?? 0;
    v[r + 5] = e.compressed?.length ?? 0;
  });
  buf.count += extents.length;
}
