// The [mcu] / [mcu NAME] sections of moonflash.conf: how one board is flashed. The one place for their defaults
// (also used for MCUs only Klipper's config names) and the one place that validates a flash method name.

import { isAbsolute, join, resolve } from "node:path";
import * as z from "zod/mini";
import "../core/zod.js";
import { MoonflashError } from "../core/errors.js";
import {
  Invalid, absolutePath, boolean, byteSize, canbusUuid, defaults, directory, integer, interfaceName, oneOf, positiveInteger,
  serialDevice, suggest, token, unset, value,
} from "../core/config-values.js";
import { expandHome } from "../core/paths.js";
import { FLASH_METHODS, type BootloaderRequest, type FlashMethodName } from "./types.js";

export interface McuConfig {
  /** Section name as Klipper spells it: "mcu" or "mcu toolhead". */
  section: string;
  serial: string | null;
  canbus_uuid: string | null;
  canbus_interface: string;
  baud: number;
  /** Methods to try in order; null = auto ("katapult, make" for serial, "flashtool" for CAN). */
  method: FlashMethodName[] | null;
  /** Image to flash; null = the engine's default, <klipper_path>/out/klipper.bin. */
  firmware: string | null;
  /** The firmware profile (KCONFIG_CONFIG) as written: absolute, or relative to <data>/config/moonflash/ (resolveKconfig). */
  kconfig: string | null;
  /** OUT for `make flash`, always ending in "/". */
  out_dir: string | null;
  mcu_type: string | null;
  /** The chip's whole flash; the bootloader's share is subtracted once Katapult reports it. */
  flash_size: number | null;
  bootloader: BootloaderRequest;
  wchisp_transport: "usb" | "serial";
  /** Where method linux installs the Linux host MCU's klipper.elf; null = /usr/local/bin/klipper_mcu. */
  linux_mcu_path: string | null;
  /** The Linux host MCU's service as Moonraker names it; null = klipper_mcu or klipper-mcu, whichever it manages. */
  linux_mcu_service: string | null;
  /**
   * Read the board's current application back into the firmware store before the first flash moonflash makes of it
   * (katapult), so that flash can be rolled back; null = on for update-all, off for a single flash.
   */
  backup_before_flash: boolean | null;
  /** Seconds per flash attempt. */
  timeout: number;
}

/** The first unknown or repeated name in a list of flash methods, or null when all are known and distinct. */
function methodListProblem(names: string[]): { name: string; repeated: boolean; hint?: string } | null {
  const seen = new Set<string>();
  for (const name of names) {
    if (!(FLASH_METHODS as readonly string[]).includes(name)) {
      const hint = suggest(name, FLASH_METHODS);
      return { name, repeated: false, ...(hint ? { hint } : {}) };
    }
    if (seen.has(name)) return { name, repeated: true };
    seen.add(name);
  }
  return null;
}

/** A request's method list ("katapult", "katapult, make" or a list): UNKNOWN_FLASH_METHOD when one is unknown. */
export function parseFlashMethods(value: string | string[]): FlashMethodName[] {
  const names = [...new Set((Array.isArray(value) ? value : [value]).flatMap((v) => v.split(",")).map((v) => v.trim()).filter(Boolean))];
  if (names.length === 0) {
    throw new MoonflashError("UNKNOWN_FLASH_METHOD", `No flash method given. Use one of: ${FLASH_METHODS.join(", ")}.`, { method: value });
  }
  const problem = methodListProblem(names);
  if (problem) {
    const hint = problem.hint ? ` (did you mean '${problem.hint}'?)` : "";
    throw new MoonflashError("UNKNOWN_FLASH_METHOD", `Unknown flash method '${problem.name}'${hint}. Use one of: ${FLASH_METHODS.join(", ")}.`, {
      method: problem.name,
      known: [...FLASH_METHODS],
    });
  }
  return names as FlashMethodName[];
}

// moonflash.conf's `method:`: the same names as a request, or auto.
const methodList = value((raw): FlashMethodName[] | null => {
  if (raw === "auto") return null;
  const names = raw.split(",").map((name) => name.trim());
  const problem = methodListProblem(names);
  if (problem?.repeated) throw new Invalid(`method '${problem.name}' is listed twice`);
  if (problem) {
    const hint = problem.hint ? ` (did you mean '${problem.hint}'?)` : "";
    throw new Invalid(`unknown method '${problem.name}'${hint}; expected a comma list of ${FLASH_METHODS.join(", ")} or auto`);
  }
  return names as FlashMethodName[];
});

/** Where firmware profiles live: beside moonflash.conf, so Mainsail's and Fluidd's file editors reach them. */
export function firmwareProfileDir(dataDir: string): string {
  return join(dataDir, "config", "moonflash");
}

/** A `kconfig:` value as a path: absolute as written (~ expanded), else relative to <data>/config/moonflash/. */
export function resolveKconfig(kconfig: string, dataDir: string): string {
  return isAbsolute(kconfig) ? kconfig : resolve(firmwareProfileDir(dataDir), kconfig);
}

// kconfig: any path; a relative one is resolved against the profile directory by resolveKconfig, which knows dataDir.
const kconfigPath = value((raw) => expandHome(raw));

export const mcuSchema = z
  .strictObject({
    serial: unset(serialDevice),
    canbus_uuid: unset(canbusUuid),
    canbus_interface: z._default(interfaceName, "can0"),
    baud: z._default(positiveInteger, 250000),
    method: unset(methodList),
    firmware: unset(absolutePath),
    kconfig: unset(kconfigPath),
    out_dir: unset(directory),
    mcu_type: unset(token),
    flash_size: unset(byteSize),
    bootloader: z._default(oneOf(["auto", "usb", "serial", "none"] as const), "auto"),
    wchisp_transport: z._default(oneOf(["usb", "serial"] as const), "usb"),
    linux_mcu_path: unset(absolutePath),
    linux_mcu_service: unset(token),
    backup_before_flash: unset(boolean),
    timeout: z._default(integer(10, 3600), 300),
  })
  .check(
    z.superRefine((mcu, ctx) => {
      if (mcu.serial !== null && mcu.canbus_uuid !== null) {
        ctx.addIssue({
          code: "custom",
          path: ["canbus_uuid"],
          message: "serial and canbus_uuid are mutually exclusive; keep the one the board uses",
        });
      }
    }),
  );


/** Every option's default, for a board only Klipper's config names. */
export const MCU_DEFAULTS: Omit<McuConfig, "section"> = defaults(mcuSchema);

/** What the flash engine reads of the configuration. */
export interface FlashSettings {
  dataDir: string;
  moonflash: { klipper_path: string; katapult_path: string; python: string; wchisp_path: string | null; service_timeout: number };
  mcus: Record<string, McuConfig>;
}
