/** A raw file as a block layer: guest offset == host offset, holes read as zeros. */
import { openImageFile, type ImageFile } from '../io/file.js';
import { pushExtent, type BlockLayer, type LayerExtent } from './layer.js';
import { appendExtents, type RecordBuffer } from './records.js';

export class RawLayer implements BlockLayer {
  readonly format = 'raw' as const;
  readonly backingName = undefined;
  readonly backingFormat = undefined;

  private constructor(
    readonly path: string,
    readonly file: ImageFile,
    public virtualSize: number,
  ) {}

  static async open(path: string, opts: { writable?: boolean; file?: ImageFile; forceShare?: boolean } = {}): Promise<RawLayer> {
    const file = opts.file ?? (await openImageFile(path, { writable: opts.writable ?? false, ...(opts.forceShare ? { lock: 'read-shared' as const } : {}) }));
    // QEMU sees a raw file as whole 512-byte sectors: the partial last one reads as zeros.
    return new RawLayer(path, file, Math.ceil((await file.size()) / 512) * 512);
  }

  async status(start: number, length: number, opts: { probeHost?: boolean } = {}): Promise<LayerExtent[]> {
    const end = Math.min(start + length, this.virtualSize);
    const out: LayerExtent[] = [];
    if (start >= end) return out;
    const ext = opts.probeHost ? this.file.dataExtents(start, end) : null;
    const piece = (from: number, to: number, data: boolean) => {
      if (to > from) pushExtent(out, { start: from, length: to - from, allocated: true, data, zero: !data, offset: from });
    };
    if (!ext) {
      piece(start, end, true);
      return out;
    }
    let pos = start;
    for (let i = 0; i < ext.length; i += 2) {
      piece(pos, ext[i]!, false);
      piece(ext[i]!, ext[i + 1]!, true);
      pos = ext[i + 1]!;
    }
    piece(pos, end, false);
    return out;
  }

  async statusRecords(start: number, length: number, out: RecordBuffer, opts: { probeHost?: boolean } = {}): Promise<void> {
    // A raw file's extents are its host data extents: few, whatever the disk size.
    appendExtents(out, await this.status(start, length, opts));
  }

  async readExtent(extent: LayerExtent, offsetInExtent: number, dst: Uint8Array): Promise<void> {
    await this.file.readAt(dst, extent.start + offsetInExtent);
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    await this.file.writeAt(data, offset);
  }

  async writeMany(items: ReadonlyArray<{ offset: number; data: Uint8Array }>): Promise<void> {
    for (const it of items) await this.file.writeAt(it.data, it.offset);
  }

  /** Punches the range (reads as zeros, keeps the file size); plain zeroes without `unmap`. */
  async writeZeroes(offset: number, length: number, opts: { unmap?: boolean } = {}): Promise<void> {
    if (opts.unmap) {
      try {
        await this.file.punchHole(offset, length);
        return;
      } catch {
        // No hole punching here: write the zeroes.
      }
    }
    const CHUNK = 4 * 1024 * 1024;
    const zeros = new Uint8Array(Math.min(CHUNK, length));
    for (let at = offset; at < offset + length; at += CHUNK) await this.file.writeAt(zeros.subarray(0, Math.min(CHUNK, offset + length - at)), at);
  }

  async flush(): Promise<void> {
    await this.file.flush();
  }

  /** Grows (or shrinks) the raw disk. */
  async resize(size: number): Promise<void> {
    await this.file.truncate(size);
    this.virtualSize = size;
  }

  async close(): Promise<void> {
    await this.file.close();
  }
}
