// Runs the qcowkit CLI (node bin/qcowkit.js) as a child process.
import { join } from 'node:path';
import { run, type RunResult } from './qemu.js';
import { REPO_ROOT } from './tmp.js';

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
