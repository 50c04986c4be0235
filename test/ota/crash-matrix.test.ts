// Power-cut matrix (Mender's Killed_in_<State>, OSTree's kill -9 loop): a child process downloads and installs a
// real package against the fake Moonraker and is SIGKILLed at one named crash point; a second process runs
// recover(). Afterwards the whole installation (both roots and the toolhead "board") must be exactly the old tree or
// exactly the new one, the state chain in state.json must be the expected one, and no service may be left stopped.
// The rollback points get there through a failed probation (Klipper comes back in "error"), so the first process
// dies while rolling back.

import { mkdtemp, readdir, readFile, rm } from "node:fs/promises";
import { existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { CRASH_POINTS, type OtaState } from "../../src/ota/state.js";
import { startFakeMoonraker, type FakeMoonraker } from "../support/fake-moonraker/index.js";
import { QUICK_TIMING } from "../fixtures/engine/rig.js";
import { TestHttpServer } from "./support/http-server.js";
import { buildPackage, layoutIn, layoutListing, md5Of, otaConfig, SERVICES, sha256Of, writeNewTree, writeOldTree, type Layout } from "./support/ota-fixture.js";
import { bundleDriver, runDriver as runDriverFrom } from "./support/run-driver.js";
import type { DriverSpec } from "./support/ota-driver.js";

const D = ["downloading", "downloaded", "verified"];
const DEPLOYED = [...D, "backing_up", "deploying"];
const PROBATION = [...DEPLOYED, "restarting", "probation"];
const ROLLED_BACK = ["rolling_back", "rolled_back"];

interface Case {
  point: (typeof CRASH_POINTS)[number];
  after?: number;
  /** The first process's probation fails (Klipper comes back in error), so it is rolling back when it dies. */
  unhealthy?: boolean;
  tree: "old" | "new";
  state: string;
  chain: string[];
  error?: string;
}

// The package: module config (3 files, service klipper), webcam (2 files, service crowsnest), toolhead (firmware).
const CASES: Case[] = [
  { point: "download-started", tree: "old", state: "verified", chain: ["downloading", ...D] },
  { point: "download-partial", tree: "old", state: "verified", chain: ["downloading", ...D] },
  { point: "downloaded", tree: "old", state: "verified", chain: D },
  { point: "verified", tree: "old", state: "verified", chain: D },
  { point: "staged", tree: "old", state: "verified", chain: D },
  { point: "backing-up", tree: "old", state: "rolled_back", chain: [...D, "backing_up", ...ROLLED_BACK], error: "INTERRUPTED" },
  { point: "backup-file", after: 2, tree: "old", state: "rolled_back", chain: [...D, "backing_up", ...ROLLED_BACK], error: "INTERRUPTED" },
  { point: "backed-up", tree: "old", state: "rolled_back", chain: [...D, "backing_up", ...ROLLED_BACK], error: "INTERRUPTED" },
  { point: "deploying", tree: "old", state: "rolled_back", chain: [...DEPLOYED, ...ROLLED_BACK], error: "INTERRUPTED" },
  { point: "deploying", after: 2, tree: "old", state: "rolled_back", chain: [...DEPLOYED, ...ROLLED_BACK], error: "INTERRUPTED" },
  { point: "service-stopped", tree: "old", state: "rolled_back", chain: [...DEPLOYED, ...ROLLED_BACK], error: "INTERRUPTED" },
  { point: "deploy-temp-written", tree: "old", state: "rolled_back", chain: [...DEPLOYED, ...ROLLED_BACK], error: "INTERRUPTED" },
  { point: "deploy-temp-written", after: 3, tree: "old", state: "rolled_back", chain: [...DEPLOYED, ...ROLLED_BACK], error: "INTERRUPTED" },
  { point: "deploy-renamed", after: 2, tree: "old", state: "rolled_back", chain: [...DEPLOYED, ...ROLLED_BACK], error: "INTERRUPTED" },
  { point: "deploy-renamed", after: 5, tree: "old", state: "rolled_back", chain: [...DEPLOYED, ...ROLLED_BACK], error: "INTERRUPTED" },
  { point: "firmware-flash", tree: "old", state: "rolled_back", chain: [...DEPLOYED, ...ROLLED_BACK], error: "INTERRUPTED" },
  { point: "firmware-flashed", tree: "old", state: "rolled_back", chain: [...DEPLOYED, ...ROLLED_BACK], error: "INTERRUPTED" },
  { point: "restarting", tree: "old", state: "rolled_back", chain: [...DEPLOYED, "restarting", ...ROLLED_BACK], error: "INTERRUPTED" },
  { point: "service-started", tree: "old", state: "rolled_back", chain: [...DEPLOYED, "restarting", ...ROLLED_BACK], error: "INTERRUPTED" },
  { point: "probation", tree: "old", state: "rolled_back", chain: [...PROBATION, ...ROLLED_BACK], error: "INTERRUPTED" },
  { point: "probation-passed", tree: "new", state: "committed", chain: [...PROBATION, "committed"] },
  { point: "committed", tree: "new", state: "committed", chain: [...PROBATION, "committed"] },
  // Killed while rolling back after a failed probation: the second process finishes the rollback.
  { point: "rolling-back", unhealthy: true, tree: "old", state: "rolled_back", chain: [...PROBATION, "rolling_back", ...ROLLED_BACK], error: "HEALTH_CHECK_FAILED" },
  { point: "rollback-file", unhealthy: true, tree: "old", state: "rolled_back", chain: [...PROBATION, "rolling_back", ...ROLLED_BACK], error: "HEALTH_CHECK_FAILED" },
  { point: "rollback-file", after: 4, unhealthy: true, tree: "old", state: "rolled_back", chain: [...PROBATION, "rolling_back", ...ROLLED_BACK], error: "HEALTH_CHECK_FAILED" },
  { point: "rollback-firmware", unhealthy: true, tree: "old", state: "rolled_back", chain: [...PROBATION, "rolling_back", ...ROLLED_BACK], error: "HEALTH_CHECK_FAILED" },
  { point: "rollback-service-started", unhealthy: true, tree: "old", state: "rolled_back", chain: [...PROBATION, "rolling_back", ...ROLLED_BACK], error: "HEALTH_CHECK_FAILED" },
  { point: "rolled-back", unhealthy: true, tree: "old", state: "rolled_back", chain: [...PROBATION, ...ROLLED_BACK], error: "HEALTH_CHECK_FAILED" },
  // Killed inside the durable write of a transition (hits: 1 downloading, 2 downloaded, 3 verified, 4 backing_up,
  // 5 deploying, 6 restarting, 7 probation, 8 committed or rolling_back, 9 rolled_back): before the rename the state
  // before it holds, after it the new one, and the temp file left behind is removed.
  { point: "state-temp-written", after: 2, tree: "old", state: "verified", chain: ["downloading", ...D] },
  { point: "state-temp-written", after: 4, tree: "old", state: "verified", chain: D },
  { point: "state-renamed", after: 4, tree: "old", state: "rolled_back", chain: [...D, "backing_up", ...ROLLED_BACK], error: "INTERRUPTED" },
  { point: "state-temp-written", after: 6, tree: "old", state: "rolled_back", chain: [...DEPLOYED, ...ROLLED_BACK], error: "INTERRUPTED" },
  { point: "state-renamed", after: 7, tree: "old", state: "rolled_back", chain: [...PROBATION, ...ROLLED_BACK], error: "INTERRUPTED" },
  { point: "state-temp-written", after: 8, tree: "new", state: "committed", chain: [...PROBATION, "committed"] },
  { point: "state-renamed", after: 8, tree: "new", state: "committed", chain: [...PROBATION, "committed"] },
  { point: "state-temp-written", after: 8, unhealthy: true, tree: "old", state: "rolled_back", chain: [...PROBATION, ...ROLLED_BACK], error: "INTERRUPTED" },
  { point: "state-temp-written", after: 9, unhealthy: true, tree: "old", state: "rolled_back", chain: [...PROBATION, "rolling_back", ...ROLLED_BACK], error: "HEALTH_CHECK_FAILED" },
];

let base: string;
let server: TestHttpServer;
let pkg: Buffer;
let oldListing: string[];
let newListing: string[];
let bundle: string;

/** The driver from one bundle of its source (see run-driver.ts: ~60 children). */
const runDriver = (spec: DriverSpec, opts: Parameters<typeof runDriverFrom>[1] = {}) => runDriverFrom(spec, { ...opts, bundle });

beforeAll(async () => {
  base = await mkdtemp(join(tmpdir(), "moonflash-ota-crash-"));
  bundle = await bundleDriver(base);
  pkg = await buildPackage(join(base, "pkg.zip"));
  server = await TestHttpServer.start({ body: pkg });
  const oldRef = layoutIn(join(base, "ref-old"));
  const newRef = layoutIn(join(base, "ref-new"));
  await writeOldTree(oldRef);
  await writeNewTree(newRef);
  oldListing = await layoutListing(oldRef);
  newListing = await layoutListing(newRef);
});

afterAll(async () => {
  await server?.close();
  await rm(base, { recursive: true, force: true });
});

interface Printer {
  dir: string;
  layout: Layout;
  fake: FakeMoonraker;
  spec: (actions: DriverSpec["actions"], extra?: Partial<DriverSpec>) => DriverSpec;
}

async function printer(name: string, probationSeconds = 5): Promise<Printer> {
  const dir = join(base, name);
  const layout = layoutIn(join(dir, "install"));
  await writeOldTree(layout);
  const dataDir = join(dir, "data");
  const fake = await startFakeMoonraker({ dataDir, websocket: false, timing: QUICK_TIMING, services: SERVICES });
  return {
    dir,
    layout,
    fake,
    spec: (actions, extra = {}) => ({
      dataDir,
      socketPath: fake.socketPath,
      config: otaConfig(layout, { probation_timeout: probationSeconds }),
      mcuDir: layout.mcu,
      actions,
      download: { url: server.url(), md5: md5Of(pkg), sha256: sha256Of(pkg), size: pkg.length },
      ...extra,
    }),
  };
}

async function stateOf(p: Printer): Promise<OtaState> {
  return JSON.parse(await readFile(join(p.dir, "data", "moonflash", "ota", "state.json"), "utf8")) as OtaState;
}

/** Per service, the last action Moonraker was asked for ("none" when it was never touched). */
const lastActions = (p: Printer) =>
  Object.fromEntries(["klipper", "crowsnest"].map((s) => [s, p.fake.serviceActions.filter((a) => a.service === s).pop()?.action ?? "none"]));

const caseName = (c: Case) => `${c.point}${c.after ? ` (hit ${c.after})` : ""}${c.unhealthy ? " while rolling back a failed probation" : ""}`;

describe("crash matrix: SIGKILL at every crash point, then recover() in a new process", () => {
  it("covers every crash point the engine names (at least 20)", () => {
    const points = new Set(CASES.map((c) => c.point));
    expect(points.size).toBeGreaterThanOrEqual(20);
    expect([...points].sort()).toEqual([...CRASH_POINTS].sort());
  });

  // Two child processes per case; vitest runs up to 5 cases at once (maxConcurrency), which two cores manage.
  it.concurrent.for(CASES.map((c) => [caseName(c), c.state, c.tree, c] as const))(
    "killed at %s: recovery ends %s with the %s tree",
    { timeout: 60_000 },
    async ([, , , c], { expect }) => {
      const p = await printer(`${c.point}-${c.after ?? 1}${c.unhealthy ? "-u" : ""}`, c.unhealthy ? 1 : 5);
      try {
        // Klipper comes back from any restart in "error": probation cannot pass.
        if (c.unhealthy) p.fake.klipper.setState("error", "Config error: the new printer.cfg is broken");
        const first = await runDriver(p.spec(["download", "install"]), { crashAt: c.point, crashAfter: c.after });
        expect(first.signal, `the first process must die at the crash point (${JSON.stringify(first.lines)} ${first.stderr.slice(-400)})`).toBe("SIGKILL");
        const second = await runDriver(p.spec(["recover", "status"]));
        expect(second.exitCode, second.stderr.slice(-400)).toBe(0);
        expect(second.lines.find((l) => l.action === "recover")?.ok).toBe(true);

        const listing = await layoutListing(p.layout);
        const same = (a: string[]) => a.join("\n") === listing.join("\n");
        expect(same(oldListing) ? "old" : same(newListing) ? "new" : "MIXED").toBe(c.tree);
        expect(listing).toEqual(c.tree === "old" ? oldListing : newListing);

        const state = await stateOf(p);
        expect(state.history.map((h) => h.state)).toEqual(c.chain);
        expect(state.state).toBe(c.state);
        expect(state.error?.code ?? null).toBe(c.error ?? null);
        expect(state.stopped).toEqual([]);

        // No service stays stopped: every service the update touched was started last.
        const deployed = c.chain.includes("deploying");
        expect(lastActions(p)).toEqual(deployed ? { klipper: "start", crowsnest: "start" } : { klipper: "none", crowsnest: "none" });
        expect(p.fake.klipper.serviceActive).toBe(true);
        // Nothing is left in the staging directory.
        const staging = join(p.dir, "data", "moonflash", "ota", "staging");
        expect(existsSync(staging) ? await readdir(staging) : []).toEqual([]);
        // Nor a temp file of a state write the kill cut short.
        expect((await readdir(join(p.dir, "data", "moonflash", "ota"))).filter((n) => n.endsWith(".tmp"))).toEqual([]);
      } finally {
        await p.fake.stop();
      }
    },
  );
});

describe("crash loops are bounded (Mender's Break_out_of_spontaneous_reboot_loop)", () => {
  it("gives up a download that kills the process every time after maxStateSaves transitions: failed, DOWNLOAD_FAILED", { timeout: 60_000 }, async () => {
    const p = await printer("loop-download");
    try {
      const spec = p.spec(["download"], { maxStateSaves: 3 });
      expect((await runDriver(spec, { crashAt: "download-partial" })).signal).toBe("SIGKILL");
      const recoveries: Array<string | undefined> = [];
      for (let i = 0; i < 3; i++) {
        const run = await runDriver({ ...spec, actions: ["recover"] }, { crashAt: "download-partial" });
        recoveries.push(run.signal ?? (run.lines[0]?.result as { action?: string } | undefined)?.action);
      }
      // Two more resumptions die the same way; the third recovery sees 3 saves and stops.
      expect(recoveries).toEqual(["SIGKILL", "SIGKILL", "gave-up"]);
      const state = await stateOf(p);
      expect(state.history.map((h) => h.state)).toEqual(["downloading", "downloading", "downloading", "failed"]);
      expect(state.error?.code).toBe("DOWNLOAD_FAILED");
      expect(state.error?.message).toMatch(/interrupted 3 times; moonflash gave up on it\. Start it again with ota\.download/);
      expect(await layoutListing(p.layout)).toEqual(oldListing);
    } finally {
      await p.fake.stop();
    }
  });

  it("stops retrying a rollback that is killed every time, keeps the services stopped, and ota.rollback then restores the old tree", { timeout: 60_000 }, async () => {
    const p = await printer("loop-rollback");
    try {
      const spec = p.spec(["download", "install"], { maxStateSaves: 4 });
      expect((await runDriver(spec, { crashAt: "deploy-renamed", crashAfter: 2 })).signal).toBe("SIGKILL");
      const recoveries: Array<string | undefined> = [];
      for (let i = 0; i < 4; i++) {
        const run = await runDriver({ ...spec, actions: ["recover"] }, { crashAt: "rollback-file", crashAfter: 2 });
        recoveries.push(run.signal ?? (run.lines[0]?.result as { action?: string } | undefined)?.action);
      }
      // 5 saves before the crash; each recovery's rolling_back is one more; at 2 × 4 saves recovery gives up.
      expect(recoveries).toEqual(["SIGKILL", "SIGKILL", "SIGKILL", "gave-up"]);
      let state = await stateOf(p);
      expect(state.history.map((h) => h.state)).toEqual([...DEPLOYED, "rolling_back", "rolling_back", "rolling_back", "failed"]);
      expect(state.error?.message).toMatch(/stopped retrying.*run ota\.rollback/);
      expect(state.stopped.map((u) => u.name).sort()).toEqual(["crowsnest", "klipper"]);
      // A further start does not start services on a half-restored installation.
      const idle = await runDriver({ ...spec, actions: ["recover"] });
      expect(idle.lines[0]?.result).toMatchObject({ action: "none", state: "failed" });
      expect(p.fake.klipper.serviceActive).toBe(false);
      // Nor does a new update start over it: its backup is the only copy of the old files.
      const refused = await runDriver({ ...spec, actions: ["install"] });
      expect(refused.lines[0]).toMatchObject({ action: "install", ok: false, code: "BUSY", message: expect.stringMatching(/run ota\.rollback/) });

      const manual = await runDriver({ ...spec, actions: ["rollback"] });
      expect(manual.lines[0]).toMatchObject({ action: "rollback", ok: true, result: { restored: 3, removed: 2 } });
      state = await stateOf(p);
      expect(state.state).toBe("rolled_back");
      expect(state.stopped).toEqual([]);
      expect(await layoutListing(p.layout)).toEqual(oldListing);
      expect(lastActions(p)).toEqual({ klipper: "start", crowsnest: "start" });
    } finally {
      await p.fake.stop();
    }
  });
});
