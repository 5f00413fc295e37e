// make-empty of a top with 512-byte clusters and 16-bit refcounts, an internal snapshot and a
// persistent bitmap: emptying lowers refcounts in many blocks, the compaction drops the idle
// blocks, moves the live ones, the snapshot and bitmap metadata and shrinks and moves the refcount
// table. Stopped before and after every flush (power loss: nothing or only the newest unflushed
// op kept; process death is make-empty-kill.test.ts's) and before sampled ops; EIO/ENOSPC on
// sampled metadata writes and on the truncate/punches. Invariants as make-empty-faults.test.ts.
import { it } from 'vitest';
import { describeQemu } from '../helpers/qemu.js';
import { crashMatrix } from './commit-matrix-driver.js';
import { SCENARIOS, isMetadataWrite, isSpaceOp } from './commit-support.js';

describeQemu('make-empty, 512 B clusters with many refcount blocks: crashes and I/O errors', () => {
  it('512 B clusters, refcount_bits=16, snapshot and bitmap: idle refcount blocks dropped, table moved', { timeout: 600_000 }, async () => {
    const t = await crashMatrix('make-empty', SCENARIOS.top512rc16!, {
      ops: 12,
      modes: ['none', 'latest'],
      io: [
        { what: 'metadata writes', filter: isMetadataWrite, points: 8, errnos: ['EIO', 'ENOSPC'] },
        { what: 'truncate and punch', filter: isSpaceOp, points: 4, errnos: ['EIO'] },
      ],
    });
    console.log('make-empty top512rc16', JSON.stringify(t));
  });
});
