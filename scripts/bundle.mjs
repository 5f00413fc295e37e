// Bundles the CLI (dist/cli-bundle/): start-up of a short command is dominated by module
// resolution, loading and compiling, not by work. The bundle is CommonJS (`.cjs`): Node 20
// starts its ESM loader for the first ES module, ~6 ms of every run. Each command is one self-contained file
// (no shared chunks: every extra module costs a resolve, a realpath and a load), loaded by
// main.js only when that command runs; run/*.js are the commander-free modules of main.ts's
// quick path. The library (dist/) stays unbundled.
import { build } from 'esbuild';
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

const OUT = 'dist/cli-bundle';
const entries = (dir) => readdirSync(dir).filter((f) => f.endsWith('.ts')).map((f) => `${dir}/${f}`);
// main.ts, the commands (commander) and the quick-path modules of run/ (no commander).
const commands = [...entries('src/cli/commands'), ...entries('src/cli/run')];
/**
 * Builtins that a command rarely needs but whose loading costs start-up time, given to the bundle
 * as stand-ins that load the real module on first use:
 * - commander requires node:child_process at load (~4 ms) but uses it only to run external
 *   subcommands, which qcowkit has none of: a proxy;
 * - node:module (~0.3 ms: it loads Node's ESM loader) serves only fsx.ts's fallback, when the
 *   prebuilt lock binding cannot be loaded: a wrapper of createRequire (the one name our
 *   sources import from it; esbuild copies an ES import's names at load, which a proxy would
 *   defeat).
 */
const LAZY = {
  child_process: {
    wanted: (importer) => importer.includes('node_modules/commander/'),
    contents: "let m; const real = () => (m ??= require('node:child_process'));\nmodule.exports = new Proxy({}, { get: (_, k) => real()[k], has: (_, k) => k in real() });\n",
  },
  module: {
    wanted: () => true,
    contents: "exports.createRequire = (path) => require('node:module').createRequire(path);\n",
  },
};
const lazyBuiltins = {
  name: 'lazy-builtins',
  setup(b) {
    b.onResolve({ filter: /^(node:)?(child_process|module)$/ }, (args) => {
      const name = args.path.replace(/^node:/, '');
      // The stand-ins' own require of the real module stays a plain builtin.
      if (args.namespace === 'qcowkit-lazy' || !LAZY[name].wanted(args.importer)) return undefined;
      return { path: name, namespace: 'qcowkit-lazy' };
    });
    b.onLoad({ filter: /.*/, namespace: 'qcowkit-lazy' }, (args) => ({ contents: LAZY[args.path].contents, loader: 'js' }));
  },
};

/** @type {import('esbuild').BuildOptions} */
const common = {
  outdir: OUT,
  outbase: 'src/cli',
  bundle: true,
  splitting: false,
  format: 'cjs',
  outExtension: { '.js': '.cjs' },
  platform: 'node',
  target: 'node20',
  // fzstd is loaded (dynamic import) only for zstd-compressed clusters: not parsed by every command.
  external: ['fs-native-extensions', 'fzstd'],
  // The sources are ES modules that find their files (wasm, addon, package.json) from
  // import.meta.dirname/filename (or import.meta.url): give them the bundle's own path and URL
  // (the URL built on first use: building and parsing one costs ~0.4 ms the first time).
  define: { 'import.meta.url': '__qcowkit.url', 'import.meta.dirname': '__dirname', 'import.meta.filename': '__filename' },
  banner: { js: "const __qcowkit = { get url() { return (this.href ??= require('node:url').pathToFileURL(__filename).href); } };" },
  // import() becomes require(): the command files are compiled through node:vm (code cache,
  // src/cli/load-module.ts), where a dynamic import has no loader.
  supported: { 'dynamic-import': false },
  logLevel: 'warning',
  plugins: [lazyBuiltins],
  minifyWhitespace: true,
  minifySyntax: true,
};
const result = await build({ ...common, entryPoints: ['src/cli/main.ts', ...commands], metafile: true });
// Remove what earlier builds left (old shared chunks) once the new files are in place.
const fresh = new Set(Object.keys(result.metafile.outputs).map((f) => resolve(f)));
for (const e of readdirSync(OUT, { recursive: true, withFileTypes: true })) {
  const f = resolve(join(e.parentPath ?? e.path, e.name));
  if (e.isFile() && !fresh.has(f)) rmSync(f);
}

// Stamp each file with a hash of its contents: the code cache of a file is used only with the
// build it was made from (src/cli/load-module.ts).
for (const f of fresh) {
  if (!f.endsWith('.cjs')) continue;
  const code = readFileSync(f, 'utf8');
  const stamp = createHash('sha256').update(code).digest('hex').slice(0, 16);
  // "use strict" first: the banner above would otherwise push esbuild's directive out of the
  // prologue and leave the module sloppy.
  writeFileSync(f, `// qcowkit build ${stamp}\n"use strict";\n${code}`);
}
train();

/**
 * Training runs: one typical invocation per command module on scratch images, each writing the
 * V8 code cache of its module at exit. Optional: a failed run only means that module compiles
 * from source at every start.
 */
function train() {
  const dir = mkdtempSync(join(tmpdir(), 'qcowkit-train-'));
  const bin = resolve('bin/qcowkit.js');
  const runs = [
    ['create', '-f', 'qcow2', 'base.qcow2', '64M'],
    ['create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'],
    ['info', 'top.qcow2'],
    ['info', '--output', 'json', '--backing-chain', 'top.qcow2'],
    ['info', '--help'],
    ['map', '--output', 'json', 'top.qcow2'],
    ['check', 'top.qcow2'],
    ['compare', 'base.qcow2', 'top.qcow2'],
    // bitmap: the quick module (run/) by plain invocations covering every action and mode (a
    // cache keeps what earlier runs compiled: each run adds its paths), the commander one by --help.
    ['bitmap', '--add', 'top.qcow2', 'b0'],
    ['bitmap', '--add', '-g', '512', 'base.qcow2', 'b0'],
    ['bitmap', '--add', '--merge', 'b0', '--clear', '--disable', '--enable', 'top.qcow2', 'b1'],
    ['bitmap', '--merge', 'b0', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2', 'b1'],
    ['bitmap', '--output', 'json', '--remove', 'top.qcow2', 'b1'],
    ['bitmap', '--dump', 'top.qcow2', 'b0'],
    ['bitmap', '--check', 'top.qcow2'],
    ['bitmap', '--help'],
    ['changes', '--bitmap', 'b0', 'top.qcow2'],
    ['rebase', '-u', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'],
    ['plan', 'top.qcow2', '--drop', 'base.qcow2'],
    ['commit', 'top.qcow2'],
    ['make-empty', 'top.qcow2'],
  ];
  const env = { ...process.env, QCOWKIT_TRAIN_CODE_CACHE: '1' };
  try {
    for (const args of runs) spawnSync(process.execPath, [bin, ...args], { cwd: dir, env, stdio: 'ignore', timeout: 60_000 });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
