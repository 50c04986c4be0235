// Shared setup of the firmware build tests: a temp data dir, a copy of the fake Klipper tree as klipper_path (made a
// git checkout with a tag on request, for a real `git describe`), and fake cross-compilers on PATH that print a
// version line (the fake tree compiles nothing), so the tests need no real toolchain.

import { cp, mkdir, mkdtemp, readFile, rm, symlink, writeFile, chmod } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { execa } from "execa";
import pino from "pino";
import { findExecutable } from "../../../src/core/tool.js";
import { JobRunner } from "../../../src/core/jobs.js";
import type { JobEvent } from "../../../src/core/events.js";
import { parseConfig } from "../../../src/moonflash-conf.js";
import { FirmwareBuilder } from "../../../src/flash/build/builder.js";

export const fakeKlipperTree = fileURLToPath(new URL("../../fixtures/klipper-tree/", import.meta.url));

/** The compilers the fake bin dir provides; each prints "<name> (fake) <version>" like gcc's first --version line. */
export const FAKE_COMPILERS = ["arm-none-eabi-gcc", "avr-gcc", "gcc"];

export interface BuildFixture {
  /** The temp root; removed by cleanup(). */
  root: string;
  dataDir: string;
  klipperPath: string;
  /** Fake compilers (first on PATH once usePath() ran). */
  bin: string;
  /** <data>/config/moonflash. */
  profileDir: string;
  /** Writes moonflash.conf with [moonflash] klipper_path and the given sections. */
  writeConf(sections: string): Promise<void>;
  /** Writes a profile into the profile dir (or at an absolute path). */
  writeProfile(name: string, text: string): Promise<string>;
  /** Sets the version the fake compilers report. */
  setCompilerVersion(version: string): Promise<void>;
  /** Makes klipper_path a git checkout with one commit tagged `tag`. */
  gitInit(tag?: string): Promise<string>;
  /** A builder over the current moonflash.conf, with the events of its jobs collected. */
  builder(): Promise<{ builder: FirmwareBuilder; runner: JobRunner; events: JobEvent[] }>;
  cleanup(): Promise<void>;
}

export async function createBuildFixture(name: string): Promise<BuildFixture> {
  const root = await mkdtemp(path.join(os.tmpdir(), `moonflash-${name}-`));
  const dataDir = path.join(root, "data");
  const klipperPath = path.join(root, "klipper");
  const bin = path.join(root, "bin");
  const profileDir = path.join(dataDir, "config", "moonflash");
  await mkdir(profileDir, { recursive: true });
  await cp(fakeKlipperTree, klipperPath, { recursive: true });
  await mkdir(bin);
  await writeFile(path.join(bin, "gcc-version"), "12.2.1 20221205\n");
  for (const compiler of FAKE_COMPILERS) {
    const script = path.join(bin, compiler);
    await writeFile(script, `#!/bin/sh\nprintf '%s (fake) %s\\n' "$(basename "$0")" "$(cat "$(dirname "$0")/gcc-version")"\n`);
    await chmod(script, 0o755);
  }
  const fixture: BuildFixture = {
    root,
    dataDir,
    klipperPath,
    bin,
    profileDir,
    async writeConf(sections) {
      await writeFile(path.join(dataDir, "config", "moonflash.conf"), `[moonflash]\nklipper_path: ${klipperPath}\n\n${sections}`);
    },
    async writeProfile(file, text) {
      const target = path.isAbsolute(file) ? file : path.join(profileDir, file);
      await mkdir(path.dirname(target), { recursive: true });
      await writeFile(target, text);
      return target;
    },
    async setCompilerVersion(version) {
      await writeFile(path.join(bin, "gcc-version"), `${version}\n`);
    },
    async gitInit(tag = "v0.13.0") {
      const git = (...args: string[]) => execa("git", ["-c", "user.email=test@moonflash", "-c", "user.name=moonflash test", ...args], { cwd: klipperPath });
      await git("init", "-q");
      await git("add", "-A");
      await git("commit", "-q", "-m", "fake klipper");
      await git("tag", tag);
      return (await git("describe", "--always", "--tags", "--long", "--dirty")).stdout.trim();
    },
    async builder() {
      const config = parseConfig(await readFile(path.join(dataDir, "config", "moonflash.conf"), "utf8"), path.join(dataDir, "config", "moonflash.conf"), dataDir);
      const logger = pino({ level: "silent" });
      const runner = new JobRunner({ dataDir, logger });
      const events: JobEvent[] = [];
      runner.on((event) => events.push(event));
      return { builder: new FirmwareBuilder({ settings: config, runner, logger, jobs: 2 }), runner, events };
    },
    async cleanup() {
      await rm(root, { recursive: true, force: true });
    },
  };
  return fixture;
}

/** A directory with links to just these tools (found on the current PATH): a PATH without everything else. */
export async function pathWith(root: string, tools: readonly string[]): Promise<string> {
  const dir = await mkdtemp(path.join(root, "path-"));
  for (const tool of tools) {
    const found = await findExecutable(tool);
    if (!found) throw new Error(`${tool} is not on PATH`);
    await symlink(found, path.join(dir, tool));
  }
  return dir;
}

export const STM32_PROFILE = "CONFIG_MACH_STM32=y\nCONFIG_MACH_STM32F446=y\nCONFIG_STM32_FLASH_START_8000=y\nCONFIG_STM32_USB_PA11_PA12=y\n";
export const RP2040_PROFILE = "CONFIG_MACH_RPXXXX=y\nCONFIG_MACH_RP2040=y\nCONFIG_RPXXXX_FLASH_START_4000=y\nCONFIG_RPXXXX_USB=y\n";
export const LINUX_PROFILE = "CONFIG_MACH_LINUX=y\n";
