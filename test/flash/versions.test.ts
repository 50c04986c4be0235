// The version check: the "MCU Protocol error" parser table-tested with real messages (the fake's, and one laid
// out exactly as klippy/extras/error_mcu.py joins it), then checkVersions against the fake Moonraker with the
// real AgentSession: Klipper ready, Klipper in MCU Protocol error without mcu objects, Klipper stopped (git
// describe of a real git tree with a tag, and the firmware store).

import { randomBytes } from "node:crypto";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { deflateSync } from "node:zlib";
import { execa } from "execa";
import { pino } from "pino";
import { afterEach, describe, expect, it } from "vitest";
import { parseConfig } from "../../src/moonflash-conf.js";
import { FirmwareStore } from "../../src/flash/firmware-store.js";
import { checkVersions, isOutdated, parseMcuProtocolError, treeVersion, versionSummary, type VersionCheck } from "../../src/flash/versions.js";
import type { AgentSession } from "../../src/moonraker/session.js";
import { mcuProtocolErrorMessage, startFakeMoonraker, type FakeMoonraker, type FakeMoonrakerOptions } from "../support/fake-moonraker/index.js";
import { QUICK_TIMING, startTestSession, waitUntil } from "../fixtures/engine/rig.js";

const HOST = "v0.13.0-730-g84104bbbd";
const OLD = "v0.12.0-85-gd785b396";

// klippy/extras/error_mcu.py: message_protocol_error1/2 and _check_protocol_error's "\n".join(newmsg).
const ERROR1 = "\nThis is frequently caused by running an older version of the\nfirmware on the MCU(s). Fix by recompiling and flashing the\nfirmware.\n";
const ERROR2 = '\nOnce the underlying issue is corrected, use the "RESTART"\ncommand to reload the config and restart the host software.\n';
function klipperProtocolError(host: string, update: string[], updated: string[], error: string): string {
  return [
    "MCU Protocol error", ERROR1, `Your Klipper version is: ${host}`, "MCU(s) which should be updated:",
    ...(update.length ? update : ["<none>"]), "Up-to-date MCU(s):", ...(updated.length ? updated : ["<none>"]), ERROR2, error,
  ].join("\n");
}

describe("parseMcuProtocolError", () => {
  const cases: Array<{ name: string; message: string; expected: ReturnType<typeof parseMcuProtocolError> }> = [
    {
      name: "error_mcu.py's message: one MCU to update, one up to date",
      message: klipperProtocolError(HOST, [`toolhead: Current version ${OLD}`], [`mcu: Current version ${HOST}`], "Unknown command: config_spi_shutdown"),
      expected: {
        hostVersion: HOST,
        outdated: [{ name: "toolhead", version: OLD }],
        upToDate: [{ name: "mcu", version: HOST }],
        detail: "Unknown command: config_spi_shutdown",
      },
    },
    {
      name: "error_mcu.py's message: every MCU to update, <none> up to date",
      message: klipperProtocolError(HOST, [`mcu: Current version ${OLD}`, "toolhead: Current version v0.11.0-1-gabc"], [], "Unknown command: stepper_stop_on_trigger"),
      expected: {
        hostVersion: HOST,
        outdated: [{ name: "mcu", version: OLD }, { name: "toolhead", version: "v0.11.0-1-gabc" }],
        upToDate: [],
        detail: "Unknown command: stepper_stop_on_trigger",
      },
    },
    {
      name: "error_mcu.py's message as printer.info hands it over (trimmed), <none> to update",
      message: klipperProtocolError(HOST, [], [`mcu: Current version ${HOST}`], "Unknown command: foo").trim(),
      expected: { hostVersion: HOST, outdated: [], upToDate: [{ name: "mcu", version: HOST }], detail: "Unknown command: foo" },
    },
    {
      name: "the fake Moonraker's message (bare names in the up-to-date list)",
      message: mcuProtocolErrorMessage(HOST, [{ name: "toolhead", version: OLD }], ["mcu", "bed"]),
      expected: {
        hostVersion: HOST,
        outdated: [{ name: "toolhead", version: OLD }],
        upToDate: [{ name: "mcu", version: null }, { name: "bed", version: null }],
        detail: "Unknown command: config_spi_shutdown",
      },
    },
    {
      name: "CRLF line ends",
      message: mcuProtocolErrorMessage(HOST, [{ name: "toolhead", version: OLD }], []).replace(/\n/g, "\r\n"),
      expected: { hostVersion: HOST, outdated: [{ name: "toolhead", version: OLD }], upToDate: [], detail: "Unknown command: config_spi_shutdown" },
    },
    { name: "ready", message: "Printer is ready", expected: null },
    { name: "empty", message: "", expected: null },
    { name: "a shutdown", message: "MCU 'mcu' shutdown: Timer too close\nThis often indicates the host computer is overloaded.", expected: null },
    { name: "a connect error", message: "mcu 'toolhead': Unable to connect\nOnce the underlying issue is corrected, use the\n\"FIRMWARE_RESTART\" command", expected: null },
  ];
  it.each(cases)("$name", ({ message, expected }) => {
    expect(parseMcuProtocolError(message)).toEqual(expected);
  });

  it("Klipper's rule: any difference is outdated, newer too; unknown stays unknown", () => {
    expect(isOutdated(OLD, HOST)).toBe(true);
    expect(isOutdated("v0.14.0-1-g1", HOST)).toBe(true);
    expect(isOutdated(HOST, HOST)).toBe(false);
    expect(isOutdated(null, HOST)).toBeNull();
    expect(isOutdated(HOST, null)).toBeNull();
  });
});

describe("versionSummary", () => {
  const mcu = (name: string, version: string | null, outdated: boolean | null) =>
    ({ mcu: name === "mcu" ? "mcu" : `mcu ${name}`, name, version, outdated, source: "klipper", reason: "", rollback: null }) as const;
  it.each([
    {
      check: { klipper_state: "ready", host: { version: "v0.13.0-730", source: "klipper" }, protocol_error: null, mcus: [mcu("mcu", "v0.13.0-730", false), mcu("toolhead", "v0.12.0-85", true)] },
      line: "moonflash: Klipper v0.13.0-730. Outdated: toolhead (v0.12.0-85). Up to date: mcu. Flash it with FLASH_MCU MCU=toolhead.",
    },
    {
      check: { klipper_state: "ready", host: { version: "v0.13.0-730", source: "klipper" }, protocol_error: null, mcus: [mcu("mcu", "v0.13.0-730", false), mcu("emu", null, null)] },
      line: "moonflash: Klipper v0.13.0-730. Outdated: none. Up to date: mcu. Unknown: emu.",
    },
    {
      check: { klipper_state: "error", host: { version: "v1", source: "protocol-error" }, protocol_error: { detail: null }, mcus: [mcu("mcu", "v0", true), mcu("toolhead", "v0", true)] },
      line: "moonflash: Klipper v1 (MCU Protocol error). Outdated: mcu (v0), toolhead (v0). Flash each with FLASH_MCU MCU=<name>.",
    },
    {
      check: { klipper_state: "disconnected", host: { version: null, source: "unknown" }, protocol_error: null, mcus: [mcu("mcu", null, null)] },
      line: "moonflash: Klipper's version is unknown. Outdated: none. Unknown: mcu.",
    },
  ])("$line", ({ check, line }) => {
    expect(versionSummary(check as VersionCheck)).toBe(line);
  });
});

/** A Klipper image whose data dictionary says `version` (scripts/buildcommands.py). */
const klipperImage = (version: string): Buffer =>
  Buffer.concat([randomBytes(1000), deflateSync(JSON.stringify({ version, config: { MCU: "stm32f103xe" } })), randomBytes(200)]);

describe("checkVersions against the fake Moonraker", () => {
  let dir: string;
  let fake: FakeMoonraker | null = null;
  let session: AgentSession | null = null;

  afterEach(async () => {
    await session?.stop();
    session = null;
    await fake?.stop();
    fake = null;
    await rm(dir, { recursive: true, force: true });
  });

  async function start(klipper: FakeMoonrakerOptions["klipper"], conf = "", klipperPath?: string) {
    dir = await mkdtemp(join(tmpdir(), "moonflash-versions-"));
    fake = await startFakeMoonraker({ dataDir: dir, websocket: false, timing: QUICK_TIMING, klipper });
    session = startTestSession(fake.socketPath, "moonflash", pino({ level: "silent" }));
    await waitUntil(() => session!.identified && session!.state().klippyState !== "disconnected" && session!.state().klippyState !== "startup", "the session to see Klipper");
    const text = `[moonflash]\nklipper_path: ${klipperPath ?? join(dir, "klipper")}\n\n${conf}`;
    return parseConfig(text, join(dir, "config", "moonflash.conf"), dir);
  }

  it("Klipper ready: versions from Klipper itself, outdated by Klipper's rule", async () => {
    const settings = await start(
      {
        softwareVersion: HOST,
        mcus: [
          { section: "mcu", settings: { serial: "/dev/ttyACM0" }, mcu_version: HOST },
          { section: "mcu toolhead", settings: { serial: "/dev/ttyACM1" }, mcu_version: OLD },
        ],
      },
      "[mcu emu]\nserial: /tmp/emu\n",
    );
    const check = await checkVersions(session!, settings);
    expect(check).toEqual({
      klipper_state: "ready",
      host: { version: HOST, source: "klipper" },
      protocol_error: null,
      mcus: [
        { mcu: "mcu", name: "mcu", version: HOST, source: "klipper", outdated: false, reason: `it runs ${HOST}, the same as Klipper`, rollback: null },
        {
          mcu: "mcu toolhead", name: "toolhead", version: OLD, source: "klipper", outdated: true,
          reason: `it runs ${OLD}, Klipper is ${HOST}: Klipper wants every MCU on its own version`, rollback: null,
        },
        {
          mcu: "mcu emu", name: "emu", version: null, source: "unknown", outdated: null,
          reason: "it is not in Klipper's config (only in moonflash.conf), so Klipper does not report its version, and moonflash has flashed no image to it", rollback: null,
        },
      ],
    });
    expect(versionSummary(check)).toBe(`moonflash: Klipper ${HOST}. Outdated: toolhead (${OLD}). Up to date: mcu. Unknown: emu. Flash it with FLASH_MCU MCU=toolhead.`);
  });

  it("MCU Protocol error: the state message is the source, also when Klipper reports no mcu objects", async () => {
    const message = klipperProtocolError(HOST, [`toolhead: Current version ${OLD}`], [`mcu: Current version ${HOST}`], "Unknown command: config_spi_shutdown");
    const settings = await start({ state: "error", stateMessage: message, softwareVersion: HOST, mcus: [] });
    expect(session!.state().klippyState).toBe("error");
    const check = await checkVersions(session!, settings);
    expect(check).toMatchObject({
      klipper_state: "error",
      host: { version: HOST, source: "protocol-error" },
      protocol_error: { detail: "Unknown command: config_spi_shutdown" },
      mcus: [
        { mcu: "mcu toolhead", name: "toolhead", version: OLD, source: "protocol-error", outdated: true },
        { mcu: "mcu", name: "mcu", version: HOST, source: "protocol-error", outdated: false },
      ],
    });
    expect(check.mcus[0]!.reason).toBe(`Klipper's "MCU Protocol error" lists it to be updated: it runs ${OLD}, Klipper is ${HOST}`);
    expect(versionSummary(check)).toBe(`moonflash: Klipper ${HOST} (MCU Protocol error). Outdated: toolhead (${OLD}). Up to date: mcu. Flash it with FLASH_MCU MCU=toolhead.`);
  });

  it("Klipper stopped: the host version is git describe of klipper_path; an MCU's is the last image flashed, else unknown", async () => {
    const tree = await mkdtemp(join(tmpdir(), "moonflash-klipper-git-"));
    try {
      const git = (...args: string[]) => execa("git", ["-c", "user.name=t", "-c", "user.email=t@example.invalid", "-c", "commit.gpgsign=false", "-C", tree, ...args]);
      await git("init", "-q");
      await writeFile(join(tree, "README"), "klipper\n");
      await git("add", "README");
      await git("commit", "-q", "-m", "one");
      await git("tag", "v0.13.0");
      for (const n of ["two", "three"]) {
        await writeFile(join(tree, "README"), `${n}\n`);
        await git("commit", "-q", "-am", n);
      }
      const head = (await git("rev-parse", "--short", "HEAD")).stdout.trim();
      const expected = `v0.13.0-2-g${head}`;
      // As Klipper would name itself if started from this tree (klippy/util.py get_git_version).
      expect(await treeVersion(tree, 10_000)).toEqual({ version: expected, source: "git-describe" });

      const settings = await start({ mcus: [{ section: "mcu", settings: { serial: "/dev/ttyACM0" } }] }, "[mcu toolhead]\nserial: /tmp/toolhead\n\n[mcu emu]\nserial: /tmp/emu\n", tree);
      const store = new FirmwareStore(join(dir, "moonflash", "firmware"));
      await store.add("mcu", klipperImage("v0.12.0-85"), { source: "flash", sourcePath: "/old.bin", date: new Date("2025-01-01T00:00:00Z") });
      await store.add("mcu", klipperImage(expected), { source: "flash", sourcePath: "/new.bin", date: new Date("2025-01-02T00:00:00Z") });
      await store.add("mcu toolhead", klipperImage("v0.12.0-85"), { source: "flash", sourcePath: "/th.bin", date: new Date("2025-01-03T00:00:00Z") });
      await session!.stopService("klipper", 5000);
      expect(session!.state().klippyConnected).toBe(false);

      const check = await checkVersions(session!, settings);
      expect(check).toEqual({
        klipper_state: "disconnected",
        host: { version: expected, source: "git-describe" },
        protocol_error: null,
        mcus: [
          {
            mcu: "mcu toolhead", name: "toolhead", version: "v0.12.0-85", source: "firmware-store", outdated: true, rollback: null,
            reason: `Klipper is stopped, so the MCU cannot be asked; the last image moonflash put on it (2025-01-03T00:00:00.000Z) is v0.12.0-85, Klipper is ${expected}`,
          },
          {
            mcu: "mcu emu", name: "emu", version: null, source: "unknown", outdated: null, rollback: null,
            reason: "Klipper is stopped, so the MCU cannot be asked, and moonflash has flashed no image to it",
          },
          {
            mcu: "mcu", name: "mcu", version: expected, source: "firmware-store", outdated: false,
            reason: "Klipper is stopped, so the MCU cannot be asked; the last image moonflash put on it (2025-01-02T00:00:00.000Z) is " + expected + ", the same as Klipper",
            rollback: { version: "v0.12.0-85", date: "2025-01-01T00:00:00.000Z", sha256: expect.stringMatching(/^[0-9a-f]{64}$/) },
          },
        ],
      });
      expect(versionSummary(check)).toBe(`moonflash: Klipper ${expected} (Klipper is not running: its source tree's version). Outdated: toolhead (v0.12.0-85). Up to date: mcu. Unknown: emu. Flash it with FLASH_MCU MCU=toolhead.`);
    } finally {
      await rm(tree, { recursive: true, force: true });
    }
  });

  it("a Klipper tree without git metadata: klippy/.version, else unknown with the reason", async () => {
    const tree = await mkdtemp(join(tmpdir(), "moonflash-klipper-plain-"));
    try {
      const unknown = await treeVersion(tree, 10_000);
      expect(unknown).toMatchObject({ version: null, source: "unknown" });
      expect(unknown.detail).toMatch(new RegExp(`^git describe in ${tree} failed: .*not a git repository.*\\. Check klipper_path in moonflash\\.conf\\.$`, "i"));
      await mkdir(join(tree, "klippy"));
      await writeFile(join(tree, "klippy", ".version"), "v0.13.0-700-gabcdef\n");
      expect(await treeVersion(tree, 10_000)).toEqual({ version: "v0.13.0-700-gabcdef", source: "version-file" });
    } finally {
      await rm(tree, { recursive: true, force: true });
    }
  });
});
