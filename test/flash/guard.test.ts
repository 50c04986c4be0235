// The Klipper guard against the fake Moonraker through the real AgentSession: stop/start order, the crash
// journal, PRINTER_BUSY, restart failures, SIGTERM in a real child process, and recovery at agent start.

import { execa } from "execa";
import { readFile, writeFile, mkdir } from "node:fs/promises";
import { existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterEach, describe, expect, it } from "vitest";
import { isMoonflashError, MoonflashError } from "../../src/core/errors.js";
import { readJournal, recoverInterruptedJob, withKlipperStopped, type FlashJournal } from "../../src/flash/guard.js";
import { AgentSession } from "../../src/moonraker/session.js";
import { journalPath, startRig, waitUntil, type PrinterRig } from "../fixtures/engine/rig.js";

const here = dirname(fileURLToPath(import.meta.url));
const repoRoot = join(here, "..", "..");

let rig: PrinterRig | undefined;
afterEach(async () => {
  await rig?.close();
  rig = undefined;
});

const guardOpts = (r: PrinterRig, serviceTimeoutMs = 3000) => ({
  jobId: "flash-test-1",
  kind: "flash" as const,
  target: "mcu",
  serviceTimeoutMs,
  logger: r.logger,
});

const actions = (r: PrinterRig) => r.fake.serviceActions.map((a) => `${a.action} ${a.service}`);

describe("withKlipperStopped", () => {
  it("writes the journal, stops Klipper for the work, starts it again and removes the journal", async () => {
    rig = await startRig();
    const r = rig;
    const seen: { journal: FlashJournal | null; actions: string[]; klipperActive: boolean } = { journal: null, actions: [], klipperActive: true };
    const outcome = await withKlipperStopped(r.session, journalPath(r.dataDir), guardOpts(r), async () => {
      seen.journal = JSON.parse(await readFile(journalPath(r.dataDir), "utf8")) as FlashJournal;
      seen.actions = actions(r);
      seen.klipperActive = r.fake.klipper.serviceActive;
      return 42;
    });
    expect(outcome).toEqual({ value: 42, klipperWasRunning: true, klipperRestart: { ok: true } });
    expect(seen.journal).toMatchObject({ jobId: "flash-test-1", kind: "flash", target: "mcu", pid: process.pid, klipperService: "klipper", klipperWasRunning: true });
    expect(seen.actions).toEqual(["stop klipper"]);
    expect(seen.klipperActive).toBe(false);
    expect(actions(r)).toEqual(["stop klipper", "start klipper"]);
    expect(existsSync(journalPath(r.dataDir))).toBe(false);
    await waitUntil(() => r.session.state().klippyState === "ready", "Klipper ready again");
  });

  it("starts Klipper again when the work fails and keeps the work's error", async () => {
    rig = await startRig();
    const r = rig;
    const failing = withKlipperStopped(r.session, journalPath(r.dataDir), guardOpts(r), async () => {
      throw new MoonflashError("FLASH_FAILED", "the board stopped answering");
    });
    const err = await failing.catch((e: unknown) => e);
    expect(isMoonflashError(err) && err.code).toBe("FLASH_FAILED");
    expect((err as MoonflashError).details.klipperRestart).toEqual({ ok: true });
    expect(actions(r)).toEqual(["stop klipper", "start klipper"]);
    expect(existsSync(journalPath(r.dataDir))).toBe(false);
    await waitUntil(() => r.session.state().klippyState === "ready", "Klipper ready again");
  });

  it.each(["printing", "paused"])("refuses with PRINTER_BUSY while print_stats is %s, touching nothing", async (printState) => {
    rig = await startRig({ klipper: { printState } });
    const r = rig;
    await waitUntil(() => r.session.isPrinting(), "the session to see the print");
    let ran = false;
    const err = await withKlipperStopped(r.session, journalPath(r.dataDir), guardOpts(r), async () => {
      ran = true;
    }).catch((e: unknown) => e);
    expect(isMoonflashError(err) && err.code).toBe("PRINTER_BUSY");
    expect((err as Error).message).toBe(
      `The printer is printing (print_stats: ${printState}). Flashing stops Klipper; wait for the print to end or cancel it.`,
    );
    expect(ran).toBe(false);
    expect(r.fake.serviceActions).toEqual([]);
    expect(existsSync(journalPath(r.dataDir))).toBe(false);
  });

  it("refuses with MOONRAKER_UNAVAILABLE when nobody can tell whether Klipper runs", async () => {
    rig = await startRig();
    const r = rig;
    const offline = new AgentSession({
      endpoint: { kind: "unix", path: join(r.dataDir, "no-such.sock") },
      clientName: "moonflash-offline",
      version: "0.0.0-test",
      url: "https://example.invalid/moonflash",
      methods: [],
      onCall: async () => "ok",
      logger: r.logger,
    });
    let ran = false;
    const err = await withKlipperStopped(offline, journalPath(r.dataDir), guardOpts(r), async () => {
      ran = true;
    }).catch((e: unknown) => e);
    expect(isMoonflashError(err) && err.code).toBe("MOONRAKER_UNAVAILABLE");
    expect(ran).toBe(false);
    expect(existsSync(journalPath(r.dataDir))).toBe(false);
  });

  it("fails a successful job with the restart's code when Klipper does not come back, and says so", async () => {
    // Klipper stops at once but takes far longer to start than the guard waits.
    rig = await startRig({ timing: { stopOkMs: 20, stopStateMs: 20, startOkMs: 5000, startStateMs: 20, readyMs: 20 } });
    const r = rig;
    const err = await withKlipperStopped(r.session, journalPath(r.dataDir), guardOpts(r, 400), async () => "flashed").catch((e: unknown) => e);
    expect(isMoonflashError(err) && err.code).toBe("SERVICE_TIMEOUT");
    expect((err as MoonflashError).message).toMatch(/finished, but moonflash could not confirm that Klipper runs: .*moonflash keeps checking, starts klipper/);
    expect((err as MoonflashError).details).toMatchObject({ klipperRestart: { ok: false, code: "SERVICE_TIMEOUT", pending: true }, result: "flashed" });
    expect(actions(r)).toEqual(["stop klipper", "start klipper"]);
    // The journal stays, marked: only the start is left for recovery to do.
    expect(await readJournal(r.dataDir)).toMatchObject({ jobId: "flash-test-1", restartPending: true, klipperWasRunning: true });
  });

  it("a restart failure never replaces the work's own error", async () => {
    rig = await startRig({ timing: { stopOkMs: 20, stopStateMs: 20, startOkMs: 5000, startStateMs: 20, readyMs: 20 } });
    const r = rig;
    const err = await withKlipperStopped(r.session, journalPath(r.dataDir), guardOpts(r, 400), async () => {
      throw new MoonflashError("VERIFY_FAILED", "read-back differs at 0x8002000");
    }).catch((e: unknown) => e);
    expect(isMoonflashError(err) && err.code).toBe("VERIFY_FAILED");
    expect((err as MoonflashError).details.klipperRestart).toMatchObject({ ok: false, code: "SERVICE_TIMEOUT" });
  });

  it("on SIGTERM in a real process: starts Klipper again, removes the journal, then dies by SIGTERM", async () => {
    rig = await startRig();
    const r = rig;
    const child = execa("node", ["--import", "tsx", join(repoRoot, "test/fixtures/engine/guard-child.ts"), r.fake.socketPath, r.dataDir], {
      cwd: repoRoot,
      reject: false,
      timeout: 20_000,
    });
    let stdout = "";
    child.stdout?.on("data", (chunk: Buffer) => (stdout += chunk.toString()));
    await waitUntil(() => stdout.includes("working"), "the child's work to start with Klipper stopped", 15_000);
    expect(existsSync(journalPath(r.dataDir))).toBe(true);
    expect(r.fake.klipper.serviceActive).toBe(false);
    child.kill("SIGTERM");
    const result = await child;
    expect(result.signal).toBe("SIGTERM");
    expect(result.stdout).toContain("work aborted: CANCELLED");
    expect(actions(r)).toEqual(["stop klipper", "start klipper"]);
    expect(existsSync(journalPath(r.dataDir))).toBe(false);
  });
});

describe("recoverInterruptedJob", () => {
  async function deadPid(): Promise<number> {
    const child = await execa("node", ["-e", "process.stdout.write(String(process.pid))"], { timeout: 10_000 });
    return Number(child.stdout);
  }

  async function leaveJournal(r: PrinterRig, pid: number): Promise<FlashJournal> {
    const journal: FlashJournal = {
      jobId: "flash-20261123T120000-dead",
      kind: "flash",
      target: "mcu toolhead",
      pid,
      startedAt: "2026-11-23T12:00:00.000Z",
      klipperService: "klipper",
      klipperWasRunning: true,
    };
    await mkdir(dirname(journalPath(r.dataDir)), { recursive: true });
    await writeFile(journalPath(r.dataDir), JSON.stringify(journal));
    return journal;
  }

  it("starts Klipper, records the job as INTERRUPTED and removes the journal", async () => {
    rig = await startRig();
    const r = rig;
    // The state a killed flash leaves: Klipper stopped, the journal on disk.
    await r.session.stopService("klipper", 3000);
    await leaveJournal(r, await deadPid());
    expect(await readJournal(r.dataDir)).toMatchObject({ jobId: "flash-20261123T120000-dead" });

    const outcome = await recoverInterruptedJob(r.dataDir, r.session, r.runner, r.logger);
    expect(outcome).toMatchObject({ klipperStarted: true, journal: { jobId: "flash-20261123T120000-dead" } });
    expect(actions(r)).toEqual(["stop klipper", "start klipper"]);
    await waitUntil(() => r.session.state().klippyState === "ready", "Klipper ready again");
    expect(existsSync(journalPath(r.dataDir))).toBe(false);
    expect(await readJournal(r.dataDir)).toBeNull();
    const [last] = r.runner.history("flash", 1);
    expect(last).toMatchObject({ id: "flash-20261123T120000-dead", target: "mcu toolhead", ok: false, code: "INTERRUPTED" });
  });

  it("leaves a journal alone while the process that wrote it is still alive", async () => {
    rig = await startRig();
    const r = rig;
    // The test runner's parent process stands in for a CLI flash that is still running.
    await leaveJournal(r, process.ppid);
    expect(await recoverInterruptedJob(r.dataDir, r.session, r.runner, r.logger)).toBeNull();
    expect(r.fake.serviceActions).toEqual([]);
    expect(existsSync(journalPath(r.dataDir))).toBe(true);
  });

  it("does nothing without a journal", async () => {
    rig = await startRig();
    expect(await recoverInterruptedJob(rig.dataDir, rig.session, rig.runner, rig.logger)).toBeNull();
    expect(rig.fake.serviceActions).toEqual([]);
  });
});
