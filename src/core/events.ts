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

/**
 * The board a step of a job over several boards (flash.update_all) is about, so that listeners (the status page's
 * rows, custom UIs) follow each board from data instead of from the wording of messages. `index` is 1-based among
 * the `count` boards that step goes through: build, every planned board; flash, the ones built.
 */
export interface JobBoard {
  /** The MCU in the user's words: "toolhead" for "mcu toolhead". */
  name: string;
  index: number;
  count: number;
}

export type JobEvent = JobEventBase &
  (
    | { type: "stage"; stage: string; message?: string; board?: JobBoard }
    | { type: "progress"; done: number; total: number; unit: ProgressUnit; phase?: string }
    | { type: "log"; level: LogLevel; message: string; board?: JobBoard }
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
  stage(stage: string, message?: string, board?: JobBoard): void;
  progress(done: number, total: number, unit: ProgressUnit, phase?: string): void;
  log(level: LogLevel, message: string, board?: JobBoard): void;
  /** Marks whether `flash.cancel` may abort the job now; `reason` is told to whoever asks while it is not. */
  setCancellable(cancellable: boolean, reason?: string): void;
}
