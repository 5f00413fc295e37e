/** `info`: what qemu-img info reports, with its JSON field names (ImageInfo, QEMU 7.2). */
import { BackingChain, resolveBackingPath, type OpenChainOptions } from '../chain/chain.js';
import type { BlockLayer, LayerFormat } from '../chain/layer.js';
import { Qcow2Image } from '../qcow2/image.js';
import { BME_FLAG_AUTO, BME_FLAG_IN_USE } from '../format/bitmap.js';
import type { OperationOptions } from './options.js';

export interface SnapshotInfo {
  id: string;
  name: string;
  'vm-state-size': number;
  'date-sec': number;
  'date-nsec': number;
  'vm-clock-sec': number;
  'vm-clock-nsec': number;
  icount?: number;
}

export interface BitmapInfo {
  name: string;
  granularity: number;
  flags: string[];
}

export interface Qcow2SpecificInfo {
  compat: '0.10' | '1.1';
  'compression-type': 'zlib' | 'zstd';
  'lazy-refcounts'?: boolean;
  bitmaps?: BitmapInfo[];
  'refcount-bits': number;
  corrupt?: boolean;
  'extended-l2'?: boolean;
  'data-file'?: string;
  'data-file-raw'?: boolean;
  encrypt?: { format: string };
}

export interface ImageInfo {
  filename: string;
  format: LayerFormat;
  'virtual-size': number;
  'actual-size': number;
  'dirty-flag': boolean;
  'cluster-size'?: number;
  encrypted?: boolean;
  'backing-filename'?: string;
  'full-backing-filename'?: string;
  'backing-filename-format'?: string;
  snapshots?: SnapshotInfo[];
  'format-specific'?: { type: 'qcow2'; data: Qcow2SpecificInfo };
}

export interface InfoOptions extends OperationOptions {
  format?: LayerFormat | undefined;
  /** Report every image of the backing chain, top first. */
  backingChain?: boolean;
}

/** Info of one image (or of its whole chain with backingChain). */
export async function info(path: string, opts: InfoOptions = {}): Promise<ImageInfo[]> {
  const chainOpts: OpenChainOptions = {
    format: opts.format,
    openBacking: opts.backingChain === true,
    metadataOnly: true,
    forceShare: opts.forceShare,
    onWarning: opts.onWarning,
    signal: opts.signal,
  };
  const chain = await BackingChain.open(path, chainOpts);
  try {
    return await Promise.all(chain.layers.map((l) => layerInfo(l)));
  } finally {
    await chain.close();
  }
}

async function layerInfo(layer: BlockLayer): Promise<ImageInfo> {
  const out: ImageInfo = {
    filename: layer.path,
    format: layer.format,
    'virtual-size': layer.virtualSize,
    'actual-size': await layer.file.allocatedBytes(),
    'dirty-flag': false,
  };
  if (!(layer instanceof Qcow2Image)) return out;
  const h = layer.header;
  out['cluster-size'] = layer.clusterSize;
  out['dirty-flag'] = layer.dirty;
  if (h.cryptMethod) out.encrypted = true;
  if (h.backingFile !== undefined) {
    out['backing-filename'] = h.backingFile;
    out['full-backing-filename'] = resolveBackingPath(layer.path, h.backingFile);
    if (h.backingFormat !== undefined) out['backing-filename-format'] = h.backingFormat;
  }
  if (layer.snapshots.length) {
    out.snapshots = layer.snapshots.map((s) => ({
      icount: s.icount ?? 0,
      'vm-clock-nsec': s.vmClockNsec % 1e9,
      name: s.name,
      'date-sec': s.dateSec,
      'date-nsec': s.dateNsec,
      'vm-clock-sec': Math.floor(s.vmClockNsec / 1e9),
      id: s.id,
      'vm-state-size': s.vmStateSize,
    }));
    out.snapshots.forEach((s, i) => {
      if (layer.snapshots[i]!.icount === undefined) delete s.icount;
    });
  }
  const data: Qcow2SpecificInfo = {
    compat: h.version === 2 ? '0.10' : '1.1',
    'compression-type': h.compressionType === 1 ? 'zstd' : 'zlib',
    'refcount-bits': 2 ** h.refcountOrder,
  };
  if (h.version === 3) {
    data['lazy-refcounts'] = layer.lazyRefcounts;
    if (layer.bitmaps.length)
      data.bitmaps = layer.bitmaps.map((b) => ({
        flags: [...(b.flags & BME_FLAG_IN_USE ? ['in-use'] : []), ...(b.flags & BME_FLAG_AUTO ? ['auto'] : [])],
        name: b.name,
        granularity: 2 ** b.granularityBits,
      }));
    data.corrupt = layer.corrupt;
    data['extended-l2'] = layer.extendedL2;
    if (h.dataFile !== undefined) {
      data['data-file'] = h.dataFile;
      data['data-file-raw'] = (h.autoclearFeatures & 2n) !== 0n;
    }
  }
  if (h.cryptMethod) data.encrypt = { format: h.cryptMethod === 1 ? 'aes' : 'luks' };
  out['format-specific'] = { type: 'qcow2', data };
  return out;
}

