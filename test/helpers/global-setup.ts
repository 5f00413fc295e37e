// Optional vitest globalSetup (add `globalSetup: ['test/helpers/global-setup.ts']` to
// vitest.config.ts). It lets describeQemu() count the suites it skips across all test files and
// prints ONE summary line at the end of the run, e.g.
//   !!! qcowkit tests: qemu-img not found — 12 interop suites SKIPPED !!!
// Without it, describeQemu() prints its warning directly (once per run, from the first file).
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

let dir: string | undefined;

export function setup(): void {
  dir = mkdtempSync(join(tmpdir(), 'qcowkit-tally-'));
  const tally = join(dir, 'skipped');
  writeFileSync(tally, '');
  process.env.QCOWKIT_SKIP_TALLY = tally; // inherited by the worker processes
}

export function teardown(): void {
  if (!dir) return;
  let n = 0;
  try {
    n = readFileSync(join(dir, 'skipped'), 'utf8').split('\n').filter(Boolean).length;
  } catch {
    /* ignore */
  }
  rmSync(dir, { recursive: true, force: true });
  delete process.env.QCOWKIT_SKIP_TALLY;
  if (n > 0) {
    process.stderr.write(`\n!!! qcowkit tests: qemu-img not found — ${n} interop suite(s) SKIPPED (install qemu-utils; CI=true makes this fatal) !!!\n\n`);
  }
}
