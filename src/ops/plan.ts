/**
 * `plan`: the two ways of removing one layer from an image's backing chain, side by side, with
 * the figures the real operations would produce (they run here as dry runs, through the same
 * planning code):
 *  - commit: copy what LAYER holds into its backing file (`commit -d LAYER`), then point the
 *    image above LAYER at that backing file (`rebase -u`);
 *  - pull: copy into the image above LAYER what it reads from LAYER and its backing file reads
 *    differently (`rebase -b BACKING-OF-LAYER` of the image above; flatten when LAYER has none).
 */
import { dirname, relative, isAbsolute } from 'node:path';
import { QcowError } from '../errors.js';
import type { FileOpener } from '../io/file.js';
import { BackingChain } from '../chain/chain.js';
import type { LayerFormat } from '../chain/layer.js';
import type { OperationOptions } from './options.js';
import { commit, findBase } from './commit.js';
import { rebase } from './rebase.js';

export interface PlanOptions extends OperationOptions {
  /** The layer to remove: a backing name as stored in the chain, or a path. */
  drop: string;
  format?: LayerFormat | undefined;
  openFile?: FileOpener | undefined;
}

export interface PlanWay {
  possible: boolean;
  /** Why not, when not possible. */
  reason?: string | undefined;
  /** The commands that do it. */
  commands: string[];
  /** The file that receives the data. */
  writes: string | undefined;
  /** Guest bytes copied as data. */
  dataBytes: number;
  /** Guest bytes written as zeroes (zero clusters / holes, no data). */
  zeroBytes: number;
  /** Clusters of the receiving file that get new data. */
  dataClusters: number;
  /** How much the receiving file grows (upper estimate). */
  growth: number;
}

export interface PlanResult {
  filename: string;
  layer: string;
  /** Depth of LAYER in FILENAME's chain (1 = FILENAME's backing file). */
  layerDepth: number;
  /** The image whose backing file LAYER is. */
  above: string;
  /** LAYER's backing file (undefined: LAYER is the bottom of the chain). */
  below: string | undefined;
  commit: PlanWay;
  pull: PlanWay;
  /** The way that copies fewer data bytes ('same' when equal, or the only possible one). */
  lessData: 'commit' | 'pull' | 'same';
  seconds: number;
}

export async function plan(filename: string, opts: PlanOptions): Promise<PlanResult> {
  const t0 = performance.now();
  if (!opts.drop) throw new QcowError('INVALID_ARGUMENT', 'plan needs --drop LAYER', filename);
  const common = { format: opts.format, openFile: opts.openFile, signal: opts.signal, onWarning: opts.onWarning };
  const depth = await findBase(filename, { ...common, base: opts.drop });
  const chain = await BackingChain.open(filename, common);
  let layerPath: string, abovePath: string, below: string | undefined, belowFormat: string | undefined;
  try {
    const layer = chain.layers[depth]!;
    layerPath = layer.path;
    abovePath = chain.layers[depth - 1]!.path;
    below = chain.layers[depth + 1]?.path;
    belowFormat = below !== undefined ? layer.backingFormat ?? chain.layers[depth + 1]!.format : undefined;
  } finally {
    await chain.close();
  }
  const quote = (s: string) => (/^[\w@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, "'\\''")}'`);

  // Commit LAYER down into its backing file.
  let commitWay: PlanWay;
  if (below === undefined) {
    commitWay = { possible: false, reason: 'the layer has no backing file to commit into', commands: [], writes: undefined, dataBytes: 0, zeroBytes: 0, dataClusters: 0, growth: 0 };
  } else {
    const c = await commit(layerPath, { ...common, format: undefined, drop: true, dryRun: true });
    const name = nameFrom(abovePath, below);
    commitWay = {
      possible: true,
      commands: [`qcowkit commit -d ${quote(layerPath)}`, `qcowkit rebase -u -b ${quote(name)} -F ${belowFormat} ${quote(abovePath)}`],
      writes: below,
      dataBytes: c.dataBytes,
      zeroBytes: c.zeroBytes,
      dataClusters: c.dataClusters,
      growth: c.baseGrowth,
    };
  }

  // Pull LAYER up into the image above it.
  const name = below === undefined ? '' : nameFrom(abovePath, below);
  const r = await rebase(abovePath, { ...common, format: undefined, backing: name, backingFormat: belowFormat, dryRun: true });
  const pullWay: PlanWay = {
    possible: true,
    commands: [below === undefined ? `qcowkit rebase -b "" ${quote(abovePath)}` : `qcowkit rebase -b ${quote(name)} -F ${belowFormat} ${quote(abovePath)}`],
    writes: abovePath,
    dataBytes: r.dataBytes,
    zeroBytes: r.zeroBytes,
    dataClusters: r.dataClusters,
    growth: r.growth,
  };
  const lessData = !commitWay.possible || commitWay.dataBytes === pullWay.dataBytes ? (commitWay.possible ? 'same' : 'pull') : commitWay.dataBytes < pullWay.dataBytes ? 'commit' : 'pull';
  return { filename, layer: layerPath, layerDepth: depth, above: abovePath, below, commit: commitWay, pull: pullWay, lessData, seconds: (performance.now() - t0) / 1000 };
}

/** The name that reaches `target` from the directory of `image` (relative when both are). */
function nameFrom(image: string, target: string): string {
  if (isAbsolute(target) !== isAbsolute(image)) return target;
  const rel = relative(dirname(image), target);
  return rel === '' ? target : rel;
}
