/**
 * The one error type qcowkit throws on purpose. `code` is stable (library users switch on it);
 * `file` names the image the problem concerns; the CLI prints `qcowkit: <file>: <message>`.
 */
export type QcowErrorCode =
  | 'INVALID_ARGUMENT' // bad options or arguments
  | 'NOT_FOUND' // file missing
  | 'NOT_QCOW2' // not an image of the expected format
  | 'CORRUPT' // metadata inconsistent / out of range
  | 'UNSUPPORTED' // valid qcow2 but a feature qcowkit refuses (encryption, external data file...)
  | 'BACKING' // backing chain problem (missing file, protocol name, too deep)
  | 'BACKING_LOOP'
  | 'LOCKED' // another process holds a conflicting lock
  | 'IO' // read/write/flush failed
  | 'NO_SPACE' // the filesystem has no room for what an operation would write (checked before writing)
  | 'NO_CHECKS' // check on a format without consistency checks (raw): qemu-img's exit 63
  | 'KERNELS' // the package's WebAssembly kernels (wasm/kernels.wasm) are missing or broken
  | 'ABORTED' // AbortSignal fired
  | 'INTERNAL'; // an invariant of qcowkit itself failed (a bug: please report it)

/** Exit codes the CLI uses for each error code (documented in the README). */
export const EXIT_CODES: Record<QcowErrorCode, number> = {
  INVALID_ARGUMENT: 1,
  NOT_FOUND: 1,
  NOT_QCOW2: 1,
  CORRUPT: 1,
  UNSUPPORTED: 1,
  BACKING: 1,
  BACKING_LOOP: 1,
  LOCKED: 1,
  IO: 1,
  NO_SPACE: 1,
  NO_CHECKS: 63,
  KERNELS: 1,
  ABORTED: 130,
  INTERNAL: 70,
};

/** Marks every QcowError, whichever copy of this module made it (see hasInstance). */
const BRAND = Symbol.for('qcowkit.QcowError');

export class QcowError extends Error {
  readonly code: QcowErrorCode;
  readonly file: string | undefined;
  constructor(code: QcowErrorCode, message: string, file?: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'QcowError';
    this.code = code;
    this.file = file;
    Object.defineProperty(this, BRAND, { value: true });
  }

  /**
   * `instanceof` by brand: the CLI's self-contained bundles (main.js, each command) carry their
   * own copy of this class, and an error thrown in a command must still be a QcowError to main.
   */
  static override [Symbol.hasInstance](x: unknown): boolean {
    return typeof x === 'object' && x !== null && (x as Record<symbol, unknown>)[BRAND] === true;
  }
}

export function isQcowError(e: unknown): e is QcowError {
  return e instanceof QcowError;
}

/** Throws ABORTED when the signal has fired; called between units of long work. */
export function throwIfAborted(signal: AbortSignal | undefined, file?: string): void {
  if (signal?.aborted) throw new QcowError('ABORTED', 'operation aborted', file);
}

/** Converts a Node system error into a QcowError naming the file. */
export function fromSystemError(e: unknown, file: string, what: string): QcowError {
  if (e instanceof QcowError) return e;
  const err = e as NodeJS.ErrnoException;
  switch (err?.code) {
    case 'ENOENT':
      return new QcowError('NOT_FOUND', `${what}: No such file or directory`, file, { cause: e });
    case 'EISDIR':
      return new QcowError('NOT_QCOW2', `${what}: Is a directory`, file, { cause: e });
    case 'EACCES':
    case 'EPERM':
      return new QcowError('IO', `${what}: Permission denied`, file, { cause: e });
    default:
      return new QcowError('IO', `${what}: ${err?.message ?? String(e)}`, file, { cause: e });
  }
}
