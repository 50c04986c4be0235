// MakeFlasher running real GNU make on a fake Klipper tree whose `flash` target records its variables and prints
// what flash_usb.py / dfu-util print (including dfu-util's false failure).

import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { isMoonflashError, type MoonflashError } from "../../src/core/errors.js";
import { MakeFlasher } from "../../src/flash/methods/make.js";
import type { FlashTarget } from "../../src/flash/types.js";
import { recordingContext } from "./recording-context.js";

const klipperTree = fileURLToPath(new URL("../fixtures/klipper-tree/", import.meta.url));
let dir: string;
let firmware: string;
let kconfig: string;
let recordFile: string;
/** Stand-in for the by-id link: preflight checks that the configured device exists. */
let device: string;

async function rejection(promise: Promise<unknown>): Promise<MoonflashError> {
  const err = await promise.then(
    () => {
      throw new Error("expected a rejection");
    },
    (e: unknown) => e,
  );
  if (!isMoonflashError(err)) throw err;
  return err;
}

function target(overrides: Partial<FlashTarget> = {}): FlashTarget {
  return {
    mcu: "mcu",
    device,
    canbusInterface: "can0",
    baud: 250000,
    firmwarePath: firmware,
    bootloader: "auto",
    klipperPath: klipperTree,
    kconfig,
    outDir: path.join(dir, "out-f446"),
    wchispTransport: "usb",
    timeoutMs: 15_000,
    ...overrides,
  };
}

function useMode(mode: string): void {
  process.env.FAKE_MAKE_MODE = mode;
  process.env.FAKE_MAKE_RECORD = recordFile;
}

async function recorded(): Promise<Record<string, string>> {
  const lines = (await readFile(recordFile, "utf8")).trim().split("\n");
  return Object.fromEntries(lines.map((l) => [l.slice(0, l.indexOf("=")), l.slice(l.indexOf("=") + 1)]));
}

beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), "moonflash-make-"));
  firmware = path.join(dir, "klipper.bin");
  await writeFile(firmware, Buffer.alloc(29928, 0x11));
  kconfig = path.join(dir, "config.f446");
  await writeFile(kconfig, "CONFIG_MACH_STM32=y\nCONFIG_MACH_STM32F446=y\n");
  recordFile = path.join(dir, "make-args.txt");
  device = path.join(dir, "usb-Klipper_stm32f446xx_1A0033-if00");
  await writeFile(device, "");
});

afterEach(async () => {
  delete process.env.FAKE_MAKE_MODE;
  delete process.env.FAKE_MAKE_RECORD;
  await rm(recordFile, { force: true });
});

afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe("MakeFlasher", () => {
  it("runs make flash with FLASH_DEVICE, KCONFIG_CONFIG and OUT (slash added) in klipper_path", async () => {
    useMode("success");
    const ctx = recordingContext();
    const outcome = await new MakeFlasher().flash(target(), ctx);
    expect(await recorded()).toEqual({
      FLASH_DEVICE: device,
      KCONFIG_CONFIG: kconfig,
      OUT: `${path.join(dir, "out-f446")}/`,
    });
    expect(outcome).toMatchObject({ bytes: 29928, verified: false, device: target().device });
    expect(outcome.details?.dfuFalseFailure).toBeUndefined();
    expect(ctx.logs.map((l) => l.message)).toContain("File downloaded successfully");
    expect(ctx.cancellable).toEqual([{ cancellable: false, reason: "make flash is running" }]);
  });

  it("leaves KCONFIG_CONFIG and OUT to Klipper's defaults when not configured", async () => {
    useMode("success");
    await new MakeFlasher().flash(target({ kconfig: undefined, outDir: undefined }), recordingContext());
    expect(await recorded()).toMatchObject({ KCONFIG_CONFIG: path.join(klipperTree, ".config"), OUT: "out/" });
  });

  it("reports verified when the output shows a read-back (Katapult via flash_usb.py)", async () => {
    useMode("katapult");
    const outcome = await new MakeFlasher().flash(target(), recordingContext());
    expect(outcome.verified).toBe(true);
  });

  it("treats dfu-util's 'Error during download get_status' after 'Download done.' as success with a warning", async () => {
    useMode("dfu-false-failure");
    const ctx = recordingContext();
    const outcome = await new MakeFlasher().flash(target(), ctx);
    expect(outcome.details).toMatchObject({ dfuFalseFailure: true, exitCode: 2 });
    expect(ctx.logs.filter((l) => l.level === "warn").map((l) => l.message).join("\n")).toContain("false failure");
  });

  it("fails with FLASH_FAILED and the last output lines when dfu-util finds no device", async () => {
    useMode("no-dfu");
    const err = await rejection(new MakeFlasher().flash(target(), recordingContext()));
    expect(err.code).toBe("FLASH_FAILED");
    expect(err.message).toContain("Error running dfu-util");
    expect(err.message).toMatch(/make: \*\*\* \[Makefile:\d+: flash\] Error 255/);
    expect(err.details).toMatchObject({ command: "make", exitCode: 2 });
    expect((err.details.stderrTail as string[]).join("\n")).toContain("No DFU capable USB device available");
  });

  it("refuses a missing kconfig before running make (olddefconfig would build defaults)", async () => {
    useMode("success");
    const err = await rejection(new MakeFlasher().flash(target({ kconfig: path.join(dir, "config.missing") }), recordingContext()));
    expect(err.code).toBe("CONFIG_INVALID");
    await expect(readFile(recordFile)).rejects.toMatchObject({ code: "ENOENT" });
  });

  it("preflight: no Makefile in klipper_path, no device, missing device node, make missing", async () => {
    expect((await rejection(new MakeFlasher().preflight(target({ klipperPath: dir })))).code).toBe("TOOL_NOT_FOUND");
    expect((await rejection(new MakeFlasher().preflight(target({ device: undefined, canbusUuid: "0a1b2c3d4e5f" })))).code).toBe(
      "INVALID_PARAMS",
    );
    expect((await rejection(new MakeFlasher().preflight(target({ device: path.join(dir, "ttyACM9") })))).code).toBe("DEVICE_NOT_FOUND");
    // A vid:pid addresses a board already in its ROM bootloader; there is no node to check.
    await expect(new MakeFlasher().preflight(target({ device: "0483:df11" }))).resolves.toBeUndefined();
    expect((await rejection(new MakeFlasher({ make: path.join(dir, "no-make") }).preflight(target()))).code).toBe("TOOL_NOT_FOUND");
    await expect(new MakeFlasher().preflight(target())).resolves.toBeUndefined();
  });

  it("stops make and the recipe it started after the timeout with TOOL_TIMEOUT", async () => {
    useMode("sleep");
    const err = await rejection(new MakeFlasher().flash(target({ timeoutMs: 800 }), recordingContext()));
    expect(err.code).toBe("TOOL_TIMEOUT");
  });

  it("does not start make when the job is cancelled before writing", async () => {
    useMode("success");
    const abort = new AbortController();
    abort.abort();
    const err = await rejection(new MakeFlasher().flash(target(), recordingContext(abort.signal)));
    expect(err.code).toBe("CANCELLED");
    await expect(readFile(recordFile)).rejects.toMatchObject({ code: "ENOENT" });
  });
});
