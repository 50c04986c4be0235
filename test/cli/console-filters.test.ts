// `moonflash console-filters` as a real child process (the committed bundle) against the fake Moonraker's database
// (server.database.*, answering as the real one did on the rig): the filter goes next to the user's own in
// Mainsail's and Fluidd's settings, a second run changes nothing, --remove gives back exactly what was there, and a
// UI never used on the printer gets no namespace. The regex hides our stored commands and nothing else.

import { afterEach, describe, expect, it } from "vitest";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { execa } from "execa";
import { FILTER_REGEX } from "../../src/cli/console-filters.js";
import { promptScript } from "../../src/agent/progress.js";
import { startFakeMoonraker, type FakeMoonraker } from "../support/fake-moonraker/index.js";

const repo = resolve(import.meta.dirname, "../..");
const cleanups: Array<() => Promise<void>> = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

async function printer(database: Record<string, Record<string, unknown>>): Promise<{ data: string; fake: FakeMoonraker }> {
  const data = await mkdtemp(join(tmpdir(), "moonflash-filters-"));
  const fake = await startFakeMoonraker({ dataDir: data, websocket: false, database });
  cleanups.push(async () => {
    await fake.stop();
    await rm(data, { recursive: true, force: true });
  });
  return { data, fake };
}

const cli = (data: string, ...args: string[]) =>
  execa("node", [join(repo, "dist", "moonflash.mjs"), "console-filters", "--data", data, ...args], { reject: false, timeout: 60_000 });

const USERS = {
  mainsail: { general: { printername: "Voron" }, console: { consolefilters: { "user-1": { bool: true, name: "temps", regex: "^B:" } } } },
  fluidd: { console: { consoleFilters: [{ id: "u1", name: "mine", type: "contains", value: "ok", enabled: true }] } },
};

describe("moonflash console-filters", () => {
  it("adds one filter beside the user's in Mainsail and Fluidd, once; --remove gives back exactly what was there", { timeout: 60_000 }, async () => {
    const { data, fake } = await printer(USERS);
    const added = await cli(data);
    expect(added.exitCode, added.stderr).toBe(0);
    expect(added.stdout).toBe('Mainsail: console filter "moonflash" added (reload the page to apply it)\nFluidd: console filter "moonflash" added (reload the page to apply it)');
    const mainsail = fake.database.get("mainsail") as typeof USERS.mainsail;
    const ours = Object.entries(mainsail.console.consolefilters).filter(([id]) => id !== "user-1");
    expect(ours).toEqual([[expect.stringMatching(/^[0-9a-f-]{36}$/), { bool: true, name: "moonflash", regex: FILTER_REGEX }]]);
    expect(mainsail.console.consolefilters["user-1"]).toEqual(USERS.mainsail.console.consolefilters["user-1"]);
    expect((fake.database.get("fluidd") as typeof USERS.fluidd).console.consoleFilters).toEqual([
      USERS.fluidd.console.consoleFilters[0],
      { id: expect.stringMatching(/^[0-9a-f-]{36}$/), name: "moonflash", type: "expression", value: FILTER_REGEX, enabled: true },
    ]);

    const snapshot = structuredClone(Object.fromEntries(fake.database));
    const again = await cli(data, "--json");
    expect(JSON.parse(again.stdout)).toEqual({ ok: true, result: { mainsail: "present", fluidd: "present", regex: FILTER_REGEX } });
    expect(Object.fromEntries(fake.database)).toEqual(snapshot);

    const removed = await cli(data, "--remove");
    expect(removed.stdout).toBe('Mainsail: console filter "moonflash" removed\nFluidd: console filter "moonflash" removed');
    expect(Object.fromEntries(fake.database)).toEqual(USERS);
  });

  it("brings a filter an older moonflash added up to date, in place, and leaves the user's alone", { timeout: 60_000 }, async () => {
    const OLD = '^RESPOND TYPE=\\w+ MSG="moonflash';
    const { data, fake } = await printer({
      mainsail: { console: { consolefilters: { ...USERS.mainsail.console.consolefilters, "old-1": { bool: true, name: "moonflash", regex: OLD } } } },
      fluidd: { console: { consoleFilters: [...USERS.fluidd.console.consoleFilters, { id: "old-2", name: "moonflash", type: "expression", value: OLD, enabled: true }] } },
    });
    const run = await cli(data);
    expect(run.stdout).toBe('Mainsail: console filter "moonflash" brought up to date (reload the page to apply it)\nFluidd: console filter "moonflash" brought up to date (reload the page to apply it)');
    expect(fake.database.get("mainsail")).toEqual({
      console: { consolefilters: { ...USERS.mainsail.console.consolefilters, "old-1": { bool: true, name: "moonflash", regex: FILTER_REGEX } } },
    });
    expect(fake.database.get("fluidd")).toEqual({
      console: { consoleFilters: [...USERS.fluidd.console.consoleFilters, { id: "old-2", name: "moonflash", type: "expression", value: FILTER_REGEX, enabled: true }] },
    });
    const again = await cli(data, "--json");
    expect(JSON.parse(again.stdout).result).toMatchObject({ mainsail: "present", fluidd: "present" });
  });

  it("leaves a UI that was never used alone: no namespace is created", { timeout: 60_000 }, async () => {
    const { data, fake } = await printer({ moonraker: { database_version: 2 } });
    const run = await cli(data, "--json");
    expect(JSON.parse(run.stdout)).toEqual({ ok: true, result: { mainsail: "no namespace", fluidd: "no namespace", regex: FILTER_REGEX } });
    expect([...fake.database.keys()]).toEqual(["moonraker"]);
  });

  it("fails with MOONRAKER_UNAVAILABLE, exit 1, when Moonraker is not there", { timeout: 60_000 }, async () => {
    const data = await mkdtemp(join(tmpdir(), "moonflash-filters-"));
    cleanups.push(() => rm(data, { recursive: true, force: true }));
    const run = await cli(data);
    expect(run.exitCode).toBe(1);
    expect(run.stderr).toMatch(/Could not reach Moonraker .*\[MOONRAKER_UNAVAILABLE\]/);
  });

  it("the regex hides the commands Moonraker stored for our messages, and no message and no user command", () => {
    const regex = new RegExp(FILTER_REGEX);
    // Lines as the rig's gcode_store held them after OTA_DOWNLOAD and a failed one.
    for (const stored of [
      'RESPOND TYPE=command MSG="moonflash: OTA download http://127.0.0.1:36191/rig-macros-1.0.0.zip: download 0%"',
      'RESPOND TYPE=error MSG="moonflash: OTA_DOWNLOAD failed [INVALID_PARAMS] OTA_DOWNLOAD: MD5: required: the package\'s MD5, 32 hex digits"',
      // A dialog is one stored script of several RESPOND lines; its title starts with "moonflash". Closing it:
      promptScript({ title: "moonflash: update 1 MCU to v0.13.0", text: ["1. emu"], buttons: [{ label: "Start", gcode: "UPDATE_MCUS MCU=emu", color: "primary" }] }),
      'RESPOND TYPE=command MSG="action:prompt_end"',
    ]) expect(regex.test(stored), stored).toBe(true);
    for (const shown of [
      "// moonflash: OTA download http://127.0.0.1:36191/rig-macros-1.0.0.zip: download 0%",
      "!! moonflash: OTA_DOWNLOAD failed [INVALID_PARAMS] OTA_DOWNLOAD: MD5: required",
      "OTA_DOWNLOAD URL=http://127.0.0.1:36191/x.zip",
      'RESPOND MSG="hello"',
      // Another macro's dialog, and the Cancel button's own G-code (the user's click) stay.
      'RESPOND TYPE=command MSG="action:prompt_begin Load filament"',
      "RESPOND TYPE=command MSG=action:prompt_end",
      "// action:prompt_begin moonflash: update 1 MCU to v0.13.0",
    ]) expect(regex.test(shown), shown).toBe(false);
  });
});
