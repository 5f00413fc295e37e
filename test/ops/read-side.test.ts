// The read-side library API (info, mapImage, BackingChain reads, compare) on the committed samples
// in images/, checked against their saved qemu-img 7.2 oracles (*.info.json, *.info.txt,
// *.chain.json, *.map.json, *.map.txt) and the data patterns images/regenerate.sh wrote.
// Needs no qemu: everything it compares with is committed.
import { createHash } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BackingChain, compare, info, mapImage, QcowError, type ImageInfo } from '../../src/index.js';
import type { MapEntry } from '../../src/chain/chain.js';
import { humanInfo } from '../../src/cli/commands/info.js';
import { qemuJson, sizeToStr } from '../../src/cli/qemu-output.js';
import { MAP_HUMAN_HEADER, mapHumanLine, mapJsonEntry } from '../../src/cli/commands/map.js';
import { fixtureManifest, fixturePath, fixtureText, IMAGES_DIR, sha256, type FixtureSample } from '../helpers/tmp.js';

const K = 1024;
const M = 1024 * K;
const samples = fixtureManifest().samples;
const byName = (n: string): FixtureSample => samples.find((s) => s.name === n)!;

// The oracles were made with cwd = images/ and the relative name: do the same so every path
// (filename, full-backing-filename, map's file column) comes out as qemu-img printed it. The
// gzipped sample is decompressed elsewhere: it is opened by absolute path and the oracle text
// adjusted.
let cwd = '';
beforeAll(() => {
  cwd = process.cwd();
  process.chdir(IMAGES_DIR);
  process.env.TZ = 'UTC'; // snapshot dates print in local time; the oracles are UTC
});
afterAll(() => {
  process.chdir(cwd);
});

/** Path to open and a function turning oracle text into what that path must print. */
function target(s: FixtureSample): { path: string; fix: (text: string) => string } {
  if (!s.file.endsWith('.gz')) return { path: s.name, fix: (t) => t };
  const abs = fixturePath(s.name);
  return { path: abs, fix: (t) => t.split(s.name).join(abs) };
}

const withoutActualSize = (text: string): string =>
  text
    .split('\n')
    .filter((l) => !/^\s*"actual-size": \d+,?$/.test(l) && !l.startsWith('disk size: '))
    .join('\n');

function stripActual<T extends ImageInfo | ImageInfo[]>(v: T): T {
  const c = JSON.parse(JSON.stringify(v)) as T;
  for (const i of Array.isArray(c) ? c : [c]) delete (i as Partial<ImageInfo>)['actual-size'];
  return c;
}

/** The QcowError `f` rejects with (thunks: a promise created early could reject unobserved). */
async function rejection(f: () => Promise<unknown>): Promise<QcowError> {
  const e = await f().then(
    () => undefined,
    (err: unknown) => err,
  );
  expect(e).toBeInstanceOf(QcowError);
  return e as QcowError;
}

// ---------------------------------------------------------------------------------------------

describe('info against the saved qemu-img info oracles', () => {
  const withInfo = samples.filter((s) => s.oracles.info?.status === 0 && s.oracles.info.file);
  it('covers the samples', () => expect(withInfo.length).toBeGreaterThanOrEqual(25));

  it.each(withInfo.map((s) => [s.name, s] as const))('%s: JSON and human output', async (_n, s) => {
    const { path, fix } = target(s);
    const [mine] = await info(path);
    const oracleText = fix(fixtureText(s.oracles.info!.file!));
    expect(stripActual(mine!)).toEqual(stripActual(JSON.parse(oracleText) as ImageInfo));
    // Same text, key order included (QEMU prints its QDict order), apart from the file's allocation.
    expect(withoutActualSize(qemuJson(mine) + '\n')).toBe(withoutActualSize(oracleText));
    expect(withoutActualSize(humanInfo(mine!))).toBe(withoutActualSize(fix(fixtureText(s.oracles.infoText!.file!))));
  });

  const withChain = samples.filter((s) => s.oracles.chain?.status === 0);
  it.each(withChain.map((s) => [s.name, s] as const))('%s: --backing-chain', async (_n, s) => {
    const { path, fix } = target(s);
    const mine = await info(path, { backingChain: true });
    const oracleText = fix(fixtureText(s.oracles.chain!.file!));
    expect(mine.length).toBeGreaterThan(1);
    expect(stripActual(mine)).toEqual(stripActual(JSON.parse(oracleText) as ImageInfo[]));
    expect(withoutActualSize(qemuJson(mine) + '\n')).toBe(withoutActualSize(oracleText));
  });

  it('full-backing-filename keeps the relative spelling QEMU prints', async () => {
    const [top] = await info('chain/sub/top.qcow2');
    expect(top!['backing-filename']).toBe('../mid.qcow2');
    expect(top!['full-backing-filename']).toBe('chain/sub/../mid.qcow2');
    const chain = await info('chain/sub/top.qcow2', { backingChain: true });
    expect(chain.map((i) => i.filename)).toEqual(['chain/sub/top.qcow2', 'chain/sub/../mid.qcow2', 'chain/sub/../base.qcow2']);
  });

  it('reports the flags of the odd samples', async () => {
    expect((await info('lazy-dirty.qcow2'))[0]!['dirty-flag']).toBe(true);
    expect((await info('corrupt-flag.qcow2'))[0]!['format-specific']!.data.corrupt).toBe(true);
    const enc = (await info('encrypted-aes.qcow2'))[0]!;
    expect(enc.encrypted).toBe(true);
    expect(enc['format-specific']!.data.encrypt).toEqual({ format: 'aes' });
    const df = (await info('datafile.qcow2'))[0]!['format-specific']!.data;
    expect([df['data-file'], df['data-file-raw']]).toEqual(['datafile.data', false]);
    const bm = (await info('bitmaps.qcow2'))[0]!['format-specific']!.data.bitmaps;
    expect(bm).toEqual([
      { flags: ['auto'], name: 'b0', granularity: 4096 },
      { flags: ['auto'], name: 'b1', granularity: 65536 },
      { flags: [], name: 'b2', granularity: 4096 },
    ]);
    expect((await info('snapshots.qcow2'))[0]!.snapshots!.map((x) => [x.id, x.name, x['date-sec']])).toEqual([
      ['1', 's1', 1700000000],
      ['2', 's2', 1700000060],
    ]);
  });

  it('sizes print like QEMU size_to_str (%0.3g, ties to even)', () => {
    const cases: [number, string][] = [
      [0, '0 B'], [512, '512 B'], [1536, '1.5 KiB'], [999 * K, '999 KiB'], [1023 * K, '0.999 MiB'],
      [1023488, '1e+03 KiB'], [1152 * K, '1.12 MiB'], [10.25 * M, '10.2 MiB'], [1.375 * 1024 * M, '1.38 GiB'],
      [5 * 1024 ** 4, '5 TiB'], [216 * K, '216 KiB'],
    ];
    for (const [n, s] of cases) expect(sizeToStr(n), String(n)).toBe(s);
  });
});

// ---------------------------------------------------------------------------------------------

async function mapAll(path: string, start?: number, length?: number): Promise<MapEntry[]> {
  const out: MapEntry[] = [];
  await mapImage(path, (e) => out.push(e), { ...(start !== undefined ? { start } : {}), ...(length !== undefined ? { length } : {}) });
  return out;
}

/** What `qcowkit map --output json` prints for these entries. */
const jsonText = (entries: MapEntry[]): string => `[${entries.map(mapJsonEntry).join(',\n')}]\n`;

/** What `qcowkit map` prints on stdout, and whether it then fails (compressed data). */
function humanText(entries: MapEntry[]): { text: string; fails: boolean } {
  let text = MAP_HUMAN_HEADER;
  for (const e of entries) {
    if (e.data && e.offset === undefined) return { text, fails: true };
    text += mapHumanLine(e);
  }
  return { text, fails: false };
}

describe('map against the saved qemu-img map oracles', () => {
  const withMap = samples.filter((s) => s.oracles.map?.status === 0 && !s.flags.includes('datafile'));
  it('covers the samples', () => expect(withMap.length).toBeGreaterThanOrEqual(22));

  it.each(withMap.map((s) => [s.name, s] as const))('%s: JSON and human output', async (_n, s) => {
    const { path, fix } = target(s);
    const entries = await mapAll(path);
    expect(jsonText(entries)).toBe(fix(fixtureText(s.oracles.map!.file!)));
    const human = humanText(entries);
    expect(human.text).toBe(fix(fixtureText(s.oracles.mapText!.file!)));
    expect(human.fails).toBe(s.oracles.mapText!.status === 1);
    if (human.fails) expect(s.oracles.mapText!.stderr).toContain('File contains external, encrypted or compressed clusters.');
  });

  it('windows (--start-offset / --max-length) are the full map clipped', async () => {
    for (const name of ['chain/sub/top.qcow2', 'extl2.qcow2', 'rawback/over.qcow2', 'compressed-zstd.qcow2', 'c512.qcow2', 'zeros.qcow2']) {
      const full = await mapAll(name);
      for (const [start, len] of [[0, 1], [1000, 3000], [64 * K, 64 * K], [100 * K + 7, 1 * M], [300 * K, 5 * M]] as const) {
        const expected = full
          .filter((e) => e.start < start + len && e.start + e.length > start)
          .map((e) => {
            const s = Math.max(e.start, start);
            const end = Math.min(e.start + e.length, start + len);
            return { ...e, start: s, length: end - s, offset: e.offset === undefined ? undefined : e.offset + (s - e.start) };
          })
          .filter((e) => e.length > 0);
        expect(await mapAll(name, start, len), `${name} ${start}+${len}`).toEqual(expected);
      }
    }
  });

  it('depth, present and zero through the chain (chain/sub/top.qcow2)', async () => {
    const e = await mapAll('chain/sub/top.qcow2');
    const at = (off: number) => e.find((x) => x.start <= off && off < x.start + x.length)!;
    expect(at(0)).toMatchObject({ depth: 2, present: true, data: true, filename: 'chain/sub/../base.qcow2' });
    expect(at(64 * K)).toMatchObject({ depth: 1, present: true, data: true, filename: 'chain/sub/../mid.qcow2' });
    expect(at(100 * K)).toMatchObject({ depth: 0, present: true, data: true, filename: 'chain/sub/top.qcow2' });
    expect(at(120 * K)).toMatchObject({ depth: 0, present: true, zero: true, data: false });
    expect(at(192 * K)).toMatchObject({ depth: 1, present: true, zero: true, data: false });
    expect(at(300 * K)).toMatchObject({ depth: 2, present: false, zero: true, data: false });
  });

  it('past the end of a shorter backing file: depth 0, not present (rawback/over.qcow2)', async () => {
    const e = await mapAll('rawback/over.qcow2');
    expect(e.find((x) => x.start <= 256 * K && 256 * K < x.start + x.length)).toMatchObject({ depth: 0, present: false, zero: true, data: false });
    expect(e.find((x) => x.start === 0)).toMatchObject({ depth: 1, present: true, data: true, offset: 0, filename: 'rawback/base.raw' });
  });
});

// ---------------------------------------------------------------------------------------------

type Seg = [start: number, end: number, byte: number | 'random'];

/** Nonzero guest data of each sample (everything else reads as zeros), from images/regenerate.sh. */
const EXPECT: Record<string, Seg[]> = {
  'base.qcow2': [[0, 64 * K, 0x11], [M, M + 4 * K, 0x22], [32 * M, 32 * M + 64 * K, 0x33]],
  'v2.qcow2': [[0, 8 * K, 0x5a], [12 * K, 32 * K, 0x5a], [2 * M, 2 * M + 8 * K, 0x5b]],
  'c512.qcow2': [[0, 512, 0x01], [1536, 2560, 0x02], [3000, 3100, 0x04], [M, 1056768, 0x03], [1057792, 1064960, 0x03], [1065472, M + 64 * K, 0x03]],
  'c2m.qcow2': [[0, 4 * K, 0x21], [3 * M, 3 * M + 64 * K, 0x22]],
  'rc1.qcow2': [[0, 4 * K, 0x31], [8 * K, 16 * K, 0x31], [M, M + 4 * K, 0x32], [6 * M, 6 * M + 8 * K, 0x33]],
  'rc64.qcow2': [[0, 16 * K, 0x41], [2 * M, 2 * M + 4 * K, 0x42], [7 * M, 7 * M + 16 * K, 0x43]],
  // write -z -u [512k,520k) zeroes subclusters; the 2 KiB discard at 528k is ignored by QEMU (not a whole cluster)
  'extl2.qcow2': [[0, 4 * K, 0x11], [8 * K, 10 * K, 0x22], [64 * K, 128 * K, 0x33], [520 * K, 544 * K, 0x44]],
  'lazy.qcow2': [[0, 8 * K, 0x51], [4 * M, 4 * M + 4 * K, 0x52]],
  'lazy-dirty.qcow2': [[0, 16 * K, 0x53]],
  'zeros.qcow2': [[0, 8 * K, 0x61], [16 * K, 24 * K, 0x61], [32 * K, 40 * K, 0x61], [48 * K, 64 * K, 0x61], [4 * M, 4196352, 0x62], [4197376, 4 * M + 8 * K, 0x62]],
  'compressed-zlib.qcow2': [[0, 128 * K, 0x71], [192 * K, 196 * K, 0x72], [256 * K, 320 * K, 'random'], [512 * K, 576 * K, 0x73]],
  'compressed-zstd.qcow2': [[0, 128 * K, 0x71], [192 * K, 196 * K, 0x72], [256 * K, 320 * K, 'random'], [512 * K, 576 * K, 0x73]],
  'chain/base.qcow2': [[0, 128 * K, 0x01], [6 * M, 6 * M + 16 * K, 0x04]],
  'chain/mid.qcow2': [[0, 64 * K, 0x01], [64 * K, 128 * K, 0x02], [M, M + 4 * K, 0x05], [6 * M, 6 * M + 16 * K, 0x04]],
  'chain/sub/top.qcow2': [[0, 64 * K, 0x01], [64 * K, 100 * K, 0x02], [100 * K, 110 * K, 0x03], [110 * K, 120 * K, 0x02], [124 * K, 128 * K, 0x02], [M, M + 4 * K, 0x05], [6 * M + 4 * K, 6 * M + 16 * K, 0x04]],
  'rawback/base.raw': [[0, 64 * K, 0x81], [64 * K, 68 * K, 0x82], [68 * K, 128 * K, 0x81]],
  'rawback/over.qcow2': [
    [0, 8 * K, 0x81], [8 * K, 12 * K, 0x83], [12 * K, 16 * K, 0x81], [24 * K, 32 * K, 0x81], [36 * K, 64 * K, 0x81], [64 * K, 68 * K, 0x82],
    [68 * K, 98816, 0x81], [98816, 99840, 0x84], [99840, 128 * K, 0x81], [512 * K, 516 * K, 0x85],
  ],
  'bitmaps.qcow2': [[0, 32 * K, 0x91], [36 * K, 64 * K, 0x91], [M, M + 8 * K, 0x92], [8 * M + 4 * K, 8 * M + 8 * K, 0x93]],
  'snapshots.qcow2': [[0, 4 * K, 0xc1], [4 * K, 8 * K, 0xb1], [8 * K, 16 * K, 0xa1], [2 * M, 2 * M + 4 * K, 0xc2], [2 * M + 4 * K, 2 * M + 8 * K, 0xb2]],
  'leak.qcow2': [[0, 4 * K, 0xd1], [M, M + 4 * K, 0xd2]],
  'corrupt-refcount.qcow2': [[0, 8 * K, 0xe1], [M, M + 4 * K, 0xe2]],
  // guest 1M points past the end of the file: zeros
  'corrupt-l2.qcow2': [[0, 8 * K, 0xe3]],
  // truncated to 30000 bytes: the cluster holding guest [8k,12k) keeps 1328 bytes, 1M's data is gone
  'truncated.qcow2': [[0, 8 * K + 1328, 0x61]],
  'corrupt-flag.qcow2': [[0, 4 * K, 0x12]],
  'datafile.data': [[0, 8 * K, 0x77], [64 * K, 68 * K, 0x78]],
};

/** patch.mjs fill-random: SHA-256 counter stream of a seed. */
function randomStream(len: number, seed: string): Uint8Array {
  const out = Buffer.alloc(len);
  for (let i = 0, pos = 0; pos < len; i++) pos += createHash('sha256').update(`${seed}:${i}`).digest().copy(out, pos);
  return out;
}

describe('guest data', () => {
  it('every readable sample has an expectation', () => {
    const readable = samples.filter((s) => s.oracles.map?.status === 0 || s.format === 'raw').map((s) => s.name).filter((n) => n !== 'datafile.qcow2');
    expect(Object.keys(EXPECT).sort()).toEqual(readable.sort());
  });

  it.each(Object.entries(EXPECT))('%s reads as written', async (name, segs) => {
    const chain = await BackingChain.open(target(byName(name)).path);
    try {
      const size = chain.virtualSize;
      const oracle = byName(name).oracles.info?.file;
      if (oracle) expect(size).toBe((JSON.parse(fixtureText(oracle)) as ImageInfo)['virtual-size']);
      const expected = new Uint8Array(size);
      for (const [s, e, b] of segs) expected.set(b === 'random' ? randomStream(e - s, 'compressed') : new Uint8Array(e - s).fill(b), s);
      const CH = 4 * M;
      for (let pos = 0; pos < size; pos += CH) {
        const got = await chain.readBytes(pos, Math.min(CH, size - pos));
        const want = expected.subarray(pos, pos + got.length);
        if (!Buffer.from(got).equals(Buffer.from(want))) {
          const i = got.findIndex((v, j) => v !== want[j]);
          expect.fail(`${name}: byte ${pos + i} is 0x${got[i]!.toString(16)}, expected 0x${want[i]!.toString(16)}`);
        }
      }
      // Unaligned reads, reads crossing extents and reads past the end (zeros).
      for (const [off, len] of [[1, 100], [511, 2], [4095, 4098], [98000, 3000], [size - 3, 10], [size + 5, 7]] as const) {
        const got = await chain.readBytes(off, len);
        const want = new Uint8Array(len);
        want.set(expected.subarray(Math.min(off, size), Math.min(off + len, size)));
        expect(Buffer.from(got).equals(Buffer.from(want)), `${name} [${off},+${len})`).toBe(true);
      }
    } finally {
      await chain.close();
    }
  });

  it('reads starting inside a compressed cluster', async () => {
    for (const name of ['compressed-zlib.qcow2', 'compressed-zstd.qcow2']) {
      const chain = await BackingChain.open(name);
      try {
        expect([...(await chain.readBytes(192 * K + 100, 4))]).toEqual([0x72, 0x72, 0x72, 0x72]);
        expect([...(await chain.readBytes(512 * K + 60000, 2))]).toEqual([0x73, 0x73]);
        expect(Buffer.from(await chain.readBytes(300 * K, 1000)).equals(randomStream(320 * K, 'compressed').subarray(44 * K, 44 * K + 1000))).toBe(true);
      } finally {
        await chain.close();
      }
    }
  });

  it('a snapshot does not change what the active layer reads', async () => {
    const chain = await BackingChain.open('snapshots.qcow2');
    try {
      expect([...(await chain.readBytes(M, 2))]).toEqual([0, 0]); // discarded after s1 wrote 0xa2 there
    } finally {
      await chain.close();
    }
  });
});

// ---------------------------------------------------------------------------------------------

describe('compare on the samples (results checked once with qemu-img compare 7.2)', () => {
  const cases: [a: string, b: string, strict: boolean, expected: string][] = [
    ['base.qcow2', 'base.qcow2', false, 'identical'],
    ['base.qcow2', 'base.qcow2', true, 'identical'],
    ['extl2.qcow2', 'extl2.qcow2', true, 'identical'],
    ['chain/sub/top.qcow2', 'chain/sub/top.qcow2', true, 'identical'],
    ['compressed-zlib.qcow2', 'compressed-zstd.qcow2', false, 'identical'],
    ['compressed-zlib.qcow2', 'compressed-zstd.qcow2', true, 'status 212992'],
    ['chain/sub/top.qcow2', 'chain/mid.qcow2', false, 'content 102400'],
    ['chain/sub/top.qcow2', 'chain/mid.qcow2', true, 'content 102400'],
    ['chain/mid.qcow2', 'chain/base.qcow2', true, 'content 65536'],
    ['rawback/over.qcow2', 'rawback/base.raw', false, 'content 8192'],
    ['rawback/base.raw', 'rawback/over.qcow2', false, 'content 8192'],
    ['rawback/over.qcow2', 'rawback/base.raw', true, 'size'],
    ['lazy.qcow2', 'lazy-dirty.qcow2', false, 'content 0'],
    ['corrupt-refcount.qcow2', 'corrupt-l2.qcow2', true, 'content 0'],
    ['zeros.qcow2', 'bitmaps.qcow2', true, 'content 0'],
    ['datafile.data', 'rawback/base.raw', true, 'content 0'],
  ];
  it.each(cases)('%s vs %s (strict %s): %s', async (a, b, strict, expected) => {
    const r = await compare(a, b, { strict });
    const got = r.identical ? 'identical' : r.reason === 'size' ? 'size' : `${r.reason} ${r.offset}`;
    expect(got).toBe(expected);
  });
});

// ---------------------------------------------------------------------------------------------

describe('samples qcowkit refuses or qemu-img rejects', () => {
  it('unknown incompatible feature: info and map fail like QEMU', async () => {
    expect(byName('unknown-incompat.qcow2').oracles.info!.stderr).toContain('Unknown incompatible feature: 80');
    for (const p of [() => info('unknown-incompat.qcow2'), () => mapAll('unknown-incompat.qcow2'), () => BackingChain.open('unknown-incompat.qcow2')]) {
      const e = await rejection(p);
      expect(e.code).toBe('UNSUPPORTED');
      expect(e.message).toContain('Unknown incompatible feature: 80');
      expect(e.file).toBe('unknown-incompat.qcow2');
    }
  });

  it('backing loop: info works, the chain fails fast (qemu-img map/check hang)', async () => {
    expect((await info('loop/a.qcow2'))[0]!['backing-filename']).toBe('b.qcow2');
    const t = Date.now();
    for (const p of [() => mapAll('loop/a.qcow2'), () => info('loop/b.qcow2', { backingChain: true }), () => compare('loop/a.qcow2', 'base.qcow2'), () => BackingChain.open('loop/a.qcow2')]) {
      const e = await rejection(p);
      expect(e.code).toBe('BACKING_LOOP');
      expect(e.message).toMatch(/loop/);
    }
    expect(Date.now() - t).toBeLessThan(5000);
  });

  it('encrypted: info only; reading data is refused', async () => {
    for (const p of [() => mapAll('encrypted-aes.qcow2'), () => BackingChain.open('encrypted-aes.qcow2'), () => compare('encrypted-aes.qcow2', 'base.qcow2')]) {
      const e = await rejection(p);
      expect(e.code).toBe('UNSUPPORTED');
      expect(e.message).toMatch(/encrypt/);
    }
  });

  it('external data file: info only; map and reads are refused (qemu-img can map it)', async () => {
    for (const p of [() => mapAll('datafile.qcow2'), () => BackingChain.open('datafile.qcow2'), () => compare('base.qcow2', 'datafile.qcow2')]) {
      const e = await rejection(p);
      expect(e.code).toBe('UNSUPPORTED');
      expect(e.message).toMatch(/external data file/);
    }
  });

  it('no sample was modified by the tests of this file', () => {
    for (const s of samples) expect(sha256(s.file.endsWith('.gz') ? fixturePath(s.name) : s.file), s.name).toBe(s.sha256);
  });
});
