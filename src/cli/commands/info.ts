import { formatOption, newCommand, outputOption } from '../util.js';
import { runInfo, type InfoFlags } from '../run/info.js';

export { humanInfo } from '../run/info.js';

// The work is in ../run/info.ts (shared with main.ts's quick path); options here and its
// `spec` must stay in step.
export function command() {
  return newCommand('info', 'Show information about FILENAME (fields and JSON names as qemu-img info).', [
    'qcowkit info disk.qcow2',
    'qcowkit info --output json --backing-chain overlay.qcow2',
    'qcowkit info --image-opts driver=qcow2,file.driver=file,file.filename=disk.qcow2',
  ], { imageOpts: true })
    .addOption(formatOption())
    .addOption(outputOption())
    .option('--backing-chain', 'show every image of the backing chain, top first')
    .option('-U, --force-share', 'open the image even if another process uses it')
    .argument('<filename>')
    .action(async (filename: string, o: InfoFlags) => runInfo(filename, o));
}
