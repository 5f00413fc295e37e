import { once } from 'node:events';
import { Option } from 'commander';
import { QcowError } from '../../errors.js';
import { changes, type ChangesResult } from '../../ops/changes.js';
import { fail, formatOption, newCommand, outputOption, warn } from '../util.js';
import { imageOptsFile } from '../image-opts.js';
import { HUMAN_EXTENT_HEADER, humanExtentRows, jsonExtentList, type ExtentText } from '../extent-text.js';
import { sizeToStr as humanSize } from '../qemu-output.js';

export function command() {
  return newCommand(
    'changes',
    'Print the guest ranges that changed, in bytes: recorded by persistent bitmaps of FILENAME (the union of the --bitmap ones), ' +
      'or provided by the layers of FILENAME\'s backing chain above IMAGE (--since).',
    [
      'qcowkit changes --bitmap backup0 disk.qcow2',
      'qcowkit changes --output json --bitmap b0 --bitmap b1 disk.qcow2',
      'qcowkit changes --since base.qcow2 top.qcow2          # what the overlays above base.qcow2 hold',
    ],
  )
    .addOption(formatOption())
    .addOption(new Option('--bitmap <name>', 'a persistent bitmap of FILENAME whose dirty ranges to report (repeat for a union)').argParser((v: string, prev: string[] | undefined) => [...(prev ?? []), v]))
    .addOption(new Option('--since <image>', "a layer of FILENAME's backing chain: report what the layers above it provide"))
    .option('-U, --force-share', 'open even if another process uses the image')
    .addOption(outputOption())
    .argument('<filename>')
    .action(async (filename: string, o: { format?: 'qcow2' | 'raw'; bitmap?: string[]; since?: string; forceShare?: boolean; output: string }) => {
      try {
        if ((o.bitmap?.length ?? 0) > 0 === (o.since !== undefined)) throw new QcowError('INVALID_ARGUMENT', 'give either --bitmap NAME... or --since IMAGE');
        // Streamed: the totals first, then the extents batch by batch.
        // A pipe that fills up: the next batch waits for it to drain (memory stays bounded).
        let drained: Promise<void> | undefined;
        const write = (text: string | Uint8Array) => {
          if (!process.stdout.write(text)) drained ??= once(process.stdout, 'drain').then(() => void (drained = undefined));
        };
        const json = o.output === 'json';
        let list: ExtentText | undefined;
        const file = imageOptsFile(filename, { format: o.format });
        await changes(file.path, {
          format: file.format,
          bitmaps: o.bitmap,
          since: o.since,
          forceShare: o.forceShare === true,
          onWarning: warn,
          onSummary: (r) => {
            if (!json) write(humanHeader(r));
            list = json ? jsonExtentList(write, 0) : humanExtentRows(write);
          },
          onExtents: (pairs, n) => {
            list!.push(pairs, n);
            return drained;
          },
        });
        list!.end();
        if (json) write('\n');
      } catch (e) {
        fail(e);
      }
    });
}

function humanHeader(r: ChangesResult): string {
  const from = 'bitmaps' in r.source ? `bitmap(s) ${r.source.bitmaps.join(', ')}` : `the layers above ${r.source.since} (depth ${r.source.depth})`;
  return `Changed: ${r.bytes} bytes (${humanSize(r.bytes)}) in ${r.extentCount} extent(s), from ${from}\n${r.extentCount ? HUMAN_EXTENT_HEADER : ''}`;
}
