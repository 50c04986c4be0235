// The flash engine's pre-flight and plan: bad input is refused with the right code before Klipper is touched,
// and MCU, device, method chain and firmware are resolved as documented.

import { mkdir, rm, symlink, writeFile } from "node:fs/promises";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { isMoonflashError } from "../../src/core/errors.js";
import { mcuSectionName, type FlashParams } from "../../src/flash/engine.js";
import { expectKlipperUntouched, mcuSection, setUp, tearDown, type Bench } from "../fixtures/engine/bench.js";

afterEach(tearDown);

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
    {
      name: "unknown MCU",
      code: "UNKNOWN_MCU",
      params: () => ({ mcu: "extruder_board" }),
      message: /^Unknown MCU 'extruder_board'\. Known MCUs: mcu\. Use one of these names \(e\.g\. FLASH_MCU MCU=mcu in a macro, moonflash flash mcu on the command line\)/,
    },
    {
      // Names as the user types them: section [mcu emu] is "emu" (FLASH_MCU MCU=emu), not "mcu emu".
      name: "unknown MCU, with a second section",
      code: "UNKNOWN_MCU",
      conf: async (b) => `${mcuSection(b)}\n[mcu emu]\ncanbus_uuid: 0123456789ab\n`,
      params: () => ({ mcu: "extruder_board" }),
      message: /Known MCUs: mcu, emu\. Use one of these names \(e\.g\. FLASH_MCU MCU=emu in a macro, moonflash flash emu on the command line\), or add an \[mcu extruder_board\] section/,
    },
    {
      name: "missing firmware",
      code: "FIRMWARE_NOT_FOUND",
      params: (b) => ({ firmware: join(b.dir, "nope.bin") }),
      message: /give its path with FIRMWARE= \(macro\) or --firmware \(CLI\)\.$/,
    },
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
      // No flash_size: Klipper reports stm32f103xe, for which Klipper links at most 128 KiB (src/stm32/Kconfig).
      name: "firmware larger than the flash of Klipper's MCU type, no flash_size",
      code: "FIRMWARE_TOO_LARGE",
      conf: async (b) => {
        await writeFile(join(b.dir, "big.bin"), Buffer.alloc(300_000, 0x5a));
        return mcuSection(b);
      },
      params: (b) => ({ firmware: join(b.dir, "big.bin") }),
      message:
        /is 300000 bytes but a Klipper build for stm32f103xe holds at most 131072 bytes \(FLASH_SIZE in Klipper src\/stm32\/Kconfig\), before counting the bootloader, whose size is known only once it answers\. Nothing was stopped or written\./,
    },
    {
      name: "firmware larger than the whole flash of moonflash.conf's mcu_type, no flash_size",
      code: "FIRMWARE_TOO_LARGE",
      conf: async (b) => {
        await writeFile(join(b.dir, "big.bin"), Buffer.alloc(600_000, 0x5a));
        return mcuSection(b, "mcu_type: stm32f446xx\n");
      },
      params: (b) => ({ firmware: join(b.dir, "big.bin") }),
      message: /but stm32f446xx has only 524288 bytes of flash in all .* set flash_size: in \[mcu\] of moonflash\.conf\.$/,
    },
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
      message: /resolves to .*ttyFILE, which is not a character device under \/dev/,
    },
    {
      // A missing device is DEVICE_NOT_FOUND wherever its path is, e.g. a link in /tmp whose board is unplugged.
      name: "device that is a dangling symlink outside /dev",
      code: "DEVICE_NOT_FOUND",
      klipperSerial: async (dir) => {
        await symlink(join(dir, "ttyUNPLUGGED"), join(dir, "ttyLINK"));
        return join(dir, "ttyLINK");
      },
      message: /ttyLINK is not present \(it is a link to .*ttyUNPLUGGED, which does not exist\)/,
    },
    { name: "device path outside /dev that does not exist", code: "DEVICE_NOT_FOUND", klipperSerial: async (dir) => join(dir, "ttyMISSING"), message: /ttyMISSING is not present\./ },
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

  it("refuses serial-bootloader methods for Klipper's Linux host MCU (mcu_type linux), keeps make, and picks linux by default", async () => {
    const b = await setUp();
    expect((await b.engine(mcuSection(b, "mcu_type: linux\n")).plan({ mcu: "mcu" })).methods).toEqual(["linux"]);
    const engine = b.engine(mcuSection(b, "mcu_type: linux\nmethod: katapult, make\n"));
    const plan = await engine.plan({ mcu: "mcu" });
    expect(plan.methods).toEqual(["make"]);
    expect(plan.skipped).toEqual([{ method: "katapult", code: "METHOD_NOT_APPLICABLE", message: expect.stringContaining("Linux host MCU") }]);
    const err = await engine.flash({ mcu: "mcu", method: "katapult" }).catch((e: unknown) => e);
    expect(isMoonflashError(err) && err.code).toBe("METHOD_NOT_APPLICABLE");
    // With make unusable too, the error names what to fix (make's), not why katapult was dropped.
    await rm(join(b.klipperPath, "Makefile"));
    const both = await engine.flash({ mcu: "mcu" }).catch((e: unknown) => e);
    expect(isMoonflashError(both) && both.code).toBe("TOOL_NOT_FOUND");
    await expectKlipperUntouched(b);
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
  it("flash_size in moonflash.conf overrides the MCU type's flash from the table", async () => {
    const b = await setUp();
    const big = join(b.dir, "big.bin");
    await writeFile(big, Buffer.alloc(300_000, 0x5a));
    const plan = await b.engine(mcuSection(b, "flash_size: 1M\n")).plan({ mcu: "mcu", firmware: big });
    expect(plan).toMatchObject({ firmware_bytes: 300_000, expected_mcu_type: "stm32f103xe", methods: ["katapult", "make"] });
    await expectKlipperUntouched(b);
  });

  it("an MCU type the table does not know is not size-checked before the bootloader answers", async () => {
    const b = await setUp();
    const big = join(b.dir, "big.bin");
    await writeFile(big, Buffer.alloc(300_000, 0x5a));
    const plan = await b.engine(mcuSection(b, "mcu_type: stm32u575xx\n")).plan({ mcu: "mcu", firmware: big });
    expect(plan).toMatchObject({ firmware_bytes: 300_000, expected_mcu_type: "stm32u575xx" });
  });

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
