// Entry point of the kernels module: pure functions over linear memory, no allocation.
// The JS side (src/kernels/wasm.ts) owns the heap above heapBase().

export { l2Scan, scanConsumed, l2AccountRefs, l2CopiedMismatches, l2Fill } from "./l2";
export { refsAddRange, refcountCompare, refcountGet, refcountSet, refcountAddRange, refcountFind } from "./refcount";
export { bitmapOr, bitmapAnd, bitmapAndNot, popcount, setBits, clearBits, extents, extentsNext, bitmapConvertOr, bitmapTableLoad, bitmapClusterKinds, bitmapTableBuild } from "./bitmap";
export { isZero, firstNonZero, firstDifference, zeroBlocks, diffBlocks } from "./zero";
export { mapJsonReset, mapJsonFeed, mapJsonFinish } from "./mapjson";

/** First byte free for the JS heap (after static data). */
export function heapBase(): usize {
  return __heap_base;
}
export { l2Records, recordsDataRanges, recordsSplitHoles, mapMergeLayer, mapPendingLeft, statusErrorRun, statusErrorStart, refcountCountNonZero } from "./mapstatus";
