// A virtual Katapult bootloader (and the Klipper app that hands over to it), as a pure byte model: bytes in,
// reply bytes out through the 'reply' event. No I/O (link speed is the pty relay's); timers only for the write
// delay and the 100 ms jump after COMPLETE. Behaviour follows Katapult's firmware (src/command.c command_find_block and
// command_dispatch, src/flashcmd.c, src/stm32/flash.c flash_write_block) and the host side in its
// scripts/flashtool.py.

import { EventEmitter } from "node:events";
import { MoonflashError } from "../core/errors.js";
import {
  Command,
  FrameDecoder,
  SERIAL_BOOTLOADER_REQUEST,
  VALID_BLOCK_SIZES,
  commandName,
  encodeAck,
  encodeBusy,
  encodeConnectPayload,
  encodeError,
  encodeNack,
  u32le,
  type CommandName,
  type DecodeItem,
  type Frame,
} from "../flash/katapult/codec.js";

export type DeviceMode = "katapult" | "app";

/** Which frames a counted fault applies to: one command by name, or every frame ("any"). */
export type FaultCommand = CommandName | "any";

export type Fault =
  /** Process the Nth matching frame but send no reply. */
  | { kind: "drop-reply"; command: FaultCommand; n: number }
  /** Answer the Nth matching frame with NACK (0xF1) without processing it. */
  | { kind: "nack"; command: FaultCommand; n: number }
  /** Answer the Nth matching frame with BUSY (0xF3) without processing it. */
  | { kind: "busy"; command: FaultCommand; n: number }
  /** Answer the Nth matching frame with ERROR (0xF2) without processing it. */
  | { kind: "error"; command: FaultCommand; n: number }
  /** Flip bits in REQUEST_BLOCK data for this block index, or for every block when omitted. */
  | { kind: "corrupt-readback"; block?: number }
  /** After this many SEND_BLOCKs the next frame finds the device gone: it emits 'disconnect' and never answers. */
  | { kind: "disconnect"; afterBlocks: number }
  /** Never answer anything. */
  | { kind: "silence" };

export interface DeviceModelOptions {
  /** MCU type reported by CONNECT. Default "stm32f103xe". */
  mcuType?: string;
  /** 64, 128, 256 or 512. Default 64 (every shipped Katapult build). */
  blockSize?: number;
  /** CONFIG_LAUNCH_APP_ADDRESS. Default 0x8002000. */
  appStartAddress?: number;
  /** Bytes of application flash; writes past it fail with ERROR. Default 256 KiB. */
  flashSize?: number;
  /** Protocol version word. Default 0x00010100 ("1.1.0"). */
  protocolWord?: number;
  /** Katapult build version reported by CONNECT. Default "v0.13.0-virtual". */
  softwareVersion?: string;
  /** Flash page size: SEND_EOF reports how many pages were written. Default 1024. */
  pageSize?: number;
  /** Extra time each SEND_BLOCK takes before its reply (and before the next frame is read). Default 0. */
  writeDelayMs?: number;
  /** Start in the bootloader ("katapult") or in Klipper ("app"). Default "katapult". */
  mode?: DeviceMode;
  faults?: Fault[];
}

export interface ReceivedFrame {
  /** Command name from the codec, e.g. "SEND_BLOCK", or "0x90" for an unknown id. */
  name: string;
  cmd: number;
  /** For SEND_BLOCK and REQUEST_BLOCK. */
  address?: number;
}

export interface BlockEvent {
  address: number;
  /** Block index from the application start. */
  index: number;
}

/** Time the COMPLETE handler waits before jumping to the application (flashcmd.c complete_task). */
const APP_JUMP_DELAY_MS = 100;

const FAULT_KINDS = ["drop-reply", "nack", "busy", "error", "corrupt-readback", "disconnect", "silence"] as const;

/**
 * Parses the CLI form of a fault: `drop-reply:SEND_BLOCK:3`, `busy:SEND_BLOCK:5`, `nack:CONNECT:1`,
 * `error:any:2`, `corrupt-readback`, `corrupt-readback:7`, `disconnect:10`, `silence`.
 */
export function parseFault(text: string): Fault {
  const parts = text.trim().split(":");
  const kind = parts[0]!.toLowerCase();
  const bad = (why: string): MoonflashError =>
    new MoonflashError(
      "INVALID_PARAMS",
      `Bad fault "${text}": ${why}. Use e.g. drop-reply:SEND_BLOCK:3, busy:SEND_BLOCK:5, nack:CONNECT:1, error:any:2, corrupt-readback[:BLOCK], disconnect:BLOCKS or silence.`,
      { fault: text },
    );
  const count = (value: string | undefined, what: string, min: number): number => {
    if (value === undefined || !/^\d+$/.test(value)) throw bad(`${what} must be a whole number`);
    const n = Number(value);
    if (n < min) throw bad(`${what} must be at least ${min}`);
    return n;
  };
  switch (kind) {
    case "drop-reply":
    case "nack":
    case "busy":
    case "error": {
      if (parts.length !== 3) throw bad(`expected ${kind}:COMMAND:N`);
      const name = parts[1]!.toUpperCase();
      const command = name === "ANY" ? "any" : name;
      if (command !== "any" && !(command in Command)) {
        throw bad(`unknown command "${parts[1]}" (one of ${Object.keys(Command).join(", ")}, any)`);
      }
      return { kind, command: command as FaultCommand, n: count(parts[2], "N", 1) };
    }
    case "corrupt-readback":
      if (parts.length > 2) throw bad("expected corrupt-readback or corrupt-readback:BLOCK");
      return parts.length === 2 ? { kind, block: count(parts[1], "BLOCK", 0) } : { kind };
    case "disconnect":
      if (parts.length !== 2) throw bad("expected disconnect:BLOCKS");
      return { kind, afterBlocks: count(parts[1], "BLOCKS", 0) };
    case "silence":
      if (parts.length !== 1) throw bad("silence takes no arguments");
      return { kind };
    default:
      throw bad(`unknown kind "${parts[0]}" (one of ${FAULT_KINDS.join(", ")})`);
  }
}

/** Events of the device model, as listener argument lists. */
export interface DeviceModelEvents {
  reply: [bytes: Buffer];
  bootloader: [];
  block: [block: BlockEvent];
  complete: [];
  disconnect: [];
}

/**
 * The device. Feed host bytes with `receive`, line events with `lineBaud`/`lineClosed`; replies come out as
 * 'reply' events. Events: 'bootloader' (entered Katapult), 'block' (a SEND_BLOCK was stored), 'complete'
 * (jumped to the app after COMPLETE), 'disconnect' (the disconnect fault fired).
 */
export class KatapultDeviceModel extends EventEmitter<DeviceModelEvents> {
  readonly mcuType: string;
  readonly blockSize: number;
  readonly appStartAddress: number;
  readonly pageSize: number;
  readonly protocolWord: number;
  readonly softwareVersion: string;
  /** Application flash, 0xFF when erased; index 0 is appStartAddress. */
  readonly flash: Buffer;
  /** Commands received in Katapult mode, in order. */
  readonly frames: ReceivedFrame[] = [];
  /** Bytes programmed by accepted SEND_BLOCKs (identical retransmits are not counted again). */
  written = 0;
  /**
   * Bytes that reached the device while it was programming a block (its write delay): a UART bootloader loses
   * them, its CPU stalling on flash, so a host must never make this grow. Kept (not dropped) so tests can show it.
   */
  bytesWhileWriting = 0;
  /** True once COMPLETE was accepted ('complete' follows ~100 ms later, when the app starts). */
  completed = false;
  private currentMode: DeviceMode;
  private gone = false;

  private readonly writeDelayMs: number;
  private readonly faults: Fault[];
  private readonly decoder = new FrameDecoder();
  /** Decoded items waiting while a SEND_BLOCK write delay holds the command loop. */
  private readonly pending: DecodeItem[] = [];
  private holding = false;
  /** command_find_block's CF_NEED_VALID: one NACK per run of bad bytes. */
  private needValid = false;
  private readonly seenByCommand = new Map<number, number>();
  private seenFrames = 0;
  private sendBlocks = 0;
  /** Pages whose first block was programmed since the bootloader started (flash.c page_write_count). */
  private pageWriteCount = 0;
  /** App mode: the last bytes seen, to find the bootloader request string across chunk boundaries. */
  private appTail = Buffer.alloc(0);
  private lineBaudRate: number | undefined;
  private readonly timers = new Set<NodeJS.Timeout>();

  constructor(options: DeviceModelOptions = {}) {
    super();
    this.mcuType = options.mcuType ?? "stm32f103xe";
    this.blockSize = options.blockSize ?? 64;
    this.appStartAddress = options.appStartAddress ?? 0x8002000;
    this.pageSize = options.pageSize ?? 1024;
    this.protocolWord = options.protocolWord ?? 0x00010100;
    this.softwareVersion = options.softwareVersion ?? "v0.13.0-virtual";
    this.writeDelayMs = options.writeDelayMs ?? 0;
    this.currentMode = options.mode ?? "katapult";
    this.faults = options.faults ?? [];
    const flashSize = options.flashSize ?? 256 * 1024;
    const invalid = (what: string): MoonflashError =>
      new MoonflashError("INVALID_PARAMS", `Virtual device: ${what}.`, { options: { ...options, faults: undefined } });
    if (!(VALID_BLOCK_SIZES as readonly number[]).includes(this.blockSize)) {
      throw invalid(`blockSize must be one of ${VALID_BLOCK_SIZES.join(", ")}, got ${this.blockSize}`);
    }
    if (!Number.isInteger(this.pageSize) || this.pageSize < this.blockSize || this.pageSize % this.blockSize !== 0) {
      throw invalid(`pageSize must be a multiple of blockSize (${this.blockSize}), got ${this.pageSize}`);
    }
    if (!Number.isInteger(flashSize) || flashSize <= 0 || flashSize % this.pageSize !== 0) {
      throw invalid(`flashSize must be a positive multiple of pageSize (${this.pageSize}), got ${flashSize}`);
    }
    if (!Number.isInteger(this.appStartAddress) || this.appStartAddress < 0 || this.appStartAddress % this.blockSize !== 0) {
      throw invalid(`appStartAddress must be a block-aligned address, got ${this.appStartAddress}`);
    }
    if (!(this.writeDelayMs >= 0)) throw invalid(`writeDelayMs must be >= 0, got ${this.writeDelayMs}`);
    this.flash = Buffer.alloc(flashSize, 0xff);
  }

  get mode(): DeviceMode {
    return this.currentMode;
  }

  /** Bytes from the host. */
  receive(bytes: Uint8Array): void {
    if (this.gone) return;
    if (this.holding) this.bytesWhileWriting += bytes.length;
    this.consume(Buffer.from(bytes));
  }

  /** The host set the line speed (Klipper's USB CDC watches for 1200 baud). */
  lineBaud(baud: number): void {
    this.lineBaudRate = baud;
  }

  /** The host closed the line: at 1200 baud that is the USB CDC bootloader request (usb_cdc.c check_reboot). */
  lineClosed(): void {
    if (this.currentMode === "app" && this.lineBaudRate === 1200 && !this.gone) this.enterBootloader();
  }

  /** Cancels pending timers (write delay, app jump); the model answers nothing afterwards. */
  stop(): void {
    this.gone = true;
    for (const timer of this.timers) clearTimeout(timer);
    this.timers.clear();
  }

  private later(ms: number, fn: () => void): void {
    const timer = setTimeout(() => {
      this.timers.delete(timer);
      fn();
    }, ms);
    this.timers.add(timer);
  }

  private consume(chunk: Buffer): void {
    if (this.gone) return;
    if (this.currentMode === "app") {
      this.watchForBootloaderRequest(chunk);
      return;
    }
    this.pending.push(...this.decoder.push(chunk));
    this.drain();
  }

  private watchForBootloaderRequest(chunk: Buffer): void {
    const seen = Buffer.concat([this.appTail, chunk]);
    if (seen.indexOf(SERIAL_BOOTLOADER_REQUEST) >= 0) {
      this.appTail = Buffer.alloc(0);
      this.enterBootloader();
      return;
    }
    this.appTail = Buffer.from(seen.subarray(Math.max(0, seen.length - (SERIAL_BOOTLOADER_REQUEST.length - 1))));
  }

  private enterBootloader(): void {
    this.currentMode = "katapult";
    this.decoder.reset();
    this.pending.length = 0;
    this.needValid = false;
    this.pageWriteCount = 0;
    this.emit("bootloader");
  }

  private drain(): void {
    while (!this.holding && !this.gone && this.currentMode === "katapult" && this.pending.length > 0) {
      const item = this.pending.shift()!;
      if ("fault" in item) {
        // Firmware NACKs once when it loses sync and stays quiet until a valid frame arrives.
        if (!this.needValid) {
          this.needValid = true;
          this.send(encodeNack());
        }
        continue;
      }
      this.needValid = false;
      this.handle(item.frame);
    }
  }

  private send(bytes: Buffer): void {
    if (this.faults.some((f) => f.kind === "silence")) return;
    this.emit("reply", bytes);
  }

  private handle(frame: Frame): void {
    const disconnect = this.faults.find((f) => f.kind === "disconnect");
    if (disconnect && this.sendBlocks >= disconnect.afterBlocks) {
      this.gone = true;
      this.emit("disconnect");
      return;
    }
    const seen = (this.seenByCommand.get(frame.cmd) ?? 0) + 1;
    this.seenByCommand.set(frame.cmd, seen);
    this.seenFrames += 1;
    const record: ReceivedFrame = { name: commandName(frame.cmd), cmd: frame.cmd };
    if ((frame.cmd === Command.SEND_BLOCK || frame.cmd === Command.REQUEST_BLOCK) && frame.payload.length >= 4) {
      record.address = frame.payload.readUInt32LE(0);
    }
    this.frames.push(record);
    if (frame.cmd === Command.SEND_BLOCK) this.sendBlocks += 1;

    const fault = this.faults.find(
      (f): f is Extract<Fault, { n: number }> =>
        "n" in f &&
        (f.command === "any" ? f.n === this.seenFrames : Command[f.command] === frame.cmd && f.n === seen),
    );
    switch (fault?.kind) {
      case "nack":
        return this.send(encodeNack());
      case "busy":
        return this.send(encodeBusy());
      case "error":
        return this.send(encodeError());
    }
    const reply = this.dispatch(frame);
    if (fault?.kind === "drop-reply") return;
    if (frame.cmd === Command.SEND_BLOCK && this.writeDelayMs > 0) {
      this.holding = true;
      this.later(this.writeDelayMs, () => {
        this.holding = false;
        this.send(reply);
        this.drain();
      });
      return;
    }
    this.send(reply);
  }

  /** Runs one command and returns its reply frame (command_dispatch). */
  private dispatch(frame: Frame): Buffer {
    switch (frame.cmd) {
      case Command.CONNECT:
        return encodeAck(
          Command.CONNECT,
          encodeConnectPayload({
            protocolWord: this.protocolWord,
            appStartAddress: this.appStartAddress,
            blockSize: this.blockSize,
            mcuType: this.mcuType,
            softwareVersion: this.softwareVersion,
          }),
        );
      case Command.SEND_BLOCK:
        return this.writeBlock(frame);
      case Command.SEND_EOF:
        return encodeAck(Command.SEND_EOF, u32le(this.pageWriteCount));
      case Command.REQUEST_BLOCK:
        return this.readBlock(frame);
      case Command.COMPLETE:
        this.completed = true;
        this.later(APP_JUMP_DELAY_MS, () => {
          this.currentMode = "app";
          this.appTail = Buffer.alloc(0);
          this.emit("complete");
        });
        return encodeAck(Command.COMPLETE);
      default:
        // GET_CANBUS_ID exists only on CAN builds; anything else (e.g. the 0x90 USB prime) is unknown.
        return encodeError();
    }
  }

  /** command_write_block + stm32 flash_write_block: erase on a page's first block, ignore identical retransmits. */
  private writeBlock(frame: Frame): Buffer {
    if (frame.payload.length !== this.blockSize + 4) return encodeError();
    const address = frame.payload.readUInt32LE(0);
    const offset = address - this.appStartAddress;
    if (offset < 0 || address % this.blockSize !== 0 || offset + this.blockSize > this.flash.length) {
      return encodeError();
    }
    const data = frame.payload.subarray(4);
    const block = this.flash.subarray(offset, offset + this.blockSize);
    const erased = (buf: Buffer): boolean => buf.every((b) => b === 0xff);
    if (offset % this.pageSize === 0) {
      const page = this.flash.subarray(offset, offset + this.pageSize);
      if (!erased(page)) {
        if (block.equals(data) && erased(page.subarray(this.blockSize))) return this.blockAck(address);
        page.fill(0xff);
      }
      this.pageWriteCount += 1;
    } else if (!erased(block)) {
      // Already programmed: an identical retransmit is fine, anything else is an out-of-order write.
      return block.equals(data) ? this.blockAck(address) : encodeError();
    }
    data.copy(this.flash, offset);
    this.written += this.blockSize;
    this.emit("block", { address, index: offset / this.blockSize } satisfies BlockEvent);
    return this.blockAck(address);
  }

  private blockAck(address: number): Buffer {
    return encodeAck(Command.SEND_BLOCK, u32le(address));
  }

  private readBlock(frame: Frame): Buffer {
    if (frame.payload.length < 4) return encodeError();
    const address = frame.payload.readUInt32LE(0);
    const offset = address - this.appStartAddress;
    if (offset < 0 || offset + this.blockSize > this.flash.length) return encodeError();
    const data = Buffer.from(this.flash.subarray(offset, offset + this.blockSize));
    const index = Math.floor(offset / this.blockSize);
    if (this.faults.some((f) => f.kind === "corrupt-readback" && (f.block === undefined || f.block === index))) {
      data[0] = data[0]! ^ 0x5a;
    }
    return encodeAck(Command.REQUEST_BLOCK, Buffer.concat([u32le(address), data]));
  }
}
