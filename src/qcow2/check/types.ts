/** Shared vocabulary of the check passes (mirrors QEMU's BdrvCheckResult / BdrvCheckMode). */

export const FIX_LEAKS = 1;
export const FIX_ERRORS = 2;
/** 0 = read-only check; FIX_LEAKS (-r leaks); FIX_LEAKS | FIX_ERRORS (-r all). */
export type FixMode = number;

/** Counters of one check pass, as QEMU's BdrvCheckResult + BlockFragInfo. */
export interface CheckCounters {
  corruptions: number;
  leaks: number;
  checkErrors: number;
  corruptionsFixed: number;
  leaksFixed: number;
  imageEndOffset: number;
  totalClusters: number;
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
}

export function newCounters(): CheckCounters {
  return {
    corruptions: 0,
    leaks: 0,
    checkErrors: 0,
    corruptionsFixed: 0,
    leaksFixed: 0,
    imageEndOffset: 0,
    totalClusters: 0,
    allocatedClusters: 0,
    fragmentedClusters: 0,
    compressedClusters: 0,
  };
}

/** Receives QEMU-style diagnostic lines (what qemu-img prints on stderr), without newline. */
export type Reporter = (line: string) => void;

/** A pass could not complete (QEMU returns -errno and qemu-img prints "Check failed: ..."). */
export class CheckAborted extends Error {
  constructor(
    readonly reason: string,
    options?: { cause?: unknown },
  ) {
    super(reason, options);
    this.name = 'CheckAborted';
  }
}

export const hex = (n: number | bigint): string => n.toString(16);
