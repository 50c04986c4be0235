// A virtual Katapult board on a real pseudo-terminal: the device model (katapult-device.ts) wired to a pty relay
// (pty-relay.ts). Hosts open `path` like a serial port. With `reappearPath` it imitates USB re-enumeration: after
// a bootloader request the pty vanishes and a new one appears at `reappearPath` (by-id names change from
// usb-Klipper_… to usb-katapult_…), and after COMPLETE it comes back at `path`.

import { EventEmitter } from "node:events";
import type { Logger } from "pino";
import { KatapultDeviceModel, type BlockEvent, type DeviceModelOptions } from "./katapult-device.js";
import { openPtyRelay, type PtyRelay } from "./pty-relay.js";

/** transmit_buf[96] in Katapult's src/generic/serial_irq.c. */
const KATAPULT_SERIAL_TRANSMIT_BUFFER = 96;

export interface VirtualDeviceOptions extends DeviceModelOptions {
  /** Symlink to create: the device path the host opens. */
  path: string;
  /** USB re-enumeration: after the bootloader request the device comes back as a NEW pty linked here. */
  reappearPath?: string;
  /** Time the device is absent while "re-enumerating". Default 300 ms. */
  reappearDelayMs?: number;
  /** Python 3 interpreter for the pty helper. Default "python3". */
  python?: string;
  /** Link speed: the pty relay passes bytes no faster than a UART at this baud (baud/10 per second each way). */
  baud?: number;
  /**
   * With `baud`: the board's serial transmit buffer; a reply that does not fit beside the unsent rest is dropped.
   * Default 96, Katapult's UART and CAN builds (transmit_buf in src/generic/serial_irq.c).
   */
  transmitBuffer?: number;
  logger?: Logger;
}

export interface VirtualDeviceEvents {
  bootloader: [];
  block: [block: BlockEvent];
  complete: [];
  disconnect: [];
}

export interface VirtualDevice extends EventEmitter<VirtualDeviceEvents> {
  /** Where the device is linked now (`path`, or `reappearPath` while re-enumerated into Katapult). */
  readonly path: string;
  /** The pty slave behind `path`, or undefined while the device is absent. */
  readonly slavePath: string | undefined;
  readonly model: KatapultDeviceModel;
  /** Stops the model, closes the pty and removes the link. */
  stop(): Promise<void>;
}

class PtyVirtualDevice extends EventEmitter<VirtualDeviceEvents> implements VirtualDevice {
  readonly model: KatapultDeviceModel;
  private relay: PtyRelay | undefined;
  private currentPath: string;
  private stopped = false;
  /** The running re-enumeration or disconnect, so stop() can wait for it. */
  private transition: Promise<void> = Promise.resolve();

  constructor(private readonly options: VirtualDeviceOptions) {
    super();
    this.currentPath = options.path;
    this.model = new KatapultDeviceModel(options);
    this.model.on("reply", (bytes) => this.relay?.write(bytes));
    this.model.on("block", (block) => this.emit("block", block));
    this.model.on("bootloader", () => {
      this.emit("bootloader");
      if (options.reappearPath) this.moveTo(options.reappearPath);
    });
    this.model.on("complete", () => {
      this.emit("complete");
      if (options.reappearPath && this.currentPath !== options.path) this.moveTo(options.path);
    });
    this.model.on("disconnect", () => {
      this.transition = this.transition.then(() => this.detach()).then(() => {
        this.emit("disconnect");
      });
    });
  }

  get path(): string {
    return this.currentPath;
  }

  get slavePath(): string | undefined {
    return this.relay?.slavePath;
  }

  async attach(path: string): Promise<void> {
    const relay = await openPtyRelay(path, {
      python: this.options.python,
      logger: this.options.logger,
      baud: this.options.baud,
      transmitBuffer: this.options.transmitBuffer ?? KATAPULT_SERIAL_TRANSMIT_BUFFER,
    });
    if (this.stopped) {
      await relay.close();
      return;
    }
    this.relay = relay;
    this.currentPath = path;
    if (relay.baud !== undefined) this.model.lineBaud(relay.baud);
    relay.on("data", (bytes) => this.model.receive(bytes));
    relay.on("baud", (baud) => this.model.lineBaud(baud));
    relay.on("close", () => this.model.lineClosed());
    relay.on("exit", (code) => {
      if (this.relay === relay && !this.stopped) {
        this.options.logger?.error({ path, code }, "virtual device pty helper exited unexpectedly");
        this.relay = undefined;
      }
    });
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.model.stop();
    await this.transition;
    await this.detach();
  }

  private async detach(): Promise<void> {
    const relay = this.relay;
    this.relay = undefined;
    await relay?.close();
  }

  /** USB re-enumeration: the old pty and link vanish, a new pty appears at `path` a little later. */
  private moveTo(path: string): void {
    this.transition = this.transition
      .then(() => this.detach())
      .then(() => new Promise((resolve) => setTimeout(resolve, this.options.reappearDelayMs ?? 300)))
      .then(() => (this.stopped ? undefined : this.attach(path)))
      .catch((err: unknown) => {
        this.options.logger?.error({ err, path }, "virtual device could not re-appear");
      });
  }
}

/** Starts a virtual Katapult board linked at `options.path`. */
export async function startVirtualDevice(options: VirtualDeviceOptions): Promise<VirtualDevice> {
  const device = new PtyVirtualDevice(options);
  await device.attach(options.path);
  return device;
}
