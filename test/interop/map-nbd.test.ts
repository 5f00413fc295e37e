// `qcowkit map --image-opts driver=nbd,...` versus `qemu-img map` of the same qemu-nbd export:
// identical stdout (JSON and human) for base:allocation and for dirty bitmaps (x-dirty-bitmap,
// the incremental-backup form), over unix and TCP sockets, with export names, --start-offset /
// --max-length, an unaligned size and a 1 TiB image with a fragmented bitmap; and one clear line
// for every refusal (no server, unknown export, missing bitmap, TLS, bad options).
import { createServer } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { describeQemu, hasQemuNbd, qemuImg, qemuIo } from '../helpers/qemu.js';
import { runCommandInProcess } from '../helpers/cli.js';
import { expectOneLineError } from '../helpers/bytes.js';
import { startQemuNbd, type QemuNbd } from '../helpers/nbd.js';
import { tmpDir } from '../helpers/tmp.js';
import { command as mapCommand } from '../../src/cli/commands/map.js';
import { mapNbd } from '../../src/ops/map-nbd.js';
import type { MapEntry } from '../../src/chain/chain.js';

const M = 1024 * 1024;
let dir = '';
const servers: QemuNbd[] = [];
const ok = (r: { status: number; stdout: string; stderr: string }, what: string) => {
  if (r.status !== 0) throw new Error(`${what}: ${r.stdout}${r.stderr}`);
};
const q = (args: string[]) => qemuImg(args, { cwd: dir, timeout: 120_000 });
const io = (file: string, cmds: string[]) => ok(qemuIo(join(dir, file), cmds, { format: 'qcow2' }), `qemu-io ${cmds.join('; ')}`);
const ours = (args: string[]) => runCommandInProcess(mapCommand, args, dir);
const unix = (sock: string, extra = '') => `driver=nbd,server.type=unix,server.path=${sock}${extra}`;

/** A TCP port nobody listens on right now. */
function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as { port: number };
      s.close(() => resolve(port));
    });
  });
}

async function expectSame(args: string[]): Promise<string> {
  const theirs = q(['map', ...args]);
  ok(theirs, `qemu-img map ${args.join(' ')}`);
  const mine = await ours(args);
  expect(mine.stderr, args.join(' ')).toBe('');
  expect(mine.status, args.join(' ')).toBe(0);
  expect(mine.stdout, args.join(' ')).toBe(theirs.stdout);
  return mine.stdout;
}

describeQemu('map of an NBD export (--image-opts driver=nbd)', () => {
  let chain: QemuNbd;
  let tera: QemuNbd;

  beforeAll(async () => {
    if (!hasQemuNbd()) throw new Error('qemu-nbd is needed (Debian qemu-utils)');
    dir = tmpDir('qcowkit-map-nbd-');
    // A base with data, an overlay written through two recording bitmaps started at different times.
    ok(q(['create', '-q', '-f', 'qcow2', 'base.qcow2', '10M']), 'create base');
    io('base.qcow2', ['write -P 1 0 1M', 'write -P 4 6M 512k']);
    ok(q(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2', `${10 * M + 3 * 512}`]), 'create top');
    ok(q(['bitmap', '--add', 'top.qcow2', 'b0']), 'bitmap b0');
    io('top.qcow2', ['write -P 2 2M 1M', 'write -z 4M 1M', 'discard 0 64k', 'write -P 3 8M 64k', `write -P 9 ${10 * M} 1536`]);
    ok(q(['bitmap', '--add', '-g', '512k', 'top.qcow2', 'b1']), 'bitmap b1');
    io('top.qcow2', ['write -P 2 5M 128k', 'write -P 5 9M 4k']);
    chain = await startQemuNbd(['-r', '-t', '-f', 'qcow2', '-B', 'b0', '-B', 'b1', join(dir, 'top.qcow2')]);
    servers.push(chain);
    // 1 TiB with a bitmap of 3000 scattered dirty granules: many descriptors, several requests.
    ok(q(['create', '-q', '-f', 'qcow2', 'tera.qcow2', '1T']), 'create tera');
    ok(q(['bitmap', '--add', 'tera.qcow2', 'frag']), 'bitmap frag');
    const writes: string[] = [];
    for (let i = 0; i < 3000; i++) writes.push(`write -P ${(i % 200) + 1} ${((i * 2654435761) % 16_000_000) * 65536} 4k`);
    io('tera.qcow2', writes);
    tera = await startQemuNbd(['-r', '-t', '-f', 'qcow2', '-B', 'frag', join(dir, 'tera.qcow2')]);
    servers.push(tera);
  }, 300_000);

  afterAll(async () => {
    await Promise.all(servers.map((s) => s.stop()));
  });

  it('base:allocation and each dirty bitmap, JSON and human, equal qemu-img map', async () => {
    for (const extra of ['', ',x-dirty-bitmap=qemu:dirty-bitmap:b0', ',x-dirty-bitmap=qemu:dirty-bitmap:b1']) {
      for (const out of ['json', 'human']) await expectSame(['--output', out, '--image-opts', unix(chain.sock, extra)]);
    }
    // The dirty ranges come out as unallocated entries (what backup scripts look for).
    const b0 = JSON.parse(await expectSame(['--output', 'json', '--image-opts', unix(chain.sock, ',x-dirty-bitmap=qemu:dirty-bitmap:b0')])) as Array<{ start: number; present: boolean }>;
    expect(b0.filter((e) => !e.present).map((e) => e.start)).toEqual([0, 2 * M, 4 * M, 8 * M, 9 * M, 10 * M]);
  });

  it('--start-offset and --max-length, inside and past the end', async () => {
    for (const [s, l] of [['100000', '3000000'], ['65536', '1'], ['5M', undefined], [`${10 * M + 1000}`, undefined], ['20M', undefined], ['0', '0']] as const) {
      const args = ['--output', 'json', '--start-offset', s, ...(l !== undefined ? ['--max-length', l] : []), '--image-opts'];
      await expectSame([...args, unix(chain.sock)]);
      await expectSame([...args, unix(chain.sock, ',x-dirty-bitmap=qemu:dirty-bitmap:b1')]);
    }
  });

  it('a 1 TiB export with a fragmented bitmap: thousands of extents over several requests', async () => {
    const text = await expectSame(['--output', 'json', '--image-opts', unix(tera.sock, ',x-dirty-bitmap=qemu:dirty-bitmap:frag')]);
    expect((JSON.parse(text) as unknown[]).length).toBeGreaterThan(5000);
    await expectSame(['--image-opts', unix(tera.sock)]);
  }, 120_000);

  it('TCP, export names and the legacy keys (path, host, port)', async () => {
    const port = await freePort();
    const named = await startQemuNbd(['-r', '-t', '-f', 'qcow2', '-x', 'disk0', '-B', 'b0', join(dir, 'top.qcow2')], { tcpPort: port });
    servers.push(named);
    await expectSame(['--image-opts', `driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=${port},export=disk0`]);
    await expectSame(['--output', 'json', '--image-opts', `driver=nbd,host=127.0.0.1,port=${port},export=disk0,x-dirty-bitmap=qemu:dirty-bitmap:b0`]);
    await expectSame(['--image-opts', `driver=nbd,path=${chain.sock}`]);
    await expectSame(['--image-opts', unix(chain.sock, ',export=,reconnect-delay=1')]);
    // The same exports named by URI or by the legacy nbd: syntax instead of --image-opts.
    for (const name of [`nbd+unix:///?socket=${chain.sock}`, `nbd+unix://?socket=${chain.sock}`, `nbd:unix:${chain.sock}`, `nbd://127.0.0.1:${port}/disk0`, `nbd:127.0.0.1:${port}:exportname=disk0`])
      for (const out of ['json', 'human']) await expectSame(['--output', out, name]);
  });

  it('the library: entries, size and progress', async () => {
    const entries: MapEntry[] = [];
    const progress: number[] = [];
    const r = await mapNbd({ server: { type: 'unix', path: chain.sock }, metaContext: 'qemu:dirty-bitmap:b1' }, (e) => entries.push(e), { onProgress: (d) => progress.push(d) });
    expect(r.virtualSize).toBe(10 * M + 1536);
    expect(entries.reduce((n, e) => n + e.length, 0)).toBe(10 * M + 1536);
    expect(entries.filter((e) => !e.data).map((e) => [e.start, e.length])).toEqual([[5 * M, 512 * 1024], [9 * M, 512 * 1024]]);
    expect(progress.at(-1)).toBe(10 * M + 1536);
  });

  it('refusals: one line naming the option string, exit 1, as qemu-img refuses them', async () => {
    const cases: Array<[string[], RegExp, string?]> = [
      [['--image-opts', unix(join(dir, 'nope.sock'))], /Failed to connect to '.*nope\.sock': No such file or directory/],
      [['--image-opts', unix(chain.sock, ',export=foo')], /Requested export not available \(server reported: export 'foo' not present\)/],
      [['--image-opts', unix(chain.sock, ',x-dirty-bitmap=qemu:dirty-bitmap:nope')], /no meta context 'qemu:dirty-bitmap:nope'/],
      [['--image-opts', `driver=nbd,server.path=${chain.sock}`], /Parameter 'type' is missing/],
      [['--image-opts', unix(chain.sock, ',tls-creds=tls0')], /TLS is not supported/],
      [['--image-opts', unix(chain.sock, ',bogus=1')], /NBD option 'bogus' is not supported/],
      [['--image-opts', 'driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=1'], /Failed to connect to '127\.0\.0\.1:1': Connection refused/],
      [['--image-opts', 'driver=vmdk,file.filename=x.vmdk'], /driver 'vmdk' is not supported/],
    ];
    for (const [args, message] of cases) {
      expect(q(['map', ...args]).status, args.join(' ')).toBe(1);
      const r = await ours(args);
      expectOneLineError(r, { name: args.join(' '), file: args[1]!, message }, 1);
    }
    for (const [name, message] of [
      [`nbd+unix:///foo?socket=${chain.sock}`, /Requested export not available/],
      [`nbd:unix:${chain.sock}:exportname=`, /the export name is empty/],
      ['nbd+unix:///?nosocket=1', /needs \?socket=PATH/],
    ] as const) {
      expect(q(['map', name]).status, name).toBe(1);
      expectOneLineError(await ours([name]), { name, file: name, message }, 1);
    }
    const both = await ours(['-f', 'raw', '--image-opts', unix(chain.sock)]);
    expect(both.status).toBe(1);
    expect(both.stderr).toBe('qcowkit: --image-opts and --format are mutually exclusive\n');
  });

  it('--image-opts naming a plain image file maps it as the file name does', async () => {
    const plain = await ours(['--output', 'json', 'top.qcow2']);
    const viaOpts = await ours(['--output', 'json', '--image-opts', 'driver=qcow2,file.driver=file,file.filename=top.qcow2']);
    expect(viaOpts.stderr).toBe('');
    expect(viaOpts.stdout).toBe(plain.stdout);
  });
});
