// `qcowkit check` against `qemu-img check` (7.2): clean images of every shape must give the same
// JSON (byte for byte), human output, stderr and exit status; corrupted copies must too, read-only
// and with -r leaks / -r all, and the repaired files must be byte-identical to qemu-img's repairs
// (except where qcowkit deliberately does better or QEMU rewrites bitmaps), clean for qemu-img
// afterwards, with unchanged guest data.
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { expect, it } from 'vitest';
import { describeQemu, qemuImg, qemuIo } from '../helpers/qemu.js';
import { buildMatrix, type MatrixImage } from '../helpers/matrix.js';
import { sha256, tmpDir } from '../helpers/tmp.js';
import { copy, mutate, ourCheck, ourCheckLib, qemuCheck, type Mutation } from './check-support.js';


/** Extra shapes the matrix lacks: dirty lazy-refcount image, metadata preallocation, empty disk. */
function extraImages(dir: string): MatrixImage[] {
  const out: MatrixImage[] = [];
  const mk = (name: string, opts: string, size: string, cmds: string[], kill = false) => {
    const path = join(dir, `${name}.qcow2`);
    expect(qemuImg(['create', '-q', '-f', 'qcow2', '-o', opts, path, size]).status).toBe(0);
    if (cmds.length) {
      const r = qemuIo(path, kill ? [...cmds, 'sigraise 9'] : cmds);
      if (!kill) expect(r.status, r.stderr).toBe(0);
    }
    out.push({ name, path, format: 'qcow2', description: name, tags: [], size: 0 });
  };
  mk('lazy-killed', 'lazy_refcounts=on,cluster_size=64k', '32M', ['write -P 0x5a 0 1M', 'write -P 0x33 4M 64k', 'write -z 8M 64k'], true);
  mk('lazy-killed-c4k-rc2', 'lazy_refcounts=on,cluster_size=4k,refcount_bits=2', '8M', ['write -P 0x5a 0 200k', 'write -c -P 0x66 1M 4k'], true);
  mk('prealloc-metadata', 'preallocation=metadata,cluster_size=64k', '64M', ['write -P 0x11 1M 64k']);
  mk('empty', 'cluster_size=64k', '0', []);
  mk('zero-alloc', 'cluster_size=64k', '16M', ['write -P 1 0 1M', 'write -z 0 512k', 'write -z -u 512k 64k', 'discard 768k 64k']);
  mk('rc4-compressed', 'refcount_bits=4,cluster_size=4k', '4M', ['write -c -P 7 0 4k', 'write -c -P 8 4k 4k', 'write -c -P 9 8k 4k', 'write -P 10 1M 64k']);
  mk('rc8-c16k', 'refcount_bits=8,cluster_size=16k', '8M', ['write -P 7 0 100k', 'write -P 8 3M 48k']);
  mk('rc32-c1k', 'refcount_bits=32,cluster_size=1k', '4M', ['write -P 7 0 100k', 'write -P 8 3M 48k']);
  return out;
}

describeQemu('check: clean images agree with qemu-img check', () => {
  const dir = tmpDir('qcowkit-check-clean-');
  const images = [...buildMatrix(dir).filter((i) => i.format === 'qcow2'), ...extraImages(dir)];

  for (const img of images) {
    it(`${img.name}`, () => {
      const before = sha256(img.path);
      const qj = qemuCheck(['--output', 'json'], img.path);
      const oj = ourCheck(['--output', 'json'], img.path);
      expect(oj.status).toBe(qj.status);
      expect(oj.stdout).toBe(qj.stdout);
      expect(oj.stderr).toBe(qj.stderr);
      const qh = qemuCheck([], img.path);
      const oh = ourCheck([], img.path);
      expect(oh.stdout).toBe(qh.stdout);
      expect(oh.status).toBe(qh.status);
      expect(sha256(img.path), 'a read-only check never writes').toBe(before);
    });
  }
});

/** Shapes the corruption recipes run on (matrix names). */
const SHAPES = ['v2-c64k-rc16', 'v2-c512-rc16', 'v3-c512-rc1', 'v3-c4k-rc64', 'v3-c64k-rc16', 'v3-c2m-rc1', 'extl2-c64k', 'compressed-zlib-c64k', 'compressed-zstd-c2m', 'snapshots-c64k', 'lazy-c64k', 'overlay-top', 'bitmaps-c64k'];

const MUTATIONS: Mutation[] = [
  'refcount-up',
  'refcount-down',
  'refcount-zero',
  'copied-flip',
  'l1-copied',
  'l2-past-eof',
  'l2-unaligned',
  'zero-unaligned',
  'l2-reserved',
  'l1-reserved',
  'l1-past-eof',
  'refblock-on-data',
  'refblock-on-l2',
  'reftable-outside',
  'reftable-unaligned',
  'reftable-reserved',
  'l2-shared',
  'compressed-copied',
];

/**
 * Where qemu-img 7.2 gives up and qcowkit repairs: QEMU's rebuild allocates new refcount blocks in
 * the clusters an invalid refcount table entry points to and then refuses its own write.
 */
const QCOWKIT_BETTER = new Set<Mutation>(['reftable-unaligned', 'reftable-reserved']);

describeQemu('check: corrupted images agree with qemu-img check, read-only and repaired', () => {
  const dir = tmpDir('qcowkit-check-corrupt-');
  const images = buildMatrix(dir, { only: (n) => SHAPES.includes(n) || n === 'overlay-base' });
  let n = 0;
  for (const shape of SHAPES) {
    const base = images.find((i) => i.name === shape)!;
    for (const kind of MUTATIONS) {
      for (const seed of kind.startsWith('refcount') || kind === 'copied-flip' ? [1, 2] : [1]) {
        it(`${shape}: ${kind}${seed > 1 ? ` #${seed}` : ''}`, async () => {
          // Next to the original: overlays find their backing file by a relative name.
          const orig = join(dirname(base.path), `${shape}-${kind}-${seed}-${n++}.qcow2`);
          copy(base.path, orig);
          if (!mutate(orig, kind, seed)) return; // recipe does not apply to this shape
          const ro = await ourCheckLib(['--output', 'json'], orig);
          const qro = qemuCheck(['--output', 'json'], orig);
          expect(ro.status).toBe(qro.status);
          expect(ro.stdout).toBe(qro.stdout);
          expect(ro.stderr).toBe(qro.stderr);

          for (const repair of ['leaks', 'all'] as const) {
            const ours = copy(orig, `${orig}.ours-${repair}`);
            const theirs = copy(orig, `${orig}.qemu-${repair}`);
            const o = await ourCheckLib(['-r', repair], ours);
            const q = qemuCheck(['-r', repair], theirs);
            const bitmaps = shape.startsWith('bitmaps');
            if (repair === 'all' && QCOWKIT_BETTER.has(kind) && q.status === 1) {
              expect(o.status, o.stderr).toBe(0);
            } else {
              expect(o.status, `${o.stdout}\n${o.stderr}`).toBe(q.status);
              expect(o.stdout).toBe(q.stdout);
              if (!bitmaps) {
                expect(o.stderr.replaceAll(ours, theirs)).toBe(q.stderr);
                expect(sha256(ours) === sha256(theirs), 'byte-identical to qemu-img\'s repair').toBe(true);
              }
            }
            if (o.status === 0) {
              const after = qemuCheck([], ours);
              expect(after.status, after.stderr).toBe(0);
              const info = JSON.parse(qemuImg(['info', '--output', 'json', ours]).stdout);
              expect(info['dirty-flag'], 'dirty bit cleared').toBe(false);
              expect(info['format-specific']?.data?.corrupt ?? false, 'corrupt bit cleared').toBe(false);
              // Guest data unchanged (when qemu-img can read the damaged original at all).
              const cmp = qemuImg(['compare', '-q', orig, ours]);
              if (cmp.status < 2) expect(cmp.status, `compare ${orig} ${ours}`).toBe(0);
            }
          }
        });
      }
    }
  }
});

describeQemu('check: dirty and corrupt bits', () => {
  const dir = tmpDir('qcowkit-check-bits-');

  it('a lazy-refcounts image killed mid-write: -r all rebuilds and clears the dirty bit as qemu-img', () => {
    const img = join(dir, 'lazy.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', img, '64M']);
    qemuIo(img, ['write -P 0x42 0 2M', 'write -P 0x43 10M 64k', 'sigraise 9']);
    expect(JSON.parse(qemuImg(['info', '--output', 'json', img]).stdout)['dirty-flag']).toBe(true);
    const ro = ourCheck([], img);
    expect(ro.status).toBe(2);
    const leaks = ourCheck(['-r', 'leaks'], copy(img, join(dir, 'l.qcow2')));
    expect(leaks.status).toBe(1);
    expect(leaks.stderr).toContain('ERROR need to rebuild refcount structures');
    expect(leaks.stderr).toContain('Check failed: Input/output error');
    const ours = copy(img, join(dir, 'o.qcow2'));
    const theirs = copy(img, join(dir, 'q.qcow2'));
    const o = ourCheck(['-r', 'all'], ours);
    const q = qemuCheck(['-r', 'all'], theirs);
    expect(o.status).toBe(0);
    expect(o.stdout).toBe(q.stdout);
    expect(sha256(ours)).toBe(sha256(theirs));
    expect(JSON.parse(qemuImg(['info', '--output', 'json', ours]).stdout)['dirty-flag']).toBe(false);
    expect(qemuIo(ours, ['read -P 0x42 0 2M', 'read -P 0x43 10M 64k'], { readOnly: true }).status).toBe(0);
  });

  it('-r leaks clears a corrupt bit when nothing else is wrong, as qemu-img', () => {
    const img = join(dir, 'c.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', img, '16M']);
    qemuIo(img, ['write -P 1 0 128k']);
    const b = readFileSync(img);
    b[79] |= 2; // incompatible_features: corrupt
    writeFileSync(img, b);
    expect(ourCheck([], img).status).toBe(0);
    const ours = copy(img, join(dir, 'co.qcow2'));
    const theirs = copy(img, join(dir, 'cq.qcow2'));
    expect(ourCheck(['-r', 'leaks'], ours).status).toBe(0);
    expect(qemuCheck(['-r', 'leaks'], theirs).status).toBe(0);
    expect(sha256(ours)).toBe(sha256(theirs));
    expect(JSON.parse(qemuImg(['info', '--output', 'json', ours]).stdout)['format-specific'].data.corrupt).toBe(false);
  });

  it('a dirty bit on an otherwise clean image is cleared by any repair', () => {
    const img = join(dir, 'd.qcow2');
    qemuImg(['create', '-q', '-f', 'qcow2', img, '16M']);
    qemuIo(img, ['write -P 1 0 128k']);
    const b = readFileSync(img);
    b[79] |= 1;
    writeFileSync(img, b);
    const ours = copy(img, join(dir, 'do.qcow2'));
    const theirs = copy(img, join(dir, 'dq.qcow2'));
    expect(ourCheck(['-r', 'leaks'], ours).status).toBe(0);
    expect(qemuCheck(['-r', 'leaks'], theirs).status).toBe(0);
    expect(sha256(ours)).toBe(sha256(theirs));
    expect(existsSync(ours)).toBe(true);
  });
});
