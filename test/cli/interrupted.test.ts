// SIGKILL of the real agent process in the middle of a flash: Klipper stays stopped (nothing could start it), the
// journal and a stale job lock remain. The next agent start must start Klipper and record the job as INTERRUPTED.

import { afterEach, beforeEach, expect, it } from "vitest";
import { mkdtemp, mkdir, rm, writeFile, access } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { execa, type ResultPromise } from "execa";
import { startFakeMoonraker, type FakeMoonraker } from "../support/fake-moonraker/index.js";
import { startVirtualDevice, type VirtualDevice } from "../../src/sim/virtual-device.js";

const repo = resolve(import.meta.dirname, "../..");
let dir: string;
let moonraker: FakeMoonraker;
let board: VirtualDevice;
const agents: ResultPromise[] = [];

function serve(): ResultPromise {
  const child = execa("node", ["--import", "tsx", join(repo, "src/cli/main.ts"), "serve", "--data", dir], { cwd: repo, reject: false, timeout: 60_000 });
  agents.push(child);
  return child;
}

const exists = (p: string): Promise<boolean> => access(p).then(() => true, () => false);

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), "moonflash-kill-"));
  await mkdir(join(dir, "config"), { recursive: true });
  await writeFile(join(dir, "fw.bin"), randomBytes(64 * 1024));
  await writeFile(join(dir, "config", "moonflash.conf"), `[mcu]\nmethod: katapult\nfirmware: ${join(dir, "fw.bin")}\nbootloader: none\n`);
  // 1024 blocks at 10 ms each: the flash is surely still writing when the agent is killed.
  board = await startVirtualDevice({ path: join(dir, "board"), writeDelayMs: 10 });
  moonraker = await startFakeMoonraker({ dataDir: dir, klipper: { mcus: [{ section: "mcu", settings: { serial: join(dir, "board") }, mcu_constants: { MCU: "stm32f103xe" } }] } });
});

afterEach(async () => {
  for (const a of agents.splice(0)) {
    a.kill("SIGKILL");
    await a;
  }
  await board.stop();
  await moonraker.stop();
  if (!process.env.KEEP) await rm(dir, { recursive: true, force: true });
  else console.log(dir);
});

it("SIGKILL mid-flash, then restart: Klipper is started again and the job is recorded as INTERRUPTED", { timeout: 90_000 }, async () => {
  const first = serve();
  await moonraker.waitFor(() => moonraker.remoteMethods().includes("flash.mcu"), 20_000);
  const web = await moonraker.connectClient({ transport: "ws" });
  const flashing = web.call("server.extensions.request", { agent: "moonflash", method: "flash.mcu", arguments: { mcu: "mcu" } }).catch((e: unknown) => e);

  await new Promise<void>((resolve) => {
    const onBlock = (b: { index: number }): void => {
      if (b.index >= 20) {
        board.off("block", onBlock);
        resolve();
      }
    };
    board.on("block", onBlock);
  });
  first.kill("SIGKILL");
  await first;
  // Moonraker fails the pending request when the agent's socket drops.
  expect(await flashing).toMatchObject({ code: 500 });
  expect(moonraker.serviceActions.map((a) => a.action)).toEqual(["stop"]);
  expect(await exists(join(dir, "moonflash", "journal.json"))).toBe(true);
  expect(await exists(join(dir, "moonflash", "job.lock"))).toBe(true);

  // `moonflash status` never shows the dead process's job as running.
  const status1 = await execa("node", ["--import", "tsx", join(repo, "src/cli/main.ts"), "status", "--data", dir], { cwd: repo, reject: false, timeout: 30_000 });
  expect(status1.stdout).toMatch(/^running: nothing$/m);
  expect(status1.stdout).toMatch(/^note: job flash-\S+ of process \d+ did not finish \(that process is gone\)/m);
  expect(status1.stdout).toMatch(/^note: klipper is still to be started after job flash-\S+/m);

  serve();
  await moonraker.waitFor(() => moonraker.serviceActions.map((a) => a.action).join(",") === "stop,start", 20_000);
  await moonraker.waitFor(() => moonraker.klipper.state === "ready", 10_000);
  await moonraker.waitFor(() => moonraker.remoteMethods().includes("flash.status"), 10_000);
  // Recovery ends by removing the journal, after Klipper is back up.
  await moonraker.waitFor(() => !existsSync(join(dir, "moonflash", "journal.json")), 20_000);
  const status = (await web.call("server.extensions.request", { agent: "moonflash", method: "flash.status" })) as {
    current: unknown;
    last: Array<{ ok: boolean; code?: string; target: string }>;
  };
  expect(status.current).toBeNull();
  expect(status.last[0]).toMatchObject({ ok: false, code: "INTERRUPTED", target: "mcu" });
  // Recovery clears the dead process's lock and tells the console once, when Klipper is back.
  expect(await exists(join(dir, "moonflash", "job.lock"))).toBe(false);
  await moonraker.waitFor(() => moonraker.consoleLines.some((l) => l.startsWith("!! moonflash: flash mcu failed [INTERRUPTED]")), 10_000);
  const told = moonraker.consoleLines.filter((l) => l.includes("[INTERRUPTED]"));
  expect(told).toHaveLength(1);
  expect(told[0]).toMatch(/moonflash stopped while this flash job ran .*Klipper was started again\. .*run the same flash again/);
  const status2 = await execa("node", ["--import", "tsx", join(repo, "src/cli/main.ts"), "status", "--data", dir], { cwd: repo, reject: false, timeout: 30_000 });
  expect(status2.stdout).toMatch(/^running: nothing$/m);
  expect(status2.stdout).not.toMatch(/^note:/m);

  // The dead process's lock is stale: a new job runs (a dry run, so nothing is stopped again).
  const plan = await web.call("server.extensions.request", { agent: "moonflash", method: "flash.mcu", arguments: { mcu: "mcu", dry_run: true } });
  expect(plan).toMatchObject({ dry_run: true, mcu: "mcu" });
  await web.close();
});
