// Finds the serial devices an MCU can be flashed through and what they are: sysfs (USB ids of each tty),
// /dev/serial/by-id and by-path links, and serialport's list when udev is there; merged by real path, with the
// process holding each device (a running Klipper) and the config section it belongs to. CAN nodes come from
// Moonraker or from `flashtool.py -q`.

import { readdir, readFile, readlink, realpath, stat } from "node:fs/promises";
import path from "node:path";
import type { Logger } from "pino";
import { MoonflashError } from "../core/errors.js";
import type { CanbusNode, PrinterPort } from "../core/printer.js";
import { findExecutable, runTool } from "../core/tool.js";
import { classifyUsbDevice, type UsbDeviceKind } from "./usb-ids.js";

export interface DiscoveredDevice {
  /** Real path of the device node, e.g. /dev/ttyACM0. */
  path: string;
  /** /dev/serial/by-id link pointing at it. */
  byId?: string;
  /** /dev/serial/by-path link pointing at it (stable across Klipper ⇄ Katapult re-enumeration). */
  byPath?: string;
  /** Four lower-case hex digits. */
  vendorId?: string;
  productId?: string;
  manufacturer?: string;
  product?: string;
  serialNumber?: string;
  kind: UsbDeviceKind;
  label: string;
  /** MCU type from a Klipper/Katapult by-id name, e.g. "stm32f446xx". */
  mcuType?: string;
  /** Another process that has the device open (usually Klipper). */
  heldBy?: { pid: number; command: string };
  /** Config section ("mcu", "mcu toolhead") whose serial resolves to this device. */
  mcu?: string;
}

export interface DiscoverOptions {
  devRoot?: string;
  sysRoot?: string;
  procRoot?: string;
  /** Also ask serialport (udev) for ports; skipped anyway when `udevadm` is not on PATH. */
  useSerialportList?: boolean;
  /** Give up on serialport's list after this long; default 5000 ms. */
  serialportListTimeoutMs?: number;
  logger?: Logger;
}

type UsbFields = Pick<DiscoveredDevice, "vendorId" | "productId" | "manufacturer" | "product" | "serialNumber">;
type DeviceDraft = Omit<DiscoveredDevice, "kind" | "label">;

/** Real path of `p`, or null when it (or the target of its links) does not exist. */
export async function resolveDevicePath(p: string): Promise<string | null> {
  try {
    return await realpath(p);
  } catch {
    return null;
  }
}

async function readTrimmed(file: string): Promise<string | undefined> {
  try {
    const text = (await readFile(file, "utf8")).trim();
    return text.length > 0 ? text : undefined;
  } catch {
    return undefined;
  }
}

async function listDir(dir: string): Promise<string[]> {
  try {
    return await readdir(dir);
  } catch {
    return [];
  }
}

/** Walks up from a tty's `device` (the USB interface) to the USB device directory that has `idVendor`. */
async function readUsbParent(deviceDir: string, sysRoot: string): Promise<UsbFields> {
  let dir = await resolveDevicePath(deviceDir);
  const stopAt = path.resolve(sysRoot);
  while (dir && dir.startsWith(stopAt) && dir !== stopAt) {
    const vendorId = await readTrimmed(path.join(dir, "idVendor"));
    if (vendorId !== undefined) {
      return {
        vendorId: vendorId.toLowerCase(),
        productId: (await readTrimmed(path.join(dir, "idProduct")))?.toLowerCase(),
        manufacturer: await readTrimmed(path.join(dir, "manufacturer")),
        product: await readTrimmed(path.join(dir, "product")),
        serialNumber: await readTrimmed(path.join(dir, "serial")),
      };
    }
    dir = path.dirname(dir);
  }
  return {};
}

/** Ttys from /sys/class/tty that have a device behind them; legacy 8250 slots without hardware are skipped. */
async function scanSysfs(sysRoot: string, devRoot: string): Promise<Array<DeviceDraft>> {
  const classDir = path.join(sysRoot, "class", "tty");
  const found: DeviceDraft[] = [];
  for (const name of await listDir(classDir)) {
    const ttyDir = path.join(classDir, name);
    const deviceDir = path.join(ttyDir, "device");
    try {
      if (!(await stat(deviceDir)).isDirectory()) continue;
    } catch {
      continue;
    }
    // serial_core reports type 0 (PORT_UNKNOWN) for the ttyS slots the kernel reserves without a UART behind them.
    if ((await readTrimmed(path.join(ttyDir, "type"))) === "0") continue;
    const real = await resolveDevicePath(path.join(devRoot, name));
    if (!real) continue;
    found.push({ path: real, ...(await readUsbParent(deviceDir, sysRoot)) });
  }
  return found;
}

/** Links in /dev/serial/by-id or by-path, as [link, real target]. */
async function scanLinks(dir: string): Promise<Array<[string, string]>> {
  const links: Array<[string, string]> = [];
  for (const name of await listDir(dir)) {
    const link = path.join(dir, name);
    const real = await resolveDevicePath(link);
    if (real) links.push([link, real]);
  }
  return links;
}

/**
 * serialport's Linux list spawns `udevadm info -e` and an ENOENT from that spawn is thrown outside any promise,
 * crashing the process; so it only runs when udevadm is on PATH, and a hung udevadm is abandoned after a timeout.
 */
async function listWithSerialport(timeoutMs: number, logger?: Logger): Promise<Array<DeviceDraft & { byIdName?: string }>> {
  if (process.platform === "linux" && !(await findExecutable("udevadm"))) {
    logger?.debug("udevadm is not on PATH; skipping serialport's device list");
    return [];
  }
  let timer: NodeJS.Timeout | undefined;
  try {
    // Loaded on first use: an idle agent does not need serialport (docs/BENCHMARKS.md).
    const { SerialPort } = await import("serialport");
    const ports = await Promise.race([
      SerialPort.list(),
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`serialport list took longer than ${timeoutMs} ms`)), timeoutMs);
      }),
    ]);
    const drafts: Array<DeviceDraft & { byIdName?: string }> = [];
    for (const port of ports) {
      const real = await resolveDevicePath(port.path);
      if (!real) continue;
      drafts.push({
        path: real,
        vendorId: port.vendorId?.toLowerCase(),
        productId: port.productId?.toLowerCase(),
        manufacturer: port.manufacturer,
        serialNumber: port.serialNumber,
        byIdName: port.pnpId,
      });
    }
    return drafts;
  } catch (err) {
    logger?.warn({ err }, "serialport could not list devices; using sysfs and /dev/serial only");
    return [];
  } finally {
    clearTimeout(timer);
  }
}

/** MCU type from Klipper/Katapult by-id names: usb-Klipper_stm32f446xx_<serial>-if00, usb-katapult_rp2040_<serial>-if00. */
export function parseMcuTypeFromById(byIdName: string): string | undefined {
  const match = /^usb-(?:klipper|katapult|canboot)_([^_]+)_.+-if\d+$/i.exec(path.basename(byIdName));
  return match?.[1];
}

/** The process (other than this one) that has each of `paths` open, found as flashtool's validate_device does. */
async function findHolders(procRoot: string, paths: ReadonlySet<string>): Promise<Map<string, { pid: number; command: string }>> {
  const holders = new Map<string, { pid: number; command: string }>();
  if (paths.size === 0) return holders;
  const skipSelf = path.resolve(procRoot) === "/proc";
  for (const entry of await listDir(procRoot)) {
    if (!/^\d+$/.test(entry)) continue;
    const pid = Number(entry);
    if (skipSelf && pid === process.pid) continue;
    const fdDir = path.join(procRoot, entry, "fd");
    for (const fd of await listDir(fdDir)) {
      let target: string;
      try {
        target = await readlink(path.join(fdDir, fd));
      } catch {
        continue;
      }
      if (!paths.has(target) || holders.has(target)) continue;
      const command =
        (await readTrimmed(path.join(procRoot, entry, "comm"))) ??
        (await readTrimmed(path.join(procRoot, entry, "cmdline")))?.split("\0")[0] ??
        "?";
      holders.set(target, { pid, command });
    }
  }
  return holders;
}

function mergeInto(target: DeviceDraft, extra: Partial<DeviceDraft>): void {
  for (const [key, value] of Object.entries(extra) as Array<[keyof DeviceDraft, unknown]>) {
    if (value !== undefined && (target as Record<string, unknown>)[key] === undefined) {
      (target as Record<string, unknown>)[key] = value;
    }
  }
}

/** Every serial device on the machine, merged by real path and classified. Never throws for missing roots. */
export async function discoverDevices(opts: DiscoverOptions = {}): Promise<DiscoveredDevice[]> {
  const devRoot = opts.devRoot ?? "/dev";
  const sysRoot = opts.sysRoot ?? "/sys";
  const procRoot = opts.procRoot ?? "/proc";
  const byRealPath = new Map<string, DeviceDraft>();
  const add = (draft: DeviceDraft): DeviceDraft => {
    const existing = byRealPath.get(draft.path);
    if (existing) {
      mergeInto(existing, draft);
      return existing;
    }
    byRealPath.set(draft.path, { ...draft });
    return byRealPath.get(draft.path)!;
  };

  for (const draft of await scanSysfs(sysRoot, devRoot)) add(draft);
  for (const [link, real] of await scanLinks(path.join(devRoot, "serial", "by-id"))) add({ path: real, byId: link });
  for (const [link, real] of await scanLinks(path.join(devRoot, "serial", "by-path"))) add({ path: real, byPath: link });
  if (opts.useSerialportList ?? true) {
    for (const { byIdName, ...draft } of await listWithSerialport(opts.serialportListTimeoutMs ?? 5000, opts.logger)) {
      const device = add(draft);
      if (device.byId === undefined && byIdName) {
        const link = path.join(devRoot, "serial", "by-id", byIdName);
        if ((await resolveDevicePath(link)) === device.path) device.byId = link;
      }
    }
  }

  const holders = await findHolders(procRoot, new Set(byRealPath.keys()));
  return [...byRealPath.values()].map((draft) => classify(draft, holders.get(draft.path))).sort((a, b) => a.path.localeCompare(b.path));
}

/** A draft with what runs on it (usb-ids.ts), the MCU type its by-id name gives and the process holding it. */
function classify(draft: DeviceDraft, heldBy?: { pid: number; command: string }): DiscoveredDevice {
  const mcuType = draft.byId ? parseMcuTypeFromById(draft.byId) : undefined;
  let { kind, label } = classifyUsbDevice(draft);
  // No USB ids (e.g. serialport-less machine without sysfs USB info) but the by-id name says what runs on it.
  if (kind === "unknown" && draft.byId) {
    const runs = /^usb-(klipper|katapult|canboot)_/i.exec(path.basename(draft.byId))?.[1]?.toLowerCase();
    if (runs === "klipper") ({ kind, label } = classifyUsbDevice({ manufacturer: "klipper" }));
    if (runs === "katapult" || runs === "canboot") ({ kind, label } = classifyUsbDevice({ manufacturer: "katapult" }));
  }
  const device: DiscoveredDevice = { ...draft, kind, label };
  if (mcuType) device.mcuType = mcuType;
  if (heldBy) device.heldBy = heldBy;
  for (const key of Object.keys(device) as Array<keyof DiscoveredDevice>) {
    if (device[key] === undefined) delete device[key];
  }
  return device;
}

export interface IdentifyOptions {
  devRoot?: string;
  sysRoot?: string;
}

/**
 * One serial device as discoverDevices classifies it (sysfs USB ids, /dev/serial links, usb-ids.ts), or null when
 * `devicePath` does not resolve. It neither scans /proc nor spawns udevadm, so a flasher can ask it while it
 * waits for a board.
 */
export async function identifyDevice(devicePath: string, opts: IdentifyOptions = {}): Promise<DiscoveredDevice | null> {
  const devRoot = opts.devRoot ?? "/dev";
  const sysRoot = opts.sysRoot ?? "/sys";
  const real = await resolveDevicePath(devicePath);
  if (!real) return null;
  const draft: DeviceDraft = { path: real, ...(await readUsbParent(path.join(sysRoot, "class", "tty", path.basename(real), "device"), sysRoot)) };
  draft.byId = (await scanLinks(path.join(devRoot, "serial", "by-id"))).find(([, target]) => target === real)?.[0];
  draft.byPath = (await scanLinks(path.join(devRoot, "serial", "by-path"))).find(([, target]) => target === real)?.[0];
  return classify(draft);
}

/**
 * Where a USB board that `devicePath` reaches while it runs Klipper may be found once it re-enumerates in Katapult:
 * the same path; its by-id name (the configured path's own, or the one discovery found) with usb-Klipper_ turned
 * into usb-katapult_, as udev names the link usb-<manufacturer>_<product>_<serial> and the manufacturer string
 * changes (USB_MANUFACTURER in Klipper's and Katapult's src/Kconfig); and its by-path link, which names the USB
 * port and so stays.
 */
export function reenumerationCandidates(devicePath: string, device: DiscoveredDevice | null): string[] {
  const candidates = [devicePath];
  const add = (candidate: string | undefined): void => {
    if (candidate && !candidates.includes(candidate)) candidates.push(candidate);
  };
  for (const byId of [devicePath, device?.byId]) {
    if (byId && path.basename(byId).includes("usb-Klipper_")) {
      add(path.join(path.dirname(byId), path.basename(byId).replace("usb-Klipper_", "usb-katapult_")));
    }
  }
  add(device?.byPath);
  return candidates;
}

export interface McuSerialConfig {
  section: string;
  serial?: string;
  canbusUuid?: string;
}

/**
 * Copies of `devices` with `mcu` set to the config section whose serial names the same device. Compared by real
 * path, so by-id, by-path and /dev/ttyACM0 spellings of one device match.
 */
export async function mapDevicesToMcus(
  devices: readonly DiscoveredDevice[],
  mcus: readonly McuSerialConfig[],
): Promise<DiscoveredDevice[]> {
  const sectionByPath = new Map<string, string>();
  for (const mcu of mcus) {
    if (!mcu.serial) continue;
    const real = await resolveDevicePath(mcu.serial);
    // A link that vanished since discovery still matches by its spelling.
    const device = real
      ? devices.find((d) => d.path === real)
      : devices.find((d) => d.path === mcu.serial || d.byId === mcu.serial || d.byPath === mcu.serial);
    if (device && !sectionByPath.has(device.path)) sectionByPath.set(device.path, mcu.section);
  }
  return devices.map((d) => {
    const section = sectionByPath.get(d.path);
    return section ? { ...d, mcu: section } : { ...d };
  });
}

export interface DiscoverCanNodesOptions {
  iface: string;
  /** Asked first when it has a Moonraker connection (machine.peripherals.canbus). */
  printer?: PrinterPort;
  /** Fallback: `<python> <script> -i <iface> -q`. */
  flashtool?: { python: string; script: string };
  /** Timeout for flashtool's query; default 15000 ms (it listens 2 s, plus Python start-up). */
  timeoutMs?: number;
}

/** `Detected UUID: 0a1b2c3d4e5f, Application: Katapult` lines of flashtool.py -q (Katapult scripts/flashtool.py). */
export function parseCanQueryOutput(lines: readonly string[]): CanbusNode[] {
  const nodes: CanbusNode[] = [];
  for (const line of lines) {
    const match = /Detected UUID: ([0-9a-f]{12}), Application: (\S+)/i.exec(line);
    if (match) nodes.push({ uuid: match[1]!.toLowerCase(), application: match[2]! });
  }
  return nodes;
}

/**
 * Unassigned CAN nodes on `iface`. Nodes a running Klipper has claimed do not answer either way, and querying
 * a bus with several nodes can drive one bus-off (Katapult README), so callers should ask only when needed.
 */
export async function discoverCanNodes(opts: DiscoverCanNodesOptions): Promise<CanbusNode[]> {
  if (opts.printer?.state().moonrakerConnected) {
    try {
      return await opts.printer.canbusNodes(opts.iface);
    } catch (err) {
      // Moonraker answers 500 when the interface is missing ("Unable to bind socket…", or "Address family not
      // supported" on a kernel without CAN). flashtool.py, when present, gives the same answer in more detail.
      if (!opts.flashtool) {
        throw new MoonflashError(
          "DEVICE_NOT_FOUND",
          `Moonraker could not query CAN interface ${opts.iface} (${(err as Error).message}). Check that it exists and is up (ip link show ${opts.iface}).`,
          { iface: opts.iface },
          { cause: err },
        );
      }
    }
  }
  if (!opts.flashtool) {
    throw new MoonflashError(
      "TOOL_NOT_FOUND",
      "CAN nodes can be listed only through Moonraker or Katapult's flashtool.py: connect to Moonraker or set katapult_path in moonflash.conf.",
      { iface: opts.iface },
    );
  }
  const stdout: string[] = [];
  let flashError: string | undefined;
  const args = [opts.flashtool.script, "-i", opts.iface, "-q"];
  const result = await runTool({
    command: opts.flashtool.python,
    args,
    timeoutMs: opts.timeoutMs ?? 15_000,
    onStdoutLine: (line) => stdout.push(line),
    onStderrLine: (line) => {
      flashError ??= /(?:^|\.)FlashError: (.*)$/.exec(line)?.[1];
    },
  });
  if (result.exitCode !== 0) {
    const reason = flashError ?? result.stderrTail.at(-1) ?? `exit code ${result.exitCode}`;
    const details = { command: opts.flashtool.python, args, exitCode: result.exitCode, stderrTail: result.stderrTail };
    if (/Unable to bind socket/i.test(reason)) {
      throw new MoonflashError(
        "DEVICE_NOT_FOUND",
        `CAN interface ${opts.iface} is not available (${reason}). Check that it exists and is up (ip link show ${opts.iface}).`,
        details,
      );
    }
    throw new MoonflashError("PROTOCOL_ERROR", `flashtool.py could not query CAN nodes on ${opts.iface}: ${reason}`, details);
  }
  return parseCanQueryOutput(stdout);
}
