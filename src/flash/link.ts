// Byte links: the only thing the Katapult session talks to. The serial implementation wraps node-serialport;
// the session never sees paths, baud rates or ioctls (style.md §7.4), so tests can hand it an in-memory pair.

import { stat } from "node:fs/promises";
// serialport (native) is loaded on first use: an idle agent does not need it (docs/BENCHMARKS.md).
import type { SerialPort } from "serialport";
import { MoonflashError } from "../core/errors.js";
import { SERIAL_BOOTLOADER_REQUEST } from "./katapult/codec.js";

/** A bidirectional byte stream to one device. */
export interface ByteLink {
  /** What the link is connected to, for messages (a device path). */
  readonly description: string;
  readonly isOpen: boolean;
  /** Resolves once the bytes are handed to the OS; rejects when the link is closed or the device vanished. */
  write(bytes: Uint8Array): Promise<void>;
  /** Subscribes to incoming bytes; returns the unsubscribe function. */
  onData(listener: (chunk: Buffer) => void): () => void;
  /** Called once when the link closes: by close() (no error) or because the device went away (with the error). */
  onClose(listener: (error?: Error) => void): () => void;
  close(): Promise<void>;
}

/** The listener half every ByteLink shares: data and close subscribers, and closing exactly once. */
export abstract class ByteLinkBase implements ByteLink {
  private readonly dataListeners = new Set<(chunk: Buffer) => void>();
  private readonly closeListeners = new Set<(error?: Error) => void>();
  private closed = false;

  abstract readonly description: string;
  abstract write(bytes: Uint8Array): Promise<void>;
  abstract close(): Promise<void>;

  get isOpen(): boolean {
    return !this.closed;
  }

  onData(listener: (chunk: Buffer) => void): () => void {
    this.dataListeners.add(listener);
    return () => this.dataListeners.delete(listener);
  }

  onClose(listener: (error?: Error) => void): () => void {
    this.closeListeners.add(listener);
    return () => this.closeListeners.delete(listener);
  }

  protected emitData(chunk: Buffer): void {
    if (this.closed) return;
    for (const listener of [...this.dataListeners]) listener(chunk);
  }

  protected markClosed(error?: Error): void {
    if (this.closed) return;
    this.closed = true;
    for (const listener of [...this.closeListeners]) listener(error);
    this.closeListeners.clear();
    this.dataListeners.clear();
  }
}

export interface SerialOpenOptions {
  /** flock the device so a second opener (Klipper, another flash) fails; default true. */
  lock?: boolean;
}

/** Opens a serial device (USB CDC, UART or pty) as a ByteLink. */
export async function openSerialLink(path: string, baud: number, options: SerialOpenOptions = {}): Promise<ByteLink> {
  const port = await openPort(path, baud, options.lock ?? true);
  return new SerialByteLink(path, port);
}

/**
 * Asks a board running Klipper over USB CDC to reboot into its bootloader: Klipper reboots when the line coding is
 * set to 1200 baud and DTR drops (check_reboot in Klipper's src/generic/usb_cdc.c). Same order as flashtool.py:
 * DTR on, 1200 baud, DTR off, close. The DTR ioctls fail with ENOTTY on ptys; that is expected and ignored.
 */
export async function requestUsbBootloader(path: string): Promise<void> {
  const port = await openPort(path, 1200, false);
  await setModemLinesBestEffort(port, { dtr: true });
  await setModemLinesBestEffort(port, { dtr: false });
  await closePort(port);
}

/** Asks a board running Klipper over a UART to jump to Katapult: Klipper watches its serial input for this string. */
export async function sendSerialBootloaderRequest(path: string, baud: number): Promise<void> {
  const port = await openPort(path, baud, true);
  try {
    await writeAndDrain(port, SERIAL_BOOTLOADER_REQUEST);
  } finally {
    await closePort(port);
  }
}

class SerialByteLink extends ByteLinkBase {
  constructor(
    readonly description: string,
    private readonly port: SerialPort,
  ) {
    super();
    port.on("data", (chunk: Buffer) => this.emitData(chunk));
    // Without an error listener a failed write would crash the process; the write's own callback reports it.
    port.on("error", () => undefined);
    port.on("close", (error?: Error) => this.markClosed(error ?? undefined));
  }

  async write(bytes: Uint8Array): Promise<void> {
    if (!this.isOpen) throw linkClosedError(this.description);
    try {
      await writeAndDrain(this.port, bytes);
    } catch (err) {
      // A pty whose master went away only reports it here (EIO on write), never on the read side.
      this.markClosed(err as Error);
      throw linkClosedError(this.description, err);
    }
  }

  async close(): Promise<void> {
    if (this.port.isOpen) await closePort(this.port);
    this.markClosed();
  }
}

/** The error every ByteLink method throws once the device is gone; the session maps it to a job error. */
export function linkClosedError(description: string, cause?: unknown): MoonflashError {
  return new MoonflashError(
    "DEVICE_NOT_FOUND",
    `The serial link to ${description} is closed (the device disconnected or reset). Check the cable and that the board is powered, then flash again.`,
    { device: description, disconnected: true },
    { cause },
  );
}

async function openPort(path: string, baud: number, lock: boolean): Promise<SerialPort> {
  try {
    await stat(path);
  } catch (err) {
    throw new MoonflashError(
      "DEVICE_NOT_FOUND",
      `No serial device at ${path}. Check the cable and the [mcu] serial setting (ls /dev/serial/by-id/).`,
      { device: path },
      { cause: err },
    );
  }
  const { SerialPort } = await import("serialport");
  const port = new SerialPort({ path, baudRate: baud, autoOpen: false, lock });
  try {
    await new Promise<void>((resolve, reject) => port.open((err) => (err ? reject(err) : resolve())));
  } catch (err) {
    throw openError(path, err as Error);
  }
  return port;
}

// node-serialport's open errors carry no errno code, only the strerror text.
function openError(path: string, err: Error): MoonflashError {
  const text = err.message;
  if (/cannot lock port|resource temporarily unavailable/i.test(text)) {
    return new MoonflashError(
      "DEVICE_IN_USE",
      `${path} is held open by another program (Klipper?). Stop it before flashing.`,
      { device: path },
      { cause: err },
    );
  }
  if (/permission denied/i.test(text)) {
    return new MoonflashError(
      "DEVICE_NOT_FOUND",
      `No permission to open ${path}. Add the moonflash user to the dialout group and log in again.`,
      { device: path },
      { cause: err },
    );
  }
  if (/no such file/i.test(text)) {
    return new MoonflashError("DEVICE_NOT_FOUND", `No serial device at ${path}. Check the cable and the [mcu] serial setting.`, { device: path }, { cause: err });
  }
  return new MoonflashError("DEVICE_NOT_FOUND", `Could not open ${path}: ${text}`, { device: path }, { cause: err });
}

function writeAndDrain(port: SerialPort, bytes: Uint8Array): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    port.write(Buffer.from(bytes), (writeErr) => {
      if (writeErr) return reject(writeErr);
      port.drain((drainErr) => (drainErr ? reject(drainErr) : resolve()));
    });
  });
}

function closePort(port: SerialPort): Promise<void> {
  return new Promise<void>((resolve) => {
    if (!port.isOpen) return resolve();
    // A close error means the device is already gone, which is what close wants anyway.
    port.close(() => resolve());
  });
}

function setModemLinesBestEffort(port: SerialPort, lines: { dtr: boolean }): Promise<void> {
  return new Promise<void>((resolve) => port.set(lines, () => resolve()));
}
