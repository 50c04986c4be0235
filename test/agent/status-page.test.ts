// The status page in the agent: it listens as [status_page] says, the line said before Klipper stops points to it,
// and during a flash it is a Mainsail/Fluidd iframe webcam from the moment Klipper has stopped until Klipper is back
// (server.webcams.* of the fake Moonraker, which answers as components/webcam.py does). A webcam an earlier
// process left behind is removed on the next connection.

import { afterEach, beforeEach, expect, it } from "vitest";
import { mkdtemp, mkdir, rm, writeFile } from "node:fs/promises";
import { createServer, type AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { randomBytes } from "node:crypto";
import { Writable } from "node:stream";
import pino from "pino";
import type { Agent } from "../../src/agent/agent.js";
import { createAgent } from "../../src/app.js";
import { startFakeMoonraker, type FakeMoonraker } from "../support/fake-moonraker/index.js";
import { startVirtualDevice, type VirtualDevice } from "../../src/sim/virtual-device.js";

let dir: string;
let moonraker: FakeMoonraker;
let board: VirtualDevice;
let agent: Agent | null = null;
let port: number;

/** A port free right now ([status_page] port takes 1–65535). */
async function freePort(): Promise<number> {
  const probe = createServer();
  await new Promise<void>((resolve) => probe.listen(0, "127.0.0.1", resolve));
  const p = (probe.address() as AddressInfo).port;
  await new Promise((resolve) => probe.close(resolve));
  return p;
}

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), "moonflash-page-"));
  await mkdir(join(dir, "config"), { recursive: true });
  await writeFile(join(dir, "fw.bin"), randomBytes(8 * 1024));
  port = await freePort();
  await writeFile(
    join(dir, "config", "moonflash.conf"),
    [
      "[mcu emu]", `serial: ${join(dir, "board")}`, "method: katapult", `firmware: ${join(dir, "fw.bin")}`, "bootloader: none",
      "[status_page]", `port: ${port}`, "bind: 127.0.0.1", `public_url: http://printer.local:${port}/`, "",
    ].join("\n"),
  );
  board = await startVirtualDevice({ path: join(dir, "board") });
  moonraker = await startFakeMoonraker({ dataDir: dir });
});

afterEach(async () => {
  await agent?.stop();
  agent = null;
  await board.stop();
  await moonraker.stop();
  await rm(dir, { recursive: true, force: true });
});

async function startAgent(): Promise<Agent> {
  agent = await createAgent({ dataDir: dir, logger: pino({ level: "silent" }) });
  agent.start();
  await moonraker.waitFor(() => agent!.session.identified && agent!.session.state().klippyState === "ready", 10_000);
  expect((await agent.statusPageServer())?.port).toBe(port);
  return agent;
}

it("a flash: the pre-stop line names the page, the page is a webcam only while Klipper is stopped, and it shows the result", { timeout: 30_000 }, async () => {
  const a = await startAgent();
  // Each webcam change as a Mainsail tab hears it, with Klipper's state at that moment.
  const web = await moonraker.connectClient({ transport: "ws" });
  const changes: Array<{ names: string[]; at: number; urls: string[] }> = [];
  web.onNotification((method, params) => {
    if (method !== "notify_webcams_changed") return;
    const cams = (params as Array<{ webcams: Array<{ name: string; stream_url: string; service: string }> }>)[0]!.webcams;
    changes.push({ names: cams.map((c) => `${c.name} (${c.service})`), at: Date.now(), urls: cams.map((c) => c.stream_url) });
  });

  await a.flash.flash({ mcu: "emu" });
  await moonraker.waitFor(() => moonraker.consoleLines.some((l) => l.includes("flashed with katapult")), 10_000);
  await moonraker.waitFor(() => changes.length >= 2, 5000);
  await web.close();

  expect(moonraker.consoleLines).toContain(
    `// moonflash: flash emu: stopping Klipper to flash the board. The result appears here when Klipper is back. Watch it live at http://printer.local:${port}/ (also on the Webcam page as 'moonflash').`,
  );
  // Added once Klipper was down (so Fluidd renders it fresh), removed once it was back.
  expect(changes).toEqual([
    { names: ["moonflash (iframe)"], at: expect.any(Number), urls: [`http://printer.local:${port}/`] },
    { names: [], at: expect.any(Number), urls: [] },
  ]);
  const stop = moonraker.serviceActions.find((s) => s.action === "stop" && s.service === "klipper")!;
  const start = moonraker.serviceActions.find((s) => s.action === "start" && s.service === "klipper")!;
  expect(changes[0]!.at).toBeGreaterThanOrEqual(stop.at);
  expect(changes[0]!.at).toBeLessThanOrEqual(start.at);
  expect(changes[1]!.at).toBeGreaterThanOrEqual(start.at);
  expect([...moonraker.webcams.keys()]).toEqual([]);

  // The page itself, read-only: the job in its history.
  const status = (await (await fetch(`http://127.0.0.1:${port}/status.json`)).json()) as { history: Array<Record<string, unknown>> };
  expect(status.history[0]).toMatchObject({ ok: true });
  expect((await fetch(`http://127.0.0.1:${port}/status.json`, { method: "POST" })).status).toBe(405);
});

it("an idle agent holds the port but loads the page only when a browser first connects", { timeout: 30_000 }, async () => {
  const records: Array<{ msg?: string }> = [];
  const sink = new Writable({
    write(chunk: Buffer, _encoding, done) {
      for (const line of chunk.toString().split("\n").filter(Boolean)) records.push(JSON.parse(line) as { msg?: string });
      done();
    },
  });
  agent = await createAgent({ dataDir: dir, logger: pino({ level: "debug" }, sink) });
  agent.start();
  await moonraker.waitFor(() => agent!.session.identified && agent!.session.state().klippyState === "ready", 10_000);
  expect((await agent.statusPageServer())?.port).toBe(port);
  await new Promise((resolve) => setTimeout(resolve, 300));
  expect(records.filter((r) => r.msg === "status page loaded")).toEqual([]);
  const page = await fetch(`http://127.0.0.1:${port}/`);
  expect(page.status).toBe(200);
  expect(await page.text()).toContain("moonflash");
  expect(records.filter((r) => r.msg === "status page loaded")).toHaveLength(1);
  // A second viewer uses the same page.
  expect((await fetch(`http://127.0.0.1:${port}/status.json`)).status).toBe(200);
  expect(records.filter((r) => r.msg === "status page loaded")).toHaveLength(1);
});

it("removes the webcam an earlier moonflash left (killed during a job) when it connects and no job runs", { timeout: 30_000 }, async () => {
  const web = await moonraker.connectClient({ transport: "ws" });
  await web.call("server.webcams.post_item", { name: "moonflash", service: "iframe", stream_url: "http://printer.local:7180/" });
  await web.call("server.webcams.post_item", { name: "nozzle cam", service: "mjpegstreamer", stream_url: "/webcam/?action=stream" });
  await web.close();
  await startAgent();
  await moonraker.waitFor(() => !moonraker.webcams.has("moonflash"), 5000);
  expect([...moonraker.webcams.keys()]).toEqual(["nozzle cam"]);
});

it("a port that is taken: the agent logs it and works on without the page; nothing is said of a page", { timeout: 30_000 }, async () => {
  const squatter = createServer();
  await new Promise<void>((resolve) => squatter.listen(port, "127.0.0.1", resolve));
  try {
    agent = await createAgent({ dataDir: dir, logger: pino({ level: "silent" }) });
    agent.start();
    await moonraker.waitFor(() => agent!.session.identified && agent!.session.state().klippyState === "ready", 10_000);
    expect(await agent.statusPageServer()).toBeNull();
    await agent.flash.flash({ mcu: "emu" });
    await moonraker.waitFor(() => moonraker.consoleLines.some((l) => l.includes("flashed with katapult")), 10_000);
    expect(moonraker.consoleLines).toContain("// moonflash: flash emu: stopping Klipper to flash the board. The result appears here when Klipper is back.");
    expect([...moonraker.webcams.keys()]).toEqual([]);
  } finally {
    await new Promise((resolve) => squatter.close(resolve));
  }
});
