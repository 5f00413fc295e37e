// Bitmaps in qcow2 bit order: bit n lives in byte n >> 3 at position n & 7 (LSB first), which is
// also bit n & 63 of the little-endian u64 at byte (n >> 6) * 8. Bit positions are f64 from JS.

const OR: i32 = 0;
const AND: i32 = 1;
const AND_NOT: i32 = 2;

// Inlined with a constant op, so each export gets its own branch-free loop.
@inline
function combine(dst: usize, src: usize, n: usize, op: i32): void {
  let i: usize = 0;
  for (; i + 16 <= n; i += 16) {
    const a = v128.load(dst + i);
    const b = v128.load(src + i);
    v128.store(dst + i, op == OR ? v128.or(a, b) : op == AND ? v128.and(a, b) : v128.andnot(a, b));
  }
  for (; i < n; i++) {
    const a = load<u8>(dst + i);
    const b = load<u8>(src + i);
    store<u8>(dst + i, op == OR ? a | b : op == AND ? a & b : a & ~b);
  }
}

export function bitmapOr(dst: usize, src: usize, nBytes: usize): void {
  combine(dst, src, nBytes, OR);
}

export function bitmapAnd(dst: usize, src: usize, nBytes: usize): void {
  combine(dst, src, nBytes, AND);
}

export function bitmapAndNot(dst: usize, src: usize, nBytes: usize): void {
  combine(dst, src, nBytes, AND_NOT);
}

@inline
function sumBytes(v: v128): u64 {
  const s = i32x4.extadd_pairwise_i16x8_u(i16x8.extadd_pairwise_i8x16_u(v));
  return <u64>(<u32>i32x4.extract_lane(s, 0)) + <u64>(<u32>i32x4.extract_lane(s, 1)) +
    <u64>(<u32>i32x4.extract_lane(s, 2)) + <u64>(<u32>i32x4.extract_lane(s, 3));
}

export function popcount(ptr: usize, nBytes: usize): f64 {
  let total: u64 = 0;
  let i: usize = 0;
  const vectorEnd = nBytes & ~15;
  while (i < vectorEnd) {
    // Byte lanes gain at most 8 per vector: flush every 31 vectors, before they can overflow.
    const stop = min<usize>(vectorEnd, i + 31 * 16);
    let acc = i8x16.splat(0);
    for (; i < stop; i += 16) acc = i8x16.add(acc, i8x16.popcnt(v128.load(ptr + i)));
    total += sumBytes(acc);
  }
  for (; i < nBytes; i++) total += <u64>popcnt<u32>(load<u8>(ptr + i));
  return <f64>total;
}

@inline
function maskByte(p: usize, mask: u32, set: bool): void {
  const b = <u32>load<u8>(p);
  store<u8>(p, set ? b | mask : b & ~mask);
}

function fillBits(ptr: usize, start: u64, n: u64, set: bool): void {
  if (n == 0) return;
  const last = start + n - 1;
  const firstByte = <usize>(start >> 3);
  const lastByte = <usize>(last >> 3);
  const head: u32 = (0xFF << <u32>(start & 7)) & 0xFF;
  const tail: u32 = 0xFF >> <u32>(7 - (last & 7));
  if (firstByte == lastByte) {
    maskByte(ptr + firstByte, head & tail, set);
    return;
  }
  maskByte(ptr + firstByte, head, set);
  memory.fill(ptr + firstByte + 1, set ? 0xFF : 0, lastByte - firstByte - 1);
  maskByte(ptr + lastByte, tail, set);
}

export function setBits(ptr: usize, startBit: f64, nBits: f64): void {
  fillBits(ptr, <u64>startBit, <u64>nBits, true);
}

export function clearBits(ptr: usize, startBit: f64, nBits: f64): void {
  fillBits(ptr, <u64>startBit, <u64>nBits, false);
}

/** The u64 at byte offset `at`, zero-padded past `endByte` so we never read beyond the bitmap. */
@inline
function loadWord(ptr: usize, at: usize, endByte: usize): u64 {
  if (at + 8 <= endByte) return load<u64>(ptr + at);
  let w: u64 = 0;
  for (let i: usize = at; i < endByte; i++) w |= <u64>load<u8>(ptr + i) << (<u64>(i - at) << 3);
  return w;
}

/** First bit in [from, end) equal to `want`, or end. */
function findBit(ptr: usize, from: u64, end: u64, want: bool): u64 {
  const endByte = <usize>((end + 7) >> 3);
  const flip: u64 = want ? 0 : u64.MAX_VALUE;
  const flipV = i64x2.splat(<i64>flip);
  let bit = from;
  while (bit < end) {
    const at = <usize>(bit >> 6) << 3;
    const word = (loadWord(ptr, at, endByte) ^ flip) & (u64.MAX_VALUE << (bit & 63));
    if (word) return min<u64>((<u64>at << 3) + ctz<u64>(word), end);
    // Skip uninteresting 16-byte blocks in one go.
    let next = at + 8;
    while (next + 16 <= endByte && !v128.any_true(v128.xor(v128.load(ptr + next), flipV))) next += 16;
    bit = <u64>next << 3;
  }
  return end;
}

let nextBit: u64 = 0;

export function extents(ptr: usize, startBit: f64, endBit: f64, out: usize, maxOut: u32): u32 {
  const end = <u64>endBit;
  let pos = findBit(ptr, <u64>startBit, end, true);
  let n: u32 = 0;
  while (pos < end && n < maxOut) {
    const stop = findBit(ptr, pos, end, false);
    const rec = out + (<usize>n << 4);
    store<f64>(rec, <f64>pos);
    store<f64>(rec, <f64>(stop - pos), 8);
    n++;
    pos = findBit(ptr, stop, end, true);
  }
  nextBit = pos; // end when done: findBit never returns more than end
  return n;
}

export function extentsNext(): f64 {
  return <f64>nextBit;
}

/**
 * Granularity conversion fused with a merge: dst |= src seen at dst's granularity. `shift` is
 * log2(dst granularity / src granularity): > 0, dst is coarser (a dst bit is set when any src
 * bit of its 2^shift is); < 0, dst is finer (every dst bit a src bit covers is set); 0, plain OR.
 * Works run by run over src's set bits (zero stretches are skipped 128 bits at a time), so the
 * cost follows the number of dirty runs, not the size. Results past dstBits are clipped.
 */
export function bitmapConvertOr(dst: usize, dstBits: f64, src: usize, srcBits: f64, shift: i32): void {
  const dEnd = <u64>dstBits;
  const sEnd = <u64>srcBits;
  let pos = findBit(src, 0, sEnd, true);
  while (pos < sEnd) {
    const stop = findBit(src, pos, sEnd, false);
    let a: u64, b: u64;
    if (shift >= 0) {
      a = pos >> <u64>shift;
      b = ((stop - 1) >> <u64>shift) + 1;
    } else {
      a = pos << <u64>(-shift);
      b = stop << <u64>(-shift);
    }
    if (a >= dEnd) break;
    if (b > dEnd) b = dEnd;
    fillBits(dst, a, b - a, true);
    pos = findBit(src, stop, sEnd, true);
  }
}
