// flash.build through the agent while Klipper prints: the build runs (in the fake Klipper tree) and nothing asks
// Moonraker to stop or start a service, so the print goes on; flash.status records the build as a flash job.

import { mkdir } from "node:fs/promises";
import path from "node:path";
import pino from "pino";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import type { Agent } from "../../src/agent/agent.js";
import { createAgent } from "../../src/app.js";
import { RpcCallError, startFakeMoonraker, type FakeMoonraker } from "../support/fake-moonraker/index.js";
import { createBuildFixture, STM32_PROFILE, type BuildFixture } from "./support/build-fixture.js";

let fx: BuildFixture;
let moonraker: FakeMoonraker;
let agent: Agent | null = null;
const originalPath = process.env.PATH;

beforeEach(async () => {
  fx = await createBuildFixture("build-printing");
  process.env.PATH = `${fx.bin}${path.delimiter}${originalPath}`;
  await mkdir(path.join(fx.dataDir, "config"), { recursive: true });
  await fx.writeConf("[mcu]\nkconfig: octopus.config\n[mcu toolhead]\n");
  await fx.writeProfile("octopus.config", STM32_PROFILE);
  moonraker = await startFakeMoonraker({
    dataDir: fx.dataDir,
    klipper: { printState: "printing", idleState: "Printing", mcus: [{ section: "mcu", settings: { serial: "/dev/serial/by-id/usb-Klipper_stm32f446xx_1-if00" }, mcu_constants: { MCU: "stm32f446xx" } }] },
  });
  agent = await createAgent({ dataDir: fx.dataDir, logger: pino({ level: "silent" }) });
  agent.start();
  await moonraker.waitFor(() => moonraker.remoteMethods().includes("flash.build") && agent!.session.identified, 10_000);
});

afterEach(async () => {
  await agent?.stop();
  agent = null;
  await moonraker.stop();
  process.env.PATH = originalPath;
  await fx.cleanup();
});

describe("flash.build while printing", () => {
  it("builds without stopping Klipper: no service action, the print goes on", async () => {
    expect(agent!.session.isPrinting()).toBe(true);
    const web = await moonraker.connectClient({ transport: "ws" });
    const result = (await web.call("server.extensions.request", { agent: "moonflash", method: "flash.build", arguments: { mcu: "mcu" } })) as {
      builds: Array<{ mcu: string; image: string; skipped: boolean }>;
    };
    expect(result.builds).toEqual([expect.objectContaining({ mcu: "mcu", image: path.join(fx.dataDir, "moonflash", "build", "mcu", "klipper.bin"), skipped: false })]);
    expect(moonraker.serviceActions).toEqual([]);
    expect(moonraker.klipper.state).toBe("ready");
    expect(agent!.session.isPrinting()).toBe(true);

    // Without mcu: every section with a profile; the one without is listed, not an error.
    const all = (await web.call("server.extensions.request", { agent: "moonflash", method: "flash.build", arguments: {} })) as {
      builds: Array<{ mcu: string; skipped: boolean }>;
      without_profile: string[];
    };
    expect(all.builds.map((b) => b.mcu)).toEqual(["mcu"]);
    expect(all.without_profile).toEqual(["mcu toolhead"]);

    const status = (await web.call("server.extensions.request", { agent: "moonflash", method: "flash.status" })) as { last: Array<{ kind: string; target: string; ok: boolean; params: unknown }> };
    expect(status.last[0]).toMatchObject({ kind: "flash", target: "mcu", ok: true, params: { action: "build", mcu: "mcu" } });
    expect(moonraker.serviceActions).toEqual([]);
    await web.close();
  });

  it("answers a missing profile with MISSING_CONFIG, also while printing", async () => {
    const web = await moonraker.connectClient({ transport: "ws" });
    const err = await web.call("server.extensions.request", { agent: "moonflash", method: "flash.build", arguments: { mcu: "toolhead" } }).then(
      () => null,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(RpcCallError);
    expect(JSON.stringify((err as RpcCallError).data)).toContain("MISSING_CONFIG");
    expect(moonraker.serviceActions).toEqual([]);
    await web.close();
  });
});
