// make-empty interrupted everywhere: stopped before and after every flush and before a sample of
// mutating ops (power loss keeping none / all / only the newest / a random part of the unflushed
// ops), EIO and ENOSPC on metadata writes and on the space-returning ops (truncate, punch). In
// every state the top passes qemu-img check (leaks allowed) and reads either its old contents or
// its backing file's, the backing file is untouched, the snapshot's view and the bitmap's
// contents are unchanged, and running make-empty again completes it. The compaction moves the
// L1 table, refcount blocks and table, the snapshot table and L1, and the bitmap directory,
// table and data. SIGKILL of the CLI: make-empty-kill.test.ts.
import { it } from 'vitest';
import { describeQemu } from '../helpers/qemu.js';
import { crashMatrix } from './commit-matrix-driver.js';
import { SCENARIOS, isMetadataWrite, isSpaceOp } from './commit-support.js';

describeQemu('make-empty: crash, power loss and I/O errors at every flush and sampled writes', () => {
  it('64 KiB clusters: data, zero clusters, compressed clusters', { timeout: 600_000 }, async () => {
    const t = await crashMatrix('make-empty', SCENARIOS.plain64k!, {
      ops: 'all',
      modes: ['none', 'all', 'latest', { random: 1 }],
      io: [
        { what: 'metadata writes', filter: isMetadataWrite, points: 'all', errnos: ['EIO', 'ENOSPC'] },
        { what: 'truncate and punch', filter: isSpaceOp, points: 'all', errnos: ['EIO'] },
      ],
    });
    console.log('make-empty plain64k', JSON.stringify(t));
  });

  it('snapshot and bitmap, 4 KiB clusters: compaction moves every kind of metadata', { timeout: 600_000 }, async () => {
    const t = await crashMatrix('make-empty', SCENARIOS.snapbitmap!, {
      ops: 'all',
      modes: ['none', 'all', 'latest', { random: 1 }],
      io: [
        { what: 'metadata writes', filter: isMetadataWrite, points: 'all', errnos: ['EIO', 'ENOSPC'] },
        { what: 'truncate and punch', filter: isSpaceOp, points: 'all', errnos: ['EIO'] },
      ],
    });
    console.log('make-empty snapbitmap', JSON.stringify(t));
  });
});
