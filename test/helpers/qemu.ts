// Helpers for driving the real qemu-img / qemu-io (Debian qemu-utils 7.2 on the reference
// machine) from tests. Nothing here throws except qemuImgJson() (which must return parsed JSON)
// and describeQemu() in CI when qemu is missing.
//
// Environment knobs:
//   QCOWKIT_NO_QEMU=1  pretend qemu-img is missing (exercise the skip path)
//   CI=true            missing qemu-img makes every describeQemu() suite FAIL instead of skip
import { spawnSync } from 'node:child_process';
import { appendFileSync, closeSync, openSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'vitest';

export interface RunResult {
  stdout: string;
  stderr: string;
  /** Exit status; -1 if the process could not be spawned, was killed, or timed out. */
  status: number;
  /** Signal that killed the process (timeouts kill with SIGKILL), else null. */
  signal: NodeJS.Signals | null;
  /** Spawn error (ENOENT, ETIMEDOUT ...), if any. */
  error?: string;
}

export interface RunOptions {
  cwd?: string;
  /** Merged over process.env (LC_ALL=C and TZ=UTC are always set first, so they can be overridden). */
  env?: NodeJS.ProcessEnv;
  input?: string | Buffer;
  /** Milliseconds; default 60 000. qemu-img 7.2 never returns on some inputs (backing loops). */
  timeout?: number;
}

export const DEFAULT_TIMEOUT = 60_000;

/** spawnSync wrapper shared by the helpers; never throws. */
export function run(cmd: string, args: readonly string[], opts: RunOptions = {}): RunResult {
  const r = spawnSync(cmd, [...args], {
    cwd: opts.cwd,
    env: { ...process.env, LC_ALL: 'C', TZ: 'UTC', ...opts.env },
    input: opts.input,
    encoding: 'utf8',
    timeout: opts.timeout ?? DEFAULT_TIMEOUT,
    killSignal: 'SIGKILL',
    maxBuffer: 256 * 1024 * 1024,
  });
  const res: RunResult = {
    stdout: r.stdout ?? '',
    stderr: r.stderr ?? '',
    status: typeof r.status === 'number' ? r.status : -1,
    signal: r.signal ?? null,
  };
  if (r.error) res.error = r.error.message;
  return res;
}

function truthyEnv(v: string | undefined): boolean {
  return v !== undefined && v !== '' && v !== '0' && v.toLowerCase() !== 'false';
}

/** True when running in CI (env CI set to anything but "", "0", "false"). */
export function isCI(): boolean {
  return truthyEnv(process.env.CI);
}

let qemuCache: boolean | undefined;

/** qemu-img and qemu-io are both runnable (cached per process). */
export function hasQemu(): boolean {
  if (qemuCache === undefined) {
    qemuCache =
      !truthyEnv(process.env.QCOWKIT_NO_QEMU) &&
      run('qemu-img', ['--version'], { timeout: 10_000 }).status === 0 &&
      run('qemu-io', ['--version'], { timeout: 10_000 }).status === 0;
  }
  return qemuCache;
}

/** qemu-nbd is runnable too (needed only for bitmap-content checks through NBD). */
export function hasQemuNbd(): boolean {
  return hasQemu() && run('qemu-nbd', ['--version'], { timeout: 10_000 }).status === 0;
}

/** First line of `qemu-img --version`, e.g. "qemu-img version 7.2.22 (Debian ...)", or null. */
export function qemuVersion(): string | null {
  if (!hasQemu()) return null;
  return run('qemu-img', ['--version']).stdout.split('\n')[0] ?? null;
}

/** Runs `qemu-img ...args`. Never throws. */
export function qemuImg(args: readonly string[], opts?: RunOptions): RunResult {
  return run('qemu-img', args, opts);
}

export interface QemuIoOptions extends RunOptions {
  /** -f value; default "qcow2". */
  format?: string;
  /** Open read-only (-r). */
  readOnly?: boolean;
  /** Extra qemu-io options placed before the -c commands (e.g. ['-t', 'writethrough']). */
  extraArgs?: string[];
}

/**
 * Runs `qemu-io -f qcow2 [-r] -c CMD... FILE` (one session, commands in order). Never throws.
 * qemu-io exits 1 when a command fails (including `read -P` pattern mismatches); note that it
 * does not accept arithmetic such as "1M+4k" in offsets.
 */
export function qemuIo(file: string, cmds: readonly string[], opts: QemuIoOptions = {}): RunResult {
  const args = ['-f', opts.format ?? 'qcow2'];
  if (opts.readOnly) args.push('-r');
  if (opts.extraArgs) args.push(...opts.extraArgs);
  for (const c of cmds) args.push('-c', c);
  args.push(file);
  return run('qemu-io', args, opts);
}

export interface JsonOptions extends RunOptions {
  /** Exit statuses accepted (default [0]); e.g. [0, 2, 3] for `check` on broken images. */
  allowStatus?: readonly number[];
}

/**
 * Runs qemu-img and parses its stdout as JSON. Adds `--output=json` right after the
 * subcommand unless an --output option is already present. Throws (with stderr) when the exit
 * status is not allowed or stdout is not JSON.
 */
export function qemuImgJson<T = any>(args: readonly string[], opts: JsonOptions = {}): T {
  const a = [...args];
  if (!a.some((x) => x === '--output' || x.startsWith('--output='))) a.splice(1, 0, '--output=json');
  const r = qemuImg(a, opts);
  const allowed = opts.allowStatus ?? [0];
  if (!allowed.includes(r.status)) {
    throw new Error(`qemu-img ${a.join(' ')} exited ${r.status}${r.error ? ` (${r.error})` : ''}: ${r.stderr.trim()}`);
  }
  try {
    return JSON.parse(r.stdout) as T;
  } catch {
    throw new Error(`qemu-img ${a.join(' ')}: stdout is not JSON: ${r.stdout.slice(0, 500)}\n${r.stderr}`);
  }
}

// ---------------------------------------------------------------------------------------------
// describeQemu

let skippedHere = 0;
let warnScheduled = false;

function warnOnce(): void {
  // With test/helpers/global-setup.ts configured, skipped suites are tallied and one summary
  // line is printed at the end of the run.
  const tally = process.env.QCOWKIT_SKIP_TALLY;
  if (tally) {
    try {
      appendFileSync(tally, '1\n');
      return;
    } catch {
      /* fall through to the direct warning */
    }
  }
  skippedHere++;
  if (warnScheduled) return;
  warnScheduled = true;
  // Print once per vitest run: every fork worker shares the vitest main process as parent.
  let first = true;
  try {
    const stamp = readFileSync(`/proc/${process.ppid}/stat`, 'utf8').split(' ')[21] ?? '';
    const fd = openSync(join(tmpdir(), `qcowkit-noqemu-${process.ppid}-${stamp}`), 'wx');
    closeSync(fd);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EEXIST') first = false;
  }
  if (!first) return;
  // setImmediate: the rest of this test file's suites have been collected by then.
  setImmediate(() => {
    process.stderr.write(
      `\n!!! qcowkit tests: qemu-img/qemu-io not found — interop suites SKIPPED (${skippedHere} in the first ` +
        `file; every describeQemu suite of the run is skipped). Install qemu-utils; CI=true makes this fatal !!!\n\n`,
    );
  });
}

/**
 * A vitest `describe` for suites that need qemu-img/qemu-io. Without them it is a `describe.skip`
 * (whose body is not even run) plus one loud warning line on stderr; with CI=true it fails
 * instead (the suite throws at collection, failing the test file).
 */
export function describeQemu(name: string, fn: () => void): void {
  if (hasQemu()) {
    describe(name, fn);
    return;
  }
  if (isCI()) {
    describe(name, () => {
      throw new Error(`qemu-img/qemu-io not found on PATH but CI is set: interop suite "${name}" cannot run`);
    });
    return;
  }
  warnOnce();
  // The suite body is NOT executed (it may call qemu at collection time); one placeholder test
  // shows up as skipped instead.
  describe.skip(name, () => {
    it('needs qemu-img and qemu-io (not found)', () => {});
  });
}
