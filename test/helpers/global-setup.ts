// Optional vitest globalSetup (add `globalSetup: ['test/helpers/global-setup.ts']` to
// vitest.config.ts). It lets describeQemu() count the suites it skips across all test files and
// prints ONE summary line at the end of the run, e.g.
//   !!! qcowkit tests: qemu-img not found — 12 interop suites SKIPPED !!!
// Without it, describeQemu() prints its warning directly (once per run, from the first file).
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

// Not from ./tmp.js: that module registers vitest hooks, which a global setup can't.
const IMAGES_DIR = join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'images');

/**
 * A checkout may write the committed samples sparsely (zero blocks left as holes). qemu-img map
 * reports host holes in metadata-preallocated-looking images, and the saved oracles were made
 * from fully allocated files: rewrite sparse samples in place (same bytes, all blocks allocated).
 */
function densifySamples(dir: string): void {
  for (const name of readdirSync(dir)) {
    const path = join(dir, name);
    const st = statSync(path);
    if (st.isDirectory()) densifySamples(path);
    else if (st.isFile() && st.blocks * 512 < st.size) writeFileSync(path, readFileSync(path));
  }
}

let dir: string | undefined;

export function setup(): void {
  densifySamples(IMAGES_DIR);
  dir = mkdtempSync(join(tmpdir(), 'qcowkit-tally-'));
  const tally = join(dir, 'skipped');
  writeFileSync(tally, '');
  process.env.QCOWKIT_SKIP_TALLY = tally; // inherited by the worker processes
  // Extra CA certificates cost every Node start ~80 ms of CPU here (OpenSSL parses the bundle),
  // and the tests start the CLI thousands of times without ever making a TLS connection. Kept
  // aside for the one test that needs the registry (test/package: npm install).
  const caCerts = process.env.NODE_EXTRA_CA_CERTS;
  if (caCerts !== undefined) {
    process.env.QCOWKIT_TEST_NODE_EXTRA_CA_CERTS = caCerts;
    delete process.env.NODE_EXTRA_CA_CERTS;
  }
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
