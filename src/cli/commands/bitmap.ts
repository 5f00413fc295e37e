import { Option } from 'commander';
import { QcowError } from '../../errors.js';
import { bitmap, bitmapCheck, bitmapDump, type BitmapAction, type BitmapCheckResult, type BitmapDump } from '../../ops/bitmap.js';
import { fail, formatOption, imageFilename, newCommand, outputOption, parseSize, printPlainJson, warn } from '../util.js';
import { sizeToStr as humanSize } from '../qemu-output.js';

type Fmt = 'qcow2' | 'raw';

interface Opts {
  format?: Fmt;
  granularity?: string;
  sourceFile?: string;
  sourceFormat?: Fmt;
  disabled?: boolean;
  imageOpts?: boolean;
  dump?: boolean;
  check?: boolean;
  repair?: boolean;
  output: string;
  forceShare?: boolean;
}

export function command() {
  const actions: BitmapAction['action'][] = [];
  const merges: string[] = [];
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
    .action(async (filename: string | undefined, name: string | undefined, o: Opts) => {
      try {
        if (o.dump || o.check) {
          if (actions.length) throw new QcowError('INVALID_ARGUMENT', '--dump and --check do not combine with other actions');
          if (o.check) {
            if (filename === undefined || name !== undefined) throw new QcowError('INVALID_ARGUMENT', 'Expecting a filename (and no bitmap name) with --check');
            const r = await bitmapCheck(imagePath(filename, o), { format: o.format, repair: o.repair === true, forceShare: o.forceShare === true, onWarning: warn });
            if (o.output === 'json') printPlainJson(r);
            else process.stdout.write(checkHuman(r));
            if (r.inconsistent > r.removed) process.exitCode = 2;
            return;
          }
          if (filename === undefined || name === undefined) throw new QcowError('INVALID_ARGUMENT', 'Expecting filename and bitmap name');
          const r = await bitmapDump(imagePath(filename, o), name, { format: o.format, forceShare: o.forceShare === true });
          if (o.output === 'json') printPlainJson({ name: r.bitmap, granularity: r.granularity, 'dirty-bytes': r.dirtyBytes, 'bits-set': r.bitsSet, extents: r.extents });
          else process.stdout.write(dumpHuman(r));
          return;
        }
        if (o.repair) throw new QcowError('INVALID_ARGUMENT', '--repair only goes with --check');
        if (!actions.length) throw new QcowError('INVALID_ARGUMENT', 'Need at least one of --add, --remove, --clear, --enable, --disable, or --merge');
        let granularity: number | undefined;
        if (o.granularity !== undefined) {
          try {
            granularity = parseSize(o.granularity, 'granularity');
          } catch {
            throw new QcowError('INVALID_ARGUMENT', 'Invalid granularity specified');
          }
        }
        if (granularity !== undefined && !actions.includes('add')) throw new QcowError('INVALID_ARGUMENT', 'granularity only supported with --add');
        if (o.sourceFormat && !o.sourceFile) throw new QcowError('INVALID_ARGUMENT', '-F only supported with -b');
        if (o.sourceFile && !actions.includes('merge')) throw new QcowError('INVALID_ARGUMENT', 'Merge bitmap source file only supported with --merge');
        if (filename === undefined || name === undefined) throw new QcowError('INVALID_ARGUMENT', 'Expecting filename and bitmap name');
        let m = 0;
        const list: BitmapAction[] = actions.map((a): BitmapAction => {
          if (a === 'add') return { action: 'add', granularity, disabled: o.disabled === true };
          if (a === 'merge') return { action: 'merge', source: merges[m++]!, sourceFile: o.sourceFile === undefined ? undefined : imageFilename(o.sourceFile), sourceFormat: o.sourceFormat };
          return { action: a };
        });
        const r = await bitmap(imagePath(filename, o), name, list, { format: o.format });
        if (o.output === 'json') printPlainJson(r);
      } catch (e) {
        fail(e);
      }
    });
  // The actions in command-line order (qemu-img applies them so).
  for (const a of ['add', 'remove', 'clear', 'enable', 'disable'] as const) cmd.on(`option:${a}`, () => actions.push(a));
  cmd.on('option:merge', (source: string) => {
    actions.push('merge');
    merges.push(source);
  });
  return cmd;
}

/** --image-opts: the file name from `driver=qcow2,file.driver=file,file.filename=PATH`. */
function imagePath(filename: string, o: Opts): string {
  if (!o.imageOpts) return imageFilename(filename);
  const opts = new Map<string, string>();
  for (const part of filename.split(/,(?!,)/)) {
    const eq = part.indexOf('=');
    if (eq > 0) opts.set(part.slice(0, eq), part.slice(eq + 1));
  }
  const driver = opts.get('driver');
  if (driver !== undefined && driver !== 'qcow2') throw new QcowError('UNSUPPORTED', `driver '${driver}' is not supported (qcow2 only)`, filename);
  const path = opts.get('file.filename') ?? opts.get('file');
  if (path === undefined) throw new QcowError('INVALID_ARGUMENT', 'no file.filename in the image options', filename);
  if (o.format === undefined) o.format = 'qcow2';
  return imageFilename(path);
}

function dumpHuman(r: BitmapDump): string {
  const lines = [
    `bitmap: ${r.bitmap}`,
    `granularity: ${r.granularity}`,
    `recording: ${r.enabled ? 'yes' : 'no'}`,
    `dirty: ${r.dirtyBytes} bytes (${humanSize(r.dirtyBytes)}) in ${r.extents.length} extent(s), ${r.bitsSet} bits set`,
  ];
  if (r.extents.length) {
    lines.push(`${'start'.padEnd(20)}length`);
    for (const e of r.extents) lines.push(`${String(e.start).padEnd(20)}${e.length}`);
  }
  return lines.join('\n') + '\n';
}

function checkHuman(r: BitmapCheckResult): string {
  if (!r.bitmaps.length) return 'No persistent bitmaps in the backing chain.\n';
  const lines: string[] = [];
  for (const b of r.bitmaps) {
    const state = b.inconsistent ? (b.removed ? 'inconsistent (in use), removed' : 'inconsistent (in use)') : b.recording ? 'recording' : 'disabled';
    const where = b.depth === 0 ? b.file : `${b.file} (depth ${b.depth})`;
    const chain = b.onTop ? (b.continuous ? 'on the top, continuous down to here' : 'on the top, missing in a layer in between') : 'not on the top';
    const dirty = b.dirtyBytes === undefined ? 'unknown' : `${b.dirtyBytes} bytes (${humanSize(b.dirtyBytes)})`;
    lines.push(`${where}: bitmap '${b.name}', granularity ${b.granularity}: ${state}; ${chain}; dirty ${dirty}; ${b.clusters} clusters (${humanSize(b.diskBytes)}) on disk`);
  }
  lines.push(`${r.bitmaps.length} bitmap(s), ${r.inconsistent} inconsistent${r.removed ? `, ${r.removed} removed` : ''}.`);
  return lines.join('\n') + '\n';
}
