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
  encrypt?: { format: 'aes' | 'luks' } | LuksInfo;
}

/** QEMU's QCryptoBlockInfoLUKS: what the (unencrypted) LUKS1 header of a qcow2+LUKS image says. */
export interface LuksInfo {
  format: 'luks';
  'cipher-alg': string;
  'cipher-mode': string;
  'ivgen-alg': string;
  'ivgen-hash-alg'?: string;
  'hash-alg': string;
  'payload-offset': number;
  'master-key-iters': number;
  uuid: string;
  slots: { active: boolean; iters?: number; stripes?: number; 'key-offset': number }[];
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
  if (h.cryptMethod === 1) data.encrypt = { format: 'aes' };
  else if (h.cryptMethod === 2) data.encrypt = await luksInfo(layer);
  out['format-specific'] = { type: 'qcow2', data };
  return out;
}

const LUKS_MAGIC = [0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe];
const LUKS_HEADER_BYTES = 208 + 8 * 48;
const LUKS_SLOT_ACTIVE = 0x00ac71f3;
/** Key sizes (bytes) of the ciphers QEMU accepts in a LUKS header. */
const LUKS_CIPHERS: Record<string, number[]> = { aes: [16, 24, 32], cast5: [16], serpent: [16, 24, 32], twofish: [16, 24, 32], sm4: [16] };

/**
 * The LUKS1 header of a qcow2+LUKS image (header extension 0x0537be77 says where), decoded like
 * QEMU's qcrypto_block_luks_get_info. A header qcowkit can't decode reports just the format.
 */
async function luksInfo(layer: Qcow2Image): Promise<{ format: 'luks' } | LuksInfo> {
  const where = layer.header.encryption;
  if (!where || where.length < LUKS_HEADER_BYTES) return { format: 'luks' };
  const b = new Uint8Array(LUKS_HEADER_BYTES);
  await layer.file.readAt(b, where.offset);
  const v = new DataView(b.buffer);
  if (!LUKS_MAGIC.every((m, i) => b[i] === m) || v.getUint16(6) !== 1) return { format: 'luks' };
  const str = (from: number, len: number): string => {
    const f = b.subarray(from, from + len);
    const nul = f.indexOf(0);
    return new TextDecoder().decode(nul < 0 ? f : f.subarray(0, nul));
  };
  const cipherName = str(8, 32);
  const [mode = '', ivSpec = ''] = str(40, 32).split('-', 2) as [string?, string?];
  const [ivgen = '', ivHash] = ivSpec.split(':', 2) as [string, string?];
  // XTS keys are two cipher keys.
  const keyBytes = v.getUint32(108) / (mode === 'xts' ? 2 : 1);
  if (!LUKS_CIPHERS[cipherName]?.includes(keyBytes)) return { format: 'luks' };
  const out: LuksInfo = {
    format: 'luks',
    'cipher-alg': cipherName === 'sm4' ? 'sm4' : `${cipherName}-${keyBytes * 8}`,
    'cipher-mode': mode,
    'ivgen-alg': ivgen,
    'hash-alg': str(72, 32),
    'payload-offset': v.getUint32(104) * 512,
    'master-key-iters': v.getUint32(164),
    uuid: str(168, 40),
    slots: [],
  };
  if (ivgen === 'essiv' && ivHash !== undefined) out['ivgen-hash-alg'] = ivHash;
  for (let i = 0; i < 8; i++) {
    const at = 208 + i * 48;
    const active = v.getUint32(at) === LUKS_SLOT_ACTIVE;
    out.slots.push(
      active
        ? { active, iters: v.getUint32(at + 4), stripes: v.getUint32(at + 44), 'key-offset': v.getUint32(at + 40) * 512 }
        : { active, 'key-offset': v.getUint32(at + 40) * 512 },
    );
  }
  return out;
}
