/**
 * qemu-img's --image-opts: FILENAME is a QemuOpts string (`key=value,key=value`, a doubled comma
 * is a comma inside a value). qcowkit takes two forms of it: a plain image file
 * (`driver=qcow2,file.driver=file,file.filename=PATH`) and, for `map`, an NBD export
 * (`driver=nbd,server.type=unix,server.path=SOCK[,export=NAME][,x-dirty-bitmap=CONTEXT]`).
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

/** What an --image-opts string names; `nbd` says whether the command takes NBD exports. */
export function imageOptsTarget(text: string, { nbd = false } = {}): ImageOptsTarget {
  const o = parseImageOpts(text);
  const driver = o.get('driver');
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

/** FILENAME of a command that takes --image-opts for plain files: the path, and the format the options name. */
export function imageOptsFile(filename: string, o: { imageOpts?: boolean | undefined; format?: 'qcow2' | 'raw' | undefined }): { path: string; format: 'qcow2' | 'raw' | undefined } {
  if (!o.imageOpts) return { path: imageFilename(filename), format: o.format };
  if (o.format !== undefined) throw new QcowError('INVALID_ARGUMENT', '--image-opts and --format are mutually exclusive');
  const t = imageOptsTarget(filename);
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
