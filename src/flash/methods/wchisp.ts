// Flashing WCH chips (CH32V20x etc.) in their ROM ISP bootloader with ch32-rs/wchisp.
// wchisp never puts the chip into ISP itself (BOOT0 strap), writes from flash offset 0, and logs
// `HH:MM:SS [LEVEL] msg`; success needs exit 0 AND "Verify OK".

import path from "node:path";
import type { Logger } from "pino";
import { MoonflashError, type ErrorCode } from "../../core/errors.js";
import type { JobContext } from "../../core/events.js";
import { discoverDevices, resolveDevicePath, type DiscoveredDevice } from "../discovery.js";
import type { FlashJobTarget, FlashOutcome, FlashTarget, Flasher } from "../types.js";
import { findExecutable, runTool, toolErrorDetails } from "../../core/tool.js";

export interface WchispFlasherOptions {
  /** Config `wchisp_path`; tried first. */
  wchispPath?: string;
  /** The install's bin/ directory; tried second. */
  installBin?: string;
  /** Devices to pick a serial port from when the MCU has no `serial:`; default discoverDevices(). */
  discover?: () => Promise<DiscoveredDevice[]>;
  logger?: Logger;
}

const INSTALL_HINT =
  "Install wchisp (a release binary from https://github.com/ch32-rs/wchisp/releases, or `cargo install wchisp`) and set wchisp_path in moonflash.conf.";

/** Baud rates wchisp's `-b` accepts (src/transport/serial.rs Baudrate); anything else stays at its 115200 default. */
const WCHISP_BAUDS = new Set([115200, 1_000_000, 2_000_000]);

const ERROR_CODES_BY_TEXT: Array<[RegExp, ErrorCode]> = [
  [/Verify failed/i, "VERIFY_FAILED"],
  [/No WCH ISP USB device found|No serial port/i, "DEVICE_NOT_FOUND"],
];

const ERROR_HINTS: Partial<Record<ErrorCode, string>> = {
  VERIFY_FAILED: "The chip's flash does not match the image; flash again, and check power and wiring if it repeats.",
  DEVICE_NOT_FOUND: "Put the chip into its ISP bootloader (hold BOOT0 while resetting) and check the cable and udev rule.",
};

// eslint-disable-next-line no-control-regex
const ANSI = /\u001b\[[0-9;]*m/g;
const LOG_LINE = /^\d\d:\d\d:\d\d \[(\w+)\]\s*(.*)$/;

export class WchispFlasher implements Flasher {
  readonly name = "wchisp" as const;
  private readonly options: WchispFlasherOptions;
  private readonly discover: () => Promise<DiscoveredDevice[]>;

  constructor(options: WchispFlasherOptions = {}) {
    this.options = options;
    this.discover = options.discover ?? (() => discoverDevices({ logger: options.logger }));
  }

  /** The wchisp binary: config path, then the install's bin/, then PATH. */
  async locate(): Promise<string> {
    const { wchispPath, installBin } = this.options;
    if (wchispPath) {
      const found = await findExecutable(wchispPath);
      if (found) return found;
      throw new MoonflashError("TOOL_NOT_FOUND", `wchisp_path ${wchispPath} is not an executable file. ${INSTALL_HINT}`, {
        wchispPath,
      });
    }
    if (installBin) {
      const bundled = path.join(installBin, "wchisp");
      if (await findExecutable(bundled)) return bundled;
    }
    const onPath = await findExecutable("wchisp");
    if (onPath) return onPath;
    throw new MoonflashError("TOOL_NOT_FOUND", `wchisp was not found. ${INSTALL_HINT}`, {
      searched: [installBin ? path.join(installBin, "wchisp") : null, "PATH"].filter(Boolean),
    });
  }

  /** The serial port to use: the configured one, else the only USB-UART/WCH candidate present. */
  async resolvePort(target: FlashTarget): Promise<string | undefined> {
    if (target.wchispTransport !== "serial") return undefined;
    if (target.device) {
      if (await resolveDevicePath(target.device)) return target.device;
      throw new MoonflashError(
        "DEVICE_NOT_FOUND",
        `Serial port ${target.device} of [${target.mcu}] is not present. Check the USB-UART adapter and the serial: path.`,
        { mcu: target.mcu, device: target.device },
      );
    }
    const candidates = (await this.discover()).filter((d) => d.kind === "uart-adapter" || d.kind === "wch-isp");
    if (candidates.length === 1) return candidates[0]!.byPath ?? candidates[0]!.path;
    const listed = candidates.map((d) => `${d.byPath ?? d.path} (${d.label})`);
    throw new MoonflashError(
      "DEVICE_NOT_FOUND",
      candidates.length === 0
        ? `No USB-UART adapter found for wchisp on [${target.mcu}]. Connect it and set serial: in [${target.mcu}] of moonflash.conf.`
        : `Several serial adapters could be the ISP port of [${target.mcu}]: ${listed.join(", ")}. Set serial: in [${target.mcu}] of moonflash.conf explicitly.`,
      { mcu: target.mcu, candidates: listed },
    );
  }

  async preflight(target: FlashTarget): Promise<void> {
    await this.locate();
    await this.resolvePort(target);
  }

  /** Top-level transport flags go before the subcommand (clap). */
  buildArgs(target: FlashTarget, port: string | undefined): string[] {
    const transport: string[] = [];
    if (port !== undefined) {
      transport.push("-s", "-p", port);
      if (WCHISP_BAUDS.has(target.baud)) transport.push("-b", String(target.baud));
    }
    return [...transport, "flash", target.firmwarePath];
  }

  async flash(target: FlashJobTarget, ctx: JobContext): Promise<FlashOutcome> {
    const command = await this.locate();
    const port = await this.resolvePort(target);
    const bytes = target.image.length;
    if (port !== undefined && !WCHISP_BAUDS.has(target.baud)) {
      ctx.log("debug", `wchisp supports 115200, 1000000 or 2000000 baud; using its default 115200 instead of ${target.baud}`);
    }
    const args = this.buildArgs(target, port);
    let firmwareSize = bytes;
    let verifyOk = false;
    let errorText: string | undefined;
    const onLine = (raw: string): void => {
      const line = raw.replace(ANSI, "").trimEnd();
      if (line.length === 0) return;
      const error = /^Error: (.*)$/.exec(line);
      if (error) errorText ??= error[1];
      const log = LOG_LINE.exec(line);
      const message = log ? log[2]! : line;
      const level = log?.[1]?.toUpperCase();
      ctx.log(level === "ERROR" || error ? "error" : level === "WARN" ? "warn" : "info", message);
      if (!log) return;
      const size = /^Firmware size: (\d+)/.exec(message);
      if (size) firmwareSize = Number(size[1]);
      if (message.startsWith("Erasing...")) {
        ctx.setCancellable(false, "wchisp is erasing and writing the chip");
        ctx.stage("erase", message);
      } else if (message.startsWith("Writing to code flash")) {
        ctx.stage("write", message);
      } else if (message.startsWith("Verifying...")) {
        ctx.stage("verify", message);
      } else if (message.startsWith("Verify OK")) {
        verifyOk = true;
      }
      const written = /^Code flash (\d+) bytes written/.exec(message);
      if (written) ctx.progress(Math.min(Number(written[1]), firmwareSize), firmwareSize, "bytes", "write");
    };
    ctx.stage("connect", port ? `wchisp on ${port}` : "wchisp over USB");
    this.options.logger?.info({ command, args }, "running wchisp");
    const result = await runTool({
      command,
      args,
      timeoutMs: target.timeoutMs,
      signal: ctx.signal,
      onStdoutLine: onLine,
      onStderrLine: onLine,
    });
    const details = toolErrorDetails({ command, args }, result);
    if (result.exitCode === 0 && verifyOk) {
      return { bytes, verified: true, device: port ?? "usb", details };
    }
    const reason = errorText ?? (result.exitCode === 0 ? "it ended without 'Verify OK'" : `exit code ${result.exitCode}`);
    const code = errorText ? (ERROR_CODES_BY_TEXT.find(([pattern]) => pattern.test(errorText!))?.[1] ?? "FLASH_FAILED") : "FLASH_FAILED";
    const hint = ERROR_HINTS[code] ?? "See the job log for wchisp's output.";
    throw new MoonflashError(code, `wchisp failed: ${reason}. ${hint}`, details);
  }
}
