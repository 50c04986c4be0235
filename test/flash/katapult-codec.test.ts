// The pure Katapult codec: CRC, golden frames (computed with the real CRC of Katapult scripts/flashtool.py), CONNECT decoding with
// the firmware's NUL quirk (§1.4), and the incremental decoder's resync rules.

import { describe, expect, it } from "vitest";
import {
  Command,
  FrameDecoder,
  SERIAL_BOOTLOADER_REQUEST,
  crc16,
  decodeConnect,
  encodeAck,
  encodeBusy,
  encodeComplete,
  encodeConnect,
  encodeConnectPayload,
  encodeError,
  encodeFrame,
  encodeGetCanbusId,
  encodeNack,
  encodeRequestBlock,
  encodeSendBlock,
  encodeSendEof,
  u32le,
  type DecodeItem,
} from "../../src/flash/katapult/codec.js";

const hex = (b: Uint8Array): string => Buffer.from(b).toString("hex").replace(/(..)/g, "$1 ").trim();

describe("CRC-16/MCRF4XX", () => {
  it('has the check value 0x6F91 for "123456789"', () => {
    expect(crc16(Buffer.from("123456789", "ascii"))).toBe(0x6f91);
  });

  it("is 0xFFFF (the init value) for no data", () => {
    expect(crc16(new Uint8Array(0))).toBe(0xffff);
  });
});

describe("request frames (host → bootloader)", () => {
  it.each([
    ["CONNECT", encodeConnect(), "01 88 11 00 f1 7c 99 03"],
    ["SEND_EOF", encodeSendEof(), "01 88 13 00 41 4f 99 03"],
    ["COMPLETE", encodeComplete(), "01 88 15 00 91 1b 99 03"],
    ["GET_CANBUS_ID", encodeGetCanbusId(), "01 88 16 00 f9 31 99 03"],
    ["REQUEST_BLOCK @0x08002000", encodeRequestBlock(0x08002000), "01 88 14 01 00 20 00 08 5b de 99 03"],
  ])("%s", (_name, frame, golden) => {
    expect(hex(frame)).toBe(golden);
  });

  it("SEND_BLOCK carries the address then the block, LEN = block/4 + 1 words", () => {
    const block = Buffer.alloc(64, 0xab);
    const frame = encodeSendBlock(0x08002040, block);
    expect(frame.length).toBe(8 + 4 + 64);
    expect(frame[2]).toBe(Command.SEND_BLOCK);
    expect(frame[3]).toBe(17);
    expect(frame.readUInt32LE(4)).toBe(0x08002040);
    expect(frame.subarray(8, 72).equals(block)).toBe(true);
    expect(frame.readUInt16LE(72)).toBe(crc16(frame, 2, 72));
    expect(hex(frame.subarray(-2))).toBe("99 03");
  });

  it("refuses payloads that are not whole words or longer than LEN can say", () => {
    expect(() => encodeFrame(0x11, new Uint8Array(3))).toThrow(/multiple of 4/);
    expect(() => encodeFrame(0x11, new Uint8Array(1024))).toThrow(/too long/);
  });

  it("the serial bootloader request is Klipper's 32-byte string", () => {
    expect(SERIAL_BOOTLOADER_REQUEST.toString("latin1")).toBe("~ \x1c Request Serial Bootloader!! ~");
    expect(hex(SERIAL_BOOTLOADER_REQUEST.subarray(0, 4))).toBe("7e 20 1c 20");
  });
});

describe("reply frames (bootloader → host)", () => {
  it.each([
    ["NACK", encodeNack(), "01 88 f1 00 68 95 99 03"],
    ["ERROR", encodeError(), "01 88 f2 00 00 bf 99 03"],
    ["BUSY", encodeBusy(), "01 88 f3 00 d8 a6 99 03"],
  ])("%s", (_name, frame, golden) => {
    expect(hex(frame)).toBe(golden);
  });

  it("ACK echoes the acknowledged command as its first word", () => {
    const ack = encodeAck(Command.SEND_EOF, u32le(30));
    expect(ack[2]).toBe(0xa0);
    expect(ack.readUInt32LE(4)).toBe(Command.SEND_EOF);
    expect(ack.readUInt32LE(8)).toBe(30);
  });
});

describe("CONNECT decoding", () => {
  // Firmware layout: version, start, block size, MCU string NUL-padded to a word, one zero word, version string.
  const payload = encodeConnectPayload({ protocolWord: 0x00010100, appStartAddress: 0x08002000, blockSize: 64, mcuType: "stm32f103xe", softwareVersion: "v0.0.1-37-g7c4b2b4" });

  it("reads version, start address, block size, MCU and software version", () => {
    expect(decodeConnect(payload)).toEqual({
      protocolVersion: "1.1.0",
      protocolWord: 0x00010100,
      appStartAddress: 0x08002000,
      blockSize: 64,
      mcuType: "stm32f103xe",
      softwareVersion: "v0.0.1-37-g7c4b2b4",
    });
  });

  it("strips the NULs flashtool leaves in front of the software version (the quirk)", () => {
    // flashtool splits at the first NUL, keeping the padding and the zero word in the version: "\0\0\0\0v0.0.1…".
    const info = payload.subarray(12).toString("latin1");
    expect(info.slice(info.indexOf("\0") + 1).startsWith("\0")).toBe(true);
    expect(decodeConnect(payload).softwareVersion).not.toContain("\0");
  });

  it("a 1.0 bootloader reports only the MCU; the version is '?'", () => {
    const old = Buffer.concat([u32le(0x00010000, 0x08002000, 64), Buffer.from("stm32f103xe\0", "latin1")]);
    expect(decodeConnect(old)).toMatchObject({ protocolVersion: "1.0.0", mcuType: "stm32f103xe", softwareVersion: "?" });
  });

  it("a reply too short to hold the three words is an error", () => {
    expect(() => decodeConnect(new Uint8Array(8))).toThrow(RangeError);
  });
});

describe("FrameDecoder", () => {
  const frames = [encodeAck(Command.CONNECT, u32le(1)), encodeNack(), encodeAck(Command.SEND_BLOCK, u32le(0x08002000))];
  const stream = Buffer.concat(frames);
  const onlyFrames = (items: DecodeItem[]): string[] => items.flatMap((i) => ("frame" in i ? [hex(Buffer.concat([Buffer.of(i.frame.cmd), i.frame.payload]))] : []));
  const expected = frames.map((f) => hex(Buffer.concat([f.subarray(2, 3), f.subarray(4, f.length - 4)])));

  it("decodes frames split at every byte position", () => {
    for (let cut = 1; cut < stream.length; cut++) {
      const decoder = new FrameDecoder();
      const items = [...decoder.push(stream.subarray(0, cut)), ...decoder.push(stream.subarray(cut))];
      expect(onlyFrames(items)).toEqual(expected);
      expect(items.filter((i) => "fault" in i)).toEqual([]);
    }
  });

  it("decodes several frames from one chunk and one frame fed byte by byte", () => {
    expect(onlyFrames(new FrameDecoder().push(stream))).toEqual(expected);
    const decoder = new FrameDecoder();
    const items = [...stream].flatMap((b) => decoder.push(Uint8Array.of(b)));
    expect(onlyFrames(items)).toEqual(expected);
  });

  it("skips leading garbage and reports it", () => {
    const items = new FrameDecoder().push(Buffer.concat([Buffer.from([0x55, 0xaa, 0x01]), encodeNack()]));
    expect(items[0]).toEqual({ fault: { kind: "garbage-skipped", bytes: 3 } });
    expect(onlyFrames(items)).toEqual(["f1"]);
  });

  it("reports a bad CRC and resyncs on the next header", () => {
    const bad = Buffer.from(encodeAck(Command.CONNECT, u32le(1)));
    bad[8] = bad[8]! ^ 0xff;
    const items = new FrameDecoder().push(Buffer.concat([bad, encodeNack()]));
    expect(items.some((i) => "fault" in i && i.fault.kind === "bad-crc")).toBe(true);
    expect(onlyFrames(items)).toEqual(["f1"]);
  });

  it("reports a bad trailer and resyncs", () => {
    const bad = Buffer.from(encodeNack());
    bad[bad.length - 1] = 0x00;
    const items = new FrameDecoder().push(Buffer.concat([bad, encodeBusy()]));
    expect(items.some((i) => "fault" in i && i.fault.kind === "bad-trailer")).toBe(true);
    expect(onlyFrames(items)).toEqual(["f3"]);
  });

  it("keeps an incomplete frame until the rest arrives, and reset() drops it", () => {
    const decoder = new FrameDecoder();
    expect(decoder.push(stream.subarray(0, 5))).toEqual([]);
    decoder.reset();
    expect(onlyFrames(decoder.push(encodeNack()))).toEqual(["f1"]);
  });
});
