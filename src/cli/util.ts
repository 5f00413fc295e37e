/** Shared CLI plumbing: errors and exit codes, sizes, output format, progress. */
import { Command, Option } from 'commander';
import { QcowError } from '../errors.js';
export { fail } from './fail.js';
export { parseSize, parseSizeExact, progressPrinter, printJson, printPlainJson, warn, imageFilename, feedback, printResult } from './common.js';

/** A subcommand with qcowkit's conventions: errors via `fail`, examples in --help. */
export function newCommand(name: string, description: string, examples: string[], opts: { imageOpts?: boolean | 'nbd' } = {}): Command {
  const cmd = new Command(`qcowkit ${name}`)
    .description(description)
    .exitOverride()
    // Usage errors stay one line, with the way to more help on it.
    .configureOutput({ writeErr: (s) => process.stderr.write(s.replace(/^error: /, 'qcowkit: ').replace(/\n$/, ` (see 'qcowkit ${name} --help')\n`)) })
    .allowExcessArguments(false);
  // qemu-img's --image-opts (a QemuOpts string instead of a file name): refused in one line,
  // except by commands that take the plain-file form themselves (`opts.imageOpts`).
  const nbdForm = opts.imageOpts === 'nbd' ? ', or an NBD export: driver=nbd,server.type=unix,server.path=SOCKET[,export=NAME][,x-dirty-bitmap=qemu:dirty-bitmap:BITMAP]' : '';
  if (opts.imageOpts) cmd.addOption(new Option('--image-opts', `FILENAME is an option string: driver=qcow2,file.filename=PATH${nbdForm}`));
  else cmd.addOption(new Option('--image-opts', 'not supported (qemu-img: treat file names as option strings)').hideHelp());
  cmd.hook('preAction', (_cmd, action) => {
    const o = action.opts();
    if (o.imageOpts && !opts.imageOpts) throw new QcowError('UNSUPPORTED', '--image-opts is not supported; pass the image file name (and -f) instead');
    if (o.imageOpts && o.format !== undefined) throw new QcowError('INVALID_ARGUMENT', '--image-opts and --format are mutually exclusive');
    // compare checks its own -f/-F when it opens the images (an open error, exit 2).
    if (name !== 'compare' && o.format !== undefined && o.format !== 'qcow2' && o.format !== 'raw')
      throw new QcowError('UNSUPPORTED', `Unknown file format '${String(o.format)}' (qcow2 and raw are supported)`);
  });
  if (examples.length) cmd.addHelpText('after', `\nExamples:\n${examples.map((e) => `  $ ${e}`).join('\n')}\n`);
  return cmd;
}

/**
 * -f: qcow2 or raw. Checked once parsing is done (see newCommand), so that a repeated -f is
 * allowed and the last one wins, as in qemu-img.
 */
export const formatOption = (flags = '-f, --format <fmt>', what = 'image format (qcow2 or raw); probed when omitted'): Option => new Option(flags, what);

export const outputOption = (): Option => new Option('--output <fmt>', 'output format').choices(['human', 'json']).default('human');
