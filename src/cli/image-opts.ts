/**
 * qemu-img's --image-opts: FILENAME is a QemuOpts string (`key=value,key=value`, a doubled comma
 * is a comma inside a value). qcowkit takes two forms of it: a plain image file
 * (`driver=qcow2,file.driver=file,file.filename=PATH`) and, for `map`, an NBD export
 * (`driver=nbd,server.type=unix,server.path=SOCK[,export=NAME][,x-dirty-bitmap=CONTEXT]`).
 * A `json:{...}` file name carries the same options as a JSON object (nested objects or dotted
 * keys), and is taken in the same two forms.
 */
import { QcowError } from '../errors.js';
import type { NbdTarget } from '../ops/map-nbd.js';
import { imageFilename } from './common.js';

/** Splits a QemuOpts string; a key without '=' is a flag set to "on". */
export function parseImageOpts(text: string): Map<string, string> {
  const out = new Map<string, string>();
  let part = '';
  const take = () => {
    if (part === '') return;
    const eq = part.indexOf('=');
    if (eq === 0) throw new QcowError('INVALID_ARGUMENT', `Invalid parameter '${part}'`, text);
    out.set(eq < 0 ? part : part.slice(0, eq), eq < 0 ? 'on' : part.slice(eq + 1));
    part = '';
  };
  for (let i = 0; i < text.length; i++) {
    const c = text[i]!;
    if (c === ',' && text[i + 1] === ',') {
      part += ',';
      i++;
    } else if (c === ',') take();
    else part += c;
  }
  take();
  return out;
}

export type ImageOptsTarget = { kind: 'file'; path: string; format: 'qcow2' | 'raw' | undefined } | { kind: 'nbd'; target: NbdTarget };

const FILE_KEYS = new Set(['driver', 'file', 'file.driver', 'file.filename', 'filename']);
// reconnect-delay and open-timeout only matter to a client that reconnects: taken and ignored.
const NBD_KEYS = new Set(['driver', 'server.type', 'server.path', 'server.host', 'server.port', 'path', 'host', 'port', 'export', 'x-dirty-bitmap', 'tls-creds', 'reconnect-delay', 'open-timeout']);

/**
 * The options of a `json:` file name, flattened to dotted keys as QEMU does (`{"file":
 * {"filename": P}}` is `file.filename=P`). QEMU's JSON parser also takes single-quoted strings;
 * so does this one.
 */
export function parseJsonFilename(name: string): Map<string, string> {
  let value: unknown;
  try {
    value = JSON.parse(doubleQuoted(name.slice('json:'.length)));
  } catch {
    throw new QcowError('INVALID_ARGUMENT', 'Could not parse the JSON options', name);
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw new QcowError('INVALID_ARGUMENT', 'Invalid JSON object given', name);
  const out = new Map<string, string>();
  const walk = (o: object, prefix: string) => {
    for (const [k, v] of Object.entries(o)) {
      if (typeof v === 'object' && v !== null && !Array.isArray(v)) walk(v as object, `${prefix}${k}.`);
      else if (typeof v === 'string' || typeof v === 'number') out.set(prefix + k, String(v));
      else if (typeof v === 'boolean') out.set(prefix + k, v ? 'on' : 'off');
      else throw new QcowError('UNSUPPORTED', `image option '${prefix}${k}' is not supported`, name);
    }
  };
  walk(value, '');
  return out;
}

/** JSON text with its single-quoted strings (QEMU's extension) rewritten as double-quoted ones. */
function doubleQuoted(text: string): string {
  let out = '';
  for (let i = 0; i < text.length; i++) {
    const c = text[i]!;
    if (c === '"') {
      // A double-quoted string, copied as it is.
      let j = i + 1;
      while (j < text.length && text[j] !== '"') j += text[j] === '\\' ? 2 : 1;
      out += text.slice(i, j + 1);
      i = j;
    } else if (c === "'") {
      let str = '';
      let j = i + 1;
      for (; j < text.length && text[j] !== "'"; j++) {
        if (text[j] === '\\' && text[j + 1] === "'") str += text[++j];
        else if (text[j] === '\\') str += text[j]! + (text[++j] ?? '');
        else if (text[j] === '"') str += '\\"';
        else str += text[j];
      }
      if (j >= text.length) throw new SyntaxError('unterminated string');
      out += `"${str}"`;
      i = j;
    } else out += c;
  }
  return out;
}

/** What an --image-opts string names; `nbd` says whether the command takes NBD exports. */
export function imageOptsTarget(text: string, { nbd = false } = {}): ImageOptsTarget {
  return optionsTarget(parseImageOpts(text), text, nbd);
}

/** What a `json:` file name names (the same options as --image-opts takes). */
export function jsonFilenameTarget(name: string, { nbd = false } = {}): ImageOptsTarget {
  const o = parseJsonFilename(name);
  // A string there names another block node, which a command line of qemu-img has none of.
  const ref = o.get('file');
  if (ref !== undefined) throw new QcowError('INVALID_ARGUMENT', `Cannot find device='${ref}' nor node-name='${ref}'`, name);
  return optionsTarget(o, name, nbd, true);
}

/** `probe`: without a driver the format is probed (json: names; --image-opts needs a driver). */
function optionsTarget(o: Map<string, string>, text: string, nbd: boolean, probe = false): ImageOptsTarget {
  const driver = o.get('driver');
  if (driver === undefined && probe) {
    for (const k of o.keys()) if (!FILE_KEYS.has(k)) throw new QcowError('UNSUPPORTED', `image option '${k}' is not supported`, text);
    const path = o.get('file.filename') ?? o.get('file') ?? o.get('filename');
    if (path === undefined) throw new QcowError('INVALID_ARGUMENT', 'no file.filename in the image options', text);
    return { kind: 'file', path: imageFilename(path), format: undefined };
  }
  if (driver === undefined) throw new QcowError('INVALID_ARGUMENT', "Parameter 'driver' is missing", text);
  if (driver === 'nbd') {
    if (!nbd) throw new QcowError('UNSUPPORTED', "driver 'nbd' is taken by map only", text);
    return { kind: 'nbd', target: nbdTarget(o, text) };
  }
  if (driver !== 'qcow2' && driver !== 'raw' && driver !== 'file')
    throw new QcowError('UNSUPPORTED', `driver '${driver}' is not supported (qcow2, raw and file${nbd ? ', and nbd' : ''})`, text);
  for (const k of o.keys()) if (!FILE_KEYS.has(k)) throw new QcowError('UNSUPPORTED', `image option '${k}' is not supported`, text);
  const fileDriver = o.get('file.driver');
  if (fileDriver !== undefined && fileDriver !== 'file') throw new QcowError('UNSUPPORTED', `file.driver '${fileDriver}' is not supported (plain files only)`, text);
  const path = driver === 'file' ? o.get('filename') : (o.get('file.filename') ?? o.get('file'));
  if (path === undefined) throw new QcowError('INVALID_ARGUMENT', `no ${driver === 'file' ? 'filename' : 'file.filename'} in the image options`, text);
  return { kind: 'file', path: imageFilename(path), format: driver === 'file' ? 'raw' : driver };
}

function nbdTarget(o: Map<string, string>, text: string): NbdTarget {
  for (const k of o.keys()) if (!NBD_KEYS.has(k)) throw new QcowError('UNSUPPORTED', `NBD option '${k}' is not supported`, text);
  if (o.has('tls-creds')) throw new QcowError('UNSUPPORTED', 'NBD over TLS is not supported', text);
  const exportName = o.get('export');
  const metaContext = o.get('x-dirty-bitmap');
  // The legacy keys (path, host, port) or the server.* ones, as QEMU accepts them.
  const path = o.get('server.path') ?? o.get('path');
  const host = o.get('server.host') ?? o.get('host');
  const type = o.get('server.type') ?? (o.has('path') ? 'unix' : o.has('host') ? 'inet' : undefined);
  if (type === undefined) throw new QcowError('INVALID_ARGUMENT', "Parameter 'type' is missing", text);
  if (type === 'unix') {
    if (path === undefined) throw new QcowError('INVALID_ARGUMENT', "Parameter 'path' is missing", text);
    return { server: { type: 'unix', path }, exportName, metaContext };
  }
  if (type === 'inet') {
    if (host === undefined) throw new QcowError('INVALID_ARGUMENT', "Parameter 'host' is missing", text);
    const portText = o.get('server.port') ?? o.get('port') ?? '10809';
    const port = Number(portText);
    if (!/^\d+$/.test(portText) || port < 1 || port > 65535) throw new QcowError('INVALID_ARGUMENT', `invalid port '${portText}'`, text);
    return { server: { type: 'inet', host, port }, exportName, metaContext };
  }
  throw new QcowError('UNSUPPORTED', `server.type '${type}' is not supported (unix or inet)`, text);
}

/**
 * What FILENAME names: a plain file given by name (a `json:` one included) or, with --image-opts,
 * by options, its format taken from them or from -f; with `nbd` (map), also an NBD export given
 * by options, a `json:` name or an NBD URI / `nbd:` name.
 */
export function imageTarget(name: string, o: { imageOpts?: boolean | undefined; format?: 'qcow2' | 'raw' | undefined; nbd?: boolean }): ImageOptsTarget {
  if (o.imageOpts && o.format !== undefined) throw new QcowError('INVALID_ARGUMENT', '--image-opts and --format are mutually exclusive');
  const nbd = o.nbd === true;
  let t: ImageOptsTarget;
  if (o.imageOpts) t = imageOptsTarget(name, { nbd });
  else if (name.startsWith('json:')) t = jsonFilenameTarget(name, { nbd });
  else {
    const export_ = nbd ? nbdNameTarget(name) : undefined;
    t = export_ ? { kind: 'nbd', target: export_ } : { kind: 'file', path: imageFilename(name), format: undefined };
  }
  if (t.kind !== 'file') return t;
  if (o.format !== undefined && t.format !== undefined && t.format !== o.format)
    throw new QcowError('INVALID_ARGUMENT', `the image options name driver '${t.format}', -f names '${o.format}'`, name);
  return { kind: 'file', path: t.path, format: t.format ?? o.format };
}

/** FILENAME of a command that opens plain image files only: the path and the format (imageTarget). */
export function imageOptsFile(filename: string, o: { imageOpts?: boolean | undefined; format?: 'qcow2' | 'raw' | undefined }): { path: string; format: 'qcow2' | 'raw' | undefined } {
  const t = imageTarget(filename, o);
  if (t.kind !== 'file') throw new QcowError('UNSUPPORTED', 'an NBD export is taken by map only', filename);
  return { path: t.path, format: t.format };
}

/**
 * An NBD URI or legacy `nbd:` name as QEMU takes it for a file name (`nbd://HOST[:PORT][/EXPORT]`,
 * `nbd+unix:///EXPORT?socket=PATH`, `nbd:unix:PATH[:exportname=NAME]`, `nbd:HOST:PORT[:exportname=NAME]`);
 * undefined for any other name.
 */
export function nbdNameTarget(name: string): NbdTarget | undefined {
  const bad = (why: string) => new QcowError('INVALID_ARGUMENT', why, name);
  const m = /^nbd(\+tcp|\+unix)?:\/\/(.*)$/.exec(name);
  if (m) {
    let url: URL;
    try {
      url = new URL(`nbd://${m[2]}`);
    } catch {
      throw bad('invalid NBD URI');
    }
    const exportName = decodeURIComponent(url.pathname.replace(/^\//, '')) || undefined;
    if (m[1] === '+unix') {
      const socket = url.searchParams.get('socket');
      if (url.host || !socket) throw bad('an nbd+unix URI takes no host and needs ?socket=PATH');
      return { server: { type: 'unix', path: socket }, exportName };
    }
    if (!url.hostname) throw bad('NBD server address missing');
    return { server: { type: 'inet', host: url.hostname.replace(/^\[(.*)\]$/, '$1'), port: url.port ? Number(url.port) : 10809 }, exportName };
  }
  if (!name.startsWith('nbd:')) return undefined;
  // The legacy form: colon-separated, the export name last.
  let rest = name.slice(4);
  let exportName: string | undefined;
  const ex = rest.indexOf(':exportname=');
  if (ex >= 0) {
    exportName = rest.slice(ex + ':exportname='.length);
    if (!exportName) throw bad('the export name is empty');
    rest = rest.slice(0, ex);
  }
  if (rest.startsWith('unix:')) {
    if (rest.length === 5) throw bad('NBD server address missing');
    return { server: { type: 'unix', path: rest.slice(5) }, exportName };
  }
  const colon = rest.lastIndexOf(':');
  const host = colon < 0 ? rest : rest.slice(0, colon);
  const port = colon < 0 ? 10809 : Number(rest.slice(colon + 1));
  if (!host || !Number.isInteger(port) || port < 1 || port > 65535) throw bad('NBD server address missing');
  return { server: { type: 'inet', host, port }, exportName };
}
