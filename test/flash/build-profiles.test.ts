// Firmware profiles: where each MCU's Kconfig file is (kconfig: relative to <data>/config/moonflash/, absolute, or the
// default <name>.config), and that a missing or empty one is refused with MISSING_CONFIG before make runs, because
// Klipper's `make olddefconfig` would silently build an atmega2560 config from nothing (shown here on the fake tree).

import { mkdir, readFile, stat, writeFile } from "node:fs/promises";
import { homedir } from "node:os";
import path from "node:path";
import { execa } from "execa";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import pino from "pino";
import { parseConfig } from "../../src/moonflash-conf.js";
import { JobRunner } from "../../src/core/jobs.js";
import { initialPrinterState, type PrinterPort } from "../../src/core/printer.js";
import { FlashEngine } from "../../src/flash/engine.js";
import { resolveKconfig } from "../../src/flash/config.js";
import { defaultProfileName, parseProfile, profileFor } from "../../src/flash/build/profiles.js";
import { rejection } from "./support/rejection.js";
import { createBuildFixture, STM32_PROFILE, type BuildFixture } from "./support/build-fixture.js";

let fx: BuildFixture;
const originalPath = process.env.PATH;
let record: string;

beforeAll(async () => {
  fx = await createBuildFixture("profiles");
  process.env.PATH = `${fx.bin}${path.delimiter}${originalPath}`;
  // The fake tree appends a line here for every build it runs: proof that make did or did not run.
  record = path.join(fx.root, "builds.txt");
  process.env.FAKE_BUILD_RECORD = record;
});

afterEach(async () => {
  await execa("rm", ["-f", record]);
});

afterAll(async () => {
  process.env.PATH = originalPath;
  delete process.env.FAKE_BUILD_RECORD;
  await fx.cleanup();
});

const exists = (p: string) => stat(p).then(() => true, () => false);

describe("profile resolution", () => {
  it("takes a relative kconfig: relative to <data>/config/moonflash/, an absolute or ~/ one as written", () => {
    const conf = parseConfig("[mcu]\nkconfig: octopus.config\n[mcu toolhead]\nkconfig: /opt/profiles/ebb.config\n[mcu bed]\nkconfig: ~/ebb/bed.config\n", "/d/config/moonflash.conf", "/d");
    expect(resolveKconfig(conf.mcus.mcu!.kconfig!, "/d")).toBe("/d/config/moonflash/octopus.config");
    expect(resolveKconfig(conf.mcus["mcu toolhead"]!.kconfig!, "/d")).toBe("/opt/profiles/ebb.config");
    expect(resolveKconfig(conf.mcus["mcu bed"]!.kconfig!, "/d")).toBe(path.join(homedir(), "ebb/bed.config"));
    expect(resolveKconfig("sub/../boards/x.config", "/d")).toBe("/d/config/moonflash/boards/x.config");
  });

  it("uses <name>.config in the profile directory for a section without kconfig:", () => {
    const conf = parseConfig("[mcu]\n[mcu toolhead]\nkconfig: th.config\n", "/d/config/moonflash.conf", "/d");
    expect(profileFor("mcu", conf)).toEqual({ mcu: "mcu", path: "/d/config/moonflash/mcu.config", from: "default" });
    expect(profileFor("mcu toolhead", conf)).toEqual({ mcu: "mcu toolhead", path: "/d/config/moonflash/th.config", from: "kconfig" });
    // Only Klipper's config names this one: the default name still applies.
    expect(profileFor("mcu extruder board", conf).path).toBe("/d/config/moonflash/extruder_board.config");
    expect(defaultProfileName("mcu")).toBe("mcu.config");
  });

  it("make flash gets the same resolved profile as KCONFIG_CONFIG (flash engine plan)", async () => {
    await fx.writeConf("[mcu]\nserial: /dev/null\nmethod: make\nkconfig: boards/flash.config\nfirmware: " + path.join(fx.root, "fw.bin") + "\n");
    await fx.writeProfile("boards/flash.config", STM32_PROFILE);
    await writeFile(path.join(fx.root, "fw.bin"), Buffer.alloc(1024, 1));
    const config = parseConfig(await readFile(path.join(fx.dataDir, "config", "moonflash.conf"), "utf8"), "moonflash.conf", fx.dataDir);
    const logger = pino({ level: "silent" });
    // Klipper is not connected: the engine plans from moonflash.conf alone, as the CLI does without Moonraker.
    const state = initialPrinterState();
    const offline = async (): Promise<never> => {
      throw new Error("not used while planning");
    };
    const printer: PrinterPort = {
      state: () => state, isPrinting: () => false, onStateChange: () => () => undefined, stopService: offline, startService: offline,
      gcode: offline, sendEvent: offline, mcuReport: async () => ({ hostVersion: null, mcus: [] }), serialPeripherals: async () => [], canbusNodes: async () => [],
    };
    const engine = new FlashEngine({ config, printer, runner: new JobRunner({ dataDir: fx.dataDir, logger }), logger });
    const plan = await engine.plan({ mcu: "mcu" });
    expect(plan.methods).toEqual(["make"]);
    expect(plan.target.kconfig).toBe(path.join(fx.profileDir, "boards", "flash.config"));
  });

  it("reads the architecture and CONFIG_MCU of a profile", () => {
    expect(parseProfile(STM32_PROFILE).arch?.symbol).toBe("MACH_STM32");
    expect(parseProfile('CONFIG_MACH_RPXXXX=y\nCONFIG_MCU="rp2040"\n')).toMatchObject({ arch: { symbol: "MACH_RPXXXX", compiler: "arm-none-eabi-gcc" }, mcu: "rp2040" });
    expect(parseProfile("CONFIG_MACH_LINUX=y\n").arch).toMatchObject({ compiler: "gcc", images: ["klipper.elf"] });
    expect(parseProfile("# CONFIG_MACH_STM32 is not set\nCONFIG_MACH_STM32=n\n").arch).toBeNull();
  });
});

describe("MISSING_CONFIG before make", () => {
  it("the trap is real: the fake tree's make olddefconfig silently writes an atmega2560 config for a missing file", async () => {
    const missing = path.join(fx.root, "trap", "nothing-here.config");
    await mkdir(path.dirname(missing), { recursive: true });
    const result = await execa("make", ["olddefconfig", `KCONFIG_CONFIG=${missing}`, `OUT=${fx.root}/trap-out/`], { cwd: fx.klipperPath });
    expect(result.exitCode).toBe(0);
    const invented = await readFile(missing, "utf8");
    expect(invented).toContain("CONFIG_MACH_atmega2560=y");
  });

  it("refuses a kconfig: that does not exist, runs no make and creates no file", async () => {
    await fx.writeConf("[mcu]\nkconfig: octopus.config\n");
    const { builder, events } = await fx.builder();
    const err = await rejection(builder.build("mcu"));
    expect(err.code).toBe("MISSING_CONFIG");
    expect(err.message).toContain(path.join(fx.profileDir, "octopus.config"));
    expect(err.message).toContain("moonflash config mcu");
    expect(err.details).toMatchObject({ mcu: "mcu", from: "kconfig" });
    expect(await exists(path.join(fx.profileDir, "octopus.config"))).toBe(false);
    expect(await exists(record)).toBe(false);
    expect(events.filter((e) => e.type === "stage").map((e) => (e as { stage: string }).stage)).not.toContain("olddefconfig");
    expect(events.at(-1)).toMatchObject({ type: "result", ok: false, code: "MISSING_CONFIG", kind: "flash", target: "mcu" });
  });

  it("refuses the default profile of a section without kconfig: when it is missing", async () => {
    await fx.writeConf("[mcu toolhead]\n");
    const { builder } = await fx.builder();
    const err = await rejection(builder.build("toolhead"));
    expect(err.code).toBe("MISSING_CONFIG");
    expect(err.details).toMatchObject({ mcu: "mcu toolhead", profile: path.join(fx.profileDir, "toolhead.config"), from: "default" });
    expect(await exists(path.join(fx.profileDir, "toolhead.config"))).toBe(false);
  });

  it("refuses an empty profile and one without an architecture: olddefconfig would fill them with atmega2560", async () => {
    await fx.writeConf("[mcu]\nkconfig: empty.config\n[mcu toolhead]\nkconfig: commented.config\n");
    await fx.writeProfile("empty.config", "");
    await fx.writeProfile("commented.config", "# CONFIG_MACH_STM32 is not set\nCONFIG_USB_SERIAL_NUMBER=\"123\"\n");
    const { builder } = await fx.builder();
    for (const mcu of ["mcu", "toolhead"]) {
      const err = await rejection(builder.build(mcu));
      expect(err.code).toBe("MISSING_CONFIG");
      expect(err.message).toContain("selects no processor architecture");
      expect(err.message).toContain("atmega2560");
    }
    expect(await readFile(path.join(fx.profileDir, "empty.config"), "utf8")).toBe("");
    expect(await exists(record)).toBe(false);
  });

  it("refuses a directory where the profile should be", async () => {
    await fx.writeConf("[mcu]\nkconfig: a-directory\n");
    await mkdir(path.join(fx.profileDir, "a-directory"), { recursive: true });
    const { builder } = await fx.builder();
    const err = await rejection(builder.build("mcu"));
    expect(err.code).toBe("MISSING_CONFIG");
    expect(err.message).toContain("is a directory");
  });

  it("build without names builds the sections with a profile, lists the others, and is MISSING_CONFIG when none has one", async () => {
    await fx.writeConf("[mcu]\n[mcu toolhead]\n");
    const { builder } = await fx.builder();
    const none = await rejection(builder.buildMany());
    expect(none.code).toBe("MISSING_CONFIG");
    expect(none.details).toMatchObject({ withoutProfile: ["mcu", "mcu toolhead"] });

    await fx.writeProfile("toolhead.config", STM32_PROFILE);
    const result = await builder.buildMany();
    expect(result.failed).toEqual([]);
    expect(result.builds.map((b) => b.mcu)).toEqual(["mcu toolhead"]);
    expect(result.withoutProfile).toEqual(["mcu"]);
  });
});
