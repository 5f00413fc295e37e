// Runs the qcowkit CLI (node bin/qcowkit.js) as a child process.
import { join } from 'node:path';
import { run, type RunResult } from './qemu.js';
import { REPO_ROOT } from './tmp.js';
import type { Command } from 'commander';
import { fail } from '../../src/cli/fail.js';

/** Absolute path of bin/qcowkit.js. */
export const CLI_BIN = join(REPO_ROOT, 'bin', 'qcowkit.js');

export interface CliOptions {
  cwd?: string;
  /** Merged over process.env (after LC_ALL=C, TZ=UTC). */
  env?: NodeJS.ProcessEnv;
  input?: string | Buffer;
  /** Milliseconds, default 60 000. */
  timeout?: number;
}

export type CliResult = RunResult;

/** `node bin/qcowkit.js ...args` with spawnSync; never throws (status -1 on spawn failure/timeout). */
export function runCli(args: readonly string[], opts: CliOptions = {}): CliResult {
  return run(process.execPath, [CLI_BIN, ...args], opts);
}

/**
 * Runs the CLI and parses stdout as JSON. Unlike qemuImgJson() it does not add --output=json
 * (pass it yourself). Throws, quoting stderr, when the status is not in allowStatus (default
 * [0]) or stdout is not JSON.
 */
export function runCliJson<T = any>(args: readonly string[], opts: CliOptions & { allowStatus?: readonly number[] } = {}): T {
  const r = runCli(args, opts);
  const allowed = opts.allowStatus ?? [0];
  if (!allowed.includes(r.status)) {
    throw new Error(`qcowkit ${args.join(' ')} exited ${r.status}${r.error ? ` (${r.error})` : ''}: ${r.stderr.trim()}`);
  }
  try {
    return JSON.parse(r.stdout) as T;
  } catch {
    throw new Error(`qcowkit ${args.join(' ')}: stdout is not JSON: ${r.stdout.slice(0, 500)}\n${r.stderr}`);
  }
}

/**
 * Runs a CLI command module in this process with `cwd` (what src/cli/main.ts does, minus its
 * run-time import), capturing stdout/stderr and the exit code. Much faster than spawning.
 */
export async function runCommandInProcess(command: () => Command, args: readonly string[], cwd: string): Promise<{ stdout: string; stderr: string; status: number }> {
  const out: string[] = [];
  const err: string[] = [];
  const write = (sink: string[]) => ((chunk: string | Uint8Array) => (sink.push(typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString()), true)) as typeof process.stdout.write;
  const [ow, ew, oldCwd, oldCode] = [process.stdout.write, process.stderr.write, process.cwd(), process.exitCode];
  process.chdir(cwd);
  process.exitCode = undefined;
  process.stdout.write = write(out);
  process.stderr.write = write(err);
  try {
    await command().parseAsync([...args], { from: 'user' });
  } catch (e) {
    fail(e);
  } finally {
    process.stdout.write = ow;
    process.stderr.write = ew;
    process.chdir(oldCwd);
  }
  const status = Number(process.exitCode ?? 0);
  process.exitCode = oldCode;
  return { stdout: out.join(''), stderr: err.join(''), status };
}
