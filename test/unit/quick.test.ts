// main.ts's quick path parses plain `info` and `bitmap` invocations without commander: whatever
// it accepts must mean exactly what commander makes of it (for `bitmap`, the actions in the same
// order too), and whatever is unusual goes to commander.
import { describe, expect, it } from 'vitest';
import type { Command } from 'commander';
import { quickParse, type OrderedOption, type QuickSpec } from '../../src/cli/quick.js';
import { command as infoCommand } from '../../src/cli/commands/info.js';
import { spec as infoSpec } from '../../src/cli/run/info.js';
import { command as bitmapCommand } from '../../src/cli/commands/bitmap.js';
import { spec as bitmapSpec } from '../../src/cli/run/bitmap.js';

interface Parsed {
  args: string[];
  opts: Record<string, unknown>;
  order?: OrderedOption[];
}

/** What commander parses (args, options, and the spec's ordered options as given), or 'error' when it refuses. */
function viaCommander(make: () => Command, spec: QuickSpec, argv: string[]): Parsed | 'error' {
  const cmd = make();
  cmd.configureOutput({ writeErr: () => {}, writeOut: () => {} });
  const ordered = spec.options.filter((o) => o.ordered);
  const order: OrderedOption[] = [];
  for (const o of ordered) cmd.on(`option:${o.long}`, (v?: string) => order.push({ key: o.long.replace(/-([a-z])/g, (_, c: string) => c.toUpperCase()), value: v ?? true }));
  let got: Parsed | 'error' = 'error';
  cmd.action((...a: unknown[]) => {
    const c = a[a.length - 1] as Command;
    got = ordered.length ? { args: c.args, opts: c.opts(), order } : { args: c.args, opts: c.opts() };
  });
  try {
    cmd.parse(argv, { from: 'user' });
  } catch {
    return 'error';
  }
  return got;
}

const CASES: [string, () => Command, QuickSpec, string[][]][] = [
  [
    'info',
    infoCommand,
    infoSpec,
    [
      ['a.qcow2'],
      ['--output', 'json', 'a.qcow2'],
      ['--output=json', '--backing-chain', 'a.qcow2'],
      ['a.qcow2', '-U', '-f', 'raw'],
      ['-fqcow2', 'a.qcow2'],
      ['--output', 'xml', 'a.qcow2'],
      ['--help'],
      ['-h'],
      [],
      ['a', 'b'],
      ['--backing-chain=yes', 'a'],
      ['-Uf', 'raw', 'a'],
      ['--', 'a'],
      ['-f'],
      ['--force-share', '--output', 'human', '--output', 'json', 'x'],
      ['--bogus', 'a'],
    ],
  ],
  [
    'bitmap',
    bitmapCommand,
    bitmapSpec,
    [
      ['--add', 'a.qcow2', 'b0'],
      ['--merge', 'frag', 'a.qcow2', 'dst'],
      ['--merge', 'x', '-b', 'o.qcow2', '-F', 'qcow2', 'a.qcow2', 'dst'],
      ['--add', '-g', '1M', '--merge', 'q0', '--disable', 'a', 'k'],
      ['--clear', '--merge', 'a', '--enable', '--merge=b', '--remove', '--add', 'f', 'n'],
      ['--add', '--add', 'f', 'n'],
      ['--add', '--disabled', '-g512', 'f', 'n'],
      ['--dump', '--output', 'json', '-U', 'f', 'n'],
      ['--check', '--repair', 'f'],
      ['--image-opts', '--add', 'driver=qcow2,file.filename=x', 'n'],
      ['-f', 'qcow2', '--clear', 'f', 'n'],
      ['-f', 'vmdk', '--clear', 'f', 'n'],
      ['--merge', '--add', 'f', 'n'],
      ['--merge'],
      ['--add', 'f', 'n', 'extra'],
      [],
      ['--help'],
      ['-Ug', '4k', 'f', 'n'],
      ['--granularity=64k', '--add', 'f', 'n'],
      ['--bogus', 'f', 'n'],
      ['--', '--add', 'f'],
    ],
  ],
];

describe('quick parser agrees with commander', () => {
  for (const [name, make, spec, argvs] of CASES) {
    it.each(argvs.map((a) => [a.join(' ')  || '(none)', a]))(`${name} %s`, (_label, argv) => {
      const quick = quickParse(argv, spec);
      const full = viaCommander(make, spec, argv);
      if (quick === undefined) return; // commander decides, with its own messages
      expect(full).not.toBe('error');
      expect(quick).toEqual(full);
    });
  }

  it('accepts the plain forms (they must not fall back to commander)', () => {
    expect(quickParse(['--output', 'json', '--backing-chain', 'a'], infoSpec)).toBeDefined();
    expect(quickParse(['--help'], infoSpec)).toBeUndefined();
    expect(quickParse(['--merge', 'frag2', '-b', 'o.qcow2', '-F', 'qcow2', 'big.qcow2', 'dst'], bitmapSpec)?.order).toEqual([{ key: 'merge', value: 'frag2' }]);
    expect(quickParse(['--clear', 'big.qcow2', 'frag'], bitmapSpec)).toBeDefined();
    expect(quickParse(['--add', 'big.qcow2', 'new'], bitmapSpec)).toBeDefined();
  });
});
