// flash.check and flash.rollback through the real agent: the fake Moonraker forwards client requests
// (server.extensions.request) and the shipped macros (moonraker/moonflash.cfg, rendered with real Jinja2), and the
// console shows what a Mainsail user sees. A virtual Katapult board on a pty is rolled back for real.

import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { randomBytes } from "node:crypto";
import pino from "pino";
import type { Agent } from "../../src/agent/agent.js";
import { createAgent } from "../../src/app.js";
import { FirmwareStore } from "../../src/flash/firmware-store.js";
import type { VersionCheck } from "../../src/flash/versions.js";
import { mcuProtocolErrorMessage, startFakeMoonraker, type FakeMoonraker, type FakeMoonrakerOptions } from "../support/fake-moonraker/index.js";
import { startVirtualDevice, type VirtualDevice } from "../../src/sim/virtual-device.js";

const MACRO_FILE = resolve(import.meta.dirname, "../../moonraker/moonflash.cfg");
const HOST = "v0.13.0-730-g84104bbbd";
const OLD = "v0.12.0-85-gd785b396";

let dir: string;
let moonraker: FakeMoonraker;
let agent: Agent | null = null;
let board: VirtualDevice | null = null;

async function startPrinter(klipper: FakeMoonrakerOptions["klipper"] = {}): Promise<FakeMoonraker> {
  return startFakeMoonraker({
    dataDir: dir,
    timing: { stopOkMs: 20, stopStateMs: 20, startOkMs: 20, startStateMs: 20, readyMs: 20 },
    klipper: {
      softwareVersion: HOST,
      mcus: [
        { section: "mcu", settings: { serial: join(dir, "main-board") }, mcu_version: HOST },
        { section: "mcu toolhead", settings: { serial: "/dev/serial/by-id/usb-Klipper_rp2040_toolhead-if00" }, mcu_version: OLD },
      ],
      macroFile: MACRO_FILE,
      ...klipper,
    },
  });
}

async function startAgent(): Promise<Agent> {
  agent = await createAgent({ dataDir: dir, logger: pino({ level: "silent" }) });
  agent.start();
  await moonraker.waitFor(() => agent!.session.identified && agent!.session.state().klippyState !== "disconnected", 10_000);
  return agent;
}

async function request(method: string, args: Record<string, unknown> = {}): Promise<unknown> {
  const web = await moonraker.connectClient({ transport: "ws" });
  try {
    return await web.call("server.extensions.request", { agent: "moonflash", method, arguments: args });
  } finally {
    await web.close();
  }
}

/** Runs a macro as a Mainsail user would and waits for the console line that answers it. */
async function macro(script: string, answer: RegExp | string): Promise<string> {
  const web = await moonraker.connectClient({ transport: "ws" });
  try {
    const before = moonraker.consoleLines.length;
    await web.call("printer.gcode.script", { script });
    const matches = (l: string): boolean => (typeof answer === "string" ? l === answer : answer.test(l));
    await moonraker.waitFor(() => moonraker.consoleLines.slice(before).some(matches), 10_000);
    return moonraker.consoleLines.slice(before).find(matches)!;
  } finally {
    await web.close();
  }
}

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), "moonflash-check-"));
  await mkdir(join(dir, "config"), { recursive: true });
  // [mcu emu] is moonflash.conf's own board, the virtual Katapult board below.
  await writeFile(join(dir, "config", "moonflash.conf"), `[mcu emu]\nserial: ${join(dir, "emu")}\nbootloader: none\nmethod: katapult\n[status_page]\nenabled: False\n`);
  board = await startVirtualDevice({ path: join(dir, "emu") });
});

afterEach(async () => {
  await agent?.stop();
  agent = null;
  await board?.stop();
  board = null;
  await moonraker.stop();
  await rm(dir, { recursive: true, force: true });
});

describe("flash.check", () => {
  it("Klipper ready: the client gets every MCU's version and why; FLASH_CHECK says it in one console line", async () => {
    moonraker = await startPrinter();
    await startAgent();
    const check = (await request("flash.check")) as VersionCheck;
    expect(check).toMatchObject({
      klipper_state: "ready",
      host: { version: HOST, source: "klipper" },
      protocol_error: null,
      mcus: [
        { mcu: "mcu", name: "mcu", version: HOST, source: "klipper", outdated: false },
        { mcu: "mcu toolhead", name: "toolhead", version: OLD, source: "klipper", outdated: true, reason: `it runs ${OLD}, Klipper is ${HOST}: Klipper wants every MCU on its own version` },
        { mcu: "mcu emu", name: "emu", version: null, source: "unknown", outdated: null },
      ],
    });
    await macro("FLASH_CHECK", `// moonflash: Klipper ${HOST}. Outdated: toolhead (${OLD}). Up to date: mcu. Unknown: emu. Flash it with FLASH_MCU MCU=toolhead.`);
    expect(moonraker.serviceActions).toEqual([]);
  });

  it("MCU Protocol error: the state message is the source; Klipper runs no macros then, so FLASH_CHECK gets its refusal", async () => {
    const message = mcuProtocolErrorMessage(HOST, [{ name: "toolhead", version: OLD }], ["mcu"]);
    // Klipper in that error may report no mcu objects: the message is all there is.
    moonraker = await startPrinter({ state: "error", stateMessage: message, mcus: [] });
    const a = await startAgent();
    await moonraker.waitFor(() => a.session.state().stateMessage.startsWith("MCU Protocol error"), 10_000);
    const check = (await request("flash.check")) as VersionCheck;
    expect(check).toMatchObject({
      klipper_state: "error",
      host: { version: HOST, source: "protocol-error" },
      protocol_error: { detail: "Unknown command: config_spi_shutdown" },
      mcus: [
        { mcu: "mcu toolhead", version: OLD, source: "protocol-error", outdated: true },
        { mcu: "mcu", version: HOST, source: "protocol-error", outdated: false },
        { mcu: "mcu emu", version: null, outdated: null },
      ],
    });
    // gcode.py cmd_default: while not ready, a macro is answered with the state message's first line.
    const web = await moonraker.connectClient({ transport: "ws" });
    const refused = await web.call("printer.gcode.script", { script: "FLASH_CHECK" }).then(() => null, (e: unknown) => e);
    await web.close();
    expect(refused).toMatchObject({ code: 400 });
    expect(moonraker.consoleLines.at(-1)).toBe("!! MCU Protocol error");
  });
});

describe("flash.rollback", () => {
  it("FLASH_ROLLBACK flashes the earlier image onto the board with the flash's console lines, and the store records it", async () => {
    moonraker = await startPrinter();
    const store = new FirmwareStore(join(dir, "moonflash", "firmware"));
    const older = randomBytes(4096);
    const newer = randomBytes(3000);
    await store.add("mcu emu", older, { source: "flash", sourcePath: "/home/pi/older.bin" });
    await store.add("mcu emu", newer, { source: "flash", sourcePath: "/home/pi/newer.bin" });
    await startAgent();
    const before = moonraker.consoleLines.length;

    await macro("FLASH_ROLLBACK MCU=emu", /^\/\/ moonflash: flash emu: flashed with katapult in \d+\.\d s \(4096 bytes, verified\)\. Klipper is running again\.$/);

    const lines = moonraker.consoleLines.slice(before);
    // Which image first, then the flash's own lines.
    expect(lines[0]).toMatch(/^\/\/ moonflash: flash emu: rolling back to an image without a Klipper version \(flashed .+ UTC, from \/home\/pi\/older\.bin\)$/);
    expect(lines[1]).toBe("// moonflash: flash emu: checking the board and the firmware");
    expect(lines).toContain("// moonflash: flash emu: stopping Klipper to flash the board. The result appears here when Klipper is back.");
    expect(board!.model.flash.subarray(0, older.length).equals(older)).toBe(true);
    expect(moonraker.serviceActions.map((s) => `${s.action} ${s.service}`)).toEqual(["stop klipper", "start klipper"]);
    expect((await store.list("mcu emu")).map((e) => [e.size, e.source, e.source_path])).toEqual([
      [4096, "rollback", "/home/pi/older.bin"],
      [3000, "flash", "/home/pi/newer.bin"],
    ]);
    await macro("FLASH_STATUS", /^\/\/ moonflash: idle\. Last flash of emu: ok \(\d+ s ago\)\.$/);
  });

  it("without MCU= it names the MCUs it can roll back; with one image kept: NO_ROLLBACK_IMAGE, Klipper untouched", async () => {
    moonraker = await startPrinter();
    await startAgent();
    await macro("FLASH_ROLLBACK", "!! moonflash: FLASH_ROLLBACK failed [INVALID_PARAMS] FLASH_ROLLBACK needs MCU=<name>. moonflash has no earlier image of any MCU yet: it keeps the last 3 images it flashes to each.");
    const store = new FirmwareStore(join(dir, "moonflash", "firmware"));
    await store.add("mcu emu", randomBytes(1024), { source: "flash", sourcePath: "/a.bin" });
    await store.add("mcu toolhead", randomBytes(1024), { source: "flash", sourcePath: "/t1.bin" });
    await store.add("mcu toolhead", randomBytes(1024), { source: "flash", sourcePath: "/t2.bin" });
    await macro("FLASH_ROLLBACK", "!! moonflash: FLASH_ROLLBACK failed [INVALID_PARAMS] FLASH_ROLLBACK needs MCU=<name>. MCUs with an earlier image: toolhead (e.g. FLASH_ROLLBACK MCU=toolhead)");
    await macro(
      "FLASH_ROLLBACK MCU=emu",
      /^!! moonflash: FLASH_ROLLBACK failed \[NO_ROLLBACK_IMAGE\] There is no earlier image of emu to roll back to: moonflash keeps the last 3 images it flashed to each MCU and has only the one on it now, .+\. Nothing was stopped or written\. Flash a firmware file instead: FLASH_MCU MCU=emu FIRMWARE=\/path\/to\/klipper\.bin \(moonflash flash emu --firmware FILE\)\.$/,
    );
    // A client gets the code in the error's data.
    const err = await request("flash.rollback", { mcu: "emu" }).then(() => null, (e: unknown) => e);
    expect(err).toMatchObject({ data: { code: 404, data: { code: "NO_ROLLBACK_IMAGE", details: { mcu: "mcu emu", images: 1 } } } });
    expect(moonraker.serviceActions).toEqual([]);
    expect(agent!.runner.history()).toEqual([]);
    expect(board!.model.frames).toEqual([]);
  });
});
