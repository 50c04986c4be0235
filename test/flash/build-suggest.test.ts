// The profile suggestion table: MCU type → Klipper Kconfig symbols (src/stm32/Kconfig, src/rp2040/Kconfig, …), the
// connection from the device, and every option the board cannot tell marked with a "# GUESSED:" comment.

import { describe, expect, it } from "vitest";
import type { DiscoveredDevice } from "../../src/flash/discovery.js";
import { parseProfile } from "../../src/flash/build/profiles.js";
import { suggestableMcuTypes, suggestProfile, transportOf, type ProfileSuggestion } from "../../src/flash/build/suggest.js";
import { knownMcuTypes } from "../../src/flash/mcu-flash.js";

function known(s: ProfileSuggestion): Extract<ProfileSuggestion, { known: true }> {
  if (!s.known) throw new Error(`no suggestion: ${s.reason}`);
  return s;
}

/** The CONFIG_ lines of a suggestion, each with the GUESSED comment right above it (or null). */
function optionLines(text: string): Array<{ line: string; guess: string | null }> {
  const lines = text.split("\n");
  return lines.flatMap((line, i) => (line.startsWith("CONFIG_") ? [{ line, guess: lines[i - 1]?.startsWith("# GUESSED:") ? lines[i - 1]! : null }] : []));
}

describe("suggestProfile", () => {
  it("STM32F446 over USB: architecture and chip known, bootloader offset and 12 MHz crystal guessed, USB pins not", () => {
    const s = known(suggestProfile({ mcu: "mcu", mcuType: "stm32f446xx", mcuTypeFrom: "Klipper's mcu_constants.MCU", transport: "usb", transportFrom: "/dev/serial/by-id/usb-Klipper_stm32f446xx_1-if00" }));
    expect(optionLines(s.text)).toEqual([
      { line: "CONFIG_MACH_STM32=y", guess: null },
      { line: "CONFIG_MACH_STM32F446=y", guess: null },
      { line: "CONFIG_STM32_FLASH_START_8000=y", guess: expect.stringContaining("32KiB bootloader") },
      { line: "CONFIG_LOW_LEVEL_OPTIONS=y", guess: expect.stringContaining("GUESSED") },
      { line: "CONFIG_STM32_CLOCK_REF_12M=y", guess: expect.stringContaining("12 MHz crystal") },
      { line: "CONFIG_STM32_USB_PA11_PA12=y", guess: null },
    ]);
    expect(s.text).toContain("Klipper does not report the offset");
    expect(s.text).toContain("# MCU type stm32f446xx, from Klipper's mcu_constants.MCU");
    expect(s.text).toContain("# Connection: USB, from /dev/serial/by-id/usb-Klipper_stm32f446xx_1-if00");
    expect(s.text).toContain("src/stm32/Kconfig");
    expect(parseProfile(s.text).arch?.symbol).toBe("MACH_STM32");
  });

  it("RP2040 on CAN: the 16KiB Katapult offset and the CAN pins are guessed, with a hint for the bridge board", () => {
    const s = known(suggestProfile({ mcu: "mcu toolhead", mcuType: "rp2040", transport: "can", transportFrom: "canbus_uuid 0e0d81e4210c" }));
    expect(optionLines(s.text)).toEqual([
      { line: "CONFIG_MACH_RPXXXX=y", guess: null },
      { line: "CONFIG_MACH_RP2040=y", guess: null },
      { line: "CONFIG_RPXXXX_FLASH_START_4000=y", guess: expect.stringContaining("16KiB bootloader (Katapult") },
      { line: "CONFIG_RPXXXX_CANBUS=y", guess: expect.stringContaining("GPIO4/GPIO5") },
    ]);
    expect(s.text).toContain("USB to CAN bus bridge");
    expect(s.text).toContain("src/rp2040/Kconfig");
  });

  it("marks the interface as guessed when the connection is not known, and picks USB where the chip has it", () => {
    const s = known(suggestProfile({ mcu: "mcu", mcuType: "stm32g0b1xx", transport: null }));
    expect(optionLines(s.text).at(-1)).toEqual({ line: "CONFIG_STM32_USB_PA11_PA12=y", guess: expect.stringContaining("how the board is connected is not known") });
    expect(s.text).toContain("# Connection: not known");
    // Without USB in Kconfig (STM32F031), serial is the only choice.
    expect(optionLines(known(suggestProfile({ mcu: "mcu", mcuType: "stm32f031x6", transport: null })).text).at(-1)!.line).toBe("CONFIG_STM32_SERIAL_USART1=y");
  });

  it("USB-CAN bridge and UART choices; an interface the chip lacks is said, and another chosen", () => {
    expect(known(suggestProfile({ mcu: "mcu", mcuType: "stm32h723xx", transport: "usb-can-bridge" })).text).toContain("CONFIG_STM32_USBCANBUS_PA11_PA12=y");
    expect(known(suggestProfile({ mcu: "mcu", mcuType: "stm32h723xx", transport: "usb" })).text).toContain("CONFIG_STM32_CLOCK_REF_25M=y");
    const uart = known(suggestProfile({ mcu: "mcu", mcuType: "stm32f103xe", transport: "serial" }));
    expect(optionLines(uart.text).at(-1)).toEqual({ line: "CONFIG_STM32_SERIAL_USART1=y", guess: expect.stringContaining("USART1 on PA10/PA9") });
    expect(uart.text).toContain("CONFIG_STM32_FLASH_START_7000=y");
    expect(uart.text).toContain("Nation N32G45x");
    const noCan = known(suggestProfile({ mcu: "mcu", mcuType: "stm32f401xc", transport: "can" }));
    expect(noCan.text).toContain("which stm32f401xc does not offer");
    expect(noCan.transport).toBe("usb");
  });

  it("the Linux host MCU needs nothing guessed; an AVR keeps Klipper's default interface", () => {
    const linux = known(suggestProfile({ mcu: "mcu host", mcuType: "linux", transport: null }));
    expect(optionLines(linux.text)).toEqual([{ line: "CONFIG_MACH_LINUX=y", guess: null }]);
    const avr = known(suggestProfile({ mcu: "mcu", mcuType: "atmega2560", transport: "serial" }));
    expect(optionLines(avr.text).map((o) => o.line)).toEqual(["CONFIG_MACH_AVR=y", "CONFIG_MACH_atmega2560=y"]);
  });

  it("says so for an unknown MCU type and for none, and points at menuconfig", () => {
    const unknown = suggestProfile({ mcu: "mcu toolhead", mcuType: "samd21g18a", transport: "usb" });
    expect(unknown).toMatchObject({ known: false, mcuType: "samd21g18a" });
    expect(!unknown.known && unknown.reason).toContain("no profile table entry for MCU type 'samd21g18a'");
    expect(!unknown.known && unknown.reason).toContain("moonflash config toolhead");
    const none = suggestProfile({ mcu: "mcu", mcuType: null, transport: null });
    expect(!none.known && none.reason).toContain("set mcu_type:");
  });

  it("has a row for every STM32 and RP type whose flash moonflash knows, and every guessed option is commented", () => {
    const families = knownMcuTypes().filter((t) => /^(stm32|rp2)/.test(t));
    expect(families.filter((t) => !suggestableMcuTypes().includes(t))).toEqual([]);
    for (const type of suggestableMcuTypes()) {
      for (const transport of [null, "usb", "serial", "can", "usb-can-bridge"] as const) {
        const s = known(suggestProfile({ mcu: "mcu", mcuType: type, transport }));
        const guessed = s.options.filter((o) => o.guess).map((o) => `CONFIG_${o.symbol}=y`);
        expect(optionLines(s.text).filter((o) => o.guess).map((o) => o.line)).toEqual(guessed);
        expect(parseProfile(s.text).arch).not.toBeNull();
      }
    }
  });
});

describe("transportOf", () => {
  const device = (over: Partial<DiscoveredDevice>): DiscoveredDevice => ({ path: "/dev/ttyACM0", kind: "unknown", label: "Serial port", ...over });

  it("tells USB, USB-UART, board UART and CAN from the device and the [mcu] settings", () => {
    expect(transportOf({ canbusUuid: "0e0d81e4210c" })).toEqual({ transport: "can", from: "canbus_uuid 0e0d81e4210c" });
    expect(transportOf({ serial: "/dev/serial/by-id/usb-Klipper_stm32f446xx_1-if00", device: device({ kind: "klipper", label: "Klipper (USB)" }) })).toEqual({
      transport: "usb",
      from: "/dev/serial/by-id/usb-Klipper_stm32f446xx_1-if00 → /dev/ttyACM0 (Klipper (USB))",
    });
    expect(transportOf({ serial: "/dev/ttyUSB0", device: device({ path: "/dev/ttyUSB0", kind: "uart-adapter", label: "CH340 USB-UART adapter" }) })?.transport).toBe("serial");
    expect(transportOf({ serial: "/dev/ttyAMA0", device: device({ path: "/dev/ttyAMA0" }) })?.transport).toBe("serial");
    expect(transportOf({ serial: "/dev/serial0", device: null })?.transport).toBe("serial");
    // A by-id name is enough while the board is unplugged (no device found).
    expect(transportOf({ serial: "/dev/serial/by-id/usb-Klipper_rp2040_E6626005A7-if00", device: null })?.transport).toBe("usb");
    expect(transportOf({ serial: "/dev/ttyACM0", device: device({}) })).toBeNull();
    expect(transportOf({})).toBeNull();
  });
});
