// Byte links: the only thing the Katapult session talks to. The serial implementation uses node-serialport's
// binding, loaded on first use (an idle agent does not need it). The session never sees paths, baud rates or
// ioctls (style.md §7.4), so tests can hand it an in-memory pair.

import { readSync, writeSync } from "node:fs";
import { stat } from "node:fs/promises";
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
  await port.set(modemLines(true)).catch(() => undefined);
  await port.set(modemLines(false)).catch(() => undefined);
  await closePort(port);
}

/** The binding sets every modem line it is given and clears the rest: RTS stays up, as pyserial and serialport leave it. */
function modemLines(dtr: boolean): { brk: boolean; cts: boolean; dtr: boolean; rts: boolean } {
  return { brk: false, cts: false, dtr, rts: true };
}

/** Asks a board running Klipper over a UART to jump to Katapult: Klipper watches its serial input for this string. */
export async function sendSerialBootloaderRequest(path: string, baud: number): Promise<void> {
  const port = await openPort(path, baud, true);
  try {
    await port.write(Buffer.from(SERIAL_BOOTLOADER_REQUEST));
    await port.drain();
  } finally {
    await closePort(port);
  }
}

/**
 * The part of node-serialport's Linux binding (@serialport/bindings-cpp LinuxPortBinding) this file uses: the
 * binding opens, configures (termios, flock, modem lines) and closes; the link reads and writes the non-blocking
 * fd itself when the binding's poller reports it ready.
 */
interface PolledPort {
  readonly fd: number | null;
  readonly isOpen: boolean;
  readonly poller: { once(event: "readable" | "writable" | "disconnect", callback: (err: Error | null) => void): unknown };
  write(buffer: Buffer): Promise<void>;
  set(options: { brk: boolean; cts: boolean; dtr: boolean; rts: boolean }): Promise<void>;
  drain(): Promise<void>;
  close(): Promise<void>;
}

/** Read errors that only mean "nothing more right now". */
const RETRY_CODES = new Set(["EAGAIN", "EWOULDBLOCK", "EINTR"]);

/**
 * Serial I/O straight on the fd: a synchronous read(2)/write(2) when epoll says the fd is ready. Katapult is one
 * round trip per 64-byte block, so per-exchange latency is what bounds a flash; the serialport stream's path (a
 * thread-pool read into a fresh 64 KiB buffer per chunk, a thread-pool write plus tcdrain) cost about 0.7 ms more
 * per exchange in a measurement on the virtual device.
 */
class SerialByteLink extends ByteLinkBase {
  private readonly readBuffer = Buffer.allocUnsafe(4096);
  private readonly writableWaiters = new Set<() => void>();
  private closing: Promise<void> | undefined;

  constructor(
    readonly description: string,
    private readonly port: PolledPort,
  ) {
    super();
    this.onClose(() => {
      for (const wake of [...this.writableWaiters]) wake();
    });
    port.poller.once("disconnect", (err) => {
      if (!isCancelled(err)) this.lost(err ?? new Error(`${description} disconnected`));
    });
    this.armRead();
  }

  async write(bytes: Uint8Array): Promise<void> {
    const buffer = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    let offset = 0;
    while (offset < buffer.length) {
      if (!this.isOpen || this.closing || this.port.fd === null) throw linkClosedError(this.description);
      try {
        offset += writeSync(this.port.fd, buffer, offset);
      } catch (err) {
        if (!RETRY_CODES.has((err as NodeJS.ErrnoException).code ?? "")) {
          // A pty whose master went away reports it here (EIO), a USB device that vanished with ENXIO/EIO.
          this.lost(err as Error);
          throw linkClosedError(this.description, err);
        }
        await this.writable();
      }
    }
  }

  async close(): Promise<void> {
    await this.release();
    this.markClosed();
  }

  /** Closes the port once; the binding's poller then cancels our pending waits (ignored, we asked for it). */
  private release(): Promise<void> {
    this.closing ??= closePort(this.port);
    return this.closing;
  }

  private armRead(): void {
    this.port.poller.once("readable", (err) => {
      if (isCancelled(err)) return;
      if (err) return this.lost(err);
      this.readAvailable();
    });
  }

  private readAvailable(): void {
    while (this.isOpen && !this.closing && this.port.fd !== null) {
      let count: number;
      try {
        count = readSync(this.port.fd, this.readBuffer, 0, this.readBuffer.length, null);
      } catch (err) {
        if (RETRY_CODES.has((err as NodeJS.ErrnoException).code ?? "")) break;
        return this.lost(err as Error);
      }
      // read(2) of 0 on a tty is a hang-up: the device went away.
      if (count === 0) return this.lost(new Error(`${this.description} hung up`));
      this.emitData(Buffer.from(this.readBuffer.subarray(0, count)));
    }
    if (this.isOpen && !this.closing) this.armRead();
  }

  private writable(): Promise<void> {
    return new Promise<void>((resolve) => {
      const wake = (): void => {
        this.writableWaiters.delete(wake);
        resolve();
      };
      this.writableWaiters.add(wake);
      this.port.poller.once("writable", wake);
    });
  }

  /** The device went away: report it once and release the fd. */
  private lost(error: Error): void {
    if (!this.isOpen || this.closing) return;
    this.markClosed(error);
    void this.release();
  }
}

/** The binding cancels pending polls with this error when the port closes. */
function isCancelled(err: Error | null): boolean {
  return (err as { canceled?: boolean } | null)?.canceled === true;
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

async function openPort(path: string, baud: number, lock: boolean): Promise<PolledPort> {
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
  let port: unknown;
  try {
    port = await SerialPort.binding.open({ path, baudRate: baud, lock });
  } catch (err) {
    throw openError(path, err as Error);
  }
  if (!isPolledPort(port)) {
    await (port as { close(): Promise<void> }).close().catch(() => undefined);
    throw new MoonflashError("INTERNAL", `Serial flashing needs Linux (or another Unix); this system's serial binding has no pollable file descriptor.`, { device: path });
  }
  return port;
}

function isPolledPort(port: unknown): port is PolledPort {
  const candidate = port as Partial<PolledPort>;
  return typeof candidate.fd === "number" && typeof candidate.poller?.once === "function";
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

function closePort(port: PolledPort): Promise<void> {
  // A close error means the device is already gone, which is what close wants anyway.
  return port.isOpen ? port.close().catch(() => undefined) : Promise.resolve();
}
