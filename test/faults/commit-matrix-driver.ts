// The crash / I/O-error / SIGKILL matrices of commit, commit -d and make-empty (one driver; the
// test files choose the operation, the scenarios and the sampling). See commit-support.ts for
// the scenarios and the invariants.
import { dirname, join } from 'node:path';
import { expect } from 'vitest';
import { runCrashMatrix, runKillMatrix, type CrashMode, type CrashState, type Errno, type OpFilter } from '../helpers/fault-file.js';
import { tmpDir } from '../helpers/tmp.js';
import { BASE, TOP, cliArgs, copyDir, expectComplete, expectNoLocks, expectRerunCompletes, expectSafeState, pristineViews, sha256, runOp, type Op, type Scenario, type Views } from './commit-support.js';

export interface MatrixPlan {
  /** Mutating ops to crash before (sample), or 'all'. */
  ops: number | 'all';
  modes: CrashMode[];
  /** Injected errors: filter name -> filter, and how many matching ops to fail (sample). */
  io?: Array<{ what: string; filter: OpFilter; points: number | 'all'; errnos: Errno[] }>;
}

export interface MatrixTotals {
  crashRuns: number;
  ioRuns: number;
  states: number;
  flushes: number;
  ops: number;
  /** States byte-identical to one verified before (not checked again). */
  duplicates: number;
}

/** runCrashMatrix for one operation on one scenario, plus one per injected-error filter. */
export async function crashMatrix(op: Op, s: Scenario, plan: MatrixPlan): Promise<MatrixTotals> {
  let views: Views | undefined;
  const totals: MatrixTotals = { crashRuns: 0, ioRuns: 0, states: 0, flushes: 0, ops: 0, duplicates: 0 };
  // The checks depend on the files' bytes only: a state identical to one already verified (the
  // power-loss modes often agree, neighbouring points too) is not checked again.
  const verified = new Set<string>();
  const check = async (st: CrashState) => {
    views ??= await pristineViews(dirname(st.pristine(BASE)), dirname(st.after(BASE)), s);
    if (st.kind === 'complete') return expectComplete(op, st.dir, views, st.label);
    if (st.kind === 'io-error') {
      // Punching freed clusters is advisory (they are free either way): the operation may
      // complete, and then exactly as a fault-free run.
      if (st.error === undefined && st.journal.injected?.kind === 'punch') return expectComplete(op, st.dir, views, st.label);
      // Otherwise the injected error itself reaches the caller (not a later, vaguer one).
      expect(st.error, `${st.label}: the operation completed despite the failed ${st.journal.injected?.kind}`).toBeDefined();
      expect(st.error, st.label).toMatchObject({ code: 'IO', message: expect.stringMatching(/EIO: i\/o error|ENOSPC: no space left on device/) });
    }
    const key = `${sha256(st.path(BASE))}/${sha256(st.path(TOP))}`;
    if (verified.has(key)) return void totals.duplicates++;
    await expectSafeState(op, st.dir, views, st.label);
    await expectRerunCompletes(op, st.dir, views, st.label, false);
    verified.add(key);
  };
  const operation = async ({ dir, openFile }: { dir: string; openFile: Parameters<typeof runOp>[2] }) => {
    try {
      return await runOp(op, dir, openFile);
    } catch (e) {
      // A failed operation leaves no file open, hence no lock (checked before the matrix closes
      // whatever the operation left open).
      for (const f of [BASE, TOP]) expectNoLocks(join(dir, f), `${op} failed with ${String(e)}`);
      throw e;
    }
  };
  // Built once: every matrix (and the views) starts from byte-identical files.
  const built = tmpDir('qcowkit-scenario-');
  s.build(built);
  const setup = (dir: string) => copyDir(built, dir);
  const r = await runCrashMatrix({ name: `${op}: ${s.name}`, setup, operation, check, points: { ops: plan.ops, flushes: true, modes: plan.modes, end: true } });
  totals.crashRuns += r.crashRuns;
  totals.states += r.statesChecked;
  totals.flushes = r.counts.flushes;
  totals.ops = r.counts.ops;
  expect(r.crashRuns).toBeGreaterThanOrEqual(2 * r.counts.flushes);
  for (const io of plan.io ?? []) {
    const ri = await runCrashMatrix({
      name: `${op}: ${s.name}: ${io.what}`,
      setup,
      operation,
      check,
      points: { ops: 1, flushes: false, modes: ['none'], end: false },
      ioErrors: { errnos: io.errnos, points: io.points, filter: io.filter },
    });
    expect(ri.ioRuns, `${io.what}: some ops matched`).toBeGreaterThan(0);
    totals.ioRuns += ri.ioRuns;
    totals.states += ri.statesChecked;
  }
  return totals;
}

/** runKillMatrix: the CLI SIGKILLed after write k for each k of `points`. Returns the kill count. */
export async function killMatrix(op: Op, s: Scenario, points: number[], opts: { qemuRw?: (k: number) => boolean } = {}): Promise<{ killed: number; completedAt: number | undefined }> {
  const afterDir = tmpDir('qcowkit-kill-after-');
  let views: Views | undefined;
  const r = await runKillMatrix({
    name: `${op} (CLI): ${s.name}`,
    setup: async (dir) => {
      s.build(dir);
      copyDir(dir, afterDir);
      await runOp(op, afterDir);
      views = await pristineViews(dir, afterDir, s);
      await expectComplete(op, afterDir, views, 'fault-free run');
    },
    args: ({ dir }) => cliArgs(op, dir),
    points,
    timeout: 120_000,
    check: async (st) => {
      if (!st.killed) {
        expect(st.result.status, `${st.label}: ${st.result.stderr}`).toBe(0);
        await expectComplete(op, st.dir, views!, st.label);
        return;
      }
      await expectSafeState(op, st.dir, views!, st.label);
      await expectRerunCompletes(op, st.dir, views!, st.label, opts.qemuRw?.(st.k) ?? true);
    },
  });
  return { killed: r.killed.length, completedAt: r.completedAt };
}
