// A printer for the OTA wiring tests: a data directory whose moonflash.conf gives [ota] two roots (config and tools),
// an old installation in them, a virtual Katapult board for [mcu toolhead] (placed only by Klipper's config, so OTA
// has to remember its device before Klipper stops), the firmware store holding the image the board "runs", the fake
// Moonraker with its simulated Klipper (and the shipped macros) managing klipper and crowsnest, a real HTTP server on
// 127.0.0.1 serving a package made with packPackage, and the real agent from createAgent.

import { createHash, randomBytes } from "node:crypto";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { Writable } from "node:stream";
import pino from "pino";
import type { Agent } from "../../../src/agent/agent.js";
import { createAgent } from "../../../src/app.js";
import { FirmwareStore } from "../../../src/flash/firmware-store.js";
import { packPackage } from "../../../src/ota/pack.js";
import { startVirtualDevice, type VirtualDevice } from "../../../src/sim/virtual-device.js";
import { startFakeMoonraker, type FakeMoonraker, type TestClient } from "../../support/fake-moonraker/index.js";
import { TestHttpServer } from "../../ota/support/http-server.js";

export const MACRO_FILE = resolve(import.meta.dirname, "../../../moonraker/moonflash.cfg");

export const md5Of = (data: Buffer): string => createHash("md5").update(data).digest("hex");
export const sha256Of = (data: Buffer | string): string => createHash("sha256").update(data).digest("hex");

export const OLD_FILES = {
  "config/printer.cfg": "[printer]\nkinematics: none\n# v1\n",
  "tools/crowsnest.conf": "[crowsnest]\nlog_level: quiet\n",
} as const;

export const NEW_FILES = {
  "cfg/printer.cfg": "[printer]\nkinematics: none\nmax_velocity: 300\n# v2\n",
  "cfg/macros/ota.cfg": "[gcode_macro HELLO]\ngcode: M117 hello\n",
  "webcam/crowsnest.conf": "[crowsnest]\nlog_level: verbose\n",
} as const;

export interface OtaPrinter {
  dir: string;
  /** The [ota] roots. */
  config: string;
  tools: string;
  board: VirtualDevice;
  moonraker: FakeMoonraker;
  server: TestHttpServer;
  pkg: Buffer;
  /** ota.download's arguments for the package. */
  download: { url: string; md5: string; sha256: string; size: number };
  /** What the firmware store says the toolhead runs before the update, and the update's image. */
  oldImage: Buffer;
  newImage: Buffer;
  agent: Agent | null;
  /** The agent's log records. */
  logs: Array<Record<string, unknown>>;
  web: TestClient | null;
  startAgent(): Promise<Agent>;
  /** server.extensions.request to the agent over Moonraker's unix socket. */
  call(method: string, args?: Record<string, unknown>): Promise<unknown>;
  /** A file of the installation, as "config/printer.cfg" names it. */
  read(path: string): Promise<string | null>;
  close(): Promise<void>;
}

/** The package: the config module (service klipper), the webcam module (crowsnest) and the toolhead's firmware. */
export async function buildOtaPackage(dir: string, newImage: Buffer, opts: { version?: string; privateKey?: string } = {}): Promise<Buffer> {
  const src = join(dir, "package-src");
  const files = new Map<string, string>();
  for (const [name, content] of [...Object.entries(NEW_FILES), ["fw/toolhead.bin", newImage] as const]) {
    const path = join(src, name);
    await mkdir(join(path, ".."), { recursive: true });
    await writeFile(path, content);
    files.set(name, path);
  }
  const out = join(dir, "package.zip");
  await packPackage({
    manifest: {
      name: "acme-printer",
      version: opts.version ?? "2.0.0",
      modules: [
        {
          id: "config",
          service: "klipper",
          files: [
            { src: "cfg/printer.cfg", dst: "config/printer.cfg" },
            { src: "cfg/macros/ota.cfg", dst: "config/macros/ota.cfg" },
          ],
        },
        { id: "webcam", depends: ["config"], service: "crowsnest", files: [{ src: "webcam/crowsnest.conf", dst: "tools/crowsnest.conf" }] },
        { id: "toolhead", type: "firmware", depends: ["config"], mcu: "toolhead", image: { src: "fw/toolhead.bin" } },
      ],
    },
    files,
    out,
    ...(opts.privateKey ? { privateKey: opts.privateKey } : {}),
  });
  return readFile(out);
}

export async function startOtaPrinter(opts: { extraConf?: string } = {}): Promise<OtaPrinter> {
  const dir = await mkdtemp(join(tmpdir(), "moonflash-ota-agent-"));
  const config = join(dir, "config");
  const tools = join(dir, "tools");
  await mkdir(config, { recursive: true });
  await mkdir(tools, { recursive: true });
  for (const [path, content] of Object.entries(OLD_FILES)) await writeFile(join(dir, path), content);
  await writeFile(
    join(config, "moonflash.conf"),
    [
      "[moonflash]",
      "service_timeout: 10",
      "",
      // No serial: here: the board's device comes from Klipper's config only.
      "[mcu toolhead]",
      "method: katapult",
      "",
      "[ota]",
      "roots:",
      `  config=${config}`,
      `  tools=${tools}`,
      "probation_timeout: 5",
      opts.extraConf ?? "",
    ].join("\n"),
  );
  const oldImage = randomBytes(4096);
  const newImage = randomBytes(6144);
  await new FirmwareStore(join(dir, "moonflash", "firmware")).add("mcu toolhead", oldImage, { source: "flash", sourcePath: "/home/pi/klipper/out/klipper.bin" });
  const board = await startVirtualDevice({ path: join(dir, "ttyTOOL"), mcuType: "stm32f103xe" });
  const moonraker = await startFakeMoonraker({
    dataDir: dir,
    websocket: false,
    timing: { stopOkMs: 30, stopStateMs: 20, startOkMs: 30, startStateMs: 20, readyMs: 100 },
    services: {
      klipper: { active_state: "active", sub_state: "running" },
      klipper_mcu: { active_state: "active", sub_state: "running" },
      moonraker: { active_state: "active", sub_state: "running" },
      crowsnest: { active_state: "active", sub_state: "running" },
    },
    klipper: {
      mcus: [
        { section: "mcu", settings: { serial: "/tmp/klipper_host_mcu" } },
        { section: "mcu toolhead", settings: { serial: board.path, baud: 250000 }, mcu_constants: { MCU: "stm32f103xe" } },
      ],
      macroFile: MACRO_FILE,
    },
  });
  const pkg = await buildOtaPackage(dir, newImage);
  const server = await TestHttpServer.start({ body: pkg });
  const logs: Array<Record<string, unknown>> = [];

  const printer: OtaPrinter = {
    dir,
    config,
    tools,
    board,
    moonraker,
    server,
    pkg,
    download: { url: server.url(), md5: md5Of(pkg), sha256: sha256Of(pkg), size: pkg.length },
    oldImage,
    newImage,
    agent: null,
    logs,
    web: null,
    async startAgent() {
      const sink = new Writable({
        write(chunk: Buffer, _encoding, done) {
          for (const line of chunk.toString().split("\n").filter(Boolean)) logs.push(JSON.parse(line) as Record<string, unknown>);
          done();
        },
      });
      const agent = await createAgent({ dataDir: dir, logger: pino({ level: "debug" }, sink) });
      printer.agent = agent;
      agent.start();
      await moonraker.waitFor(() => moonraker.remoteMethods().includes("ota.rollback") && agent.session.identified, 10_000);
      printer.web = await moonraker.connectClient({ transport: "unix" });
      return agent;
    },
    call(method, args = {}) {
      if (!printer.web) throw new Error("startAgent first");
      return printer.web.call("server.extensions.request", { agent: "moonflash", method, arguments: args });
    },
    read: (path) => readFile(join(dir, path), "utf8").catch(() => null),
    async close() {
      await printer.web?.close();
      await printer.agent?.stop();
      await board.stop();
      await server.close();
      await moonraker.stop();
      await rm(dir, { recursive: true, force: true });
    },
  };
  return printer;
}
