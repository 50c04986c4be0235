// The flash table (src/flash/mcu-flash.ts): Klipper's Kconfig FLASH_SIZE and flash start per MCU type, looked up
// by the value of Klipper's mcu_constants.MCU / Katapult's CONNECT mcu type; an unknown type has no entry.

import { describe, expect, it } from "vitest";
import { knownMcuTypes, mcuFlash } from "../../src/flash/mcu-flash.js";
import { flashCommandsFor, mcuUserName } from "../../src/flash/mcu-name.js";

describe("mcuFlash", () => {
  it.each([
    // type, FLASH_SIZE, flash start, wholeFlash
    ["stm32f446xx", 0x80000, 0x08000000, true],
    ["stm32f401xc", 0x40000, 0x08000000, false],
    ["stm32g0b1xx", 0x20000, 0x08000000, false],
    ["stm32h723xx", 0x40000, 0x08000000, false],
    ["stm32f042x6", 0x8000, 0x08000000, true],
    ["stm32f072xb", 0x20000, 0x08000000, true],
    ["stm32h743xx", 0x200000, 0x08000000, true],
    ["rp2040", 0x200000, 0x10000000, true],
    ["rp2350", 0x200000, 0x10000000, true],
    ["lpc1769", 0x80000, 0, true],
    ["samd51p20a", 0x100000, 0, true],
    ["samd21g18a", 0x40000, 0, true],
    ["same54p20a", 0x100000, 0, true],
    ["sam3x8e", 0x80000, 0x80000, true],
    ["sam4e8e", 0x80000, 0x400000, true],
  ] as const)("%s: FLASH_SIZE %d, flash at %d, wholeFlash %s", (type, flashSize, flashBase, wholeFlash) => {
    expect(mcuFlash(type)).toEqual({ flashSize, flashBase, wholeFlash, source: expect.stringMatching(/^Klipper src\/\w+\/Kconfig$/) });
  });

  it("stm32f103xe is every STM32F103 and the N32G45x: the largest FLASH_SIZE Klipper links for it, not the chip's flash", () => {
    // src/stm32/Kconfig: 0x10000 for MACH_STM32F103 ("Flash size of stm32f103x8"), 0x20000 for MACH_N32G45x, both MCU "stm32f103xe".
    expect(mcuFlash("stm32f103xe")).toMatchObject({ flashSize: 0x20000, flashBase: 0x08000000, wholeFlash: false });
  });

  it("looks types up case-insensitively (Klipper spells HC32F460 in capitals)", () => {
    expect(mcuFlash("HC32F460")).toMatchObject({ flashSize: 0x40000, flashBase: 0, source: "Klipper src/hc32f460/Kconfig" });
    expect(mcuFlash("STM32F446XX")).toEqual(mcuFlash("stm32f446xx"));
  });

  it.each(["linux", "atmega2560", "stm32u575xx", "atsamd51p20a", ""])("has no entry for %j: unknown, not guessed", (type) => {
    expect(mcuFlash(type)).toBeUndefined();
  });

  it("covers every stm32 MCU string of Klipper's src/stm32/Kconfig, and every entry is sane", () => {
    const stm32 = ["stm32f031x6", "stm32f042x6", "stm32f070xb", "stm32f072xb", "stm32f103xe", "stm32f207xx", "stm32f401xc", "stm32f405xx", "stm32f407xx", "stm32f429xx", "stm32f446xx", "stm32f765xx", "stm32g070xx", "stm32g071xx", "stm32g0b0xx", "stm32g0b1xx", "stm32g431xx", "stm32g474xx", "stm32h723xx", "stm32h743xx", "stm32h750xx", "stm32l412xx"];
    expect(knownMcuTypes().filter((t) => t.startsWith("stm32"))).toEqual(stm32);
    for (const type of knownMcuTypes()) {
      const entry = mcuFlash(type)!;
      expect(entry.flashSize % 1024, type).toBe(0);
      expect(entry.flashSize, type).toBeGreaterThan(0);
      expect(type, "keys are lower case").toBe(type.toLowerCase());
    }
  });
});

describe("mcuUserName", () => {
  it("names a section as the user types it", () => {
    expect(mcuUserName("mcu")).toBe("mcu");
    expect(mcuUserName("mcu toolhead")).toBe("toolhead");
    expect(flashCommandsFor("mcu emu")).toBe("FLASH_MCU MCU=emu in a macro, or moonflash flash emu");
  });
});
