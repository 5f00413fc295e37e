#!/usr/bin/env node
// Tiny byte-patching / inspection helper used by images/regenerate.sh to build the
// deliberately broken samples. Plain Node (>=20), no dependencies, no qcowkit code.
//
//   node patch.mjs set-u8   FILE OFFSET VALUE        write one byte
//   node patch.mjs or-u8    FILE OFFSET MASK         OR a byte with MASK
//   node patch.mjs set-u32  FILE OFFSET VALUE        big-endian u32
//   node patch.mjs set-u64  FILE OFFSET VALUE        big-endian u64 (decimal or 0x...)
//   node patch.mjs get-u64  FILE OFFSET              print big-endian u64 (decimal)
//   node patch.mjs header   FILE                     print the parsed header as JSON
//   node patch.mjs get-refcount FILE CLUSTER         print a refcount entry
//   node patch.mjs set-refcount FILE CLUSTER VALUE   overwrite a refcount entry (any width)
//   node patch.mjs l2-entry FILE GUEST_OFFSET        print {entryOffset, entry} of the active L2 entry
//   node patch.mjs host-cluster FILE GUEST_OFFSET    print the host cluster index a standard L2 entry maps to
//   node patch.mjs set-l2   FILE GUEST_OFFSET VALUE  overwrite the (first word of the) active L2 entry
//   node patch.mjs snapshot-dates FILE EPOCH_SEC     set snapshot i's date to EPOCH_SEC + i*60, nsec 0
//   node patch.mjs fill-random FILE OFFSET LEN SEED  write LEN deterministic pseudo-random bytes
//                                                    (SHA-256 counter stream of SEED) at OFFSET
//
// Offsets/values accept decimal, 0x-prefixed hex, or decimal with a k/M/G suffix (1024-based).
import { createHash } from 'node:crypto';
import { openSync, readSync, writeSync, closeSync, fstatSync } from 'node:fs';

const SUFFIX = { k: 10n, K: 10n, M: 20n, G: 30n };
/** Parses decimal, 0x-hex, or a number with a k/M/G (binary) suffix. */
const num = (s) => {
  const m = /^(\d+)([kKMG])$/.exec(s);
  return m ? BigInt(m[1]) << SUFFIX[m[2]] : BigInt(s);
};

function readAt(fd, off, len) {
  const b = Buffer.alloc(len);
  const n = readSync(fd, b, 0, len, Number(off));
  if (n !== len) throw new Error(`short read at ${off} (${n}/${len})`);
  return b;
}
function writeAt(fd, off, buf) {
  const n = writeSync(fd, buf, 0, buf.length, Number(off));
  if (n !== buf.length) throw new Error(`short write at ${off}`);
}

function header(fd) {
  const h = readAt(fd, 0, 112);
  if (h.readUInt32BE(0) !== 0x514649fb) throw new Error('not a qcow2 file');
  const version = h.readUInt32BE(4);
  const v3 = version >= 3;
  return {
    version,
    backingFileOffset: h.readBigUInt64BE(8),
    backingFileSize: h.readUInt32BE(16),
    clusterBits: h.readUInt32BE(20),
    size: h.readBigUInt64BE(24),
    cryptMethod: h.readUInt32BE(32),
    l1Size: h.readUInt32BE(36),
    l1TableOffset: h.readBigUInt64BE(40),
    refcountTableOffset: h.readBigUInt64BE(48),
    refcountTableClusters: h.readUInt32BE(56),
    nbSnapshots: h.readUInt32BE(60),
    snapshotsOffset: h.readBigUInt64BE(64),
    incompatible: v3 ? h.readBigUInt64BE(72) : 0n,
    compatible: v3 ? h.readBigUInt64BE(80) : 0n,
    autoclear: v3 ? h.readBigUInt64BE(88) : 0n,
    refcountOrder: v3 ? h.readUInt32BE(96) : 4,
    headerLength: v3 ? h.readUInt32BE(100) : 72,
  };
}

function refcountLocation(fd, h, cluster) {
  const cs = 1n << BigInt(h.clusterBits);
  const bits = 1n << BigInt(h.refcountOrder);
  const perBlock = (cs * 8n) / bits;
  const tIndex = cluster / perBlock;
  const bIndex = cluster % perBlock;
  const tEntry = readAt(fd, h.refcountTableOffset + tIndex * 8n, 8).readBigUInt64BE(0);
  const block = tEntry & 0xfffffffffffffe00n;
  if (block === 0n) throw new Error(`no refcount block for cluster ${cluster}`);
  const bitPos = bIndex * bits; // bit position inside the block
  return { block, bits, byteOffset: block + bitPos / 8n, bitInByte: bitPos % 8n };
}

function getRefcount(fd, h, cluster) {
  const loc = refcountLocation(fd, h, cluster);
  if (loc.bits >= 8n) {
    const b = readAt(fd, loc.byteOffset, Number(loc.bits / 8n));
    let v = 0n;
    for (const x of b) v = (v << 8n) | BigInt(x);
    return { ...loc, value: v };
  }
  const byte = BigInt(readAt(fd, loc.byteOffset, 1)[0]);
  return { ...loc, value: (byte >> loc.bitInByte) & ((1n << loc.bits) - 1n) };
}

function setRefcount(fd, h, cluster, value) {
  const loc = refcountLocation(fd, h, cluster);
  if (loc.bits >= 8n) {
    const n = Number(loc.bits / 8n);
    const b = Buffer.alloc(n);
    let v = value;
    for (let i = n - 1; i >= 0; i--) { b[i] = Number(v & 0xffn); v >>= 8n; }
    writeAt(fd, loc.byteOffset, b);
    return;
  }
  const mask = ((1n << loc.bits) - 1n) << loc.bitInByte;
  const old = BigInt(readAt(fd, loc.byteOffset, 1)[0]);
  const nv = (old & ~mask & 0xffn) | ((value << loc.bitInByte) & mask);
  writeAt(fd, loc.byteOffset, Buffer.from([Number(nv)]));
}

function l2Entry(fd, h, guest) {
  const cb = BigInt(h.clusterBits);
  const extL2 = (h.incompatible & 0x10n) !== 0n;
  const entryBytes = extL2 ? 16n : 8n;
  const l2Bits = cb - (extL2 ? 4n : 3n);
  const l1Index = guest >> (cb + l2Bits);
  const l2Index = (guest >> cb) & ((1n << l2Bits) - 1n);
  const l1e = readAt(fd, h.l1TableOffset + l1Index * 8n, 8).readBigUInt64BE(0);
  const l2 = l1e & 0x00fffffffffffe00n;
  if (l2 === 0n) throw new Error(`no L2 table for guest offset ${guest}`);
  const entryOffset = l2 + l2Index * entryBytes;
  return { entryOffset, entry: readAt(fd, entryOffset, 8).readBigUInt64BE(0) };
}

function snapshotDates(fd, h, epoch) {
  let off = h.snapshotsOffset;
  for (let i = 0; i < h.nbSnapshots; i++) {
    const e = readAt(fd, off, 40);
    const idLen = BigInt(e.readUInt16BE(12));
    const nameLen = BigInt(e.readUInt16BE(14));
    const extra = BigInt(e.readUInt32BE(36));
    const d = Buffer.alloc(8);
    d.writeUInt32BE(epoch + i * 60, 0);
    d.writeUInt32BE(0, 4);
    writeAt(fd, off + 16n, d);
    let len = 40n + extra + idLen + nameLen;
    len = (len + 7n) & ~7n;
    off += len;
  }
}

function fillRandom(fd, off, len, seed) {
  const out = Buffer.alloc(Number(len));
  let pos = 0;
  for (let i = 0; pos < out.length; i++) {
    const block = createHash('sha256').update(`${seed}:${i}`).digest();
    pos += block.copy(out, pos);
  }
  writeAt(fd, off, out);
}

const json = (o) => JSON.stringify(o, (_k, v) => (typeof v === 'bigint' ? (v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v.toString()) : v));

const [cmd, file, a, b] = process.argv.slice(2);
if (!cmd || !file) {
  console.error('usage: node patch.mjs <command> FILE ... (see source header)');
  process.exit(2);
}
const writable = cmd.startsWith('set') || cmd === 'or-u8' || cmd === 'snapshot-dates' || cmd === 'fill-random';
const fd = openSync(file, writable ? 'r+' : 'r');
try {
  switch (cmd) {
    case 'set-u8': writeAt(fd, num(a), Buffer.from([Number(num(b))])); break;
    case 'or-u8': { const o = readAt(fd, num(a), 1)[0]; writeAt(fd, num(a), Buffer.from([o | Number(num(b))])); break; }
    case 'set-u32': { const x = Buffer.alloc(4); x.writeUInt32BE(Number(num(b))); writeAt(fd, num(a), x); break; }
    case 'set-u64': { const x = Buffer.alloc(8); x.writeBigUInt64BE(num(b)); writeAt(fd, num(a), x); break; }
    case 'get-u64': console.log(readAt(fd, num(a), 8).readBigUInt64BE(0).toString()); break;
    case 'header': console.log(json({ ...header(fd), fileSize: fstatSync(fd).size })); break;
    case 'get-refcount': console.log(json(getRefcount(fd, header(fd), num(a)))); break;
    case 'set-refcount': setRefcount(fd, header(fd), num(a), num(b)); break;
    case 'l2-entry': console.log(json(l2Entry(fd, header(fd), num(a)))); break;
    case 'host-cluster': {
      const h = header(fd);
      const { entry } = l2Entry(fd, h, num(a));
      console.log(((entry & 0x00fffffffffffe00n) >> BigInt(h.clusterBits)).toString());
      break;
    }
    case 'set-l2': { const { entryOffset } = l2Entry(fd, header(fd), num(a)); const x = Buffer.alloc(8); x.writeBigUInt64BE(num(b)); writeAt(fd, entryOffset, x); break; }
    case 'snapshot-dates': snapshotDates(fd, header(fd), Number(num(a))); break;
    case 'fill-random': fillRandom(fd, num(a), num(b), process.argv[6] ?? 'qcowkit'); break;
    default: throw new Error(`unknown command ${cmd}`);
  }
} finally {
  closeSync(fd);
}
