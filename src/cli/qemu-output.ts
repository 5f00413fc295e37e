/** qemu-img's output conventions: QDict key order, its JSON layout and quoting, size_to_str. */

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

/**
 * Key orders already worked out, by the object's key list: `info --backing-chain` prints a
 * hundred dictionaries of the same few shapes.
 */
const keyOrders = new Map<string, string[]>();

/** Keys of `obj` (undefined values dropped) in QDict iteration order. */
export function qdictKeys(obj: object): string[] {
  const keys = Object.keys(obj).filter((k) => (obj as Record<string, unknown>)[k] !== undefined);
  const shape = keys.join('\0');
  let order = keyOrders.get(shape);
  if (!order) {
    order = keys
      .map((k, i) => ({ k, i, b: qdictBucket(k) }))
      // Same bucket: QEMU inserts at the head of the bucket's list, the later key comes first.
      .sort((x, y) => x.b - y.b || y.i - x.i)
      .map((x) => x.k);
    keyOrders.set(shape, order);
  }
  return order;
}

/** Printable ASCII without quote or backslash: quoted as it is. */
const PLAIN = /^[\x20\x21\x23-\x5b\x5d-\x7e]*$/;

/** A JSON string as QEMU quotes it: control and non-ASCII characters as \uXXXX. */
function qemuQuote(s: string): string {
  if (PLAIN.test(s)) return `"${s}"`;
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
