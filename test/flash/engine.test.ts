// The flash engine end to end: the real AgentSession against the fake Moonraker, the virtual Katapult board on a
// real pty, a fake Klipper tree for `make flash`, real files in temp dirs. Pre-flight and plan: engine-preflight.test.ts.

import { readFile, writeFile } from "node:fs/promises";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { isMoonflashError, type MoonflashError } from "../../src/core/errors.js";
import type { FlashDryRunResult } from "../../src/flash/engine.js";
import { expectKlipperUntouched, flashOk, mcuSection, setUp, tearDown } from "../fixtures/engine/bench.js";
import { journalPath, waitUntil } from "../fixtures/engine/rig.js";

afterEach(tearDown);

describe("FlashEngine.flash", () => {
  it("flashes and verifies with Klipper stopped, keeps the image, then starts Klipper again", async () => {
    const b = await setUp();
    const engine = b.engine(mcuSection(b));
    const during: Array<{ stage: string; journal: boolean; klipperActive: boolean; actions: string[] }> = [];
    b.rig.runner.on((e) => {
      if (e.type === "stage" && e.stage === "katapult") {
        during.push({ stage: e.stage, journal: existsSync(journalPath(b.rig.dataDir)), klipperActive: b.rig.fake.klipper.serviceActive, actions: b.actions() });
      }
    });

    const result = await flashOk(engine, { mcu: "mcu" });

    expect(result).toMatchObject({ mcu: "mcu", method: "katapult", bytes: 5000, verified: true, klipper_restarted: true });
    expect(result.attempts).toEqual([{ method: "katapult", ok: true, elapsed_ms: expect.any(Number) }]);
    expect(b.device.model.flash.subarray(0, b.image.length).equals(b.image)).toBe(true);
    expect(b.device.model.completed).toBe(true);
    // While the work ran: journal on disk, Klipper stopped. Afterwards: started again, journal gone.
    expect(during).toEqual([{ stage: "katapult", journal: true, klipperActive: false, actions: ["stop klipper"] }]);
    expect(b.actions()).toEqual(["stop klipper", "start klipper"]);
    expect(existsSync(journalPath(b.rig.dataDir))).toBe(false);
    await waitUntil(() => b.rig.session.state().klippyState === "ready", "Klipper ready after the flash");

    // The firmware store's newest entry: what the board holds now (firmware-store.test.ts, rollback.test.ts).
    const [kept, ...older] = await engine.store.list("mcu");
    expect(older).toEqual([]);
    expect(kept).toMatchObject({ size: 5000, source: "flash", source_path: b.firmware, sha256: expect.stringMatching(/^[0-9a-f]{64}$/) });
    expect((await readFile(kept!.file)).equals(b.image)).toBe(true);
    expect(b.rig.runner.history("flash", 1)[0]).toMatchObject({ target: "mcu", ok: true });
    const stages = b.events.flatMap((e) => (e.type === "stage" ? [e.stage] : []));
    expect(stages.filter((s) => ["plan", "keep-image", "stop-klipper", "katapult", "start-klipper"].includes(s))).toEqual([
      "plan",
      "keep-image",
      "stop-klipper",
      "katapult",
      "start-klipper",
    ]);
  });

  it("reads and checks the image once per job: a file replaced after the check changes nothing that is flashed", async () => {
    const b = await setUp();
    const engine = b.engine(mcuSection(b));
    // Rebuilt (or truncated) while the job runs: after pre-flight, before Klipper stops and the board is written.
    b.rig.runner.on((e) => {
      if (e.type === "stage" && e.stage === "keep-image") void writeFile(b.firmware, Buffer.alloc(0));
    });
    const result = await flashOk(engine, { mcu: "mcu" });
    expect(result).toMatchObject({ bytes: b.image.length, verified: true });
    expect(b.device.model.flash.subarray(0, b.image.length).equals(b.image)).toBe(true);
    expect((await readFile((await engine.store.current("mcu"))!.file)).equals(b.image)).toBe(true);
    expect((await readFile(b.firmware)).length).toBe(0);
  });

  it("falls back to make flash when Katapult fails, reporting Katapult's failure before make starts", async () => {
    const b = await setUp({ faults: [{ kind: "silence" }] });
    const engine = b.engine(mcuSection(b));

    const result = await flashOk(engine, { mcu: "mcu" });

    expect(result.method).toBe("make");
    expect(result.attempts.map((a) => [a.method, a.ok, a.code])).toEqual([
      ["katapult", false, "DEVICE_TIMEOUT"],
      ["make", true, undefined],
    ]);
    const args = await readFile(join(b.klipperPath, "flash-args.txt"), "utf8");
    expect(args).toBe(`FLASH_DEVICE=${b.device.path}\nKCONFIG_CONFIG=${b.kconfig}\n`);
    const warn = b.events.findIndex((e) => e.type === "log" && e.level === "warn" && /^katapult failed: .+; trying make$/.test(e.message));
    const makeStage = b.events.findIndex((e) => e.type === "stage" && e.stage === "make");
    expect(warn).toBeGreaterThanOrEqual(0);
    expect(warn).toBeLessThan(makeStage);
    expect(b.actions()).toEqual(["stop klipper", "start klipper"]);
  });

  it("throws the last method's error with every attempt when all fail, and starts Klipper again", async () => {
    const b = await setUp({ faults: [{ kind: "silence" }] });
    await writeFile(join(b.klipperPath, "make-should-fail"), "");
    const engine = b.engine(mcuSection(b));

    const err = await engine.flash({ mcu: "mcu" }).catch((e: unknown) => e);

    expect(isMoonflashError(err) && err.code).toBe("FLASH_FAILED");
    const attempts = (err as MoonflashError).details.attempts as Array<{ method: string; ok: boolean; code: string }>;
    expect(attempts.map((a) => [a.method, a.ok, a.code])).toEqual([
      ["katapult", false, "DEVICE_TIMEOUT"],
      ["make", false, "FLASH_FAILED"],
    ]);
    expect((err as MoonflashError).details.klipperRestart).toEqual({ ok: true });
    expect(b.actions()).toEqual(["stop klipper", "start klipper"]);
    expect(existsSync(journalPath(b.rig.dataDir))).toBe(false);
    await waitUntil(() => b.rig.session.state().klippyState === "ready", "Klipper ready after the failed flash");
    expect(b.rig.runner.history("flash", 1)[0]).toMatchObject({ ok: false, code: "FLASH_FAILED" });
  });

  it("does not fall back after MCU_MISMATCH: the image is for another board", async () => {
    const b = await setUp();
    const engine = b.engine(mcuSection(b, "mcu_type: rp2040\n"));
    const err = await engine.flash({ mcu: "mcu" }).catch((e: unknown) => e);
    expect(isMoonflashError(err) && err.code).toBe("MCU_MISMATCH");
    expect(((err as MoonflashError).details.attempts as unknown[]).length).toBe(1);
    expect(existsSync(join(b.klipperPath, "flash-args.txt"))).toBe(false);
    expect(b.actions()).toEqual(["stop klipper", "start klipper"]);
  });

  it("does not fall back after FIRMWARE_TOO_LARGE found once Katapult answers: another method would write it as truncated", async () => {
    const b = await setUp();
    // 12 KiB of flash less the 8 KiB bootloader (application at 0x8002000) leaves 4 KiB for the 5000-byte image;
    // pre-flight cannot know the bootloader's share and lets it through.
    const engine = b.engine(mcuSection(b, "flash_size: 12K\n"));
    const err = await engine.flash({ mcu: "mcu" }).catch((e: unknown) => e);
    expect(isMoonflashError(err) && err.code).toBe("FIRMWARE_TOO_LARGE");
    expect((err as MoonflashError).details).toMatchObject({ available: 4096, imageBytes: 5000 });
    const attempts = (err as MoonflashError).details.attempts as Array<{ method: string; code: string }>;
    expect(attempts.map((a) => [a.method, a.code])).toEqual([["katapult", "FIRMWARE_TOO_LARGE"]]);
    expect(existsSync(join(b.klipperPath, "flash-args.txt"))).toBe(false);
    expect(b.device.model.frames.map((f) => f.name)).not.toContain("SEND_BLOCK");
    expect(b.actions()).toEqual(["stop klipper", "start klipper"]);
  });

  it("a Katapult write that fails mid-way leaves the board in Katapult (no COMPLETE) and make flash takes over", async () => {
    // quickKatapult tries a block twice: SEND_BLOCK frames 2 and 3 are block 1 and its retry.
    const b = await setUp({ faults: [{ kind: "error", command: "SEND_BLOCK", n: 2 }, { kind: "error", command: "SEND_BLOCK", n: 3 }] });
    const result = await flashOk(b.engine(mcuSection(b)), { mcu: "mcu" });
    expect(result.method).toBe("make");
    expect(result.attempts.map((a) => [a.method, a.ok, a.code])).toEqual([
      ["katapult", false, "FLASH_FAILED"],
      ["make", true, undefined],
    ]);
    expect(result.attempts[0]!.message).toContain("COMPLETE was not sent, so the board stays in Katapult");
    expect(b.device.model.frames.map((f) => f.name)).not.toContain("COMPLETE");
    expect(b.device.model.completed).toBe(false);
    expect(b.actions()).toEqual(["stop klipper", "start klipper"]);
  });

  it.each(["printing", "paused"])("refuses with PRINTER_BUSY while print_stats is %s and stops nothing", async (printState) => {
    const b = await setUp({ printState });
    await waitUntil(() => b.rig.session.isPrinting(), "the session to see the print");
    const err = await b.engine(mcuSection(b)).flash({ mcu: "mcu" }).catch((e: unknown) => e);
    expect(isMoonflashError(err) && err.code).toBe("PRINTER_BUSY");
    expect(b.actions()).toEqual([]);
    expect(existsSync(journalPath(b.rig.dataDir))).toBe(false);
    expect(existsSync(join(b.rig.dataDir, "moonflash", "firmware"))).toBe(false);
    expect(b.device.model.frames).toEqual([]);
  });

  it("cancel before writing starts: no method runs, Klipper is started again", async () => {
    const b = await setUp({ stopOkMs: 400 });
    const engine = b.engine(mcuSection(b));
    const flashing = engine.flash({ mcu: "mcu" });
    await waitUntil(() => b.actions().length === 1, "the job to ask Moonraker to stop Klipper");
    expect(engine.cancel().id).toMatch(/^flash-/);
    const err = await flashing.catch((e: unknown) => e);
    expect(isMoonflashError(err) && err.code).toBe("CANCELLED");
    expect(b.device.model.frames).toEqual([]);
    expect(b.actions()).toEqual(["stop klipper", "start klipper"]);
    expect(existsSync(journalPath(b.rig.dataDir))).toBe(false);
  });

  it("cancel while writing is refused with the flasher's reason, and the flash completes", async () => {
    const b = await setUp({ writeDelayMs: 15 });
    const engine = b.engine(mcuSection(b));
    const flashing = flashOk(engine, { mcu: "mcu" });
    const firstBlock = new Promise<void>((resolve) => b.device.once("block", () => resolve()));
    await firstBlock;
    let refusal: unknown;
    try {
      engine.cancel();
    } catch (err) {
      refusal = err;
    }
    expect(isMoonflashError(refusal) && refusal.code).toBe("CANCEL_REFUSED");
    expect((refusal as Error).message).toContain("writing flash");
    const result = await flashing;
    expect(result).toMatchObject({ method: "katapult", verified: true, klipper_restarted: true });
  });

  it("dry_run returns the plan and stops nothing", async () => {
    const b = await setUp();
    const result = (await b.engine(mcuSection(b)).flash({ mcu: "mcu", dry_run: true })) as FlashDryRunResult;
    expect(result).toMatchObject({ dry_run: true, mcu: "mcu", device: b.device.path, firmware: b.firmware, methods: ["katapult", "make"] });
    expect(result.plan).toMatchObject({ firmware_bytes: 5000, expected_mcu_type: "stm32f103xe", device_real_path: expect.stringMatching(/^\/dev\/pts\/\d+$/) });
    await expectKlipperUntouched(b);
    expect(existsSync(join(b.rig.dataDir, "moonflash", "firmware"))).toBe(false);
    expect(b.device.model.frames).toEqual([]);
  });
});

describe("FlashEngine.flashPrepared", () => {
  it("records the image with the source it is given (the OTA pipeline's 'ota'), else as a flash of plan.firmware", async () => {
    const b = await setUp();
    const engine = b.engine(mcuSection(b));
    const flashOnce = (opts: Parameters<typeof engine.flashPrepared>[3]) =>
      b.rig.runner.run({ kind: "flash", target: "mcu" }, async (ctx) => {
        const { plan, image } = await engine.prepare({ mcu: "mcu", firmware: b.firmware }, ctx);
        return engine.flashPrepared(plan, image, ctx, opts);
      });
    await flashOnce({ record: { source: "ota", sourcePath: null } });
    expect((await engine.store.list("mcu")).map((e) => [e.source, e.source_path])).toEqual([["ota", null]]);
    expect(b.device.model.flash.subarray(0, b.image.length).equals(b.image)).toBe(true);
    await writeFile(b.firmware, Buffer.concat([b.image, Buffer.from("v2")]));
    await flashOnce({});
    expect((await engine.store.list("mcu")).map((e) => [e.source, e.source_path])).toEqual([["flash", b.firmware], ["ota", null]]);
  });
});
