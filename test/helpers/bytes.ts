/** Byte-level helpers for tests that damage or inspect image files in place. */
import { closeSync, openSync, readSync, writeSync } from 'node:fs';
import { expect } from 'vitest';

export function patchBytes(path: string, offset: number, bytes: number[] | Uint8Array): void {
  const fd = openSync(path, 'r+');
  try {
    writeSync(fd, Buffer.from(bytes), 0, bytes.length, offset);
  } finally {
    closeSync(fd);
  }
}

export function readBytesAt(path: string, offset: number, len: number): Buffer {
  const b = Buffer.alloc(len);
  const fd = openSync(path, 'r');
  try {
    readSync(fd, b, 0, len, offset);
  } finally {
    closeSync(fd);
  }
  return b;
}

/** The bad-input rule: exit `status`, one `qcowkit: FILE: ...` line on stderr, no stack trace. */
export function expectOneLineError(r: { status: number; stderr: string }, c: { name: string; file: string; message: RegExp }, status: number): void {
  expect(r.status, `${c.name}: ${r.stderr}`).toBe(status);
  const lines = r.stderr.split('\n').filter(Boolean);
  expect(lines, c.name).toHaveLength(1);
  expect(lines[0]!.startsWith(`qcowkit: ${c.file}: `), `${c.name}: ${lines[0]}`).toBe(true);
  expect(lines[0], c.name).toMatch(c.message);
  expect(r.stderr, c.name).not.toMatch(/\n\s+at /);
}
