// The write engine (Qcow2Writer through openChain's writable layers) against a model of the guest
// disk: random writes, zero writes (with and without unmap), discards and partial-cluster writes
// and whole-cluster compressed writes on images made by qemu-img/qemu-io — v2/v3, 512 B to 2 MiB clusters, refcount widths 1..64,
// extended L2, compressed clusters, internal snapshots (shared L2 tables and data), with and
// without a backing file. Afterwards qemu-img check is clean, QEMU reads exactly the model's
// bytes, and snapshot data is untouched.
import { readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { expect, it } from 'vitest';
import { openChain } from '../../src/index.js';
import { isWritable } from '../../src/chain/layer.js';
import { describeQemu, qemuImg, qemuIo } from '../helpers/qemu.js';
import { tmpDir } from '../helpers/tmp.js';
import { prng } from '../helpers/prng.js';

const K = 1024;
const M = 1024 * K;

interface Case {
  name: string;
  opts: string;
  size: number;
  backing?: boolean;
  snapshot?: boolean;
  compressed?: boolean;
  ops: number;
}

const CASES: Case[] = [
  { name: 'v3 64k', opts: 'cluster_size=64k', size: 64 * M, ops: 60 },
  { name: 'v3 64k over a backing file', opts: 'cluster_size=64k', size: 64 * M, backing: true, ops: 60 },
  { name: 'v2 64k over a backing file', opts: 'compat=0.10,cluster_size=64k', size: 32 * M, backing: true, ops: 40 },
  { name: 'v2 4k no backing', opts: 'compat=0.10,cluster_size=4k', size: 16 * M, ops: 40 },
  { name: 'v3 512 B clusters, refcount_bits=1', opts: 'cluster_size=512,refcount_bits=1', size: 12 * M, ops: 40 },
  { name: 'v3 2M clusters, refcount_bits=64', opts: 'cluster_size=2M,refcount_bits=64', size: 64 * M, backing: true, ops: 30 },
  { name: 'v3 extended L2 over a backing file', opts: 'cluster_size=128k,extended_l2=on', size: 64 * M, backing: true, ops: 60 },
  { name: 'v3 extended L2, no backing', opts: 'cluster_size=64k,extended_l2=on', size: 32 * M, ops: 40 },
  { name: 'v3 with a snapshot (shared tables)', opts: 'cluster_size=64k', size: 32 * M, backing: true, snapshot: true, ops: 50 },
  { name: 'v3 compressed clusters', opts: 'cluster_size=64k', size: 32 * M, compressed: true, ops: 50 },
  { name: 'v3 refcount_bits=8, 1k clusters', opts: 'cluster_size=1k,refcount_bits=8', size: 16 * M, ops: 40 },
  // A refcount block covers 32 KiB and the first table 2 MiB: new blocks and table growth.
  { name: 'v3 512 B clusters, refcount_bits=64 (refcount table grows)', opts: 'cluster_size=512,refcount_bits=64', size: 16 * M, ops: 40 },
];

function must(r: { status: number; stderr: string; stdout: string }, what: string): void {
  if (r.status !== 0) throw new Error(`${what} failed (${r.status}): ${r.stdout}${r.stderr}`);
}

function rawOf(dir: string, image: string): Buffer {
  const out = join(dir, `raw-${Math.random().toString(36).slice(2)}`);
  must(qemuImg(['convert', '-O', 'raw', image, out]), 'convert');
  return readFileSync(out);
}

describeQemu('write engine against a model of the guest disk', () => {
  it.each(CASES)('$name', async (c) => {
    const dir = tmpDir();
    const rnd = prng(c.name.length * 7919 + c.ops);
    const int = (n: number) => Math.floor(rnd() * n);
    const top = join(dir, 'top.qcow2');
    if (c.backing) {
      const base = join(dir, 'base.qcow2');
      must(qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=64k', base, String(c.size)]), 'create base');
      must(qemuIo(base, ['write -P 0x5a 0 ' + Math.min(c.size, 8 * M), `write -P 0x6b ${c.size / 2} 1M`]), 'fill base');
      must(qemuImg(['create', '-q', '-f', 'qcow2', '-o', c.opts, '-b', 'base.qcow2', '-F', 'qcow2', top]), 'create top');
    } else {
      must(qemuImg(['create', '-q', '-f', 'qcow2', '-o', c.opts, top, String(c.size)]), 'create top');
    }
    const prep = ['write -P 0x11 0 300k', `write -P 0x22 ${2 * M} 1M`, `write -z ${4 * M - 64 * K} 192k`];
    if (c.compressed) prep.push(`write -c -P 0x33 ${6 * M} 256k`, `write -c -P 0x44 ${8 * M + 64 * K} 64k`);
    must(qemuIo(top, prep), 'prepare top');
    let snapData: Buffer | undefined;
    if (c.snapshot) {
      must(qemuImg(['snapshot', '-c', 'snap1', top]), 'snapshot');
      snapData = rawOf(dir, top);
    }
    const model = rawOf(dir, top);
    const below = c.backing ? rawOf(dir, join(dir, 'base.qcow2')) : Buffer.alloc(c.size);
    const cs = Number(/cluster_size=(\d+)([kM]?)/.exec(c.opts)![1]) * ({ k: K, M: M, '': 1 } as Record<string, number>)[/cluster_size=\d+([kM]?)/.exec(c.opts)![1]!]!;
    const unit = c.opts.includes('extended_l2=on') ? cs / 32 : cs;

    const chain = await openChain(top, { write: [0] });
    try {
      const layer = chain.top;
      expect(isWritable(layer)).toBe(true);
      if (!isWritable(layer)) return;
      const img = layer as typeof layer & { discard(o: number, l: number): Promise<void> };
      // First over what qemu-io prepared (data, zero clusters, compressed clusters, snapshot-shared
      // clusters), then anywhere.
      const targeted: Array<[number, number, number]> = [
        [0, 100, 70 * K],
        [6, 2 * M + 64 * K, 192 * K],
        [9, 2 * M + 300 * K, 300 * K],
        [0, 4 * M - 64 * K - 100, 5000],
        [0, 6 * M + 1000, 70 * K],
        [8, 8 * M, 192 * K],
        [7, 6 * M + 128 * K, 64 * K],
        [0, 150 * K, 8],
      ];
      for (let i = 0; i < c.ops + targeted.length; i++) {
        const t = targeted[i];
        const kind = t ? t[0] : int(12);
        // Lengths from a few bytes to a few clusters, often unaligned.
        const len = t ? t[2] : 1 + int(int(4) === 0 ? 3 * M : 200 * K);
        const off = t ? t[1] : Math.min(c.size - len, int(c.size));
        if (kind === 5 && !t) {
          // A batch of disjoint writes (writeMany), some sharing clusters and tables.
          const n = 1 + int(8);
          const starts = Array.from({ length: n }, () => int(c.size - 1)).sort((a, b) => a - b);
          const items: Array<{ offset: number; data: Uint8Array }> = [];
          starts.forEach((st, j) => {
            const limit = (starts[j + 1] ?? c.size) - st;
            const l = Math.min(limit, 1 + int(int(2) ? 70 * K : 600 * K));
            if (l <= 0) return;
            const d = Buffer.alloc(l, 1 + int(255));
            items.push({ offset: st, data: d });
          });
          await (img as unknown as { writeMany(i: typeof items): Promise<void> }).writeMany(items);
          for (const it of items) Buffer.from(it.data).copy(model, it.offset);
        } else if (kind < 6) {
          const data = Buffer.alloc(len, 1 + int(255));
          if (int(3) === 0) for (let j = 0; j < len; j += 997) data[j] = int(256);
          await img.write(off, data);
          data.copy(model, off);
        } else if (kind < 9) {
          const unmap = kind === 8;
          await img.writeZeroes(off, len, { unmap });
          model.fill(0, off, off + len);
        } else if (kind >= 10) {
          // A whole cluster compressed (packed after the previous one; replaces any mapping).
          const at = Math.floor(off / cs) * cs;
          const data = Buffer.alloc(cs, 1 + int(255));
          for (let j = 0; j < cs; j += 1 + int(97)) data[j] = int(256);
          await (img as unknown as { writeCompressed(o: number, d: Uint8Array): Promise<void> }).writeCompressed(at, data);
          data.copy(model, at, 0, Math.min(cs, c.size - at));
        } else {
          // A discard drops whole units: what reads afterwards is the backing's data there.
          await img.discard(off, len);
          const a = Math.ceil(off / unit) * unit;
          let b = Math.floor((off + len) / unit) * unit;
          if (off + len === c.size) b = c.size;
          if (b > a) below.copy(model, a, a, b);
        }
      }
      await chain.close();
    } catch (e) {
      await chain.close().catch(() => {});
      throw e;
    }
    const check = qemuImg(['check', top]);
    expect(check.status, check.stdout + check.stderr).toBe(0);
    // Some of the compressed writes survive the later ops (the ones qemu-io made don't count here).
    if (!c.compressed) expect(check.stdout).not.toMatch(/ 0\.00% compressed clusters/);
    const got = rawOf(dir, top);
    expect(got.length).toBe(model.length);
    const diff = got.findIndex((b, i) => b !== model[i]);
    expect(diff, `first difference at ${diff}`).toBe(-1);
    if (snapData) {
      const restored = join(dir, 'restored.qcow2');
      must(qemuImg(['convert', '-O', 'qcow2', '-l', 'snap1', top, restored]), 'convert snapshot');
      expect(Buffer.compare(rawOf(dir, restored), snapData)).toBe(0);
    }
  });

  // The engine grows the file ahead of its allocations (fewer size changes under direct writes)
  // and cuts what it did not use when it closes: the file ends at the image's last cluster.
  it.each([
    ['64k clusters', 'cluster_size=64k', 256 * M, 40 * M],
    ['512 B clusters, refcount_bits=64 (refcount table grows into the grown part)', 'cluster_size=512,refcount_bits=64', 64 * M, 6 * M],
  ])('the file ends at the image end after writes: %s', async (_name, opts, size, bytes) => {
    const dir = tmpDir();
    const top = join(dir, 'top.qcow2');
    must(qemuImg(['create', '-q', '-f', 'qcow2', '-o', opts, top, String(size)]), 'create');
    const chain = await openChain(top, { write: [0] });
    try {
      const layer = chain.top;
      if (!isWritable(layer)) throw new Error('not writable');
      const data = new Uint8Array(bytes).fill(0x5c);
      // Scattered pieces, several batches.
      const items = [0, 3, 7].map((k) => ({ offset: (k * size) / 8, data: data.subarray(0, bytes / 3) }));
      await layer.writeMany(items);
      await layer.write(size - 4096, data.subarray(0, 4096));
    } finally {
      await chain.close();
    }
    const check = qemuImg(['check', '--output=json', top]);
    expect(check.status, check.stdout + check.stderr).toBe(0);
    const end = (JSON.parse(check.stdout) as { 'image-end-offset': number })['image-end-offset'];
    expect(statSync(top).size).toBe(end);
  });
});
