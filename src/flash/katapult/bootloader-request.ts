// The requests that make a board running Klipper reboot into Katapult before the flasher connects, as
// Katapult's scripts/flashtool.py does in serial mode (Klipper's docs/Bootloader_Entry.md lists both). Each opens
// the device for itself: neither is a Katapult exchange, so neither goes through a ByteLink.

import { closeSerialPort, openSerialPort, type ModemLines } from "../link.js";
import { SERIAL_BOOTLOADER_REQUEST } from "./codec.js";

/**
 * Asks a board running Klipper over USB CDC to reboot into its bootloader: Klipper reboots when the line coding is
 * set to 1200 baud and DTR drops (check_reboot in Klipper's src/generic/usb_cdc.c). The order is that of Klipper's
 * scripts/flash_usb.py enter_bootloader: DTR on, 1200 baud (both at open, and DTR again explicitly), DTR off,
 * close. The DTR ioctls fail with ENOTTY on ptys; that is expected and ignored.
 */
export async function requestUsbBootloader(path: string): Promise<void> {
  const port = await openSerialPort(path, 1200, { lock: false });
  await port.set(modemLines(true)).catch(() => undefined);
  await port.set(modemLines(false)).catch(() => undefined);
  await closeSerialPort(port);
}

/** The binding sets every modem line it is given and clears the rest: RTS stays up, as pyserial and serialport leave it. */
function modemLines(dtr: boolean): ModemLines {
  return { brk: false, cts: false, dtr, rts: true };
}

/**
 * Asks a board running Klipper over a UART to jump to Katapult: Klipper watches its serial input for this string
 * (console_task in src/generic/serial_irq.c calls bootloader_request), sent at the board's own baud.
 */
export async function sendSerialBootloaderRequest(path: string, baud: number): Promise<void> {
  const port = await openSerialPort(path, baud, { lock: true });
  try {
    await port.write(Buffer.from(SERIAL_BOOTLOADER_REQUEST));
    await port.drain();
  } finally {
    await closeSerialPort(port);
  }
}
