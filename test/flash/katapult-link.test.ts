import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { once } from "node:events";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { SERIAL_BOOTLOADER_REQUEST } from "../../src/flash/katapult/codec.js";
import { openSerialLink, requestUsbBootloader, sendSerialBootloaderRequest, type ByteLink } from "../../src/flash/link.js";
import { openPtyRelay, type PtyRelay } from "../../src/sim/pty-relay.js";
import { rejection } from "./support/rejection.js";

let dir: string;
let relay: PtyRelay | undefined;
const links: ByteLink[] = [];

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), "moonflash-link-"));
});

afterEach(async () => {
  for (const link of links.splice(0)) await link.close();
  await relay?.close();
  relay = undefined;
  await rm(dir, { recursive: true, force: true });
});

async function startRelay(): Promise<PtyRelay> {
  relay = await openPtyRelay(join(dir, "ttyVIRT0"));
  return relay;
}

async function open(path: string, baud = 250000): Promise<ByteLink> {
  const link = await openSerialLink(path, baud);
  links.push(link);
  return link;
}

/** Collects bytes from an emitter-style source until `length` bytes arrived. */
function collect(subscribe: (listener: (chunk: Buffer) => void) => void, length: number): Promise<Buffer> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    let size = 0;
    subscribe((chunk) => {
      chunks.push(chunk);
      size += chunk.length;
      if (size >= length) resolve(Buffer.concat(chunks));
    });
  });
}

describe("serial ByteLink over a real pty", () => {
  it("moves bytes both ways and sets the line speed", async () => {
    const pty = await startRelay();
    const link = await open(pty.linkPath);
    const toDevice = collect((l) => pty.on("data", l), 5);
    await link.write(Buffer.from("hello"));
    expect(await toDevice).toEqual(Buffer.from("hello"));
    const toHost = collect((l) => link.onData(l), 4);
    pty.write(Buffer.from([1, 2, 3, 4]));
    expect(await toHost).toEqual(Buffer.from([1, 2, 3, 4]));
    expect(pty.baud).toBe(250000);
  });

  it("locks the device: a second opener gets DEVICE_IN_USE", async () => {
    const pty = await startRelay();
    await open(pty.linkPath);
    const err = await rejection(openSerialLink(pty.linkPath, 250000));
    expect(err.code).toBe("DEVICE_IN_USE");
  });

  it("reports a missing device as DEVICE_NOT_FOUND", async () => {
    const err = await rejection(openSerialLink(join(dir, "nothing-here"), 250000));
    expect(err.code).toBe("DEVICE_NOT_FOUND");
    expect(err.message).toContain("nothing-here");
  });

  it("notices the device vanishing: the next write fails and onClose fires", async () => {
    const pty = await startRelay();
    const link = await open(pty.linkPath);
    const closed = new Promise<Error | undefined>((resolve) => link.onClose(resolve));
    await pty.close();
    const err = await rejection(link.write(Buffer.from("x")));
    expect(err.code).toBe("DEVICE_NOT_FOUND");
    expect(err.details.disconnected).toBe(true);
    expect(await closed).toBeInstanceOf(Error);
    expect(link.isOpen).toBe(false);
  });

  it("requests the USB bootloader with 1200 baud and a close (DTR ioctls are ENOTTY on a pty)", async () => {
    const pty = await startRelay();
    const bauds: number[] = [];
    pty.on("baud", (baud) => bauds.push(baud));
    const closed = once(pty, "close");
    await requestUsbBootloader(pty.linkPath);
    await closed;
    expect(bauds).toContain(1200);
  });

  it("sends the serial bootloader request string at the board's baud", async () => {
    const pty = await startRelay();
    const received = collect((l) => pty.on("data", l), SERIAL_BOOTLOADER_REQUEST.length);
    await sendSerialBootloaderRequest(pty.linkPath, 250000);
    expect(await received).toEqual(SERIAL_BOOTLOADER_REQUEST);
  });
});
