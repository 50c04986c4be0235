// `moonflash build` and `moonflash config`: firmware profiles and builds from the command line. Builds take the same
// job lock as the service; neither verb stops Klipper, and only `config --suggest` asks Moonraker anything.

import { mkdir, readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import { writeFileDurable } from "../core/durable.js";
import { MoonflashError, toMoonflashError } from "../core/errors.js";
import type { McuInfo } from "../core/printer.js";
import type { AgentSession } from "../moonraker/session.js";
import { connectPrinter, createFirmwareBuilder, createMcuUpdater, createRuntime, exitCodeFor, EXIT_FAILURE, EXIT_OK, type Runtime } from "../app.js";
import type { UpdateAllResult } from "../flash/update-all.js";
import { firmwareProfileDir } from "../flash/config.js";
import { identifyDevice } from "../flash/discovery.js";
import { mcuSectionName } from "../flash/engine.js";
import { mcuUserName } from "../flash/mcu-name.js";
import type { FirmwareBuild } from "../flash/build/builder.js";
import { parseProfile, type FirmwareProfile } from "../flash/build/profiles.js";
import { suggestProfile, transportOf } from "../flash/build/suggest.js";
import { runPrinterJob } from "./offline.js";
import { ProgressRenderer, reportFailure } from "./render.js";

function kib(bytes: number): string {
  return `${(bytes / 1024).toFixed(1)} KiB`;
}

function buildLine(b: FirmwareBuild): string {
  const what = b.skipped ? "unchanged, kept" : "built";
  const took = b.skipped ? "" : ` in ${(b.elapsedMs / 1000).toFixed(1)} s`;
  return `✓ [${b.mcu}] ${what} ${b.image} (${kib(b.bytes)}), version ${b.version}${took}`;
}

export async function runBuild(opts: { dataDir: string; mcus: string[]; force: boolean; json: boolean }): Promise<number> {
  let renderer: ProgressRenderer | null = null;
  try {
    const rt = await createRuntime({ dataDir: opts.dataDir, pretty: false });
    const builder = createFirmwareBuilder(rt);
    renderer = new ProgressRenderer({ json: opts.json });
    rt.runner.on(renderer.onJobEvent);
    const result = await builder.buildMany(opts.mcus, { force: opts.force });
    renderer.stop();
    if (opts.json) {
      process.stdout.write(`${JSON.stringify({ ok: result.failed.length === 0, result })}\n`);
    } else {
      for (const b of result.builds) process.stdout.write(`${buildLine(b)}\n`);
      for (const name of result.withoutProfile) process.stdout.write(`- [${name}] has no firmware profile (moonflash config ${mcuUserName(name)} makes one)\n`);
      for (const f of result.failed) process.stderr.write(`moonflash: ✗ [${f.mcu}] ${f.message} [${f.code}]\n`);
    }
    const first = result.failed[0];
    return first ? exitCodeFor(new MoonflashError(first.code, first.message)) : EXIT_OK;
  } catch (err) {
    renderer?.stop();
    return reportFailure(err, opts.json);
  }
}

export interface ConfigOptions {
  dataDir: string;
  mcu: string;
  importFile?: string;
  suggest: boolean;
  write: boolean;
}

export async function runConfig(opts: ConfigOptions): Promise<number> {
  try {
    if (opts.importFile !== undefined && opts.suggest) {
      throw new MoonflashError("INVALID_PARAMS", "Use either --import FILE or --suggest, not both.", { import: opts.importFile, suggest: true });
    }
    if (opts.write && !opts.suggest) {
      throw new MoonflashError("INVALID_PARAMS", "--write saves a suggestion: use it with --suggest.", { write: true });
    }
    const rt = await createRuntime({ dataDir: opts.dataDir, pretty: false });
    const builder = createFirmwareBuilder(rt);
    const section = mcuSectionName(opts.mcu);
    const profile = builder.profile(section);
    if (opts.importFile !== undefined) return await importProfile(profile, opts.importFile);
    if (opts.suggest) return await suggest(rt, section, profile, opts.write);
    return await menuconfig(rt, profile, builder.outDir(section));
  } catch (err) {
    return reportFailure(err, false);
  }
}

/** How the build finds a profile saved to `profile`, for the line after saving it. */
function whereNote(profile: FirmwareProfile): string {
  return profile.from === "kconfig"
    ? `kconfig: of [${profile.mcu}] in moonflash.conf names it`
    : `the build finds it by name; kconfig: in [${profile.mcu}] of moonflash.conf may point elsewhere`;
}

/** Writes a profile durably; a different one already there is kept as <profile>.old, as Kconfig's tools do. */
async function saveProfile(profile: FirmwareProfile, text: string): Promise<string | null> {
  const previous = await readFile(profile.path, "utf8").catch(() => null);
  let kept: string | null = null;
  if (previous !== null && previous !== text) {
    kept = `${profile.path}.old`;
    await writeFileDurable(kept, previous);
  }
  await writeFileDurable(profile.path, text);
  return kept;
}

async function importProfile(profile: FirmwareProfile, file: string): Promise<number> {
  let text: string;
  try {
    text = await readFile(file, "utf8");
  } catch (err) {
    throw new MoonflashError("INVALID_PARAMS", `Cannot read ${file} (${(err as NodeJS.ErrnoException).code ?? String(err)}); give the path of a saved Klipper .config.`, { file }, { cause: err });
  }
  const { arch, mcu } = parseProfile(text);
  if (!arch) {
    throw new MoonflashError(
      "INVALID_PARAMS",
      `${file} is not a Klipper .config: it selects no processor architecture (no CONFIG_MACH_…=y line). Import the file make menuconfig saved.`,
      { file },
    );
  }
  const kept = await saveProfile(profile, text);
  process.stdout.write(`saved ${profile.path} (${arch.name}${mcu ? `, ${mcu}` : ""}) from ${file}; ${whereNote(profile)}\n`);
  if (kept) process.stdout.write(`the previous profile is kept as ${kept}\n`);
  return EXIT_OK;
}

/** Klipper's view of the section, when Moonraker answers within a few seconds; null otherwise (said on stderr). */
async function klipperMcu(rt: Runtime, section: string): Promise<McuInfo | null> {
  let session: AgentSession | null = null;
  try {
    session = await connectPrinter(rt, 3000);
    if (!session.state().klippyConnected) {
      process.stderr.write("moonflash: Klipper is not connected to Moonraker; using moonflash.conf only.\n");
      return null;
    }
    return (await session.mcuReport()).mcus.find((m) => m.section === section) ?? null;
  } catch (err) {
    process.stderr.write(`moonflash: ${toMoonflashError(err).message} Using moonflash.conf only.\n`);
    return null;
  } finally {
    await session?.stop();
  }
}

async function suggest(rt: Runtime, section: string, profile: FirmwareProfile, write: boolean): Promise<number> {
  const own = rt.config.mcus[section];
  const klipper = own?.mcu_type && (own.serial || own.canbus_uuid) ? null : await klipperMcu(rt, section);
  const mcuType = own?.mcu_type ?? klipper?.mcuType ?? null;
  const mcuTypeFrom = own?.mcu_type ? `mcu_type: in [${section}] of moonflash.conf` : klipper?.mcuType ? "Klipper's mcu_constants.MCU (through Moonraker)" : undefined;
  // The device from one place, as the flash engine takes it: moonflash.conf when it names one, else Klipper's.
  const fromOwn = !!(own?.serial || own?.canbus_uuid);
  const serial = fromOwn ? own?.serial : klipper?.serial;
  const canbusUuid = fromOwn ? own?.canbus_uuid : klipper?.canbusUuid;
  const device = serial ? await identifyDevice(serial) : null;
  const transport = transportOf({ serial: serial ?? null, canbusUuid: canbusUuid ?? null, device });
  const suggestion = suggestProfile({
    mcu: section,
    mcuType,
    ...(mcuTypeFrom ? { mcuTypeFrom } : {}),
    transport: transport?.transport ?? null,
    ...(transport ? { transportFrom: transport.from } : {}),
  });
  if (!suggestion.known) {
    process.stderr.write(`moonflash: ${suggestion.reason}\n`);
    return EXIT_FAILURE;
  }
  process.stdout.write(suggestion.text);
  const guesses = suggestion.options.filter((o) => o.guess).length;
  if (!write) {
    process.stderr.write(`moonflash: ${guesses} option(s) are guessed (# GUESSED). Nothing was written; add --write to save it to ${profile.path}.\n`);
    return EXIT_OK;
  }
  const kept = await saveProfile(profile, suggestion.text);
  process.stderr.write(`moonflash: saved to ${profile.path}; ${whereNote(profile)}. Check the ${guesses} guessed option(s) before flashing.\n`);
  if (kept) process.stderr.write(`moonflash: the previous profile is kept as ${kept}\n`);
  return EXIT_OK;
}

/**
 * Klipper's `make menuconfig KCONFIG_CONFIG=<profile>` on this terminal. Not through core/tool.ts runTool: that
 * runner pipes the tool's output and closes its input, and menuconfig needs the terminal itself, with no time limit
 * while someone reads the menus. Still an argument array, never a shell.
 */
async function menuconfig(rt: Runtime, profile: FirmwareProfile, out: string): Promise<number> {
  const klipperPath = rt.config.moonflash.klipper_path;
  if (!(await stat(join(klipperPath, "Makefile")).then((s) => s.isFile(), () => false))) {
    throw new MoonflashError("TOOL_NOT_FOUND", `No Makefile in ${klipperPath}; set klipper_path in [moonflash] of moonflash.conf to your Klipper checkout.`, { klipperPath });
  }
  await mkdir(firmwareProfileDir(rt.config.dataDir), { recursive: true });
  const exists = await stat(profile.path).then(() => true, () => false);
  if (!exists) {
    // Klipper's Makefile makes the missing file from src/Kconfig's defaults before the menu opens.
    process.stdout.write(`No profile at ${profile.path} yet: the menu starts from Klipper's defaults (an atmega2560). Choose the board's processor, then save (S) and quit (Q).\n`);
  }
  const args = ["menuconfig", `KCONFIG_CONFIG=${profile.path}`, `OUT=${out}`];
  const { execa } = await import("execa");
  const result = await execa("make", args, { cwd: klipperPath, stdio: "inherit", reject: false });
  if (result.code === "ENOENT") throw new MoonflashError("TOOL_NOT_FOUND", "make is not installed. Install it (sudo apt install make).", { command: "make" });
  if (result.exitCode !== 0) {
    throw new MoonflashError("BUILD_FAILED", `make menuconfig failed (exit ${result.exitCode ?? result.signal}); the profile ${profile.path} may be unchanged.`, {
      command: "make",
      args,
      exitCode: result.exitCode ?? null,
      step: "menuconfig",
    });
  }
  const text = await readFile(profile.path, "utf8").catch(() => "");
  const { arch, mcu } = parseProfile(text);
  process.stdout.write(`saved ${profile.path} (${arch?.name ?? "no architecture"}${mcu ? `, ${mcu}` : ""}); ${whereNote(profile)}\n`);
  return EXIT_OK;
}

/** `moonflash update`: update-all from the command line, with the same plan, one stop and result as UPDATE_MCUS. */
export function runUpdate(opts: { dataDir: string; mcus: string[]; force: boolean; dryRun: boolean; json: boolean }): Promise<number> {
  return runPrinterJob(opts, async (ctx, engine, printer, renderer) => {
    const updater = createMcuUpdater(ctx, engine, createFirmwareBuilder(ctx), printer);
    const result = await updater.run({ ...(opts.mcus.length ? { mcus: opts.mcus } : {}), force: opts.force, dry_run: opts.dryRun });
    renderer.stop();
    if (opts.json) process.stdout.write(`${JSON.stringify({ ok: true, result })}\n`);
    else process.stdout.write(`${updateSummary(result)}\n`);
  });
}

function updateSummary(r: UpdateAllResult): string {
  const to = r.host_version ?? "Klipper's version";
  if (r.plan.length === 0) return `every MCU runs ${to}: nothing to update`;
  const lines = r.plan.map((p, i) => {
    const o = r.mcus.find((m) => m.mcu === p.mcu);
    const done = r.dry_run ? `would build ${p.profile} and flash` : o?.flashed ? `flashed with ${o.method}, now ${o.version_now ?? "?"}` : `not flashed: ${o?.message ?? ""}`;
    const backup = p.backup.read_back
      ? o?.backed_up
        ? " (its old firmware was read back and kept)"
        : `; reads its current firmware back first (≈ ${((p.backup.estimated_ms ?? 0) / 1000).toFixed(1)} s of downtime, ${p.backup.estimate_basis ?? ""})`
      : "";
    return `${i + 1}. [${p.mcu}] ${p.transport}, ${p.why}${p.version_before ? ` (was ${p.version_before})` : ""}: ${done}${backup}`;
  });
  const down = r.downtime_ms === null ? "" : `\nKlipper was down ${(r.downtime_ms / 1000).toFixed(1)} s (build ${(r.phases_ms.build / 1000).toFixed(1)} s while it ran)`;
  return `${r.dry_run ? "plan (dry run, nothing changed)" : "updated"} to ${to}:\n${lines.join("\n")}${down}`;
}
