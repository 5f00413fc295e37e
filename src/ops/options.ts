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

/**
 * Extents streamed instead of returned (for results that can hold millions of them): the totals
 * reach `onSummary` first, then `onExtents` gets batches of [start, length] pairs in guest bytes,
 * ascending and coalesced, in a buffer it may only read during the call. The result's `extents`
 * is then empty.
 */
export interface ExtentStreamOptions<Summary> {
  onSummary?: ((summary: Summary) => void) | undefined;
  /** May return a promise (output with back-pressure): the next batch waits for it. */
  onExtents?: ((pairs: Float64Array, count: number) => void | Promise<void>) | undefined;
}
