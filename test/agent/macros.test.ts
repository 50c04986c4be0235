// The shipped Klipper macros (moonraker/moonflash.cfg) end to end: Klipper's macro path renders them with real
// Jinja2 and Klipper's action_call_remote_method(method, **kwargs) (klippy/extras/gcode_macro.py), the fake Moonraker
// forwards the call, and a real agent answers on the console. Issue 7, items 9 and 10.

import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { mkdtemp, mkdir, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { randomBytes } from "node:crypto";
import { Writable } from "node:stream";
import pino from "pino";
import type { Agent } from "../../src/agent/agent.js";
import { createAgent } from "../../src/app.js";
import { JobRunner } from "../../src/core/jobs.js";
import { buildMethodTable } from "../../src/agent/methods.js";
import type { FlashEngine } from "../../src/flash/engine.js";
import { startFakeMoonraker, type FakeMoonraker, type FakeMoonrakerOptions, RpcCallError } from "../support/fake-moonraker/index.js";
import { startVirtualDevice, type VirtualDevice } from "../../src/sim/virtual-device.js";
import { FirmwareStore } from "../../src/flash/firmware-store.js";

const MACRO_FILE = resolve(import.meta.dirname, "../../moonraker/moonflash.cfg");

let dir: string;
let moonraker: FakeMoonraker;
let agent: Agent | null = null;
let board: VirtualDevice | null = null;
/** The agent's log records, to see each remote call as it arrived. */
let logRecords: Array<Record<string, unknown>> = [];

async function startPrinter(klipper: FakeMoonrakerOptions["klipper"] = {}): Promise<FakeMoonraker> {
  return startFakeMoonraker({
    dataDir: dir,
    klipper: {
      mcus: [
        { section: "mcu", settings: { serial: join(dir, "main-board") } },
        { section: "mcu toolhead", settings: { serial: "/dev/serial/by-id/usb-Klipper_rp2040_toolhead-if00" } },
      ],
      macroFile: MACRO_FILE,
      ...klipper,
    },
  });
}

async function startAgent(): Promise<Agent> {
  const sink = new Writable({
    write(chunk: Buffer, _encoding, done) {
      for (const line of chunk.toString().split("\n").filter(Boolean)) logRecords.push(JSON.parse(line) as Record<string, unknown>);
      done();
    },
  });
  agent = await createAgent({ dataDir: dir, logger: pino({ level: "info" }, sink) });
  agent.start();
  await moonraker.waitFor(() => moonraker.remoteMethods().includes("flash.cancel") && agent!.session.identified, 10_000);
  return agent;
}

function remoteCalls(): Array<{ method: unknown; params: unknown; viaMacro: unknown }> {
  return logRecords.filter((r) => r.msg === "remote call").map((r) => ({ method: r.method, params: r.params, viaMacro: r.viaMacro }));
}

/** Runs a macro as a Mainsail user would (printer.gcode.script) and waits for the console line that answers it. */
async function macro(script: string, answer: RegExp | string): Promise<string> {
  const web = await moonraker.connectClient({ transport: "ws" });
  try {
    const before = moonraker.consoleLines.length;
    await web.call("printer.gcode.script", { script });
    const matches = (l: string): boolean => (typeof answer === "string" ? l === answer : answer.test(l));
    await moonraker.waitFor(() => moonraker.consoleLines.slice(before).some(matches), 10_000).catch((err: unknown) => {
      throw new Error(`${script}: no console line ${String(answer)}; it showed: ${JSON.stringify(moonraker.consoleLines.slice(before))}`, { cause: err });
    });
    return moonraker.consoleLines.slice(before).find(matches)!;
  } finally {
    await web.close();
  }
}

/** PARAM= names a macro's description documents, e.g. "FLASH_MCU MCU=<name> [METHOD=…]" → MCU, METHOD. */
function documentedParams(description: string): string[] {
  return [...description.matchAll(/\b([A-Z][A-Z_]*)=/g)].map((m) => m[1]!);
}

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), "moonflash-macros-"));
  logRecords = [];
  await mkdir(join(dir, "config"), { recursive: true });
  await writeFile(join(dir, "fw.bin"), randomBytes(8 * 1024));
  // [mcu emu] is moonflash.conf's own board; Klipper's config lists mcu and toolhead.
  await writeFile(join(dir, "config", "moonflash.conf"), `[mcu emu]\nserial: ${join(dir, "emu")}\nbootloader: none\n`);
  board = await startVirtualDevice({ path: join(dir, "emu") });
  moonraker = await startPrinter();
});

afterEach(async () => {
  await agent?.stop();
  agent = null;
  await board?.stop();
  board = null;
  await moonraker.stop();
  await rm(dir, { recursive: true, force: true });
});

describe("the shipped macros through Klipper's macro path", () => {
  it("each description says what the macro does and names its parameters", () => {
    const macros = moonraker.klipper.macros;
    expect([...macros.keys()].sort()).toEqual([
      "FLASH_CANCEL", "FLASH_CHECK", "FLASH_DEVICES", "FLASH_MCU", "FLASH_ROLLBACK", "FLASH_STATUS",
      "OTA_CANCEL", "OTA_DOWNLOAD", "OTA_INSTALL", "OTA_ROLLBACK", "OTA_STATUS", "UPDATE_MCUS",
    ]);
    for (const m of macros.values()) expect(m.description).toMatch(/^moonflash: \w.{20,}/);
    expect(macros.get("FLASH_MCU")!.description).toContain("FLASH_MCU MCU=<name> [METHOD=katapult|flashtool|make|wchisp|linux] [FIRMWARE=/path] [DRY_RUN=1]");
    expect(documentedParams(macros.get("FLASH_MCU")!.description)).toEqual(["MCU", "METHOD", "FIRMWARE", "DRY_RUN"]);
    expect(macros.get("FLASH_ROLLBACK")!.description).toContain("FLASH_ROLLBACK MCU=<name> [DRY_RUN=1]");
    expect(documentedParams(macros.get("FLASH_ROLLBACK")!.description)).toEqual(["MCU", "DRY_RUN"]);
    expect(documentedParams(macros.get("UPDATE_MCUS")!.description)).toEqual(["MCU", "FORCE", "DRY_RUN"]);
    for (const name of ["FLASH_STATUS", "FLASH_DEVICES", "FLASH_CANCEL", "FLASH_CHECK"]) {
      expect(documentedParams(macros.get(name)!.description)).toEqual([]);
    }
  });

  it("every macro, with every parameter it documents, reaches the agent with the right params and answers on the console", async () => {
    await startAgent();
    const fw = join(dir, "fw.bin");
    // Two images flashed to emu before, so FLASH_ROLLBACK has one to go back to.
    const store = new FirmwareStore(join(dir, "moonflash", "firmware"));
    const older = randomBytes(4096);
    await store.add("mcu emu", older, { source: "flash", sourcePath: "/home/pi/older.bin" });
    await store.add("mcu emu", randomBytes(4096), { source: "flash", sourcePath: "/home/pi/newer.bin" });
    const olderFile = (await store.previous("mcu emu"))!.file;
    const cases = [
      { script: "FLASH_STATUS", method: "flash.status", params: {}, answer: "// moonflash: no flash job has run yet" },
      { script: "FLASH_DEVICES", method: "flash.devices", params: {}, answer: /^\/\/ moonflash: \d+ serial device\(s\)/ },
      {
        script: `FLASH_MCU MCU=emu METHOD=katapult FIRMWARE=${fw} DRY_RUN=1`,
        method: "flash.mcu",
        params: { mcu: "emu", flash_method: "katapult", firmware: fw, dry_run: "1" },
        answer: `// moonflash: flash emu: dry run, nothing was stopped or written. It would flash ${fw} (8192 bytes) to ${join(dir, "emu")} with katapult.`,
      },
      {
        script: "FLASH_CANCEL",
        method: "flash.cancel",
        params: {},
        answer: "!! moonflash: FLASH_CANCEL failed [NO_JOB] No flash job is running, so there is nothing to cancel.",
      },
      {
        script: "FLASH_CHECK",
        method: "flash.check",
        params: {},
        answer: "// moonflash: Klipper v0.13.0-730-g84104bbbd. Outdated: none. Up to date: mcu, toolhead. Unknown: emu.",
      },
      {
        script: "UPDATE_MCUS MCU=emu FORCE=1 DRY_RUN=1",
        method: "flash.update_all",
        params: { mcus: "emu", force: "1", dry_run: "1" },
        answer: "// moonflash: update plan to v0.13.0-730-g84104bbbd: build all while Klipper runs, stop Klipper once, flash emu (forced, uart), start Klipper. Dry run: nothing was built, stopped or written.",
      },
      {
        script: "FLASH_ROLLBACK MCU=emu DRY_RUN=1",
        method: "flash.rollback",
        params: { mcu: "emu", dry_run: "1" },
        answer: new RegExp(`^// moonflash: flash emu: dry run, nothing was stopped or written\\. It would flash ${olderFile} \\(4096 bytes\\) to ${join(dir, "emu")} with katapult`),
      },
    ];
    // The table covers every shipped flash macro and every parameter its description documents (the OTA_ macros:
    // test/agent/ota-macros.test.ts).
    const flashMacros = [...moonraker.klipper.macros].filter(([name]) => !name.startsWith("OTA_"));
    expect(cases.map((c) => c.script.split(" ")[0]).sort()).toEqual(flashMacros.map(([name]) => name).sort());
    for (const [name, m] of flashMacros) {
      const typed = cases.find((c) => c.script.split(" ")[0] === name)!.script;
      for (const param of documentedParams(m.description)) expect(typed).toContain(` ${param}=`);
    }

    for (const c of cases) {
      await macro(c.script, c.answer);
      expect(remoteCalls().at(-1)).toEqual({ method: c.method, params: c.params, viaMacro: true });
    }
    expect(remoteCalls()).toHaveLength(cases.length);
    expect(moonraker.consoleLines.filter((l) => l.includes("Error evaluating"))).toEqual([]);
    expect(moonraker.serviceActions).toEqual([]);

    // The status line names the MCU as typed and the outcome, never the job id.
    await macro("FLASH_STATUS", /^\/\/ moonflash: idle\. Last flash of emu \(dry run\): ok \(\d+ s ago\)\.$/);
    await macro(`FLASH_MCU MCU=emu FIRMWARE=${join(dir, "missing.bin")} DRY_RUN=1`, /^!! moonflash: flash emu failed \[FIRMWARE_NOT_FOUND\]/);
    await macro("FLASH_STATUS", /^\/\/ moonflash: idle\. Last flash of emu \(dry run\): failed \[FIRMWARE_NOT_FOUND\] .+ \(\d+ s ago\)\.$/);
    expect(moonraker.consoleLines.filter((l) => /flash-\d{8}T/.test(l))).toEqual([]);
    expect(board!.model.frames).toEqual([]);
  });

  it("FLASH_MCU without MCU= (a click on its button) names the known MCUs and stops and flashes nothing", async () => {
    const a = await startAgent();
    const refusal = "!! moonflash: FLASH_MCU failed [INVALID_PARAMS] FLASH_MCU needs MCU=<name>. Known MCUs: mcu, emu, toolhead (e.g. FLASH_MCU MCU=emu)";
    await macro("FLASH_MCU", refusal);
    await macro("FLASH_MCU METHOD=katapult", refusal);
    expect(remoteCalls()).toEqual([
      { method: "flash.mcu", params: {}, viaMacro: true },
      { method: "flash.mcu", params: { flash_method: "katapult" }, viaMacro: true },
    ]);
    // A mistyped parameter is refused too: DRYRUN=1 must not become a real flash.
    await macro("FLASH_MCU MCU=emu DRYRUN=1", "!! moonflash: FLASH_MCU failed [INVALID_PARAMS] FLASH_MCU: unknown parameter(s) 'DRYRUN' (did you mean 'DRY_RUN'?)");

    // A client gets the same refusal.
    const web = await moonraker.connectClient({ transport: "ws" });
    const err = await web.call("server.extensions.request", { agent: "moonflash", method: "flash.mcu", arguments: { dry_run: true } }).then(
      () => null,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(RpcCallError);
    expect((err as RpcCallError).data).toMatchObject({
      code: -32602,
      message: "FLASH_MCU needs MCU=<name>. Known MCUs: mcu, emu, toolhead (e.g. FLASH_MCU MCU=emu)",
      data: { code: "INVALID_PARAMS", details: { known: ["mcu", "emu", "toolhead"] } },
    });
    await web.close();

    expect(moonraker.serviceActions).toEqual([]);
    expect(a.runner.history()).toEqual([]);
    expect(board!.model.frames).toEqual([]);
    expect(moonraker.consoleLines.filter((l) => l.includes("Error evaluating"))).toEqual([]);
  });

  it("UPDATE_MCUS DRY_RUN=1 opens a dialog with the plan; its Start button sends UPDATE_MCUS for exactly that plan and the dialog closes", async () => {
    await startAgent();
    const before = moonraker.consoleLines.length;
    await macro("UPDATE_MCUS MCU=emu FORCE=1 DRY_RUN=1", "// action:prompt_show");
    const dialog = moonraker.consoleLines.slice(before).filter((l) => l.startsWith("// action:prompt_"));
    expect(dialog).toEqual([
      "// action:prompt_begin moonflash: update 1 MCU",
      "// action:prompt_text To v0.13.0-730-g84104bbbd: the firmware is built first, while Klipper runs. Then Klipper stops once and the boards are flashed in this order:",
      // No image of emu is kept yet, so update-all reads it back first (backup_before_flash).
      expect.stringMatching(/^\/\/ action:prompt_text 1\. emu: forced, uart, its current firmware read back first ≈ \d+\.\d s more downtime$/),
      "// action:prompt_text Then Klipper starts again and each board's version is checked. Nothing happens until you press Start.",
      "// action:prompt_footer_button Start|UPDATE_MCUS MCU=emu FORCE=1|primary",
      "// action:prompt_footer_button Cancel|RESPOND TYPE=command MSG=action:prompt_end|error",
      "// action:prompt_show",
    ]);
    // The plan line came first, and nothing was stopped.
    expect(moonraker.consoleLines.slice(before).findIndex((l) => l.startsWith("// moonflash: update plan"))).toBeLessThan(
      moonraker.consoleLines.slice(before).indexOf(dialog[0]!),
    );
    expect(moonraker.serviceActions).toEqual([]);

    // Cancel is Klipper's own RESPOND: it closes the dialog without reaching moonflash.
    const calls = remoteCalls().length;
    await macro("RESPOND TYPE=command MSG=action:prompt_end", "// action:prompt_end");
    expect(remoteCalls()).toHaveLength(calls);

    // Start: the button's G-code as Mainsail sends it. The dialog is closed before the update runs.
    const start = dialog.find((l) => l.includes("|UPDATE_MCUS"))!.split("|")[1]!;
    const atStart = moonraker.consoleLines.length;
    await macro(start, /^(\/\/|!!) moonflash: (updated|flash all MCUs)/);
    expect(remoteCalls().at(-1)).toEqual({ method: "flash.update_all", params: { mcus: "emu", force: "1" }, viaMacro: true });
    const after = moonraker.consoleLines.slice(atStart);
    expect(after.indexOf("// action:prompt_end")).toBeGreaterThanOrEqual(0);
    expect(after.indexOf("// action:prompt_end")).toBeLessThan(after.findIndex((l) => /moonflash: (updated|flash all MCUs)/.test(l)));
    // Closed once: a later macro sends no second prompt_end.
    await macro("FLASH_STATUS", /^\/\/ moonflash: /);
    expect(moonraker.consoleLines.slice(atStart).filter((l) => l === "// action:prompt_end")).toHaveLength(1);
  });

  it("a dry run with nothing to update opens no dialog, and a client's dry run never does", async () => {
    await startAgent();
    const before = moonraker.consoleLines.length;
    await macro("UPDATE_MCUS DRY_RUN=1", /^\/\/ moonflash: every MCU runs v0\.13\.0-730-g84104bbbd: nothing to update\.$/);
    const web = await moonraker.connectClient({ transport: "ws" });
    const result = (await web.call("server.extensions.request", { agent: "moonflash", method: "flash.update_all", arguments: { mcus: "emu", force: true, dry_run: true } })) as { plan: unknown[] };
    await web.close();
    expect(result.plan).toHaveLength(1);
    await macro("FLASH_STATUS", /^\/\/ moonflash: /);
    expect(moonraker.consoleLines.slice(before).filter((l) => l.startsWith("// action:prompt_"))).toEqual([]);
  });

  it("regression: a macro passing method= gets Klipper's TypeError on the console and never reaches the agent", async () => {
    // The macro as shipped before issue 7, and the simple macro table's form of the same call.
    await moonraker.stop();
    const oldCfg = join(dir, "old-moonflash.cfg");
    await writeFile(oldCfg, [
      "[gcode_macro FLASH_MCU]",
      "gcode:",
      "  {% set mcu = params.MCU|default(\"mcu\") %}",
      "  {action_call_remote_method(\"flash.mcu\", mcu=mcu, method=params.METHOD|lower, dry_run=1)}",
      "",
    ].join("\n"));
    moonraker = await startPrinter({ macroFile: oldCfg, macros: { OLD_FLASH: { method: "flash.mcu", params: { mcu: "emu", method: "katapult" } } } });
    await startAgent();
    const web = await moonraker.connectClient({ transport: "ws" });
    const typeError = "TypeError: PrinterGCodeMacro._action_call_remote_method() got multiple values for argument 'method'";
    for (const [script, macroName] of [["FLASH_MCU MCU=emu METHOD=katapult", "FLASH_MCU"], ["OLD_FLASH", "OLD_FLASH"]] as const) {
      const failed = await web.call("printer.gcode.script", { script }).then(() => null, (e: unknown) => e);
      expect(failed).toMatchObject({ code: 400 });
      expect(moonraker.consoleLines.at(-1)).toBe(`!! Error evaluating 'gcode_macro ${macroName}:gcode': ${typeError}`);
    }
    await web.close();
    expect(remoteCalls()).toEqual([]);
    expect(moonraker.serviceActions).toEqual([]);
  });
});

describe("console lines of flash.status and flash.cancel", () => {
  it("name the MCU and the stage of a running flash, never its job id", async () => {
    const runner = new JobRunner({ dataDir: dir, logger: pino({ level: "silent" }) });
    // flash.cancel's handler calls FlashEngine.cancel, which is runner.cancel("flash").
    const engine = { cancel: () => runner.cancel("flash") } as unknown as FlashEngine;
    const methods = new Map(buildMethodTable({ runner, flash: () => engine, info: () => ({}) }).map((m) => [m.name, m]));
    const say = async (name: string): Promise<string> => {
      const m = methods.get(name)!;
      return m.summary!((await m.handler({} as never)) as never);
    };

    let started!: () => void;
    const running = new Promise<void>((r) => (started = r));
    const job = runner.run({ kind: "flash", target: "mcu toolhead", params: { mcu: "toolhead" } }, async (ctx) => {
      ctx.stage("katapult");
      ctx.progress(512, 2048, "bytes", "write");
      started();
      await new Promise((_resolve, reject) => ctx.signal.addEventListener("abort", () => reject(ctx.signal.reason)));
    });
    await running;
    expect(await say("flash.status")).toBe("moonflash: flash of toolhead running: katapult 25%");
    expect(await say("flash.cancel")).toBe("moonflash: cancelling the flash of toolhead");
    await expect(job).rejects.toMatchObject({ code: "CANCELLED" });
    // The line adds no id of its own; the error's message is shown as the runner recorded it.
    const last = runner.history("flash", 1)[0]!;
    const status = await say("flash.status");
    expect(status).toMatch(/^moonflash: idle\. Last flash of toolhead: failed \[CANCELLED\] .+ \(\d+ s ago\)\.$/);
    expect(status.replace(last.message!, "")).not.toContain(last.id);
  });
});
