// WchispFlasher against a fake wchisp run as a real child process (clap-style flag order, simplelog lines,
// anyhow `Error:` endings), plus binary lookup and serial port autodetect over a fake /dev + /sys tree.

import { mkdir, readFile, symlink, writeFile } from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, describe, expect, it } from "vitest";
import { discoverDevices } from "../../src/flash/discovery.js";
import { WchispFlasher } from "../../src/flash/methods/wchisp.js";
import { buildFakeSystemTree, CH340_ADAPTER, type FakeSystemTree, type FakeUsbTty } from "./fake-system-tree.js";
import { RecordingContext } from "./support/recording-context.js";
import { rejection } from "./support/rejection.js";
import { useToolFixture } from "./support/tool-fixture.js";

const fakeWchisp = fileURLToPath(new URL("../fixtures/bin/fake-wchisp", import.meta.url));
/** Stand-in for a USB-UART adapter's node. */
let uartDevice: string;
const trees: FakeSystemTree[] = [];

const tool = useToolFixture({
  name: "wchisp",
  firmware: { file: "klipper.bin", bytes: Buffer.alloc(3000, 0x33) },
  env: { mode: "FAKE_WCHISP_MODE", record: "FAKE_WCHISP_ARGS" },
  async setup(dir) {
    uartDevice = path.join(dir, "ttyUSB3");
    await writeFile(uartDevice, "");
  },
  target: () => ({ mcu: "mcu bmcu", bootloader: "none" }),
});
const { useMode, target, recordedLines: recordedArgs } = tool;

/** A flasher whose port autodetect sees only the given ttys (simulated USB). */
async function flasherSeeing(ttys: FakeUsbTty[]): Promise<{ flasher: WchispFlasher; tree: FakeSystemTree }> {
  const tree = await buildFakeSystemTree(ttys);
  trees.push(tree);
  const discover = () =>
    discoverDevices({ devRoot: tree.devRoot, sysRoot: tree.sysRoot, procRoot: tree.procRoot, useSerialportList: false });
  return { flasher: new WchispFlasher({ wchispPath: fakeWchisp, discover }), tree };
}

afterAll(async () => {
  for (const tree of trees) await tree.cleanup();
});

describe("WchispFlasher", () => {
  it("flashes over USB: `flash <image>` only, stages erase/write/verify, byte progress, verified", async () => {
    useMode("success");
    const ctx = new RecordingContext();
    const outcome = await new WchispFlasher({ wchispPath: fakeWchisp }).flash(target(), ctx);
    expect(await recordedArgs()).toEqual(["flash", tool.firmware]);
    expect(outcome).toMatchObject({ bytes: 3000, verified: true, device: "usb" });
    expect(ctx.stages()).toEqual(["connect", "erase", "write", "verify"]);
    expect(ctx.progressEvents()).toEqual([{ done: 3072, total: 3072, unit: "bytes", phase: "write" }]);
    expect(ctx.cancellableCalls()).toEqual([{ cancellable: false, reason: "wchisp is erasing and writing the chip" }]);
    expect(ctx.logs().map((l) => l.message)).toContain("Chip: CH32V203C8T6[0x3119] (Code Flash: 64KiB)");
  });

  it("puts the serial flags before the subcommand and passes only baud rates wchisp accepts", async () => {
    useMode("success");
    const flasher = new WchispFlasher({ wchispPath: fakeWchisp });
    await flasher.flash(target({ wchispTransport: "serial", device: uartDevice, baud: 1_000_000 }), new RecordingContext());
    expect(await recordedArgs()).toEqual(["-s", "-p", uartDevice, "-b", "1000000", "flash", tool.firmware]);
    await flasher.flash(target({ wchispTransport: "serial", device: uartDevice, baud: 250000 }), new RecordingContext());
    expect(await recordedArgs()).toEqual(["-s", "-p", uartDevice, "flash", tool.firmware]);
  });

  it("maps 'Error: Verify failed, mismatch' to VERIFY_FAILED", async () => {
    useMode("verify-fail");
    const err = await rejection(new WchispFlasher({ wchispPath: fakeWchisp }).flash(target(), new RecordingContext()));
    expect(err.code).toBe("VERIFY_FAILED");
    expect(err.message).toContain("Verify failed, mismatch");
    expect(err.details).toMatchObject({ exitCode: 1, stderrTail: ["Error: Verify failed, mismatch"] });
  });

  it("maps 'No WCH ISP USB device found' to DEVICE_NOT_FOUND", async () => {
    useMode("no-device");
    const err = await rejection(new WchispFlasher({ wchispPath: fakeWchisp }).flash(target(), new RecordingContext()));
    expect(err.code).toBe("DEVICE_NOT_FOUND");
    expect(err.message).toContain("No WCH ISP USB device found(4348:55e0 or 1a86:55e0");
  });

  it("does not call exit 0 without 'Verify OK' a success", async () => {
    useMode("no-verify");
    const err = await rejection(new WchispFlasher({ wchispPath: fakeWchisp }).flash(target(), new RecordingContext()));
    expect(err.code).toBe("FLASH_FAILED");
    expect(err.message).toContain("without 'Verify OK'");
  });

  it("stops wchisp after its timeout with TOOL_TIMEOUT", async () => {
    useMode("sleep");
    const err = await rejection(new WchispFlasher({ wchispPath: fakeWchisp }).flash(target({ timeoutMs: 1000 }), new RecordingContext()));
    expect(err.code).toBe("TOOL_TIMEOUT");
  });

  it("does not start wchisp when the job is cancelled before writing", async () => {
    useMode("success");
    const ctx = new RecordingContext();
    ctx.controller.abort();
    const err = await rejection(new WchispFlasher({ wchispPath: fakeWchisp }).flash(target(), ctx));
    expect(err.code).toBe("CANCELLED");
    await expect(readFile(tool.recordFile)).rejects.toMatchObject({ code: "ENOENT" });
  });
});

describe("WchispFlasher binary lookup", () => {
  it("uses wchisp_path, then <install>/bin/wchisp, then PATH; none ⇒ TOOL_NOT_FOUND with an install hint", async () => {
    const installBin = path.join(tool.dir, "install", "bin");
    const pathDir = path.join(tool.dir, "path-bin");
    await mkdir(installBin, { recursive: true });
    await mkdir(pathDir, { recursive: true });
    await symlink(fakeWchisp, path.join(installBin, "wchisp"));
    await symlink(fakeWchisp, path.join(pathDir, "wchisp"));

    expect(await new WchispFlasher({ wchispPath: fakeWchisp, installBin }).locate()).toBe(fakeWchisp);
    expect(await new WchispFlasher({ installBin }).locate()).toBe(path.join(installBin, "wchisp"));
    const missingConfigured = await rejection(new WchispFlasher({ wchispPath: path.join(tool.dir, "nope"), installBin }).locate());
    expect(missingConfigured.code).toBe("TOOL_NOT_FOUND");

    const savedPath = process.env.PATH;
    try {
      process.env.PATH = `${pathDir}${path.delimiter}/nonexistent`;
      expect(await new WchispFlasher({ installBin: path.join(tool.dir, "empty") }).locate()).toBe(path.join(pathDir, "wchisp"));
      process.env.PATH = "/nonexistent";
      const none = await rejection(new WchispFlasher({ installBin: path.join(tool.dir, "empty") }).locate());
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
    const outcome = await flasher.flash(target({ wchispTransport: "serial" }), new RecordingContext());
    const byPath = path.join(tree.devRoot, "serial", "by-path", "platform-xhci-hcd.0-usb-0:2:1.0-port0");
    expect(outcome.device).toBe(byPath);
    expect(await recordedArgs()).toEqual(["-s", "-p", byPath, "flash", tool.firmware]);
  });

  it("refuses a configured serial port that is not present", async () => {
    const err = await rejection(
      new WchispFlasher({ wchispPath: fakeWchisp }).preflight(target({ wchispTransport: "serial", device: path.join(tool.dir, "ttyUSB9") })),
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
    const err = await rejection(flasher.flash(target({ wchispTransport: "serial" }), new RecordingContext()));
    expect(err.code).toBe("DEVICE_NOT_FOUND");
    expect(err.message).toContain("Set serial: in [mcu bmcu] of moonflash.conf explicitly");
    expect(err.details.candidates).toEqual([
      `${tree.dev("ttyUSB0")} (CH340 USB-UART adapter)`,
      `${tree.dev("ttyUSB1")} (CP210x USB-UART adapter)`,
    ]);
    await expect(readFile(tool.recordFile)).rejects.toMatchObject({ code: "ENOENT" });
  });
});
