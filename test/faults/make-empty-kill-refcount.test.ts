// (The 512 B cluster, refcount_bits=64 top with a snapshot and a bitmap, split off make-empty-kill.test.ts to bound each file's runtime.)
// The CLI's `make-empty` SIGKILLed right after its kth write, for every k until it completes,
// over every scenario (>= 200 kill points in all; the 512-byte-cluster tops with a snapshot and a
// bitmap give most of them: refcount blocks lowered, dropped, moved, the table shrunk and moved):
// the top passes qemu-img check (leaks allowed) and reads its old contents or its backing file's,
// the snapshot and the bitmap are unchanged, the backing file untouched; running make-empty
// again completes it and qemu-io can open the images read-write.
import { expect, it } from 'vitest';
import { range } from '../helpers/fault-file.js';
import { describeQemu } from '../helpers/qemu.js';
import { killMatrix } from './commit-matrix-driver.js';
import { SCENARIOS } from './commit-support.js';

describeQemu('make-empty (CLI) killed with SIGKILL after each write: 512 B clusters, 64-bit refcounts', () => {
  it('every write of every scenario', { timeout: 900_000 }, async () => {
    let killed = 0;
    for (const key of ['top512'] as const) {
      const r = await killMatrix('make-empty', SCENARIOS[key]!, range(1, 1000), { qemuRw: (k) => k % 8 === 1 });
      expect(r.completedAt, `${key}: completes past its last write`).toBeDefined();
      killed += r.killed;
      console.log(`make-empty kill ${key}: ${r.killed} kill points, completed at ${r.completedAt}`);
    }
    expect(killed).toBeGreaterThanOrEqual(140);
  });
});
