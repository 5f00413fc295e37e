import { info, type ImageInfo } from '../../ops/info.js';
import { formatOption, newCommand, outputOption, warn } from '../util.js';

export function command() {
  return newCommand('info', 'Show information about FILENAME (fields and JSON names as qemu-img info).', [
    'qcowkit info disk.qcow2',
    'qcowkit info --output json --backing-chain overlay.qcow2',
  ])
    .addOption(formatOption())
    .addOption(outputOption())
    .option('--backing-chain', 'show every image of the backing chain, top first')
    .option('-U, --force-share', 'open the image even if another process uses it')
    .argument('<filename>')
    .action(async (filename: string, o: { format?: 'qcow2' | 'raw'; output: string; backingChain?: boolean; forceShare?: boolean }) => {
      const infos = await info(filename, { format: o.format, backingChain: o.backingChain === true, forceShare: o.forceShare === true, onWarning: warn });
      if (o.output === 'json') process.stdout.write(qemuJson(o.backingChain ? infos : infos[0]) + '\n');
      else process.stdout.write(infos.map(humanInfo).join('\n'));
    });
}

// --- qemu-img's output conventions ----------------------------------------------------------------

/**
 * Bucket of a key in QEMU's QDict (512 buckets, TDB hash). qemu-img prints dictionaries bucket by
 * bucket, which fixes the key order of `info --output json` and of the human "Format specific
 * information" block.
 */
function qdictBucket(key: string): number {
  const bytes = Buffer.from(key, 'utf8');
  let v = Math.imul(0x238f13af, bytes.length) >>> 0;
  for (let i = 0; i < bytes.length; i++) v = (v + (bytes[i]! << ((i * 5) % 24))) >>> 0;
  return ((Math.imul(1103515243, v) + 12345) >>> 0) % 512;
}

/** Keys of `obj` (undefined values dropped) in QDict iteration order. */
function qdictKeys(obj: object): string[] {
  return Object.keys(obj)
    .filter((k) => (obj as Record<string, unknown>)[k] !== undefined)
    .map((k, i) => ({ k, i, b: qdictBucket(k) }))
    // Same bucket: QEMU inserts at the head of the bucket's list, the later key comes first.
    .sort((x, y) => x.b - y.b || y.i - x.i)
    .map((x) => x.k);
}

/** A JSON string as QEMU quotes it: control and non-ASCII characters as \uXXXX. */
function qemuQuote(s: string): string {
  let out = '"';
  for (const ch of s) {
    const cp = ch.codePointAt(0)!;
    if (ch === '"') out += '\\"';
    else if (ch === '\\') out += '\\\\';
    else if (ch === '\b') out += '\\b';
    else if (ch === '\f') out += '\\f';
    else if (ch === '\n') out += '\\n';
    else if (ch === '\r') out += '\\r';
    else if (ch === '\t') out += '\\t';
    else if (cp > 0xffff) {
      const u = cp - 0x10000;
      out += `\\u${hex4(0xd800 + (u >> 10))}\\u${hex4(0xdc00 + (u & 0x3ff))}`;
    } else if (cp < 0x20 || cp >= 0x7f) out += `\\u${hex4(cp)}`;
    else out += ch;
  }
  return out + '"';
}

const hex4 = (n: number): string => n.toString(16).toUpperCase().padStart(4, '0');

/** qobject_to_json_pretty: 4-space indent, empty containers still broken over two lines. */
export function qemuJson(value: unknown, indent = 0): string {
  const nl = (n: number) => '\n' + ' '.repeat(4 * n);
  if (Array.isArray(value)) {
    return `[${value.map((v) => nl(indent + 1) + qemuJson(v, indent + 1)).join(',')}${nl(indent)}]`;
  }
  if (value !== null && typeof value === 'object') {
    const rec = value as Record<string, unknown>;
    return `{${qdictKeys(rec)
      .map((k) => `${nl(indent + 1)}${qemuQuote(k)}: ${qemuJson(rec[k], indent + 1)}`)
      .join(',')}${nl(indent)}}`;
  }
  if (typeof value === 'string') return qemuQuote(value);
  return String(value);
}

/** The human dump of a QAPI dict or list (block/qapi.c dump_qdict / dump_qlist): dashes in keys become spaces. */
function dumpQobject(value: object, indent: number, lines: string[]): void {
  const pad = ' '.repeat(indent * 4);
  const entries: [string, unknown][] = Array.isArray(value)
    ? value.map((v, i) => [`[${i}]`, v])
    : qdictKeys(value).map((k) => [k.replace(/-/g, ' '), (value as Record<string, unknown>)[k]]);
  for (const [label, v] of entries) {
    if (v !== null && typeof v === 'object') {
      lines.push(`${pad}${label}:`);
      dumpQobject(v, indent + 1, lines);
    } else lines.push(`${pad}${label}: ${String(v)}`);
  }
}

/**
 * QEMU's size_to_str: printf("%0.3g %sB") of the value in the largest binary unit below 1000,
 * rounding half to even on the exact value (as glibc does), e.g. "216 KiB", "10.2 GiB", "1e+03 KiB".
 */
export function sizeToStr(bytes: number): string {
  const suffixes = ['', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei'];
  let i = 0;
  while (i < suffixes.length - 1 && bytes >= 1000 * 1024 ** i) i++;
  return `${formatG3(BigInt(Math.round(bytes)), 10 * i)} ${suffixes[i]}B`;
}

/** %0.3g of the exact value n / 2^shift. */
function formatG3(n: bigint, shift: number): string {
  if (n === 0n) return '0';
  // n / 2^shift == n * 5^shift / 10^shift: an exact decimal.
  let digits = n * 5n ** BigInt(shift);
  const len = digits.toString().length;
  let exp = len - 1 - shift;
  const drop = len - 3;
  if (drop > 0) {
    const p = 10n ** BigInt(drop);
    let q = digits / p;
    const r = digits % p;
    const half = p / 2n;
    if (r > half || (r === half && q % 2n === 1n)) q++;
    if (q === 1000n) {
      q = 100n;
      exp++;
    }
    digits = q;
  } else digits *= 10n ** BigInt(-drop);
  const s = digits.toString(); // three digits
  if (exp < -4 || exp >= 3) {
    const mant = (s[0]! + '.' + s.slice(1)).replace(/\.?0+$/, '');
    return `${mant}e${exp < 0 ? '-' : '+'}${String(Math.abs(exp)).padStart(2, '0')}`;
  }
  const [int, frac] = exp >= 0 ? [s.slice(0, exp + 1), s.slice(exp + 1)] : ['0', '0'.repeat(-exp - 1) + s];
  const f = frac.replace(/0+$/, '');
  return f ? `${int}.${f}` : int;
}

const pad2 = (n: number): string => String(n).padStart(2, '0');

/** printf's %-Ns / %Ns count bytes, not UTF-16 units. */
function padBytes(s: string, width: number, left: boolean): string {
  const fill = ' '.repeat(Math.max(0, width - Buffer.byteLength(s, 'utf8')));
  return left ? s + fill : fill + s;
}

/** bdrv_image_info_dump (QEMU 7.2). */
export function humanInfo(i: ImageInfo): string {
  const lines = [
    `image: ${i.filename}`,
    `file format: ${i.format}`,
    `virtual size: ${sizeToStr(i['virtual-size'])} (${i['virtual-size']} bytes)`,
    `disk size: ${sizeToStr(i['actual-size'])}`,
  ];
  if (i.encrypted) lines.push('encrypted: yes');
  if (i['cluster-size'] !== undefined) lines.push(`cluster_size: ${i['cluster-size']}`);
  if (i['dirty-flag']) lines.push('cleanly shut down: no');
  if (i['backing-filename'] !== undefined) {
    const full = i['full-backing-filename'];
    const note = full === undefined ? ' (cannot determine actual path)' : full !== i['backing-filename'] ? ` (actual path: ${full})` : '';
    lines.push(`backing file: ${i['backing-filename']}${note}`);
    if (i['backing-filename-format'] !== undefined) lines.push(`backing file format: ${i['backing-filename-format']}`);
  }
  if (i.snapshots) {
    lines.push('Snapshot list:');
    lines.push(`${'ID'.padEnd(10)}${'TAG'.padEnd(17)}${'VM SIZE'.padStart(8)}${'DATE'.padStart(20)}${'VM CLOCK'.padStart(13)}${'ICOUNT'.padStart(11)}`);
    for (const s of i.snapshots) {
      const d = new Date(s['date-sec'] * 1000);
      const date = `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} ${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
      const secs = s['vm-clock-sec'];
      const clock = `${pad2(Math.floor(secs / 3600))}:${pad2(Math.floor(secs / 60) % 60)}:${pad2(secs % 60)}.${String(Math.floor(s['vm-clock-nsec'] / 1e6) % 1000).padStart(3, '0')}`;
      lines.push(
        `${padBytes(s.id, 9, true)} ${padBytes(s.name, 16, true)} ${sizeToStr(s['vm-state-size']).padStart(8)}${date.padStart(20)}${clock.padStart(13)}${String(s.icount ?? '').padStart(11)}`,
      );
    }
  }
  const data = i['format-specific']?.data;
  if (data) {
    lines.push('Format specific information:');
    dumpQobject(data, 1, lines);
  }
  return lines.join('\n') + '\n';
}
