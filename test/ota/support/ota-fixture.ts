// What the OTA engine tests share: a printer's "old" installation in temp directories (two roots and a board),
// the package that updates it (three modules: config files for Klipper, a webcam tool with its own service, a
// toolhead firmware image), the tree that package leaves, a hash of a whole tree to compare them, a firmware port
// whose "board" is a file, and a small in-memory PrinterPort for child processes that run without Moonraker.

import { createHash } from "node:crypto";
import { chmod, lstat, mkdir, readdir, readFile, rename, rm, writeFile } from "node:fs/promises";
import { join, relative } from "node:path";
import { packPackage, type ManifestInput } from "../../../src/ota/pack.js";
import type { FirmwarePort } from "../../../src/ota/engine.js";
import type { ProcessRef } from "../../../src/ota/manifest.js";
import { OTA_DEFAULTS, type OtaConfig } from "../../../src/ota/config.js";
import { initialPrinterState, type PrinterPort, type PrinterState } from "../../../src/core/printer.js";

export const md5Of = (data: Buffer) => createHash("md5").update(data).digest("hex");
export const sha256Of = (data: Buffer | string) => createHash("sha256").update(data).digest("hex");

/** The services the fake Moonraker manages in these tests: Klipper's, and the webcam module's. */
export const SERVICES = {
  klipper: { active_state: "active", sub_state: "running" },
  klipper_mcu: { active_state: "active", sub_state: "running" },
  moonraker: { active_state: "active", sub_state: "running" },
  crowsnest: { active_state: "active", sub_state: "running" },
};

export interface Layout {
  /** Root alias "config". */
  config: string;
  /** Root alias "tools". */
  tools: string;
  /** The toolhead board: mcu/toolhead.bin is what it runs. */
  mcu: string;
}

export function layoutIn(dir: string): Layout {
  return { config: join(dir, "config"), tools: join(dir, "tools"), mcu: join(dir, "mcu") };
}

export function rootsOf(layout: Layout): Record<string, string> {
  return { config: layout.config, tools: layout.tools };
}

/** The engine's config for a layout: its roots, a short probation. */
export function otaConfig(layout: Layout, overrides: Partial<OtaConfig> = {}): OtaConfig {
  return { ...OTA_DEFAULTS, roots: rootsOf(layout), probation_timeout: 5, ...overrides };
}

const OLD_FIRMWARE = Buffer.from("OLD-FIRMWARE-".repeat(200));
const NEW_FIRMWARE = Buffer.from("NEW-FIRMWARE-".repeat(300));

/** The installation before the update. */
export async function writeOldTree(layout: Layout): Promise<void> {
  await mkdir(layout.config, { recursive: true });
  await mkdir(layout.tools, { recursive: true });
  await mkdir(layout.mcu, { recursive: true });
  await writeFile(join(layout.config, "printer.cfg"), "[printer]\nkinematics: corexy\n# v1\n");
  await writeFile(join(layout.config, "a.cfg"), "[gcode_macro A]\ngcode: G28\n");
  await chmod(join(layout.config, "a.cfg"), 0o600);
  await writeFile(join(layout.config, "keep.cfg"), "# the user's own file, not in the package\n");
  await writeFile(join(layout.tools, "crowsnest.conf"), "[crowsnest]\nlog_level: quiet\n");
  await chmod(join(layout.tools, "crowsnest.conf"), 0o644);
  await writeFile(join(layout.mcu, "toolhead.bin"), OLD_FIRMWARE);
}

const NEW_FILES = {
  "cfg/printer.cfg": "[printer]\nkinematics: corexy\nmax_velocity: 500\n# v2\n",
  "cfg/a.cfg": "[gcode_macro A]\ngcode: G28\n  BED_MESH_CALIBRATE\n",
  "cfg/macros/new.cfg": "[gcode_macro NEW]\ngcode: M117 new\n",
  "webcam/crowsnest.conf": "[crowsnest]\nlog_level: verbose\n",
  "webcam/helper.sh": "#!/bin/sh\necho helper v2\n",
} as const;

/** The installation after the update: what writeOldTree wrote, changed as the package says. */
export async function writeNewTree(layout: Layout): Promise<void> {
  await writeOldTree(layout);
  await writeFile(join(layout.config, "printer.cfg"), NEW_FILES["cfg/printer.cfg"]);
  await writeFile(join(layout.config, "a.cfg"), NEW_FILES["cfg/a.cfg"]);
  await chmod(join(layout.config, "a.cfg"), 0o644);
  await mkdir(join(layout.config, "macros"));
  await writeFile(join(layout.config, "macros", "new.cfg"), NEW_FILES["cfg/macros/new.cfg"]);
  await writeFile(join(layout.tools, "crowsnest.conf"), NEW_FILES["webcam/crowsnest.conf"]);
  await mkdir(join(layout.tools, "bin"));
  await writeFile(join(layout.tools, "bin", "helper.sh"), NEW_FILES["webcam/helper.sh"]);
  await chmod(join(layout.tools, "bin", "helper.sh"), 0o755);
  await writeFile(join(layout.mcu, "toolhead.bin"), NEW_FIRMWARE);
}

export interface PackageOptions {
  /** Leave the firmware module out (engine tests without a flash port). */
  firmware?: boolean;
  version?: string;
  /** The package name (default acme-printer). */
  name?: string;
  /** The manifest's min_version. */
  minVersion?: string;
  /** The webcam module names this process instead of the crowsnest service. */
  process?: ProcessRef;
  /** Sign manifest.json with this PKCS#8 PEM key. */
  privateKey?: string;
}

/** Packs the update into `out` (files written beside it in `<out>.src/`); returns its bytes. */
export async function buildPackage(out: string, opts: PackageOptions = {}): Promise<Buffer> {
  const srcDir = `${out}.src`;
  const files = new Map<string, string>();
  for (const [src, content] of Object.entries({ ...NEW_FILES, "fw/toolhead.bin": NEW_FIRMWARE })) {
    const path = join(srcDir, src);
    await mkdir(join(path, ".."), { recursive: true });
    await writeFile(path, content);
    files.set(src, path);
  }
  const modules: ManifestInput["modules"] = [
    {
      id: "config",
      service: "klipper",
      files: [
        { src: "cfg/printer.cfg", dst: "config/printer.cfg" },
        { src: "cfg/a.cfg", dst: "config/a.cfg", mode: "0644" },
        { src: "cfg/macros/new.cfg", dst: "config/macros/new.cfg" },
      ],
    },
    {
      id: "webcam",
      depends: ["config"],
      ...(opts.process ? { process: opts.process } : { service: "crowsnest" }),
      files: [
        { src: "webcam/crowsnest.conf", dst: "tools/crowsnest.conf" },
        { src: "webcam/helper.sh", dst: "tools/bin/helper.sh", mode: "0755" },
      ],
    },
  ];
  if (opts.firmware ?? true) {
    modules.push({ id: "toolhead", type: "firmware", depends: ["config"], mcu: "toolhead", image: { src: "fw/toolhead.bin" } });
  } else {
    files.delete("fw/toolhead.bin");
  }
  const manifest: ManifestInput = { name: opts.name ?? "acme-printer", version: opts.version ?? "2.0.0", ...(opts.minVersion ? { min_version: opts.minVersion } : {}), modules };
  await packPackage({ manifest, files, out, ...(opts.privateKey ? { privateKey: opts.privateKey } : {}) });
  return readFile(out);
}

/**
 * Every directory and file under `root` as "path/ dir" and "path mode sha256" lines, sorted: two trees are the same
 * installation exactly when their listings are equal (temp files, extra directories and modes all count).
 */
export async function treeListing(root: string): Promise<string[]> {
  const lines: string[] = [];
  const walk = async (dir: string): Promise<void> => {
    for (const name of (await readdir(dir)).sort()) {
      const path = join(dir, name);
      const info = await lstat(path);
      const rel = relative(root, path);
      if (info.isDirectory()) {
        lines.push(`${rel}/ dir`);
        await walk(path);
      } else {
        lines.push(`${rel} ${(info.mode & 0o7777).toString(8)} ${sha256Of(await readFile(path))}`);
      }
    }
  };
  await walk(root);
  return lines;
}

/** The listing of a whole layout (its two roots and the board), each part under its name. */
export async function layoutListing(layout: Layout): Promise<string[]> {
  const parts = await Promise.all(
    (Object.entries(layout) as Array<[string, string]>).map(async ([name, dir]) => (await treeListing(dir)).map((line) => `${name}:${line}`)),
  );
  return parts.flat();
}

/**
 * A firmware port whose board is a file (<mcu dir>/<mcu>.bin): flash replaces it atomically, currentImage names it.
 * Without `currentImage` the previous image is kept beside it (<mcu>.prev) for `rollback`, as the firmware store
 * keeps the last images.
 */
export function fileFirmwarePort(mcuDir: string, opts: { currentImage?: boolean } = {}): FirmwarePort & { calls: string[] } {
  const calls: string[] = [];
  const withCurrentImage = opts.currentImage ?? true;
  const board = (mcu: string) => join(mcuDir, `${mcu}.bin`);
  const put = async (path: string, data: Buffer) => {
    await writeFile(`${path}.tmp`, data);
    await rename(`${path}.tmp`, path);
  };
  const port: FirmwarePort & { calls: string[] } = {
    calls,
    async flash(mcu, imagePath) {
      calls.push(`flash ${mcu} ${sha256Of(await readFile(imagePath)).slice(0, 8)}`);
      const current = await readFile(board(mcu)).catch(() => null);
      if (!withCurrentImage && current) await put(`${board(mcu)}.prev`, current);
      await put(board(mcu), await readFile(imagePath));
    },
    async rollback(mcu) {
      calls.push(`rollback ${mcu}`);
      await put(board(mcu), await readFile(`${board(mcu)}.prev`));
      await rm(`${board(mcu)}.prev`);
    },
  };
  if (withCurrentImage) {
    port.currentImage = async (mcu) => {
      const data = await readFile(board(mcu)).catch(() => null);
      return data ? { path: board(mcu), sha256: sha256Of(data) } : null;
    };
  }
  return port;
}

/** A printer without Moonraker, for child processes: Klipper ready, nothing printing, services stop and start at once. */
export class MemoryPrinter implements PrinterPort {
  private readonly current: PrinterState = {
    ...initialPrinterState(),
    moonrakerConnected: true,
    klippyConnected: true,
    klippyState: "ready",
    printState: "standby",
    idleState: "Idle",
    services: structuredClone(SERVICES),
  };
  readonly actions: string[] = [];

  state(): PrinterState {
    return structuredClone(this.current);
  }
  isPrinting(): boolean {
    return false;
  }
  onStateChange(): () => void {
    return () => undefined;
  }
  async stopService(service = "klipper"): Promise<void> {
    this.actions.push(`stop ${service}`);
    this.current.services[service] = { active_state: "inactive", sub_state: "dead" };
  }
  async startService(service = "klipper"): Promise<void> {
    this.actions.push(`start ${service}`);
    this.current.services[service] = { active_state: "active", sub_state: "running" };
  }
  async gcode(): Promise<void> {}
  async sendEvent(): Promise<void> {}
  async mcuReport() {
    return { hostVersion: null, mcus: [] };
  }
  async serialPeripherals() {
    return [];
  }
  async canbusNodes() {
    return [];
  }
}
