// Discovery against a fake /dev + /sys + /proc tree (simulated USB): classification, by-id/by-path merging,
// MCU type from by-id names, held-by detection and mapping of every spelling of a device to its MCU section.

import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  discoverDevices,
  identifyDevice,
  mapDevicesToMcus,
  parseMcuTypeFromById,
  reenumerationCandidates,
  resolveDevicePath,
  type DiscoveredDevice,
} from "../../src/flash/discovery.js";
import { classifyUsbDevice, USB_IDS } from "../../src/flash/usb-ids.js";
import { buildFakeSystemTree, CH340_ADAPTER, type FakeSystemTree } from "./fake-system-tree.js";

const KLIPPER_BY_ID = "usb-Klipper_stm32f446xx_1A0033000851313339373836-if00";
const KLIPPER_BY_PATH = "platform-xhci-hcd.0-usb-0:1.3:1.0";
let tree: FakeSystemTree;
let devices: DiscoveredDevice[];

function device(name: string): DiscoveredDevice | undefined {
  return devices.find((d) => d.path === tree.dev(name));
}

beforeAll(async () => {
  tree = await buildFakeSystemTree([
    {
      name: "ttyACM0",
      usbPath: "1-1.3",
      vendorId: "1d50",
      productId: "614e",
      manufacturer: "Klipper",
      product: "stm32f446xx",
      serial: "1A0033000851313339373836",
      byId: KLIPPER_BY_ID,
      byPath: KLIPPER_BY_PATH,
    },
    {
      name: "ttyACM1",
      usbPath: "1-1.4",
      vendorId: "1d50",
      productId: "6177",
      manufacturer: "katapult",
      product: "rp2040",
      serial: "E66138935F3F2F25",
      byId: "usb-katapult_rp2040_E66138935F3F2F25-if00",
    },
    { name: "ttyUSB0", usbPath: "1-2", ...CH340_ADAPTER, byId: "usb-1a86_USB_Serial-if00-port0", byPath: "platform-xhci-hcd.0-usb-0:2:1.0-port0" },
    // A board with a custom USB id: recognised by its manufacturer string, as flashtool.py does.
    { name: "ttyACM2", usbPath: "1-5", vendorId: "1209", productId: "beba", manufacturer: "Klipper", product: "rp2040" },
    { name: "ttyS0", uartType: "4" },
    { name: "ttyS1", uartType: "0" },
  ]);
  await tree.hold("ttyACM0", 4242, "python3");
  devices = await discoverDevices({
    devRoot: tree.devRoot,
    sysRoot: tree.sysRoot,
    procRoot: tree.procRoot,
    useSerialportList: false,
  });
});

afterAll(async () => {
  await tree.cleanup();
});

describe("discoverDevices (simulated USB)", () => {
  it("finds each real tty once, skipping ttyS slots without a UART", () => {
    expect(devices.map((d) => path.basename(d.path))).toEqual(["ttyACM0", "ttyACM1", "ttyACM2", "ttyS0", "ttyUSB0"]);
  });

  it("merges sysfs ids with the by-id and by-path links of the same device", () => {
    expect(device("ttyACM0")).toEqual({
      path: tree.dev("ttyACM0"),
      byId: path.join(tree.devRoot, "serial", "by-id", KLIPPER_BY_ID),
      byPath: path.join(tree.devRoot, "serial", "by-path", KLIPPER_BY_PATH),
      vendorId: "1d50",
      productId: "614e",
      manufacturer: "Klipper",
      product: "stm32f446xx",
      serialNumber: "1A0033000851313339373836",
      kind: "klipper",
      label: "Klipper (USB)",
      mcuType: "stm32f446xx",
      heldBy: { pid: 4242, command: "python3" },
    });
  });

  it("classifies Katapult, UART adapters, custom-id Klipper boards and plain UARTs", () => {
    expect(device("ttyACM1")).toMatchObject({ kind: "katapult", mcuType: "rp2040" });
    expect(device("ttyACM1")?.heldBy).toBeUndefined();
    expect(device("ttyUSB0")).toMatchObject({ kind: "uart-adapter", label: "CH340 USB-UART adapter", vendorId: "1a86" });
    expect(device("ttyUSB0")?.mcuType).toBeUndefined();
    expect(device("ttyACM2")).toMatchObject({ kind: "klipper", vendorId: "1209", productId: "beba" });
    expect(device("ttyS0")).toEqual({ path: tree.dev("ttyS0"), kind: "unknown", label: "Serial port" });
  });

  it("returns nothing, without throwing, for roots that do not exist", async () => {
    const missing = path.join(tree.root, "missing");
    await expect(
      discoverDevices({ devRoot: missing, sysRoot: missing, procRoot: missing, useSerialportList: false }),
    ).resolves.toEqual([]);
  });
});

describe("identifyDevice (simulated USB)", () => {
  const roots = (): { devRoot: string; sysRoot: string } => ({ devRoot: tree.devRoot, sysRoot: tree.sysRoot });

  it.each([
    ["its by-id link", () => path.join(tree.devRoot, "serial", "by-id", KLIPPER_BY_ID)],
    ["its by-path link", () => path.join(tree.devRoot, "serial", "by-path", KLIPPER_BY_PATH)],
    ["its tty", () => tree.dev("ttyACM0")],
  ])("describes one device, reached by %s, as discoverDevices does (without the /proc scan)", async (_spelling, devicePath) => {
    const { heldBy: _heldBy, ...expected } = device("ttyACM0")!;
    expect(await identifyDevice(devicePath(), roots())).toEqual(expected);
  });

  it("classifies Katapult, a custom-id Klipper board and a plain UART with the same table", async () => {
    expect(await identifyDevice(tree.dev("ttyACM1"), roots())).toMatchObject({ kind: "katapult", label: "Katapult bootloader (USB)" });
    expect(await identifyDevice(tree.dev("ttyACM2"), roots())).toMatchObject({ kind: "klipper", label: "Klipper (USB, custom id)" });
    expect(await identifyDevice(tree.dev("ttyS0"), roots())).toEqual({ path: tree.dev("ttyS0"), kind: "unknown", label: "Serial port" });
  });

  it("returns null for a path that does not resolve", async () => {
    expect(await identifyDevice(path.join(tree.devRoot, "ttyACM9"), roots())).toBeNull();
  });
});

describe("reenumerationCandidates (simulated USB)", () => {
  it("from the tty: the tty, the usb-katapult_ name of its by-id link, its by-path link", async () => {
    const identity = await identifyDevice(tree.dev("ttyACM0"), { devRoot: tree.devRoot, sysRoot: tree.sysRoot });
    expect(reenumerationCandidates(tree.dev("ttyACM0"), identity)).toEqual([
      tree.dev("ttyACM0"),
      path.join(tree.devRoot, "serial", "by-id", "usb-katapult_stm32f446xx_1A0033000851313339373836-if00"),
      path.join(tree.devRoot, "serial", "by-path", KLIPPER_BY_PATH),
    ]);
  });

  it("from a by-id path discovery cannot resolve: its own usb-katapult_ name", () => {
    expect(reenumerationCandidates("/dev/serial/by-id/usb-Klipper_rp2040_E661-if00", null)).toEqual([
      "/dev/serial/by-id/usb-Klipper_rp2040_E661-if00",
      "/dev/serial/by-id/usb-katapult_rp2040_E661-if00",
    ]);
  });

  it("nothing else for a device with no Klipper by-id name and no by-path link", async () => {
    const identity = await identifyDevice(tree.dev("ttyS0"), { devRoot: tree.devRoot, sysRoot: tree.sysRoot });
    expect(reenumerationCandidates(tree.dev("ttyS0"), identity)).toEqual([tree.dev("ttyS0")]);
  });
});

describe("mapDevicesToMcus (simulated USB)", () => {
  it.each([
    ["by-id", () => path.join(tree.devRoot, "serial", "by-id", KLIPPER_BY_ID)],
    ["by-path", () => path.join(tree.devRoot, "serial", "by-path", KLIPPER_BY_PATH)],
    ["tty", () => tree.dev("ttyACM0")],
  ])("matches the %s spelling of the configured serial to the same device", async (_spelling, serial) => {
    const mapped = await mapDevicesToMcus(devices, [
      { section: "mcu toolhead", canbusUuid: "0a1b2c3d4e5f" },
      { section: "mcu", serial: serial() },
    ]);
    expect(mapped.filter((d) => d.mcu).map((d) => [d.path, d.mcu])).toEqual([[tree.dev("ttyACM0"), "mcu"]]);
    expect(devices.every((d) => d.mcu === undefined)).toBe(true);
  });

  it("maps nothing for a configured serial that is not present", async () => {
    const mapped = await mapDevicesToMcus(devices, [{ section: "mcu", serial: path.join(tree.devRoot, "ttyACM9") }]);
    expect(mapped.some((d) => d.mcu)).toBe(false);
  });
});

describe("helpers", () => {
  it("resolveDevicePath follows links and returns null for a missing path", async () => {
    await expect(resolveDevicePath(path.join(tree.devRoot, "serial", "by-id", KLIPPER_BY_ID))).resolves.toBe(tree.dev("ttyACM0"));
    await expect(resolveDevicePath(path.join(tree.devRoot, "nope"))).resolves.toBeNull();
  });

  it("parses the MCU type from Klipper, Katapult and CanBoot by-id names only", () => {
    expect(parseMcuTypeFromById("/dev/serial/by-id/usb-Klipper_stm32f446xx_1A0033-if00")).toBe("stm32f446xx");
    expect(parseMcuTypeFromById("usb-katapult_stm32h723xx_2B0017-if00")).toBe("stm32h723xx");
    expect(parseMcuTypeFromById("usb-CanBoot_stm32f103xe_39FFD6-if00")).toBe("stm32f103xe");
    expect(parseMcuTypeFromById("usb-1a86_USB_Serial-if00-port0")).toBeUndefined();
  });

  it("has one row per USB id, each with a source, and classifies ids case-insensitively", () => {
    const ids = USB_IDS.map((r) => `${r.vendorId}:${r.productId}`);
    expect(new Set(ids).size).toBe(ids.length);
    expect(USB_IDS.every((r) => r.source.length > 0)).toBe(true);
    expect(classifyUsbDevice({ vendorId: "0x0483", productId: "DF11" }).kind).toBe("stm32-dfu");
    expect(classifyUsbDevice({ vendorId: "2e8a", productId: "000f" }).kind).toBe("rp2-boot");
    expect(classifyUsbDevice({ vendorId: "1d50", productId: "606f" }).kind).toBe("usb-can-bridge");
    expect(classifyUsbDevice({ vendorId: "4348", productId: "55e0" }).kind).toBe("wch-isp");
    expect(classifyUsbDevice({ vendorId: "dead", productId: "beef" })).toEqual({ kind: "unknown", label: "USB device dead:beef" });
  });
});

describe("discoverDevices on this machine", () => {
  it("returns an array without throwing (udevadm absent here, so serialport's list is skipped)", async () => {
    const found = await discoverDevices();
    expect(Array.isArray(found)).toBe(true);
    for (const d of found) expect(d.path.startsWith("/dev/")).toBe(true);
  });
});
