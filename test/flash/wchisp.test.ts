// WchispFlasher against a fake wchisp run as a real child process (clap-style flag order, simplelog lines,
// anyhow `Error:` endings), plus binary lookup and serial port autodetect over a fake /dev + /sys tree.

import { mkdir, mkdtemp, readFile, rm, symlink, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { isMoonflashError, type MoonflashError } from "../../src/core/errors.js";
import { discoverDevices } from "../../src/flash/discovery.js";
import { WchispFlasher } from "../../src/flash/methods/wchisp.js";
import type { FlashTarget } from "../../src/flash/types.js";
import { buildFakeSystemTree, CH340_ADAPTER, type FakeSystemTree, type FakeUsbTty } from "./fake-system-tree.js";
import { recordingContext } from "./recording-context.js";

const fakeWchisp = fileURLToPath(new URL("../fixtures/bin/fake-wchisp", import.meta.url));
let dir: string;
let firmware: string;
let argsFile: string;
/** Stand-in for a USB-UART adapter's node. */
let uartDevice: string;
const trees: FakeSystemTree[] = [];

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
    mcu: "mcu bmcu",
    canbusInterface: "can0",
    baud: 250000,
    firmwarePath: firmware,
    bootloader: "none",
    klipperPath: "/nonexistent",
    wchispTransport: "usb",
    timeoutMs: 15_000,
    ...overrides,
  };
}

function useMode(mode: string): void {
  process.env.FAKE_WCHISP_MODE = mode;
  process.env.FAKE_WCHISP_ARGS = argsFile;
}

async function recordedArgs(): Promise<string[]> {
  return (await readFile(argsFile, "utf8")).trim().split("\n");
}

/** A flasher whose port autodetect sees only the given ttys (simulated USB). */
async function flasherSeeing(ttys: FakeUsbTty[]): Promise<{ flasher: WchispFlasher; tree: FakeSystemTree }> {
  const tree = await buildFakeSystemTree(ttys);
  trees.push(tree);
  const discover = () =>
    discoverDevices({ devRoot: tree.devRoot, sysRoot: tree.sysRoot, procRoot: tree.procRoot, useSerialportList: false });
  return { flasher: new WchispFlasher({ wchispPath: fakeWchisp, discover }), tree };
}

beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), "moonflash-wchisp-"));
  firmware = path.join(dir, "klipper.bin");
  await writeFile(firmware, Buffer.alloc(3000, 0x33));
  argsFile = path.join(dir, "args.txt");
  uartDevice = path.join(dir, "ttyUSB3");
  await writeFile(uartDevice, "");
});

afterEach(async () => {
  delete process.env.FAKE_WCHISP_MODE;
  delete process.env.FAKE_WCHISP_ARGS;
  await rm(argsFile, { force: true });
});

afterAll(async () => {
  for (const tree of trees) await tree.cleanup();
  await rm(dir, { recursive: true, force: true });
});

describe("WchispFlasher", () => {
  it("flashes over USB: `flash <image>` only, stages erase/write/verify, byte progress, verified", async () => {
    useMode("success");
    const ctx = recordingContext();
    const outcome = await new WchispFlasher({ wchispPath: fakeWchisp }).flash(target(), ctx);
    expect(await recordedArgs()).toEqual(["flash", firmware]);
    expect(outcome).toMatchObject({ bytes: 3000, verified: true, device: "usb" });
    expect(ctx.stages.map((s) => s.stage)).toEqual(["connect", "erase", "write", "verify"]);
    expect(ctx.progressEvents).toEqual([{ done: 3072, total: 3072, unit: "bytes", phase: "write" }]);
    expect(ctx.cancellable).toEqual([{ cancellable: false, reason: "wchisp is erasing and writing the chip" }]);
    expect(ctx.logs.map((l) => l.message)).toContain("Chip: CH32V203C8T6[0x3119] (Code Flash: 64KiB)");
  });

  it("puts the serial flags before the subcommand and passes only baud rates wchisp accepts", async () => {
    useMode("success");
    const flasher = new WchispFlasher({ wchispPath: fakeWchisp });
    await flasher.flash(target({ wchispTransport: "serial", device: uartDevice, baud: 1_000_000 }), recordingContext());
    expect(await recordedArgs()).toEqual(["-s", "-p", uartDevice, "-b", "1000000", "flash", firmware]);
    await flasher.flash(target({ wchispTransport: "serial", device: uartDevice, baud: 250000 }), recordingContext());
    expect(await recordedArgs()).toEqual(["-s", "-p", uartDevice, "flash", firmware]);
  });

  it("maps 'Error: Verify failed, mismatch' to VERIFY_FAILED", async () => {
    useMode("verify-fail");
    const err = await rejection(new WchispFlasher({ wchispPath: fakeWchisp }).flash(target(), recordingContext()));
    expect(err.code).toBe("VERIFY_FAILED");
    expect(err.message).toContain("Verify failed, mismatch");
    expect(err.details).toMatchObject({ exitCode: 1, stderrTail: ["Error: Verify failed, mismatch"] });
  });

  it("maps 'No WCH ISP USB device found' to DEVICE_NOT_FOUND", async () => {
    useMode("no-device");
    const err = await rejection(new WchispFlasher({ wchispPath: fakeWchisp }).flash(target(), recordingContext()));
    expect(err.code).toBe("DEVICE_NOT_FOUND");
    expect(err.message).toContain("No WCH ISP USB device found(4348:55e0 or 1a86:55e0");
  });

  it("does not call exit 0 without 'Verify OK' a success", async () => {
    useMode("no-verify");
    const err = await rejection(new WchispFlasher({ wchispPath: fakeWchisp }).flash(target(), recordingContext()));
    expect(err.code).toBe("FLASH_FAILED");
    expect(err.message).toContain("without 'Verify OK'");
  });

  it("stops wchisp after its timeout with TOOL_TIMEOUT", async () => {
    useMode("sleep");
    const err = await rejection(new WchispFlasher({ wchispPath: fakeWchisp }).flash(target({ timeoutMs: 1000 }), recordingContext()));
    expect(err.code).toBe("TOOL_TIMEOUT");
  });

  it("does not start wchisp when the job is cancelled before writing", async () => {
    useMode("success");
    const abort = new AbortController();
    abort.abort();
    const err = await rejection(new WchispFlasher({ wchispPath: fakeWchisp }).flash(target(), recordingContext(abort.signal)));
    expect(err.code).toBe("CANCELLED");
    await expect(readFile(argsFile)).rejects.toMatchObject({ code: "ENOENT" });
  });
});

describe("WchispFlasher binary lookup", () => {
  it("uses wchisp_path, then <install>/bin/wchisp, then PATH; none ⇒ TOOL_NOT_FOUND with an install hint", async () => {
    const installBin = path.join(dir, "install", "bin");
    const pathDir = path.join(dir, "path-bin");
    await mkdir(installBin, { recursive: true });
    await mkdir(pathDir, { recursive: true });
    await symlink(fakeWchisp, path.join(installBin, "wchisp"));
    await symlink(fakeWchisp, path.join(pathDir, "wchisp"));

    expect(await new WchispFlasher({ wchispPath: fakeWchisp, installBin }).locate()).toBe(fakeWchisp);
    expect(await new WchispFlasher({ installBin }).locate()).toBe(path.join(installBin, "wchisp"));
    const missingConfigured = await rejection(new WchispFlasher({ wchispPath: path.join(dir, "nope"), installBin }).locate());
    expect(missingConfigured.code).toBe("TOOL_NOT_FOUND");

    const savedPath = process.env.PATH;
    try {
      process.env.PATH = `${pathDir}${path.delimiter}/nonexistent`;
      expect(await new WchispFlasher({ installBin: path.join(dir, "empty") }).locate()).toBe(path.join(pathDir, "wchisp"));
      process.env.PATH = "/nonexistent";
      const none = await rejection(new WchispFlasher({ installBin: path.join(dir, "empty") }).locate());
      expect(none.code).toBe("TOOL_NOT_FOUND");
      expect(none.message).toContain("https://github.com/ch32-rs/wchisp/releases");
    } finally {
      process.env.PATH = savedPath;
    }
  });
});

describe("WchispFlasher serial port autodetect (simulated USB)", () => {
  const klipperBoard: FakeUsbTty = { name: "ttyACM0", usbPath: "1-1", vendorId: "1d50", productId: "614e", manufacturer: "Klipper" };

  it("uses the only USB-UART adapter present", async () => {
    useMode("success");
    const { flasher, tree } = await flasherSeeing([
      klipperBoard,
      { name: "ttyUSB0", usbPath: "1-2", ...CH340_ADAPTER, byPath: "platform-xhci-hcd.0-usb-0:2:1.0-port0" },
    ]);
    const outcome = await flasher.flash(target({ wchispTransport: "serial" }), recordingContext());
    const byPath = path.join(tree.devRoot, "serial", "by-path", "platform-xhci-hcd.0-usb-0:2:1.0-port0");
    expect(outcome.device).toBe(byPath);
    expect(await recordedArgs()).toEqual(["-s", "-p", byPath, "flash", firmware]);
  });

  it("refuses a configured serial port that is not present", async () => {
    const err = await rejection(
      new WchispFlasher({ wchispPath: fakeWchisp }).preflight(target({ wchispTransport: "serial", device: path.join(dir, "ttyUSB9") })),
    );
    expect(err.code).toBe("DEVICE_NOT_FOUND");
  });

  it("refuses with DEVICE_NOT_FOUND when no adapter is present", async () => {
    const { flasher } = await flasherSeeing([klipperBoard]);
    const err = await rejection(flasher.preflight(target({ wchispTransport: "serial" })));
    expect(err.code).toBe("DEVICE_NOT_FOUND");
    expect(err.message).toContain("set serial: in [mcu bmcu]");
    expect(err.details.candidates).toEqual([]);
  });

  it("refuses with DEVICE_NOT_FOUND listing both candidates when two adapters are present", async () => {
    useMode("success");
    const { flasher, tree } = await flasherSeeing([
      { name: "ttyUSB0", usbPath: "1-2", ...CH340_ADAPTER },
      { name: "ttyUSB1", usbPath: "1-3", vendorId: "10c4", productId: "ea60", product: "CP2102 USB to UART Bridge Controller" },
    ]);
    const err = await rejection(flasher.flash(target({ wchispTransport: "serial" }), recordingContext()));
    expect(err.code).toBe("DEVICE_NOT_FOUND");
    expect(err.message).toContain("Set serial: in [mcu bmcu] of moonflash.conf explicitly");
    expect(err.details.candidates).toEqual([
      `${tree.dev("ttyUSB0")} (CH340 USB-UART adapter)`,
      `${tree.dev("ttyUSB1")} (CP210x USB-UART adapter)`,
    ]);
    await expect(readFile(argsFile)).rejects.toMatchObject({ code: "ENOENT" });
  });
});
