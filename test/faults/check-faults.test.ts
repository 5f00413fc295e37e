// Repairs interrupted at every write: by an I/O error (the check fails cleanly), by a crash that
// keeps every write made so far (process killed: SIGKILL through QCOWKIT_FAULT_KILL_AFTER_WRITES,
// and the in-process equivalent), and by a power loss that drops writes not yet flushed (none,
// or a random subset of them). In every resulting file:
//   - no refcount is lower than its references unless it already was (and not lower than it was),
//     no error of a new kind appears (leaks and COPIED flags may change: that is what repair does);
//   - guest data is unchanged;
//   - running the repair again yields an image qemu-img finds clean.
// A leak-only image must never show a corruption at all.
import { copyFileSync, openSync, closeSync, writeSync, ftruncateSync, statSync, truncateSync } from 'node:fs';
import { join } from 'node:path';
import { expect, it } from 'vitest';
import { check, QcowError } from '../../src/index.js';
import { openImageFile, type ImageFile } from '../../src/io/file.js';
import { runCli } from '../helpers/cli.js';
import { describeQemu, qemuImg, qemuIo } from '../helpers/qemu.js';
import { tmpDir } from '../helpers/tmp.js';
import { activeL2Entries, geometry, getRefcount, mutate, setRefcount } from '../interop/check-support.js';
import { prng } from '../helpers/prng.js';

class Crash extends Error {}

interface LoggedOp {
  epoch: number;
  kind: 'write' | 'truncate' | 'punch';
  offset: number;
  data?: Buffer;
  length?: number;
}

/**
 * An ImageFile that logs every modification with its flush epoch, and can fail (I/O error) or
 * "crash" (stop before executing) at its Nth write.
 */
class JournalFile implements ImageFile {
  readonly log: LoggedOp[] = [];
  writes = 0;
  epoch = 0;

  constructor(
    private readonly inner: ImageFile,
    private readonly stopAt: number,
    private readonly mode: 'crash' | 'io-error' | 'none',
  ) {}

  get path() {
    return this.inner.path;
  }
  get writable() {
    return this.inner.writable;
  }
  get fd() {
    return this.inner.fd;
  }
  size() {
    return this.inner.size();
  }
  allocatedBytes() {
    return this.inner.allocatedBytes();
  }
  readAt(b: Uint8Array, o: number) {
    return this.inner.readAt(b, o);
  }
  dataExtents(s: number, e: number) {
    return this.inner.dataExtents(s, e);
  }
  close() {
    return this.inner.close();
  }
  #gate(): void {
    this.writes++;
    if (this.writes !== this.stopAt) return;
    if (this.mode === 'crash') throw new Crash(`crash at write ${this.stopAt}`);
    if (this.mode === 'io-error') throw new QcowError('IO', `injected write error (write ${this.stopAt})`, this.path);
  }
  async writeAt(b: Uint8Array, o: number) {
    this.#gate();
    await this.inner.writeAt(b, o);
    this.log.push({ epoch: this.epoch, kind: 'write', offset: o, data: Buffer.from(b) });
  }
  async truncate(length: number) {
    this.#gate();
    await this.inner.truncate(length);
    this.log.push({ epoch: this.epoch, kind: 'truncate', offset: length });
  }
  async punchHole(offset: number, length: number) {
    await this.inner.punchHole(offset, length);
    this.log.push({ epoch: this.epoch, kind: 'punch', offset, length });
  }
  async flush() {
    await this.inner.flush();
    this.epoch++;
  }
}

/** Awaits a rejection caused (directly or through `cause`) by a Crash. */
async function expectCrash(p: Promise<unknown>): Promise<void> {
  let err: unknown;
  try {
    await p;
  } catch (e) {
    err = e;
  }
  let e = err;
  while (e && !(e instanceof Crash)) e = (e as { cause?: unknown }).cause;
  expect(e, `expected a crash, got ${String(err)}`).toBeInstanceOf(Crash);
}

/** The file as a power loss could leave it: flushed operations, plus `keep` of the unflushed. */
function replay(original: string, out: string, log: LoggedOp[], epoch: number, keep: (i: number) => boolean): void {
  copyFileSync(original, out);
  const fd = openSync(out, 'r+');
  try {
    log.forEach((op, i) => {
      if (op.epoch >= epoch && !keep(i)) return;
      if (op.kind === 'write') writeSync(fd, op.data!, 0, op.data!.length, op.offset);
      else if (op.kind === 'truncate') ftruncateSync(fd, op.offset);
      else writeSync(fd, Buffer.alloc(op.length!), 0, op.length!, op.offset);
    });
  } finally {
    closeSync(fd);
  }
}

interface Findings {
  status: number;
  /** cluster -> stored refcount, for "ERROR cluster N refcount=R reference=F". */
  low: Map<number, number>;
  /** Other error lines (not leaks, not COPIED, not per-cluster refcounts). */
  other: Set<string>;
}

function findings(file: string): Findings {
  const r = qemuImg(['check', file]);
  const low = new Map<number, number>();
  const other = new Set<string>();
  for (const line of r.stderr.split('\n')) {
    const m = /^ERROR cluster (\d+) refcount=(\d+) reference=(\d+)$/.exec(line);
    if (m) low.set(Number(m[1]), Number(m[2]));
    else if (line.startsWith('ERROR') && !line.includes('OFLAG_COPIED')) other.add(line);
  }
  return { status: r.status, low, other };
}

/** The crash-safety invariant of a file left by an interrupted repair. */
async function expectSafe(state: string, original: string, before: Findings, leakOnly: boolean, what: string): Promise<void> {
  const f = findings(state);
  if (leakOnly) expect([0, 3], `${what}: a leak-only image stays free of corruption`).toContain(f.status);
  expect(f.status === 1 && before.status !== 1, `${what}: check errors appeared`).toBe(false);
  // (Clusters past the original end were not compared before: a refcount block the repair pulled
  // into the file by growing it is counted from then on.)
  const end = Math.ceil(statSync(original).size / geometry(original).cs);
  for (const [c, r] of f.low) {
    if (c >= end) continue;
    expect(before.low.has(c), `${what}: cluster ${c} got a refcount below its references`).toBe(true);
    expect(r, `${what}: cluster ${c} refcount lowered further`).toBeGreaterThanOrEqual(before.low.get(c)!);
  }
  for (const line of f.other) expect(before.other.has(line), `${what}: new error "${line}"`).toBe(true);
  const cmp = qemuImg(['compare', original, state]);
  expect(cmp.status, `${what}: guest data changed: ${cmp.stdout}${cmp.stderr}`).toBe(0);
  // The repair can always be finished.
  const again = await check(state, { repair: 'all' });
  expect(again.corruptions ?? 0, `${what}: re-repair`).toBe(0);
  expect(again.leaks ?? 0, `${what}: re-repair`).toBe(0);
  expect(qemuImg(['check', state]).status, `${what}: clean after re-repair`).toBe(0);
}

interface Scenario {
  name: string;
  repair: 'leaks' | 'all';
  leakOnly: boolean;
  make: (path: string) => void;
}

function baseImage(path: string, opts = 'cluster_size=64k', size = '32M'): void {
  expect(qemuImg(['create', '-q', '-f', 'qcow2', '-o', opts, path, size]).status).toBe(0);
  const r = qemuIo(path, ['write -P 0x11 0 640k', 'write -P 0x22 2M 192k', 'write -c -P 0x33 3M 64k', 'discard 128k 128k', 'write -P 0x44 4M 64k']);
  expect(r.status, r.stderr).toBe(0);
}

/** Refcount 1 on clusters nothing references, appended to the file: leaks and nothing else. */
function addLeaks(path: string, n: number): void {
  const g = geometry(path);
  const first = Math.ceil(g.size / g.cs);
  truncateSync(path, (first + n) * g.cs);
  for (let c = first; c < first + n; c++) expect(setRefcount(path, c, 1)).toBe(true);
}

const SCENARIOS: Scenario[] = [
  {
    name: 'leaked clusters (-r leaks)',
    repair: 'leaks',
    leakOnly: true,
    make: (p) => {
      baseImage(p);
      addLeaks(p, 2);
    },
  },
  {
    name: 'leaks and too-low refcounts with 512-byte clusters, 8-bit refcounts, a snapshot (-r all)',
    repair: 'all',
    leakOnly: false,
    make: (p) => {
      baseImage(p, 'cluster_size=512,refcount_bits=8', '8M');
      expect(qemuImg(['snapshot', '-c', 's1', p]).status).toBe(0);
      expect(qemuIo(p, ['write -P 0x55 1k 2k']).status).toBe(0);
      addLeaks(p, 3);
      // A cluster shared with the snapshot loses a reference in its refcount.
      const shared = activeL2Entries(p).find((e) => e.value !== 0n && !(e.value & (1n << 62n)) && getRefcount(p, Number((e.value & 0x00fffffffffffe00n) / 512n))! >= 2)!;
      const c = Number((shared.value & 0x00fffffffffffe00n) / 512n);
      setRefcount(p, c, getRefcount(p, c)! - 1);
    },
  },
  {
    name: 'wrong COPIED flags (-r leaks fixes them when nothing else is wrong)',
    repair: 'leaks',
    leakOnly: false,
    make: (p) => {
      baseImage(p);
      mutate(p, 'l1-copied');
      mutate(p, 'copied-flip', 1);
      mutate(p, 'copied-flip', 2);
    },
  },
  {
    name: 'lazy refcounts killed mid-write: dirty, rebuilt (-r all)',
    repair: 'all',
    leakOnly: false,
    make: (p) => {
      expect(qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on,cluster_size=4k', p, '8M']).status).toBe(0);
      qemuIo(p, ['write -P 0x66 0 300k', 'write -P 0x67 2M 64k', 'sigraise 9']);
    },
  },
  {
    name: 'refcount block overlapping data: rebuilt (-r all)',
    repair: 'all',
    leakOnly: false,
    make: (p) => {
      baseImage(p, 'cluster_size=4k', '8M');
      mutate(p, 'refblock-on-data', 3);
    },
  },
  {
    name: 'refcount block outside the image: file grown, rebuilt (-r all)',
    repair: 'all',
    leakOnly: false,
    make: (p) => {
      baseImage(p, 'cluster_size=4k', '8M');
      mutate(p, 'reftable-outside');
    },
  },
];

describeQemu('check -r: interrupted repairs never lower a refcount below its references', () => {
  const dir = tmpDir('qcowkit-check-faults-');
  let n = 0;

  for (const s of SCENARIOS) {
    it(s.name, async () => {
      const id = n++;
      const original = join(dir, `orig-${id}.qcow2`);
      s.make(original);
      const before = findings(original);
      expect(before.status, 'the scenario starts damaged').not.toBe(0);

      // A full run, to count its writes.
      const full = join(dir, `full-${id}.qcow2`);
      copyFileSync(original, full);
      const counter = new JournalFile(await openImageFile(full, { writable: true }), 0, 'none');
      try {
        await check(full, { repair: s.repair, file: counter });
      } finally {
        await counter.close();
      }
      const total = counter.writes;
      expect(total).toBeGreaterThan(0);
      expect(findings(full).status === 0 || s.repair === 'leaks').toBe(true);

      const rnd = prng(7 + id);
      for (let stop = 1; stop <= total; stop++) {
        // Crash before write `stop`: keep everything (process death), or lose the unflushed part.
        const work = join(dir, `work-${id}-${stop}.qcow2`);
        copyFileSync(original, work);
        const j = new JournalFile(await openImageFile(work, { writable: true }), stop, 'crash');
        await expectCrash(check(work, { repair: s.repair, file: j }));
        await j.close();
        await expectSafe(work, original, before, s.leakOnly, `${s.name}, killed before write ${stop}`);
        const lost = join(dir, `lost-${id}-${stop}.qcow2`);
        replay(original, lost, j.log, j.epoch, () => false);
        await expectSafe(lost, original, before, s.leakOnly, `${s.name}, power loss before write ${stop}`);
        const some = join(dir, `some-${id}-${stop}.qcow2`);
        replay(original, some, j.log, j.epoch, () => rnd() < 0.5);
        await expectSafe(some, original, before, s.leakOnly, `${s.name}, power loss before write ${stop} (some unflushed writes kept)`);

        // An I/O error at that write: the check fails cleanly.
        const failed = join(dir, `io-${id}-${stop}.qcow2`);
        copyFileSync(original, failed);
        const f = new JournalFile(await openImageFile(failed, { writable: true }), stop, 'io-error');
        // Fails with an I/O error — or, when the failed write was the resize of the file,
        // carries on and rebuilds instead, as QEMU does.
        await check(failed, { repair: s.repair, file: f }).catch((e: unknown) => expect(e).toMatchObject({ code: 'IO' }));
        await f.close();
        await expectSafe(failed, original, before, s.leakOnly, `${s.name}, I/O error at write ${stop}`);
      }
    });
  }

  it('the CLI killed with SIGKILL after each write (QCOWKIT_FAULT_KILL_AFTER_WRITES)', async () => {
    for (const s of [SCENARIOS[0]!, SCENARIOS[1]!, SCENARIOS[3]!]) {
      const original = join(dir, `kill-orig-${n++}.qcow2`);
      s.make(original);
      const before = findings(original);
      let completed = false;
      for (let k = 1; !completed && k < 200; k++) {
        const work = join(dir, `kill-${n}-${k}.qcow2`);
        copyFileSync(original, work);
        const r = runCli(['check', '-r', s.repair, work], { env: { QCOWKIT_FAULT_KILL_AFTER_WRITES: String(k) } });
        if (r.signal === 'SIGKILL') {
          await expectSafe(work, original, before, s.leakOnly, `${s.name}, SIGKILL after write ${k}`);
        } else {
          expect(r.status, r.stderr).toBe(s.repair === 'leaks' && !s.leakOnly ? r.status : 0);
          completed = true;
        }
      }
      expect(completed, 'the repair eventually completes with fewer writes than the kill point').toBe(true);
    }
  });
});

