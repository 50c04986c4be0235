// Flash of each MCU type, as data: the value of Klipper's mcu_constants.MCU (Katapult's CONNECT reports the same
// CONFIG_MCU string) mapped to the flash Klipper's build gives it. Numbers are CONFIG_FLASH_SIZE and the start of
// flash from Klipper's src/<arch>/Kconfig (Klipper3d/klipper 84104bbb, 2026-08); a type not listed is unknown, and
// nothing is guessed for it.
//
// FLASH_SIZE is not always the board's flash: Klipper's linker script gives a build `rom LENGTH = CONFIG_FLASH_SIZE`
// from the application address (src/generic/armcm_link.lds.S, src/rp2040/rpxxxx_link.lds.S), so it is the most a
// Klipper image for that type can hold, and for several families it is the smallest chip's flash (src/stm32/Kconfig:
// "Flash size of stm32f103x8 (64KiB)", while stm32f103xe names every STM32F103 and boards carry 256 or 512 KiB).
// Where one MCU string builds with several FLASH_SIZE values, the table keeps the largest.

export interface McuFlash {
  /** Klipper's CONFIG_FLASH_SIZE for this MCU type, bytes: no Klipper build for it is larger. */
  flashSize: number;
  /** Address where the chip's flash begins (where the bootloader, if any, sits). */
  flashBase: number;
  /**
   * True when flashSize bounds everything a bootloader on this MCU can write, its own space included, so the room
   * after it is flashSize - (application start - flashBase): every chip that reports this type has exactly that much
   * flash (or, rp2040/rp2350, Katapult refuses blocks past FLASH_START + FLASH_SIZE, src/rp2040/flash.c). False when
   * chips reporting this type may have more flash than Klipper links: then only an image larger than flashSize
   * itself is known not to fit.
   */
  wholeFlash: boolean;
  /** Where the numbers come from, e.g. "Klipper src/stm32/Kconfig". */
  source: string;
}

const STM32 = "Klipper src/stm32/Kconfig";
const RP = "Klipper src/rp2040/Kconfig";
const LPC = "Klipper src/lpc176x/Kconfig";
const SAMD = "Klipper src/atsamd/Kconfig";
const SAM = "Klipper src/atsam/Kconfig";
const HC32 = "Klipper src/hc32f460/Kconfig";

const KiB = 1024;

/** [MCU type, FLASH_SIZE, flash base, wholeFlash, source]; the comment says which chips report the type. */
const TABLE: ReadonlyArray<readonly [string, number, number, boolean, string]> = [
  // STM32: FLASH_BOOT_ADDRESS 0x8000000. wholeFlash where the family's largest part has FLASH_SIZE.
  ["stm32f031x6", 32 * KiB, 0x0800_0000, true, STM32], // F031x4/x6: 16/32 KiB
  ["stm32f042x6", 32 * KiB, 0x0800_0000, true, STM32], // F042x4/x6: 16/32 KiB
  ["stm32f070xb", 128 * KiB, 0x0800_0000, true, STM32], // F070x6/xB: 32/128 KiB (the x6 option links 32 KiB)
  ["stm32f072xb", 128 * KiB, 0x0800_0000, true, STM32], // F072x8/xB: 64/128 KiB
  // Every STM32F103 (64 KiB linked, "Flash size of stm32f103x8") and the Nation N32G45x (128 KiB linked); parts to 1 MiB.
  ["stm32f103xe", 128 * KiB, 0x0800_0000, false, STM32],
  ["stm32f207xx", 256 * KiB, 0x0800_0000, false, STM32], // F207: to 1 MiB
  ["stm32f401xc", 256 * KiB, 0x0800_0000, false, STM32], // F401xB..xE: to 512 KiB
  ["stm32f405xx", 512 * KiB, 0x0800_0000, false, STM32], // F405xG: 1 MiB
  ["stm32f407xx", 512 * KiB, 0x0800_0000, false, STM32], // F407xE/xG: 512 KiB / 1 MiB
  ["stm32f429xx", 512 * KiB, 0x0800_0000, false, STM32], // F429: to 2 MiB
  ["stm32f446xx", 512 * KiB, 0x0800_0000, true, STM32], // F446xC/xE: 256/512 KiB
  ["stm32f765xx", 2048 * KiB, 0x0800_0000, true, STM32], // F765xG/xI: 1/2 MiB
  ["stm32g070xx", 128 * KiB, 0x0800_0000, true, STM32], // G070xB: 128 KiB
  ["stm32g071xx", 128 * KiB, 0x0800_0000, true, STM32], // G071x6..xB: to 128 KiB
  ["stm32g0b0xx", 128 * KiB, 0x0800_0000, false, STM32], // G0B0xE: 512 KiB
  ["stm32g0b1xx", 128 * KiB, 0x0800_0000, false, STM32], // G0B1xB..xE: to 512 KiB
  ["stm32g431xx", 128 * KiB, 0x0800_0000, true, STM32], // G431x6..xB: to 128 KiB
  ["stm32g474xx", 256 * KiB, 0x0800_0000, false, STM32], // G474xB..xE: to 512 KiB
  ["stm32h723xx", 256 * KiB, 0x0800_0000, false, STM32], // H723xE/xG: 512 KiB / 1 MiB
  ["stm32h743xx", 2048 * KiB, 0x0800_0000, true, STM32], // H743xG/xI: 1/2 MiB
  ["stm32h750xx", 128 * KiB, 0x0800_0000, true, STM32], // H750xB: 128 KiB
  ["stm32l412xx", 64 * KiB, 0x0800_0000, false, STM32], // L412x8/xB: 64/128 KiB
  // RP2040/RP2350: external QSPI flash at 0x10000000 (FLASH_BOOT_ADDRESS 0x10000100 on rp2040 is after its stage2).
  ["rp2040", 2048 * KiB, 0x1000_0000, true, RP],
  ["rp2350", 2048 * KiB, 0x1000_0000, true, RP],
  // LPC176x: FLASH_BOOT_ADDRESS 0; both parts have 512 KiB.
  ["lpc1768", 512 * KiB, 0, true, LPC],
  ["lpc1769", 512 * KiB, 0, true, LPC],
  // SAMC21/SAMD21/SAMD51/SAME5x: FLASH_BOOT_ADDRESS 0; the part number names the flash (15: 32 KiB, 18: 256 KiB, 19: 512 KiB, 20: 1 MiB).
  ["samc21g18a", 256 * KiB, 0, true, SAMD],
  ["samd21g18a", 256 * KiB, 0, true, SAMD],
  ["samd21e18a", 256 * KiB, 0, true, SAMD],
  ["samd21j18a", 256 * KiB, 0, true, SAMD],
  ["samd21e15a", 32 * KiB, 0, true, SAMD],
  ["samd51g19a", 512 * KiB, 0, true, SAMD],
  ["samd51j19a", 512 * KiB, 0, true, SAMD],
  ["samd51n19a", 512 * KiB, 0, true, SAMD],
  ["samd51p20a", 1024 * KiB, 0, true, SAMD],
  ["same51j19a", 512 * KiB, 0, true, SAMD],
  ["same51n19a", 512 * KiB, 0, true, SAMD],
  ["same54p20a", 1024 * KiB, 0, true, SAMD],
  // SAM3X/SAM4: flash begins where FLASH_APPLICATION_ADDRESS defaults to without a bootloader (0x80000, 0x400000).
  ["sam3x8e", 512 * KiB, 0x8_0000, true, SAM],
  ["sam3x8c", 512 * KiB, 0x8_0000, true, SAM],
  ["sam4s8c", 512 * KiB, 0x40_0000, true, SAM],
  ["sam4e8e", 512 * KiB, 0x40_0000, true, SAM],
  // SAME70Q20B: Klipper links 128 KiB at 0 (the flash's ITCM mirror); the chip has 1 MiB.
  ["same70q20b", 128 * KiB, 0, false, SAM],
  // HC32F460xC/xE: 256/512 KiB.
  ["hc32f460", 256 * KiB, 0, false, HC32],
];

const BY_TYPE: ReadonlyMap<string, McuFlash> = new Map(
  TABLE.map(([type, flashSize, flashBase, wholeFlash, source]) => [type, Object.freeze({ flashSize, flashBase, wholeFlash, source })]),
);

/** The flash of an MCU type (case does not matter: Klipper spells HC32F460 in capitals), or undefined when unknown. */
export function mcuFlash(mcuType: string): McuFlash | undefined {
  return BY_TYPE.get(mcuType.trim().toLowerCase());
}

/** Every MCU type the table knows, in table order. */
export function knownMcuTypes(): string[] {
  return [...BY_TYPE.keys()];
}
