// commit into a base with 512-byte clusters whose refcount structure grows during the commit:
// refcount_bits=1 (a new refcount block; refcount_bits=64 and table growth:
// commit-reftable-faults.test.ts). Same faults and invariants as commit-faults.test.ts.
import { it } from 'vitest';
import { describeQemu } from '../helpers/qemu.js';
import { crashMatrix } from './commit-matrix-driver.js';
import { SCENARIOS, isDataWrite, isMetadataWrite } from './commit-support.js';

describeQemu('commit into a base whose refcount blocks and table grow: crashes and I/O errors', () => {
  it('refcount_bits=1, 512 B clusters: a new refcount block', { timeout: 600_000 }, async () => {
    const t = await crashMatrix('commit', SCENARIOS.rc1!, {
      ops: 16,
      modes: ['none', 'all', { random: 3 }],
      io: [
        { what: 'metadata writes', filter: isMetadataWrite, points: 8, errnos: ['EIO', 'ENOSPC'] },
        { what: 'data writes', filter: isDataWrite, points: 4, errnos: ['EIO'] },
      ],
    });
    console.log('commit rc1', JSON.stringify(t));
  });
});
