/**
 * `info`'s work, free of commander: the quick path of main.ts (a plain `info` invocation never
 * loads commander) and the commander command both call `runInfo`.
 */
import { info, type ImageInfo } from '../../ops/info.js';
import { qdictKeys, qemuJson, sizeToStr } from '../qemu-output.js';
import { out, useDirectStdout, warn } from '../common.js';
import { imageOptsFile } from '../image-opts.js';
import type { QuickSpec } from '../quick.js';

export interface InfoFlags {
  format?: 'qcow2' | 'raw';
  output: string;
  backingChain?: boolean;
  forceShare?: boolean;
  imageOpts?: boolean;
}

/** The options of commands/info.ts, for main.ts's quick parser (kept in step with it). */
export const spec: QuickSpec = {
  options: [
    { short: 'f', long: 'format', value: true, choices: ['qcow2', 'raw'] },
    { long: 'output', value: true, choices: ['human', 'json'], default: 'human' },
    { long: 'backing-chain' },
    { short: 'U', long: 'force-share' },
    { long: 'image-opts' },
  ],
  minArgs: 1,
  maxArgs: 1,
};

/** main.ts's quick path (not the commander command, whose output tests capture). */
export async function run(args: string[], flags: Record<string, unknown>): Promise<void> {
  useDirectStdout();
  await runInfo(args[0]!, flags as unknown as InfoFlags);
}

export async function runInfo(filename: string, o: InfoFlags): Promise<void> {
  const file = imageOptsFile(filename, o);
  const infos = await info(file.path, { format: file.format, backingChain: o.backingChain === true, forceShare: o.forceShare === true, onWarning: warn });
  if (o.output === 'json') out(qemuJson(o.backingChain ? infos : infos[0]) + '\n');
  else out(infos.map(humanInfo).join('\n'));
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
