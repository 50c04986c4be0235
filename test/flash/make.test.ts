// MakeFlasher running real GNU make on a fake Klipper tree whose `flash` target records its variables and prints
// what flash_usb.py / dfu-util print (including dfu-util's false failure).

import { readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";
import { MakeFlasher } from "../../src/flash/methods/make.js";
import { RecordingContext } from "./support/recording-context.js";
import { rejection } from "./support/rejection.js";
import { useToolFixture } from "./support/tool-fixture.js";

const klipperTree = fileURLToPath(new URL("../fixtures/klipper-tree/", import.meta.url));
let kconfig: string;
let outDir: string;
/** Stand-in for the by-id link: preflight checks that the configured device exists. */
let device: string;

const tool = useToolFixture({
  name: "make",
  firmware: { file: "klipper.bin", bytes: Buffer.alloc(29928, 0x11) },
  env: { mode: "FAKE_MAKE_MODE", record: "FAKE_MAKE_RECORD" },
  recordFile: "make-args.txt",
  async setup(dir) {
    kconfig = path.join(dir, "config.f446");
    await writeFile(kconfig, "CONFIG_MACH_STM32=y\nCONFIG_MACH_STM32F446=y\n");
    device = path.join(dir, "usb-Klipper_stm32f446xx_1A0033-if00");
    await writeFile(device, "");
    outDir = path.join(dir, "out-f446");
  },
  target: () => ({ device, klipperPath: klipperTree, kconfig, outDir }),
});
const { useMode, target } = tool;

async function recorded(): Promise<Record<string, string>> {
  const lines = await tool.recordedLines();
  return Object.fromEntries(lines.map((l) => [l.slice(0, l.indexOf("=")), l.slice(l.indexOf("=") + 1)]));
}

describe("MakeFlasher", () => {
  it("runs make flash with FLASH_DEVICE, KCONFIG_CONFIG and OUT (slash added) in klipper_path", async () => {
    useMode("success");
    const ctx = new RecordingContext();
    const outcome = await new MakeFlasher().flash(target(), ctx);
    expect(await recorded()).toEqual({
      FLASH_DEVICE: device,
      KCONFIG_CONFIG: kconfig,
      OUT: `${path.join(tool.dir, "out-f446")}/`,
    });
    expect(outcome).toMatchObject({ bytes: 29928, verified: false, device: target().device });
    expect(outcome.details?.dfuFalseFailure).toBeUndefined();
    expect(ctx.logs().map((l) => l.message)).toContain("File downloaded successfully");
    expect(ctx.cancellableCalls()).toEqual([{ cancellable: false, reason: "make flash is running" }]);
  });

  it("leaves KCONFIG_CONFIG and OUT to Klipper's defaults when not configured", async () => {
    useMode("success");
    await new MakeFlasher().flash(target({ kconfig: undefined, outDir: undefined }), new RecordingContext());
    expect(await recorded()).toMatchObject({ KCONFIG_CONFIG: path.join(klipperTree, ".config"), OUT: "out/" });
  });

  it("reports verified when the output shows a read-back (Katapult via flash_usb.py)", async () => {
    useMode("katapult");
    const outcome = await new MakeFlasher().flash(target(), new RecordingContext());
    expect(outcome.verified).toBe(true);
  });

  it("treats dfu-util's 'Error during download get_status' after 'Download done.' as success with a warning", async () => {
    useMode("dfu-false-failure");
    const ctx = new RecordingContext();
    const outcome = await new MakeFlasher().flash(target(), ctx);
    expect(outcome.details).toMatchObject({ dfuFalseFailure: true, exitCode: 2 });
    expect(ctx.logs().filter((l) => l.level === "warn").map((l) => l.message).join("\n")).toContain("false failure");
  });

  it("fails with FLASH_FAILED and the last output lines when dfu-util finds no device", async () => {
    useMode("no-dfu");
    const err = await rejection(new MakeFlasher().flash(target(), new RecordingContext()));
    expect(err.code).toBe("FLASH_FAILED");
    expect(err.message).toContain("Error running dfu-util");
    expect(err.message).toMatch(/make: \*\*\* \[Makefile:\d+: flash\] Error 255/);
    expect(err.details).toMatchObject({ command: "make", exitCode: 2 });
    expect((err.details.stderrTail as string[]).join("\n")).toContain("No DFU capable USB device available");
  });

  it("refuses a missing kconfig before running make (olddefconfig would build defaults)", async () => {
    useMode("success");
    const err = await rejection(new MakeFlasher().flash(target({ kconfig: path.join(tool.dir, "config.missing") }), new RecordingContext()));
    expect(err.code).toBe("MISSING_CONFIG");
    await expect(readFile(tool.recordFile)).rejects.toMatchObject({ code: "ENOENT" });
  });

  it("preflight: no Makefile in klipper_path, no device, missing device node, make missing", async () => {
    expect((await rejection(new MakeFlasher().preflight(target({ klipperPath: tool.dir })))).code).toBe("TOOL_NOT_FOUND");
    expect((await rejection(new MakeFlasher().preflight(target({ device: undefined, canbusUuid: "0a1b2c3d4e5f" })))).code).toBe(
      "INVALID_PARAMS",
    );
    expect((await rejection(new MakeFlasher().preflight(target({ device: path.join(tool.dir, "ttyACM9") })))).code).toBe("DEVICE_NOT_FOUND");
    // A vid:pid addresses a board already in its ROM bootloader; there is no node to check.
    await expect(new MakeFlasher().preflight(target({ device: "0483:df11" }))).resolves.toBeUndefined();
    expect((await rejection(new MakeFlasher({ make: path.join(tool.dir, "no-make") }).preflight(target()))).code).toBe("TOOL_NOT_FOUND");
    await expect(new MakeFlasher().preflight(target())).resolves.toBeUndefined();
  });

  it("stops make and the recipe it started after the timeout with TOOL_TIMEOUT", async () => {
    useMode("sleep");
    const err = await rejection(new MakeFlasher().flash(target({ timeoutMs: 800 }), new RecordingContext()));
    expect(err.code).toBe("TOOL_TIMEOUT");
  });

  it("does not start make when the job is cancelled before writing", async () => {
    useMode("success");
    const ctx = new RecordingContext();
    ctx.controller.abort();
    const err = await rejection(new MakeFlasher().flash(target(), ctx));
    expect(err.code).toBe("CANCELLED");
    await expect(readFile(tool.recordFile)).rejects.toMatchObject({ code: "ENOENT" });
  });
});
