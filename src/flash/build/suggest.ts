// A firmware profile proposed from what the live board says: its MCU type (Klipper's mcu_constants.MCU, or mcu_type:
// in moonflash.conf) and how it is connected (USB, UART, CAN, from the device path and its USB id). Pure and
// table-driven: one row per MCU type with the Kconfig symbols of Klipper's src/Kconfig and src/<arch>/Kconfig.
// What the board cannot tell is marked as guessed: the bootloader offset (Klipper reports no FLASH_APPLICATION_ADDRESS
// in mcu_constants), the crystal, and the pins of an interface where the chip offers several.

import path from "node:path";
import type { DiscoveredDevice } from "../discovery.js";
import { mcuUserName } from "../mcu-name.js";

export type Transport = "usb" | "serial" | "can" | "usb-can-bridge";

export interface SuggestInput {
  /** Config section, e.g. "mcu toolhead". */
  mcu: string;
  mcuType: string | null;
  /** Where the MCU type comes from, for the profile's header: "Klipper's mcu_constants.MCU". */
  mcuTypeFrom?: string;
  transport: Transport | null;
  transportFrom?: string;
}

export interface SuggestedOption {
  /** Without CONFIG_: "MACH_STM32F446". */
  symbol: string;
  /** Why it is a guess; absent when the board's MCU type or connection says so. */
  guess?: string;
}

export type ProfileSuggestion =
  | { known: true; mcu: string; mcuType: string; transport: Transport | null; options: SuggestedOption[]; notes: string[]; text: string }
  | { known: false; mcu: string; mcuType: string | null; reason: string };

interface InterfaceRow {
  symbols: string[];
  /** Why the pins are a guess (the chip has this interface on several pin pairs); absent when there is one choice. */
  pins?: string;
}

interface ChipRow {
  /** mcu_constants.MCU (src/<arch>/Kconfig `config MCU`). */
  mcuType: string;
  symbols: string[];
  /** The bootloader offset choice and why it was picked; null where the architecture has none. */
  offset: { symbol: string; why: string } | null;
  clock?: { symbols: string[]; why: string };
  interfaces: Partial<Record<Transport, InterfaceRow>>;
  /** Things a reader should know that are not options. */
  notes?: string[];
  source: string;
}

const STM32_SOURCE = "Klipper src/Kconfig, src/stm32/Kconfig";

/** Bootloader offsets of src/stm32/Kconfig ("Bootloader offset" choice). */
const STM32_OFFSETS: Record<string, string> = {
  "1000": "4KiB",
  "2000": "8KiB",
  "7000": "28KiB",
  "8000": "32KiB",
  "20000": "128KiB",
  "0000": "no",
};

interface Stm32Spec {
  chip: string;
  /** The offset's STM32_FLASH_START_ suffix; Klipper's first choice for the chip unless `board` says otherwise. */
  offset: keyof typeof STM32_OFFSETS;
  board?: string;
  usb?: boolean | "pins";
  can?: boolean;
  usbcan?: boolean;
  crystal?: { symbol: string; mhz: number; board: string };
}

function stm32(mcuType: string, spec: Stm32Spec): ChipRow {
  const offsetWhy = spec.board ?? `Klipper's first choice for ${spec.chip.replace("MACH_", "")}`;
  const interfaces: ChipRow["interfaces"] = {
    serial: { symbols: ["STM32_SERIAL_USART1"], pins: "USART1 on PA10/PA9, Klipper's first serial choice; others are low-level options" },
  };
  if (spec.usb) {
    interfaces.usb = { symbols: ["STM32_USB_PA11_PA12"], ...(spec.usb === "pins" ? { pins: "USB on PA11/PA12; this chip also offers other USB pins" } : {}) };
  }
  if (spec.can) interfaces.can = { symbols: ["STM32_CANBUS_PA11_PA12"], pins: "CAN on PA11/PA12; boards use many pin pairs (EBB36/42: PB0/PB1, Octopus: PD0/PD1)" };
  if (spec.usbcan) interfaces["usb-can-bridge"] = { symbols: ["STM32_USBCANBUS_PA11_PA12"], pins: "the bridge's CAN pins are left to Klipper's first choice (PB8/PB9)" };
  return {
    mcuType,
    symbols: ["MACH_STM32", spec.chip],
    offset: { symbol: `STM32_FLASH_START_${spec.offset}`, why: `${STM32_OFFSETS[spec.offset]} bootloader: ${offsetWhy}` },
    clock: spec.crystal
      ? { symbols: ["LOW_LEVEL_OPTIONS", spec.crystal.symbol], why: `${spec.crystal.mhz} MHz crystal (${spec.crystal.board}); Klipper's default is 8 MHz, and the clock reference is a low-level option` }
      : { symbols: [], why: "the clock reference is left at Klipper's default, an 8 MHz crystal" },
    interfaces,
    source: STM32_SOURCE,
  };
}

const RP_SOURCE = "Klipper src/Kconfig, src/rp2040/Kconfig";

function rp(mcuType: string, chip: string): ChipRow {
  return {
    mcuType,
    symbols: ["MACH_RPXXXX", chip],
    offset: {
      symbol: "RPXXXX_FLASH_START_4000",
      why: "16KiB bootloader (Katapult, how moonflash flashes in place). Without Katapult pick \"No bootloader\" and flash klipper.uf2 in BOOTSEL mode",
    },
    interfaces: {
      usb: { symbols: ["RPXXXX_USB"] },
      serial: { symbols: ["RPXXXX_SERIAL_UART0_PINS_0_1"], pins: "UART0 on GPIO0/GPIO1, Klipper's first serial choice" },
      can: { symbols: ["RPXXXX_CANBUS"], pins: "CAN on GPIO4/GPIO5 (Klipper's default RPXXXX_CANBUS_GPIO_RX/TX)" },
      "usb-can-bridge": { symbols: ["RPXXXX_USBCANBUS"], pins: "the bridge's CAN on GPIO4/GPIO5 (Klipper's default)" },
    },
    source: RP_SOURCE,
  };
}

function lpc(mcuType: string, chip: string): ChipRow {
  return {
    mcuType,
    symbols: ["MACH_LPC176X", chip],
    offset: { symbol: "LPC_FLASH_START_4000", why: "16KiB bootloader: Klipper's first choice, the stock bootloader of SKR v1.3/v1.4" },
    interfaces: {
      usb: { symbols: ["LPC_USB"] },
      serial: { symbols: ["LPC_SERIAL_UART0_P03_P02"], pins: "UART0 on P0.3/P0.2, Klipper's first serial choice" },
      can: { symbols: ["LPC_MMENU_CANBUS_P0_0_P0_1"], pins: "CAN1 on P0.0/P0.1, Klipper's first CAN choice" },
    },
    source: "Klipper src/Kconfig, src/lpc176x/Kconfig",
  };
}

const CRYSTAL_12M = { symbol: "STM32_CLOCK_REF_12M", mhz: 12, board: "BTT Octopus, Fysetc Spider: config/generic-bigtreetech-octopus-v1.1.cfg" };
const CRYSTAL_25M = { symbol: "STM32_CLOCK_REF_25M", mhz: 25, board: "BTT Octopus Pro H723, SKR 3: config/generic-bigtreetech-skr-3.cfg" };
const OCTOPUS = "BTT Octopus, config/generic-bigtreetech-octopus-v1.1.cfg";

/** One row per MCU type moonflash can suggest a profile for. */
const CHIPS: readonly ChipRow[] = [
  stm32("stm32f031x6", { chip: "MACH_STM32F031", offset: "1000" }),
  stm32("stm32f042x6", { chip: "MACH_STM32F042", offset: "2000", usb: "pins", can: true, usbcan: true }),
  stm32("stm32f070xb", { chip: "MACH_STM32F070", offset: "2000", usb: "pins" }),
  stm32("stm32f072xb", { chip: "MACH_STM32F072", offset: "2000", usb: true, can: true, usbcan: true }),
  {
    ...stm32("stm32f103xe", { chip: "MACH_STM32F103", offset: "7000", board: "BTT SKR Mini E3 V2 and Creality 4.2.x, config/generic-bigtreetech-skr-mini-e3-v2.0.cfg", usb: true, can: true }),
    notes: ["stm32f103xe is also what a Nation N32G45x reports (MACH_N32G452/MACH_N32G455)."],
  },
  stm32("stm32f207xx", { chip: "MACH_STM32F207", offset: "8000", usb: true, can: true, usbcan: true }),
  stm32("stm32f401xc", { chip: "MACH_STM32F401", offset: "8000", usb: true }),
  stm32("stm32f405xx", { chip: "MACH_STM32F405", offset: "8000", usb: true, can: true, usbcan: true }),
  stm32("stm32f407xx", { chip: "MACH_STM32F407", offset: "8000", board: "BTT SKR 2, config/generic-bigtreetech-skr-2.cfg", usb: true, can: true, usbcan: true }),
  stm32("stm32f429xx", { chip: "MACH_STM32F429", offset: "8000", board: OCTOPUS, usb: true, can: true, usbcan: true }),
  stm32("stm32f446xx", { chip: "MACH_STM32F446", offset: "8000", board: OCTOPUS, usb: true, can: true, usbcan: true, crystal: CRYSTAL_12M }),
  stm32("stm32f765xx", { chip: "MACH_STM32F765", offset: "8000", usb: true }),
  stm32("stm32g070xx", { chip: "MACH_STM32G070", offset: "2000", usb: false }),
  stm32("stm32g071xx", { chip: "MACH_STM32G071", offset: "2000", usb: false }),
  stm32("stm32g0b0xx", { chip: "MACH_STM32G0B0", offset: "2000", usb: true }),
  stm32("stm32g0b1xx", { chip: "MACH_STM32G0B1", offset: "2000", board: "BTT SKR Mini E3 V3, EBB36/42, Manta M8P: config/generic-bigtreetech-skr-mini-e3-v3.0.cfg", usb: true, can: true, usbcan: true }),
  stm32("stm32g431xx", { chip: "MACH_STM32G431", offset: "2000", usb: true, can: true, usbcan: true }),
  stm32("stm32g474xx", { chip: "MACH_STM32G474", offset: "2000", usb: true, can: true, usbcan: true }),
  stm32("stm32h723xx", { chip: "MACH_STM32H723", offset: "20000", board: "BTT Octopus Pro H723, config/generic-bigtreetech-octopus-pro-v1.1.cfg", usb: true, can: true, usbcan: true, crystal: CRYSTAL_25M }),
  stm32("stm32h743xx", { chip: "MACH_STM32H743", offset: "20000", board: "BTT SKR 3, config/generic-bigtreetech-skr-3.cfg", usb: "pins", can: true, usbcan: true, crystal: CRYSTAL_25M }),
  stm32("stm32h750xx", { chip: "MACH_STM32H750", offset: "8000", usb: "pins", can: true, usbcan: true }),
  stm32("stm32l412xx", { chip: "MACH_STM32L412", offset: "0000", usb: true }),
  rp("rp2040", "MACH_RP2040"),
  rp("rp2350", "MACH_RP2350"),
  lpc("lpc1768", "MACH_LPC1768"),
  lpc("lpc1769", "MACH_LPC1769"),
  {
    mcuType: "atmega2560",
    symbols: ["MACH_AVR", "MACH_atmega2560"],
    offset: null,
    // src/avr/Kconfig: UART0 unless LOW_LEVEL_OPTIONS; the board's USB port is a USB-UART chip on UART0.
    interfaces: { serial: { symbols: [] }, usb: { symbols: [] } },
    notes: ["AVR boards keep their Arduino bootloader; make flash writes klipper.elf.hex with avrdude."],
    source: "Klipper src/Kconfig, src/avr/Kconfig",
  },
  {
    mcuType: "linux",
    symbols: ["MACH_LINUX"],
    offset: null,
    interfaces: {},
    notes: ["The Linux host MCU is a program on this machine; make flash installs klipper.elf (scripts/flash-linux.sh)."],
    source: "Klipper src/Kconfig, src/linux/Kconfig",
  },
];

const BY_TYPE: ReadonlyMap<string, ChipRow> = new Map(CHIPS.map((row) => [row.mcuType, row]));

/** Every MCU type a profile can be suggested for, in table order. */
export function suggestableMcuTypes(): string[] {
  return CHIPS.map((row) => row.mcuType);
}

const TRANSPORT_WORDS: Record<Transport, string> = {
  usb: "USB",
  serial: "serial (UART)",
  can: "CAN bus",
  "usb-can-bridge": "USB to CAN bus bridge",
};

/** The profile for an MCU type and connection, every guess marked; `known: false` says why there is none. */
export function suggestProfile(input: SuggestInput): ProfileSuggestion {
  const name = mcuUserName(input.mcu);
  if (!input.mcuType) {
    return {
      known: false,
      mcu: input.mcu,
      mcuType: null,
      reason: `The MCU type of [${input.mcu}] is not known: start Klipper (it reports mcu_constants.MCU once connected) or set mcu_type: in [${input.mcu}] of moonflash.conf, then ask again; or run \`moonflash config ${name}\` (menuconfig).`,
    };
  }
  const mcuType = input.mcuType.trim().toLowerCase();
  const row = BY_TYPE.get(mcuType);
  if (!row) {
    return {
      known: false,
      mcu: input.mcu,
      mcuType,
      reason: `moonflash has no profile table entry for MCU type '${mcuType}' (it knows ${suggestableMcuTypes().join(", ")}). Run \`moonflash config ${name}\` to choose it in Klipper's menuconfig.`,
    };
  }

  const options: SuggestedOption[] = row.symbols.map((symbol) => ({ symbol }));
  const notes = [...(row.notes ?? [])];
  if (row.offset) options.push({ symbol: row.offset.symbol, guess: `${row.offset.why}. Klipper does not report the offset` });
  if (row.clock) {
    const last = row.clock.symbols.length - 1;
    row.clock.symbols.forEach((symbol, i) => options.push({ symbol, guess: i === last ? row.clock!.why : "low-level options, so that the crystal below counts" }));
    // No option to mark: the guess is Klipper's default itself, so it is said in the header.
    if (row.clock.symbols.length === 0) notes.push(`Also a guess: ${row.clock.why}.`);
  }

  const available = Object.keys(row.interfaces) as Transport[];
  const transport = input.transport && row.interfaces[input.transport] ? input.transport : null;
  if (input.transport && !transport) {
    notes.push(`The board looks connected by ${TRANSPORT_WORDS[input.transport]}, which ${mcuType} does not offer in Klipper's Kconfig.`);
  }
  const chosen: Transport | null = transport ?? (available.includes("usb") ? "usb" : (available[0] ?? null));
  if (chosen) {
    const iface = row.interfaces[chosen]!;
    const unknown = transport === null ? `${TRANSPORT_WORDS[chosen]}: how the board is connected is not known` : undefined;
    const guess = [unknown, iface.pins].filter(Boolean).join("; ") || undefined;
    iface.symbols.forEach((symbol, i) => options.push(i === 0 && guess ? { symbol, guess } : { symbol }));
    if (iface.symbols.length === 0) notes.push(`${TRANSPORT_WORDS[chosen]}: Klipper's default communication interface for ${mcuType}.`);
  }
  if (chosen === "can") notes.push("If this board is the USB to CAN bus bridge itself, choose \"USB to CAN bus bridge\" instead.");

  const header = [
    `# moonflash: suggested firmware profile for [${input.mcu}]`,
    `# MCU type ${mcuType}${input.mcuTypeFrom ? `, from ${input.mcuTypeFrom}` : ""}`,
    `# Connection: ${transport ? `${TRANSPORT_WORDS[transport]}${input.transportFrom ? `, from ${input.transportFrom}` : ""}` : "not known"}`,
    `# Symbols from ${row.source}.`,
    `# Each option under a "# GUESSED:" line is not known from the board: check it against the board's documentation,`,
    `# or open the profile in menuconfig (moonflash config ${name}) before flashing.`,
    "# The first build (make olddefconfig) rewrites this file in Kconfig's format: these comments go, the choices stay.",
    ...notes.map((note) => `# ${note}`),
  ];
  const body = options.flatMap((o) => [...(o.guess ? [`# GUESSED: ${o.guess}`] : []), `CONFIG_${o.symbol}=y`]);
  return { known: true, mcu: input.mcu, mcuType, transport: chosen, options, notes, text: `${[...header, ...body].join("\n")}\n` };
}

/**
 * How a board is connected, from moonflash's or Klipper's [mcu] settings and what discovery says of its device:
 * canbus_uuid is CAN; a Klipper or Katapult USB id (or a usb-Klipper_ by-id name) is USB; a USB-UART adapter or a
 * board UART (ttyAMA, ttyS, serial0) is serial. Null when it cannot be told.
 */
export function transportOf(input: { serial?: string | null; canbusUuid?: string | null; device?: DiscoveredDevice | null }): { transport: Transport; from: string } | null {
  if (input.canbusUuid) return { transport: "can", from: `canbus_uuid ${input.canbusUuid}` };
  const serial = input.serial ?? undefined;
  if (!serial) return null;
  const device = input.device ?? null;
  const named = `${serial}${device && device.path !== serial ? ` → ${device.path}` : ""}`;
  if (device) {
    if (device.kind === "usb-can-bridge") return { transport: "usb-can-bridge", from: `${named} (${device.label})` };
    if (device.kind === "klipper" || device.kind === "katapult") return { transport: "usb", from: `${named} (${device.label})` };
    if (device.kind === "uart-adapter") return { transport: "serial", from: `${named} (${device.label})` };
  }
  const base = path.basename(device?.path ?? serial);
  if (/^usb-(klipper|katapult|canboot)_/i.test(path.basename(serial))) return { transport: "usb", from: `${named} (by-id name)` };
  if (/^(ttyAMA\d+|ttyS\d+|serial\d+|ttyTHS\d+)$/.test(base)) return { transport: "serial", from: `${named} (a UART of this machine)` };
  return null;
}
