// Builds Klipper firmware per MCU from its profile (profiles.ts), in the user's Klipper tree: `make olddefconfig`, then
// `make -j<cores>`, each with KCONFIG_CONFIG=<profile> and OUT=<data>/moonflash/build/<mcu>/ so boards never share
// objects (Klipper's Makefile takes both from the command line). Builds run under `nice -n 10` and never touch
// Klipper's service: a print goes on while firmware compiles. A build whose inputs (profile, Klipper's
// `git describe`, compiler version) are those of the image in OUT is skipped; any other build starts from an empty OUT.

import { existsSync } from "node:fs";
import { readFile, rm, stat } from "node:fs/promises";
import { availableParallelism } from "node:os";
import { join } from "node:path";
import type { Logger } from "pino";
import { writeFileDurable } from "../../core/durable.js";
import { MoonflashError, toMoonflashError, type ErrorCode } from "../../core/errors.js";
import type { JobContext } from "../../core/events.js";
import type { JobRunner } from "../../core/jobs.js";
import { dataPaths } from "../../core/paths.js";
import { findExecutable, runTool, toolErrorDetails } from "../../core/tool.js";
import { firmwareProfileDir, type FlashSettings } from "../config.js";
import { mcuSectionName } from "../engine.js";
import { mcuUserName } from "../mcu-name.js";
import { parseProfile, profileFor, readProfile, type Architecture, type FirmwareProfile } from "./profiles.js";
// node:crypto is loaded on first use (process.getBuiltinModule), not when the agent starts: idle memory.

/** What update-all and `flash.build` get for one MCU. */
export interface FirmwareBuild {
  /** Config section, e.g. "mcu toolhead". */
  mcu: string;
  /** The image to flash: OUT/klipper.bin, klipper.uf2, klipper.elf.hex, or klipper.elf for the Linux host MCU. */
  image: string;
  bytes: number;
  sha256: string;
  /** The version the firmware will report (mcu_version): klipper.dict's, else Klipper's `git describe`. */
  version: string;
  /** True when the image in OUT was built from the same inputs and was kept. */
  skipped: boolean;
  warnings: string[];
  elapsedMs: number;
  profile: string;
  outDir: string;
  /** `git describe --always --tags --long --dirty` of klipper_path; null when it is not a git checkout. */
  klipperVersion: string | null;
  /** First line of the compiler's --version. */
  toolchain: string;
}

/** build.json in OUT: what the image there was built from. */
interface BuildRecord {
  format: 1;
  key: string;
  mcu: string;
  profile: string;
  klipperPath: string;
  klipperVersion: string | null;
  toolchain: string;
  image: string;
  bytes: number;
  sha256: string;
  version: string;
  builtAt: string;
  elapsedMs: number;
  /** "  Compiling …" lines of the build: the next build's progress total. */
  compileSteps: number;
}

export interface BuildFailure {
  mcu: string;
  code: ErrorCode;
  message: string;
  details: Record<string, unknown>;
}

export interface BuildManyResult {
  builds: FirmwareBuild[];
  failed: BuildFailure[];
  /** Sections of moonflash.conf left out for having no profile (only when no names were given). */
  withoutProfile: string[];
}

export interface BuildOptions {
  /** Build even when the inputs are unchanged. */
  force?: boolean;
}

export interface FirmwareBuilderOptions {
  settings: FlashSettings;
  runner: JobRunner;
  logger: Logger;
  /** Parallel make jobs; default the machine's cores. */
  jobs?: number;
  /** make's timeout; default 30 min (a Pi 3 needs several minutes for an STM32 build). */
  timeoutMs?: number;
}

/** Lines of a failed build kept for its error details. */
const TAIL_LINES = 40;
const DEFAULT_TIMEOUT_MS = 30 * 60_000;
const QUICK_TOOL_TIMEOUT_MS = 60_000;
/** Lower CPU priority for make and everything it starts, so Klipper's host process keeps its share while printing. */
const NICENESS = "10";
/** klipper.dict's "version" (scripts/buildcommands.py HandleVersions) is the string the MCU reports. */
const DICT = "klipper.dict";
const RECORD = "build.json";
/** Klipper's make prints one such line per object (Makefile `$(OUT)%.o: %.c`). */
const COMPILING = /^\s*Compiling\s/;

function sha256(data: string | Uint8Array): string {
  return process.getBuiltinModule("node:crypto").createHash("sha256").update(data).digest("hex");
}

function humanBytes(bytes: number): string {
  return bytes >= 1024 ? `${(bytes / 1024).toFixed(1)} KiB` : `${bytes} bytes`;
}

export class FirmwareBuilder {
  private readonly settings: FlashSettings;
  private readonly runner: JobRunner;
  private readonly logger: Logger;
  private readonly jobs: number;
  private readonly timeoutMs: number;

  constructor(opts: FirmwareBuilderOptions) {
    this.settings = opts.settings;
    this.runner = opts.runner;
    this.logger = opts.logger;
    this.jobs = opts.jobs ?? availableParallelism();
    this.timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  }

  /** Where an MCU's profile is (`kconfig:` or <data>/config/moonflash/<name>.config). */
  profile(mcu: string): FirmwareProfile {
    return profileFor(mcuSectionName(mcu), this.settings);
  }

  /** Where an MCU's builds go: <data>/moonflash/build/<mcu>/, with the trailing slash Klipper's OUT needs. */
  outDir(mcu: string): string {
    return `${join(dataPaths(this.settings.dataDir).state, "build", mcuSectionName(mcu).replace(/\s+/g, "_"))}/`;
  }

  /** The MCUs `build` without names builds: every [mcu …] section of moonflash.conf. */
  configuredMcus(): string[] {
    return Object.keys(this.settings.mcus).sort();
  }

  /**
   * Builds several MCUs one after the other, each as its own job; one failing does not stop the others. Without
   * names: every section of moonflash.conf with a profile (a section without kconfig: and without the default
   * profile file only flashes, and is listed in withoutProfile). MISSING_CONFIG when that leaves nothing to build.
   */
  async buildMany(mcus?: readonly string[], opts: BuildOptions = {}): Promise<BuildManyResult> {
    const withoutProfile: string[] = [];
    let sections: string[];
    if (mcus && mcus.length > 0) sections = [...new Set(mcus.map(mcuSectionName))];
    else {
      sections = [];
      for (const section of this.configuredMcus()) {
        const profile = this.profile(section);
        if (profile.from === "kconfig" || existsSync(profile.path)) sections.push(section);
        else withoutProfile.push(section);
      }
      if (sections.length === 0) {
        throw new MoonflashError(
          "MISSING_CONFIG",
          `No MCU has a firmware profile: give an [mcu NAME] section of moonflash.conf a kconfig: file, or save one with \`moonflash config NAME\` (it goes to ${firmwareProfileDir(this.settings.dataDir)}/NAME.config).`,
          { mcus: this.configuredMcus(), withoutProfile },
        );
      }
    }
    const builds: FirmwareBuild[] = [];
    const failed: BuildFailure[] = [];
    for (const section of sections) {
      try {
        builds.push(await this.build(section, opts));
      } catch (err) {
        const e = toMoonflashError(err);
        failed.push({ mcu: section, code: e.code, message: e.message, details: e.details });
      }
    }
    return { builds, failed, withoutProfile };
  }

  /** Builds one MCU as its own job (kind flash, target the section); BUSY while another job runs. */
  async build(mcu: string, opts: BuildOptions = {}): Promise<FirmwareBuild> {
    const section = mcuSectionName(mcu);
    return this.runner.run({ kind: "flash", target: section, params: { action: "build", mcu: section, ...(opts.force ? { force: true } : {}) } }, (ctx) =>
      this.buildWithin(ctx, section, opts),
    );
  }

  /**
   * Builds one MCU inside a job that is already running (update-all's). Refuses, before make runs, a missing
   * profile (MISSING_CONFIG) or compiler (TOOL_NOT_FOUND); a failing make is BUILD_FAILED with its last 40 lines.
   */
  async buildWithin(ctx: JobContext, mcu: string, opts: BuildOptions = {}): Promise<FirmwareBuild> {
    const started = performance.now();
    const section = mcuSectionName(mcu);
    const name = mcuUserName(section);
    const klipperPath = this.settings.moonflash.klipper_path;
    const out = this.outDir(section);
    const warnings: string[] = [];
    const warn = (message: string): void => {
      warnings.push(message);
      ctx.log("warn", message);
    };

    ctx.stage("profile", `building firmware for ${name}`);
    const { profile, arch, text: before } = await readProfile(this.profile(section));
    await this.checkKlipperTree(klipperPath);
    const make = await this.requireTool("make", ["make"], `to build firmware for [${section}]`);
    await this.requireTool("nice", ["coreutils"], `to build firmware for [${section}] at low priority`);
    const compiler = await this.requireTool(arch.compiler, arch.debianPackages, `the compiler for ${arch.name} builds of [${section}]`);

    const common = [`KCONFIG_CONFIG=${profile.path}`, `OUT=${out}`];
    ctx.stage("olddefconfig", `make olddefconfig for ${name}`);
    await this.make(ctx, make, ["olddefconfig", ...common], { section, profile, out, step: "olddefconfig", onLine: () => undefined });
    // olddefconfig rewrites the profile in Kconfig's own words (keeping the old one as <profile>.old); a profile of
    // another Klipper version may lose its architecture choice there (the rp2040 arch became MACH_RPXXXX).
    const text = await readFile(profile.path, "utf8");
    const after = parseProfile(text).arch;
    if (after?.symbol !== arch.symbol) {
      throw new MoonflashError(
        "BUILD_FAILED",
        `make olddefconfig turned the profile ${profile.path} from ${arch.name} into ${after?.name ?? "no architecture"}: it was written for another Klipper version. ` +
          `The previous file is ${profile.path}.old. Open it in menuconfig (moonflash config ${name}) and save it again.`,
        { mcu: section, profile: profile.path, before: arch.symbol, after: after?.symbol ?? null, changed: before !== text },
      );
    }

    const klipperVersion = await this.describeKlipper(klipperPath, warn);
    const toolchain = await this.toolchainVersion(compiler, arch);
    const key = sha256(JSON.stringify({ profile: text, klipperPath, klipperVersion, toolchain }));
    const previous = await this.readRecord(out);
    const reproducible = klipperVersion !== null && !klipperVersion.endsWith("-dirty");

    if (!opts.force && reproducible && previous?.key === key) {
      const kept = await this.keptImage(previous);
      if (kept) {
        ctx.stage("unchanged", `${name}: profile, Klipper ${klipperVersion} and compiler unchanged; keeping ${kept.image}`);
        return { ...this.result(section, kept, profile, out, warnings, started), skipped: true };
      }
    }

    ctx.stage("clean", `removing ${out} for a clean build`);
    await rm(out, { recursive: true, force: true });
    ctx.stage("compile", `make -j${this.jobs} for ${name} (nice ${NICENESS})`);
    let compiled = 0;
    const expected = previous?.compileSteps ?? 0;
    const tail = await this.make(ctx, make, [`-j${this.jobs}`, ...common], {
      section,
      profile,
      out,
      step: "make",
      onLine: (line) => {
        if (!COMPILING.test(line)) return;
        compiled += 1;
        if (expected > 0) ctx.progress(Math.min(compiled, expected), expected, "steps", "compile");
      },
    });
    if (expected > 0) ctx.progress(expected, expected, "steps", "compile");

    const image = await this.findImage(out, arch);
    if (!image) {
      throw new MoonflashError(
        "BUILD_FAILED",
        `make finished for [${section}] but left none of ${arch.images.join(", ")} in ${out}. The last lines of its output are in the details.`,
        { mcu: section, profile: profile.path, outDir: out, expected: [...arch.images], lastLines: tail },
      );
    }
    const bytes = await readFile(image);
    const version = (await this.dictVersion(out)) ?? klipperVersion ?? "?";
    const elapsedMs = Math.round(performance.now() - started);
    const record: BuildRecord = {
      format: 1,
      key,
      mcu: section,
      profile: profile.path,
      klipperPath,
      klipperVersion,
      toolchain,
      image,
      bytes: bytes.length,
      sha256: sha256(bytes),
      version,
      builtAt: new Date().toISOString(),
      elapsedMs,
      compileSteps: compiled,
    };
    await writeFileDurable(join(out, RECORD), `${JSON.stringify(record, null, 2)}\n`);
    ctx.stage("built", `${name}: ${image} (${humanBytes(bytes.length)}), version ${version}`);
    return { ...this.result(section, record, profile, out, warnings, started), skipped: false };
  }

  private result(section: string, record: BuildRecord, profile: FirmwareProfile, out: string, warnings: string[], started: number): Omit<FirmwareBuild, "skipped"> {
    return {
      mcu: section,
      image: record.image,
      bytes: record.bytes,
      sha256: record.sha256,
      version: record.version,
      warnings,
      elapsedMs: Math.round(performance.now() - started),
      profile: profile.path,
      outDir: out,
      klipperVersion: record.klipperVersion,
      toolchain: record.toolchain,
    };
  }

  /** The previous build's record, or null when there is none or it is unreadable (then the build runs). */
  private async readRecord(out: string): Promise<BuildRecord | null> {
    try {
      const record = JSON.parse(await readFile(join(out, RECORD), "utf8")) as Partial<BuildRecord>;
      return record.format === 1 && typeof record.key === "string" && typeof record.image === "string" ? (record as BuildRecord) : null;
    } catch {
      return null;
    }
  }

  /** The recorded image if it is still there, unchanged (a skip must hand out exactly what was built). */
  private async keptImage(record: BuildRecord): Promise<BuildRecord | null> {
    try {
      return sha256(await readFile(record.image)) === record.sha256 ? record : null;
    } catch {
      return null;
    }
  }

  private async checkKlipperTree(klipperPath: string): Promise<void> {
    const isFile = await stat(join(klipperPath, "Makefile")).then((s) => s.isFile(), () => false);
    if (!isFile) {
      throw new MoonflashError(
        "TOOL_NOT_FOUND",
        `No Makefile in ${klipperPath}; set klipper_path in [moonflash] of moonflash.conf to your Klipper checkout.`,
        { klipperPath },
      );
    }
  }

  /** The tool's path on PATH, else TOOL_NOT_FOUND naming the Debian packages that bring it. */
  private async requireTool(command: string, packages: readonly string[] | null, purpose: string): Promise<string> {
    const found = await findExecutable(command);
    if (found) return found;
    const install = packages ? `Install it: sudo apt install ${packages.join(" ")}` : `Install the ${command} toolchain`;
    throw new MoonflashError("TOOL_NOT_FOUND", `${command} (${purpose}) is not installed. ${install}, then build again.`, {
      command,
      packages: packages ? [...packages] : null,
    });
  }

  /**
   * Klipper's `git describe --always --tags --long --dirty`, as scripts/buildcommands.py asks it (only where
   * klipper_path has its own .git). A dirty tree or none gives firmware whose version carries the build time and
   * host, which nothing can match later: warned, and such builds are never skipped.
   */
  private async describeKlipper(klipperPath: string, warn: (message: string) => void): Promise<string | null> {
    if (!existsSync(join(klipperPath, ".git"))) {
      warn(`${klipperPath} is not a git checkout: the firmware's version will not name a Klipper release, so versions cannot be compared.`);
      return null;
    }
    const lines: string[] = [];
    let failure: string;
    try {
      const result = await runTool({
        command: "git",
        args: ["describe", "--always", "--tags", "--long", "--dirty"],
        cwd: klipperPath,
        timeoutMs: QUICK_TOOL_TIMEOUT_MS,
        onStdoutLine: (line) => lines.push(line.trim()),
      });
      if (result.exitCode === 0 && lines[0]) {
        const version = lines[0];
        if (version.endsWith("-dirty")) {
          warn(`Klipper in ${klipperPath} has local changes (${version}): the firmware will report a version with the build time, which will not match the host's; the build is not skipped.`);
        }
        return version;
      }
      failure = result.stderrTail.join(" ").trim() || `exit ${result.exitCode}`;
    } catch (err) {
      failure = toMoonflashError(err).message;
    }
    warn(`git describe failed in ${klipperPath} (${failure}): the firmware's version is unknown and the build is not skipped.`);
    return null;
  }

  private async toolchainVersion(compiler: string, arch: Architecture): Promise<string> {
    const lines: string[] = [];
    const result = await runTool({ command: compiler, args: ["--version"], timeoutMs: QUICK_TOOL_TIMEOUT_MS, onStdoutLine: (line) => lines.push(line) });
    if (result.exitCode !== 0 || !lines[0]) {
      throw new MoonflashError(
        "TOOL_NOT_FOUND",
        `${compiler} --version failed (exit ${result.exitCode}); reinstall the ${arch.name} compiler${arch.debianPackages ? ` (sudo apt install --reinstall ${arch.debianPackages.join(" ")})` : ""}.`,
        toolErrorDetails({ command: compiler, args: ["--version"] }, result),
      );
    }
    return lines[0].trim();
  }

  /** Runs `nice -n 10 make …` in klipper_path, streaming every line into the job log; BUILD_FAILED on a non-zero exit. */
  private async make(
    ctx: JobContext,
    make: string,
    args: string[],
    info: { section: string; profile: FirmwareProfile; out: string; step: string; onLine: (line: string) => void },
  ): Promise<string[]> {
    const tail: string[] = [];
    const onLine = (line: string): void => {
      tail.push(line);
      if (tail.length > TAIL_LINES) tail.shift();
      if (line.trim().length > 0) ctx.log("info", line);
      info.onLine(line);
    };
    const command = "nice";
    const niceArgs = ["-n", NICENESS, make, ...args];
    this.logger.info({ command, args: niceArgs, cwd: this.settings.moonflash.klipper_path }, `running make ${args[0]}`);
    const result = await runTool({
      command,
      args: niceArgs,
      cwd: this.settings.moonflash.klipper_path,
      timeoutMs: this.timeoutMs,
      signal: ctx.signal,
      onStdoutLine: onLine,
      onStderrLine: onLine,
      tailLines: TAIL_LINES,
    });
    if (result.exitCode === 0) return tail;
    // make's own "make: *** [...] Error 2" says only that something failed; the compiler's last error says what.
    const lines = [...tail].reverse().map((line) => line.trim()).filter(Boolean);
    const last = lines.find((line) => /error/i.test(line) && !/^make(\[\d+\])?: \*\*\*/.test(line)) ?? lines[0];
    throw new MoonflashError(
      "BUILD_FAILED",
      `${info.step === "olddefconfig" ? "make olddefconfig" : "make"} failed for [${info.section}] (exit ${result.exitCode})${last ? `: ${last}` : ""}. ` +
        `The last ${TAIL_LINES} lines are in the job's details; fix the profile (${info.profile.path}) or the Klipper tree and build again.`,
      {
        ...toolErrorDetails({ command, args: niceArgs }, result),
        mcu: info.section,
        step: info.step,
        profile: info.profile.path,
        outDir: info.out,
        lastLines: tail,
      },
    );
  }

  private async findImage(out: string, arch: Architecture): Promise<string | null> {
    for (const name of arch.images) {
      const path = join(out, name);
      if (await stat(path).then((s) => s.isFile() && s.size > 0, () => false)) return path;
    }
    return null;
  }

  private async dictVersion(out: string): Promise<string | null> {
    try {
      const dict = JSON.parse(await readFile(join(out, DICT), "utf8")) as { version?: unknown };
      return typeof dict.version === "string" && dict.version.length > 0 ? dict.version : null;
    } catch {
      return null;
    }
  }
}
