/** Shared CLI plumbing: errors and exit codes, sizes, output format, progress. */
import { Command, Option } from 'commander';
export { fail } from './fail.js';
export { parseSize, progressPrinter, printJson, warn } from './common.js';

/** A subcommand with qcowkit's conventions: errors via `fail`, examples in --help. */
export function newCommand(name: string, description: string, examples: string[]): Command {
  const cmd = new Command(`qcowkit ${name}`)
    .description(description)
    .exitOverride()
    // Usage errors stay one line, with the way to more help on it.
    .configureOutput({ writeErr: (s) => process.stderr.write(s.replace(/^error: /, 'qcowkit: ').replace(/\n$/, ` (see 'qcowkit ${name} --help')\n`)) })
    .allowExcessArguments(false);
  if (examples.length) cmd.addHelpText('after', `\nExamples:\n${examples.map((e) => `  $ ${e}`).join('\n')}\n`);
  return cmd;
}

export const formatOption = (flags = '-f, --format <fmt>', what = 'image format (qcow2 or raw); probed when omitted'): Option =>
  new Option(flags, what).choices(['qcow2', 'raw']);

export const outputOption = (): Option => new Option('--output <fmt>', 'output format').choices(['human', 'json']).default('human');
