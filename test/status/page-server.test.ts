// The status page over real HTTP on 127.0.0.1: a real JobRunner runs the jobs, the page follows its events.

import { createHash } from "node:crypto";
import { readdirSync, readFileSync, statSync } from "node:fs";
import { createServer } from "node:net";
import { join, relative, resolve } from "node:path";
import { pino } from "pino";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { MoonflashError } from "../../src/core/errors.js";
import { MAX_SSE_CLIENTS, startStatusPage } from "../../src/status/page-server.js";
import type { BoardRow, HistoryRow, JobUpdate, PrinterView, Snapshot } from "../../src/status/view.js";
import { deferred, fetchText, SseReader, startFixture, type PageFixture } from "./support.js";

const repo = resolve(import.meta.dirname, "../..");

async function snapshotOf(f: PageFixture): Promise<Snapshot> {
  const res = await fetchText(f.url("/status.json"));
  expect(res.status).toBe(200);
  expect(res.headers["content-type"]).toBe("application/json; charset=utf-8");
  return JSON.parse(res.body) as Snapshot;
}

function boardsOf(rows: BoardRow[]) {
  return rows.map((b) => ({ name: b.name, state: b.state, order: b.order, percent: b.progress?.percent ?? null, code: b.code, message: b.message }));
}

describe("status page server", () => {
  let f: PageFixture;
  const readers: SseReader[] = [];
  const sse = (path = "/events") => {
    const reader = new SseReader(f.url(path));
    readers.push(reader);
    return reader;
  };

  beforeEach(async () => {
    f = await startFixture();
  });
  afterEach(async () => {
    for (const r of readers.splice(0)) r.close();
    await f.cleanup();
  });

  it("serves the snapshot at /status.json: printer, no job yet, recent history", async () => {
    await f.runner.run({ kind: "flash", target: "mcu toolhead" }, async () => ({ ok: true }));
    await f.runner.run({ kind: "flash", target: "mcu" }, async () => {
      throw new MoonflashError("DEVICE_NOT_FOUND", "The serial device /dev/ttyACM0 is not present.");
    }).catch(() => {});
    const snap = await snapshotOf(f);
    expect(snap.version).toBe("0.1.0-test");
    expect(snap.printer).toEqual({ moonraker: true, klipper: true, klippyState: "ready", message: "", printState: "standby" });
    // The last job this process ran stays on the page with its outcome.
    expect(snap.job).toMatchObject({ kind: "flash", target: "mcu", label: "mcu", result: { ok: false, code: "DEVICE_NOT_FOUND" } });
    expect(snap.history.map((h) => [h.label, h.ok, h.code, h.message])).toEqual([
      ["mcu", false, "DEVICE_NOT_FOUND", "The serial device /dev/ttyACM0 is not present."],
      ["toolhead", true, null, null],
    ]);
    expect(snap.history[0]).not.toHaveProperty("params");
    expect(snap.history[1]).not.toHaveProperty("result");
  });

  it("lists at most the last 10 jobs", async () => {
    for (let i = 0; i < 12; i++) await f.runner.run({ kind: "flash", target: `mcu b${i}` }, async () => undefined);
    const snap = await snapshotOf(f);
    expect(snap.history.map((h) => h.label)).toEqual(["b11", "b10", "b9", "b8", "b7", "b6", "b5", "b4", "b3", "b2"]);
  });

  it("serves the page: the snapshot embedded, inline script allowed by its hash, framing allowed, no external assets", async () => {
    const hostile = "</script><script>alert(1)</script><!--";
    await f.runner.run({ kind: "flash", target: "mcu toolhead" }, async (ctx) => ctx.log("error", hostile));
    const res = await fetchText(f.url("/"));
    expect(res.status).toBe(200);
    expect(res.headers["content-type"]).toBe("text/html; charset=utf-8");
    expect(res.headers["x-frame-options"]).toBeUndefined();
    const csp = String(res.headers["content-security-policy"]);
    expect(csp).not.toContain("frame-ancestors");
    expect(csp).toContain("default-src 'none'");
    const scripts = [...res.body.matchAll(/<script([^>]*)>([\s\S]*?)<\/script>/g)];
    const code = scripts.find((s) => s[1] === "")![2]!;
    expect(csp).toContain(`'sha256-${createHash("sha256").update(code).digest("base64")}'`);
    const embedded = JSON.parse(scripts.find((s) => s[1]!.includes("application/json"))![2]!) as Snapshot;
    expect(embedded.printer.klippyState).toBe("ready");
    // A log line cannot end the JSON's <script> element: it arrives as text.
    expect(scripts).toHaveLength(2);
    expect(embedded.log.map((l) => l.message)).toEqual([hostile]);
    expect(res.body).not.toMatch(/(src|href)="(https?:)?\/\//);
  });

  it("answers HEAD without a body", async () => {
    const page = await fetchText(f.url("/"), "HEAD");
    expect(page.status).toBe(200);
    expect(page.body).toBe("");
    expect(Number(page.headers["content-length"])).toBeGreaterThan(1000);
    const events = await fetchText(f.url("/events"), "HEAD");
    expect(events.status).toBe(200);
    expect(events.headers["content-type"]).toBe("text/event-stream; charset=utf-8");
  });

  it("refuses every method but GET and HEAD with 405, and nothing changes", async () => {
    for (const method of ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"]) {
      for (const path of ["/", "/events", "/status.json", "/cancel"]) {
        const res = await fetchText(f.url(path), method, method === "POST" ? '{"action":"cancel"}' : undefined);
        expect(res.status, `${method} ${path}`).toBe(405);
        expect(res.headers.allow).toBe("GET, HEAD");
      }
    }
    expect(f.runner.current()).toBeNull();
    expect(f.runner.history()).toEqual([]);
  });

  it("answers 404 for unknown paths", async () => {
    for (const path of ["/nope", "/status", "/events/", "/../etc/passwd", "/favicon.ico", "/index.html"]) {
      expect((await fetchText(f.url(path))).status, path).toBe(404);
    }
  });

  it("streams a snapshot on connect, then each job event in order, history after the result, printer changes", async () => {
    const reader = sse();
    await reader.next((m) => m.event === "snapshot");
    expect(reader.status).toBe(200);
    expect(reader.headers["content-type"]).toBe("text/event-stream; charset=utf-8");
    expect(reader.headers["x-accel-buffering"]).toBe("no");
    expect(reader.raw.startsWith("retry: ")).toBe(true);
    expect(reader.data<Snapshot>("snapshot")[0]!.job).toBeNull();

    const id = await f.runner.run({ kind: "flash", target: "mcu toolhead" }, async (ctx) => {
      ctx.stage("write", "Writing 4096 bytes");
      ctx.progress(1024, 4096, "bytes", "write");
      ctx.progress(2048, 4096, "bytes", "write"); // held back by the runner's throttle, let out by the next event
      ctx.log("debug", "not for the page");
      ctx.log("warn", "block 3 retried");
      ctx.stage("verify", "Verifying 64 blocks");
      ctx.progress(4096, 4096, "bytes", "verify");
      return ctx.jobId;
    });
    const history = await reader.next((m) => m.event === "history");
    const updates = reader.data<JobUpdate>("job");
    expect(updates.map((u) => [u.type, u.job.stage, u.job.message, u.job.progress && `${u.job.progress.done}/${u.job.progress.total} ${u.job.progress.percent}%`, u.line?.message ?? null])).toEqual([
      ["stage", "started", null, null, null],
      ["stage", "write", "Writing 4096 bytes", null, null],
      ["progress", "write", "Writing 4096 bytes", "1024/4096 25%", null],
      ["progress", "write", "Writing 4096 bytes", "2048/4096 50%", null],
      ["log", "write", "Writing 4096 bytes", "2048/4096 50%", "block 3 retried"],
      ["stage", "verify", "Verifying 64 blocks", "2048/4096 50%", null],
      ["progress", "verify", "Verifying 64 blocks", "4096/4096 100%", null],
      ["result", "verify", "Verifying 64 blocks", "4096/4096 100%", null],
    ]);
    expect(updates.every((u) => u.job.id === id && u.job.label === "toolhead" && u.job.kind === "flash")).toBe(true);
    expect(updates[4]!.line).toMatchObject({ level: "warn" });
    expect(updates.at(-1)!.job.result).toEqual({ ok: true, code: null, message: null });
    expect(reader.messages.findIndex((m) => m.event === "history")).toBe(reader.messages.length - 1);
    expect((JSON.parse(history.data) as HistoryRow[])[0]).toMatchObject({ id, ok: true, label: "toolhead" });

    f.printer.set({ klippyConnected: false, klippyState: "disconnected" });
    f.printer.set({ klippyConnected: false, klippyState: "disconnected" }); // no change: nothing sent
    f.printer.set({ moonrakerConnected: false });
    await reader.next((m) => m.event === "printer" && (JSON.parse(m.data) as PrinterView).moonraker === false);
    expect(reader.data<PrinterView>("printer").map((p) => [p.moonraker, p.klipper, p.klippyState])).toEqual([
      [true, false, "disconnected"],
      [false, false, "disconnected"],
    ]);

    // A page opened now gets the finished job with its log tail.
    const later = sse();
    const snap = JSON.parse((await later.next((m) => m.event === "snapshot")).data) as Snapshot;
    expect(snap.job).toMatchObject({ id, stage: "verify", result: { ok: true } });
    expect(snap.log.map((l) => [l.level, l.message])).toEqual([["warn", "block 3 retried"]]);
  });

  it("shows a job that was running before the page started, from the runner's current job", async () => {
    const gate = deferred();
    const reached = deferred();
    const job = f.runner.run({ kind: "flash", target: "mcu toolhead" }, async (ctx) => {
      ctx.stage("write", "Writing 8192 bytes");
      ctx.progress(6144, 8192, "bytes", "write");
      reached.resolve();
      await gate.promise;
    });
    await reached.promise;
    const logger = pino({ level: "silent" });
    const second = await startStatusPage({ runner: f.runner, printer: f.printer, host: "127.0.0.1", port: 0, logger });
    try {
      const snap = JSON.parse((await fetchText(`http://127.0.0.1:${second.port}/status.json`)).body) as Snapshot;
      expect(snap.version).toBeNull();
      expect(snap.job).toMatchObject({ label: "toolhead", stage: "write", progress: { done: 6144, total: 8192, percent: 75, phase: "write" }, result: null });
    } finally {
      gate.resolve();
      await job;
      await second.close();
    }
  });

  it("shows per-board rows for an update of several boards", async () => {
    const reader = sse();
    await reader.next((m) => m.event === "snapshot");
    const gate = deferred();
    const reached = deferred();
    const failure = new MoonflashError("FLASH_FAILED", "mcu: Writing block 3 failed", {
      result: {
        mcus: [
          { mcu: "mcu toolhead", name: "toolhead", built: true, flashed: true, verified: true, version_before: "v0.12.0" },
          { mcu: "mcu", name: "mcu", built: true, flashed: false, version_before: "v0.12.0", code: "FLASH_FAILED", message: "Writing block 3 failed" },
          { mcu: "mcu bed", name: "bed", built: false, flashed: false, version_before: null, code: "BUILD_FAILED", message: "make failed" },
        ],
        plan: [{ profile: `${f.dataDir}/config/moonflash/mcu.config` }],
      },
    });
    // The events McuUpdater (src/flash/update-all.ts) emits, in its order.
    const job = f.runner.run({ kind: "flash", target: "all MCUs" }, async (ctx) => {
      ctx.stage("check", "checking which MCUs need new firmware");
      ctx.stage("build", "building the firmware of toolhead", { name: "toolhead", index: 1, count: 3 });
      ctx.stage("build", "building the firmware of mcu", { name: "mcu", index: 2, count: 3 });
      ctx.stage("build", "building the firmware of bed", { name: "bed", index: 3, count: 3 });
      ctx.log("error", "bed: make failed", { name: "bed", index: 3, count: 3 });
      ctx.stage("stop", "stopping klipper");
      ctx.stage("flash", "flashing toolhead (1 of 2)", { name: "toolhead", index: 1, count: 2 });
      ctx.stage("write", "Writing 4096 bytes");
      ctx.progress(2048, 4096, "bytes", "write");
      reached.resolve();
      await gate.promise;
      ctx.stage("flash", "flashing mcu (2 of 2)", { name: "mcu", index: 2, count: 2 });
      ctx.progress(512, 4096, "bytes", "write");
      ctx.log("error", "mcu: Writing block 3 failed", { name: "mcu", index: 2, count: 2 });
      throw failure;
    });
    await reached.promise;
    const during = await snapshotOf(f);
    expect(during.job).toMatchObject({ label: "all MCUs", stage: "write", result: null });
    expect(boardsOf(during.job!.boards)).toEqual([
      { name: "toolhead", state: "flashing", order: "1 of 2", percent: 50, code: null, message: null },
      { name: "mcu", state: "built", order: null, percent: null, code: null, message: null },
      { name: "bed", state: "failed", order: null, percent: null, code: null, message: "make failed" },
    ]);
    gate.resolve();
    await expect(job).rejects.toMatchObject({ code: "FLASH_FAILED" });
    await reader.next((m) => m.event === "history");

    const updates = reader.data<JobUpdate>("job");
    const flashingMcu = updates.find((u) => u.type === "progress" && u.job.boards.some((b) => b.name === "mcu" && b.state === "flashing"))!;
    expect(boardsOf(flashingMcu.job.boards).slice(0, 2)).toEqual([
      { name: "toolhead", state: "flashed", order: "1 of 2", percent: null, code: null, message: null },
      { name: "mcu", state: "flashing", order: "2 of 2", percent: 12, code: null, message: null },
    ]);
    const final = updates.at(-1)!;
    expect(final.type).toBe("result");
    expect(boardsOf(final.job.boards)).toEqual([
      { name: "toolhead", state: "flashed", order: "1 of 2", percent: null, code: null, message: null },
      { name: "mcu", state: "failed", order: "2 of 2", percent: null, code: "FLASH_FAILED", message: "Writing block 3 failed" },
      { name: "bed", state: "failed", order: null, percent: null, code: "BUILD_FAILED", message: "make failed" },
    ]);
    expect(final.job.result).toEqual({ ok: false, code: "FLASH_FAILED", message: "mcu: Writing block 3 failed" });
    // The result's details (plan paths and all) are not passed on.
    expect(reader.raw).not.toContain(f.dataDir);
  });

  it("follows the boards from the events' board field, whatever their messages say", async () => {
    const gate = deferred();
    const reached = deferred();
    const job = f.runner.run({ kind: "flash", target: "all MCUs" }, async (ctx) => {
      ctx.stage("build", "compiling", { name: "toolhead", index: 1, count: 2 });
      ctx.stage("build", "compiling", { name: "mcu", index: 2, count: 2 });
      // Without the field, not even update-all's own wording makes a row.
      ctx.stage("build", "building the firmware of bed");
      ctx.log("error", "bed: make failed");
      ctx.stage("flash", "writing the first board", { name: "toolhead", index: 1, count: 2 });
      ctx.progress(1024, 4096, "bytes", "write");
      ctx.log("error", "the bootloader did not answer", { name: "mcu", index: 2, count: 2 });
      reached.resolve();
      await gate.promise;
    });
    await reached.promise;
    const during = await snapshotOf(f);
    expect(during.job).toMatchObject({ stage: "flash", message: "writing the first board" });
    expect(boardsOf(during.job!.boards)).toEqual([
      { name: "toolhead", state: "flashing", order: "1 of 2", percent: 25, code: null, message: null },
      { name: "mcu", state: "failed", order: null, percent: null, code: null, message: "the bootloader did not answer" },
    ]);
    gate.resolve();
    await job;
  });

  it("reads the per-board outcomes of a failed update where update-all keeps them", () => {
    const source = readFileSync(join(repo, "src/flash/update-all.ts"), "utf8");
    // A failed update keeps the per-board outcomes in its error's details (boardOutcomes reads `details.result`).
    expect(source).toContain("{ result },");
  });

  it("never shows URL credentials, signed queries or the data dir's paths", async () => {
    const reader = sse();
    await reader.next((m) => m.event === "snapshot");
    const secretUrl = "https://vendor:s3cret@updates.example.com/pkg/v2.zip?token=t0ken";
    const packagePath = join(f.dataDir, "moonflash", "ota", "package.zip");
    const reached = deferred();
    const gate = deferred();
    const job = f.runner.run({ kind: "ota", target: `download ${secretUrl}`, params: { url: secretUrl } }, async (ctx) => {
      ctx.stage("download", `GET ${secretUrl}`);
      ctx.log("info", `writing ${packagePath}`);
      ctx.log("error", `resume from ${packagePath}.part at ${secretUrl}: 403`);
      reached.resolve();
      await gate.promise;
      throw new MoonflashError("DOWNLOAD_FAILED", `${secretUrl} answered 403; kept ${packagePath}`, { url: secretUrl, path: packagePath });
    });
    await reached.promise;
    f.printer.set({ klippyState: "error", stateMessage: `Unable to open config file ${f.dataDir}/config/printer.cfg` });
    await reader.next((m) => m.event === "printer");
    const during = [await fetchText(f.url("/status.json")), await fetchText(f.url("/"))];
    gate.resolve();
    await job.catch(() => {});
    await reader.next((m) => m.event === "history");
    const after = [await fetchText(f.url("/status.json")), await fetchText(f.url("/"))];

    const shown = [...during, ...after].map((r) => r.body).join("\n") + reader.raw;
    for (const secret of ["s3cret", "vendor", "t0ken", "token=", f.dataDir, "/moonflash/ota/"]) expect(shown).not.toContain(secret);
    expect(shown).toContain("https://updates.example.com/pkg/v2.zip");
    const snap = JSON.parse(after[0]!.body) as Snapshot;
    expect(snap.job).toMatchObject({ target: "download https://updates.example.com/pkg/v2.zip", message: "GET https://updates.example.com/pkg/v2.zip" });
    expect(snap.job!.result).toEqual({ ok: false, code: "DOWNLOAD_FAILED", message: "https://updates.example.com/pkg/v2.zip answered 403; kept …/package.zip" });
    expect(snap.log.map((l) => l.message)).toEqual(["writing …/package.zip", "resume from …/package.zip.part at https://updates.example.com/pkg/v2.zip: 403"]);
    expect(snap.printer.message).toBe("Unable to open config file …/printer.cfg");
    expect(snap.history[0]).toMatchObject({ label: "download https://updates.example.com/pkg/v2.zip", code: "DOWNLOAD_FAILED" });
  });

  it(`serves at most ${MAX_SSE_CLIENTS} event streams at once`, async () => {
    const open = Array.from({ length: MAX_SSE_CLIENTS }, () => sse());
    await Promise.all(open.map((r) => r.next((m) => m.event === "snapshot")));
    const refused = sse();
    await refused.response();
    expect(refused.status).toBe(503);
    expect(refused.headers["retry-after"]).toBe("10");
    await refused.ended;
    // The page itself still loads.
    expect((await fetchText(f.url("/status.json"))).status).toBe(200);

    open[0]!.close();
    await open[0]!.ended;
    let status = 0;
    for (let i = 0; i < 50 && status !== 200; i++) {
      const again = sse();
      await again.response();
      status = again.status;
      if (status !== 200) await new Promise((r) => setTimeout(r, 20));
    }
    expect(status).toBe(200);
  });

  it("sends a keep-alive comment between events", async () => {
    await f.cleanup();
    f = await startFixture({ heartbeatMs: 50 });
    const reader = sse();
    await reader.next((m) => m.event === "snapshot");
    const deadline = Date.now() + 2_000;
    while (reader.comments.length < 2 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    expect(reader.comments.slice(0, 2)).toEqual(["keep-alive", "keep-alive"]);
  });

  it("close() ends every event stream, stops listening and unsubscribes", async () => {
    const a = sse();
    const b = sse();
    await Promise.all([a.next((m) => m.event === "snapshot"), b.next((m) => m.event === "snapshot")]);
    expect(f.printer.listenerCount).toBe(1);
    const started = Date.now();
    await f.page.close();
    await Promise.all([a.ended, b.ended]);
    expect(Date.now() - started).toBeLessThan(2_000);
    expect(f.printer.listenerCount).toBe(0);
    await expect(fetchText(f.url("/status.json"))).rejects.toMatchObject({ code: "ECONNREFUSED" });
    // Jobs go on without the page.
    await f.runner.run({ kind: "flash", target: "mcu" }, async (ctx) => ctx.stage("write"));
    await f.page.close(); // twice is fine
  });

  it("rejects with PORT_UNAVAILABLE when the port is taken", async () => {
    const blocker = createServer();
    await new Promise<void>((r) => blocker.listen(0, "127.0.0.1", r));
    const port = (blocker.address() as { port: number }).port;
    const logger = pino({ level: "silent" });
    try {
      const err = await startStatusPage({ runner: f.runner, printer: f.printer, host: "127.0.0.1", port, logger }).then(
        () => null,
        (e: unknown) => e,
      );
      expect(err).toBeInstanceOf(MoonflashError);
      expect(err).toMatchObject({ code: "PORT_UNAVAILABLE", details: { host: "127.0.0.1", port, errno: "EADDRINUSE" } });
      expect((err as Error).message).toContain(`Port ${port}`);
      expect((err as Error).message).toContain("[status_page] port");
      expect((err as MoonflashError).status).toBe(409);
    } finally {
      await new Promise((r) => blocker.close(r));
    }
    // An address that is not this machine's says so.
    await expect(startStatusPage({ runner: f.runner, printer: f.printer, host: "192.0.2.1", port: 0, logger })).rejects.toMatchObject({
      code: "PORT_UNAVAILABLE",
      details: { errno: "EADDRNOTAVAIL" },
      message: expect.stringContaining("[status_page] bind"),
    });
  });
});

describe("loading the status page", () => {
  // The agent imports page-server.js with await import() when it starts the page: node:http stays unloaded
  // until then. A static import anywhere else would load it at start-up.
  it("is imported lazily everywhere outside src/status", () => {
    const files: string[] = [];
    const walk = (dir: string) => {
      for (const name of readdirSync(dir)) {
        const path = join(dir, name);
        if (statSync(path).isDirectory()) walk(path);
        else if (path.endsWith(".ts")) files.push(path);
      }
    };
    walk(join(repo, "src"));
    const staticImports = files
      .filter((file) => !relative(repo, file).startsWith("src/status/"))
      .filter((file) => /^\s*(import|export)\s+(?!type\b)[^;]*from\s+["'][^"']*status\/page-(server|html)\.js["']/m.test(readFileSync(file, "utf8")))
      .map((file) => relative(repo, file));
    expect(staticImports).toEqual([]);
    // moonflash-conf.ts imports the config section at start-up: it must not bring the server with it.
    const config = readFileSync(join(repo, "src/status/config.ts"), "utf8");
    const imports = config.split("\n").filter((line) => /^import\b/.test(line));
    expect(imports.join("\n")).not.toMatch(/["'](node:)?(http|net|crypto)["']|page-server|page-html/);
    expect(imports.length).toBeGreaterThan(0);
  });
});
