// The NBD client against a scripted in-process server (what qemu-nbd never does: short and split
// replies, servers without structured replies, error chunks, broken peers), the protocol codecs,
// and the --image-opts parser.
import { createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { QcowError } from '../../src/errors.js';
import { mapNbd } from '../../src/ops/map-nbd.js';
import type { MapEntry } from '../../src/chain/chain.js';
import {
  decodeBlockStatus,
  decodeOptionReplyHeader,
  encodeMetaContextQuery,
  encodeOption,
  NBD_IHAVEOPT,
  NBD_MAGIC,
  NBD_OPT_GO,
  NBD_OPT_REPLY_MAGIC,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  NBD_STRUCTURED_REPLY_MAGIC,
} from '../../src/nbd/protocol.js';
import { imageOptsFile, imageOptsTarget, jsonFilenameTarget, nbdNameTarget, parseImageOpts, parseJsonFilename } from '../../src/cli/image-opts.js';
import { tmpDir } from '../helpers/tmp.js';

interface Script {
  size: number;
  /** Refuse structured replies (an old server: no block status). */
  noStructured?: boolean;
  /** Answers one block status request with chunks of [length, flags] descriptor lists; 'error' sends an error chunk. */
  status?: (offset: number, length: number) => Array<Array<[number, number]> | 'error'>;
  /** Close the connection instead of answering the Nth request (0-based). */
  dropAt?: number;
  /** Send this instead of the greeting. */
  greeting?: Buffer;
}

const servers: Server[] = [];
afterEach(() => {
  for (const s of servers.splice(0)) s.close();
});

/** A scripted NBD server on a unix socket; resolves to its path. */
async function fakeServer(script: Script): Promise<string> {
  const path = join(tmpDir('qcowkit-fake-nbd-'), 's');
  const server = createServer((sock) => void serve(sock, script).catch(() => sock.destroy()));
  servers.push(server);
  await new Promise<void>((r) => server.listen(path, () => r()));
  return path;
}

async function serve(sock: Socket, script: Script): Promise<void> {
  let buf = Buffer.alloc(0);
  let waiting: (() => void) | undefined;
  sock.on('data', (d) => {
    buf = Buffer.concat([buf, d]);
    waiting?.();
  });
  const read = async (n: number): Promise<Buffer> => {
    while (buf.length < n) await new Promise<void>((r) => (waiting = r));
    const out = buf.subarray(0, n);
    buf = buf.subarray(n);
    return out;
  };
  if (script.greeting) {
    sock.end(script.greeting);
    return;
  }
  const hello = Buffer.alloc(18);
  hello.writeBigUInt64BE(NBD_MAGIC, 0);
  hello.writeBigUInt64BE(NBD_IHAVEOPT, 8);
  hello.writeUInt16BE(3, 16);
  sock.write(hello);
  await read(4);
  const reply = (opt: number, type: number, data: Buffer = Buffer.alloc(0)) => {
    const h = Buffer.alloc(20);
    h.writeBigUInt64BE(NBD_OPT_REPLY_MAGIC, 0);
    h.writeUInt32BE(opt, 8);
    h.writeUInt32BE(type, 12);
    h.writeUInt32BE(data.length, 16);
    sock.write(Buffer.concat([h, data]));
  };
  for (;;) {
    const h = await read(16);
    const opt = h.readUInt32BE(8);
    const data = await read(h.readUInt32BE(12));
    if (opt === NBD_OPT_STRUCTURED_REPLY) reply(opt, script.noStructured ? NBD_REP_ERR_UNSUP : NBD_REP_ACK);
    else if (opt === NBD_OPT_SET_META_CONTEXT) {
      const nameLen = data.readUInt32BE(0);
      const q = data.subarray(4 + nameLen + 4 + 4).toString();
      if (q === 'base:allocation') reply(opt, NBD_REP_META_CONTEXT, Buffer.concat([Buffer.from([0, 0, 0, 7]), Buffer.from(q)]));
      reply(opt, NBD_REP_ACK);
    } else if (opt === NBD_OPT_GO) {
      const info = Buffer.alloc(12);
      info.writeBigUInt64BE(BigInt(script.size), 2);
      reply(opt, NBD_REP_INFO, info);
      reply(opt, NBD_REP_ACK);
      break;
    } else reply(opt, NBD_REP_ERR_UNSUP);
  }
  for (let n = 0; ; n++) {
    const req = await read(28);
    const type = req.readUInt16BE(6);
    const cookie = req.readBigUInt64BE(8);
    if (type === 2) {
      sock.end();
      return;
    }
    if (n === script.dropAt) {
      sock.destroy();
      return;
    }
    const chunks = script.status!(Number(req.readBigUInt64BE(16)), req.readUInt32BE(24));
    chunks.forEach((c, i) => {
      const last = i === chunks.length - 1;
      let payload: Buffer;
      let kind: number;
      if (c === 'error') {
        const msg = Buffer.from('disk on fire');
        payload = Buffer.alloc(6 + msg.length);
        payload.writeUInt32BE(5, 0);
        payload.writeUInt16BE(msg.length, 4);
        msg.copy(payload, 6);
        kind = 0x8001;
      } else {
        payload = Buffer.alloc(4 + 8 * c.length);
        payload.writeUInt32BE(7, 0);
        c.forEach(([len, flags], j) => {
          payload.writeUInt32BE(len, 4 + j * 8);
          payload.writeUInt32BE(flags, 8 + j * 8);
        });
        kind = 5;
      }
      const h = Buffer.alloc(20);
      h.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, 0);
      h.writeUInt16BE(last ? 1 : 0, 4);
      h.writeUInt16BE(kind, 6);
      h.writeBigUInt64BE(cookie, 8);
      h.writeUInt32BE(payload.length, 16);
      // Byte by byte for the first chunk: the client must reassemble whatever TCP hands it.
      if (i === 0) for (const b of Buffer.concat([h, payload])) sock.write(Buffer.from([b]));
      else sock.write(Buffer.concat([h, payload]));
    });
  }
}

const K = 1024;
async function map(path: string, opts: { start?: number; length?: number } = {}): Promise<MapEntry[]> {
  const out: MapEntry[] = [];
  await mapNbd({ server: { type: 'unix', path } }, (e) => out.push(e), opts);
  return out;
}
const brief = (es: MapEntry[]) => es.map((e) => [e.start, e.length, e.present, e.zero, e.data, e.offset ?? null]);

describe('NBD client', () => {
  it('short answers, split chunks and descriptors past the request are handled as QEMU does', async () => {
    // 96 KiB per answer, in two chunks (neighbours across answers merge); the last answer reaches
    // past the end of the export.
    const path = await fakeServer({
      size: 200 * K,
      status: (off) => [[[16 * K, off === 0 ? 1 : 0]], [[16 * K, 3], [64 * K, 0]]],
    });
    expect(brief(await map(path))).toEqual([
      [0, 16 * K, false, false, false, null],
      [16 * K, 16 * K, true, true, false, 16 * K],
      [32 * K, 80 * K, true, false, true, 32 * K],
      [112 * K, 16 * K, true, true, false, 112 * K],
      [128 * K, 72 * K, true, false, true, 128 * K],
    ]);
    expect(brief(await map(path, { start: 10 * K, length: 20 * K }))).toEqual([
      [10 * K, 16 * K, true, false, true, 10 * K],
      [26 * K, 4 * K, true, true, false, 26 * K],
    ]);
  });

  it('a server without structured replies: everything is data', async () => {
    const path = await fakeServer({ size: 5 * K, noStructured: true });
    expect(brief(await map(path))).toEqual([[0, 5 * K, true, false, true, 0]]);
  });

  it('an error chunk, a dropped connection, an empty answer and a non-NBD peer fail with one QcowError', async () => {
    const cases: Array<[Script, RegExp]> = [
      [{ size: 1 * K, status: () => ['error'] }, /block status at 0: disk on fire/],
      [{ size: 1 * K, status: () => [[[512, 0]]], dropAt: 1 }, /closed the connection/],
      [{ size: 1 * K, status: () => [[]] }, /block status payload of 4 bytes/],
      [{ size: 1 * K, status: () => [[[0, 0]]] }, /no block status for offset 0/],
      [{ size: 1 * K, greeting: Buffer.from('SSH-2.0-OpenSSH_9.2\r\n') }, /not an NBD server/],
    ];
    for (const [script, message] of cases) {
      const path = await fakeServer(script);
      const e = await map(path).catch((x: unknown) => x);
      expect(e, String(message)).toBeInstanceOf(QcowError);
      expect((e as QcowError).code).toBe('IO');
      expect((e as QcowError).message).toMatch(message);
    }
  });

  it('codecs: options, meta context queries, block status payloads', () => {
    const o = encodeOption(NBD_OPT_GO, new Uint8Array([1, 2, 3]));
    expect(Buffer.from(o).readBigUInt64BE(0)).toBe(NBD_IHAVEOPT);
    expect(Buffer.from(o).readUInt32BE(12)).toBe(3);
    const q = Buffer.from(encodeMetaContextQuery('disk', ['base:allocation', 'qemu:dirty-bitmap:b']));
    expect([q.readUInt32BE(0), q.subarray(4, 8).toString(), q.readUInt32BE(8), q.readUInt32BE(12)]).toEqual([4, 'disk', 2, 15]);
    const h = Buffer.alloc(20);
    h.writeBigUInt64BE(NBD_OPT_REPLY_MAGIC, 0);
    h.writeUInt32BE(NBD_OPT_GO, 8);
    h.writeUInt32BE(NBD_REP_ACK, 12);
    expect(decodeOptionReplyHeader(h)).toEqual({ option: NBD_OPT_GO, type: NBD_REP_ACK, length: 0 });
    h.writeUInt32BE(0, 0);
    expect(() => decodeOptionReplyHeader(h)).toThrow(/magic/);
    const s = Buffer.alloc(20);
    s.writeUInt32BE(9, 0);
    s.writeUInt32BE(4096, 4);
    s.writeUInt32BE(1, 8);
    s.writeUInt32BE(512, 12);
    s.writeUInt32BE(2, 16);
    expect(decodeBlockStatus(s)).toEqual({ contextId: 9, descriptors: [{ length: 4096, flags: 1 }, { length: 512, flags: 2 }] });
    expect(() => decodeBlockStatus(s.subarray(0, 10))).toThrow();
  });
});

describe('--image-opts', () => {
  it('splits QemuOpts strings: doubled commas, flags', () => {
    expect([...parseImageOpts('driver=qcow2,file.filename=a,,b.qcow2,force-share')]).toEqual([
      ['driver', 'qcow2'],
      ['file.filename', 'a,b.qcow2'],
      ['force-share', 'on'],
    ]);
    expect(() => parseImageOpts('=x')).toThrow(/Invalid parameter/);
  });

  it('plain files and NBD exports; anything else is refused by name', () => {
    expect(imageOptsTarget('driver=qcow2,file.driver=file,file.filename=x.qcow2')).toEqual({ kind: 'file', path: 'x.qcow2', format: 'qcow2' });
    expect(imageOptsTarget('driver=file,filename=x.img')).toEqual({ kind: 'file', path: 'x.img', format: 'raw' });
    expect(imageOptsTarget('driver=nbd,server.type=unix,server.path=/s,export=e,x-dirty-bitmap=qemu:dirty-bitmap:b', { nbd: true })).toEqual({
      kind: 'nbd',
      target: { server: { type: 'unix', path: '/s' }, exportName: 'e', metaContext: 'qemu:dirty-bitmap:b' },
    });
    expect(imageOptsTarget('driver=nbd,host=h', { nbd: true })).toEqual({ kind: 'nbd', target: { server: { type: 'inet', host: 'h', port: 10809 }, exportName: undefined, metaContext: undefined } });
    for (const [text, message] of [
      ['driver=nbd,path=/s', /taken by map only/],
      ['file.filename=x', /'driver' is missing/],
      ['driver=qcow2,file.driver=ssh,file.filename=x', /file.driver 'ssh'/],
      ['driver=qcow2,file.filename=x,cache.direct=on', /'cache.direct' is not supported/],
      ['driver=qcow2', /no file.filename/],
    ] as const)
      expect(() => imageOptsTarget(text), text).toThrow(message);
    expect(() => imageOptsTarget('driver=nbd,server.type=inet,server.host=h,server.port=99999', { nbd: true })).toThrow(/invalid port/);
    expect(() => imageOptsTarget('driver=nbd,server.type=vsock,server.cid=3', { nbd: true })).toThrow(/not supported/);
  });

  it('json: file names: nested or dotted keys, single-quoted strings, the format probed without a driver', () => {
    expect([...parseJsonFilename(`json:{'driver':'qcow2','file':{'driver':'file','filename':'its \\'q\\'.qcow2'}}`)]).toEqual([
      ['driver', 'qcow2'],
      ['file.driver', 'file'],
      ['file.filename', "its 'q'.qcow2"],
    ]);
    expect([...parseJsonFilename('json:{"a":{"b":{"c":1}},"d":true,"e":"x\\"y"}')]).toEqual([
      ['a.b.c', '1'],
      ['d', 'on'],
      ['e', 'x"y'],
    ]);
    expect(parseJsonFilename(`json:{'s':'say "hi"'}`).get('s')).toBe('say "hi"');
    expect(jsonFilenameTarget('json:{"driver":"qcow2","file.filename":"x.qcow2"}')).toEqual({ kind: 'file', path: 'x.qcow2', format: 'qcow2' });
    expect(jsonFilenameTarget('json:{"file":{"filename":"x.img"}}')).toEqual({ kind: 'file', path: 'x.img', format: undefined });
    expect(jsonFilenameTarget('json:{"driver":"nbd","server":{"type":"unix","path":"/s"}}', { nbd: true })).toEqual({
      kind: 'nbd',
      target: { server: { type: 'unix', path: '/s' }, exportName: undefined, metaContext: undefined },
    });
    for (const [text, message] of [
      ['json:{"driver":"qcow2"', /Could not parse the JSON options/],
      ["json:{'driver':'qcow2}", /Could not parse the JSON options/],
      ['json:[1]', /Invalid JSON object/],
      ['json:{"driver":"qcow2","file":"node0"}', /Cannot find device='node0' nor node-name='node0'/],
      ['json:{"driver":"quorum","children":[{"driver":"file","filename":"a"}]}', /'children' is not supported/],
      ['json:{"driver":"qcow2","file":{"driver":"blkdebug","image":{"filename":"a"}}}', /'file.image.filename' is not supported/],
      ['json:{"driver":"qcow2","file.filename":null}', /'file.filename' is not supported/],
    ] as const)
      expect(() => jsonFilenameTarget(text), text).toThrow(message);
    // -f agrees with the options' driver, or fills in for a name without one.
    expect(imageOptsFile('json:{"file.filename":"x"}', { format: 'raw' })).toEqual({ path: 'x', format: 'raw' });
    expect(imageOptsFile('json:{"driver":"qcow2","file.filename":"x"}', { format: 'qcow2' })).toEqual({ path: 'x', format: 'qcow2' });
    expect(() => imageOptsFile('json:{"driver":"qcow2","file.filename":"x"}', { format: 'raw' })).toThrow(/driver 'qcow2', -f names 'raw'/);
  });

  it('NBD names: URIs and the legacy nbd: form', () => {
    const unix = (path: string, exportName?: string) => ({ server: { type: 'unix', path }, exportName });
    const inet = (host: string, port: number, exportName?: string) => ({ server: { type: 'inet', host, port }, exportName });
    expect(nbdNameTarget('nbd+unix:///?socket=/run/s')).toEqual(unix('/run/s'));
    expect(nbdNameTarget('nbd+unix:///disk%201?socket=/run/s')).toEqual(unix('/run/s', 'disk 1'));
    expect(nbdNameTarget('nbd://h')).toEqual(inet('h', 10809));
    expect(nbdNameTarget('nbd+tcp://[::1]:1234/e')).toEqual(inet('::1', 1234, 'e'));
    expect(nbdNameTarget('nbd:unix:/run/s:exportname=e')).toEqual(unix('/run/s', 'e'));
    expect(nbdNameTarget('nbd:h:99')).toEqual(inet('h', 99));
    expect(nbdNameTarget('disk.qcow2')).toBeUndefined();
    expect(nbdNameTarget('nbdx:foo')).toBeUndefined();
    for (const bad of ['nbd+unix://h/?socket=/s', 'nbd+unix:///', 'nbd:unix:', 'nbd:h:0', 'nbd::99', 'nbd:unix:/s:exportname='])
      expect(() => nbdNameTarget(bad), bad).toThrow(QcowError);
  });
});
