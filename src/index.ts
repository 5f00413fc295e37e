/** qcowkit's public library API. */
export { QcowError, type QcowErrorCode, EXIT_CODES } from './errors.js';
export type { OperationOptions } from './ops/options.js';
export { openImageFile, type ImageFile } from './io/file.js';
export { Qcow2Image, type OpenQcow2Options } from './qcow2/image.js';
export { BackingChain, type OpenChainOptions, type MapEntry, resolveBackingPath, probeFormat } from './chain/chain.js';
export type { BlockLayer, LayerExtent, LayerFormat } from './chain/layer.js';
export { RawLayer } from './chain/raw.js';
export { info, type ImageInfo, type InfoOptions } from './ops/info.js';
export { mapImage, type MapOptions } from './ops/map.js';
export { mapNbd, nbdUri, type NbdTarget, type MapNbdOptions } from './ops/map-nbd.js';
export { NbdClient, type NbdServer, type NbdConnectOptions } from './nbd/client.js';
export { compare, type CompareOptions, type CompareResult } from './ops/compare.js';
export { check, type CheckResult, type CheckOptions } from './ops/check.js';
export { create, type CreateOptions } from './ops/create.js';
export { commit, type CommitOptions, type CommitResult } from './ops/commit.js';
export { makeEmpty, type MakeEmptyOptions, type MakeEmptyResult } from './ops/make-empty.js';
export {
  bitmap,
  bitmapDump,
  bitmapCheck,
  defaultGranularity,
  type BitmapAction,
  type BitmapOptions,
  type BitmapResult,
  type BitmapSummary,
  type BitmapDump,
  type BitmapCheckEntry,
  type BitmapCheckResult,
} from './ops/bitmap.js';
export { changes, type ChangesOptions, type ChangesResult } from './ops/changes.js';
export { BitmapStore, markBitmapsDirty, loadBitmap, bitmapExtents, type LoadedBitmap, type ByteExtent } from './qcow2/bitmaps.js';
export { rebase, type RebaseOptions, type RebaseResult } from './ops/rebase.js';
export { plan, type PlanOptions, type PlanResult, type PlanWay } from './ops/plan.js';
export type { WritableLayer } from './chain/layer.js';
export type { ZeroOptions } from './qcow2/writer.js';

import { BackingChain, type OpenChainOptions } from './chain/chain.js';
import { Qcow2Image, type OpenQcow2Options } from './qcow2/image.js';

/** Opens one qcow2 image (no backing files). */
export function openImage(path: string, opts?: OpenQcow2Options): Promise<Qcow2Image> {
  return Qcow2Image.open(path, opts);
}

/** Opens an image with its whole backing chain (read-only unless `write` names layers). */
export function openChain(path: string, opts?: OpenChainOptions): Promise<BackingChain> {
  return BackingChain.open(path, opts);
}
