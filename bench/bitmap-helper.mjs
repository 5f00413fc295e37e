#!/usr/bin/env node
// Helpers of the bitmap workloads of bench/run.mjs, through the built library (dist/):
//   fill FILE NAME full|frag SEED   give bitmap NAME all-ones or a heavily fragmented content
//   hash FILE NAME                  sha256 of the bitmap's contents (bits past the disk are zero)
//   lib FILE DST SRC [SRCFILE]      in-process timing: open + load both + merge + store, with the
//                                   time spent in fdatasync measured apart; prints JSON
import { createHash } from 'node:crypto';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const lib = await import(join(ROOT, 'dist', 'index.js'));
const { kernels } = await import(join(ROOT, 'dist', 'kernels', 'index.js'));
const { mergeInto, findBitmap } = await import(join(ROOT, 'dist', 'qcow2', 'bitmaps.js'));

const [cmd, file, name, arg, arg2] = process.argv.slice(2);

function lcg(seed) {
  let s = seed >>> 0;
  return () => (s = (Math.imul(s, 1103515245) + 12345) >>> 0);
}

if (cmd === 'fill') {
  const img = await lib.openImage(file, { writable: true });
  const store = await lib.BitmapStore.open(img);
  const bm = await lib.loadBitmap(img, findBitmap(img, name));
  const k = kernels();
  if (arg === 'full') k.setBits(bm.ptr, 0, bm.bits);
  else {
    // Runs of 1..8 dirty granules separated by 1..8 clean ones, over the whole disk.
    const next = lcg(Number(arg2 ?? 1));
    const u8 = k.u8(bm.ptr, bm.bytes);
    for (let i = 0; i < Math.ceil(bm.bits / 8); i++) u8[i] = next() >>> 24;
    u8.fill(0, Math.ceil(bm.bits / 8));
  }
  await store.store(bm);
  bm.free();
  await store.close();
  await img.close();
} else if (cmd === 'hash') {
  const img = await lib.openImage(file, { forceShare: true });
  const bm = await lib.loadBitmap(img, findBitmap(img, name));
  const h = createHash('sha256').update(kernels().u8(bm.ptr, Math.ceil(bm.bits / 8))).digest('hex');
  bm.free();
  await img.close();
  process.stdout.write(h + '\n');
} else if (cmd === 'lib') {
  const srcFile = arg2;
  let syncMs = 0;
  let syncs = 0;
  const t0 = performance.now();
  const img = await lib.openImage(file, { writable: true });
  const src = srcFile ? await lib.openImage(srcFile) : img;
  // fdatasync time measured apart (the store makes new clusters durable before switching).
  const flush = img.file.flush.bind(img.file);
  img.file.flush = async () => {
    const s = performance.now();
    await flush();
    syncMs += performance.now() - s;
    syncs++;
  };
  const store = await lib.BitmapStore.open(img);
  const tOpen = performance.now();
  const dst = await lib.loadBitmap(img, findBitmap(img, name));
  const s = await lib.loadBitmap(src, findBitmap(src, arg));
  const tLoad = performance.now();
  mergeInto(dst, s);
  const tMerge = performance.now();
  await store.store(dst);
  await store.close();
  const tStore = performance.now();
  dst.free();
  s.free();
  if (src !== img) await src.close();
  await img.close();
  const total = performance.now() - t0;
  process.stdout.write(
    JSON.stringify({
      openMs: tOpen - t0,
      loadMs: tLoad - tOpen,
      mergeMs: tMerge - tLoad,
      storeMs: tStore - tMerge,
      totalMs: total,
      fdatasyncMs: syncMs,
      fdatasyncs: syncs,
      totalWithoutSyncMs: total - syncMs,
    }) + '\n',
  );
} else {
  process.stderr.write('usage: bitmap-helper.mjs fill|hash|lib ...\n');
  process.exit(2);
}
