// rebase interrupted everywhere: stopped before and after every flush and before every mutating
// op (power loss keeping none / all / only the newest / a random part of the unflushed ops), EIO
// and ENOSPC on data writes and on metadata writes. In every state the top passes qemu-img check
// (leaks allowed), its header names the old or the new backing file, its guest view through that
// chain is the one it had, enabled bitmaps cover every range written, the snapshot and the
// disabled bitmap are unchanged, the backing files untouched, and running rebase again completes
// it as a fault-free run. Scenarios and invariants: rebase-support.ts; SIGKILL: rebase-kill*.
import { expect, it } from 'vitest';
import { describeQemu } from '../helpers/qemu.js';
import { SCENARIOS, crashMatrix } from './rebase-support.js';

const ALL_MODES = ['none', 'all', 'latest', { random: 1 }] as const;
const BOTH = ['EIO', 'ENOSPC'] as const;

describeQemu('rebase: crash, power loss and I/O errors at every flush and every write', () => {
  it.each([
    ['drop', 'safe rebase dropping the middle layer'],
    ['unrelated', 'onto an unrelated image with other data'],
    ['flatten', 'flatten (-b "")'],
    ['compressed', '-c, dropping the middle layer'],
    ['extl2', 'extended L2: subcluster differences'],
    ['extl2c', 'extended L2 with -c: partial clusters rewritten whole, compressed'],
    ['snapbitmap', 'internal snapshot, enabled and disabled bitmaps'],
  ] as const)('%s: %s', { timeout: 600_000 }, async (key) => {
    const t = await crashMatrix(SCENARIOS[key]!, {
      ops: 'all',
      modes: [...ALL_MODES],
      io: [
        { on: 'metadata', points: 'all', errnos: [...BOTH] },
        { on: 'data', points: 'all', errnos: [...BOTH] },
      ],
    });
    expect(t.flushes).toBeGreaterThan(0);
    expect(t.ioRuns).toBeGreaterThanOrEqual(4);
    console.log(`rebase ${key}`, JSON.stringify(t));
  });
});
