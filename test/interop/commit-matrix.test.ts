// commit / make-empty interop: the matrix of backing chains (test/helpers/commit-matrix.ts),
// checked with qemu-img / qemu-nbd / nbdinfo oracles (test/helpers/qemu-oracles.ts).
//
// 1. The harness proves itself: qemu-img commit vs qemu-img commit passes on every case, and
//    deliberately broken "commits" are caught.
// 2. qcowkit commit / make-empty vs the oracles: these run `node bin/qcowkit.js commit|make-empty`
//    and are skipped (with a loud warning) ONLY while the CLI answers "unknown command"; they turn
//    on by themselves when the commands land.
//
// QCOWKIT_COMMIT_REPORT=FILE writes every report (sizes, times) as JSON for the bench/notes.
import { existsSync, readFileSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, expect, it } from 'vitest';
import { patchBytes, readBytesAt } from '../helpers/bytes.js';
import { runCli } from '../helpers/cli.js';
import {
  buildChain,
  checkMakeEmpty,
  COMMIT_MATRIX,
  commitBaseIndex,
  commitCases,
  commitSpec,
  compareCommit,
  qemuImgCommit,
  qemuMakeEmpty,
  qemuMakeEmptyFastPath,
  type ChainSpec,
  type CommitRunner,
  type MakeEmptyRunner,
  K,
  M,
} from '../helpers/commit-matrix.js';
import {
  bitmapExtents,
  bitmapsOf,
  dirtyBytes,
  guestDigest,
  hasNbdTools,
  liveNbdServers,
  parseNbdinfoMap,
  qemuCheck,
  withNbdServer,
} from '../helpers/qemu-oracles.js';
import { describeQemu, hasQemu, qemuImg, qemuIo } from '../helpers/qemu.js';
import { tmpDir } from '../helpers/tmp.js';

const reports: unknown[] = [];
afterAll(() => {
  const f = process.env.QCOWKIT_COMMIT_REPORT;
  if (f && reports.length) writeFileSync(f, JSON.stringify(reports, null, 2));
});

const topHas = (s: ChainSpec, op: 'bitmap' | 'snapshot'): boolean => (s.layers[s.layers.length - 1]!.ops ?? []).some((o) => o.op === op);

function mustIo(file: string, cmds: string[], format = 'qcow2'): void {
  const r = qemuIo(file, cmds, { format });
  expect(r.status, r.stderr).toBe(0);
}
function mustImg(args: string[]): void {
  const r = qemuImg(args);
  expect(r.status, `qemu-img ${args.join(' ')}: ${r.stderr}`).toBe(0);
}

// ---------------------------------------------------------------------------------------------
// oracles and builder

describeQemu('qemu oracles', () => {
  it('parseNbdinfoMap coalesces extents and rejects junk', () => {
    const text = '         0       65536    1  dirty\n     65536      983040    0  clean\n   1048576        4096    1  dirty\n   1052672        4096    1  dirty\n   1056768       10240    0  clean\n';
    expect(parseNbdinfoMap(text)).toEqual([
      { start: 0, length: 65536, dirty: true },
      { start: 65536, length: 983040, dirty: false },
      { start: 1048576, length: 8192, dirty: true },
      { start: 1056768, length: 10240, dirty: false },
    ]);
    expect(() => parseNbdinfoMap('0 512 1 dirty\n1024 512 0 clean\n')).toThrow(/gap/);
    expect(() => parseNbdinfoMap('nbdinfo: oops\n')).toThrow(/unexpected line/);
  });

  it('guestDigest: equal for equal views however stored, different for one changed byte or size', () => {
    const d = tmpDir();
    const a = join(d, 'a.qcow2');
    // 80 MiB: above the 64 MiB whole-read limit, so the mapped path is used (the matrix's
    // small images cover the whole-read path, and it is cross-checked below)
    mustImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', a, '80M']);
    mustIo(a, ['write -P 0x11 5000 3000', 'write -c -P 0x22 1M 64k', `write -P 0x33 ${80 * M - 512} 512`]);
    const raw = join(d, 'a.raw');
    mustImg(['convert', '-O', 'raw', a, raw]);
    const dense = join(d, 'dense.raw');
    writeFileSync(dense, readFileSync(raw)); // fully allocated copy: zero blocks stored as data
    const da = guestDigest(a);
    expect(guestDigest(raw, { format: 'raw' })).toBe(da);
    expect(guestDigest(dense, { format: 'raw' })).toBe(da);
    patchBytes(dense, 40 * M + 7, [1]);
    expect(guestDigest(dense, { format: 'raw' })).not.toBe(da);
    truncateSync(raw, 81 * M); // same bytes, bigger disk
    expect(guestDigest(raw, { format: 'raw' })).not.toBe(da);
    expect(guestDigest(raw, { format: 'raw', size: 80 * M })).toBe(da);
    // the whole-read path (<= 64 MiB) agrees with the mapped one
    const small = join(d, 'small.raw');
    mustImg(['convert', '-O', 'raw', a, small]);
    truncateSync(small, 8 * M);
    const smallQ = join(d, 'small.qcow2');
    mustImg(['convert', '-O', 'qcow2', '-f', 'raw', small, smallQ]);
    expect(guestDigest(smallQ)).toBe(guestDigest(a, { size: 8 * M }));
    expect(guestDigest(smallQ)).not.toBe(guestDigest(a, { size: 8 * M - 512 }));
  });

  it('bitmapExtents: qemu-io writes dirty enabled persistent bitmaps at their granularity; disabled ones stay clean', () => {
    if (!hasNbdTools()) throw new Error('qemu-nbd/nbdinfo missing: the commit matrix needs them for bitmap contents');
    const chain = buildChain(tmpDir(), commitSpec('bitmaps-top'));
    const top = chain.top.path;
    expect(bitmapsOf(top).map((b) => `${b.name}:${b.granularity}:${b.flags.join('+')}`)).toEqual(['b0:65536:auto', 'b1:4096:auto', 'b2:65536:']);
    const b0 = bitmapExtents(top, 'b0');
    const b1 = bitmapExtents(top, 'b1');
    const b2 = bitmapExtents(top, 'b2');
    const size = chain.top.size;
    for (const e of [b0, b1, b2]) expect(e.reduce((n, x) => n + x.length, 0)).toBe(size);
    expect(b2).toEqual([{ start: 0, length: size, dirty: false }]);
    // the first op of standardOps: write 3000 bytes at 1536 -> b0 dirties [0, 64k), b1 [0, 8k)
    expect(b0[0]).toEqual({ start: 0, length: 64 * K, dirty: true });
    expect(b1[0]).toEqual({ start: 0, length: 8 * K, dirty: true });
    // written before the bitmaps existed: 12M..12M+128k is clean in both
    for (const e of [b0, b1]) expect(e.some((x) => !x.dirty && x.start <= 12 * M && x.start + x.length >= 12 * M + 128 * K)).toBe(true);
    expect(dirtyBytes(b1)).toBeLessThan(dirtyBytes(b0));
    expect(liveNbdServers()).toBe(0);
  });

  it('withNbdServer stops qemu-nbd and removes its socket dir even when the callback throws', () => {
    if (!hasNbdTools()) throw new Error('qemu-nbd/nbdinfo missing');
    const d = tmpDir();
    const img = join(d, 'x.qcow2');
    mustImg(['create', '-q', '-f', 'qcow2', img, '1M']);
    let sock = '';
    let pid = 0;
    expect(() =>
      withNbdServer(img, {}, (uri) => {
        sock = uri.replace(/^.*socket=/, '');
        pid = Number(readFileSync(join(sock, '..', 'nbd.pid'), 'utf8'));
        expect(readFileSync(`/proc/${pid}/cmdline`, 'utf8')).toContain('qemu-nbd');
        throw new Error('boom');
      }),
    ).toThrow('boom');
    expect(existsSync(`/proc/${pid}`) && readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(sock)).toBe(false);
    expect(existsSync(join(sock, '..'))).toBe(false);
    expect(liveNbdServers()).toBe(0);
    // and the image is no longer locked by it
    mustIo(img, ['write -P 1 0 512']);
  });

  it('qemuCheck reports leaks (allowed only on request) and a clean image', () => {
    const d = tmpDir();
    const img = join(d, 'x.qcow2');
    mustImg(['create', '-q', '-f', 'qcow2', img, '1M']);
    expect(qemuCheck(img).ok).toBe(true);
    leakHeaderCluster(img);
    const c = qemuCheck(img);
    expect(c.status).toBe(3);
    expect(c.ok).toBe(false);
    expect(c.json.leaks).toBe(1);
    expect(qemuCheck(img, { allowLeaks: true }).ok).toBe(true);
    expect(qemuCheck(join(d, 'missing.qcow2')).ok).toBe(false);
  });

  it('buildChain is deterministic and follows the spec (formats, options, backing names, sizes)', () => {
    const spec = commitSpec('chain4-absolute');
    const a = buildChain(tmpDir(), spec);
    const b = buildChain(tmpDir(), spec);
    expect(guestDigest(a.top.path)).toBe(guestDigest(b.top.path));
    expect(a.layers.map((l) => l.format)).toEqual(['raw', 'qcow2', 'qcow2', 'qcow2']);
    for (const l of a.layers.slice(1)) expect(l.backingString!.startsWith('/')).toBe(true);
    const rel = buildChain(tmpDir(), commitSpec('chain3-relative'));
    expect(rel.layers.map((l) => l.backingString)).toEqual([undefined, 'base.qcow2', '../mid.qcow2']);
    expect(commitBaseIndex(rel, ['-b', 'base.qcow2'])).toBe(0);
    expect(commitBaseIndex(rel, ['-b', `${rel.dir}/base.qcow2`])).toBe(0);
    expect(commitBaseIndex(rel, [])).toBe(1);
    const small = buildChain(tmpDir(), commitSpec('base-smaller'));
    expect(small.layers.map((l) => l.size)).toEqual([4 * M, 12 * M]);
    const info = JSON.parse(qemuImg(['info', '--output=json', buildChain(tmpDir(), commitSpec('c2m-rc64')).top.path]).stdout);
    expect([info['cluster-size'], info['format-specific'].data['refcount-bits']]).toEqual([2 * M, 64]);
  });

  it('COMMIT_MATRIX covers every required feature', () => {
    const tags = new Set(COMMIT_MATRIX.flatMap((s) => s.tags));
    for (const t of ['v2', 'v3', 'c512', 'c64k', 'c2m', 'rc1', 'rc16', 'rc64', 'extl2', 'compressed', 'zstd', 'raw-base', 'chain3', 'chain4', 'abs', 'base-smaller', 'base-larger', 'bitmaps', 'base-bitmaps', 'snapshots', 'l2-cross']) {
      expect(tags.has(t), t).toBe(true);
    }
    expect(new Set(COMMIT_MATRIX.map((s) => s.name)).size).toBe(COMMIT_MATRIX.length);
    const args = commitCases().map((c) => c.args.join(' '));
    expect(args).toContain('-d');
    expect(args.some((a) => a.startsWith('-b {DIR}/'))).toBe(true);
    expect(args.some((a) => /^-b [^{]/.test(a))).toBe(true);
  });
});

/** Sets the refcount of cluster 0 (the header) to 2 in a refcount_bits=16 image: one leak. */
function leakHeaderCluster(img: string): void {
  const rtOff = Number(readBytesAt(img, 48, 8).readBigUInt64BE());
  const blk = Number(readBytesAt(img, rtOff, 8).readBigUInt64BE() & ~0x1ffn);
  expect(readBytesAt(img, blk, 2).readUInt16BE()).toBe(1);
  patchBytes(img, blk, [0, 2]);
}

// ---------------------------------------------------------------------------------------------
// 1. the harness with qemu-img on both sides

describeQemu('commit matrix: qemu-img commit vs qemu-img commit (harness proof)', () => {
  for (const c of commitCases()) {
    it(c.label, async () => {
      const r = await compareCommit(c.spec, qemuImgCommit, c.args);
      reports.push({ kind: 'commit', runner: 'qemu-img', ...r });
      expect(liveNbdServers()).toBe(0);
    });
  }
});

describeQemu('commit matrix: the harness catches broken commits', () => {
  const problemsOf = async (spec: string, runner: CommitRunner, args: string[] = []): Promise<string[]> =>
    (await compareCommit(commitSpec(spec), runner, args, { assert: false })).problems;

  it('a commit that does nothing: bases differ, data left in the top', async () => {
    const p = await problemsOf('v3-c64k', () => {});
    expect(p.some((x) => x.startsWith('bases differ'))).toBe(true);
    expect(p.some((x) => /candidate: \d+ bytes still allocated in the top/.test(x))).toBe(true);
    expect(p.filter((x) => x.startsWith('qemu-img:'))).toEqual([]);
  });

  it('a commit that fails: reported, not thrown', async () => {
    const p = await problemsOf('raw-base', () => {
      throw new Error('exploded');
    });
    expect(p.some((x) => x.includes('exploded'))).toBe(true);
  });

  it('one wrong byte in the base: bases differ and the top view changed', async () => {
    const p = await problemsOf('compressed-top', (top, args, ctx) => {
      qemuImgCommit(top, args, ctx);
      mustIo(ctx.chain.layers[0]!.path, ['write -P 0xee 70000 1']);
    });
    expect(p.some((x) => x.startsWith('bases differ'))).toBe(true);
    expect(p).toContain("candidate: the top's guest view changed");
  });

  it('emptying the top although -d was given', async () => {
    const p = await problemsOf('extl2', (top, _args, ctx) => qemuImgCommit(top, [], ctx), ['-d']);
    expect(p).toContain('candidate: top allocation changed although -d/-b');
  });

  it('-b: an intermediate that was modified, a base below that was touched', async () => {
    const p = await problemsOf('chain4-absolute', (top, args, ctx) => {
      qemuImgCommit(top, args, ctx);
      mustIo(ctx.chain.layers[2]!.path, ['write -P 0x5 7M 4k']);
    }, ['-b', '{DIR}/l1.qcow2']);
    expect(p).toContain('candidate: intermediate l2.qcow2 allocation changed');
    const p2 = await problemsOf('chain3-relative', (top, args, ctx) => {
      qemuImgCommit(top, args, ctx);
      mustIo(ctx.chain.layers[0]!.path, ['write -P 0x6 7M 4k']);
    });
    expect(p2).toContain('candidate: layer base.qcow2 below the base was modified');
  });

  it('a bitmap cleared, a snapshot deleted', async () => {
    const p = await problemsOf('bitmaps-snapshots-rc16-base-rc1', (top, args, ctx) => {
      qemuImgCommit(top, args, ctx);
      mustImg(['bitmap', '--clear', top, 'backup']);
      mustImg(['snapshot', '-d', 'before-bitmap', top]);
    });
    expect(p.some((x) => x.startsWith('candidate: contents of bitmap backup changed'))).toBe(true);
    expect(p.some((x) => x.startsWith('candidate: snapshots changed'))).toBe(true);
  });

  it("a commit that leaves the base's enabled bitmaps clean, or touches a disabled one", async () => {
    const p = await problemsOf('bitmaps-base', (top, args, ctx) => {
      qemuImgCommit(top, args, ctx);
      const base = ctx.chain.layers[0]!.path;
      mustImg(['bitmap', '--clear', base, 'fine']);
      mustImg(['bitmap', '--enable', base, 'frozen']);
      mustIo(base, ['write -P 0x1 15M 4k']); // dirties 'frozen' (and the others) while enabled
      mustImg(['bitmap', '--disable', base, 'frozen']);
    });
    expect(p.some((x) => x.startsWith('candidate: base bitmap fine lost dirty bits at 8388608+'))).toBe(true);
    expect(p.some((x) => /^candidate: base bitmap fine is clean at \d+ changed block/.test(x))).toBe(true);
    expect(p).toContain('candidate: disabled base bitmap frozen changed');
    expect(p.some((x) => x.includes('bitmap enabled'))).toBe(false);
  });

  it('a snapshot whose data was overwritten', async () => {
    const p = await problemsOf('snapshots-top', (top, args, ctx) => {
      qemuImgCommit(top, args, ctx);
      // rewrite the snapshot's view: apply s1, write, and re-create s1 from the changed state
      mustImg(['snapshot', '-d', 's1', top]);
      mustIo(top, ['write -P 0x77 0 4k']);
      mustImg(['snapshot', '-c', 's1', top]);
      mustIo(top, ['discard 0 64k']);
    });
    expect(p.some((x) => /snapshot s1 no longer restores|snapshots changed/.test(x))).toBe(true);
  });

  it('a leaked cluster in the base, a top left too long', async () => {
    const p = await problemsOf('v2-c64k', (top, args, ctx) => {
      qemuImgCommit(top, args, ctx);
      leakHeaderCluster(ctx.chain.layers[0]!.path);
      truncateSync(top, statSync(top).size + 3 * 64 * K);
    });
    expect(p.some((x) => /^candidate: qemu-img check base\.qcow2: status 3/.test(x))).toBe(true);
    expect(p.some((x) => x.startsWith('top length'))).toBe(true);
  });
});

// ---------------------------------------------------------------------------------------------
// make-empty harness with QEMU's own make_empty (through a commit into a scratch overlay)

describeQemu('make-empty matrix: QEMU make_empty stand-in (harness proof)', () => {
  for (const spec of COMMIT_MATRIX) {
    it(spec.name, async () => {
      const r = await checkMakeEmpty(spec, qemuMakeEmpty, { assert: false });
      reports.push({ kind: 'make-empty', runner: 'qemu', ...r });
      const sizeProblem = (p: string): boolean => /^top (length|du) \d+ > fresh overlay's/.test(p);
      expect(r.problems.filter((p) => !sizeProblem(p))).toEqual([]);
      if (topHas(spec, 'snapshot')) {
        expect(r.sizeChecked).toBe(false);
      } else if (qemuMakeEmptyFastPath(spec)) {
        expect(r.problems).toEqual([]); // fast path: truncated to a fresh overlay's size
      } else {
        // QEMU's slow path (v2 / bitmaps) keeps the file length and the L2 tables: the size
        // criterion (which qcowkit must meet) has to see that
        expect(r.problems.some((p) => p.startsWith('top length'))).toBe(true);
      }
      expect(liveNbdServers()).toBe(0);
    });
  }

  it('catches a make-empty that leaves data, and one that dirties the bitmaps', async () => {
    const p = (await checkMakeEmpty(commitSpec('v3-c64k'), () => {}, { assert: false })).problems;
    expect(p.some((x) => /bytes still allocated in the top/.test(x))).toBe(true);
    expect(p.some((x) => x.startsWith("top's guest view differs"))).toBe(true);
    const spec = commitSpec('bitmaps-top');
    const p2 = (await checkMakeEmpty(spec, (top) => mustIo(top, [`discard 0 ${16 * M}`]), { assert: false })).problems;
    expect(p2.some((x) => x.startsWith('make-empty: contents of bitmap b0 changed'))).toBe(true);
  });
});

// ---------------------------------------------------------------------------------------------
// 2. qcowkit

/** True unless `qcowkit CMD` answers "unknown command 'CMD'" (then a loud warning is printed). */
function cliHasCommand(cmd: string): boolean {
  if (!hasQemu()) return false;
  const r = runCli([cmd]);
  if (new RegExp(`unknown command '${cmd}'`).test(r.stderr)) {
    process.stderr.write(`\n!!! qcowkit ${cmd} does not exist yet: the qcowkit ${cmd} interop matrix is SKIPPED (it turns on when the command lands) !!!\n\n`);
    return false;
  }
  return true;
}

const qcowkitCommit: CommitRunner = (top, args, ctx) => {
  const r = runCli(['commit', ...args, top], { cwd: ctx.dir, timeout: 120_000 });
  if (r.status !== 0) throw new Error(`qcowkit commit ${args.join(' ')} exited ${r.status}: ${r.stderr.trim()}`);
};
const qcowkitMakeEmpty: MakeEmptyRunner = (top, ctx) => {
  const r = runCli(['make-empty', top], { cwd: ctx.dir, timeout: 120_000 });
  if (r.status !== 0) throw new Error(`qcowkit make-empty exited ${r.status}: ${r.stderr.trim()}`);
};

describeQemu('commit matrix: qcowkit commit vs qemu-img commit', () => {
  const enabled = cliHasCommand('commit');
  for (const c of commitCases()) {
    it.skipIf(!enabled)(c.label, async () => {
      const r = await compareCommit(c.spec, qcowkitCommit, c.args);
      reports.push({ kind: 'commit', runner: 'qcowkit', ...r });
    });
  }
});

describeQemu('make-empty matrix: qcowkit make-empty', () => {
  const enabled = cliHasCommand('make-empty');
  for (const spec of COMMIT_MATRIX) {
    it.skipIf(!enabled)(spec.name, async () => {
      const r = await checkMakeEmpty(spec, qcowkitMakeEmpty);
      reports.push({ kind: 'make-empty', runner: 'qcowkit', ...r });
    });
  }
});
