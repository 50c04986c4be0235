// The flash engine end to end: the real AgentSession against the fake Moonraker, the virtual Katapult board on a
// real pty, a fake Klipper tree for `make flash`, real files in temp dirs.

import { cp, mkdir, mkdtemp, readFile, rm, symlink, writeFile } from "node:fs/promises";
import { existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterEach, describe, expect, it } from "vitest";
import { parseConfig } from "../../src/core/config.js";
import { isMoonflashError, type MoonflashError } from "../../src/core/errors.js";
import type { JobEvent } from "../../src/core/events.js";
import { FlashEngine, mcuSectionName, type FlashDryRunResult, type FlashParams, type FlashResult } from "../../src/flash/engine.js";
import { KatapultFlasher } from "../../src/flash/katapult/flasher.js";
import { startVirtualDevice, type VirtualDevice } from "../../src/sim/virtual-device.js";
import type { Fault } from "../../src/sim/katapult-device.js";
import { journalPath, QUICK_TIMING, startRig, waitUntil, type PrinterRig } from "../fixtures/engine/rig.js";

const here = dirname(fileURLToPath(import.meta.url));
const fakeTree = join(here, "..", "fixtures", "engine", "klipper-tree");

/** flashtool's timings shrunk so a board that never answers fails in well under a second. */
const quickKatapult = () =>
  new KatapultFlasher({
    timings: { tries: 2, timeoutMs: 100, blockTries: 2, blockTimeoutMs: 200, drainMs: 10, retryDelayMs: 10, busyDelayMs: 20 },
    autoProbeTimeoutMs: 100,
    serialRequestSettleMs: 50,
  });

interface Bench {
  dir: string;
  klipperPath: string;
  kconfig: string;
  firmware: string;
  image: Buffer;
  device: VirtualDevice;
  rig: PrinterRig;
  events: JobEvent[];
  engine(conf?: string, opts?: { flashers?: ConstructorParameters<typeof FlashEngine>[0]["flashers"] }): FlashEngine;
  actions(): string[];
}

let bench: Bench | undefined;
afterEach(async () => {
  if (!bench) return;
  await bench.rig.close();
  await bench.device.stop();
  await rm(bench.dir, { recursive: true, force: true });
  bench = undefined;
});

/** An image with no zlib header in it, so the Katapult flasher finds no embedded MCU type to compare. */
function testImage(size: number): Buffer {
  return Buffer.from(Array.from({ length: size }, (_, i) => i % 251));
}

/** `klipperSerial` makes Klipper's own [mcu] serial something else than the virtual board (given the bench dir). */
async function setUp(
  opts: { faults?: Fault[]; printState?: string; klipperSerial?: (dir: string) => Promise<string>; writeDelayMs?: number; stopOkMs?: number } = {},
): Promise<Bench> {
  const dir = await mkdtemp(join(tmpdir(), "moonflash-bench-"));
  const klipperPath = join(dir, "klipper");
  await cp(fakeTree, klipperPath, { recursive: true });
  const kconfig = join(dir, "config.mcu");
  await writeFile(kconfig, "CONFIG_MACH_STM32=y\n");
  const image = testImage(5000);
  const firmware = join(dir, "klipper.bin");
  await writeFile(firmware, image);
  const device = await startVirtualDevice({
    path: join(dir, "ttyVIRT0"),
    mcuType: "stm32f103xe",
    faults: opts.faults ?? [],
    ...(opts.writeDelayMs ? { writeDelayMs: opts.writeDelayMs } : {}),
  });
  const klipperSerial = opts.klipperSerial ? await opts.klipperSerial(dir) : device.path;
  const rig = await startRig({
    ...(opts.stopOkMs ? { timing: { ...QUICK_TIMING, stopOkMs: opts.stopOkMs } } : {}),
    klipper: {
      ...(opts.printState ? { printState: opts.printState } : {}),
      mcus: [
        { section: "mcu", settings: { serial: klipperSerial, baud: 250000 }, mcu_constants: { MCU: "stm32f103xe" }, mcu_version: "v0.13.0-1" },
      ],
    },
  });
  const events: JobEvent[] = [];
  rig.runner.on((e) => events.push(e));
  const b: Bench = {
    dir,
    klipperPath,
    kconfig,
    firmware,
    image,
    device,
    rig,
    events,
    engine(conf = "", engineOpts = {}) {
      const text = `[moonflash]\nklipper_path: ${klipperPath}\nkatapult_path: ${join(dir, "katapult")}\npython: python3\nservice_timeout: 5\n\n${conf}`;
      const config = parseConfig(text, join(rig.dataDir, "config", "moonflash.conf"), rig.dataDir);
      return new FlashEngine({
        config,
        printer: rig.session,
        runner: rig.runner,
        logger: rig.logger,
        flashers: { katapult: quickKatapult(), ...engineOpts.flashers },
        discovery: { useSerialportList: false },
      });
    },
    actions: () => rig.fake.serviceActions.map((a) => `${a.action} ${a.service}`),
  };
  bench = b;
  return b;
}

const mcuSection = (b: Bench, extra = "") => `[mcu]\nfirmware: ${b.firmware}\nkconfig: ${b.kconfig}\n${extra}`;

async function flashOk(engine: FlashEngine, params: FlashParams): Promise<FlashResult> {
  return (await engine.flash(params)) as FlashResult;
}

async function expectKlipperUntouched(b: Bench): Promise<void> {
  expect(b.actions()).toEqual([]);
  expect(existsSync(journalPath(b.rig.dataDir))).toBe(false);
  expect(b.rig.session.state().klippyState).toBe("ready");
}

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

    const kept = join(b.rig.dataDir, "moonflash", "firmware", "mcu");
    expect((await readFile(join(kept, "last.bin"))).equals(b.image)).toBe(true);
    const meta = JSON.parse(await readFile(join(kept, "last.json"), "utf8")) as Record<string, unknown>;
    expect(meta).toMatchObject({ size: 5000, source: b.firmware, sha256: expect.stringMatching(/^[0-9a-f]{64}$/) });
    expect(b.rig.runner.history("flash", 1)[0]).toMatchObject({ target: "mcu", ok: true });
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

describe("FlashEngine pre-flight: bad input changes nothing", () => {
  // Device paths come from Klipper's config here: moonflash.conf itself only accepts paths written under /dev.
  type Case = {
    name: string;
    code: string;
    conf?: (b: Bench) => Promise<string>;
    klipperSerial?: (dir: string) => Promise<string>;
    params?: (b: Bench) => Partial<FlashParams>;
    message?: RegExp;
  };
  const cases: Case[] = [
    { name: "unknown MCU", code: "UNKNOWN_MCU", params: () => ({ mcu: "extruder_board" }), message: /Known MCUs: mcu\b/ },
    { name: "missing firmware", code: "FIRMWARE_NOT_FOUND", params: (b) => ({ firmware: join(b.dir, "nope.bin") }) },
    {
      name: "empty firmware",
      code: "FIRMWARE_EMPTY",
      params: (b) => ({ firmware: join(b.dir, "empty.bin") }),
      conf: async (b) => {
        await writeFile(join(b.dir, "empty.bin"), "");
        return mcuSection(b);
      },
    },
    { name: "firmware larger than flash_size", code: "FIRMWARE_TOO_LARGE", conf: async (b) => mcuSection(b, "flash_size: 4K\n") },
    {
      name: "device linked to /etc/passwd",
      code: "PATH_REJECTED",
      klipperSerial: async (dir) => {
        await symlink("/etc/passwd", join(dir, "ttyEVIL"));
        return join(dir, "ttyEVIL");
      },
    },
    {
      name: "device that is a plain file",
      code: "PATH_REJECTED",
      klipperSerial: async (dir) => {
        await writeFile(join(dir, "ttyFILE"), "");
        return join(dir, "ttyFILE");
      },
    },
    { name: "device under /dev that is absent", code: "DEVICE_NOT_FOUND", conf: async (b) => mcuSection(b, "serial: /dev/serial/by-id/usb-Klipper_stm32f103xe_gone-if00\n") },
    { name: "unknown method", code: "UNKNOWN_FLASH_METHOD", params: () => ({ method: "avrdude" }), message: /katapult, flashtool, make, wchisp/ },
  ];

  it.each(cases)("$name ⇒ $code, Klipper never stopped", async ({ code, conf, klipperSerial, params, message }) => {
    const b = await setUp(klipperSerial ? { klipperSerial } : {});
    const engine = b.engine(conf ? await conf(b) : mcuSection(b));
    const err = await engine.flash({ mcu: "mcu", ...params?.(b) }).catch((e: unknown) => e);
    expect(isMoonflashError(err) && err.code).toBe(code);
    if (message) expect((err as Error).message).toMatch(message);
    await expectKlipperUntouched(b);
    expect(existsSync(join(b.rig.dataDir, "moonflash", "firmware"))).toBe(false);
    expect(b.device.model.frames).toEqual([]);
  });

  it("drops a method whose pre-flight fails and keeps the rest of the chain", async () => {
    const b = await setUp();
    await rm(join(b.klipperPath, "Makefile"));
    const plan = await b.engine(mcuSection(b)).plan({ mcu: "mcu" });
    expect(plan.methods).toEqual(["katapult"]);
    expect(plan.skipped).toEqual([{ method: "make", code: "TOOL_NOT_FOUND", message: expect.stringContaining("No Makefile") }]);
  });

  it("throws the first pre-flight error when no method is left", async () => {
    const b = await setUp();
    await rm(join(b.klipperPath, "Makefile"));
    const err = await b.engine(mcuSection(b, "method: make\n")).flash({ mcu: "mcu" }).catch((e: unknown) => e);
    expect(isMoonflashError(err) && err.code).toBe("TOOL_NOT_FOUND");
    await expectKlipperUntouched(b);
  });
});

describe("FlashEngine.plan resolution", () => {
  it("moonflash.conf's serial overrides Klipper's, and a board only moonflash.conf lists can be planned", async () => {
    const b = await setUp({ klipperSerial: async () => "/dev/serial/by-id/usb-Klipper_stm32f103xe_old-if00" });
    const pts = b.device.slavePath!;
    const conf = `${mcuSection(b, `serial: ${pts}\n`)}\n[mcu toolhead]\nserial: ${pts}\nfirmware: ${b.firmware}\nmethod: katapult\nmcu_type: stm32g0b1xx\n`;
    const engine = b.engine(conf);
    expect(await engine.plan({ mcu: "mcu" })).toMatchObject({ mcu: "mcu", device: pts, device_real_path: pts, expected_mcu_type: "stm32f103xe" });
    expect(await engine.plan({ mcu: "toolhead" })).toMatchObject({ mcu: "mcu toolhead", device: pts, methods: ["katapult"], expected_mcu_type: "stm32g0b1xx" });
    expect((await engine.plan({ mcu: "mcu", method: "make" })).methods).toEqual(["make"]);
    await expectKlipperUntouched(b);
  });

  it("a CAN board gets flashtool by default and its uuid as the device", async () => {
    const b = await setUp();
    await mkdir(join(b.dir, "katapult", "scripts"), { recursive: true });
    await writeFile(join(b.dir, "katapult", "scripts", "flashtool.py"), "");
    const plan = await b.engine(`${mcuSection(b)}\n[mcu toolhead]\ncanbus_uuid: 0123456789ab\nfirmware: ${b.firmware}\n`).plan({ mcu: "toolhead" });
    expect(plan).toMatchObject({ mcu: "mcu toolhead", device: "can0:0123456789ab", device_real_path: null, methods: ["flashtool"] });
    expect(plan.target).toMatchObject({ canbusUuid: "0123456789ab", canbusInterface: "can0" });
    expect(plan.target.device).toBeUndefined();
  });

  it("names sections the way Klipper does", () => {
    expect(mcuSectionName("mcu")).toBe("mcu");
    expect(mcuSectionName("toolhead")).toBe("mcu toolhead");
    expect(mcuSectionName(" mcu   toolhead ")).toBe("mcu toolhead");
  });

  it("devices() lists the known MCU sections from Klipper and moonflash.conf", async () => {
    const b = await setUp();
    const report = await b.engine(`${mcuSection(b)}\n[mcu toolhead]\ncanbus_uuid: 0123456789ab\n`).devices();
    expect(Array.isArray(report.devices)).toBe(true);
    expect(report.mcus).toEqual([
      { section: "mcu", serial: b.device.path, sources: ["klipper", "moonflash"] },
      { section: "mcu toolhead", canbusUuid: "0123456789ab", canbusInterface: "can0", sources: ["moonflash"] },
    ]);
  });
});
