// Image locking against QEMU 7.2 (OFD locks on bytes 100+/200+, see docs §13):
//  * while qemu-nbd serves an image read-write, `qcowkit info/map/compare` refuse it with one lock
//    error line (exit 1; compare 2 like qemu-img), and with -U they work and print what
//    `qemu-img ... -U` prints;
//  * while qcowkit has an image open for reading (library API), `qemu-io -c 'write ...'` on it or
//    on its backing file fails with QEMU's lock error, reads still work, and writes work again
//    once qcowkit closed it.
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { BackingChain } from '../../src/index.js';
import { describeQemu, hasQemuNbd, qemuImg, qemuIo, run } from '../helpers/qemu.js';
import { runCli } from '../helpers/cli.js';
import { sha256, tmpDir } from '../helpers/tmp.js';

let dir = '';
let nbdPid = 0;
const q = (args: string[]) => qemuImg(args, { cwd: dir });
function must(r: { status: number; stderr: string; stdout: string }, what: string): void {
  if (r.status !== 0) throw new Error(`${what} failed (${r.status}): ${r.stdout}${r.stderr}`);
}
const alive = (pid: number): boolean => pid > 0 && existsSync(`/proc/${pid}`) && !/^\d+ \(.*\) Z/.test(readFileSync(`/proc/${pid}/stat`, 'utf8'));

describeQemu('image locking versus QEMU 7.2', () => {
  beforeAll(() => {
    if (!hasQemuNbd()) throw new Error('qemu-nbd not found (it comes with qemu-img in qemu-utils)');
    dir = tmpDir('qcowkit-lock-interop-');
    must(q(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', 'base.qcow2', '8M']), 'create');
    must(qemuIo(join(dir, 'base.qcow2'), ['write -P 0x11 0 1M', 'write -P 0x12 5M 64k']), 'qemu-io');
    must(q(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'served.qcow2']), 'create');
    must(qemuIo(join(dir, 'served.qcow2'), ['write -P 0x21 512k 8k', 'write -z 5M 4k']), 'qemu-io');
    must(q(['convert', '-O', 'raw', 'served.qcow2', 'served.raw']), 'convert');
    must(q(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'held.qcow2']), 'create');
    // qemu-nbd opens served.qcow2 read-write (write lock) and daemonizes once it is ready
    must(run('qemu-nbd', ['--fork', '--persistent', '-f', 'qcow2', '-k', join(dir, 'nbd.sock'), '--pid-file', join(dir, 'nbd.pid'), 'served.qcow2'], { cwd: dir, timeout: 20_000 }), 'qemu-nbd');
    nbdPid = Number(readFileSync(join(dir, 'nbd.pid'), 'utf8').trim());
    expect(alive(nbdPid)).toBe(true);
  });

  afterAll(async () => {
    if (nbdPid && alive(nbdPid)) {
      process.kill(nbdPid, 'SIGTERM');
      for (let i = 0; i < 100 && alive(nbdPid); i++) await new Promise((r) => setTimeout(r, 20));
      if (alive(nbdPid)) process.kill(nbdPid, 'SIGKILL');
    }
  });

  it('qemu-img itself refuses the served image without -U', () => {
    const r = q(['info', 'served.qcow2']);
    expect(r.status).toBe(1);
    expect(r.stderr).toContain('Failed to get shared "write" lock');
  });

  it('without -U: info, map and compare fail with one lock error line', () => {
    const before = sha256(join(dir, 'served.qcow2'));
    for (const [args, status] of [
      [['info', 'served.qcow2'], 1],
      [['info', '--output=json', '--backing-chain', 'served.qcow2'], 1],
      [['map', '--output=json', 'served.qcow2'], 1],
      [['map', 'served.qcow2'], 1],
      [['compare', 'served.qcow2', 'served.raw'], 2], // compare: open errors are exit 2, as in qemu-img
      [['compare', 'served.raw', 'served.qcow2'], 2],
    ] as const) {
      const r = runCli([...args], { cwd: dir });
      expect(r.status, args.join(' ')).toBe(status);
      expect(r.stdout, args.join(' ')).toBe('');
      const lines = r.stderr.split('\n').filter(Boolean);
      expect(lines, args.join(' ')).toHaveLength(1);
      expect(lines[0]).toMatch(/^qcowkit: served\.qcow2: Failed to get shared "write" lock: .*-U/);
      expect(q([args[0], '-U', ...args.slice(1)]).status, `qemu-img ${args.join(' ')} -U`).toBe(0);
    }
    expect(alive(nbdPid)).toBe(true);
    expect(sha256(join(dir, 'served.qcow2'))).toBe(before);
  });

  it('with -U: the same output as qemu-img -U', () => {
    for (const args of [
      ['info', '-U', '--output=json', 'served.qcow2'],
      ['info', '-U', '--backing-chain', 'served.qcow2'],
      ['map', '-U', '--output=json', 'served.qcow2'],
      ['map', '-U', 'served.qcow2'],
      ['compare', '-U', 'served.qcow2', 'served.raw'],
      ['compare', '-U', '-s', 'served.qcow2', 'base.qcow2'],
    ]) {
      const theirs = q(args);
      const ours = runCli(args, { cwd: dir });
      expect([ours.status, ours.stderr], args.join(' ')).toEqual([theirs.status, '']);
      expect(ours.stdout, args.join(' ')).toBe(theirs.stdout);
    }
  });

  it('while qcowkit reads an image, a QEMU writer is locked out of it and of its backing file', async () => {
    const chain = await BackingChain.open(join(dir, 'held.qcow2'));
    try {
      expect([...(await chain.readBytes(0, 2))]).toEqual([0x11, 0x11]);
      for (const file of ['held.qcow2', 'base.qcow2']) {
        const w = qemuIo(join(dir, file), ['write -P 0x33 0 4k']);
        expect(w.status, file).not.toBe(0);
        expect(w.stderr + w.stdout, file).toContain('Failed to get "write" lock');
        // readers are welcome
        const r = qemuIo(join(dir, file), ['read -P 0x11 0 4k'], { readOnly: true });
        expect(r.status, `${file}: ${r.stderr}`).toBe(0);
      }
      // so is a concurrent qcowkit reader
      expect(runCli(['map', '--output=json', 'held.qcow2'], { cwd: dir }).status).toBe(0);
    } finally {
      await chain.close();
    }
    const w = qemuIo(join(dir, 'held.qcow2'), ['write -P 0x33 0 4k']);
    expect(w.status, w.stderr).toBe(0);
  });
});
