// The CLI as a real child process (from source through tsx): exit codes, config errors, offline flash with the
// shared job lock, and `serve` backing off without crashing or flooding the log when Moonraker is absent.

import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { mkdtemp, mkdir, rm, writeFile, readFile } from "node:fs/promises";
import { existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { randomBytes } from "node:crypto";
import { execa } from "execa";
import { startFakeMoonraker, type FakeMoonraker } from "../support/fake-moonraker/index.js";
import { startVirtualDevice, type VirtualDevice } from "../../src/sim/virtual-device.js";
import { acquireJobLock } from "../../src/core/lock.js";

const repo = resolve(import.meta.dirname, "../..");

function cli(args: string[], opts: { timeout?: number } = {}) {
  return execa("node", ["--import", "tsx", join(repo, "src/cli/main.ts"), ...args], { cwd: repo, reject: false, timeout: opts.timeout ?? 60_000, env: { NO_COLOR: "1" } });
}

let dir: string;
const cleanups: Array<() => Promise<unknown>> = [];

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), "moonflash-cli-"));
  await mkdir(join(dir, "config"), { recursive: true });
});

afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!().catch(() => undefined);
  await rm(dir, { recursive: true, force: true });
});

describe("moonflash CLI", () => {
  it("prints its version and exits 0; unknown commands and bad options exit 2", async () => {
    const version = await cli(["--version"]);
    expect(version.exitCode).toBe(0);
    expect(version.stdout.trim()).toMatch(/^\d+\.\d+\.\d+$/);
    expect((await cli(["frobnicate"])).exitCode).toBe(2);
    const badMethod = await cli(["flash", "mcu", "--method", "jtag", "--data", dir]);
    expect(badMethod.exitCode).toBe(2);
    expect(badMethod.stderr).toContain("Allowed choices are katapult, flashtool, make, wchisp, linux");
  });

  it("reports a config typo with file:line and exits 2", async () => {
    await writeFile(join(dir, "config", "moonflash.conf"), "[moonflash]\nlog_level: info\nklipper_pth: ~/klipper\n");
    const result = await cli(["status", "--data", dir]);
    expect(result.exitCode).toBe(2);
    expect(result.stderr).toContain(`${join(dir, "config", "moonflash.conf")}:3`);
    expect(result.stderr).toContain("klipper_pth");
    expect(result.stderr).toContain("klipper_path");
    expect(result.stderr).toContain("[CONFIG_INVALID]");
  });

  it("status shows nothing running and an empty history on a fresh data dir", async () => {
    const result = await cli(["status", "--data", dir, "--json"]);
    expect(result.exitCode).toBe(0);
    expect(JSON.parse(result.stdout)).toEqual({ running: null, stale_lock: null, klipper_restart_pending: false, last: [] });
  });

  it("exits quietly with its own exit code when its output pipe closes (moonflash status | head -1)", async () => {
    const status = cli(["status", "--data", dir]);
    // The reader goes away before the verb writes its first line, as `head` does after the lines it wanted.
    status.stdout?.destroy();
    const result = await status;
    expect(result.stderr).not.toMatch(/EPIPE|Unhandled|at /);
    expect(result.exitCode).toBe(0);
    expect(result.signal).toBeUndefined();
  });

  it("serve keeps retrying a missing socket with backoff: no crash, one warning, not a log line per attempt", async () => {
    // Debug level, so every connection attempt is in the log and can be counted.
    await writeFile(join(dir, "config", "moonflash.conf"), "[moonflash]\nlog_level: debug\n");
    const serve = cli(["serve", "--data", dir], { timeout: 60_000 });
    cleanups.push(async () => serve.kill("SIGKILL"));
    const logFile = join(dir, "logs", "moonflash.log");
    type Line = { level: string; msg: string; time: string };
    const readLog = async (): Promise<Line[]> =>
      (await readFile(logFile, "utf8").catch(() => "")).trim().split("\n").filter(Boolean).map((l) => JSON.parse(l) as Line);
    const attemptsOf = (log: Line[]): Line[] => log.filter((l) => l.msg === "connecting to Moonraker");
    // Wait for five attempts however slow the machine is; the assertions are about their spacing, not the clock.
    for (let i = 0; i < 300 && attemptsOf(await readLog()).length < 5; i++) await new Promise((r) => setTimeout(r, 100));
    expect(serve.exitCode).toBeNull();
    serve.kill("SIGTERM");
    const result = await serve;
    expect(result.exitCode).toBe(0);
    const log = await readLog();
    const warnings = log.filter((l) => l.level === "warn");
    expect(warnings).toHaveLength(1);
    expect(warnings[0]!.msg).toContain("cannot reach Moonraker");
    const times = attemptsOf(log).map((l) => Date.parse(l.time));
    expect(times.length).toBeGreaterThanOrEqual(5);
    const gaps = times.slice(1).map((t, i) => t - times[i]!);
    // Backoff, not a spin: 250 ms doubling with ±20 % jitter, so every pause is long and they grow.
    expect(Math.min(...gaps)).toBeGreaterThanOrEqual(150);
    expect(gaps[3]!).toBeGreaterThan(gaps[0]! * 2);
  });

  it("virtual-device serves a board on a pty that `flash` then flashes; `devices --json` maps Klipper's section", async () => {
    const image = randomBytes(4 * 1024);
    await writeFile(join(dir, "fw.bin"), image);
    await writeFile(join(dir, "config", "moonflash.conf"), `[mcu]\nmethod: katapult\nfirmware: ${join(dir, "fw.bin")}\n`);
    const link = join(dir, "vboard");
    const device = cli(["virtual-device", "--path", link, "--mode", "app", "--mcu", "stm32f446xx"], { timeout: 60_000 });
    cleanups.push(async () => device.kill("SIGKILL"));
    const moonraker = await startFakeMoonraker({ dataDir: dir, klipper: { mcus: [{ section: "mcu", settings: { serial: link }, mcu_constants: { MCU: "stm32f446xx" } }] } });
    cleanups.push(() => moonraker.stop());
    await moonraker.waitFor(() => existsSync(link), 15_000);

    const devices = await cli(["devices", "--data", dir, "--json"]);
    expect(devices.exitCode).toBe(0);
    expect(JSON.parse(devices.stdout)).toMatchObject({ mcus: [{ section: "mcu", serial: link, sources: ["klipper", "moonflash"] }] });

    const flash = await cli(["flash", "mcu", "--data", dir]);
    expect(flash.stderr).toBe("");
    expect(flash.exitCode).toBe(0);
    expect(flash.stdout).toMatch(/✓ \[mcu\] flashed with katapult .* 4096 bytes, verified; Klipper restarted/);

    device.kill("SIGTERM");
    const served = await device;
    expect(served.exitCode).toBe(0);
    expect(served.stdout).toContain("entered Katapult (bootloader request received)");
    expect(served.stdout).toContain("flash complete: 4096 bytes written");
    expect(existsSync(link)).toBe(false);
  });

  describe("with a printer", () => {
    let moonraker: FakeMoonraker;
    let board: VirtualDevice;
    let image: Buffer;

    beforeEach(async () => {
      image = randomBytes(8 * 1024);
      await writeFile(join(dir, "fw.bin"), image);
      await writeFile(join(dir, "config", "moonflash.conf"), `[mcu]\nmethod: katapult\nfirmware: ${join(dir, "fw.bin")}\n`);
      board = await startVirtualDevice({ path: join(dir, "board"), mode: "app" });
      cleanups.push(() => board.stop());
      moonraker = await startFakeMoonraker({ dataDir: dir, klipper: { mcus: [{ section: "mcu", settings: { serial: join(dir, "board") }, mcu_constants: { MCU: "stm32f103xe" } }] } });
      cleanups.push(() => moonraker.stop());
    });

    it("flash drives the engine in-process: Klipper stopped and started, board flashed, JSON result", async () => {
      const result = await cli(["flash", "mcu", "--data", dir, "--json"]);
      expect(result.stderr).toBe("");
      expect(result.exitCode).toBe(0);
      const lines = result.stdout.trim().split("\n").map((l) => JSON.parse(l) as Record<string, unknown>);
      expect(lines.some((l) => l.type === "progress" && l.phase === "write")).toBe(true);
      expect(lines.at(-1)).toMatchObject({ ok: true, result: { mcu: "mcu", method: "katapult", verified: true, bytes: image.length, klipper_restarted: true } });
      expect(board.model.flash.subarray(0, image.length).equals(image)).toBe(true);
      expect(moonraker.serviceActions.map((a) => a.action)).toEqual(["stop", "start"]);
      expect(moonraker.klipper.state).toBe("ready");
    });

    it("flash --dry-run stops nothing and prints the plan", async () => {
      const result = await cli(["flash", "mcu", "--data", dir, "--dry-run"]);
      expect(result.exitCode).toBe(0);
      expect(result.stdout).toContain("katapult");
      expect(moonraker.serviceActions).toEqual([]);
    });

    it("flash gets BUSY (exit 1) while another process holds the job lock, and stops nothing", async () => {
      const lock = await acquireJobLock(join(dir, "moonflash", "job.lock"), { jobId: "ota-test-1", kind: "ota", target: "host", pid: process.pid, startedAt: new Date().toISOString() });
      cleanups.push(() => lock.release());
      const result = await cli(["flash", "mcu", "--data", dir]);
      expect(result.exitCode).toBe(1);
      expect(result.stderr).toContain("[BUSY]");
      expect(result.stderr).toContain("An OTA job on host is running");
      expect(moonraker.serviceActions).toEqual([]);
    });

    it("flash of an unknown MCU fails with UNKNOWN_MCU and leaves Klipper alone", async () => {
      const result = await cli(["flash", "extruder", "--data", dir]);
      expect(result.exitCode).toBe(1);
      expect(result.stderr).toContain("[UNKNOWN_MCU]");
      expect(moonraker.serviceActions).toEqual([]);
    });
  });
});
