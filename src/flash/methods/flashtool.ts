// Flashing through Katapult's own scripts/flashtool.py (serial or CAN). Its stdout is parsed as a byte stream
// because the progress bars are written one `#` at a time without newlines (Katapult scripts/flashtool.py); success needs
// exit 0 AND "Programming Complete", since flashtool exits 0 when the board never reached Katapult (§2.1).

import { constants as fsConstants } from "node:fs";
import { access } from "node:fs/promises";
import path from "node:path";
import type { Logger } from "pino";
import { MoonflashError, type ErrorCode } from "../../core/errors.js";
import type { JobContext } from "../../core/events.js";
import { resolveDevicePath } from "../discovery.js";
import type { FlashJobTarget, FlashOutcome, FlashTarget, Flasher } from "../types.js";
import { findExecutable, runTool, toolErrorDetails } from "../../core/tool.js";

export interface FlashtoolFlasherOptions {
  /** Python interpreter that has pyserial (e.g. /usr/bin/python3); a name is looked up on PATH. */
  python: string;
  /** Katapult checkout; the tool is <katapultPath>/scripts/flashtool.py. */
  katapultPath: string;
  logger?: Logger;
}

/** flashtool prints one `#` per 2 % between `[` and `]`. */
const BAR_HASHES = 50;

/** Known FlashError texts (Katapult scripts/flashtool.py) → the code a caller can act on; first match wins. */
const FLASH_ERROR_CODES: Array<[RegExp, ErrorCode]> = [
  [/Checksum mismatch/i, "VERIFY_FAILED"],
  [/ in use/i, "DEVICE_IN_USE"],
  [/Error sending command \[CONNECT\]/i, "DEVICE_TIMEOUT"],
  [/No Serial Device found|Unable to bind socket|Unable to find node/i, "DEVICE_NOT_FOUND"],
  [/does not match MCU/i, "MCU_MISMATCH"],
  [/UUID mismatch/i, "MCU_MISMATCH"],
  [/pyserial python package was not found/i, "TOOL_NOT_FOUND"],
];

const FLASH_ERROR_HINTS: Partial<Record<ErrorCode, string>> = {
  VERIFY_FAILED: "The written image does not read back the same; flash again, and if it repeats check the board's power and cable.",
  DEVICE_IN_USE: "Stop Klipper (or whatever holds the port) and try again.",
  DEVICE_TIMEOUT: "The board did not answer in Katapult: check that it is in the bootloader, and the baud rate or CAN interface.",
  DEVICE_NOT_FOUND: "Check the serial path or CAN UUID in the MCU's config and that the board is connected.",
  MCU_MISMATCH: "The image was built for another board; rebuild it for this MCU.",
  TOOL_NOT_FOUND: "Install pyserial for this Python (sudo apt install python3-serial) or set `python` in moonflash.conf.",
};

/** Incremental reader of flashtool's stdout: text lines plus the `[###…]` progress bars in between. */
class FlashtoolOutputParser {
  private line = "";
  private inBar = false;
  private hashes = 0;
  private bars = 0;
  private verifying = false;

  constructor(
    private readonly onLine: (line: string) => void,
    private readonly onBarProgress: (phase: "write" | "verify", percent: number) => void,
  ) {}

  push(chunk: string): void {
    for (const char of chunk) {
      if (this.inBar) {
        if (char === "#") {
          this.hashes = Math.min(this.hashes + 1, BAR_HASHES);
          this.onBarProgress(this.phase(), (this.hashes * 100) / BAR_HASHES);
        } else if (char === "]") {
          // Small images print fewer than 50 hashes; the closing bracket still means done.
          if (this.hashes < BAR_HASHES) this.onBarProgress(this.phase(), 100);
          this.inBar = false;
          this.bars += 1;
        }
        continue;
      }
      if (char === "[" && this.line.length === 0) {
        this.inBar = true;
        this.hashes = 0;
        continue;
      }
      if (char === "\n") {
        this.finishLine();
        continue;
      }
      this.line += char;
    }
  }

  end(): void {
    if (this.line.length > 0) this.finishLine();
  }

  private phase(): "write" | "verify" {
    return this.verifying || this.bars >= 1 ? "verify" : "write";
  }

  private finishLine(): void {
    // The software version line carries NUL padding from the CONNECT reply (Katapult src/flashcmd.c command_connect).
    const text = this.line.replace(/\r$/, "").replace(/\0/g, "");
    this.line = "";
    if (text.startsWith("Verifying")) this.verifying = true;
    this.onLine(text);
  }
}

interface RunObservations {
  programmingComplete: boolean;
  verificationComplete: boolean;
  notKatapult: boolean;
  sha?: string;
  pages?: number;
  /** Path flashtool switched to after the board re-enumerated in Katapult. */
  newDevice?: string;
  firstFlashError?: string;
}

export class FlashtoolFlasher implements Flasher {
  readonly name = "flashtool" as const;
  private readonly python: string;
  private readonly script: string;
  private readonly logger: Logger | undefined;

  constructor(options: FlashtoolFlasherOptions) {
    this.python = options.python;
    this.script = path.join(options.katapultPath, "scripts", "flashtool.py");
    this.logger = options.logger;
  }

  async preflight(target: FlashTarget): Promise<void> {
    if (!(await findExecutable(this.python))) {
      throw new MoonflashError(
        "TOOL_NOT_FOUND",
        `Python interpreter '${this.python}' was not found. Install python3 with pyserial or set \`python\` in moonflash.conf.`,
        { python: this.python },
      );
    }
    try {
      await access(this.script, fsConstants.R_OK);
    } catch {
      throw new MoonflashError(
        "TOOL_NOT_FOUND",
        `Katapult's flashtool.py was not found at ${this.script}. Clone https://github.com/Arksine/katapult or set katapult_path in moonflash.conf.`,
        { script: this.script },
      );
    }
    if (target.device) {
      if (!(await resolveDevicePath(target.device))) {
        throw new MoonflashError(
          "DEVICE_NOT_FOUND",
          `Serial device ${target.device} of [${target.mcu}] is not present. Check the cable and the serial: path.`,
          { mcu: target.mcu, device: target.device },
        );
      }
    } else {
      if (!target.canbusUuid) {
        throw new MoonflashError(
          "INVALID_PARAMS",
          `[${target.mcu}] has neither serial nor canbus_uuid; flashtool needs one of them.`,
          { mcu: target.mcu },
        );
      }
      if (!/^[0-9a-f]{12}$/i.test(target.canbusUuid)) {
        throw new MoonflashError(
          "INVALID_PARAMS",
          `canbus_uuid '${target.canbusUuid}' of [${target.mcu}] is not 12 hex digits; copy it from Klipper's config.`,
          { mcu: target.mcu, canbusUuid: target.canbusUuid },
        );
      }
    }
  }

  /** Command-line arguments after the interpreter. */
  buildArgs(target: FlashTarget): string[] {
    const transport = target.device
      ? ["-d", target.device, "-b", String(target.baud)]
      : ["-i", target.canbusInterface, "-u", (target.canbusUuid ?? "").toLowerCase()];
    return [this.script, ...transport, "-f", target.firmwarePath];
  }

  async flash(target: FlashJobTarget, ctx: JobContext): Promise<FlashOutcome> {
    await this.preflight(target);
    const bytes = target.image.length;
    const args = this.buildArgs(target);
    const seen: RunObservations = { programmingComplete: false, verificationComplete: false, notKatapult: false };
    const parser = new FlashtoolOutputParser(
      (line) => this.onLine(line, seen, ctx),
      (phase, percent) => ctx.progress(Math.round(percent), 100, "percent", phase),
    );
    ctx.stage("connect", target.device ? `flashtool.py on ${target.device}` : `flashtool.py on CAN ${target.canbusUuid}`);
    this.logger?.info({ command: this.python, args }, "running flashtool.py");
    const result = await runTool({
      command: this.python,
      args,
      timeoutMs: target.timeoutMs,
      signal: ctx.signal,
      onStdoutChunk: (chunk) => parser.push(chunk),
      onStderrLine: (line) => {
        seen.firstFlashError ??= /(?:^|\.)FlashError: (.*)$/.exec(line)?.[1];
        const info = /^INFO:root:(.*)$/.exec(line);
        if (info) ctx.log("info", info[1]!);
        else if (line.trim().length > 0) ctx.log("debug", line);
      },
    });
    parser.end();

    const details = {
      ...toolErrorDetails({ command: this.python, args }, result),
      ...(seen.sha ? { sha1: seen.sha } : {}),
      ...(seen.pages !== undefined ? { pages: seen.pages } : {}),
    };
    if (result.exitCode === 0 && seen.programmingComplete) {
      const device = seen.newDevice ?? target.device ?? `${target.canbusInterface}:${target.canbusUuid}`;
      return { bytes, verified: seen.verificationComplete, device, details };
    }
    if (result.exitCode === 0) {
      const why = seen.notKatapult ? "the board did not enter Katapult" : "flashtool.py ended without 'Programming Complete'";
      throw new MoonflashError(
        "FLASH_FAILED",
        `Nothing was flashed: ${why}. Check that Katapult is installed on the board, or flash it another way (make flash, SD card).`,
        details,
      );
    }
    const reason = seen.firstFlashError ?? result.stderrTail.filter((l) => l.trim()).at(-1) ?? `exit code ${result.exitCode}`;
    const code = FLASH_ERROR_CODES.find(([pattern]) => pattern.test(reason))?.[1] ?? "FLASH_FAILED";
    const hint = FLASH_ERROR_HINTS[code] ?? "See the job log for flashtool.py's output.";
    throw new MoonflashError(code, `flashtool.py failed: ${reason}. ${hint}`, details);
  }

  private onLine(line: string, seen: RunObservations, ctx: JobContext): void {
    if (line.length === 0) return;
    ctx.log("info", line);
    if (line.startsWith("Flashing")) {
      // From the first block on, stopping flashtool would leave a half-written image.
      ctx.setCancellable(false, "flashtool.py is writing the firmware");
      ctx.stage("write", line);
    } else if (line.startsWith("Verifying")) {
      ctx.stage("verify", line);
    } else if (line.startsWith("Programming Complete")) {
      seen.programmingComplete = true;
    } else if (line.startsWith("Device is not Katapult") || line.startsWith("Bootloader Request Complete")) {
      seen.notKatapult = true;
    }
    const sha = /^Verification Complete: SHA = ([0-9A-Fa-f]+)/.exec(line);
    if (sha) {
      seen.verificationComplete = true;
      seen.sha = sha[1]!.toLowerCase();
    }
    const pages = /^Write complete: (\d+) pages/.exec(line);
    if (pages) seen.pages = Number(pages[1]);
    const moved = /^Katapult detected (?:on|at serial port) (\S+)/.exec(line);
    if (moved) seen.newDevice = moved[1]!;
  }
}
