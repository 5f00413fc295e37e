/**
 * Write-behind for one file: writes issued with `writeBehind` run while the caller goes on, and
 * `flush()` first waits until every one of them has ended, so a flush still makes everything
 * written before it durable: whatever is ordered by flushes (the metadata caches' declared
 * dependencies) holds as if every write had been awaited. A write or read that overlaps a range
 * still being written waits for that write first (the file never sees two writes of one range
 * race, nor a read of half-written data). A failed write-behind fails every later flush: what it
 * should have written is not there.
 */
import type { ImageFile, WriteOptions } from './file.js';

interface InFlight {
  start: number;
  end: number;
  done: Promise<void>;
}

export class WriteFence implements ImageFile {
  readonly #inflight = new Set<InFlight>();
  #error: unknown;

  /** Present when the inner file has it (callers fall back to dataExtents otherwise). */
  readonly dataExtentsMany?: (ranges: Float64Array) => Float64Array | null;

  constructor(readonly inner: ImageFile) {
    if (inner.dataExtentsMany) this.dataExtentsMany = (ranges) => inner.dataExtentsMany!(ranges);
  }

  get path(): string {
    return this.inner.path;
  }
  get writable(): boolean {
    return this.inner.writable;
  }
  get fd(): number {
    return this.inner.fd;
  }

  /** Starts writing `bufs` at `offset`; the promise settles when the write ended (flush waits too). */
  writeBehind(bufs: readonly Uint8Array[], offset: number): Promise<void> {
    let length = 0;
    for (const b of bufs) length += b.length;
    const before = this.#overlapping(offset, length);
    const write = before.length ? Promise.all(before).then(() => this.inner.writev(bufs, offset)) : this.inner.writev(bufs, offset);
    const entry: InFlight = { start: offset, end: offset + length, done: write.then(() => {}, (e: unknown) => void (this.#error ??= e)) };
    this.#inflight.add(entry);
    void entry.done.then(() => this.#inflight.delete(entry));
    return write;
  }

  /** Waits for every write-behind issued so far; throws the first that failed (then and ever after). */
  async drain(): Promise<void> {
    await Promise.all([...this.#inflight].map((w) => w.done));
    if (this.#error !== undefined) throw this.#error;
  }

  /** Promises of the writes in flight that overlap [offset, offset+length). */
  #overlapping(offset: number, length: number): Array<Promise<void>> {
    const out: Array<Promise<void>> = [];
    for (const w of this.#inflight) if (w.start < offset + length && offset < w.end) out.push(w.done);
    return out;
  }

  async #after(offset: number, length: number): Promise<void> {
    if (!this.#inflight.size) return;
    const before = this.#overlapping(offset, length);
    if (before.length) await Promise.all(before);
  }

  async flush(): Promise<void> {
    await this.drain();
    await this.inner.flush();
  }

  async readAt(buf: Uint8Array, offset: number): Promise<void> {
    await this.#after(offset, buf.length);
    await this.inner.readAt(buf, offset);
  }

  async readv(bufs: readonly Uint8Array[], offset: number, opts?: { inPool?: boolean }): Promise<void> {
    let length = 0;
    for (const b of bufs) length += b.length;
    await this.#after(offset, length);
    await this.inner.readv(bufs, offset, opts);
  }

  async writeAt(buf: Uint8Array, offset: number, opts?: WriteOptions): Promise<void> {
    await this.#after(offset, buf.length);
    await this.inner.writeAt(buf, offset, opts);
  }

  async writev(bufs: readonly Uint8Array[], offset: number, opts?: WriteOptions): Promise<void> {
    let length = 0;
    for (const b of bufs) length += b.length;
    await this.#after(offset, length);
    await this.inner.writev(bufs, offset, opts);
  }

  async truncate(length: number): Promise<void> {
    // Cutting the file must not race a write past the new end.
    await this.#after(length, Number.MAX_SAFE_INTEGER - length);
    await this.inner.truncate(length);
  }

  async punchHole(offset: number, length: number): Promise<void> {
    await this.#after(offset, length);
    await this.inner.punchHole(offset, length);
  }

  size(): Promise<number> {
    return this.inner.size();
  }
  allocatedBytes(): Promise<number> {
    return this.inner.allocatedBytes();
  }
  dataExtents(start: number, end: number): Float64Array | null {
    return this.inner.dataExtents(start, end);
  }

  /** Closes the file (after the writes in flight ended, whatever their outcome). */
  async close(): Promise<void> {
    await Promise.all([...this.#inflight].map((w) => w.done));
    await this.inner.close();
  }
}
