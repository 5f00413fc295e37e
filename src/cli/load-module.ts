/**
 * Loads the module of the command that runs. In the shipped CLI (a CommonJS bundle, see
 * scripts/bundle.mjs) each command file is compiled with V8's code cache: compiling a few
 * hundred KiB of bundle is a large share of a short command's start-up, and Node 20 has no
 * compile cache of its own. The cache is written by the build's training runs
 * (QCOWKIT_TRAIN_CODE_CACHE=1) and used only when it was made from the very same build: V8
 * itself checks the Node version and flags but only the length of the source, so each cache
 * starts with the build stamp found on the first line of its bundle.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { Script } from 'node:vm';

const CACHE_SUFFIX = '.v8cache';
const STAMP = /^\/\/ qcowkit build ([0-9a-f]{16})\n/;

/** A module of the CLI by a specifier relative to this file (which sits next to main). */
export async function loadModule<T>(specifier: string): Promise<T> {
  // The unbundled build (dist/cli/, ESM): plain imports.
  if (typeof require !== 'function') return (await import(specifier)) as T;
  // The bundle (CommonJS): a path next to this file, no URL to parse.
  return requireCached(join(__dirname, specifier.replace(/\.js$/, '.cjs'))) as T;
}

/**
 * The CommonJS loader's Module class, as every CommonJS module's `module` has it: importing
 * node:module instead would also load Node's ESM loader and source-map support (~0.3 ms).
 */
function cjsModule(): { createRequire(path: string): NodeJS.Require; wrap(source: string): string } {
  return module.constructor as unknown as { createRequire(path: string): NodeJS.Require; wrap(source: string): string };
}

function requireCached(file: string): unknown {
  const source = readFileSync(file, 'utf8');
  const stamp = STAMP.exec(source)?.[1];
  let cachedData: Buffer | undefined;
  if (stamp) {
    try {
      const cache = readFileSync(file + CACHE_SUFFIX);
      if (cache.toString('latin1', 0, stamp.length) === stamp) cachedData = cache.subarray(stamp.length);
    } catch {
      /* no cache: compiled from source */
    }
  }
  const Module = cjsModule();
  const script = new Script(Module.wrap(source), { filename: file, cachedData });
  const module = { exports: {} as unknown };
  const init = script.runInThisContext() as (exports: unknown, require: NodeJS.Require, module: unknown, filename: string, dirname: string) => void;
  init.call(module.exports, module.exports, Module.createRequire(file), module, file, dirname(file));
  if (stamp && process.env.QCOWKIT_TRAIN_CODE_CACHE === '1') {
    // After the run, so the functions it compiled lazily are in the cache too.
    process.once('exit', () => writeFileSync(file + CACHE_SUFFIX, Buffer.concat([Buffer.from(stamp, 'latin1'), script.createCachedData()])));
  }
  return module.exports;
}
