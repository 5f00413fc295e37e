import { compare } from '../../ops/compare.js';
import { fail, formatOption, newCommand, progressPrinter, warn } from '../util.js';

export function command() {
  return newCommand('compare', 'Compare the guest-visible contents of FILE1 and FILE2 (exit 0 identical, 1 different, 2 error).', [
    'qcowkit compare base.qcow2 copy.qcow2',
    'qcowkit compare -f qcow2 -F raw disk.qcow2 disk.raw',
    'qcowkit compare -s a.qcow2 b.qcow2   # strict: sizes and allocation must match too',
  ])
    .addOption(formatOption('-f, --format <fmt>', 'format of FILE1 (qcow2 or raw); probed when omitted'))
    .addOption(formatOption('-F, --format2 <fmt>', 'format of FILE2 (qcow2 or raw); probed when omitted'))
    .option('-s, --strict', 'strict mode: fail on size or allocation-status mismatch')
    .option('-p, --progress', 'show progress')
    .option('-q, --quiet', 'print nothing; the exit code tells')
    .option('-U, --force-share', 'open the images even if another process uses them')
    .argument('<file1>')
    .argument('<file2>')
    .action(async (file1: string, file2: string, o: { format?: 'qcow2' | 'raw'; format2?: 'qcow2' | 'raw'; strict?: boolean; progress?: boolean; quiet?: boolean; forceShare?: boolean }) => {
      const say = (s: string) => o.quiet || process.stdout.write(s + '\n');
      try {
        const r = await compare(file1, file2, {
          format1: o.format,
          format2: o.format2,
          strict: o.strict === true,
          forceShare: o.forceShare === true,
          onProgress: progressPrinter(o.progress === true && !o.quiet),
          onWarning: warn,
        });
        if ('sizeMismatch' in r && r.sizeMismatch) say('Warning: Image size mismatch!');
        if (r.identical) {
          say('Images are identical.');
          process.exitCode = 0;
        } else if (r.reason === 'size') {
          say('Strict mode: Image size mismatch!');
          process.exitCode = 1;
        } else if (r.reason === 'status') {
          say(`Strict mode: Offset ${r.offset} block status mismatch!`);
          process.exitCode = 1;
        } else {
          say(`Content mismatch at offset ${r.offset}!`);
          process.exitCode = 1;
        }
      } catch (e) {
        fail(e, 2);
      }
    });
}
