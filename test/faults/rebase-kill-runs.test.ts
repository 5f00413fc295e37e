// (Split off rebase-kill.test.ts to bound each file's runtime: the scenarios with many writes.)
// The CLI's `rebase` SIGKILLed right after its kth write, for every k until it completes, with
// the invariants of rebase-kill.test.ts: 'scattered' makes a new L2 table in the top for each of
// 16 ranges (table written and flushed, then its L1 entry), 'runs' writes 70 separate clusters
// into one table (one batch: a few vectored writes), 'tables' makes 59 new L2 tables. With
// rebase-kill.test.ts: >= 200 kill points in all.
import { expect, it } from 'vitest';
import { range } from '../helpers/fault-file.js';
import { describeQemu } from '../helpers/qemu.js';
import { SCENARIOS, killMatrix } from './rebase-support.js';

describeQemu('rebase (CLI) killed with SIGKILL after each write: many tables, many runs', () => {
  it('every write of both scenarios', { timeout: 900_000 }, async () => {
    let killed = 0;
    for (const key of ['scattered', 'runs', 'tables'] as const) {
      const r = await killMatrix(SCENARIOS[key]!, range(1, 1000), { qemuRw: (k) => k % 8 === 1 });
      expect(r.completedAt, `${key}: the rebase completes once the kill point lies past its last write`).toBeDefined();
      killed += r.killed;
      console.log(`rebase kill ${key}: ${r.killed} kill points, completed at ${r.completedAt}`);
    }
    // Measured: 36 + 6 + 241.
    expect(killed).toBeGreaterThanOrEqual(250);
  });
});
