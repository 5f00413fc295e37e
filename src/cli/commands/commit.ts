import { Option } from 'commander';
import { commit, type CommitResult } from '../../ops/commit.js';
import { fail, feedback, formatOption, newCommand, outputOption, parseSize, printResult } from '../util.js';
import { imageOptsFile } from '../image-opts.js';
import { sizeToStr as humanSize } from '../qemu-output.js';

export function command() {
  return newCommand(
    'commit',
    'Commit the changes recorded in FILENAME into its backing file (or the layer -b names), then empty FILENAME unless -d/-b. ' +
      'Every image is checked before the first write; a corrupt one is refused with all files untouched.',
    [
      'qcowkit commit overlay.qcow2                 # into the backing file, then empty the overlay',
      'qcowkit commit -d -p overlay.qcow2           # keep the overlay as it is, show progress',
      'qcowkit commit -b base.qcow2 top.qcow2       # into a deeper layer (implies -d)',
      'qcowkit commit --dry-run --output json overlay.qcow2',
      'qcowkit commit --bitmaps overlay.qcow2       # also carry the overlay\'s bitmaps into the base',
    ],
  )
    .addOption(formatOption())
    .addOption(new Option('-b, --base <base>', 'the backing layer to commit into (name as stored in the chain, or a path); implies -d'))
    .option('-d, --drop', 'do not empty FILENAME after the commit')
    .option('-p, --progress', 'show progress')
    .option('-q, --quiet', 'print nothing on success')
    .option('--dry-run', 'report what would be copied and freed; write nothing')
    .option('--bitmaps', "create each bitmap of the committed layers in the base when missing and merge it into the base's")
    .addOption(new Option('-r, --rate-limit <rate>', 'copy at most RATE bytes per second (k/M/G suffixes)'))
    .addOption(new Option('-t, --cache <mode>', 'cache mode (accepted for qemu-img compatibility; qcowkit always flushes at the end)').hideHelp())
    .addOption(outputOption())
    .argument('<filename>')
    .action(async (filename: string, o: { format?: 'qcow2' | 'raw'; base?: string; drop?: boolean; progress?: boolean; quiet?: boolean; dryRun?: boolean; output: string; rateLimit?: string; bitmaps?: boolean }) => {
      try {
        const file = imageOptsFile(filename, { format: o.format });
        const r = await commit(file.path, {
          rateLimit: o.rateLimit !== undefined ? parseSize(o.rateLimit, 'rate limit') : undefined,
          format: file.format,
          base: o.base,
          drop: o.drop === true,
          dryRun: o.dryRun === true,
          bitmaps: o.bitmaps === true,
          ...feedback(o),
        });
        printResult(o, r, human);
      } catch (e) {
        fail(e);
      }
    });
}

function human(r: CommitResult): string {
  // As qemu-img: one line (the space given back is in --output json and make-empty's report).
  const bitmapLines = (r.bitmaps ?? []).map((b) => `  bitmap '${b.name}': ${b.created ? 'created in the base and ' : ''}merged from ${b.from.join(', ')}`);
  if (!r.dryRun) return ['Image committed.', ...bitmapLines].join('\n') + '\n';
  const lines = [
    `Dry run: commit ${r.top} into ${r.base} (depth ${r.baseDepth})`,
    `  guest data to copy:   ${humanSize(r.dataBytes)} (${r.dataBytes} bytes, up to ${r.dataClusters} new base clusters)`,
    `  zero ranges:          ${humanSize(r.zeroBytes)} (${r.zeroBytes} bytes, written as zero flags or holes)`,
    `  base file grows by:   up to ${humanSize(r.baseGrowth)}`,
  ];
  if (r.baseSizeAfter > r.baseSizeBefore) lines.push(`  base virtual size:    ${r.baseSizeBefore} -> ${r.baseSizeAfter} bytes`);
  if (r.emptied) lines.push(`  top would shrink from ${humanSize(r.emptied.before.allocated)} on disk (it is emptied afterwards)`);
  else lines.push('  top is left as it is (-d / -b)');
  lines.push(...bitmapLines);
  return lines.join('\n') + '\n';
}
