/** CLI helpers free of commander (the quick path of main.ts loads no commander). */
import { writeSync } from 'node:fs';
import { QcowError } from '../errors.js';
import { qemuJson } from './qemu-output.js';

const SUFFIX: Record<string, number> = { '': 1, b: 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4, p: 1024 ** 5, e: 1024 ** 6 };

/** Parses qemu-img sizes: plain bytes or k/M/G/T/P/E suffixes (powers of 1024), decimals allowed. */
export function parseSize(text: string, what = 'size'): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([bkmgtpe]?)(?:i?b)?\s*$/i.exec(text);
  if (!m) throw new QcowError('INVALID_ARGUMENT', `Invalid ${what} specified: '${text}' (use bytes or a k, M, G, T suffix)`);
  const v = Number(m[1]) * SUFFIX[m[2]!.toLowerCase()]!;
  if (!Number.isFinite(v) || v > Number.MAX_SAFE_INTEGER) throw new QcowError('INVALID_ARGUMENT', `${what} '${text}' is too large`);
  return Math.round(v);
}

/** `-p`: a progress line on stderr like qemu-img's "(12.34/100%)". */
export function progressPrinter(enabled: boolean): ((done: number, total: number) => void) | undefined {
  if (!enabled) return undefined;
  let last = -1;
  return (done, total) => {
    const pct = total ? (done / total) * 100 : 100;
    if (Math.floor(pct * 100) === last) return;
    last = Math.floor(pct * 100);
    process.stderr.write(`    (${pct.toFixed(2)}/100%)\r`);
    if (done >= total) process.stderr.write('\n');
  };
}

/** JSON exactly as qemu-img prints it (key order, layout). */
export function printJson(value: unknown): void {
  process.stdout.write(qemuJson(value) + '\n');
}

export const warn = (msg: string): void => void process.stderr.write(`qcowkit: warning: ${msg}\n`);

let direct = false;

/**
 * Makes `out` write to fd 1 directly (main.ts's quick path): creating process.stdout loads the
 * stream modules, ~2-3 ms of a short command.
 */
export function useDirectStdout(): void {
  direct = true;
}

/** Writes to stdout (see useDirectStdout); a closed pipe ends the process quietly. */
export function out(text: string): void {
  if (!direct) {
    process.stdout.write(text);
    return;
  }
  const buf = Buffer.from(text);
  let done = 0;
  try {
    while (done < buf.length) done += writeSync(1, buf, done);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'EPIPE') process.exit(process.exitCode ?? 0);
    if (code !== 'EAGAIN') throw e;
    // A non-blocking stdout: let the stream queue the rest (and everything after it, in order).
    direct = false;
    process.stdout.on('error', (err: NodeJS.ErrnoException) => {
      if (err.code === 'EPIPE') process.exit(process.exitCode ?? 0);
      throw err;
    });
    process.stdout.write(buf.subarray(done));
  }
}
