// Shared shapes of the flash engine: what one flash method gets, and what it returns.

import type { JobContext } from "../core/events.js";

export const FLASH_METHODS = ["katapult", "flashtool", "make", "wchisp", "linux"] as const;
export type FlashMethodName = (typeof FLASH_METHODS)[number];

/** How to put a running Klipper board into Katapult before flashing. */
export type BootloaderRequest = "auto" | "usb" | "serial" | "none";

/** Everything a method needs to flash one MCU; resolved by the engine before Klipper is stopped. */
export interface FlashTarget {
  /** Klipper config section: "mcu" or "mcu toolhead". */
  mcu: string;
  /** Serial device as configured (by-id, by-path or /dev/ttyX); absent for CAN. */
  device?: string;
  canbusUuid?: string;
  canbusInterface: string;
  baud: number;
  /** Absolute path of the image (external tools read it; messages name it). */
  firmwarePath: string;
  /** MCU type the image was built for, when known (klipper.bin's dictionary or config `mcu_type`). */
  expectedMcuType?: string;
  bootloader: BootloaderRequest;
  /** Klipper source tree (for `make flash`). */
  klipperPath: string;
  /** KCONFIG_CONFIG for `make flash`; absent means Klipper's default .config. */
  kconfig?: string;
  /** OUT for `make flash` (ends with "/"). */
  outDir?: string;
  wchispTransport: "usb" | "serial";
  /** The chip's whole flash (config `flash_size`), when configured; the bootloader's share is subtracted after CONNECT. */
  flashSize?: number | null;
  /** Where the Linux host MCU's program is installed (method linux); default /usr/local/bin/klipper_mcu. */
  linuxMcuPath?: string;
  /** The Linux host MCU's service (method linux); default the one of klipper_mcu / klipper-mcu Moonraker manages. */
  linuxMcuService?: string;
  /** Per-attempt timeout in milliseconds. */
  timeoutMs: number;
}

/** The target of one flash attempt: the image itself comes along, read and checked once per job by the engine. */
export interface FlashJobTarget extends FlashTarget {
  image: Buffer;
  /**
   * backup_before_flash: a method that can read the board's current application (katapult) hands it here before it
   * writes anything, and writes only once this resolved (the image is then kept for a rollback).
   */
  backupApplication?: (application: Buffer) => Promise<void>;
}

export interface FlashOutcome {
  /** Bytes of firmware written. */
  bytes: number;
  /** True only when the method read the image back (or the tool reported a verify) and it matched. */
  verified: boolean;
  /** The device path the image finally went to (it can change when the board re-enumerates). */
  device: string;
  details?: Record<string, unknown>;
}

/**
 * One way of flashing. Methods never stop Klipper or talk to Moonraker: the engine's guard does. (The linux method
 * restarts the host MCU's own service through the printer port while Klipper is stopped.)
 */
export interface Flasher {
  readonly name: FlashMethodName;
  /** Checks that can run while Klipper is up (tool present, device plausible). Throws MoonflashError. */
  preflight(target: FlashTarget): Promise<void>;
  /** Flashes; reports through ctx; honours ctx.signal until writing starts. Throws MoonflashError. */
  flash(target: FlashJobTarget, ctx: JobContext): Promise<FlashOutcome>;
}
