// Node reads a socket or a file into a fresh buffer each time (16–64 KiB), and that memory returns only when V8 next
// collects the buffer's object, which it does by its own allocation count, not by these buffers: streaming a 500 MB
// package piled up 40 MiB of dead buffers in the service first. With `--expose-gc` (the service's node options,
// package.json `start`) a minor collection after every `everyBytes` streamed keeps that to about that much, for
// a fraction of a millisecond each. A buffer (or anything else) still in use at two minor collections in a row is
// moved to the old generation, where only a major collection frees it: over hundreds of MB, those pile up too (a
// package check reached +4 MiB), so every `majorEveryBytes` the collection is a major one (about 10 ms on a small
// heap). Without the flag this does nothing.

const KiB = 1024;
const MiB = 1024 * KiB;

type Collect = (options: { type: "minor" | "major" }) => void;

export class GarbagePacer {
  private pending = 0;
  private sinceMajor = 0;

  constructor(
    private readonly everyBytes = 512 * KiB,
    private readonly collect: Collect | undefined = (globalThis as { gc?: Collect }).gc,
    private readonly majorEveryBytes = 16 * MiB,
  ) {}

  /** Counts `bytes` more streamed; collects once every `everyBytes`, a major collection every `majorEveryBytes`. */
  add(bytes: number): void {
    if (!this.collect) return;
    this.pending += bytes;
    this.sinceMajor += bytes;
    if (this.pending < this.everyBytes) return;
    this.pending = 0;
    if (this.sinceMajor >= this.majorEveryBytes) {
      this.sinceMajor = 0;
      this.collect({ type: "major" });
      return;
    }
    this.collect({ type: "minor" });
  }
}
