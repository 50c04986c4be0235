// Firmware profiles: one Kconfig file (what `make menuconfig` saves as .config) per MCU, passed to Klipper's build as
// KCONFIG_CONFIG. Where each MCU's profile is, what it selects, and the checks that keep Klipper's build from
// inventing one: Klipper's Makefile remakes a missing $(KCONFIG_CONFIG) with lib/kconfiglib/olddefconfig.py, which
// writes the defaults of src/Kconfig (an AVR atmega2560), and so does an empty file. Both are refused here, before
// make runs.

import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { MoonflashError } from "../../core/errors.js";
import { firmwareProfileDir, resolveKconfig, type FlashSettings } from "../config.js";
import { mcuUserName } from "../mcu-name.js";

export interface FirmwareProfile {
  /** Config section, e.g. "mcu toolhead". */
  mcu: string;
  /** Absolute path of the Kconfig file. */
  path: string;
  /** `kconfig:` of the MCU's section in moonflash.conf, or the default name in the profile directory. */
  from: "kconfig" | "default";
}

/** One of Klipper's architectures (src/Kconfig, "Micro-controller Architecture"), and how it is built. */
export interface Architecture {
  /** The Kconfig choice, without CONFIG_: "MACH_STM32". */
  symbol: string;
  name: string;
  /** The C compiler its build runs: $(CROSS_PREFIX)gcc of src/<arch>/Makefile. */
  compiler: string;
  /** Debian packages with that compiler (Klipper scripts/install-debian.sh), or null when Debian has none. */
  debianPackages: readonly string[] | null;
  /** What the build leaves in OUT for flashing, the first that exists wins (src/<arch>/Makefile target-y). */
  images: readonly string[];
}

const ARM = { compiler: "arm-none-eabi-gcc", debianPackages: ["gcc-arm-none-eabi", "binutils-arm-none-eabi", "libnewlib-arm-none-eabi"] } as const;

/** Klipper src/Kconfig's architecture choice, each with its CROSS_PREFIX (src/<arch>/Makefile) and image targets. */
export const ARCHITECTURES: readonly Architecture[] = [
  { symbol: "MACH_AVR", name: "AVR", compiler: "avr-gcc", debianPackages: ["gcc-avr", "binutils-avr", "avr-libc"], images: ["klipper.elf.hex"] },
  { symbol: "MACH_ATSAM", name: "SAM3/SAM4/SAM E70", ...ARM, images: ["klipper.bin"] },
  { symbol: "MACH_ATSAMD", name: "SAMC21/SAMD21/SAMD51/SAME5x", ...ARM, images: ["klipper.bin", "klipper.elf.hex"] },
  { symbol: "MACH_LPC176X", name: "LPC176x", ...ARM, images: ["klipper.bin"] },
  { symbol: "MACH_STM32", name: "STM32", ...ARM, images: ["klipper.bin"] },
  { symbol: "MACH_HC32F460", name: "HC32F460", ...ARM, images: ["klipper.bin"] },
  // src/rp2040/Makefile: klipper.bin with a bootloader (RPXXXX_HAVE_BOOTLOADER), else klipper.uf2.
  { symbol: "MACH_RPXXXX", name: "RP2040/RP235x", ...ARM, images: ["klipper.bin", "klipper.uf2"] },
  { symbol: "MACH_PRU", name: "Beaglebone PRU", compiler: "pru-gcc", debianPackages: null, images: ["pru0.elf"] },
  { symbol: "MACH_AR100", name: "Allwinner AR100", compiler: "or1k-elf-gcc", debianPackages: ["gcc-or1k-elf", "binutils-or1k-elf"], images: ["ar100.bin"] },
  // The Linux host MCU is a program for this machine: scripts/flash-linux.sh installs klipper.elf.
  { symbol: "MACH_LINUX", name: "Linux process", compiler: "gcc", debianPackages: ["gcc"], images: ["klipper.elf"] },
  { symbol: "MACH_SIMU", name: "Host simulator", compiler: "gcc", debianPackages: ["gcc"], images: ["klipper.elf"] },
];

/** The profile file name of an MCU without `kconfig:`: "mcu.config", "toolhead.config". */
export function defaultProfileName(section: string): string {
  return `${mcuUserName(section).replace(/[^\w.-]+/g, "_")}.config`;
}

/** Where the MCU's profile is: `kconfig:` of its section (relative to the profile directory), else <name>.config there. */
export function profileFor(section: string, settings: Pick<FlashSettings, "dataDir" | "mcus">): FirmwareProfile {
  const kconfig = settings.mcus[section]?.kconfig;
  if (kconfig) return { mcu: section, path: resolveKconfig(kconfig, settings.dataDir), from: "kconfig" };
  return { mcu: section, path: join(firmwareProfileDir(settings.dataDir), defaultProfileName(section)), from: "default" };
}

/** What a profile selects: its architecture (CONFIG_MACH_<arch>=y) and CONFIG_MCU when olddefconfig has written it. */
export function parseProfile(text: string): { arch: Architecture | null; mcu: string | null } {
  const set = new Set<string>();
  let mcu: string | null = null;
  for (const line of text.split("\n")) {
    const match = /^CONFIG_(\w+)=(.*)$/.exec(line.trim());
    if (!match) continue;
    if (match[2] === "y") set.add(match[1]!);
    if (match[1] === "MCU") mcu = match[2]!.replace(/^"(.*)"$/, "$1");
  }
  return { arch: ARCHITECTURES.find((a) => set.has(a.symbol)) ?? null, mcu };
}

export interface ProfileContent {
  profile: FirmwareProfile;
  text: string;
  arch: Architecture;
}

/** The user's words for making a profile, in one place for every message that needs them. */
export function profileHint(section: string): string {
  const name = mcuUserName(section);
  return `Create it with \`moonflash config ${name}\` (Klipper's menuconfig), \`moonflash config ${name} --import <.config>\` or \`moonflash config ${name} --suggest --write\``;
}

/** Reads a profile: MISSING_CONFIG when it is missing, not a file, or selects no architecture. */
export async function readProfile(profile: FirmwareProfile): Promise<ProfileContent> {
  const where = profile.from === "kconfig" ? `kconfig: of [${profile.mcu}] in moonflash.conf` : `the default profile of [${profile.mcu}]`;
  let text: string;
  try {
    text = await readFile(profile.path, "utf8");
  } catch (err) {
    const errno = (err as NodeJS.ErrnoException).code;
    const what = errno === "EISDIR" ? "is a directory, not a Kconfig file" : errno === "ENOENT" ? "does not exist" : `cannot be read (${errno ?? String(err)})`;
    throw new MoonflashError(
      "MISSING_CONFIG",
      `The firmware profile ${profile.path} (${where}) ${what}; nothing was built. ${profileHint(profile.mcu)}, or point kconfig: in [${profile.mcu}] at the board's saved .config.`,
      { mcu: profile.mcu, profile: profile.path, from: profile.from },
      { cause: err },
    );
  }
  const { arch } = parseProfile(text);
  if (!arch) {
    throw new MoonflashError(
      "MISSING_CONFIG",
      `The firmware profile ${profile.path} selects no processor architecture (no CONFIG_MACH_…=y line); Klipper would build its default, an atmega2560, from it. Nothing was built. ${profileHint(profile.mcu)}.`,
      { mcu: profile.mcu, profile: profile.path, from: profile.from, bytes: Buffer.byteLength(text) },
    );
  }
  return { profile, text, arch };
}
