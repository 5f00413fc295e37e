/**
 * The quick path of main.ts: a plain invocation of a short command (`info`, `bitmap`) is parsed
 * here, without loading commander (its code, the command's definition and its parse: a few ms of
 * a ~50 ms run). Only the unambiguous forms are accepted: anything else (help, unknown or
 * combined flags, bad choices, missing values, `--`, wrong argument counts) returns undefined and
 * commander parses it, with its messages. Each spec mirrors a commander definition in commands/;
 * test/unit/quick.test.ts checks they agree.
 */

export interface QuickOption {
  /** One letter, without the dash. */
  short?: string;
  /** Without the dashes; the result key is its camelCase. */
  long: string;
  /** Takes a value (else a boolean flag). */
  value?: boolean;
  choices?: string[];
  default?: string;
  /** Repeatable: values collected in an array. */
  multiple?: boolean;
  /** Each occurrence is also listed in `order` (commands whose actions run in command-line order). */
  ordered?: boolean;
}

export interface QuickSpec {
  options: QuickOption[];
  minArgs: number;
  maxArgs: number;
}

export interface QuickParse {
  args: string[];
  opts: Record<string, unknown>;
  /** The occurrences of `ordered` options in command-line order (only when the spec has some). */
  order?: OrderedOption[];
}

/** One occurrence of an ordered option: its key (camelCase) and value (true for a flag). */
export interface OrderedOption {
  key: string;
  value: string | true;
}

const camel = (s: string): string => s.replace(/-([a-z])/g, (_, c: string) => c.toUpperCase());

export function quickParse(argv: readonly string[], spec: QuickSpec): QuickParse | undefined {
  const opts: Record<string, unknown> = {};
  for (const o of spec.options) if (o.default !== undefined) opts[camel(o.long)] = o.default;
  const args: string[] = [];
  const order: OrderedOption[] | undefined = spec.options.some((o) => o.ordered) ? [] : undefined;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (!a.startsWith('-') || a === '-') {
      if (a === '-') return undefined;
      args.push(a);
      continue;
    }
    let o: QuickOption | undefined;
    let inline: string | undefined;
    if (a.startsWith('--')) {
      const eq = a.indexOf('=');
      const name = eq < 0 ? a.slice(2) : a.slice(2, eq);
      o = spec.options.find((x) => x.long === name);
      if (eq >= 0) inline = a.slice(eq + 1);
    } else {
      o = spec.options.find((x) => x.short === a[1]);
      if (a.length > 2) inline = a.slice(2);
    }
    if (!o) return undefined;
    const key = camel(o.long);
    if (!o.value) {
      if (inline !== undefined) return undefined;
      opts[key] = true;
      if (o.ordered) order!.push({ key, value: true });
      continue;
    }
    const v = inline ?? argv[++i];
    if (v === undefined || v.startsWith('-')) return undefined;
    if (o.choices && !o.choices.includes(v)) return undefined;
    opts[key] = o.multiple ? [...((opts[key] as string[] | undefined) ?? []), v] : v;
    if (o.ordered) order!.push({ key, value: v });
  }
  if (args.length < spec.minArgs || args.length > spec.maxArgs) return undefined;
  return order ? { args, opts, order } : { args, opts };
}
