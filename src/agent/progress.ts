// Progress adapters: they subscribe to job events and translate them for people. Engines know none of them.
// - Moonraker agent events (connection.send_event → notify_agent_event), at the runner's progress rate
//   (5 per second per job; the runner throttles once for every adapter).
// - Klipper console lines (RESPOND), the one channel Mainsail and Fluidd show. RESPOND needs Klipper up; lines
//   that matter (warnings, results, notices) wait in an ordered queue while it is stopped or Moonraker restarts,
//   and a line whose send fails is sent again, so the outcome of a job always reaches the console.

import type { Logger } from "pino";
import type { JobEvent, JobKind } from "../core/events.js";
import type { PrinterPort, PrinterState } from "../core/printer.js";
import { mcuUserName } from "../flash/mcu-name.js";
import { UPDATE_ALL_TARGET, type UpdateAllResult } from "../flash/update-all.js";

export function agentEventAdapter(printer: PrinterPort, logger: Logger): (event: JobEvent) => void {
  return (event) => {
    if (!printer.state().moonrakerConnected) return;
    printer.sendEvent(`${event.kind}.${event.type}`, event).catch((err: unknown) => {
      logger.debug({ err }, "send_event failed");
    });
  };
}

/**
 * RESPOND's MSG is one double-quoted G-code parameter: no newlines, no double quotes, and no ';', which starts a
 * comment in Klipper's G-code parser (gcode.py) and would cut the message short.
 */
export function respondScript(message: string, type: "command" | "error" | "echo" = "command"): string {
  const clean = message.replace(/[\r\n]+/g, " ").replace(/"/g, "'").replace(/;/g, ",");
  return `RESPOND TYPE=${type} MSG="${clean}"`;
}

/** Lines kept while the console is unreachable; past it the oldest go, and the console is told how many. */
const QUEUE_LIMIT = 50;
const RETRY_MIN_MS = 500;
const RETRY_MAX_MS = 10_000;

type LineType = "command" | "error";

/** One printer.gcode.script: `message` is what the log calls it when it cannot be delivered. */
interface ConsoleScript {
  script: string;
  message: string;
}

/** A dialog Mainsail and Fluidd open from `// action:prompt_*` console lines (Klipper docs/G-Codes.md, RESPOND). */
export interface PromptDialog {
  title: string;
  text: string[];
  /** Footer buttons: a click sends `gcode` to Klipper. Colours: primary, secondary, info, warning, error. */
  buttons: Array<{ label: string; gcode: string; color: "primary" | "secondary" | "info" | "warning" | "error" }>;
}

/** The G-code a button sends to close the dialog without doing anything else. */
export const PROMPT_END = "RESPOND TYPE=command MSG=action:prompt_end";

/**
 * The whole dialog as ONE script of RESPOND lines, so it opens complete (no half-drawn dialog if Klipper goes away
 * between lines) and Moonraker stores it as one command. A button is `label|gcode|color`: neither may hold '|'.
 */
export function promptScript(d: PromptDialog): string {
  const field = (s: string): string => s.replace(/\|/g, "/");
  return [
    respondScript(`action:prompt_begin ${d.title}`),
    ...d.text.map((t) => respondScript(`action:prompt_text ${t}`)),
    ...d.buttons.map((b) => respondScript(`action:prompt_footer_button ${field(b.label)}|${field(b.gcode)}|${b.color}`)),
    respondScript("action:prompt_show"),
  ].join("\n");
}

/**
 * RESPOND works once Klippy has left "startup" (ready, or error/shutdown: respond.py registers RESPOND for a
 * printer that is not ready). While Klipper starts, Moonraker has not registered the printer endpoints yet and
 * refuses printer.gcode.script.
 */
export function consoleReachable(state: PrinterState): boolean {
  return state.moonrakerConnected && state.klippyConnected && ["ready", "error", "shutdown"].includes(state.klippyState);
}

/**
 * Who a console line is about: "moonflash: flash toolhead" for the flash of [mcu toolhead] (as FLASH_MCU MCU=toolhead
 * names it), "moonflash: OTA acme-k1 1.4.0" or "moonflash: OTA download https://…/k1.zip" for an OTA job.
 */
function jobWho(kind: JobKind, target: string): string {
  if (kind === "flash") return `moonflash: flash ${mcuUserName(target)}`;
  // A recovery's target names the update's id ("recovery ota-2026…"): the console reader needs no id.
  return `moonflash: OTA ${target.startsWith("recovery ") ? "recovery" : target}`;
}

/** The console line a job's result becomes: what happened, in the words of someone at the printer. */
export function resultLine(event: Extract<JobEvent, { type: "result" }>): { message: string; type: LineType } {
  const who = jobWho(event.kind, event.target);
  if (!event.ok) return { message: `${who} failed [${event.code ?? "INTERNAL"}] ${event.message ?? ""}`.trim(), type: "error" };
  const d = (event.details ?? {}) as Record<string, unknown>;
  if (event.kind === "ota") return { message: otaLine(who, d), type: "command" };
  if (event.kind === "flash" && Array.isArray(d.plan) && Array.isArray(d.mcus)) return { message: updateLine(d as unknown as UpdateAllResult), type: "command" };
  if (event.kind === "flash" && d.dry_run === true) {
    const plan = (d.plan ?? {}) as Record<string, unknown>;
    const methods = Array.isArray(d.methods) ? d.methods.join(" then ") : "";
    return {
      message: `${who}: dry run, nothing was stopped or written. It would flash ${String(d.firmware)} (${String(plan.firmware_bytes)} bytes) to ${String(d.device)} with ${methods}.`,
      type: "command",
    };
  }
  if (event.kind === "flash" && typeof d.image === "string" && typeof d.version === "string") {
    const kept = d.skipped === true ? ", unchanged since the last build" : "";
    return { message: `${who}: firmware built, ${d.version} (${String(d.bytes)} bytes${kept}).`, type: "command" };
  }
  if (event.kind === "flash" && typeof d.method === "string") {
    const seconds = typeof d.elapsed_ms === "number" ? ` in ${(d.elapsed_ms / 1000).toFixed(1)} s` : "";
    const verified = d.verified === true ? ", verified" : "";
    const klipper = d.klipper_restarted === true ? " Klipper is running again." : "";
    return { message: `${who}: flashed with ${d.method}${seconds} (${String(d.bytes)} bytes${verified}).${klipper}`, type: "command" };
  }
  return { message: `${who}: done`, type: "command" };
}

const plural = (n: number, one: string, many = `${one}s`): string => `${n} ${n === 1 ? one : many}`;

/** An OTA job's outcome: a download (PackageSummary), an install, a rollback or a recovery (src/ota/engine.ts). */
function otaLine(who: string, d: Record<string, unknown>): string {
  const pkg = `${String(d.name ?? "the update")}${typeof d.version === "string" && d.version !== "" ? ` ${d.version}` : ""}`;
  const firmware = Array.isArray(d.firmware) && d.firmware.length > 0 ? d.firmware.join(", ") : null;
  if (typeof d.signed === "boolean" && Array.isArray(d.modules)) {
    return `${who}: ${pkg} downloaded and verified (${String(d.size)} bytes, ${plural(d.modules.length, "module")}, ${d.signed ? "signature valid" : "not signed"}). Install it with OTA_INSTALL.`;
  }
  if (typeof d.probationMs === "number" && typeof d.files === "object" && d.files !== null) {
    const f = d.files as { written: number; replaced: number; added: number };
    const services = Array.isArray(d.services) && d.services.length > 0 ? d.services.join(", ") : null;
    return (
      `${who}: installed: ${plural(f.written, "file")} (${f.replaced} replaced, ${f.added} new)${firmware ? `, firmware of ${firmware} flashed` : ""}. ` +
      `Probation passed (Klipper ready${services ? `, ${services} running` : ""}). OTA_ROLLBACK restores the previous version.`
    );
  }
  if (typeof d.restored === "number" && typeof d.removed === "number") {
    const reason = d.reason as { code?: string } | null;
    return (
      `${who}: ${pkg} rolled back${reason?.code ? ` after [${reason.code}]` : ""}: ${plural(d.restored, "file")} restored, ${d.removed} removed` +
      `${firmware ? `, firmware of ${firmware} restored` : ""}. The previous version is in place.`
    );
  }
  if (typeof d.action === "string") {
    const error = d.error as { code: string; message: string } | null;
    const why = error ? ` [${error.code}] ${error.message}` : "";
    switch (d.action) {
      case "rolled-back":
        return `${who}: the update that was interrupted was rolled back. The previous version is in place.${why}`;
      case "committed":
        return `${who}: the update had passed its probation before moonflash stopped, so it stays installed.`;
      case "resumed-download":
      case "verified":
        return `${who}: the interrupted download was taken up again: ${String(d.state).replace("_", " ")}.${why}`;
      case "gave-up":
        return `${who}: moonflash gave up on the interrupted update.${why}`;
      default:
        return `${who}: leftovers of an earlier update were cleaned up.${why}`;
    }
  }
  return `${who}: done`;
}

/** What backup_before_flash adds to the plan of one MCU. */
function backupNote(p: UpdateAllResult["plan"][number]): string {
  if (!p.backup.read_back) return "";
  const seconds = p.backup.estimated_ms === undefined ? "" : ` ≈ ${(p.backup.estimated_ms / 1000).toFixed(1)} s more downtime`;
  return `, its current firmware read back first${seconds}`;
}

/**
 * UPDATE_MCUS DRY_RUN=1's plan as a dialog: the boards in flash order, and Start, which sends UPDATE_MCUS for exactly
 * those boards (FORCE=1 when the plan forced any), or Cancel. Null when there is nothing to update.
 */
export function updatePlanDialog(r: UpdateAllResult): PromptDialog | null {
  if (!r.dry_run || r.plan.length === 0) return null;
  const to = r.host_version ?? "Klipper's version";
  const why = { outdated: "outdated", requested: "asked for", forced: "forced" } as const;
  const forced = r.plan.some((p) => p.why === "forced");
  return {
    // Short: Mainsail cuts a long title in its dialog's header.
    title: `moonflash: update ${plural(r.plan.length, "MCU")}`,
    text: [
      `To ${to}: the firmware is built first, while Klipper runs. Then Klipper stops once and the boards are flashed in this order:`,
      ...r.plan.map((p, i) => `${i + 1}. ${p.name}: ${why[p.why]}${p.version_before ? `, now ${p.version_before}` : ""}, ${p.transport}${backupNote(p)}`),
      "Then Klipper starts again and each board's version is checked. Nothing happens until you press Start.",
    ],
    buttons: [
      { label: "Start", gcode: `UPDATE_MCUS MCU=${r.plan.map((p) => p.name).join(",")}${forced ? " FORCE=1" : ""}`, color: "primary" },
      { label: "Cancel", gcode: PROMPT_END, color: "error" },
    ],
  };
}

/** An update-all's outcome (or, for a dry run, its plan) in one line. */
function updateLine(r: UpdateAllResult): string {
  const to = r.host_version ?? "Klipper's version";
  if (r.plan.length === 0) return `moonflash: every MCU runs ${to}: nothing to update.`;
  if (r.dry_run) {
    const order = r.plan.map((p) => `${p.name} (${p.why}${p.version_before ? `, now ${p.version_before}` : ""}, ${p.transport}${backupNote(p)})`).join(", then ");
    return `moonflash: update plan to ${to}: build all while Klipper runs, stop Klipper once, flash ${order}, start Klipper. Dry run: nothing was built, stopped or written.`;
  }
  const names = r.mcus.map((m) => m.name).join(", ");
  const down = r.downtime_ms === null ? "" : ` Klipper was down ${(r.downtime_ms / 1000).toFixed(1)} s.`;
  return `moonflash: updated ${names} to ${to}.${down} Klipper is ${r.klipper_state}.`;
}

export class ConsoleReporter {
  private readonly queue: ConsoleScript[] = [];
  /** A dialog of ours may be open (sent, and not yet closed by us). */
  private dialogOpen = false;
  private dropped = 0;
  private sending = false;
  private closed = false;
  private retryTimer: NodeJS.Timeout | null = null;
  private retryDelayMs = RETRY_MIN_MS;
  private reachable: boolean;
  private lastQuarter = new Map<string, number>();
  private readonly unsubscribe: () => void;

  constructor(
    private readonly printer: PrinterPort,
    private readonly logger: Logger,
    /** Where people can watch a job while Klipper is stopped (the status page); null when there is none. */
    private readonly watchUrl: () => string | null = () => null,
  ) {
    this.reachable = consoleReachable(printer.state());
    this.unsubscribe = printer.onStateChange((state) => {
      const reachable = consoleReachable(state);
      // The console came back (Klipper ready, Moonraker reconnected): a pending retry need not wait its pause.
      if (reachable && !this.reachable && this.retryTimer) {
        clearTimeout(this.retryTimer);
        this.retryTimer = null;
        this.retryDelayMs = RETRY_MIN_MS;
      }
      this.reachable = reachable;
      this.pump();
    });
  }

  close(): void {
    this.closed = true;
    this.unsubscribe();
    if (this.retryTimer) clearTimeout(this.retryTimer);
    this.retryTimer = null;
  }

  /** Lines still waiting for the console (tests and status). */
  get pending(): number {
    return this.queue.length;
  }

  /** Job events → console lines: the stop of Klipper, progress at each quarter, warnings, results and notices. */
  readonly onJobEvent = (event: JobEvent): void => {
    const who = jobWho(event.kind, event.target);
    switch (event.type) {
      case "stage":
        // "plan" is the pre-flight of a flash (a build or an update has stages of its own).
        if (event.stage === "plan") this.say(`${who}: checking the board and the firmware`, "command", false);
        else if (event.kind === "ota" && event.stage === "backup") {
          // The last step before an install stops anything; said while the console still works.
          // (The backup's directory is in the job's log and ota.install's result; the console gets no paths or ids.)
          this.say(`${who}: backing up the files it replaces. Then the services the update names stop while the new files go in, and the result appears here when Klipper is back.${this.watchHint()}`);
        } else if (event.stage === "stop-klipper") {
          // Pre-flight has passed and Klipper is about to stop; said while the console still works.
          const boards = event.target === UPDATE_ALL_TARGET ? "the boards" : "the board";
          this.say(`${who}: stopping Klipper to flash ${boards}. The result appears here when Klipper is back.${this.watchHint()}`);
        } else if (event.message && event.stage !== "start-klipper") this.say(`${who}: ${event.message}`, "command", false);
        break;
      case "progress": {
        if (event.total <= 0) break;
        const quarter = Math.floor((4 * event.done) / event.total);
        const key = `${event.jobId}:${event.phase ?? ""}`;
        if (this.lastQuarter.get(key) === quarter) break;
        this.lastQuarter.set(key, quarter);
        this.say(`${who}: ${event.phase ?? "progress"} ${quarter * 25}%`, "command", false);
        break;
      }
      case "log":
        if (event.level === "warn" || event.level === "error") this.say(`${who}: ${event.message}`, event.level === "error" ? "error" : "command");
        break;
      case "result": {
        for (const key of this.lastQuarter.keys()) if (key.startsWith(`${event.jobId}:`)) this.lastQuarter.delete(key);
        const line = resultLine(event);
        this.say(line.message, line.type);
        break;
      }
      case "notice":
        this.say(`${who}: ${event.message}`);
        break;
    }
  };

  /**
   * Queues a line for the console. `keep` false marks a line that only means something now (a progress step):
   * it is shown if the console is reachable and otherwise skipped (logged), never queued for later.
   */
  say(message: string, type: LineType = "command", keep = true): void {
    if (this.closed) return;
    if (!keep && !consoleReachable(this.printer.state())) {
      this.logger.debug({ message }, "console unreachable; progress line skipped");
      return;
    }
    this.enqueue({ script: respondScript(message, type), message });
  }

  /**
   * Opens a dialog in Mainsail and Fluidd. Only while the console is reachable: a dialog that waited for Klipper
   * would ask about a moment that has passed.
   */
  dialog(d: PromptDialog): void {
    if (this.closed) return;
    if (!consoleReachable(this.printer.state())) {
      this.logger.info({ title: d.title }, "console unreachable; dialog not shown");
      return;
    }
    this.dialogOpen = true;
    this.enqueue({ script: promptScript(d), message: `dialog: ${d.title}` });
  }

  /** Closes the dialog this reporter opened, if it may still be open (a button of it was pressed). */
  closeDialog(): void {
    if (this.closed || !this.dialogOpen) return;
    this.dialogOpen = false;
    // Quoted, unlike a button's PROMPT_END: the console filter knows moonflash's stored commands by MSG="….
    if (consoleReachable(this.printer.state())) this.enqueue({ script: respondScript("action:prompt_end"), message: "dialog closed" });
  }

  /** " Watch it live at …" for the line said before Klipper stops, when there is a status page. */
  private watchHint(): string {
    const url = this.watchUrl();
    return url ? ` Watch it live at ${url} (also on the Webcam page as 'moonflash').` : "";
  }

  private enqueue(line: ConsoleScript): void {
    this.queue.push(line);
    if (this.queue.length > QUEUE_LIMIT) {
      const [lost] = this.queue.splice(0, 1);
      this.dropped++;
      this.logger.warn({ message: lost?.message }, "console queue full; the oldest line is not shown");
    }
    this.pump();
  }

  /** Sends the head of the queue when the console is reachable; one at a time, so lines keep their order. */
  private pump(): void {
    if (this.closed || this.sending || this.retryTimer || this.queue.length === 0) return;
    if (!consoleReachable(this.printer.state())) return;
    if (this.dropped > 0) {
      const message = `moonflash: ${this.dropped} earlier console line(s) could not be shown. See moonflash.log`;
      this.queue.unshift({ script: respondScript(message), message });
      this.dropped = 0;
    }
    const line = this.queue[0]!;
    this.sending = true;
    this.printer.gcode(line.script).then(
      () => {
        if (this.queue[0] === line) this.queue.shift();
        this.retryDelayMs = RETRY_MIN_MS;
      },
      (err: unknown) => {
        // Kept at the head and sent again: Moonraker restarting or Klipper still starting refuses it for a while.
        this.logger.debug({ err, message: line.message }, `console line not delivered; retrying in ${this.retryDelayMs} ms`);
        if (this.closed) return;
        this.retryTimer = setTimeout(() => {
          this.retryTimer = null;
          this.pump();
        }, this.retryDelayMs);
        this.retryDelayMs = Math.min(this.retryDelayMs * 2, RETRY_MAX_MS);
      },
    ).finally(() => {
      this.sending = false;
      this.pump();
    });
  }
}
