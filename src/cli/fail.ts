/** Error reporting of the CLI, kept free of commander so `main` loads nothing heavy. */
import { EXIT_CODES, QcowError } from '../errors.js';

function isCommanderError(e: unknown): e is { exitCode: number } {
  return typeof e === 'object' && e !== null && String((e as { code?: unknown }).code).startsWith('commander.');
}

/** Prints `qcowkit: FILE: message` (no stack unless QCOWKIT_DEBUG=1) and sets the exit code. */
export function fail(e: unknown, exitCode?: number): void {
  // Commander already printed its message (usage errors, --help): only the exit code is left.
  if (isCommanderError(e)) {
    process.exitCode = e.exitCode === 0 ? 0 : (exitCode ?? 1);
    return;
  }
  if (process.env.QCOWKIT_DEBUG === '1' && e instanceof Error) process.stderr.write(`${e.stack}\n`);
  if (e instanceof QcowError) {
    const where = e.file !== undefined ? `${e.file}: ` : '';
    process.stderr.write(`qcowkit: ${where}${oneLine(e.message)}\n`);
    process.exitCode = exitCode ?? EXIT_CODES[e.code];
    return;
  }
  const msg = e instanceof Error ? e.message : String(e);
  process.stderr.write(`qcowkit: ${oneLine(msg)}\n`);
  process.exitCode = exitCode ?? 1;
}

const oneLine = (s: string): string => s.replace(/\s*\n\s*/g, '; ');

