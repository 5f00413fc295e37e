// Temp directories, committed fixtures (images/) and file hashes for tests.
//
// Fixture names are paths relative to images/, e.g. "base.qcow2", "chain/sub/top.qcow2".
// c2m.qcow2 is committed gzipped (c2m.qcow2.gz); fixturePath()/copyFixture() transparently
// decompress such files (fixturePath into a per-process cache that is removed at exit).
import { createHash } from 'node:crypto';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, isAbsolute, join, normalize, relative, resolve, sep } from 'node:path';
import { fileURLToPath } from 'node:url';
import { gunzipSync } from 'node:zlib';
import { afterAll } from 'vitest';

/** Absolute path of the repository root. */
export const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
/** Absolute path of images/. */
export const IMAGES_DIR = join(REPO_ROOT, 'images');

// ---------------------------------------------------------------------------------------------
// temp dirs

const created: string[] = [];
let gzCache: string | undefined;

function cleanup(): void {
  if (gzCache) created.push(gzCache);
  gzCache = undefined;
  while (created.length > 0) {
    const d = created.pop()!;
    try {
      rmSync(d, { recursive: true, force: true });
    } catch {
      /* ignore */
    }
  }
}

// Registered when this module is imported at the top level of a test file (vitest re-evaluates
// modules per test file), so every tmpDir() of that file is removed after the file's tests.
afterAll(cleanup);
process.once('exit', cleanup);

/**
 * A fresh empty directory under os.tmpdir(), removed after the current test file finishes.
 * Set QCOWKIT_KEEP_TMP=1 to keep them for debugging (their paths are printed).
 */
export function tmpDir(prefix = 'qcowkit-test-'): string {
  const d = mkdtempSync(join(tmpdir(), prefix));
  if (process.env.QCOWKIT_KEEP_TMP) process.stderr.write(`qcowkit tests: keeping ${d}\n`);
  else created.push(d);
  return d;
}

// ---------------------------------------------------------------------------------------------
// fixtures

function checkName(name: string): string {
  const n = normalize(name);
  if (isAbsolute(n) || n.startsWith('..')) throw new Error(`fixture name must be relative to images/: ${name}`);
  return n;
}

/**
 * Absolute path of a committed fixture. Throws when it does not exist. For gzipped fixtures
 * (NAME.gz committed) returns a decompressed copy in a cache directory (same relative layout)
 * that lives until the end of the test file — treat it as read-only like every other fixture.
 */
export function fixturePath(name: string): string {
  const n = checkName(name);
  const p = join(IMAGES_DIR, n);
  if (existsSync(p)) return p;
  const gz = `${p}.gz`;
  if (!existsSync(gz)) throw new Error(`no such fixture: images/${n}`);
  // Removed with the tmpDir()s after the test file (or at exit); recreated on demand.
  gzCache ??= mkdtempSync(join(tmpdir(), 'qcowkit-fixtures-'));
  const out = join(gzCache, n);
  if (!existsSync(out)) {
    mkdirSync(dirname(out), { recursive: true });
    writeFileSync(out, gunzipSync(readFileSync(gz)));
  }
  return out;
}

/** Parsed JSON fixture file, e.g. fixtureJson('base.qcow2.info.json'). */
export function fixtureJson<T = any>(name: string): T {
  return JSON.parse(readFileSync(fixturePath(name), 'utf8')) as T;
}

/** Text fixture file, e.g. fixtureText('base.qcow2.map.txt'). */
export function fixtureText(name: string): string {
  return readFileSync(fixturePath(name), 'utf8');
}

export interface OracleRecord {
  /** The qemu-img command line (run with cwd = images/). */
  args: string[];
  status: number;
  stderr: string;
  /** Saved stdout, relative to images/ (absent when stdout was empty). */
  file?: string;
}

export interface FixtureSample {
  /** Path relative to images/ (what fixturePath()/copyFixture() take). */
  name: string;
  /** Committed file (differs from name for gzipped samples). */
  file: string;
  format: 'qcow2' | 'raw';
  /** valid | leaks | broken | encrypted | raw | noopen | chain | bitmaps | gz | datafile | corruptbit */
  flags: string[];
  description: string;
  /** Size and sha256 of the uncompressed sample. */
  size: number;
  sha256: string;
  oracles: Partial<Record<'info' | 'infoText' | 'chain' | 'map' | 'mapText' | 'check' | 'checkText', OracleRecord>> & {
    dirty?: { file: string };
  };
}

export interface FixtureManifest {
  generator: string;
  /** `qemu-img --version` first line of the generating machine. */
  qemu: string;
  samples: FixtureSample[];
}

let manifestCache: FixtureManifest | undefined;

/** images/manifest.json (written by images/regenerate.sh). */
export function fixtureManifest(): FixtureManifest {
  manifestCache ??= JSON.parse(readFileSync(join(IMAGES_DIR, 'manifest.json'), 'utf8')) as FixtureManifest;
  return manifestCache;
}

/** Manifest entry of one sample; throws if unknown. */
export function fixtureSample(name: string): FixtureSample {
  const n = checkName(name).split(sep).join('/');
  const s = fixtureManifest().samples.find((x) => x.name === n);
  if (!s) throw new Error(`fixture ${name} is not in images/manifest.json`);
  return s;
}

/** Files a sample needs next to it: its backing chain and external data file (relative names). */
export function fixtureDeps(name: string): string[] {
  const out: string[] = [];
  const seen = new Set<string>();
  const visit = (n: string): void => {
    if (seen.has(n)) return;
    seen.add(n);
    const infoFile = join(IMAGES_DIR, `${n}.info.json`);
    if (!existsSync(infoFile)) return;
    const info = JSON.parse(readFileSync(infoFile, 'utf8'));
    const deps: string[] = [];
    if (typeof info['full-backing-filename'] === 'string') deps.push(normalize(info['full-backing-filename']));
    const df = info['format-specific']?.data?.['data-file'];
    if (typeof df === 'string') deps.push(normalize(join(dirname(n), df)));
    for (const d of deps) {
      const rel = d.split(sep).join('/');
      if (!seen.has(rel)) {
        if (rel !== checkName(name)) out.push(rel);
        visit(rel);
      }
    }
  };
  visit(checkName(name).split(sep).join('/'));
  return out;
}

/**
 * Copies fixture `name` into `dir` at the same relative path (e.g. "chain/sub/top.qcow2" ->
 * DIR/chain/sub/top.qcow2) and returns the absolute path of the copy. By default the files it
 * depends on (backing chain, external data file) are copied too, so relative backing names keep
 * working. Gzipped fixtures are decompressed. Oracle files (*.json, *.txt) are not copied.
 */
export function copyFixture(name: string, dir: string, opts: { deps?: boolean } = {}): string {
  const n = checkName(name);
  const names = [n, ...(opts.deps === false ? [] : fixtureDeps(n))];
  for (const f of names) {
    const dst = join(dir, f);
    if (relative(dir, dst).startsWith('..')) throw new Error(`fixture escapes ${dir}: ${f}`);
    mkdirSync(dirname(dst), { recursive: true });
    copyFileSync(fixturePath(f), dst);
  }
  return join(dir, n);
}

// ---------------------------------------------------------------------------------------------

/** Hex sha256 of a file's content (for "file untouched" checks). */
export function sha256(file: string): string {
  return createHash('sha256').update(readFileSync(file)).digest('hex');
}
