// The requests that move a board from Klipper into Katapult, as bytes and line settings on a real pty.

import { once } from "node:events";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { requestUsbBootloader, sendSerialBootloaderRequest } from "../../src/flash/katapult/bootloader-request.js";
import { SERIAL_BOOTLOADER_REQUEST } from "../../src/flash/katapult/codec.js";
import { openSerialLink } from "../../src/flash/link.js";
import { openPtyRelay, type PtyRelay } from "../../src/sim/pty-relay.js";
import { rejection } from "./support/rejection.js";

let dir: string;
let relay: PtyRelay | undefined;

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), "moonflash-bootloader-request-"));
});

afterEach(async () => {
  await relay?.close();
  relay = undefined;
  await rm(dir, { recursive: true, force: true });
});

async function startRelay(): Promise<PtyRelay> {
  relay = await openPtyRelay(join(dir, "ttyVIRT0"));
  return relay;
}

describe("bootloader requests over a real pty", () => {
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
    const chunks: Buffer[] = [];
    pty.on("data", (chunk) => chunks.push(chunk));
    const closed = once(pty, "close");
    await sendSerialBootloaderRequest(pty.linkPath, 250000);
    await closed;
    expect(Buffer.concat(chunks)).toEqual(SERIAL_BOOTLOADER_REQUEST);
    expect(pty.baud).toBe(250000);
  });

  it("does not send the serial request to a device another program holds (DEVICE_IN_USE)", async () => {
    const pty = await startRelay();
    const held = await openSerialLink(pty.linkPath, 250000);
    try {
      const err = await rejection(sendSerialBootloaderRequest(pty.linkPath, 250000));
      expect(err.code).toBe("DEVICE_IN_USE");
    } finally {
      await held.close();
    }
  });

  it("reports a missing device as DEVICE_NOT_FOUND", async () => {
    const err = await rejection(requestUsbBootloader(join(dir, "ttyNONE")));
    expect(err.code).toBe("DEVICE_NOT_FOUND");
  });
});
