// The package's `install` script: builds the small SEEK_DATA/SEEK_HOLE addon (native/extents.c)
// into build/Release/ with npm's bundled node-gyp. That is all it does — everything else ships
// prebuilt (dist/, wasm/kernels.wasm) and `node-gyp rebuild` empties build/, so nothing else may
// live there. Optional: when node-gyp, python3, make or a C compiler is missing (or the build
// fails or hangs), it prints a note and exits 0; qcowkit then works without the addon and `map`
// does not split allocated clusters at holes of the host file.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';

if (process.platform !== 'linux') process.exit(0);
const r = spawnSync('node-gyp', ['rebuild', '--directory', '.'], {
  stdio: ['ignore', 'ignore', 'pipe'],
  shell: false,
  timeout: 300_000, // node-gyp may try to download Node's headers; never hang an install on it
});
if (r.status !== 0 || !existsSync('build/Release/qcowkit_extents.node')) {
  process.stderr.write('qcowkit: note: optional native hole-probing addon not built (needs python3, make and a C compiler); map will not split clusters at host-file holes\n');
  if (r.error) process.stderr.write(`qcowkit: note: node-gyp: ${r.error.message}\n`);
  else if (r.stderr) process.stderr.write(String(r.stderr).trimEnd().split('\n').slice(-5).join('\n') + '\n');
}
process.exit(0);
