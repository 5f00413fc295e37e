#!/usr/bin/env node
// Computes the qemu-img oracle files for every sample listed by regenerate.sh and writes
// images/manifest.json. Run with cwd = images/ (regenerate.sh does), so every "filename" in the
// saved output is the relative sample path.
//
// Input: a TSV file, one sample per line: PATH \t FLAGS \t DESCRIPTION
//   FLAGS (comma separated):
//     valid      metadata consistent; info/map/check succeed (check exit 0)
//     leaks      only leaked clusters (check exit 3)
//     broken     corrupt or unopenable in some way (see the recorded statuses)
//     encrypted  needs a secret for anything but `info`
//     raw        a raw file (backing / data file), no oracles
//     noopen     NEVER run check/map (qemu-img 7.2 hangs on a backing loop); info only
//     chain      also save `info --backing-chain --output=json` as PATH.chain.json
//     bitmaps    also save the dirty ranges of every bitmap as PATH.dirty.json
//     gz         regenerate.sh stores this file gzipped as PATH.gz
// Outputs beside each qcow2 sample (only when qemu-img printed something on stdout):
//   PATH.info.json / PATH.info.txt     `qemu-img info [--output=json] PATH`
//   PATH.map.json  / PATH.map.txt      `qemu-img map  [--output=json] PATH`
//   PATH.check.json / PATH.check.txt   `qemu-img check [--output=json] PATH` (stdout only; the
//                                      per-cluster messages on stderr go into manifest.json)
// manifest.json records, per sample and command, the exit status, the stderr text and the
// names of the files written, plus size and sha256 of the (uncompressed) sample.
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync, statSync, mkdtempSync, rmSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const TIMEOUT = 30_000;

function run(cmd, args) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: TIMEOUT, env: { ...process.env, LC_ALL: 'C', TZ: 'UTC' } });
  if (r.error) throw new Error(`${cmd} ${args.join(' ')}: ${r.error.message}`);
  if (r.status === null) throw new Error(`${cmd} ${args.join(' ')}: killed by ${r.signal}`);
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** Runs qemu-img, saves stdout to `out` when non-empty, returns the manifest record. */
function oracle(args, out) {
  const r = run('qemu-img', args);
  const rec = { args: ['qemu-img', ...args], status: r.status, stderr: r.stderr };
  if (r.stdout.length > 0) {
    writeFileSync(out, r.stdout);
    rec.file = out;
  }
  return rec;
}

/** Dirty ranges of bitmap `name`, read through qemu-nbd -B and the x-dirty-bitmap trick. */
function dirtyRanges(path, name) {
  const dir = mkdtempSync(join(tmpdir(), 'qcowkit-nbd-'));
  const sock = join(dir, 'nbd.sock');
  try {
    const srv = run('qemu-nbd', ['--fork', '-r', '-k', sock, '-f', 'qcow2', '-B', name, path]);
    if (srv.status !== 0) throw new Error(`qemu-nbd -B ${name} ${path}: ${srv.stderr}`);
    const m = run('qemu-img', [
      'map', '--output=json', '--image-opts',
      `driver=nbd,server.type=unix,server.path=${sock},x-dirty-bitmap=qemu:dirty-bitmap:${name}`,
    ]);
    if (m.status !== 0) throw new Error(`map of bitmap ${name}: ${m.stderr}`);
    // With x-dirty-bitmap, dirty areas are the ones reported as "data": false.
    const ranges = [];
    for (const e of JSON.parse(m.stdout)) {
      if (e.data) continue;
      const last = ranges[ranges.length - 1];
      if (last && last[0] + last[1] === e.start) last[1] += e.length;
      else ranges.push([e.start, e.length]);
    }
    return ranges;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

const lines = readFileSync(process.argv[2], 'utf8').split('\n').filter((l) => l.trim() !== '');
const version = run('qemu-img', ['--version']).stdout.split('\n')[0];
const samples = [];

for (const line of lines) {
  const [path, flagStr, description] = line.split('\t');
  const flags = flagStr.split(',').filter(Boolean);
  const data = readFileSync(path);
  const s = {
    name: path,
    file: flags.includes('gz') ? `${path}.gz` : path,
    format: flags.includes('raw') ? 'raw' : 'qcow2',
    flags,
    description,
    size: statSync(path).size,
    sha256: createHash('sha256').update(data).digest('hex'),
    oracles: {},
  };
  samples.push(s);
  if (s.format === 'raw') continue;

  const o = s.oracles;
  o.info = oracle(['info', '--output=json', path], `${path}.info.json`);
  o.infoText = oracle(['info', path], `${path}.info.txt`);
  if (flags.includes('noopen')) {
    // Only the loop detection of --backing-chain is safe to run (exit 1, no output).
    o.chain = oracle(['info', '--backing-chain', '--output=json', path], `${path}.chain.json`);
    continue;
  }
  if (flags.includes('chain')) {
    o.chain = oracle(['info', '--backing-chain', '--output=json', path], `${path}.chain.json`);
  }
  o.map = oracle(['map', '--output=json', path], `${path}.map.json`);
  o.mapText = oracle(['map', path], `${path}.map.txt`);
  o.check = oracle(['check', '--output=json', path], `${path}.check.json`);
  o.checkText = oracle(['check', path], `${path}.check.txt`);

  const expectCheck = flags.includes('valid') ? 0 : flags.includes('leaks') ? 3 : null;
  if (expectCheck !== null && o.check.status !== expectCheck) {
    throw new Error(`${path}: qemu-img check exit ${o.check.status}, expected ${expectCheck}\n${o.check.stderr}`);
  }
  if (flags.includes('valid') && (o.info.status !== 0 || o.map.status !== 0)) {
    throw new Error(`${path}: info/map failed for a valid sample`);
  }

  if (flags.includes('bitmaps')) {
    const info = JSON.parse(readFileSync(`${path}.info.json`, 'utf8'));
    const dirty = {};
    for (const b of info['format-specific'].data.bitmaps ?? []) {
      dirty[b.name] = { granularity: b.granularity, flags: b.flags, dirty: dirtyRanges(path, b.name) };
    }
    writeFileSync(`${path}.dirty.json`, JSON.stringify(dirty, null, 2) + '\n');
    o.dirty = { file: `${path}.dirty.json` };
  }
}

writeFileSync(
  'manifest.json',
  JSON.stringify({ generator: 'images/regenerate.sh', qemu: version, samples }, null, 2) + '\n',
);
console.log(`oracle.mjs: ${samples.length} samples`);
