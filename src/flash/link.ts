// Byte links: the only thing the Katapult session talks to. The serial implementation uses node-serialport's
// binding, loaded on first use (an idle agent does not need it). The session never sees paths, baud rates or
// ioctls, so tests can hand it an in-memory pair.

import { fstatSync, readSync, statSync, writeSync } from "node:fs";
import { stat } from "node:fs/promises";
import type { Logger } from "pino";
import { MoonflashError } from "../core/errors.js";

/** A bidirectional byte stream to one device. */
export interface ByteLink {
  /** What the link is connected to, for messages (a device path). */
  readonly description: string;
  readonly isOpen: boolean;
  /**
   * Resolves once the bytes are handed to the OS, whole and in call order; rejects when the link is closed or the
   * device vanished.
   */
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
  /** Gets the one warning when the binding's internals are missing and the slower public API carries the bytes. */
  logger?: Logger;
  /**
   * Treat the binding's fd and poller as missing, so the public binding API carries the bytes: the seam that lets
   * tests run that path on a binding that has them.
   */
  ignoreBindingInternals?: boolean;
}

/**
 * Opens a serial device (USB CDC, UART or pty) as a ByteLink. Reads and writes go straight to the binding's fd
 * when its internals are there and belong to this device (PolledSerialLink); otherwise, after one warning to the
 * logger, through the binding's public read/write (BindingSerialLink), which is slower but relies on nothing else.
 */
export async function openSerialLink(path: string, baud: number, options: SerialOpenOptions = {}): Promise<ByteLink> {
  const port = await openSerialPort(path, baud, { lock: options.lock ?? true });
  const access = options.ignoreBindingInternals ? { missing: "ignored by the caller" } : directAccess(port, path);
  if ("polled" in access) return new PolledSerialLink(path, access.polled);
  announceFallback(options.logger, path, access.missing);
  return new BindingSerialLink(path, port);
}

/** Modem control lines as the binding's set() takes them: each line given true is raised, the others dropped. */
export interface ModemLines {
  brk: boolean;
  cts: boolean;
  dtr: boolean;
  rts: boolean;
}

/**
 * The per-port API every node-serialport binding has (BindingPortInterface, packages/bindings-interface), as far
 * as moonflash uses it: the fallback link and the bootloader requests need nothing more.
 */
export interface SerialPortHandle {
  readonly isOpen: boolean;
  read(buffer: Buffer, offset: number, length: number): Promise<{ bytesRead: number }>;
  write(buffer: Buffer): Promise<void>;
  set(lines: ModemLines): Promise<void>;
  drain(): Promise<void>;
  close(): Promise<void>;
}

/**
 * Opens and configures a serial device through node-serialport's binding (termios, flock, modem lines), loaded on
 * first use. Errors are MoonflashErrors: DEVICE_NOT_FOUND, DEVICE_PERMISSION, DEVICE_IN_USE.
 */
export async function openSerialPort(path: string, baud: number, options: { lock: boolean }): Promise<SerialPortHandle> {
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
  try {
    return await SerialPort.binding.open({ path, baudRate: baud, lock: options.lock });
  } catch (err) {
    throw openError(path, err as Error);
  }
}

export function closeSerialPort(port: SerialPortHandle): Promise<void> {
  // A close error means the device is already gone, which is what close wants anyway.
  return port.isOpen ? port.close().catch(() => undefined) : Promise.resolve();
}

/**
 * What PolledSerialLink uses beyond the public API: LinuxPortBinding's fd and poller
 * (packages/bindings-cpp/lib/linux.ts, lib/poller.ts). package.json pins the binding's version; directAccess
 * still checks them at every open, since a different install may bring another version.
 */
interface PolledPort extends SerialPortHandle {
  readonly fd: number | null;
  readonly poller: { once(event: "readable" | "writable" | "disconnect", callback: (err: Error | null) => void): unknown };
}

/** The fd and poller when they are there and the fd is this device's; otherwise why not. */
function directAccess(port: SerialPortHandle, path: string): { polled: PolledPort } | { missing: string } {
  const { fd, poller } = port as Partial<Record<"fd" | "poller", unknown>>;
  if (typeof fd !== "number" || !Number.isInteger(fd) || fd < 0) return { missing: `the binding has no file descriptor (fd: ${String(fd)})` };
  if (typeof (poller as { once?: unknown } | undefined)?.once !== "function") return { missing: "the binding has no poller with once()" };
  // A number that means something else in another binding version would read and write some other file.
  try {
    if (fstatSync(fd).rdev !== statSync(path).rdev) return { missing: `the binding's fd ${fd} is not ${path}` };
  } catch (err) {
    return { missing: `the binding's fd ${fd} cannot be examined (${(err as Error).message})` };
  }
  return { polled: port as PolledPort };
}

/**
 * The loggers already told: the fallback is a property of the installed binding, not of one device, so each
 * logger hears of it once (the agent's Katapult flasher has one logger for the life of the process).
 */
const fallbackAnnounced = new WeakSet<Logger>();

function announceFallback(logger: Logger | undefined, path: string, reason: string): void {
  if (!logger || fallbackAnnounced.has(logger)) return;
  fallbackAnnounced.add(logger);
  logger.warn(
    { device: path, reason },
    `Serial I/O uses serialport's public read/write (slower per exchange): ${reason}. Run npm ci in the moonflash directory to get the pinned @serialport/bindings-cpp back.`,
  );
}

/** Read errors that only mean "nothing more right now". */
const RETRY_CODES = new Set(["EAGAIN", "EWOULDBLOCK", "EINTR"]);

/** Writing in call order, closing, and noticing the device went away, as both serial links do it. */
abstract class SerialLink<Port extends SerialPortHandle> extends ByteLinkBase {
  private closing: Promise<void> | undefined;
  private lastWrite: Promise<void> = Promise.resolve();

  constructor(
    readonly description: string,
    protected readonly port: Port,
  ) {
    super();
  }

  /** Hands all of `buffer` to the OS; a write that needs several write(2)s must not interleave with another. */
  protected abstract writeWhole(buffer: Buffer): Promise<void>;

  write(bytes: Uint8Array): Promise<void> {
    const written = this.lastWrite.then(() => this.writeWhole(Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength)));
    this.lastWrite = written.catch(() => undefined);
    return written;
  }

  async close(): Promise<void> {
    await this.release();
    this.markClosed();
  }

  /** Closed, closing or lost: no more reads or writes. */
  protected get stopped(): boolean {
    return !this.isOpen || this.closing !== undefined;
  }

  /** The device went away: report it once and release the port. */
  protected lost(error: Error): void {
    if (this.stopped) return;
    this.markClosed(error);
    void this.release();
  }

  /** Closes the port once; the binding then cancels our pending waits (ignored, we asked for it). */
  private release(): Promise<void> {
    this.closing ??= closeSerialPort(this.port);
    return this.closing;
  }
}

/**
 * Serial I/O straight on the fd: a synchronous read(2)/write(2) when epoll says the fd is ready. Katapult is one
 * round trip per 64-byte block, so per-exchange latency is what bounds a flash; the serialport stream's path (a
 * thread-pool read into a fresh 64 KiB buffer per chunk, a thread-pool write plus tcdrain) cost about 0.7 ms more
 * per exchange in a measurement on the virtual device.
 */
class PolledSerialLink extends SerialLink<PolledPort> {
  private readonly readBuffer = Buffer.allocUnsafe(4096);
  private readonly writableWaiters = new Set<() => void>();

  constructor(description: string, port: PolledPort) {
    super(description, port);
    this.onClose(() => {
      for (const wake of [...this.writableWaiters]) wake();
    });
    port.poller.once("disconnect", (err) => {
      if (!isCancelled(err)) this.lost(err ?? new Error(`${description} disconnected`));
    });
    this.armRead();
  }

  protected async writeWhole(buffer: Buffer): Promise<void> {
    let offset = 0;
    while (offset < buffer.length) {
      if (this.stopped || this.port.fd === null) throw linkClosedError(this.description);
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

  private readonly onReadable = (err: Error | null): void => {
    if (isCancelled(err)) return;
    if (err) return this.lost(err);
    this.readAvailable();
  };

  private armRead(): void {
    this.port.poller.once("readable", this.onReadable);
  }

  private readAvailable(): void {
    while (!this.stopped && this.port.fd !== null) {
      let count: number;
      try {
        count = readSync(this.port.fd, this.readBuffer, 0, this.readBuffer.length, null);
      } catch (err) {
        if (RETRY_CODES.has((err as NodeJS.ErrnoException).code ?? "")) break;
        return this.lost(err as Error);
      }
      // read(2) of 0 on a tty is a hang-up: the device went away.
      if (count === 0) return this.lost(new Error(`${this.description} hung up`));
      const chunk = Buffer.allocUnsafe(count);
      this.readBuffer.copy(chunk, 0, 0, count);
      this.emitData(chunk);
      // A short read emptied the tty's queue: stop here rather than read again into EAGAIN, which readSync throws
      // as an Error with a stack trace, once per readable event. The poller reports new bytes.
      if (count < this.readBuffer.length) break;
    }
    if (!this.stopped) this.armRead();
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
}

/**
 * Serial I/O through the binding's public read/write, for a binding whose internals PolledSerialLink cannot use.
 * Each call is a thread-pool read(2) or write(2) that waits on the binding's own poller when the fd is not ready
 * (packages/bindings-cpp/lib/unix-read.ts, unix-write.ts): slower per exchange, the same bytes.
 */
class BindingSerialLink extends SerialLink<SerialPortHandle> {
  private readonly readBuffer = Buffer.allocUnsafe(4096);

  constructor(description: string, port: SerialPortHandle) {
    super(description, port);
    void this.readLoop();
  }

  protected async writeWhole(buffer: Buffer): Promise<void> {
    if (this.stopped) throw linkClosedError(this.description);
    try {
      await this.port.write(buffer);
    } catch (err) {
      // EIO from a pty whose master went away or a USB device that vanished.
      this.lost(err as Error);
      throw linkClosedError(this.description, err);
    }
  }

  /**
   * Reads until the link stops. The binding retries a read of 0 bytes (a tty hang-up) itself, so a vanished USB
   * device shows as the next write's EIO; a pty's vanished master as EIO here.
   */
  private async readLoop(): Promise<void> {
    while (!this.stopped) {
      let bytesRead: number;
      try {
        ({ bytesRead } = await this.port.read(this.readBuffer, 0, this.readBuffer.length));
      } catch (err) {
        if (!isCancelled(err as Error)) this.lost(err as Error);
        return;
      }
      this.emitData(Buffer.from(this.readBuffer.subarray(0, bytesRead)));
    }
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

// bindings-cpp reports open errors as text without an errno code: "Error: Permission denied, cannot open <path>"
// from open(2), "Error Resource temporarily unavailable Cannot lock port" from flock (packages/bindings-cpp/src/
// serialport_unix.cpp).
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
      "DEVICE_PERMISSION",
      `moonflash may not open ${path} (permission denied): add the user moonflash runs as to the dialout group (sudo usermod -aG dialout $USER, then log in again or restart the service).`,
      { device: path },
      { cause: err },
    );
  }
  if (/no such file/i.test(text)) {
    return new MoonflashError("DEVICE_NOT_FOUND", `No serial device at ${path}. Check the cable and the [mcu] serial setting.`, { device: path }, { cause: err });
  }
  return new MoonflashError("DEVICE_NOT_FOUND", `Could not open ${path}: ${text}`, { device: path }, { cause: err });
}
