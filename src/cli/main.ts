/**
 * Entry point of the `qcowkit` command. Only the module of the command that runs is loaded
 * (start-up time is most of a short command's cost).
 */
import { fail } from './fail.js';
import { loadModule } from './load-module.js';
import { quickParse, type OrderedOption, type QuickSpec } from './quick.js';

/** Commands with a commander-free module in run/ (their plain invocations load no commander). */
const QUICK = new Set(['info', 'bitmap']);

const COMMANDS: Record<string, string> = {
  create: 'create a new image (qcow2 or raw), optionally over a backing file',
  info: 'show information about an image (and its backing chain)',
  map: 'show how guest ranges map to the files of the backing chain',
  check: 'check an image for consistency, optionally repairing leaks and errors',
  compare: 'compare the guest-visible contents of two images',
  commit: 'commit an overlay into its backing file, then empty the overlay',
  'make-empty': 'drop all guest data of an overlay and give its space back',
  bitmap: 'add, remove, clear, enable, disable, merge, dump or check persistent dirty bitmaps',
  changes: 'print the guest ranges that changed (from bitmaps or a backing chain)',
  rebase: 'change the backing file of an image (safe copy, -u rename only, -b "" flatten)',
  plan: 'compare the two ways of dropping a layer from a chain: commit it down or pull it up',
};

const HELP = `Usage: qcowkit <command> [options]

qcowkit - qcow2 disk-image toolkit (options mirror qemu-img)

Commands:
${Object.entries(COMMANDS)
  .map(([n, d]) => `  ${n.padEnd(10)} ${d}`)
  .join('\n')}

Run 'qcowkit <command> --help' for a command's options and examples.

Exit codes: 0 success; 1 error (a one-line 'qcowkit: FILE: message' on stderr);
check: 2 corruptions, 3 leaks only; compare: 1 images differ, 2 error;
130 aborted; 70 internal error (a bug: please report it).
`;

/**
 * `qcowkit map big.qcow2 | head`: a closed pipe ends the output quietly, as for any tool. The
 * handler is attached when process.stdout is first used: creating it loads Node's stream
 * modules (2-4 ms), which a command that prints nothing (most `bitmap` calls) never needs.
 */
function quietEpipe(): void {
  const onError = (e: NodeJS.ErrnoException) => {
    if (e.code === 'EPIPE') process.exit(process.exitCode ?? 0);
    throw e;
  };
  const lazy = Object.getOwnPropertyDescriptor(process, 'stdout');
  const create = lazy?.get;
  if (!lazy || !create || !lazy.configurable) {
    process.stdout.on('error', onError);
    return;
  }
  Object.defineProperty(process, 'stdout', {
    configurable: true,
    enumerable: lazy.enumerable,
    get() {
      const stream = create.call(process) as NodeJS.WriteStream;
      Object.defineProperty(process, 'stdout', lazy);
      stream.on('error', onError);
      return stream;
    },
  });
}

export async function main(argv: string[]): Promise<void> {
  const name = argv[0];
  // The quick path writes to fd 1 itself; everything else goes through process.stdout.
  if (!QUICK.has(name ?? '')) quietEpipe();
  if (name === undefined || name === '--help' || name === '-h' || name === 'help') {
    process.stdout.write(HELP);
    if (name === undefined) process.exitCode = 1;
    return;
  }
  if (name === '--version' || name === '-V') {
    const { readFileSync } = await import('node:fs');
    const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string };
    process.stdout.write(`qcowkit ${pkg.version}\n`);
    return;
  }
  if (!Object.hasOwn(COMMANDS, name)) {
    fail(new Error(`unknown command '${name}' (try 'qcowkit --help')`));
    return;
  }
  try {
    if (QUICK.has(name)) {
      const runSpecifier = './run/' + name + '.js'; // computed at run time, as below
      const run = await loadModule<{ spec: QuickSpec; run: (args: string[], opts: Record<string, unknown>, order?: OrderedOption[]) => Promise<boolean | void> }>(runSpecifier);
      const parsed = quickParse(argv.slice(1), run.spec);
      if (parsed) {
        // Done, with nothing pending: end now rather than after Node's teardown of the
        // environment and the heap (~0.5 ms more for a process that loaded the library).
        if ((await run.run(parsed.args, parsed.opts, parsed.order)) === true) process.exit();
        return;
      }
      quietEpipe();
    }
    // A computed specifier: resolved at run time next to this file (bundled or not).
    const specifier = './commands/' + name + '.js';
    const mod = await loadModule<{ command: () => import('commander').Command }>(specifier);
    await mod.command().parseAsync(argv.slice(1), { from: 'user' });
  } catch (e) {
    fail(e);
  }
}
