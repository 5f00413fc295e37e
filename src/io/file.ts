/**
 * Every byte qcowkit reads or writes goes through `ImageFile`: positional I/O, flush, punch,
 * truncate, and host-file allocation probing. Nothing here knows about qcow2. Tests substitute
 * implementations (fault injection) through the same interface.
 */
import { close, closeSync, fdatasync, fstatSync, ftruncate, openSync, read, readSync, write, writeSync } from 'node:fs';
import { promisify } from 'node:util';
import { fromSystemError, QcowError } from '../errors.js';
import { dataExtentsManyNative, dataExtentsNative } from './native.js';
import { forgetLockSnapshot, lockImage, type LockMode } from './lock.js';
import { trim } from './fsx.js';

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
  writeAt(buf: Uint8Array, offset: number): Promise<void>;
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

export interface OpenFileOptions {
  writable?: boolean;
  /** QEMU-compatible locking; default 'write' for writable files, else 'read'. */
  lock?: LockMode;
  /** The file is opened by an operation that writes (its lock errors don't suggest -U). */
  forWrite?: boolean;
}

/**
 * Reads and writes up to this size are synchronous: a header, an L1 or L2 table, a refcount block come from
 * the page cache in microseconds, while a round trip through the thread pool costs ~50-100 us of
 * waiting (opening a 100-deep chain or mapping 512 L2 tables one after another is mostly that).
 * Larger reads stay asynchronous, several in flight.
 */
const SYNC_READ_MAX = 64 * 1024;

/** Crash-test hook (test/faults): the process SIGKILLs itself right after its Nth write. */
const KILL_AFTER_WRITES = Number(process.env.QCOWKIT_FAULT_KILL_AFTER_WRITES) || 0;
let writesDone = 0;

// Descriptor-based async I/O (the file is opened synchronously: see openImageFile).
const readAsync = promisify(read);
const writeAsync = promisify(write);
const datasyncAsync = promisify(fdatasync);
const truncateAsync = promisify(ftruncate);
const closeAsync = promisify(close);

class NodeImageFile implements ImageFile {
  #closed = false;
  /** Async operations in flight: close waits for them (the descriptor number must not be reused under them). */
  #inflight = 0;
  #drained: (() => void) | undefined;
  constructor(
    readonly path: string,
    readonly writable: boolean,
    readonly fd: number,
    private readonly openSize?: number,
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
    const sync = buf.length <= SYNC_READ_MAX;
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

  async writeAt(buf: Uint8Array, offset: number): Promise<void> {
    if (!this.writable) throw new QcowError('IO', 'internal error: write to a file opened read-only', this.path);
    let done = 0;
    const sync = buf.length <= SYNC_READ_MAX;
    try {
      while (done < buf.length) {
        done += sync
          ? writeSync(this.fd, buf, done, buf.length - done, offset + done)
          : (await this.#track(writeAsync(this.fd, buf, done, buf.length - done, offset + done))).bytesWritten;
      }
    } catch (e) {
      throw fromSystemError(e, this.path, `write error at offset ${offset + done}`);
    }
    if (KILL_AFTER_WRITES && ++writesDone >= KILL_AFTER_WRITES) process.kill(process.pid, 'SIGKILL');
  }

  async flush(): Promise<void> {
    if (!this.writable) return;
    try {
      await this.#track(datasyncAsync(this.fd));
    } catch (e) {
      throw fromSystemError(e, this.path, 'flush failed');
    }
  }

  async truncate(length: number): Promise<void> {
    try {
      await this.#track(truncateAsync(this.fd, length));
    } catch (e) {
      throw fromSystemError(e, this.path, 'truncate failed');
    }
  }

  async punchHole(offset: number, length: number): Promise<void> {
    try {
      await this.#track(trim(this.fd, offset, length));
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
    if (this.#inflight) await new Promise<void>((resolve) => (this.#drained = resolve));
    // close(2) of a file only read never waits on the disk: no thread-pool round trip for it.
    if (this.writable) await closeAsync(this.fd);
    else closeSync(this.fd);
    forgetLockSnapshot(); // our locks on this file are gone
  }
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
  return new NodeImageFile(path, writable, fd, size);
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
