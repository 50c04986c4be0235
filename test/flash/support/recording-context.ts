// A JobContext that records every call in order, so flasher tests can assert what was reported and when.

import type { JobBoard, JobContext, LogLevel, ProgressUnit } from "../../../src/core/events.js";

export type ContextCall =
  | { call: "stage"; stage: string; message?: string; board?: JobBoard }
  | { call: "progress"; done: number; total: number; unit: ProgressUnit; phase?: string }
  | { call: "log"; level: LogLevel; message: string; board?: JobBoard }
  | { call: "setCancellable"; cancellable: boolean; reason?: string };

type CallName = ContextCall["call"];
/** The arguments of one kind of call, without the `call` tag. */
type CallArgs<K extends CallName> = Omit<Extract<ContextCall, { call: K }>, "call">;

export class RecordingContext implements JobContext {
  readonly jobId = "job-test";
  readonly kind = "flash" as const;
  readonly target = "mcu";
  readonly calls: ContextCall[] = [];
  /** Abort it (before or during the flash) to cancel the job. */
  readonly controller = new AbortController();

  get signal(): AbortSignal {
    return this.controller.signal;
  }

  stage(stage: string, message?: string, board?: JobBoard): void {
    this.calls.push({ call: "stage", stage, message, ...(board === undefined ? {} : { board }) });
  }

  progress(done: number, total: number, unit: ProgressUnit, phase?: string): void {
    this.calls.push({ call: "progress", done, total, unit, phase });
  }

  log(level: LogLevel, message: string, board?: JobBoard): void {
    this.calls.push({ call: "log", level, message, ...(board === undefined ? {} : { board }) });
  }

  setCancellable(cancellable: boolean, reason?: string): void {
    this.calls.push({ call: "setCancellable", cancellable, reason });
  }

  /** The stage names, in order. */
  stages(): string[] {
    return this.callsOf("stage").map((c) => c.stage);
  }

  /** Every progress report, in order. */
  progressEvents(): Array<CallArgs<"progress">> {
    return this.callsOf("progress");
  }

  /** The last progress report of a phase. */
  lastProgress(phase: string): CallArgs<"progress"> | undefined {
    return this.progressEvents().filter((p) => p.phase === phase).at(-1);
  }

  /** Every log line, in order. */
  logs(): Array<CallArgs<"log">> {
    return this.callsOf("log");
  }

  /** Every setCancellable call, in order. */
  cancellableCalls(): Array<CallArgs<"setCancellable">> {
    return this.callsOf("setCancellable");
  }

  private callsOf<K extends CallName>(call: K): Array<CallArgs<K>> {
    return this.calls.flatMap((c) => {
      if (c.call !== call) return [];
      const { call: _call, ...args } = c;
      return [args as unknown as CallArgs<K>];
    });
  }
}
