// Node reads a socket or a file into a fresh buffer each time (64 KiB), and that memory returns only when V8 next
// collects its young generation, which it does by its own allocation count, not by these buffers: streaming a
// 500 MB package piled up 40 MiB of dead buffers in the service first. With `--expose-gc` (the service's node
// options, package.json `start`) a minor collection after every MiB streamed keeps that to a few MiB, for a
// fraction of a millisecond each. Without the flag this does nothing.

const MiB = 1024 * 1024;

type Collect = (options: { type: "minor" }) => void;

export class GarbagePacer {
  private pending = 0;

  constructor(
    private readonly everyBytes = MiB,
    private readonly collect: Collect | undefined = (globalThis as { gc?: Collect }).gc,
  ) {}

  /** Counts `bytes` more streamed; collects once every `everyBytes`. */
  add(bytes: number): void {
    if (!this.collect) return;
    this.pending += bytes;
    if (this.pending < this.everyBytes) return;
    this.pending = 0;
    this.collect({ type: "minor" });
  }
}
