// The console queue against the fake Moonraker through the real AgentSession: lines wait while Klipper is down or
// starting, keep their order, survive a Moonraker restart, and a full queue says how many lines it could not keep.

import { afterEach, expect, it } from "vitest";
import { ConsoleReporter } from "../../src/agent/progress.js";
import { startRig, waitUntil, type PrinterRig } from "../fixtures/engine/rig.js";

let rig: PrinterRig | undefined;
let reporter: ConsoleReporter | undefined;
afterEach(async () => {
  reporter?.close();
  reporter = undefined;
  await rig?.close();
  rig = undefined;
});

const ours = (r: PrinterRig): string[] => r.fake.consoleLines.filter((l) => l.includes("line ") || l.includes("moonflash:"));

it("holds lines while Klipper is stopped and while it is starting, then sends them in order once it is up", async () => {
  rig = await startRig();
  const r = rig;
  reporter = new ConsoleReporter(r.session, r.logger);
  await r.session.stopService("klipper", 3000);
  reporter.say("line 1");
  reporter.say("line 2", "error");
  reporter.say("line progress", "command", false); // a moment's progress is not kept for later
  // Klippy comes up in "startup" first: Moonraker would refuse RESPOND then, so nothing is sent yet.
  r.fake.klipper.setState("startup");
  r.fake.klipper.serviceStarted();
  r.fake.klipper.connect();
  await waitUntil(() => r.session.state().klippyConnected, "Klippy connected in startup");
  await new Promise((resolve) => setTimeout(resolve, 300));
  expect(ours(r)).toEqual([]);
  expect(reporter.pending).toBe(2);
  r.fake.klipper.setState("ready");
  await waitUntil(() => ours(r).length === 2, "the held lines");
  expect(ours(r)).toEqual(["// line 1", "!! line 2"]);
});

it("loses no line and keeps the order across a Moonraker restart", async () => {
  rig = await startRig();
  const r = rig;
  reporter = new ConsoleReporter(r.session, r.logger);
  const sent: string[] = [];
  const restart = (async () => {
    await waitUntil(() => ours(r).length >= 5, "the first lines");
    await r.fake.restart(300);
  })();
  for (let i = 1; i <= 30; i++) {
    sent.push(`// line ${i}`);
    reporter.say(`line ${i}`);
    await new Promise((resolve) => setTimeout(resolve, 15));
  }
  await restart;
  await waitUntil(() => ours(r).length >= 30, "every line after the restart", 15_000);
  expect(ours(r)).toEqual(sent);
});

it("keeps at most 50 lines while the console is away and says how many it could not keep", async () => {
  rig = await startRig();
  const r = rig;
  reporter = new ConsoleReporter(r.session, r.logger);
  await r.session.stopService("klipper", 3000);
  for (let i = 1; i <= 60; i++) reporter.say(`line ${i}`);
  await r.session.startService("klipper", 3000);
  await waitUntil(() => ours(r).length === 51, "the kept lines", 10_000);
  expect(ours(r)[0]).toBe("// moonflash: 10 earlier console line(s) could not be shown. See moonflash.log");
  expect(ours(r).slice(1)).toEqual(Array.from({ length: 50 }, (_, i) => `// line ${i + 11}`));
});
