import { makeEmpty, type MakeEmptyResult } from '../../ops/make-empty.js';
import { fail, feedback, newCommand, outputOption, printResult } from '../util.js';
import { imageOptsFile } from '../image-opts.js';
import { Option } from 'commander';
import { sizeToStr as humanSize } from '../qemu-output.js';

export function command() {
  return newCommand(
    'make-empty',
    'Drop all guest data of the qcow2 overlay FILENAME (it reads as its backing file again) and give the space back, ' +
      'keeping its header, backing file, persistent bitmaps and internal snapshots.',
    ['qcowkit make-empty overlay.qcow2', 'qcowkit make-empty --dry-run overlay.qcow2', 'qcowkit make-empty --output json overlay.qcow2'],
  )
    .addOption(new Option('-f, --format <fmt>', 'image format (must be qcow2)').choices(['qcow2', 'raw']))
    .option('-p, --progress', 'show progress')
    .option('-q, --quiet', 'print nothing on success')
    .option('--force', 'empty an image that has no backing file (it then reads as all zeros)')
    .option('--dry-run', 'report what would be freed; write nothing')
    .addOption(outputOption())
    .argument('<filename>')
    .action(async (filename: string, o: { format?: 'qcow2' | 'raw'; progress?: boolean; quiet?: boolean; force?: boolean; dryRun?: boolean; output: string }) => {
      try {
        const file = imageOptsFile(filename, { format: o.format });
        const r = await makeEmpty(file.path, {
          format: file.format,
          force: o.force === true,
          dryRun: o.dryRun === true,
          ...feedback(o),
        });
        printResult(o, r, human);
      } catch (e) {
        fail(e);
      }
    });
}

function human(r: MakeEmptyResult): string {
  if (r.dryRun)
    return `Dry run: ${r.filename} maps ${humanSize(r.droppedBytes)} of guest data in ${r.l2Tables} L2 tables; ${humanSize(r.before.allocated)} on disk now.\n`;
  const keep = [r.bitmaps ? `${r.bitmaps} bitmap(s)` : '', r.snapshots ? `${r.snapshots} snapshot(s)` : ''].filter(Boolean).join(', ');
  return (
    `Image emptied: ${humanSize(r.droppedBytes)} of guest data dropped${keep ? `, kept ${keep}` : ''}.\n` +
    `  file length: ${r.before.length} -> ${r.after.length} bytes\n` +
    `  on disk:     ${humanSize(r.before.allocated)} -> ${humanSize(r.after.allocated)} (${humanSize(r.reclaimedBytes)} reclaimed)\n`
  );
}
