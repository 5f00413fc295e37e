// Bundles the CLI into a few ESM files (dist/cli-bundle/): start-up of a short command is
// dominated by module resolution and loading, not by work. The library (dist/) stays unbundled.
import { build } from 'esbuild';
import { readdirSync } from 'node:fs';

const commands = readdirSync('src/cli/commands').filter((f) => f.endsWith('.ts')).map((f) => `src/cli/commands/${f}`);
await build({
  entryPoints: ['src/cli/main.ts', ...commands],
  outdir: 'dist/cli-bundle',
  outbase: 'src/cli',
  bundle: true,
  splitting: true,
  format: 'esm',
  platform: 'node',
  target: 'node20',
  external: ['fs-native-extensions'],
  // commander is CommonJS and requires node builtins: give the ESM bundle a real `require`.
  banner: { js: "import { createRequire as __qcowkitRequire } from 'node:module'; const require = __qcowkitRequire(import.meta.url);" },
  logLevel: 'warning',
});
