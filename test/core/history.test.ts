import { mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pino } from "pino";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { appendJob, listJobs, type JobRecord } from "../../src/core/history.js";

function record(n: number, overrides: Partial<JobRecord> = {}): JobRecord {
  return {
    id: `flash-20261123T1245${String(n).padStart(2, "0")}-0000`,
    kind: "flash",
    target: "mcu",
    params: { n },
    startedAt: "2026-11-23T12:45:00.000Z",
    finishedAt: "2026-11-23T12:46:00.000Z",
    ok: true,
    ...overrides,
  };
}

/** A logger that keeps its JSON lines, to assert what was logged. */
function capturingLogger() {
  const lines: Record<string, unknown>[] = [];
  const logger = pino({ level: "info" }, { write: (line: string) => lines.push(JSON.parse(line) as Record<string, unknown>) });
  return { logger, lines };
}

describe("job history", () => {
  let dir: string;
  let path: string;
  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), "moonflash-history-"));
    path = join(dir, "moonflash", "history.json");
  });
  afterEach(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it("is empty when there is no file", () => {
    expect(listJobs(path, pino({ level: "silent" }))).toEqual([]);
  });

  it("persists records in the file and lists them newest first", async () => {
    const { logger } = capturingLogger();
    await appendJob(path, record(1), logger);
    await appendJob(path, record(2, { ok: false, code: "VERIFY_FAILED", message: "mismatch at 0x8000" }), logger);
    const onDisk = JSON.parse(await readFile(path, "utf8")) as { version: number; jobs: JobRecord[] };
    expect(onDisk.version).toBe(1);
    expect(onDisk.jobs.map((j) => j.id)).toEqual([record(1).id, record(2).id]);
    expect(listJobs(path, logger)).toEqual([record(2, { ok: false, code: "VERIFY_FAILED", message: "mismatch at 0x8000" }), record(1)]);
  });

  it("keeps only the newest 50", async () => {
    const { logger } = capturingLogger();
    for (let n = 0; n < 53; n++) await appendJob(path, record(n), logger);
    const jobs = listJobs(path, logger);
    expect(jobs).toHaveLength(50);
    expect(jobs[0]!.params).toEqual({ n: 52 });
    expect(jobs[49]!.params).toEqual({ n: 3 });
  });

  it("serialises concurrent appends in one process so none is lost", async () => {
    const { logger } = capturingLogger();
    await Promise.all([1, 2, 3, 4, 5].map((n) => appendJob(path, record(n), logger)));
    expect(listJobs(path, logger).map((j) => j.params)).toEqual([{ n: 5 }, { n: 4 }, { n: 3 }, { n: 2 }, { n: 1 }]);
  });

  it.each([
    ["not JSON", "{ truncated"],
    ["a wrong shape", JSON.stringify({ version: 1, jobs: [{ id: 3 }] })],
    ["an unknown error code", JSON.stringify({ version: 1, jobs: [{ ...record(1), ok: false, code: "NOPE" }] })],
  ])("moves a corrupt file (%s) aside, logs it and carries on", async (_name, content) => {
    await appendJob(path, record(0), pino({ level: "silent" }));
    await writeFile(path, content);
    const { logger, lines } = capturingLogger();
    expect(listJobs(path, logger)).toEqual([]);
    const files = await readdir(join(dir, "moonflash"));
    const aside = files.find((f) => f.startsWith("history.json.corrupt-"));
    expect(aside).toMatch(/^history\.json\.corrupt-\d{8}T\d{9}Z$/);
    await expect(readFile(join(dir, "moonflash", aside!), "utf8")).resolves.toBe(content);
    expect(lines).toContainEqual(expect.objectContaining({ level: 40, msg: expect.stringContaining("corrupt"), movedTo: join(dir, "moonflash", aside!) }));

    await appendJob(path, record(7), logger);
    expect(listJobs(path, logger)).toEqual([record(7)]);
  });
});
