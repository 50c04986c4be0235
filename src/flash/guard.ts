// The Klipper guard: flashing needs the serial port, so Klipper is stopped for the work and started again in
// every outcome. A durable journal written BEFORE the stop lets the next agent start undo a crash mid-flash
// (the agent killed while Klipper is down would otherwise leave the printer dead until someone notices).

import { readFile } from "node:fs/promises";
import type { Logger } from "pino";
import type { JobKind } from "../core/events.js";
import type { JobRunner } from "../core/jobs.js";
import { dataPaths } from "../core/paths.js";
import type { PrinterPort, PrinterState } from "../core/printer.js";
import { writeFileDurable, removeDurable } from "../core/durable.js";
import { MoonflashError, toMoonflashError, type ErrorCode } from "../core/errors.js";
import { clearStaleJobLock, isProcessAlive } from "../core/lock.js";

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
  /**
   * The job itself has ended (its result is recorded), but Klipper could not be confirmed started: only the start
   * is left to do, and recovery must not record the job a second time.
   */
  restartPending?: boolean;
}

export type KlipperRestart = { ok: true } | { ok: false; code: ErrorCode; message: string; pending: true };

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

/**
 * Runs `work` with Klipper stopped. Order: printing check, durable journal, stop (waits for inactive), work,
 * then always: bring Klipper back if it ran before (across Moonraker restarts, see bringKlipperBack). The journal
 * goes only once Klipper is confirmed started; otherwise it stays, marked restartPending, and the agent's recovery
 * keeps starting Klipper. SIGINT/SIGTERM during the guard abort `work`'s signal and are re-raised once Klipper is
 * back, so Ctrl-C never leaves the printer down.
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
        try {
          await printer.stopService(klipperService, opts.serviceTimeoutMs);
        } catch (err) {
          const e = toMoonflashError(err, "SERVICE_FAILED");
          throw new MoonflashError(e.code, `Stopping Klipper did not complete, so nothing was written to the board: ${e.message}`, e.details, { cause: e });
        }
      }
      // A signal that came while Klipper was stopping: do not start the work at all.
      if (shutdown.signal.aborted) throw shutdown.signal.reason;
      value = await work(shutdown.signal);
    } catch (err) {
      const error = toMoonflashError(err);
      klipperRestart = await restartKlipper(printer, klipperService, klipperWasRunning, opts);
      if (klipperRestart) error.details.klipperRestart = klipperRestart;
      if (klipperRestart && !klipperRestart.ok) {
        throw new MoonflashError(error.code, `${error.message} ${stillStoppedNote(klipperService)}`, error.details, { cause: error });
      }
      throw error;
    }
    klipperRestart = await restartKlipper(printer, klipperService, klipperWasRunning, opts);
    if (klipperRestart && !klipperRestart.ok) {
      throw new MoonflashError(
        klipperRestart.code,
        `The ${opts.kind} job finished, but moonflash could not confirm that Klipper runs: ${klipperRestart.message} ${stillStoppedNote(klipperService)}`,
        { klipperRestart, result: value },
      );
    }
    return { value, klipperWasRunning, klipperRestart };
  } finally {
    await settleJournal(journalPath, journal, klipperRestart, logger);
    for (const [signal, handler] of handlers) process.removeListener(signal, handler);
    // Re-raise only when nobody else listens: then the default action (exit by that signal) is what the user asked for.
    if (caughtSignal && process.listenerCount(caughtSignal) === 0) process.kill(process.pid, caughtSignal);
  }
}

function stillStoppedNote(service: string): string {
  return (
    `moonflash keeps checking, starts ${service} if it is stopped and says so here once it runs; ` +
    `you can also start it from the web UI (Machine → Services → ${service}) or with \`sudo systemctl start ${service}\`.`
  );
}

/** The journal goes once Klipper runs (or never had to); otherwise only the start is left to recover. */
async function settleJournal(path: string, journal: FlashJournal, restart: KlipperRestart | null, logger: Logger): Promise<void> {
  try {
    if (restart === null || restart.ok) await removeDurable(path);
    else await writeFileDurable(path, `${JSON.stringify({ ...journal, restartPending: true }, null, 2)}\n`);
  } catch (err) {
    logger.error({ err }, `could not update the journal ${path}`);
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
  opts.logger.info(`starting ${service}`);
  opts.onStage?.("start-klipper", `starting ${service}`);
  const outcome = await bringKlipperBack(printer, service, { timeoutMs: opts.serviceTimeoutMs, logger: opts.logger });
  if (!outcome.ok) opts.logger.error({ outcome }, `could not start ${service} again yet: ${outcome.message}`);
  return outcome;
}

/** Fresh waits granted when Moonraker comes back, so a flapping Moonraker cannot hold a job forever. */
const MAX_FRESH_WAITS = 3;
/** Pause before asking again after Moonraker refused the start, or a request failed while still connected. */
const RETRY_PAUSE_MS = 1000;

const serviceActive = (state: PrinterState, service: string): boolean => state.services[service]?.active_state === "active";
/** systemd says "activating"; Moonraker's supervisord provider reports a starting program as inactive/starting. */
const serviceStarting = (state: PrinterState, service: string): boolean => {
  const unit = state.services[service];
  return unit?.active_state === "activating" || unit?.sub_state === "starting";
};
/** Klippy left "startup": ready, or error/shutdown (e.g. another MCU still outdated), which Klipper itself shows. */
const klippyUp = (state: PrinterState): boolean =>
  state.moonrakerConnected && state.klippyConnected && state.klippyState !== "startup" && state.klippyState !== "disconnected";

/** Resolves true once `pred` holds for the printer's state, false after `timeoutMs`. */
export function waitForPrinter(printer: PrinterPort, pred: (state: PrinterState) => boolean, timeoutMs: number): Promise<boolean> {
  if (pred(printer.state())) return Promise.resolve(true);
  if (timeoutMs <= 0) return Promise.resolve(false);
  return new Promise((resolve) => {
    const finish = (value: boolean): void => {
      clearTimeout(timer);
      off();
      resolve(value);
    };
    const timer = setTimeout(() => finish(false), timeoutMs);
    const off = printer.onStateChange((state) => {
      if (pred(state)) finish(true);
    });
  });
}

const pause = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, Math.max(0, ms)));

/**
 * Gets Klipper's service running again, whatever Moonraker does meanwhile. Without a connection it waits for the
 * reconnect; after every (re)connect it judges by the service state Moonraker reports (a start that went through
 * while the connection dropped counts as started); only a stopped service is started. Success is the service
 * active; Klippy leaving "startup" is then awaited within the same time, so the console works again. Each return
 * of Moonraker grants a fresh `timeoutMs` (at most MAX_FRESH_WAITS times). Never throws.
 */
export async function bringKlipperBack(
  printer: PrinterPort,
  service: string,
  opts: { timeoutMs: number; logger: Logger },
): Promise<KlipperRestart> {
  const { timeoutMs, logger } = opts;
  let deadline = Date.now() + timeoutMs;
  let freshWaits = 0;
  let last: MoonflashError | null = null;
  for (;;) {
    const remaining = deadline - Date.now();
    if (remaining <= 0) break;
    if (!printer.state().moonrakerConnected) {
      logger.warn(`Moonraker is not connected; waiting for it to start ${service}`);
      if (!(await waitForPrinter(printer, (s) => s.moonrakerConnected, remaining))) {
        last = new MoonflashError(
          "MOONRAKER_UNAVAILABLE",
          `Moonraker was not reachable for ${Math.round(timeoutMs / 1000)} s, so ${service} could not be started.`,
          { service },
        );
        break;
      }
      if (freshWaits++ < MAX_FRESH_WAITS) deadline = Date.now() + timeoutMs;
      continue;
    }
    if (serviceStarting(printer.state(), service)) {
      // A start already under way (ours, sent before the connection dropped): wait for it instead of starting twice.
      await waitForPrinter(printer, (s) => !s.moonrakerConnected || !serviceStarting(s, service), deadline - Date.now());
      continue;
    }
    if (serviceActive(printer.state(), service)) {
      if (!(await waitForPrinter(printer, klippyUp, deadline - Date.now()))) {
        logger.warn(`${service} runs but Klipper has not reported ready or an error yet`);
      }
      return { ok: true };
    }
    try {
      await printer.startService(service, remaining);
      return { ok: true };
    } catch (err) {
      last = toMoonflashError(err, "SERVICE_FAILED");
      logger.warn({ code: last.code }, `starting ${service} did not complete: ${last.message}`);
      if (last.code === "SERVICE_TIMEOUT") break;
      // MOONRAKER_UNAVAILABLE: the connection dropped mid-request; the loop waits for it and asks the real state.
      if (printer.state().moonrakerConnected) await pause(Math.min(RETRY_PAUSE_MS, deadline - Date.now()));
    }
  }
  const reason = last ?? new MoonflashError("SERVICE_TIMEOUT", `${service} did not start within ${Math.round(timeoutMs / 1000)} s.`);
  return { ok: false, code: reason.code, message: reason.message, pending: true };
}

export interface RecoveryOutcome {
  journal: FlashJournal;
  klipperStarted: boolean;
}

/**
 * Finishes what a journal promises: Klipper started again. Two cases:
 * - the job's process died with Klipper stopped (SIGKILL, power): start Klipper, clear the dead process's job
 *   lock, record the job as INTERRUPTED (its result event tells the console);
 * - the job ended but could not start Klipper (restartPending): start it and say so (a notice event).
 * A journal whose process is still alive belongs to a job running right now (e.g. a CLI flash) and is left alone.
 * Throws when Klipper cannot be started yet, keeping the journal so the next attempt tries again.
 */
export async function recoverInterruptedJob(
  dataDir: string,
  printer: PrinterPort,
  runner: Pick<JobRunner, "interrupted" | "notice">,
  logger: Logger,
  opts: { serviceTimeoutMs?: number } = {},
): Promise<RecoveryOutcome | null> {
  const journal = await readJournal(dataDir);
  if (!journal) return null;
  const paths = dataPaths(dataDir);
  if (journal.pid !== process.pid && isProcessAlive(journal.pid) && !journal.restartPending) {
    logger.info({ journal }, `job ${journal.jobId} is still running in process ${journal.pid}; nothing to recover`);
    return null;
  }
  logger.warn({ journal }, journal.restartPending
    ? `Klipper is still to be started after job ${journal.jobId}; starting it`
    : `job ${journal.jobId} on ${journal.target} was interrupted while Klipper was stopped; recovering`);
  if (journal.klipperWasRunning) {
    const restart = await bringKlipperBack(printer, journal.klipperService, { timeoutMs: opts.serviceTimeoutMs ?? 90_000, logger });
    if (!restart.ok) throw new MoonflashError(restart.code, restart.message, { journal });
    logger.info(`started ${journal.klipperService} again after job ${journal.jobId}`);
  }
  const stale = await clearStaleJobLock(paths.lock);
  if (stale) logger.info({ lock: stale }, `removed the job lock of the dead process ${stale.pid}`);
  const ref = { id: journal.jobId, kind: journal.kind, target: journal.target, startedAt: journal.startedAt };
  if (journal.restartPending) {
    runner.notice(ref, `Klipper is running again (moonflash could not confirm it when this ${journal.kind} job ended).`);
  } else {
    const started = journal.klipperWasRunning ? " Klipper was started again." : "";
    await runner.interrupted({
      ...ref,
      message: `moonflash stopped while this ${journal.kind} job ran (started ${journal.startedAt}).${started} ` +
        "The board may hold a partial image and wait in its bootloader: run the same flash again.",
    });
  }
  await removeDurable(paths.journal);
  return { journal, klipperStarted: journal.klipperWasRunning };
}
