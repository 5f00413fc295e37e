/**
 * `create`: a new qcow2 or raw image, as qemu-img create 7.2 makes it. Everything is validated
 * (options, backing file, size) before the target is touched; then the file is created or, like
 * QEMU, truncated once its write lock is held, written and closed (not flushed: qemu-img create
 * doesn't either, and an fdatasync would be most of the command's time).
 */
import { realpathSync, writeFileSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { resolve } from 'node:path';
import { BackingChain, hasProtocolPrefix, probeFormat, resolveBackingPath } from '../chain/chain.js';
import type { LayerFormat } from '../chain/layer.js';
import { fromSystemError, QcowError, throwIfAborted } from '../errors.js';
import { alignUp } from '../format/bytes.js';
import { AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION, INCOMPAT_DATA_FILE, INCOMPAT_EXTL2 } from '../format/constants.js';
import { encodeHeader } from '../format/header.js';
import { inParallel, openImageFile, type ImageFile } from '../io/file.js';
import { fillMetadata, freshLayout, SIZE_TOO_LARGE, type FreshLayout } from '../qcow2/layout.js';
import type { OperationOptions } from './options.js';

export type Preallocation = 'off' | 'metadata' | 'falloc' | 'full';

/** The qcow2 `-o` options (raw takes only `preallocation`). Defaults as qemu-img. */
export interface Qcow2CreateOptions {
  /** 512 .. 2 MiB, a power of two (default 64 KiB). */
  clusterSize?: number | undefined;
  /** '0.10' = qcow2 v2, '1.1' = v3 (default). */
  compat?: '0.10' | '1.1' | undefined;
  lazyRefcounts?: boolean | undefined;
  /** 1, 2, 4, ..., 64 (default 16; v2 only 16). */
  refcountBits?: number | undefined;
  /** 128-bit L2 entries with subclusters (v3, clusters >= 16 KiB). */
  extendedL2?: boolean | undefined;
  compressionType?: 'zlib' | 'zstd' | undefined;
  /** off; metadata (qcow2: every L2 table and data cluster allocated, file sparse); full (zeros written). */
  preallocation?: Preallocation | undefined;
  /**
   * External data file (v3): created (or truncated) with the image; the name is stored as given
   * and, as in QEMU 7.2, a relative name is relative to the current directory.
   */
  dataFile?: string | undefined;
  /** The data file stays a valid raw image of the disk (implies preallocation=metadata). */
  dataFileRaw?: boolean | undefined;
}

export interface CreateOptions extends OperationOptions {
  format: LayerFormat;
  /** Virtual size in bytes, rounded up to 512; defaults to the backing file's size. */
  size?: number | undefined;
  /** Backing file name (stored verbatim; relative names are relative to the new image). */
  backing?: { file: string; format?: LayerFormat | undefined } | undefined;
  /** -u: don't open the backing file (then size is required). */
  unsafe?: boolean | undefined;
  options?: Qcow2CreateOptions | undefined;
  /**
   * Called with the final size once the image-level checks (size, backing file) passed and
   * before the format's own checks — where qemu-img prints its "Formatting ..." line. An error
   * it throws ends the create before anything is written.
   */
  onFormatting?: ((size: number) => void) | undefined;
  /**
   * --bitmaps: the new overlay starts with the backing image's recording bitmaps (same names and
   * granularity, empty, enabled), so incremental backups go on across the new layer.
   */
  bitmaps?: boolean | undefined;
}

export interface CreateResult {
  path: string;
  format: LayerFormat;
  size: number;
  preallocation: Preallocation;
  /** Length of the created file. */
  fileLength: number;
  clusterSize?: number;
  compat?: '0.10' | '1.1';
  refcountBits?: number;
  extendedL2?: boolean;
  lazyRefcounts?: boolean;
  compressionType?: 'zlib' | 'zstd';
  backing?: { file: string; format: LayerFormat };
  dataFile?: { file: string; raw: boolean; length: number };
  /** --bitmaps: the bitmaps created in the new overlay. */
  bitmaps?: Array<{ name: string; granularity: number }>;
}

/** Largest writes issued (and buffers built); several run at once. */
const CHUNK = 8 * 1024 * 1024;
const WRITES_IN_FLIGHT = 4;

export async function create(path: string, opts: CreateOptions): Promise<CreateResult> {
  const bad = (msg: string) => new QcowError('INVALID_ARGUMENT', msg, path);
  if (opts.format !== 'qcow2' && opts.format !== 'raw') throw bad(`Unknown file format '${String(opts.format)}' (qcow2 and raw are supported)`);
  const o = opts.options ?? {};
  // As qemu-img: what bdrv_img_create checks (size, backing file) comes before the "Formatting"
  // line, what the format driver checks (option values, preallocation) after it.
  const driverChecks = () => {
    if (!['off', 'metadata', 'falloc', 'full'].includes(preallocation)) throw bad(`Parameter 'preallocation' does not accept value '${preallocation}'`);
  };
  const preallocation = o.preallocation ?? 'off';

  if (opts.format === 'raw') {
    if (opts.backing) throw bad("Backing file not supported for file format 'raw'");
    const size = checkSize(opts.size, path);
    opts.onFormatting?.(size);
    driverChecks();
    const extra = Object.entries(o).find(([k, v]) => k !== 'preallocation' && v !== undefined);
    if (extra) throw bad(`Invalid parameter '${extra[0]}' for format 'raw'`);
    if (preallocation === 'metadata') throw bad('Unsupported preallocation mode: metadata');
    if (size > Number.MAX_SAFE_INTEGER) throw tooLarge('raw', path);
    await writeImage(path, async (file) => {
      // A size the file system can't hold fails with EFBIG: qemu-img's message for it.
      await file.truncate(size).catch((e: unknown) => {
        throw isFileTooLarge(e) ? tooLarge('raw', path) : e;
      });
      // falloc: the blocks allocated as full does (Node has no fallocate; the result reads the same).
      if (preallocation === 'full' || preallocation === 'falloc') await writeZeros(file, 0, size, opts);
    });
    return { path, format: 'raw', size, preallocation, fileLength: size };
  }

  const backing = opts.backing ? await checkBacking(path, opts.backing, opts) : undefined;
  const size = checkSize(opts.size ?? backing?.size, path);
  opts.onFormatting?.(size);
  driverChecks();
  const s = qcow2Settings(o, preallocation, opts.backing !== undefined, path);
  // --bitmaps: everything checked (and the backing's bitmaps read) before the image is written.
  let bitmaps: Array<{ name: string; granularity: number }> | undefined;
  let bitmapChain: typeof import('./bitmap-chain.js') | undefined;
  if (opts.bitmaps) {
    if (!backing) throw bad('--bitmaps needs a backing file (-b)');
    if (opts.unsafe) throw bad('--bitmaps reads the backing file: it cannot be used with -u');
    if (s.version < 3) throw bad('Cannot store dirty bitmaps in qcow2 v2 files (--bitmaps needs compat=1.1)');
    bitmapChain = await import('./bitmap-chain.js');
    bitmaps = backing.format === 'qcow2' ? await bitmapChain.planRecordingBitmaps(path, resolveBackingPath(path, backing.file), size) : [];
  }
  if (s.dataFile !== undefined) await checkDataFile(path, s.dataFile, backing && resolveBackingPath(path, backing.file));
  const layout = freshLayout(
    { clusterBits: s.clusterBits, refcountOrder: s.refcountOrder, extendedL2: s.extendedL2, size, preallocate: s.preallocation !== 'off', externalData: s.dataFile !== undefined },
    path,
  );
  const header = encodeHeader(
    {
      version: s.version,
      clusterBits: s.clusterBits,
      size,
      l1Size: layout.l1Size,
      l1TableOffset: layout.l1TableOffset,
      refcountTableOffset: layout.refcountTableOffset,
      refcountTableClusters: layout.refcountTableClusters,
      refcountOrder: s.refcountOrder,
      incompatibleFeatures: (s.extendedL2 ? INCOMPAT_EXTL2 : 0n) | (s.zstd ? INCOMPAT_COMPRESSION : 0n) | (s.dataFile !== undefined ? INCOMPAT_DATA_FILE : 0n),
      compatibleFeatures: s.lazyRefcounts ? COMPAT_LAZY_REFCOUNTS : 0n,
      autoclearFeatures: s.dataFileRaw ? AUTOCLEAR_DATA_FILE_RAW : 0n,
      compressionType: s.zstd ? 1 : 0,
      backingFile: backing?.file,
      backingFormat: backing?.format,
      dataFile: s.dataFile,
    },
    path,
  );
  const zeros = s.preallocation === 'full' || s.preallocation === 'falloc';
  // The data file covers the disk, in whole (sub)clusters once they are preallocated (as QEMU
  // leaves it); its data is written (zeros) only for full/falloc.
  const granule = s.preallocation === 'off' ? 512 : layout.clusterSize / (s.extendedL2 ? 32 : 1);
  const dataLength = alignUp(size, granule);

  await writeImage(path, async (file) => {
    if (s.dataFile !== undefined) {
      await writeImage(s.dataFile, async (data) => {
        await data.truncate(dataLength);
        if (zeros) await writeZeros(data, 0, dataLength, opts);
      });
    }
    try {
      await file.truncate(layout.fileLength);
      await writeTables(file, layout, opts);
      if (zeros && s.dataFile === undefined) await writeZeros(file, layout.dataOffset, layout.dataClusters * layout.clusterSize, opts);
      // Last, so that an interrupted create leaves no file that looks like a qcow2 image.
      await file.writeAt(header, 0);
    } catch (e) {
      // As QEMU: a failed create removes the data file it made too.
      if (s.dataFile !== undefined) await rm(s.dataFile, { force: true });
      throw e;
    }
  });
  const fileLength = bitmaps?.length ? await bitmapChain!.writeRecordingBitmaps(path, bitmaps) : layout.fileLength;

  return {
    path,
    format: 'qcow2',
    size,
    preallocation: s.preallocation,
    fileLength,
    clusterSize: layout.clusterSize,
    compat: s.version === 3 ? '1.1' : '0.10',
    refcountBits: 2 ** s.refcountOrder,
    extendedL2: s.extendedL2,
    lazyRefcounts: s.lazyRefcounts,
    compressionType: s.zstd ? 'zstd' : 'zlib',
    ...(backing ? { backing: { file: backing.file, format: backing.format } } : {}),
    ...(s.dataFile !== undefined ? { dataFile: { file: s.dataFile, raw: s.dataFileRaw, length: dataLength } } : {}),
    ...(bitmaps ? { bitmaps } : {}),
  };
}

interface Qcow2Settings {
  version: 2 | 3;
  clusterBits: number;
  refcountOrder: number;
  extendedL2: boolean;
  lazyRefcounts: boolean;
  zstd: boolean;
  /** What is preallocated in the end (data-file-raw asks for metadata at least). */
  preallocation: Preallocation;
  dataFile: string | undefined;
  dataFileRaw: boolean;
}

/**
 * qemu-img's checks of the qcow2 options, in its order, with its messages (with compat=, the -o
 * name, where QEMU says version=).
 */
function qcow2Settings(o: Qcow2CreateOptions, preallocation: Preallocation, hasBacking: boolean, path: string): Qcow2Settings {
  const bad = (msg: string) => new QcowError('INVALID_ARGUMENT', msg, path);
  const needV3 = (what: string, and = 'and') => bad(`${what} compatibility level 1.1 ${and} above (use compat=1.1)`);
  const compat = o.compat ?? '1.1';
  if (compat !== '0.10' && compat !== '1.1') throw bad(`Parameter 'compat' does not accept value '${String(compat)}'`);
  const version = compat === '1.1' ? 3 : 2;
  const extendedL2 = o.extendedL2 === true;
  if (version === 2 && extendedL2) throw needV3('Extended L2 entries are only supported with');

  const clusterBits = Math.log2(o.clusterSize ?? 65536);
  if (!Number.isInteger(clusterBits) || clusterBits < 9 || clusterBits > 21) throw bad('Cluster size must be a power of two between 512 and 2048k');
  if (extendedL2 && clusterBits < 14) throw bad('Extended L2 entries are only supported with cluster sizes of at least 16384 bytes');
  // Preallocated clusters would hide the backing file's data (extended L2 keeps them unallocated).
  if (hasBacking && preallocation !== 'off' && !extendedL2)
    throw bad('Backing file and preallocation can only be used at the same time if extended_l2 is on');

  const lazyRefcounts = o.lazyRefcounts === true;
  if (version === 2 && lazyRefcounts) throw needV3('Lazy refcounts only supported with');
  const refcountOrder = Math.log2(o.refcountBits ?? 16);
  if (!Number.isInteger(refcountOrder) || refcountOrder < 0 || refcountOrder > 6) throw bad('Refcount width must be a power of two and may not exceed 64 bits');
  if (version === 2 && refcountOrder !== 4) throw needV3('Different refcount widths than 16 bits require', 'or');

  const dataFileRaw = o.dataFileRaw === true;
  if (dataFileRaw && o.dataFile === undefined) throw bad('data-file-raw requires data-file');
  if (dataFileRaw && hasBacking) throw bad('Backing file and data-file-raw cannot be used at the same time');
  if (o.dataFile !== undefined && version === 2) throw needV3('External data files are only supported with');

  const compression = o.compressionType ?? 'zlib';
  if (compression !== 'zlib' && compression !== 'zstd') throw bad(`Parameter 'compression_type' does not accept value '${String(compression)}'`);
  if (version === 2 && compression === 'zstd') throw needV3('Non-zlib compression type is only supported with');
  return {
    version,
    clusterBits,
    refcountOrder,
    extendedL2,
    lazyRefcounts,
    zstd: compression === 'zstd',
    preallocation: dataFileRaw && preallocation === 'off' ? 'metadata' : preallocation,
    dataFile: o.dataFile,
    dataFileRaw,
  };
}

/** The data file name must be a plain file that is neither the new image nor its backing file. */
async function checkDataFile(path: string, name: string, backingPath: string | undefined): Promise<void> {
  if (name === '') throw new QcowError('NOT_FOUND', "Could not create '': No such file or directory", path);
  if (hasProtocolPrefix(name)) throw new QcowError('UNSUPPORTED', `data file name '${name}' uses a protocol prefix; only plain files are supported`, path);
  if (await sameFile(name, path)) throw new QcowError('INVALID_ARGUMENT', 'The data file must not be the image file itself', path);
  if (backingPath !== undefined && (await sameFile(name, backingPath)))
    throw new QcowError('INVALID_ARGUMENT', 'The data file must not be the backing file', path);
}

/**
 * What qemu-img checks before its "Formatting" line: a size is given, within 0 .. 2^63 - 1. A
 * size beyond what the format (or qcowkit's 2^53) can hold fails later, in `tooLarge`.
 */
function checkSize(size: number | undefined, path: string): number {
  if (size === undefined) throw new QcowError('INVALID_ARGUMENT', 'Image creation needs a size parameter', path);
  if (!Number.isInteger(size) || size < 0 || size >= 2 ** 63)
    throw new QcowError('INVALID_ARGUMENT', `Invalid image size specified: ${size} (must be between 0 and 9223372036854775807)`, path);
  return size > Number.MAX_SAFE_INTEGER ? size : alignUp(size, 512); // QEMU counts whole sectors
}

/** qemu-img's message for a size the format can't hold (EFBIG). */
function tooLarge(format: LayerFormat, path: string): QcowError {
  return new QcowError('INVALID_ARGUMENT', format === 'qcow2' ? SIZE_TOO_LARGE : "The image size is too large for file format 'raw'", path);
}

/** Validates the backing file and, unless unsafe, opens its chain for its size. */
async function checkBacking(
  path: string,
  b: NonNullable<CreateOptions['backing']>,
  opts: CreateOptions,
): Promise<{ file: string; format: LayerFormat; size: number | undefined }> {
  const bad = (msg: string) => new QcowError('INVALID_ARGUMENT', msg, path);
  if (b.file === '') throw bad('Expected backing file name, got empty string');
  if (hasProtocolPrefix(b.file)) throw new QcowError('BACKING', `backing file name '${b.file}' uses a protocol prefix; only plain files are supported`, path);
  const full = resolveBackingPath(path, b.file);
  if (await sameFile(full, path)) throw bad('Trying to create an image with the same filename as the backing file');
  if (b.format !== undefined && b.format !== 'qcow2' && b.format !== 'raw')
    throw new QcowError('UNSUPPORTED', `backing format '${String(b.format)}' is not supported (qcow2 and raw are)`, path);
  // Unless -u, qemu-img opens the backing chain first (probing the format when none is given),
  // so a backing file that can't be opened is reported before a missing -F.
  const size = opts.unsafe ? undefined : await backingSize(path, full, b.format, opts);
  if (b.format === undefined) {
    // QEMU 7.2 refuses to guess (a probed raw backing file could be a security hole).
    const detected = await probeFormat(full).catch(() => undefined);
    const fix = detected ? `detected ${detected}: add -F ${detected}` : 'add -F qcow2 or -F raw';
    throw bad(`Backing file specified without backing format (${fix})`);
  }
  return { file: b.file, format: b.format, size };
}

/** Opens the backing chain at `full` (format probed when undefined) for its virtual size. */
async function backingSize(path: string, full: string, format: LayerFormat | undefined, opts: CreateOptions): Promise<number> {
  let chain: BackingChain;
  try {
    chain = await BackingChain.open(full, { format, metadataOnly: true, forceShare: true, onWarning: opts.onWarning, signal: opts.signal });
  } catch (e) {
    const why = e instanceof QcowError ? `${e.file !== undefined && e.file !== full ? `${e.file}: ` : ''}${e.message}` : String(e);
    throw new QcowError('BACKING', `Could not open backing image '${full}': ${why}`, path, { cause: e });
  }
  try {
    return chain.virtualSize;
  } finally {
    await chain.close();
  }
}

/** Same name after resolving, or the same file through links (never overwrite the backing file). */
async function sameFile(a: string, b: string): Promise<boolean> {
  if (resolve(a) === resolve(b)) return true;
  const real = (p: string): string | undefined => {
    try {
      return realpathSync.native(p);
    } catch {
      return undefined;
    }
  };
  const ra = real(a);
  return ra !== undefined && ra === real(b);
}

/**
 * Creates the file if missing, takes the write lock, and only then truncates it (so an image in
 * use elsewhere is refused, not destroyed). On failure the half-written file is removed, as QEMU
 * does; a file that existed but whose lock we could not get is left alone.
 */
async function writeImage(path: string, write: (file: ImageFile) => Promise<void>): Promise<void> {
  let created = false;
  try {
    writeFileSync(path, new Uint8Array(0), { flag: 'wx' }); // (no thread-pool trip: start-up counts)
    created = true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw fromSystemError(e, path, 'Could not create');
  }
  let file: ImageFile;
  try {
    file = await openImageFile(path, { writable: true });
  } catch (e) {
    if (created) await rm(path, { force: true });
    throw e;
  }
  try {
    await file.truncate(0);
    await write(file);
    await file.close();
  } catch (e) {
    await file.close().catch(() => {});
    await rm(path, { force: true });
    throw e;
  }
}

/** Builds and writes the table area in CHUNK-sized buffers, several writes in flight. */
async function writeTables(file: ImageFile, l: FreshLayout, opts: CreateOptions): Promise<void> {
  const chunk = Math.max(CHUNK, l.clusterSize);
  const starts: number[] = [];
  for (let at = l.clusterSize; at < l.tablesEnd; at += chunk) starts.push(at);
  let done = 0;
  const total = l.tablesEnd - l.clusterSize;
  await inParallel(starts, WRITES_IN_FLIGHT, async (at) => {
    throwIfAborted(opts.signal, file.path);
    const buf = new Uint8Array(Math.min(chunk, l.tablesEnd - at));
    fillMetadata(l, at, buf);
    await file.writeAt(buf, at);
    opts.onProgress?.((done += buf.length), total);
  });
}

async function writeZeros(file: ImageFile, start: number, length: number, opts: CreateOptions): Promise<void> {
  const zeros = new Uint8Array(Math.min(CHUNK, length));
  const starts: number[] = [];
  for (let at = start; at < start + length; at += CHUNK) starts.push(at);
  let done = 0;
  await inParallel(starts, WRITES_IN_FLIGHT, async (at) => {
    throwIfAborted(opts.signal, file.path);
    const n = Math.min(CHUNK, start + length - at);
    await file.writeAt(n === zeros.length ? zeros : zeros.subarray(0, n), at);
    opts.onProgress?.((done += n), length);
  });
}

function isFileTooLarge(e: unknown): boolean {
  const code = (x: unknown) => (x as NodeJS.ErrnoException | undefined)?.code;
  return code(e) === 'EFBIG' || (e instanceof QcowError && code(e.cause) === 'EFBIG');
}
