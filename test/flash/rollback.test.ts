// Rollback end to end: the real engine and AgentSession against the fake Moonraker, the virtual Katapult board on a
// real pty. Flash A, flash B, roll back: the board holds A again, through the same job, guard and method as a flash.

import { randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { deflateSync } from "node:zlib";
import { afterEach, describe, expect, it } from "vitest";
import { isMoonflashError, type MoonflashError } from "../../src/core/errors.js";
import type { FlashDryRunResult, FlashResult, RollbackResult } from "../../src/flash/engine.js";
import { sha256Of } from "../../src/flash/firmware-store.js";
import { expectKlipperUntouched, flashOk, mcuSection, setUp, tearDown, type Bench } from "../fixtures/engine/bench.js";
import { waitUntil } from "../fixtures/engine/rig.js";

afterEach(tearDown);

/** A Klipper image for the bench's board (stm32f103xe), its version in the embedded data dictionary. */
function klipperImage(version: string, size: number): Buffer {
  const dict = deflateSync(JSON.stringify({ version, config: { MCU: "stm32f103xe" } }));
  return Buffer.concat([randomBytes(size - dict.length - 300), dict, randomBytes(300)]);
}

async function twoFlashes(b: Bench) {
  const a = klipperImage("v0.12.0-85-gd785b396", 6000);
  const bImage = klipperImage("v0.13.0-730-g84104bbbd", 4500);
  const fileA = join(b.dir, "a.bin");
  const fileB = join(b.dir, "b.bin");
  await writeFile(fileA, a);
  await writeFile(fileB, bImage);
  const engine = b.engine(mcuSection(b));
  await flashOk(engine, { mcu: "mcu", firmware: fileA });
  await waitUntil(() => b.rig.session.state().klippyState === "ready", "Klipper ready after flashing A");
  await flashOk(engine, { mcu: "mcu", firmware: fileB });
  await waitUntil(() => b.rig.session.state().klippyState === "ready", "Klipper ready after flashing B");
  expect(b.device.model.flash.subarray(0, bImage.length).equals(bImage)).toBe(true);
  return { engine, a, b: bImage, fileA, fileB };
}

describe("FlashEngine.rollback", () => {
  it("flash A, flash B, roll back: the board holds A, through a normal flash job, and the store says so", async () => {
    const b = await setUp();
    const { engine, a, fileA, fileB } = await twoFlashes(b);
    expect((await engine.store.list("mcu")).map((e) => [e.version, e.source, e.source_path])).toEqual([
      ["v0.13.0-730-g84104bbbd", "flash", fileB],
      ["v0.12.0-85-gd785b396", "flash", fileA],
    ]);
    b.events.length = 0;
    const actionsBefore = b.actions().length;

    const result = (await engine.rollback({ mcu: "mcu" })) as RollbackResult & FlashResult;

    expect(result).toMatchObject({ mcu: "mcu", method: "katapult", bytes: a.length, verified: true, klipper_restarted: true });
    expect(result.rollback_to).toEqual({
      version: "v0.12.0-85-gd785b396", sha256: sha256Of(a), size: a.length, date: expect.any(String), source: "flash", source_path: fileA,
    });
    expect(b.device.model.flash.subarray(0, a.length).equals(a)).toBe(true);
    // Klipper stopped and started once more, as for any flash.
    expect(b.actions().slice(actionsBefore)).toEqual(["stop klipper", "start klipper"]);
    const stages = b.events.flatMap((e) => (e.type === "stage" ? [[e.stage, e.message ?? ""]] : []));
    expect(stages.map(([s]) => s).filter((s) => ["rollback", "plan", "keep-image", "stop-klipper", "katapult", "start-klipper"].includes(s!))).toEqual([
      "rollback", "plan", "keep-image", "stop-klipper", "katapult", "start-klipper",
    ]);
    expect(stages.find(([s]) => s === "rollback")![1]).toMatch(new RegExp(`^rolling back to v0\\.12\\.0-85-gd785b396 \\(flashed \\d{4}-\\d\\d-\\d\\d \\d\\d:\\d\\d UTC, from ${fileA}\\)$`));
    // Recorded: A is what the board holds now (moved to the front, nothing pushed out); B is the one before.
    const list = await engine.store.list("mcu");
    expect(list.map((e) => [e.version, e.source, e.source_path])).toEqual([
      ["v0.12.0-85-gd785b396", "rollback", fileA],
      ["v0.13.0-730-g84104bbbd", "flash", fileB],
    ]);
    expect(b.rig.runner.history("flash", 1)[0]).toMatchObject({ target: "mcu", ok: true, params: { mcu: "mcu", rollback: true } });
    // So a second rollback undoes the first.
    expect((await engine.store.previous("mcu"))?.version).toBe("v0.13.0-730-g84104bbbd");
  });

  it("backup_before_flash: True on a single flash: the board's application is read back before the first flash, and a rollback restores it", async () => {
    const b = await setUp();
    const factory = klipperImage("v0.11.0-1-gfactory", 3000);
    factory.copy(b.device.model.flash);
    const fileB = join(b.dir, "b.bin");
    await writeFile(fileB, klipperImage("v0.13.0-730-g84104bbbd", 4500));
    const engine = b.engine(mcuSection(b, "backup_before_flash: True\n"));
    await flashOk(engine, { mcu: "mcu", firmware: fileB });
    await waitUntil(() => b.rig.session.state().klippyState === "ready", "Klipper ready after the flash");
    expect((await engine.store.list("mcu")).map((e) => [e.version, e.source, e.size])).toEqual([
      ["v0.13.0-730-g84104bbbd", "flash", 4500],
      ["v0.11.0-1-gfactory", "read-back", factory.length],
    ]);
    expect(b.events.some((e) => e.type === "stage" && e.stage === "backup")).toBe(true);

    await engine.rollback({ mcu: "mcu" });
    expect(b.device.model.flash.subarray(0, factory.length).equals(factory)).toBe(true);

    // The store keeps images of the board now: the next flash reads nothing back.
    b.events.length = 0;
    await waitUntil(() => b.rig.session.state().klippyState === "ready", "Klipper ready after the rollback");
    await flashOk(engine, { mcu: "mcu", firmware: fileB });
    expect(b.events.some((e) => e.type === "stage" && e.stage === "backup")).toBe(false);
  });

  it("without backup_before_flash a single flash reads nothing back", async () => {
    const b = await setUp();
    klipperImage("v0.11.0-1-gfactory", 3000).copy(b.device.model.flash);
    const engine = b.engine(mcuSection(b));
    await flashOk(engine, { mcu: "mcu" });
    expect((await engine.store.list("mcu")).map((e) => e.source)).toEqual(["flash"]);
    expect(b.events.some((e) => e.type === "stage" && e.stage === "backup")).toBe(false);
  });

  it("a dry run names the image it would flash and touches nothing", async () => {
    const b = await setUp();
    const { engine, a } = await twoFlashes(b);
    const actions = b.actions();
    const frames = b.device.model.frames.length;
    const result = (await engine.rollback({ mcu: "mcu", dry_run: true })) as RollbackResult & FlashDryRunResult;
    expect(result).toMatchObject({
      dry_run: true,
      mcu: "mcu",
      firmware: join(b.rig.dataDir, "moonflash", "firmware", "mcu", `${sha256Of(a)}.bin`),
      rollback_to: { version: "v0.12.0-85-gd785b396", size: a.length },
    });
    expect(b.actions()).toEqual(actions);
    expect(b.device.model.frames).toHaveLength(frames);
    expect((await engine.store.current("mcu"))?.version).toBe("v0.13.0-730-g84104bbbd");
  });

  it("with one image kept: NO_ROLLBACK_IMAGE saying what to do, no job, Klipper untouched", async () => {
    const b = await setUp();
    const engine = b.engine(mcuSection(b));
    const none = await engine.rollback({ mcu: "mcu" }).catch((e: unknown) => e);
    expect(isMoonflashError(none) && none.code).toBe("NO_ROLLBACK_IMAGE");
    expect((none as MoonflashError).message).toBe(
      "There is no earlier image of mcu to roll back to: moonflash keeps the last 3 images it flashed to each MCU and has none yet. " +
        "Nothing was stopped or written. Flash a firmware file instead: FLASH_MCU MCU=mcu FIRMWARE=/path/to/klipper.bin (moonflash flash mcu --firmware FILE).",
    );
    await expectKlipperUntouched(b);

    await flashOk(engine, { mcu: "mcu" });
    await waitUntil(() => b.rig.session.state().klippyState === "ready", "Klipper ready after the flash");
    const actions = b.actions();
    const jobs = b.rig.runner.history().length;
    const one = await engine.rollback({ mcu: "mcu" }).catch((e: unknown) => e);
    expect(isMoonflashError(one) && one.code).toBe("NO_ROLLBACK_IMAGE");
    expect((one as MoonflashError).message).toMatch(/^There is no earlier image of mcu to roll back to: moonflash keeps the last 3 images it flashed to each MCU and has only the one on it now, an image without a Klipper version \(flashed .+, from .+klipper\.bin\)\. Nothing was stopped or written\. Flash a firmware file instead: /);
    expect(b.actions()).toEqual(actions);
    expect(b.rig.runner.history()).toHaveLength(jobs);

    // A typo is UNKNOWN_MCU, not "no image".
    const typo = await engine.rollback({ mcu: "toolhed" }).catch((e: unknown) => e);
    expect(isMoonflashError(typo) && typo.code).toBe("UNKNOWN_MCU");
  });

  it("a stored image that no longer matches its SHA-256 is refused before Klipper stops", async () => {
    const b = await setUp();
    const { engine, b: imageB } = await twoFlashes(b);
    const stored = (await engine.store.previous("mcu"))!.file;
    const damaged = Buffer.from(await readFile(stored));
    damaged[100] = damaged[100]! ^ 0xff;
    await writeFile(stored, damaged);
    const actions = b.actions();
    const err = await engine.rollback({ mcu: "mcu" }).catch((e: unknown) => e);
    expect(isMoonflashError(err) && err.code).toBe("NO_ROLLBACK_IMAGE");
    expect((err as MoonflashError).message).toContain(`The stored image ${stored} no longer matches its SHA-256: it is damaged`);
    expect(b.actions()).toEqual(actions);
    expect(b.device.model.flash.subarray(0, imageB.length).equals(imageB)).toBe(true);
    expect(existsSync(stored)).toBe(true);
  });
});
