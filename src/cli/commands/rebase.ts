import { Option } from 'commander';
import { rebase, type RebaseResult } from '../../ops/rebase.js';
import { fail, feedback, formatOption, newCommand, outputOption, printResult } from '../util.js';
import { imageOptsFile } from '../image-opts.js';
import { sizeToStr as humanSize } from '../qemu-output.js';

export function command() {
  return newCommand(
    'rebase',
    'Change the backing file of FILENAME. Safe mode (default) first copies into FILENAME every range where the old and the new backing ' +
      'chains read differently, so the guest view does not change; -u only rewrites the name; -b "" flattens. ' +
      'The header changes only after the copied data is durable.',
    [
      'qcowkit rebase -b base2.qcow2 -F qcow2 overlay.qcow2     # safe: copy what differs, then switch',
      'qcowkit rebase -u -b ../moved/base.qcow2 -F qcow2 top.qcow2  # rename only (files moved)',
      'qcowkit rebase -b "" overlay.qcow2                        # flatten: no backing file afterwards',
      'qcowkit rebase -c -p -b base.qcow2 -F qcow2 top.qcow2     # copied clusters compressed, with progress',
      'qcowkit rebase --dry-run --output json -b b0.qcow2 -F qcow2 top.qcow2',
    ],
  )
    .addOption(formatOption())
    .addOption(new Option('-b, --backing <backing_file>', 'the new backing file, stored as given (relative names are relative to FILENAME\'s directory); "" = none'))
    .addOption(new Option('-F, --backing-format <backing_fmt>', 'format of the new backing file (required when -b names a file, as qemu-img 7.2)'))
    .option('-u, --unsafe', 'only rewrite the backing file name and format; copy nothing')
    .option('-c, --compress', 'write copied clusters compressed')
    .option('-p, --progress', 'show progress')
    .option('-q, --quiet', 'print nothing on success')
    .option('-U, --force-share', 'accepted for qemu-img compatibility (rebase writes: no effect on FILENAME)')
    .addOption(new Option('-t, --cache <mode>', 'cache mode (accepted for qemu-img compatibility)').hideHelp())
    .addOption(new Option('-T, --src-cache <mode>', 'source cache mode (accepted for qemu-img compatibility)').hideHelp())
    .option('--dry-run', 'compare and report what would be written; write nothing')
    .addOption(outputOption())
    .argument('<filename>')
    .action(async (filename: string, o: { format?: 'qcow2' | 'raw'; backing?: string; backingFormat?: string; unsafe?: boolean; compress?: boolean; progress?: boolean; quiet?: boolean; dryRun?: boolean; output: string }) => {
      try {
        const file = imageOptsFile(filename, { format: o.format });
        const r = await rebase(file.path, {
          format: file.format,
          backing: o.backing,
          backingFormat: o.backingFormat,
          unsafe: o.unsafe === true,
          compress: o.compress === true,
          dryRun: o.dryRun === true,
          ...feedback(o),
        });
        // As qemu-img, a real rebase prints nothing; a dry run prints its report.
        printResult(o, r, (x: typeof r) => (x.dryRun ? human(x) : ''));
      } catch (e) {
        fail(e);
      }
    });
}

function human(r: RebaseResult): string {
  const to = r.newBacking === undefined ? 'no backing file (flatten)' : `'${r.newBacking}' (${r.newBackingFormat})`;
  const lines = [`Dry run: rebase ${r.filename} from '${r.oldBacking ?? ''}' onto ${to}${r.prefixDepth ? ` (layer ${r.prefixDepth} of the current chain)` : ''}`];
  if (r.unsafe) lines.push('  unsafe: only the header changes');
  else {
    lines.push(
      `  compared:              ${humanSize(r.comparedBytes)} (${r.comparedBytes} bytes the chains may read differently)`,
      `  data to copy:          ${humanSize(r.dataBytes)} (${r.dataBytes} bytes, ${r.dataClusters} new clusters)`,
      `  zero ranges to write:  ${humanSize(r.zeroBytes)} (${r.zeroBytes} bytes, zero clusters or holes)`,
      `  image grows by:        up to ${humanSize(r.growth)}`,
    );
  }
  return lines.join('\n') + '\n';
}
