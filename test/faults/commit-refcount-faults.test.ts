// commit into a base with 512-byte clusters whose refcount structure grows during the commit:
// refcount_bits=1 (a new refcount block) and refcount_bits=64 (new blocks and a new, bigger
// refcount table: a new refcount area, one header write to switch, the old table freed). Same
// faults and invariants as commit-faults.test.ts; commit -d on the table-growth case too.
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

  it('refcount_bits=64, 512 B clusters: new refcount blocks and a bigger refcount table', { timeout: 600_000 }, async () => {
    const t = await crashMatrix('commit', SCENARIOS.rc64!, {
      ops: 16,
      modes: ['none', 'latest', { random: 4 }],
      io: [
        { what: 'metadata writes', filter: isMetadataWrite, points: 8, errnos: ['EIO', 'ENOSPC'] },
        { what: 'data writes', filter: isDataWrite, points: 3, errnos: ['ENOSPC'] },
      ],
    });
    console.log('commit rc64', JSON.stringify(t));
  });
});
