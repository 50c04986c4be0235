import { describe, expect, it } from "vitest";
import {
  Command,
  FrameDecoder,
  SERIAL_BOOTLOADER_REQUEST,
  encodeComplete,
  encodeConnect,
  encodeFrame,
  encodeGetCanbusId,
  encodeRequestBlock,
  encodeSendBlock,
  encodeSendEof,
  u32le,
  type Frame,
} from "../../src/flash/katapult/codec.js";
import { KatapultDeviceModel, parseFault, type DeviceModelOptions } from "../../src/sim/katapult-device.js";
import { isMoonflashError } from "../../src/core/errors.js";

const hex = (text: string): Buffer => Buffer.from(text.replace(/\s+/g, ""), "hex");
const START = 0x8002000;

// Golden replies computed with an independent CRC-16/MCRF4XX implementation.
const GOLDEN = {
  connect: hex(
    "01 88 a0 0c 11 00 00 00 00 01 01 00 00 20 00 08 40 00 00 00 73 74 6d 33 32 66 31 30 33 78 65 00 00 00 00 00" +
      "76 30 2e 31 33 2e 30 2d 76 69 72 74 75 61 6c 00 81 99 99 03",
  ),
  sendBlockAtStart: hex("01 88 a0 02 12 00 00 00 00 20 00 08 5a d6 99 03"),
  eofTwoPages: hex("01 88 a0 02 13 00 00 00 02 00 00 00 e0 e1 99 03"),
  complete: hex("01 88 a0 01 15 00 00 00 00 2e 99 03"),
  requestBlockCounting: hex(
    "01 88 a0 12 14 00 00 00 00 20 00 08" +
      Buffer.from(Array.from({ length: 64 }, (_, i) => i)).toString("hex") +
      "f2 6b 99 03",
  ),
  error: hex("01 88 f2 00 00 bf 99 03"),
  nack: hex("01 88 f1 00 68 95 99 03"),
  busy: hex("01 88 f3 00 d8 a6 99 03"),
};

/** A model plus everything it replied, as one byte string and as decoded frames. */
function rig(options: DeviceModelOptions = {}) {
  const model = new KatapultDeviceModel(options);
  const chunks: Buffer[] = [];
  model.on("reply", (bytes) => chunks.push(bytes));
  return {
    model,
    /** Sends bytes and returns what came back synchronously. */
    send(bytes: Uint8Array): Buffer {
      const before = chunks.length;
      model.receive(bytes);
      return Buffer.concat(chunks.slice(before));
    },
    all: () => Buffer.concat(chunks),
  };
}

function frames(bytes: Buffer): Frame[] {
  return new FrameDecoder().push(bytes).flatMap((item) => ("frame" in item ? [item.frame] : []));
}

const block = (fill: number | ((i: number) => number), size = 64): Buffer =>
  Buffer.from(Array.from({ length: size }, (_, i) => (typeof fill === "number" ? fill : fill(i))));

describe("KatapultDeviceModel replies (golden frames)", () => {
  it("CONNECT answers with the firmware's layout", () => {
    expect(rig().send(encodeConnect())).toEqual(GOLDEN.connect);
  });

  it("SEND_BLOCK stores the block and echoes the address", () => {
    const r = rig();
    expect(r.send(encodeSendBlock(START, block(0xab)))).toEqual(GOLDEN.sendBlockAtStart);
    expect(r.model.flash.subarray(0, 64)).toEqual(block(0xab));
    expect(r.model.flash.subarray(64, 128)).toEqual(block(0xff));
    expect(r.model.written).toBe(64);
    expect(r.model.frames).toEqual([{ name: "SEND_BLOCK", cmd: Command.SEND_BLOCK, address: START }]);
  });

  it("SEND_EOF reports the number of flash pages written", () => {
    const r = rig({ pageSize: 1024 });
    r.send(encodeSendBlock(START, block(1)));
    // A retransmit (the host missed the ACK) of a page's first block is ignored, not counted again (flash.c).
    r.send(encodeSendBlock(START, block(1)));
    r.send(encodeSendBlock(START + 64, block(2)));
    r.send(encodeSendBlock(START + 1024, block(3)));
    expect(r.send(encodeSendEof())).toEqual(GOLDEN.eofTwoPages);
    expect(r.model.written).toBe(192);
  });

  it("REQUEST_BLOCK returns the address and the stored bytes", () => {
    const r = rig();
    r.send(encodeSendBlock(START, block((i) => i)));
    expect(r.send(encodeRequestBlock(START))).toEqual(GOLDEN.requestBlockCounting);
  });

  it("COMPLETE acks at once and jumps to the app about 100 ms later", async () => {
    const r = rig();
    const jumped = new Promise<void>((resolve) => r.model.once("complete", resolve));
    expect(r.send(encodeComplete())).toEqual(GOLDEN.complete);
    expect(r.model.completed).toBe(true);
    expect(r.model.mode).toBe("katapult");
    await jumped;
    expect(r.model.mode).toBe("app");
    // The app ignores Katapult frames.
    expect(r.send(encodeConnect())).toHaveLength(0);
  });

  it("GET_CANBUS_ID (serial build) and unknown ids such as the 0x90 USB prime answer ERROR", () => {
    const r = rig();
    expect(r.send(encodeGetCanbusId())).toEqual(GOLDEN.error);
    expect(r.send(encodeFrame(0x90))).toEqual(GOLDEN.error);
    expect(r.model.frames.map((f) => f.name)).toEqual(["GET_CANBUS_ID", "0x90"]);
  });

  it.each([
    ["wrong LEN", encodeFrame(Command.SEND_BLOCK, Buffer.concat([u32le(START), block(0, 32)]))],
    ["address below the application", encodeSendBlock(START - 64, block(0))],
    ["unaligned address", encodeSendBlock(START + 4, block(0))],
    ["address past the flash", encodeSendBlock(START + 4096, block(0))],
  ])("SEND_BLOCK with %s answers ERROR and changes nothing", (_why, frame) => {
    const r = rig({ flashSize: 4096 });
    expect(r.send(frame)).toEqual(GOLDEN.error);
    expect(r.model.flash.every((b) => b === 0xff)).toBe(true);
    expect(r.model.written).toBe(0);
  });

  it("rewriting a programmed block mid-page with other data is an ERROR (flash_write_block -2)", () => {
    const r = rig();
    r.send(encodeSendBlock(START, block(1)));
    r.send(encodeSendBlock(START + 64, block(2)));
    expect(r.send(encodeSendBlock(START + 64, block(3)))).toEqual(GOLDEN.error);
    expect(frames(r.send(encodeSendBlock(START + 64, block(2))))[0]!.payload).toEqual(u32le(Command.SEND_BLOCK, START + 64));
    expect(r.model.flash.subarray(64, 128)).toEqual(block(2));
  });

  it("rewriting a page's first block erases the page first", () => {
    const r = rig();
    r.send(encodeSendBlock(START, block(1)));
    r.send(encodeSendBlock(START + 64, block(2)));
    r.send(encodeSendBlock(START, block(9)));
    expect(r.model.flash.subarray(0, 64)).toEqual(block(9));
    expect(r.model.flash.subarray(64, 128)).toEqual(block(0xff));
  });

  it("decodes frames split at every byte", () => {
    const r = rig();
    const out: Buffer[] = [];
    for (const byte of encodeConnect()) out.push(r.send(Uint8Array.of(byte)));
    expect(Buffer.concat(out)).toEqual(GOLDEN.connect);
  });

  it("sends ONE NACK per run of bad bytes until a valid frame arrives (command_find_block)", () => {
    const r = rig();
    const badCrc = Buffer.from(encodeConnect());
    badCrc[4] = badCrc[4]! ^ 0xff;
    expect(r.send(Buffer.concat([hex("00 55 aa"), badCrc, hex("13 37")]))).toEqual(GOLDEN.nack);
    expect(r.send(hex("de ad be ef"))).toHaveLength(0);
    expect(r.send(encodeConnect())).toEqual(GOLDEN.connect);
    expect(r.send(hex("42"))).toEqual(GOLDEN.nack);
  });
});

describe("KatapultDeviceModel faults", () => {
  it("drop-reply processes the Nth command but stays quiet", () => {
    const r = rig({ faults: [parseFault("drop-reply:SEND_BLOCK:2")] });
    expect(r.send(encodeSendBlock(START, block(1)))).toHaveLength(16);
    expect(r.send(encodeSendBlock(START + 64, block(2)))).toHaveLength(0);
    expect(r.model.flash.subarray(64, 128)).toEqual(block(2));
    // The host resends after its timeout: an identical retransmit is accepted.
    expect(frames(r.send(encodeSendBlock(START + 64, block(2))))[0]!.payload).toEqual(u32le(Command.SEND_BLOCK, START + 64));
  });

  it.each([
    ["nack", GOLDEN.nack],
    ["busy", GOLDEN.busy],
    ["error", GOLDEN.error],
  ] as const)("%s answers the Nth command without processing it", (kind, reply) => {
    const r = rig({ faults: [parseFault(`${kind}:SEND_BLOCK:1`)] });
    expect(r.send(encodeSendBlock(START, block(7)))).toEqual(reply);
    expect(r.model.flash.subarray(0, 64)).toEqual(block(0xff));
    expect(r.send(encodeSendBlock(START, block(7)))).toEqual(GOLDEN.sendBlockAtStart);
  });

  it("a fault on 'any' counts every frame", () => {
    const r = rig({ faults: [{ kind: "busy", command: "any", n: 2 }] });
    expect(r.send(encodeConnect())).toEqual(GOLDEN.connect);
    expect(r.send(encodeSendEof())).toEqual(GOLDEN.busy);
    expect(r.send(encodeConnect())).toEqual(GOLDEN.connect);
  });

  it("corrupt-readback flips bits in one block's read-back only", () => {
    const r = rig({ faults: [parseFault("corrupt-readback:1")] });
    r.send(encodeSendBlock(START, block(0x11)));
    r.send(encodeSendBlock(START + 64, block(0x22)));
    expect(frames(r.send(encodeRequestBlock(START)))[0]!.payload.subarray(8)).toEqual(block(0x11));
    expect(frames(r.send(encodeRequestBlock(START + 64)))[0]!.payload.subarray(8)).not.toEqual(block(0x22));
    expect(r.model.flash.subarray(64, 128)).toEqual(block(0x22));
  });

  it("disconnect vanishes at the first frame after N SEND_BLOCKs", () => {
    const r = rig({ faults: [parseFault("disconnect:2")] });
    let disconnected = 0;
    r.model.on("disconnect", () => (disconnected += 1));
    r.send(encodeSendBlock(START, block(1)));
    r.send(encodeSendBlock(START + 64, block(2)));
    expect(disconnected).toBe(0);
    expect(r.send(encodeSendBlock(START + 128, block(3)))).toHaveLength(0);
    expect(disconnected).toBe(1);
    expect(r.send(encodeConnect())).toHaveLength(0);
    expect(r.model.written).toBe(128);
  });

  it("silence never answers, but still records what it got", () => {
    const r = rig({ faults: [parseFault("silence")] });
    expect(r.send(Buffer.concat([encodeConnect(), hex("00"), encodeSendEof()]))).toHaveLength(0);
    expect(r.model.frames.map((f) => f.name)).toEqual(["CONNECT", "SEND_EOF"]);
  });

  it("writeDelayMs holds the SEND_BLOCK reply and the frames behind it", async () => {
    const r = rig({ writeDelayMs: 20 });
    expect(r.send(Buffer.concat([encodeSendBlock(START, block(1)), encodeConnect()]))).toHaveLength(0);
    await new Promise<void>((resolve) => r.model.on("reply", () => r.all().length >= 16 + GOLDEN.connect.length && resolve()));
    expect(r.all()).toEqual(Buffer.concat([GOLDEN.sendBlockAtStart, GOLDEN.connect]));
  });

  it("counts bytes that arrive while a block is being programmed (a UART bootloader would lose them)", async () => {
    const r = rig({ writeDelayMs: 20 });
    r.send(encodeSendBlock(START, block(1)));
    expect(r.model.bytesWhileWriting).toBe(0);
    r.send(encodeConnect());
    expect(r.model.bytesWhileWriting).toBe(encodeConnect().length);
    await new Promise<void>((resolve) => r.model.on("reply", () => r.all().length >= 16 + GOLDEN.connect.length && resolve()));
    r.send(encodeConnect());
    expect(r.model.bytesWhileWriting).toBe(encodeConnect().length);
  });
});

describe("parseFault", () => {
  it.each([
    ["drop-reply:SEND_BLOCK:3", { kind: "drop-reply", command: "SEND_BLOCK", n: 3 }],
    ["busy:send_block:5", { kind: "busy", command: "SEND_BLOCK", n: 5 }],
    ["nack:CONNECT:1", { kind: "nack", command: "CONNECT", n: 1 }],
    ["error:any:2", { kind: "error", command: "any", n: 2 }],
    ["corrupt-readback", { kind: "corrupt-readback" }],
    ["corrupt-readback:7", { kind: "corrupt-readback", block: 7 }],
    ["disconnect:10", { kind: "disconnect", afterBlocks: 10 }],
    ["silence", { kind: "silence" }],
  ])("parses %s", (text, fault) => {
    expect(parseFault(text)).toEqual(fault);
  });

  it.each([
    ["explode", /unknown kind "explode"/],
    ["drop-reply:SEND_BLOCK", /expected drop-reply:COMMAND:N/],
    ["busy:FLASH:1", /unknown command "FLASH"/],
    ["nack:CONNECT:0", /N must be at least 1/],
    ["nack:CONNECT:x", /N must be a whole number/],
    ["disconnect", /expected disconnect:BLOCKS/],
    ["corrupt-readback:-1", /BLOCK must be a whole number/],
    ["silence:1", /silence takes no arguments/],
  ])("rejects %s with INVALID_PARAMS", (text, message) => {
    let caught: unknown;
    try {
      parseFault(text);
    } catch (err) {
      caught = err;
    }
    expect(isMoonflashError(caught) && caught.code).toBe("INVALID_PARAMS");
    expect((caught as Error).message).toMatch(message);
  });
});

describe("KatapultDeviceModel in app mode (Klipper running)", () => {
  it("ignores Katapult frames and enters Katapult on the serial request string, even split across chunks", () => {
    const r = rig({ mode: "app" });
    let entered = 0;
    r.model.on("bootloader", () => (entered += 1));
    expect(r.send(encodeConnect())).toHaveLength(0);
    r.send(Buffer.concat([hex("00 11"), SERIAL_BOOTLOADER_REQUEST.subarray(0, 10)]));
    expect(r.model.mode).toBe("app");
    r.send(SERIAL_BOOTLOADER_REQUEST.subarray(10));
    expect(entered).toBe(1);
    expect(r.model.mode).toBe("katapult");
    expect(r.send(encodeConnect())).toEqual(GOLDEN.connect);
    expect(r.model.frames.map((f) => f.name)).toEqual(["CONNECT"]);
  });

  it("enters Katapult when the host closes the line at 1200 baud (USB CDC)", () => {
    const r = rig({ mode: "app" });
    r.model.lineBaud(250000);
    r.model.lineClosed();
    expect(r.model.mode).toBe("app");
    r.model.lineBaud(1200);
    r.model.lineClosed();
    expect(r.model.mode).toBe("katapult");
  });
});

describe("KatapultDeviceModel options", () => {
  it.each([
    [{ blockSize: 100 }, /blockSize must be one of 64, 128, 256, 512/],
    [{ pageSize: 100 }, /pageSize must be a multiple of blockSize/],
    [{ flashSize: 1000 }, /flashSize must be a positive multiple of pageSize/],
    [{ appStartAddress: 0x8002001 }, /appStartAddress must be a block-aligned address/],
  ])("rejects %o", (options, message) => {
    expect(() => new KatapultDeviceModel(options)).toThrow(message);
  });

  it("uses the block size it reports", () => {
    const r = rig({ blockSize: 256, pageSize: 2048 });
    expect(frames(r.send(encodeConnect()))[0]!.payload.readUInt32LE(12)).toBe(256);
    expect(frames(r.send(encodeSendBlock(START, block(5, 256))))[0]!.payload).toEqual(u32le(Command.SEND_BLOCK, START));
    expect(r.send(encodeSendBlock(START + 256, block(5, 64)))).toEqual(GOLDEN.error);
  });
});
