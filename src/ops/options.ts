/** Options every operation takes. */
export interface OperationOptions {
  signal?: AbortSignal | undefined;
  /** Called as work advances: done and total in the operation's own units (bytes). */
  onProgress?: ((done: number, total: number) => void) | undefined;
  /** Non-fatal notices (e.g. a probed backing format). */
  onWarning?: ((message: string) => void) | undefined;
  /** Open images even when another process holds a write lock (qemu-img -U; read-only use). */
  forceShare?: boolean | undefined;
}
