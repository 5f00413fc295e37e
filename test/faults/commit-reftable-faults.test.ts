// commit into a base with 512-byte clusters and refcount_bits=64: a refcount block covers 32 KiB
// and the one-cluster table 2 MiB of file, so the commit adds blocks and grows the table (a new
// refcount area past everything in use, one header write to switch, the old table freed).
// Stopped before and after every flush (power loss: nothing, or only the newest unflushed op
// kept; process death: commit-kill-refcount.test.ts) and before sampled ops; EIO/ENOSPC on
// sampled metadata and data writes. Invariants as commit-faults.test.ts.
import { it } from 'vitest';
import { describeQemu } from '../helpers/qemu.js';
import { crashMatrix } from './commit-matrix-driver.js';
import { SCENARIOS, isDataWrite, isMetadataWrite } from './commit-support.js';

describeQemu('commit into a base whose refcount table grows: crashes and I/O errors', () => {
  it('refcount_bits=64, 512 B clusters: new refcount blocks and a bigger refcount table', { timeout: 600_000 }, async () => {
    const t = await crashMatrix('commit', SCENARIOS.rc64!, {
      ops: 8,
      modes: ['none', 'latest'],
      io: [
        { what: 'metadata writes', filter: isMetadataWrite, points: 8, errnos: ['EIO', 'ENOSPC'] },
        { what: 'data writes', filter: isDataWrite, points: 3, errnos: ['ENOSPC'] },
      ],
    });
    console.log('commit rc64', JSON.stringify(t));
  });
});
