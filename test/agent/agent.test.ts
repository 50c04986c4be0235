// The agent end to end in-process: real unix socket to the fake Moonraker, real files, a virtual board on a pty.

import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { mkdtemp, mkdir, rm, writeFile, readFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { randomBytes } from "node:crypto";
import pino from "pino";
import type { Agent } from "../../src/agent/agent.js";
import { createAgent } from "../../src/app.js";
import { startFakeMoonraker, type FakeMoonraker, RpcCallError } from "../support/fake-moonraker/index.js";
import { startVirtualDevice, type VirtualDevice } from "../../src/sim/virtual-device.js";

let dir: string;
let moonraker: FakeMoonraker;
let agent: Agent | null = null;
let board: VirtualDevice | null = null;

async function startAgent(): Promise<Agent> {
  agent = await createAgent({ dataDir: dir, logger: pino({ level: "silent" }) });
  agent.start();
  await moonraker.waitFor(() => moonraker.remoteMethods().includes("flash.cancel") && agent!.session.identified, 10_000);
  return agent;
}

async function expectAgentError(promise: Promise<unknown>): Promise<RpcCallError> {
  const err = await promise.then(
    () => null,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(RpcCallError);
  return err as RpcCallError;
}

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), "moonflash-agent-"));
  await mkdir(join(dir, "config"), { recursive: true });
  moonraker = await startFakeMoonraker({
    dataDir: dir,
    klipper: {
      mcus: [{ section: "mcu", settings: { serial: join(dir, "board") }, mcu_version: "v0.12.0", mcu_constants: { MCU: "stm32f103xe" } }],
      macros: {
        FLASH_STATUS: { method: "flash.status" },
        FLASH_BAD: { method: "flash.mcu", params: { mcu: 42 } },
        FLASH_MCU: { method: "flash.mcu", params: { mcu: "mcu" } },
      },
    },
  });
});

afterEach(async () => {
  await agent?.stop();
  agent = null;
  await board?.stop();
  board = null;
  await moonraker.stop();
  await rm(dir, { recursive: true, force: true });
});

describe("agent over the unix socket", () => {
  it("identifies as the agent moonflash and registers every method of the table", async () => {
    const a = await startAgent();
    expect(moonraker.agents()).toEqual([expect.objectContaining({ name: "moonflash", type: "agent" })]);
    expect(moonraker.remoteMethods().sort()).toEqual(a.methods.map((m) => m.name).sort());
    expect(moonraker.remoteMethods()).toEqual(expect.arrayContaining(["agent.info", "flash.status", "ota.status", "flash.devices", "flash.mcu", "flash.cancel"]));
  });

  it("answers flash.status, ota.status and agent.info through server.extensions.request with non-null results", async () => {
    await startAgent();
    const web = await moonraker.connectClient({ transport: "ws" });
    expect(await web.call("server.extensions.request", { agent: "moonflash", method: "flash.status" })).toEqual({ current: null, other: null, last: [], klipper_start_pending: null });
    expect(await web.call("server.extensions.request", { agent: "moonflash", method: "ota.status" })).toMatchObject({
      state: "idle", stage: null, job: null, installed: null, lastError: null, other: null, last: [],
    });
    const info = (await web.call("server.extensions.request", { agent: "moonflash", method: "agent.info" })) as { methods: Array<{ name: string }> };
    expect(info).toMatchObject({ name: "moonflash", moonraker: { connected: true }, klipper: { state: "ready", service: "klipper" } });
    expect(info.methods.map((m) => m.name)).toContain("flash.mcu");
    await web.close();
  });

  it("reports a macro call's outcome on the Klipper console", async () => {
    await startAgent();
    const web = await moonraker.connectClient({ transport: "ws" });
    await web.call("printer.gcode.script", { script: "FLASH_STATUS" });
    await moonraker.waitFor(() => moonraker.consoleLines.some((l) => l.includes("moonflash: no flash job has run yet")), 5000);
    expect(moonraker.consoleLines).toContain("// moonflash: no flash job has run yet");
    await web.close();
  });

  it("rejects wrong param types with an error naming the field, over both paths, and changes nothing", async () => {
    await startAgent();
    const web = await moonraker.connectClient({ transport: "ws" });
    const err = await expectAgentError(web.call("server.extensions.request", { agent: "moonflash", method: "flash.mcu", arguments: { mcu: 42 } }));
    expect(err.code).toBe(424);
    expect(err.data).toMatchObject({ code: -32602, data: { code: "INVALID_PARAMS" } });
    expect((err.data as { message: string }).message).toMatch(/^flash\.mcu: mcu: /);

    const unknownParam = await expectAgentError(web.call("server.extensions.request", { agent: "moonflash", method: "flash.mcu", arguments: { mcu: "mcu", dryrun: 1 } }));
    expect((unknownParam.data as { message: string }).message).toContain("unknown parameter(s) 'dryrun'");

    await web.call("printer.gcode.script", { script: "FLASH_BAD" });
    await moonraker.waitFor(() => moonraker.consoleLines.some((l) => l.startsWith("!! moonflash: FLASH_MCU failed [INVALID_PARAMS] FLASH_MCU: MCU: ")), 5000);
    expect(moonraker.serviceActions).toEqual([]);
    await web.close();
  });

  it("answers an unknown method with -32601 inside Moonraker's 424", async () => {
    await startAgent();
    const web = await moonraker.connectClient({ transport: "ws" });
    const err = await expectAgentError(web.call("server.extensions.request", { agent: "moonflash", method: "flash.nope" }));
    expect(err.code).toBe(424);
    expect(err.data).toMatchObject({ code: -32601 });
    await web.close();
  });

  it("is back and registered after Moonraker restarts", async () => {
    await startAgent();
    await moonraker.restart(200);
    expect(moonraker.remoteMethods()).toEqual([]);
    await moonraker.waitFor(() => moonraker.remoteMethods().includes("flash.mcu"), 10_000);
    const web = await moonraker.connectClient({ transport: "ws" });
    expect(await web.call("server.extensions.request", { agent: "moonflash", method: "flash.status" })).toMatchObject({ current: null });
    await web.close();
  });

  it("reconnects as soon as Moonraker's socket reappears, even after a long outage grew the backoff", { timeout: 30_000 }, async () => {
    await startAgent();
    // 10 s down: five attempts have failed by then (at most 9.3 s with jitter) and the sixth is due no earlier
    // than 12.6 s, so only the socket watch can bring the agent back within 2 s of Moonraker's return.
    await moonraker.restart(10_000);
    await moonraker.waitFor(() => moonraker.remoteMethods().includes("flash.mcu"), 2000);
  });

  it("flash.cancel: NO_JOB when idle; before writing it cancels and Klipper is started again; during writing it is refused", { timeout: 40_000 }, async () => {
    const image = randomBytes(16 * 1024);
    await writeFile(join(dir, "fw.bin"), image);
    // bootloader: usb on a pty: the board never re-enumerates, so the job waits for it — cancellable, nothing written.
    await writeFile(join(dir, "config", "moonflash.conf"), `[mcu]\nmethod: katapult\nfirmware: ${join(dir, "fw.bin")}\nbootloader: usb\n`);
    board = await startVirtualDevice({ path: join(dir, "board"), writeDelayMs: 5 });
    await startAgent();
    const web = await moonraker.connectClient({ transport: "ws" });
    const call = (method: string, args: Record<string, unknown> = {}) => web.call("server.extensions.request", { agent: "moonflash", method, arguments: args });

    const idle = await expectAgentError(call("flash.cancel"));
    expect(idle.data).toMatchObject({ data: { code: "NO_JOB" } });

    const waiting = call("flash.mcu", { mcu: "mcu" }).catch((e: unknown) => e);
    await moonraker.waitFor(() => moonraker.serviceActions.length === 1, 10_000);
    expect(await call("flash.cancel")).toMatchObject({ cancelled: expect.stringMatching(/^flash-/) });
    const cancelled = (await waiting) as RpcCallError;
    expect(cancelled.data).toMatchObject({ data: { code: "CANCELLED" } });
    expect(board.model.frames.filter((f) => f.name === "SEND_BLOCK")).toEqual([]);
    await moonraker.waitFor(() => moonraker.serviceActions.length === 2, 10_000);
    expect(moonraker.serviceActions.map((a) => a.action)).toEqual(["stop", "start"]);

    await writeFile(join(dir, "config", "moonflash.conf"), `[mcu]\nmethod: katapult\nfirmware: ${join(dir, "fw.bin")}\nbootloader: none\n`);
    await agent!.stop();
    await startAgent();
    const writing = call("flash.mcu", { mcu: "mcu" });
    await new Promise<void>((resolve) => board!.once("block", () => resolve()));
    const refused = await expectAgentError(call("flash.cancel"));
    expect(refused.data).toMatchObject({ data: { code: "CANCEL_REFUSED" } });
    expect((refused.data as { message: string }).message).toMatch(/writ/);
    expect(await writing).toMatchObject({ verified: true, klipper_restarted: true });
    await web.close();
  });

  it("a Moonraker restart mid-flash does not trigger recovery of its own job; Klipper is started once, after the flash", { timeout: 40_000 }, async () => {
    const image = randomBytes(32 * 1024);
    await writeFile(join(dir, "fw.bin"), image);
    await writeFile(join(dir, "config", "moonflash.conf"), `[mcu]\nmethod: katapult\nfirmware: ${join(dir, "fw.bin")}\nbootloader: none\n`);
    board = await startVirtualDevice({ path: join(dir, "board"), writeDelayMs: 5 });
    const a = await startAgent();
    const result = a.flash.flash({ mcu: "mcu" });
    await new Promise<void>((resolve) => board!.once("block", () => resolve()));
    await moonraker.restart(300);
    await moonraker.waitFor(() => moonraker.remoteMethods().includes("flash.mcu"), 10_000);
    // Reconnected while the job is still writing: the journal is this job's own, so nothing is started early.
    expect(moonraker.serviceActions.map((x) => x.action)).toEqual(["stop"]);
    expect(await result).toMatchObject({ verified: true, klipper_restarted: true });
    expect(moonraker.serviceActions.map((x) => x.action)).toEqual(["stop", "start"]);
  });

  it("refuses a second concurrent job with BUSY naming the running one, and flashes the first", async () => {
    const image = randomBytes(16 * 1024);
    await writeFile(join(dir, "fw.bin"), image);
    await writeFile(join(dir, "config", "moonflash.conf"), `[mcu]\nmethod: katapult\nfirmware: ${join(dir, "fw.bin")}\nbootloader: none\n`);
    // Slow writes keep the first job running while the second request arrives.
    board = await startVirtualDevice({ path: join(dir, "board"), writeDelayMs: 5 });
    await startAgent();
    const web = await moonraker.connectClient({ transport: "ws" });
    const first = web.call("server.extensions.request", { agent: "moonflash", method: "flash.mcu", arguments: { mcu: "mcu" } });
    await new Promise<void>((resolve) => board!.once("block", () => resolve()));
    const err = await expectAgentError(web.call("server.extensions.request", { agent: "moonflash", method: "flash.mcu", arguments: { mcu: "mcu" } }));
    expect(err.data).toMatchObject({ data: { code: "BUSY" } });
    expect((err.data as { message: string }).message).toMatch(/^A flash job on mcu is running \(pid \d+, since /);
    const result = (await first) as Record<string, unknown>;
    expect(result).toMatchObject({ mcu: "mcu", method: "katapult", verified: true, bytes: image.length, klipper_restarted: true });

    // Agent events: every stage and the result, progress throttled to 5 a second with each phase's first and last.
    await web.waitForNotification("notify_agent_event", (p) => (p as Array<{ event: string }>)[0]?.event === "flash.result", 5000);
    const events = web.notifications.filter((n) => n.method === "notify_agent_event").map((n) => (n.params as Array<{ agent: string; event: string; data: Record<string, unknown> }>)[0]!);
    expect(new Set(events.map((e) => e.agent))).toEqual(new Set(["moonflash"]));
    const progress = events.filter((e) => e.event === "flash.progress").map((e) => e.data as { phase: string; done: number; total: number; ts: string });
    for (const phase of ["write", "verify"]) {
      const ofPhase = progress.filter((p) => p.phase === phase);
      expect(ofPhase[0]!.done).toBe(64);
      expect(ofPhase.at(-1)!.done).toBe(image.length);
    }
    const seconds = (Date.parse(progress.at(-1)!.ts) - Date.parse(progress[0]!.ts)) / 1000;
    expect(progress.length).toBeLessThanOrEqual(Math.ceil(seconds * 5) + 4);
    expect(events.filter((e) => e.event === "flash.result")).toEqual([expect.objectContaining({ data: expect.objectContaining({ ok: true }) })]);

    // The console: the check, a note once pre-flight passed and Klipper is about to stop, and the result line
    // (kept while Klipper was down) once it is back; no "done" and no job id.
    const resultLine = new RegExp(`^// moonflash: flash mcu: flashed with katapult in \\d+\\.\\d s \\(${image.length} bytes, verified\\)\\. Klipper is running again\\.$`);
    await moonraker.waitFor(() => moonraker.consoleLines.some((l) => resultLine.test(l)), 5000);
    const ours = moonraker.consoleLines.filter((l) => l.includes("moonflash"));
    expect(ours.slice(0, 2)).toEqual([
      "// moonflash: flash mcu: checking the board and the firmware",
      // With the hint to the status page when this agent's page got its port (test/agent/status-page.test.ts).
      expect.stringMatching(/^\/\/ moonflash: flash mcu: stopping Klipper to flash the board\. The result appears here when Klipper is back\.( Watch it live at http:\S+ \(also on the Webcam page as 'moonflash'\)\.)?$/),
    ]);
    expect(ours.at(-1)).toMatch(resultLine);
    expect(ours.filter((l) => / done$|flash-\d{8}T/.test(l))).toEqual([]);
    expect(board.model.flash.subarray(0, image.length).equals(image)).toBe(true);
    expect(moonraker.serviceActions.map((a) => `${a.action} ${a.service}`)).toEqual(["stop klipper", "start klipper"]);
    const history = JSON.parse(await readFile(join(dir, "moonflash", "history.json"), "utf8"));
    expect(JSON.stringify(history)).toContain('"ok":true');
    await web.close();
  });
});
