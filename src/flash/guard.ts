// The Klipper guard: flashing needs the serial port, so Klipper is stopped for the work and started again in
// every outcome. A durable journal written BEFORE the stop lets the next agent start undo a crash mid-flash
// (the agent killed while Klipper is down would otherwise leave the printer dead until someone notices).

import { readFile } from "node:fs/promises";
import type { Logger } from "pino";
import type { JobKind } from "../core/events.js";
import type { JobRunner } from "../core/jobs.js";
import { dataPaths } from "../core/paths.js";
import type { PrinterPort } from "../core/printer.js";
import { writeFileDurable, removeDurable } from "../core/durable.js";
import { MoonflashError, toMoonflashError, type ErrorCode } from "../core/errors.js";

/** What the journal file holds while Klipper is stopped for a job. */
export interface FlashJournal {
  jobId: string;
  kind: JobKind;
  target: string;
  /** The process that stopped Klipper; a live pid means the job is still running elsewhere (CLI vs agent). */
  pid: number;
  startedAt: string;
  klipperService: string;
  klipperWasRunning: boolean;
}

export type KlipperRestart = { ok: true } | { ok: false; code: ErrorCode; message: string };

export interface GuardOptions {
  jobId: string;
  kind: JobKind;
  target: string;
  /** How long Moonraker may take to report Klipper stopped or started again. */
  serviceTimeoutMs: number;
  logger: Logger;
  /** Told when Klipper is being stopped or started, so a job can show it as a stage. */
  onStage?: (stage: "stop-klipper" | "start-klipper", message: string) => void;
}

export interface GuardOutcome<T> {
  value: T;
  klipperWasRunning: boolean;
  /** null when Klipper was not running before, so nothing had to be started. */
  klipperRestart: KlipperRestart | null;
}

const SHUTDOWN_SIGNALS = ["SIGINT", "SIGTERM"] as const;
type ShutdownSignal = (typeof SHUTDOWN_SIGNALS)[number];

/** Refuses with PRINTER_BUSY while a print runs or is paused; stopping Klipper would ruin it. */
export function assertNotPrinting(printer: PrinterPort): void {
  if (!printer.isPrinting()) return;
  const printState = printer.state().printState ?? "printing";
  throw new MoonflashError(
    "PRINTER_BUSY",
    `The printer is printing (print_stats: ${printState}). Flashing stops Klipper; wait for the print to end or cancel it.`,
    { printState, idleState: printer.state().idleState },
  );
}

/** Whether Klipper runs now. Refuses when nobody can tell: flashing next to a running Klipper fails or worse. */
function klipperIsRunning(printer: PrinterPort): boolean {
  const state = printer.state();
  const unit = state.services[state.klipperService];
  if (unit) return unit.active_state === "active" || unit.active_state === "activating" || unit.active_state === "reloading";
  if (state.klippyConnected) return true;
  if (!state.moonrakerConnected) {
    throw new MoonflashError(
      "MOONRAKER_UNAVAILABLE",
      "moonflash has no Moonraker connection, so it cannot stop Klipper before flashing. Check that Moonraker runs and moonflash.conf's moonraker_socket, then try again.",
      { klipperService: state.klipperService },
    );
  }
  return false;
}

function parseJournal(text: string): FlashJournal | null {
  try {
    const j = JSON.parse(text) as Partial<FlashJournal>;
    if (typeof j.jobId !== "string" || typeof j.klipperService !== "string" || typeof j.klipperWasRunning !== "boolean") return null;
    return j as FlashJournal;
  } catch {
    return null;
  }
}

/**
 * The journal left by a job that stopped Klipper, or null when there is none. A file that cannot be parsed
 * (should never happen: it is written durably) reads as "Klipper was running", the safe assumption.
 */
export async function readJournal(dataDir: string): Promise<FlashJournal | null> {
  let text: string;
  try {
    text = await readFile(dataPaths(dataDir).journal, "utf8");
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return null;
    throw toMoonflashError(err);
  }
  return (
    parseJournal(text) ?? {
      jobId: "unknown",
      kind: "flash",
      target: "unknown",
      pid: 0,
      startedAt: new Date(0).toISOString(),
      klipperService: "klipper",
      klipperWasRunning: true,
    }
  );
}

function processAlive(pid: number): boolean {
  if (pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

/**
 * Runs `work` with Klipper stopped. Order: printing check, durable journal, stop (waits for inactive), work,
 * then always: start Klipper again if it ran before, remove the journal. SIGINT/SIGTERM during the guard
 * abort `work`'s signal and are re-raised once Klipper is back, so Ctrl-C never leaves the printer down.
 */
export async function withKlipperStopped<T>(
  printer: PrinterPort,
  journalPath: string,
  opts: GuardOptions,
  work: (shutdown: AbortSignal) => Promise<T>,
): Promise<GuardOutcome<T>> {
  assertNotPrinting(printer);
  const { logger } = opts;
  const klipperService = printer.state().klipperService;
  let klipperWasRunning = klipperIsRunning(printer);

  const leftover = await readJournalFile(journalPath);
  if (leftover) {
    // A previous job died with Klipper stopped and was not recovered yet; keep its promise to start Klipper.
    logger.warn({ journal: leftover }, "an earlier job's journal is still present; Klipper will be started after this job if it ran then");
    klipperWasRunning ||= leftover.klipperWasRunning;
  }

  const journal: FlashJournal = {
    jobId: opts.jobId,
    kind: opts.kind,
    target: opts.target,
    pid: process.pid,
    startedAt: new Date().toISOString(),
    klipperService,
    klipperWasRunning,
  };
  await writeFileDurable(journalPath, `${JSON.stringify(journal, null, 2)}\n`);

  const shutdown = new AbortController();
  let caughtSignal: ShutdownSignal | null = null;
  const onSignal = (signal: ShutdownSignal) => {
    if (caughtSignal) return;
    caughtSignal = signal;
    logger.warn(`${signal} received: finishing the ${opts.kind} job and starting Klipper again before exiting`);
    shutdown.abort(new MoonflashError("CANCELLED", `The agent is shutting down (${signal}).`));
  };
  const handlers = SHUTDOWN_SIGNALS.map((signal) => [signal, () => onSignal(signal)] as const);
  for (const [signal, handler] of handlers) process.on(signal, handler);

  let klipperRestart: KlipperRestart | null = null;
  try {
    let value: T;
    try {
      if (klipperWasRunning) {
        logger.info(`stopping ${klipperService}`);
        opts.onStage?.("stop-klipper", `stopping ${klipperService}`);
        await printer.stopService(klipperService, opts.serviceTimeoutMs);
      }
      // A signal that came while Klipper was stopping: do not start the work at all.
      if (shutdown.signal.aborted) throw shutdown.signal.reason;
      value = await work(shutdown.signal);
    } catch (err) {
      const error = toMoonflashError(err);
      klipperRestart = await restartKlipper(printer, klipperService, klipperWasRunning, opts);
      if (klipperRestart) error.details.klipperRestart = klipperRestart;
      throw error;
    }
    klipperRestart = await restartKlipper(printer, klipperService, klipperWasRunning, opts);
    if (klipperRestart && !klipperRestart.ok) {
      throw new MoonflashError(
        klipperRestart.code,
        `The ${opts.kind} job finished, but Klipper did not start again: ${klipperRestart.message} ` +
          `Start it from the web UI (Machine → Services → ${klipperService}) or with \`sudo systemctl start ${klipperService}\`.`,
        { klipperRestart, result: value },
      );
    }
    return { value, klipperWasRunning, klipperRestart };
  } finally {
    await removeDurable(journalPath).catch((err: unknown) => logger.error({ err }, `could not remove the journal ${journalPath}`));
    for (const [signal, handler] of handlers) process.removeListener(signal, handler);
    // Re-raise only when nobody else listens: then the default action (exit by that signal) is what the user asked for.
    if (caughtSignal && process.listenerCount(caughtSignal) === 0) process.kill(process.pid, caughtSignal);
  }
}

async function readJournalFile(path: string): Promise<FlashJournal | null> {
  try {
    return parseJournal(await readFile(path, "utf8"));
  } catch {
    return null;
  }
}

/** Starts Klipper when it ran before; never throws, the outcome is reported instead. */
async function restartKlipper(
  printer: PrinterPort,
  service: string,
  wasRunning: boolean,
  opts: GuardOptions,
): Promise<KlipperRestart | null> {
  if (!wasRunning) return null;
  try {
    opts.logger.info(`starting ${service}`);
    opts.onStage?.("start-klipper", `starting ${service}`);
    await printer.startService(service, opts.serviceTimeoutMs);
    return { ok: true };
  } catch (err) {
    const e = toMoonflashError(err, "SERVICE_FAILED");
    opts.logger.error({ err: e }, `could not start ${service} again: ${e.message}`);
    return { ok: false, code: e.code, message: e.message };
  }
}

export interface RecoveryOutcome {
  journal: FlashJournal;
  klipperStarted: boolean;
}

/**
 * At agent start: a journal means a job was killed while Klipper was stopped. Start Klipper (when it ran),
 * record the job as INTERRUPTED, remove the journal. A journal whose process is still alive belongs to a job
 * running right now (e.g. a CLI flash) and is left alone. Throws when Klipper cannot be started, keeping the
 * journal so the next attempt tries again.
 */
export async function recoverInterruptedJob(
  dataDir: string,
  printer: PrinterPort,
  runner: Pick<JobRunner, "interrupted">,
  logger: Logger,
  opts: { serviceTimeoutMs?: number } = {},
): Promise<RecoveryOutcome | null> {
  const journal = await readJournal(dataDir);
  if (!journal) return null;
  if (journal.pid !== process.pid && processAlive(journal.pid)) {
    logger.info({ journal }, `job ${journal.jobId} is still running in process ${journal.pid}; nothing to recover`);
    return null;
  }
  logger.warn({ journal }, `job ${journal.jobId} on ${journal.target} was interrupted while Klipper was stopped; recovering`);
  if (journal.klipperWasRunning) {
    await printer.startService(journal.klipperService, opts.serviceTimeoutMs ?? 90_000);
    logger.info(`started ${journal.klipperService} again after the interrupted job`);
  }
  await runner.interrupted({
    id: journal.jobId,
    kind: journal.kind,
    target: journal.target,
    startedAt: journal.startedAt,
  });
  await removeDurable(dataPaths(dataDir).journal);
  return { journal, klipperStarted: journal.klipperWasRunning };
}
