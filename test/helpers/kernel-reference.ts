/**
 * Plain-TypeScript reference implementation of every kernel, operating on the same wasm memory
 * (and heap) as a real `Kernels` instance. Written for obviousness, not speed: unit-by-unit L2
 * decoding with BigInt, bit-by-bit bitmaps. Tests compare the wasm kernels against it.
 */
import { ExtentFlag, InvalidReason, L2_RUN_BYTES, LAYER_EXTENT_BYTES, MAP_ENTRY_BYTES, RunKind, StatusError, type Kernels } from '../../src/kernels/api.js';

const MAX_OFFSET = 2n ** 53n;
const HOST_MASK = 0x00ff_ffff_ffff_fe00n;
const RESERVED_STANDARD = 0x3f00_0000_0000_01fen;

/** A piece of an entry's mapping: `count` units of one kind. */
interface Piece {
  count: number;
  kind: RunKind;
  reason: number;
  host: number;
  extra: number;
}

interface Run extends Piece {
  firstUnit: number;
}

function piece(count: number, kind: RunKind, host: bigint, extra = 0n, reason = 0): Piece {
  return { count, kind, reason, host: Number(host), extra: Number(extra) };
}

/** Pieces of one L2 entry, one per unit except for Compressed / Invalid (one for the whole entry). */
function decodeEntry(word: bigint, bitmap: bigint, extended: boolean, clusterBits: number): Piece[] {
  const units = extended ? 32 : 1;
  const bad = (reason: InvalidReason, host: bigint, extra = 0n) => [piece(units, RunKind.Invalid, host, extra, reason)];
  if ((word >> 62n) & 1n) {
    const x = BigInt(62 - (clusterBits - 8));
    const offset = word & ((1n << x) - 1n);
    const sectors = (word >> x) & ((1n << BigInt(clusterBits - 8)) - 1n);
    const length = (sectors + 1n) * 512n - (offset & 511n);
    if (extended && bitmap !== 0n) return bad(InvalidReason.CompressedBitmap, offset, length);
    if (offset >= MAX_OFFSET) return bad(InvalidReason.OffsetTooLarge, offset, length);
    return [piece(units, RunKind.Compressed, offset, length)];
  }
  const host = word & HOST_MASK;
  const reserved = extended ? RESERVED_STANDARD | 1n : RESERVED_STANDARD;
  if ((word & reserved) !== 0n) return bad(InvalidReason.ReservedBits, host);
  if (host !== 0n && host % (1n << BigInt(clusterBits)) !== 0n) return bad(InvalidReason.Unaligned, host);
  if (host >= MAX_OFFSET) return bad(InvalidReason.OffsetTooLarge, host);
  if (!extended) {
    const zero = (word & 1n) === 1n;
    const kind = host !== 0n ? (zero ? RunKind.ZeroAlloc : RunKind.Data) : zero ? RunKind.ZeroPlain : RunKind.Unallocated;
    return [piece(1, kind, host)];
  }
  const alloc = bitmap & 0xffff_ffffn;
  const zeros = bitmap >> 32n;
  if ((alloc & zeros) !== 0n) return bad(InvalidReason.SubclusterAllocAndZero, host);
  if (alloc !== 0n && host === 0n) return bad(InvalidReason.SubclusterNoHost, host);
  const sub = 1n << BigInt(clusterBits - 5);
  const pieces: Piece[] = [];
  for (let i = 0n; i < 32n; i++) {
    const at = host === 0n ? 0n : host + i * sub;
    if ((alloc >> i) & 1n) pieces.push(piece(1, RunKind.Data, at));
    else if ((zeros >> i) & 1n) pieces.push(piece(1, host === 0n ? RunKind.ZeroPlain : RunKind.ZeroAlloc, at));
    else pieces.push(piece(1, RunKind.Unallocated, at));
  }
  return pieces;
}

function canMerge(last: Run, p: Piece, unitSize: number): boolean {
  if (p.kind >= RunKind.Compressed || last.kind !== p.kind || last.reason !== p.reason) return false;
  if (p.host === 0) return last.host === 0;
  return last.host !== 0 && p.host === last.host + last.count * unitSize;
}

function readEntry(dv: DataView, table: number, index: number, extended: boolean): [bigint, bigint] {
  const at = table + index * (extended ? 16 : 8);
  return [dv.getBigUint64(at), extended ? dv.getBigUint64(at + 8) : 0n];
}

function refcountEntry(bytes: Uint8Array, block: number, index: number, order: number): bigint {
  const width = 1 << order;
  if (width < 8) {
    const bit = index * width;
    return BigInt((bytes[block + (bit >> 3)]! >> (bit & 7)) & ((1 << width) - 1));
  }
  let value = 0n;
  const size = width / 8;
  for (let i = 0; i < size; i++) value = (value << 8n) | BigInt(bytes[block + index * size + i]!);
  return value;
}

function getBit(bytes: Uint8Array, ptr: number, bit: number): boolean {
  return ((bytes[ptr + Math.floor(bit / 8)]! >> bit % 8) & 1) === 1;
}

function putBit(bytes: Uint8Array, ptr: number, bit: number, on: boolean): void {
  const at = ptr + Math.floor(bit / 8);
  const mask = 1 << bit % 8;
  bytes[at] = on ? bytes[at]! | mask : bytes[at]! & ~mask;
}

/** Reference kernels sharing `base`'s memory and heap. */
export function referenceKernels(base: Kernels): Kernels {
  const bytes = () => new Uint8Array(base.memory.buffer);
  const view = () => new DataView(base.memory.buffer);
  let consumed = 0;
  let nextBit = 0;
  // map JSON writer state
  let pending: { start: number; length: number; offset: number; meta: number } | undefined;
  let emitted = 0;
  const entryText = (e: { start: number; length: number; offset: number; meta: number }): string =>
    `${emitted++ ? ',\n' : '['}{ "start": ${e.start}, "length": ${e.length}, "depth": ${Math.floor(e.meta / 8)}, "present": ${(e.meta & 1) !== 0}, "zero": ${(e.meta & 2) !== 0}, "data": ${(e.meta & 4) !== 0}${e.offset >= 0 ? `, "offset": ${e.offset}` : ''}}`;
  const putText = (out: number, s: string): number => {
    bytes().set(Buffer.from(s, 'latin1'), out);
    return s.length;
  };

  const bumpRef = (refs: number, nClusters: number, cluster: number): boolean => {
    if (cluster >= nClusters) return false;
    const dv = view();
    const v = dv.getUint32(refs + cluster * 4, true);
    if (v !== 0xffff_ffff) dv.setUint32(refs + cluster * 4, v + 1, true);
    return true;
  };

  const combine = (dst: number, src: number, n: number, op: (a: number, b: number) => number) => {
    const b = bytes();
    for (let i = 0; i < n; i++) b[dst + i] = op(b[dst + i]!, b[src + i]!);
  };

  const fill = (ptr: number, start: number, n: number, on: boolean) => {
    const b = bytes();
    for (let i = start; i < start + n; i++) putBit(b, ptr, i, on);
  };

  const firstDifferent = (a: number, b: number | null, n: number) => {
    const m = bytes();
    for (let i = 0; i < n; i++) if (m[a + i] !== (b === null ? 0 : m[b + i])) return i;
    return -1;
  };

  return {
    memory: base.memory,
    alloc: (size) => base.alloc(size),
    allocZeroed: (size) => base.allocZeroed(size),
    free: (ptr) => base.free(ptr),
    reserve: (n) => base.reserve(n),
    u8: (ptr, length) => base.u8(ptr, length),

    l2Scan(table, firstEntry, entryCount, extended, clusterBits, out, maxRuns) {
      const dv = view();
      const unitSize = 2 ** (extended ? clusterBits - 5 : clusterBits);
      const runs: Run[] = [];
      consumed = 0;
      for (let e = firstEntry; e < firstEntry + entryCount; e++) {
        const [word, bitmap] = readEntry(dv, table, e, extended);
        const saved = runs.map((r) => ({ ...r }));
        let unit = e * (extended ? 32 : 1);
        for (const p of decodeEntry(word, bitmap, extended, clusterBits)) {
          if (p.kind !== RunKind.Invalid) p.reason = Number(word >> 63n); // valid runs carry COPIED
          const last = runs[runs.length - 1];
          if (last && canMerge(last, p, unitSize)) last.count += p.count;
          else runs.push({ ...p, firstUnit: unit });
          unit += p.count;
        }
        if (runs.length > maxRuns) {
          runs.splice(0, runs.length, ...saved);
          break;
        }
        consumed++;
      }
      runs.forEach((r, i) => {
        const at = out + i * L2_RUN_BYTES;
        dv.setUint32(at, r.firstUnit, true);
        dv.setUint32(at + 4, r.count, true);
        dv.setUint32(at + 8, r.kind, true);
        dv.setUint32(at + 12, r.reason, true);
        dv.setFloat64(at + 16, r.host, true);
        dv.setFloat64(at + 24, r.extra, true);
      });
      return runs.length;
    },
    scanConsumed: () => consumed,

    l2Fill(table, first, count, extended, host, step, flagsHi, flagsLo, allocMask, zeroMask) {
      const dv = view();
      const flags = (BigInt(flagsHi >>> 0) << 32n) | BigInt(flagsLo >>> 0);
      for (let i = 0; i < count; i++) {
        const at = table + (first + i) * (extended ? 16 : 8);
        const h = host === 0 ? 0n : BigInt(host + i * step);
        dv.setBigUint64(at, h | flags);
        if (extended) dv.setBigUint64(at + 8, (BigInt(zeroMask >>> 0) << 32n) | BigInt(allocMask >>> 0));
      }
    },

    l2CopiedMismatches(table, entryCount, extended, clusterBits, refs, nRefs, skipValue, out) {
      const dv = view();
      let n = 0;
      for (let e = 0; e < entryCount; e++) {
        const [word] = readEntry(dv, table, e, extended);
        const host = Number(word & 0x00fffffffffffe00n);
        if (host === 0 || word & (1n << 62n)) continue;
        const cluster = Math.floor(host / 2 ** clusterBits);
        if (cluster >= nRefs) {
          dv.setUint32(out + 4 * n++, (e | 0x80000000) >>> 0, true);
          continue;
        }
        const r = dv.getUint32(refs + 4 * cluster, true);
        if (r === skipValue >>> 0) continue;
        if ((r === 1) !== word >= 1n << 63n) dv.setUint32(out + 4 * n++, e, true);
      }
      return n;
    },

    l2AccountRefs(table, entryCount, extended, clusterBits, refs, nClusters, stats) {
      const dv = view();
      const cs = 2 ** clusterBits;
      const s = [0, 0, 0, 0, 0, 0, 0, 0];
      let next = 0;
      for (let e = 0; e < entryCount; e++) {
        const [word, bitmap] = readEntry(dv, table, e, extended);
        const pieces = decodeEntry(word, bitmap, extended, clusterBits);
        const first = pieces[0]!;
        // An entry references its host cluster when it has one: any unit with a non-zero host.
        const host = pieces.find((p) => p.host !== 0)?.host ?? 0;
        if (first.kind === RunKind.Invalid) {
          s[3]++;
        } else if (first.kind === RunKind.Compressed) {
          s[0]++;
          s[1]++;
          s[2]++;
          const lastCluster = Math.floor((first.host + first.extra - 1) / cs);
          for (let c = Math.floor(first.host / cs); c <= lastCluster; c++) if (!bumpRef(refs, nClusters, c)) s[4]++;
        } else if (host !== 0) {
          s[0]++;
          if (next !== 0 && host !== next) s[2]++;
          next = host + cs;
          if (!bumpRef(refs, nClusters, host / cs)) s[4]++;
        }
      }
      s.forEach((v, i) => view().setFloat64(stats + i * 8, v, true));
    },

    refsAddRange(refs, nClusters, firstCluster, count) {
      let outside = 0;
      for (let c = firstCluster; c < firstCluster + count; c++) {
        if (c >= nClusters) {
          outside += firstCluster + count - c; // everything from here on is out of range
          break;
        }
        bumpRef(refs, nClusters, c);
      }
      return outside;
    },
    refcountCompare(refs, firstCluster, count, block, refcountOrder, out, maxOut) {
      const b = bytes();
      const dv = view();
      let found = 0;
      for (let i = 0; i < count; i++) {
        const computed = BigInt(dv.getUint32(refs + (firstCluster + i) * 4, true));
        if (refcountEntry(b, block, i, refcountOrder) === computed) continue;
        if (found < maxOut) dv.setUint32(out + found * 4, i, true);
        found++;
      }
      return found;
    },
    refcountGet: (block, index, refcountOrder) => Number(refcountEntry(bytes(), block, index, refcountOrder)),
    refcountSet(block, index, refcountOrder, value) {
      const b = bytes();
      const width = 1 << refcountOrder;
      if (width < 8) {
        for (let i = 0; i < width; i++) putBit(b, block, index * width + i, Math.floor(value / 2 ** i) % 2 === 1);
        return;
      }
      let v = BigInt(value);
      for (let i = width / 8 - 1; i >= 0; i--) {
        b[block + (index * width) / 8 + i] = Number(v & 0xffn);
        v >>= 8n;
      }
    },
    refcountAddRange(block, first, count, refcountOrder, delta, maxValue) {
      const b = bytes();
      for (let i = first; i < first + count; i++) {
        const v = Number(refcountEntry(b, block, i, refcountOrder)) + delta;
        if (v < 0 || v > maxValue) return i;
      }
      for (let i = first; i < first + count; i++) this.refcountSet(block, i, refcountOrder, Number(refcountEntry(b, block, i, refcountOrder)) + delta);
      return -1;
    },
    refcountFind(block, from, to, refcountOrder, wantZero) {
      const b = bytes();
      for (let i = from; i < to; i++) if ((refcountEntry(b, block, i, refcountOrder) === 0n) === wantZero) return i;
      return to;
    },

    bitmapOr: (dst, src, n) => combine(dst, src, n, (a, b) => a | b),
    bitmapAnd: (dst, src, n) => combine(dst, src, n, (a, b) => a & b),
    bitmapAndNot: (dst, src, n) => combine(dst, src, n, (a, b) => a & ~b & 0xff),
    popcount(ptr, n) {
      const b = bytes();
      let total = 0;
      for (let i = 0; i < n * 8; i++) if (getBit(b, ptr, i)) total++;
      return total;
    },
    setBits: (ptr, start, n) => fill(ptr, start, n, true),
    clearBits: (ptr, start, n) => fill(ptr, start, n, false),
    extents(ptr, startBit, endBit, out, maxOut) {
      const b = bytes();
      const dv = view();
      let n = 0;
      let bit = startBit;
      nextBit = endBit;
      while (bit < endBit) {
        if (!getBit(b, ptr, bit)) {
          bit++;
          continue;
        }
        if (n === maxOut) {
          nextBit = bit;
          break;
        }
        let stop = bit;
        while (stop < endBit && getBit(b, ptr, stop)) stop++;
        dv.setFloat64(out + n * 16, bit, true);
        dv.setFloat64(out + n * 16 + 8, stop - bit, true);
        n++;
        bit = stop;
      }
      return n;
    },
    extentsNext: () => nextBit,
    bitmapConvertOr(dst, dstBits, src, srcBits, shift) {
      // Bit by bit, from the definition: dst bit j covers guest units [j, j+1) * 2^shift of src.
      const b = bytes();
      for (let j = 0; j < dstBits; j++) {
        const from = shift >= 0 ? j * 2 ** shift : Math.floor(j / 2 ** -shift);
        const to = shift >= 0 ? Math.min(srcBits, (j + 1) * 2 ** shift) : from + 1;
        for (let i = from; i < to && i < srcBits; i++) {
          if (getBit(b, src, i)) {
            putBit(b, dst, j, true);
            break;
          }
        }
      }
    },

    bitmapTableLoad(table, n, data, clusterBits, maxRunClusters, runs) {
      // Entry by entry with BigInt: fill zeros / ones, else plan a read (merged with the previous
      // one when both the index and the host offset continue it).
      const cs = 2 ** clusterBits;
      const dv = view();
      const plan: Array<[number, number, number]> = [];
      for (let i = 0; i < n; i++) {
        const e = dv.getBigUint64(table + i * 8);
        const host = Number(e & HOST_MASK);
        if (host === 0) {
          if (data) bytes().fill(e & 1n ? 0xff : 0, data + i * cs, data + (i + 1) * cs);
          continue;
        }
        const last = plan[plan.length - 1];
        if (last && last[0] + last[1] === i && last[2] + last[1] * cs === host && last[1] < maxRunClusters) last[1]++;
        else plan.push([i, 1, host]);
      }
      plan.forEach((r, j) => r.forEach((x, f) => dv.setFloat64(runs + j * 24 + f * 8, x, true)));
      return plan.length;
    },
    bitmapClusterKinds(data, n, clusterBits, kinds) {
      const cs = 2 ** clusterBits;
      const b = bytes();
      let mixed = 0;
      for (let i = 0; i < n; i++) {
        const c = b.subarray(data + i * cs, data + (i + 1) * cs);
        const kind = c.every((x) => x === 0) ? 0 : c.every((x) => x === 0xff) ? 1 : 2;
        b[kinds + i] = kind;
        if (kind === 2) mixed++;
      }
      return mixed;
    },
    bitmapTableBuild(kinds, n, clusterBits, hosts, nHosts, maxRunClusters, table, writes) {
      const cs = 2 ** clusterBits;
      const dv = view();
      const free: number[] = [];
      for (let h = 0; h < nHosts; h++) {
        const first = dv.getFloat64(hosts + h * 16, true);
        for (let c = 0; c < dv.getFloat64(hosts + h * 16 + 8, true); c++) free.push(first + c);
      }
      const plan: Array<[number, number, number]> = [];
      for (let i = 0; i < n; i++) {
        const kind = bytes()[kinds + i]!;
        let e = BigInt(kind);
        if (kind === 2) {
          const c = free.shift();
          if (c === undefined) return -1;
          e = BigInt(c * cs);
          const last = plan[plan.length - 1];
          if (last && last[0] + last[1] === i && last[2] + last[1] * cs === c * cs && last[1] < maxRunClusters) last[1]++;
          else plan.push([i, 1, c * cs]);
        }
        dv.setBigUint64(table + i * 8, e);
      }
      plan.forEach((r, j) => r.forEach((x, f) => dv.setFloat64(writes + j * 24 + f * 8, x, true)));
      return plan.length;
    },

    isZero: (ptr, n) => firstDifferent(ptr, null, n) < 0,
    firstNonZero: (ptr, n) => firstDifferent(ptr, null, n),
    firstDifference: (a, b, n) => firstDifferent(a, b, n),
    zeroBlocks(ptr, nBytes, blockBits, outBitmap) {
      const size = 2 ** blockBits;
      const b = bytes();
      for (let i = 0; i < Math.floor(nBytes / size); i++) {
        putBit(b, outBitmap, i, firstDifferent(ptr + i * size, null, size) < 0);
      }
    },

    mapJsonReset() {
      pending = undefined;
      emitted = 0;
    },
    mapJsonFeed(entries, n, out) {
      const dv = view();
      let s = '';
      for (let i = 0; i < n; i++) {
        const at = entries + i * 32;
        const e = { start: dv.getFloat64(at, true), length: dv.getFloat64(at + 8, true), offset: dv.getFloat64(at + 16, true), meta: dv.getFloat64(at + 24, true) };
        if (e.offset < 0) e.offset = -1;
        if (e.length === 0) continue;
        const p = pending;
        if (p && p.meta === e.meta && (p.offset < 0 ? e.offset < 0 : e.offset === p.offset + p.length)) {
          p.length += e.length;
          continue;
        }
        if (p) s += entryText(p);
        pending = e;
      }
      return putText(out, s);
    },
    mapJsonFinish(out) {
      let s = pending ? entryText(pending) : '';
      pending = undefined;
      if (emitted) s += ']\n';
      return putText(out, s);
    },
    diffBlocks(a, bb, nBytes, blockBits, outBitmap) {
      const size = 2 ** blockBits;
      const b = bytes();
      for (let i = 0; i < Math.floor(nBytes / size); i++) {
        putBit(b, outBitmap, i, firstDifferent(a + i * size, bb + i * size, size) >= 0);
      }
    },

    l2Records(runs, nRuns, unitBits, tableStart, clipStart, clipEnd, v2, out, nOut, maxOut) {
      const dv = view();
      const list = readExtents(dv, out, nOut);
      const unit = 2 ** unitBits;
      for (let i = 0; i < nRuns; i++) {
        const at = runs + i * L2_RUN_BYTES;
        const kind = dv.getUint32(at + 8, true);
        if (kind === RunKind.Invalid) {
          errRun = i;
          return StatusError.InvalidRun;
        }
        const runStart = tableStart + dv.getUint32(at, true) * unit;
        const runEnd = runStart + dv.getUint32(at + 4, true) * unit;
        const start = Math.max(runStart, clipStart);
        const end = Math.min(runEnd, clipEnd);
        if (end <= start) continue;
        const host = dv.getFloat64(at + 16, true);
        const hostAt = host === 0 ? -1 : host + (start - runStart);
        const e: Ext = { start, length: end - start, offset: -1, flags: 0, cOffset: 0, cLength: 0 };
        if (kind === RunKind.Unallocated) e.offset = hostAt;
        else if (kind === RunKind.Data) [e.flags, e.offset] = [ExtentFlag.Allocated | ExtentFlag.Data, hostAt];
        else if (kind === RunKind.ZeroPlain) e.flags = ExtentFlag.Allocated | ExtentFlag.Zero;
        else if (kind === RunKind.ZeroAlloc) [e.flags, e.offset] = [ExtentFlag.Allocated | ExtentFlag.Zero, hostAt];
        else [e.flags, e.cOffset, e.cLength] = [ExtentFlag.Allocated | ExtentFlag.Data | ExtentFlag.Compressed, host, dv.getFloat64(at + 24, true)];
        if (v2 && e.flags & ExtentFlag.Zero) {
          errStart = start;
          return StatusError.V2Zero;
        }
        pushRefExtent(list, e);
      }
      if (list.length > maxOut) return StatusError.Full;
      writeExtents(dv, out, list);
      return list.length;
    },
    statusErrorRun: () => errRun,
    statusErrorStart: () => errStart,
    recordsDataRanges(recs, n, fileSize, out) {
      const dv = view();
      let m = 0;
      for (const e of readExtents(dv, recs, n)) {
        if (!isPlainData(e)) continue;
        dv.setFloat64(out + m * 16, e.offset, true);
        dv.setFloat64(out + m * 16 + 8, Math.min(e.offset + e.length, fileSize), true);
        m++;
      }
      return m;
    },
    recordsSplitHoles(recs, n, probed, out, maxOut) {
      const dv = view();
      const list: Ext[] = [];
      let at = probed;
      for (const e of readExtents(dv, recs, n)) {
        if (!isPlainData(e)) {
          pushRefExtent(list, e);
          continue;
        }
        const c = dv.getFloat64(at, true);
        at += 8;
        // Byte by byte over the host range: inside a data pair or not.
        const pairs: [number, number][] = [];
        for (let j = 0; j < c; j++, at += 16) pairs.push([dv.getFloat64(at, true), dv.getFloat64(at + 8, true)]);
        const cuts = [...new Set([e.offset, e.offset + e.length, ...pairs.flat()])].filter((x) => x >= e.offset && x <= e.offset + e.length).sort((x, y) => x - y);
        for (let j = 0; j + 1 < cuts.length; j++) {
          const inData = pairs.some(([ps, pe]) => ps <= cuts[j]! && cuts[j + 1]! <= pe);
          const flags = ExtentFlag.Allocated | ExtentFlag.Data | (inData ? 0 : ExtentFlag.Zero);
          pushRefExtent(list, { start: e.start + (cuts[j]! - e.offset), length: cuts[j + 1]! - cuts[j]!, offset: cuts[j]!, flags, cOffset: 0, cLength: 0 });
        }
      }
      if (list.length > maxOut) return StatusError.Full;
      writeExtents(dv, out, list);
      return list.length;
    },
    mapMergeLayer(cur, nCur, lay, nLay, depth, belowEnd, out, maxOut) {
      const dv = view();
      const layer = readExtents(dv, lay, nLay);
      const list: MapRec[] = [];
      const push = (r: MapRec) => {
        if (r.length <= 0) return;
        const last = list[list.length - 1];
        if (last && last.meta === r.meta && last.start + last.length === r.start && (last.offset < 0 ? r.offset < 0 : r.offset === last.offset + last.length)) last.length += r.length;
        else list.push(r);
      };
      for (let i = 0; i < nCur; i++) {
        const at = cur + i * MAP_ENTRY_BYTES;
        const c: MapRec = { start: dv.getFloat64(at, true), length: dv.getFloat64(at + 8, true), offset: dv.getFloat64(at + 16, true), meta: dv.getFloat64(at + 24, true) };
        if (c.meta >= 0) {
          push(c);
          continue;
        }
        for (const x of layer) {
          const from = Math.max(c.start, x.start);
          const to = Math.min(c.start + c.length, x.start + x.length);
          if (to <= from) continue;
          const offset = x.offset < 0 ? -1 : x.offset + (from - x.start);
          if (x.flags & ExtentFlag.Allocated) {
            push({ start: from, length: to - from, offset, meta: depth * 8 + (x.flags & 7) });
            continue;
          }
          const below = belowEnd < 0 ? from : Math.min(Math.max(from, belowEnd), to);
          push({ start: from, length: below - from, offset: -1, meta: -1 });
          push({ start: below, length: to - below, offset: offset < 0 ? -1 : offset + (below - from), meta: depth * 8 + ExtentFlag.Zero });
        }
      }
      pendingLeft = list.filter((r) => r.meta < 0).length;
      if (list.length > maxOut) return StatusError.Full;
      list.forEach((r, i) => [r.start, r.length, r.offset, r.meta].forEach((v, j) => dv.setFloat64(out + i * MAP_ENTRY_BYTES + j * 8, v, true)));
      return list.length;
    },
    mapPendingLeft: () => pendingLeft,
    refcountCountNonZero(block, from, to, refcountOrder) {
      const b = bytes();
      let n = 0;
      for (let i = from; i < to; i++) if (refcountEntry(b, block, i, refcountOrder) !== 0n) n++;
      return n;
    },
  };
}

/** A layer extent record as an object. */
interface Ext {
  start: number;
  length: number;
  offset: number;
  flags: number;
  cOffset: number;
  cLength: number;
}

interface MapRec {
  start: number;
  length: number;
  offset: number;
  meta: number;
}

let errRun = 0;
let errStart = 0;
let pendingLeft = 0;

function readExtents(dv: DataView, ptr: number, n: number): Ext[] {
  const out: Ext[] = [];
  for (let i = 0; i < n; i++) {
    const f = (j: number) => dv.getFloat64(ptr + i * LAYER_EXTENT_BYTES + j * 8, true);
    out.push({ start: f(0), length: f(1), offset: f(2), flags: f(3), cOffset: f(4), cLength: f(5) });
  }
  return out;
}

function writeExtents(dv: DataView, ptr: number, list: Ext[]): void {
  list.forEach((e, i) => [e.start, e.length, e.offset, e.flags, e.cOffset, e.cLength].forEach((v, j) => dv.setFloat64(ptr + i * LAYER_EXTENT_BYTES + j * 8, v, true)));
}

const isPlainData = (e: Ext): boolean => (e.flags & ExtentFlag.Data) !== 0 && (e.flags & ExtentFlag.Compressed) === 0 && e.offset >= 0;

/** LayerExtent merging (chain/layer.ts pushExtent) on records. */
function pushRefExtent(list: Ext[], e: Ext): void {
  const last = list[list.length - 1];
  const compressed = (x: Ext) => (x.flags & ExtentFlag.Compressed) !== 0;
  if (last && !compressed(last) && !compressed(e) && last.start + last.length === e.start && last.flags === e.flags && (last.offset < 0 ? e.offset < 0 : e.offset === last.offset + last.length)) {
    last.length += e.length;
    return;
  }
  list.push({ ...e });
}
