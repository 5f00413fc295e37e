// `npm start`: the main job on the bundled sample. Creates an overlay over images/base.qcow2 in a
// temp dir, then shows what qcowkit sees: info of the chain, the allocation map, a consistency
// check, and a guest-visible comparison of overlay and base, with file sizes.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, statSync, copyFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const cli = join(root, 'bin', 'qcowkit.js');
const dir = mkdtempSync(join(tmpdir(), 'qcowkit-demo-'));
const run = (...args) => {
  console.log(`\n$ qcowkit ${args.join(' ')}`);
  const r = spawnSync(process.execPath, [cli, ...args], { cwd: dir, encoding: 'utf8' });
  process.stdout.write(r.stdout);
  process.stderr.write(r.stderr);
  return r.status;
};
const size = (f) => {
  const st = statSync(join(dir, f));
  return `${f}: ${st.size} bytes long, ${st.blocks * 512} bytes on disk`;
};
try {
  copyFileSync(join(root, 'images', 'base.qcow2'), join(dir, 'base.qcow2'));
  run('create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'overlay.qcow2');
  console.log(`\n${size('base.qcow2')}\n${size('overlay.qcow2')}`);
  run('info', '--backing-chain', 'overlay.qcow2');
  run('map', 'overlay.qcow2');
  run('check', 'overlay.qcow2');
  const same = run('compare', 'overlay.qcow2', 'base.qcow2');
  process.exitCode = same === 0 ? 0 : 1;
} finally {
  rmSync(dir, { recursive: true, force: true });
}
