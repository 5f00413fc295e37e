// commit and make-empty beyond the data path (which commit-matrix covers): qemu-img's -b matching
// and errors, dry runs that write nothing, refusals that leave every file byte-identical (corrupt
// overlay, image in use, no backing file), abort between chunks and a rerun that completes, and
// the space make-empty gives back.
import { statSync, openSync, readSync, writeSync, closeSync } from 'node:fs';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { expect, it } from 'vitest';
import { commit, makeEmpty, QcowError } from '../../src/index.js';
import { describeQemu, qemuImg, qemuIo } from '../helpers/qemu.js';
import { runCli } from '../helpers/cli.js';
import { sha256, tmpDir } from '../helpers/tmp.js';

const M = 1024 * 1024;

function must(r: { status: number; stderr: string; stdout: string }, what: string): void {
  if (r.status !== 0) throw new Error(`${what} failed (${r.status}): ${r.stdout}${r.stderr}`);
}

/** base <- mid <- sub/top with data in each layer; names relative as qemu-img writes them. */
function chain3(dir: string): { base: string; mid: string; top: string } {
  const base = join(dir, 'base.qcow2');
  const mid = join(dir, 'mid.qcow2');
  const top = join(dir, 'top.qcow2');
  must(qemuImg(['create', '-q', '-f', 'qcow2', base, '32M']), 'base');
  must(qemuIo(base, ['write -P 1 0 4M']), 'base data');
  must(qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', mid]), 'mid');
  must(qemuIo(mid, ['write -P 2 1M 2M', 'write -z 8M 1M']), 'mid data');
  must(qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', top]), 'top');
  must(qemuIo(top, ['write -P 3 2M 1M', 'write -P 0 12M 2M', 'write -P 4 20M 3M']), 'top data');
  return { base, mid, top };
}

function hashes(...files: string[]): string[] {
  return files.map((f) => sha256(f));
}

describeQemu('commit and make-empty: behaviour', () => {
  it('commits into the immediate backing file, then empties the top; the chain reads the same', async () => {
    const dir = tmpDir();
    const { base, mid, top } = chain3(dir);
    const before = qemuImg(['convert', '-O', 'raw', top, join(dir, 'before.raw')]);
    must(before, 'convert');
    const r = await commit(top);
    expect(r.baseDepth).toBe(1);
    expect(r.base).toBe(mid);
    // 2 MiB of zero data at 12M reached the base as zeroes, not data.
    expect(r.zeroBytes).toBeGreaterThanOrEqual(2 * M);
    expect(r.dataBytes).toBe(4 * M);
    expect(r.emptied).toBeDefined();
    for (const f of [base, mid, top]) expect(qemuImg(['check', f]).status, f).toBe(0);
    must(qemuImg(['convert', '-O', 'raw', top, join(dir, 'after.raw')]), 'convert');
    expect(sha256(join(dir, 'after.raw'))).toBe(sha256(join(dir, 'before.raw')));
    const map = JSON.parse(qemuImg(['map', '--output=json', top]).stdout) as Array<{ depth: number; present: boolean }>;
    expect(map.filter((e) => e.depth === 0 && e.present)).toEqual([]);
  });

  it('a short base with its own backing file grows reading zeros, not its backing data (iotest 274)', async () => {
    const dir = tmpDir();
    const base = join(dir, 'base.qcow2');
    const mid = join(dir, 'mid.qcow2');
    const top = join(dir, 'top.qcow2');
    must(qemuImg(['create', '-q', '-f', 'qcow2', base, '2M']), 'base');
    must(qemuIo(base, ['write -P 1 0 2M']), 'base data');
    must(qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', mid, '1M']), 'mid');
    must(qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', top, '2M']), 'top');
    must(qemuIo(top, ['write -P 2 0 512k']), 'top data');
    await commit(top);
    expect(qemuImg(['check', mid]).status).toBe(0);
    const r = qemuIo(mid, ['read -P 2 0 512k', 'read -P 1 512k 512k', 'read -P 0 1M 1M']);
    expect(r.status, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).not.toContain('verification failed');
  });

  it('a top holding only zero clusters and discards commits them as zeroes (iotests 274, 313)', async () => {
    const dir = tmpDir();
    const base = join(dir, 'base.qcow2');
    const top = join(dir, 'top.qcow2');
    must(qemuImg(['create', '-q', '-f', 'qcow2', base, '8M']), 'base');
    must(qemuIo(base, ['write -P 7 0 8M']), 'base data');
    must(qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top]), 'top');
    must(qemuIo(top, ['write -z 1M 1M', 'discard 4M 64k', 'write -z -u 6M 128k']), 'top zeroes');
    must(qemuImg(['convert', '-O', 'raw', top, join(dir, 'before.raw')]), 'convert');
    const r = await commit(top);
    expect(r.dataBytes).toBe(0);
    expect(r.zeroBytes).toBeGreaterThanOrEqual(M);
    for (const f of [base, top]) expect(qemuImg(['check', f]).status, f).toBe(0);
    must(qemuImg(['convert', '-O', 'raw', top, join(dir, 'after.raw')]), 'convert');
    expect(sha256(join(dir, 'after.raw'))).toBe(sha256(join(dir, 'before.raw')));
  });

  it('-p prints qemu-img\'s progress line on stdout, and on stderr with --output json (stdout stays JSON)', () => {
    const dir = tmpDir();
    const { top, mid } = chain3(dir);
    const q = qemuImg(['commit', '-p', '-d', join(dir, 'top.qcow2')]);
    must(q, 'qemu-img commit -p');
    const cli = runCli(['commit', '-p', '-d', top]);
    expect(cli.status, cli.stderr).toBe(0);
    for (const out of [q.stdout, cli.stdout]) {
      expect(out.startsWith('    (0.00/100%)\r')).toBe(true);
      expect(out.endsWith('    (100.00/100%)\r\nImage committed.\n')).toBe(true);
    }
    const json = runCli(['commit', '-p', '-d', '--output', 'json', top]);
    expect(json.status, json.stderr).toBe(0);
    expect((JSON.parse(json.stdout) as { base: string }).base).toBe(mid);
    expect(json.stderr).toContain('(100.00/100%)');
  });

  it('-b matches a stored backing name or a path relative to the referring image; -b implies -d', async () => {
    const dir = tmpDir();
    const { base, mid, top } = chain3(dir);
    const topHash = sha256(top);
    const r = await commit(top, { base: 'base.qcow2' });
    expect(r.baseDepth).toBe(2);
    expect(r.emptied).toBeUndefined();
    expect(sha256(top)).toBe(topHash);
    expect(qemuImg(['compare', top, base]).status).toBe(0);
    expect(qemuImg(['check', mid]).status).toBe(0);
    await expect(commit(top, { base: 'nothere.qcow2' })).rejects.toThrow(/Did not find 'nothere.qcow2' in the backing chain/);
    const cli = runCli(['commit', '-b', 'nothere.qcow2', top]);
    expect(cli.status).toBe(1);
    expect(cli.stderr.trim().split('\n')).toHaveLength(1);
    await expect(commit(base)).rejects.toThrow(/does not have a backing file/);
  });

  it('--dry-run writes nothing and reports what the real run then does', async () => {
    const dir = tmpDir();
    const { base, mid, top } = chain3(dir);
    const h = hashes(base, mid, top);
    const dry = await commit(top, { dryRun: true });
    expect(hashes(base, mid, top)).toEqual(h);
    const midBefore = statSync(mid).size;
    const real = await commit(top);
    expect(dry.baseGrowth).toBeGreaterThanOrEqual(statSync(mid).size - midBefore);
    expect(real.allocatedBytes).toBe(dry.allocatedBytes);
    expect(real.dataBytes + real.zeroBytes).toBe(dry.dataBytes + dry.zeroBytes);
    // What the emptying dropped: counted from the plan in the real run, by a status walk in the dry run.
    expect(real.emptied!.droppedBytes).toBeGreaterThan(0);
    expect(real.emptied!.droppedBytes).toBe(dry.emptied!.droppedBytes);
    // The dry run counts zero data as data (it reads nothing): it never underestimates.
    expect(dry.dataBytes).toBeGreaterThanOrEqual(real.dataBytes);
    const cli = runCli(['commit', '--dry-run', '--output', 'json', top]);
    expect(cli.status).toBe(0);
    expect(JSON.parse(cli.stdout).dryRun).toBe(true);
  });

  it("the growth estimate (free-space check, --dry-run) counts the base's bitmaps: stored again when marked dirty and when grown", async () => {
    for (const grows of [false, true]) {
      const dir = tmpDir();
      const base = join(dir, 'base.qcow2');
      const top = join(dir, 'top.qcow2');
      // 8 GiB at 512 B granularity: 2 MiB of bitmap data in 32 clusters of 64 KiB, each made
      // mixed by a 512-byte write in its 256 MiB. Every store writes all 32 anew, where the
      // commit itself brings one 64 KiB cluster. Converted at the end: no free space inside the
      // base (QEMU's own stores left some), so the file grows by all the commit takes.
      const pre = join(dir, 'pre.qcow2');
      must(qemuImg(['create', '-q', '-f', 'qcow2', pre, '8G']), 'base');
      must(qemuImg(['bitmap', '--add', '-g', '512', pre, 'rec']), 'bitmap');
      must(qemuImg(['bitmap', '--add', '-g', '512', '--disable', pre, 'off']), 'bitmap');
      must(qemuIo(pre, Array.from({ length: 32 }, (_, i) => `write -P 1 ${i * 256 * M} 512`)), 'base writes');
      must(qemuImg(['bitmap', '--disable', pre, 'rec']), 'disable');
      must(qemuImg(['bitmap', '--merge', 'rec', pre, 'off']), 'off gets the same bits');
      must(qemuImg(['bitmap', '--enable', pre, 'rec']), 'enable');
      must(qemuImg(['convert', '-O', 'qcow2', '--bitmaps', pre, base]), 'convert');
      must(qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top, ...(grows ? ['16G'] : [])]), 'top');
      must(qemuIo(top, ['write -P 2 1G 64k']), 'top data');
      const before = statSync(base).size;
      const dry = await commit(top, { dryRun: true });
      await commit(top, { drop: true });
      const grew = statSync(base).size - before;
      // Bitmap stores dominate (64 KiB of data): the estimate has to count them.
      expect(grew, `grows ${grows}`).toBeGreaterThan((grows ? 4 : 2) * M);
      expect(dry.baseGrowth, `grows ${grows}`).toBeGreaterThanOrEqual(grew);
      expect(qemuImg(['check', base]).status).toBe(0);
    }
  });

  it('refuses a corrupt overlay with every file byte-identical', async () => {
    const dir = tmpDir();
    const { base, mid, top } = chain3(dir);
    // Point an L2 entry of the top at the refcount table: a corruption qemu-img check reports.
    const map = JSON.parse(qemuImg(['map', '--output=json', top]).stdout) as Array<{ depth: number; offset?: number }>;
    const hostData = map.find((e) => e.depth === 0 && e.offset)!.offset!;
    const img = openSync(top, 'r+');
    try {
      // Overwrite the refcount block's entry for that data cluster with 0: refcount < references.
      const head = Buffer.alloc(64);
      readSync(img, head, 0, 64, 0);
      const reftable = Number(head.readBigUInt64BE(48));
      const rt = Buffer.alloc(8);
      readSync(img, rt, 0, 8, reftable);
      const block = Number(rt.readBigUInt64BE(0));
      writeSync(img, Buffer.alloc(2), 0, 2, block + (hostData / 65536) * 2);
    } finally {
      closeSync(img);
    }
    expect(qemuImg(['check', top]).status).toBe(2);
    const h = hashes(base, mid, top);
    await expect(commit(top)).rejects.toMatchObject({ code: 'CORRUPT' });
    const cli = runCli(['commit', top]);
    expect(cli.status).toBe(1);
    expect(cli.stderr).toMatch(/^qcowkit: .*top\.qcow2: image is corrupt .*check -r all/);
    expect(hashes(base, mid, top)).toEqual(h);
    await expect(makeEmpty(top)).rejects.toBeInstanceOf(QcowError);
    expect(hashes(base, mid, top)).toEqual(h);
  });

  it('an aborted commit leaves consistent images; running it again completes it', async () => {
    const dir = tmpDir();
    const { base, mid, top } = chain3(dir);
    must(qemuIo(top, ['write -P 5 24M 8M']), 'more data');
    const want = join(dir, 'want.raw');
    must(qemuImg(['convert', '-O', 'raw', top, want]), 'convert');
    const ac = new AbortController();
    let calls = 0;
    await expect(
      commit(top, {
        signal: ac.signal,
        onProgress: () => {
          if (++calls === 2) ac.abort();
        },
      }),
    ).rejects.toMatchObject({ code: 'ABORTED' });
    for (const f of [base, mid, top]) expect([0, 3], f).toContain(qemuImg(['check', f]).status);
    must(qemuImg(['convert', '-O', 'raw', top, join(dir, 'mid.raw')]), 'convert');
    expect(sha256(join(dir, 'mid.raw'))).toBe(sha256(want));
    await commit(top);
    for (const f of [base, mid, top]) expect(qemuImg(['check', f]).status, f).toBe(0);
    must(qemuImg(['convert', '-O', 'raw', mid, join(dir, 'mid2.raw')]), 'convert');
    expect(sha256(join(dir, 'mid2.raw'))).toBe(sha256(want));
  });

  it('refuses images in use (qemu-nbd holds the write lock), naming the holder, files untouched', async () => {
    const dir = tmpDir();
    const { base, mid, top } = chain3(dir);
    const sock = join(dir, 'nbd.sock');
    const nbd = spawn('qemu-nbd', ['-f', 'qcow2', '-k', sock, mid], { stdio: 'ignore' });
    try {
      for (let i = 0; i < 50; i++) {
        try {
          statSync(sock);
          break;
        } catch {
          await new Promise((r) => setTimeout(r, 100));
        }
      }
      const h = hashes(base, mid, top);
      const r = runCli(['commit', top]);
      expect(r.status).toBe(1);
      expect(r.stderr).toMatch(/mid\.qcow2: Failed to get .*"write" lock: the image is in use by PID \d+ \(qemu-nbd\)/);
      const e = runCli(['make-empty', mid]);
      expect(e.status).toBe(1);
      expect(hashes(base, mid, top)).toEqual(h);
    } finally {
      nbd.kill('SIGTERM');
      await new Promise((r) => nbd.once('exit', r));
    }
  });

  it('make-empty keeps snapshots and bitmaps, refuses an image without backing file unless --force', async () => {
    const dir = tmpDir();
    const { base, mid, top } = chain3(dir);
    must(qemuImg(['snapshot', '-c', 's1', top]), 'snapshot');
    must(qemuImg(['bitmap', '--add', top, 'b0']), 'bitmap');
    must(qemuIo(top, ['write -P 9 4M 4M']), 'more');
    must(qemuImg(['convert', '-l', 's1', '-O', 'raw', top, join(dir, 's1.raw')]), 'snapshot view');
    const r = await makeEmpty(top);
    expect(r.snapshots).toBe(1);
    expect(r.bitmaps).toBe(1);
    expect(r.after.allocated).toBeLessThan(r.before.allocated);
    expect(qemuImg(['check', top]).status).toBe(0);
    expect(qemuImg(['compare', top, mid]).status).toBe(0);
    must(qemuImg(['convert', '-l', 's1', '-O', 'raw', top, join(dir, 's1b.raw')]), 'snapshot view');
    expect(sha256(join(dir, 's1b.raw'))).toBe(sha256(join(dir, 's1.raw')));
    const info = JSON.parse(qemuImg(['info', '--output=json', top]).stdout);
    expect(info['format-specific'].data.bitmaps.map((b: { name: string }) => b.name)).toEqual(['b0']);
    const h = sha256(base);
    await expect(makeEmpty(base)).rejects.toThrow(/no backing file/);
    expect(sha256(base)).toBe(h);
    const forced = runCli(['make-empty', '--force', base]);
    expect(forced.status, forced.stderr).toBe(0);
    expect(qemuImg(['check', base]).status).toBe(0);
  });
});
