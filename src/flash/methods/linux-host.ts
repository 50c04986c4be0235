// Klipper's Linux host MCU is a program on this machine, not a board: "flashing" it installs the klipper.elf built
// for it where its service runs it (Klipper's scripts/flash-linux.sh copies it to /usr/local/bin/klipper_mcu) and
// restarts that service. Klipper's own `make flash` does it with `sudo` and `systemctl`; moonflash stops and starts
// the service through Moonraker (machine.services.*, like Klipper), writes the file durably, and needs `sudo -n` only
// when the target directory is not writable by its user.

import { constants as fsConstants } from "node:fs";
import { access, readFile } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import type { Logger } from "pino";
import { writeFileDurable } from "../../core/durable.js";
import { MoonflashError, toMoonflashError } from "../../core/errors.js";
import type { JobContext } from "../../core/events.js";
import type { PrinterPort } from "../../core/printer.js";
import { findExecutable, runTool, toolErrorDetails } from "../../core/tool.js";
import type { FlashJobTarget, FlashOutcome, FlashTarget, Flasher } from "../types.js";

/** Where Klipper's scripts/flash-linux.sh installs the host MCU program. */
export const DEFAULT_LINUX_MCU_PATH = "/usr/local/bin/klipper_mcu";
/**
 * The service names Klipper's host MCU runs as: "klipper_mcu" (Moonraker's default moonraker.asvc entry, KIAUH's
 * unit) and "klipper-mcu" (Klipper's scripts/klipper-mcu.service).
 */
export const LINUX_MCU_SERVICES = ["klipper_mcu", "klipper-mcu"] as const;
const ELF_MAGIC = Buffer.from([0x7f, 0x45, 0x4c, 0x46]);
const SUDO_TIMEOUT_MS = 30_000;

export interface LinuxHostFlasherOptions {
  /** Stops and starts the host MCU's service; the agent's Moonraker session. */
  printer: Pick<PrinterPort, "state" | "stopService" | "startService">;
  /** sudo executable; default "sudo" from PATH. */
  sudo?: string;
  /** Whether moonflash's user may write into `dir` itself; a seam for tests, which run as root. */
  canWrite?: (dir: string) => Promise<boolean>;
  logger?: Logger;
}

export class LinuxHostFlasher implements Flasher {
  readonly name = "linux" as const;
  private readonly printer: LinuxHostFlasherOptions["printer"];
  private readonly sudo: string;
  private readonly canWrite: (dir: string) => Promise<boolean>;
  private readonly logger: Logger | undefined;

  constructor(options: LinuxHostFlasherOptions) {
    this.printer = options.printer;
    this.sudo = options.sudo ?? "sudo";
    this.canWrite = options.canWrite ?? ((dir) => access(dir, fsConstants.W_OK).then(() => true, () => false));
    this.logger = options.logger;
  }

  async preflight(target: FlashTarget): Promise<void> {
    if (target.expectedMcuType?.toLowerCase() !== "linux") {
      throw new MoonflashError(
        "METHOD_NOT_APPLICABLE",
        `The linux method installs Klipper's Linux host MCU program; [${target.mcu}] is ${target.expectedMcuType ? `a ${target.expectedMcuType}` : "not known to be the Linux host MCU"}. Use katapult, make, flashtool or wchisp, or set mcu_type: linux.`,
        { mcu: target.mcu, mcuType: target.expectedMcuType ?? null },
      );
    }
    this.service(target);
    const dir = dirname(this.installPath(target));
    if (!(await this.canWrite(dir)) && !(await findExecutable(this.sudo))) {
      throw new MoonflashError(
        "PERMISSION_DENIED",
        `moonflash may not write ${dir} and sudo is not installed. Make ${this.installPath(target)} writable by moonflash's user, or set linux_mcu_path in [${target.mcu}].`,
        { mcu: target.mcu, path: this.installPath(target) },
      );
    }
  }

  async flash(target: FlashJobTarget, ctx: JobContext): Promise<FlashOutcome> {
    await this.preflight(target);
    if (!target.image.subarray(0, 4).equals(ELF_MAGIC)) {
      throw new MoonflashError(
        "MCU_MISMATCH",
        `${target.firmwarePath} is not a Linux program (no ELF header). Build [${target.mcu}] with a Linux process profile (CONFIG_MACH_LINUX=y) and flash its klipper.elf.`,
        { mcu: target.mcu, firmware: target.firmwarePath },
      );
    }
    const service = this.service(target);
    const path = this.installPath(target);
    const timeoutMs = Math.min(target.timeoutMs, SUDO_TIMEOUT_MS);

    ctx.setCancellable(false, `installing ${path}`);
    ctx.stage("write", `stopping ${service}`);
    await this.printer.stopService(service, timeoutMs);
    let installError: unknown = null;
    try {
      ctx.stage("write", `installing ${path}`);
      await this.install(target, path, ctx);
      ctx.progress(target.image.length, target.image.length, "bytes", "write");
    } catch (err) {
      installError = err;
    }
    // The service comes back in any case: with the new program, or with the old one the failed install left.
    ctx.stage("write", `starting ${service}`);
    await this.printer.startService(service, timeoutMs);
    if (installError) throw toMoonflashError(installError, "FLASH_FAILED");

    ctx.stage("verify", `comparing ${path} with the image`);
    const installed = await readFile(path);
    const verified = installed.equals(target.image);
    if (!verified) {
      throw new MoonflashError("VERIFY_FAILED", `${path} differs from ${target.firmwarePath} after the install. Check the disk and flash again.`, {
        mcu: target.mcu,
        path,
      });
    }
    return { bytes: target.image.length, verified, device: path, details: { service, path } };
  }

  private installPath(target: FlashTarget): string {
    return target.linuxMcuPath ?? DEFAULT_LINUX_MCU_PATH;
  }

  /** The configured service, else the one of Klipper's two names that Moonraker manages. */
  private service(target: FlashTarget): string {
    const available = Object.keys(this.printer.state().services);
    const service = target.linuxMcuService ?? LINUX_MCU_SERVICES.find((name) => available.includes(name));
    if (!service || !available.includes(service)) {
      throw new MoonflashError(
        "SERVICE_FAILED",
        `Moonraker does not manage ${service ?? LINUX_MCU_SERVICES.join(" or ")}, the Linux host MCU's service${available.length ? ` (it manages ${available.join(", ")})` : ""}. Add the service's name to moonraker.asvc and restart Moonraker, or set linux_mcu_service in [${target.mcu}].`,
        { mcu: target.mcu, service: service ?? null, available },
      );
    }
    return service;
  }

  /** Durably, by rename: a power cut leaves the old program or the new one, never a torn file. */
  private async install(target: FlashJobTarget, path: string, ctx: JobContext): Promise<void> {
    const dir = dirname(path);
    if (await this.canWrite(dir)) {
      await writeFileDurable(path, target.image, 0o755);
      return;
    }
    // Not ours to write: the same three steps as root, each without a password prompt (sudo -n fails instead).
    const temp = join(dir, `.${basename(path)}.moonflash.tmp`);
    ctx.log("info", `${dir} is not writable by moonflash's user: installing with sudo -n`);
    const steps = [
      ["install", "-m", "0755", target.firmwarePath, temp],
      ["sync", temp],
      ["mv", "-f", temp, path],
      ["sync", dir],
    ];
    for (const [index, args] of steps.entries()) {
      const result = await runTool({ command: this.sudo, args: ["-n", ...args], timeoutMs: SUDO_TIMEOUT_MS, onStderrLine: (line) => ctx.log("info", line) });
      if (result.exitCode !== 0) {
        const details = toolErrorDetails({ command: this.sudo, args: ["-n", ...args] }, result);
        this.logger?.warn(details, "sudo install of the Linux host MCU failed");
        throw new MoonflashError(
          "PERMISSION_DENIED",
          `Installing ${path} needs root, and sudo -n ${args[0]} failed (${result.stderrTail.at(-1) ?? `exit ${result.exitCode}`}). Allow moonflash's user passwordless sudo, or make ${dir} writable by it${index < 2 ? "; nothing was replaced" : ""}.`,
          { mcu: target.mcu, path, ...details },
        );
      }
    }
  }
}
