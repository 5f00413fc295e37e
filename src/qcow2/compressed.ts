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
