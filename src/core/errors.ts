// One error type for all of moonflash: a stable `code`, a message that says what to do, details to act on.
// The JSON-RPC mapping follows Moonraker: the numeric code is HTTP-like (400 bad input, 404 missing,
// 409 conflict, 503 busy/printing, 504 timeout, 500 device/internal); `data.code` carries our name.

const BRAND = Symbol.for("moonflash.error");

/** Every code moonflash can raise, with its HTTP-like status and a one-line meaning. */
export const ERROR_CODES = {
  INVALID_PARAMS: { status: 400, doc: "A remote method or CLI argument is missing or of the wrong type." },
  CONFIG_INVALID: { status: 400, doc: "moonflash.conf has a syntax error, an unknown option or a bad value." },
  BUSY: { status: 409, doc: "Another moonflash job (flash or OTA) is running, in this or another process." },
  PRINTER_BUSY: { status: 503, doc: "Klipper is printing or paused; nothing is stopped or flashed." },
  MOONRAKER_UNAVAILABLE: { status: 503, doc: "The agent has no Moonraker connection right now." },
  MOONRAKER_REQUEST_FAILED: { status: 502, doc: "Moonraker (or Klipper behind it) answered a request with an error." },
  KLIPPER_NOT_CONNECTED: { status: 503, doc: "Klipper is not connected to Moonraker, so the request cannot reach it." },
  SERVICE_TIMEOUT: { status: 504, doc: "Moonraker did not report the service state change in time." },
  SERVICE_FAILED: { status: 500, doc: "Moonraker refused or failed a machine.services action." },
  UNKNOWN_MCU: { status: 404, doc: "No [mcu] section of that name in Klipper's or moonflash's config." },
  METHOD_NOT_APPLICABLE: { status: 400, doc: "The flash method cannot flash this kind of MCU (e.g. Katapult for the Linux host MCU)." },
  UNKNOWN_FLASH_METHOD: { status: 400, doc: "The flash method is not one of katapult, flashtool, make, wchisp, linux." },
  DEVICE_NOT_FOUND: { status: 404, doc: "The MCU's serial device or CAN node is not present (also a serial path that is missing or a link to nothing)." },
  DEVICE_IN_USE: { status: 409, doc: "Another process holds the serial device open." },
  DEVICE_PERMISSION: { status: 403, doc: "The user moonflash runs as may not open the serial device: add it to the dialout group (sudo usermod -aG dialout $USER), then log in again or restart the service." },
  PATH_REJECTED: { status: 400, doc: "An existing path is not one moonflash accepts (e.g. a serial path that is not a character device under /dev)." },
  FIRMWARE_NOT_FOUND: { status: 404, doc: "The firmware image does not exist." },
  FIRMWARE_EMPTY: { status: 400, doc: "The firmware image is empty." },
  FIRMWARE_TOO_LARGE: { status: 400, doc: "The firmware image does not fit the MCU's flash (flash_size, else Klipper's Kconfig size for the MCU type)." },
  MCU_MISMATCH: { status: 409, doc: "The image was built for another MCU type than the bootloader reports." },
  TOOL_NOT_FOUND: { status: 404, doc: "An external tool (flashtool.py, make, wchisp, python3) is missing." },
  BOOTLOADER_TIMEOUT: { status: 504, doc: "The board did not come back in its bootloader after the request." },
  DEVICE_TIMEOUT: { status: 504, doc: "The device stopped answering during the protocol exchange." },
  PROTOCOL_ERROR: { status: 502, doc: "The device answered with an error or malformed data." },
  FLASH_FAILED: { status: 500, doc: "Writing the firmware failed; once a block was written the board stays in its bootloader for another try." },
  VERIFY_FAILED: { status: 500, doc: "Read-back verification found different data than was written." },
  TOOL_TIMEOUT: { status: 504, doc: "An external tool ran longer than its timeout and was stopped." },
  CANCELLED: { status: 409, doc: "The job was cancelled before anything was written." },
  CANCEL_REFUSED: { status: 409, doc: "The job cannot be cancelled now (e.g. flash writing has started)." },
  NO_JOB: { status: 404, doc: "There is no running job to act on." },
  INTERRUPTED: { status: 500, doc: "The agent was killed while a job ran; it was recovered on the next start." },
  VERSION_MISMATCH: { status: 500, doc: "After an update an MCU still reports another firmware version than Klipper; rebuild from the Klipper tree Klipper runs." },
  NO_ROLLBACK_IMAGE: { status: 404, doc: "moonflash keeps no earlier image of the MCU to roll back to (it keeps the last 3 it flashed), or that image is damaged; flash a firmware file instead." },
  MISSING_CONFIG: { status: 404, doc: "The MCU's firmware profile (its Kconfig file) is missing or selects no processor; nothing was built, since make olddefconfig would invent an atmega2560 config." },
  BUILD_FAILED: { status: 500, doc: "Building the firmware (make olddefconfig, make) failed; the last 40 lines of its output are in the details." },
  DISK_FULL: { status: 507, doc: "The disk has no room for a file moonflash must write." },
  INTERNAL: { status: 500, doc: "An unexpected error; see moonflash.log." },
  PORT_UNAVAILABLE: { status: 409, doc: "A port moonflash should listen on (the status page's) is taken by another program, needs root (below 1024), or its address is not this machine's; set another port or bind in moonflash.conf, or stop the other program." },
  // OTA
  DOWNLOAD_FAILED: { status: 502, doc: "The package could not be downloaded after retries; the details name the last HTTP status or network error." },
  MD5_MISMATCH: { status: 422, doc: "The downloaded file's MD5 differs from the one given; the partial file was discarded, download again." },
  SHA256_MISMATCH: { status: 422, doc: "A SHA-256 (of the download or of a file in the package) differs from the one expected; nothing was installed." },
  INVALID_MANIFEST: { status: 400, doc: "The package's manifest.json is missing, not valid JSON or breaks the manifest schema (see docs/OTA.md)." },
  INVALID_PACKAGE: { status: 400, doc: "The package zip is malformed or unsafe (paths leaving their root, links, files not in the manifest, sizes or compression over the limits)." },
  SIGNATURE_INVALID: { status: 403, doc: "The package's manifest.sig is missing or does not verify against [ota] public_key; nothing was installed." },
  PERMISSION_DENIED: { status: 403, doc: "moonflash may not write a target file or directory; nothing was changed." },
  HEALTH_CHECK_FAILED: { status: 500, doc: "After an update Klipper or an updated service did not come up within the probation time; the update was rolled back." },
  NO_PACKAGE: { status: 404, doc: "There is no downloaded package to install, or no installed update to roll back." },
  PROCESS_STOP_FAILED: { status: 500, doc: "A process named by the package did not stop after SIGTERM and SIGKILL, or may not be signalled; the update was rolled back." },
  VERSION_TOO_OLD: { status: 409, doc: "The package's min_version is above the installed version of that package; nothing was changed. Install the versions in between first." },
} as const satisfies Record<string, { status: number; doc: string }>;

export type ErrorCode = keyof typeof ERROR_CODES;

export class MoonflashError extends Error {
  readonly code: ErrorCode;
  readonly details: Record<string, unknown>;
  readonly [BRAND] = true;

  constructor(code: ErrorCode, message: string, details: Record<string, unknown> = {}, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "MoonflashError";
    this.code = code;
    this.details = details;
  }

  get status(): number {
    return ERROR_CODES[this.code].status;
  }

  toJSON(): { code: ErrorCode; message: string; details: Record<string, unknown> } {
    return { code: this.code, message: this.message, details: this.details };
  }
}

/** Checks the brand, not `instanceof`, so errors from another copy of the module still count. */
export function isMoonflashError(value: unknown): value is MoonflashError {
  return typeof value === "object" && value !== null && (value as Record<symbol, unknown>)[BRAND] === true;
}

/** Wraps anything thrown into a MoonflashError; Node's ENOSPC becomes DISK_FULL. */
export function toMoonflashError(err: unknown, fallback: ErrorCode = "INTERNAL"): MoonflashError {
  if (isMoonflashError(err)) return err;
  const errno = (err as NodeJS.ErrnoException | undefined)?.code;
  if (errno === "ENOSPC") {
    return new MoonflashError("DISK_FULL", "The disk is full. Free some space and try again.", {}, { cause: err });
  }
  // A part of the bundle loaded on first use is gone: update_manager replaced dist/ under the running service, which
  // it restarts a few seconds later.
  if (errno === "ERR_MODULE_NOT_FOUND" && /[/\\]dist[/\\]chunks[/\\]/.test(String((err as Error).message))) {
    return new MoonflashError(
      "INTERNAL",
      "moonflash was updated while it ran (a file it loads on first use is gone). It restarts in a moment; if not, restart it: sudo systemctl restart moonflash. Then try again.",
      {},
      { cause: err },
    );
  }
  const message = err instanceof Error ? err.message : String(err);
  return new MoonflashError(fallback, message, {}, { cause: err });
}

/** JSON-RPC error object for the agent's replies: Moonraker relays it to the caller inside a 424. */
export interface JsonRpcErrorObject {
  code: number;
  message: string;
  data: { code: ErrorCode; details: Record<string, unknown> };
}

export function toJsonRpcError(err: unknown): JsonRpcErrorObject {
  const e = toMoonflashError(err);
  // JSON-RPC's own code for invalid params, so generic clients recognise it.
  const code = e.code === "INVALID_PARAMS" ? -32602 : e.status;
  return { code, message: e.message, data: { code: e.code, details: e.details } };
}
