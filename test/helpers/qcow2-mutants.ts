// Field-wise mutants of a qcow2 image for the differential fuzz (test/interop/differential-fuzz).
//
// An independent little parser (no qcowkit code: the fuzz must not check the implementation with
// itself) finds where every header field, header extension, the backing file name, the snapshot
// table entries, the bitmap directory entries and every bitmap table entry live; the generator
// then writes boundary values into each of them (0, 1, max, unaligned, past EOF, huge, +-1, a
// few prng values) one at a time. Everything is deterministic for a given seed.
import { prng } from './prng.js';

export interface Mutant {
  /** Stable, unique within a seed image, e.g. "header.l1_table_offset=unaligned". */
  name: string;
  /**
   * Returns the mutated image (may be shorter than the input). `self` is the base name the
   * mutant is written under (for a backing file name pointing at the image itself).
   */
  apply(b: Buffer, self: string): Buffer;
}

interface Field {
  name: string;
  at: number;
  size: 1 | 2 | 4 | 8;
  /** What the value means: picks the interesting values. */
  kind: 'offset' | 'count' | 'bits' | 'enum' | 'length';
}

export interface Layout {
  version: number;
  cs: number;
  fileSize: number;
  headerLength: number;
  fields: Field[];
  extensions: { type: number; at: number; length: number }[];
  backing?: { offset: number; size: number; name: string };
  snapshots: { at: number; fields: Field[] }[];
  bitmapDir: { at: number; fields: Field[]; name: string }[];
  bitmapTables: { bitmap: string; at: number; entries: number }[];
}

const EXT_BACKING_FORMAT = 0xe2792aca;
const EXT_FEATURE_TABLE = 0x6803f857;
const EXT_BITMAPS = 0x23852875;

const hdr = (name: string, at: number, size: Field['size'], kind: Field['kind']): Field => ({ name: `header.${name}`, at, size, kind });

/** Parses the parts of `b` the generator mutates. Assumes a valid image (the seeds are). */
export function parseLayout(b: Buffer): Layout {
  const version = b.readUInt32BE(4);
  const cb = b.readUInt32BE(20);
  const cs = 2 ** cb;
  const fields: Field[] = [
    hdr('magic', 0, 4, 'enum'),
    hdr('version', 4, 4, 'enum'),
    hdr('backing_file_offset', 8, 8, 'offset'),
    hdr('backing_file_size', 16, 4, 'length'),
    hdr('cluster_bits', 20, 4, 'enum'),
    hdr('size', 24, 8, 'length'),
    hdr('crypt_method', 32, 4, 'enum'),
    hdr('l1_size', 36, 4, 'count'),
    hdr('l1_table_offset', 40, 8, 'offset'),
    hdr('refcount_table_offset', 48, 8, 'offset'),
    hdr('refcount_table_clusters', 56, 4, 'count'),
    hdr('nb_snapshots', 60, 4, 'count'),
    hdr('snapshots_offset', 64, 8, 'offset'),
  ];
  let headerLength = 72;
  if (version === 3) {
    headerLength = b.readUInt32BE(100);
    fields.push(
      hdr('incompatible_features', 72, 8, 'bits'),
      hdr('compatible_features', 80, 8, 'bits'),
      hdr('autoclear_features', 88, 8, 'bits'),
      hdr('refcount_order', 96, 4, 'enum'),
      hdr('header_length', 100, 4, 'length'),
    );
    if (headerLength > 104) fields.push(hdr('compression_type', 104, 1, 'enum'));
  }
  const layout: Layout = { version, cs, fileSize: b.length, headerLength, fields, extensions: [], snapshots: [], bitmapDir: [], bitmapTables: [] };

  const bfo = Number(b.readBigUInt64BE(8));
  if (bfo) {
    const size = b.readUInt32BE(16);
    layout.backing = { offset: bfo, size, name: b.subarray(bfo, bfo + size).toString('latin1') };
  }
  let bitmapsExt: { nb: number; dirSize: number; dirOffset: number } | undefined;
  for (let off = headerLength; off + 8 <= Math.min(cs, bfo || cs); ) {
    const type = b.readUInt32BE(off);
    const length = b.readUInt32BE(off + 4);
    layout.extensions.push({ type, at: off, length });
    if (type === 0) break;
    if (type === EXT_BITMAPS)
      bitmapsExt = { nb: b.readUInt32BE(off + 8), dirSize: Number(b.readBigUInt64BE(off + 16)), dirOffset: Number(b.readBigUInt64BE(off + 24)) };
    off += 8 + Math.ceil(length / 8) * 8;
  }

  const nbSnapshots = b.readUInt32BE(60);
  let off = Number(b.readBigUInt64BE(64));
  for (let i = 0; i < nbSnapshots; i++) {
    const p = `snapshot[${i}]`;
    const extra = b.readUInt32BE(off + 36);
    const f: Field[] = [
      { name: `${p}.l1_table_offset`, at: off, size: 8, kind: 'offset' },
      { name: `${p}.l1_size`, at: off + 8, size: 4, kind: 'count' },
      { name: `${p}.id_str_size`, at: off + 12, size: 2, kind: 'length' },
      { name: `${p}.name_size`, at: off + 14, size: 2, kind: 'length' },
      { name: `${p}.date_sec`, at: off + 16, size: 4, kind: 'count' },
      { name: `${p}.vm_clock_nsec`, at: off + 24, size: 8, kind: 'count' },
      { name: `${p}.vm_state_size`, at: off + 32, size: 4, kind: 'count' },
      { name: `${p}.extra_data_size`, at: off + 36, size: 4, kind: 'length' },
    ];
    if (extra >= 16) f.push({ name: `${p}.extra.vm_state_size_large`, at: off + 40, size: 8, kind: 'count' }, { name: `${p}.extra.disk_size`, at: off + 48, size: 8, kind: 'length' });
    layout.snapshots.push({ at: off, fields: f });
    off += Math.ceil((40 + extra + b.readUInt16BE(off + 12) + b.readUInt16BE(off + 14)) / 8) * 8;
  }

  if (bitmapsExt && (version === 3 ? b.readBigUInt64BE(88) & 1n : 0n)) {
    let d = bitmapsExt.dirOffset;
    for (let i = 0; i < bitmapsExt.nb; i++) {
      const nameSize = b.readUInt16BE(d + 18);
      const extra = b.readUInt32BE(d + 20);
      const name = b.subarray(d + 24 + extra, d + 24 + extra + nameSize).toString('latin1');
      const p = `bitmap[${name}]`;
      layout.bitmapDir.push({
        at: d,
        name,
        fields: [
          { name: `${p}.table_offset`, at: d, size: 8, kind: 'offset' },
          { name: `${p}.table_size`, at: d + 8, size: 4, kind: 'count' },
          { name: `${p}.flags`, at: d + 12, size: 4, kind: 'bits' },
          { name: `${p}.type`, at: d + 16, size: 1, kind: 'enum' },
          { name: `${p}.granularity_bits`, at: d + 17, size: 1, kind: 'enum' },
          { name: `${p}.name_size`, at: d + 18, size: 2, kind: 'length' },
          { name: `${p}.extra_data_size`, at: d + 20, size: 4, kind: 'length' },
        ],
      });
      layout.bitmapTables.push({ bitmap: name, at: Number(b.readBigUInt64BE(d)), entries: b.readUInt32BE(d + 8) });
      d += Math.ceil((24 + extra + nameSize) / 8) * 8;
    }
  }
  return layout;
}

function readField(b: Buffer, f: { at: number; size: number }): bigint {
  switch (f.size) {
    case 1:
      return BigInt(b[f.at]!);
    case 2:
      return BigInt(b.readUInt16BE(f.at));
    case 4:
      return BigInt(b.readUInt32BE(f.at));
    default:
      return b.readBigUInt64BE(f.at);
  }
}

function writeField(b: Buffer, f: { at: number; size: number }, v: bigint): void {
  const m = (1n << BigInt(f.size * 8)) - 1n;
  v &= m;
  switch (f.size) {
    case 1:
      b[f.at] = Number(v);
      break;
    case 2:
      b.writeUInt16BE(Number(v), f.at);
      break;
    case 4:
      b.writeUInt32BE(Number(v), f.at);
      break;
    default:
      b.writeBigUInt64BE(v, f.at);
  }
}

const roundUp = (n: number, a: number): number => Math.ceil(n / a) * a;

/** The interesting values of one field, by name (deduplicated; the current value excluded). */
function values(f: Field, cur: bigint, l: Layout, rnd: () => number): [string, bigint][] {
  const max = (1n << BigInt(f.size * 8)) - 1n;
  const cs = BigInt(l.cs);
  const eof = BigInt(roundUp(l.fileSize, l.cs));
  const out: [string, bigint][] = [
    ['0', 0n],
    ['1', 1n],
    ['max', max],
    ['cur-1', cur - 1n],
    ['cur+1', cur + 1n],
  ];
  const random = (): bigint => BigInt(Math.floor(rnd() * 2 ** 32)) & max;
  switch (f.kind) {
    case 'offset':
      out.push(['unaligned', cur + 512n], ['cur+cs', cur + cs], ['eof', eof], ['past-eof', eof + 64n * cs], ['huge', 1n << 56n], ['2^53', 1n << 53n], ['top-bit', cur | (1n << 63n)]);
      break;
    case 'count':
      out.push(['cur*2', cur * 2n], ['2^31', 1n << 31n], ['2^24', 1n << 24n], ['random', random()]);
      break;
    case 'length':
      out.push(['cur+8', cur + 8n], ['cur*2', cur * 2n], ['2^16', 1n << 16n], ['2^31', 1n << 31n], ['huge', 1n << 60n], ['random', random()]);
      break;
    case 'enum':
      for (let v = 0n; v <= 8n; v++) out.push([`${v}`, v]);
      out.push(['16', 16n], ['22', 22n], ['32', 32n], ['63', 63n], ['64', 64n], ['random', random()]);
      break;
    case 'bits':
      for (let bit = 0n; bit < 8n; bit++) out.push([`^bit${bit}`, cur ^ (1n << bit)]);
      out.push(['^bit31', cur ^ (1n << 31n)], ['^bit63', cur ^ (1n << 63n)], ['random', random()]);
      break;
  }
  const seen = new Set<bigint>([cur]);
  return out.filter(([, v]) => {
    v &= max;
    if (v < 0n || seen.has(v)) return false;
    seen.add(v);
    return true;
  }).map(([n, v]) => [n, v & max]);
}

function fieldMutants(fields: Field[], base: Buffer, l: Layout, rnd: () => number): Mutant[] {
  const out: Mutant[] = [];
  for (const f of fields) {
    const cur = readField(base, f);
    for (const [vn, v] of values(f, cur, l, rnd))
      out.push({
        name: `${f.name}=${vn}`,
        apply: (b) => {
          writeField(b, f, v);
          return b;
        },
      });
  }
  return out;
}

/** Names a mutant may point the backing file at (files the test creates next to the image). */
export interface BackingTargets {
  missing: string;
  directory: string;
  notImage: string;
  truncated: string;
  /** A qcow2 image whose own backing file is missing. */
  brokenChain: string;
}

function setBackingName(b: Buffer, l: Layout, name: string): Buffer {
  const off = l.backing!.offset;
  const bytes = Buffer.from(name, 'latin1');
  const out = Buffer.concat([b.subarray(0, off), bytes, Buffer.alloc(Math.max(0, l.backing!.size - bytes.length)), b.subarray(off + Math.max(bytes.length, l.backing!.size))]);
  out.writeUInt32BE(bytes.length, 16);
  return out.length === b.length ? out : b; // name must fit where it was: never shift the file
}

function setBackingFormat(b: Buffer, at: number, name: string, declaredLength = name.length): Buffer {
  const cur = b.readUInt32BE(at + 4);
  const room = Math.ceil(cur / 8) * 8;
  const bytes = Buffer.from(name, 'latin1');
  if (bytes.length > room) throw new Error(`format name '${name}' does not fit`);
  b.fill(0, at + 8, at + 8 + room);
  bytes.copy(b, at + 8);
  b.writeUInt32BE(declaredLength, at + 4);
  return b;
}

/** Every mutant of one seed image. */
export function mutants(seed: Buffer, seedNumber: number, targets: BackingTargets): Mutant[] {
  const l = parseLayout(seed);
  const rnd = prng(0x5eed0000 + seedNumber);
  const out: Mutant[] = [];
  out.push(...fieldMutants(l.fields, seed, l, rnd));

  // Header extensions: type, length and (for the ones with meaning) the payload.
  l.extensions.forEach((e, i) => {
    const p = `ext[${i}:${e.type.toString(16)}]`;
    const typeField: Field = { name: `${p}.type`, at: e.at, size: 4, kind: 'enum' };
    const lenField: Field = { name: `${p}.length`, at: e.at + 4, size: 4, kind: 'length' };
    out.push(...fieldMutants([lenField], seed, l, rnd));
    for (const [vn, v] of [
      ['end', 0],
      ['unknown', 0x12345678],
      ['backing-format', EXT_BACKING_FORMAT],
      ['bitmaps', EXT_BITMAPS],
      ['feature-table', EXT_FEATURE_TABLE],
      ['data-file', 0x44415441],
      ['fde', 0x0537be77],
    ] as const)
      if (v !== e.type)
        out.push({
          name: `${typeField.name}=${vn}`,
          apply: (b) => {
            b.writeUInt32BE(v, e.at);
            return b;
          },
        });
    if (e.type === EXT_BACKING_FORMAT) {
      const fmt = seed.subarray(e.at + 8, e.at + 8 + e.length).toString('latin1');
      for (let n = 0; n < fmt.length; n++) out.push({ name: `${p}.name=truncated-to-${n}`, apply: (b) => setBackingFormat(b, e.at, fmt.slice(0, n)) });
      for (const f of ['raw', 'qcow', 'vmdk', 'foofmt', 'QCOW2', 'qcow2\0'])
        if (f !== fmt) out.push({ name: `${p}.name=${JSON.stringify(f)}`, apply: (b) => setBackingFormat(b, e.at, f) });
    }
    if (e.type === EXT_BITMAPS) {
      out.push(
        ...fieldMutants(
          [
            { name: `${p}.nb_bitmaps`, at: e.at + 8, size: 4, kind: 'count' },
            { name: `${p}.reserved`, at: e.at + 12, size: 4, kind: 'count' },
            { name: `${p}.directory_size`, at: e.at + 16, size: 8, kind: 'length' },
            { name: `${p}.directory_offset`, at: e.at + 24, size: 8, kind: 'offset' },
          ],
          seed,
          l,
          rnd,
        ),
      );
    }
    if (e.type === EXT_FEATURE_TABLE) {
      out.push({ name: `${p}.entry0=garbage`, apply: (b) => (b.fill(0xff, e.at + 8, e.at + 8 + 48), b) });
      out.push({ name: `${p}.entry0.bit=63`, apply: (b) => ((b[e.at + 9] = 63), b) });
    }
  });
  // Extensions not in the seed.
  const end = l.extensions.find((e) => e.type === 0);
  if (end && end.at + 8 + 24 <= (l.backing?.offset ?? l.cs)) {
    out.push({
      name: 'ext.added-unknown',
      apply: (b) => (b.writeUInt32BE(0x0badc0de, end.at), b.writeUInt32BE(8, end.at + 4), b.fill(0x41, end.at + 8, end.at + 16), b.writeBigUInt64BE(0n, end.at + 16), b),
    });
    if (!l.extensions.some((e) => e.type === EXT_BACKING_FORMAT))
      out.push({
        name: 'ext.added-backing-format=raw',
        apply: (b) => (b.writeUInt32BE(EXT_BACKING_FORMAT, end.at), b.writeUInt32BE(3, end.at + 4), b.write('raw\0\0\0\0\0', end.at + 8, 'latin1'), b.writeBigUInt64BE(0n, end.at + 16), b),
      });
  }

  if (l.backing) {
    const bk = l.backing;
    for (const [vn, name] of Object.entries(targets)) out.push({ name: `backing.name=${vn}`, apply: (b) => setBackingName(b, l, name) });
    out.push({ name: 'backing.name=self', apply: (b, self) => setBackingName(b, l, self) });
    out.push({ name: 'backing.name=protocol-nbd', apply: (b) => setBackingName(b, l, 'nbd:x') });
    // QEMU opens this one (relative to the working directory, which the tests set to the image's).
    out.push({ name: 'backing.name=protocol-json', apply: (b) => setBackingName(b, l, `json:{"file":{"driver":"file","filename":"${bk.name}"}}`) });
    out.push({ name: 'backing.name=empty', apply: (b) => (b.writeUInt32BE(0, 16), b) });
    for (let n = 1; n < bk.name.length; n += 3) out.push({ name: `backing.name=truncated-to-${n}`, apply: (b) => (b.writeUInt32BE(n, 16), b) });
  }

  // Snapshot table entries.
  for (const s of l.snapshots) out.push(...fieldMutants(s.fields, seed, l, rnd));
  // Bitmap directory entries.
  for (const d of l.bitmapDir) out.push(...fieldMutants(d.fields, seed, l, rnd));
  // Every bitmap table entry.
  for (const t of l.bitmapTables) {
    for (let i = 0; i < t.entries; i++) {
      const at = t.at + 8 * i;
      const cur = seed.readBigUInt64BE(at);
      const off = cur & 0x00fffffffffffe00n;
      const p = `bitmap-table[${t.bitmap}][${i}]`;
      const vals: [string, bigint][] = [
        ['0', 0n],
        ['all-ones', 1n],
        ['offset|bit0', (off || BigInt(l.cs)) | 1n],
        ['reserved-bit1', cur | 2n],
        ['reserved-bit8', cur | 0x100n],
        ['reserved-bit56', cur | (1n << 56n)],
        ['reserved-bit63', cur | (1n << 63n)],
        ['unaligned', (off || BigInt(l.cs)) + 512n],
        ['past-eof', BigInt(roundUp(l.fileSize, l.cs) + 64 * l.cs)],
        ['huge', 0x00fffffffffffe00n & ~BigInt(l.cs - 1)],
      ];
      const seen = new Set<bigint>([cur]);
      for (const [vn, v] of vals) {
        if (seen.has(v)) continue;
        seen.add(v);
        out.push({ name: `${p}=${vn}`, apply: (b) => (b.writeBigUInt64BE(v, at), b) });
      }
    }
  }

  // Truncations: inside the header, inside cluster 0, and before each table.
  for (const cut of [0, 4, 71, 100, l.headerLength + 4, l.cs - 8, roundUp(l.fileSize, l.cs) - l.cs, l.fileSize - 1])
    if (cut >= 0 && cut < l.fileSize) out.push({ name: `truncate@${cut}`, apply: (b) => b.subarray(0, cut) });

  const names = new Set<string>();
  for (const m of out) {
    if (names.has(m.name)) throw new Error(`duplicate mutant name ${m.name}`);
    names.add(m.name);
  }
  return out;
}
