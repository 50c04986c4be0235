// `moonflash config` and `moonflash build` as real child processes (from source through tsx) on a copy of the fake
// Klipper tree: importing, suggesting (with Klipper's MCU type through a fake Moonraker) and menuconfig-ing a profile,
// then building it end to end, skipping it the second time, and the errors a user sees with their exit codes.

import { mkdir, readFile, stat, writeFile } from "node:fs/promises";
import path from "node:path";
import { execa } from "execa";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { startFakeMoonraker, type FakeMoonraker } from "../support/fake-moonraker/index.js";
import { createBuildFixture, LINUX_PROFILE, pathWith, STM32_PROFILE, type BuildFixture } from "../flash/support/build-fixture.js";

const repo = path.resolve(import.meta.dirname, "../..");

let fx: BuildFixture;
let moonraker: FakeMoonraker | null = null;

function cli(args: string[], opts: { path?: string } = {}) {
  return execa(process.execPath, ["--import", "tsx", path.join(repo, "src/cli/main.ts"), ...args, "--data", fx.dataDir], {
    cwd: repo,
    reject: false,
    timeout: 60_000,
    env: { NO_COLOR: "1", PATH: opts.path ?? `${fx.bin}${path.delimiter}${process.env.PATH}` },
  });
}

beforeEach(async () => {
  fx = await createBuildFixture("cli-build");
});

afterEach(async () => {
  await moonraker?.stop();
  moonraker = null;
  await fx.cleanup();
});

describe("moonflash config", () => {
  it("--import copies a saved .config in as the profile, keeping a different previous one as .old", async () => {
    await fx.writeConf("[mcu toolhead]\n");
    const saved = path.join(fx.root, "saved.config");
    await writeFile(saved, `${STM32_PROFILE}CONFIG_MCU="stm32f446xx"\n`);
    const first = await cli(["config", "toolhead", "--import", saved]);
    expect(first.stderr).toBe("");
    expect(first.exitCode).toBe(0);
    const profile = path.join(fx.profileDir, "toolhead.config");
    expect(first.stdout).toContain(`saved ${profile} (STM32, stm32f446xx) from ${saved}`);
    expect(await readFile(profile, "utf8")).toBe(`${STM32_PROFILE}CONFIG_MCU="stm32f446xx"\n`);

    await writeFile(saved, LINUX_PROFILE);
    const second = await cli(["config", "toolhead", "--import", saved]);
    expect(second.exitCode).toBe(0);
    expect(second.stdout).toContain(`the previous profile is kept as ${profile}.old`);
    expect(await readFile(profile, "utf8")).toBe(LINUX_PROFILE);
    expect(await readFile(`${profile}.old`, "utf8")).toContain("CONFIG_MACH_STM32F446=y");
  });

  it("--import refuses a file that is not a Klipper .config (exit 2), and --write without --suggest", async () => {
    await fx.writeConf("[mcu]\n");
    const notConfig = path.join(fx.root, "notes.txt");
    await writeFile(notConfig, "hello\n");
    const bad = await cli(["config", "mcu", "--import", notConfig]);
    expect(bad.exitCode).toBe(2);
    expect(bad.stderr).toContain("is not a Klipper .config");
    expect(bad.stderr).toContain("[INVALID_PARAMS]");
    await expect(stat(path.join(fx.profileDir, "mcu.config"))).rejects.toMatchObject({ code: "ENOENT" });
    expect((await cli(["config", "mcu", "--write"])).exitCode).toBe(2);
  });

  it("--suggest prints a profile from Klipper's MCU type and the device, writing nothing; --write saves it", async () => {
    // The board's serial link is named as udev names a Klipper USB board; nothing else tells its connection here.
    const byId = path.join(fx.root, "usb-Klipper_rp2040_E6626005A7-if00");
    await writeFile(byId, "");
    await fx.writeConf("[mcu toolhead]\nkconfig: ebb.config\n");
    moonraker = await startFakeMoonraker({
      dataDir: fx.dataDir,
      klipper: { mcus: [{ section: "mcu toolhead", settings: { serial: byId }, mcu_constants: { MCU: "rp2040" } }] },
    });

    const shown = await cli(["config", "toolhead", "--suggest"]);
    expect(shown.exitCode).toBe(0);
    expect(shown.stdout).toContain("# MCU type rp2040, from Klipper's mcu_constants.MCU (through Moonraker)");
    expect(shown.stdout).toContain(`# Connection: USB, from ${byId} (by-id name)`);
    expect(shown.stdout).toMatch(/# GUESSED: 16KiB bootloader.*\nCONFIG_RPXXXX_FLASH_START_4000=y\n/);
    // The connection is known: USB is not marked as a guess.
    expect(shown.stdout).toMatch(/\nCONFIG_RPXXXX_FLASH_START_4000=y\nCONFIG_RPXXXX_USB=y$/);
    expect(shown.stderr).toContain("1 option(s) are guessed");
    expect(shown.stderr).toContain("Nothing was written");
    await expect(stat(path.join(fx.profileDir, "ebb.config"))).rejects.toMatchObject({ code: "ENOENT" });

    const written = await cli(["config", "toolhead", "--suggest", "--write"]);
    expect(written.exitCode).toBe(0);
    expect(written.stderr).toContain(`saved to ${path.join(fx.profileDir, "ebb.config")}`);
    expect(await readFile(path.join(fx.profileDir, "ebb.config"), "utf8")).toBe(`${written.stdout}\n`);
    expect(moonraker.serviceActions).toEqual([]);
  });

  it("--suggest without Moonraker takes mcu_type: from moonflash.conf, and says when it knows no MCU type", async () => {
    await fx.writeConf("[mcu]\nmcu_type: stm32f446xx\nserial: /dev/serial/by-id/usb-Klipper_stm32f446xx_1A0033-if00\n[mcu bed]\n");
    const shown = await cli(["config", "mcu", "--suggest", "--write"]);
    expect(shown.exitCode).toBe(0);
    expect(shown.stdout).toContain("# MCU type stm32f446xx, from mcu_type: in [mcu] of moonflash.conf");
    expect(await readFile(path.join(fx.profileDir, "mcu.config"), "utf8")).toContain("CONFIG_MACH_STM32F446=y");

    const none = await cli(["config", "bed", "--suggest"]);
    expect(none.exitCode).toBe(1);
    expect(none.stderr).toContain("The MCU type of [mcu bed] is not known");
  });

  it("without options runs Klipper's make menuconfig with KCONFIG_CONFIG and OUT, creating the profile directory", async () => {
    await fx.writeConf("[mcu]\n");
    await execa("rm", ["-rf", fx.profileDir]);
    const result = await cli(["config", "mcu"]);
    expect(result.exitCode).toBe(0);
    const profile = path.join(fx.profileDir, "mcu.config");
    expect(result.stdout).toContain(`No profile at ${profile} yet`);
    expect(result.stdout).toContain(`Configuration saved to '${profile}' (fake menuconfig, OUT=${path.join(fx.dataDir, "moonflash", "build", "mcu")}/)`);
    expect(result.stdout).toContain(`saved ${profile} (STM32)`);
    expect(await readFile(profile, "utf8")).toContain("CONFIG_MACH_STM32F446=y");
  });
});

describe("moonflash build", () => {
  it("builds every MCU with a profile end to end, then skips them when nothing changed", async () => {
    const version = await fx.gitInit("v0.13.0");
    await fx.writeConf("[mcu]\nkconfig: octopus.config\n[mcu host]\n[mcu bed]\n");
    await fx.writeProfile("octopus.config", STM32_PROFILE);
    await fx.writeProfile("host.config", LINUX_PROFILE);

    const first = await cli(["build"]);
    expect(first.stderr).toBe("");
    expect(first.exitCode).toBe(0);
    const out = (name: string, image: string) => path.join(fx.dataDir, "moonflash", "build", name, image);
    expect(first.stdout).toContain(`  Compiling ${path.dirname(out("mcu", "x"))}/src/sched.o`);
    expect(first.stdout).toMatch(new RegExp(`✓ \\[mcu\\] built ${out("mcu", "klipper.bin")} \\(\\d+\\.\\d KiB\\), version ${version} in \\d+\\.\\d s`));
    expect(first.stdout).toContain(`✓ [mcu host] built ${out("mcu_host", "klipper.elf")}`);
    expect(first.stdout).toContain("- [mcu bed] has no firmware profile (moonflash config bed makes one)");

    const second = await cli(["build", "--json"]);
    expect(second.exitCode).toBe(0);
    const lines = second.stdout.trim().split("\n").map((l) => JSON.parse(l) as Record<string, unknown>);
    const result = lines.at(-1) as { ok: boolean; result: { builds: Array<{ mcu: string; skipped: boolean; version: string }> } };
    expect(result.ok).toBe(true);
    expect(result.result.builds.map((b) => [b.mcu, b.skipped, b.version])).toEqual([["mcu", true, version], ["mcu host", true, version]]);
    expect(lines.some((l) => l.type === "stage" && l.stage === "unchanged")).toBe(true);

    const forced = await cli(["build", "mcu", "--force"]);
    expect(forced.stdout).toContain("✓ [mcu] built");
  });

  it("exits 1 with MISSING_CONFIG, BUILD_FAILED or TOOL_NOT_FOUND (naming the package), building what it can", async () => {
    await fx.writeConf("[mcu]\nkconfig: octopus.config\n[mcu toolhead]\nkconfig: missing.config\n[mcu broken]\n");
    await fx.writeProfile("octopus.config", STM32_PROFILE);
    await fx.writeProfile("broken.config", `${STM32_PROFILE}CONFIG_FAKE_BUILD_FAIL=y\n`);

    const some = await cli(["build"]);
    expect(some.exitCode).toBe(1);
    expect(some.stdout).toContain("✓ [mcu] built");
    expect(some.stderr).toContain("✗ [mcu toolhead] The firmware profile");
    expect(some.stderr).toContain("[MISSING_CONFIG]");
    expect(some.stderr).toContain("✗ [mcu broken] make failed for [mcu broken] (exit 2): src/fake.c:60: error: fake compiler error number 60");
    expect(some.stderr).toContain("[BUILD_FAILED]");

    const noCompiler = await cli(["build", "mcu"], { path: await pathWith(fx.root, ["make", "nice", "git"]) });
    expect(noCompiler.exitCode).toBe(1);
    expect(noCompiler.stderr).toContain("arm-none-eabi-gcc (the compiler for STM32 builds of [mcu]) is not installed");
    expect(noCompiler.stderr).toContain("sudo apt install gcc-arm-none-eabi");
    expect(noCompiler.stderr).toContain("[TOOL_NOT_FOUND]");
  });

  it("gets BUSY while another moonflash job holds the lock", async () => {
    await fx.writeConf("[mcu]\nkconfig: octopus.config\n");
    await fx.writeProfile("octopus.config", STM32_PROFILE);
    const { acquireJobLock } = await import("../../src/core/lock.js");
    await mkdir(path.join(fx.dataDir, "moonflash"), { recursive: true });
    const lock = await acquireJobLock(path.join(fx.dataDir, "moonflash", "job.lock"), { jobId: "flash-test-1", kind: "flash", target: "mcu toolhead", pid: process.pid, startedAt: new Date().toISOString() });
    try {
      const busy = await cli(["build", "mcu"]);
      expect(busy.exitCode).toBe(1);
      expect(busy.stderr).toContain("[BUSY]");
    } finally {
      await lock.release();
    }
  });
});
