// Katapult wire protocol, pure: constants, CRC, frame encoding and an incremental frame decoder.
// Frame (both directions): 01 88 | CMD | LEN | PAYLOAD (LEN*4 bytes) | CRC lo hi | 99 03
// CRC-16/MCRF4XX (Klipper's crc16_ccitt) over CMD, LEN and payload. Source: Arksine/katapult
// scripts/flashtool.py and src/command.c (command ids in src/command.h).

export const FRAME_HEADER = Uint8Array.of(0x01, 0x88);
export const FRAME_TRAILER = Uint8Array.of(0x99, 0x03);
/** Header + cmd + len + crc + trailer. */
export const FRAME_OVERHEAD = 8;
/** Largest payload LEN can describe (255 words). */
export const MAX_PAYLOAD = 255 * 4;

export const Command = {
  CONNECT: 0x11,
  SEND_BLOCK: 0x12,
  SEND_EOF: 0x13,
  REQUEST_BLOCK: 0x14,
  COMPLETE: 0x15,
  GET_CANBUS_ID: 0x16,
} as const;
export type CommandName = keyof typeof Command;

export const Response = {
  ACK: 0xa0,
  NACK: 0xf1,
  ERROR: 0xf2,
  BUSY: 0xf3,
} as const;

export const VALID_BLOCK_SIZES = [64, 128, 256, 512] as const;

/** Klipper asks a UART MCU to jump to Katapult with this string (src/generic/serial_irq.c). */
export const SERIAL_BOOTLOADER_REQUEST = Buffer.from("~ \x1c Request Serial Bootloader!! ~", "latin1");

export function commandName(id: number): string {
  for (const [name, value] of Object.entries(Command)) if (value === id) return name;
  for (const [name, value] of Object.entries(Response)) if (value === id) return name;
  return `0x${id.toString(16).padStart(2, "0")}`;
}

const CRC_TABLE = (() => {
  const table = new Uint16Array(256);
  for (let i = 0; i < 256; i++) {
    let crc = i;
    for (let bit = 0; bit < 8; bit++) crc = crc & 1 ? (crc >>> 1) ^ 0x8408 : crc >>> 1;
    table[i] = crc;
  }
  return table;
})();

/** CRC-16/MCRF4XX (poly 0x1021 reflected, init 0xFFFF, no final xor). Check value "123456789" = 0x6F91. */
export function crc16(data: Uint8Array, start = 0, end = data.length): number {
  let crc = 0xffff;
  for (let i = start; i < end; i++) crc = (crc >>> 8) ^ CRC_TABLE[(crc ^ data[i]!) & 0xff]!;
  return crc;
}

/** Builds one frame. The payload must be a multiple of 4 bytes and at most MAX_PAYLOAD. */
export function encodeFrame(cmd: number, payload: Uint8Array = new Uint8Array(0)): Buffer {
  if (payload.length % 4 !== 0) throw new RangeError(`Katapult payload must be a multiple of 4 bytes, got ${payload.length}`);
  if (payload.length > MAX_PAYLOAD) throw new RangeError(`Katapult payload too long: ${payload.length} bytes`);
  // allocUnsafe: every byte is written below, and small buffers come from Node's pool instead of a fresh
  // ArrayBuffer each (thousands per flash).
  const frame = Buffer.allocUnsafe(payload.length + FRAME_OVERHEAD);
  frame[0] = 0x01;
  frame[1] = 0x88;
  frame[2] = cmd;
  frame[3] = payload.length / 4;
  frame.set(payload, 4);
  const crc = crc16(frame, 2, 4 + payload.length);
  frame.writeUInt16LE(crc, 4 + payload.length);
  frame[6 + payload.length] = 0x99;
  frame[7 + payload.length] = 0x03;
  return frame;
}

export function u32le(...values: number[]): Buffer {
  const buf = Buffer.allocUnsafe(values.length * 4);
  values.forEach((v, i) => buf.writeUInt32LE(v >>> 0, i * 4));
  return buf;
}

/**
 * A frame whose payload is a flash address and optionally a block (SEND_BLOCK, REQUEST_BLOCK), built in one buffer:
 * the same bytes as encodeFrame(cmd, concat(u32le(address), data)) without the two intermediate buffers.
 */
export function encodeAddressFrame(cmd: number, address: number, data?: Uint8Array): Buffer {
  const length = 4 + (data?.length ?? 0);
  if (length % 4 !== 0) throw new RangeError(`Katapult payload must be a multiple of 4 bytes, got ${length}`);
  if (length > MAX_PAYLOAD) throw new RangeError(`Katapult payload too long: ${length} bytes`);
  const frame = Buffer.allocUnsafe(length + FRAME_OVERHEAD);
  frame[0] = 0x01;
  frame[1] = 0x88;
  frame[2] = cmd;
  frame[3] = length / 4;
  frame.writeUInt32LE(address >>> 0, 4);
  if (data) frame.set(data, 8);
  frame.writeUInt16LE(crc16(frame, 2, 4 + length), 4 + length);
  frame[6 + length] = 0x99;
  frame[7 + length] = 0x03;
  return frame;
}

// Request builders (host → bootloader).
export const encodeConnect = (): Buffer => encodeFrame(Command.CONNECT);
export const encodeSendEof = (): Buffer => encodeFrame(Command.SEND_EOF);
export const encodeComplete = (): Buffer => encodeFrame(Command.COMPLETE);
export const encodeGetCanbusId = (): Buffer => encodeFrame(Command.GET_CANBUS_ID);
export const encodeRequestBlock = (address: number): Buffer => encodeAddressFrame(Command.REQUEST_BLOCK, address);
export const encodeSendBlock = (address: number, data: Uint8Array): Buffer => encodeAddressFrame(Command.SEND_BLOCK, address, data);

// Reply builders (bootloader → host); used by the virtual device and by tests.
export function encodeAck(cmd: number, payload: Uint8Array = new Uint8Array(0)): Buffer {
  return encodeFrame(Response.ACK, Buffer.concat([u32le(cmd), payload]));
}
export const encodeNack = (): Buffer => encodeFrame(Response.NACK);
export const encodeError = (): Buffer => encodeFrame(Response.ERROR);
export const encodeBusy = (): Buffer => encodeFrame(Response.BUSY);

export interface Frame {
  cmd: number;
  payload: Buffer;
}

/** A problem the decoder skipped over; reported as a value, never thrown. */
export type FrameFault =
  | { kind: "garbage-skipped"; bytes: number }
  | { kind: "bad-crc"; cmd: number; expected: number; received: number }
  | { kind: "bad-trailer"; cmd: number };

export type DecodeItem = { frame: Frame } | { fault: FrameFault };

/**
 * Incremental decoder: push bytes as they arrive, get whole frames and faults back in order.
 * Resyncs on the 01 88 header after garbage or a corrupt frame, keeps an incomplete tail for the next push.
 * A UART delivers a reply a few bytes at a time (thousands of chunks per flash): the bytes wait in one buffer kept
 * for the decoder's life, not in a new concatenation per chunk.
 */
export class FrameDecoder {
  /** Undecoded bytes are buf[start, end). Grows only for a chunk larger than it (rare); never shrinks. */
  private buf: Buffer = Buffer.allocUnsafeSlow(256);
  private start = 0;
  private end = 0;

  /** Decodes what `chunk` completes; items are appended to `into` (a new array unless given) and returned. */
  push(chunk: Uint8Array, into: DecodeItem[] = []): DecodeItem[] {
    this.append(chunk);
    const buf = this.buf;
    while (this.start < this.end) {
      const head = findHeader(buf, this.start, this.end);
      if (head < 0) {
        // Keep a trailing 0x01: it may be the first half of a header.
        const keep = buf[this.end - 1] === 0x01 ? 1 : 0;
        const dropped = this.end - this.start - keep;
        if (dropped > 0) into.push({ fault: { kind: "garbage-skipped", bytes: dropped } });
        this.start = this.end - keep;
        break;
      }
      if (head > this.start) {
        into.push({ fault: { kind: "garbage-skipped", bytes: head - this.start } });
        this.start = head;
      }
      if (this.end - head < 4) break;
      const cmd = buf[head + 2]!;
      const size = buf[head + 3]! * 4 + FRAME_OVERHEAD;
      if (this.end - head < size) break;
      const payloadEnd = head + size - 4;
      if (buf[head + size - 2] !== 0x99 || buf[head + size - 1] !== 0x03) {
        into.push({ fault: { kind: "bad-trailer", cmd } });
        this.start = head + 1;
        continue;
      }
      const expected = crc16(buf, head + 2, payloadEnd);
      const received = buf.readUInt16LE(payloadEnd);
      if (expected !== received) {
        into.push({ fault: { kind: "bad-crc", cmd, expected, received } });
        this.start = head + 1;
        continue;
      }
      // A copy: buf is overwritten by the next chunks.
      const payload = Buffer.allocUnsafe(payloadEnd - head - 4);
      buf.copy(payload, 0, head + 4, payloadEnd);
      into.push({ frame: { cmd, payload } });
      this.start = head + size;
    }
    if (this.start === this.end) this.start = this.end = 0;
    return into;
  }

  /** The bytes of a frame that has begun but is not complete yet (empty when none); valid until the next push. */
  get partial(): Buffer {
    return this.buf.subarray(this.start, this.end);
  }

  /** How many bytes `partial` holds, without making a view of them. */
  get partialLength(): number {
    return this.end - this.start;
  }

  /** Drops whatever partial frame is buffered (used when draining before a retry). */
  reset(): void {
    this.start = this.end = 0;
  }

  private append(chunk: Uint8Array): void {
    const held = this.end - this.start;
    if (this.end + chunk.length > this.buf.length) {
      if (held + chunk.length > this.buf.length) {
        const bigger = Buffer.allocUnsafeSlow(Math.max(held + chunk.length, 2 * this.buf.length));
        this.buf.copy(bigger, 0, this.start, this.end);
        this.buf = bigger;
      } else {
        this.buf.copyWithin(0, this.start, this.end);
      }
      this.start = 0;
      this.end = held;
    }
    this.buf.set(chunk, this.end);
    this.end += chunk.length;
  }
}

function findHeader(buf: Buffer, from: number, to: number): number {
  for (let i = from; i + 1 < to; i++) if (buf[i] === 0x01 && buf[i + 1] === 0x88) return i;
  return -1;
}

export interface ConnectInfo {
  /** e.g. "1.1.0" */
  protocolVersion: string;
  /** Raw version word. */
  protocolWord: number;
  appStartAddress: number;
  blockSize: number;
  mcuType: string;
  /** Katapult build version; "?" when a 1.0 bootloader does not report it. */
  softwareVersion: string;
}

/**
 * Decodes a CONNECT ACK payload (after the echoed command word). Firmware puts a whole zero word between the
 * MCU string and the version string, so the version keeps leading NULs: strip every NUL (Katapult src/flashcmd.c command_connect).
 */
export function decodeConnect(ackPayload: Uint8Array): ConnectInfo {
  const buf = Buffer.from(ackPayload);
  if (buf.length < 12) throw new RangeError(`CONNECT reply too short: ${buf.length} bytes`);
  const protocolWord = buf.readUInt32LE(0);
  const appStartAddress = buf.readUInt32LE(4);
  const blockSize = buf.readUInt32LE(8);
  const protocolVersion = [(protocolWord >>> 16) & 0xff, (protocolWord >>> 8) & 0xff, protocolWord & 0xff].join(".");
  const info = buf.subarray(12).toString("latin1").replace(/\0+$/, "");
  let mcuType = info;
  let softwareVersion = "?";
  const atLeast110 = protocolWord >= 0x00010100;
  if (atLeast110) {
    const nul = info.indexOf("\0");
    if (nul >= 0) {
      mcuType = info.slice(0, nul);
      softwareVersion = info.slice(nul + 1).replace(/\0/g, "") || "?";
    }
  }
  return { protocolVersion, protocolWord, appStartAddress, blockSize, mcuType: mcuType.replace(/\0/g, ""), softwareVersion };
}

/** Encodes a CONNECT ACK payload exactly as the firmware lays it out (used by the virtual device). */
export function encodeConnectPayload(info: { protocolWord: number; appStartAddress: number; blockSize: number; mcuType: string; softwareVersion: string }): Buffer {
  const pad4 = (s: string): Buffer => {
    const raw = Buffer.from(s, "latin1");
    const out = Buffer.alloc(Math.ceil((raw.length + 1) / 4) * 4);
    raw.copy(out);
    return out;
  };
  return Buffer.concat([
    u32le(info.protocolWord, info.appStartAddress, info.blockSize),
    pad4(info.mcuType),
    u32le(0),
    pad4(info.softwareVersion),
  ]);
}
