/** Shared CLI plumbing: errors and exit codes, sizes, output format, progress. */
import { Command, Option } from 'commander';
import { QcowError } from '../errors.js';
export { fail } from './fail.js';
import { qemuJson } from './qemu-output.js';

/** A subcommand with qcowkit's conventions: errors via `fail`, examples in --help. */
export function newCommand(name: string, description: string, examples: string[]): Command {
  const cmd = new Command(`qcowkit ${name}`)
    .description(description)
    .exitOverride()
    // Usage errors stay one line, with the way to more help on it.
    .configureOutput({ writeErr: (s) => process.stderr.write(s.replace(/^error: /, 'qcowkit: ').replace(/\n$/, ` (see 'qcowkit ${name} --help')\n`)) })
    .allowExcessArguments(false);
  if (examples.length) cmd.addHelpText('after', `\nExamples:\n${examples.map((e) => `  $ ${e}`).join('\n')}\n`);
  return cmd;
}

export const formatOption = (flags = '-f, --format <fmt>', what = 'image format (qcow2 or raw); probed when omitted'): Option =>
  new Option(flags, what).choices(['qcow2', 'raw']);

export const outputOption = (): Option => new Option('--output <fmt>', 'output format').choices(['human', 'json']).default('human');

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

/** JSON with the keys in the order given (qcowkit's own outputs, which qemu-img has no layout for). */
export function printPlainJson(value: unknown): void {
  process.stdout.write(JSON.stringify(value, null, 4) + '\n');
}

export const warn = (msg: string): void => void process.stderr.write(`qcowkit: warning: ${msg}\n`);
