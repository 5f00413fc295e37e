// The CLI's `rebase` SIGKILLed right after its kth write (QCOWKIT_FAULT_KILL_AFTER_WRITES), for
// every k until it completes, over every scenario but the two with many writes (rebase-kill-runs):
// the files are exactly as the dead process left them (real page cache). Then: the top passes
// qemu-img check (leaks allowed), its header names the old or the new backing file and its
// guest view through that chain is unchanged, the enabled bitmap covers every range written,
// the snapshot and the disabled bitmap are unchanged, the backing files untouched; running
// rebase again completes it (clean, the new name, as a fault-free run) and qemu-io can open every
// file read-write (no lock outlives the process). With rebase-kill-runs.test.ts: >= 200
// kill points in all.
import { expect, it } from 'vitest';
import { range } from '../helpers/fault-file.js';
import { describeQemu } from '../helpers/qemu.js';
import { SCENARIOS, killMatrix } from './rebase-support.js';

describeQemu('rebase (CLI) killed with SIGKILL after each write', () => {
  it('every write of every scenario', { timeout: 900_000 }, async () => {
    let killed = 0;
    for (const key of ['drop', 'unrelated', 'flatten', 'compressed', 'extl2', 'extl2c', 'snapbitmap'] as const) {
      const r = await killMatrix(SCENARIOS[key]!, range(1, 1000), { qemuRw: (k) => k % 8 === 1 });
      expect(r.completedAt, `${key}: the rebase completes once the kill point lies past its last write`).toBeDefined();
      killed += r.killed;
      console.log(`rebase kill ${key}: ${r.killed} kill points, completed at ${r.completedAt}`);
    }
    // Measured: 91 (7 + 7 + 7 + 12 + 17 + 27 + 14): a batch writes its data in a few vectored writes.
    expect(killed).toBeGreaterThanOrEqual(85);
  });
});
