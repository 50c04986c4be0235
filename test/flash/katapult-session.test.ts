import { createHash, randomBytes } from "node:crypto";
import { afterEach, describe, expect, it } from "vitest";
import { KatapultSession, readAheadLead, type KatapultTimings } from "../../src/flash/katapult/session.js";
import { Command, FrameDecoder, encodeAck, encodeConnectPayload, encodeNack, u32le } from "../../src/flash/katapult/codec.js";
import { ScriptedKatapult, createLinkPair, type ScriptedPeerOptions } from "./support/memory-link.js";
import { padded } from "./support/padded.js";
import { rejection } from "./support/rejection.js";

const FAST: Partial<KatapultTimings> = {
  timeoutMs: 60,
  blockTimeoutMs: 60,
  drainMs: 5,
  retryDelayMs: 5,
  busyDelayMs: 5,
  addressMismatchDelayMs: 1,
};

const sessions: KatapultSession[] = [];
afterEach(() => {
  for (const s of sessions.splice(0)) s.dispose();
});

function setup(peer: ScriptedPeerOptions = {}, signal?: AbortSignal) {
  const { host, device } = createLinkPair();
  const katapult = new ScriptedKatapult(device, peer);
  const logs: string[] = [];
  const session = new KatapultSession(host, { timings: FAST, signal, log: (_level, text) => logs.push(text) });
  sessions.push(session);
  return { host, device, katapult, session, logs };
}

/** Every way a reply can go wrong, as the scripted peer plays it. */
const FAULTY_REPLIES = [
  ["a dropped reply", "drop"],
  ["a BUSY reply", "busy"],
  ["a NACK", "nack"],
  ["an ERROR reply", "error"],
  ["an ACK echoing another command", "wrong-echo"],
  ["a reply with a bad CRC", "bad-crc"],
  ["an ACK with another address", "wrong-address"],
] as const;

/**
 * A hand-driven device on a memory link: it answers CONNECT itself and records the address of every `watched`
 * frame; the test releases the other replies byte by byte. `next()` resolves when the next watched frame arrives.
 */
function handDriven(watched: number) {
  const { host, device } = createLinkPair();
  const session = new KatapultSession(host, { timings: FAST });
  sessions.push(session);
  const addresses: number[] = [];
  const decoder = new FrameDecoder();
  let arrived: (() => void) | null = null;
  device.onData((chunk) => {
    for (const item of decoder.push(chunk)) {
      if (!("frame" in item)) continue;
      if (item.frame.cmd === Command.CONNECT) {
        void device.write(encodeAck(Command.CONNECT, encodeConnectPayload({ protocolWord: 0x00010100, appStartAddress: 0x8002000, blockSize: 64, mcuType: "stm32f103xe", softwareVersion: "v1" })));
      } else if (item.frame.cmd === watched) {
        addresses.push(item.frame.payload.readUInt32LE(0));
        arrived?.();
      }
    }
  });
  const next = (): Promise<void> => new Promise((resolve) => (arrived = resolve));
  return { device, session, addresses, next };
}

/** Long enough for the session to react to bytes it was given (it reacts within microseconds). */
const settle = (): Promise<void> => new Promise((resolve) => setTimeout(resolve, 20));

describe("KatapultSession over an in-memory link", () => {
  it("sends the golden CONNECT frame and decodes the reply", async () => {
    const { host, session } = setup({ mcuType: "stm32f446xx", blockSize: 128, appStartAddress: 0x8008000 });
    const info = await session.connect();
    expect(host.recording[0]).toEqual(Buffer.from("01881100f17c9903", "hex"));
    expect(info).toMatchObject({ mcuType: "stm32f446xx", blockSize: 128, appStartAddress: 0x8008000, protocolVersion: "1.1.0", softwareVersion: "v0.0.1-scripted" });
  });

  it("writes the image padded with 0xFF, reports pages, verifies and completes", async () => {
    const { katapult, session, host } = setup();
    const image = randomBytes(1000);
    await session.connect();
    const progress: Array<[number, number]> = [];
    const written = await session.writeImage(image, (done, total) => progress.push([done, total]));
    const expected = padded(image, 64);
    expect(katapult.image()).toEqual(expected);
    expect(written).toEqual({ blocks: 16, paddedBytes: 1024, sha1: createHash("sha1").update(expected).digest("hex") });
    expect(progress.at(-1)).toEqual([16, 16]);
    expect(await session.sendEof()).toBe(1);
    const verified = await session.verify(image);
    expect(verified.sha1).toBe(written.sha1);
    await session.complete();
    expect(katapult.received.filter((c) => c === "REQUEST_BLOCK")).toHaveLength(16);
    expect(katapult.received.at(-1)).toBe("COMPLETE");
    expect(host.recording.at(-1)).toEqual(Buffer.from("01881500911b9903", "hex"));
  });

  it.each(FAULTY_REPLIES)("retries SEND_BLOCK after %s and still writes every block", async (_label, behaviour) => {
    const { katapult, session, logs } = setup({ script: (cmd, n) => (cmd === "SEND_BLOCK" && n === 3 ? behaviour : "ack") });
    const image = randomBytes(64 * 5);
    await session.connect();
    await session.writeImage(image);
    await session.verify(image);
    expect(katapult.image()).toEqual(image);
    expect(katapult.received.filter((c) => c === "SEND_BLOCK")).toHaveLength(6);
    expect(logs.length).toBeGreaterThan(0);
  });

  it("gives up on CONNECT after 5 silent tries with DEVICE_TIMEOUT and a hint", async () => {
    const { katapult, session } = setup({ script: () => "drop" });
    const err = await rejection(session.connect());
    expect(err.code).toBe("DEVICE_TIMEOUT");
    expect(err.message).toBe("Katapult did not answer CONNECT after 5 tries: is the board in its bootloader, is Klipper stopped, is the baud right?");
    expect(katapult.received).toEqual(Array(5).fill("CONNECT"));
  });

  it("turns CONNECT refused every time into PROTOCOL_ERROR", async () => {
    const { session } = setup({ script: () => "error" });
    const err = await rejection(session.connect());
    expect(err.code).toBe("PROTOCOL_ERROR");
    expect(err.details).toMatchObject({ command: "CONNECT", tries: 5, lastReply: "error" });
  });

  it("uses the block tries for SEND_BLOCK and fails with FLASH_FAILED naming the flash address", async () => {
    const { katapult, session } = setup({ script: (cmd, n) => (cmd === "SEND_BLOCK" && n >= 2 ? "error" : "ack") });
    await session.connect();
    const err = await rejection(session.writeImage(randomBytes(64 * 4)));
    expect(err.code).toBe("FLASH_FAILED");
    expect(err.message).toMatch(/^Flash write failed, flash address 0x8002040/);
    expect(err.details).toMatchObject({ address: "0x8002040", command: "SEND_BLOCK" });
    expect(katapult.received.filter((c) => c === "SEND_BLOCK")).toHaveLength(1 + 3);
  });

  it("re-sends a block whose echoed address keeps differing 3 times, then fails", async () => {
    const { katapult, session } = setup({ script: (cmd) => (cmd === "SEND_BLOCK" ? "wrong-address" : "ack") });
    await session.connect();
    const err = await rejection(session.writeImage(randomBytes(64)));
    expect(err.code).toBe("FLASH_FAILED");
    expect(err.details).toMatchObject({ address: "0x8002000", echoedAddress: "0x8002001" });
    expect(katapult.received.filter((c) => c === "SEND_BLOCK")).toHaveLength(3);
  });

  it("reports VERIFY_FAILED with both SHA-1s and the first bad address when read-back differs", async () => {
    const { session } = setup({ corruptReadbackBlock: 2 });
    const image = randomBytes(64 * 4 + 10);
    await session.connect();
    const written = await session.writeImage(image);
    const err = await rejection(session.verify(image));
    expect(err.code).toBe("VERIFY_FAILED");
    expect(err.details.expectedSha1).toBe(written.sha1);
    expect(err.details.receivedSha1).not.toBe(written.sha1);
    expect(err.details.firstBadAddress).toBe("0x8002083");
  });

  it("fails REQUEST_BLOCK with PROTOCOL_ERROR when the device keeps returning other blocks", async () => {
    const { session } = setup({ script: (cmd) => (cmd === "REQUEST_BLOCK" ? "wrong-address" : "ack") });
    const image = randomBytes(64);
    await session.connect();
    await session.writeImage(image);
    const err = await rejection(session.verify(image));
    expect(err.code).toBe("PROTOCOL_ERROR");
    expect(err.message).toMatch(/Block Request Error, block 0/);
  });

  it("turns a link closed mid-transfer into FLASH_FAILED with the address", async () => {
    const { session } = setup({ script: (cmd, n) => (cmd === "SEND_BLOCK" && n === 3 ? "hang-up" : "ack") });
    await session.connect();
    const err = await rejection(session.writeImage(randomBytes(64 * 6)));
    expect(err.code).toBe("FLASH_FAILED");
    expect(err.details).toMatchObject({ address: "0x8002080", disconnected: true });
  });

  it("turns a link closed during CONNECT into DEVICE_NOT_FOUND", async () => {
    const { session } = setup({ script: () => "hang-up" });
    const err = await rejection(session.connect());
    expect(err.code).toBe("DEVICE_NOT_FOUND");
  });

  it("rejects a block size Katapult cannot have", async () => {
    const { session } = setup({ blockSize: 32 });
    const err = await rejection(session.connect());
    expect(err.code).toBe("PROTOCOL_ERROR");
    expect(err.details).toMatchObject({ blockSize: 32 });
  });

  it("stops with CANCELLED when the signal aborts while waiting for a reply", async () => {
    const controller = new AbortController();
    const { session } = setup({ script: () => "drop" }, controller.signal);
    const pending = session.sendCommand(Command.CONNECT, undefined, { tries: 5, timeoutMs: 10_000 });
    setTimeout(() => controller.abort(), 20);
    const err = await rejection(pending);
    expect(err.code).toBe("CANCELLED");
  });

  it("reads back ahead: REQUEST_BLOCK n+1 goes out once 52 bytes of reply n are in, never before", async () => {
    // Each 80-byte read-back reply is released in steps, and we note what the host sent.
    const { device, session, addresses: requests, next: nextRequest } = handDriven(Command.REQUEST_BLOCK);
    const image = randomBytes(64 * 3);
    await session.connect();
    expect(readAheadLead(64)).toBe(52);

    let request = nextRequest();
    const verified = session.verify(image);
    await request;
    for (let index = 0; index < 3; index++) {
      const address = 0x8002000 + index * 64;
      const reply = encodeAck(Command.REQUEST_BLOCK, Buffer.concat([u32le(address), image.subarray(index * 64, index * 64 + 64)]));
      expect(reply).toHaveLength(80);
      await device.write(reply.subarray(0, 51));
      await settle();
      // 51 bytes in: once the 12-byte request crossed, 17 could still be unsent, and 17 + 80 exceed the 96-byte buffer.
      expect(requests).toHaveLength(index + 1);
      request = nextRequest();
      await device.write(reply.subarray(51, 52));
      if (index < 2) {
        await request;
        expect(requests).toEqual(Array.from({ length: index + 2 }, (_, i) => 0x8002000 + i * 64));
      } else {
        await settle();
        expect(requests).toHaveLength(3);
      }
      await device.write(reply.subarray(52));
    }
    expect((await verified).sha1).toBe(createHash("sha1").update(image).digest("hex"));
  });

  it("never reads ahead when two replies cannot share the device's transmit buffer (block size 128+)", () => {
    expect(readAheadLead(128)).toBeNull();
    expect(readAheadLead(512)).toBeNull();
  });

  it.each(FAULTY_REPLIES)("recovers from %s while reading ahead and still verifies", async (_label, behaviour) => {
    const { katapult, session } = setup({ splitRepliesAt: 52, script: (cmd, n) => (cmd === "REQUEST_BLOCK" && n === 3 ? behaviour : "ack") });
    const image = randomBytes(64 * 6);
    await session.connect();
    const written = await session.writeImage(image);
    expect((await session.verify(image)).sha1).toBe(written.sha1);
    // Six blocks, one faulty try, and for replies that got 52 bytes in before failing the request sent ahead again.
    const reads = katapult.received.filter((c) => c === "REQUEST_BLOCK").length;
    expect(reads).toBeGreaterThanOrEqual(7);
    expect(reads).toBeLessThanOrEqual(8);
  });

  it("writes ahead: SEND_BLOCK n+1 goes out once ACK n begins (01 88 A0 02), never on a NACK", async () => {
    const { device, session, addresses: blocks, next: nextBlock } = handDriven(Command.SEND_BLOCK);
    const image = randomBytes(64 * 3);
    const ack = (index: number): Buffer => encodeAck(Command.SEND_BLOCK, u32le(0x8002000 + index * 64));
    await session.connect();

    let next = nextBlock();
    const written = session.writeImage(image);
    await next;
    // Block 0: three bytes of its ACK say nothing yet; the fourth (LEN 2) makes it a block ACK.
    await device.write(ack(0).subarray(0, 3));
    await settle();
    expect(blocks).toEqual([0x8002000]);
    next = nextBlock();
    await device.write(ack(0).subarray(3, 4));
    await next;
    expect(blocks).toEqual([0x8002000, 0x8002040]);
    await device.write(ack(0).subarray(4));
    // Block 1 is NACKed: nothing goes ahead, block 1 is sent again.
    await device.write(encodeNack().subarray(0, 4));
    await settle();
    expect(blocks).toHaveLength(2);
    next = nextBlock();
    await device.write(encodeNack().subarray(4));
    await next;
    expect(blocks).toEqual([0x8002000, 0x8002040, 0x8002040]);
    next = nextBlock();
    await device.write(ack(1));
    await next;
    await device.write(ack(2));
    expect((await written).sha1).toBe(createHash("sha1").update(image).digest("hex"));
    expect(blocks).toEqual([0x8002000, 0x8002040, 0x8002040, 0x8002080]);
  });

  it.each(FAULTY_REPLIES)("recovers from %s while writing ahead and still writes every block", async (_label, behaviour) => {
    const { katapult, session } = setup({ splitRepliesAt: 4, script: (cmd, n) => (cmd === "SEND_BLOCK" && n === 3 ? behaviour : "ack") });
    const image = randomBytes(64 * 6);
    await session.connect();
    const written = await session.writeImage(image);
    expect(katapult.image()).toEqual(image);
    expect((await session.verify(image)).sha1).toBe(written.sha1);
    // Six blocks, the faulty try, and for an ACK-looking reply the block sent ahead once more.
    const writes = katapult.received.filter((c) => c === "SEND_BLOCK").length;
    expect(writes).toBeGreaterThanOrEqual(7);
    expect(writes).toBeLessThanOrEqual(8);
  });
});
