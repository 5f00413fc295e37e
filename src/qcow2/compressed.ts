/** Inflates compressed clusters: raw deflate (zlib, 4 KiB window) or zstd (fzstd: Node 20 lacks zstd). */
import { QcowError } from '../errors.js';

// Both decoders load on first use: most commands never read a compressed cluster.
let zlib: typeof import('node:zlib') | undefined;
let zstd: typeof import('fzstd') | undefined;

export async function loadDecoder(compressionType: number): Promise<void> {
  if (compressionType === 0) zlib ??= await import('node:zlib');
  else zstd ??= await import('fzstd');
}

/** Decompresses one cluster into dst (dst.length = cluster size). */
export function decompressCluster(src: Uint8Array, dst: Uint8Array, compressionType: number, file: string, guestOffset: number): void {
  try {
    if (compressionType === 0) {
      if (!zlib) throw new Error('zlib not loaded');
      const out = zlib.inflateRawSync(src, { finishFlush: 2 /* Z_SYNC_FLUSH: stream may be followed by slack */, maxOutputLength: dst.length });
      if (out.length < dst.length) throw new Error(`inflated ${out.length} bytes`);
      dst.set(out.subarray(0, dst.length));
    } else {
      if (!zstd) throw new Error('zstd decoder not loaded');
      const out = zstd.decompress(src, new Uint8Array(dst.length));
      if (out.length < dst.length) throw new Error(`decompressed ${out.length} bytes`);
      dst.set(out);
    }
  } catch (e) {
    throw new QcowError('CORRUPT', `Could not decompress the compressed cluster at guest offset ${guestOffset}: ${(e as Error).message}`, file);
  }
}

/**
 * Compresses one cluster the way QEMU's qcow2 driver does (qcow2_compress): a raw deflate stream
 * (no zlib header) with a 4 KiB window, default level, memLevel 9. Returns undefined when the
 * result would not be smaller than the cluster (QEMU then writes the cluster uncompressed).
 * zstd images: refused (see below).
 */
export async function compressCluster(src: Uint8Array, compressionType: number, file: string): Promise<Uint8Array | undefined> {
  assertCanCompress(compressionType, file);
  zlib ??= await import('node:zlib');
  const out = zlib.deflateRawSync(src, { windowBits: 12, level: -1, memLevel: 9 });
  return out.length < src.length ? out : undefined;
}

/** Compressed writes are possible for zlib images only (one line, before anything is written). */
export function assertCanCompress(compressionType: number, file: string): void {
  if (compressionType !== 0)
    throw new QcowError(
      'UNSUPPORTED',
      'writing zstd-compressed clusters is not supported: Node 20 has no zstd encoder and no maintained pure-JS zstd encoder package exists on npm (only wasm or native builds); omit -c or use a zlib image',
      file,
    );
}
