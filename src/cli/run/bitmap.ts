/**
 * `bitmap`'s work, free of commander: main.ts's quick path (a plain `bitmap` invocation never
 * loads commander) and the commander command both call `runBitmap`.
 */
import { QcowError } from '../../errors.js';
import { openImageFile, type FileOpener } from '../../io/file.js';
import { bitmap, bitmapCheck, bitmapDump, type BitmapAction, type BitmapCheckResult, type BitmapDump } from '../../ops/bitmap.js';
import { out, outputSettled, parseSize, plainJson, useDirectStdout, warn } from '../common.js';
import { sizeToStr as humanSize } from '../qemu-output.js';
import type { OrderedOption, QuickSpec } from '../quick.js';
import { imageOptsFile } from '../image-opts.js';
import { HUMAN_EXTENT_HEADER, humanExtentRows, jsonExtentList, type ExtentText } from '../extent-text.js';

type Fmt = 'qcow2' | 'raw';

export interface BitmapFlags {
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

/** The actions, applied in command-line order (as qemu-img does). */
const ACTIONS = ['add', 'remove', 'clear', 'enable', 'disable', 'merge'] as const;

/** The options of commands/bitmap.ts, for main.ts's quick parser (kept in step with it). */
export const spec: QuickSpec = {
  options: [
    ...ACTIONS.map((a) => ({ long: a, ordered: true, value: a === 'merge' })),
    { short: 'g', long: 'granularity', value: true },
    { long: 'disabled' },
    { short: 'b', long: 'source-file', value: true },
    { short: 'F', long: 'source-format', value: true, choices: ['qcow2', 'raw'] },
    { short: 'f', long: 'format', value: true, choices: ['qcow2', 'raw'] },
    { long: 'image-opts' },
    { long: 'dump' },
    { long: 'check' },
    { long: 'repair' },
    { short: 'U', long: 'force-share' },
    { long: 'output', value: true, choices: ['human', 'json'], default: 'human' },
  ],
  minArgs: 1,
  maxArgs: 2,
};

/**
 * The image files of an action or a dump, with all their I/O on the main thread: a command that
 * only waits for its I/O gains nothing from the thread pool, whose start-up and round trips are
 * a millisecond or more of a short command (see OpenFileOptions.synchronous).
 */
const openFile: FileOpener = (path, opts) => openImageFile(path, { ...opts, synchronous: true });

/**
 * main.ts's quick path (not the commander command, whose output tests capture). True when the
 * process may end at once: the work is done (files closed) and its output written.
 */
export async function run(args: string[], flags: Record<string, unknown>, order: OrderedOption[] = []): Promise<boolean> {
  useDirectStdout();
  await runBitmap(args[0], args[1], flags as unknown as BitmapFlags, order);
  return outputSettled();
}

/** Runs `bitmap` with the options parsed; `order` lists the actions (--add, --merge SOURCE, ...) as given. */
export async function runBitmap(filename: string | undefined, name: string | undefined, o: BitmapFlags, order: readonly OrderedOption[]): Promise<void> {
  const actions = order.filter((x) => (ACTIONS as readonly string[]).includes(x.key));
  if (o.dump || o.check) {
    if (actions.length) throw new QcowError('INVALID_ARGUMENT', '--dump and --check do not combine with other actions');
    if (o.check) {
      if (filename === undefined || name !== undefined) throw new QcowError('INVALID_ARGUMENT', 'Expecting a filename (and no bitmap name) with --check');
      const r = await bitmapCheck(imagePath(filename, o), { format: o.format, repair: o.repair === true, forceShare: o.forceShare === true, onWarning: warn });
      out(o.output === 'json' ? plainJson(r) : checkHuman(r));
      if (r.inconsistent > r.removed) process.exitCode = 2;
      return;
    }
    if (filename === undefined || name === undefined) throw new QcowError('INVALID_ARGUMENT', 'Expecting filename and bitmap name');
    // Streamed: the header once the totals are known, then the extents batch by batch.
    const json = o.output === 'json';
    let list: ExtentText | undefined;
    await bitmapDump(imagePath(filename, o), name, {
      format: o.format,
      forceShare: o.forceShare === true,
      openFile,
      onSummary: (r) => {
        if (json) {
          out(`{\n    "name": ${JSON.stringify(r.bitmap)},\n    "granularity": ${r.granularity},\n    "dirty-bytes": ${r.dirtyBytes},\n    "bits-set": ${r.bitsSet},\n    "extents": `);
          list = jsonExtentList(out, 1);
        } else {
          out(dumpHumanHeader(r));
          list = humanExtentRows(out);
        }
      },
      onExtents: (pairs, n) => list!.push(pairs, n),
    });
    list!.end();
    if (json) out('\n}\n');
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
  const has = (a: string) => actions.some((x) => x.key === a);
  if (granularity !== undefined && !has('add')) throw new QcowError('INVALID_ARGUMENT', 'granularity only supported with --add');
  if (o.sourceFormat && !o.sourceFile) throw new QcowError('INVALID_ARGUMENT', '-F only supported with -b');
  if (o.sourceFile && !has('merge')) throw new QcowError('INVALID_ARGUMENT', 'Merge bitmap source file only supported with --merge');
  if (filename === undefined || name === undefined) throw new QcowError('INVALID_ARGUMENT', 'Expecting filename and bitmap name');
  const list = actions.map((a): BitmapAction => {
    if (a.key === 'add') return { action: 'add', granularity, disabled: o.disabled === true };
    if (a.key === 'merge') return { action: 'merge', source: String(a.value), ...sourceOf(o) };
    return { action: a.key as Exclude<BitmapAction['action'], 'add' | 'merge'> };
  });
  const r = await bitmap(imagePath(filename, o), name, list, { format: o.format, openFile });
  if (o.output === 'json') out(plainJson(r));
}

/** -b SOURCE_FILE [-F SOURCE_FMT] of a merge: a name (a json: one too) and its format. */
function sourceOf(o: BitmapFlags): { sourceFile: string | undefined; sourceFormat: BitmapFlags['sourceFormat'] } {
  if (o.sourceFile === undefined) return { sourceFile: undefined, sourceFormat: o.sourceFormat };
  const f = imageOptsFile(o.sourceFile, { format: o.sourceFormat });
  return { sourceFile: f.path, sourceFormat: f.format };
}

/** FILENAME, or the file an --image-opts string names (its format then taken from it). */
function imagePath(filename: string, o: BitmapFlags): string {
  const f = imageOptsFile(filename, o);
  o.format = f.format;
  return f.path;
}

function dumpHumanHeader(r: BitmapDump): string {
  const lines = [
    `bitmap: ${r.bitmap}`,
    `granularity: ${r.granularity}`,
    `recording: ${r.enabled ? 'yes' : 'no'}`,
    `dirty: ${r.dirtyBytes} bytes (${humanSize(r.dirtyBytes)}) in ${r.extentCount} extent(s), ${r.bitsSet} bits set`,
  ];
  return lines.join('\n') + '\n' + (r.extentCount ? HUMAN_EXTENT_HEADER : '');
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
