/**
 * Every byte qcowkit reads or writes goes through `ImageFile`: positional I/O, flush, punch,
 * truncate, and host-file allocation probing. Nothing here knows about qcow2. Tests substitute
 * implementations (fault injection) through the same interface.
 */
import { close, closeSync, constants, fdatasync, fdatasyncSync, fstatSync, ftruncate, ftruncateSync, openSync, read, readSync, readv, readvSync, write, writeSync, writev, writevSync } from 'node:fs';
import { promisify } from 'node:util';
import { fromSystemError, QcowError } from '../errors.js';
import { dataExtentsManyNative, dataExtentsNative } from './native.js';
import { forgetLockSnapshot, lockImage, type LockMode } from './lock.js';
import { trim, trimSync } from './fsx.js';

export interface ImageFile {
  readonly path: string;
  readonly writable: boolean;
  readonly fd: number;
  /** Current file length in bytes. */
  size(): Promise<number>;
  /** Bytes the filesystem really allocated (st_blocks * 512). */
  allocatedBytes(): Promise<number>;
  /** Fills `buf` from `offset`; bytes past EOF read as zeros (qcow2 files are not padded). */
  readAt(buf: Uint8Array, offset: number): Promise<void>;
  writeAt(buf: Uint8Array, offset: number, opts?: WriteOptions): Promise<void>;
  /**
   * Fills `bufs` in order from `offset`, as one vectored read (preadv): host-contiguous data
   * lands in separate buffers without a copy. Bytes past EOF read as zeros. `inPool`: read in
   * the thread pool even when small (a caller spreading its reads over threads).
   */
  readv(bufs: readonly Uint8Array[], offset: number, opts?: { inPool?: boolean }): Promise<void>;
  /** Writes `bufs` in order at `offset`, as one vectored write (pwritev): no coalescing copy. */
  writev(bufs: readonly Uint8Array[], offset: number, opts?: WriteOptions): Promise<void>;
  flush(): Promise<void>;
  truncate(length: number): Promise<void>;
  /** Deallocates [offset, offset+length) keeping the file size (FALLOC_FL_PUNCH_HOLE). */
  punchHole(offset: number, length: number): Promise<void>;
  /**
   * Data extents of the host file inside [start, end) as pairs [s0, e0, s1, e1, ...] (SEEK_DATA /
   * SEEK_HOLE); null when the platform can't tell (then everything counts as data).
   */
  dataExtents(start: number, end: number): Float64Array | null;
  /**
   * `dataExtents` of many ranges ([s0, e0, s1, e1, ...]) in one call: per range in order, a
   * count c then c pairs. Optional (callers fall back to `dataExtents` per range).
   */
  dataExtentsMany?(ranges: Float64Array): Float64Array | null;
  close(): Promise<void>;
}

export interface WriteOptions {
  /**
   * Through the page cache even when large (see DIRECT_MIN_BYTES): data read back soon, such as
   * bitmap contents, which QEMU loads whole when it opens the image.
   */
  cached?: boolean;
}

export interface OpenFileOptions {
  writable?: boolean;
  /** QEMU-compatible locking; default 'write' for writable files, else 'read'. */
  lock?: LockMode;
  /** The file is opened by an operation that writes (its lock errors don't suggest -U). */
  forWrite?: boolean;
  /**
   * Every operation on the calling thread, none in the thread pool: for a short command with
   * nothing to overlap its I/O with (the CLI's bitmap actions). The pool's threads are created
   * on first use (~1 ms) and each round trip costs a wake-up or two (50-100 us, far more when
   * the other cores are busy); a bitmap action makes about ten of them.
   */
  synchronous?: boolean;
}

/**
 * Reads and writes up to this size are synchronous: a header, an L1 or L2 table, a refcount block come from
 * the page cache in microseconds, while a round trip through the thread pool costs ~50-100 us of
 * waiting (opening a 100-deep chain or mapping 512 L2 tables one after another is mostly that).
 * Larger reads stay asynchronous, several in flight.
 */
const SYNC_READ_MAX = 64 * 1024;
/**
 * Vectored reads (the copy of commit/rebase) up to this size are synchronous too: a copy keeps
 * the thread pool busy with its writes, and reading page-cached data on the main thread costs
 * the memcpy alone, where a pool round trip per 64 KiB cluster costs as much again in wake-ups
 * (measured: copying 1.1 GiB of scattered 64 KiB clusters, ~0.45 s of reads either way, but
 * the whole copy ~1.5x slower with the reads in the pool).
 */
const SYNC_READV_MAX = 1024 * 1024;
/** iovecs per preadv/pwritev call (Linux IOV_MAX). */
const IOV_MAX = 1024;
/**
 * Writes at least this large whose file offset, length and buffer offsets are multiples of
 * DIRECT_ALIGN go through an O_DIRECT descriptor: the data a copy writes is flushed anyway, and
 * copying it into the page cache first costs as much CPU as reading it (on virtual machines,
 * where fresh page-cache pages are expensive to touch, several times more). Smaller writes
 * (metadata, single clusters) stay buffered. Durability is unchanged: flush() still makes both
 * kinds durable.
 */
const DIRECT_MIN_BYTES = 512 * 1024;
const DIRECT_ALIGN = 4096;
/**
 * Buffered bytes after which a flush is started in the background: the kernel starts writing
 * back only after ~30 s or when a tenth of memory is dirty, so without it everything waits for
 * the final flush; with it the disk works while the copy goes on.
 */
const WRITEBACK_BYTES = 64 * 1024 * 1024;

/** Crash-test hook (test/faults): the process SIGKILLs itself right after its Nth write. */
const KILL_AFTER_WRITES = Number(process.env.QCOWKIT_FAULT_KILL_AFTER_WRITES) || 0;
let writesDone = 0;

// Descriptor-based async I/O (the file is opened synchronously: see openImageFile).
const readAsync = promisify(read);
const writeAsync = promisify(write);
const datasyncAsync = promisify(fdatasync);
const truncateAsync = promisify(ftruncate);
const closeAsync = promisify(close);
const readvAsync = promisify(readv);
const writevAsync = promisify(writev);

class NodeImageFile implements ImageFile {
  #closed = false;
  /** Async operations in flight: close waits for them (the descriptor number must not be reused under them). */
  #inflight = 0;
  #drained: (() => void) | undefined;
  /** The O_DIRECT descriptor: undefined until first wanted, null when unavailable. */
  #directFd: number | null | undefined;
  /** Buffers whose memory the kernel found misaligned for direct I/O. */
  readonly #misaligned = new WeakSet<ArrayBufferLike>();
  /** Buffered bytes written since the last flush, and a writeback flush in flight. */
  #buffered = 0;
  #writeback: Promise<void> | undefined;
  constructor(
    readonly path: string,
    readonly writable: boolean,
    readonly fd: number,
    private readonly openSize?: number,
    /** OpenFileOptions.synchronous. */
    private readonly synchronous = false,
  ) {}

  async size(): Promise<number> {
    // A file opened read-only is not ours to change: the size seen at open is kept.
    if (!this.writable && this.openSize !== undefined) return this.openSize;
    try {
      return fstatSync(this.fd).size;
    } catch (e) {
      throw fromSystemError(e, this.path, 'stat failed');
    }
  }

  async allocatedBytes(): Promise<number> {
    try {
      return fstatSync(this.fd).blocks * 512;
    } catch (e) {
      throw fromSystemError(e, this.path, 'stat failed');
    }
  }

  async readAt(buf: Uint8Array, offset: number): Promise<void> {
    // Positions no file can reach (2^53 bytes and beyond, e.g. a corrupt table entry's offset)
    // lie past the end of the file: they read as zeros, as QEMU reads there.
    if (offset + buf.length > Number.MAX_SAFE_INTEGER) {
      buf.fill(0);
      return;
    }
    let done = 0;
    const sync = this.synchronous || buf.length <= SYNC_READ_MAX;
    try {
      while (done < buf.length) {
        const bytesRead = sync
          ? readSync(this.fd, buf, done, buf.length - done, offset + done)
          : (await this.#track(readAsync(this.fd, buf, done, buf.length - done, offset + done))).bytesRead;
        if (bytesRead === 0) break;
        done += bytesRead;
      }
    } catch (e) {
      throw fromSystemError(e, this.path, `read error at offset ${offset + done}`);
    }
    if (done < buf.length) buf.fill(0, done);
  }

  async readv(bufs: readonly Uint8Array[], offset: number, opts: { inPool?: boolean } = {}): Promise<void> {
    let total = 0;
    for (const b of bufs) total += b.length;
    if (offset + total > Number.MAX_SAFE_INTEGER) {
      // Positions no file reaches: readAt's rules.
      for (const b of bufs) {
        await this.readAt(b, offset);
        offset += b.length;
      }
      return;
    }
    const sync = this.synchronous || (total <= SYNC_READV_MAX && opts.inPool !== true);
    let i = 0; // first buffer not yet full
    let skip = 0; // bytes of bufs[i] already filled
    let pos = offset;
    try {
      while (i < bufs.length) {
        const list = bufs.slice(i, i + IOV_MAX) as Uint8Array[];
        if (skip) list[0] = list[0]!.subarray(skip);
        const n = sync ? readvSync(this.fd, list, pos) : (await this.#track(readvAsync(this.fd, list, pos))).bytesRead;
        if (n === 0) break;
        pos += n;
        // Advance over what the call filled.
        let left = n + skip;
        while (i < bufs.length && left >= bufs[i]!.length) left -= bufs[i++]!.length;
        skip = left;
      }
    } catch (e) {
      throw fromSystemError(e, this.path, `read error at offset ${pos}`);
    }
    // Past EOF: zeros.
    if (i < bufs.length) {
      bufs[i]!.fill(0, skip);
      for (let j = i + 1; j < bufs.length; j++) bufs[j]!.fill(0);
    }
  }

  async writev(bufs: readonly Uint8Array[], offset: number, opts: WriteOptions = {}): Promise<void> {
    if (!this.writable) throw new QcowError('IO', 'internal error: write to a file opened read-only', this.path);
    let total = 0;
    for (const b of bufs) total += b.length;
    let pos = offset;
    try {
      const direct = opts.cached ? null : this.#directFor(bufs, offset, total);
      let done = false;
      if (direct !== null) {
        try {
          pos = await this.#writeAll(direct, bufs, offset, this.synchronous);
          done = true;
        } catch (e) {
          // Memory the kernel finds misaligned (JavaScript cannot see where a buffer starts):
          // buffered from now on for those buffers. Other errors are the write's.
          if ((e as NodeJS.ErrnoException).code !== 'EINVAL' || pos !== offset) throw e;
          for (const b of bufs) this.#misaligned.add(b.buffer);
        }
      }
      if (!done) {
        // Synchronous only when nothing is in flight on the file: a buffered write waits for the
        // inode lock, which direct writes that allocate hold (ext4) — the main thread would
        // stall behind the copy's own writes instead of reading the next batch.
        const small = total <= SYNC_READ_MAX && bufs.length === 1 && this.#inflight === 0;
        pos = small ? writeAllSync(this.fd, bufs[0]!, offset) : await this.#writeAll(this.fd, bufs, offset, this.synchronous);
        this.#noteBuffered(total);
      }
    } catch (e) {
      throw fromSystemError(e, this.path, `write error at offset ${pos}`);
    }
    if (KILL_AFTER_WRITES && ++writesDone >= KILL_AFTER_WRITES) process.kill(process.pid, 'SIGKILL');
  }

  async writeAt(buf: Uint8Array, offset: number, opts?: WriteOptions): Promise<void> {
    return this.writev([buf], offset, opts);
  }

  /**
   * Writes all of `bufs` at `offset` through `fd` (pwritev, IOV_MAX pieces a call; on the calling
   * thread when `sync`); returns the end.
   */
  async #writeAll(fd: number, bufs: readonly Uint8Array[], offset: number, sync = false): Promise<number> {
    let i = 0;
    let skip = 0;
    let pos = offset;
    while (i < bufs.length) {
      const list = bufs.slice(i, i + IOV_MAX) as Uint8Array[];
      if (skip) list[0] = list[0]!.subarray(skip);
      const n = sync
        ? list.length === 1
          ? writeSync(fd, list[0]!, 0, list[0]!.length, pos)
          : writevSync(fd, list, pos)
        : list.length === 1
          ? (await this.#track(writeAsync(fd, list[0]!, 0, list[0]!.length, pos))).bytesWritten
          : (await this.#track(writevAsync(fd, list, pos))).bytesWritten;
      pos += n;
      let left = n + skip;
      while (i < bufs.length && left >= bufs[i]!.length) left -= bufs[i++]!.length;
      skip = left;
    }
    return pos;
  }

  /**
   * The descriptor for a write that may bypass the page cache (see DIRECT_MIN_BYTES), or null:
   * large, and aligned in file offset, length and memory (as far as JavaScript can tell: the
   * offsets inside the buffers; buffers the kernel refused once are not tried again).
   */
  #directFor(bufs: readonly Uint8Array[], offset: number, total: number): number | null {
    if (total < DIRECT_MIN_BYTES || offset % DIRECT_ALIGN || this.#directFd === null) return null;
    for (const b of bufs) if (b.byteOffset % DIRECT_ALIGN || b.length % DIRECT_ALIGN || this.#misaligned.has(b.buffer)) return null;
    if (this.#directFd === undefined) {
      // The same open file, reopened through /proc (never another file put at the path since)
      // with O_DIRECT; filesystems without direct I/O (tmpfs) refuse: then no write goes direct.
      try {
        this.#directFd = openSync(`/proc/self/fd/${this.fd}`, constants.O_WRONLY | constants.O_DIRECT);
      } catch {
        this.#directFd = null;
      }
    }
    return this.#directFd;
  }

  /** Buffered data written: past WRITEBACK_BYTES since the last flush, a flush is started and left running. */
  #noteBuffered(bytes: number): void {
    this.#buffered += bytes;
    if (this.#buffered < WRITEBACK_BYTES || this.#writeback || this.synchronous) return;
    this.#buffered = 0;
    const p: Promise<void> = this.#track(datasyncAsync(this.fd)).then(() => {
      if (this.#writeback === p) this.#writeback = undefined;
    });
    p.catch(() => {}); // a failure stays for the next flush to throw
    this.#writeback = p;
  }

  async flush(): Promise<void> {
    if (!this.writable) return;
    try {
      // A failed writeback flush means lost data: the next flush reports it (the kernel may
      // report a writeback error only once per descriptor).
      const bg = this.#writeback;
      this.#writeback = undefined;
      await bg;
      this.#buffered = 0;
      if (this.synchronous) fdatasyncSync(this.fd);
      else await this.#track(datasyncAsync(this.fd));
    } catch (e) {
      throw fromSystemError(e, this.path, 'flush failed');
    }
  }

  async truncate(length: number): Promise<void> {
    try {
      // Growing is a metadata change of microseconds (the write engine grows the file ahead of
      // each batch of new clusters): done here rather than queued in the thread pool behind the
      // copy's reads and writes. Shrinking frees blocks, which can take long: in the pool.
      // (While direct writes are in flight, ext4 makes a size change wait for them: then in the pool.)
      if (this.synchronous || (length >= fstatSync(this.fd).size && this.#inflight === 0)) ftruncateSync(this.fd, length);
      else await this.#track(truncateAsync(this.fd, length));
    } catch (e) {
      throw fromSystemError(e, this.path, 'truncate failed');
    }
  }

  async punchHole(offset: number, length: number): Promise<void> {
    try {
      if (this.synchronous) trimSync(this.fd, offset, length);
      else await this.#track(trim(this.fd, offset, length));
    } catch (e) {
      throw fromSystemError(e, this.path, `punching a hole at ${offset} failed`);
    }
  }

  dataExtents(start: number, end: number): Float64Array | null {
    return dataExtentsNative(this.fd, start, end);
  }

  dataExtentsMany(ranges: Float64Array): Float64Array | null {
    return dataExtentsManyNative(this.fd, ranges);
  }

  async #track<T>(op: Promise<T>): Promise<T> {
    this.#inflight++;
    try {
      return await op;
    } finally {
      if (--this.#inflight === 0) this.#drained?.();
    }
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await this.#writeback?.catch(() => {}); // (a failed operation's last writeback: its error is moot)
    if (this.#inflight) await new Promise<void>((resolve) => (this.#drained = resolve));
    if (this.#directFd) closeSync(this.#directFd);
    // close(2) of a file only read never waits on the disk: no thread-pool round trip for it
    // (nor in synchronous mode).
    if (this.writable && !this.synchronous) await closeAsync(this.fd);
    else closeSync(this.fd);
    forgetLockSnapshot(); // our locks on this file are gone
  }
}

/** One small buffer written synchronously (see SYNC_READ_MAX); returns the end. */
function writeAllSync(fd: number, buf: Uint8Array, offset: number): number {
  for (let done = 0; done < buf.length; ) done += writeSync(fd, buf, done, buf.length - done, offset + done);
  return offset + buf.length;
}

/** How files get opened; tests pass a fault-injecting opener through every operation's options. */
export type FileOpener = (path: string, opts: OpenFileOptions) => Promise<ImageFile>;

/**
 * Opens synchronously: open(2) of a local file takes microseconds, a thread-pool round trip tens
 * of them and much more on a busy machine, and a 100-deep backing chain opens its files one
 * after another.
 */
export async function openImageFile(path: string, opts: OpenFileOptions = {}): Promise<ImageFile> {
  const writable = opts.writable ?? false;
  let fd: number;
  try {
    fd = openSync(path, writable ? 'r+' : 'r');
  } catch (e) {
    throw fromSystemError(e, path, 'Could not open');
  }
  let size: number;
  try {
    const st = fstatSync(fd);
    size = st.size;
    if (st.isDirectory()) throw new QcowError('NOT_QCOW2', 'Could not open: Is a directory', path);
    if (st.isFile()) await lockImage(fd, st.dev, st.ino, opts.lock ?? (writable ? 'write' : 'read'), path, opts.forWrite ?? writable);
  } catch (e) {
    closeSync(fd);
    throw fromSystemError(e, path, 'Could not open');
  }
  return new NodeImageFile(path, writable, fd, size, opts.synchronous === true);
}

/** Runs `worker` over `items` with at most `concurrency` promises in flight, in order of start. */
export async function inParallel<T>(items: Iterable<T>, concurrency: number, worker: (item: T) => Promise<void>): Promise<void> {
  const it = items[Symbol.iterator]();
  let failed: unknown;
  const lane = async (): Promise<void> => {
    for (;;) {
      if (failed !== undefined) return;
      const n = it.next();
      if (n.done) return;
      try {
        await worker(n.value);
      } catch (e) {
        failed ??= e;
        return;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, concurrency) }, lane));
  if (failed !== undefined) throw failed;
}
