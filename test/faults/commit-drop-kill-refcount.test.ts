// (The refcount_bits=64 base (refcount blocks and table growing), split off commit-drop-kill.test.ts to bound each file's runtime.)
// The CLI's `commit -d` SIGKILLed right after its kth write, for every k until it completes, over
// every scenario (>= 200 kill points in all): both images pass qemu-img check (leaks allowed), the
// top is byte-identical, running commit -d again completes it (clean, the base equal to a
// fault-free run's) and qemu-io can open both images read-write.
import { expect, it } from 'vitest';
import { range } from '../helpers/fault-file.js';
import { describeQemu } from '../helpers/qemu.js';
import { killMatrix } from './commit-matrix-driver.js';
import { SCENARIOS } from './commit-support.js';

describeQemu('commit -d (CLI) killed with SIGKILL after each write: refcount table growth', () => {
  it('every write of every scenario', { timeout: 900_000 }, async () => {
    let killed = 0;
    for (const key of ['rc64'] as const) {
      const r = await killMatrix('commit-d', SCENARIOS[key]!, range(1, 1000), { qemuRw: (k) => k % 8 === 1 });
      expect(r.completedAt, `${key}: completes past its last write`).toBeDefined();
      killed += r.killed;
      console.log(`commit -d kill ${key}: ${r.killed} kill points, completed at ${r.completedAt}`);
    }
    expect(killed).toBeGreaterThanOrEqual(80);
  });
});
