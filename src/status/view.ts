// What the status page shows, built from the runner's job events and the printer's state (pure: no I/O). Every
// text passes through redactText; nothing of a job's params, result or error details is passed on, since they hold
// paths and URLs. The same views go to /status.json, the SSE snapshot and the HTML's first paint.

import type { JobBoard, JobEvent, JobKind, LogLevel, ProgressUnit } from "../core/events.js";
import type { CurrentJob, JobProgress, JobRecord } from "../core/jobs.js";
import type { KlippyState, PrinterState } from "../core/printer.js";
import { mcuUserName } from "../flash/mcu-name.js";
import { shownText } from "./redact.js";

/** Log lines kept per job for the page (the newest). */
export const LOG_LINES = 40;
/** Finished jobs listed. */
export const HISTORY_ROWS = 10;

export interface PrinterView {
  moonraker: boolean;
  klipper: boolean;
  klippyState: KlippyState;
  /** Klipper's state message (e.g. why it is in error), redacted. */
  message: string;
  printState: string | null;
}

export interface ProgressView {
  done: number;
  total: number;
  unit: ProgressUnit;
  phase: string | null;
  /** 0–100, whole; null when the total is unknown. */
  percent: number | null;
}

export type BoardState = "building" | "built" | "flashing" | "flashed" | "failed" | "unknown";

/** One MCU of an update of several boards (flash.update_all). */
export interface BoardRow {
  name: string;
  state: BoardState;
  /** Its place in the flash order, "2 of 3", once flashing began. */
  order: string | null;
  progress: ProgressView | null;
  code: string | null;
  message: string | null;
}

export interface JobView {
  id: string;
  kind: JobKind;
  /** The job's target, redacted ("mcu toolhead", "all MCUs", "download https://host/pkg.zip"). */
  target: string;
  /** The target in the user's words: "toolhead" for "mcu toolhead". */
  label: string;
  stage: string;
  /** The stage's message, redacted. */
  message: string | null;
  progress: ProgressView | null;
  boards: BoardRow[];
  startedAt: string | null;
  finishedAt: string | null;
  /** null while the job runs. */
  result: { ok: boolean; code: string | null; message: string | null } | null;
}

export interface LogLine {
  ts: string;
  level: Exclude<LogLevel, "debug">;
  message: string;
}

export interface HistoryRow {
  id: string;
  kind: JobKind;
  label: string;
  startedAt: string;
  finishedAt: string;
  ok: boolean;
  code: string | null;
  message: string | null;
}

export interface Snapshot {
  version: string | null;
  /** When the snapshot was taken (ISO 8601). */
  time: string;
  printer: PrinterView;
  /** The running job, else the last one this process ran since the page started; null: none yet. */
  job: JobView | null;
  /** The newest log lines of `job`, oldest first. */
  log: LogLine[];
  history: HistoryRow[];
}

/** What one job event changes, as the page's SSE `job` message carries it. */
export interface JobUpdate {
  type: JobEvent["type"];
  job: JobView;
  /** The log line the event added. */
  line?: LogLine;
}

export function printerView(state: PrinterState): PrinterView {
  return {
    moonraker: state.moonrakerConnected,
    klipper: state.klippyConnected,
    klippyState: state.klippyState,
    message: shownText(state.stateMessage.trim(), 300),
    printState: state.printState,
  };
}

/** "toolhead" for a flash of "mcu toolhead"; other targets as they are (redacted). */
export function targetLabel(kind: JobKind, target: string): string {
  const shown = shownText(target, 200);
  return kind === "flash" && /^mcu(\s|$)/.test(target) ? mcuUserName(shown) : shown;
}

export function progressView(p: JobProgress): ProgressView {
  const percent = p.total > 0 ? Math.max(0, Math.min(100, Math.floor((p.done / p.total) * 100))) : null;
  return { done: p.done, total: p.total, unit: p.unit, phase: p.phase ?? null, percent };
}

export function historyRows(records: JobRecord[]): HistoryRow[] {
  return records.slice(0, HISTORY_ROWS).map((r) => ({
    id: r.id,
    kind: r.kind,
    label: targetLabel(r.kind, r.target),
    startedAt: r.startedAt,
    finishedAt: r.finishedAt,
    ok: r.ok,
    code: r.code ?? null,
    message: r.message === undefined ? null : shownText(r.message),
  }));
}

/** The board rows' state while a stage that names a board runs (src/flash/update-all.ts's stage names). */
const STAGE_BOARD_STATES: Partial<Record<string, BoardState>> = { build: "building", flash: "flashing" };

/** Follows the job events of this process into the view of the running (or last) job and its log tail. */
export class JobTracker {
  private job: JobView | null = null;
  private log: LogLine[] = [];

  /** Applies one event; returns what changed for the page, or null when the page shows nothing of it. */
  apply(event: JobEvent): JobUpdate | null {
    let job = this.job;
    if (job?.id !== event.jobId) {
      // A job's result may come after another job of this process started (INTERRUPTED records at start-up,
      // notices): it must not replace the running one.
      if (job && job.result === null && (event.type === "result" || event.type === "notice")) return null;
      if (event.type === "notice") return null;
      job = this.start(event);
    }
    let line: LogLine | undefined;
    switch (event.type) {
      case "stage":
        job.stage = event.stage;
        job.message = event.message === undefined ? null : shownText(event.message);
        if (event.board) this.followBoard(job, event.stage, event.board);
        break;
      case "progress": {
        job.progress = progressView(event);
        const board = job.boards.find((b) => b.state === "flashing");
        if (board) board.progress = job.progress;
        break;
      }
      case "log": {
        if (event.level === "debug") return null;
        line = { ts: event.ts, level: event.level, message: shownText(event.message) };
        if (event.level === "error" && event.board) this.failBoard(job, event.board, event.message);
        break;
      }
      case "notice":
        line = { ts: event.ts, level: "info", message: shownText(event.message) };
        break;
      case "result":
        job.finishedAt = event.ts;
        job.result = { ok: event.ok, code: event.code ?? null, message: event.message === undefined ? null : shownText(event.message) };
        this.settleBoards(job, event);
        break;
    }
    if (line) this.log = [...this.log.slice(-(LOG_LINES - 1)), line];
    return { type: event.type, job: structuredClone(job), ...(line ? { line } : {}) };
  }

  /**
   * The running or last job. The runner's `current()` knows the latest stage and progress (events are throttled)
   * and a job that started before the page did.
   */
  view(current: CurrentJob | null): { job: JobView | null; log: LogLine[] } {
    if (current && this.job?.id !== current.id) {
      this.job = {
        id: current.id,
        kind: current.kind,
        target: shownText(current.target, 200),
        label: targetLabel(current.kind, current.target),
        stage: current.stage,
        message: null,
        progress: null,
        boards: [],
        startedAt: current.startedAt,
        finishedAt: null,
        result: null,
      };
      this.log = [];
    }
    const job = this.job && structuredClone(this.job);
    if (job && current?.id === job.id) {
      job.stage = current.stage;
      job.progress = current.progress && progressView(current.progress);
      const board = job.boards.find((b) => b.state === "flashing");
      if (board) board.progress = job.progress;
    }
    return { job, log: [...this.log] };
  }

  private start(event: JobEvent): JobView {
    this.job = {
      id: event.jobId,
      kind: event.kind,
      target: shownText(event.target, 200),
      label: targetLabel(event.kind, event.target),
      stage: "starting",
      message: null,
      progress: null,
      boards: [],
      startedAt: event.type === "result" ? null : event.ts,
      finishedAt: null,
      result: null,
    };
    this.log = [];
    return this.job;
  }

  /** Per-board rows of an update of several boards: its build and flash stages name the board they are about. */
  private followBoard(job: JobView, stage: string, ref: JobBoard): void {
    const state = STAGE_BOARD_STATES[stage];
    if (!state) return;
    // The board before is done with that step unless it failed.
    for (const b of job.boards) {
      if (b.state === "building") b.state = "built";
      if (b.state === "flashing") Object.assign(b, { state: "flashed", progress: null });
    }
    const board = boardRow(job, ref.name);
    board.state = state;
    board.progress = null;
    if (state === "flashing") board.order = `${ref.index} of ${ref.count}`;
  }

  private failBoard(job: JobView, ref: JobBoard, message: string): void {
    // update-all's line starts with the board's name for the console and the log; on the page the row names it.
    const reason = message.startsWith(`${ref.name}: `) ? message.slice(ref.name.length + 2) : message;
    Object.assign(boardRow(job, ref.name), { state: "failed", progress: null, message: shownText(reason) });
  }

  /** At the result: the outcome per board, from update-all's result (kept in the details on failure too). */
  private settleBoards(job: JobView, event: Extract<JobEvent, { type: "result" }>): void {
    const outcomes = boardOutcomes(event.details);
    for (const o of outcomes) {
      const board = boardRow(job, o.name);
      board.progress = null;
      if (o.code) Object.assign(board, { state: "failed", code: o.code, message: o.message === null ? board.message : shownText(o.message) });
      else if (o.flashed) board.state = "flashed";
      else if (board.state === "flashing") board.state = "unknown";
    }
    for (const b of job.boards) {
      if (b.state === "flashing") Object.assign(b, { state: event.ok ? "flashed" : "unknown", progress: null });
      if (b.state === "building") b.state = event.ok ? "built" : "unknown";
    }
  }
}

/** The row of a board, added ("unknown" until the caller says more) when the page has none yet. */
function boardRow(job: JobView, name: string): BoardRow {
  const shown = shownText(name, 100);
  let board = job.boards.find((b) => b.name === shown);
  if (!board) {
    board = { name: shown, state: "unknown", order: null, progress: null, code: null, message: null };
    job.boards.push(board);
  }
  return board;
}

interface BoardOutcome {
  name: string;
  flashed: boolean;
  code: string | null;
  message: string | null;
}

/** The `mcus` of an update-all result (the details on success, `details.result` on failure), read defensively. */
function boardOutcomes(details: unknown): BoardOutcome[] {
  const holder = asRecord(details);
  const result = asRecord(holder?.result) ?? holder;
  const mcus = result?.mcus;
  if (!Array.isArray(mcus)) return [];
  const outcomes: BoardOutcome[] = [];
  for (const item of mcus) {
    const m = asRecord(item);
    if (typeof m?.name !== "string") continue;
    outcomes.push({
      name: m.name,
      flashed: m.flashed === true,
      code: typeof m.code === "string" ? m.code : null,
      message: typeof m.message === "string" ? m.message : null,
    });
  }
  return outcomes;
}

function asRecord(value: unknown): Record<string, unknown> | null {
  return typeof value === "object" && value !== null && !Array.isArray(value) ? (value as Record<string, unknown>) : null;
}

/** For JSON inside the HTML and SSE data lines: plain JSON, with "<" escaped so no text can end a <script>. */
export function pageJson(value: unknown): string {
  return JSON.stringify(value).replace(/</g, "\\u003c").replace(/\u2028/g, "\\u2028").replace(/\u2029/g, "\\u2029");
}
