// How Moonraker's failures read to moonflash: one MoonflashError per kind, with what to do.

import { MoonflashError } from "../core/errors.js";
import { MoonrakerRpcError } from "./rpc.js";

export function unavailable(message: string): MoonflashError {
  return new MoonflashError(
    "MOONRAKER_UNAVAILABLE",
    `${message}. Check that Moonraker is running; moonflash reconnects by itself.`,
  );
}

export function klipperNotConnected(reason: string): MoonflashError {
  return new MoonflashError(
    "KLIPPER_NOT_CONNECTED",
    `Klipper is not connected to Moonraker (${reason}). Start Klipper (or wait until it is up) and try again.`,
  );
}

/**
 * 503: Klipper is not connected. -32601: Moonraker has not seen Klipper since it started, so the printer.*
 * endpoints are not even registered yet (Moonraker registers them when Klippy connects).
 */
export function isKlipperAway(err: unknown): err is MoonrakerRpcError {
  return err instanceof MoonrakerRpcError && (err.code === 503 || err.code === -32601);
}

export function requestFailed(err: unknown): unknown {
  if (!(err instanceof MoonrakerRpcError)) return err;
  return new MoonflashError(
    "MOONRAKER_REQUEST_FAILED",
    `Moonraker answered ${err.method} with an error: ${err.message}. See Moonraker's log for details.`,
    { method: err.method, rpcCode: err.code, data: err.data },
  );
}

export function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
