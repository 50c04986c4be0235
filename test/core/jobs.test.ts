import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pino } from "pino";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { MoonflashError } from "../../src/core/errors.js";
import type { JobContext, JobEvent } from "../../src/core/events.js";
import { JobRunner, makeJobId, PROGRESS_PER_SECOND } from "../../src/core/jobs.js";
import { readJobLock } from "../../src/core/lock.js";

function deferred<T = void>() {
  let resolve!: (value: T) => void;
  const promise = new Promise<T>((r) => (resolve = r));
  return { promise, resolve };
}

function capturingLogger() {
  const lines: Record<string, unknown>[] = [];
  const logger = pino({ level: "debug" }, { write: (line: string) => lines.push(JSON.parse(line) as Record<string, unknown>) });
  return { logger, lines };
}

/** Strips the time so event sequences compare exactly. */
function untimed(events: JobEvent[]) {
  return events.map(({ ts: _ts, ...rest }) => rest);
}

describe("JobRunner", () => {
  let dataDir: string;
  let runner: JobRunner;
  let events: JobEvent[];
  let logLines: Record<string, unknown>[];
  const lockPath = () => join(dataDir, "moonflash", "job.lock");

  beforeEach(async () => {
    dataDir = await mkdtemp(join(tmpdir(), "moonflash-jobs-"));
    const { logger, lines } = capturingLogger();
    logLines = lines;
    runner = new JobRunner({ dataDir, logger, now: () => new Date("2026-11-23T12:45:00.000Z") });
    events = [];
    runner.on((e) => events.push(e));
  });
  afterEach(async () => {
    await rm(dataDir, { recursive: true, force: true });
  });

  it("makes short sortable ids", () => {
    expect(makeJobId("flash", new Date("2026-11-23T12:45:00.000Z"))).toMatch(/^flash-20261123T124500-[0-9a-f]{4}$/);
    expect(makeJobId("ota", new Date("2026-11-23T12:45:01Z")) > makeJobId("ota", new Date("2026-11-23T12:45:00Z"))).toBe(true);
  });

  it("runs a job: holds the lock, reports events in order, records history, releases the lock", async () => {
    let seenLock: unknown;
    let seenCurrent: unknown;
    const result = await runner.run({ kind: "flash", target: "mcu toolhead", params: { method: "katapult" } }, async (ctx) => {
      seenLock = await readJobLock(lockPath());
      ctx.stage("flashing", "writing 4 blocks");
      ctx.progress(2, 4, "blocks", "write");
      ctx.log("info", "halfway");
      seenCurrent = runner.current();
      return { bytes: 4096, verified: true };
    });
    expect(result).toEqual({ bytes: 4096, verified: true });

    const jobId = events[0]!.jobId;
    expect(jobId).toMatch(/^flash-20261123T124500-[0-9a-f]{4}$/);
    expect(seenLock).toEqual({ jobId, kind: "flash", target: "mcu toolhead", pid: process.pid, startedAt: "2026-11-23T12:45:00.000Z" });
    expect(seenCurrent).toEqual({
      id: jobId,
      kind: "flash",
      target: "mcu toolhead",
      stage: "flashing",
      progress: { done: 2, total: 4, unit: "blocks", phase: "write" },
      startedAt: "2026-11-23T12:45:00.000Z",
      cancellable: true,
    });
    const base = { jobId, kind: "flash", target: "mcu toolhead" };
    expect(untimed(events)).toEqual([
      { ...base, type: "stage", stage: "started" },
      { ...base, type: "stage", stage: "flashing", message: "writing 4 blocks" },
      { ...base, type: "progress", done: 2, total: 4, unit: "blocks", phase: "write" },
      { ...base, type: "log", level: "info", message: "halfway" },
      { ...base, type: "result", ok: true, details: { bytes: 4096, verified: true } },
    ]);
    expect(events.every((e) => e.ts === "2026-11-23T12:45:00.000Z")).toBe(true);
    expect(runner.history()).toEqual([
      {
        id: jobId,
        kind: "flash",
        target: "mcu toolhead",
        params: { method: "katapult" },
        startedAt: "2026-11-23T12:45:00.000Z",
        finishedAt: "2026-11-23T12:45:00.000Z",
        ok: true,
        result: { bytes: 4096, verified: true },
      },
    ]);
    await expect(readJobLock(lockPath())).resolves.toBeNull();
    expect(runner.current()).toBeNull();
  });

  it("carries the board a stage or log line is about into its event, also after progress held back", async () => {
    const toolhead = { name: "toolhead", index: 2, count: 3 };
    await runner.run({ kind: "flash", target: "all MCUs" }, async (ctx) => {
      ctx.stage("flash", "flashing mcu (1 of 3)", { name: "mcu", index: 1, count: 3 });
      ctx.progress(1, 4, "blocks", "write");
      // Within the throttle's interval: held back, then let out before the stage that follows.
      ctx.progress(4, 4, "blocks", "write");
      ctx.stage("flash", "flashing toolhead (2 of 3)", toolhead);
      ctx.log("error", "toolhead: no answer", toolhead);
      ctx.log("info", "a line about no board");
    });
    const base = { jobId: events[0]!.jobId, kind: "flash", target: "all MCUs" };
    expect(untimed(events).slice(1, -1)).toEqual([
      { ...base, type: "stage", stage: "flash", message: "flashing mcu (1 of 3)", board: { name: "mcu", index: 1, count: 3 } },
      { ...base, type: "progress", done: 1, total: 4, unit: "blocks", phase: "write" },
      { ...base, type: "progress", done: 4, total: 4, unit: "blocks", phase: "write" },
      { ...base, type: "stage", stage: "flash", message: "flashing toolhead (2 of 3)", board: toolhead },
      { ...base, type: "log", level: "error", message: "toolhead: no answer", board: toolhead },
      { ...base, type: "log", level: "info", message: "a line about no board" },
    ]);
    expect(events.at(-2)).not.toHaveProperty("board");
  });

  it("rethrows a MoonflashError, reports it in the result and history, and releases the lock", async () => {
    const failure = new MoonflashError("VERIFY_FAILED", "Block 0x8400 read back differently; flash again.", { address: 0x8400 });
    await expect(runner.run({ kind: "flash", target: "mcu" }, async () => Promise.reject(failure))).rejects.toBe(failure);
    expect(untimed(events).at(-1)).toEqual({
      jobId: events[0]!.jobId,
      kind: "flash",
      target: "mcu",
      type: "result",
      ok: false,
      code: "VERIFY_FAILED",
      message: "Block 0x8400 read back differently; flash again.",
      details: { address: 0x8400 },
    });
    expect(runner.history()[0]).toMatchObject({ ok: false, code: "VERIFY_FAILED", message: failure.message });
    await expect(readJobLock(lockPath())).resolves.toBeNull();
    await expect(runner.run({ kind: "flash", target: "mcu" }, async () => "again")).resolves.toBe("again");
  });

  it("wraps other errors with toMoonflashError", async () => {
    await expect(runner.run({ kind: "ota", target: "klipper" }, async () => Promise.reject(new Error("boom")))).rejects.toMatchObject({
      code: "INTERNAL",
      message: "boom",
    });
    const enospc = Object.assign(new Error("write failed"), { code: "ENOSPC" });
    await expect(runner.run({ kind: "ota", target: "klipper" }, async () => Promise.reject(enospc))).rejects.toMatchObject({ code: "DISK_FULL" });
    expect(runner.history("ota").map((r) => r.code)).toEqual(["DISK_FULL", "INTERNAL"]);
  });

  it("refuses a second job in the same process with BUSY naming the running one", async () => {
    const release = deferred();
    const started = deferred<string>();
    const first = runner.run({ kind: "flash", target: "mcu" }, async (ctx) => {
      started.resolve(ctx.jobId);
      await release.promise;
      return "first";
    });
    // A second run in the same tick must already see the slot taken.
    let ranSecond = false;
    const second = runner.run({ kind: "ota", target: "klipper" }, async () => {
      ranSecond = true;
    });
    const secondOutcome = second.then(
      () => null,
      (err: unknown) => err,
    );
    const firstId = await started.promise;
    expect(await secondOutcome).toMatchObject({
      code: "BUSY",
      message: expect.stringMatching(new RegExp(`^A flash job on mcu is running \\(pid ${process.pid}, since 2026-11-23T12:45:00.000Z\\); wait for it or cancel it$`)),
    });
    expect(ranSecond).toBe(false);
    expect(runner.current()?.id).toBe(firstId);
    release.resolve();
    await expect(first).resolves.toBe("first");
    expect(runner.history()).toHaveLength(1);
  });

  it("cancel aborts the job's signal and the job ends CANCELLED", async () => {
    const started = deferred<JobContext>();
    const job = runner.run({ kind: "flash", target: "mcu" }, async (ctx) => {
      started.resolve(ctx);
      await new Promise((_, reject) => ctx.signal.addEventListener("abort", () => reject(ctx.signal.reason)));
    });
    const ctx = await started.promise;
    expect(runner.cancel("flash")).toEqual({ id: ctx.jobId });
    expect(ctx.signal.aborted).toBe(true);
    expect(runner.cancel()).toEqual({ id: ctx.jobId });
    await expect(job).rejects.toMatchObject({ code: "CANCELLED", details: { jobId: ctx.jobId } });
    expect(runner.history()[0]).toMatchObject({ ok: false, code: "CANCELLED" });
  });

  it("turns whatever an engine throws after a cancel into CANCELLED", async () => {
    const started = deferred<JobContext>();
    const job = runner.run({ kind: "flash", target: "mcu" }, async (ctx) => {
      started.resolve(ctx);
      await new Promise((resolve) => ctx.signal.addEventListener("abort", resolve));
      throw new DOMException("This operation was aborted", "AbortError");
    });
    await started.promise;
    runner.cancel();
    await expect(job).rejects.toMatchObject({ code: "CANCELLED" });
  });

  it("a cancel that arrives while the lock is being taken ends the job CANCELLED without running it", async () => {
    let ran = false;
    const job = runner.run({ kind: "flash", target: "mcu" }, async () => {
      ran = true;
    });
    const { id } = runner.cancel();
    await expect(job).rejects.toMatchObject({ code: "CANCELLED", details: { jobId: id } });
    expect(ran).toBe(false);
    expect(runner.history()[0]).toMatchObject({ id, code: "CANCELLED" });
    await expect(readJobLock(lockPath())).resolves.toBeNull();
  });

  it("cancel throws NO_JOB when nothing (of that kind) runs", async () => {
    expect(() => runner.cancel()).toThrow(expect.objectContaining({ code: "NO_JOB" }));
    const release = deferred();
    const started = deferred();
    const job = runner.run({ kind: "flash", target: "mcu" }, async () => {
      started.resolve();
      await release.promise;
    });
    await started.promise;
    expect(() => runner.cancel("ota")).toThrow(expect.objectContaining({ code: "NO_JOB", message: "No ota job is running, so there is nothing to cancel." }));
    release.resolve();
    await job;
  });

  it("cancel throws CANCEL_REFUSED with the engine's reason while not cancellable", async () => {
    const step = deferred();
    const started = deferred<JobContext>();
    const job = runner.run({ kind: "flash", target: "mcu" }, async (ctx) => {
      ctx.setCancellable(false, "flash writing has started");
      started.resolve(ctx);
      await step.promise;
      return ctx.signal.aborted;
    });
    const ctx = await started.promise;
    expect(runner.current()).toMatchObject({ cancellable: false, cancelReason: "flash writing has started" });
    let refusal: unknown;
    try {
      runner.cancel();
    } catch (err) {
      refusal = err;
    }
    expect(refusal).toMatchObject({
      code: "CANCEL_REFUSED",
      message: "The flash job on mcu cannot be cancelled now: flash writing has started. Wait for it to finish.",
      details: { jobId: ctx.jobId, reason: "flash writing has started" },
    });
    ctx.setCancellable(true);
    expect(runner.current()).toMatchObject({ cancellable: true });
    expect(runner.current()).not.toHaveProperty("cancelReason");
    step.resolve();
    await expect(job).resolves.toBe(false);
  });

  it("isolates listener errors: the job and the other listeners carry on, the error is logged", async () => {
    const after: string[] = [];
    runner.on(() => {
      throw new Error("adapter broke");
    });
    runner.on(() => Promise.reject(new Error("async adapter broke")) as unknown as void);
    runner.on((e) => after.push(e.type));
    await expect(
      runner.run({ kind: "flash", target: "mcu" }, async (ctx) => {
        ctx.progress(1, 2, "bytes");
        return 1;
      }),
    ).resolves.toBe(1);
    expect(after).toEqual(["stage", "progress", "result"]);
    expect(events.map((e) => e.type)).toEqual(["stage", "progress", "result"]);
    await new Promise((resolve) => setImmediate(resolve));
    const failures = logLines.filter((l) => l.msg === "job event listener failed");
    expect(failures.map((l) => (l.err as { message: string }).message)).toContain("adapter broke");
    expect(failures.map((l) => (l.err as { message: string }).message)).toContain("async adapter broke");
  });

  it("stops calling a listener after it unsubscribes", async () => {
    const seen: string[] = [];
    const off = runner.on((e) => seen.push(e.type));
    off();
    await runner.run({ kind: "flash", target: "mcu" }, async () => undefined);
    expect(seen).toEqual([]);
  });

  it("ignores reports made after the job finished", async () => {
    let leaked: JobContext | undefined;
    await runner.run({ kind: "flash", target: "mcu" }, async (ctx) => {
      leaked = ctx;
    });
    const count = events.length;
    leaked!.progress(1, 1, "bytes");
    leaked!.stage("late");
    leaked!.log("info", "late");
    expect(events).toHaveLength(count);
  });

  it("filters and limits history, newest first", async () => {
    for (const kind of ["flash", "ota", "flash", "flash"] as const) {
      await runner.run({ kind, target: "t", params: { kind } }, async () => undefined);
    }
    expect(runner.history().map((r) => r.kind)).toEqual(["flash", "flash", "ota", "flash"]);
    expect(runner.history("ota")).toHaveLength(1);
    expect(runner.history("flash", 2)).toHaveLength(2);
    // Another runner on the same data dir (another process) sees the same history.
    expect(new JobRunner({ dataDir, logger: pino({ level: "silent" }) }).history()).toEqual(runner.history());
  });

  it("records an interrupted job as failed with INTERRUPTED", async () => {
    await runner.interrupted({ id: "flash-20261123T120000-beef", kind: "flash", target: "mcu", startedAt: "2026-11-23T12:00:00.000Z" });
    const [record] = runner.history();
    expect(record).toEqual({
      id: "flash-20261123T120000-beef",
      kind: "flash",
      target: "mcu",
      startedAt: "2026-11-23T12:00:00.000Z",
      finishedAt: "2026-11-23T12:45:00.000Z",
      ok: false,
      code: "INTERRUPTED",
      message: "moonflash stopped while this job ran; check the device and run the job again.",
    });
    await runner.interrupted({ id: "ota-x", kind: "ota", target: "klipper", startedAt: "2026-11-23T12:00:00.000Z", message: "power cut during apply" });
    expect(runner.history("ota")[0]!.message).toBe("power cut during apply");
    const file = JSON.parse(await readFile(join(dataDir, "moonflash", "history.json"), "utf8")) as { jobs: unknown[] };
    expect(file.jobs).toHaveLength(2);
  });
});

describe("JobRunner progress, throttled once for every listener", () => {
  it("gives listeners each phase's first and last progress and at most PROGRESS_PER_SECOND between; status keeps the latest", async () => {
    const dataDir = await mkdtemp(join(tmpdir(), "moonflash-throttle-"));
    const runner = new JobRunner({ dataDir, logger: pino({ level: "silent" }) });
    const seen: Array<{ phase?: string; done: number; at: number }> = [];
    runner.on((e) => {
      if (e.type === "progress") seen.push({ ...(e.phase ? { phase: e.phase } : {}), done: e.done, at: Date.now() });
    });
    let latest: unknown;
    const started = Date.now();
    await runner.run({ kind: "flash", target: "mcu" }, async (ctx) => {
      // 2000 blocks over ~0.6 s, as a fast flash reports them, in two phases.
      for (const phase of ["write", "verify"]) {
        for (let done = 1; done <= 1000; done++) {
          ctx.progress(done, 1000, "blocks", phase);
          if (done % 100 === 0) await new Promise((r) => setTimeout(r, 30));
        }
      }
      latest = runner.current()?.progress;
    });
    const seconds = (Date.now() - started) / 1000;
    for (const phase of ["write", "verify"]) {
      const ofPhase = seen.filter((p) => p.phase === phase);
      expect(ofPhase[0]!.done).toBe(1);
      expect(ofPhase.at(-1)!.done).toBe(1000);
    }
    // First and last of each phase, plus at most PROGRESS_PER_SECOND a second in between.
    expect(seen.length).toBeLessThanOrEqual(Math.ceil(seconds * PROGRESS_PER_SECOND) + 4);
    expect(latest).toEqual({ done: 1000, total: 1000, unit: "blocks", phase: "verify" });
    await rm(dataDir, { recursive: true, force: true });
  });
});
