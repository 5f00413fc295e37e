/**
 * Before the first write of an operation: each image it reads or writes must be consistent. A
 * corrupt image is refused with every file untouched; an image left dirty or leaking by an
 * interrupted writer (a crash may leak, never corrupt) has its leaks repaired first, as QEMU does
 * when it opens a dirty image read-write.
 */
import { QcowError } from '../errors.js';
import { decodeHeader } from '../format/header.js';
import { Qcow2Image } from '../qcow2/image.js';
import type { BlockLayer } from '../chain/layer.js';
import { check } from './check.js';

export async function validateForWrite(layer: BlockLayer, opts: { repairLeaks: boolean }): Promise<void> {
  if (!(layer instanceof Qcow2Image)) return;
  // The chain is open already (the layers below are checked in turn): opening it again would
  // meet this process's own write locks.
  const r = await check(layer.path, { file: layer.file, format: 'qcow2', skipBacking: true });
  const corruptions = r.corruptions ?? 0;
  if (corruptions || r['check-errors'])
    throw new QcowError(
      'CORRUPT',
      `image is corrupt (${corruptions} corruptions${r['check-errors'] ? `, ${r['check-errors']} check errors` : ''}); nothing was written: repair it first (qcowkit check -r all)`,
      layer.path,
    );
  const needsRepair = (r.leaks ?? 0) > 0 || layer.dirty;
  if (!needsRepair || !opts.repairLeaks || !layer.file.writable) return;
  await check(layer.path, { file: layer.file, format: 'qcow2', repair: 'leaks', skipBacking: true });
  // The repair rewrote refcounts and the header's feature bits: take the header's word for them.
  const head = new Uint8Array(Math.min(layer.clusterSize, await layer.file.size()));
  await layer.file.readAt(head, 0);
  const h = decodeHeader(head, await layer.file.size(), layer.path);
  layer.header.incompatibleFeatures = h.incompatibleFeatures;
  layer.header.refcountTableOffset = h.refcountTableOffset;
  layer.header.refcountTableClusters = h.refcountTableClusters;
  layer.invalidateReadCaches();
}
