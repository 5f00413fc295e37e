/**
 * `check`: consistency check and repair of a qcow2 image, as qemu-img check (QEMU 7.2).
 *
 * Without `repair` the file is opened read-only and never written. With `repair` the first pass
 * fixes what it may ('leaks': leaked clusters, and COPIED flags when nothing else is wrong; 'all':
 * corruptions too, rebuilding the refcount structure when it is broken beyond in-place fixing);
 * when anything was fixed a second, read-only pass checks the result, and that is what is
 * returned (with the first pass's fixed counts), exactly as qemu-img reports it.
 */
import { reserveForLargeWork } from '../kernels/index.js';
import { statSync, type Stats } from 'node:fs';
import { fromSystemError, QcowError, isQcowError } from '../errors.js';
import { hasDataFile } from '../format/header.js';
import { openImageFile, type FileOpener, type ImageFile } from '../io/file.js';
import { BackingChain, probeFile } from '../chain/chain.js';
import { Qcow2Image } from '../qcow2/image.js';
import { createContext } from '../qcow2/check/context.js';
import { runCheckPass } from '../qcow2/check/pass.js';
import { CheckAborted, FIX_ERRORS, FIX_LEAKS, type CheckCounters, type FixMode } from '../qcow2/check/types.js';
import { HeaderWriter } from '../qcow2/header-writer.js';
import type { LayerFormat } from '../chain/layer.js';
import type { OperationOptions } from './options.js';

export interface CheckOptions extends OperationOptions {
  /** -r: 'leaks' fixes leaked clusters, 'all' fixes every error it can. Omitted: read-only. */
  repair?: 'leaks' | 'all' | undefined;
  /** -f: image format; probed when omitted. Raw images have no checks (qemu-img exit 63). */
  format?: LayerFormat | undefined;
  /** -U: read even when another process holds a write lock (read-only checks only). */
  forceShare?: boolean;
  /** QEMU's per-cluster findings ("Leaked cluster 5 refcount=2 reference=1", ...), one line each. */
  onMessage?: ((line: string) => void) | undefined;
  /** Called after a repair pass that fixed something, before the verification pass. */
  onRepaired?: ((fixed: { leaks: number; corruptions: number }) => void) | undefined;
  /** An already opened file (tests inject faulty ones); it must be writable for a repair. */
  file?: ImageFile | undefined;
  /** Opens the image file when `file` is absent (tests inject faulty files here); default openImageFile. */
  openFile?: FileOpener | undefined;
  /** Don't open the backing chain (a caller that already opened and validated it). */
  skipBacking?: boolean | undefined;
}

/**
 * qemu-img's ImageCheck. Keys with value 0 are absent except `check-errors`; keys are in the
 * order qemu-img prints them.
 */
export interface CheckResult {
  'image-end-offset'?: number;
  'compressed-clusters'?: number;
  'total-clusters'?: number;
  corruptions?: number;
  'corruptions-fixed'?: number;
  'check-errors': number;
  leaks?: number;
  'leaks-fixed'?: number;
  'allocated-clusters'?: number;
  filename: string;
  format: string;
  'fragmented-clusters'?: number;
}

/** Message of the error thrown for formats without checks (the CLI exits 63 on it). */
export const NO_CHECKS = 'This image format does not support checks';

export async function check(path: string, opts: CheckOptions = {}): Promise<CheckResult> {
  reserveForLargeWork(); // before any read lands in wasm memory
  const fix: FixMode = opts.repair === 'all' ? FIX_LEAKS | FIX_ERRORS : opts.repair === 'leaks' ? FIX_LEAKS : 0;
  if (opts.repair !== undefined && opts.repair !== 'leaks' && opts.repair !== 'all')
    throw new QcowError('INVALID_ARGUMENT', `Unknown option value for -r (expecting 'leaks' or 'all'): ${String(opts.repair)}`, path);
  if (fix && opts.forceShare) throw new QcowError('INVALID_ARGUMENT', 'force-share=on can only be used with read-only images', path);

  const file = opts.file ?? (await (opts.openFile ?? openImageFile)(path, { writable: fix !== 0, lock: fix ? 'write' : opts.forceShare ? 'read-shared' : 'read' }));
  try {
    if ((opts.format ?? (await probeFile(file))) === 'raw') throw new QcowError('NO_CHECKS', NO_CHECKS, path);
    const first = await pass(path, file, fix, opts);
    let final = first;
    if (first.leaksFixed || first.corruptionsFixed) {
      opts.onRepaired?.({ leaks: first.leaksFixed, corruptions: first.corruptionsFixed });
      final = await pass(path, file, 0, opts, true);
      final.leaksFixed = first.leaksFixed;
      final.corruptionsFixed = first.corruptionsFixed;
    }
    return toResult(path, final);
  } finally {
    if (!opts.file) await file.close();
  }
}


/**
 * One pass. `settle`: the verification pass after a repair — when it finds the image consistent,
 * a dirty or corrupt bit the repair pass could not clear yet (e.g. after a rebuild that started
 * from unreadable refcounts) is cleared.
 */
async function pass(path: string, file: ImageFile, fix: FixMode, opts: CheckOptions, settle = false): Promise<CheckCounters> {
  const img = await Qcow2Image.open(path, { file, writable: fix !== 0, forRepair: true, metadataOnly: true, check: true });
  try {
    if (img.header.cryptMethod !== 0)
      throw new QcowError('UNSUPPORTED', `encrypted images are not supported (encryption method ${img.header.cryptMethod === 1 ? 'aes' : 'luks'})`, path);
    if (!settle && img.header.dataFile !== undefined && hasDataFile(img.header)) await openDataFile(img.header.dataFile, path);
    // A read-write open clears the autoclear bits it does not know (QEMU does it as the image
    // opens, before its backing file is opened and whether or not anything needs repair).
    if (fix && !settle) await HeaderWriter.for(file, img.header).clearUnknownAutoclear();
    // qemu-img check opens the whole backing chain (read-only) and fails when it can't.
    if (!settle && !opts.skipBacking && img.backingName !== undefined)
      await Promise.all((await BackingChain.openBackingOf(img, { forceShare: opts.forceShare, signal: opts.signal })).map((l) => l.close()));
    const ctx = await createContext(img, file, {
      writable: fix !== 0,
      report: opts.onMessage ?? (() => {}),
      signal: opts.signal,
      onProgress: opts.onProgress,
      header: fix ? HeaderWriter.for(file, img.header) : undefined,
    });
    const res = await runCheckPass(ctx, fix);
    if (settle && !res.checkErrors && !res.corruptions) {
      const header = HeaderWriter.for(file, img.header);
      if (header.dirty || header.corrupt) {
        await header.clearUnknownAutoclear();
        await header.markClean();
        await header.clearCorrupt();
      }
    }
    return res;
  } catch (e) {
    if (e instanceof CheckAborted) {
      const code = isQcowError(e.cause) ? e.cause.code : 'IO';
      throw new QcowError(code === 'ABORTED' ? 'ABORTED' : 'IO', `Check failed: ${e.reason}`, path, { cause: e });
    }
    if (isQcowError(e) && e.code === 'IO' && fix) throw new QcowError('IO', `Check failed: ${e.message}`, path, { cause: e });
    throw e;
  } finally {
    img.l2Tables.clear();
  }
}

/**
 * QEMU opens the external data file with the image (and fails when it can't), although check
 * reads only metadata. QEMU 7.2 takes a relative data file name from the current directory.
 */
async function openDataFile(name: string, path: string): Promise<void> {
  let st: Stats;
  try {
    st = statSync(name); // synchronous: loading node:fs/promises costs ~1 ms of start-up
  } catch (e) {
    throw fromSystemError(e, path, `Could not open '${name}'`);
  }
  if (!st.isFile()) throw new QcowError('UNSUPPORTED', `'file' driver requires '${name}' to be a regular file`, path);
}

function toResult(path: string, r: CheckCounters): CheckResult {
  const out: Record<string, number | string> = {};
  const put = (key: string, v: number) => {
    if (v) out[key] = v;
  };
  put('image-end-offset', r.imageEndOffset);
  put('compressed-clusters', r.compressedClusters);
  put('total-clusters', r.totalClusters);
  put('corruptions', r.corruptions);
  put('corruptions-fixed', r.corruptionsFixed);
  out['check-errors'] = r.checkErrors;
  put('leaks', r.leaks);
  put('leaks-fixed', r.leaksFixed);
  put('allocated-clusters', r.allocatedClusters);
  out.filename = path;
  out.format = 'qcow2';
  put('fragmented-clusters', r.fragmentedClusters);
  return out as unknown as CheckResult;
}

/** qemu-img check's exit status for a result: 0 clean, 1 check errors, 2 corruptions, 3 leaks. */
export function checkExitCode(r: CheckResult): number {
  if (r['check-errors']) return 1;
  if (r.corruptions) return 2;
  if (r.leaks) return 3;
  return 0;
}
