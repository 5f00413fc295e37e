// Repairs interrupted at every write, truncate, punch and flush (test/helpers/fault-file.ts): by an
// I/O error (the check fails cleanly), by a crash that keeps every op made so far (process killed:
// SIGKILL through QCOWKIT_FAULT_KILL_AFTER_WRITES, and the in-process equivalent), and by a power
// loss that drops ops not yet flushed (all of them, or a random subset). In every resulting file:
//   - no refcount is lower than its references unless it already was (and not lower than it was),
//     no error of a new kind appears (leaks and COPIED flags may change: that is what repair does);
//   - guest data is unchanged;
//   - running the repair again yields an image qemu-img finds clean.
// A leak-only image must never show a corruption at all.
import { truncateSync, statSync } from 'node:fs';
import { expect, it } from 'vitest';
import { check } from '../../src/index.js';
import { range, runCrashMatrix, runKillMatrix } from '../helpers/fault-file.js';
import { describeQemu, qemuImg, qemuIo } from '../helpers/qemu.js';
import { activeL2Entries, geometry, getRefcount, mutate, setRefcount } from '../interop/check-support.js';

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

const IMG = 'img.qcow2';

describeQemu('check -r: interrupted repairs never lower a refcount below its references', () => {
  SCENARIOS.forEach((s, id) => {
    it(s.name, async () => {
      let before: Findings | undefined;
      const report = await runCrashMatrix({
        name: s.name,
        setup: (dir) => {
          s.make(`${dir}/${IMG}`);
          before = findings(`${dir}/${IMG}`);
          expect(before.status, 'the scenario starts damaged').not.toBe(0);
        },
        operation: ({ path, openFile }) => check(path(IMG), { repair: s.repair, openFile }),
        // Every op (write, truncate, punch) and flush: crash before it (and after each flush); at
        // each, process death (all unflushed ops kept), power loss (none kept), only the newest
        // unflushed op kept, and a random subset kept.
        points: { ops: 'all', flushes: true, modes: ['all', 'none', 'latest', { random: 7 + id }] },
        // An I/O error at each op: the check fails with an I/O error — or, when the failed op was
        // the resize of the file, carries on and rebuilds instead, as QEMU does.
        ioErrors: { errnos: ['EIO'], points: 'all' },
        check: async (st) => {
          if (st.kind === 'complete') {
            expect(findings(st.path(IMG)).status === 0 || s.repair === 'leaks', st.label).toBe(true);
            return;
          }
          if (st.kind === 'io-error' && st.error !== undefined) expect(st.error, st.label).toMatchObject({ code: 'IO' });
          await expectSafe(st.path(IMG), st.pristine(IMG), before!, s.leakOnly, st.label);
        },
      });
      expect(report.counts.writes).toBeGreaterThan(0);
      expect(report.crashRuns).toBeGreaterThanOrEqual(report.counts.ops);
      expect(report.ioRuns).toBe(report.counts.ops);
    });
  });

  it('the CLI killed with SIGKILL after each write (QCOWKIT_FAULT_KILL_AFTER_WRITES)', async () => {
    for (const s of [SCENARIOS[0]!, SCENARIOS[1]!, SCENARIOS[3]!]) {
      let before: Findings | undefined;
      const r = await runKillMatrix({
        name: s.name,
        setup: (dir) => {
          s.make(`${dir}/${IMG}`);
          before = findings(`${dir}/${IMG}`);
        },
        args: ({ path }) => ['check', '-r', s.repair, path(IMG)],
        points: range(1, 199),
        check: async (st) => {
          if (st.killed) await expectSafe(st.path(IMG), st.pristine(IMG), before!, s.leakOnly, st.label);
          else expect(st.result.status, st.result.stderr).toBe(s.repair === 'leaks' && !s.leakOnly ? st.result.status : 0);
        },
      });
      expect(r.completedAt, 'the repair eventually completes with fewer writes than the kill point').toBeDefined();
      expect(r.killed.length).toBe(r.completedAt! - 1);
    }
  });
});
