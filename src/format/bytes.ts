/** Big-endian field access without BigInt where a double is exact (< 2^53). */

export function u64(view: DataView, off: number): number {
  return view.getUint32(off) * 0x1_0000_0000 + view.getUint32(off + 4);
}

export function setU64(view: DataView, off: number, value: number): void {
  view.setUint32(off, Math.floor(value / 0x1_0000_0000));
  view.setUint32(off + 4, value >>> 0);
}

export function dataView(buf: Uint8Array): DataView {
  return new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
}

export const alignUp = (v: number, a: number): number => Math.ceil(v / a) * a;
export const isAligned = (v: number, a: number): boolean => v % a === 0;

/** Bytes compared at once by `isZeroBlock` (64 table entries). */
export const ZERO_BLOCK_BYTES = 512;
const ZEROS = new Uint8Array(ZERO_BLOCK_BYTES);

/**
 * Whether `buf[start, start + ZERO_BLOCK_BYTES)` is all zeros, by one native comparison: tables
 * are mostly empty, and a JavaScript loop over their entries costs ~0.1 us an entry before it is
 * optimized (a 1 TiB image's refcount table: 8192 entries, ~0.8 ms of a short command).
 */
export function isZeroBlock(buf: Uint8Array, start: number): boolean {
  return Buffer.compare(buf.subarray(start, start + ZERO_BLOCK_BYTES), ZEROS) === 0;
}

const utf8 = new TextDecoder('utf-8');
export const decodeUtf8 = (b: Uint8Array): string => utf8.decode(b);
