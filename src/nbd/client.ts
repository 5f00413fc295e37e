/**
 * A minimal NBD client for block status: connects over a unix or TCP socket, negotiates
 * structured replies and one meta context (base:allocation, or a dirty bitmap such as
 * qemu:dirty-bitmap:NAME), and asks NBD_CMD_BLOCK_STATUS. Reads no data: what qcowkit needs
 * from a server is its map (`map --image-opts driver=nbd,...`). No TLS.
 */
import { connect, type Socket } from 'node:net';
import { QcowError } from '../errors.js';
import {
  BASE_ALLOCATION,
  decodeBlockStatus,
  decodeErrorChunk,
  decodeInfoExport,
  decodeMetaContext,
  decodeOptionReplyHeader,
  decodeSimpleReply,
  decodeStructuredChunkHeader,
  encodeGo,
  encodeMetaContextQuery,
  encodeOption,
  encodeRequest,
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_DISC,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES,
  NBD_IHAVEOPT,
  NBD_MAGIC,
  NBD_OPT_GO,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_ERROR_BIT,
  NBD_SIMPLE_REPLY_MAGIC,
  NbdProtocolError,
  nbdErrorText,
  replyMagic,
  type StatusDescriptor,
} from './protocol.js';

export type NbdServer = { type: 'unix'; path: string } | { type: 'inet'; host: string; port: number };

export interface NbdConnectOptions {
  /** Export name ('' is the server's default export). */
  exportName?: string | undefined;
  /** The meta context to query (default base:allocation); a missing one is an error unless it is base:allocation. */
  metaContext?: string | undefined;
  signal?: AbortSignal | undefined;
}

/** Bytes a reply may carry before the client calls the server broken (qemu's own limit is 32 MiB). */
const MAX_REPLY = 64 * 1024 * 1024;

/** Reads exact byte counts from a socket. */
class SocketReader {
  readonly #chunks: Buffer[] = [];
  #buffered = 0;
  #wanted: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | undefined;
  #error: Error | undefined;

  constructor(socket: Socket) {
    socket.on('data', (d: Buffer) => {
      this.#chunks.push(d);
      this.#buffered += d.length;
      this.#serve();
    });
    const fail = (e: Error) => {
      this.#error ??= e;
      const w = this.#wanted;
      this.#wanted = undefined;
      w?.reject(this.#error);
    };
    socket.on('error', fail);
    socket.on('close', () => fail(new NbdProtocolError('the server closed the connection')));
  }

  read(n: number): Promise<Buffer> {
    if (n > MAX_REPLY) return Promise.reject(new NbdProtocolError(`the server sent a reply of ${n} bytes`));
    return new Promise((resolve, reject) => {
      this.#wanted = { n, resolve, reject };
      this.#serve();
    });
  }

  #serve(): void {
    const w = this.#wanted;
    if (!w) return;
    if (this.#buffered < w.n) {
      if (this.#error) {
        this.#wanted = undefined;
        w.reject(this.#error);
      }
      return;
    }
    this.#wanted = undefined;
    const all = this.#chunks.length === 1 ? this.#chunks[0]! : Buffer.concat(this.#chunks);
    const rest = all.subarray(w.n);
    this.#chunks.length = 0;
    if (rest.length) this.#chunks.push(rest);
    this.#buffered = rest.length;
    w.resolve(all.subarray(0, w.n));
  }
}

export class NbdClient {
  readonly #socket: Socket;
  readonly #reader: SocketReader;
  readonly #where: string;
  #cookie = 1n;
  /** The negotiated context's id, or undefined when the server offers no block status. */
  readonly contextId: number | undefined;
  readonly size: number;

  private constructor(socket: Socket, reader: SocketReader, where: string, size: number, contextId: number | undefined) {
    this.#socket = socket;
    this.#reader = reader;
    this.#where = where;
    this.size = size;
    this.contextId = contextId;
  }

  /** Connects and negotiates; `label` names the target in errors (qemu-img names the option string). */
  static async connect(server: NbdServer, label: string, opts: NbdConnectOptions = {}): Promise<NbdClient> {
    const where = server.type === 'unix' ? server.path : `${server.host}:${server.port}`;
    const socket = await openSocket(server, label, opts.signal);
    const reader = new SocketReader(socket);
    try {
      const { size, contextId } = await handshake(socket, reader, label, opts.exportName ?? '', opts.metaContext ?? BASE_ALLOCATION);
      return new NbdClient(socket, reader, where, size, contextId);
    } catch (e) {
      socket.destroy();
      if (e instanceof NbdProtocolError) throw new QcowError('IO', `NBD server at '${where}': ${e.message}`, label);
      throw e;
    }
  }

  /**
   * Block status of [offset, offset+length) in the negotiated context: descriptors in order,
   * covering at least one byte and at most `length` (the server may answer less).
   */
  async blockStatus(offset: number, length: number): Promise<StatusDescriptor[]> {
    const cookie = this.#cookie++;
    this.#socket.write(encodeRequest(NBD_CMD_BLOCK_STATUS, cookie, offset, length));
    const out: StatusDescriptor[] = [];
    try {
      for (;;) {
        const head = await this.#reader.read(4);
        if (replyMagic(head) === NBD_SIMPLE_REPLY_MAGIC) {
          const r = decodeSimpleReply(Buffer.concat([head, await this.#reader.read(12)]));
          if (r.error) throw new QcowError('IO', `block status at ${offset}: ${nbdErrorText(r.error)}`, this.#where);
          throw new NbdProtocolError('a simple reply to a block status request');
        }
        const h = decodeStructuredChunkHeader(Buffer.concat([head, await this.#reader.read(16)]));
        const payload = await this.#reader.read(h.length);
        if (h.cookie !== cookie) throw new NbdProtocolError(`a reply to request ${h.cookie} while waiting for ${cookie}`);
        if (h.type & NBD_REPLY_TYPE_ERROR_BIT) {
          const e = decodeErrorChunk(payload);
          throw new QcowError('IO', `block status at ${offset}: ${e.message || nbdErrorText(e.error)}`, this.#where);
        }
        if (h.type === NBD_REPLY_TYPE_BLOCK_STATUS) {
          const s = decodeBlockStatus(payload);
          if (s.contextId === this.contextId) out.push(...s.descriptors);
        }
        if (h.flags & NBD_REPLY_FLAG_DONE) break;
      }
    } catch (e) {
      if (e instanceof NbdProtocolError) throw new QcowError('IO', `NBD server: ${e.message}`, this.#where);
      throw e;
    }
    return out;
  }

  /** Says goodbye (NBD_CMD_DISC) and closes the socket. */
  async close(): Promise<void> {
    if (this.#socket.destroyed) return;
    await new Promise<void>((resolve) => {
      this.#socket.once('close', () => resolve());
      this.#socket.end(encodeRequest(NBD_CMD_DISC, this.#cookie++, 0, 0));
      // A server that keeps the connection open after NBD_CMD_DISC is not waited for.
      setTimeout(() => this.#socket.destroy(), 1000).unref();
    });
  }
}

function openSocket(server: NbdServer, label: string, signal: AbortSignal | undefined): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const socket = server.type === 'unix' ? connect({ path: server.path, signal }) : connect({ host: server.host, port: server.port, signal });
    socket.once('connect', () => {
      socket.removeAllListeners('error');
      resolve(socket);
    });
    socket.once('error', (e: NodeJS.ErrnoException) => {
      const where = server.type === 'unix' ? server.path : `${server.host}:${server.port}`;
      const why = e.code === 'ENOENT' ? 'No such file or directory' : e.code === 'ECONNREFUSED' ? 'Connection refused' : e.code === 'EACCES' ? 'Permission denied' : e.message;
      reject(new QcowError(e.name === 'AbortError' ? 'ABORTED' : 'IO', `Failed to connect to '${where}': ${why}`, label, { cause: e }));
    });
  });
}

async function handshake(socket: Socket, reader: SocketReader, label: string, exportName: string, context: string): Promise<{ size: number; contextId: number | undefined }> {
  const hello = await reader.read(18);
  const hv = new DataView(hello.buffer, hello.byteOffset, 18);
  if (hv.getBigUint64(0) !== NBD_MAGIC) throw new NbdProtocolError('not an NBD server');
  if (hv.getBigUint64(8) !== NBD_IHAVEOPT) throw new NbdProtocolError('the server speaks the old style handshake only');
  const serverFlags = hv.getUint16(16);
  if (!(serverFlags & NBD_FLAG_FIXED_NEWSTYLE)) throw new NbdProtocolError('the server does not do the fixed newstyle handshake');
  const clientFlags = new Uint8Array(4);
  new DataView(clientFlags.buffer).setUint32(0, NBD_FLAG_FIXED_NEWSTYLE | (serverFlags & NBD_FLAG_NO_ZEROES));
  socket.write(clientFlags);

  const option = async (opt: number, data?: Uint8Array, onReply?: (type: number, payload: Buffer) => void): Promise<number> => {
    socket.write(encodeOption(opt, data));
    for (;;) {
      const h = decodeOptionReplyHeader(await reader.read(20));
      const payload = await reader.read(h.length);
      if (h.option !== opt) throw new NbdProtocolError(`a reply to option ${h.option} while waiting for ${opt}`);
      if (h.type === NBD_REP_ACK) return h.type;
      if (h.type & 0x80000000) {
        const message = payload.length ? ` (server reported: ${new TextDecoder().decode(payload)})` : '';
        if (h.type === NBD_REP_ERR_TLS_REQD) throw new QcowError('UNSUPPORTED', `the server requires TLS, which qcowkit does not do${message}`, label);
        if (opt === NBD_OPT_GO && h.type === NBD_REP_ERR_UNKNOWN) throw new QcowError('NOT_FOUND', `Requested export not available${message}`, label);
        return h.type;
      }
      onReply?.(h.type, payload);
    }
  };

  let contextId: number | undefined;
  const structured = (await option(NBD_OPT_STRUCTURED_REPLY)) === NBD_REP_ACK;
  if (structured) {
    await option(NBD_OPT_SET_META_CONTEXT, encodeMetaContextQuery(exportName, [context]), (type, payload) => {
      if (type !== NBD_REP_META_CONTEXT) return;
      const m = decodeMetaContext(payload);
      if (m.name === context) contextId = m.id;
    });
  }
  if (contextId === undefined && context !== BASE_ALLOCATION)
    throw new QcowError('NOT_FOUND', `the server has no meta context '${context}' (is the bitmap exported, as with qemu-nbd -B NAME?)`, label);

  let size: bigint | undefined;
  const go = await option(NBD_OPT_GO, encodeGo(exportName), (type, payload) => {
    if (type === NBD_REP_INFO) size = decodeInfoExport(payload)?.size ?? size;
  });
  if (go !== NBD_REP_ACK) throw new NbdProtocolError(`the server refused the export (reply ${go >>> 0})`);
  if (size === undefined) throw new NbdProtocolError('the server did not send the export size');
  if (size > BigInt(Number.MAX_SAFE_INTEGER)) throw new NbdProtocolError(`export size ${size} is too large`);
  return { size: Number(size), contextId };
}
