// `npm start`: the main job on the bundled samples — nightly maintenance of an SSD overlay over an
// HDD base. In a temp dir: copy images/base.qcow2, create an overlay over it, give the overlay
// real guest writes through the library's write API, then `commit` it into the base (which also
// empties and shrinks the overlay) and show the overlay's length and disk use before and after,
// `check` of both images and a guest-level comparison.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, statSync, copyFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const { openChain } = await import(join(root, 'dist', 'index.js'));
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
let failed = 0;
try {
  copyFileSync(join(root, 'images', 'base.qcow2'), join(dir, 'base.qcow2'));
  failed |= run('create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'overlay.qcow2');

  // A day of guest writes, through the library: data, an overwrite of part of it, zeroes, a discard.
  const chain = await openChain(join(dir, 'overlay.qcow2'), { write: [0] });
  const MiB = 1024 * 1024;
  const pattern = (n, seed) => Uint8Array.from({ length: n }, (_, i) => (i * 31 + seed) & 0xff);
  await chain.top.write(0, pattern(3 * MiB, 7));
  await chain.top.write(5 * MiB + 12345, pattern(MiB, 99));
  await chain.top.writeZeroes(1 * MiB, 512 * 1024);
  await chain.top.discard(2 * MiB, MiB);
  const expected = await chain.readBytes(0, chain.virtualSize);
  await chain.close();
  console.log(`\nwrote guest data into overlay.qcow2 through the library (write, writeZeroes, discard)`);
  console.log(`before: ${size('overlay.qcow2')}`);

  failed |= run('commit', '-p', 'overlay.qcow2');
  console.log(`\nafter:  ${size('overlay.qcow2')}\n        ${size('base.qcow2')}`);
  failed |= run('check', 'overlay.qcow2');
  failed |= run('check', 'base.qcow2');
  failed |= run('map', 'overlay.qcow2');
  failed |= run('compare', 'overlay.qcow2', 'base.qcow2');

  // The committed base reads exactly what the overlay's guest saw.
  const after = await openChain(join(dir, 'base.qcow2'));
  const got = await after.readBytes(0, expected.length);
  await after.close();
  const same = Buffer.compare(Buffer.from(got), Buffer.from(expected)) === 0;
  console.log(`\nbase holds the overlay's guest view: ${same ? 'yes' : 'NO'}`);
  if (!same) failed = 1;
  process.exitCode = failed ? 1 : 0;
} finally {
  rmSync(dir, { recursive: true, force: true });
}
