import { Option } from 'commander';
import { plan, type PlanResult, type PlanWay } from '../../ops/plan.js';
import { fail, formatOption, newCommand, outputOption, printJson, warn } from '../util.js';
import { imageOptsFile } from '../image-opts.js';
import { sizeToStr as humanSize } from '../qemu-output.js';

export function command() {
  return newCommand(
    'plan',
    'For removing LAYER from the backing chain of FILENAME, show the two ways side by side: commit LAYER into its backing file, ' +
      'or pull LAYER into the image above it (rebase that image onto LAYER\'s backing file): bytes and clusters each copies, ' +
      'how much each file grows, and which moves less. Nothing is written; the figures are those of commit --dry-run and rebase --dry-run.',
    ['qcowkit plan top.qcow2 --drop mid.qcow2', 'qcowkit plan --output json vm/top.qcow2 --drop base-2024.qcow2'],
  )
    .addOption(formatOption())
    .addOption(new Option('--drop <layer>', 'the layer to remove (backing name as stored in the chain, or a path)').makeOptionMandatory())
    .addOption(outputOption())
    .argument('<filename>')
    .action(async (filename: string, o: { format?: 'qcow2' | 'raw'; drop: string; output: string }) => {
      try {
        const file = imageOptsFile(filename, { format: o.format });
        const r = await plan(file.path, { format: file.format, drop: o.drop, onWarning: warn });
        if (o.output === 'json') printJson(r);
        else process.stdout.write(human(r));
      } catch (e) {
        fail(e);
      }
    });
}

function way(title: string, w: PlanWay): string[] {
  if (!w.possible) return [`${title}: not possible (${w.reason})`];
  return [
    `${title}: writes ${w.writes}`,
    `    data copied:   ${humanSize(w.dataBytes)} (${w.dataBytes} bytes, ${w.dataClusters} clusters)`,
    `    zero writes:   ${humanSize(w.zeroBytes)} (${w.zeroBytes} bytes, no data)`,
    `    file grows by: up to ${humanSize(w.growth)}`,
    ...w.commands.map((c) => `    $ ${c}`),
  ];
}

function human(r: PlanResult): string {
  const lines = [
    `Dropping ${r.layer} (depth ${r.layerDepth}) from the chain of ${r.filename}:`,
    ...way('commit (LAYER into its backing file)', r.commit),
    ...way('pull (LAYER into the image above it)', r.pull),
    r.lessData === 'same' ? 'Both ways copy the same amount of data.' : `Moves less data: ${r.lessData}.`,
  ];
  return lines.join('\n') + '\n';
}
