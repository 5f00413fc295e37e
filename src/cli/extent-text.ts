/**
 * Extent lists as text, streamed: `bitmap --dump` and `changes` print millions of extents for a
 * fragmented terabyte bitmap, so the text is made batch by batch (from the operations'
 * onExtents) straight into a byte buffer and written in chunks of about a megabyte — no string
 * or object per extent (offsets past 2^31 are doubles, whose generic number-to-string conversion
 * was most of the time). The JSON is byte for byte what JSON.stringify(list, null, 4) prints at
 * that depth.
 */

/** Bytes handed to `write` at a time (about). */
const CHUNK = 1 << 20;

export type TextWriter = (chunk: string | Uint8Array) => void;

export interface ExtentText {
  /** Formats and (when a chunk is full) writes a batch of [start, length] pairs. */
  push(pairs: Float64Array, count: number): void;
  /** Writes what is left, ending the list. */
  end(): void;
}

const ascii = (s: string): Uint8Array => Uint8Array.from(s, (c) => c.charCodeAt(0));

/** A byte buffer filled with ASCII text and non-negative integers, flushed to `write` when full. */
class ByteText {
  #buf = new Uint8Array(CHUNK + 4096);
  #n = 0;
  readonly #write: TextWriter;

  constructor(write: TextWriter) {
    this.#write = write;
  }

  bytes(b: Uint8Array): void {
    for (let i = 0; i < b.length; i++) this.#buf[this.#n++] = b[i]!;
  }

  /** Writes `v` (an integer, 0 <= v < 2^53) in decimal; returns its digit count. */
  int(v: number): number {
    if (v < 1e9) return this.#small(v);
    const hi = Math.floor(v / 1e9);
    const d = this.#small(hi);
    let lo = v - hi * 1e9;
    const buf = this.#buf;
    for (let i = this.#n + 8; i >= this.#n; i--) {
      buf[i] = 48 + (lo % 10);
      lo = Math.floor(lo / 10);
    }
    this.#n += 9;
    return d + 9;
  }

  spaces(k: number): void {
    for (let i = 0; i < k; i++) this.#buf[this.#n++] = 32;
  }

  /** Hands the buffer to `write` once it holds a chunk's worth (or always, with `all`). */
  flush(all = false): void {
    if (!this.#n || (!all && this.#n < CHUNK)) return;
    this.#write(this.#buf.slice(0, this.#n));
    this.#n = 0;
  }

  #small(v: number): number {
    const buf = this.#buf;
    const start = this.#n;
    let x = v | 0;
    do {
      buf[this.#n++] = 48 + (x % 10);
      x = (x / 10) | 0;
    } while (x);
    for (let a = start, b = this.#n - 1; a < b; a++, b--) {
      const t = buf[a]!;
      buf[a] = buf[b]!;
      buf[b] = t;
    }
    return this.#n - start;
  }
}

/**
 * A JSON array of {"start", "length"} objects whose opening bracket sits at nesting `depth`
 * (0: the top level); the caller wrote what comes before the bracket, the list writes from '['
 * to ']' (no newline after it).
 */
export function jsonExtentList(write: TextWriter, depth: number): ExtentText {
  const pad = ' '.repeat(4 * depth);
  const first = ascii(`[\n${pad}    {\n${pad}        "start": `);
  const next = ascii(`,\n${pad}    {\n${pad}        "start": `);
  const mid = ascii(`,\n${pad}        "length": `);
  const close = ascii(`\n${pad}    }`);
  const t = new ByteText(write);
  let any = false;
  return {
    push(pairs, count) {
      for (let i = 0; i < count; i++) {
        t.bytes(any ? next : first);
        any = true;
        t.int(pairs[i * 2]!);
        t.bytes(mid);
        t.int(pairs[i * 2 + 1]!);
        t.bytes(close);
        t.flush();
      }
    },
    end() {
      t.bytes(ascii(any ? `\n${pad}]` : '[]'));
      t.flush(true);
    },
  };
}

/** The human table's rows: start padded to 20 columns, then the length. */
export function humanExtentRows(write: TextWriter): ExtentText {
  const t = new ByteText(write);
  const nl = ascii('\n');
  return {
    push(pairs, count) {
      for (let i = 0; i < count; i++) {
        t.spaces(Math.max(0, 20 - t.int(pairs[i * 2]!)));
        t.int(pairs[i * 2 + 1]!);
        t.bytes(nl);
        t.flush();
      }
    },
    end() {
      t.flush(true);
    },
  };
}

/** The human table's header (when there is at least one extent). */
export const HUMAN_EXTENT_HEADER = `${'start'.padEnd(20)}length\n`;
