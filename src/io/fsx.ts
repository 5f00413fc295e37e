/**
 * fs-native-extensions (OFD locks, hole punching), loaded lazily. Its index resolves the addon
 * through several helper packages (~15 ms of start-up); loading the shipped prebuilt binding
 * directly costs well under 1 ms, so that is tried first, with the package's own entry as the
 * fallback.
 */
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { basename, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { dlopen } from './native.js';

interface Binding {
  tryLock(fd: number, offset: number, length: number, exclusive: boolean): void;
  unlock(fd: number, offset: number, length: number): void;
  trim(fd: number, offset: number, length: number, req: unknown, cb: (this: Req, err: Error | null) => void): unknown;
  trimSync(fd: number, offset: number, length: number): void;
}
interface Req {
  handle: unknown;
  resolve: () => void;
  reject: (e: Error) => void;
}

let binding: Binding | undefined;

function load(): Binding {
  if (binding) return binding;
  const prebuilt = join('fs-native-extensions', 'prebuilds', `${process.platform}-${process.arch}`, 'fs-native-extensions.node');
  // The package's folder as require() finds it: node_modules of this file's folder or of the
  // nearest ancestor that has it (by plain existence checks: require.resolve reads package.json
  // files and realpaths on the way, several times the cost).
  for (let dir = import.meta.dirname ?? dirname(fileURLToPath(import.meta.url)); ; dir = dirname(dir)) {
    const p = join(basename(dir) === 'node_modules' ? dir : join(dir, 'node_modules'), prebuilt);
    if (existsSync(p)) {
      try {
        binding = dlopen<Binding>(p);
        return binding;
      } catch {
        break; // not loadable here: the package's own entry decides
      }
    }
    if (dirname(dir) === dir) break;
  }
  binding = createRequire(import.meta.url)('fs-native-extensions/binding') as Binding;
  return binding;
}

/** F_OFD_SETLK on [offset, offset+length): false when another holder conflicts. */
export function tryLock(fd: number, offset: number, length: number, shared: boolean): boolean {
  try {
    load().tryLock(fd, offset, length, !shared);
    return true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EAGAIN') return false;
    throw e;
  }
}

/** FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE. */
export function trim(fd: number, offset: number, length: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const req: Req = { handle: null, resolve, reject };
    req.handle = load().trim(fd, offset, length, req, function (this: Req, err) {
      if (err) this.reject(err);
      else this.resolve();
    });
  });
}

/** `trim` on the calling thread (ImageFile's synchronous mode). */
export function trimSync(fd: number, offset: number, length: number): void {
  load().trimSync(fd, offset, length);
}
