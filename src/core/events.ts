// Typed job events. Engines emit them through a JobContext; adapters (Moonraker events, console, CLI bars,
// log) subscribe to the JobRunner. Every event is plain JSON because it crosses the websocket as is.

import type { ErrorCode } from "./errors.js";

export type JobKind = "flash" | "ota";
export type ProgressUnit = "bytes" | "blocks" | "percent" | "steps";
export type LogLevel = "debug" | "info" | "warn" | "error";

interface JobEventBase {
  jobId: string;
  kind: JobKind;
  /** What the job acts on, e.g. the MCU section name "mcu toolhead". */
  target: string;
  /** ISO 8601 time of the event. */
  ts: string;
}

export type JobEvent = JobEventBase &
  (
    | { type: "stage"; stage: string; message?: string }
    | { type: "progress"; done: number; total: number; unit: ProgressUnit; phase?: string }
    | { type: "log"; level: LogLevel; message: string }
    | { type: "result"; ok: boolean; code?: ErrorCode; message?: string; details?: unknown }
    /** Something people should learn about a job after its result, e.g. Klipper started again later. */
    | { type: "notice"; message: string }
  );

export type JobEventType = JobEvent["type"];

/** What an engine gets to report and to learn about cancellation. Engines know nothing else of the runner. */
export interface JobContext {
  readonly jobId: string;
  readonly kind: JobKind;
  readonly target: string;
  /** Aborted when the job is cancelled (only while cancellable) or the process is shutting down. */
  readonly signal: AbortSignal;
  stage(stage: string, message?: string): void;
  progress(done: number, total: number, unit: ProgressUnit, phase?: string): void;
  log(level: LogLevel, message: string): void;
  /** Marks whether `flash.cancel` may abort the job now; `reason` is told to whoever asks while it is not. */
  setCancellable(cancellable: boolean, reason?: string): void;
}
