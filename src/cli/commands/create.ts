import { formatOption, newCommand } from '../util.js';
import { runCreate, type Flags } from '../run/create.js';

// The work is in ../run/create.ts (shared with main.ts's quick path); options here and its
// `spec` must stay in step.
export function command() {
  return newCommand('create', 'Create a new image FILENAME of SIZE bytes (k, M, G, T suffixes), as qemu-img create.', [
    'qcowkit create -f qcow2 disk.qcow2 20G',
    'qcowkit create -f qcow2 -o cluster_size=2M,preallocation=metadata big.qcow2 1T',
    'qcowkit create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2',
    'qcowkit create -f qcow2 -o help',
  ])
    .addOption(formatOption('-f, --format <fmt>', 'image format: qcow2 or raw').default('raw'))
    .option('-b, --backing <file>', 'backing file (relative names are relative to FILENAME)')
    .option('-F, --backing-format <fmt>', 'format of the backing file: qcow2 or raw (required with -b)')
    .option('-u, --unsafe', "don't open the backing file (SIZE is then required)")
    .option('-o, --options <list>', "comma-separated options ('-o help' lists them)", (v: string, prev: string[] = []) => [...prev, v])
    .option('-q, --quiet', 'print nothing on success')
    .argument('[filename]')
    .argument('[size]')
    .action(async (filename: string | undefined, sizeText: string | undefined, f: Flags) => runCreate(filename, sizeText, f));
}
