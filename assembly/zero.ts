// Zero detection and buffer comparison. Indices are returned as f64 (-1 = none) so buffers
// beyond 2 GiB stay representable.

/**
 * Index of the first byte where a differs from b (or from zero when !compare), or -1.
 * Inlined with a constant `compare`, so the zero variant never touches b.
 */
@inline
function firstMismatch(a: usize, b: usize, n: usize, compare: bool): i64 {
  let i: usize = 0;
  // 64 bytes per step while nothing differs, then narrow down within 16-byte vectors.
  for (; i + 64 <= n; i += 64) {
    let v0 = v128.load(a + i);
    let v1 = v128.load(a + i, 16);
    let v2 = v128.load(a + i, 32);
    let v3 = v128.load(a + i, 48);
    if (compare) {
      v0 = v128.xor(v0, v128.load(b + i));
      v1 = v128.xor(v1, v128.load(b + i, 16));
      v2 = v128.xor(v2, v128.load(b + i, 32));
      v3 = v128.xor(v3, v128.load(b + i, 48));
    }
    if (v128.any_true(v128.or(v128.or(v0, v1), v128.or(v2, v3)))) break;
  }
  const zero = i64x2.splat(0);
  for (; i + 16 <= n; i += 16) {
    let v = v128.load(a + i);
    if (compare) v = v128.xor(v, v128.load(b + i));
    const mask = i8x16.bitmask(i8x16.ne(v, zero));
    if (mask) return <i64>(i + ctz<u32>(mask));
  }
  for (; i < n; i++) {
    if (load<u8>(a + i) != (compare ? load<u8>(b + i) : 0)) return <i64>i;
  }
  return -1;
}

function firstNonZeroAt(ptr: usize, n: usize): i64 {
  return firstMismatch(ptr, 0, n, false);
}

export function isZero(ptr: usize, nBytes: usize): bool {
  return firstNonZeroAt(ptr, nBytes) < 0;
}

export function firstNonZero(ptr: usize, nBytes: usize): f64 {
  return <f64>firstNonZeroAt(ptr, nBytes);
}

export function firstDifference(a: usize, b: usize, nBytes: usize): f64 {
  return <f64>firstMismatch(a, b, nBytes, true);
}

export function zeroBlocks(ptr: usize, nBytes: usize, blockBits: u32, outBitmap: usize): void {
  const blocks = nBytes >> blockBits;
  const size: usize = 1 << blockBits;
  for (let b: usize = 0; b < blocks; b += 8) {
    const count = <u32>min<usize>(8, blocks - b);
    let byte: u32 = 0;
    for (let j: u32 = 0; j < count; j++) {
      if (firstNonZeroAt(ptr + ((b + j) << blockBits), size) < 0) byte |= 1 << j;
    }
    // A partial last byte keeps the bits that lie beyond the last block.
    if (count < 8) byte |= <u32>load<u8>(outBitmap + (b >> 3)) & (0xFF << count);
    store<u8>(outBitmap + (b >> 3), byte);
  }
}

/**
 * Sets bit i of outBitmap when block i (1 << blockBits bytes) of a differs from block i of b,
 * clears it when they are equal; bits past the last block keep their value. nBytes is a
 * multiple of the block. (rebase: which units of the old and new backing views differ.)
 */
export function diffBlocks(a: usize, b: usize, nBytes: usize, blockBits: u32, outBitmap: usize): void {
  const blocks = nBytes >> blockBits;
  const size: usize = 1 << blockBits;
  for (let i: usize = 0; i < blocks; i += 8) {
    const count = <u32>min<usize>(8, blocks - i);
    let byte: u32 = 0;
    for (let j: u32 = 0; j < count; j++) {
      const at = (i + j) << blockBits;
      if (firstMismatch(a + at, b + at, size, true) >= 0) byte |= 1 << j;
    }
    if (count < 8) byte |= <u32>load<u8>(outBitmap + (i >> 3)) & (0xFF << count);
    store<u8>(outBitmap + (i >> 3), byte);
  }
}
