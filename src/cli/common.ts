/** CLI helpers free of commander (the quick path of main.ts loads no commander). */
import { writeSync } from 'node:fs';
import { QcowError } from '../errors.js';
import { qemuJson } from './qemu-output.js';

const SUFFIX: Record<string, bigint> = { b: 1n, k: 1n << 10n, m: 1n << 20n, g: 1n << 30n, t: 1n << 40n, p: 1n << 50n, e: 1n << 60n };

/**
 * Parses a size as qemu-img does (QEMU 7.2's qemu_strtosz): decimal bytes, a decimal fraction
 * with a unit ("1.5G", "1.k"), or hexadecimal ("0x100000"), each with an optional one-letter
 * suffix b, k, M, G, T, P, E (powers of 1024, any case). Leading blanks and '+' are allowed, '-'
 * and exponents are not; a fraction needs a unit. A unit on a hex number works but QEMU calls it
 * deprecated: `onHexSuffix` receives that warning.
 */
export function parseSize(text: string, what = 'size', onHexSuffix?: (message: string) => void): number {
  const v = parseSizeExact(text, what, onHexSuffix);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new QcowError('INVALID_ARGUMENT', `${what} '${text}' is too large`);
  return Number(v);
}

/** parseSize without qcowkit's 2^53 limit: exact, up to QEMU's own limit of 2^63 - 1. */
export function parseSizeExact(text: string, what = 'size', onHexSuffix?: (message: string) => void): bigint {
  const invalid = () => new QcowError('INVALID_ARGUMENT', `Invalid ${what} specified: '${text}' (use bytes, 0x-prefixed hex, or a k, M, G, T, P, E suffix)`);
  const m = /^[ \t\n\v\f\r]*\+?(\d+)(.*)$/s.exec(text);
  if (!m) throw invalid();
  let intPart = BigInt(m[1]!);
  let rest = m[2]!;
  let fraction = 0n; // 64-bit fixed point
  const hex = intPart === 0n && /^[xX]/.test(rest) ? /^[xX]([0-9a-fA-F]+)(.*)$/s.exec(rest) : null;
  if (intPart === 0n && /^[xX]/.test(rest)) {
    if (!hex) throw invalid();
    intPart = BigInt('0x' + hex[1]!);
    rest = hex[2]!;
    if (rest.startsWith('.')) throw invalid();
    if (rest.length === 1 && SUFFIX[rest.toLowerCase()] !== undefined)
      onHexSuffix?.(`Using a multiplier suffix on hex numbers is deprecated: ${text}`);
  } else if (rest.startsWith('.')) {
    const f = /^\.(\d*)(.*)$/s.exec(rest)!;
    if (f[1]!.length && /^[eE][+-]?\d/.test(f[2]!)) throw invalid(); // an exponent
    if (f[1]!.length) fraction = BigInt(Math.floor(Number('0.' + f[1]) * 2 ** 64));
    rest = f[2]!;
  }
  let mul = 1n;
  if (rest.length) {
    const unit = SUFFIX[rest[0]!.toLowerCase()];
    if (unit === undefined || rest.length > 1) throw invalid();
    mul = unit;
  }
  if (mul === 1n && fraction !== 0n) throw invalid();
  const scaledFraction = fraction * mul;
  // Round half up, as QEMU does.
  const v = intPart * mul + (scaledFraction >> 64n) + ((scaledFraction >> 63n) & 1n);
  if (v > INT64_MAX) throw new QcowError('INVALID_ARGUMENT', `Invalid ${what} specified: '${text}' (must be between 0 and ${INT64_MAX})`);
  return v;
}

const INT64_MAX = (1n << 63n) - 1n;

/** QEMU block drivers a filename can name as `driver:...`; qcowkit opens plain files only. */
const PROTOCOLS = new Set([
  'blkdebug', 'blkverify', 'nbd', 'nbd+tcp', 'nbd+unix', 'null-co', 'null-aio', 'http', 'https', 'ftp', 'ftps',
  'ssh', 'iscsi', 'rbd', 'gluster', 'gluster+tcp', 'gluster+unix', 'gluster+rdma', 'nfs', 'fat', 'host_device', 'host_cdrom', 'nvme',
]);

/** QEMU's path_has_protocol: a colon before the first slash. */
const hasProtocol = (name: string): boolean => /^[^:/]*:/.test(name);

/**
 * An image name as given on the command line, turned into the file name qcowkit opens and
 * shows: a `file:` prefix is stripped as QEMU's file driver does (with "./" put in front when
 * the rest would look like a protocol, e.g. `file:a:b` -> `./a:b`); other protocol prefixes are
 * refused with one clear line, and so are `json:` names (the commands that take them resolve
 * them first: image-opts.ts imageOptsFile).
 */
export function imageFilename(name: string): string {
  if (name.startsWith('json:'))
    throw new QcowError('UNSUPPORTED', 'json: pseudo-protocol filenames are not supported here; pass the image file name (and -f) instead', name);
  if (name.startsWith('file:')) {
    const rest = name.slice(5);
    return hasProtocol(rest) ? `./${rest}` : rest;
  }
  const proto = /^([^:/]+):/.exec(name)?.[1];
  if (proto !== undefined && PROTOCOLS.has(proto))
    throw new QcowError('UNSUPPORTED', `${proto}: protocol filenames are not supported; qcowkit opens plain image files only`, name);
  return name;
}

/**
 * `-p`: qemu-img's progress line on stdout ("    (12.34/100%)" and a carriage return, from
 * 0.00 at the start to 100.00 and a newline at the end), so scripts that read qemu-img's
 * output read ours the same way. With `--output json` it goes to stderr (stdout stays one JSON
 * document).
 */
export function progressPrinter(enabled: boolean, json = false): ((done: number, total: number) => void) | undefined {
  if (!enabled) return undefined;
  const out = json ? process.stderr : process.stdout;
  let last = 0;
  let ended = false;
  out.write('    (0.00/100%)\r');
  return (done, total) => {
    if (ended) return;
    const pct = total ? Math.min(100, (done / total) * 100) : 100;
    const at = Math.floor(pct * 100);
    if (at === last && pct < 100) return;
    last = at;
    out.write(`    (${(at / 100).toFixed(2)}/100%)\r`);
    if (pct >= 100) {
      out.write('\n');
      ended = true;
    }
  };
}

/** JSON exactly as qemu-img prints it (key order, layout). */
export function printJson(value: unknown): void {
  process.stdout.write(qemuJson(value) + '\n');
}

/** JSON with the keys in the order given (qcowkit's own outputs, which qemu-img has no layout for). */
export function plainJson(value: unknown): string {
  return JSON.stringify(value, null, 4) + '\n';
}

export function printPlainJson(value: unknown): void {
  process.stdout.write(plainJson(value));
}

let warned = false;

export const warn = (msg: string): void => {
  warned = true;
  process.stderr.write(`qcowkit: warning: ${msg}\n`);
};

/** The callbacks of a long-running command: qemu-img's progress line with -p (not with -q), warnings. */
export function feedback(o: { progress?: boolean | undefined; quiet?: boolean | undefined; output?: string | undefined }): {
  onProgress: ((done: number, total: number) => void) | undefined;
  onWarning: (msg: string) => void;
} {
  return { onProgress: progressPrinter(o.progress === true && !o.quiet, o.output === 'json'), onWarning: warn };
}

/** An operation's result as every write command prints it: JSON, human text, or nothing (-q). */
export function printResult<T>(o: { output: string; quiet?: boolean | undefined }, r: T, human: (r: T) => string): void {
  if (o.output === 'json') printJson(r);
  else if (!o.quiet) process.stdout.write(human(r));
}

let direct = false;

/**
 * Makes `out` write to fd 1 directly (main.ts's quick path): creating process.stdout loads the
 * stream modules, ~2-3 ms of a short command.
 */
export function useDirectStdout(): void {
  direct = true;
}

/**
 * Whether all output so far went out synchronously (direct writes of `out`, no warning through
 * process.stderr, whose writes to a pipe are asynchronous on some systems): then nothing is
 * pending and the process may end at once.
 */
export function outputSettled(): boolean {
  return direct && !warned;
}

/** Writes to stdout (see useDirectStdout); a closed pipe ends the process quietly. */
export function out(text: string | Uint8Array): void {
  if (!direct) {
    process.stdout.write(text);
    return;
  }
  const buf = typeof text === 'string' ? Buffer.from(text) : text;
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
