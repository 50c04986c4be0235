// The linux method (the Linux host MCU) through the real AgentSession and the fake Moonraker: the host MCU's service
// is stopped, klipper.elf installed durably, the service started again in every outcome, the install compared. The
// sudo path runs a recording `sudo` script; the tests run as root, so that path is forced through the canWrite seam.

import { chmod, mkdir, readFile, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { isMoonflashError } from "../../src/core/errors.js";
import { LinuxHostFlasher } from "../../src/flash/methods/linux-host.js";
import type { FlashJobTarget } from "../../src/flash/types.js";
import { startRig, type PrinterRig } from "../fixtures/engine/rig.js";
import { RecordingContext } from "./support/recording-context.js";

const NEW = Buffer.from("\x7fELF new host mcu program\n", "latin1");
const OLD = Buffer.from("\x7fELF old host mcu program\n", "latin1");
const running = { active_state: "active", sub_state: "running" };

let rig: PrinterRig | undefined;
afterEach(async () => {
  await rig?.close();
  rig = undefined;
});

async function setUp(services: Record<string, typeof running> = { klipper: running, klipper_mcu: running, moonraker: running }) {
  rig = await startRig({ services });
  const bin = join(rig.dataDir, "usr-local-bin");
  await mkdir(bin);
  const installed = join(bin, "klipper_mcu");
  await writeFile(installed, OLD, { mode: 0o755 });
  const firmwarePath = join(rig.dataDir, "klipper.elf");
  await writeFile(firmwarePath, NEW);
  const target: FlashJobTarget = {
    mcu: "mcu host",
    device: "/tmp/klipper_host_mcu",
    canbusInterface: "can0",
    baud: 250000,
    firmwarePath,
    expectedMcuType: "linux",
    bootloader: "auto",
    klipperPath: "/nonexistent",
    wchispTransport: "usb",
    linuxMcuPath: installed,
    timeoutMs: 10_000,
    image: NEW,
  };
  return { r: rig, bin, installed, target };
}

const actions = (r: PrinterRig) => r.fake.serviceActions.map((a) => `${a.action} ${a.service}`);

/** A `sudo` that records its arguments and runs the command after `-n`, or refuses as sudo does without a password. */
async function fakeSudo(dir: string, mode: "run" | "refuse"): Promise<{ path: string; calls: () => Promise<string[]> }> {
  const path = join(dir, "sudo");
  const log = join(dir, "sudo-calls.txt");
  const body =
    mode === "run"
      ? `[ "$1" = "-n" ] || exit 64\nshift\nexec "$@"\n`
      : `echo "sudo: a password is required" >&2\nexit 1\n`;
  await writeFile(path, `#!/bin/sh\necho "$*" >> "${log}"\n${body}`);
  await chmod(path, 0o755);
  return { path, calls: async () => (await readFile(log, "utf8").catch(() => "")).split("\n").filter(Boolean) };
}

describe("linux method (Linux host MCU)", () => {
  it("stops the host MCU's service, installs klipper.elf (mode 755), starts the service, and compares the install", async () => {
    const { r, installed, target } = await setUp();
    const ctx = new RecordingContext();
    const outcome = await new LinuxHostFlasher({ printer: r.session }).flash(target, ctx);
    expect(outcome).toMatchObject({ bytes: NEW.length, verified: true, device: installed, details: { service: "klipper_mcu" } });
    expect(await readFile(installed)).toEqual(NEW);
    expect((await stat(installed)).mode & 0o777).toBe(0o755);
    expect(actions(r)).toEqual(["stop klipper_mcu", "start klipper_mcu"]);
  });

  it("takes klipper-mcu (Klipper's own unit name) when that is the one Moonraker manages", async () => {
    const { r, target } = await setUp({ klipper: running, "klipper-mcu": running });
    await new LinuxHostFlasher({ printer: r.session }).flash(target, new RecordingContext());
    expect(actions(r)).toEqual(["stop klipper-mcu", "start klipper-mcu"]);
  });

  it("installs through sudo -n when the directory is not writable (sudo path forced: the tests run as root)", async () => {
    const { r, bin, installed, target } = await setUp();
    const sudo = await fakeSudo(r.dataDir, "run");
    await new LinuxHostFlasher({ printer: r.session, sudo: sudo.path, canWrite: async () => false }).flash(target, new RecordingContext());
    expect(await readFile(installed)).toEqual(NEW);
    const temp = join(bin, ".klipper_mcu.moonflash.tmp");
    expect(await sudo.calls()).toEqual([
      `-n install -m 0755 ${target.firmwarePath} ${temp}`,
      `-n sync ${temp}`,
      `-n mv -f ${temp} ${installed}`,
      `-n sync ${bin}`,
    ]);
    expect(actions(r)).toEqual(["stop klipper_mcu", "start klipper_mcu"]);
  });

  it("sudo wants a password: PERMISSION_DENIED saying what to allow, the old program kept, the service started again", async () => {
    const { r, installed, target } = await setUp();
    const sudo = await fakeSudo(r.dataDir, "refuse");
    const err = await new LinuxHostFlasher({ printer: r.session, sudo: sudo.path, canWrite: async () => false })
      .flash(target, new RecordingContext())
      .catch((e: unknown) => e);
    expect(isMoonflashError(err) && err.code).toBe("PERMISSION_DENIED");
    expect((err as Error).message).toMatch(/a password is required.*passwordless sudo.*nothing was replaced/);
    expect(await readFile(installed)).toEqual(OLD);
    expect(actions(r)).toEqual(["stop klipper_mcu", "start klipper_mcu"]);
  });

  it("refuses an image that is not a Linux program before stopping anything (MCU_MISMATCH)", async () => {
    const { r, installed, target } = await setUp();
    const image = Buffer.from("FAKE-KLIPPER version=v1 stm32 image");
    const err = await new LinuxHostFlasher({ printer: r.session }).flash({ ...target, image }, new RecordingContext()).catch((e: unknown) => e);
    expect(isMoonflashError(err) && err.code).toBe("MCU_MISMATCH");
    expect(await readFile(installed)).toEqual(OLD);
    expect(actions(r)).toEqual([]);
  });

  it("Moonraker does not manage the host MCU's service: SERVICE_FAILED naming moonraker.asvc, nothing touched", async () => {
    const { r, target } = await setUp({ klipper: running, moonraker: running });
    const err = await new LinuxHostFlasher({ printer: r.session }).preflight(target).catch((e: unknown) => e);
    expect(isMoonflashError(err) && err.code).toBe("SERVICE_FAILED");
    expect((err as Error).message).toMatch(/klipper_mcu or klipper-mcu.*moonraker\.asvc/);
    expect(actions(r)).toEqual([]);
  });

  it("is not for a board: METHOD_NOT_APPLICABLE for an MCU that is not the Linux host MCU", async () => {
    const { r, target } = await setUp();
    const err = await new LinuxHostFlasher({ printer: r.session }).preflight({ ...target, expectedMcuType: "stm32f446xx" }).catch((e: unknown) => e);
    expect(isMoonflashError(err) && err.code).toBe("METHOD_NOT_APPLICABLE");
  });
});
