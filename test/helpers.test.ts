// Self-test of the test helpers and of the committed fixtures in images/.
import { existsSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { gunzipSync } from 'node:zlib';
import { createHash } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { buildMatrix, type MatrixImage } from './helpers/matrix.js';
import { describeQemu, qemuImg, qemuImgJson, qemuIo, qemuVersion } from './helpers/qemu.js';
import { copyFixture, fixtureDeps, fixtureJson, fixtureManifest, fixturePath, IMAGES_DIR, sha256, tmpDir } from './helpers/tmp.js';

const manifest = fixtureManifest();
const samples = manifest.samples;
const qcow2Samples = samples.filter((s) => s.format === 'qcow2');

describe('committed fixtures', () => {
  it('has the documented samples', () => {
    const names = samples.map((s) => s.name);
    for (const n of ['base.qcow2', 'v2.qcow2', 'c512.qcow2', 'c2m.qcow2', 'rc1.qcow2', 'rc64.qcow2', 'extl2.qcow2',
      'lazy.qcow2', 'zeros.qcow2', 'compressed-zlib.qcow2', 'compressed-zstd.qcow2', 'chain/sub/top.qcow2',
      'rawback/over.qcow2', 'bitmaps.qcow2', 'snapshots.qcow2', 'leak.qcow2', 'corrupt-refcount.qcow2',
      'corrupt-l2.qcow2', 'loop/a.qcow2', 'truncated.qcow2', 'unknown-incompat.qcow2', 'encrypted-aes.qcow2',
      'datafile.qcow2']) {
      expect(names).toContain(n);
    }
    expect(existsSync(join(IMAGES_DIR, 'README.md'))).toBe(true);
  });

  it.each(samples.map((s) => [s.name, s] as const))('%s exists, is unmodified, and its oracles parse', (_n, s) => {
    const stored = join(IMAGES_DIR, s.file);
    expect(existsSync(stored)).toBe(true);
    const data = s.file.endsWith('.gz') ? gunzipSync(readFileSync(stored)) : readFileSync(stored);
    expect(data.length).toBe(s.size);
    expect(createHash('sha256').update(data).digest('hex')).toBe(s.sha256);
    for (const [kind, rec] of Object.entries(s.oracles)) {
      if (!rec?.file) continue;
      const text = readFileSync(join(IMAGES_DIR, rec.file), 'utf8');
      if (rec.file.endsWith('.json')) expect(() => JSON.parse(text), `${kind}: ${rec.file}`).not.toThrow();
    }
    if (s.flags.includes('valid')) {
      for (const k of ['info', 'map', 'check'] as const) {
        expect(s.oracles[k]?.status, k).toBe(0);
        expect(s.oracles[k]?.file, k).toBeTruthy();
      }
      expect(fixtureJson(`${s.name}.info.json`).format).toBe('qcow2');
    }
  });

  it('keeps images/ small', () => {
    const total = samples.reduce((a, s) => a + statSync(join(IMAGES_DIR, s.file)).size, 0);
    expect(total).toBeLessThan(4 * 1024 * 1024);
  });

  it('fixturePath decompresses gzipped fixtures and copyFixture brings dependencies', () => {
    expect(sha256(fixturePath('c2m.qcow2'))).toBe(samples.find((s) => s.name === 'c2m.qcow2')!.sha256);
    expect(fixtureDeps('chain/sub/top.qcow2')).toEqual(['chain/mid.qcow2', 'chain/base.qcow2']);
    expect(fixtureDeps('datafile.qcow2')).toEqual(['datafile.data']);
    expect(fixtureDeps('loop/a.qcow2')).toEqual(['loop/b.qcow2']);
    const d = tmpDir();
    const top = copyFixture('chain/sub/top.qcow2', d);
    expect(top).toBe(join(d, 'chain/sub/top.qcow2'));
    for (const f of ['chain/mid.qcow2', 'chain/base.qcow2']) expect(existsSync(join(d, f))).toBe(true);
    expect(sha256(copyFixture('c2m.qcow2', d))).toBe(sha256(fixturePath('c2m.qcow2')));
    expect(() => fixturePath('nope.qcow2')).toThrow(/no such fixture/);
  });
});

describeQemu('fixtures against the installed qemu-img', () => {
  const sameQemu = qemuVersion() === manifest.qemu;
  // Work on copies (gz fixtures decompressed), with the same relative names as the oracles.
  const work = tmpDir();
  for (const s of samples) copyFixture(s.name, work, { deps: false });

  it.each(qcow2Samples.filter((s) => !s.flags.includes('noopen')).map((s) => [s.name, s] as const))(
    '%s: qemu-img check exit status matches the manifest',
    (name, s) => {
      const r = qemuImg(['check', '--output=json', name], { cwd: work });
      expect(r.status, r.stderr).toBe(s.oracles.check!.status);
      if (s.flags.includes('valid')) expect(r.status).toBe(0);
      if (sameQemu && s.oracles.check!.file) {
        expect(r.stdout).toBe(readFileSync(join(IMAGES_DIR, s.oracles.check!.file), 'utf8'));
        expect(r.stderr).toBe(s.oracles.check!.stderr);
      }
    },
  );

  it.each(qcow2Samples.filter((s) => s.flags.includes('valid')).map((s) => [s.name, s] as const))(
    '%s: saved info/map JSON match qemu-img (actual-size ignored)',
    (name) => {
      const info = qemuImgJson(['info', name], { cwd: work });
      const saved = fixtureJson(`${name}.info.json`);
      delete info['actual-size'];
      delete saved['actual-size'];
      if (sameQemu) expect(info).toEqual(saved);
      else expect(info['virtual-size']).toBe(saved['virtual-size']);
      if (sameQemu) {
        const map = qemuImg(['map', '--output=json', name], { cwd: work });
        expect(map.stdout).toBe(readFileSync(fixturePath(`${name}.map.json`), 'utf8'));
      }
    },
  );

  it('qemuIo and qemuImgJson behave', () => {
    const d = tmpDir();
    const f = copyFixture('base.qcow2', d);
    const before = sha256(f);
    expect(qemuIo(f, ['read -P 0x11 0 64k', 'read -P 0x22 1M 4k'], { readOnly: true }).status).toBe(0);
    expect(qemuIo(f, ['read -P 0x99 0 4k'], { readOnly: true }).status).toBe(1);
    expect(sha256(f)).toBe(before);
    expect(qemuIo(f, ['write -P 0x55 2M 4k']).status).toBe(0);
    expect(sha256(f)).not.toBe(before);
    expect(qemuImgJson(['check', f]).filename).toBe(f);
    const leak = copyFixture('leak.qcow2', d);
    expect(() => qemuImgJson(['check', leak])).toThrow(/exited 3/);
    expect(qemuImgJson(['check', leak], { allowStatus: [3] }).leaks).toBe(1);
  });
});

describeQemu('interop matrix', () => {
  let images: MatrixImage[] = [];
  const dir = tmpDir();

  it('builds quickly', () => {
    const t0 = Date.now();
    images = buildMatrix(dir);
    const ms = Date.now() - t0;
    expect(images.length).toBeGreaterThanOrEqual(25);
    expect(ms).toBeLessThan(20_000); // target < 10 s; generous for slow CI machines
    const tags = images.flatMap((i) => i.tags);
    for (const t of ['v2', 'v3', 'c512', 'c4k', 'c64k', 'c2m', 'rc1', 'rc16', 'rc64']) {
      expect(tags.filter((x) => x === t).length, t).toBeGreaterThanOrEqual(2);
    }
    for (const t of ['extl2', 'lazy', 'zlib', 'zstd', 'backing-raw', 'chain', 'bitmaps', 'snapshots']) expect(tags).toContain(t);
    expect(new Set(images.map((i) => i.name)).size).toBe(images.length);
  });

  it('every matrix image passes qemu-img check and has the expected info', () => {
    expect(images.length).toBeGreaterThan(0);
    for (const img of images.filter((i) => i.format === 'qcow2')) {
      const r = qemuImg(['check', img.path]);
      expect(r.status, `${img.name}: ${r.stdout}${r.stderr}`).toBe(0);
      const info = qemuImgJson(['info', img.path]);
      expect(info['virtual-size'], img.name).toBe(img.size);
      if (img.clusterSize) expect(info['cluster-size'], img.name).toBe(img.clusterSize);
      expect(info['format-specific'].data.compat, img.name).toBe(img.tags.includes('v2') ? '0.10' : '1.1');
      if (img.backing) expect(info['full-backing-filename'], img.name).toBeTruthy();
      if (img.tags.includes('bitmaps')) expect(info['format-specific'].data.bitmaps.length).toBe(3);
      if (img.tags.includes('snapshots')) expect(info.snapshots.length).toBe(2);
      expect(qemuImg(['map', '--output=json', img.path]).status, img.name).toBe(0);
    }
  });
});
