// Differential fuzz: qcowkit must open exactly the images qemu-img 7.2 opens and refuse exactly
// the ones it refuses, for `info`, `map` and `check`.
//
// Seed images (v2/v3, with and without backing files, snapshots, persistent bitmaps, 512-byte
// and 64 KiB clusters, extended L2 + zstd) are built with qemu-img/qemu-io in a temp dir; every
// header field, header extension, the backing file name, every snapshot table entry, every bitmap
// directory entry and every bitmap table entry is then set to boundary values one at a time
// (test/helpers/qcow2-mutants.ts, deterministic). For each mutant:
//   info, map: qemu-img exit 0 <=> qcowkit exit 0;
//   check:     the same exit code (0 clean, 1 could not check, 2 corruptions, 3 leaks);
//   qemu-img crashing or hanging (timeout) counts as a refusal qcowkit must make too;
//   every qcowkit refusal is one line `qcowkit: FILE: message` without a stack trace.
// Where qcowkit is deliberately stricter than qemu-img (README, "Where qcowkit deliberately
// differs"), the difference is allowed only through DELIBERATE below, matched on qcowkit's message,
// and every entry of that list must still be needed.
//
// QCOWKIT_FUZZ_REPORT=1 prints every disagreement instead of stopping at the summary.
import { spawn } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, expect, it } from 'vitest';
import { describeQemu, qemuImg, qemuIo } from '../helpers/qemu.js';
import { runCommandInProcess } from '../helpers/cli.js';
import { tmpDir } from '../helpers/tmp.js';
import { mutants, type BackingTargets, type Mutant } from '../helpers/qcow2-mutants.js';
import { command as infoCommand } from '../../src/cli/commands/info.js';
import { command as mapCommand } from '../../src/cli/commands/map.js';
import { command as checkCommand } from '../../src/cli/commands/check.js';

type Cmd = 'info' | 'map' | 'check';
const CMDS: Cmd[] = ['info', 'map', 'check'];
const QCOWKIT = { info: infoCommand, map: mapCommand, check: checkCommand };
const QEMU_TIMEOUT = 4_000;
const BATCH = 40;

/**
 * Documented places where qcowkit refuses what qemu-img accepts (README: "Where qcowkit
 * deliberately differs from qemu-img 7.2"). An entry applies only when qemu-img opened the image
 * (info/map exit 0, check exit 0/2/3) and qcowkit refused it (exit 1) with a matching message.
 */
const DELIBERATE: { id: string; reason: string; message: RegExp }[] = [
  {
    id: 'table-past-eof',
    reason: 'L1/L2/refcount/snapshot tables past the end of the file: qemu-img reads zeros there, qcowkit refuses the image',
    message: /(L1 table|L2 table|Reference count table|refcount block|Snapshot table|snapshot \d+ L1 table).* past the end of the file/i,
  },
  {
    id: 'l2-reserved-bits',
    reason: 'L2 entries with reserved bits set: qemu-img ignores the bits, qcowkit refuses',
    message: /reserved bits/i,
  },
  {
    id: 'host-offset-2^53',
    reason: 'L2 entries pointing at host offsets of 2^53 or more (far past any file): qemu-img maps them, qcowkit refuses (offsets are exact JS numbers only below 2^53)',
    message: /host offset is too large/,
  },
  {
    id: 'backing-loop',
    reason: 'a backing file that is the image itself: qemu-img 7.2 hangs or recurses, qcowkit refuses at once',
    message: /backing chain contains a loop/,
  },
  {
    id: 'protocol-name',
    reason: 'protocol backing names (nbd:, json: ...): qcowkit only opens plain files',
    message: /uses a protocol prefix/,
  },
];

interface Outcome {
  status: number;
  stderr: string;
  /** qemu-img only: killed by a signal or timed out. */
  crashed?: boolean;
}

/**
 * Runs qemu-img info, map and check on every file (one bash process per command), each under
 * `timeout -s KILL`; returns [file][command] outcomes. Exit 124/137 (timeout) and > 128 (killed
 * by a signal: qemu-img crashed) count as crashes.
 */
function qemuBatch(files: string[], cwd: string): Promise<Outcome[][]> {
  const q = (s: string) => `'${s.replace(/'/g, "'\\''")}'`;
  // One shell per command, so the three run side by side.
  const scripts = CMDS.map((c, i) =>
    files.map((f, j) => `timeout -s KILL ${QEMU_TIMEOUT / 1000} qemu-img ${qemuArgs(c, f).map(q).join(' ')} >/dev/null 2>${q(`${f}.${i}.err`)} </dev/null; echo "${j} ${i} $?"`).join('\n'),
  );
  const runOne = (script: string): Promise<string> =>
    new Promise((resolve, reject) => {
      const p = spawn('bash', ['-c', script], { cwd, env: { ...process.env, LC_ALL: 'C' }, stdio: ['ignore', 'pipe', 'inherit'] });
      let out = '';
      p.stdout.setEncoding('utf8').on('data', (s: string) => (out += s));
      p.on('error', reject);
      p.on('close', () => resolve(out));
    });
  return Promise.all(scripts.map(runOne)).then((outs) => {
    const res: Outcome[][] = files.map(() => []);
    for (const line of outs.join('').trim().split('\n')) {
      const [j, i, status] = line.split(' ').map(Number) as [number, number, number];
      const stderr = readFileSync(`${files[j]!}.${i}.err`, 'utf8');
      res[j]![i] = { status, stderr, crashed: status === 124 || status > 128 };
    }
    if (res.some((r) => r.length !== CMDS.length)) throw new Error(`qemu-img batch incomplete: ${outs.join('')}`);
    return res;
  });
}

const qemuArgs = (cmd: Cmd, file: string): string[] => (cmd === 'map' ? ['map', '--output=json', file] : [cmd, file]);
const ourArgs = (cmd: Cmd, file: string): string[] => (cmd === 'map' ? ['--output', 'json', file] : [file]);

/** qemu-img opened the image (for check: finished a check). */
const opened = (cmd: Cmd, status: number): boolean => (cmd === 'check' ? [0, 2, 3].includes(status) : status === 0);

interface Seed {
  name: string;
  dir: string;
  file: string;
}

function must(r: { status: number; stderr: string }, what: string): void {
  if (r.status !== 0) throw new Error(`${what} failed (${r.status}): ${r.stderr}`);
}

/** Builds the seed images with qemu-img/qemu-io, each in its own directory with its base. */
function buildSeeds(root: string): Seed[] {
  const seeds: Seed[] = [];
  const make = (name: string, build: (dir: string, top: string) => void): void => {
    const dir = join(root, name);
    mkdirSync(dir);
    const top = join(dir, 'top.qcow2');
    build(dir, top);
    seeds.push({ name, dir, file: top });
  };
  const q = (args: string[], what = args.join(' ')) => must(qemuImg(args), `qemu-img ${what}`);
  const io = (file: string, cmds: string[]) => must(qemuIo(file, cmds), `qemu-io ${file}`);
  const base = (dir: string, opts: string) => {
    q(['create', '-q', '-f', 'qcow2', '-o', opts, join(dir, 'base.qcow2'), '4M']);
    io(join(dir, 'base.qcow2'), ['write -P 0x11 0 192k', 'write -P 0x12 1M 64k']);
  };
  // v3 overlay, 64 KiB clusters: data, two snapshots, two bitmaps.
  make('v3-backing', (dir, top) => {
    base(dir, 'compat=1.1');
    q(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top]);
    io(top, ['write -P 0x21 64k 64k', 'write -z 2M 64k']);
    q(['snapshot', '-c', 's1', top]);
    q(['bitmap', '--add', top, 'b1']);
    q(['bitmap', '--add', '-g', '4096', top, 'b2']);
    io(top, ['write -P 0x22 3M 64k']);
    q(['snapshot', '-c', 'snap-two', top]);
  });
  // v3, 512-byte clusters, no backing: multi-entry bitmap tables, a snapshot, compressed data.
  make('v3-c512', (_dir, top) => {
    q(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', top, '2M']);
    io(top, ['write -P 0x31 0 8k', 'write -c -P 0x32 64k 512', 'write -P 0x33 1M 4k']);
    q(['bitmap', '--add', '-g', '512', top, 'fine']);
    q(['bitmap', '--add', top, 'coarse']);
    io(top, ['write -P 0x34 1536k 4k']);
    q(['snapshot', '-c', 's1', top]);
  });
  // v2 overlay with a snapshot (v2: no feature bits, no bitmaps).
  make('v2-backing', (dir, top) => {
    base(dir, 'compat=0.10');
    q(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', '-b', 'base.qcow2', '-F', 'qcow2', top]);
    io(top, ['write -P 0x41 128k 64k']);
    q(['snapshot', '-c', 's1', top]);
  });
  // v2 without backing file or snapshots (snapshot fields are all zero).
  make('v2-plain', (_dir, top) => {
    q(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10,cluster_size=4096', top, '4M']);
    io(top, ['write -P 0x51 0 64k']);
  });
  // v3 with extended L2 entries and zstd, over a raw base without a recorded format.
  make('v3-extl2-zstd', (dir, top) => {
    writeFileSync(join(dir, 'base.raw'), Buffer.alloc(1 << 20, 0x61));
    q(['create', '-q', '-f', 'qcow2', '-u', '-b', 'base.raw', '-F', 'raw', '-o', 'extended_l2=on,compression_type=zstd,cluster_size=65536', top, '4M']);
    io(top, ['write -P 0x62 4k 4k', 'write -c -P 0x63 1M 64k']);
    q(['bitmap', '--add', top, 'b']);
  });
  return seeds;
}

/** Files a backing-name mutant may point at, created next to each seed (same names everywhere). */
function makeTargets(dir: string, seedFile: string): BackingTargets {
  mkdirSync(join(dir, 'adir'));
  writeFileSync(join(dir, 'notimg'), 'this is not a disk image\n');
  const base = readFileSync(seedFile);
  writeFileSync(join(dir, 'trunc'), base.subarray(0, 1024));
  // A valid qcow2 whose own backing file is missing.
  must(qemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', 'gone.qcow2', '-F', 'qcow2', join(dir, 'broken'), '4M']), 'create broken');
  return { missing: 'nothere', directory: 'adir', notImage: 'notimg', truncated: 'trunc', brokenChain: 'broken' };
}

interface Disagreement {
  seed: string;
  mutant: string;
  cmd: Cmd;
  qemu: Outcome;
  ours: Outcome;
}

const seeds: Seed[] = [];
let root = '';

describeQemu('differential fuzz: qcowkit opens and refuses exactly what qemu-img 7.2 does', () => {
  beforeAll(() => {
    root = tmpDir('qcowkit-difffuzz-');
    seeds.push(...buildSeeds(root));
  });

  it('info, map and check agree with qemu-img on every mutant', async () => {
    const t0 = Date.now();
    const disagreements: Disagreement[] = [];
    const used = new Map<string, number>();
    const badLines: string[] = [];
    let total = 0;
    let oursMs = 0;
    let waitMs = 0;
    const tally = { bothOpen: 0, bothRefuse: 0, qemuCrash: 0 };
    for (const [si, seed] of seeds.entries()) {
      const original = readFileSync(seed.file);
      const targets = makeTargets(seed.dir, seed.file);
      const ts = Date.now();
      const list: Mutant[] = mutants(original, si, targets);
      for (let first = 0; first < list.length; first += BATCH) {
        const batch = list.slice(first, first + BATCH);
        const files = batch.map((m, j) => {
          const file = join(seed.dir, `m${j}.qcow2`);
          writeFileSync(file, m.apply(Buffer.from(original), `m${j}.qcow2`));
          return file;
        });
        // qemu-img runs in one shell per batch (spawning from Node costs more than the runs),
        // while qcowkit reads the same files in this process.
        const t1 = Date.now();
        const theirs = qemuBatch(files, seed.dir);
        const ours: Outcome[][] = [];
        for (const file of files) {
          const row: Outcome[] = [];
          for (const c of CMDS) row.push(await runCommandInProcess(QCOWKIT[c], ourArgs(c, file), seed.dir));
          ours.push(row);
        }
        const t2 = Date.now();
        const qemu = await theirs;
        oursMs += t2 - t1;
        waitMs += Date.now() - t2;
        batch.forEach((m, j) => {
          total++;
          const file = files[j]!;
          CMDS.forEach((cmd, i) => {
            const q = qemu[j]![i]!;
            const o = ours[j]![i]!;
            if (o.status === 1 && (cmd !== 'check' || !opened(cmd, q.status))) {
              // A refusal: one line naming the image or the backing file at fault (warnings
              // may come first; check also reports its findings on stderr when it ran).
              const lines = o.stderr.split('\n').filter((l) => l && !l.startsWith('qcowkit: warning:'));
              const ok =
                lines.length >= 1 &&
                (lines.at(-1)!.startsWith(`qcowkit: ${file}: `) || lines.at(-1)!.startsWith(`qcowkit: ${seed.dir}/`)) &&
                !/\n\s+at /.test(o.stderr) &&
                (cmd === 'check' || lines.length === 1);
              if (!ok) badLines.push(`${seed.name} ${m.name} ${cmd}: ${JSON.stringify(o.stderr)}`);
            }
            if (q.crashed) {
              tally.qemuCrash++;
              if (o.status !== 1) disagreements.push({ seed: seed.name, mutant: m.name, cmd, qemu: q, ours: o });
              return;
            }
            const same = cmd === 'check' ? q.status === o.status : (q.status === 0) === (o.status === 0);
            if (same) {
              if (opened(cmd, q.status)) tally.bothOpen++;
              else tally.bothRefuse++;
              return;
            }
            const why = opened(cmd, q.status) && o.status === 1 ? DELIBERATE.find((d) => d.message.test(o.stderr)) : undefined;
            if (why) used.set(why.id, (used.get(why.id) ?? 0) + 1);
            else disagreements.push({ seed: seed.name, mutant: m.name, cmd, qemu: q, ours: o });
          });
        });
      }
      if (process.env.QCOWKIT_FUZZ_REPORT) process.stderr.write(`  seed ${seed.name}: ${list.length} mutants, ${Date.now() - ts} ms\n`);
    }
    const secs = ((Date.now() - t0) / 1000).toFixed(1);
    const fmt = (d: Disagreement) =>
      `${d.seed} ${d.mutant} ${d.cmd}: qemu-img ${d.qemu.crashed ? 'CRASHED/HUNG' : d.qemu.status} (${d.qemu.stderr.trim().split('\n')[0] ?? ''}) vs qcowkit ${d.ours.status} (${d.ours.stderr.trim().split('\n').at(-1) ?? ''})`;
    const summary = `${total} mutants x 3 commands in ${secs}s: ${JSON.stringify(tally)}, deliberate ${JSON.stringify(Object.fromEntries(used))}, ${disagreements.length} disagreements`;
    process.stderr.write(`differential fuzz: ${summary}\n`);
    if (process.env.QCOWKIT_FUZZ_REPORT) {
      for (const d of disagreements) process.stderr.write(`  ${fmt(d)}\n`);
      process.stderr.write(`  qcowkit ${oursMs} ms, then waiting for qemu-img ${waitMs} ms\n`);
    }
    expect(disagreements.map(fmt).slice(0, 40), summary).toEqual([]);
    expect(badLines.slice(0, 20)).toEqual([]);
    // Both verdicts must be well exercised, and every documented exception must still be needed.
    expect(tally.bothOpen).toBeGreaterThan(total / 2);
    expect(tally.bothRefuse).toBeGreaterThan(total / 4);
    for (const d of DELIBERATE) expect(used.get(d.id) ?? 0, `exception ${d.id} is never needed: remove it`).toBeGreaterThan(0);
  }, 600_000);
});
