// The OTA engine end to end against the fake Moonraker through the real AgentSession, a real JobRunner, a real HTTP
// server on 127.0.0.1 and real files: download → install → probation → commit, the refusals that come before any
// change (printing, another job, no room, no permission), failures after changes began (probation, ENOSPC) that
// roll back to the old tree, ota.rollback after a commit, and recovery from a damaged state file.

import { randomBytes } from "node:crypto";
import { chmod, chown, mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import { spawn } from "node:child_process";
import { once } from "node:events";
import { existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, beforeAll, afterAll, describe, expect, it } from "vitest";
import { isMoonflashError, MoonflashError, type ErrorCode } from "../../src/core/errors.js";
import type { JobEvent } from "../../src/core/events.js";
import { JobRunner } from "../../src/core/jobs.js";
import { validateSection, type Located } from "../../src/core/config-values.js";
import { parseIni } from "../../src/core/ini.js";
import { OTA_DEFAULTS, otaSchema, type OtaConfig } from "../../src/ota/config.js";
import { REAL_IO } from "../../src/ota/deploy.js";
import { packPackage } from "../../src/ota/pack.js";
import { keygen } from "../../src/ota/signing.js";
import { OtaEngine, type FirmwarePort, type OtaEngineOptions } from "../../src/ota/engine.js";
import type { OtaState } from "../../src/ota/state.js";
import { startRig, waitUntil, type PrinterRig } from "../fixtures/engine/rig.js";
import { TestHttpServer } from "./support/http-server.js";
import {
  buildPackage, fileFirmwarePort, layoutIn, layoutListing, md5Of, otaConfig, SERVICES, sha256Of, writeNewTree, writeOldTree, type Layout, type PackageOptions,
} from "./support/ota-fixture.js";
import { runDriver } from "./support/run-driver.js";
import { buildZip } from "./support/zip-builder.js";

let base: string;
let pkg: Buffer;
let server: TestHttpServer;
let oldListing: string[];
let newListing: string[];

beforeAll(async () => {
  base = await mkdtemp(join(tmpdir(), "moonflash-ota-engine-"));
  await chmod(base, 0o755);
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
  await server.close();
  await rm(base, { recursive: true, force: true });
});

interface Setup {
  rig: PrinterRig;
  layout: Layout;
  engine: OtaEngine;
  port: FirmwarePort & { calls: string[] };
  events: JobEvent[];
  otaDir: string;
}

let current: Setup | null = null;
afterEach(async () => {
  await current?.rig.close();
  current = null;
});

let counter = 0;
async function setup(
  opts: { engine?: Partial<OtaEngineOptions>; config?: Partial<OtaConfig>; currentImage?: boolean; probationSeconds?: number } = {},
): Promise<Setup> {
  const rig = await startRig({ services: SERVICES });
  const layout = layoutIn(join(base, `printer-${++counter}`));
  await writeOldTree(layout);
  const port = fileFirmwarePort(layout.mcu, { currentImage: opts.currentImage ?? true });
  const events: JobEvent[] = [];
  rig.runner.on((event) => void events.push(event));
  const engine = new OtaEngine({
    dataDir: rig.dataDir,
    config: otaConfig(layout, { probation_timeout: opts.probationSeconds ?? 5, ...opts.config }),
    printer: rig.session,
    runner: rig.runner,
    logger: rig.logger,
    firmware: port,
    serviceTimeoutMs: 5000,
    pollMs: 20,
    download: { retries: 2, backoffMs: 10, progressIntervalMs: 0 },
    ...opts.engine,
  });
  current = { rig, layout, engine, port, events, otaDir: join(rig.dataDir, "moonflash", "ota") };
  return current;
}

const downloadParams = () => ({ url: server.url(), md5: md5Of(pkg), sha256: sha256Of(pkg), size: pkg.length });
const actions = (s: Setup) => s.rig.fake.serviceActions.map((a) => `${a.action} ${a.service}`);
const stateOf = async (s: Setup) => JSON.parse(await readFile(join(s.otaDir, "state.json"), "utf8")) as OtaState;
const chain = async (s: Setup) => (await stateOf(s)).history.map((h) => h.state);
const logs = (s: Setup) => s.events.filter((e): e is Extract<JobEvent, { type: "log" }> => e.type === "log").map((e) => e.message);
const packageZip = (s: Setup) => join(s.otaDir, "download", "package.zip");

/** Downloads and verifies `body` from a server of its own. */
async function downloadBody(s: Setup, body: Buffer): Promise<void> {
  const own = await TestHttpServer.start({ body });
  try {
    await s.engine.download({ url: own.url(), md5: md5Of(body) });
  } finally {
    await own.close();
  }
}

/** Cancels the engine's OTA job once, on the turn after the job enters `stage`. */
function cancelAtStage(s: Setup, stage: string): void {
  const off = s.rig.runner.on((e) => {
    if (e.type !== "stage" || e.stage !== stage) return;
    off();
    setImmediate(() => s.engine.cancel());
  });
}

async function failure(promise: Promise<unknown>, code: ErrorCode): Promise<MoonflashError> {
  const err = await promise.then(
    () => new Error("expected a failure"),
    (e: unknown) => e,
  );
  if (!isMoonflashError(err)) throw err;
  expect({ code: err.code, message: err.message }).toMatchObject({ code });
  return err;
}

describe("install: the happy path", () => {
  it("downloads from a local server, installs module by module, passes probation and commits; files, modes and backups are right", async () => {
    const s = await setup();
    const flashedWithKlipper: boolean[] = [];
    const statusWhileFlashing: unknown[] = [];
    const flash = s.port.flash.bind(s.port);
    s.port.flash = async (mcu, image, job) => {
      flashedWithKlipper.push(s.rig.fake.klipper.serviceActive);
      statusWhileFlashing.push(s.engine.status());
      return flash(mcu, image, job);
    };

    const summary = await s.engine.download(downloadParams());
    expect(summary).toMatchObject({ name: "acme-printer", version: "2.0.0", size: pkg.length, sha256: sha256Of(pkg), signed: false });
    expect(summary.modules.map((m) => [m.id, m.type, m.files, m.service, m.mcu])).toEqual([
      ["config", "files", 3, "klipper", null],
      ["webcam", "files", 2, "crowsnest", null],
      ["toolhead", "firmware", 0, null, "toolhead"],
    ]);
    expect(s.engine.status()).toMatchObject({ state: "verified", percent: 100, package: { name: "acme-printer", version: "2.0.0" }, lastError: null });

    const outcome = await s.engine.install();
    expect(outcome).toMatchObject({
      name: "acme-printer",
      version: "2.0.0",
      previous: null,
      files: { written: 5, replaced: 3, added: 2 },
      firmware: ["toolhead"],
      services: ["klipper", "crowsnest"],
    });
    expect(await layoutListing(s.layout)).toEqual(newListing);
    expect((await stat(join(s.layout.tools, "bin", "helper.sh"))).mode & 0o777).toBe(0o755);
    expect((await stat(join(s.layout.config, "a.cfg"))).mode & 0o777).toBe(0o644);

    // Services stopped in dependency order, the MCU flashed with Klipper stopped, all started again in order.
    expect(actions(s)).toEqual(["stop klipper", "stop crowsnest", "start klipper", "start crowsnest"]);
    expect(flashedWithKlipper).toEqual([false]);
    expect(statusWhileFlashing).toEqual([
      expect.objectContaining({ state: "deploying", stage: "flash", module: { index: 3, count: 3, id: "toolhead" }, percent: 100, job: expect.objectContaining({ kind: "ota", cancellable: false }) }),
    ]);
    expect(s.port.calls).toEqual([`flash toolhead ${sha256Of(await readFile(join(s.layout.mcu, "toolhead.bin"))).slice(0, 8)}`]);

    expect(await chain(s)).toEqual(["downloading", "downloaded", "verified", "backing_up", "deploying", "restarting", "probation", "committed"]);
    expect(s.engine.status()).toMatchObject({ state: "committed", installed: { name: "acme-printer", version: "2.0.0" }, lastError: null, job: null });

    // The backup keeps what the update replaced, says what did not exist, and is marked committed.
    const backup = outcome.backup;
    const manifest = JSON.parse(await readFile(join(backup, "manifest.json"), "utf8")) as { files: Array<{ dst: string; existed: boolean; backup: string | null; mode: number }>; createdDirs: string[] };
    expect(manifest.files.map((f) => [f.dst, f.existed, f.mode.toString(8)])).toEqual([
      ["config/printer.cfg", true, "644"],
      ["config/a.cfg", true, "600"],
      ["config/macros/new.cfg", false, "0"],
      ["tools/crowsnest.conf", true, "644"],
      ["tools/bin/helper.sh", false, "0"],
    ]);
    expect(manifest.createdDirs).toEqual([join(s.layout.config, "macros"), join(s.layout.tools, "bin")]);
    expect(await readFile(join(backup, manifest.files[1]!.backup!), "utf8")).toBe("[gcode_macro A]\ngcode: G28\n");
    expect(await readFile(join(backup, "firmware", "toolhead.bin"), "utf8")).toMatch(/^OLD-FIRMWARE-/);
    expect(JSON.parse(await readFile(join(backup, "outcome.json"), "utf8"))).toMatchObject({ outcome: "committed" });
    // The staging directory and the downloaded package are gone once committed.
    expect(await readdir(join(s.otaDir, "staging"))).toEqual([]);
    expect(existsSync(join(s.otaDir, "download", "package.zip"))).toBe(false);

    // What a console or UI sees: the stages of both jobs, download progress in bytes, results.
    const stages = s.events.filter((e) => e.type === "stage").map((e) => (e as { stage: string }).stage);
    expect(stages).toEqual([
      "started", "download", "verify",
      "started", "stage", "check", "backup", "deploy", "deploy", "deploy", "flash", "restart", "probation", "commit",
    ]);
    const bytes = s.events.filter((e): e is Extract<JobEvent, { type: "progress" }> => e.type === "progress" && e.phase === "download");
    expect(bytes.at(-1)).toMatchObject({ done: pkg.length, total: pkg.length, unit: "bytes" });
    expect(s.events.filter((e) => e.type === "result").map((e) => (e as { ok: boolean }).ok)).toEqual([true, true]);
    expect(s.rig.runner.history("ota").map((j) => [j.target, j.ok])).toEqual([["acme-printer 2.0.0", true], [`download ${server.url()}`, true]]);
  });
});

describe("install: processes", () => {
  it("stops a module's process (by pidfile) before its files are written: SIGTERM ignored, so SIGKILL, reported in the job log", async () => {
    const s = await setup({ engine: { processStopTimeoutMs: 300 } });
    const child = spawn(process.execPath, ["-e", "process.on('SIGTERM', () => {}); setInterval(() => {}, 1000); console.log('ready')"], { stdio: ["ignore", "pipe", "inherit"] });
    try {
      await new Promise<void>((resolve) => child.stdout!.once("data", () => resolve()));
      const pidfile = join(base, `webcam-${counter}.pid`);
      await writeFile(pidfile, `${child.pid}\n`);
      const body = await buildPackage(join(base, `pkg-process-${counter}.zip`), { process: { pidfile } });
      const own = await TestHttpServer.start({ body });
      try {
        await s.engine.download({ url: own.url(), md5: md5Of(body) });
      } finally {
        await own.close();
      }
      const outcome = await s.engine.install();
      expect(outcome.services).toEqual(["klipper"]);
      expect(child.signalCode ?? (await once(child, "exit"))[1]).toBe("SIGKILL");
      expect(await layoutListing(s.layout)).toEqual(newListing);
      const logs = s.events.filter((e): e is Extract<JobEvent, { type: "log" }> => e.type === "log").map((e) => e.message);
      expect(logs).toContain(`node (pid ${child.pid}) ignored SIGTERM and was killed`);
      expect(logs).toContain(`the process in ${pidfile} is not started by moonflash (the package gives no start command); its supervisor starts it`);
      expect(actions(s)).toEqual(["stop klipper", "start klipper"]);
    } finally {
      child.kill("SIGKILL");
    }
  });
});

describe("install: a process that cannot be stopped", () => {
  it("after an earlier module was deployed: PROCESS_STOP_FAILED, rolled back, and the message does not say nothing was deployed (moonflash runs as uid 65534)", async () => {
    const dir = join(base, `stop-fails-${++counter}`);
    const layout = layoutIn(join(dir, "install"));
    await writeOldTree(layout);
    const dataDir = join(dir, "data");
    await mkdir(dataDir, { recursive: true });
    // A process of root's, which uid 65534 may not signal; the webcam module names it, after the config module.
    const child = spawn(process.execPath, ["-e", "setInterval(() => {}, 1000); console.log('ready')"], { stdio: ["ignore", "pipe", "inherit"] });
    try {
      await new Promise<void>((resolve) => child.stdout!.once("data", () => resolve()));
      const pidfile = join(dir, "webcam.pid");
      await writeFile(pidfile, `${child.pid}\n`);
      const own = async (path: string): Promise<void> => {
        await chown(path, 65534, 65534);
        if ((await stat(path)).isDirectory()) for (const name of await readdir(path)) await own(join(path, name));
      };
      await chmod(dir, 0o755);
      await own(dir);
      const body = await buildPackage(join(base, `pkg-stop-fails-${counter}.zip`), { process: { pidfile } });
      const server = await TestHttpServer.start({ body });
      let run;
      try {
        run = await runDriver(
          { dataDir, socketPath: null, config: otaConfig(layout), mcuDir: layout.mcu, actions: ["download", "install", "status"], download: { url: server.url(), md5: md5Of(body) } },
          { uid: 65534 },
        );
      } finally {
        await server.close();
      }
      expect(run.lines.map((l) => [l.action, l.ok, l.code ?? null])).toEqual([["download", true, null], ["install", false, "PROCESS_STOP_FAILED"], ["status", true, null]]);
      expect(run.lines[1]!.message).toBe(
        `moonflash may not signal node (pid ${child.pid}): EPERM. It runs as another user; stop it by hand or run moonflash as its user, then install the update again. ` +
          "The update was rolled back; the previous version is in place.",
      );
      expect(run.lines[2]!.result).toMatchObject({
        state: "rolled_back",
        history: ["downloading", "downloaded", "verified", "backing_up", "deploying", "rolling_back", "rolled_back"],
      });
      expect(await layoutListing(layout)).toEqual(oldListing);
      expect(child.exitCode).toBeNull();
    } finally {
      child.kill("SIGKILL");
    }
  });
});

describe("install: min_version", () => {
  it("refuses a package whose min_version is above the installed version (compared as numbers) before any change; a first install, an equal version and another package's are allowed", async () => {
    const s = await setup();
    const pkgOf = (opts: PackageOptions) => buildPackage(join(base, `pkg-min-${++counter}.zip`), opts);

    // Nothing installed by moonflash yet: min_version cannot be checked, and a first OTA install goes on.
    await downloadBody(s, await pkgOf({ version: "2.9.0", minVersion: "2.5.0" }));
    await s.engine.install();
    expect(logs(s)).toContain("min_version 2.5.0 not checked: moonflash has installed no acme-printer yet (none is on record)");

    // 2.9.0 is older than 2.10.0 as numbers (as text it would sort after it).
    await downloadBody(s, await pkgOf({ version: "3.0.0", minVersion: "2.10.0" }));
    const actionsBefore = actions(s);
    const err = await failure(s.engine.install(), "VERSION_TOO_OLD");
    expect(err.message).toBe(
      "acme-printer 3.0.0 updates version 2.10.0 or later (its min_version), but 2.9.0 is installed. " +
        "Install the versions in between first, or ask the vendor for a package that updates 2.9.0. Nothing was changed.",
    );
    expect(err.status).toBe(409);
    expect(err.details).toEqual({ name: "acme-printer", version: "3.0.0", minVersion: "2.10.0", installed: "2.9.0" });
    expect(actions(s)).toEqual(actionsBefore);
    expect(await layoutListing(s.layout)).toEqual(newListing);
    expect(await readdir(join(s.otaDir, "staging"))).toEqual([]);
    expect(await chain(s)).toEqual(["downloading", "downloaded", "verified"]);
    expect(s.engine.status()).toMatchObject({ state: "verified", lastError: { code: "VERSION_TOO_OLD" }, installed: { version: "2.9.0" } });
    // Still installable: asked again it is checked again (not NO_PACKAGE).
    await failure(s.engine.install(), "VERSION_TOO_OLD");

    // Once 2.10.0 is installed, the same min_version passes.
    await downloadBody(s, await pkgOf({ version: "2.10.0" }));
    await s.engine.install();
    await downloadBody(s, await pkgOf({ version: "3.0.0", minVersion: "2.10.0" }));
    expect((await s.engine.install()).previous).toMatchObject({ version: "2.10.0" });

    // Another package's version says nothing about this one: nothing of its name on record, so it installs.
    await downloadBody(s, await pkgOf({ name: "acme-addon", version: "1.0.0", minVersion: "9.0" }));
    await s.engine.install();
    expect(logs(s)).toContain("min_version 9.0 not checked: moonflash has installed no acme-addon yet (none is on record)");
    expect(s.engine.status().installed).toMatchObject({ name: "acme-addon", version: "1.0.0" });
  });
});

describe("cancel while the package is checked or extracted", () => {
  it("a cancel in the check keeps the package (downloaded; checked again without a download); one in the extraction changes nothing (verified)", async () => {
    const s = await setup();
    // Large enough that checking and extracting take a while: 3 files of 4 MiB of random data.
    const srcDir = join(base, `big-${++counter}`);
    await mkdir(srcDir);
    const files = new Map<string, string>();
    for (const name of ["a.bin", "b.bin", "c.bin"]) {
      await writeFile(join(srcDir, name), randomBytes(4 * 1024 * 1024));
      files.set(`big/${name}`, join(srcDir, name));
    }
    const out = join(base, `big-${counter}.zip`);
    await packPackage({
      manifest: { name: "acme-big", version: "1.0.0", modules: [{ id: "big", files: [...files.keys()].map((src) => ({ src, dst: `tools/${src}` })) }] },
      files,
      out,
    });
    const body = await readFile(out);
    const own = await TestHttpServer.start({ body });
    try {
      const params = { url: own.url(), md5: md5Of(body) };
      cancelAtStage(s, "verify");
      const err = await failure(s.engine.download(params), "CANCELLED");
      expect(err.message).toBe("The check of the package was cancelled. The downloaded package is kept: ota.install (or ota.download of the same URL) checks it again without downloading it again.");
      expect(s.engine.status()).toMatchObject({ state: "downloaded", lastError: { code: "CANCELLED" } });
      expect(existsSync(packageZip(s))).toBe(true);
      const requests = own.requests.length;
      expect(await s.engine.download(params)).toMatchObject({ name: "acme-big", size: body.length });
      expect(own.requests.length).toBe(requests);

      const installEvents = s.events.length;
      cancelAtStage(s, "stage");
      const cancelled = await failure(s.engine.install(), "CANCELLED");
      expect(cancelled.message).toBe("The update was cancelled before anything was changed; the package stays verified for ota.install.");
      // The extraction stopped: the install never reached its next stage.
      expect(s.events.slice(installEvents).flatMap((e) => (e.type === "stage" ? [e.stage] : []))).toEqual(["started", "stage"]);
      expect(actions(s)).toEqual([]);
      expect(await layoutListing(s.layout)).toEqual(oldListing);
      expect(await readdir(join(s.otaDir, "staging")).catch(() => [])).toEqual([]);
      expect(existsSync(join(s.otaDir, "backup"))).toBe(false);
      expect(s.engine.status()).toMatchObject({ state: "verified", lastError: { code: "CANCELLED" } });

      await s.engine.install();
      expect(sha256Of(await readFile(join(s.layout.tools, "big", "c.bin")))).toBe(sha256Of(await readFile(join(srcDir, "c.bin"))));
    } finally {
      await own.close();
    }
  });
});

describe("download", () => {
  it("shows bytes, percent and speed in status() while downloading; cancel() keeps the part and the next download resumes it", async () => {
    const s = await setup();
    server.plan({ stallAfter: 1000 });
    const first = s.engine.download(downloadParams());
    await waitUntil(() => (s.engine.status().bytes?.done ?? 0) >= 1000, "the first 1000 bytes");
    const status = s.engine.status();
    expect(status).toMatchObject({ state: "downloading", stage: "download", url: server.url(), bytes: { done: 1000, total: pkg.length }, percent: Math.round((1000 / pkg.length) * 1000) / 10 });
    expect(typeof status.speed).toBe("number");
    expect(s.engine.cancel().id).toBe(status.job?.id);
    const err = await failure(first, "CANCELLED");
    expect(err.message).toMatch(/the 1000 bytes received are kept/);
    expect(s.engine.status()).toMatchObject({ state: "failed", lastError: { code: "CANCELLED" } });

    const requests = server.requests.length;
    await s.engine.download(downloadParams());
    expect(server.requests.slice(requests).map((r) => r.range)).toEqual(["bytes=1000-"]);
    // A new download is a new update with its own state chain.
    expect(await chain(s)).toEqual(["downloading", "downloaded", "verified"]);
  });

  it("fails with MD5_MISMATCH and keeps nothing when the server sends another file; install then has NO_PACKAGE", async () => {
    const s = await setup();
    const err = await failure(s.engine.download({ url: server.url(), md5: "0".repeat(32) }), "MD5_MISMATCH");
    expect(err.message).toMatch(/MD5/);
    expect(s.engine.status()).toMatchObject({ state: "failed", lastError: { code: "MD5_MISMATCH" } });
    expect(existsSync(join(s.otaDir, "download", "package.zip"))).toBe(false);
    const noPackage = await failure(s.engine.install(), "NO_PACKAGE");
    expect(noPackage.message).toBe("There is no verified package to install (the last update is failed). Download one first with ota.download.");
  });
});

describe("install: refusals before any change", () => {
  it("refuses with PRINTER_BUSY while printing: nothing stopped, nothing written, the package stays verified", async () => {
    const s = await setup();
    await s.engine.download(downloadParams());
    s.rig.fake.klipper.setPrintState("printing");
    await waitUntil(() => s.rig.session.isPrinting(), "the session to see the print");
    const err = await failure(s.engine.install(), "PRINTER_BUSY");
    expect(err.message).toBe("The printer is printing or paused; moonflash does not install an update now. Try again when the print has finished.");
    expect(actions(s)).toEqual([]);
    expect(await layoutListing(s.layout)).toEqual(oldListing);
    expect(existsSync(join(s.otaDir, "backup"))).toBe(false);
    expect(s.engine.status()).toMatchObject({ state: "verified", lastError: { code: "PRINTER_BUSY" } });
    expect(await chain(s)).toEqual(["downloading", "downloaded", "verified"]);
  });

  it("answers BUSY while a flash job (of another process's runner) holds the job lock, for download and install alike", async () => {
    const s = await setup();
    await s.engine.download(downloadParams());
    const other = new JobRunner({ dataDir: s.rig.dataDir, logger: s.rig.logger });
    let release!: () => void;
    const gate = new Promise<void>((resolve) => (release = resolve));
    let running!: () => void;
    const started = new Promise<void>((resolve) => (running = resolve));
    const flashJob = other.run({ kind: "flash", target: "mcu toolhead" }, async () => {
      running();
      await gate;
    });
    await started;
    const err = await failure(s.engine.install(), "BUSY");
    expect(err.message).toMatch(/^A flash job on mcu toolhead is running \(pid \d+, since .*\); wait for it or cancel it$/);
    await failure(s.engine.download(downloadParams()), "BUSY");
    release();
    await flashJob;
    expect(actions(s)).toEqual([]);
    expect(await layoutListing(s.layout)).toEqual(oldListing);
    expect((await stateOf(s)).state).toBe("verified");
    // Once the flash is done the same package installs.
    await s.engine.install();
    expect(await layoutListing(s.layout)).toEqual(newListing);
  });

  it("refuses with DISK_FULL when statfs reports too little room (an injected statfs: no tmpfs can be mounted here), before any write", async () => {
    const statfsCalls: string[] = [];
    const s = await setup({
      engine: {
        statfs: async (path) => {
          statfsCalls.push(path);
          return { bavail: 100, bsize: 4096 }; // 400 KiB free, less than the 16 MiB margin
        },
      },
    });
    await s.engine.download(downloadParams());
    const err = await failure(s.engine.install(), "DISK_FULL");
    expect(err.message).toMatch(/^Not enough room on the filesystem of .*: the update needs .* MiB for the new files and the backups plus 16\.0 MiB to spare, but 0\.4 MiB are free\. Free some space and install again; nothing was changed\.$/);
    expect(statfsCalls.length).toBeGreaterThan(0);
    expect(actions(s)).toEqual([]);
    expect(await layoutListing(s.layout)).toEqual(oldListing);
    expect(await readdir(join(s.otaDir, "backup"))).toEqual([]);
    expect((await stateOf(s)).state).toBe("verified");
  });

  it("refuses with PERMISSION_DENIED before any write when a root is not writable (moonflash runs as uid 65534 in a child process)", async () => {
    const dir = join(base, "unprivileged");
    const layout = layoutIn(join(dir, "install"));
    await writeOldTree(layout);
    const dataDir = join(dir, "data");
    await mkdir(dataDir, { recursive: true });
    const own = async (path: string): Promise<void> => {
      await chown(path, 65534, 65534);
      const info = await stat(path);
      if (info.isDirectory()) for (const name of await readdir(path)) await own(join(path, name));
    };
    await chmod(dir, 0o755);
    await own(dir);
    // The tools root belongs to root and is 0755: uid 65534 may read it but not write in it.
    await chown(layout.tools, 0, 0);
    await chmod(layout.tools, 0o755);
    const run = await runDriver(
      { dataDir, socketPath: null, config: otaConfig(layout), mcuDir: layout.mcu, actions: ["download", "install", "status"], download: downloadParams() },
      { uid: 65534 },
    );
    expect(run.lines.map((l) => [l.action, l.ok, l.code ?? null])).toEqual([["download", true, null], ["install", false, "PERMISSION_DENIED"], ["status", true, null]]);
    expect(run.lines[1]!.message).toBe(`moonflash (uid 65534) may not write in ${layout.tools}, needed for tools/crowsnest.conf: fix its owner or mode. Nothing was changed.`);
    expect(await layoutListing(layout)).toEqual(oldListing);
    expect(existsSync(join(dataDir, "moonflash", "ota", "backup"))).toBe(false);
    expect(run.lines[2]!.result).toMatchObject({ state: "verified", history: ["downloading", "downloaded", "verified"], lastError: { code: "PERMISSION_DENIED" } });
  });
});

describe("install: failures after changes began roll back to the old tree", () => {
  it("rolls back with HEALTH_CHECK_FAILED when Klipper does not become ready in probation (firmware rolled back through the port)", async () => {
    const s = await setup({ currentImage: false, probationSeconds: 1 });
    const engine = s.engine;
    await engine.download(downloadParams());
    // The new printer.cfg "breaks" Klipper: after the update's stop it comes back in error; after the rollback's
    // stop it comes back ready (the old config is back).
    const watcher = setInterval(() => {
      const stops = s.rig.fake.serviceActions.filter((a) => a.action === "stop" && a.service === "klipper").length;
      if (stops === 1 && s.rig.fake.klipper.state !== "error") s.rig.fake.klipper.setState("error", "Option 'max_velocity' is not valid in section 'printer'");
      if (stops === 2 && s.rig.fake.klipper.state !== "ready") s.rig.fake.klipper.setState("ready");
    }, 2);
    try {
      const err = await failure(engine.install(), "HEALTH_CHECK_FAILED");
      expect(err.message).toBe(
        "The update did not pass probation: within the probation time of 1 s, Klipper is in state 'error' (Option 'max_velocity' is not valid in section 'printer'). " +
          "The update was rolled back; the previous version is in place.",
      );
    } finally {
      clearInterval(watcher);
    }
    expect(await layoutListing(s.layout)).toEqual(oldListing);
    expect(s.port.calls.map((c) => c.split(" ").slice(0, 2).join(" "))).toEqual(["flash toolhead", "rollback toolhead"]);
    expect(actions(s)).toEqual([
      "stop klipper", "stop crowsnest", "start klipper", "start crowsnest",
      "stop crowsnest", "stop klipper", "start klipper", "start crowsnest",
    ]);
    const state = await stateOf(s);
    expect(state.history.map((h) => h.state)).toEqual(["downloading", "downloaded", "verified", "backing_up", "deploying", "restarting", "probation", "rolling_back", "rolled_back"]);
    expect(state).toMatchObject({ state: "rolled_back", error: { code: "HEALTH_CHECK_FAILED" }, stopped: [] });
    expect(JSON.parse(await readFile(join(s.otaDir, "backup", state.updateId, "outcome.json"), "utf8"))).toMatchObject({ outcome: "rolled_back" });
    await waitUntil(() => s.rig.session.state().klippyState === "ready", "Klipper ready on the old config");
    expect(engine.status()).toMatchObject({ state: "rolled_back", installed: null, lastError: { code: "HEALTH_CHECK_FAILED" } });
  });

  it("rolls back with DISK_FULL when the disk fills while the second file is written (an fs shim throws ENOSPC)", async () => {
    let deployCopies = 0;
    const s = await setup({
      engine: {
        io: {
          copyFile: async (src, dest, mode, purpose) => {
            if (purpose === "deploy" && ++deployCopies === 2) {
              await writeFile(dest, "partial"); // what a full disk leaves: a short temp file
              throw Object.assign(new Error("ENOSPC: no space left on device, write"), { code: "ENOSPC" });
            }
            return REAL_IO.copyFile(src, dest, mode, purpose);
          },
        },
      },
    });
    await s.engine.download(downloadParams());
    const err = await failure(s.engine.install(), "DISK_FULL");
    expect(err.message).toBe(`No room on the disk to write a file (${join(s.layout.config, "a.cfg")}); free some space and try again. The update was rolled back; the previous version is in place.`);
    expect(await layoutListing(s.layout)).toEqual(oldListing);
    // The rollback stops every updated service (crowsnest too) and starts them again in dependency order.
    expect(actions(s)).toEqual(["stop klipper", "stop crowsnest", "start klipper", "start crowsnest"]);
    const state = await stateOf(s);
    expect(state.history.map((h) => h.state)).toEqual(["downloading", "downloaded", "verified", "backing_up", "deploying", "rolling_back", "rolled_back"]);
    expect(state.error?.code).toBe("DISK_FULL");
  });
});

describe("hostile packages through ota.download (end to end: real HTTP server, real engine)", () => {
  const body = "[gcode_macro EVIL]\ngcode: M117 evil\n";
  const manifest = (files: Array<{ src: string; dst: string; data: Buffer }>) =>
    JSON.stringify({
      name: "evil",
      version: "1.0.0",
      modules: [{ id: "config", files: files.map((f) => ({ src: f.src, dst: f.dst, sha256: sha256Of(f.data), size: f.data.length })) }],
    });
  const zeros = Buffer.alloc(4 * 1024 * 1024);
  const cases: Array<[string, () => Buffer, RegExp]> = [
    ["a zip-slip entry ../../evil.cfg", () => buildZip([
      { name: "manifest.json", data: manifest([{ src: "a.cfg", dst: "config/a.cfg", data: Buffer.from(body) }]) },
      { name: "a.cfg", data: body },
      { name: "../../evil.cfg", data: body },
    ]), /\.\.\/\.\.\/evil\.cfg/],
    ["a symlink entry to /etc/passwd that the manifest lists", () => buildZip([
      { name: "manifest.json", data: manifest([{ src: "link.cfg", dst: "config/link.cfg", data: Buffer.from("/etc/passwd") }]) },
      { name: "link.cfg", data: "/etc/passwd", unixMode: 0o120777 },
    ]), /symbolic link/],
    ["a zip bomb (4 MiB of zeros in a few KiB)", () => buildZip([
      { name: "manifest.json", data: manifest([{ src: "zeros.bin", dst: "config/zeros.bin", data: zeros }]) },
      { name: "zeros.bin", data: zeros },
    ]), /zip bomb/],
  ];

  it.each(cases)("refuses %s: INVALID_PACKAGE, the package discarded, nothing written, install has NO_PACKAGE", async (_name, make, pattern) => {
    const zip = make();
    const hostile = await TestHttpServer.start({ body: zip });
    try {
      const s = await setup();
      const err = await failure(s.engine.download({ url: hostile.url(), md5: md5Of(zip), size: zip.length }), "INVALID_PACKAGE");
      expect(err.message).toMatch(pattern);
      expect(existsSync(join(s.otaDir, "download", "package.zip"))).toBe(false);
      expect(await layoutListing(s.layout)).toEqual(oldListing);
      expect(existsSync(join(s.layout.config, "..", "..", "evil.cfg"))).toBe(false);
      expect(s.engine.status()).toMatchObject({ state: "failed", lastError: { code: "INVALID_PACKAGE" } });
      await failure(s.engine.install(), "NO_PACKAGE");
      expect(s.rig.fake.serviceActions).toEqual([]);
    } finally {
      await hostile.close();
    }
  });
});

describe("disk full at the other steps of an install (an fs shim throws ENOSPC)", () => {
  const enospc = () => Object.assign(new Error("ENOSPC: no space left on device, write"), { code: "ENOSPC" });

  it("while the old files are backed up: DISK_FULL, nothing deployed, the old tree intact", async () => {
    let backups = 0;
    const s = await setup({
      engine: {
        io: {
          copyFile: async (src, dest, mode, purpose) => {
            if (purpose === "backup" && ++backups === 2) {
              await writeFile(dest, "partial");
              throw enospc();
            }
            return REAL_IO.copyFile(src, dest, mode, purpose);
          },
        },
      },
    });
    await s.engine.download(downloadParams());
    await failure(s.engine.install(), "DISK_FULL");
    expect(await layoutListing(s.layout)).toEqual(oldListing);
    expect(s.port.calls).toEqual([]);
    const state = await stateOf(s);
    expect(state).toMatchObject({ error: { code: "DISK_FULL" }, stopped: [] });
    // Failing before the first file is replaced still rolls back: the services it stopped run again.
    expect(state.history.map((h) => h.state)).toEqual(["downloading", "downloaded", "verified", "backing_up", "rolling_back", "rolled_back"]);
    // Every service the install stopped runs again.
    const last = new Map(s.rig.fake.serviceActions.map((a) => [a.service, a.action]));
    expect([...last.values()].every((a) => a === "start")).toBe(true);
  });

  it("while a rollback restores a file, the disk still full: the rollback fails, and ota.rollback finishes it once there is room", async () => {
    let deploys = 0;
    let diskFull = true;
    const s = await setup({
      engine: {
        io: {
          copyFile: async (src, dest, mode, purpose) => {
            if (diskFull && ((purpose === "deploy" && ++deploys === 2) || purpose === "restore")) {
              await writeFile(dest, "partial");
              throw enospc();
            }
            return REAL_IO.copyFile(src, dest, mode, purpose);
          },
        },
      },
    });
    await s.engine.download(downloadParams());
    const err = await s.engine.install().then(
      () => null,
      (e: unknown) => e as MoonflashError,
    );
    expect(err?.code).toBe("DISK_FULL");
    expect(await layoutListing(s.layout)).not.toEqual(oldListing);
    const interrupted = await stateOf(s);
    expect(interrupted.history.map((h) => h.state)).toEqual(["downloading", "downloaded", "verified", "backing_up", "deploying", "rolling_back"]);
    expect(interrupted.error).toMatchObject({ code: "DISK_FULL", message: expect.stringContaining("The rollback failed as well") });
    expect(s.engine.status()).toMatchObject({ state: "rolling_back", lastError: { code: "DISK_FULL" } });
    // No new update while the old one is half rolled back.
    await failure(s.engine.download(downloadParams()), "BUSY");

    diskFull = false;
    await s.engine.rollback();
    expect(await layoutListing(s.layout)).toEqual(oldListing);
    expect(await stateOf(s)).toMatchObject({ state: "rolled_back", stopped: [] });
    expect(s.engine.status().lastError).toBeNull();
  });
});

describe("ota.rollback", () => {
  it("restores the previous version from the kept backup after a commit, then has nothing left to roll back", async () => {
    const s = await setup();
    await s.engine.download(downloadParams());
    await s.engine.install();
    expect(await layoutListing(s.layout)).toEqual(newListing);
    const before = s.rig.fake.serviceActions.length;

    const outcome = await s.engine.rollback();
    expect(outcome).toMatchObject({ name: "acme-printer", version: "2.0.0", restored: 3, removed: 2, firmware: ["toolhead"], services: ["klipper", "crowsnest"], reason: null });
    expect(await layoutListing(s.layout)).toEqual(oldListing);
    expect(actions(s).slice(before)).toEqual(["stop crowsnest", "stop klipper", "start klipper", "start crowsnest"]);
    expect(await chain(s)).toEqual(["downloading", "downloaded", "verified", "backing_up", "deploying", "restarting", "probation", "committed", "rolling_back", "rolled_back"]);
    expect(s.engine.status()).toMatchObject({ state: "rolled_back", installed: null, lastError: null });

    const err = await failure(s.engine.rollback(), "NO_PACKAGE");
    expect(err.message).toMatch(/^There is no installed update to roll back/);
    expect(await layoutListing(s.layout)).toEqual(oldListing);
  });

  it("keeps the backups of the last keep_backups commits and walks back through them", async () => {
    const s = await setup();
    const versions = ["2.0.0", "3.0.0", "4.0.0"];
    const packages = await Promise.all(versions.map((v) => buildPackage(join(base, `pkg-${v}-${counter}.zip`), { version: v })));
    const own = await TestHttpServer.start({ body: packages[0]! });
    try {
      for (const body of packages) {
        own.setFile({ body });
        await s.engine.download({ url: own.url(), md5: md5Of(body) });
        await s.engine.install();
      }
    } finally {
      await own.close();
    }
    const kept = async () => (await readdir(join(s.otaDir, "backup"))).length;
    expect(await kept()).toBe(2); // keep_backups: 2, the backup of 2.0.0 is gone
    expect(s.engine.status().installed?.version).toBe("4.0.0");
    expect((await s.engine.rollback()).version).toBe("4.0.0");
    expect(s.engine.status().installed?.version).toBe("3.0.0");
    expect((await s.engine.rollback()).version).toBe("3.0.0");
    // 3.0.0 replaced what 2.0.0 installed: that is what is back.
    expect(await layoutListing(s.layout)).toEqual(newListing);
    expect(s.engine.status().installed).toBeNull();
    await failure(s.engine.rollback(), "NO_PACKAGE");
  });

  it("refuses with PRINTER_BUSY while printing", async () => {
    const s = await setup();
    await s.engine.download(downloadParams());
    await s.engine.install();
    s.rig.fake.klipper.setPrintState("paused");
    await waitUntil(() => s.rig.session.isPrinting(), "the session to see the paused print");
    await failure(s.engine.rollback(), "PRINTER_BUSY");
    expect(await layoutListing(s.layout)).toEqual(newListing);
  });
});

describe("recover() with a damaged state file", () => {
  it.each([
    ["empty", ""],
    ["truncated JSON", '{"format": 1, "updateId": "ota-x", "sta'],
    ["a state the schema does not know", JSON.stringify({ format: 1, updateId: "ota-x", state: "exploding" })],
  ])("moves it aside (%s) and, with no update in flight, restores nothing", async (_what, content) => {
    const s = await setup();
    await mkdir(s.otaDir, { recursive: true });
    await writeFile(join(s.otaDir, "state.json"), content);
    const outcome = await s.engine.recover();
    expect(outcome).toMatchObject({ action: "cleaned", state: "failed", corrupt: expect.stringMatching(/state\.json\.corrupt-\d{8}T\d{6}Z$/) as unknown as string });
    expect(await readFile(outcome.corrupt!, "utf8")).toBe(content);
    expect(outcome.error?.message).toMatch(/^The OTA state file was damaged \(it .*\) and was moved to .*\. No update was being installed; nothing had to be restored\.$/);
    expect(await layoutListing(s.layout)).toEqual(oldListing);
    expect(actions(s)).toEqual([]);
  });

  it("restores the old tree from the backup manifest when the state file of a half-done deploy is damaged", async () => {
    const s = await setup();
    const spec = {
      dataDir: s.rig.dataDir, socketPath: s.rig.fake.socketPath, clientName: "moonflash-child", config: otaConfig(s.layout),
      mcuDir: s.layout.mcu, actions: ["download" as const, "install" as const], download: downloadParams(),
    };
    const killed = await runDriver(spec, { crashAt: "deploy-renamed", crashAfter: 4 });
    expect(killed.signal).toBe("SIGKILL");
    const mixed = await layoutListing(s.layout);
    expect(mixed).not.toEqual(oldListing);
    expect(mixed).not.toEqual(newListing);
    await writeFile(join(s.otaDir, "state.json"), "{\"format\": 1, \"upd");

    const outcome = await s.engine.recover();
    expect(outcome).toMatchObject({ action: "rolled-back", state: "rolled_back", error: { code: "INTERRUPTED" } });
    expect(outcome.corrupt).toMatch(/state\.json\.corrupt-/);
    expect(await layoutListing(s.layout)).toEqual(oldListing);
    expect(s.rig.fake.klipper.serviceActive).toBe(true);
    expect(actions(s).slice(-2)).toEqual(["start klipper", "start crowsnest"]);
    expect((await stateOf(s)).history.map((h) => h.state)).toEqual(["rolling_back", "rolled_back"]);
  });

  it("records the job a killed process was running as INTERRUPTED when it recovers an interrupted deploy", async () => {
    const s = await setup();
    const spec = {
      dataDir: s.rig.dataDir, socketPath: s.rig.fake.socketPath, clientName: "moonflash-child", config: otaConfig(s.layout),
      mcuDir: s.layout.mcu, actions: ["download" as const, "install" as const], download: downloadParams(),
    };
    expect((await runDriver(spec, { crashAt: "service-stopped" })).signal).toBe("SIGKILL");
    const outcome = await s.engine.recover();
    expect(outcome).toMatchObject({ action: "rolled-back", state: "rolled_back", error: { code: "INTERRUPTED" } });
    expect(await layoutListing(s.layout)).toEqual(oldListing);
    const jobs = s.rig.runner.history("ota").map((j) => [j.target, j.ok, j.code ?? null]);
    expect(jobs).toEqual([
      [expect.stringMatching(/^recovery ota-/), true, null],
      ["acme-printer 2.0.0", false, "INTERRUPTED"],
      [`download ${server.url()}`, true, null],
    ]);
    // A second start finds nothing to do.
    expect(await s.engine.recover()).toMatchObject({ action: "none", state: "rolled_back" });
  });
});

function parseOta(text: string) {
  const errors: Located[] = [];
  const section = parseIni(`[ota]\n${text}`, "/tmp/moonflash.conf").sections.get("ota")!;
  const parsed = validateSection("/tmp/moonflash.conf", section, otaSchema, Object.keys(otaSchema.shape), errors);
  return { parsed, errors: errors.map((e) => e.error.message) };
}

describe("[ota] configuration", () => {
  const parse = parseOta;

  it("has safe defaults: no roots, no key, no HTTP port, 120 s probation, 2 backups", () => {
    expect(OTA_DEFAULTS).toEqual({
      roots: {}, public_key: null, http_port: null, http_bind: "127.0.0.1", callback_url: null, probation_timeout: 120, keep_backups: 2, limits: {},
    });
  });

  it("reads roots as alias=dir lines (~ expanded), a key path or base64 key, and limits", () => {
    const { publicKeyBase64 } = keygen();
    const { parsed, errors } = parse(
      ["roots:", "  config=/home/pi/printer_data/config/", "  klipper = /home/pi/klipper", `public_key: ${publicKeyBase64}`, "http_port: 7130",
        "probation_timeout: 300", "keep_backups: 3", "limits:", "  file_size=64M", "  download_size=1G", "  entries=500"].join("\n"),
    );
    expect(errors).toEqual([]);
    expect(parsed).toMatchObject({
      roots: { config: "/home/pi/printer_data/config", klipper: "/home/pi/klipper" },
      public_key: publicKeyBase64,
      http_port: 7130,
      probation_timeout: 300,
      keep_backups: 3,
      limits: { maxFileBytes: 64 * 1024 ** 2, maxDownloadBytes: 1024 ** 3, maxEntries: 500 },
    });
    expect(parse("public_key: ~/keys/ota.pem").parsed?.public_key).toMatch(/^\/.*\/keys\/ota\.pem$/);
  });

  it.each([
    ["roots:\n  config=relative/dir", "roots: expected an absolute directory (or one starting with ~/) for root 'config', got 'relative/dir'"],
    ["roots:\n  ../x=/tmp", "roots: root alias '../x' must be letters, digits, '_' or '-' (at most 64)"],
    ["roots:\n  a=/x\n  a=/y", "roots: 'a' is given twice"],
    ["public_key: not-a-key", "public_key: expected the path of a PEM public key, or the raw 32-byte Ed25519 key in base64 (44 characters), got 'not-a-key'"],
    ["probation_timeout: 1", "probation_timeout: expected an integer from 5 to 3600, got '1'"],
    ["limits:\n  file_sise=1M", "limits: unknown limit 'file_sise'; limits are file_size, total_size, manifest_size, entries, compression_ratio, download_size"],
    ["channel: beta", "channel: unknown option; [ota] accepts roots, public_key, http_port, http_bind, callback_url, probation_timeout, keep_backups, limits"],
  ])("refuses %j", (text, message) => {
    expect(parse(text).errors).toEqual([expect.stringContaining(`[ota] ${message}`)]);
  });
});

describe("signed packages", () => {
  it("refuses a package that is not signed with [ota] public_key (a PEM file): SIGNATURE_INVALID, package discarded", async () => {
    const keyFile = join(base, "ota-key.pem");
    await writeFile(keyFile, keygen().publicKey);
    const s = await setup();
    const engine = new OtaEngine({
      dataDir: s.rig.dataDir, config: otaConfig(s.layout, { public_key: keyFile }), printer: s.rig.session, runner: s.rig.runner, logger: s.rig.logger,
    });
    const err = await failure(engine.download(downloadParams()), "SIGNATURE_INVALID");
    expect(err.message).toMatch(/has no manifest\.sig, and \[ota\] public_key requires signed packages/);
    expect(engine.status()).toMatchObject({ state: "failed", lastError: { code: "SIGNATURE_INVALID" } });
    expect(existsSync(join(s.otaDir, "download", "package.zip"))).toBe(false);
    await failure(engine.install(), "NO_PACKAGE");
  });

  it("keeps the downloaded package when the [ota] public_key file cannot be read (CONFIG_INVALID, state downloaded); once it can, install checks it again and installs without a new download", async () => {
    const pair = keygen();
    const keyFile = join(base, `later-key-${++counter}.pem`);
    const body = await buildPackage(join(base, `signed-later-${counter}.zip`), { privateKey: pair.privateKey });
    const own = await TestHttpServer.start({ body });
    try {
      const s = await setup({ config: { public_key: keyFile } });
      const params = { url: own.url(), md5: md5Of(body) };
      const err = await failure(s.engine.download(params), "CONFIG_INVALID");
      expect(err.message).toBe(
        `[ota] public_key: cannot read ${keyFile} (ENOENT); give a readable PEM file or the key in base64. ` +
          "The downloaded package is kept: ota.install (or ota.download of the same URL) checks it again without downloading it again.",
      );
      expect(s.engine.status()).toMatchObject({ state: "downloaded", lastError: { code: "CONFIG_INVALID" } });
      expect(existsSync(packageZip(s))).toBe(true);
      const requests = own.requests.length;
      // Still unreadable: ota.download of the same URL and ota.install check again, and keep it again.
      await failure(s.engine.download(params), "CONFIG_INVALID");
      await failure(s.engine.install(), "CONFIG_INVALID");
      expect(existsSync(packageZip(s))).toBe(true);
      expect(actions(s)).toEqual([]);

      await writeFile(keyFile, pair.publicKey);
      const outcome = await s.engine.install();
      expect(outcome).toMatchObject({ name: "acme-printer", version: "2.0.0" });
      expect(own.requests.length).toBe(requests);
      expect(await layoutListing(s.layout)).toEqual(newListing);
      const stages = s.events.filter((e) => e.type === "stage" && e.jobId === s.rig.runner.history("ota", 1)[0]!.id).map((e) => (e as { stage: string }).stage);
      expect(stages.slice(0, 3)).toEqual(["started", "verify", "stage"]);
    } finally {
      await own.close();
    }
  });

  it("checks the signature again when it installs a package left downloaded: with another key configured by then, SIGNATURE_INVALID and nothing changed", async () => {
    const keyFile = join(base, `other-key-${++counter}.pem`);
    const body = await buildPackage(join(base, `signed-other-${counter}.zip`), { privateKey: keygen().privateKey });
    const own = await TestHttpServer.start({ body });
    try {
      const s = await setup({ config: { public_key: keyFile } });
      await failure(s.engine.download({ url: own.url(), md5: md5Of(body) }), "CONFIG_INVALID");
      await writeFile(keyFile, keygen().publicKey);
      const err = await failure(s.engine.install(), "SIGNATURE_INVALID");
      expect(err.message).toMatch(/does not verify against \[ota\] public_key/);
      expect(actions(s)).toEqual([]);
      expect(await layoutListing(s.layout)).toEqual(oldListing);
      expect(s.engine.status()).toMatchObject({ state: "failed", lastError: { code: "SIGNATURE_INVALID" } });
      expect(existsSync(packageZip(s))).toBe(false);
    } finally {
      await own.close();
    }
  });

  // One raw key in 64 starts with "/": it was once read as the path of a PEM file (CONFIG_INVALID, exit 2 in the CLI).
  it("takes a base64 public_key that starts with '/' as the key, not as a path, in the config and in the engine", async () => {
    let pair = keygen();
    while (!pair.publicKeyBase64.startsWith("/")) pair = keygen();
    expect(parseOta(`public_key: ${pair.publicKeyBase64}`)).toEqual({ parsed: expect.objectContaining({ public_key: pair.publicKeyBase64 }), errors: [] });
    const signedPkg = await buildPackage(join(base, "signed-slash.zip"), { privateKey: pair.privateKey, firmware: false });
    const signedServer = await TestHttpServer.start({ body: signedPkg });
    try {
      const s = await setup();
      const engine = new OtaEngine({
        dataDir: s.rig.dataDir, config: otaConfig(s.layout, { public_key: pair.publicKeyBase64 }), printer: s.rig.session, runner: s.rig.runner, logger: s.rig.logger,
      });
      const summary = await engine.download({ url: signedServer.url(), md5: md5Of(signedPkg), size: signedPkg.length });
      expect(summary).toMatchObject({ name: "acme-printer", signed: true });
    } finally {
      await signedServer.close();
    }
  });
});
