// `check` as a library, on the committed samples (images/, with qemu-img 7.2 oracles): results,
// messages and exit codes equal the oracles; a read-only check never writes; repairs leave an
// image the check finds clean with unchanged guest data.
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { check, compare, QcowError, type CheckResult } from '../../src/index.js';
import { checkExitCode, NO_CHECKS } from '../../src/ops/check.js';
import { human, printfFixed2 } from '../../src/cli/commands/check.js';
import { openImageFile, type ImageFile } from '../../src/io/file.js';
import { copyFixture, fixtureManifest, fixturePath, fixtureText, sha256, tmpDir } from '../helpers/tmp.js';

const samples = fixtureManifest().samples.filter((s) => s.oracles.check);

/** check() the way qemu-img does it: result, its messages, and the exit status. */
async function runCheck(path: string, repair?: 'leaks' | 'all'): Promise<{ result?: CheckResult; messages: string; status: number; error?: QcowError }> {
  let messages = '';
  try {
    const result = await check(path, { repair, onMessage: (l) => (messages += `${l}\n`) });
    return { result, messages, status: checkExitCode(result) };
  } catch (e) {
    if (!(e instanceof QcowError)) throw e;
    return { messages, status: e.message === NO_CHECKS ? 63 : 1, error: e };
  }
}

/** A wrapper that fails the test on any write-side call. */
function readOnlyGuard(inner: ImageFile): ImageFile {
  const no = (what: string) => () => {
    throw new Error(`read-only check called ${what}`);
  };
  return {
    path: inner.path,
    writable: false,
    get fd() {
      return inner.fd;
    },
    size: () => inner.size(),
    allocatedBytes: () => inner.allocatedBytes(),
    readAt: (b, o) => inner.readAt(b, o),
    readv: (bufs, o, opts) => inner.readv(bufs, o, opts),
    writeAt: no('writeAt'),
    writev: no('writev'),
    flush: no('flush'),
    truncate: no('truncate'),
    punchHole: no('punchHole'),
    dataExtents: (s, e) => inner.dataExtents(s, e),
    close: () => inner.close(),
  };
}

/**
 * Runs `fn` in the fixture's directory, where qemu-img ran for the oracles: QEMU 7.2 (and so
 * qcowkit) takes a relative external data file name from the current directory.
 */
async function inFixtureDir<T>(path: string, fn: () => Promise<T>): Promise<T> {
  const old = process.cwd();
  process.chdir(dirname(path));
  try {
    return await fn();
  } finally {
    process.chdir(old);
  }
}

describe('check: committed samples match their qemu-img oracles', () => {
  for (const s of samples) {
    it(s.name, async () => {
      const oracle = s.oracles.check!;
      const path = fixturePath(s.name);
      const before = sha256(path);
      const r = await inFixtureDir(path, () => runCheck(path));
      expect(r.status).toBe(oracle.status);
      if (oracle.file) {
        // qemu-img ran in images/ with the relative name: that is its filename field.
        const result = { ...r.result!, filename: s.name };
        expect(JSON.stringify(result, null, 4) + '\n').toBe(fixtureText(oracle.file));
        expect(r.messages).toBe(oracle.stderr);
        const text = s.oracles.checkText;
        if (text?.file) expect(human(r.result!)).toBe(fixtureText(text.file));
      } else {
        expect(r.error, 'qemu-img could not open it: neither can we').toBeDefined();
      }
      expect(sha256(path)).toBe(before);
    });
  }
});

describe('check: read-only never writes', () => {
  for (const s of samples.filter((x) => x.oracles.check?.file)) {
    it(`${s.name} through a write-refusing file`, async () => {
      const path = fixturePath(s.name);
      const file = readOnlyGuard(await openImageFile(path));
      try {
        const r = await inFixtureDir(path, () => check(path, { file }));
        expect(r['check-errors']).toBe(0);
      } finally {
        await file.close();
      }
    });
  }
});

describe('check: results', () => {
  it('keys come in qemu-img order, zero counts omitted except check-errors', async () => {
    const r = await check(fixturePath('compressed-zlib.qcow2'));
    expect(Object.keys(r)).toEqual(['image-end-offset', 'compressed-clusters', 'total-clusters', 'check-errors', 'allocated-clusters', 'filename', 'format', 'fragmented-clusters']);
    const dir = tmpDir();
    const leak = copyFixture('leak.qcow2', dir);
    const fixed = await check(leak, { repair: 'all' });
    expect(Object.keys(fixed)).toEqual(['image-end-offset', 'total-clusters', 'check-errors', 'leaks-fixed', 'allocated-clusters', 'filename', 'format', 'fragmented-clusters']);
    expect(fixed['leaks-fixed']).toBe(1);
  });

  it('raw images have no checks (exit 63), and -U excludes repairs', async () => {
    const dir = tmpDir();
    const raw = join(dir, 'x.raw');
    (await import('node:fs')).writeFileSync(raw, Buffer.alloc(65536, 1));
    expect((await runCheck(raw)).status).toBe(63);
    await expect(check(raw, { format: 'qcow2' })).rejects.toThrow(QcowError);
    await expect(check(fixturePath('base.qcow2'), { repair: 'leaks', forceShare: true })).rejects.toThrow('force-share=on can only be used with read-only images');
    await expect(check(join(dir, 'missing.qcow2'))).rejects.toMatchObject({ code: 'NOT_FOUND' });
  });

  it('an aborted check throws ABORTED', async () => {
    const ac = new AbortController();
    ac.abort();
    await expect(check(fixturePath('base.qcow2'), { signal: ac.signal })).rejects.toMatchObject({ code: 'ABORTED' });
  });

  it('reports progress up to its total', async () => {
    const seen: Array<[number, number]> = [];
    await check(fixturePath('snapshots.qcow2'), { onProgress: (d, t) => seen.push([d, t]) });
    expect(seen.length).toBeGreaterThan(0);
    for (const [d, t] of seen) expect(d).toBeLessThanOrEqual(t);
  });

  it('%0.2f rounds like glibc (exact ties to even)', () => {
    expect(printfFixed2(3.125)).toBe('3.12');
    expect(printfFixed2(0.375)).toBe('0.38');
    expect(printfFixed2(12.5)).toBe('12.50');
    expect(printfFixed2((1 * 100) / 1024)).toBe('0.10');
    expect(printfFixed2((5 * 100) / 17)).toBe('29.41');
    expect(printfFixed2(100)).toBe('100.00');
    expect(printfFixed2(0.005)).toBe((0.005).toFixed(2)); // 0.005 is not an exact tie in binary
  });
});

describe('check: repairs', () => {
  const cases: Array<{ name: string; repair: 'leaks' | 'all'; status: number; fixed: Partial<CheckResult> }> = [
    { name: 'leak.qcow2', repair: 'leaks', status: 0, fixed: { 'leaks-fixed': 1 } },
    { name: 'leak.qcow2', repair: 'all', status: 0, fixed: { 'leaks-fixed': 1 } },
    { name: 'corrupt-refcount.qcow2', repair: 'leaks', status: 1, fixed: {} },
    { name: 'corrupt-refcount.qcow2', repair: 'all', status: 0, fixed: { 'corruptions-fixed': 1 } },
    { name: 'lazy-dirty.qcow2', repair: 'all', status: 0, fixed: {} },
    { name: 'corrupt-l2.qcow2', repair: 'all', status: 2, fixed: {} },
    { name: 'corrupt-flag.qcow2', repair: 'leaks', status: 0, fixed: {} },
  ];
  for (const c of cases) {
    it(`${c.name} -r ${c.repair}`, async () => {
      const dir = tmpDir();
      const img = copyFixture(c.name, dir);
      const orig = copyFixture(c.name, join(dir, 'orig'));
      const r = await runCheck(img, c.repair);
      expect(r.status, r.messages).toBe(c.status);
      if (r.result) expect(r.result).toMatchObject(c.fixed);
      if (c.status === 0) {
        const again = await runCheck(img);
        expect(again.status, again.messages).toBe(0);
        expect(again.messages).toBe('');
        const header = readFileSync(img).subarray(72, 80);
        expect(header.readBigUInt64BE(0) & 3n, 'dirty and corrupt bits cleared').toBe(0n);
      }
      if (r.status !== 1) {
        const same = await compare(orig, img);
        expect(same.identical, 'guest data unchanged').toBe(true);
      }
    });
  }
});
