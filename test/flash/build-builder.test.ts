// FirmwareBuilder running real GNU make on a copy of the fake Klipper tree (test/fixtures/klipper-tree): per-MCU OUT
// dirs, KCONFIG_CONFIG, nice, skipping unchanged inputs, clean rebuilds, versions from a real `git describe`,
// BUILD_FAILED with the last 40 lines, and TOOL_NOT_FOUND naming the Debian package when the compiler is missing.

import { readFile, stat, writeFile } from "node:fs/promises";
import path from "node:path";
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from "vitest";
import type { JobEvent } from "../../src/core/events.js";
import { rejection } from "./support/rejection.js";
import { createBuildFixture, LINUX_PROFILE, pathWith, RP2040_PROFILE, STM32_PROFILE, type BuildFixture } from "./support/build-fixture.js";

let fx: BuildFixture;
let describeVersion: string;
const originalPath = process.env.PATH;

beforeAll(async () => {
  fx = await createBuildFixture("builder");
  process.env.PATH = `${fx.bin}${path.delimiter}${originalPath}`;
  describeVersion = await fx.gitInit("v0.13.0");
});

beforeEach(async () => {
  await fx.setCompilerVersion("12.2.1 20221205");
  await fx.writeConf("[mcu]\nkconfig: octopus.config\n[mcu toolhead]\nkconfig: toolhead.config\n[mcu host]\nkconfig: host.config\n");
  await fx.writeProfile("octopus.config", STM32_PROFILE);
  await fx.writeProfile("toolhead.config", RP2040_PROFILE);
  await fx.writeProfile("host.config", LINUX_PROFILE);
});

afterEach(() => {
  process.env.PATH = `${fx.bin}${path.delimiter}${originalPath}`;
});

afterAll(async () => {
  process.env.PATH = originalPath;
  await fx.cleanup();
});

const buildDir = (name: string) => path.join(fx.dataDir, "moonflash", "build", name);
const readInfo = async (name: string): Promise<Record<string, string>> =>
  Object.fromEntries((await readFile(path.join(buildDir(name), "build-info.txt"), "utf8")).trim().split("\n").map((l) => [l.slice(0, l.indexOf("=")), l.slice(l.indexOf("=") + 1)]));
const stages = (events: JobEvent[]) => events.flatMap((e) => (e.type === "stage" ? [e.stage] : []));
const logs = (events: JobEvent[]) => events.flatMap((e) => (e.type === "log" ? [e] : []));

describe("FirmwareBuilder", () => {
  it("builds each MCU into its own OUT with its own KCONFIG_CONFIG, at nice 10, and reports image and version", async () => {
    const { builder, events } = await fx.builder();
    const { builds, failed } = await builder.buildMany(["mcu", "toolhead", "host"], { force: true });
    expect(failed).toEqual([]);
    const [f446, rp2040, host] = builds;

    expect(f446).toMatchObject({
      mcu: "mcu",
      image: path.join(buildDir("mcu"), "klipper.bin"),
      version: describeVersion,
      klipperVersion: describeVersion,
      toolchain: "arm-none-eabi-gcc (fake) 12.2.1 20221205",
      skipped: false,
      warnings: [],
      outDir: `${buildDir("mcu")}/`,
      profile: path.join(fx.profileDir, "octopus.config"),
    });
    expect(rp2040).toMatchObject({ mcu: "mcu toolhead", image: path.join(buildDir("mcu_toolhead"), "klipper.bin"), version: describeVersion });
    // The Linux host MCU's image is klipper.elf, built by the host's gcc.
    expect(host).toMatchObject({ mcu: "mcu host", image: path.join(buildDir("mcu_host"), "klipper.elf"), toolchain: "gcc (fake) 12.2.1 20221205" });
    for (const b of builds) expect(b.elapsedMs).toBeGreaterThan(0);

    // The image carries the version the firmware will report; each build used its own profile and OUT.
    expect((await readFile(f446!.image, "utf8")).split("\n")[0]).toBe(`FAKE-KLIPPER version=${describeVersion}`);
    expect(await readFile(f446!.image, "utf8")).toContain("CONFIG_MACH_STM32F446=y");
    expect(await readFile(rp2040!.image, "utf8")).toContain("CONFIG_MACH_RP2040=y");
    const info = await readInfo("mcu");
    expect(info).toMatchObject({ KCONFIG_CONFIG: path.join(fx.profileDir, "octopus.config"), OUT: `${buildDir("mcu")}/` });
    expect(info.MAKEFLAGS).toMatch(/(^|\s)-j2(\s|$)/);
    expect(Number(info.NICENESS)).toBeGreaterThanOrEqual(10);
    expect((await readInfo("mcu_toolhead")).KCONFIG_CONFIG).toBe(path.join(fx.profileDir, "toolhead.config"));

    // One job per MCU, kind flash, target the section; make's output streams into the job log.
    const results = events.filter((e) => e.type === "result");
    expect(results.map((e) => [e.kind, e.target, (e as { ok: boolean }).ok])).toEqual([["flash", "mcu", true], ["flash", "mcu toolhead", true], ["flash", "mcu host", true]]);
    const mcuEvents = events.filter((e) => e.target === "mcu");
    expect(stages(mcuEvents)).toEqual(["started", "profile", "olddefconfig", "clean", "compile", "built"]);
    expect(logs(mcuEvents).map((l) => l.message)).toContain(`  Compiling ${buildDir("mcu")}/src/sched.o`);
    expect(logs(mcuEvents).map((l) => l.message)).toContain(`Version: ${describeVersion}`);

    // build.json in OUT says what the image was built from.
    const record = JSON.parse(await readFile(path.join(buildDir("mcu"), "build.json"), "utf8")) as Record<string, unknown>;
    expect(record).toMatchObject({ mcu: "mcu", klipperVersion: describeVersion, image: f446!.image, sha256: f446!.sha256, version: describeVersion, compileSteps: 9 });
  });

  it("skips a build whose profile, Klipper version and compiler are unchanged, without running make's build", async () => {
    const { builder } = await fx.builder();
    const first = await builder.build("mcu", { force: true });
    const before = await stat(first.image);
    const { builder: again, events } = await fx.builder();
    const second = await again.build("mcu");
    expect(second).toMatchObject({ skipped: true, image: first.image, sha256: first.sha256, version: describeVersion });
    expect(stages(events)).toEqual(["started", "profile", "olddefconfig", "unchanged"]);
    expect((await stat(first.image)).mtimeMs).toBe(before.mtimeMs);
    expect(logs(events).some((l) => l.message.includes("Compiling"))).toBe(false);
    // Progress from the previous build's count of compile steps is for the next real build.
    const forced = await again.build("mcu", { force: true });
    expect(forced.skipped).toBe(false);
  });

  it("rebuilds from an empty OUT when the profile changes, and when the compiler version changes", async () => {
    const { builder, events } = await fx.builder();
    const first = await builder.build("mcu");
    const stray = path.join(buildDir("mcu"), "src", "stale-object.o");
    await writeFile(stray, "left over from another profile\n");

    await fx.writeProfile("octopus.config", STM32_PROFILE.replace("FLASH_START_8000", "FLASH_START_10000"));
    const changed = await builder.build("mcu");
    expect(changed.skipped).toBe(false);
    expect(changed.sha256).not.toBe(first.sha256);
    expect(await readFile(changed.image, "utf8")).toContain("CONFIG_STM32_FLASH_START_10000=y");
    await expect(stat(stray)).rejects.toMatchObject({ code: "ENOENT" });
    // The 9 compile steps of the first build are the progress total of the second.
    expect(events.filter((e) => e.type === "progress").at(-1)).toMatchObject({ done: 9, total: 9, unit: "steps", phase: "compile" });

    expect((await builder.build("mcu")).skipped).toBe(true);
    await fx.setCompilerVersion("13.3.1 20240614");
    const newCompiler = await builder.build("mcu");
    expect(newCompiler).toMatchObject({ skipped: false, toolchain: "arm-none-eabi-gcc (fake) 13.3.1 20240614" });
  });

  it("warns on a dirty Klipper tree, never skips it, and records the version the firmware will really report", async () => {
    const { builder } = await fx.builder();
    await builder.build("mcu");
    const touched = path.join(fx.klipperPath, "Makefile");
    const original = await readFile(touched, "utf8");
    await writeFile(touched, `${original}\n# a local change\n`);
    try {
      const dirty = await builder.build("mcu");
      expect(dirty.skipped).toBe(false);
      expect(dirty.klipperVersion).toBe(`${describeVersion}-dirty`);
      expect(dirty.warnings.join("\n")).toContain("has local changes");
      // scripts/buildcommands.py appends build time and host to a dirty version: klipper.dict has what the MCU reports.
      expect(dirty.version).toMatch(new RegExp(`^${describeVersion}-dirty-\\d{8}_\\d{6}-`));
      expect((await builder.build("mcu")).skipped).toBe(false);
    } finally {
      await writeFile(touched, original);
    }
  });

  it("warns when klipper_path is not a git checkout (its version cannot be matched) and builds every time", async () => {
    const plain = await createBuildFixture("builder-plain");
    try {
      process.env.PATH = `${plain.bin}${path.delimiter}${originalPath}`;
      await writeFile(path.join(plain.klipperPath, "VERSION"), "v0.13.0-tarball\n");
      await plain.writeConf("[mcu]\nkconfig: octopus.config\n");
      await plain.writeProfile("octopus.config", STM32_PROFILE);
      const { builder } = await plain.builder();
      const first = await builder.build("mcu");
      expect(first.klipperVersion).toBeNull();
      expect(first.warnings).toEqual([expect.stringContaining("is not a git checkout")]);
      expect(first.version).toMatch(/^v0\.13\.0-tarball-\d{8}_\d{6}-/);
      expect((await builder.build("mcu")).skipped).toBe(false);
    } finally {
      await plain.cleanup();
    }
  });

  it("fails with BUILD_FAILED and the last 40 lines of make's output when the build fails", async () => {
    await fx.writeProfile("octopus.config", `${STM32_PROFILE}CONFIG_FAKE_BUILD_FAIL=y\n`);
    const { builder, events } = await fx.builder();
    const err = await rejection(builder.build("mcu"));
    expect(err.code).toBe("BUILD_FAILED");
    expect(err.message).toContain("make failed for [mcu] (exit 2)");
    // The compiler's last error, not make's closing "make: *** … Error 1".
    expect(err.message).toContain("src/fake.c:60: error: fake compiler error number 60");
    const lastLines = err.details.lastLines as string[];
    expect(lastLines).toHaveLength(40);
    expect(lastLines[0]).toBe("src/fake.c:22: error: fake compiler error number 22");
    expect(lastLines.at(-2)).toBe("src/fake.c:60: error: fake compiler error number 60");
    expect(lastLines.at(-1)).toMatch(/^make: \*\*\* \[Makefile:\d+: all\] Error 1$/);
    expect(err.details).toMatchObject({ mcu: "mcu", step: "make", exitCode: 2, profile: path.join(fx.profileDir, "octopus.config") });
    // Every line reached the job log, and the result carries the code.
    expect(logs(events).filter((l) => l.message.includes("fake compiler error")).length).toBe(60);
    expect(events.at(-1)).toMatchObject({ type: "result", ok: false, code: "BUILD_FAILED" });
    // A failed build leaves no record: the next one builds again.
    await expect(stat(path.join(buildDir("mcu"), "build.json"))).rejects.toMatchObject({ code: "ENOENT" });
  });

  it("fails with BUILD_FAILED when olddefconfig turns the profile into another architecture (one from another Klipper)", async () => {
    // The fake tree's Kconfig has no HC32F460, as an older Klipper would not: olddefconfig falls back to atmega2560.
    await fx.writeProfile("octopus.config", "CONFIG_MACH_HC32F460=y\n");
    const { builder } = await fx.builder();
    const err = await rejection(builder.build("mcu"));
    expect(err.code).toBe("BUILD_FAILED");
    expect(err.message).toContain("from HC32F460 into AVR");
    expect(err.message).toContain(`${path.join(fx.profileDir, "octopus.config")}.old`);
    expect(await readFile(`${path.join(fx.profileDir, "octopus.config")}.old`, "utf8")).toBe("CONFIG_MACH_HC32F460=y\n");
  });

  it("fails with TOOL_NOT_FOUND naming the Debian package when the cross-compiler is not on PATH, before make runs", async () => {
    process.env.PATH = await pathWith(fx.root, ["make", "nice", "git"]);
    const { builder, events } = await fx.builder();
    const arm = await rejection(builder.build("mcu"));
    expect(arm.code).toBe("TOOL_NOT_FOUND");
    expect(arm.message).toContain("arm-none-eabi-gcc");
    expect(arm.message).toContain("sudo apt install gcc-arm-none-eabi binutils-arm-none-eabi libnewlib-arm-none-eabi");
    expect(arm.details).toMatchObject({ command: "arm-none-eabi-gcc", packages: ["gcc-arm-none-eabi", "binutils-arm-none-eabi", "libnewlib-arm-none-eabi"] });
    expect(stages(events)).not.toContain("olddefconfig");

    await fx.writeProfile("octopus.config", "CONFIG_MACH_AVR=y\nCONFIG_MACH_atmega2560=y\n");
    const avr = await rejection(builder.build("mcu"));
    expect(avr.message).toContain("avr-gcc");
    expect(avr.message).toContain("gcc-avr");
  });

  it("builds the AVR image klipper.elf.hex with avr-gcc", async () => {
    await fx.writeProfile("octopus.config", "CONFIG_MACH_AVR=y\nCONFIG_MACH_atmega2560=y\n");
    const { builder } = await fx.builder();
    const avr = await builder.build("mcu");
    expect(avr).toMatchObject({ image: path.join(buildDir("mcu"), "klipper.elf.hex"), toolchain: "avr-gcc (fake) 12.2.1 20221205" });
  });

  it("is cancellable: the build job stops make and the next build starts clean", async () => {
    await fx.writeProfile("octopus.config", `${STM32_PROFILE}CONFIG_FAKE_SLOW=y\n`);
    const slowTree = path.join(fx.klipperPath, "Makefile");
    const original = await readFile(slowTree, "utf8");
    // A recipe that outlasts the cancel: the fake compiles nothing slowly by itself.
    await writeFile(slowTree, original.replace("@mkdir -p \"$(OUT)src\"", "@mkdir -p \"$(OUT)src\"; if grep -q '^CONFIG_FAKE_SLOW=y' \"$(KCONFIG_CONFIG)\"; then sleep 30; fi"));
    try {
      const { builder, runner } = await fx.builder();
      const running = builder.build("mcu");
      for (let i = 0; i < 200 && runner.current()?.stage !== "compile"; i++) await new Promise((r) => setTimeout(r, 25));
      runner.cancel("flash");
      const err = await rejection(running);
      expect(err.code).toBe("CANCELLED");
      await expect(stat(path.join(buildDir("mcu"), "build.json"))).rejects.toMatchObject({ code: "ENOENT" });
    } finally {
      await writeFile(slowTree, original);
    }
  });
});
