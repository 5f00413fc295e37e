// Minimal typings for the parts of fs-native-extensions qcowkit uses.
declare module 'fs-native-extensions' {
  export function trim(fd: number, offset: number, length: number): Promise<void>;
  export function tryLock(fd: number, offset?: number, length?: number, opts?: { shared?: boolean }): boolean;
  export function unlock(fd: number, offset?: number, length?: number): void;
}
