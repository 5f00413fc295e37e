/**
 * `map` of an NBD export (qemu-img map --image-opts driver=nbd,...): the server's block status,
 * entry for entry as qemu-img prints it. With a dirty-bitmap context (x-dirty-bitmap=
 * qemu:dirty-bitmap:NAME) QEMU reads the bitmap's "dirty" bit as a hole: dirty ranges come out
 * as unallocated, clean ones as data — the form incremental-backup scripts parse.
 */
import { QcowError, throwIfAborted } from '../errors.js';
import type { MapEntry } from '../chain/chain.js';
import { NbdClient, type NbdServer } from '../nbd/client.js';
import { NBD_STATE_HOLE, NBD_STATE_ZERO, BASE_ALLOCATION } from '../nbd/protocol.js';
import type { OperationOptions } from './options.js';

export interface NbdTarget {
  server: NbdServer;
  /** Export name; undefined: the server's default export (and no name in the URI). */
  exportName?: string | undefined;
  /** Meta context to map instead of base:allocation, e.g. qemu:dirty-bitmap:NAME. */
  metaContext?: string | undefined;
}

export interface MapNbdOptions extends OperationOptions {
  start?: number;
  length?: number;
  /** Names the target in errors (default: its URI). */
  label?: string | undefined;
}

/** Block status requests ask for at most this much (qemu-img map asks in 1 GiB steps). */
const REQUEST_BYTES = 1 << 30;

/** The target as QEMU names it (its pseudo-filename: the human map's File column). */
export function nbdUri(t: NbdTarget): string {
  const s = t.server;
  if (s.type === 'unix') return t.exportName === undefined ? `nbd+unix://?socket=${s.path}` : `nbd+unix:///${t.exportName}?socket=${s.path}`;
  const host = s.host.includes(':') ? `[${s.host}]` : s.host;
  return t.exportName === undefined ? `nbd://${host}:${s.port}` : `nbd://${host}:${s.port}/${t.exportName}`;
}

/** Streams map entries (merged as qemu-img merges them) to `emit`; returns the export's size. */
export async function mapNbd(target: NbdTarget, emit: (e: MapEntry) => void, opts: MapNbdOptions = {}): Promise<{ virtualSize: number }> {
  const filename = nbdUri(target);
  const label = opts.label ?? filename;
  const client = await NbdClient.connect(target.server, label, { exportName: target.exportName, metaContext: target.metaContext ?? BASE_ALLOCATION, signal: opts.signal });
  try {
    const size = client.size;
    const start = opts.start ?? 0;
    const end = Math.min(size, opts.length === undefined ? size : start + opts.length);
    let pending: MapEntry | undefined;
    const push = (e: MapEntry) => {
      if (pending && mergeable(pending, e)) pending.length += e.length;
      else {
        if (pending) emit(pending);
        pending = e;
      }
    };
    for (let offset = start; offset < end; ) {
      throwIfAborted(opts.signal, label);
      const ask = Math.min(end - offset, REQUEST_BYTES);
      if (client.contextId === undefined) {
        // A server without block status: everything reads as data (what QEMU assumes too).
        push(entry(offset, ask, 0, filename));
        offset += ask;
      } else {
        const descriptors = await client.blockStatus(offset, ask);
        const before = offset;
        for (const d of descriptors) {
          const len = Math.min(d.length, end - offset);
          if (len <= 0) break;
          push(entry(offset, len, d.flags, filename));
          offset += len;
        }
        // Nothing, or only empty descriptors: asking again would loop forever.
        if (offset === before) throw new QcowError('IO', `NBD server: no block status for offset ${offset}`, label);
      }
      opts.onProgress?.(offset - start, end - start);
    }
    if (pending) emit(pending);
    return { virtualSize: size };
  } finally {
    await client.close();
  }
}

/** How QEMU's NBD driver reports a status descriptor: a hole is not data, a zero flag is zero, offsets are the guest's. */
function entry(start: number, length: number, flags: number, filename: string): MapEntry {
  const data = (flags & NBD_STATE_HOLE) === 0;
  const zero = (flags & NBD_STATE_ZERO) !== 0;
  const present = data || zero;
  return { start, length, depth: 0, present, zero, data, offset: present ? start : undefined, filename };
}

/** qemu-img map's rule for joining neighbours: same flags, and contiguous offsets when they have one. */
function mergeable(a: MapEntry, b: MapEntry): boolean {
  if (a.zero !== b.zero || a.data !== b.data || a.depth !== b.depth || a.present !== b.present) return false;
  if ((a.offset === undefined) !== (b.offset === undefined) || a.filename !== b.filename) return false;
  return a.offset === undefined || a.offset + a.length === b.offset;
}
