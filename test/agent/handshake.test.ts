// A macro or client can call a method as soon as Moonraker has registered it, before the agent has read the printer's
// state (machine.system_info and server.info follow the registration). Such a call must see the state, not
// "Moonraker is not reachable".

import { afterEach, expect, it } from "vitest";
import { mkdtemp, mkdir, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import pino from "pino";
import type { Agent } from "../../src/agent/agent.js";
import { createAgent } from "../../src/app.js";
import { startFakeMoonraker, type FakeMoonraker } from "../support/fake-moonraker/index.js";

let dir: string;
let moonraker: FakeMoonraker;
let agent: Agent;

afterEach(async () => {
  await agent.stop();
  await moonraker.stop();
  await rm(dir, { recursive: true, force: true });
});

it("a call that arrives during the handshake waits for the state and answers from it", async () => {
  dir = await mkdtemp(join(tmpdir(), "moonflash-handshake-"));
  await mkdir(join(dir, "config"), { recursive: true });
  // A slow machine.system_info (a busy Pi) keeps the agent in its handshake after the methods are registered.
  moonraker = await startFakeMoonraker({ dataDir: dir, websocket: false, timing: { systemInfoMs: 600 } });
  agent = await createAgent({ dataDir: dir, logger: pino({ level: "silent" }) });
  agent.start();
  await moonraker.waitFor(() => moonraker.remoteMethods().includes("flash.check"), 10_000);
  expect(agent.session.identified).toBe(false);
  const web = await moonraker.connectClient({ transport: "unix" });
  const check = (await web.call("server.extensions.request", { agent: "moonflash", method: "flash.check" })) as { klipper_state: string; host: { source: string } };
  expect(check.klipper_state).toBe("ready");
  expect(check.host.source).not.toBe("git-describe");
  await web.close();
});
