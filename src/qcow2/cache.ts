/**
 * MetadataCache: cluster-sized metadata tables (L2 tables or refcount blocks) held in wasm memory,
 * so kernels work on them in place, with dirty tracking and write-back.
 *
 * Write ordering is declared here, once, and honoured by every write-back (flush or eviction):
 * - `dependsOn(other)`: before any dirty entry of this cache reaches the file, `other` is written
 *   back and the file flushed (L2 tables pointing at new clusters wait for their refcounts; lowered
 *   refcounts wait for the L2 tables that dropped the references);
 * - `dependsOnFlush()`: before any dirty entry is written, the file is flushed (L2 tables mapping
 *   freshly written guest data wait for that data).
 * A dependency is dropped once satisfied; one on a cache with nothing unwritten or unflushed is
 * satisfied without a flush. QEMU's qcow2-cache.c and imago's cache follow the same model.
 */
import { QcowError } from '../errors.js';
import type { ImageFile } from '../io/file.js';
import { kernels } from '../kernels/index.js';

interface Entry {
  offset: number;
  ptr: number;
  dirty: boolean;
  pins: number;
}

export class MetadataCache {
  /** LRU order: Map iteration order is insertion order; a hit re-inserts. */
  readonly #entries = new Map<number, Entry>();
  #dependency: MetadataCache | undefined;
  #needsFlush = false;
  #writing: Promise<void> = Promise.resolve();
  /** Tables written to the file, and how many of those a completed flush of this cache covered. */
  #written = 0;
  #flushedWritten = 0;

  constructor(
    readonly name: string,
    private readonly file: ImageFile,
    readonly entrySize: number,
    private readonly capacity: number,
  ) {}

  /** Pointer to the table at host `offset`, read from the file on a miss. Pin it while awaiting. */
  async get(offset: number): Promise<number> {
    const hit = this.#touch(offset);
    if (hit) return hit.ptr;
    const k = kernels();
    const ptr = k.alloc(this.entrySize);
    try {
      await this.file.readAt(k.u8(ptr, this.entrySize), offset);
    } catch (e) {
      k.free(ptr);
      throw e;
    }
    // Another caller may have loaded it meanwhile: keep theirs.
    const raced = this.#touch(offset);
    if (raced) {
      k.free(ptr);
      return raced.ptr;
    }
    this.#entries.set(offset, { offset, ptr, dirty: false, pins: 0 });
    await this.#evict();
    return ptr;
  }

  /** A new, zero-filled table at `offset` (a just-allocated cluster: nothing to read). Dirty. */
  async create(offset: number): Promise<number> {
    if (this.#entries.has(offset)) throw new QcowError('INTERNAL', `${this.name} cache: table at ${offset} created twice`, this.file.path);
    const ptr = kernels().allocZeroed(this.entrySize);
    this.#entries.set(offset, { offset, ptr, dirty: true, pins: 0 });
    await this.#evict();
    return ptr;
  }

  /** Pointer of a cached table, or undefined (no I/O). */
  peek(offset: number): number | undefined {
    return this.#entries.get(offset)?.ptr;
  }

  /** Fresh byte view of a cached table (views die when wasm memory grows: don't keep them). */
  view(offset: number): Uint8Array {
    const e = this.#entries.get(offset);
    if (!e) throw new QcowError('INTERNAL', `${this.name} cache: table at ${offset} is not cached`, this.file.path);
    return kernels().u8(e.ptr, this.entrySize);
  }

  markDirty(offset: number): void {
    const e = this.#entries.get(offset);
    if (!e) throw new QcowError('INTERNAL', `${this.name} cache: dirtying table at ${offset}, which is not cached`, this.file.path);
    e.dirty = true;
  }

  /** Keeps a table in memory across awaits (eviction skips pinned tables). */
  pin(offset: number): void {
    const e = this.#entries.get(offset);
    if (e) e.pins++;
  }
  unpin(offset: number): void {
    const e = this.#entries.get(offset);
    if (e && e.pins > 0) e.pins--;
  }

  /** Drops a table without writing it (its cluster was freed). */
  forget(offset: number): void {
    const e = this.#entries.get(offset);
    if (!e) return;
    this.#entries.delete(offset);
    kernels().free(e.ptr);
  }

  /**
   * Declares that this cache's dirty tables may reach the file only after `other`'s. Call it
   * *before* making the change that needs the order. No cycle can form: a dependency `other`
   * already has is satisfied first (its tables are written and flushed), as QEMU does.
   */
  async dependsOn(other: MetadataCache): Promise<void> {
    if (other === this) throw new QcowError('INTERNAL', `${this.name} cache cannot depend on itself`, this.file.path);
    if (other.#dependency) await other.#satisfyDependencies();
    if (this.#dependency && this.#dependency !== other) await this.#satisfyDependencies();
    this.#dependency = other;
  }

  dependsOnFlush(): void {
    this.#needsFlush = true;
  }

  get dirtyCount(): number {
    let n = 0;
    for (const e of this.#entries.values()) if (e.dirty) n++;
    return n;
  }

  /**
   * Writes every dirty table (dependencies first); no final flush. With nothing dirty, a pending
   * dependency is still satisfied: tables written earlier (e.g. while satisfying another cache's
   * dependency on this one) may point at clusters whose refcounts are not durable yet, and a
   * caller about to point at them (an L1 entry) relies on `flush()` covering that.
   */
  async writeBack(): Promise<void> {
    const dirty = [...this.#entries.values()].filter((e) => e.dirty);
    if (dirty.length) await this.#write(dirty);
    else await this.#satisfyDependencies();
  }

  /** writeBack, then a file flush: every change made so far is durable. */
  async flush(): Promise<void> {
    await this.writeBack();
    const written = this.#written; // writes completed before the flush starts are covered by it
    await this.file.flush();
    this.#flushedWritten = Math.max(this.#flushedWritten, written);
  }

  /**
   * Nothing of this cache can reach the file unordered any more: no dirty table, no pending
   * dependency, every table it wrote covered by a completed flush. Depending on such a cache asks
   * for nothing (a flush for it would only repeat one already made).
   */
  get #settled(): boolean {
    if (this.#dependency || this.#needsFlush || this.#written !== this.#flushedWritten) return false;
    for (const e of this.#entries.values()) if (e.dirty) return false;
    return true;
  }

  /** Frees every table (after a flush; throws if anything is still dirty). */
  clear(): void {
    for (const e of this.#entries.values()) {
      if (e.dirty) throw new QcowError('INTERNAL', `${this.name} cache dropped with unwritten tables`, this.file.path);
    }
    this.#drop();
  }

  /** Frees everything, dirty or not (after a failure: what was not written is lost on purpose). */
  discardAll(): void {
    this.#drop();
  }

  #drop(): void {
    const k = kernels();
    for (const e of this.#entries.values()) k.free(e.ptr);
    this.#entries.clear();
    this.#dependency = undefined;
    this.#needsFlush = false;
  }

  #touch(offset: number): Entry | undefined {
    const e = this.#entries.get(offset);
    if (e) {
      this.#entries.delete(offset);
      this.#entries.set(offset, e);
    }
    return e;
  }

  async #satisfyDependencies(): Promise<void> {
    const dep = this.#dependency;
    if (dep) {
      this.#dependency = undefined;
      if (!dep.#settled) {
        await dep.flush();
        this.#needsFlush = false;
      }
    }
    if (this.#needsFlush) {
      this.#needsFlush = false;
      await this.file.flush();
    }
  }

  /** Write-backs run one at a time (an eviction may start while a flush is writing). */
  async #write(entries: Entry[]): Promise<void> {
    const previous = this.#writing;
    let done!: () => void;
    this.#writing = new Promise<void>((resolve) => (done = resolve));
    try {
      await previous;
      await this.#satisfyDependencies();
      const k = kernels();
      const todo = entries.filter((e) => e.dirty && this.#entries.get(e.offset) === e).sort((a, b) => a.offset - b.offset);
      // Clear first: a change made while the write is in flight marks it dirty again. The copies
      // keep the bytes stable while the writes are in flight. All issued at once, not one awaited
      // after the other (a flush of a large image's tables is hundreds of them).
      for (const e of todo) e.dirty = false;
      const results = await Promise.allSettled(todo.map((e) => this.file.writeAt(k.u8(e.ptr, this.entrySize).slice(), e.offset)));
      let failure: unknown;
      todo.forEach((e, i) => {
        const res = results[i]!;
        if (res.status === 'fulfilled') this.#written++;
        else {
          e.dirty = true; // (unless it changed again meanwhile, it still needs writing)
          failure ??= res.reason;
        }
      });
      if (failure !== undefined) throw failure;
    } finally {
      done();
    }
  }

  async #evict(): Promise<void> {
    if (this.#entries.size <= this.capacity) return;
    const victims: Entry[] = [];
    for (const e of this.#entries.values()) {
      if (this.#entries.size - victims.length <= this.capacity) break;
      if (e.pins === 0) victims.push(e);
    }
    const dirty = victims.filter((e) => e.dirty);
    if (dirty.length) await this.#write(dirty);
    for (const e of victims) {
      if (e.dirty || e.pins > 0 || this.#entries.get(e.offset) !== e) continue;
      this.forget(e.offset);
    }
  }
}
