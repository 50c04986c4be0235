// A JobContext that records what a flasher reports, for assertions in the flash tests.

import type { JobContext, LogLevel, ProgressUnit } from "../../src/core/events.js";

export interface RecordedContext extends JobContext {
  stages: Array<{ stage: string; message?: string }>;
  progress: JobContext["progress"];
  progressEvents: Array<{ done: number; total: number; unit: ProgressUnit; phase?: string }>;
  logs: Array<{ level: LogLevel; message: string }>;
  cancellable: Array<{ cancellable: boolean; reason?: string }>;
}

export function recordingContext(signal: AbortSignal = new AbortController().signal): RecordedContext {
  const ctx: RecordedContext = {
    jobId: "job-test",
    kind: "flash",
    target: "mcu",
    signal,
    stages: [],
    progressEvents: [],
    logs: [],
    cancellable: [],
    stage(stage, message) {
      ctx.stages.push({ stage, message });
    },
    progress(done, total, unit, phase) {
      ctx.progressEvents.push({ done, total, unit, phase });
    },
    log(level, message) {
      ctx.logs.push({ level, message });
    },
    setCancellable(cancellable, reason) {
      ctx.cancellable.push({ cancellable, reason });
    },
  };
  return ctx;
}
