import { info, type ImageInfo } from '../../ops/info.js';
import { formatOption, humanSize, newCommand, outputOption, printJson, warn } from '../util.js';

export function command() {
  return newCommand('info', 'Show information about FILENAME (fields and JSON names as qemu-img info).', [
    'qcowkit info disk.qcow2',
    'qcowkit info --output json --backing-chain overlay.qcow2',
  ])
    .addOption(formatOption())
    .addOption(outputOption())
    .option('--backing-chain', 'show every image of the backing chain, top first')
    .option('-U, --force-share', 'open the image even if another process uses it')
    .argument('<filename>')
    .action(async (filename: string, o: { format?: 'qcow2' | 'raw'; output: string; backingChain?: boolean; forceShare?: boolean }) => {
      const infos = await info(filename, { format: o.format, backingChain: o.backingChain === true, forceShare: o.forceShare === true, onWarning: warn });
      if (o.output === 'json') printJson(o.backingChain ? infos : infos[0]);
      else process.stdout.write(infos.map(human).join('\n'));
    });
}

function pad2(n: number): string {
  return String(n).padStart(2, '0');
}

function human(i: ImageInfo): string {
  const lines = [
    `image: ${i.filename}`,
    `file format: ${i.format}`,
    `virtual size: ${humanSize(i['virtual-size'])} (${i['virtual-size']} bytes)`,
    `disk size: ${humanSize(i['actual-size'])}`,
  ];
  if (i['cluster-size'] !== undefined) lines.push(`cluster_size: ${i['cluster-size']}`);
  if (i.encrypted) lines.push('encrypted: yes');
  if (i['backing-filename'] !== undefined) {
    const full = i['full-backing-filename'];
    lines.push(`backing file: ${i['backing-filename']}${full && full !== i['backing-filename'] ? ` (actual path: ${full})` : ''}`);
    if (i['backing-filename-format']) lines.push(`backing file format: ${i['backing-filename-format']}`);
  }
  if (i['dirty-flag']) lines.push('cleanly shut down: no');
  if (i.snapshots?.length) {
    lines.push('Snapshot list:');
    lines.push(`${'ID'.padEnd(10)}${'TAG'.padEnd(18)}${'VM SIZE'.padStart(7)}${'DATE'.padStart(21)}${'VM CLOCK'.padStart(13)}${'ICOUNT'.padStart(11)}`);
    for (const s of i.snapshots) {
      const d = new Date(s['date-sec'] * 1000);
      const date = `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} ${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
      const secs = s['vm-clock-sec'];
      const clock = `${pad2(Math.floor(secs / 3600))}:${pad2(Math.floor(secs / 60) % 60)}:${pad2(secs % 60)}.${String(Math.floor(s['vm-clock-nsec'] / 1e6)).padStart(3, '0')}`;
      lines.push(`${s.id.padEnd(10)}${s.name.padEnd(18)}${humanSize(s['vm-state-size']).padStart(7)}${date.padStart(20)}${clock.padStart(13)}${String(s.icount ?? '').padStart(11)}`);
    }
  }
  const data = i['format-specific']?.data;
  if (data) {
    lines.push('Format specific information:');
    lines.push(`    compat: ${data.compat}`);
    lines.push(`    compression type: ${data['compression-type']}`);
    if (data['lazy-refcounts'] !== undefined) lines.push(`    lazy refcounts: ${data['lazy-refcounts']}`);
    if (data.bitmaps) {
      lines.push('    bitmaps:');
      data.bitmaps.forEach((b, n) => {
        lines.push(`        [${n}]:`, '            flags:');
        b.flags.forEach((f, m) => lines.push(`                [${m}]: ${f}`));
        lines.push(`            name: ${b.name}`, `            granularity: ${b.granularity}`);
      });
    }
    lines.push(`    refcount bits: ${data['refcount-bits']}`);
    if (data.corrupt !== undefined) lines.push(`    corrupt: ${data.corrupt}`);
    if (data['extended-l2'] !== undefined) lines.push(`    extended l2: ${data['extended-l2']}`);
    if (data['data-file'] !== undefined) lines.push(`    data file: ${data['data-file']}`, `    data file raw: ${data['data-file-raw']}`);
  }
  return lines.join('\n') + '\n';
}
