// `json:{...}` file names on the command line (qemu-img's pseudo-protocol, e.g. iotests 089 and
// 110): info, map, check, compare, bitmap and the write commands take the plain-file forms — nested or dotted keys,
// QEMU's single-quoted strings, the format named by "driver" or probed — and answer exactly as
// qemu-img does for the same name; the other drivers are refused in one line naming the option.
// Through `node bin/qcowkit.js` (needs `npm run build` first).
import { join } from 'node:path';
import { beforeAll, expect, it } from 'vitest';
import { describeQemu, qemuImg, qemuIo } from '../helpers/qemu.js';
import { runCli } from '../helpers/cli.js';
import { expectOneLineError } from '../helpers/bytes.js';
import { tmpDir } from '../helpers/tmp.js';

let dir = '';
const q = (args: string[]) => qemuImg(args, { cwd: dir });
const k = (args: string[]) => runCli(args, { cwd: dir });

describeQemu('json: file names', () => {
  beforeAll(() => {
    dir = tmpDir('qcowkit-json-names-');
    for (const args of [
      ['create', '-q', '-f', 'qcow2', 'base.qcow2', '64M'],
      ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'],
      ['create', '-q', '-f', 'qcow2', 'copy.qcow2', '64M'],
    ])
      expect(q(args).status, args.join(' ')).toBe(0);
    expect(qemuIo(join(dir, 'base.qcow2'), ['write -P 1 0 1M']).status).toBe(0);
    expect(qemuIo(join(dir, 'top.qcow2'), ['write -P 2 4M 64k']).status).toBe(0);
    expect(qemuIo(join(dir, 'copy.qcow2'), ['write -P 1 0 1M', 'write -P 2 4M 64k']).status).toBe(0);
  });

  const names = [
    'json:{"driver":"qcow2","file.filename":"top.qcow2"}',
    "json:{'driver':'qcow2','file':{'driver':'file','filename':'top.qcow2'}}",
    'json:{"file":{"filename":"top.qcow2"}}',
    'json:{"driver":"raw","file.filename":"top.qcow2"}',
  ];

  it('info, info --backing-chain --output json, map (JSON and human) and check answer as qemu-img', () => {
    for (const name of names)
      for (const args of [['info'], ['info', '--backing-chain', '--output', 'json'], ['map', '--output', 'json'], ['map'], ['check', '--output', 'json']]) {
        const [qr, kr] = [q([...args, name]), k([...args, name])];
        const what = `${args.join(' ')} ${name}`;
        expect(kr.status, `${what}: ${kr.stderr}`).toBe(qr.status);
        // (check of a raw image: qemu-img's "does not support checks" has no file name in it.)
        if (qr.status === 0) expect(kr.stdout, what).toBe(qr.stdout);
      }
  });

  it('compare and bitmap take them too; -f agrees with the driver or fills in for a name without one', () => {
    const top = names[0]!;
    for (const args of [
      ['compare', top, 'copy.qcow2'],
      ['compare', '-F', 'qcow2', 'copy.qcow2', 'json:{"file.filename":"top.qcow2"}'],
      ['compare', 'json:{"driver":"qcow2","file.filename":"base.qcow2"}', top],
    ]) {
      const [qr, kr] = [q(args), k(args)];
      expect([kr.status, kr.stdout], args.join(' ')).toEqual([qr.status, qr.stdout]);
    }
    expect(k(['bitmap', '--add', top, 'b0']).status).toBe(0);
    const info = JSON.parse(q(['info', '--output', 'json', 'top.qcow2']).stdout) as { 'format-specific': { data: { bitmaps?: Array<{ name: string }> } } };
    expect(info['format-specific'].data.bitmaps?.map((b) => b.name)).toEqual(['b0']);
    expect(q(['check', 'top.qcow2']).status).toBe(0);
    expectOneLineError(k(['info', '-f', 'raw', top]), { name: '-f raw', file: top, message: /driver 'qcow2', -f names 'raw'/ }, 1);
    // The write commands too: commit through the json: name leaves the base holding the top's view.
    const c = k(['commit', '-q', top]);
    expect(c.status, c.stderr).toBe(0);
    expect(q(['compare', 'base.qcow2', 'copy.qcow2']).status).toBe(0);
    expect(q(['check', 'base.qcow2']).status).toBe(0);
  });

  it('what qcowkit cannot open is refused in one line, as qemu-img refuses what it cannot (exit 1)', () => {
    for (const [name, message] of [
      ['json:{"driver":"qcow2"', /Could not parse the JSON options/],
      ['json:{"driver":"qcow2","file":"top.qcow2"}', /Cannot find device='top.qcow2' nor node-name='top.qcow2'/],
      ['json:{"driver":"qcow2","file.filename":"missing.qcow2"}', /missing\.qcow2.*No such file or directory/],
      ['json:{"driver":"qcow2","file":{"driver":"blkdebug","image":{"filename":"top.qcow2"}}}', /'file\.image\.filename' is not supported/],
    ] as const) {
      const file = name.includes('missing') ? 'missing.qcow2' : name;
      expectOneLineError(k(['info', name]), { name, file, message }, 1);
    }
  });
});
