#!/usr/bin/env node
// Helpers of the bitmap workloads of bench/run.mjs, through the built library (dist/):
//   fill FILE NAME full|frag SEED   give bitmap NAME all-ones or a heavily fragmented content
//   hash FILE NAME                  sha256 of the bitmap's contents (bits past the disk are zero)
//   lib FILE DST SRC [SRCFILE] [--warmup DIR]
//                                   in-process timing of open + load + merge + store +
//                                   close; with --warmup the same merge runs first on the copy in
//                                   DIR (library compiled, JIT and wasm heap warm, as inside a
//                                   running process) and only the second one is timed. Prints
//                                   JSON: phases, each fdatasync (the final one, made by the
//                                   close, apart), the time spent reading /proc/locks (the lock
//                                   check of the open) and the CPU time used.
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import { syncBuiltinESMExports } from 'node:module';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const lib = await import(join(ROOT, 'dist', 'index.js'));
const { kernels } = await import(join(ROOT, 'dist', 'kernels', 'index.js'));
const { loadMerged, findBitmap } = await import(join(ROOT, 'dist', 'qcow2', 'bitmaps.js'));

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
  const rest = process.argv.slice(3);
  const w = rest.indexOf('--warmup');
  const warmDir = w >= 0 ? rest[w + 1] : undefined;
  if (w >= 0) rest.splice(w, 2);
  const [dstFile, dstName, srcName, srcFile] = rest;
  // Time spent reading /proc/locks (the open's lock check), measured apart.
  let lockScanMs = 0;
  const readFileSync = fs.readFileSync;
  fs.readFileSync = /** @type {typeof fs.readFileSync} */ (
    /** @type {unknown} */ (
      (/** @type {string} */ path, /** @type {any[]} */ ...a) => {
        if (path !== '/proc/locks') return readFileSync(path, ...a);
        const t = performance.now();
        try {
          return readFileSync(path, ...a);
        } finally {
          lockScanMs += performance.now() - t;
        }
      }
    )
  );
  syncBuiltinESMExports();
  const merge = async (dir) => {
    lockScanMs = 0;
    const syncs = [];
    let closing = false;
    let closeSyncMs = 0;
    const t0 = performance.now();
    const cpu0 = process.cpuUsage();
    const img = await lib.openImage(join(dir, dstFile), { writable: true });
    const src = srcFile ? await lib.openImage(join(dir, srcFile)) : img;
    const flush = img.file.flush.bind(img.file);
    img.file.flush = async () => {
      const s = performance.now();
      await flush();
      const ms = performance.now() - s;
      syncs.push(ms);
      if (closing) closeSyncMs += ms;
    };
    const store = await lib.BitmapStore.open(img);
    const tOpen = performance.now();
    // The library's merge (what `bitmap --merge` does): the source loaded, then the target loaded
    // and OR-ed, or taken as the source's contents when it is empty at the same granularity.
    const s = await lib.loadBitmap(src, findBitmap(src, srcName));
    const tLoad = performance.now();
    const dst = await loadMerged(img, findBitmap(img, dstName), s);
    const tMerge = performance.now();
    await store.store(dst);
    const tStore = performance.now();
    closing = true;
    await store.close();
    dst.free();
    if (src !== img) await src.close();
    await img.close();
    const tEnd = performance.now();
    const cpu = process.cpuUsage(cpu0);
    const syncMs = syncs.reduce((a, b) => a + b, 0);
    const total = tEnd - t0;
    return {
      openMs: tOpen - t0,
      lockScanMs,
      loadMs: tLoad - tOpen,
      mergeMs: tMerge - tLoad,
      storeMs: tStore - tMerge,
      closeMs: tEnd - tStore,
      totalMs: total,
      // user + system time of the process (every thread): what the merge costs on a loaded machine
      cpuMs: (cpu.user + cpu.system) / 1000,
      fdatasyncs: syncs.length,
      fdatasyncMs: syncMs,
      syncsMs: syncs,
      finalFdatasyncMs: closeSyncMs,
      totalWithoutFinalSyncMs: total - closeSyncMs,
      totalWithoutSyncMs: total - syncMs,
      totalWithoutSyncAndLockScanMs: total - syncMs - lockScanMs,
    };
  };
  if (warmDir) await merge(warmDir);
  process.stdout.write(JSON.stringify(await merge('.')) + '\n');
} else {
  process.stderr.write('usage: bitmap-helper.mjs fill|hash|lib ...\n');
  process.exit(2);
}
