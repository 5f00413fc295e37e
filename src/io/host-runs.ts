/**
 * Grouping of positional I/O pieces into vectored calls: pieces that are contiguous in a file
 * become one preadv/pwritev, and pieces that are also contiguous in memory one buffer view (no
 * copy either way). Shared by the copy's reads and the write engine's data writes.
 */

export interface IoPiece {
  /** Which file (e.g. a layer's depth); pieces of different files never join. */
  file: number;
  /** File offset. */
  at: number;
  buf: Uint8Array;
}

export interface HostRun {
  file: number;
  at: number;
  bytes: number;
  bufs: Uint8Array[];
}

/** Per call at most: bytes (bounded memory per request) and pieces (Linux IOV_MAX). */
const MAX_RUN_BYTES = 16 * 1024 * 1024;
const MAX_RUN_PIECES = 1024;

/** The pieces (sorted here by file, then offset; empty ones dropped) as file-contiguous runs. */
export function hostRuns(pieces: IoPiece[]): HostRun[] {
  const sorted = pieces.filter((p) => p.buf.length).sort((a, b) => a.file - b.file || a.at - b.at);
  const runs: HostRun[] = [];
  let last: HostRun | undefined;
  for (const p of sorted) {
    if (last && last.file === p.file && last.at + last.bytes === p.at && last.bytes + p.buf.length <= MAX_RUN_BYTES && last.bufs.length < MAX_RUN_PIECES) {
      const prev = last.bufs[last.bufs.length - 1]!;
      if (prev.buffer === p.buf.buffer && prev.byteOffset + prev.length === p.buf.byteOffset) last.bufs[last.bufs.length - 1] = new Uint8Array(prev.buffer, prev.byteOffset, prev.length + p.buf.length);
      else last.bufs.push(p.buf);
      last.bytes += p.buf.length;
    } else {
      last = { file: p.file, at: p.at, bytes: p.buf.length, bufs: [p.buf] };
      runs.push(last);
    }
  }
  return runs;
}
