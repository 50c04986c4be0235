// In-memory ByteLink pair and a small scripted Katapult peer, for session tests without a pty
// (ws test/duplex-pair.js idea). The faithful device model lives in src/sim; this peer only has to be scriptable.

import { ByteLinkBase, linkClosedError } from "../../../src/flash/link.js";
import {
  Command,
  FrameDecoder,
  commandName,
  encodeAck,
  encodeBusy,
  encodeConnectPayload,
  encodeError,
  encodeNack,
  u32le,
} from "../../../src/flash/katapult/codec.js";

class MemoryLink extends ByteLinkBase {
  peer!: MemoryLink;
  /** Every byte written from this end, in order. */
  readonly recording: Buffer[] = [];

  constructor(readonly description: string) {
    super();
  }

  async write(bytes: Uint8Array): Promise<void> {
    if (!this.isOpen) throw linkClosedError(this.description);
    const chunk = Buffer.from(bytes);
    this.recording.push(chunk);
    // Deliver asynchronously, like a real port.
    setImmediate(() => this.peer.deliver(chunk));
  }

  async close(): Promise<void> {
    this.hangUp();
  }

  /** Closes both ends, as a device vanishing from the bus does. */
  hangUp(error?: Error): void {
    this.markClosed(error);
    this.peer.markClosed(error ?? new Error("peer hung up"));
  }

  private deliver(chunk: Buffer): void {
    this.emitData(chunk);
  }
}

export function createLinkPair(): { host: MemoryLink; device: MemoryLink } {
  const host = new MemoryLink("memory-host");
  const device = new MemoryLink("memory-device");
  host.peer = device;
  device.peer = host;
  return { host, device };
}

export type ScriptedBehaviour =
  | "ack"
  /** No reply at all. */
  | "drop"
  | "nack"
  | "busy"
  | "error"
  /** ACK that echoes another command id. */
  | "wrong-echo"
  /** ACK with a wrong address (SEND_BLOCK / REQUEST_BLOCK). */
  | "wrong-address"
  /** A frame with a corrupted CRC. */
  | "bad-crc"
  /** Hang up the link instead of replying. */
  | "hang-up";

export interface ScriptedPeerOptions {
  mcuType?: string;
  blockSize?: number;
  appStartAddress?: number;
  /** Decides the reply to the n-th (1-based) frame of a command; default "ack". */
  script?: (command: string, n: number) => ScriptedBehaviour;
  /** Flip a bit in read-back data of this block index. */
  corruptReadbackBlock?: number;
  /** Send every reply longer than this in two writes, split here, as a UART delivers a frame over time. */
  splitRepliesAt?: number;
}

/** A scripted Katapult bootloader on the device end of a memory link. */
export class ScriptedKatapult {
  readonly flash = new Map<number, Buffer>();
  readonly received: string[] = [];
  private readonly counts = new Map<string, number>();
  private readonly decoder = new FrameDecoder();

  constructor(
    private readonly link: MemoryLink,
    private readonly options: ScriptedPeerOptions = {},
  ) {
    link.onData((chunk) => {
      for (const item of this.decoder.push(chunk)) if ("frame" in item) this.handle(item.frame.cmd, item.frame.payload);
    });
  }

  get blockSize(): number {
    return this.options.blockSize ?? 64;
  }

  get appStartAddress(): number {
    return this.options.appStartAddress ?? 0x8002000;
  }

  /** Flash contents from the application start, as many blocks as were written. */
  image(): Buffer {
    const addresses = [...this.flash.keys()].sort((a, b) => a - b);
    return Buffer.concat(addresses.map((a) => this.flash.get(a)!));
  }

  private handle(cmd: number, payload: Buffer): void {
    const name = commandName(cmd);
    const n = (this.counts.get(name) ?? 0) + 1;
    this.counts.set(name, n);
    this.received.push(name);
    const behaviour = this.options.script?.(name, n) ?? "ack";
    const split = this.options.splitRepliesAt;
    const reply = (bytes: Buffer): void => {
      const parts = split !== undefined && bytes.length > split ? [bytes.subarray(0, split), bytes.subarray(split)] : [bytes];
      for (const part of parts) void this.link.write(part).catch(() => undefined);
    };
    switch (behaviour) {
      case "drop":
        return;
      case "nack":
        return reply(encodeNack());
      case "busy":
        return reply(encodeBusy());
      case "error":
        return reply(encodeError());
      case "hang-up":
        return this.link.hangUp(new Error("device vanished"));
      case "wrong-echo":
        return reply(encodeAck(Command.SEND_EOF));
      case "bad-crc": {
        const frame = this.ackFor(cmd, payload, n, false);
        frame[frame.length - 4] = frame[frame.length - 4]! ^ 0xff;
        return reply(frame);
      }
      case "wrong-address":
        return reply(this.ackFor(cmd, payload, n, true));
      case "ack":
        return reply(this.ackFor(cmd, payload, n, false));
    }
  }

  private ackFor(cmd: number, payload: Buffer, _n: number, wrongAddress: boolean): Buffer {
    switch (cmd) {
      case Command.CONNECT:
        return encodeAck(
          cmd,
          encodeConnectPayload({
            protocolWord: 0x00010100,
            appStartAddress: this.appStartAddress,
            blockSize: this.blockSize,
            mcuType: this.options.mcuType ?? "stm32f103xe",
            softwareVersion: "v0.0.1-scripted",
          }),
        );
      case Command.SEND_BLOCK: {
        const address = payload.readUInt32LE(0);
        if (!wrongAddress) this.flash.set(address, Buffer.from(payload.subarray(4)));
        return encodeAck(cmd, u32le(wrongAddress ? address + 1 : address));
      }
      case Command.SEND_EOF:
        return encodeAck(cmd, u32le(Math.ceil((this.flash.size * this.blockSize) / 1024)));
      case Command.REQUEST_BLOCK: {
        const address = payload.readUInt32LE(0);
        const data = Buffer.from(this.flash.get(address) ?? Buffer.alloc(this.blockSize, 0xff));
        if ((address - this.appStartAddress) / this.blockSize === this.options.corruptReadbackBlock) data[3] = data[3]! ^ 0x10;
        return encodeAck(cmd, Buffer.concat([u32le(wrongAddress ? address + 1 : address), data]));
      }
      default:
        return encodeAck(cmd);
    }
  }
}
