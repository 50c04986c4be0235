// OTA wired end to end: the real agent (createAgent) over the fake Moonraker's unix socket, a package made with
// packPackage served by a real HTTP server on 127.0.0.1, real files in temp dirs and a virtual Katapult board. A
// client calls ota.* through server.extensions.request; the files module and the firmware module are installed
// (the board flashed while Klipper is stopped, its device remembered from Klipper's config), watched through
// ota.status, the console and agent events, and rolled back; refusals and bad packages answer with their codes.

import { afterEach, describe, expect, it } from "vitest";
import { randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { createServer, type AddressInfo } from "node:net";
import type { ErrorCode } from "../../src/core/errors.js";
import type { InstallOutcome, PackageSummary, RollbackOutcome } from "../../src/ota/engine.js";
import { OtaStateStore, makeUpdateId, newState } from "../../src/ota/state.js";
import { FirmwareStore } from "../../src/flash/firmware-store.js";
import type { OtaStatusResult } from "../../src/agent/methods.js";
import { RpcCallError } from "../support/fake-moonraker/index.js";
import { TestHttpServer } from "../ota/support/http-server.js";
import { NEW_FILES, OLD_FILES, md5Of, sha256Of, startOtaPrinter, type OtaPrinter } from "./support/ota-printer.js";

let printer: OtaPrinter | null = null;
const extra: Array<() => Promise<unknown>> = [];

afterEach(async () => {
  while (extra.length) await extra.pop()!();
  await printer?.close();
  printer = null;
});

async function setUp(opts: { extraConf?: string } = {}): Promise<OtaPrinter> {
  printer = await startOtaPrinter(opts);
  return printer;
}

/** The error an agent call failed with: Moonraker's 424 around our JSON-RPC error. */
async function agentError(promise: Promise<unknown>, code: ErrorCode): Promise<{ message: string; details: Record<string, unknown> }> {
  const err = await promise.then(
    () => null,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(RpcCallError);
  const data = (err as RpcCallError).data as { message: string; data: { code: string; details: Record<string, unknown> } };
  expect({ code: data.data.code, message: data.message }).toMatchObject({ code });
  return { message: data.message, details: data.data.details };
}

const status = (p: OtaPrinter) => p.call("ota.status") as Promise<OtaStatusResult>;
const boardHolds = (p: OtaPrinter, image: Buffer) => p.board.model.flash.subarray(0, image.length).equals(image);
const actions = (p: OtaPrinter) => p.moonraker.serviceActions.map((a) => `${a.action} ${a.service}`);
const events = (p: OtaPrinter) =>
  p.web!.notifications.filter((n) => n.method === "notify_agent_event").map((n) => (n.params as Array<{ event: string; data: Record<string, unknown> }>)[0]!);

describe("ota.* through server.extensions.request", () => {
  it("downloads, installs files and firmware with status and console lines, and rolls back", { timeout: 30_000 }, async () => {
    const p = await setUp();
    await p.startAgent();
    expect(await status(p)).toMatchObject({ state: "idle", job: null, installed: null, last: [] });

    const summary = (await p.call("ota.download", p.download)) as PackageSummary;
    expect(summary).toMatchObject({ name: "acme-printer", version: "2.0.0", size: p.pkg.length, sha256: sha256Of(p.pkg), signed: false });
    expect(summary.modules.map((m) => [m.id, m.type, m.mcu])).toEqual([["config", "files", null], ["webcam", "files", null], ["toolhead", "firmware", "toolhead"]]);
    const verified = await status(p);
    expect(verified).toMatchObject({ state: "verified", job: null, percent: 100, url: p.download.url, package: { name: "acme-printer", version: "2.0.0", size: p.pkg.length } });
    expect(verified.last.map((j) => [j.target, j.ok])).toEqual([[`download ${p.download.url}`, true]]);
    expect(actions(p)).toEqual([]);

    // The install, watched through ota.status while it runs.
    const seen: OtaStatusResult[] = [];
    let done = false;
    const install = (p.call("ota.install") as Promise<InstallOutcome>).finally(() => (done = true));
    while (!done) {
      seen.push(await status(p));
      await new Promise((r) => setTimeout(r, 40));
    }
    const outcome = await install;
    expect(outcome).toMatchObject({
      name: "acme-printer",
      version: "2.0.0",
      previous: null,
      files: { written: 3, replaced: 2, added: 1 },
      firmware: ["toolhead"],
      services: ["klipper", "crowsnest"],
    });
    const running = seen.filter((s) => s.job !== null);
    expect(running.length).toBeGreaterThan(0);
    for (const s of running) expect(s.job).toMatchObject({ kind: "ota", target: "acme-printer 2.0.0" });
    expect(new Set(running.map((s) => s.state))).toContain("deploying");
    expect(running.some((s) => s.module !== null && s.module.count === 3)).toBe(true);

    // Files and firmware are the new ones; Klipper stopped once (before the files Klipper reads and the flash) and
    // started once; the toolhead was found on the device Klipper's config gave while Klipper still ran.
    expect(await p.read("config/printer.cfg")).toBe(NEW_FILES["cfg/printer.cfg"]);
    expect(await p.read("config/macros/ota.cfg")).toBe(NEW_FILES["cfg/macros/ota.cfg"]);
    expect(await p.read("tools/crowsnest.conf")).toBe(NEW_FILES["webcam/crowsnest.conf"]);
    expect(boardHolds(p, p.newImage)).toBe(true);
    expect(actions(p).filter((a) => a.endsWith("klipper"))).toEqual(["stop klipper", "start klipper"]);
    expect(actions(p)).toEqual(["stop klipper", "stop crowsnest", "start klipper", "start crowsnest"]);
    expect(JSON.parse(await readFile(join(p.dir, "moonflash", "ota", "mcu-devices.json"), "utf8"))).toMatchObject({
      "mcu toolhead": { serial: p.board.path, baud: 250000, mcuType: "stm32f103xe" },
    });
    const store = new FirmwareStore(join(p.dir, "moonflash", "firmware"));
    expect((await store.list("mcu toolhead")).map((e) => [e.sha256, e.source])).toEqual([[sha256Of(p.newImage), "ota"], [sha256Of(p.oldImage), expect.any(String)]]);
    expect(await status(p)).toMatchObject({ state: "committed", job: null, installed: { name: "acme-printer", version: "2.0.0" }, percent: 100 });

    // The console: a line per stage while Klipper was up, the note before anything stops, the result once it is back.
    const lines = p.moonraker.consoleLines;
    const who = "// moonflash: OTA acme-printer 2.0.0";
    await p.moonraker.waitFor(() => lines.some((l) => l.startsWith(`${who}: installed`)), 5000);
    expect(lines).toContain(`// moonflash: OTA download ${p.download.url}: acme-printer 2.0.0 downloaded and verified (${p.pkg.length} bytes, 3 modules, not signed). Install it with OTA_INSTALL.`);
    expect(lines).toContain(`${who}: extracting the package`);
    expect(lines).toContain(`${who}: checking targets, permissions and free space`);
    expect(lines).toContainEqual(
      expect.stringMatching(/^\/\/ moonflash: OTA acme-printer 2\.0\.0: backing up the files it replaces\. Then the services the update names stop while the new files go in, and the result appears here when Klipper is back\.( Watch it live at http:\S+ \(also on the Webcam page as 'moonflash'\)\.)?$/),
    );
    expect(lines).toContain(
      `${who}: installed: 3 files (2 replaced, 1 new), firmware of toolhead flashed. Probation passed (Klipper ready, klipper, crowsnest running). OTA_ROLLBACK restores the previous version.`,
    );
    const ours = lines.filter((l) => l.includes("moonflash"));
    expect(ours.every((l) => /^(\/\/|!!) moonflash: /.test(l))).toBe(true);
    expect(ours.filter((l) => l.startsWith("!!"))).toEqual([]);

    // Agent events: every stage, throttled progress and the result, for custom UIs.
    await p.web!.waitForNotification("notify_agent_event", (params) => (params as Array<{ event: string; data: { target: string } }>)[0]?.event === "ota.result" && (params as Array<{ data: { target: string } }>)[0]!.data.target === "acme-printer 2.0.0", 5000);
    const ev = events(p).filter((e) => e.data.target === "acme-printer 2.0.0");
    const stages = ev.filter((e) => e.event === "ota.stage").map((e) => e.data.stage);
    expect(stages).toEqual(expect.arrayContaining(["stage", "check", "backup", "deploy", "flash", "katapult", "restart", "probation", "commit"]));
    expect(ev.filter((e) => e.event === "ota.progress").map((e) => e.data.phase)).toEqual(expect.arrayContaining(["deploy", "write", "verify"]));
    expect(ev.filter((e) => e.event === "ota.result")).toEqual([expect.objectContaining({ data: expect.objectContaining({ ok: true, kind: "ota" }) })]);

    // ota.rollback: the old files, and the image the board ran before, flashed again.
    p.moonraker.serviceActions.length = 0;
    const rollback = (await p.call("ota.rollback")) as RollbackOutcome;
    expect(rollback).toMatchObject({ name: "acme-printer", version: "2.0.0", restored: 2, removed: 1, firmware: ["toolhead"], reason: null });
    for (const [path, content] of Object.entries(OLD_FILES)) expect(await p.read(path)).toBe(content);
    expect(existsSync(join(p.config, "macros", "ota.cfg"))).toBe(false);
    expect(boardHolds(p, p.oldImage)).toBe(true);
    expect((await store.list("mcu toolhead"))[0]).toMatchObject({ sha256: sha256Of(p.oldImage), source: "rollback" });
    expect(actions(p).filter((a) => a.endsWith("klipper"))).toEqual(["stop klipper", "start klipper"]);
    expect(await status(p)).toMatchObject({ state: "rolled_back", installed: null, lastError: null });
    await p.moonraker.waitFor(() => lines.some((l) => l.startsWith("// moonflash: OTA rollback:")), 5000);
    expect(lines).toContain("// moonflash: OTA rollback: acme-printer 2.0.0 rolled back: 2 files restored, 1 removed, firmware of toolhead restored. The previous version is in place.");
    expect((await status(p)).last.map((j) => [j.target, j.ok])).toEqual([
      ["rollback", true],
      ["acme-printer 2.0.0", true],
      [`download ${p.download.url}`, true],
    ]);
  });

  it("refuses with PRINTER_BUSY while printing and BUSY while a flash job runs; changes nothing", { timeout: 30_000 }, async () => {
    const p = await setUp();
    const agent = await p.startAgent();
    await p.call("ota.download", p.download);

    p.moonraker.klipper.setPrintState("printing");
    await p.moonraker.waitFor(() => agent.session.isPrinting(), 5000);
    const busy = await agentError(p.call("ota.install"), "PRINTER_BUSY");
    expect(busy.message).toMatch(/printing or paused/);
    await agentError(p.call("ota.rollback"), "PRINTER_BUSY");
    p.moonraker.klipper.setPrintState("standby");
    await p.moonraker.waitFor(() => !agent.session.isPrinting(), 5000);

    // A flash job of this agent holds the one job slot (and the job lock).
    let release!: () => void;
    let started!: () => void;
    const working = new Promise<void>((r) => (started = r));
    const flashJob = agent.runner.run({ kind: "flash", target: "mcu toolhead" }, () => {
      started();
      return new Promise<void>((r) => (release = r));
    });
    extra.push(async () => {
      release?.();
      await flashJob.catch(() => undefined);
    });
    await working;
    const other = await agentError(p.call("ota.install"), "BUSY");
    expect(other.message).toMatch(/^A flash job on mcu toolhead is running \(pid \d+, since /);
    await agentError(p.call("ota.download", p.download), "BUSY");
    expect(await status(p)).toMatchObject({ state: "verified", job: null, other: { kind: "flash", target: "mcu toolhead" } });
    release();
    await flashJob;

    expect(actions(p)).toEqual([]);
    for (const [path, content] of Object.entries(OLD_FILES)) expect(await p.read(path)).toBe(content);
    expect(boardHolds(p, p.newImage)).toBe(false);
    // The install can go ahead now; the refusals left the package in place.
    expect(await status(p)).toMatchObject({ state: "verified", other: null });
  });

  it("a bad package answers with its code and is discarded; a wrong MD5 with MD5_MISMATCH", { timeout: 30_000 }, async () => {
    const p = await setUp();
    await p.startAgent();
    const junk = randomBytes(3000);
    const bad = await TestHttpServer.start({ body: junk });
    extra.push(() => bad.close());

    const invalid = await agentError(p.call("ota.download", { url: bad.url("/junk.zip"), md5: md5Of(junk) }), "INVALID_PACKAGE");
    expect(invalid.message).toMatch(/zip/i);
    expect(await status(p)).toMatchObject({ state: "failed", lastError: { code: "INVALID_PACKAGE" } });
    expect(existsSync(join(p.dir, "moonflash", "ota", "download", "package.zip"))).toBe(false);
    await agentError(p.call("ota.install"), "NO_PACKAGE");

    await agentError(p.call("ota.download", { ...p.download, md5: md5Of(junk) }), "MD5_MISMATCH");
    expect(await status(p)).toMatchObject({ state: "failed", lastError: { code: "MD5_MISMATCH" } });

    // Bad params never start a job; each names the field.
    const params = await agentError(p.call("ota.download", { url: "ftp://example.com/p.zip", md5: "xyz", size: -1 }), "INVALID_PARAMS");
    expect(params.message).toBe(
      "ota.download: url: expected the package's http:// or https:// URL; md5: expected 32 hex digits (the package's MD5); size: expected the package's size in bytes, a whole number",
    );
    expect((await agentError(p.call("ota.download", {}), "INVALID_PARAMS")).message).toMatch(/^ota\.download: url: required: the package's http:\/\/ or https:\/\/ URL; md5: /);

    const last = (await status(p)).last;
    expect(last.map((j) => j.code)).toEqual(["MD5_MISMATCH", "INVALID_PACKAGE"]);
    const console = p.moonraker.consoleLines;
    await p.moonraker.waitFor(() => console.some((l) => l.includes("[MD5_MISMATCH]")), 5000);
    expect(console).toContain(`!! moonflash: OTA download ${bad.url("/junk.zip")} failed [INVALID_PACKAGE] ${invalid.message}`);
    expect(actions(p)).toEqual([]);
  });

  it("the same download asked again joins it (and resumes a dropped connection); another URL meanwhile gets BUSY", { timeout: 30_000 }, async () => {
    const p = await setUp();
    await p.startAgent();
    // The first request is cut halfway, the second answered 503 (Retry-After 1): the download waits a second, then
    // resumes with a Range request. Meanwhile the same download is asked again, and another URL.
    const half = Math.floor(p.pkg.length / 2);
    p.server.plan({ cutAfter: half }, { status: 503, headers: { "Retry-After": "1" } });
    const first = p.call("ota.download", p.download) as Promise<PackageSummary>;
    await p.moonraker.waitFor(() => p.server.requests.length >= 2 && p.server.requests[1]!.status === 503, 5000);
    const during = await status(p);
    expect(during).toMatchObject({ state: "downloading", stage: "download", url: p.download.url, job: { kind: "ota", target: `download ${p.download.url}` } });
    expect(during.bytes).toMatchObject({ total: p.pkg.length });
    expect(during.percent).not.toBeNull();
    const again = p.call("ota.download", p.download) as Promise<PackageSummary>;
    // Failing assertions below must not leave these calls unhandled when the client closes.
    first.catch(() => undefined);
    again.catch(() => undefined);
    const other = await agentError(p.call("ota.download", { ...p.download, url: p.server.url("/other.zip") }), "BUSY");
    expect(other.message).toMatch(/^An OTA job on download http:\/\/127\.0\.0\.1:\d+\/pkg\.zip is running/);
    const [a, b] = await Promise.all([first, again]);
    expect(b).toEqual(a);
    expect(a).toMatchObject({ name: "acme-printer", sha256: sha256Of(p.pkg) });
    expect(p.server.requests.map((r) => [r.path, r.status, r.range ?? null])).toEqual([
      ["/pkg.zip", 200, null],
      ["/pkg.zip", 503, `bytes=${half}-`],
      ["/pkg.zip", 206, `bytes=${half}-`],
    ]);
    // One job ran for both calls.
    expect((await status(p)).last.map((j) => [j.target, j.ok])).toEqual([[`download ${p.download.url}`, true]]);
  });

  it("ota.cancel stops a download (CANCELLED); ota.download of the same URL then resumes from the bytes kept", { timeout: 30_000 }, async () => {
    const p = await setUp();
    await p.startAgent();
    await agentError(p.call("ota.cancel"), "NO_JOB");
    const half = Math.floor(p.pkg.length / 2);
    p.server.plan({ cutAfter: half }, { status: 503, headers: { "Retry-After": "5" } });
    const first = p.call("ota.download", p.download);
    first.catch(() => undefined);
    await p.moonraker.waitFor(() => p.server.requests.length >= 2, 5000);
    const { cancelled } = (await p.call("ota.cancel")) as { cancelled: string };
    expect(cancelled).toMatch(/^ota-\d{8}T\d{6}-[0-9a-f]{4}$/);
    const err = await agentError(first, "CANCELLED");
    expect(err.message).toMatch(/bytes received are kept/);
    expect(await status(p)).toMatchObject({ state: "failed", job: null, lastError: { code: "CANCELLED" } });

    const summary = (await p.call("ota.download", p.download)) as PackageSummary;
    expect(summary).toMatchObject({ name: "acme-printer", sha256: sha256Of(p.pkg) });
    expect(p.server.requests.at(-1)).toMatchObject({ status: 206, range: `bytes=${half}-` });
    expect((await status(p)).last.map((j) => [j.ok, j.code ?? null])).toEqual([[true, null], [false, "CANCELLED"]]);
  });

  it("where OTA never ran, the OTA engine (and its code) is loaded on the first ota.* call, not at start", { timeout: 30_000 }, async () => {
    const p = await setUp();
    await p.startAgent();
    // The start-up recovery has looked and decided there is nothing an earlier process left.
    await p.moonraker.waitFor(() => p.logs.some((l) => l.msg === "OTA recovery: OTA never ran here; its engine loads on the first ota.* call"), 10_000);
    const loaded = () => p.logs.filter((l) => l.msg === "OTA engine loaded").length;
    expect(existsSync(join(p.dir, "moonflash", "ota"))).toBe(false);
    expect(loaded()).toBe(0);
    // Two calls at once load one engine.
    const [first, second] = await Promise.all([status(p), status(p)]);
    expect([first.state, second.state]).toEqual(["idle", "idle"]);
    expect(loaded()).toBe(1);
    await status(p);
    expect(loaded()).toBe(1);
  });

  it("at start the agent recovers an update a dead process left: the interrupted download is resumed and verified", { timeout: 30_000 }, async () => {
    const p = await setUp();
    // What a process killed mid-download leaves: state.json in `downloading`, naming its job.
    const store = new OtaStateStore(join(p.dir, "moonflash", "ota", "state.json"));
    const now = new Date();
    await store.transition(
      "downloading",
      {
        job: { id: "ota-20260101T000000-dead", target: `download ${p.download.url}`, startedAt: now.toISOString() },
        download: { url: p.download.url, md5: p.download.md5, sha256: null, size: null },
      },
      newState(makeUpdateId(now), "downloading", now),
    );
    await p.startAgent();
    await p.moonraker.waitFor(() => p.logs.some((l) => typeof l.msg === "string" && l.msg.startsWith("OTA recovery: ")), 10_000);
    expect(p.logs.find((l) => typeof l.msg === "string" && l.msg.startsWith("OTA recovery: "))).toMatchObject({ msg: "OTA recovery: resumed-download, state verified" });
    expect(await status(p)).toMatchObject({ state: "verified", package: { name: "acme-printer", version: "2.0.0" } });
    expect((await status(p)).last.map((j) => [j.target, j.ok, j.code ?? null])).toEqual([
      [expect.stringMatching(/^recovery ota-/), true, null],
      [`download ${p.download.url}`, false, "INTERRUPTED"],
    ]);
    const lines = p.moonraker.consoleLines;
    await p.moonraker.waitFor(() => lines.some((l) => l.includes("the interrupted download was taken up again")), 5000);
    expect(lines).toContain("// moonflash: OTA recovery: the interrupted download was taken up again: verified.");
    expect(lines.filter((l) => /ota-\d{8}T/.test(l))).toEqual([]);
    // RESPOND cannot carry ';' (a G-code comment): the console line has ',' instead.
    expect(lines).toContain(`!! moonflash: OTA download ${p.download.url} failed [INTERRUPTED] moonflash stopped during the update (state downloading), it was resumed on the next start.`);
  });
});

describe("[ota] http_port: the vendor HTTP API", () => {
  it("the agent listens on http_bind:http_port, downloads through POST /download and stops listening on stop", { timeout: 30_000 }, async () => {
    // A port free right now, for moonflash.conf (it takes 1–65535, not 0).
    const probe = createServer();
    await new Promise<void>((resolve) => probe.listen(0, "127.0.0.1", resolve));
    const port = (probe.address() as AddressInfo).port;
    await new Promise((resolve) => probe.close(resolve));

    const p = await setUp({ extraConf: `http_port: ${port}\nhttp_bind: 127.0.0.1` });
    const agent = await p.startAgent();
    expect((await agent.otaHttpApi())?.port).toBe(port);
    expect(p.logs.some((l) => l.msg === `OTA vendor HTTP API listening on http://127.0.0.1:${port}`)).toBe(true);
    const progress = async () => (await (await fetch(`http://127.0.0.1:${port}/progress`)).json()) as OtaStatusResult;
    expect(await progress()).toMatchObject({ state: "idle" });

    const res = await fetch(`http://127.0.0.1:${port}/download`, { method: "POST", body: JSON.stringify(p.download) });
    expect(res.status).toBe(202);
    const deadline = Date.now() + 10_000;
    while ((await progress()).state !== "verified" && Date.now() < deadline) await new Promise((r) => setTimeout(r, 40));
    expect(await progress()).toMatchObject({ state: "verified", package: { name: "acme-printer" } });

    await agent.stop();
    printer!.agent = null;
    await expect(fetch(`http://127.0.0.1:${port}/progress`)).rejects.toThrow();
  });

  it("without http_port nothing listens", async () => {
    const p = await setUp();
    const agent = await p.startAgent();
    expect(await agent.otaHttpApi()).toBeNull();
  });
});
