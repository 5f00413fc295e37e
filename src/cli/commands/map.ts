import { Option } from 'commander';
import { QcowError } from '../../errors.js';
import { emptyMapJson, mapImage, mapImageJson, type MapEntry } from '../../ops/map.js';
import { mapNbd } from '../../ops/map-nbd.js';
import { imageTarget } from '../image-opts.js';
import { formatOption, newCommand, outputOption, parseSize, warn } from '../util.js';

// printf("%#x"): 0 prints as "0".
const hex = (n: number): string => (n === 0 ? "0" : `0x${n.toString(16)}`);

export function command() {
  return newCommand('map', 'Show the allocation map of FILENAME through its backing chain (as qemu-img map).', [
    'qcowkit map disk.qcow2',
    'qcowkit map --output json overlay.qcow2',
    'qcowkit map --start-offset 1G --max-length 64M disk.qcow2',
    "qcowkit map --output json --image-opts 'driver=nbd,server.type=unix,server.path=/run/nbd.sock,x-dirty-bitmap=qemu:dirty-bitmap:backup'",
    "qcowkit map 'nbd+unix:///?socket=/run/nbd.sock'",
  ], { imageOpts: 'nbd' })
    .addOption(formatOption())
    .addOption(outputOption())
    .addOption(new Option('--start-offset <offset>', 'first guest byte to map').default('0'))
    .addOption(new Option('--max-length <len>', 'map at most this many bytes'))
    .option('-U, --force-share', 'open the image even if another process uses it')
    .argument('<filename>')
    .action(async (name: string, o: { format?: 'qcow2' | 'raw'; output: string; startOffset: string; maxLength?: string; forceShare?: boolean; imageOpts?: boolean }) => {
      const target = imageTarget(name, { imageOpts: o.imageOpts, format: o.format, nbd: true });
      const json = o.output === 'json';
      const start = parseSize(o.startOffset, 'start offset');
      const length = o.maxLength !== undefined ? parseSize(o.maxLength, 'max length') : undefined;
      const common = { format: target.kind === 'file' ? target.format : o.format, forceShare: o.forceShare === true, start, ...(length !== undefined ? { length } : {}), onWarning: warn };
      if (target.kind === 'nbd') {
        // Streamed in ~1 MB chunks: a fragmented bitmap of a big export has millions of extents.
        const parts: string[] = json ? [] : [MAP_HUMAN_HEADER];
        let size = 0;
        let count = 0;
        const flush = () => {
          if (parts.length) process.stdout.write(parts.join(''));
          parts.length = 0;
          size = 0;
        };
        await mapNbd(
          target.target,
          (e) => {
            const text = json ? `${count ? ',\n' : '['}${mapJsonEntry(e)}` : mapHumanLine(e);
            count++;
            parts.push(text);
            size += text.length;
            if (size >= 1 << 20) flush();
          },
          { start, length, label: name },
        );
        if (json) parts.push(count ? ']\n' : emptyMapJson(start));
        flush();
        return;
      }
      const filename = target.path;
      if (json) {
        // Text made by the wasm writer in ~0.5 MB chunks (stdout to files and pipes is synchronous).
        await mapImageJson(filename, (chunk) => void process.stdout.write(chunk), common);
        return;
      }
      const out: string[] = [MAP_HUMAN_HEADER];
      const flush = () => {
        if (out.length) process.stdout.write(out.join(''));
        out.length = 0;
      };
      const emit = (e: MapEntry) => {
        if (e.data && e.offset === undefined) {
          flush(); // qemu-img has printed the header and the entries before the failing one
          throw new QcowError('UNSUPPORTED', 'File contains external, encrypted or compressed clusters.', filename);
        }
        const line = mapHumanLine(e);
        if (line) out.push(line);
        if (out.length > 4096) flush();
      };
      await mapImage(filename, emit, common);
      flush();
    });
}

export const MAP_HUMAN_HEADER = `${'Offset'.padEnd(16)}${'Length'.padEnd(16)}${'Mapped to'.padEnd(16)}File\n`;

/** One entry of `map --output json`, as qemu-img prints it (no separators). */
export function mapJsonEntry(e: MapEntry): string {
  const off = e.offset !== undefined ? `, "offset": ${e.offset}` : '';
  return `{ "start": ${e.start}, "length": ${e.length}, "depth": ${e.depth}, "present": ${e.present}, "zero": ${e.zero}, "data": ${e.data}${off}}`;
}

/**
 * One line of the human `map`, or '' for entries qemu-img leaves out: only ranges read from a
 * file are listed (not zeros, not unallocated ranges, not holes inside allocated clusters).
 * Data without an offset (compressed) is an error the caller reports.
 */
export function mapHumanLine(e: MapEntry): string {
  if (!e.data || e.zero || e.offset === undefined) return '';
  return `${hex(e.start).padEnd(16)}${hex(e.length).padEnd(16)}${hex(e.offset).padEnd(16)}${e.filename}\n`;
}
