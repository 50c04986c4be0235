// A JobContext that records every call in order, so flasher tests can assert what was reported and when.

import type { JobContext, LogLevel, ProgressUnit } from "../../../src/core/events.js";

export type ContextCall =
  | { call: "stage"; stage: string; message?: string }
  | { call: "progress"; done: number; total: number; unit: ProgressUnit; phase?: string }
  | { call: "log"; level: LogLevel; message: string }
  | { call: "setCancellable"; cancellable: boolean; reason?: string };

export class RecordingContext implements JobContext {
  readonly jobId = "job-test";
  readonly kind = "flash" as const;
  readonly target = "mcu";
  readonly calls: ContextCall[] = [];
  readonly controller = new AbortController();

  get signal(): AbortSignal {
    return this.controller.signal;
  }

  stage(stage: string, message?: string): void {
    this.calls.push({ call: "stage", stage, message });
  }

  progress(done: number, total: number, unit: ProgressUnit, phase?: string): void {
    this.calls.push({ call: "progress", done, total, unit, phase });
  }

  log(level: LogLevel, message: string): void {
    this.calls.push({ call: "log", level, message });
  }

  setCancellable(cancellable: boolean, reason?: string): void {
    this.calls.push({ call: "setCancellable", cancellable, reason });
  }

  stages(): string[] {
    return this.calls.flatMap((c) => (c.call === "stage" ? [c.stage] : []));
  }

  lastProgress(phase: string): { done: number; total: number } | undefined {
    const hits = this.calls.filter((c): c is Extract<ContextCall, { call: "progress" }> => c.call === "progress" && c.phase === phase);
    return hits.at(-1);
  }
}
