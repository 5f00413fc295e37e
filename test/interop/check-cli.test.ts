// The `qcowkit check` command line against `qemu-img check`: options, exit statuses, what goes
// to stdout and stderr. Needs `npm run build` (the CLI runs from dist/).
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { expect, it } from 'vitest';
import { runCli } from '../helpers/cli.js';
import { describeQemu, qemuImg, qemuIo } from '../helpers/qemu.js';
import { sha256, tmpDir } from '../helpers/tmp.js';
import { copy, mutate, ourCheck, qemuCheck } from './check-support.js';

describeQemu('qcowkit check (CLI) behaves as qemu-img check', () => {
  const dir = tmpDir('qcowkit-check-cli-');
  const clean = join(dir, 'clean.qcow2');
  qemuImg(['create', '-q', '-f', 'qcow2', clean, '64M']);
  qemuIo(clean, ['write -P 0x11 0 1M', 'write -c -P 0x22 2M 64k']);
  const broken = copy(clean, join(dir, 'broken.qcow2'));
  mutate(broken, 'refcount-up', 1);
  mutate(broken, 'refcount-zero', 3);
  mutate(broken, 'copied-flip', 2);
  const leaky = copy(clean, join(dir, 'leaky.qcow2'));
  mutate(leaky, 'refcount-up', 5);

  for (const [name, file] of [
    ['clean', clean],
    ['broken', broken],
    ['leaky', leaky],
  ] as const) {
    for (const args of [[], ['--output', 'json'], ['-q'], ['--output', 'json', '-q'], ['-f', 'qcow2', '-U']]) {
      it(`${name} ${args.join(' ') || '(human)'}`, () => {
        const o = ourCheck(args, file);
        const q = qemuCheck(args, file);
        expect(o.status).toBe(q.status);
        expect(o.stdout).toBe(q.stdout);
        expect(o.stderr).toBe(q.stderr);
      });
    }
  }

  for (const repair of ['leaks', 'all']) {
    for (const output of [[], ['--output', 'json']]) {
      it(`-r ${repair} ${output.join(' ')} on the broken image`, () => {
        const ours = copy(broken, join(dir, `o-${repair}-${output.length}.qcow2`));
        const theirs = copy(broken, join(dir, `q-${repair}-${output.length}.qcow2`));
        const o = ourCheck(['-r', repair, ...output], ours);
        const q = qemuCheck(['-r', repair, ...output], theirs);
        expect(o.status).toBe(q.status);
        expect(o.stdout.replaceAll(ours, theirs)).toBe(q.stdout);
        expect(o.stderr.replaceAll(ours, theirs)).toBe(q.stderr);
        expect(sha256(ours)).toBe(sha256(theirs));
      });
    }
  }

  it('-r leaks on the leaking image: repaired, exit 0', () => {
    const ours = copy(leaky, join(dir, 'ol.qcow2'));
    const o = ourCheck(['-r', 'leaks'], ours);
    expect(o.status).toBe(0);
    expect(o.stdout).toContain('The following inconsistencies were found and repaired:\n\n    1 leaked clusters\n    0 corruptions\n\nDouble checking the fixed image now...\nNo errors were found on the image.\n');
    expect(qemuCheck([], ours).status).toBe(0);
  });

  it('raw images: exit 63, "This image format does not support checks"', () => {
    const raw = join(dir, 'disk.raw');
    writeFileSync(raw, Buffer.alloc(1 << 20));
    for (const args of [[], ['-f', 'raw'], ['--output', 'json']]) {
      const o = ourCheck(args, raw);
      const q = qemuCheck(args, raw);
      expect(o.status).toBe(63);
      expect(q.status).toBe(63);
      expect(o.stdout).toBe('');
      expect(o.stderr).toBe(q.stderr);
    }
    expect(ourCheck(['-f', 'raw'], clean).status).toBe(63);
  });

  it('usage errors exit 1', () => {
    expect(ourCheck([], join(dir, 'missing.qcow2')).status).toBe(1);
    expect(ourCheck(['-r', 'foo'], clean).status).toBe(1);
    const shared = ourCheck(['-r', 'leaks', '-U'], clean);
    expect(shared.status).toBe(1);
    expect(shared.stderr).toContain('force-share=on can only be used with read-only images');
    expect(runCli(['check']).status).toBe(1);
  });

  it('--help documents the exit statuses', () => {
    const r = runCli(['check', '--help']);
    expect(r.status).toBe(0);
    expect(r.stdout).toContain('63');
    expect(r.stdout).toContain('-r, --repair');
  });
});
