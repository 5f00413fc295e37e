// The published package, as a user gets it: `npm pack` the checkout, `npm i <tarball> --omit=dev`
// into an empty project (no assemblyscript, esbuild or typescript anywhere), then use the installed
// CLI on the committed samples (checked against their qemu-img oracles) and the library from a
// plain ESM script (checked against the data images/regenerate.sh wrote). Then the same package
// with its kernels file removed or corrupted (one-line KERNELS error, no stack trace), and an
// install on a machine without a working C compiler (the optional addon is skipped, the install
// still succeeds and everything but host-hole probing works).
//
// Needs the build (`npm run build`; npm install/ci does it) and the npm registry (commander & co.).
// It packs with --ignore-scripts: `prepare` would rebuild dist/ under the other test files' feet.
import { createHash } from 'node:crypto';
import { copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, renameSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { spawn, spawnSync } from 'node:child_process';
import { hasQemuNbd, run, type RunOptions, type RunResult } from '../helpers/qemu.js';
import { fixtureJson, fixtureText, IMAGES_DIR, REPO_ROOT, tmpDir } from '../helpers/tmp.js';

const K = 1024;
const M = 1024 * K;
const INSTALL_TIMEOUT = 80_000;

/**
 * process.env without npm's per-run variables (`npm test` sets npm_config_*, npm_package_* ...),
 * with the CA certificates the global setup kept aside (npm may need them to reach the registry).
 */
function cleanEnv(extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!/^npm_/i.test(k)) env[k] = v;
  const caCerts = process.env.QCOWKIT_TEST_NODE_EXTRA_CA_CERTS;
  if (caCerts !== undefined && env.NODE_EXTRA_CA_CERTS === undefined) env.NODE_EXTRA_CA_CERTS = caCerts;
  return { ...env, npm_config_update_notifier: 'false', npm_config_fund: 'false', npm_config_audit: 'false', ...extra };
}

/** Runs a command and fails loudly (command, status, output) unless it exits 0. */
function ok(cmd: string, args: readonly string[], opts: RunOptions = {}): RunResult {
  const r = run(cmd, args, { ...opts, env: { ...cleanEnv(), ...opts.env } });
  if (r.status !== 0) {
    throw new Error(`${cmd} ${args.join(' ')} (cwd ${opts.cwd ?? process.cwd()}) exited ${r.status}${r.error ? ` (${r.error})` : ''}\n--- stdout\n${r.stdout}\n--- stderr\n${r.stderr}`);
  }
  return r;
}

function newestMtime(path: string): number {
  const st = statSync(path);
  if (!st.isDirectory()) return st.mtimeMs;
  return Math.max(0, ...readdirSync(path).map((n) => newestMtime(join(path, n))));
}

/** The build outputs the tarball must carry; stale or missing ones would make the test meaningless. */
const BUILT = ['dist/index.js', 'dist/index.d.ts', 'dist/cli-bundle/main.cjs', 'wasm/kernels.wasm'];

function assertBuilt(): void {
  const missing = BUILT.filter((f) => !existsSync(join(REPO_ROOT, f)));
  if (missing.length > 0) throw new Error(`build output missing (${missing.join(', ')}): run \`npm run build\` first`);
  const oldestOutput = Math.min(...BUILT.map((f) => statSync(join(REPO_ROOT, f)).mtimeMs));
  const newestSource = Math.max(newestMtime(join(REPO_ROOT, 'src')), newestMtime(join(REPO_ROOT, 'assembly')));
  if (newestSource > oldestOutput) throw new Error('build output older than src/ or assembly/: run `npm run build` first (the tarball would ship stale code)');
}

/** `npm init -y` + `npm i <tarball> --omit=dev` in a fresh directory; returns the project and npm's output. */
function installInto(tarball: string, env: NodeJS.ProcessEnv = {}): { proj: string; out: string } {
  const proj = join(tmpDir('qcowkit-consumer-'), 'app');
  mkdirSync(proj);
  ok('npm', ['init', '-y'], { cwd: proj });
  const r = ok('npm', ['i', tarball, '--omit=dev', '--no-audit', '--no-fund', '--foreground-scripts'], { cwd: proj, env, timeout: INSTALL_TIMEOUT });
  return { proj, out: r.stdout + r.stderr };
}

/** The installed `qcowkit` (node_modules/.bin link) run with cwd = images/, as the oracles were made. */
function cli(proj: string, args: readonly string[], allow: readonly number[] = [0]): RunResult {
  const r = run(join(proj, 'node_modules', '.bin', 'qcowkit'), args, { cwd: IMAGES_DIR, env: cleanEnv() });
  if (!allow.includes(r.status)) throw new Error(`installed qcowkit ${args.join(' ')} exited ${r.status}${r.error ? ` (${r.error})` : ''}\n${r.stderr}`);
  return r;
}

const withoutActualSize = (text: string): string =>
  text
    .split('\n')
    .filter((l) => !/^\s*"actual-size": \d+,?$/.test(l) && !l.startsWith('disk size: '))
    .join('\n');

function stripActual(v: unknown): unknown {
  const c = JSON.parse(JSON.stringify(v)) as Record<string, unknown> | Array<Record<string, unknown>>;
  for (const i of Array.isArray(c) ? c : [c]) delete i['actual-size'];
  return c;
}

/** Guest contents of chain/sub/top.qcow2 from what images/regenerate.sh wrote into the three layers. */
function expectedTopGuest(): Buffer {
  const g = Buffer.alloc(8 * M);
  g.fill(0x01, 0, 128 * K); // base
  g.fill(0x04, 6 * M, 6 * M + 16 * K);
  g.fill(0x02, 64 * K, 128 * K); // mid
  g.fill(0x00, 192 * K, 200 * K);
  g.fill(0x05, M, M + 4 * K);
  g.fill(0x03, 100 * K, 110 * K); // top
  g.fill(0x00, 120 * K, 124 * K);
  g.fill(0x00, 6 * M, 6 * M + 4 * K);
  return g;
}

const sha256 = (b: Uint8Array): string => createHash('sha256').update(b).digest('hex');

// A plain ESM consumer of the library: reads the whole guest of an image through its chain, maps
// it, and reports QcowErrors as {code, file, message} (exit 0 either way: the test judges).
const LIBRARY_SCRIPT = `
import { createHash } from 'node:crypto';
import { openChain, mapImage, QcowError } from 'qcowkit';
const [file] = process.argv.slice(2);
try {
  const chain = await openChain(file);
  const h = createHash('sha256');
  for (let pos = 0; pos < chain.virtualSize; pos += 1 << 20) h.update(await chain.readBytes(pos, Math.min(1 << 20, chain.virtualSize - pos)));
  const around100k = Buffer.from(await chain.readBytes(100 * 1024 - 2, 4)).toString('hex');
  await chain.close();
  const entries = [];
  await mapImage(file, (e) => entries.push([e.start, e.length, e.depth, e.data, e.zero]));
  console.log(JSON.stringify({ size: chain.virtualSize, sha256: h.digest('hex'), around100k, entries }));
} catch (e) {
  if (!(e instanceof QcowError)) throw e;
  console.log(JSON.stringify({ error: { code: e.code, file: e.file, message: e.message } }));
}
`;

function library(proj: string, image: string): any {
  const r = ok(process.execPath, [join(proj, 'use-library.mjs'), image], { cwd: proj });
  return JSON.parse(r.stdout);
}

let tarball = '';
let packed: string[] = [];
let proj = '';
let installOut = '';

describe.runIf(process.platform === 'linux')('the npm package, installed from its tarball without dev dependencies', () => {
  beforeAll(() => {
    assertBuilt();
    const dest = tmpDir('qcowkit-pack-');
    const r = ok('npm', ['pack', '--ignore-scripts', '--json', '--pack-destination', dest], { cwd: REPO_ROOT, timeout: 30_000 });
    const info = JSON.parse(r.stdout) as Array<{ filename: string; files: Array<{ path: string }> }>;
    tarball = join(dest, info[0]!.filename);
    packed = info[0]!.files.map((f) => f.path);
    ({ proj, out: installOut } = installInto(tarball));
    writeFileSync(join(proj, 'use-library.mjs'), LIBRARY_SCRIPT);
  }, 90_000);

  it('the tarball carries the prebuilt code, the kernels and the bundle, and no sources or build/ leftovers', () => {
    for (const f of ['package.json', 'bin/qcowkit.js', ...BUILT, 'scripts/build-native.mjs', 'native/extents.c', 'binding.gyp', 'README.md'])
      expect(packed, f).toContain(f);
    expect(packed.filter((f) => /^(src|test|assembly|build|bench|node_modules)\//.test(f))).toEqual([]);
    // only what tsc makes of src/ today (a removed module must not linger in dist/)
    const reference = packed.filter((f) => /kernel-?reference/i.test(f) || f === 'dist/kernels/reference.js');
    expect(reference).toEqual([]);
    const wasm = readFileSync(join(REPO_ROOT, 'wasm', 'kernels.wasm'));
    expect(statSync(tarball).size).toBeGreaterThan(wasm.length);
  });

  it('installs with no dev dependency present, keeping wasm/kernels.wasm through the native rebuild', () => {
    const nm = join(proj, 'node_modules');
    for (const dev of ['assemblyscript', 'esbuild', 'typescript', 'vitest', '@types/node']) expect(existsSync(join(nm, dev)), dev).toBe(false);
    for (const dep of ['commander', 'fs-native-extensions', 'fzstd']) expect(existsSync(join(nm, dep, 'package.json')), dep).toBe(true);
    const pkg = join(nm, 'qcowkit');
    expect(readFileSync(join(pkg, 'wasm', 'kernels.wasm')).equals(readFileSync(join(REPO_ROOT, 'wasm', 'kernels.wasm')))).toBe(true);
    // The install script ran (node-gyp rebuild): where this machine built the addon for the
    // checkout, it must have built it for the consumer too.
    expect(installOut).toContain('node scripts/build-native.mjs');
    if (existsSync(join(REPO_ROOT, 'build', 'Release', 'qcowkit_extents.node'))) {
      expect(existsSync(join(pkg, 'build', 'Release', 'qcowkit_extents.node')), installOut).toBe(true);
    }
  });

  it('npx qcowkit runs the installed CLI', () => {
    const r = ok('npx', ['--no-install', 'qcowkit', '--version'], { cwd: proj });
    expect(r.stdout).toBe(`qcowkit ${JSON.parse(readFileSync(join(REPO_ROOT, 'package.json'), 'utf8')).version}\n`);
    expect(ok('npx', ['--no-install', 'qcowkit', '--help'], { cwd: proj }).stdout).toContain('Usage: qcowkit <command>');
  });

  for (const name of ['base.qcow2', 'chain/sub/top.qcow2']) {
    it(`info, map and check of ${name} print what qemu-img printed`, () => {
      expect(stripActual(JSON.parse(cli(proj, ['info', '--output', 'json', name]).stdout))).toEqual(stripActual(fixtureJson(`${name}.info.json`)));
      expect(withoutActualSize(cli(proj, ['info', name]).stdout)).toBe(withoutActualSize(fixtureText(`${name}.info.txt`)));
      expect(cli(proj, ['map', '--output', 'json', name]).stdout).toBe(fixtureText(`${name}.map.json`));
      expect(cli(proj, ['map', name]).stdout).toBe(fixtureText(`${name}.map.txt`));
      expect(JSON.parse(cli(proj, ['check', '--output', 'json', name]).stdout)).toEqual(fixtureJson(`${name}.check.json`));
      expect(cli(proj, ['check', name]).stdout).toBe(fixtureText(`${name}.check.txt`));
    });
  }

  it('info --backing-chain of the chain top prints what qemu-img printed', () => {
    const got = JSON.parse(cli(proj, ['info', '--backing-chain', '--output', 'json', 'chain/sub/top.qcow2']).stdout);
    expect(stripActual(got)).toEqual(stripActual(fixtureJson('chain/sub/top.qcow2.chain.json')));
  });

  it('the library, imported by a plain ESM script, reads the chain as regenerate.sh wrote it', () => {
    const expected = expectedTopGuest();
    const got = library(proj, join(IMAGES_DIR, 'chain', 'sub', 'top.qcow2'));
    expect(got.error).toBeUndefined();
    expect(got.size).toBe(expected.length);
    expect(got.around100k).toBe('02020303');
    expect(got.sha256).toBe(sha256(expected));
    // mapImage agrees with qemu-img map's oracle, entry for entry
    const oracle = fixtureJson<Array<{ start: number; length: number; depth: number; data: boolean; zero: boolean }>>('chain/sub/top.qcow2.map.json');
    expect(got.entries).toEqual(oracle.map((e) => [e.start, e.length, e.depth, e.data, e.zero]));
  });

  it('the installed CLI compares the chain equal to its expected raw contents', () => {
    const raw = join(tmpDir(), 'expected.raw');
    writeFileSync(raw, expectedTopGuest());
    expect(cli(proj, ['compare', '-F', 'raw', 'chain/sub/top.qcow2', raw]).stdout).toBe('Images are identical.\n');
    const off = raw.replace(/expected\.raw$/, 'off.raw');
    const bad = expectedTopGuest();
    bad[6 * M + 4 * K] ^= 1;
    writeFileSync(off, bad);
    const r = cli(proj, ['compare', '-F', 'raw', 'chain/sub/top.qcow2', off], [1]);
    expect(r.stdout).toBe(`Content mismatch at offset ${6 * M + 4 * K}!\n`);
  });

  describe('with its kernels file missing or broken', () => {
    const kernelsFile = () => join(proj, 'node_modules', 'qcowkit', 'wasm', 'kernels.wasm');

    /** Runs `f` with the installed kernels file replaced by `content` (undefined: removed). */
    function withKernels<T>(content: Buffer | string | undefined, f: () => T): T {
      const path = kernelsFile();
      const saved = `${path}.saved`;
      renameSync(path, saved);
      try {
        if (content !== undefined) writeFileSync(path, content);
        return f();
      } finally {
        renameSync(saved, path);
      }
    }

    const cases: Array<[string, () => Buffer | string | undefined, RegExp]> = [
      ['missing', () => undefined, /WebAssembly kernels: file missing/],
      ['not wasm', () => 'this is not wasm\n', /WebAssembly kernels: not a valid WebAssembly module/],
      ['truncated', () => readFileSync(kernelsFile()).subarray(0, 100), /WebAssembly kernels: not a valid WebAssembly module/],
    ];
    for (const [what, content, message] of cases) {
      it(`${what}: every command that needs them prints one line naming the file, exit 1 (compare: 2)`, () => {
        withKernels(content(), () => {
          // `info` reads headers only and never loads the kernels: it still works.
          const info = cli(proj, ['info', '--output', 'json', 'base.qcow2'], [0]);
          expect(JSON.parse(info.stdout)['virtual-size']).toBeGreaterThan(0);
          for (const [args, status] of [
            [['map', 'chain/sub/top.qcow2'], 1],
            [['check', 'base.qcow2'], 1],
            [['compare', 'base.qcow2', 'base.qcow2'], 2],
          ] as const) {
            const r = cli(proj, args, [status]);
            expect(r.stderr, args.join(' ')).toMatch(new RegExp(`^qcowkit: ${kernelsFile().replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')}: ${message.source}[^\\n]*\\n$`));
            expect(r.stderr).not.toMatch(/\n\s+at |ENOENT|Error:/);
          }
          const lib = library(proj, join(IMAGES_DIR, 'base.qcow2'));
          expect(lib.error?.code).toBe('KERNELS');
          expect(lib.error?.file).toBe(kernelsFile());
          expect(lib.error?.message).toMatch(message);
        });
      });
    }
  });

  it('installs and works where the addon cannot be compiled (no working C compiler)', () => {
    const { proj: p2, out } = installInto(tarball, { CC: '/bin/false', CXX: '/bin/false' });
    expect(out).toContain('qcowkit: note: optional native hole-probing addon not built');
    const pkg = join(p2, 'node_modules', 'qcowkit');
    expect(existsSync(join(pkg, 'build', 'Release', 'qcowkit_extents.node'))).toBe(false);
    expect(existsSync(join(pkg, 'wasm', 'kernels.wasm'))).toBe(true);
    // Committed samples have no host holes: without the addon map still matches qemu-img.
    expect(cli(p2, ['map', '--output', 'json', 'chain/sub/top.qcow2']).stdout).toBe(fixtureText('chain/sub/top.qcow2.map.json'));
    expect(JSON.parse(cli(p2, ['check', '--output', 'json', 'base.qcow2']).stdout)).toEqual(fixtureJson('base.qcow2.check.json'));
    writeFileSync(join(p2, 'use-library.mjs'), LIBRARY_SCRIPT);
    expect(library(p2, join(IMAGES_DIR, 'chain', 'sub', 'top.qcow2')).sha256).toBe(sha256(expectedTopGuest()));
    // Without the addon's F_OFD_GETLK, lock conflicts are found in /proc/locks.
    if (hasQemuNbd()) {
      const img = join(tmpDir(), 'served.qcow2');
      copyFileSync(join(IMAGES_DIR, 'base.qcow2'), img);
      const sock = `${img}.sock`;
      const nbd = spawn('qemu-nbd', ['-f', 'qcow2', '-k', sock, img], { stdio: 'ignore' });
      try {
        for (let i = 0; i < 50 && !existsSync(sock); i++) spawnSync('sleep', ['0.1']);
        const r = cli(p2, ['info', img], [1]);
        expect(r.status).toBe(1);
        expect(r.stderr).toMatch(/served\.qcow2: Failed to get shared "write" lock: the image is in use by PID \d+ \(qemu-nbd\)/);
        expect(cli(p2, ['info', '-U', img]).status).toBe(0);
      } finally {
        nbd.kill('SIGKILL');
      }
    }
  }, 90_000);

  it('the install script exits 0 with a note when node-gyp itself is missing', () => {
    const dir = tmpDir();
    copyFileSync(join(REPO_ROOT, 'scripts', 'build-native.mjs'), join(dir, 'build-native.mjs'));
    // PATH is an empty directory: no node-gyp, not even npm's node-gyp-bin
    const empty = join(dir, 'empty-path');
    mkdirSync(empty);
    const r = run(process.execPath, [join(dir, 'build-native.mjs')], { cwd: dir, env: { ...cleanEnv(), PATH: empty } });
    expect(r.status).toBe(0);
    expect(r.stderr).toContain('qcowkit: note: optional native hole-probing addon not built');
    expect(r.stderr).toContain('node-gyp: spawnSync node-gyp ENOENT');
  });
});
