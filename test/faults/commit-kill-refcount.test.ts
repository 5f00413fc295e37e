// (The refcount_bits=64 base of commit-kill.test.ts, split off to bound each file's runtime.)
// The CLI's `commit` (top emptied) SIGKILLed right after its kth write (QCOWKIT_FAULT_KILL_AFTER_WRITES),
// for every k until it completes, over every scenario (>= 200 kill points in all): the files are
// exactly as the dead process left them (real page cache). Then: both images pass qemu-img check
// (leaks allowed), the top's guest view is unchanged, the top is never emptied before the base
// holds its data; running commit again completes it (clean, base equal to a fault-free run's, top
// emptied) and qemu-io can open both images read-write (no lock outlives the process).
import { expect, it } from 'vitest';
import { range } from '../helpers/fault-file.js';
import { describeQemu } from '../helpers/qemu.js';
import { killMatrix } from './commit-matrix-driver.js';
import { SCENARIOS } from './commit-support.js';

describeQemu('commit (CLI) killed with SIGKILL after each write: refcount blocks and table growing', () => {
  it('every write of every scenario', { timeout: 900_000 }, async () => {
    let killed = 0;
    for (const key of ['rc64'] as const) {
      const r = await killMatrix('commit', SCENARIOS[key]!, range(1, 1000), { qemuRw: (k) => k % 8 === 1 });
      expect(r.completedAt, `${key}: the commit completes once the kill point lies past its last write`).toBeDefined();
      killed += r.killed;
      console.log(`commit kill ${key}: ${r.killed} kill points, completed at ${r.completedAt}`);
    }
    expect(killed).toBeGreaterThanOrEqual(80);
  });
});
