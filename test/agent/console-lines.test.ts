// What a console user reads about a flash job that never stops Klipper: a pre-flight error, a dry run. The line
// "stopping Klipper" appears only once pre-flight has passed and Klipper is about to stop.

import { afterEach, beforeEach, expect, it } from "vitest";
import { mkdtemp, mkdir, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { randomBytes } from "node:crypto";
import pino from "pino";
import type { Agent } from "../../src/agent/agent.js";
import { createAgent } from "../../src/app.js";
import { startFakeMoonraker, type FakeMoonraker } from "../support/fake-moonraker/index.js";
import { startVirtualDevice, type VirtualDevice } from "../../src/sim/virtual-device.js";

let dir: string;
let moonraker: FakeMoonraker;
let board: VirtualDevice;
let agent: Agent;

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), "moonflash-lines-"));
  await mkdir(join(dir, "config"), { recursive: true });
  await writeFile(join(dir, "fw.bin"), randomBytes(8 * 1024));
  await writeFile(join(dir, "config", "moonflash.conf"), `[mcu emu]\nserial: ${join(dir, "board")}\nmethod: katapult\nfirmware: ${join(dir, "fw.bin")}\nbootloader: none\n[status_page]\nenabled: False\n`);
  board = await startVirtualDevice({ path: join(dir, "board") });
  moonraker = await startFakeMoonraker({ dataDir: dir, websocket: false });
  agent = await createAgent({ dataDir: dir, logger: pino({ level: "silent" }) });
  agent.start();
  await moonraker.waitFor(() => agent.session.identified && agent.session.state().klippyState === "ready", 10_000);
});

afterEach(async () => {
  await agent.stop();
  await board.stop();
  await moonraker.stop();
  await rm(dir, { recursive: true, force: true });
});

const ours = (): string[] => moonraker.consoleLines.filter((l) => l.includes("moonflash"));

it("a dry run says it is one, names the plan, and never mentions stopping Klipper", async () => {
  await agent.flash.flash({ mcu: "emu", dry_run: true });
  await moonraker.waitFor(() => ours().some((l) => l.includes("dry run")), 5000);
  expect(ours()).toEqual([
    "// moonflash: flash emu: checking the board and the firmware",
    `// moonflash: flash emu: dry run, nothing was stopped or written. It would flash ${join(dir, "fw.bin")} (8192 bytes) to ${join(dir, "board")} with katapult.`,
  ]);
  expect(moonraker.serviceActions).toEqual([]);
});

it("a pre-flight error is one red line with the code, and Klipper is never mentioned as stopping", async () => {
  await rm(join(dir, "fw.bin"));
  await expect(agent.flash.flash({ mcu: "emu" })).rejects.toMatchObject({ code: "FIRMWARE_NOT_FOUND" });
  await moonraker.waitFor(() => ours().some((l) => l.startsWith("!!")), 5000);
  expect(ours()).toHaveLength(2);
  expect(ours()[0]).toBe("// moonflash: flash emu: checking the board and the firmware");
  expect(ours()[1]).toMatch(/^!! moonflash: flash emu failed \[FIRMWARE_NOT_FOUND\] /);
  expect(ours().join("\n")).not.toMatch(/stopping Klipper|Klipper stops/);
  expect(moonraker.serviceActions).toEqual([]);
});

it("a real flash says Klipper stops only after pre-flight, then gives the result line instead of 'done'", async () => {
  await agent.flash.flash({ mcu: "emu" });
  await moonraker.waitFor(() => ours().some((l) => l.includes("flashed with katapult")), 10_000);
  expect(ours()).toEqual([
    "// moonflash: flash emu: checking the board and the firmware",
    "// moonflash: flash emu: stopping Klipper to flash the board. The result appears here when Klipper is back.",
    expect.stringMatching(/^\/\/ moonflash: flash emu: flashed with katapult in \d+\.\d s \(8192 bytes, verified\)\. Klipper is running again\.$/),
  ]);
});
