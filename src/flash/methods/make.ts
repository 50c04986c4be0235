// Flashing with Klipper's own `make flash FLASH_DEVICE=…` (flash_usb.py → dfu-util, hid-flash, rp2040_flash,
// bossac, avrdude or Katapult's flashtool). dfu-util's `:leave` often ends in
// "Error during download get_status" after a complete download, so make reports a failure for a board that was
// flashed; that case is recognised and reported as success with a warning.

import { constants as fsConstants } from "node:fs";
import { access, stat } from "node:fs/promises";
import path from "node:path";
import type { Logger } from "pino";
import { MoonflashError } from "../../core/errors.js";
import type { JobContext } from "../../core/events.js";
import { resolveDevicePath } from "../discovery.js";
import type { FlashJobTarget, FlashOutcome, FlashTarget, Flasher } from "../types.js";
import { findExecutable, runTool, toolErrorDetails } from "../../core/tool.js";

export interface MakeFlasherOptions {
  /** make executable; default "make" from PATH. */
  make?: string;
  logger?: Logger;
}

/** Lines that show the tool read the image back and it matched (flashtool, bossac, avrdude, stm32flash). */
const VERIFIED_LINE = /Verification Complete|Verify successful|bytes of flash verified|Verifying memory.*OK|^Verify\s+.*100%|^Verify OK/i;
/** dfu-util finished sending the image (dfu-util src/main.c; BTT Manta-M5P#31). */
const DFU_DOWNLOAD_DONE = /Download done\.|File downloaded successfully|Transitioning to dfuMANIFEST state/;
const DFU_GET_STATUS_ERROR = /Error during download get_status/;

export class MakeFlasher implements Flasher {
  readonly name = "make" as const;
  private readonly make: string;
  private readonly logger: Logger | undefined;

  constructor(options: MakeFlasherOptions = {}) {
    this.make = options.make ?? "make";
    this.logger = options.logger;
  }

  async preflight(target: FlashTarget): Promise<void> {
    if (!target.device) {
      throw new MoonflashError(
        "INVALID_PARAMS",
        `make flash needs a serial or USB device, but [${target.mcu}] has none. CAN nodes are flashed with the katapult or flashtool method.`,
        { mcu: target.mcu },
      );
    }
    // A bare vid:pid makes flash_usb.py talk to a board already in DFU/HID/BOOTSEL mode: no device node to check.
    if (!/^[0-9a-f]{4}:[0-9a-f]{4}$/i.test(target.device) && !(await resolveDevicePath(target.device))) {
      throw new MoonflashError(
        "DEVICE_NOT_FOUND",
        `Device ${target.device} of [${target.mcu}] is not present. Check the cable and the serial: path.`,
        { mcu: target.mcu, device: target.device },
      );
    }
    const makefile = path.join(target.klipperPath, "Makefile");
    try {
      await access(makefile, fsConstants.R_OK);
    } catch {
      throw new MoonflashError(
        "TOOL_NOT_FOUND",
        `No Makefile in ${target.klipperPath}; set klipper_path in moonflash.conf to your Klipper checkout.`,
        { klipperPath: target.klipperPath },
      );
    }
    if (target.kconfig) {
      // olddefconfig silently replaces a missing KCONFIG_CONFIG with defaults (atmega2560), so refuse instead.
      const isFile = await stat(target.kconfig).then((s) => s.isFile(), () => false);
      if (!isFile) {
        throw new MoonflashError(
          "MISSING_CONFIG",
          `kconfig ${target.kconfig} of [${target.mcu}] does not exist. Save the board's menuconfig there (moonflash config ${target.mcu.replace(/^mcu\s+/, "")}) or fix the path; make would otherwise build a default config.`,
          { mcu: target.mcu, kconfig: target.kconfig },
        );
      }
    }
    if (!(await findExecutable(this.make))) {
      throw new MoonflashError("TOOL_NOT_FOUND", `${this.make} is not installed. Install it (sudo apt install make).`, {
        command: this.make,
      });
    }
  }

  /** `flash FLASH_DEVICE=… [KCONFIG_CONFIG=…] [OUT=…/]`; OUT gets its trailing slash because Klipper concatenates it. */
  buildArgs(target: FlashTarget): string[] {
    const args = ["flash", `FLASH_DEVICE=${target.device ?? ""}`];
    if (target.kconfig) args.push(`KCONFIG_CONFIG=${target.kconfig}`);
    if (target.outDir) args.push(`OUT=${target.outDir.endsWith("/") ? target.outDir : `${target.outDir}/`}`);
    return args;
  }

  async flash(target: FlashJobTarget, ctx: JobContext): Promise<FlashOutcome> {
    await this.preflight(target);
    const bytes = target.image.length;
    const args = this.buildArgs(target);
    let verified = false;
    let downloadDone = false;
    let falseFailure = false;
    const recentLines: string[] = [];
    const onLine = (line: string): void => {
      if (line.trim().length === 0) return;
      ctx.log("info", line);
      recentLines.push(line.trim());
      if (recentLines.length > 3) recentLines.shift();
      if (VERIFIED_LINE.test(line)) verified = true;
      if (DFU_DOWNLOAD_DONE.test(line)) downloadDone = true;
      else if (downloadDone && DFU_GET_STATUS_ERROR.test(line)) falseFailure = true;
    };
    // make may build first and enter the bootloader at any point; there is no safe moment to stop it.
    ctx.setCancellable(false, "make flash is running");
    ctx.stage("write", `make flash FLASH_DEVICE=${target.device}`);
    this.logger?.info({ command: this.make, args, cwd: target.klipperPath }, "running make flash");
    const result = await runTool({
      command: this.make,
      args,
      cwd: target.klipperPath,
      timeoutMs: target.timeoutMs,
      signal: ctx.signal,
      onStdoutLine: onLine,
      onStderrLine: onLine,
    });
    const details: Record<string, unknown> = toolErrorDetails({ command: this.make, args }, result);
    const device = target.device ?? "";
    if (result.exitCode === 0) return { bytes, verified, device, details };
    if (falseFailure) {
      ctx.log(
        "warn",
        "dfu-util reported 'Error during download get_status' after the download completed; this is its known false failure, the image was written.",
      );
      return { bytes, verified, device, details: { ...details, dfuFalseFailure: true } };
    }
    const lastLines = recentLines.join(" | ");
    throw new MoonflashError(
      "FLASH_FAILED",
      `make flash failed (exit ${result.exitCode})${lastLines ? `: ${lastLines}` : ""}. See the job log for the full output.`,
      details,
    );
  }
}
