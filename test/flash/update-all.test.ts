// Update-all end to end: a fake Klipper tree (a git checkout tagged v0.13.0) builds three profiles, three virtual
// Katapult boards on ptys (one running its application, so it needs the bootloader request), and the fake
// Moonraker whose simulated Klipper reports each MCU's version from the image its board holds and refuses to start
// ("MCU Protocol error") while one differs. The real agent serves flash.update_all over the unix socket.

import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { randomBytes } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import { mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import pino from "pino";
import type { Agent } from "../../src/agent/agent.js";
import { createAgent } from "../../src/app.js";
import type { JobBoard } from "../../src/core/events.js";
import type { UpdateAllResult } from "../../src/flash/update-all.js";
import { startVirtualDevice, type VirtualDevice } from "../../src/sim/virtual-device.js";
import { mcuProtocolErrorMessage } from "../support/fake-moonraker/klipper-sim.js";
import { startFakeMoonraker, RpcCallError, type FakeMoonraker, type TestClient } from "../support/fake-moonraker/index.js";
import { createBuildFixture, LINUX_PROFILE, RP2040_PROFILE, STM32_PROFILE, type BuildFixture } from "./support/build-fixture.js";

const OLD = "v0.12.0-85-gd785b396";
let fx: BuildFixture;
let host: string;
let boards: Record<"mcu" | "toolhead" | "bed", VirtualDevice>;
let moonraker: FakeMoonraker;
let agent: Agent | null = null;
let web: TestClient | null = null;
const savedPath = process.env.PATH;

/** What a virtual board's firmware reports: the version the fake tree wrote into the image it holds. */
const versionIn = (board: VirtualDevice): string | undefined => /FAKE-KLIPPER version=(\S+)/.exec(board.model.flash.toString("latin1"))?.[1];
/** The Linux host MCU program the test installs into (linux_mcu_path), and the version it would report. */
const hostProgram = (): string => join(fx.root, "usr-local-bin", "klipper_mcu");
const hostProgramVersion = (): string | undefined => {
  if (!existsSync(hostProgram())) return undefined;
  return /FAKE-ELF version=(\S+)/.exec(readFileSync(hostProgram(), "latin1"))?.[1];
};

async function setUp(opts: { printState?: string; silentToolhead?: boolean; hostMcu?: boolean; bedReports?: string } = {}): Promise<void> {
  fx = await createBuildFixture("update-all");
  host = await fx.gitInit("v0.13.0");
  process.env.PATH = `${fx.bin}:${savedPath}`;
  await fx.writeProfile("mcu.config", STM32_PROFILE);
  await fx.writeProfile("toolhead.config", RP2040_PROFILE);
  await fx.writeProfile("bed.config", STM32_PROFILE);
  boards = {
    mcu: await startVirtualDevice({ path: join(fx.root, "ttyMCU"), mcuType: "stm32f446xx" }),
    toolhead: await startVirtualDevice({
      path: join(fx.root, "ttyTOOL"),
      mcuType: "rp2040",
      mode: "app",
      ...(opts.silentToolhead ? { faults: [{ kind: "silence" as const }] } : {}),
    }),
    bed: await startVirtualDevice({ path: join(fx.root, "ttyBED"), mcuType: "stm32f446xx" }),
  };
  if (opts.hostMcu) {
    await fx.writeProfile("host.config", LINUX_PROFILE);
    await mkdir(join(fx.root, "usr-local-bin"));
    await writeFile(hostProgram(), `\x7fELF FAKE-ELF version=${OLD}\n`, { mode: 0o755 });
  }
  await fx.writeConf(
    `service_timeout: 5\n\n` +
      `[mcu]\nmethod: katapult\n\n[mcu toolhead]\nmethod: katapult\nbootloader: serial\n\n[mcu bed]\nmethod: katapult\n` +
      (opts.hostMcu ? `\n[mcu host]\nlinux_mcu_path: ${hostProgram()}\n` : ""),
  );
  const sim = (section: string, board: VirtualDevice, type: string) => ({
    section,
    settings: { serial: board.path, baud: 250000 },
    mcu_constants: { MCU: type },
    mcu_version: opts.printState ? host : OLD,
    versionFrom: () => (section === "mcu bed" && opts.bedReports && versionIn(board) ? opts.bedReports : versionIn(board)),
  });
  moonraker = await startFakeMoonraker({
    dataDir: fx.dataDir,
    websocket: false,
    timing: { stopOkMs: 30, stopStateMs: 20, startOkMs: 30, startStateMs: 20, readyMs: 100 },
    klipper: {
      softwareVersion: host,
      checkMcuVersions: true,
      // A printer in MCU Protocol error cannot print: the printing case starts with every MCU up to date.
      ...(opts.printState
        ? { printState: opts.printState }
        : { state: "error" as const, stateMessage: mcuProtocolErrorMessage(host, [{ name: "mcu", version: OLD }, { name: "toolhead", version: OLD }, { name: "bed", version: OLD }], []) }),
      mcus: [
        sim("mcu", boards.mcu, "stm32f446xx"),
        sim("mcu toolhead", boards.toolhead, "rp2040"),
        sim("mcu bed", boards.bed, "stm32f446xx"),
        ...(opts.hostMcu
          ? [{ section: "mcu host", settings: { serial: "/tmp/klipper_host_mcu" }, mcu_constants: { MCU: "linux" }, mcu_version: OLD, versionFrom: hostProgramVersion }]
          : []),
      ],
    },
  });
  agent = await createAgent({ dataDir: fx.dataDir, logger: pino({ level: "silent" }) });
  agent.start();
  await moonraker.waitFor(() => moonraker.remoteMethods().includes("flash.update_all") && agent!.session.identified, 10_000);
  web = await moonraker.connectClient({ transport: "unix" });
}

beforeEach(() => {
  agent = null;
  web = null;
});

afterEach(async () => {
  await web?.close();
  await agent?.stop();
  for (const board of Object.values(boards ?? {})) await board.stop();
  await moonraker?.stop();
  process.env.PATH = savedPath;
  await fx?.cleanup();
});

const updateAll = (args: Record<string, unknown> = {}) =>
  web!.call("server.extensions.request", { agent: "moonflash", method: "flash.update_all", arguments: args }) as Promise<UpdateAllResult>;
const actions = () => moonraker.serviceActions.map((a) => `${a.action} ${a.service}`);

describe("flash.update_all", () => {
  it("builds all three while Klipper runs, stops it once, flashes each, and every MCU then reports the host version", async () => {
    await setUp();
    const flashed: string[] = [];
    const buildsBeforeStop: string[] = [];
    const boardSteps: Array<[string, JobBoard | undefined]> = [];
    agent!.runner.on((e) => {
      if (e.type === "stage" && e.stage === "flash" && e.message) flashed.push(e.message);
      if (e.type === "stage" && e.stage === "build" && actions().length === 0) buildsBeforeStop.push(e.message ?? "");
      if (e.type === "stage" && (e.stage === "build" || e.stage === "flash")) boardSteps.push([e.stage, e.board]);
    });
    let bootloaderRequests = 0;
    boards.toolhead.on("bootloader", () => bootloaderRequests++);

    const result = await updateAll();

    expect(result.plan.map((p) => [p.name, p.why, p.version_before, p.transport])).toEqual([
      ["mcu", "outdated", OLD, "uart"],
      ["toolhead", "outdated", OLD, "uart"],
      ["bed", "outdated", OLD, "uart"],
    ]);
    expect(buildsBeforeStop).toHaveLength(3);
    expect(actions()).toEqual(["stop klipper", "start klipper"]);
    expect(flashed).toEqual(["flashing mcu (1 of 3)", "flashing toolhead (2 of 3)", "flashing bed (3 of 3)"]);
    // The status page follows each board from this field, not from the messages.
    expect(boardSteps).toEqual([
      ["build", { name: "mcu", index: 1, count: 3 }],
      ["build", { name: "toolhead", index: 2, count: 3 }],
      ["build", { name: "bed", index: 3, count: 3 }],
      ["flash", { name: "mcu", index: 1, count: 3 }],
      ["flash", { name: "toolhead", index: 2, count: 3 }],
      ["flash", { name: "bed", index: 3, count: 3 }],
    ]);
    expect(bootloaderRequests).toBe(1);
    expect(result.mcus.map((m) => [m.name, m.built, m.flashed, m.verified, m.version_now])).toEqual([
      ["mcu", true, true, true, host],
      ["toolhead", true, true, true, host],
      ["bed", true, true, true, host],
    ]);
    for (const board of Object.values(boards)) expect(versionIn(board)).toBe(host);
    expect(result.still_outdated).toEqual([]);
    expect(result.klipper_state).toBe("ready");
    expect(result.downtime_ms).toBeGreaterThan(0);
    expect(result.phases_ms.build).toBeGreaterThan(0);
    await moonraker.waitFor(() => moonraker.consoleLines.some((l) => l.startsWith(`// moonflash: updated mcu, toolhead, bed to ${host}. Klipper was down `)), 5000);

    // Nothing changed since: a forced second run keeps the three builds and flashes again under one more stop.
    const again = await updateAll({ force: true });
    expect(again.mcus.map((m) => [m.name, m.build_skipped, m.flashed])).toEqual([
      ["mcu", true, true],
      ["bed", true, true],
      ["toolhead", true, true],
    ]);
    expect(actions()).toEqual(["stop klipper", "start klipper", "stop klipper", "start klipper"]);
  });

  it("the Linux host MCU goes last: klipper.elf installed at linux_mcu_path, its service stopped and started while Klipper is down", async () => {
    await setUp({ hostMcu: true });
    const result = await updateAll({ mcus: ["host", "bed"] });
    expect(result.plan.map((p) => [p.name, p.transport])).toEqual([
      ["bed", "uart"],
      ["host", "linux"],
    ]);
    expect(actions()).toEqual(["stop klipper", "stop klipper_mcu", "start klipper_mcu", "start klipper"]);
    expect(result.mcus.find((m) => m.name === "host")).toMatchObject({ built: true, flashed: true, method: "linux", verified: true, version_now: host });
    expect(hostProgramVersion()).toBe(host);
    expect(readFileSync(hostProgram())).toEqual(readFileSync(join(fx.dataDir, "moonflash", "build", "mcu_host", "klipper.elf")));
  });

  it("backup_before_flash: a board moonflash has no image of is read back first, so flash.rollback can put its old application back", async () => {
    await setUp();
    const old = Buffer.concat([Buffer.from(`FAKE-KLIPPER version=${OLD}\n`), randomBytes(3000)]);
    old.copy(boards.bed.model.flash);
    const result = await updateAll({ mcus: ["bed"] });
    expect(result.plan[0]!.backup).toMatchObject({ read_back: true, estimate_basis: "a typical 64 KiB application at 250000 baud" });
    expect(result.plan[0]!.backup.estimated_ms).toBeGreaterThan(0);
    expect(result.mcus[0]).toMatchObject({ name: "bed", flashed: true, backed_up: true, version_now: host });
    expect(versionIn(boards.bed)).toBe(host);

    const rolledBack = (await web!.call("server.extensions.request", { agent: "moonflash", method: "flash.rollback", arguments: { mcu: "bed" } })) as {
      rollback_to: { source: string; size: number };
    };
    expect(rolledBack.rollback_to).toMatchObject({ source: "read-back", size: old.length });
    expect(boards.bed.model.flash.subarray(0, old.length)).toEqual(old);

    // The store now keeps images of the board: no read-back any more.
    const again = await updateAll({ mcus: ["bed"], dry_run: true });
    expect(again.plan[0]!.backup).toEqual({ read_back: false });
  });

  it("a dry run returns the plan and builds, stops and writes nothing", async () => {
    await setUp();
    const plan = await updateAll({ dry_run: true });
    expect(plan).toMatchObject({ dry_run: true, host_version: host, downtime_ms: null });
    expect(plan.plan.map((p) => p.name)).toEqual(["mcu", "toolhead", "bed"]);
    expect(actions()).toEqual([]);
    expect(existsSync(join(fx.dataDir, "moonflash", "build"))).toBe(false);
    for (const board of Object.values(boards)) expect(board.model.frames).toEqual([]);
  });

  it("refuses while printing: nothing is built, stopped or written", async () => {
    await setUp({ printState: "printing" });
    await moonraker.waitFor(() => agent!.session.isPrinting(), 5000);
    const err = await updateAll({ force: true }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(RpcCallError);
    expect((err as RpcCallError).data).toMatchObject({ data: { code: "PRINTER_BUSY" } });
    expect(actions()).toEqual([]);
    expect(existsSync(join(fx.dataDir, "moonflash", "build"))).toBe(false);
  });

  it("a board failing in the middle: the others are flashed, Klipper is stopped and started once, the job has its code", async () => {
    await setUp({ silentToolhead: true });
    const errorLines: Array<[string, JobBoard | undefined]> = [];
    agent!.runner.on((e) => {
      if (e.type === "log" && e.level === "error") errorLines.push([e.message, e.board]);
    });
    const err = await updateAll().catch((e: unknown) => e);
    expect(err).toBeInstanceOf(RpcCallError);
    const data = (err as RpcCallError).data as { message: string; data: { code: string; details: { result: UpdateAllResult } } };
    const result = data.data.details.result;
    expect(result.mcus.map((m) => [m.name, m.flashed, m.code ?? null])).toEqual([
      ["mcu", true, null],
      ["toolhead", false, data.data.code],
      ["bed", true, null],
    ]);
    expect(data.message).toMatch(/^toolhead: /);
    expect(errorLines).toEqual([[data.message, { name: "toolhead", index: 2, count: 3 }]]);
    expect(versionIn(boards.mcu)).toBe(host);
    expect(versionIn(boards.bed)).toBe(host);
    expect(actions()).toEqual(["stop klipper", "start klipper"]);
    // Klipper is running, and says which MCU is still outdated.
    await moonraker.waitFor(() => moonraker.klipper.serviceActive && moonraker.klipper.connected, 10_000);
    expect(moonraker.klipper.state).toBe("error");
    expect(moonraker.klipper.stateMessage).toContain(`toolhead: Current version ${OLD}`);
  });

  it("every board flashed, but one still reports another version (built from a dirty tree): VERSION_MISMATCH naming it", async () => {
    await setUp({ bedReports: "v0.13.0-dirty" });
    const err = await updateAll().catch((e: unknown) => e);
    expect(err).toBeInstanceOf(RpcCallError);
    const data = (err as RpcCallError).data as { message: string; data: { code: string; details: { result: UpdateAllResult } } };
    expect(data.data.code).toBe("VERSION_MISMATCH");
    expect(data.message).toBe(
      `Flashed, but bed still reports another version than Klipper (${host}). Rebuild with the Klipper tree Klipper runs from (a dirty or moved tree gives another version) and update again.`,
    );
    const result = data.data.details.result;
    expect(result.mcus.map((m) => [m.name, m.flashed, m.verified])).toEqual([["mcu", true, true], ["toolhead", true, true], ["bed", true, true]]);
    expect(result.still_outdated).toEqual(["bed"]);
    expect(actions()).toEqual(["stop klipper", "start klipper"]);
  });
});
