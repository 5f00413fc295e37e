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

const utf8 = new TextDecoder('utf-8');
export const decodeUtf8 = (b: Uint8Array): string => utf8.decode(b);
