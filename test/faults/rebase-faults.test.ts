// rebase interrupted everywhere: stopped before and after every flush and before mutating ops
// (every one, or an even sample; power loss keeping none / all / only the newest / a random part
// of the unflushed ops), EIO and ENOSPC on data writes and on metadata writes. In every state the
// top passes qemu-img check (leaks allowed), its header names the old or the new backing file
// and its guest view through that chain is the one it had, the enabled bitmap covers every range
// written (whole clusters for -c), the snapshot and the disabled bitmap are unchanged, the
// backing files untouched, and running rebase again completes it as a fault-free run.
// Scenarios and invariants: rebase-support.ts; SIGKILL: rebase-kill*.test.ts; locks:
// rebase-locks.test.ts.
import { expect, it } from 'vitest';
import type { CrashMode } from '../helpers/fault-file.js';
import { describeQemu } from '../helpers/qemu.js';
import { SCENARIOS, crashMatrix, type MatrixPlan } from './rebase-support.js';

const ALL_MODES: CrashMode[] = ['none', 'all', 'latest', { random: 1 }];
const THREE: CrashMode[] = ['none', 'all', 'latest'];

// The full matrix where the write path differs (plain copy, compressed, extended L2 with -c,
// bitmap and snapshot); samples where the scenario only changes what is compared.
const PLANS: Array<[string, string, MatrixPlan]> = [
  ['drop', 'safe rebase dropping the middle layer', { ops: 'all', modes: ALL_MODES, io: [{ on: 'metadata', points: 'all', errnos: ['EIO', 'ENOSPC'] }, { on: 'data', points: 'all', errnos: ['EIO', 'ENOSPC'] }] }],
  ['unrelated', 'onto an unrelated image with other data', { ops: 6, modes: ['none', 'latest'], io: [{ on: 'metadata', points: 4, errnos: ['EIO', 'ENOSPC'] }, { on: 'data', points: 4, errnos: ['EIO'] }] }],
  ['flatten', 'flatten (-b "")', { ops: 8, modes: ['none', 'latest'], io: [{ on: 'metadata', points: 4, errnos: ['ENOSPC'] }, { on: 'data', points: 3, errnos: ['EIO'] }] }],
  ['compressed', '-c, dropping the middle layer', { ops: 'all', modes: THREE, io: [{ on: 'metadata', points: 6, errnos: ['EIO', 'ENOSPC'] }, { on: 'data', points: 'all', errnos: ['EIO'] }] }],
  ['extl2', 'extended L2: subcluster differences', { ops: 6, modes: THREE, io: [{ on: 'metadata', points: 4, errnos: ['EIO'] }, { on: 'data', points: 4, errnos: ['ENOSPC'] }] }],
  ['extl2c', 'extended L2 with -c: partial clusters rewritten whole, compressed; a 4 KiB bitmap marked for them whole', { ops: 12, modes: ['none', 'latest'], io: [{ on: 'metadata', points: 6, errnos: ['EIO', 'ENOSPC'] }, { on: 'data', points: 4, errnos: ['EIO', 'ENOSPC'] }] }],
  ['snapbitmap', 'internal snapshot, enabled and disabled bitmaps', { ops: 16, modes: THREE, io: [{ on: 'metadata', points: 8, errnos: ['EIO', 'ENOSPC'] }, { on: 'data', points: 3, errnos: ['EIO', 'ENOSPC'] }] }],
];

describeQemu('rebase: crash, power loss and I/O errors at every flush and at writes', () => {
  it.each(PLANS)('%s: %s', { timeout: 600_000 }, async (key, _what, plan) => {
    const t = await crashMatrix(SCENARIOS[key]!, plan);
    expect(t.flushes).toBeGreaterThan(0);
    expect(t.ioRuns).toBeGreaterThanOrEqual(4);
    console.log(`rebase ${key}`, JSON.stringify(t));
  });
});
