// Terminal rendering of job events: a progress bar per phase on a TTY, plain lines otherwise, JSON lines with --json.

import { createRequire } from "node:module";
import type { SingleBar } from "cli-progress";

// Required when a bar is first drawn, so `serve` never loads it.
const cliProgress = (): typeof import("cli-progress") => createRequire(import.meta.url)("cli-progress") as typeof import("cli-progress");
import type { JobEvent } from "../core/events.js";
import { toMoonflashError } from "../core/errors.js";
import { exitCodeFor } from "../app.js";

/** A verb's failure for people (stderr) or scripts (--json on stdout); returns the exit code. */
export function reportFailure(err: unknown, json: boolean): number {
  const e = toMoonflashError(err);
  if (json) process.stdout.write(`${JSON.stringify({ ok: false, code: e.code, message: e.message, details: e.details })}\n`);
  else process.stderr.write(`moonflash: ${e.message} [${e.code}]\n`);
  return exitCodeFor(e);
}

export class ProgressRenderer {
  private bar: SingleBar | null = null;
  private barPhase: string | null = null;
  private lastTenth = -1;
  private readonly tty: boolean;

  constructor(private readonly opts: { json: boolean; out?: NodeJS.WriteStream }) {
    this.tty = !opts.json && (opts.out ?? process.stdout).isTTY === true;
  }

  private write(line: string): void {
    if (this.bar) this.bar.stop();
    this.bar = null;
    this.barPhase = null;
    (this.opts.out ?? process.stdout).write(`${line}\n`);
  }

  readonly onJobEvent = (event: JobEvent): void => {
    if (this.opts.json) {
      (this.opts.out ?? process.stdout).write(`${JSON.stringify(event)}\n`);
      return;
    }
    switch (event.type) {
      case "stage":
        this.write(`» ${event.stage}${event.message ? `: ${event.message}` : ""}`);
        this.lastTenth = -1;
        break;
      case "progress":
        this.progress(event.done, event.total, event.unit, event.phase ?? "progress");
        break;
      case "log":
        if (event.level !== "debug") this.write(`${event.level === "info" ? " " : "!"} ${event.message}`);
        break;
      case "result":
        // A failure is printed once, by the command, on stderr.
        this.stop();
        break;
    }
  };

  private progress(done: number, total: number, unit: string, phase: string): void {
    if (total <= 0) return;
    if (this.tty) {
      if (!this.bar || this.barPhase !== phase) {
        this.stop();
        const { SingleBar, Presets } = cliProgress();
        this.bar = new SingleBar({ format: `  ${phase.padEnd(7)} [{bar}] {percentage}% | {value}/{total} ${unit}`, hideCursor: true }, Presets.shades_classic);
        this.bar.start(total, done);
        this.barPhase = phase;
      } else this.bar.update(done);
      return;
    }
    const tenth = Math.floor((10 * done) / total);
    if (tenth !== this.lastTenth) {
      this.lastTenth = tenth;
      (this.opts.out ?? process.stdout).write(`  ${phase} ${tenth * 10}% (${done}/${total} ${unit})\n`);
    }
  }

  stop(): void {
    this.bar?.stop();
    this.bar = null;
    this.barPhase = null;
  }

  done(result: unknown): void {
    this.stop();
    if (this.opts.json) (this.opts.out ?? process.stdout).write(`${JSON.stringify({ ok: true, result })}\n`);
    else (this.opts.out ?? process.stdout).write(`✓ ${summarize(result)}\n`);
  }
}

function summarize(result: unknown): string {
  const r = result as Record<string, unknown>;
  if (r && typeof r === "object" && "method" in r && "elapsed_ms" in r) {
    return `[${String(r.mcu)}] flashed with ${String(r.method)} in ${(Number(r.elapsed_ms) / 1000).toFixed(1)} s, ${String(r.bytes)} bytes${r.verified ? ", verified" : ""}; Klipper ${r.klipper_restarted ? "restarted" : "not restarted"}`;
  }
  // OTA (src/ota/engine.ts): a download's package summary, an install's outcome, a rollback's outcome.
  if (r && typeof r === "object" && typeof r.updateId === "string") {
    const pkg = `${String(r.name)} ${String(r.version)}`;
    if (typeof r.signed === "boolean" && Array.isArray(r.modules)) {
      return `${pkg} downloaded and verified: ${String(r.size)} bytes, ${r.modules.length} module(s), ${r.signed ? "signature valid" : "not signed"}. Install it with moonflash ota install.`;
    }
    const firmware = Array.isArray(r.firmware) && r.firmware.length > 0 ? `; firmware of ${r.firmware.join(", ")}` : "";
    if (typeof r.probationMs === "number") {
      const files = r.files as { written: number; replaced: number; added: number };
      return `${pkg} installed: ${files.written} file(s), ${files.replaced} replaced, ${files.added} new${firmware ? `${firmware} flashed` : ""}; probation passed in ${(r.probationMs / 1000).toFixed(1)} s. Old files: ${String(r.backup)}`;
    }
    if (typeof r.restored === "number") {
      return `${pkg} rolled back: ${r.restored} file(s) restored, ${String(r.removed)} removed${firmware ? `${firmware} restored` : ""}`;
    }
  }
  return JSON.stringify(result, null, 2);
}
