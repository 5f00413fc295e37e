// Issue 9's bench: commit / commit -d / make-empty side by side with qemu-img on identical copies.
//
// Registered into bench/run.mjs by registerCommitBench(); its workloads run with --only commit
// (kind) or by name (see --list). Per fixture, one group of variants runs alternately:
//
//   q-commit   qemu-img commit top.qcow2
//   k-commit   qcowkit commit --output json top.qcow2     (the JSON gives commit's own timings)
//   q-drop     qemu-img commit -d top.qcow2
//   k-drop     qcowkit commit -d --output json top.qcow2
//   k-empty    qcowkit make-empty --output json top.qcow2  (fixture "marked" only)
//   loop       the durable-copy limit: a plain Node loop reads the top's allocated data
//              (host ranges from `qemu-img map`), writes it to a fresh file, fdatasyncs it
//   floor      the disk's direct-write floor: dd of the same bytes with O_DIRECT, then fdatasync
//   punch      the free-space floor of any emptying: fallocate --punch-hole over the whole top
//
// Every run of every variant gets fresh `cp --sparse=always` copies of the prepared images (untimed),
// in a warm page cache; by default the fresh copies are made durable (`sync -d FILES`, untimed)
// before the timed command so neither tool's fdatasync pays for writing back what cp just wrote
// (--no-settle: don't; then a tool's first fdatasync of a file also writes back cp's dirty pages).
// Nothing is dropped from the page cache. The first round verifies: `qemu-img compare` of the
// bases (and tops), `qemu-img check` of every file either tool wrote; only then the timed rounds.
//
// Rows: commit-X and commit-d-X (qemu-img vs qcowkit, target <= 0.7x), emptying-X = median(commit)
// - median(commit -d) per tool (target <= 0.3x), make-empty-marked (qcowkit make-empty vs qemu-img's
// emptying as measured by the difference), durable-X (the Node loop in the qemu-img column, commit -d
// of qcowkit beside it; no target) and commit-1t (RSS on a 1 TiB virtual disk). Peak RSS target
// < 200 MiB for every qcowkit run.

import { spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, realpathSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { existsSync } from 'node:fs';
import { join } from 'node:path';

const haveCpuTime = existsSync('/usr/bin/time') && spawnSync('/usr/bin/time', ['-f', '%U %S', 'true'], { stdio: 'ignore' }).status === 0;

// --no-settle is this module's own option: taken out before run.mjs parses the command line.
const settle = !process.argv.includes('--no-settle');
if (!settle) process.argv.splice(process.argv.indexOf('--no-settle'), 1);

const GiB = 2 ** 30;
const MiB = 2 ** 20;
const RSS_TARGET_MIB = 200;

/** Deterministic PRNG (LCG), as run.mjs uses. */
function rng(seed) {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1103515245) + 12345) >>> 0;
    return s / 2 ** 32;
  };
}

/**
 * A qemu-io script: `writes` random 64 KiB data writes (7 in 8 cluster-aligned, 1 in 8 only 4 KiB
 * aligned so they straddle two clusters and need copy-on-write), `extents` multi-MiB data writes,
 * `zeroData` 64 KiB writes of zero bytes (data that reads as zeros), `zeroWrites` 64 KiB zero writes
 * and two 2 MiB zero writes (`write -z`).
 */
function script(size, { writes, extents = 0, extentMiB = 4, zeroData = 0, zeroWrites = 0 }, seed) {
  const r = rng(seed);
  const cmds = [];
  const at = (align, len) => Math.floor(r() * ((size - len) / align)) * align;
  for (let i = 0; i < writes; i++) {
    const off = i % 8 === 7 ? at(4096, 65536) : at(65536, 65536);
    cmds.push(`write -P ${(i % 254) + 1} ${off} 64k`);
  }
  for (let i = 0; i < extents; i++) cmds.push(`write -P ${(i % 200) + 20} ${at(MiB, extentMiB * MiB)} ${extentMiB}M`);
  for (let i = 0; i < zeroData; i++) cmds.push(`write -P 0 ${at(65536, 65536)} 64k`);
  for (let i = 0; i < zeroWrites; i++) cmds.push(`write -z ${at(65536, 65536)} 64k`);
  if (zeroWrites) for (let i = 0; i < 2; i++) cmds.push(`write -z ${at(MiB, 2 * MiB)} 2M`);
  return cmds;
}

export function registerCommitBench(ctx) {
  const { WORKLOADS, FIXTURES, CFG, opts, h } = ctx;
  const Q = ctx.quick;

  const sizes = {
    big: Q ? 2 * GiB : 8 * GiB,
    marked: Q ? 2 * GiB : 8 * GiB,
    tera: Q ? 64 * GiB : 2 ** 40,
  };
  const S = (n) => (n >= 2 ** 40 ? `${n / 2 ** 40} TiB` : `${n / GiB} GiB`);

  // ------------------------------------------------------------ fixtures
  const qio = (file, cmds, cwd) => {
    h.sh('qemu-io', ['-f', 'qcow2', file], { cwd, input: [...cmds, 'quit'].join('\n') + '\n' });
    h.sh('qemu-img', ['check', '-q', file], { cwd }); // qemu-io reports write errors on stdout and exits 0
  };
  const create = (cwd, name, size, backing) =>
    h.sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', ...(backing ? ['-b', backing, '-F', 'qcow2'] : []), name, String(size)], { cwd });

  const topSpec = {
    big: Q ? { writes: 2048, extents: 4, zeroData: 16, zeroWrites: 32 } : { writes: 16384, extents: 16, zeroData: 64, zeroWrites: 256 },
    tera: Q ? { writes: 512, extents: 2, zeroData: 8, zeroWrites: 16 } : { writes: 4096, extents: 8, zeroData: 32, zeroWrites: 64 },
  };
  FIXTURES.commitBig = {
    desc: () => {
      const t = topSpec.big;
      return `${S(sizes.big)} base (64 KiB clusters, own data) + overlay: ${t.writes} x 64 KiB, ${t.extents} x 4 MiB, ${t.zeroData} x 64 KiB of zero bytes, ${t.zeroWrites} x 64 KiB + 2 x 2 MiB write -z`;
    },
    build() {
      const dir = join(h.tmp(), 'cbig');
      mkdirSync(dir);
      create(dir, 'base.qcow2', sizes.big);
      qio('base.qcow2', script(sizes.big, { writes: Q ? 512 : 4096, extents: 8 }, 901), dir);
      create(dir, 'top.qcow2', sizes.big, 'base.qcow2');
      qio('top.qcow2', script(sizes.big, topSpec.big, 902), dir);
      return fixtureInfo(dir);
    },
  };
  FIXTURES.commitMarked = {
    desc: () => `${S(sizes.marked)} base + overlay with 2 persistent bitmaps (1 enabled) and 2 internal snapshots, ${Q ? 3 * 256 : 3 * 2048} x 64 KiB writes`,
    build() {
      const dir = join(h.tmp(), 'cmarked');
      mkdirSync(dir);
      const n = Q ? 256 : 2048;
      create(dir, 'base.qcow2', sizes.marked);
      qio('base.qcow2', script(sizes.marked, { writes: n, extents: 4 }, 911), dir);
      create(dir, 'top.qcow2', sizes.marked, 'base.qcow2');
      h.sh('qemu-img', ['bitmap', '--add', 'top.qcow2', 'b-enabled'], { cwd: dir });
      h.sh('qemu-img', ['bitmap', '--add', '--disable', 'top.qcow2', 'b-disabled'], { cwd: dir });
      qio('top.qcow2', script(sizes.marked, { writes: n, extents: 2, zeroWrites: 16 }, 912), dir);
      h.sh('qemu-img', ['snapshot', '-c', 's1', 'top.qcow2'], { cwd: dir });
      qio('top.qcow2', script(sizes.marked, { writes: n, extents: 2 }, 913), dir);
      h.sh('qemu-img', ['snapshot', '-c', 's2', 'top.qcow2'], { cwd: dir });
      qio('top.qcow2', script(sizes.marked, { writes: n, zeroData: 16 }, 914), dir);
      return fixtureInfo(dir);
    },
  };
  FIXTURES.commitTera = {
    desc: () => {
      const t = topSpec.tera;
      return `${S(sizes.tera)} base (own data) + overlay: ${t.writes} x 64 KiB + ${t.extents} x 4 MiB scattered, zero writes`;
    },
    build() {
      const dir = join(h.tmp(), 'ctera');
      mkdirSync(dir);
      create(dir, 'base.qcow2', sizes.tera);
      qio('base.qcow2', script(sizes.tera, { writes: Q ? 256 : 1024, extents: 2 }, 921), dir);
      create(dir, 'top.qcow2', sizes.tera, 'base.qcow2');
      qio('top.qcow2', script(sizes.tera, topSpec.tera, 922), dir);
      return fixtureInfo(dir);
    },
  };

  /** Sizes, and the top's own data as coalesced host ranges (for the durable-copy loop). */
  function fixtureInfo(dir) {
    const map = JSON.parse(h.sh('qemu-img', ['map', '-f', 'qcow2', '--output', 'json', 'top.qcow2'], { cwd: dir }).stdout);
    // Host ranges of the top's own data, in host order, adjacent ones merged (the loop reads them sequentially).
    const own = map.filter((e) => e.depth === 0 && e.data && e.offset !== undefined).map((e) => [e.offset, e.length]);
    own.sort((a, b) => a[0] - b[0]);
    const ranges = [];
    for (const [off, len] of own) {
      const last = ranges[ranges.length - 1];
      if (last && last[0] + last[1] === off) last[1] += len;
      else ranges.push([off, len]);
    }
    writeFileSync(join(dir, 'ranges.json'), JSON.stringify(ranges));
    const topData = ranges.reduce((s, r) => s + r[1], 0);
    const info = {};
    for (const f of ['base.qcow2', 'top.qcow2']) info[f] = space(join(dir, f));
    const topInfo = h.qemuInfo('top.qcow2', dir);
    h.log(`    top: ${(topData / MiB).toFixed(0)} MiB of own data in ${ranges.length} host ranges; files: ${fmtSpace(info['top.qcow2'])} top, ${fmtSpace(info['base.qcow2'])} base`);
    return { dir, files: ['base.qcow2', 'top.qcow2'], topData, space: info, marks: marks(topInfo) };
  }

  // ------------------------------------------------------------ the durable-copy loop
  const loopScript = () => {
    const f = join(h.tmp(), 'durable-copy.mjs');
    writeFileSync(
      f,
      `import { openSync, readSync, writeSync, fdatasyncSync, closeSync, readFileSync } from 'node:fs';
const [top, out, rangesFile] = process.argv.slice(2);
const ranges = JSON.parse(readFileSync(rangesFile, 'utf8'));
const CH = 8 * 1024 * 1024;
const buf = Buffer.allocUnsafe(CH);
const fi = openSync(top, 'r');
const fo = openSync(out, 'w');
let pos = 0;
const t0 = performance.now();
for (const [off, len] of ranges) {
  for (let d = 0; d < len; ) {
    const n = Math.min(CH, len - d);
    for (let got = 0; got < n; ) got += readSync(fi, buf, got, n - got, off + d + got);
    for (let put = 0; put < n; ) put += writeSync(fo, buf, put, n - put, pos + put);
    pos += n;
    d += n;
  }
}
const t1 = performance.now();
fdatasyncSync(fo);
const t2 = performance.now();
closeSync(fo);
closeSync(fi);
process.stdout.write(JSON.stringify({ copyMs: t1 - t0, syncMs: t2 - t1 }));
`,
    );
    return f;
  };

  // ------------------------------------------------------------ groups of variants
  const VARIANTS = {
    'q-commit': { tool: 'qemu-img', args: ['commit', 'top.qcow2'] },
    'k-commit': { tool: 'qcowkit', args: ['commit', '--output', 'json', 'top.qcow2'] },
    'q-drop': { tool: 'qemu-img', args: ['commit', '-d', 'top.qcow2'] },
    'k-drop': { tool: 'qcowkit', args: ['commit', '-d', '--output', 'json', 'top.qcow2'] },
    'k-empty': { tool: 'qcowkit', args: ['make-empty', '--output', 'json', 'top.qcow2'] },
    loop: { tool: 'loop', args: [] },
    floor: { tool: 'floor', args: [] },
    punch: { tool: 'punch', args: [] },
  };
  /** Variants that are not a tool's run on the images (no checks of the files they leave). */
  const baseline = (v) => v === 'loop' || v === 'floor' || v === 'punch';

  const groups = {
    big: { fixture: 'commitBig', label: '1g' },
    marked: { fixture: 'commitMarked', label: 'marked' },
    tera: { fixture: 'commitTera', label: '1t' },
  };

  const mk = (name, group, needs, rowOf, desc) => ({ name, kind: 'commit', optional: true, group, needs, rowOf, desc, fixtures: [groups[group].fixture] });
  const mine = [
    mk('commit-1g', 'big', ['q-commit', 'k-commit'], (g) => pairRow(g, 'q-commit', 'k-commit', 0.7), 'commit top (~1 GiB scattered over 8 GiB)'),
    mk('commit-d-1g', 'big', ['q-drop', 'k-drop'], (g) => pairRow(g, 'q-drop', 'k-drop', 0.7), 'commit -d top'),
    mk('emptying-1g', 'big', ['q-commit', 'k-commit', 'q-drop', 'k-drop', 'punch'], (g) => diffRow(g), '(commit) - (commit -d), per tool'),
    mk('durable-1g', 'big', ['loop', 'floor', 'k-drop', 'k-commit'], (g) => loopRow(g), 'plain Node read+write+fdatasync of the top data (qemu-img column) vs qcowkit commit -d'),
    mk('commit-marked', 'marked', ['q-commit', 'k-commit'], (g) => pairRow(g, 'q-commit', 'k-commit', 0.7), 'commit of a top with bitmaps + snapshots'),
    mk('commit-d-marked', 'marked', ['q-drop', 'k-drop'], (g) => pairRow(g, 'q-drop', 'k-drop', 0.7), 'commit -d of it'),
    mk('emptying-marked', 'marked', ['q-commit', 'k-commit', 'q-drop', 'k-drop'], (g) => diffRow(g), '(commit) - (commit -d), per tool'),
    mk('make-empty-marked', 'marked', ['q-commit', 'q-drop', 'k-empty'], (g) => makeEmptyRow(g), 'qcowkit make-empty vs qemu-img emptying (commit - commit -d)'),
    mk('commit-1t', 'tera', ['q-commit', 'k-commit'], (g) => pairRow(g, 'q-commit', 'k-commit', 0.7), 'commit of ~256 MiB scattered over 1 TiB (RSS)'),
  ];
  for (const w of mine) w.run = (row, F) => runRow(w, row, F);
  WORKLOADS.push(...mine);

  const selected = () => (opts.only ? mine.filter((w) => opts.only.includes(w.name) || opts.only.includes(w.kind)) : mine);
  const results = {}; // group -> { samples: {variant: [{ms, rssKb, json}]}, verify: {...}, notes, error }

  function runRow(w, row, F) {
    row.target = null;
    row.desc = w.desc;
    let g;
    try {
      g = runGroup(w.group, F);
    } catch (e) {
      return { ...row, status: 'FAILED', message: e.message };
    }
    if (g.error) return { ...row, status: g.status ?? 'FAILED', message: g.error };
    const r = w.rowOf(g);
    return { ...row, ...r, status: 'OK', message: null };
  }

  function runGroup(name, F) {
    if (results[name]) return results[name];
    const grp = groups[name];
    const fx = F[grp.fixture];
    const needs = new Set(selected().filter((w) => w.group === name).flatMap((w) => w.needs));
    const order = Object.keys(VARIANTS).filter((v) => needs.has(v));
    const g = { name, fx, order, samples: Object.fromEntries(order.map((v) => [v, []])), notes: [], after: {} };
    results[name] = g;
    const loopF = needs.has('loop') ? loopScript() : null;
    const runOne = (v, tag) => {
      const cwd = join(fx.dir, `run-${v}-${tag}`);
      rmSync(cwd, { recursive: true, force: true });
      mkdirSync(cwd);
      for (const f of fx.files) h.sparseCopy(join(fx.dir, f), join(cwd, f));
      if (settle) h.sh('sync', ['-d', ...fx.files], { cwd });
      const spec = VARIANTS[v];
      const [cmd, cmdArgs] =
        spec.tool === 'loop'
          ? [process.execPath, [loopF, 'top.qcow2', 'copy.bin', join(fx.dir, 'ranges.json')]]
          : spec.tool === 'floor'
            ? // The disk's direct-write floor: as many bytes as the top holds, from the page cache (the
              // fresh copy of the top), written by one stream of 8 MiB O_DIRECT writes, then fdatasync.
              ['dd', ['if=top.qcow2', 'of=copy.bin', 'bs=8M', `count=${fx.topData}`, 'iflag=count_bytes', 'oflag=direct', 'conv=fdatasync', 'status=none']]
          : spec.tool === 'punch'
            ? // The free-space floor of any emptying: one hole punched over the whole fresh top (what
              // qemu-img's truncation and qcowkit's punch both make the filesystem do).
              ['fallocate', ['--punch-hole', '--offset', '0', '--length', String(statSync(join(cwd, 'top.qcow2')).size), 'top.qcow2']]
          : spec.tool === 'qcowkit'
            ? [process.execPath, [h.bin(), ...spec.args]]
            : ['qemu-img', spec.args];
      // CPU time (user + sys, the child and its threads) from an inner GNU time: far less sensitive
      // to other load than wall time. The outer measurement (wall, peak RSS) covers it too.
      const cpuF = join(cwd, '..', `cpu-${v}-${tag}.txt`);
      const tool = haveCpuTime ? ['/usr/bin/time', ['-f', '%U %S', '-o', cpuF, cmd, ...cmdArgs]] : [cmd, cmdArgs];
      const r = h.measure(tool, spec.args, cwd);
      r.cpuS = null;
      if (haveCpuTime) {
        try {
          const m = /([\d.]+) ([\d.]+)\s*$/.exec(readFileSync(cpuF, 'utf8'));
          if (m) r.cpuS = Number(m[1]) + Number(m[2]);
        } catch {
          // no CPU figure for this run (the wrapper did not write it): the wall time stands
        }
        rmSync(cpuF, { force: true });
      }
      r.cwd = cwd;
      if (r.error || r.code !== 0) {
        const who = spec.tool === 'loop' ? 'durable-copy loop' : spec.tool === 'floor' ? 'dd' : spec.tool === 'punch' ? 'fallocate' : spec.tool;
        throw new Error(`${v} (${who} ${spec.args.join(' ')}) failed (${r.error ?? `exit ${r.code}`}): ${(r.stderr || r.stdout).trim().split('\n').slice(0, 6).join(' | ')}`);
      }
      if (spec.tool === 'qcowkit' || spec.tool === 'loop') {
        try {
          r.json = JSON.parse(r.stdout);
        } catch {
          r.json = null;
        }
      }
      return r;
    };
    const clean = (r) => rmSync(r.cwd, { recursive: true, force: true });

    // 1. Verification round (also warms the page cache).
    const first = {};
    try {
      for (const v of order) first[v] = runOne(v, 'verify');
      const bad = verifyGroup(g, first);
      if (bad) {
        g.error = bad;
        g.status = 'MISMATCH';
        return g;
      }
    } catch (e) {
      g.error = e.message;
      return g;
    } finally {
      for (const r of Object.values(first)) clean(r);
    }

    // 2. Timed rounds, variants alternating in a fixed order.
    let runs = CFG.defaultRuns;
    const roundS = order.reduce((s, v) => s + first[v].ms, 0) / 1000;
    const budget = 60 * order.length;
    if (CFG.adaptive && roundS * runs > budget) runs = Math.max(3, Math.floor(budget / roundS));
    h.log(`  group ${name}: ${order.join(', ')}; ${runs} timed rounds (~${(roundS * runs).toFixed(0)} s + copies)${settle ? '' : ' [--no-settle]'}`);
    try {
      for (let i = 0; i < runs; i++) {
        const parts = [];
        for (const v of order) {
          const r = runOne(v, i);
          clean(r);
          g.samples[v].push({ ms: r.ms, rssKb: r.rssKb, cpuS: r.cpuS, json: r.json ?? null });
          parts.push(`${v} ${r.ms.toFixed(0)}`);
        }
        h.log(`    round ${i + 1}/${runs}: ${parts.join(', ')} ms`);
      }
    } catch (e) {
      g.error = `timed run: ${e.message}`;
      return g;
    }
    g.runs = runs;
    return g;
  }

  /** Checks the verification round; records what the tops look like afterwards. Returns an error or null. */
  function verifyGroup(g, first) {
    const fx = g.fx;
    const p = (v, f) => join(first[v].cwd, f);
    const notes = g.notes;
    const orig = (f) => join(fx.dir, f);
    const checks = [];
    for (const v of g.order) {
      if (baseline(v)) continue;
      for (const f of fx.files) checks.push(p(v, f));
    }
    for (const f of checks) {
      const c = h.qemuCheckClean(f, fx.dir);
      if (c) return c;
    }
    const cmp = (a, b) => h.qemuCompare(a, b, fx.dir);
    if (first['q-commit'] && first['k-commit']) {
      const d = cmp(p('q-commit', 'base.qcow2'), p('k-commit', 'base.qcow2')) ?? cmp(p('q-commit', 'top.qcow2'), p('k-commit', 'top.qcow2'));
      if (d) return `commit: ${d}`;
    }
    if (first['q-drop'] && first['k-drop']) {
      const d = cmp(p('q-drop', 'base.qcow2'), p('k-drop', 'base.qcow2')) ?? cmp(orig('top.qcow2'), p('k-drop', 'top.qcow2'));
      if (d) return `commit -d: ${d}`;
      // With -d the top must be left as it was.
      const same = spawnSync('cmp', ['-s', orig('top.qcow2'), p('k-drop', 'top.qcow2')]).status === 0;
      notes.push(`commit -d: qcowkit's top ${same ? 'byte-identical to' : 'DIFFERS in bytes from'} the original`);
    }
    if (first['q-commit'] && first['q-drop']) {
      // The base after commit and after commit -d must hold the same guest data.
      const d = cmp(p('q-commit', 'base.qcow2'), p('q-drop', 'base.qcow2'));
      if (d) return `qemu-img commit vs commit -d bases: ${d}`;
    }
    if (first['k-empty']) {
      // make-empty: the top reads as its (untouched) backing file again, marks kept.
      const d = cmp(p('k-empty', 'top.qcow2'), p('k-empty', 'base.qcow2')) ?? cmp(orig('base.qcow2'), p('k-empty', 'base.qcow2'));
      if (d) return `make-empty: ${d}`;
      const m = marks(h.qemuInfo(p('k-empty', 'top.qcow2'), fx.dir));
      if (JSON.stringify(m) !== JSON.stringify(fx.marks)) return `make-empty changed bitmaps/snapshots: before ${JSON.stringify(fx.marks)}, after ${JSON.stringify(m)}`;
    }
    for (const v of ['loop', 'floor']) {
      if (!first[v]) continue;
      const len = statSync(p(v, 'copy.bin')).size;
      if (len !== fx.topData) return `${v === 'loop' ? 'durable-copy loop' : 'dd'} wrote ${len} bytes, expected ${fx.topData}`;
    }
    // What each tool leaves: file lengths and du, and the marks of the top.
    if (first.punch && space(p('punch', 'top.qcow2')).du > 1024 * 1024) return `fallocate --punch-hole left ${fmtSpace(space(p('punch', 'top.qcow2')))}`;
    for (const v of g.order) {
      if (baseline(v)) continue;
      g.after[v] = { top: space(p(v, 'top.qcow2')), base: space(p(v, 'base.qcow2')), marks: marks(h.qemuInfo(p(v, 'top.qcow2'), fx.dir)) };
      const k = first[v].json;
      if (k?.emptied) g.after[v].emptiedS = k.emptied.seconds;
      if (k?.seconds !== undefined) g.after[v].opS = k.seconds;
    }
    if (g.after['q-commit'] && g.after['k-commit']) {
      const a = g.after['q-commit'].marks;
      const b = g.after['k-commit'].marks;
      if (JSON.stringify(a) !== JSON.stringify(b)) notes.push(`commit: tops' bitmaps/snapshots differ: qemu-img ${JSON.stringify(a)}, qcowkit ${JSON.stringify(b)}`);
    }
    return null;
  }

  // ------------------------------------------------------------ rows
  const med = (xs) => h.median(xs.filter((x) => x !== null && x !== undefined));
  const samplesOf = (g, v) => g.samples[v].map(({ ms, rssKb, cpuS }) => ({ ms, rssKb, cpuS }));

  function pairRow(g, qv, kv, target) {
    const notes = [];
    const qc = med(g.samples[qv].map((s) => s.cpuS));
    const kc = med(g.samples[kv].map((s) => s.cpuS));
    if (qc !== null && kc !== null) notes.push(`CPU time (user+sys, median): qemu-img ${qc.toFixed(2)} s, qcowkit ${kc.toFixed(2)} s = ${(kc / qc).toFixed(2)}x`);
    const kSec = med(g.samples[kv].map((s) => s.json?.seconds));
    if (kSec !== null) notes.push(`qcowkit's own timing (open to close, no node start): ${(kSec * 1000).toFixed(0)} ms`);
    const e = med(g.samples[kv].map((s) => s.json?.emptied?.seconds));
    if (e !== null) notes.push(`of which emptying the top (emptyOpenImage): ${(e * 1000).toFixed(0)} ms`);
    for (const [v, who] of [[qv, 'qemu-img'], [kv, 'qcowkit']]) {
      const a = g.after[v];
      if (a) notes.push(`after ${who}: top ${fmtSpace(a.top)}, base ${fmtSpace(a.base)}`);
    }
    notes.push(...g.notes.filter((n) => (qv === 'q-drop' ? n.startsWith('commit -d') : !n.startsWith('commit -d'))));
    return { runs: g.runs, qemu: samplesOf(g, qv), qcowkit: samplesOf(g, kv), target, notes, args: VARIANTS[kv].args, qemuArgs: VARIANTS[qv].args };
  }

  function diffRow(g) {
    const d = (a, b) => {
      const x = med(g.samples[a].map((s) => s.ms));
      const y = med(g.samples[b].map((s) => s.ms));
      return x === null || y === null ? null : x - y;
    };
    const q = d('q-commit', 'q-drop');
    const k = d('k-commit', 'k-drop');
    const e = med(g.samples['k-commit'].map((s) => s.json?.emptied?.seconds));
    const notes = [`median(commit) - median(commit -d) per tool; RSS columns: commit's`];
    const c = (v) => med(g.samples[v].map((s) => s.cpuS));
    if (c('q-commit') !== null && c('k-commit') !== null)
      notes.push(`CPU time of the emptying (median commit - median commit -d): qemu-img ${(c('q-commit') - c('q-drop')).toFixed(2)} s, qcowkit ${(c('k-commit') - c('k-drop')).toFixed(2)} s`);
    const noise = noiseOf(g, ['q-commit', 'q-drop']);
    if (q !== null && q <= noise) notes.push(`qemu-img's difference (${q.toFixed(0)} ms) is within the noise of its runs (spread ${noise.toFixed(0)} ms): no ratio`);
    if (e !== null) notes.push(`qcowkit's own emptying time (emptyOpenImage, in-process): ${(e * 1000).toFixed(0)} ms = ${q ? (e * 1000 / q).toFixed(2) : '-'}x qemu-img's difference`);
    const punch = med((g.samples.punch ?? []).map((s) => s.ms));
    if (punch !== null) {
      const discard = mountHasDiscard(g.fx.dir);
      notes.push(
        `free-space floor: fallocate --punch-hole over the whole fresh top ${punch.toFixed(0)} ms${q !== null && q > noise ? ` = ${(punch / q).toFixed(2)}x qemu-img's emptying (0.3x of it = ${(0.3 * q).toFixed(0)} ms)` : ''}` +
          `${discard ? '; the filesystem is mounted with discard, so freeing blocks waits for the device to discard them' : ''}`,
      );
    }
    return {
      runs: g.runs,
      qemu: [{ ms: q !== null && q > noise ? q : null, rssKb: med(g.samples['q-commit'].map((s) => s.rssKb)) }],
      qcowkit: [{ ms: k, rssKb: med(g.samples['k-commit'].map((s) => s.rssKb)) }],
      target: q !== null && q > noise ? 0.3 : null,
      notes,
    };
  }

  /** Half the interquartile-ish spread (max of (max - min) / 2) of these variants' times: below it a difference means nothing. */
  function noiseOf(g, vs) {
    return Math.max(0, ...vs.map((v) => {
      const ms = g.samples[v].map((s) => s.ms);
      return ms.length > 1 ? (Math.max(...ms) - Math.min(...ms)) / 2 : 0;
    }));
  }

  function makeEmptyRow(g) {
    const qd = med(g.samples['q-commit'].map((s) => s.ms)) - med(g.samples['q-drop'].map((s) => s.ms));
    const noise = noiseOf(g, ['q-commit', 'q-drop']);
    const notes = [`qemu-img's emptying: ${qd.toFixed(0)} ms${qd <= noise ? ` (within the noise of its runs, spread ${noise.toFixed(0)} ms: no ratio)` : ''}`];
    notes.push('qemu-img column: its emptying cost, median(commit) - median(commit -d) (qemu-img has no make-empty); qcowkit: the whole make-empty command, node start included');
    const cpu = (v) => med(g.samples[v].map((s) => s.cpuS));
    if (cpu('k-empty') !== null) notes.push(`CPU time: qcowkit make-empty ${cpu('k-empty').toFixed(2)} s; qemu-img commit - commit -d ${(cpu('q-commit') - cpu('q-drop')).toFixed(2)} s`);
    const ke = med(g.samples['k-empty'].map((s) => s.json?.seconds));
    if (ke !== null) notes.push(`qcowkit make-empty's own timing: ${(ke * 1000).toFixed(0)} ms`);
    const o = g.fx.space['top.qcow2'];
    notes.push(`top before: ${fmtSpace(o)}`);
    if (g.after['k-empty']) notes.push(`after qcowkit make-empty: top ${fmtSpace(g.after['k-empty'].top)}`);
    if (g.after['q-commit']) notes.push(`after qemu-img commit: top ${fmtSpace(g.after['q-commit'].top)}`);
    return {
      runs: g.runs,
      qemu: [{ ms: qd > noise ? qd : null, rssKb: null }],
      qcowkit: samplesOf(g, 'k-empty'),
      target: qd > noise ? 0.3 : null,
      notes,
      args: VARIANTS['k-empty'].args,
    };
  }

  function loopRow(g) {
    const loop = med(g.samples.loop.map((s) => s.ms));
    const kd = med(g.samples['k-drop'].map((s) => s.ms));
    const kc = g.samples['k-commit'] ? med(g.samples['k-commit'].map((s) => s.ms)) : null;
    const mb = g.fx.topData / MiB;
    const notes = [
      `durable-copy limit: plain Node loop (8 MiB pread/pwrite of the top's ${mb.toFixed(0)} MiB of data + 1 fdatasync) ${loop.toFixed(0)} ms = ${(mb / (loop / 1000)).toFixed(0)} MiB/s`,
      `qcowkit commit -d ${kd.toFixed(0)} ms = ${(kd / loop).toFixed(2)}x the limit${kc !== null ? `; commit ${kc.toFixed(0)} ms = ${(kc / loop).toFixed(2)}x` : ''}`,
      'columns: qemu-img = the Node loop, qcowkit = commit -d',
    ];
    const floor = med((g.samples.floor ?? []).map((s) => s.ms));
    if (floor !== null) {
      const qd = med((g.samples['q-drop'] ?? []).map((s) => s.ms));
      notes.push(
        `direct-write floor of this disk: dd, one stream of 8 MiB O_DIRECT writes of ${mb.toFixed(0)} MiB + fdatasync, ${floor.toFixed(0)} ms = ${(mb / (floor / 1000)).toFixed(0)} MiB/s; ` +
          `qcowkit commit -d = ${(kd / floor).toFixed(2)}x the floor${qd !== null ? `, qemu-img commit -d = ${(qd / floor).toFixed(2)}x (0.7x of it = ${((0.7 * qd) / floor).toFixed(2)}x the floor)` : ''}`,
      );
    }
    const cpu = (v) => med((g.samples[v] ?? []).map((s) => s.cpuS));
    if (cpu('loop') !== null) notes.push(`CPU time: loop ${cpu('loop').toFixed(2)} s, qcowkit commit -d ${cpu('k-drop').toFixed(2)} s${cpu('q-drop') !== null ? `, qemu-img commit -d ${cpu('q-drop').toFixed(2)} s` : ''}`);
    const split = g.samples.loop.map((s) => s.json).filter(Boolean);
    if (split.length) notes.push(`loop split (median): copy ${med(split.map((x) => x.copyMs)).toFixed(0)} ms + fdatasync ${med(split.map((x) => x.syncMs)).toFixed(0)} ms`);
    return { runs: g.runs, qemu: samplesOf(g, 'loop'), qcowkit: samplesOf(g, 'k-drop'), target: null, notes };
  }

  // ------------------------------------------------------------ report section
  return {
    report(rows, print) {
      const my = rows.filter((r) => mine.some((w) => w.name === r.name));
      if (!my.length) return;
      print('');
      print(`commit bench (issue 9)${settle ? '' : ' [--no-settle: fresh copies not made durable before each run]'}; fixtures:`);
      for (const f of ['commitBig', 'commitMarked', 'commitTera']) if (ctx.built(f)) print(`  ${f}: ${FIXTURES[f].desc()}`);
      const rssBad = [];
      for (const r of my) {
        print(`  ${r.name} — ${r.desc}: ${r.status === 'OK' ? `qemu-img ${fmt(r.qemuMs)}, qcowkit ${fmt(r.qcowkitMs)}, ${r.ratio === null ? '-' : r.ratio.toFixed(2) + 'x'}${r.target !== null ? ` (target <= ${r.target?.ratio ?? r.target}x: ${r.targetResult})` : ''}` : `${r.status}: ${r.message}`}`);
        for (const n of r.notes ?? []) print(`      ${n}`);
        for (const s of r.qcowkit ?? []) if (s.rssKb !== null && s.rssKb / 1024 >= RSS_TARGET_MIB) rssBad.push(`${r.name} ${(s.rssKb / 1024).toFixed(0)} MiB`);
      }
      const maxK = Math.max(0, ...my.flatMap((r) => (r.qcowkit ?? []).map((s) => s.rssKb ?? 0)));
      const maxQ = Math.max(0, ...my.flatMap((r) => (r.name.startsWith('durable') ? [] : (r.qemu ?? []).map((s) => s.rssKb ?? 0))));
      print(`  peak RSS (max over all timed runs): qcowkit ${(maxK / 1024).toFixed(1)} MiB (target < ${RSS_TARGET_MIB} MiB: ${rssBad.length ? 'FAIL ' + rssBad.join(', ') : 'PASS'}), qemu-img ${(maxQ / 1024).toFixed(1)} MiB`);
    },
  };
}

const fmt = (ms) => (ms === null || ms === undefined ? '-' : `${ms.toFixed(0)} ms`);

/** Whether the filesystem holding `dir` is mounted with the discard option (frees wait for the device). */
function mountHasDiscard(dir) {
  try {
    const mounts = readFileSync('/proc/mounts', 'utf8').split('\n').map((l) => l.split(' ')).filter((f) => f.length > 3);
    const real = realpathSync(dir);
    const m = mounts.filter((f) => real === f[1] || real.startsWith(f[1].endsWith('/') ? f[1] : `${f[1]}/`)).sort((a, b) => b[1].length - a[1].length)[0];
    return m ? m[3].split(',').includes('discard') : false;
  } catch {
    return false;
  }
}

function space(path) {
  const st = statSync(path);
  return { length: st.size, du: st.blocks * 512 };
}

function fmtSpace(s) {
  const m = (n) => (n >= 10 * MiB ? `${(n / MiB).toFixed(0)} MiB` : `${(n / 1024).toFixed(0)} KiB`);
  return `length ${m(s.length)}, du ${m(s.du)}`;
}

/** Bitmaps (name, flags, granularity) and snapshots (id, name, vm-state) as qemu-img info shows them. */
function marks(info) {
  const bitmaps = (info['format-specific']?.data?.bitmaps ?? []).map((b) => ({ name: b.name, flags: b.flags, granularity: b.granularity }));
  const snapshots = (info.snapshots ?? []).map((s) => ({ id: s.id, name: s.name, vmState: s['vm-state-size'] }));
  return { bitmaps, snapshots };
}
