// Builds the small SEEK_DATA/SEEK_HOLE addon (native/extents.c). Optional: when it can't be built,
// qcowkit still works and `map` reports allocated clusters without probing the host file for holes.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';

if (process.platform !== 'linux') process.exit(0);
const r = spawnSync('node-gyp', ['rebuild', '--directory', '.'], { stdio: ['ignore', 'ignore', 'pipe'], shell: false });
if (r.status !== 0 || !existsSync('build/Release/qcowkit_extents.node')) {
  process.stderr.write('qcowkit: note: native hole-probing addon not built; map will not split clusters at host-file holes\n');
  if (r.stderr) process.stderr.write(String(r.stderr).split('\n').slice(-5).join('\n') + '\n');
}
process.exit(0);
