import { randomBytes } from "node:crypto";
import { existsSync, readFileSync, realpathSync } from "node:fs";
import { mkdir, mkdtemp, rm, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { basename, join } from "node:path";
import { deflateSync } from "node:zlib";
import pino from "pino";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { KatapultFlasher, NOT_CANCELLABLE_WHILE_WRITING, type KatapultFlasherOptions } from "../../src/flash/katapult/flasher.js";
import type { KatapultTimings } from "../../src/flash/katapult/session.js";
import type { FlashJobTarget } from "../../src/flash/types.js";
import { parseFault } from "../../src/sim/katapult-device.js";
import { startVirtualDevice, type VirtualDevice, type VirtualDeviceOptions } from "../../src/sim/virtual-device.js";
import { RecordingContext } from "./support/recording-context.js";
import { padded } from "./support/padded.js";
import { rejection } from "./support/rejection.js";

const FAST: Partial<KatapultTimings> = {
  timeoutMs: 300,
  blockTimeoutMs: 300,
  drainMs: 20,
  retryDelayMs: 20,
  busyDelayMs: 50,
  addressMismatchDelayMs: 5,
};

let dir: string;
const devices: VirtualDevice[] = [];

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), "moonflash-katapult-"));
});

afterEach(async () => {
  for (const device of devices.splice(0)) await device.stop();
  await rm(dir, { recursive: true, force: true });
});

async function startDevice(options: Partial<VirtualDeviceOptions> = {}): Promise<VirtualDevice> {
  const device = await startVirtualDevice({ path: join(dir, "ttyKATAPULT"), ...options });
  devices.push(device);
  return device;
}

async function writeImage(bytes: Buffer, name = "klipper.bin"): Promise<string> {
  const path = join(dir, name);
  await writeFile(path, bytes);
  return path;
}

/** What the engine hands the flasher: the image is read (and checked) once per job, by the engine. */
function target(device: string, firmwarePath: string, extra: Partial<FlashJobTarget> = {}): FlashJobTarget {
  return {
    mcu: "mcu",
    device,
    canbusInterface: "can0",
    baud: 250000,
    firmwarePath,
    image: existsSync(firmwarePath) ? readFileSync(firmwarePath) : Buffer.alloc(0),
    bootloader: "none",
    klipperPath: join(dir, "klipper"),
    wchispTransport: "usb",
    timeoutMs: 60_000,
    ...extra,
  };
}

function flasher(options: KatapultFlasherOptions = {}): KatapultFlasher {
  return new KatapultFlasher({ timings: FAST, bootloaderTimeoutMs: 3000, serialRequestSettleMs: 100, autoProbeTimeoutMs: 200, ...options });
}

/** Discovery roots with nothing in them: this machine's /dev/serial and /sys stay out of the test. */
function noSystemTree(): Pick<KatapultFlasherOptions, "devRoot" | "sysRoot"> {
  return { devRoot: join(dir, "no-dev"), sysRoot: join(dir, "no-sys") };
}

function flashed(device: VirtualDevice, image: Buffer): Buffer {
  return device.model.flash.subarray(0, padded(image, device.model.blockSize).length);
}

const commands = (device: VirtualDevice): string[] => device.model.frames.map((f) => f.name);

/** A Klipper-like image: firmware bytes with the compressed data dictionary inside. */
function klipperImage(mcu: string, size = 2000): Buffer {
  const dict = deflateSync(JSON.stringify({ version: "v0.13.0-test", config: { MCU: mcu } }));
  return Buffer.concat([randomBytes(size), dict, randomBytes(300)]);
}

describe("KatapultFlasher against a virtual Katapult on a pty", () => {
  it("flashes and verifies: device flash equals the padded image, COMPLETE sent, stages and progress reported", async () => {
    const device = await startDevice();
    const image = randomBytes(64 * 40 + 17);
    const ctx = new RecordingContext();
    const outcome = await flasher().flash(target(device.path, await writeImage(image, "firmware.bin")), ctx);

    expect(flashed(device, image)).toEqual(padded(image));
    expect(outcome).toMatchObject({
      bytes: image.length,
      verified: true,
      device: device.path,
      details: { blockSize: 64, appStart: "0x8002000", mcuType: "stm32f103xe", softwareVersion: "v0.13.0-virtual", protocolVersion: "1.1.0", pages: 3 },
    });
    expect(commands(device).at(-1)).toBe("COMPLETE");
    expect(commands(device).filter((c) => c === "REQUEST_BLOCK")).toHaveLength(41);
    expect(ctx.stages()).toEqual(["bootloader", "connect", "write", "verify"]);
    expect(ctx.lastProgress("write")).toMatchObject({ done: image.length, total: image.length });
    expect(ctx.lastProgress("verify")).toMatchObject({ done: image.length, total: image.length });
    const lockIndex = ctx.calls.findIndex((c) => c.call === "setCancellable");
    const firstWrite = ctx.calls.findIndex((c) => c.call === "progress");
    expect(ctx.calls[lockIndex]).toEqual({ call: "setCancellable", cancellable: false, reason: NOT_CANCELLABLE_WHILE_WRITING });
    expect(lockIndex).toBeLessThan(firstWrite);
  });

  it.each(["drop-reply:SEND_BLOCK:3", "busy:SEND_BLOCK:5", "nack:CONNECT:1", "error:SEND_BLOCK:2", "drop-reply:REQUEST_BLOCK:4"])(
    "still succeeds with fault %s",
    async (fault) => {
      const device = await startDevice({ faults: [parseFault(fault)] });
      const image = randomBytes(64 * 8);
      const outcome = await flasher().flash(target(device.path, await writeImage(image)), new RecordingContext());
      expect(outcome.verified).toBe(true);
      expect(flashed(device, image)).toEqual(image);
    },
  );

  it.each([undefined, "drop-reply:REQUEST_BLOCK:4", "busy:REQUEST_BLOCK:4", "nack:REQUEST_BLOCK:4"])(
    "over an emulated 250000-baud UART with Katapult's 96-byte transmit buffer, read-back ahead loses no reply (fault %s)",
    async (fault) => {
      const device = await startDevice({ baud: 250000, faults: fault ? [parseFault(fault)] : [] });
      const image = randomBytes(64 * 40);
      const outcome = await flasher().flash(target(device.path, await writeImage(image)), new RecordingContext());
      expect(outcome.verified).toBe(true);
      expect(flashed(device, image)).toEqual(image);
      // One REQUEST_BLOCK per block, plus one for the injected fault: a reply dropped for lack of buffer would add more.
      expect(commands(device).filter((c) => c === "REQUEST_BLOCK")).toHaveLength(fault ? 41 : 40);
    },
  );

  it("over an emulated UART, never sends while the board programs a block (write ahead starts on the ACK's first bytes)", async () => {
    const device = await startDevice({ baud: 250000, writeDelayMs: 2 });
    const image = randomBytes(64 * 30);
    const outcome = await flasher().flash(target(device.path, await writeImage(image)), new RecordingContext());
    expect(outcome.verified).toBe(true);
    expect(flashed(device, image)).toEqual(image);
    expect(commands(device).filter((c) => c === "SEND_BLOCK")).toHaveLength(30);
    expect(device.model.bytesWhileWriting).toBe(0);
  });

  it("fails with VERIFY_FAILED on corrupt read-back and does not send COMPLETE: the bad image is not started", async () => {
    const device = await startDevice({ mode: "app", faults: [parseFault("corrupt-readback:3")] });
    const image = randomBytes(64 * 6);
    const err = await rejection(flasher().flash(target(device.path, await writeImage(image), { bootloader: "serial" }), new RecordingContext()));
    expect(err.code).toBe("VERIFY_FAILED");
    expect(err.details.firstBadAddress).toMatch(/^0x80020C/);
    expect(err.message).toContain("COMPLETE was not sent, so the board stays in Katapult");
    expect(commands(device)).not.toContain("COMPLETE");
    expect(device.model.completed).toBe(false);
    expect(device.model.mode).toBe("katapult");
  });

  it("fails with DEVICE_TIMEOUT when the bootloader never answers; COMPLETE goes out once to the board it asked into Katapult", async () => {
    const device = await startDevice({ mode: "app", faults: [parseFault("silence")] });
    const f = flasher({ timings: { ...FAST, tries: 2, timeoutMs: 150 } });
    const err = await rejection(f.flash(target(device.path, await writeImage(randomBytes(256)), { bootloader: "serial" }), new RecordingContext()));
    expect(err.code).toBe("DEVICE_TIMEOUT");
    expect(err.message).toBe("Katapult did not answer CONNECT after 2 tries: is the board in its bootloader, is Klipper stopped, is the baud right?");
    // Nothing was written and the board was running its application before: COMPLETE, but once, as it never answered.
    expect(commands(device)).toEqual(["CONNECT", "CONNECT", "COMPLETE"]);
  });

  it("fails with FLASH_FAILED naming the address when the device disconnects mid-write, and says how to recover", async () => {
    const device = await startDevice({ faults: [parseFault("disconnect:10")] });
    const err = await rejection(flasher().flash(target(device.path, await writeImage(randomBytes(64 * 30))), new RecordingContext()));
    expect(err.code).toBe("FLASH_FAILED");
    expect(err.details).toMatchObject({ address: "0x8002280", leftInBootloader: false });
    expect(err.message).toContain("The board disconnected and may hold an incomplete image");
    expect(device.model.completed).toBe(false);
  });

  it("a write that fails mid-way (fault error:SEND_BLOCK on three tries) sends no COMPLETE and leaves the board in Katapult", async () => {
    // SEND_BLOCK frames 5-7 are block 4 and its two retries (flashtool's 3 tries per block).
    const faults = ["error:SEND_BLOCK:5", "error:SEND_BLOCK:6", "error:SEND_BLOCK:7"].map(parseFault);
    const device = await startDevice({ mode: "app", faults });
    const ctx = new RecordingContext();
    const err = await rejection(flasher().flash(target(device.path, await writeImage(randomBytes(64 * 20)), { bootloader: "serial", mcu: "mcu toolhead" }), ctx));
    expect(err.code).toBe("FLASH_FAILED");
    expect(err.details).toMatchObject({ address: "0x8002100", leftInBootloader: true });
    expect(err.message).toBe(
      "Flash write failed, flash address 0x8002100: Katapult refused SEND_BLOCK 3 times (last: ERROR reply (command failed)). Flash again. " +
        "COMPLETE was not sent, so the board stays in Katapult instead of starting an incomplete image: run the flash again " +
        "(FLASH_MCU MCU=toolhead in a macro, or moonflash flash toolhead). A reset or power-cycle before that would start the incomplete image.",
    );
    expect(device.model.frames.filter((f) => f.name === "SEND_BLOCK")).toHaveLength(7);
    expect(commands(device)).not.toContain("COMPLETE");
    // The model sets `completed` as it accepts COMPLETE (the 'complete' event follows ~100 ms later).
    expect(device.model.completed).toBe(false);
    expect(device.model.mode).toBe("katapult");
    expect(ctx.logs()).toContainEqual({ level: "warn", message: expect.stringContaining("Not sending COMPLETE") });
    // The board answers the next CONNECT where it was left: a retry needs no bootloader request.
    const retry = await flasher().flash(target(device.path, await writeImage(randomBytes(64 * 20), "retry.bin"), { bootloader: "auto" }), new RecordingContext());
    expect(retry.verified).toBe(true);
    expect(device.model.completed).toBe(true);
  });

  it("the trial's truncated image: a board whose MCU type the table does not know fails past its flash end, stays in Katapult, and a retry flashes it", async () => {
    // 16 KiB of application flash; writes past it get ERROR, as on the real board.
    const device = await startDevice({ mode: "app", mcuType: "virtual_unknown_mcu", flashSize: 16 * 1024 });
    const err = await rejection(flasher().flash(target(device.path, await writeImage(randomBytes(20 * 1024)), { bootloader: "serial" }), new RecordingContext()));
    expect(err.code).toBe("FLASH_FAILED");
    expect(err.details.address).toBe("0x8006000");
    expect(err.message).toContain("the board stays in Katapult");
    expect(err.message).toContain("FLASH_MCU MCU=mcu");
    expect(commands(device)).not.toContain("COMPLETE");
    expect(device.model.mode).toBe("katapult");

    const image = randomBytes(12 * 1024);
    const retry = await flasher().flash(target(device.path, await writeImage(image, "fits.bin"), { bootloader: "auto" }), new RecordingContext());
    expect(retry.verified).toBe(true);
    expect(flashed(device, image)).toEqual(image);
    expect(commands(device).at(-1)).toBe("COMPLETE");
  });

  it("refuses MCU_MISMATCH from the configured mcu_type before any SEND_BLOCK; COMPLETE sends the board back to its application", async () => {
    const device = await startDevice({ mode: "app", mcuType: "stm32f103xe" });
    const backInApp = new Promise<void>((resolve) => device.once("complete", resolve));
    const ctx = new RecordingContext();
    const err = await rejection(flasher().flash(target(device.path, await writeImage(randomBytes(512)), { expectedMcuType: "STM32F446XX", bootloader: "serial" }), ctx));
    expect(err.code).toBe("MCU_MISMATCH");
    expect(err.details).toMatchObject({ expectedMcu: "STM32F446XX", bootloaderMcu: "stm32f103xe" });
    expect(commands(device)).toEqual(["CONNECT", "COMPLETE"]);
    expect(ctx.calls.some((c) => c.call === "setCancellable")).toBe(false);
    await backInApp;
    expect(device.model.mode).toBe("app");
  });

  it("refuses MCU_MISMATCH on a board that was already in Katapult and leaves it there (its flash may hold anything)", async () => {
    const device = await startDevice({ mcuType: "stm32f103xe" });
    const ctx = new RecordingContext();
    const err = await rejection(flasher().flash(target(device.path, await writeImage(randomBytes(512)), { expectedMcuType: "rp2040", bootloader: "none" }), ctx));
    expect(err.code).toBe("MCU_MISMATCH");
    expect(commands(device)).toEqual(["CONNECT"]);
    expect(ctx.logs()).toContainEqual({ level: "info", message: "Not sending COMPLETE: the board was in Katapult before this flash began, so it stays there" });
  });

  it("refuses an image whose embedded Klipper dictionary names another MCU", async () => {
    const device = await startDevice({ mcuType: "stm32f103xe" });
    const err = await rejection(flasher().flash(target(device.path, await writeImage(klipperImage("rp2040"))), new RecordingContext()));
    expect(err.code).toBe("MCU_MISMATCH");
    expect(err.details).toMatchObject({ expectedMcu: "rp2040", bootloaderMcu: "stm32f103xe" });
    expect(commands(device)).not.toContain("SEND_BLOCK");
  });

  it("accepts an embedded MCU that matches case-insensitively", async () => {
    const device = await startDevice({ mcuType: "stm32f446xx" });
    const image = klipperImage("STM32F446XX");
    const outcome = await flasher().flash(target(device.path, await writeImage(image)), new RecordingContext());
    expect(outcome.details).toMatchObject({ mcuType: "stm32f446xx" });
    expect(flashed(device, image)).toEqual(padded(image));
  });

  it("refuses an image larger than the flash after the bootloader (flash_size, FIRMWARE_TOO_LARGE) without writing", async () => {
    const device = await startDevice();
    // 16 KiB flash with an 8 KiB bootloader (app at 0x8002000) leaves 8 KiB.
    const t = { ...target(device.path, await writeImage(randomBytes(8 * 1024 + 1))), flashSize: 16 * 1024 };
    const err = await rejection(flasher().flash(t, new RecordingContext()));
    expect(err.code).toBe("FIRMWARE_TOO_LARGE");
    expect(err.details).toMatchObject({ available: 8 * 1024, flashSize: 16 * 1024, source: "moonflash.conf flash_size" });
    // Already in Katapult when the flash began (bootloader: none): it stays there.
    expect(commands(device)).toEqual(["CONNECT"]);
  });

  it("without flash_size, refuses an image larger than Klipper's flash for the reported MCU type before the first block (the trial's 300000 bytes)", async () => {
    // stm32f103xe with 256 KiB of flash, as on the trial's board; Klipper links at most 128 KiB for that type.
    const device = await startDevice({ mode: "app", mcuType: "stm32f103xe", flashSize: 256 * 1024 });
    const blocks: unknown[] = [];
    device.on("block", (b) => blocks.push(b));
    const err = await rejection(flasher().flash(target(device.path, await writeImage(randomBytes(300_000)), { bootloader: "serial" }), new RecordingContext()));
    expect(err.code).toBe("FIRMWARE_TOO_LARGE");
    expect(err.message).toBe(
      "The image is 300000 bytes but a Klipper build for stm32f103xe, the MCU this bootloader reports, holds at most 131072 bytes " +
        "(FLASH_SIZE in Klipper src/stm32/Kconfig). Nothing was written. Build the firmware for this board (make menuconfig: processor model, " +
        "bootloader offset), or, if the chip really has room for this image, set flash_size: in [mcu] of moonflash.conf.",
    );
    expect(err.details).toMatchObject({ imageBytes: 300_000, available: 131072, mcuType: "stm32f103xe", appStart: "0x8002000" });
    expect(commands(device)).not.toContain("SEND_BLOCK");
    expect(device.model.written).toBe(0);
    expect(blocks).toEqual([]);
    // Nothing was written to a board that was running its application: it goes back to it.
    expect(commands(device)).toEqual(["CONNECT", "COMPLETE"]);
  });

  it("without flash_size, a chip whose whole flash is known loses the bootloader's share: stm32f446xx with a 32 KiB bootloader keeps 480 KiB", async () => {
    const device = await startDevice({ mcuType: "stm32f446xx", appStartAddress: 0x8008000 });
    const err = await rejection(flasher().flash(target(device.path, await writeImage(randomBytes(480 * 1024 + 1))), new RecordingContext()));
    expect(err.code).toBe("FIRMWARE_TOO_LARGE");
    expect(err.details).toMatchObject({ available: 480 * 1024, flashSize: 512 * 1024, appStart: "0x8008000", source: "Klipper src/stm32/Kconfig" });
    expect(err.message).toContain("stm32f446xx has 524288 bytes of flash (FLASH_SIZE in Klipper src/stm32/Kconfig) and only 491520 follow the bootloader");
    expect(device.model.written).toBe(0);
  });

  it("without flash_size, a type whose chips may have more flash than Klipper links is not cut by the bootloader: stm32f103xe after a 64 KiB bootloader takes 65 KiB", async () => {
    // Klipper links 128 KiB from the application start for stm32f103xe; 128 KiB - 64 KiB would wrongly refuse this image.
    const device = await startDevice({ mcuType: "stm32f103xe", appStartAddress: 0x8010000 });
    const image = randomBytes(65 * 1024);
    const outcome = await flasher().flash(target(device.path, await writeImage(image)), new RecordingContext());
    expect(outcome.verified).toBe(true);
    expect(flashed(device, image)).toEqual(image);
  });

  it("honours cancellation before writing starts", async () => {
    const device = await startDevice();
    const ctx = new RecordingContext();
    ctx.controller.abort();
    const err = await rejection(flasher().flash(target(device.path, await writeImage(randomBytes(256))), ctx));
    expect(err.code).toBe("CANCELLED");
    expect(commands(device)).not.toContain("SEND_BLOCK");
  });

  it("enters Katapult from Klipper with the serial request string (bootloader: serial)", async () => {
    const device = await startDevice({ mode: "app" });
    const entered = new Promise<void>((resolve) => device.once("bootloader", resolve));
    const image = randomBytes(64 * 5);
    const outcome = await flasher().flash(target(device.path, await writeImage(image), { bootloader: "serial" }), new RecordingContext());
    await entered;
    expect(outcome.verified).toBe(true);
    expect(flashed(device, image)).toEqual(image);
  });

  it("follows a USB board that re-enumerates as usb-katapult_ (bootloader: usb, simulated USB re-enumeration)", async () => {
    const byId = join(dir, "by-id");
    await mkdir(byId);
    const klipperPath = join(byId, "usb-Klipper_stm32f446xx_12345-if00");
    const katapultPath = join(byId, "usb-katapult_stm32f446xx_12345-if00");
    const device = await startDevice({ mode: "app", mcuType: "stm32f446xx", path: klipperPath, reappearPath: katapultPath, reappearDelayMs: 200 });
    const image = randomBytes(64 * 5);
    const outcome = await flasher(noSystemTree()).flash(target(klipperPath, await writeImage(image), { bootloader: "usb" }), new RecordingContext());
    expect(outcome.device).toBe(katapultPath);
    expect(flashed(device, image)).toEqual(image);
  });

  it("uses the same path when a USB board enters Katapult without re-enumerating (bootloader: usb)", async () => {
    const device = await startDevice({ mode: "app" });
    const image = randomBytes(64 * 3);
    const f = flasher({ bootloaderTimeoutMs: 400, ...noSystemTree() });
    const outcome = await f.flash(target(device.path, await writeImage(image), { bootloader: "usb" }), new RecordingContext());
    expect(outcome.device).toBe(device.path);
    expect(flashed(device, image)).toEqual(image);
  });

  it("auto on a UART/pty board running Klipper: the probe CONNECT fails, the serial request gets it into Katapult", async () => {
    const device = await startDevice({ mode: "app" });
    const entered = new Promise<void>((resolve) => device.once("bootloader", resolve));
    const image = randomBytes(64 * 4);
    const outcome = await flasher().flash(target(device.path, await writeImage(image), { bootloader: "auto" }), new RecordingContext());
    await entered;
    expect(outcome.verified).toBe(true);
    expect(device.model.completed).toBe(true);
    expect(flashed(device, image)).toEqual(image);
  });

  it("auto on a UART/pty board already in Katapult: the probe CONNECT answers, no request is sent", async () => {
    const device = await startDevice();
    const image = randomBytes(64 * 4);
    await flasher().flash(target(device.path, await writeImage(image), { bootloader: "auto" }), new RecordingContext());
    expect(commands(device).slice(0, 2)).toEqual(["CONNECT", "CONNECT"]);
    expect(flashed(device, image)).toEqual(image);
  });

  it("auto reads Klipper's USB ids from sysfs and uses the 1200-baud request (simulated USB sysfs)", async () => {
    const byId = join(dir, "by-id");
    await mkdir(byId);
    const klipperPath = join(byId, "usb-Klipper_rp2040_E66-if00");
    const katapultPath = join(byId, "usb-katapult_rp2040_E66-if00");
    const device = await startVirtualDevice({ mode: "app", mcuType: "rp2040", path: klipperPath, reappearPath: katapultPath, reappearDelayMs: 200 });
    devices.push(device);
    const sysfs = join(dir, "sys");
    const usbDevice = join(sysfs, "devices", "usb1", "1-1");
    await mkdir(join(usbDevice, "1-1:1.0"), { recursive: true });
    await writeFile(join(usbDevice, "idVendor"), "1d50\n");
    await writeFile(join(usbDevice, "idProduct"), "614e\n");
    const ttyDir = join(sysfs, "class", "tty", basename(device.slavePath!));
    await mkdir(ttyDir, { recursive: true });
    await symlink(join(usbDevice, "1-1:1.0"), join(ttyDir, "device"));

    const image = randomBytes(64 * 3);
    const ctx = new RecordingContext();
    const outcome = await flasher({ ...noSystemTree(), sysRoot: sysfs }).flash(target(klipperPath, await writeImage(image), { bootloader: "auto" }), ctx);
    expect(outcome.device).toBe(katapultPath);
    expect(ctx.calls.some((c) => c.call === "log" && c.message.includes("running Klipper"))).toBe(true);
    expect(flashed(device, image)).toEqual(image);
  });

  it("auto on a board configured by its tty: discovery finds its usb-Klipper_ by-id link, and the board is followed to usb-katapult_ (simulated USB)", async () => {
    const devRoot = join(dir, "dev");
    const byId = join(devRoot, "serial", "by-id");
    await mkdir(byId, { recursive: true });
    const katapultPath = join(byId, "usb-katapult_stm32f446xx_777-if00");
    const device = await startDevice({ mode: "app", mcuType: "stm32f446xx", path: join(byId, "usb-Klipper_stm32f446xx_777-if00"), reappearPath: katapultPath, reappearDelayMs: 200 });
    const tty = device.slavePath!;
    // Where the board was while it took the blocks: after COMPLETE it re-enumerates again (back to usb-Klipper_), so
    // the link is read while Katapult runs.
    let katapultTty: string | null = null;
    device.on("block", () => (katapultTty ??= realpathSync(katapultPath)));
    const image = randomBytes(64 * 3);
    const ctx = new RecordingContext();
    const outcome = await flasher({ devRoot, sysRoot: join(dir, "no-sys") }).flash(target(tty, await writeImage(image), { bootloader: "auto" }), ctx);
    expect(ctx.logs()).toContainEqual({ level: "info", message: expect.stringContaining(`${tty} is a USB device running Klipper`) });
    // Re-enumerated, the board is the pty behind the usb-katapult_ link (its number may be the old tty's again).
    expect(katapultTty).not.toBeNull();
    expect([katapultPath, katapultTty]).toContain(outcome.device);
    expect(flashed(device, image)).toEqual(image);
    expect(device.model.completed).toBe(true);
  });

  it("auto on a USB board discovery classifies as Katapult connects without a request (simulated USB sysfs)", async () => {
    const device = await startDevice({ mcuType: "rp2040" });
    const sysfs = join(dir, "sys");
    const usbDevice = join(sysfs, "devices", "usb1", "1-2");
    await mkdir(join(usbDevice, "1-2:1.0"), { recursive: true });
    await writeFile(join(usbDevice, "idVendor"), "1d50\n");
    await writeFile(join(usbDevice, "idProduct"), "6177\n");
    const ttyDir = join(sysfs, "class", "tty", basename(device.slavePath!));
    await mkdir(ttyDir, { recursive: true });
    await symlink(join(usbDevice, "1-2:1.0"), join(ttyDir, "device"));

    const image = randomBytes(64 * 3);
    const ctx = new RecordingContext();
    await flasher({ ...noSystemTree(), sysRoot: sysfs }).flash(target(device.path, await writeImage(image), { bootloader: "auto" }), ctx);
    expect(ctx.logs()).toContainEqual({ level: "info", message: expect.stringContaining("is a USB device running Katapult (Katapult bootloader (USB))") });
    // No probe CONNECT: the first CONNECT is the flash's own.
    expect(commands(device).filter((c) => c === "CONNECT")).toHaveLength(1);
    expect(flashed(device, image)).toEqual(image);
    // It was in Katapult before: COMPLETE only because the new image verified.
    expect(commands(device).at(-1)).toBe("COMPLETE");
  });

  it("times out with BOOTLOADER_TIMEOUT when the USB board comes back under a name it cannot follow (simulated USB)", async () => {
    const device = await startDevice({ mode: "app", reappearPath: join(dir, "usb-unknown-name"), reappearDelayMs: 100 });
    const f = flasher({ bootloaderTimeoutMs: 400, ...noSystemTree() });
    const err = await rejection(f.flash(target(device.path, await writeImage(randomBytes(64)), { bootloader: "usb" }), new RecordingContext()));
    expect(err.code).toBe("BOOTLOADER_TIMEOUT");
  });

  it("preflight refuses a missing device and a target without one", async () => {
    const f = flasher();
    const missing = await rejection(f.preflight(target(join(dir, "ttyNONE"), join(dir, "x.bin"))));
    expect(missing.code).toBe("DEVICE_NOT_FOUND");
    const can = await rejection(f.preflight({ ...target("", join(dir, "x.bin")), device: undefined, canbusUuid: "0123456789ab" }));
    expect(can.code).toBe("DEVICE_NOT_FOUND");
    expect(can.message).toContain("flashtool");
  });
});

describe("KatapultFlasher through serialport's public read/write (the binding's internals treated as missing)", () => {
  it("asks a board on an emulated 250000-baud UART into Katapult, flashes and verifies it, and warns once", async () => {
    const device = await startDevice({ mode: "app", baud: 250000 });
    const lines: Array<Record<string, unknown>> = [];
    const logger = pino({ level: "warn" }, { write: (line: string) => lines.push(JSON.parse(line) as Record<string, unknown>) });
    const image = randomBytes(64 * 40 + 5);
    const outcome = await flasher({ logger, ignoreBindingInternals: true }).flash(target(device.path, await writeImage(image), { bootloader: "auto" }), new RecordingContext());

    expect(outcome.verified).toBe(true);
    expect(flashed(device, image)).toEqual(padded(image));
    // The probe CONNECT got no answer from Klipper, the serial request moved the board, then one exchange per block
    // each way: a reply lost to the slower link would show as a REQUEST_BLOCK retry.
    expect(commands(device).filter((c) => c === "SEND_BLOCK")).toHaveLength(41);
    expect(commands(device).filter((c) => c === "REQUEST_BLOCK")).toHaveLength(41);
    expect(device.model.completed).toBe(true);
    // Two links were opened, the probe's and the flash's: one warning.
    expect(lines.filter((l) => String(l.msg).includes("public read/write"))).toHaveLength(1);
  });
});
