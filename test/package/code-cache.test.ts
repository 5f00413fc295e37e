// The CLI bundle's V8 code caches (scripts/bundle.mjs trains them, src/cli/load-module.ts uses
// them): every command module has one, made from the same build, and V8 accepts it; a cache of
// another build is never used.
import { spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { REPO_ROOT, tmpDir } from '../helpers/tmp.js';

const BUNDLE = join(REPO_ROOT, 'dist', 'cli-bundle');
const modules = existsSync(BUNDLE)
  ? ['commands', 'run'].flatMap((d) => readdirSync(join(BUNDLE, d)).filter((f) => f.endsWith('.cjs')).map((f) => join(BUNDLE, d, f)))
  : [];
const stampOf = (file: string): string => /^\/\/ qcowkit build ([0-9a-f]{16})\n/.exec(readFileSync(file, 'utf8'))?.[1] ?? '';

/** Compiles `file` with its cache in a fresh Node, as load-module does; true when V8 took the cache. */
function accepted(file: string, cache: string): boolean {
  const script = `
    const { readFileSync } = require('node:fs'); const { wrap } = require('node:module'); const { Script } = require('node:vm');
    const src = readFileSync(${JSON.stringify(file)}, 'utf8'); const c = readFileSync(${JSON.stringify(cache)});
    const s = new Script(wrap(src), { filename: ${JSON.stringify(file)}, cachedData: c.subarray(16) });
    process.stdout.write(String(!s.cachedDataRejected));`;
  const r = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8' });
  expect(r.status, r.stderr).toBe(0);
  return r.stdout === 'true';
}

describe.skipIf(modules.length === 0)('the CLI bundle code cache', () => {
  it('every command module has a cache of its own build that V8 accepts', () => {
    expect(modules.length).toBeGreaterThan(5);
    for (const m of modules) {
      const stamp = stampOf(m);
      expect(stamp, m).toMatch(/^[0-9a-f]{16}$/);
      const cache = `${m}.v8cache`;
      expect(existsSync(cache), cache).toBe(true);
      expect(readFileSync(cache).toString('latin1', 0, 16), cache).toBe(stamp);
      expect(accepted(m, cache), m).toBe(true);
    }
  });

  it("a cache stamped by another build leaves the command working, with the same output", () => {
    const dir = tmpDir();
    const img = join(dir, 'a.qcow2');
    const cli = (args: string[]) => spawnSync(process.execPath, [join(REPO_ROOT, 'bin', 'qcowkit.js'), ...args], { encoding: 'utf8', cwd: dir });
    expect(cli(['create', '-q', img, '1M']).status).toBe(0);
    const want = cli(['map', '--output', 'json', img]);
    expect(want.status).toBe(0);
    const cache = join(BUNDLE, 'commands', 'map.cjs.v8cache');
    const saved = join(dir, 'saved.v8cache');
    copyFileSync(cache, saved);
    try {
      // Same V8 data under another build's stamp: load-module must not hand it to V8.
      const other = readFileSync(saved);
      other.write('0000000000000000', 0, 'latin1');
      writeFileSync(cache, other);
      const got = cli(['map', '--output', 'json', img]);
      expect(got.status, got.stderr).toBe(0);
      expect(got.stdout).toBe(want.stdout);
    } finally {
      copyFileSync(saved, cache);
    }
  });
});
