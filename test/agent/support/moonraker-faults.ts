// Moonraker restarts at every step of a flash, briefly or for longer than service_timeout. The real agent runs
// in-process against the fake Moonraker over its unix socket, with a virtual Katapult board on a pty. Every case
// must end with Klipper running, the journal gone, and a job result (history and console) that tells the truth.

import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { mkdtemp, mkdir, rm, writeFile } from "node:fs/promises";
import { existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { randomBytes } from "node:crypto";
import pino from "pino";
import type { Agent } from "../../../src/agent/agent.js";
import { createAgent } from "../../../src/app.js";
import { startFakeMoonraker, type FakeMoonraker } from "../../support/fake-moonraker/index.js";
import { startVirtualDevice, type VirtualDevice } from "../../../src/sim/virtual-device.js";

/** The smallest service_timeout moonflash.conf accepts; "long" outages last longer than it. */
const SERVICE_TIMEOUT_S = 5;
const SHORT_DOWN_MS = 400;
const LONG_DOWN_MS = SERVICE_TIMEOUT_S * 1000 + 1500;

let dir: string;
let moonraker: FakeMoonraker;
let board: VirtualDevice;
let agent: Agent | null = null;
const image = randomBytes(48 * 1024);

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), "moonflash-faults-"));
  await mkdir(join(dir, "config"), { recursive: true });
  await writeFile(join(dir, "fw.bin"), image);
  await writeFile(
    join(dir, "config", "moonflash.conf"),
    `[moonflash]\nservice_timeout: ${SERVICE_TIMEOUT_S}\n\n[mcu]\nmethod: katapult\nfirmware: ${join(dir, "fw.bin")}\nbootloader: none\n`,
  );
  board = await startVirtualDevice({ path: join(dir, "board"), writeDelayMs: 1 });
  moonraker = await startFakeMoonraker({
    dataDir: dir,
    websocket: false,
    // Wide enough windows for a restart to land inside each step.
    timing: { stopOkMs: 150, stopStateMs: 20, startOkMs: 150, startStateMs: 20, readyMs: 400, klippyReconnectMs: 200 },
    klipper: { mcus: [{ section: "mcu", settings: { serial: join(dir, "board") }, mcu_constants: { MCU: "stm32f103xe" } }] },
  });
  agent = await createAgent({ dataDir: dir, logger: pino({ level: "silent" }) });
  agent.start();
  await moonraker.waitFor(() => moonraker.remoteMethods().includes("flash.mcu") && agent!.session.state().klippyState === "ready", 10_000);
});

afterEach(async () => {
  await agent?.stop();
  agent = null;
  await board.stop();
  await moonraker.stop();
  await rm(dir, { recursive: true, force: true });
});

type Trigger = (a: Agent) => Promise<void>;

const once = (register: (fire: () => void) => void): Promise<void> => new Promise((resolve) => register(resolve));

const onStage = (stage: string): Trigger => (a) =>
  once((fire) => {
    const off = a.runner.on((e) => {
      if (e.type === "stage" && e.stage === stage) {
        off();
        fire();
      }
    });
  });

const onProgress = (phase: string): Trigger => (a) =>
  once((fire) => {
    const off = a.runner.on((e) => {
      if (e.type === "progress" && e.phase === phase && e.done * 2 >= e.total) {
        off();
        fire();
      }
    });
  });

/** Moonraker received the service action and has not answered yet (the fake answers after stopOkMs/startOkMs). */
const onServiceAction = (action: string): Trigger => () =>
  moonraker.waitFor(() => moonraker.serviceActions.some((s) => s.action === action && s.service === "klipper"), 30_000);

/** The Klipper service runs again but Klippy has not connected yet. */
const onServiceActiveBeforeReady: Trigger = (a) =>
  once((fire) => {
    const off = a.session.onStateChange((s) => {
      if (moonraker.serviceActions.some((x) => x.action === "start") && s.services.klipper?.active_state === "active" && !s.klippyConnected) {
        off();
        fire();
      }
    });
  });

interface FaultCase {
  step: string;
  trigger: Trigger;
  downMs: number;
  /** What the job records: ok, or the failure code. */
  result: "ok" | "MOONRAKER_UNAVAILABLE";
  /** Whether the board was written (and so must hold the image). */
  flashed: boolean;
}

/** Where the fault lands; whether the board gets written. A short outage ends before service_timeout runs out. */
const steps: Array<Omit<FaultCase, "downMs" | "result"> & { short: FaultCase["result"] }> = [
  { step: "before the stop", trigger: onStage("keep-image"), flashed: false, short: "MOONRAKER_UNAVAILABLE" },
  { step: "during the stop", trigger: onServiceAction("stop"), flashed: false, short: "MOONRAKER_UNAVAILABLE" },
  { step: "during write", trigger: onProgress("write"), flashed: true, short: "ok" },
  { step: "during verify", trigger: onProgress("verify"), flashed: true, short: "ok" },
  { step: "at COMPLETE", trigger: () => once((fire) => board.once("complete", fire)), flashed: true, short: "ok" },
  { step: "during the start", trigger: onServiceAction("start"), flashed: true, short: "ok" },
  { step: "while waiting for ready", trigger: onServiceActiveBeforeReady, flashed: true, short: "ok" },
];


const label = (ms: number): string => (ms > SERVICE_TIMEOUT_S * 1000 ? `${ms / 1000} s (> service_timeout)` : `${ms} ms`);

/**
 * The table for one outage length. Longer than service_timeout, the job cannot confirm Klipper in time and says
 * so; the agent starts it later. (One file per length, so the two run side by side.)
 */
export function faultTable(outage: "short" | "long"): void {
const cases: FaultCase[] = steps.map(({ short, ...c }) =>
  outage === "short" ? { ...c, downMs: SHORT_DOWN_MS, result: short } : { ...c, downMs: LONG_DOWN_MS, result: "MOONRAKER_UNAVAILABLE" },
);
describe(`Moonraker restarts during a flash, ${outage} outage (step, outage → job result; Klipper always running at the end)`, () => {
  it.each(cases.map((c) => [c.step, label(c.downMs), c.result, c] as const))(
    "%s, down %s → %s",
    { timeout: 60_000 },
    async (_step, _down, _result, c) => {
      const a = agent!;
      const results: Array<{ ok: boolean; code?: string; message?: string }> = [];
      const notices: string[] = [];
      a.runner.on((e) => {
        if (e.type === "result") results.push({ ok: e.ok, ...(e.code ? { code: e.code } : {}), ...(e.message ? { message: e.message } : {}) });
        if (e.type === "notice") notices.push(e.message);
      });
      const fault = c.trigger(a).then(() => moonraker.restart(c.downMs));
      const job = a.flash.flash({ mcu: "mcu" }).then(
        (r) => ({ ok: true as const, r }),
        (err: { code: string; message: string }) => ({ ok: false as const, code: err.code, message: err.message }),
      );
      await fault;
      const outcome = await job;

      // The result tells the truth.
      if (c.result === "ok") expect(outcome).toMatchObject({ ok: true, r: { verified: true, klipper_restarted: true } });
      else expect(outcome).toMatchObject({ ok: false, code: c.result });
      if (!c.flashed && !outcome.ok) expect(outcome.message).toMatch(/nothing was written to the board/);
      if (c.flashed && !outcome.ok) expect(outcome.message).toMatch(/job finished, but moonflash could not confirm that Klipper runs/);
      expect(board.model.flash.subarray(0, image.length).equals(image)).toBe(c.flashed);

      // Klipper runs in the end, whatever the outage; the journal is gone once that is confirmed.
      await moonraker.waitFor(() => moonraker.klipper.serviceActive && moonraker.klipper.connected && moonraker.klipper.state === "ready", 30_000);
      await moonraker.waitFor(() => !existsSync(join(dir, "moonflash", "journal.json")), 30_000);
      const last = a.runner.history("flash", 1)[0];
      expect(last).toMatchObject(c.result === "ok" ? { ok: true } : { ok: false, code: c.result });
      expect(results).toHaveLength(1);
      // A job that could not confirm Klipper is followed by the notice that it runs.
      if (!outcome.ok && /moonflash keeps checking/.test(outcome.message)) {
        await moonraker.waitFor(() => notices.length === 1, 30_000);
        expect(notices[0]).toMatch(/Klipper is running again/);
      }

      // The console shows the outcome once Klipper is back, even though Moonraker went away meanwhile.
      const expected = c.result === "ok" ? "// moonflash: flash mcu: flashed with katapult" : `!! moonflash: flash mcu failed [${c.result}]`;
      await moonraker.waitFor(() => moonraker.consoleLines.some((l) => l.startsWith(expected)), 30_000);
    },
  );
});
}
