// commit -d (the top left as it is) interrupted everywhere, as commit-faults.test.ts does for
// commit: the top is never written (byte-identical in every state), both images pass qemu-img
// check (leaks allowed), and running commit -d again completes it (the base equal to the
// fault-free run's). SIGKILL of the CLI: commit-kill.test.ts.
import { it } from 'vitest';
import { describeQemu } from '../helpers/qemu.js';
import { crashMatrix } from './commit-matrix-driver.js';
import { SCENARIOS, isDataWrite, isMetadataWrite } from './commit-support.js';

describeQemu('commit -d: crash, power loss and I/O errors at every flush and sampled writes', () => {
  it('64 KiB clusters: data, zero writes, discards, partial clusters, compressed clusters', { timeout: 600_000 }, async () => {
    const t = await crashMatrix('commit-d', SCENARIOS.plain64k!, {
      ops: 'all',
      modes: ['none', 'all', 'latest', { random: 2 }],
      io: [
        { what: 'metadata writes', filter: isMetadataWrite, points: 6, errnos: ['EIO', 'ENOSPC'] },
        { what: 'data writes', filter: isDataWrite, points: 4, errnos: ['EIO', 'ENOSPC'] },
      ],
    });
    console.log('commit-d plain64k', JSON.stringify(t));
  });

  it('in-place writes into zero-flagged allocated base clusters: data durable before the flag goes', { timeout: 600_000 }, async () => {
    const t = await crashMatrix('commit-d', SCENARIOS.zeroalloc!, {
      ops: 'all',
      modes: ['none', 'all', 'latest', { random: 6 }],
      io: [
        { what: 'metadata writes', filter: isMetadataWrite, points: 'all', errnos: ['EIO'] },
        { what: 'data writes', filter: isDataWrite, points: 'all', errnos: ['ENOSPC'] },
      ],
    });
    console.log('commit-d zeroalloc', JSON.stringify(t));
  });

  it('base smaller than the top: L1 growth and resize', { timeout: 600_000 }, async () => {
    const t = await crashMatrix('commit-d', SCENARIOS.grow!, {
      ops: 'all',
      modes: ['none', 'all', 'latest'],
      io: [{ what: 'metadata writes', filter: isMetadataWrite, points: 6, errnos: ['EIO', 'ENOSPC'] }],
    });
    console.log('commit-d grow', JSON.stringify(t));
  });

  it('refcount_bits=64 base with 512 B clusters: refcount blocks and table growth', { timeout: 600_000 }, async () => {
    const t = await crashMatrix('commit-d', SCENARIOS.rc64!, {
      ops: 12,
      modes: ['none', 'all', { random: 5 }],
      io: [
        { what: 'metadata writes', filter: isMetadataWrite, points: 6, errnos: ['EIO', 'ENOSPC'] },
        { what: 'data writes', filter: isDataWrite, points: 2, errnos: ['EIO'] },
      ],
    });
    console.log('commit-d rc64', JSON.stringify(t));
  });
});
