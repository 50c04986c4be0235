// Progress adapters: they subscribe to job events and translate them for people. Engines know none of them.
// - Moonraker agent events (connection.send_event → notify_agent_event), throttled to 5 per second per job.
// - Klipper console lines (RESPOND), the one channel Mainsail and Fluidd show. RESPOND needs Klipper connected;
//   while it is stopped for flashing, warnings and the result wait in a small backlog and appear once it is back.

import type { Logger } from "pino";
import type { JobEvent } from "../core/events.js";
import type { PrinterPort } from "../core/printer.js";
import { throttleProgress } from "../core/jobs.js";

export function agentEventAdapter(printer: PrinterPort, logger: Logger): (event: JobEvent) => void {
  return throttleProgress(
    (event: JobEvent) => {
      if (!printer.state().moonrakerConnected) return;
      printer.sendEvent(`${event.kind}.${event.type}`, event).catch((err: unknown) => {
        logger.debug({ err }, "send_event failed");
      });
    },
    { maxPerSecond: 5 },
  );
}

/**
 * RESPOND's MSG is one double-quoted G-code parameter: no newlines, no double quotes, and no ';', which starts a
 * comment in Klipper's G-code parser (gcode.py) and would cut the message short.
 */
export function respondScript(message: string, type: "command" | "error" | "echo" = "command"): string {
  const clean = message.replace(/[\r\n]+/g, " ").replace(/"/g, "'").replace(/;/g, ",");
  return `RESPOND TYPE=${type} MSG="${clean}"`;
}

const BACKLOG_LIMIT = 20;

export class ConsoleReporter {
  private queue: Promise<void> = Promise.resolve();
  private backlog: Array<{ message: string; type: "command" | "error" }> = [];
  private lastQuarter = new Map<string, number>();
  private readonly unsubscribe: () => void;

  constructor(
    private readonly printer: PrinterPort,
    private readonly logger: Logger,
  ) {
    this.unsubscribe = printer.onStateChange((state) => {
      if (state.klippyConnected && state.klippyState !== "disconnected" && this.backlog.length) this.flush();
    });
  }

  close(): void {
    this.unsubscribe();
  }

  /** Job events → console lines: stages, progress at each quarter, warnings, errors and the result. */
  readonly onJobEvent = (event: JobEvent): void => {
    const who = `moonflash ${event.kind} [${event.target}]`;
    switch (event.type) {
      case "stage":
        if (event.stage === "started") {
          // Said once, while the console still works: during a flash Klipper (and so RESPOND) is down.
          const note = event.kind === "flash" ? " Klipper stops while the board is flashed. The result appears here when it is back." : "";
          this.say(`${who}: started.${note}`, "command", false);
        } else if (event.message) this.say(`${who}: ${event.message}`, "command", false);
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
        if (event.level === "warn" || event.level === "error") this.say(`${who}: ${event.message}`, event.level === "error" ? "error" : "command", true);
        break;
      case "result":
        for (const key of this.lastQuarter.keys()) if (key.startsWith(`${event.jobId}:`)) this.lastQuarter.delete(key);
        this.say(event.ok ? `${who}: done` : `${who}: failed [${event.code}] ${event.message ?? ""}`, event.ok ? "command" : "error", true);
        break;
    }
  };

  /** Prints now when Klipper is connected; otherwise keeps lines that matter for later. */
  say(message: string, type: "command" | "error" = "command", keepWhileDown = true): void {
    const state = this.printer.state();
    if (!state.klippyConnected || state.klippyState === "disconnected") {
      if (keepWhileDown) {
        this.backlog.push({ message, type });
        if (this.backlog.length > BACKLOG_LIMIT) this.backlog.shift();
      }
      return;
    }
    this.send(message, type);
  }

  private flush(): void {
    const lines = this.backlog;
    this.backlog = [];
    for (const line of lines) this.send(line.message, line.type);
  }

  private send(message: string, type: "command" | "error"): void {
    // One at a time, so lines keep their order in the console.
    this.queue = this.queue.then(() =>
      this.printer.gcode(respondScript(message, type)).catch((err: unknown) => {
        this.logger.debug({ err, message }, "console line not delivered");
      }),
    );
  }
}
