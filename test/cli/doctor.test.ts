// `moonflash doctor` as a real child process (the committed bundle): against an installation laid out as install.sh
// lays it out (a recording `systemctl` on PATH answering for the service, the unit in MOONFLASH_SYSTEMD_DIR, the fake
// Moonraker with the macros loaded) every check passes and it exits 0; against an empty printer_data every problem
// is named with its fix and it exits 1; with Klipper running, what Klipper loaded is what counts.

import { afterEach, describe, expect, it } from "vitest";
import { chmod, mkdir, mkdtemp, rm, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { execa } from "execa";
import { startFakeMoonraker, type FakeMoonraker } from "../support/fake-moonraker/index.js";

const repo = resolve(import.meta.dirname, "../..");
const macros = join(repo, "moonraker", "moonflash.cfg");

interface Check {
  name: string;
  ok: boolean;
  detail: string;
  fix?: string;
}

const cleanups: Array<() => Promise<void>> = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

/** A printer_data folder, a bin folder with a `systemctl` that says `state` for moonflash, a systemd unit folder. */
async function layout(opts: { installed: boolean; serviceState: string }) {
  const dir = await mkdtemp(join(tmpdir(), "moonflash-doctor-"));
  cleanups.push(() => rm(dir, { recursive: true, force: true }));
  const data = join(dir, "printer_data");
  const config = join(data, "config");
  const bin = join(dir, "bin");
  const units = join(dir, "systemd");
  const klipper = join(dir, "klipper");
  await mkdir(config, { recursive: true });
  await mkdir(bin);
  await mkdir(units);
  await mkdir(klipper);
  await writeFile(join(klipper, "Makefile"), "all:\n");
  await writeFile(join(bin, "systemctl"), `#!/bin/sh\n[ "$1 $2" = "is-active moonflash" ] || exit 4\necho ${opts.serviceState}\n[ ${opts.serviceState} = active ]\n`);
  await chmod(join(bin, "systemctl"), 0o755);
  await writeFile(join(config, "moonflash.conf"), `[moonflash]\nklipper_path: ${klipper}\n`);
  if (opts.installed) {
    await writeFile(join(units, "moonflash.service"), "[Service]\n");
    await writeFile(join(data, "moonraker.asvc"), "klipper_mcu\nwebcamd\nmoonflash\n");
    await symlink(macros, join(config, "moonflash.cfg"));
    await writeFile(join(config, "printer.cfg"), "[include mainsail.cfg]\n[include moonflash.cfg]\n\n[printer]\nkinematics: none\n");
    await writeFile(join(config, "mainsail.cfg"), "[respond]\n[pause_resume]\n");
    await writeFile(join(config, "moonraker.conf"), "[server]\nhost: 0.0.0.0\n\n[update_manager moonflash]\ntype: git_repo\n");
  } else {
    await writeFile(join(config, "printer.cfg"), "[printer]\nkinematics: none\n");
  }
  return { data, bin, units };
}

async function doctor(l: { data: string; bin: string; units: string }) {
  const run = await execa("node", [join(repo, "dist", "moonflash.mjs"), "doctor", "--data", l.data, "--json"], {
    reject: false,
    timeout: 60_000,
    env: { PATH: `${l.bin}:${process.env.PATH ?? ""}`, MOONFLASH_SYSTEMD_DIR: l.units },
  });
  return { exitCode: run.exitCode, stderr: run.stderr, result: JSON.parse(run.stdout) as { ok: boolean; checks: Check[] } };
}

async function moonraker(data: string, withMacros: boolean): Promise<FakeMoonraker> {
  const fake = await startFakeMoonraker({ dataDir: data, websocket: false, klipper: withMacros ? { macroFile: macros } : {} });
  cleanups.push(() => fake.stop());
  return fake;
}

describe("moonflash doctor", () => {
  it("an installation as install.sh leaves it, with Moonraker and Klipper running: every check passes, exit 0", { timeout: 60_000 }, async () => {
    const l = await layout({ installed: true, serviceState: "active" });
    await moonraker(l.data, true);
    const { exitCode, stderr, result } = await doctor(l);
    expect(result.checks.filter((c) => !c.ok), stderr).toEqual([]);
    expect(exitCode).toBe(0);
    expect(result.checks.map((c) => c.name)).toEqual([
      "node", "moonflash.conf", "service unit", "service running", "moonraker.asvc", "update_manager", "moonraker",
      "macros file", "macros included", "[respond]", "dialout", "klipper tree", "make",
    ]);
    expect(result.checks.find((c) => c.name === "macros included")?.detail).toBe("FLASH_MCU and the other macros are in Klipper's loaded config");
  });

  it("an empty printer_data without Moonraker: each problem with its fix, exit 1", { timeout: 60_000 }, async () => {
    const l = await layout({ installed: false, serviceState: "inactive" });
    const { exitCode, result } = await doctor(l);
    expect(exitCode).toBe(1);
    const failed = Object.fromEntries(result.checks.filter((c) => !c.ok).map((c) => [c.name, c]));
    expect(Object.keys(failed)).toEqual(["service unit", "service running", "moonraker.asvc", "update_manager", "moonraker", "macros file", "macros included", "[respond]"]);
    expect(failed["service running"]!.detail).toBe("moonflash.service is inactive");
    expect(failed["moonraker.asvc"]!.fix).toBe(`echo moonflash >> ${join(l.data, "moonraker.asvc")}, then sudo systemctl restart moonraker (or run ./install.sh)`);
    expect(failed["macros included"]!).toMatchObject({ detail: "printer.cfg and the files it includes does not include moonflash.cfg", fix: "add [include moonflash.cfg] to printer.cfg, then FIRMWARE_RESTART" });
    expect(failed["[respond]"]!.fix).toMatch(/^add a \[respond\] section to printer\.cfg/);
    expect(failed.moonraker!.detail).toMatch(/^Could not reach Moonraker at unix:.*moonraker\.sock within 3 s/);
  });

  it("with Klipper running, what Klipper loaded counts: macros not loaded is a problem though printer.cfg names the file", { timeout: 60_000 }, async () => {
    const l = await layout({ installed: true, serviceState: "active" });
    await moonraker(l.data, false);
    const { exitCode, result } = await doctor(l);
    expect(exitCode).toBe(1);
    expect(result.checks.filter((c) => !c.ok)).toEqual([
      { name: "macros included", ok: false, detail: "Klipper's loaded config has no [gcode_macro FLASH_MCU]", fix: "add [include moonflash.cfg] to printer.cfg, then FIRMWARE_RESTART" },
    ]);
    // [respond] is judged from Klipper's config too (the fake's printer.cfg has one).
    expect(result.checks.find((c) => c.name === "[respond]")).toMatchObject({ ok: true, detail: "[respond] is in Klipper's loaded config" });
  });
});
