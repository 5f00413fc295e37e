import { QcowError } from '../../errors.js';
import { create, type Preallocation, type Qcow2CreateOptions } from '../../ops/create.js';
import type { LayerFormat } from '../../chain/layer.js';
import { formatOption, imageFilename, newCommand, outputOption, parseSizeExact, printPlainJson, warn } from '../util.js';

type Kind = 'size' | 'num' | 'bool' | 'str';

/** -o options per format: kind and help text (as qemu-img create -o help). */
const OPTIONS: Record<LayerFormat, Record<string, [Kind, string]>> = {
  qcow2: {
    backing_file: ['str', 'File name of a base image'],
    backing_fmt: ['str', 'Image format of the base image'],
    cluster_size: ['size', 'qcow2 cluster size'],
    compat: ['str', 'Compatibility level (v2 [0.10] or v3 [1.1])'],
    compression_type: ['str', 'Compression method used for image cluster compression (zlib or zstd)'],
    data_file: ['str', 'File name of an external data file'],
    data_file_raw: ['bool', 'The external data file must stay valid as a raw image'],
    extended_l2: ['bool', 'Extended L2 tables'],
    lazy_refcounts: ['bool', 'Postpone refcount updates'],
    preallocation: ['str', 'Preallocation mode (allowed values: off, metadata, full)'],
    refcount_bits: ['num', 'Width of a reference count entry in bits'],
    size: ['size', 'Virtual disk size'],
    // The file driver's hint for XFS extent sizes: accepted as QEMU does; qcowkit sets none.
    extent_size_hint: ['size', 'Extent size hint for the image file, 0 to disable'],
  },
  raw: {
    preallocation: ['str', 'Preallocation mode (allowed values: off, full)'],
    size: ['size', 'Virtual disk size'],
    extent_size_hint: ['size', 'Extent size hint for the image file, 0 to disable'],
  },
};

/** QEMU options qcowkit knows but refuses, with the feature they belong to. */
const REFUSED: Record<string, string> = {
  encryption: 'encryption',
};

/** Values of a refused option that ask for nothing qcowkit lacks (qemu-img accepts them too). */
const HARMLESS: Record<string, string[]> = { encryption: ['off'] };

/** Order and defaults of qemu-img's "Formatting ..." line. */
const LINE_ORDER = [
  'encryption', 'cluster_size', 'extended_l2', 'preallocation', 'compression_type', 'size', 'compat', 'backing_file', 'backing_fmt', 'data_file', 'data_file_raw', 'lazy_refcounts', 'refcount_bits',
];
const LINE_DEFAULTS: Record<string, string> = { cluster_size: '65536', extended_l2: 'off', compression_type: 'zlib', lazy_refcounts: 'off', refcount_bits: '16' };

const BOOLS: Record<string, boolean> = { on: true, yes: true, true: true, off: false, no: false, false: false };

interface Flags {
  format: LayerFormat;
  backing?: string;
  backingFormat?: string;
  unsafe?: boolean;
  options?: string[];
  quiet?: boolean;
  bitmaps?: boolean;
  output: string;
}

export function command() {
  return newCommand('create', 'Create a new image FILENAME of SIZE bytes (k, M, G, T suffixes), as qemu-img create.', [
    'qcowkit create -f qcow2 disk.qcow2 20G',
    'qcowkit create -f qcow2 -o cluster_size=2M,preallocation=metadata big.qcow2 1T',
    'qcowkit create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2',
    'qcowkit create -f qcow2 -o help',
    'qcowkit create -f qcow2 -b base.qcow2 -F qcow2 --bitmaps overlay.qcow2   # the base\'s recording bitmaps go on in the overlay',
  ])
    .addOption(formatOption('-f, --format <fmt>', 'image format: qcow2 or raw (default qcow2; qemu-img defaults to raw)').default('qcow2'))
    .option('-b, --backing <file>', 'backing file (relative names are relative to FILENAME)')
    .option('-F, --backing-format <fmt>', 'format of the backing file: qcow2 or raw (required with -b)')
    .option('-u, --unsafe', "don't open the backing file (SIZE is then required)")
    .option('-o, --options <list>', "comma-separated options ('-o help' lists them)", (v: string, prev: string[] = []) => [...prev, v])
    .option('-q, --quiet', 'print nothing on success')
    .option('--bitmaps', "re-create the backing file's recording bitmaps (names, granularity) in the new image, empty and enabled")
    .addOption(outputOption())
    .argument('[filename]')
    .argument('[size]')
    .action(async (filename: string | undefined, sizeText: string | undefined, f: Flags) => {
      // qemu-img checks each -o on its own: no empty list, no leading comma, no lone trailing one.
      for (const list of f.options ?? []) if (!isValidOptionList(list)) throw new QcowError('INVALID_ARGUMENT', `Invalid option list: ${list}`);
      const notInt64 = new Set<string>();
      const opts = parseOptionList((f.options ?? []).join(','), f.format, filename, notInt64);
      if (opts === 'help') {
        process.stdout.write(helpText(f.format));
        return;
      }
      if (filename === undefined) throw new QcowError('INVALID_ARGUMENT', 'Expecting image file name');
      if (sizeText !== undefined && opts.has('size')) throw new QcowError('INVALID_ARGUMENT', 'The image size must be specified only once', filename);
      if (sizeText !== undefined) opts.set('size', String(parseSizeExact(sizeText, 'image size', warn)));
      // -b / -F win over their -o aliases.
      if (f.backing !== undefined) opts.set('backing_file', f.backing);
      if (f.backingFormat !== undefined) opts.set('backing_fmt', f.backingFormat);
      const backingFile = opts.get('backing_file');
      const backingFmt = opts.get('backing_fmt');

      const size = opts.get('size');
      // Option values the format checks (compat=, preallocation=, ...) fail after qemu-img printed
      // its "Formatting" line: keep such an error until then.
      let optionError: unknown;
      let options: Qcow2CreateOptions | { preallocation: Preallocation | undefined } = {};
      try {
        options = f.format === 'qcow2' ? typedOptions(opts, notInt64, filename) : { preallocation: preallocation(opts, filename) };
      } catch (e) {
        optionError = e;
      }
      if (backingFmt !== undefined && backingFile === undefined)
        optionError ??= new QcowError('INVALID_ARGUMENT', 'Backing format cannot be used without backing file', filename);
      const json = f.output === 'json';
      const r = await create(imageFilename(filename), {
        format: f.format,
        size: size === undefined ? undefined : Number(size),
        backing: backingFile === undefined ? undefined : { file: backingFile, format: backingFmt as LayerFormat | undefined },
        unsafe: f.unsafe === true,
        bitmaps: f.bitmaps === true,
        options,
        onWarning: warn,
        onFormatting: (finalSize) => {
          if (!f.quiet && !json) process.stdout.write(formattingLine(filename, f.format, finalSize, opts));
          if (optionError !== undefined) throw optionError;
        },
      });
      if (f.quiet) return;
      if (json) printPlainJson(r);
      else if (r.bitmaps) process.stdout.write(r.bitmaps.length ? `Bitmaps re-created from the backing file: ${r.bitmaps.map((b) => b.name).join(', ')}\n` : 'The backing file has no recording bitmaps.\n');
    });
}

/**
 * Parses qemu's `key=value,key2,...` syntax (",," is a literal comma; a bare key means "on").
 * Sizes are normalised to bytes; other values are kept as typed (they are echoed back).
 */
function parseOptionList(text: string, format: LayerFormat, filename: string | undefined, notInt64 = new Set<string>()): Map<string, string> | 'help' {
  const out = new Map<string, string>();
  if (text === '') return out;
  const items = splitOptions(text);
  if (items.some((i) => i === 'help' || i === '?')) return 'help';
  for (const item of items) {
    if (item === '') continue;
    const eq = item.indexOf('=');
    const key = eq < 0 ? item : item.slice(0, eq);
    const refused = REFUSED[key] ?? (key.startsWith('encrypt.') ? 'encryption' : undefined);
    const harmless = eq >= 0 && HARMLESS[key]?.includes(item.slice(eq + 1));
    if (refused && format === 'qcow2' && !harmless) throw new QcowError('UNSUPPORTED', `qcowkit does not support '${key}' (${refused})`, filename);
    if (harmless && format === 'qcow2') {
      out.set(key, item.slice(eq + 1));
      continue;
    }
    const spec = OPTIONS[format][key];
    if (!spec) throw new QcowError('INVALID_ARGUMENT', `Invalid parameter '${key}'`, filename);
    let value = eq < 0 ? (spec[0] === 'bool' ? 'on' : '') : item.slice(eq + 1);
    const bad = (what: string) => new QcowError('INVALID_ARGUMENT', `Parameter '${key}' expects ${what}`, filename);
    if (spec[0] === 'size') {
      try {
        value = String(parseSizeExact(value, key, warn));
      } catch {
        throw bad('a size (bytes or a k, M, G, T suffix)');
      }
    } else if (spec[0] === 'num') {
      const n = parseNumberOption(value);
      if (n === 'invalid') throw bad('a number');
      if (n === 'range') throw new QcowError('INVALID_ARGUMENT', `Value '${value}' is too large for parameter '${key}'`, filename);
      if (!n.int64) notInt64.add(key);
      value = String(n.value);
    } else if (spec[0] === 'bool' && !(value in BOOLS)) throw bad("'on' or 'off'");
    out.set(key, value);
  }
  return out;
}

const U64 = 1n << 64n;
const I64_MIN = -(1n << 63n);

/**
 * A number option as qemu-img 7.2 reads it: strtoull with base 0 (leading blanks, a sign,
 * decimal, 0x hex or 0 octal; a negative number wraps modulo 2^64, a magnitude of 2^64 or more is
 * out of range). `value` is the 64 bits as a signed number (qemu-img echoes them so); `int64`
 * says whether the text also reads as a signed 64-bit integer, which the qcow2 driver needs.
 */
function parseNumberOption(text: string): { value: bigint; int64: boolean } | 'invalid' | 'range' {
  const m = /^[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9]\d*)$/.exec(text);
  if (!m) return 'invalid';
  const magnitude = BigInt(m[2]!.replace(/^0(?=[0-7])/, '0o'));
  if (magnitude >= U64) return 'range';
  const signed = m[1] === '-' ? -magnitude : magnitude;
  const bits = ((signed % U64) + U64) % U64;
  return { value: bits >= 1n << 63n ? bits - U64 : bits, int64: signed >= I64_MIN && signed < -I64_MIN };
}

/** QEMU's is_valid_option_list: not empty, no leading comma, trailing commas only in escaped pairs. */
export function isValidOptionList(list: string): boolean {
  if (list === '' || list.startsWith(',')) return false;
  const trailing = list.length - list.replace(/,+$/, '').length;
  return trailing % 2 === 0;
}

/** Splits at single commas; ",," stands for a comma inside a value. */
function splitOptions(text: string): string[] {
  const items = [''];
  for (let i = 0; i < text.length; i++) {
    if (text[i] !== ',') items[items.length - 1] += text[i];
    else if (text[i + 1] === ',') items[items.length - 1] += text[i++];
    else items.push('');
  }
  return items;
}

function typedOptions(opts: Map<string, string>, notInt64: Set<string>, filename: string): Qcow2CreateOptions {
  // The driver reads number options again as signed 64-bit integers (QAPI names use '-').
  for (const key of notInt64) throw new QcowError('INVALID_ARGUMENT', `Parameter '${key.replaceAll('_', '-')}' expects integer`, filename);
  const enumValue = <T extends string>(key: string, map: Record<string, T>): T | undefined => {
    const v = opts.get(key);
    if (v === undefined) return undefined;
    if (!Object.hasOwn(map, v)) throw new QcowError('INVALID_ARGUMENT', `Parameter '${key}' does not accept value '${v}'`, filename);
    return map[v];
  };
  const num = (key: string) => (opts.has(key) ? Number(opts.get(key)) : undefined);
  const bool = (key: string) => (opts.has(key) ? BOOLS[opts.get(key)!] : undefined);
  return {
    clusterSize: num('cluster_size'),
    compat: enumValue('compat', { '0.10': '0.10', v2: '0.10', '1.1': '1.1', v3: '1.1' } as const),
    lazyRefcounts: bool('lazy_refcounts'),
    refcountBits: num('refcount_bits'),
    extendedL2: bool('extended_l2'),
    compressionType: enumValue('compression_type', { zlib: 'zlib', zstd: 'zstd' } as const),
    preallocation: preallocation(opts, filename),
    dataFile: opts.get('data_file'),
    dataFileRaw: bool('data_file_raw'),
  };
}

function preallocation(opts: Map<string, string>, filename: string): Preallocation | undefined {
  const v = opts.get('preallocation');
  if (v !== undefined && !['off', 'metadata', 'falloc', 'full'].includes(v))
    throw new QcowError('INVALID_ARGUMENT', `Parameter 'preallocation' does not accept value '${v}'`, filename);
  return v as Preallocation | undefined;
}

/** `Formatting 'FILE', fmt=qcow2 cluster_size=65536 ...` with the values as given (qemu-img). */
function formattingLine(filename: string, format: LayerFormat, size: number, opts: Map<string, string>): string {
  const values = new Map(opts);
  if (!values.has('size')) values.set('size', String(size));
  const keys = format === 'raw' ? ['size', 'preallocation'] : LINE_ORDER;
  const parts = keys.flatMap((k) => {
    const v = values.get(k) ?? (format === 'qcow2' ? LINE_DEFAULTS[k] : undefined);
    // Values are printed as qemu-img prints them: a comma in a value escaped as ",,".
    return v === undefined ? [] : [`${k}=${v.replaceAll(',', ',,')}`];
  });
  return `Formatting '${filename}', fmt=${format} ${parts.join(' ')}\n`;
}

function helpText(format: LayerFormat): string {
  const lines = Object.entries(OPTIONS[format]).map(([k, [kind, text]]) => {
    const head = `  ${k}=<${kind === 'bool' ? 'bool (on/off)' : kind}>`;
    return `${head.padEnd(24)} - ${text}`;
  });
  return `Supported ${format} options:\n${lines.join('\n')}\n`;
}
