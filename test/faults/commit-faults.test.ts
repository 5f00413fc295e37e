// commit (the top emptied afterwards) interrupted everywhere: stopped before and after every
// flush and before a sample of mutating ops (power loss keeping none / all / only the newest /
// a random part of the unflushed ops), EIO/ENOSPC on metadata and on data writes, and the CLI
// SIGKILLed after write k. In every state both images pass qemu-img check (leaks allowed), the
// top's guest view is unchanged, the top is never emptied before the base holds its data, and
// running commit again completes it (clean images, the base equal to the fault-free run's, the
// top emptied). See commit-support.ts.
import { expect, it } from 'vitest';
import { describeQemu } from '../helpers/qemu.js';
import { crashMatrix } from './commit-matrix-driver.js';
import { SCENARIOS, isDataWrite, isMetadataWrite } from './commit-support.js';

describeQemu('commit: crash, power loss and I/O errors', () => {
  it('64 KiB clusters', async () => {
    const t = await crashMatrix('commit', SCENARIOS.plain64k!, {
      ops: 24,
      modes: ['none', 'all', 'latest', { random: 1 }],
      io: [
        { what: 'metadata writes', filter: isMetadataWrite, points: 8, errnos: ['EIO', 'ENOSPC'] },
        { what: 'data writes', filter: isDataWrite, points: 6, errnos: ['EIO', 'ENOSPC'] },
      ],
    });
    console.log(JSON.stringify(t));
  }, 600_000);
});
