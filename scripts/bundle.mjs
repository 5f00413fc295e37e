// Bundles the CLI (dist/cli-bundle/): start-up of a short command is dominated by module
// resolution, loading and compiling, not by work. The bundle is CommonJS (`.cjs`): Node 20
// starts its ESM loader for the first ES module, ~6 ms of every run. Each command is one self-contained file
// (no shared chunks: every extra module costs a resolve, a realpath and a load), loaded by
// main.js only when that command runs; run/*.js are the commander-free modules of main.ts's
// quick path. The library (dist/) stays unbundled.
import { build } from 'esbuild';
import { readdirSync, rmSync } from 'node:fs';
import { join, resolve } from 'node:path';

const OUT = 'dist/cli-bundle';
const entries = (dir) => readdirSync(dir).filter((f) => f.endsWith('.ts')).map((f) => `${dir}/${f}`);
// main.ts, the commands (commander) and the quick-path modules of run/ (no commander).
const commands = [...entries('src/cli/commands'), ...entries('src/cli/run')];
/**
 * commander requires node:child_process at load (~4 ms of start-up) but uses it only to run
 * external subcommands, which qcowkit has none of: give it a proxy that loads the real module
 * on first use.
 */
const lazyChildProcess = {
  name: 'lazy-child-process',
  setup(b) {
    b.onResolve({ filter: /^(node:)?child_process$/ }, (args) =>
      args.importer.includes('node_modules/commander/') ? { path: 'lazy-child-process', namespace: 'qcowkit' } : undefined,
    );
    b.onLoad({ filter: /.*/, namespace: 'qcowkit' }, () => ({
      contents: "let m; const real = () => (m ??= require('node:child_process'));\nmodule.exports = new Proxy({}, { get: (_, k) => real()[k], has: (_, k) => k in real() });\n",
      loader: 'js',
    }));
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
  // import.meta.url: give them the bundle's own URL.
  define: { 'import.meta.url': '__qcowkitUrl' },
  banner: { js: "const __qcowkitUrl = require('node:url').pathToFileURL(__filename).href;" },
  logLevel: 'warning',
  plugins: [lazyChildProcess],
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
