// Reads persistent bitmaps back through QEMU: qemu-nbd -r -B NAME on a unix socket in a temp
// dir, nbdinfo --map=qemu:dirty-bitmap:NAME. The qemu-nbd process is always stopped.
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { connect } from 'node:net';
import { join } from 'node:path';

export interface Extent {
  start: number;
  length: number;
}

export function hasNbdinfo(): boolean {
  return spawnSync('nbdinfo', ['--version']).status === 0 && spawnSync('qemu-nbd', ['--version']).status === 0;
}

/** A qemu-nbd serving on a unix socket in a temp dir (or on a TCP port); `stop` ends it and removes the dir. */
export interface QemuNbd {
  sock: string;
  stop(): Promise<void>;
}

/**
 * Starts `qemu-nbd ARGS -k SOCK` (add -t, -r, -f, -B, -x yourself: -t is needed, the readiness
 * probe is a client of its own) and waits until it accepts connections.
 */
export async function startQemuNbd(args: string[], opts: { tcpPort?: number } = {}): Promise<QemuNbd> {
  const dir = mkdtempSync(join(tmpdir(), 'qcowkit-nbd-'));
  const sock = join(dir, 's');
  const where = opts.tcpPort === undefined ? ['-k', sock] : ['-b', '127.0.0.1', '-p', String(opts.tcpPort)];
  const child = spawn('qemu-nbd', [...args, ...where], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const stop = async () => {
    child.kill('SIGTERM');
    await exited;
    rmSync(dir, { recursive: true, force: true });
  };
  try {
    for (let i = 0; opts.tcpPort === undefined && !existsSync(sock); i++) {
      if (child.exitCode !== null || i > 200) throw new Error(`qemu-nbd ${args.join(' ')} did not start: ${stderr}`);
      await new Promise((r) => setTimeout(r, 25));
    }
    // The socket file appears at bind(), a moment before qemu-nbd listens.
    for (let i = 0; !(await accepts(opts.tcpPort === undefined ? { path: sock } : { host: '127.0.0.1', port: opts.tcpPort })); i++) {
      if (child.exitCode !== null) throw new Error(`qemu-nbd ${args.join(' ')} exited: ${stderr}`);
      if (i > 200) throw new Error(`qemu-nbd ${args.join(' ')} does not accept connections: ${stderr}`);
      await new Promise((r) => setTimeout(r, 25));
    }
  } catch (e) {
    await stop();
    throw e;
  }
  return { sock, stop };
}

function accepts(where: { path: string } | { host: string; port: number }): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(where);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

/** Dirty extents of each named bitmap as QEMU serves them (ascending, coalesced). */
export async function nbdDirtyMaps(file: string, names: string[]): Promise<Record<string, Extent[]>> {
  const nbd = await startQemuNbd(['-r', '-t', '-f', 'qcow2', ...names.flatMap((n) => ['-B', n]), file]);
  try {
    const out: Record<string, Extent[]> = {};
    for (const n of names) {
      const query = () => spawnSync('nbdinfo', ['--json', `--map=qemu:dirty-bitmap:${n}`, `nbd+unix:///?socket=${nbd.sock}`], { encoding: 'utf8' });
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
    await nbd.stop();
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
