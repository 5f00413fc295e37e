// Reads persistent bitmaps back through QEMU: qemu-nbd -r -B NAME on a unix socket in a temp
// dir, nbdinfo --map=qemu:dirty-bitmap:NAME. The qemu-nbd process is always stopped.
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export interface Extent {
  start: number;
  length: number;
}

export function hasNbdinfo(): boolean {
  return spawnSync('nbdinfo', ['--version']).status === 0 && spawnSync('qemu-nbd', ['--version']).status === 0;
}

/** Dirty extents of each named bitmap as QEMU serves them (ascending, coalesced). */
export async function nbdDirtyMaps(file: string, names: string[]): Promise<Record<string, Extent[]>> {
  const dir = mkdtempSync(join(tmpdir(), 'qcowkit-nbd-'));
  const sock = join(dir, 's');
  const args = ['-r', '-t', '-k', sock, '-f', 'qcow2', ...names.flatMap((n) => ['-B', n]), file];
  const child = spawn('qemu-nbd', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  try {
    for (let i = 0; !existsSync(sock); i++) {
      if (child.exitCode !== null || i > 200) throw new Error(`qemu-nbd ${args.join(' ')} did not start: ${stderr}`);
      await new Promise((r) => setTimeout(r, 25));
    }
    const out: Record<string, Extent[]> = {};
    for (const n of names) {
      const query = () => spawnSync('nbdinfo', ['--json', `--map=qemu:dirty-bitmap:${n}`, `nbd+unix:///?socket=${sock}`], { encoding: 'utf8' });
      let r = query();
      // The socket file appears at bind(), a moment before qemu-nbd listens (seen on a loaded machine).
      for (let i = 0; r.status !== 0 && /Connection refused/.test(r.stderr) && i < 40; i++) {
        await new Promise((ok) => setTimeout(ok, 25));
        r = query();
      }
      if (r.status !== 0) throw new Error(`nbdinfo for ${n} failed: ${r.stderr}`);
      const entries = JSON.parse(r.stdout) as Array<{ offset: number; length: number; type: number }>;
      out[n] = coalesce(entries.filter((e) => e.type & 1).map((e) => ({ start: e.offset, length: e.length })));
    }
    return out;
  } finally {
    child.kill('SIGTERM');
    await exited;
    rmSync(dir, { recursive: true, force: true });
  }
}

export function coalesce(list: Extent[]): Extent[] {
  const sorted = [...list].filter((e) => e.length > 0).sort((a, b) => a.start - b.start);
  const out: Extent[] = [];
  for (const e of sorted) {
    const last = out[out.length - 1];
    if (last && last.start + last.length >= e.start) last.length = Math.max(last.length, e.start + e.length - last.start);
    else out.push({ ...e });
  }
  return out;
}

/** Extents widened to whole granules of `g` (clipped to the disk): what a bitmap of that granularity records. */
export function atGranularity(list: Extent[], g: number, size: number): Extent[] {
  return coalesce(list.map((e) => {
    const s = Math.floor(e.start / g) * g;
    return { start: s, length: Math.min(size, Math.ceil((e.start + e.length) / g) * g) - s };
  }));
}
