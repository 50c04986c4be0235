// [ota] callback_url: a real receiver on 127.0.0.1 gets the OTA job's reports as JSON POSTs from the real engine
// (download and install through the fake Moonraker); a receiver that is down, refuses, or never answers delays
// nothing in the job, and reports are retried with backoff, in order, with newer progress replacing older.

import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pino } from "pino";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import type { JobEvent, JobKind, LogLevel } from "../../src/core/events.js";
import { CallbackReporter } from "../../src/ota/callback-report.js";
import { OtaEngine } from "../../src/ota/engine.js";
import { startRig, waitUntil, type PrinterRig } from "../fixtures/engine/rig.js";
import { TestHttpServer } from "./support/http-server.js";
import { Receiver } from "./support/report-receiver.js";
import { buildPackage, layoutIn, md5Of, otaConfig, SERVICES, sha256Of, writeOldTree } from "./support/ota-fixture.js";

let base: string;
let pkg: Buffer;
let packageServer: TestHttpServer;
beforeAll(async () => {
  base = await mkdtemp(join(tmpdir(), "moonflash-ota-report-"));
  pkg = await buildPackage(join(base, "pkg.zip"), { firmware: false });
  packageServer = await TestHttpServer.start({ body: pkg });
});
afterAll(async () => {
  await packageServer.close();
  await rm(base, { recursive: true, force: true });
});

const cleanups: Array<() => Promise<void>> = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

let counter = 0;
async function printer(reporter: (engine: OtaEngine, rig: PrinterRig) => CallbackReporter) {
  const rig = await startRig({ services: SERVICES });
  cleanups.push(() => rig.close());
  const layout = layoutIn(join(base, `printer-${++counter}`));
  await writeOldTree(layout);
  const engine = new OtaEngine({
    dataDir: rig.dataDir, config: otaConfig(layout, { probation_timeout: 5 }), printer: rig.session, runner: rig.runner, logger: rig.logger,
    serviceTimeoutMs: 5000, pollMs: 20, download: { retries: 1, backoffMs: 10, progressIntervalMs: 0 },
  });
  const report = reporter(engine, rig);
  cleanups.push(async () => report.close());
  rig.runner.on(report.onJobEvent);
  return { rig, engine, report };
}

const download = () => ({ url: packageServer.url(), md5: md5Of(pkg), sha256: sha256Of(pkg), size: pkg.length });

describe("[ota] callback_url reports", () => {
  it("POSTs every stage, progress and the result of a download and an install, in order, with ota.status", async () => {
    const receiver = new Receiver(await Receiver.freePort());
    await receiver.listen();
    cleanups.push(() => receiver.close());
    const url = receiver.url.replace("http://", "http://vendor:t0ken@");
    const { engine, report } = await printer((engine) => new CallbackReporter({ url, logger: pino({ level: "silent" }), status: () => engine.status(), userAgent: "moonflash/test" }));

    await engine.download(download());
    await engine.install();
    await report.flush(5000);

    const r = receiver.reports;
    expect(r.map((x) => x.seq)).toEqual(r.map((_, i) => i + 1));
    expect(receiver.requests.every((q) => q.method === "POST" && q.url === "/api/v1.0/ota/report" && q.contentType === "application/json; charset=utf-8" && q.userAgent === "moonflash/test")).toBe(true);
    expect(new Set(receiver.requests.map((q) => q.authorization))).toEqual(new Set([`Basic ${Buffer.from("vendor:t0ken").toString("base64")}`]));
    const results = r.filter((x) => x.event === "result");
    expect(results.map((x) => [x.target, x.ok])).toEqual([[`download ${packageServer.url()}`, true], ["acme-printer 2.0.0", true]]);
    expect(results[1]!.status).toMatchObject({ state: "committed" });
    expect(r.filter((x) => x.event === "stage" && x.job_id === results[1]!.job_id).map((x) => x.stage)).toEqual(expect.arrayContaining(["started", "deploy", "probation"]));
    expect(r.some((x) => x.event === "progress" && typeof x.done === "number" && typeof x.total === "number")).toBe(true);
  });

  it("a failed job's result carries its code and message", async () => {
    const receiver = new Receiver(await Receiver.freePort());
    await receiver.listen();
    cleanups.push(() => receiver.close());
    const { engine, report } = await printer((engine) => new CallbackReporter({ url: receiver.url, logger: pino({ level: "silent" }), status: () => engine.status() }));
    await expect(engine.download({ ...download(), md5: "0".repeat(32), sha256: undefined as never })).rejects.toMatchObject({ code: "MD5_MISMATCH" });
    await report.flush(5000);
    expect(receiver.reports.at(-1)).toMatchObject({ event: "result", ok: false, code: "MD5_MISMATCH", message: expect.stringContaining("MD5"), status: { state: "failed" } });
  });

  it("while the receiver is down the job goes on; once it is up, the queued reports arrive in order, progress coalesced", async () => {
    const receiver = new Receiver(await Receiver.freePort());
    cleanups.push(() => receiver.close());
    const warnings: string[] = [];
    const logger = pino({ level: "debug" }, { write: (line: string) => void warnings.push((JSON.parse(line) as { msg: string }).msg) });
    const { engine, report } = await printer((engine) => new CallbackReporter({ url: receiver.url, logger, status: () => engine.status(), backoffMs: 100, maxBackoffMs: 200, attempts: 50 }));

    // The whole download and install finish with no receiver at all.
    await engine.download(download());
    await engine.install();
    expect(engine.status().state).toBe("committed");
    expect(receiver.reports).toEqual([]);
    expect(warnings.some((m) => /OTA report to http:\/\/127\.0\.0\.1:\d+\/api\/v1\.0\/ota\/report failed \(ECONNREFUSED\); retrying in \d+ ms/.test(m))).toBe(true);

    await receiver.listen();
    await report.flush(10_000);
    const r = receiver.reports;
    expect(r.length).toBeGreaterThan(0);
    // Nothing lost but superseded progress: the seq numbers only grow, and every stage and result is there.
    expect(r.map((x) => x.seq)).toEqual([...r.map((x) => x.seq)].sort((a, b) => a - b));
    expect(r.filter((x) => x.event === "result").map((x) => x.ok)).toEqual([true, true]);
    expect(r.at(-1)).toMatchObject({ event: "result", target: "acme-printer 2.0.0" });
    // Never two progress reports of one job back to back: while they waited, the newer replaced the older.
    const backToBack = r.filter((x, i) => i > 1 && x.event === "progress" && r[i - 1]!.event === "progress" && r[i - 1]!.job_id === x.job_id);
    expect(backToBack).toEqual([]);
  });

  it("a receiver that never answers: each report gives up after its attempts with a warning, and the job is not held", async () => {
    const receiver = new Receiver(await Receiver.freePort());
    receiver.reply = "stall";
    await receiver.listen();
    cleanups.push(() => receiver.close());
    const warnings: string[] = [];
    const logger = pino({ level: "warn" }, { write: (line: string) => void warnings.push((JSON.parse(line) as { msg: string }).msg) });
    const { engine, report } = await printer((engine) => new CallbackReporter({ url: receiver.url, logger, status: () => engine.status(), timeoutMs: 100, attempts: 2, backoffMs: 10 }));
    await engine.download(download());
    expect(engine.status().state).toBe("verified");
    await report.flush(20_000);
    expect(warnings.filter((m) => m.startsWith("OTA report not delivered")).length).toBeGreaterThan(0);
    expect(warnings.every((m) => /^OTA report not delivered to http:\/\/127\.0\.0\.1:\d+\/api\/v1\.0\/ota\/report: no answer within 100 ms$|dropped/.test(m))).toBe(true);
    // Two attempts per report.
    expect(receiver.requests.length).toBe(2 * warnings.filter((m) => m.startsWith("OTA report not delivered")).length);
  });

  it("close() ends the POST in flight and the retry wait, so that a CLI run can exit", async () => {
    const receiver = new Receiver(await Receiver.freePort());
    receiver.reply = "stall";
    await receiver.listen();
    cleanups.push(() => receiver.close());
    const report = new CallbackReporter({ url: receiver.url, logger: pino({ level: "silent" }), status: () => null, timeoutMs: 60_000 });
    report.onJobEvent({ jobId: "j1", kind: "ota", target: "t", ts: new Date().toISOString(), type: "stage", stage: "started" });
    await waitUntil(() => receiver.requests.length === 1, "the POST");
    const flushed = report.flush(60_000);
    report.close();
    await flushed;
    await waitUntil(() => receiver.closedUnanswered === 1, "the receiver to see the connection closed");
  });

  it("a 4xx answer is final (not retried); 503 is retried", async () => {
    const receiver = new Receiver(await Receiver.freePort());
    await receiver.listen();
    cleanups.push(() => receiver.close());
    const report = new CallbackReporter({ url: receiver.url, logger: pino({ level: "silent" }), status: () => ({ state: "idle" }), backoffMs: 10, attempts: 3 });
    cleanups.push(async () => report.close());
    const event = (message: string, level: LogLevel = "warn", kind: JobKind = "ota"): JobEvent => ({ jobId: "j1", kind, target: "t", ts: new Date().toISOString(), type: "log", level, message });

    receiver.reply = 400;
    report.onJobEvent(event("refused"));
    await report.flush(5000);
    expect(receiver.requests.length).toBe(1);

    receiver.reply = 503;
    report.onJobEvent(event("retried"));
    await waitUntil(() => receiver.requests.length >= 2, "the first 503");
    receiver.reply = 200;
    await report.flush(5000);
    expect(receiver.reports.map((x) => [x.event, x.message])).toEqual([["log", "retried"]]);
    expect(receiver.requests.length).toBeGreaterThanOrEqual(3);
    // Info and debug lines and flash jobs are not reported.
    report.onJobEvent(event("x", "info"));
    report.onJobEvent(event("y", "warn", "flash"));
    await report.flush(5000);
    expect(receiver.reports.length).toBe(1);
  });
});
