// `moonflash check` and `moonflash rollback` as real child processes (from source through tsx), against the fake
// Moonraker or none at all.

import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { randomBytes } from "node:crypto";
import { deflateSync } from "node:zlib";
import { execa } from "execa";
import { FirmwareStore } from "../../src/flash/firmware-store.js";
import { startFakeMoonraker, type FakeMoonraker } from "../support/fake-moonraker/index.js";

const repo = resolve(import.meta.dirname, "../..");
const HOST = "v0.13.0-730-g84104bbbd";
const OLD = "v0.12.0-85-gd785b396";

function cli(args: string[]) {
  return execa("node", ["--import", "tsx", join(repo, "src/cli/main.ts"), ...args], { cwd: repo, reject: false, timeout: 60_000, env: { NO_COLOR: "1" } });
}

let dir: string;
let moonraker: FakeMoonraker | null = null;

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), "moonflash-cli-check-"));
  await mkdir(join(dir, "config"), { recursive: true });
});

afterEach(async () => {
  await moonraker?.stop();
  moonraker = null;
  await rm(dir, { recursive: true, force: true });
});

describe("moonflash check", () => {
  it("with Klipper running: versions from Klipper, outdated by its rule", async () => {
    moonraker = await startFakeMoonraker({
      dataDir: dir,
      websocket: false,
      klipper: {
        softwareVersion: HOST,
        mcus: [
          { section: "mcu", settings: { serial: "/dev/ttyACM0" }, mcu_version: HOST },
          { section: "mcu toolhead", settings: { serial: "/dev/ttyACM1" }, mcu_version: OLD },
        ],
      },
    });
    const json = await cli(["check", "--data", dir, "--json"]);
    expect(json.exitCode).toBe(0);
    expect(JSON.parse(json.stdout)).toMatchObject({
      klipper_state: "ready",
      host: { version: HOST, source: "klipper" },
      mcus: [{ name: "mcu", outdated: false }, { name: "toolhead", version: OLD, outdated: true }],
    });
    const text = await cli(["check", "--data", dir]);
    expect(text.exitCode).toBe(0);
    expect(text.stdout.split("\n")).toEqual([
      "klipper   v0.13.0-730-g84104bbbd  (klipper; Klipper is ready)",
      "mcu       v0.13.0-730-g84104bbbd  ok        it runs v0.13.0-730-g84104bbbd, the same as Klipper",
      "toolhead  v0.12.0-85-gd785b396    OUTDATED  it runs v0.12.0-85-gd785b396, Klipper is v0.13.0-730-g84104bbbd: Klipper wants every MCU on its own version",
    ]);
  });

  it("without Moonraker: the Klipper tree's version, and each MCU's last flashed image", async () => {
    const tree = join(dir, "klipper");
    await mkdir(join(tree, "klippy"), { recursive: true });
    // Not a git tree: klippy/.version is Klipper's own fallback (klippy/util.py).
    await writeFile(join(tree, "klippy", ".version"), `${HOST}\n`);
    await writeFile(join(dir, "config", "moonflash.conf"), `[moonflash]\nklipper_path: ${tree}\n\n[mcu toolhead]\nserial: /tmp/toolhead\n\n[mcu emu]\nserial: /tmp/emu\n`);
    const image = Buffer.concat([randomBytes(1000), deflateSync(JSON.stringify({ version: OLD, config: { MCU: "rp2040" } }))]);
    await new FirmwareStore(join(dir, "moonflash", "firmware")).add("mcu toolhead", image, { source: "flash", sourcePath: "/th.bin", date: new Date("2025-01-03T00:00:00Z") });
    const result = await cli(["check", "--data", dir, "--json"]);
    expect(result.exitCode).toBe(0);
    expect(JSON.parse(result.stdout)).toMatchObject({
      klipper_state: "disconnected",
      host: { version: HOST, source: "version-file" },
      mcus: [
        { name: "toolhead", version: OLD, source: "firmware-store", outdated: true },
        { name: "emu", version: null, outdated: null, reason: "Moonraker is not reachable, so the MCU cannot be asked, and moonflash has flashed no image to it" },
      ],
    });
    const text = await cli(["check", "--data", dir]);
    expect(text.exitCode).toBe(0);
    expect(text.stderr).toContain("Checking without Klipper.");
    expect(text.stdout.split("\n")).toEqual([
      "klipper   v0.13.0-730-g84104bbbd  (version-file; Klipper is disconnected)",
      `toolhead  v0.12.0-85-gd785b396    OUTDATED  Moonraker is not reachable, so the MCU cannot be asked; the last image moonflash put on it (2025-01-03T00:00:00.000Z) is ${OLD}, Klipper is ${HOST}`,
      "emu       ?                       unknown   Moonraker is not reachable, so the MCU cannot be asked, and moonflash has flashed no image to it",
    ]);
  });
});

describe("moonflash rollback", () => {
  it("refuses with NO_ROLLBACK_IMAGE (exit 1) when there is no earlier image; --dry-run names the image it would flash", async () => {
    moonraker = await startFakeMoonraker({ dataDir: dir, websocket: false, klipper: { mcus: [{ section: "mcu", settings: { serial: "/dev/null" } }] } });
    const none = await cli(["rollback", "mcu", "--data", dir]);
    expect(none.exitCode).toBe(1);
    expect(none.stderr).toContain("There is no earlier image of mcu to roll back to");
    expect(none.stderr).toContain("[NO_ROLLBACK_IMAGE]");

    const store = new FirmwareStore(join(dir, "moonflash", "firmware"));
    const older = randomBytes(2048);
    await store.add("mcu emu", older, { source: "flash", sourcePath: "/home/pi/older.bin" });
    await store.add("mcu emu", randomBytes(1024), { source: "flash", sourcePath: "/home/pi/newer.bin" });
    // A pty's /dev/pts path would do as well; a dry run never opens the device, it only checks what it is.
    await writeFile(join(dir, "config", "moonflash.conf"), "[mcu emu]\nserial: /dev/null\nmethod: katapult\n");
    const dry = await cli(["rollback", "emu", "--dry-run", "--json", "--data", dir]);
    expect(dry.exitCode).toBe(0);
    const last = JSON.parse(dry.stdout.trim().split("\n").at(-1)!) as { ok: boolean; result: Record<string, unknown> };
    expect(last).toMatchObject({ ok: true, result: { dry_run: true, mcu: "mcu emu", rollback_to: { size: 2048, source_path: "/home/pi/older.bin" } } });
    expect(moonraker.serviceActions).toEqual([]);
  });
});
