#!/usr/bin/env node
// qcowkit vs qemu-img benchmark.
//
//   npm run bench                         full run (~2-4 min on 2 cores)
//   node bench/run.mjs --quick            smaller images, 3 runs each (smoke run)
//   node bench/run.mjs --only map-scattered,check-scattered --runs 9
//   node bench/run.mjs --list             list the workloads
//
// Options: --quick, --runs N (exact, disables the adaptive cut for slow workloads),
// --only a,b (workload names or kinds: info, map, check, compare, create, commit, rebase),
// --keep (keep the temp dir), --strict (exit 1 when a target FAILs too), --bin FILE (another
// qcowkit launcher, e.g. of another checkout), --help.
//
// Every workload is first run once with each tool and the answers are compared (a benchmark
// of wrong answers is worthless): a MISMATCH or a FAILED row makes the exit code 1. Then the
// tools run alternately (qemu-img, qcowkit, qemu-img, ...) and the medians are reported.
// Wall time is measured with process.hrtime around spawnSync, peak RSS of the child with
// `/usr/bin/time -f '%e %M %U %S'` (when available; also the CPU time of each run). Results also go to bench/results/latest.json
// (bench/results/latest-custom-bin.json with --bin).
//
// All images are built with qemu-img / qemu-io in a temp dir (removed at the end); they are
// sparse, so a full run uses ~1 GB of real disk although the images are 256 GiB - 1 TiB.

import { spawnSync } from 'node:child_process';
import {
  closeSync,
  copyFileSync,
  existsSync,
  fdatasyncSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readFileSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { cpus, loadavg, tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { registerCommitBench } from './commit.mjs';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
let BIN = join(ROOT, 'bin', 'qcowkit.js');
const RESULTS_DIR = join(ROOT, 'bench', 'results');
const QEMU_IMG = 'qemu-img';
const QEMU_IO = 'qemu-io';
const TIME = '/usr/bin/time';
const SPAWN_TIMEOUT_MS = 3 * 60_000; // a hung command fails its row instead of stalling the bench
const SLOW_BUDGET_S = 40; // adaptive: a workload's timed runs should take about this long at most

// ---------------------------------------------------------------- options

const HELP = `Usage: node bench/run.mjs [--quick] [--runs N] [--only a,b] [--keep] [--strict] [--list]
  --quick     small images (16 GiB / 64 GiB, 20-deep chain, 200 writes) and 3 runs each
  --runs N    exactly N timed runs per tool and workload (default 5, fewer for slow ones)
  --only a,b  run only these workloads (names or kinds, see --list)
  --keep      keep the temp dir with the images
  --strict    also exit 1 when a performance target FAILs
  --bin FILE  benchmark this qcowkit launcher instead of bin/qcowkit.js (e.g. another checkout)
  --reuse DIR use (and add to) the images of an earlier --keep run in DIR (implies --keep)
  --list      list the workloads and exit`;

function parseArgs(argv) {
  const o = { quick: false, runs: undefined, only: undefined, keep: false, strict: false, list: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const val = () => {
      const eq = a.indexOf('=');
      if (eq >= 0) return a.slice(eq + 1);
      if (i + 1 >= argv.length) die(`option ${a} needs a value`);
      return argv[++i];
    };
    if (a === '--quick') o.quick = true;
    else if (a === '--keep') o.keep = true;
    else if (a === '--strict') o.strict = true;
    else if (a === '--list') o.list = true;
    else if (a === '--bin' || a.startsWith('--bin=')) o.bin = resolve(val());
    else if (a === '--reuse' || a.startsWith('--reuse=')) {
      o.reuse = resolve(val());
      o.keep = true;
    }
    else if (a === '--help' || a === '-h') {
      console.log(HELP);
      process.exit(0);
    } else if (a === '--runs' || a.startsWith('--runs=')) {
      const n = Number(val());
      if (!Number.isInteger(n) || n < 1) die(`--runs needs a positive integer`);
      o.runs = n;
    } else if (a === '--only' || a.startsWith('--only=')) {
      o.only = val()
        .split(',')
        .map((s) => s.trim())
        .filter(Boolean);
    } else die(`unknown option ${a}\n${HELP}`);
  }
  return o;
}

function die(msg) {
  console.error(`bench: ${msg}`);
  process.exit(2);
}

const opts = parseArgs(process.argv.slice(2));
if (opts.bin) BIN = opts.bin;
const Q = opts.quick;
const CFG = {
  chainDepth: Q ? 20 : 100,
  preallocSize: Q ? '16G' : '256G',
  scatterSize: Q ? 64 * 2 ** 30 : 2 ** 40,
  scatterWrites: Q ? 200 : 2000,
  scatterZeroWrites: Q ? 10 : 100,
  randomSize: Q ? 16 * 2 ** 30 : 64 * 2 ** 30,
  randomClusters: Q ? 65536 : 262144,
  chain10Size: Q ? 16 * 2 ** 30 : 64 * 2 ** 30,
  chain10Writes: Q ? 200 : 2000,
  defaultRuns: opts.runs ?? (Q ? 3 : 5),
  adaptive: opts.runs === undefined,
};
const SIZE_LABEL = (n) => (n >= 2 ** 40 ? `${n / 2 ** 40}T` : `${n / 2 ** 30}G`);

// ---------------------------------------------------------------- process running

let tmpRoot = '';
let ioDir = '';
let seq = 0;
let haveTime = false;

function log(s) {
  process.stderr.write(s + '\n');
}

/**
 * Run a command (untimed helper); throws with its stderr when it fails (unless allowFail).
 * @param {string} cmd @param {string[]} args
 * @param {{ cwd?: string, input?: string | Buffer, allowFail?: boolean }} [opts]
 */
function sh(cmd, args, { cwd = tmpRoot, input, allowFail = false } = {}) {
  const r = spawnSync(cmd, args, {
    cwd,
    input,
    encoding: 'utf8',
    maxBuffer: 512 * 2 ** 20,
    timeout: SPAWN_TIMEOUT_MS,
    stdio: [input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'],
  });
  if (!allowFail && (r.error || r.status !== 0)) {
    const why = r.error ? r.error.message : `exit ${r.status ?? r.signal}`;
    throw new Error(`${cmd} ${args.join(' ')} (${why}):\n${(r.stderr || '').trim()}`);
  }
  return r;
}

/**
 * Run one measured command. stdout/stderr go to files (no pipe-buffer limits or costs that
 * differ between tools); wall time via hrtime around spawnSync; peak RSS via /usr/bin/time.
 */
function measure(tool, args, cwd) {
  const n = seq++;
  const outF = join(ioDir, `${n}.out`);
  const errF = join(ioDir, `${n}.err`);
  const timeF = join(ioDir, `${n}.time`);
  const [cmd, cmdArgs] = tool === 'qemu-img' ? [QEMU_IMG, args] : tool === 'qcowkit' ? [process.execPath, [BIN, ...args]] : tool;
  const outFd = openSync(outF, 'w');
  const errFd = openSync(errF, 'w');
  let r;
  let ms;
  try {
    const [c, a] = haveTime ? [TIME, ['-f', '%e %M %U %S', '-o', timeF, cmd, ...cmdArgs]] : [cmd, cmdArgs];
    const t0 = process.hrtime.bigint();
    r = spawnSync(c, a, { cwd, stdio: ['ignore', outFd, errFd], timeout: SPAWN_TIMEOUT_MS, killSignal: 'SIGKILL' });
    ms = Number(process.hrtime.bigint() - t0) / 1e6;
  } finally {
    closeSync(outFd);
    closeSync(errFd);
  }
  const stdout = readFileSync(outF, 'utf8');
  const stderr = readFileSync(errF, 'utf8');
  let rssKb = null;
  let cpuMs = null;
  if (haveTime && existsSync(timeF)) {
    // GNU time prepends "Command exited with non-zero status N" when the child fails.
    const last = readFileSync(timeF, 'utf8').trim().split('\n').pop() ?? '';
    const m = /^([\d.]+) (\d+) ([\d.]+) ([\d.]+)$/.exec(last.trim());
    if (m) {
      rssKb = Number(m[2]);
      // user + system CPU (10 ms resolution): unlike wall time, barely moved by other load.
      cpuMs = (Number(m[3]) + Number(m[4])) * 1000;
    }
  }
  for (const f of [outF, errF, timeF]) rmSync(f, { force: true });
  const error = r.error ? r.error.message : r.signal ? `killed by ${r.signal}` : null;
  return { code: r.status, error, stdout, stderr, ms, rssKb, cpuMs };
}

// ---------------------------------------------------------------- fixtures (built lazily)

/** Deterministic PRNG (LCG), so every run of the bench builds the same images. */
function rng(seed) {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1103515245) + 12345) >>> 0;
    return s / 2 ** 32;
  };
}

/** Write `count` 64 KiB chunks at pseudo-random 4 KiB-aligned offsets (many straddle two clusters)
 * plus `zeros` zero-writes (zero clusters) in one qemu-io invocation (script on stdin). */
function scatterWrites(file, size, count, zeros, seed, cwd) {
  const r = rng(seed);
  const cmds = [];
  for (let i = 0; i < count; i++) {
    const off = Math.floor(r() * (size / 4096 - 16)) * 4096;
    cmds.push(`write -P ${(i % 255) + 1} ${off} 64k`);
  }
  for (let i = 0; i < zeros; i++) {
    const off = Math.floor(r() * (size / 65536 - 1)) * 65536;
    cmds.push(`write -z ${off} 64k`);
  }
  cmds.push('quit');
  sh(QEMU_IO, ['-f', 'qcow2', file], { cwd, input: cmds.join('\n') + '\n' });
  // qemu-io reports write errors on stdout and still exits 0: make sure the image is sound.
  sh(QEMU_IMG, ['check', '-q', file], { cwd });
}

function sparseCopy(src, dst) {
  const r = spawnSync('cp', ['--sparse=always', src, dst], { stdio: 'ignore' });
  if (r.status !== 0) copyFileSync(src, dst);
}

const FIXTURES = {
  chain: {
    desc: () => `${CFG.chainDepth} overlays over a 10 GiB base`,
    build() {
      const dir = join(tmpRoot, 'chain');
      mkdirSync(dir);
      sh(QEMU_IMG, ['create', '-q', '-f', 'qcow2', 'base.qcow2', '10G'], { cwd: dir });
      sh(QEMU_IO, ['-f', 'qcow2', '-c', 'write -P 0xaa 0 1M', '-c', 'write -P 0xbb 5G 1M', 'base.qcow2'], { cwd: dir });
      let prev = 'base.qcow2';
      for (let i = 1; i <= CFG.chainDepth; i++) {
        const name = `l${String(i).padStart(3, '0')}.qcow2`;
        sh(QEMU_IMG, ['create', '-q', '-f', 'qcow2', '-b', prev, '-F', 'qcow2', name], { cwd: dir });
        if (i % 10 === 0) sh(QEMU_IO, ['-f', 'qcow2', '-c', `write -P ${i} ${i}M 64k`, name], { cwd: dir });
        prev = name;
      }
      return { dir, base: 'base.qcow2', top: prev };
    },
  },
  prealloc: {
    desc: () => `${CFG.preallocSize} preallocation=metadata`,
    build() {
      const dir = join(tmpRoot, 'pre');
      mkdirSync(dir);
      sh(QEMU_IMG, ['create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', 'pre.qcow2', CFG.preallocSize], { cwd: dir });
      return { dir, img: 'pre.qcow2' };
    },
  },
  scattered: {
    desc: () => `${SIZE_LABEL(CFG.scatterSize)} with ${CFG.scatterWrites} x 64 KiB writes + ${CFG.scatterZeroWrites} zero writes`,
    build() {
      const dir = join(tmpRoot, 'sc');
      mkdirSync(dir);
      sh(QEMU_IMG, ['create', '-q', '-f', 'qcow2', 'sc.qcow2', String(CFG.scatterSize)], { cwd: dir });
      scatterWrites('sc.qcow2', CFG.scatterSize, CFG.scatterWrites, CFG.scatterZeroWrites, 42, dir);
      return { dir, img: 'sc.qcow2' };
    },
  },
  random: {
    desc: () => `${SIZE_LABEL(CFG.randomSize)} with ${CFG.randomClusters} clusters written in random order (4 KiB each, host file sparse)`,
    build() {
      const dir = join(tmpRoot, 'rnd');
      mkdirSync(dir);
      sh(QEMU_IMG, ['create', '-q', '-f', 'qcow2', 'full.qcow2', String(CFG.randomSize)], { cwd: dir });
      // Distinct clusters in random order (host order != guest order: no two entries merge),
      // a 4 KiB write at a random place in each. QEMU zero-fills the rest of every new cluster;
      // the sparse copy turns that into host holes, so map probes every cluster (QEMU's
      // metadata-preallocation heuristic) and reports zero / data / zero pieces: ~3.6 entries
      // per cluster.
      const r = rng(4242);
      const clusters = CFG.randomSize / 65536;
      const idx = new Uint32Array(clusters);
      for (let i = 0; i < clusters; i++) idx[i] = i;
      for (let i = clusters - 1; i > 0; i--) {
        const j = Math.floor(r() * (i + 1));
        [idx[i], idx[j]] = [idx[j], idx[i]];
      }
      const cmds = [];
      for (let i = 0; i < CFG.randomClusters; i++) cmds.push(`write -P ${(i % 255) + 1} ${idx[i] * 65536 + Math.floor(r() * 16) * 4096} 4k`);
      cmds.push('quit');
      sh(QEMU_IO, ['-t', 'unsafe', '-f', 'qcow2', 'full.qcow2'], { cwd: dir, input: cmds.join('\n') + '\n' });
      sh('cp', ['--sparse=always', 'full.qcow2', 'rnd.qcow2'], { cwd: dir });
      rmSync(join(dir, 'full.qcow2'));
      sh(QEMU_IMG, ['check', '-q', 'rnd.qcow2'], { cwd: dir });
      return { dir, img: 'rnd.qcow2' };
    },
  },
  chain10: {
    desc: () => `10-deep chain over a ${SIZE_LABEL(CFG.chain10Size)} base, ${CFG.chain10Writes} x 64 KiB scattered writes in every layer`,
    build() {
      const dir = join(tmpRoot, 'c10');
      mkdirSync(dir);
      sh(QEMU_IMG, ['create', '-q', '-f', 'qcow2', 'c00.qcow2', String(CFG.chain10Size)], { cwd: dir });
      scatterWrites('c00.qcow2', CFG.chain10Size, CFG.chain10Writes, CFG.chain10Writes / 100, 100, dir);
      let prev = 'c00.qcow2';
      for (let i = 1; i < 10; i++) {
        const name = `c${String(i).padStart(2, '0')}.qcow2`;
        sh(QEMU_IMG, ['create', '-q', '-f', 'qcow2', '-b', prev, '-F', 'qcow2', name], { cwd: dir });
        scatterWrites(name, CFG.chain10Size, CFG.chain10Writes, CFG.chain10Writes / 100, 100 + i, dir);
        prev = name;
      }
      return { dir, top: prev };
    },
  },
  copies: {
    desc: () => 'cp --sparse=always and qemu-img convert copies of the scattered image',
    deps: ['scattered'],
    build(F) {
      const { dir, img } = F.scattered;
      sparseCopy(join(dir, img), join(dir, 'copy.qcow2'));
      sh(QEMU_IMG, ['convert', '-f', 'qcow2', '-O', 'qcow2', img, 'conv.qcow2'], { cwd: dir });
      return { dir, img, copy: 'copy.qcow2', conv: 'conv.qcow2' };
    },
  },
  mutable: {
    desc: () => '4 GiB base + overlay + different new base (copied fresh for every run)',
    build() {
      const dir = join(tmpRoot, 'mut');
      mkdirSync(dir);
      const size = 4 * 2 ** 30;
      sh(QEMU_IMG, ['create', '-q', '-f', 'qcow2', 'base.qcow2', String(size)], { cwd: dir });
      scatterWrites('base.qcow2', size, 300, 10, 1, dir);
      sh(QEMU_IMG, ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'], { cwd: dir });
      scatterWrites('top.qcow2', size, 300, 10, 2, dir);
      sh(QEMU_IMG, ['create', '-q', '-f', 'qcow2', 'new.qcow2', String(size)], { cwd: dir });
      scatterWrites('new.qcow2', size, 300, 10, 3, dir);
      return { dir, files: ['base.qcow2', 'top.qcow2', 'new.qcow2'] };
    },
  },
  bitmaps: {
    desc: () => '1 TiB (64 KiB clusters) with 64 KiB-granularity bitmaps: full (all dirty), frag (random runs over the whole disk), dst (empty, disabled); other.qcow2 (1 TiB) with frag2',
    build() {
      const dir = join(tmpRoot, 'bm');
      mkdirSync(dir);
      for (const f of ['big.qcow2', 'other.qcow2']) sh(QEMU_IMG, ['create', '-q', '-f', 'qcow2', f, '1T'], { cwd: dir });
      for (const b of ['full', 'frag']) sh(QEMU_IMG, ['bitmap', '--add', 'big.qcow2', b], { cwd: dir });
      sh(QEMU_IMG, ['bitmap', '--add', '--disable', 'big.qcow2', 'dst'], { cwd: dir });
      sh(QEMU_IMG, ['bitmap', '--add', 'other.qcow2', 'frag2'], { cwd: dir });
      // Contents written through qcowkit's library (QEMU has no fast way to dirty 1 TiB).
      const helper = join(ROOT, 'bench', 'bitmap-helper.mjs');
      sh(process.execPath, [helper, 'fill', 'big.qcow2', 'full', 'full'], { cwd: dir });
      sh(process.execPath, [helper, 'fill', 'big.qcow2', 'frag', 'frag', '7'], { cwd: dir });
      sh(process.execPath, [helper, 'fill', 'other.qcow2', 'frag2', 'frag', '8'], { cwd: dir });
      for (const f of ['big.qcow2', 'other.qcow2']) sh(QEMU_IMG, ['check', '-q', f], { cwd: dir });
      return { dir, files: ['big.qcow2', 'other.qcow2'] };
    },
  },
  dropmid: {
    desc: () => `${Q ? 2 : 8} GiB chain base <- mid (${Q ? 100 : 400} x 1 MiB) <- top (1000 x 64 KiB); rebase top onto base`,
    build() {
      const dir = join(tmpRoot, 'dropmid');
      mkdirSync(dir);
      const size = (Q ? 2 : 8) * 2 ** 30;
      const writes = Q ? 100 : 400;
      sh(QEMU_IMG, ['create', '-q', '-f', 'qcow2', 'base.qcow2', String(size)], { cwd: dir });
      sh(QEMU_IO, ['-f', 'qcow2', '-c', 'write -P 0xaa 0 256M', '-c', `write -P 0xbb ${size / 2} 64M`, 'base.qcow2'], { cwd: dir });
      sh(QEMU_IMG, ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'mid.qcow2'], { cwd: dir });
      const step = Math.floor(size / writes / 2 ** 20) * 2 ** 20;
      const cmds = [];
      for (let i = 0; i < writes; i++) cmds.push('-c', `write -P ${(i % 250) + 1} ${i * step} 1M`);
      sh(QEMU_IO, ['-f', 'qcow2', ...cmds, 'mid.qcow2'], { cwd: dir });
      sh(QEMU_IMG, ['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2'], { cwd: dir });
      scatterWrites('top.qcow2', size, Q ? 200 : 1000, 10, 7, dir);
      return { dir, files: ['top.qcow2'], shared: ['base.qcow2', 'mid.qcow2'] };
    },
  },
};

const built = {};
function fixture(name) {
  if (name in built) {
    if (built[name] instanceof Error) throw built[name];
    return built[name];
  }
  const fx = FIXTURES[name];
  const F = {};
  for (const d of fx.deps ?? []) F[d] = fixture(d);
  // --reuse: fixtures built by an earlier run with the same size options are listed here.
  const index = join(tmpRoot, 'fixtures.json');
  const known = existsSync(index) ? JSON.parse(readFileSync(index, 'utf8')) : {};
  const key = `${name}${Q ? ' (quick)' : ''}`;
  if (known[key]) {
    log(`  reusing fixture ${name} (${fx.desc()})`);
    return (built[name] = known[key]);
  }
  log(`  building fixture ${name} (${fx.desc()}) ...`);
  const t0 = Date.now();
  try {
    built[name] = fx.build(F);
  } catch (e) {
    built[name] = e instanceof Error ? e : new Error(String(e));
    throw built[name];
  }
  log(`  ... ${name} built in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  writeFileSync(index, JSON.stringify({ ...known, [key]: built[name] }, null, 2));
  return built[name];
}

// ---------------------------------------------------------------- answer checks

/** First difference of `k` from `q` on the fields q has (extra fields of k are fine), or null. */
function subsetDiff(q, k, path = '$', ignore = new Set()) {
  if (Array.isArray(q)) {
    if (!Array.isArray(k)) return `${path}: qemu-img has an array, qcowkit ${JSON.stringify(k)}`;
    if (q.length !== k.length) return `${path}: qemu-img has ${q.length} entries, qcowkit ${k.length}`;
    for (let i = 0; i < q.length; i++) {
      const d = subsetDiff(q[i], k[i], `${path}[${i}]`, ignore);
      if (d) return d;
    }
    return null;
  }
  if (q !== null && typeof q === 'object') {
    if (k === null || typeof k !== 'object' || Array.isArray(k)) return `${path}: qemu-img has an object, qcowkit ${JSON.stringify(k)}`;
    for (const key of Object.keys(q)) {
      if (ignore.has(key)) continue;
      if (!(key in k)) return `${path}.${key}: missing in qcowkit (qemu-img: ${JSON.stringify(q[key])})`;
      const d = subsetDiff(q[key], k[key], `${path}.${key}`, ignore);
      if (d) return d;
    }
    return null;
  }
  return q === k ? null : `${path}: qemu-img ${JSON.stringify(q)}, qcowkit ${JSON.stringify(k)}`;
}

/** Byte-identical stdout (map JSON of ~1 M entries: comparing text is cheaper than parsing it). */
function mapTextCheck(q, k) {
  if (q.code !== k.code) return `exit codes differ: qemu-img ${q.code}, qcowkit ${k.code}`;
  if (q.stdout === k.stdout) return null;
  return jsonCheck(true)(q, k) ?? 'stdout not byte-identical (same JSON)';
}

/** Exact deep equality (map JSON must be identical, entry for entry). */
function exactDiff(q, k) {
  return subsetDiff(q, k) ?? subsetDiff(k, q)?.replace(/qemu-img|qcowkit/g, (m) => (m === 'qemu-img' ? 'qcowkit' : 'qemu-img'));
}

function parseJson(text, who) {
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new Error(`${who} printed invalid JSON (${e.message}): ${text.slice(0, 200)}`);
  }
}

function jsonCheck(exact) {
  return (q, k) => {
    if (q.code !== k.code) return `exit codes differ: qemu-img ${q.code}, qcowkit ${k.code}`;
    const a = parseJson(q.stdout, 'qemu-img');
    const b = parseJson(k.stdout, 'qcowkit');
    return exact ? exactDiff(a, b) : subsetDiff(a, b);
  };
}

function textCheck(q, k) {
  if (q.code !== k.code) return `exit codes differ: qemu-img ${q.code}, qcowkit ${k.code}`;
  if (q.stdout === k.stdout) return null;
  const a = q.stdout.split('\n');
  const b = k.stdout.split('\n');
  for (let i = 0; i < Math.max(a.length, b.length); i++) {
    if (a[i] !== b[i]) return `stdout line ${i + 1}: qemu-img ${JSON.stringify(a[i])}, qcowkit ${JSON.stringify(b[i])}`;
  }
  return 'stdout differs';
}

function qemuInfo(file, cwd) {
  return JSON.parse(sh(QEMU_IMG, ['info', '--output', 'json', file], { cwd }).stdout);
}

function qemuCompare(a, b, cwd) {
  const r = sh(QEMU_IMG, ['compare', '-f', 'qcow2', '-F', 'qcow2', a, b], { cwd, allowFail: true });
  return r.status === 0 ? null : `qemu-img compare ${a} ${b}: ${(r.stdout + r.stderr).trim()}`;
}

function qemuCheckClean(file, cwd) {
  const r = sh(QEMU_IMG, ['check', file], { cwd, allowFail: true });
  return r.status === 0 ? null : `qemu-img check ${file} (exit ${r.status}): ${(r.stdout + r.stderr).trim().split('\n').slice(0, 3).join(' | ')}`;
}

// ---------------------------------------------------------------- workloads

/** Exit codes of a kind that are answers, not errors (anything else from qcowkit = FAILED). */
const ANSWER_CODES = { check: [0, 2, 3], compare: [0, 1] };
const TARGETS = { map: 0.5, check: 0.5, info: 1.5, create: 1.5, rebase: 0.7 };

function createWorkload(name, extra, fx, target) {
  return {
    name,
    kind: 'create',
    short: true,
    target,
    fixtures: fx ? [fx] : [],
    prepare(F, tool, i) {
      const cwd = fx ? F[fx].dir : tmpRoot;
      const out = `bench-create-${tool === 'qemu-img' ? 'q' : 'k'}-${i}.qcow2`;
      return { cwd, args: ['create', '-f', 'qcow2', ...extra(F), out, ...(fx ? [] : ['10G'])], out, cleanup: () => rmSync(join(cwd, out), { force: true }) };
    },
    verify(q, k) {
      if (q.code !== k.code) return `exit codes differ: qemu-img ${q.code}, qcowkit ${k.code}`;
      const cwd = q.prep.cwd;
      const d = subsetDiff(qemuInfo(q.prep.out, cwd), qemuInfo(k.prep.out, cwd), '$', new Set(['filename', 'actual-size']));
      if (d) return `qemu-img info of the created images: ${d}`;
      const c = qemuCheckClean(k.prep.out, cwd);
      if (c) return c;
      const notes = [];
      const norm = (r) => r.stdout.split(r.prep.out).join('OUT');
      if (norm(q) !== norm(k)) notes.push(`stdout differs: qemu-img ${JSON.stringify(norm(q).trim())}, qcowkit ${JSON.stringify(norm(k).trim())}`);
      const same = readFileSync(join(cwd, q.prep.out)).equals(readFileSync(join(cwd, k.prep.out)));
      notes.push(same ? 'files byte-identical' : 'files not byte-identical (same qemu-img info)');
      return { notes };
    },
  };
}

function imageWorkload(name, kind, fx, argsOf, verify, extra = {}) {
  return {
    name,
    kind,
    fixtures: [fx],
    prepare: (F) => ({ cwd: F[fx].dir, args: argsOf(F[fx]) }),
    verify,
    ...extra,
  };
}

/**
 * commit / rebase: they modify the images, so every run gets fresh copies (untimed) of the
 * fixture's `files`; its `shared` files (only read) are symlinked into the run directory.
 */
function mutatingWorkload(name, kind, args, verify, fx = 'mutable', target = undefined) {
  return {
    name,
    kind,
    target,
    optional: true,
    fixtures: [fx],
    prepare(F, tool, i) {
      const cwd = join(F[fx].dir, `run-${tool === 'qemu-img' ? 'q' : 'k'}-${i}`);
      mkdirSync(cwd, { recursive: true });
      for (const f of F[fx].files) sparseCopy(join(F[fx].dir, f), join(cwd, f));
      for (const f of F[fx].shared ?? []) symlinkSync(join(F[fx].dir, f), join(cwd, f));
      // The fresh copies made durable (untimed): otherwise either tool's first fdatasync also
      // writes back what the copy left in the page cache.
      sh('sync', ['-d', ...F[fx].files], { cwd });
      return { cwd, args, cleanup: () => rmSync(cwd, { recursive: true, force: true }) };
    },
    verify(q, k, F) {
      if (q.code !== k.code) return `exit codes differ: qemu-img ${q.code}, qcowkit ${k.code}`;
      return verify(q.prep.cwd, k.prep.cwd, F[fx].dir);
    },
  };
}

/**
 * Fresh copies of the bitmap fixture in `dir`, durable and in the page cache: without the
 * fdatasync the copies' dirty pages would be written back by the first flush of the timed run.
 */
function bitmapCopies(F, dir) {
  mkdirSync(dir, { recursive: true });
  for (const f of F.files) {
    sparseCopy(join(F.dir, f), join(dir, f));
    const fd = openSync(join(dir, f), 'r+');
    try {
      fdatasyncSync(fd);
    } finally {
      closeSync(fd);
    }
    readFileSync(join(dir, f));
  }
}

/**
 * bitmap: each run gets fresh copies; the changed bitmap must read back the same from both. Held
 * to a bare Node start + 15 ms (issue 11), fdatasyncs included.
 */
function bitmapWorkload(name, args, changed) {
  return {
    name,
    kind: 'bitmap',
    target: { overNodeMs: 15 },
    fixtures: ['bitmaps'],
    prepare(F, tool, i) {
      const cwd = join(F.bitmaps.dir, `run-${tool === 'qemu-img' ? 'q' : 'k'}-${i}`);
      bitmapCopies(F.bitmaps, cwd);
      return { cwd, args, cleanup: () => rmSync(cwd, { recursive: true, force: true }) };
    },
    verify(q, k) {
      if (q.code !== k.code) return `exit codes differ: qemu-img ${q.code}, qcowkit ${k.code}`;
      const [qd, kd] = [q.prep.cwd, k.prep.cwd];
      const c = qemuCheckClean(join(kd, 'big.qcow2'), tmpRoot);
      if (c) return c;
      const bm = (d) => qemuInfo('big.qcow2', d)['format-specific'].data.bitmaps;
      const d = exactDiff(bm(qd), bm(kd));
      if (d) return `qemu-img info bitmaps: ${d}`;
      const helper = join(ROOT, 'bench', 'bitmap-helper.mjs');
      const hash = (dir) => sh(process.execPath, [helper, 'hash', 'big.qcow2', changed], { cwd: dir }).stdout.trim();
      if (hash(qd) !== hash(kd)) return `contents of bitmap ${changed} differ`;
      const size = (dir) => Number(sh('du', ['-k', 'big.qcow2'], { cwd: dir }).stdout.split('\t')[0]);
      return { notes: [`${changed} read back equal; disk use after: qemu-img ${size(qd)} KiB, qcowkit ${size(kd)} KiB`] };
    },
  };
}

/**
 * The disk's floor for what a rebase wrote: as many bytes as qcowkit's top grew by (du), from the
 * page cache (mid.qcow2), written by one stream of 8 MiB O_DIRECT writes and fdatasync'ed by dd;
 * median of 3. A copy that must be durable cannot end sooner (bar start-up overlapping it).
 */
function directWriteFloor(kd, orig) {
  const du = (f) => statSync(f).blocks * 512;
  const bytes = du(join(kd, 'top.qcow2')) - du(join(orig, 'top.qcow2'));
  if (bytes <= 0) return null;
  const out = join(orig, 'floor.bin');
  const ms = [];
  try {
    for (let i = 0; i < 3; i++) {
      rmSync(out, { force: true });
      const t = performance.now();
      sh('dd', ['if=mid.qcow2', `of=${out}`, 'bs=8M', `count=${bytes}`, 'iflag=count_bytes', 'oflag=direct', 'conv=fdatasync', 'status=none'], { cwd: orig });
      ms.push(performance.now() - t);
    }
  } finally {
    rmSync(out, { force: true });
  }
  const floor = median(ms);
  return { notes: [`direct-write floor of this disk for the ${(bytes / 2 ** 20).toFixed(0)} MiB qcowkit wrote: ${floor.toFixed(0)} ms (dd, 8 MiB O_DIRECT writes + fdatasync, median of 3); compare 0.7x qemu-img's time with it`] };
}

/** rebase: same backing name and format as qemu-img writes, guest view unchanged, same content, clean. */
function rebaseVerify(qd, kd, orig) {
  const qi = qemuInfo('top.qcow2', qd);
  const ki = qemuInfo('top.qcow2', kd);
  for (const key of ['backing-filename', 'backing-filename-format']) {
    if (qi[key] !== ki[key]) return `${key}: qemu-img ${JSON.stringify(qi[key])}, qcowkit ${JSON.stringify(ki[key])}`;
  }
  return (
    qemuCompare(join(orig, 'top.qcow2'), join(kd, 'top.qcow2'), orig) ?? // guest view unchanged by rebase
    qemuCompare(join(qd, 'top.qcow2'), join(kd, 'top.qcow2'), tmpRoot) ??
    qemuCheckClean(join(kd, 'top.qcow2'), tmpRoot)
  );
}

const WORKLOADS = [
  createWorkload('create-10G', () => [], null, { overNodeMs: 15 }),
  createWorkload('create-backing', (F) => ['-b', F.chain.base, '-F', 'qcow2'], 'chain', { overNodeMs: 15 }),
  imageWorkload('info-chain-json', 'info', 'chain', (c) => ['info', '--backing-chain', '--output', 'json', c.top], jsonCheck(false), { short: true, target: { ratio: 2.0 } }),
  imageWorkload('info-top', 'info', 'chain', (c) => ['info', c.top], textCheck, { short: true, target: { overNodeMs: 15 } }),
  imageWorkload('info-small', 'info', 'chain', (c) => ['info', c.base], textCheck, { short: true, target: { overNodeMs: 15 } }),
  imageWorkload('map-chain', 'map', 'chain', (c) => ['map', '--output', 'json', c.top], jsonCheck(true)),
  imageWorkload('map-chain10', 'map', 'chain10', (c) => ['map', '--output', 'json', c.top], jsonCheck(true), { target: { ratio: 0.7 } }),
  imageWorkload('map-prealloc', 'map', 'prealloc', (p) => ['map', '--output', 'json', p.img], jsonCheck(true), { target: { ratio: 1.0 } }),
  imageWorkload('map-scattered', 'map', 'scattered', (s) => ['map', '--output', 'json', s.img], jsonCheck(true)),
  imageWorkload('map-random', 'map', 'random', (r) => ['map', '--output', 'json', r.img], mapTextCheck, { target: { ratio: 0.5 } }),
  imageWorkload('check-prealloc', 'check', 'prealloc', (p) => ['check', '--output', 'json', p.img], jsonCheck(false)),
  imageWorkload('check-scattered', 'check', 'scattered', (s) => ['check', '--output', 'json', s.img], jsonCheck(false)),
  imageWorkload('compare-copy', 'compare', 'copies', (c) => ['compare', c.img, c.copy], textCheck),
  imageWorkload('compare-convert', 'compare', 'copies', (c) => ['compare', c.img, c.conv], textCheck),
  bitmapWorkload('bitmap-merge-full', ['bitmap', '--merge', 'full', 'big.qcow2', 'dst'], 'dst'),
  bitmapWorkload('bitmap-merge-frag', ['bitmap', '--merge', 'frag', 'big.qcow2', 'dst'], 'dst'),
  bitmapWorkload('bitmap-merge-file', ['bitmap', '--merge', 'frag2', '-b', 'other.qcow2', '-F', 'qcow2', 'big.qcow2', 'dst'], 'dst'),
  bitmapWorkload('bitmap-add', ['bitmap', '--add', 'big.qcow2', 'new'], 'new'),
  bitmapWorkload('bitmap-clear', ['bitmap', '--clear', 'big.qcow2', 'frag'], 'frag'),
  mutatingWorkload('commit', 'commit', ['commit', 'top.qcow2'], (qd, kd) => {
    return (
      qemuCompare(join(qd, 'base.qcow2'), join(kd, 'base.qcow2'), tmpRoot) ??
      qemuCompare(join(qd, 'top.qcow2'), join(kd, 'top.qcow2'), tmpRoot) ??
      qemuCheckClean(join(kd, 'base.qcow2'), tmpRoot) ??
      qemuCheckClean(join(kd, 'top.qcow2'), tmpRoot)
    );
  }),
  mutatingWorkload('rebase', 'rebase', ['rebase', '-b', 'new.qcow2', '-F', 'qcow2', 'top.qcow2'], rebaseVerify),
  mutatingWorkload('rebase-drop-mid', 'rebase', ['rebase', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'], (qd, kd, orig) => rebaseVerify(qd, kd, orig) ?? directWriteFloor(kd, orig), 'dropmid'),
  mutatingWorkload(
    'rebase-unsafe',
    'rebase',
    ['rebase', '-u', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'],
    (qd, kd) => {
      const qi = qemuInfo('top.qcow2', qd);
      const ki = qemuInfo('top.qcow2', kd);
      for (const key of ['backing-filename', 'backing-filename-format', 'virtual-size']) {
        if (qi[key] !== ki[key]) return `${key}: qemu-img ${JSON.stringify(qi[key])}, qcowkit ${JSON.stringify(ki[key])}`;
      }
      return qemuCompare(join(qd, 'top.qcow2'), join(kd, 'top.qcow2'), tmpRoot) ?? qemuCheckClean(join(kd, 'top.qcow2'), tmpRoot);
    },
    'dropmid',
    { overNodeMs: 15 }, // a header rewrite: start-up is the cost
  ),
];

const commitBench = registerCommitBench({ WORKLOADS, FIXTURES, CFG, opts, quick: Q, built: (f) => f in built && !(built[f] instanceof Error), h: { sh, measure, sparseCopy, log, median: (xs) => median(xs), qemuInfo, qemuCompare, qemuCheckClean, tmp: () => tmpRoot, bin: () => BIN } });

// ---------------------------------------------------------------- running a workload

const median = (xs) => {
  if (xs.length === 0) return null;
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};

function describeFailure(tool, r) {
  const why = r.error ?? `exit ${r.code}`;
  const err = r.stderr.trim() || r.stdout.trim().slice(0, 500) || '(no output)';
  return `${tool} failed (${why}): ${err.split('\n').slice(0, 8).join('\n    ')}`;
}

function runWorkload(w) {
  const row = { name: w.name, kind: w.kind, status: 'OK', runs: 0, message: null, notes: [], qemu: [], qcowkit: [], workloadTarget: w.target };
  let F;
  try {
    F = {};
    for (const f of w.fixtures) F[f] = fixture(f);
  } catch (e) {
    return { ...row, status: 'FAILED', message: `fixture: ${e.message}` };
  }
  if (w.run) return w.run(row, F);
  const runPair = (i) => {
    const res = {};
    for (const tool of ['qemu-img', 'qcowkit']) {
      const prep = w.prepare(F, tool, i);
      res[tool] = { ...measure(tool, prep.args, prep.cwd), prep };
    }
    return res;
  };
  const cleanup = (res) => {
    for (const r of Object.values(res)) r.prep.cleanup?.();
  };

  // 1. Answer check (also warms the page cache).
  const first = runPair('verify');
  const q = first['qemu-img'];
  const k = first.qcowkit;
  row.args = q.prep.args;
  try {
    const qBad = q.error || (q.code !== 0 && !(ANSWER_CODES[w.kind] ?? []).includes(q.code));
    const kBad = k.error || (k.code !== 0 && !(ANSWER_CODES[w.kind] ?? []).includes(k.code));
    if (qBad) {
      row.status = 'FAILED';
      row.message = describeFailure('qemu-img', q);
    } else if (kBad) {
      if (w.optional && /unknown command/.test(k.stderr)) {
        row.status = 'SKIPPED';
        row.message = `qcowkit has no '${w.kind}' command yet`;
      } else {
        row.status = 'FAILED';
        row.message = describeFailure('qcowkit', k);
      }
    } else {
      const v = w.verify(q, k, F);
      if (typeof v === 'string') {
        row.status = 'MISMATCH';
        row.message = v;
      } else if (v && v.notes) row.notes.push(...v.notes);
    }
  } catch (e) {
    row.status = 'MISMATCH';
    row.message = e.message;
  } finally {
    cleanup(first);
  }
  if (row.status !== 'OK') return row;

  // 2. Timed runs, alternating tools.
  let runs = CFG.defaultRuns;
  const pairS = (q.ms + k.ms) / 1000;
  if (CFG.adaptive && pairS * runs > SLOW_BUDGET_S) runs = Math.max(2, Math.floor(SLOW_BUDGET_S / pairS));
  for (let i = 0; i < runs; i++) {
    const res = runPair(i);
    cleanup(res);
    for (const [tool, key] of [['qemu-img', 'qemu'], ['qcowkit', 'qcowkit']]) {
      const r = res[tool];
      if (r.error || r.code !== q.code) {
        row.status = 'FAILED';
        row.message = `timed run ${i}: ${describeFailure(tool, r)}`;
        return row;
      }
      row[key].push({ ms: r.ms, rssKb: r.rssKb, cpuMs: r.cpuMs });
    }
  }
  row.runs = runs;
  return row;
}

function summarize(row, nodeMs) {
  const s = (xs, f) => median(xs.map(f).filter((v) => v !== null && v !== undefined));
  row.qemuMs = s(row.qemu, (x) => x.ms);
  row.qcowkitMs = s(row.qcowkit, (x) => x.ms);
  row.qemuRssKb = s(row.qemu, (x) => x.rssKb);
  row.qcowkitRssKb = s(row.qcowkit, (x) => x.rssKb);
  row.qemuCpuMs = s(row.qemu, (x) => x.cpuMs);
  row.qcowkitCpuMs = s(row.qcowkit, (x) => x.cpuMs);
  row.ratio = row.qemuMs && row.qcowkitMs !== null ? row.qcowkitMs / row.qemuMs : null;
  row.vsNodeStart = row.qcowkitMs !== null && nodeMs ? row.qcowkitMs / nodeMs : null;
  // A workload's own target: a ratio to qemu-img (a number in row.target), or at most N ms
  // over a bare Node start.
  const own = typeof row.target === 'number' ? { ratio: row.target } : undefined;
  const t = row.workloadTarget ?? own ?? (TARGETS[row.kind] !== undefined ? { ratio: TARGETS[row.kind] } : null);
  row.target = t;
  row.targetLimitMs = t === null ? null : t.ratio !== undefined ? (row.qemuMs ?? 0) * t.ratio : nodeMs + t.overNodeMs;
  row.targetResult = t === null ? null : row.qcowkitMs === null ? 'FAIL' : row.qcowkitMs <= row.targetLimitMs ? 'PASS' : 'FAIL';
  return row;
}

// ---------------------------------------------------------------- output

function table(rows, headers, align) {
  const w = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => String(r[i]).length)));
  const line = (cells) => cells.map((c, i) => (align[i] === 'r' ? String(c).padStart(w[i]) : String(c).padEnd(w[i]))).join('  ');
  return [line(headers), w.map((n) => '-'.repeat(n)).join('  '), ...rows.map(line)].join('\n');
}

const fmtMs = (v) => (v === null || v === undefined ? '-' : v >= 100 ? v.toFixed(0) : v.toFixed(1));
const fmtMb = (kb) => (kb === null || kb === undefined ? '-' : (kb / 1024).toFixed(1));
const fmtX = (v) => (v === null || v === undefined ? '-' : `${v.toFixed(2)}x`);

// ---------------------------------------------------------------- main

function main() {
  if (opts.list) {
    for (const w of WORKLOADS) console.log(`${w.name.padEnd(18)} ${w.kind.padEnd(8)} fixtures: ${w.fixtures.join(', ') || '-'}${'optional' in w && w.optional ? ' (optional)' : ''}`);
    return 0;
  }
  const selected = opts.only ? WORKLOADS.filter((w) => opts.only.includes(w.name) || opts.only.includes(w.kind)) : WORKLOADS;
  if (opts.only) {
    const known = new Set([...WORKLOADS.flatMap((w) => [w.name, w.kind]), 'bitmap-lib']);
    const unknown = opts.only.filter((n) => !known.has(n));
    if (unknown.length) die(`unknown workload(s): ${unknown.join(', ')} (see --list)`);
  }
  if (!opts.bin && !existsSync(join(ROOT, 'dist', 'cli', 'main.js'))) die('dist/ is missing: run `npm run build` first');
  for (const t of [QEMU_IMG, QEMU_IO]) {
    if (spawnSync(t, ['--version'], { stdio: 'ignore' }).status !== 0) die(`${t} not found`);
  }

  tmpRoot = opts.reuse ?? mkdtempSync(join(tmpdir(), 'qcowkit-bench-'));
  ioDir = join(tmpRoot, 'io');
  mkdirSync(ioDir, { recursive: true });
  const removeTmp = () => {
    if (!opts.keep && tmpRoot) rmSync(tmpRoot, { recursive: true, force: true });
  };
  process.on('exit', removeTmp);
  for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => process.exit(130));

  if (existsSync(TIME)) {
    const tf = join(ioDir, 'probe.time');
    const r = spawnSync(TIME, ['-f', '%e %M %U %S', '-o', tf, 'true'], { stdio: 'ignore' });
    haveTime = r.status === 0 && existsSync(tf) && /^[\d.]+ \d+ [\d.]+ [\d.]+$/.test(readFileSync(tf, 'utf8').trim());
  }
  const qemuVersion = sh(QEMU_IMG, ['--version']).stdout.split('\n')[0];
  log(`qcowkit bench${Q ? ' (--quick)' : ''}: ${qemuVersion}; node ${process.version}; ${cpus().length} cpus; temp dir ${tmpRoot}`);
  const load0 = loadavg()[0];
  if (load0 > cpus().length / 2) log(`WARNING: load average is ${load0.toFixed(2)} on ${cpus().length} cpus: other work is running, timings will be noisy`);
  if (!haveTime) log(`NOTE: ${TIME} is not available (Debian package 'time'): peak RSS is not measured, wall time only`);

  // Start-up overhead: bare node vs. qcowkit --version (alternating).
  const startRuns = Math.max(CFG.defaultRuns, 5) * 2;
  const startup = { node: [], version: [] };
  for (let i = 0; i <= startRuns; i++) {
    const a = measure([process.execPath, ['-e', '0']], [], tmpRoot);
    const b = measure('qcowkit', ['--version'], tmpRoot);
    if (i === 0) continue; // warm-up
    startup.node.push({ ms: a.ms, rssKb: a.rssKb, cpuMs: a.cpuMs });
    startup.version.push({ ms: b.ms, rssKb: b.rssKb, cpuMs: b.cpuMs });
  }
  const nodeMs = median(startup.node.map((x) => x.ms));
  const versionMs = median(startup.version.map((x) => x.ms));
  const nodeRss = median(startup.node.map((x) => x.rssKb).filter((x) => x !== null));
  const versionRss = median(startup.version.map((x) => x.rssKb).filter((x) => x !== null));
  const nodeCpu = median(startup.node.map((x) => x.cpuMs).filter((x) => x !== null && x !== undefined));

  const rows = [];
  for (const w of selected) {
    log(`${w.name}:`);
    const t0 = Date.now();
    const row = summarize(runWorkload(w), nodeMs);
    rows.push(row);
    const took = `${((Date.now() - t0) / 1000).toFixed(1)} s`;
    if (row.status === 'MISMATCH') log(`\n!!!!!!!! MISMATCH in ${w.name}: ${row.message}\n`);
    else if (row.status === 'FAILED') log(`  FAILED: ${row.message}`);
    else if (row.status === 'SKIPPED') log(`  SKIPPED: ${row.message}`);
    else log(`  ${row.runs} runs each: qemu-img ${fmtMs(row.qemuMs)} ms, qcowkit ${fmtMs(row.qcowkitMs)} ms (${took})`);
    for (const n of row.notes) log(`  note: ${n}`);
  }

  // In-process library timing: open + merge of two 1 TiB bitmaps (reads and writes included,
  // page cache warm): first merge in a fresh process (cold), and a merge after one on another
  // copy (warm: library compiled, JIT and wasm heap ready, as inside a running process). Each
  // fdatasync is timed; the final one (made by the close) is reported apart, and so is the time
  // the open spends reading /proc/locks (its lock check).
  const library = [];
  if (!opts.only || opts.only.includes('bitmap-lib') || opts.only.includes('bitmap')) {
    log('bitmap-lib:');
    const F = fixture('bitmaps');
    const helper = join(ROOT, 'bench', 'bitmap-helper.mjs');
    const cases = [
      ['same file, full into empty', ['big.qcow2', 'dst', 'full']],
      ['same file, frag into empty', ['big.qcow2', 'dst', 'frag']],
      ['other file, frag2 into frag', ['big.qcow2', 'frag', 'frag2', 'other.qcow2']],
    ];
    for (const [what, args] of cases) {
      for (const warm of [false, true]) {
        const samples = [];
        for (let i = 0; i <= CFG.defaultRuns; i++) {
          const cwd = join(F.dir, `lib-${i}`);
          bitmapCopies(F, cwd);
          if (warm) bitmapCopies(F, join(cwd, 'warmup'));
          const r = JSON.parse(sh(process.execPath, [helper, 'lib', ...args, ...(warm ? ['--warmup', 'warmup'] : [])], { cwd }).stdout);
          rmSync(cwd, { recursive: true, force: true });
          if (i > 0) samples.push(r);
        }
        const m = (key) => median(samples.map((x) => x[key]));
        // Each flush's own time (the first, second, ... of a run), medians over the runs.
        const flushes = Math.max(...samples.map((x) => x.syncsMs.length));
        const perFlushMs = Array.from({ length: flushes }, (_, i) => median(samples.filter((x) => x.syncsMs.length > i).map((x) => x.syncsMs[i])));
        const row = {
          what,
          warm,
          runs: samples.length,
          totalMs: m('totalMs'),
          withoutFinalSyncMs: m('totalWithoutFinalSyncMs'),
          withoutSyncMs: m('totalWithoutSyncMs'),
          withoutSyncAndLockScanMs: m('totalWithoutSyncAndLockScanMs'),
          lockScanMs: m('lockScanMs'),
          fdatasyncMs: m('fdatasyncMs'),
          finalFdatasyncMs: m('finalFdatasyncMs'),
          fdatasyncs: m('fdatasyncs'),
          perFlushMs,
          openMs: m('openMs'),
          loadMs: m('loadMs'),
          mergeMs: m('mergeMs'),
          storeMs: m('storeMs'),
          closeMs: m('closeMs'),
          cpuMs: m('cpuMs'),
          samples,
        };
        library.push(row);
        log(
          `  ${what} (${warm ? 'warm' : 'cold'}): ${fmtMs(row.withoutFinalSyncMs)} ms without the final fdatasync, ${fmtMs(row.withoutSyncMs)} ms without any ` +
            `(${fmtMs(row.withoutSyncAndLockScanMs)} ms without the /proc/locks read); fdatasync ${fmtMs(row.fdatasyncMs)} ms in ${row.fdatasyncs} calls (${row.perFlushMs.map(fmtMs).join(' + ')}), final ${fmtMs(row.finalFdatasyncMs)}`,
        );
      }
    }
  }
  // ---- report
  console.log('');
  console.log(
    `qcowkit vs ${qemuVersion}  |  node ${process.version}  |  ${cpus().length} x ${cpus()[0]?.model ?? '?'}  |  load ${load0.toFixed(2)} -> ${loadavg()[0].toFixed(2)}${Q ? '  |  --quick' : ''}`,
  );
  console.log(
    `start-up: bare \`node -e 0\` ${fmtMs(nodeMs)} ms (${fmtMs(nodeCpu)} ms cpu, ${fmtMb(nodeRss)} MiB), \`qcowkit --version\` ${fmtMs(versionMs)} ms (${fmtMb(versionRss)} MiB) = ${fmtX(versionMs / nodeMs)} bare node`,
  );
  console.log(
    `images: chain = ${FIXTURES.chain.desc()}; prealloc = ${FIXTURES.prealloc.desc()}; scattered = ${FIXTURES.scattered.desc()}`,
  );
  console.log('');
  const body = rows.map((r) => {
    const ok = r.status === 'OK';
    return [
      r.name,
      ok ? r.runs : '-',
      ok ? fmtMs(r.qemuMs) : '-',
      ok ? fmtMs(r.qcowkitMs) : '-',
      ok ? fmtX(r.ratio) : '-',
      ok && haveTime ? `${fmtMs(r.qemuCpuMs)}/${fmtMs(r.qcowkitCpuMs)}` : '-',
      r.target === null ? '-' : `${r.target.ratio !== undefined ? `<=${r.target.ratio}x` : `<=node+${r.target.overNodeMs}ms`} ${ok ? r.targetResult : ''}`.trim(),
      ok && haveTime ? fmtMb(r.qemuRssKb) : '-',
      ok && haveTime ? fmtMb(r.qcowkitRssKb) : '-',
      ok && r.kind in { info: 1, create: 1, bitmap: 1 } ? fmtX(r.vsNodeStart) : '-',
      r.status,
    ];
  });
  console.log(
    table(
      body,
      ['workload', 'runs', 'qemu-img ms', 'qcowkit ms', 'k/q', 'cpu ms q/k', 'target', 'q RSS MiB', 'k RSS MiB', 'k/node', 'status'],
      ['l', 'r', 'r', 'r', 'r', 'r', 'l', 'r', 'r', 'r', 'l'],
    ),
  );
  if (!haveTime) console.log('(peak RSS unavailable: /usr/bin/time not installed)');
  commitBench.report(rows, console.log);
  console.log('(medians of the timed runs; k/q = qcowkit/qemu-img wall time; cpu = user+sys of each tool; k/node = qcowkit time / bare node start-up)');

  if (library.length) {
    console.log('');
    console.log('in-process library: open + load + merge + store + close of two 1 TiB bitmaps (64 KiB granularity), page cache warm');
    console.log(
      table(
        library.map((r) => [
          r.what,
          r.warm ? 'warm' : 'cold',
          r.runs,
          fmtMs(r.withoutFinalSyncMs),
          fmtMs(r.withoutSyncMs),
          fmtMs(r.withoutSyncAndLockScanMs),
          `${fmtMs(r.openMs)}/${fmtMs(r.loadMs)}/${fmtMs(r.mergeMs)}/${fmtMs(r.storeMs)}/${fmtMs(r.closeMs)}`,
          `${fmtMs(r.fdatasyncMs)} (${r.fdatasyncs}: ${r.perFlushMs.map(fmtMs).join(' + ')})`,
          fmtMs(r.finalFdatasyncMs),
          fmtMs(r.lockScanMs),
          fmtMs(r.cpuMs),
        ]),
        ['case', 'process', 'runs', 'ms w/o final fdatasync', 'w/o any fdatasync', 'w/o fdatasync, /proc/locks', 'open/load/merge/store/close', 'fdatasync ms (calls: each)', 'final', '/proc/locks', 'cpu ms'],
        ['l', 'l', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r', 'r'],
      ),
    );
    console.log('(cold: first merge in a fresh process; warm: after one merge on another copy. Medians. Phases include the fdatasyncs made in them (load: the source; merge: the target loaded and merged); cpu = user+system of the process during the timed merge.)');
  }
  const bad = rows.filter((r) => r.status === 'MISMATCH' || r.status === 'FAILED');
  const targetFails = rows.filter((r) => r.status === 'OK' && r.targetResult === 'FAIL');
  if (bad.length) {
    console.log('');
    for (const r of bad) console.log(`${r.status === 'MISMATCH' ? '!!!!!!!! MISMATCH' : 'FAILED'} ${r.name}: ${r.message}`);
  }
  const skipped = rows.filter((r) => r.status === 'SKIPPED');
  if (skipped.length) console.log(`skipped: ${skipped.map((r) => `${r.name} (${r.message})`).join('; ')}`);

  // ---- JSON
  let commit = null;
  const g = spawnSync('git', ['rev-parse', 'HEAD'], { cwd: ROOT, encoding: 'utf8' });
  if (g.status === 0) commit = g.stdout.trim();
  const dirty = spawnSync('git', ['status', '--porcelain'], { cwd: ROOT, encoding: 'utf8' });
  const result = {
    date: new Date().toISOString(),
    commit,
    dirty: dirty.status === 0 ? dirty.stdout.trim().length > 0 : null,
    quick: Q,
    node: process.version,
    qemu: qemuVersion,
    cpus: cpus().length,
    cpuModel: cpus()[0]?.model ?? null,
    loadavgStart: load0,
    loadavgEnd: loadavg()[0],
    bin: BIN,
    rssMeasured: haveTime,
    config: CFG,
    startup: { nodeMs, nodeRssKb: nodeRss, versionMs, versionRssKb: versionRss, samples: startup },
    workloads: rows.map(({ qemu, qcowkit, ...r }) => ({ ...r, samples: { qemu, qcowkit } })),
    library,
  };
  // A run against another launcher (--bin) must not pass for the project's own numbers.
  const RESULTS = join(RESULTS_DIR, opts.bin ? 'latest-custom-bin.json' : 'latest.json');
  mkdirSync(RESULTS_DIR, { recursive: true });
  writeFileSync(RESULTS, JSON.stringify(result, null, 2) + '\n');
  console.log(`\nresults written to ${RESULTS}${opts.keep ? `; images kept in ${tmpRoot}` : ''}`);

  if (bad.length) return 1;
  if (opts.strict && targetFails.length) return 1;
  return 0;
}

process.exitCode = main();
