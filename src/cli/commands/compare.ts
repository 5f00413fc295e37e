import { Option } from 'commander';
import { QcowError } from '../../errors.js';
import { compare, comparePhase } from '../../ops/compare.js';
import { fail, newCommand, outputOption, printPlainJson, progressPrinter, warn } from '../util.js';
import { imageOptsFile } from '../image-opts.js';

/** -f/-F: checked when the images are opened, so an unknown format is an open error (exit 2) as in qemu-img. */
function imageFormat(fmt: string | undefined, file: string): 'qcow2' | 'raw' | undefined {
  if (fmt === undefined || fmt === 'qcow2' || fmt === 'raw') return fmt;
  throw new QcowError('UNSUPPORTED', `Unknown or unsupported format '${fmt}' (qcow2 and raw are)`, file);
}

export function command() {
  return newCommand('compare', 'Compare the guest-visible contents of FILE1 and FILE2 (exit 0 identical, 1 different, 2 error).', [
    'qcowkit compare base.qcow2 copy.qcow2',
    'qcowkit compare -f qcow2 -F raw disk.qcow2 disk.raw',
    'qcowkit compare -s a.qcow2 b.qcow2   # strict: sizes and allocation must match too',
    'qcowkit compare --output json a.qcow2 b.qcow2   # {"identical": false, "reason": "content", "offset": N, ...}',
  ])
    .addOption(new Option('-f, --format <fmt>', 'format of FILE1 (qcow2 or raw); probed when omitted'))
    .addOption(new Option('-F, --format2 <fmt>', 'format of FILE2 (qcow2 or raw); probed when omitted'))
    .option('-s, --strict', 'strict mode: fail on size or allocation-status mismatch')
    .option('-p, --progress', 'show progress')
    .option('-q, --quiet', 'print nothing; the exit code tells')
    .option('-U, --force-share', 'open the images even if another process uses them')
    .addOption(outputOption())
    .argument('<file1>')
    .argument('<file2>')
    .action(async (file1: string, file2: string, o: { format?: string; format2?: string; strict?: boolean; progress?: boolean; quiet?: boolean; forceShare?: boolean; output: string }) => {
      const json = o.output === 'json';
      const say = (s: string) => o.quiet || json || process.stdout.write(s + '\n');
      try {
        const f1 = imageOptsFile(file1, { format: imageFormat(o.format, file1) });
        const f2 = imageOptsFile(file2, { format: imageFormat(o.format2, file2) });
        const r = await compare(f1.path, f2.path, {
          format1: f1.format,
          format2: f2.format,
          strict: o.strict === true,
          forceShare: o.forceShare === true,
          onProgress: progressPrinter(o.progress === true && !o.quiet, o.output === 'json'),
          onWarning: warn,
        });
        // (JSON: the result as the library returns it; the exit code is the same.)
        if (json && !o.quiet) printPlainJson(r);
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
        // as qemu-img: 2 open error, 3 allocation-status (metadata) error, 4 read error; missing
        // kernels are no fact about the images: 2 (1 would say "the images differ")
        if (e instanceof QcowError && e.code === 'KERNELS') fail(e, 2);
        else fail(e, { open: 2, status: 3, read: 4 }[comparePhase(e)]);
      }
    });
}
