/**
 * Deterministic mutation fuzzing of the bad-input rules: every mutant of a small valid image must
 * give either a result or a QcowError (never another exception or a hang), must be left
 * byte-identical by read-only commands, and the CLI must answer with one `qcowkit: FILE: ...` line.
 */
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { QcowError, info, mapImage, compare, BackingChain } from '../../src/index.js';
import { prng } from '../helpers/prng.js';

const root = resolve(__dirname, '../..');
const dir = mkdtempSync(join(tmpdir(), 'qcowkit-fuzz-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const sha = (f: string): string => createHash('sha256').update(readFileSync(f)).digest('hex');

/** Seeds: committed fixtures (always present) — valid images of several shapes. */
function seeds(): string[] {
  const names = ['base.qcow2', 'v2.qcow2', 'extl2.qcow2', 'compressed-zlib.qcow2', 'compressed-zstd.qcow2', 'snapshots.qcow2', 'bitmaps.qcow2', 'c512.qcow2', 'rc1.qcow2', 'rc64.qcow2'];
  return names.map((n) => join(root, 'images', n)).filter((p) => existsSync(p));
}

type Mutation = { name: string; apply(b: Buffer, rnd: () => number): Buffer };

const be64 = (b: Buffer, off: number, v: bigint) => b.writeBigUInt64BE(v, off);
const HEADER_FIELDS: [string, number, number][] = [
  ['version', 4, 4], ['backing_file_offset', 8, 8], ['backing_file_size', 16, 4], ['cluster_bits', 20, 4], ['size', 24, 8],
  ['crypt_method', 32, 4], ['l1_size', 36, 4], ['l1_table_offset', 40, 8], ['refcount_table_offset', 48, 8],
  ['refcount_table_clusters', 56, 4], ['nb_snapshots', 60, 4], ['snapshots_offset', 64, 8], ['incompatible', 72, 8],
  ['autoclear', 88, 8], ['refcount_order', 96, 4], ['header_length', 100, 4],
];
const ABSURD = [0n, 1n, 0x1ffn, 0x200n, 0xffffffffn, 0x7fffffffffffffffn, 0xffffffffffffffffn, 1n << 40n, 1n << 56n];

function mutations(): Mutation[] {
  const out: Mutation[] = [];
  for (const [name, off, size] of HEADER_FIELDS)
    for (const v of ABSURD)
      out.push({
        name: `${name}=${v}`,
        apply: (b) => {
          if (size === 8) be64(b, off, v);
          else b.writeUInt32BE(Number(v & 0xffffffffn), off);
          return b;
        },
      });
  for (const frac of [0, 0.001, 0.1, 0.3, 0.5, 0.9, 0.999])
    out.push({ name: `truncate ${frac}`, apply: (b) => b.subarray(0, Math.floor(b.length * frac)) });
  for (let i = 0; i < 60; i++)
    out.push({
      name: `random bytes #${i}`,
      apply: (b, rnd) => {
        // Most of the metadata of these small images lives in the first clusters.
        const span = Math.min(b.length, 1 << (12 + (i % 8)));
        for (let n = 0; n < 1 + (i % 16); n++) b[Math.floor(rnd() * span)] = Math.floor(rnd() * 256);
        return b;
      },
    });
  for (let i = 0; i < 20; i++)
    out.push({
      name: `random u64 #${i}`,
      apply: (b, rnd) => {
        const at = Math.floor((rnd() * Math.min(b.length, 1 << 18)) / 8) * 8;
        if (at + 8 <= b.length) be64(b, at, ABSURD[i % ABSURD.length]! | BigInt(Math.floor(rnd() * 2 ** 20)) << 9n);
        return b;
      },
    });
  return out;
}

async function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<never>((_, rej) => (timer = setTimeout(() => rej(new Error(`HANG: ${what}`)), ms)));
  try {
    return await Promise.race([p, t]);
  } finally {
    clearTimeout(timer);
  }
}

const outcomes = { ok: 0, refused: 0 };

/** Runs an operation; passes when it succeeds or fails with a QcowError naming a file. */
async function expectCleanOutcome(what: string, op: () => Promise<unknown>): Promise<void> {
  try {
    await withTimeout(op(), 20_000, what);
    outcomes.ok++;
  } catch (e) {
    if (!(e instanceof QcowError)) throw new Error(`${what}: unexpected ${(e as Error)?.stack ?? String(e)}`);
    expect(e.message.length, what).toBeGreaterThan(0);
    expect(e.file, `${what}: error names no file`).toBeTruthy();
    outcomes.refused++;
  }
}

const all = seeds();
const muts = mutations();

describe.skipIf(all.length === 0)('mutation fuzz (library)', () => {
  it(`${all.length} seeds x ${muts.length} mutations: info, map, read, compare give a result or a QcowError and leave the file untouched`, async () => {
    let n = 0;
    for (const [si, seed] of all.entries()) {
      const original = readFileSync(seed);
      for (const [mi, m] of muts.entries()) {
        const rnd = prng(si * 1000 + mi);
        const file = join(dir, `m-${si}-${mi}.qcow2`);
        writeFileSync(file, m.apply(Buffer.from(original), rnd));
        const before = sha(file);
        const what = `${seed} / ${m.name}`;
        await expectCleanOutcome(`info ${what}`, () => info(file, { format: 'qcow2' }));
        await expectCleanOutcome(`map ${what}`, () => mapImage(file, () => {}, { format: 'qcow2' }));
        await expectCleanOutcome(`read ${what}`, async () => {
          const c = await BackingChain.open(file, { format: 'qcow2' });
          try {
            await c.read(0, new Uint8Array(Math.min(c.virtualSize, 4 << 20)));
          } finally {
            await c.close();
          }
        });
        await expectCleanOutcome(`compare ${what}`, () => compare(file, seed, { format1: 'qcow2', format2: 'qcow2' }));
        expect(sha(file), `${what} was modified`).toBe(before);
        n++;
      }
    }
    expect(n).toBe(all.length * muts.length);
    // The mutations must really exercise both paths: many refused, many still readable.
    expect(outcomes.refused).toBeGreaterThan(n / 4);
    expect(outcomes.ok).toBeGreaterThan(n / 4);
  });
});

describe.skipIf(all.length === 0 || !existsSync(join(root, 'dist/cli/main.js')))('mutation fuzz (CLI)', () => {
  it('errors are one line naming the file, with exit code 1 and no stack trace', () => {
    const seed = all[0]!;
    const cases = muts.filter((_, i) => i % 7 === 0);
    for (const [i, m] of cases.entries()) {
      const file = join(dir, `cli-${i}.qcow2`);
      writeFileSync(file, m.apply(Buffer.from(readFileSync(seed)), prng(i)));
      const before = sha(file);
      for (const cmd of [['info'], ['map', '--output', 'json'], ['check']]) {
        const r = spawnSync(process.execPath, [join(root, 'bin/qcowkit.js'), ...cmd, '-f', 'qcow2', file], { encoding: 'utf8', timeout: 30_000 });
        expect(r.error, `${cmd[0]} ${m.name} hung`).toBeUndefined();
        expect(r.stderr, `${cmd[0]} ${m.name}`).not.toMatch(/\n\s+at /);
        if (r.status !== 0 && cmd[0] !== 'check') {
          const lines = r.stderr.trim().split('\n').filter((l) => !l.startsWith('qcowkit: warning'));
          expect(lines, `${cmd[0]} ${m.name}: ${r.stderr}`).toHaveLength(1);
          expect(lines[0]).toMatch(new RegExp(`^qcowkit: ${file.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: `));
          expect(r.status).toBe(1);
        }
      }
      expect(sha(file), `${m.name} was modified`).toBe(before);
    }
  });
});

