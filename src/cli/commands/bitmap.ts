import { Option } from 'commander';
import { formatOption, newCommand, outputOption } from '../util.js';
import type { OrderedOption } from '../quick.js';
import { runBitmap, type BitmapFlags } from '../run/bitmap.js';

// The work is in ../run/bitmap.ts (shared with main.ts's quick path); options here and its
// `spec` must stay in step.
export function command() {
  // The actions in command-line order (qemu-img applies them so).
  const order: OrderedOption[] = [];
  const cmd = newCommand(
    'bitmap',
    'Change the persistent dirty bitmap BITMAP of FILENAME as qemu-img bitmap does: one or more actions, applied in order, ' +
      'each stored crash-safely. --dump prints a bitmap\'s dirty ranges; --check reports the bitmaps along the backing chain.',
    [
      'qcowkit bitmap --add disk.qcow2 backup0                    # new bitmap, recording, default granularity',
      'qcowkit bitmap --add -g 1M --disable disk.qcow2 b1         # added, then disabled',
      'qcowkit bitmap --merge b1 --disable disk.qcow2 b0          # b0 |= b1, then stop recording into b0',
      'qcowkit bitmap --add --merge b0 -b base.qcow2 top.qcow2 b0 # copy a bitmap across files (any granularity)',
      'qcowkit bitmap --clear --remove disk.qcow2 old',
      'qcowkit bitmap --dump --output json disk.qcow2 backup0     # dirty extents in guest bytes',
      'qcowkit bitmap --check --repair top.qcow2                  # every bitmap along the chain; drop inconsistent ones',
    ],
    { imageOpts: true },
  )
    .addOption(new Option('--add', 'create BITMAP, enabled to record future edits'))
    .addOption(new Option('--remove', 'remove BITMAP'))
    .addOption(new Option('--clear', 'clear BITMAP'))
    .addOption(new Option('--enable', 'make BITMAP record future edits'))
    .addOption(new Option('--disable', 'make BITMAP stop recording future edits'))
    .addOption(new Option('--merge <source>', 'merge the SOURCE bitmap into BITMAP (repeatable)'))
    .addOption(new Option('-g, --granularity <size>', 'granularity for --add (power of two, 512 .. 2G; default: the cluster size clamped to 4k .. 64k)'))
    .addOption(new Option('--disabled', '--add creates BITMAP disabled (qcowkit shorthand for --add --disable)'))
    .addOption(new Option('-b, --source-file <file>', 'file holding the SOURCE bitmaps of --merge'))
    .addOption(formatOption('-F, --source-format <fmt>', 'format of the --merge source file'))
    .addOption(formatOption())
    .option('--dump', "print BITMAP's dirty extents (guest bytes), dirty bytes and bits set")
    .option('--check', 'report every bitmap along the backing chain of FILENAME (no BITMAP argument)')
    .option('--repair', 'with --check: remove inconsistent (in-use) bitmaps')
    .option('-U, --force-share', 'with --dump/--check: open even if another process uses the image')
    .addOption(outputOption())
    .argument('[filename]')
    .argument('[bitmap]')
    .action(async (filename: string | undefined, name: string | undefined, o: BitmapFlags) => runBitmap(filename, name, o, order));
  for (const a of ['add', 'remove', 'clear', 'enable', 'disable'] as const) cmd.on(`option:${a}`, () => order.push({ key: a, value: true }));
  cmd.on('option:merge', (source: string) => order.push({ key: 'merge', value: source }));
  return cmd;
}
