import { Option } from 'commander';
import { check, checkExitCode, type CheckResult } from '../../ops/check.js';
import { isQcowError, QcowError } from '../../errors.js';
import { fail, formatOption, newCommand, outputOption, printJson } from '../util.js';
import { imageOptsFile } from '../image-opts.js';

export function command() {
  return newCommand(
    'check',
    'Check FILENAME for consistency (refcounts, COPIED flags, references past the end); with -r, repair it. ' +
      'Exit status: 0 consistent (or repaired), 1 check not completed, 2 corruptions, 3 leaked clusters only, 63 format without checks.',
    ['qcowkit check disk.qcow2', 'qcowkit check --output json disk.qcow2', 'qcowkit check -r leaks disk.qcow2', 'qcowkit check -r all disk.qcow2'],
  )
    .addOption(formatOption())
    .addOption(new Option('-r, --repair <what>', "repair 'leaks' (leaked clusters) or 'all' (every error it can); opens the image read-write").choices(['leaks', 'all']))
    .addOption(outputOption())
    .option('-q, --quiet', 'print nothing on stdout; the exit status tells')
    .option('-U, --force-share', 'open the image even if another process uses it (read-only checks only)')
    .argument('<filename>')
    .action(async (name: string, o: { format?: 'qcow2' | 'raw'; repair?: 'leaks' | 'all'; output: string; quiet?: boolean; forceShare?: boolean }) => {
      let filename = name;
      const out = (s: string) => void (o.quiet || process.stdout.write(s));
      // qemu-img's stdout is block-buffered when it is not a terminal: the repair summary reaches
      // a file or pipe after every message of the verification pass (stderr). Same order here.
      let held = '';
      const soon = (s: string) => (process.stdout.isTTY ? out(s) : void (held += s));
      const json = o.output === 'json';
      let result: CheckResult;
      try {
        const file = imageOptsFile(name, { format: o.format });
        filename = file.path;
        result = await check(filename, {
          format: file.format,
          repair: o.repair,
          forceShare: o.forceShare === true,
          onMessage: (line) => process.stderr.write(line + '\n'),
          onRepaired: ({ leaks, corruptions }) => {
            if (!json) soon(repairedText(leaks, corruptions));
          },
        });
      } catch (e) {
        // Exit codes by error code: 63 for a format without checks (NO_CHECKS), else 1.
        fail(e, isQcowError(e) && e.code === 'NO_CHECKS' ? undefined : 1);
        out(held);
        return;
      }
      if (json) {
        // qemu-img names the image as given on its command line (a file: or json: name too).
        if (!o.quiet) printJson(name === filename ? result : { ...result, filename: name });
      } else out(held + human(result));
      const code = checkExitCode(result);
      if (code === 1) fail(new QcowError('IO', 'Check failed', filename), 1);
      else process.exitCode = code;
    });
}

/** What qemu-img prints between the repair and the verification pass. */
export function repairedText(leaks: number, corruptions: number): string {
  return `The following inconsistencies were found and repaired:\n\n    ${leaks} leaked clusters\n    ${corruptions} corruptions\n\nDouble checking the fixed image now...\n`;
}

/** qemu-img's dump_human_image_check. */
export function human(r: CheckResult): string {
  const lines: string[] = [];
  const corruptions = r.corruptions ?? 0;
  const leaks = r.leaks ?? 0;
  const errors = r['check-errors'];
  if (!corruptions && !leaks && !errors) {
    lines.push('No errors were found on the image.');
  } else {
    if (corruptions) lines.push('', `${corruptions} errors were found on the image.`, 'Data may be corrupted, or further writes to the image may corrupt it.');
    if (leaks) lines.push('', `${leaks} leaked clusters were found on the image.`, 'This means waste of disk space, but no harm to data.');
    if (errors) lines.push('', `${errors} internal errors have occurred during the check.`);
  }
  const total = r['total-clusters'] ?? 0;
  const allocated = r['allocated-clusters'] ?? 0;
  if (total && allocated) {
    const pct = (n: number, d: number) => printfFixed2((n * 100.0) / d);
    lines.push(
      `${allocated}/${total} = ${pct(allocated, total)}% allocated, ${pct(r['fragmented-clusters'] ?? 0, allocated)}% fragmented, ${pct(r['compressed-clusters'] ?? 0, allocated)}% compressed clusters`,
    );
  }
  if (r['image-end-offset']) lines.push(`Image end offset: ${r['image-end-offset']}`);
  return lines.join('\n') + '\n';
}

/**
 * C's "%0.2f" (glibc rounds the exact binary value half-to-even; toFixed rounds exact ties up).
 */
export function printfFixed2(x: number): string {
  const exact = x.toFixed(30);
  const m = /^(-?\d+)\.(\d\d)5(0*)$/.exec(exact);
  if (!m) return x.toFixed(2);
  // A tie: keep the even last digit.
  const cents = BigInt(m[1]!.replace('-', '') + m[2]!);
  const even = cents % 2n === 0n ? cents : cents + 1n;
  const s = even.toString().padStart(3, '0');
  return `${x < 0 ? '-' : ''}${s.slice(0, -2)}.${s.slice(-2)}`;
}
