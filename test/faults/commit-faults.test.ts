// commit (the top emptied afterwards) interrupted everywhere: stopped before and after every
// flush and before a sample of mutating ops, with power loss keeping none / all / only the newest
// / a random part of the unflushed ops; EIO and ENOSPC on metadata writes and on data writes. In
// every state both images pass qemu-img check (leaks allowed), the top's guest view is unchanged,
// the top is never emptied before the base holds its data, and running commit again completes
// it: clean images, the base equal to the fault-free run's, the top emptied. Scenarios and
// invariants: commit-support.ts; refcount growth in the base: commit-refcount-faults.test.ts;
// SIGKILL: commit-kill.test.ts.
import { expect, it } from 'vitest';
import { describeQemu } from '../helpers/qemu.js';
import { crashMatrix } from './commit-matrix-driver.js';
import { SCENARIOS, isDataWrite, isMetadataWrite } from './commit-support.js';

const ALL_MODES = ['none', 'all', 'latest', { random: 1 }] as const;

describeQemu('commit: crash, power loss and I/O errors at every flush and sampled writes', () => {
  it('64 KiB clusters: data, zero writes, discards, partial clusters, compressed clusters in base and top', { timeout: 600_000 }, async () => {
    const t = await crashMatrix('commit', SCENARIOS.plain64k!, {
      ops: 'all',
      modes: [...ALL_MODES],
      io: [
        { what: 'metadata writes', filter: isMetadataWrite, points: 8, errnos: ['EIO', 'ENOSPC'] },
        { what: 'data writes', filter: isDataWrite, points: 6, errnos: ['EIO', 'ENOSPC'] },
      ],
    });
    expect(t.ioRuns).toBeGreaterThanOrEqual(20);
    console.log('commit plain64k', JSON.stringify(t));
  });

  it('base smaller than the top: L1 growth and resize of the base', { timeout: 600_000 }, async () => {
    const t = await crashMatrix('commit', SCENARIOS.grow!, {
      ops: 'all',
      modes: [...ALL_MODES],
      io: [
        { what: 'metadata writes', filter: isMetadataWrite, points: 8, errnos: ['EIO', 'ENOSPC'] },
        { what: 'data writes', filter: isDataWrite, points: 4, errnos: ['EIO'] },
      ],
    });
    console.log('commit grow', JSON.stringify(t));
  });

  it('top with an internal snapshot and a persistent bitmap: emptied and compacted, both kept', { timeout: 600_000 }, async () => {
    const t = await crashMatrix('commit', SCENARIOS.snapbitmap!, {
      ops: 'all',
      modes: ['none', 'all', 'latest'],
      io: [
        { what: 'metadata writes', filter: isMetadataWrite, points: 10, errnos: ['EIO', 'ENOSPC'] },
        { what: 'data writes', filter: isDataWrite, points: 3, errnos: ['ENOSPC'] },
      ],
    });
    console.log('commit snapbitmap', JSON.stringify(t));
  });
});
