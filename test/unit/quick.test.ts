// main.ts's quick path parses plain `info` invocations without commander: whatever it
// accepts must mean exactly what commander makes of it, and whatever is unusual goes to commander.
import { describe, expect, it } from 'vitest';
import type { Command } from 'commander';
import { quickParse, type QuickSpec } from '../../src/cli/quick.js';
import { command as infoCommand } from '../../src/cli/commands/info.js';
import { spec as infoSpec } from '../../src/cli/run/info.js';

/** What commander parses (args and options), or 'error' when it refuses. */
function viaCommander(make: () => Command, argv: string[]): { args: string[]; opts: Record<string, unknown> } | 'error' {
  const cmd = make();
  cmd.configureOutput({ writeErr: () => {}, writeOut: () => {} });
  let got: { args: string[]; opts: Record<string, unknown> } | 'error' = 'error';
  cmd.action((...a: unknown[]) => {
    const c = a[a.length - 1] as Command;
    got = { args: c.args, opts: c.opts() };
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
];

describe('quick parser agrees with commander', () => {
  for (const [name, make, spec, argvs] of CASES) {
    it.each(argvs.map((a) => [a.join(' ')  || '(none)', a]))(`${name} %s`, (_label, argv) => {
      const quick = quickParse(argv, spec);
      const full = viaCommander(make, argv);
      if (quick === undefined) return; // commander decides, with its own messages
      expect(full).not.toBe('error');
      expect(quick).toEqual(full);
    });
  }

  it('accepts the plain forms (they must not fall back to commander)', () => {
    expect(quickParse(['--output', 'json', '--backing-chain', 'a'], infoSpec)).toBeDefined();
    expect(quickParse(['--help'], infoSpec)).toBeUndefined();
  });
});
