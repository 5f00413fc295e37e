// rebase and QEMU's image locks: with qemu-nbd serving (writable) the image, its new backing file
// (unrelated, or inside the old chain) or its old backing file, rebase refuses in one line naming
// the holder, before writing anything: every file stays byte-identical. The library's refusal
// leaves nothing open (no lock of this process outlives the call), and once qemu-nbd is gone the
// same rebase completes and QEMU opens every file read-write. Killed rebases: rebase-kill*.
import { spawn } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { expect, it } from 'vitest';
import { runCli } from '../helpers/cli.js';
import { listFiles } from '../helpers/fault-file.js';
import { describeQemu, hasQemuNbd, qemuIo } from '../helpers/qemu.js';
import { tmpDir } from '../helpers/tmp.js';
import { expectNoLocks, must } from './commit-support.js';
import { SCENARIOS, TOP, cliArgs, expectComplete, makeViews, runRebase } from './rebase-support.js';

/** Runs `body` while qemu-nbd serves `file` writable; stops it (and waits) afterwards. */
async function whileServed(file: string, body: (pid: number) => Promise<void>): Promise<void> {
  const sock = join(tmpDir('qcowkit-nbd-'), 's');
  let stderr = '';
  const nbd = spawn('qemu-nbd', ['-f', 'qcow2', '-k', sock, file], { stdio: ['ignore', 'ignore', 'pipe'] });
  nbd.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<void>((r) => nbd.once('exit', () => r()));
  try {
    for (let i = 0; !existsSync(sock); i++) {
      if (nbd.exitCode !== null || i > 400) throw new Error(`qemu-nbd did not start: ${stderr}`);
      await new Promise((r) => setTimeout(r, 25));
    }
    await body(nbd.pid!);
  } finally {
    nbd.kill('SIGTERM');
    await exited;
  }
}

const CASES = [
  { held: TOP, scenario: 'unrelated', what: 'the image', lock: '"write"' },
  { held: 'new.qcow2', scenario: 'unrelated', what: 'its new, unrelated backing file', lock: 'shared "write"' },
  { held: 'base.qcow2', scenario: 'drop', what: 'its new backing file, inside the old chain', lock: 'shared "write"' },
  { held: 'mid.qcow2', scenario: 'flatten', what: 'its old backing file (flatten)', lock: 'shared "write"' },
] as const;

describeQemu('rebase refuses images in use (qemu-nbd holds a write lock)', () => {
  it.runIf(hasQemuNbd()).each(CASES)('qemu-nbd serving $what ($held, $scenario)', { timeout: 120_000 }, async (c) => {
    const s = SCENARIOS[c.scenario]!;
    const dir = tmpDir('qcowkit-rebase-lock-');
    s.build(dir);
    const files = listFiles(dir);
    const bytes = new Map(files.map((f) => [f, readFileSync(join(dir, f))]));
    const unchanged = (label: string) => {
      for (const f of files) expect(readFileSync(join(dir, f)).equals(bytes.get(f)!), `${label}: ${f} changed`).toBe(true);
    };
    await whileServed(join(dir, c.held), async (pid) => {
      const r = runCli(cliArgs(s, dir), { cwd: dir });
      expect(r.status, r.stderr).toBe(1);
      const lines = r.stderr.trimEnd().split('\n');
      expect(lines, r.stderr).toHaveLength(1);
      const name = c.held.replace('.', '\\.');
      expect(lines[0]).toMatch(new RegExp(`^qcowkit: .*${name}.*Failed to get ${c.lock} lock: the image is in use by PID ${pid} \\(qemu-nbd\\)`));
      // rebase writes: -U (accepted, without effect) is no way around it.
      expect(lines[0]).toMatch(/; stop it before changing the image$/);
      unchanged('CLI refused');
      await expect(runRebase(s, dir)).rejects.toMatchObject({ code: 'LOCKED' });
      unchanged('library refused');
    });
    // qemu-nbd is gone: a lock still on a file is this process's, left by the refused call.
    for (const f of files) expectNoLocks(join(dir, f), `after the refused rebase`);
    // The same rebase now completes, as a fault-free one, and leaves no lock either.
    const after = tmpDir('qcowkit-rebase-lock-after-');
    s.build(after);
    await runRebase(s, after);
    const views = await makeViews(s, dir, after, files);
    const r = runCli(cliArgs(s, dir), { cwd: dir });
    expect(r.status, r.stderr).toBe(0);
    await expectComplete(dir, views, 'after qemu-nbd stopped');
    for (const f of files) {
      expectNoLocks(join(dir, f), 'after the rebase');
      must(qemuIo(join(dir, f), ['read 0 512']), `qemu-io opening ${f} read-write`);
    }
  });
});
