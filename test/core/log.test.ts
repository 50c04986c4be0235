import { mkdtemp, readdir, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { closeLogger, createLogger } from "../../src/core/log.js";

describe("createLogger", () => {
  let dataDir: string;
  beforeEach(async () => {
    dataDir = await mkdtemp(join(tmpdir(), "moonflash-log-"));
  });
  afterEach(async () => {
    await rm(dataDir, { recursive: true, force: true });
  });

  it("writes JSON lines with an ISO 8601 time and the level as a label", async () => {
    const logger = createLogger({ dataDir, level: "info" });
    logger.info({ mcu: "mcu toolhead" }, "hello");
    logger.debug("below the level");
    await closeLogger(logger);
    const lines = (await readFile(join(dataDir, "logs", "moonflash.log"), "utf8")).trim().split("\n");
    expect(lines).toHaveLength(1);
    const entry = JSON.parse(lines[0]!) as Record<string, unknown>;
    expect(entry).toMatchObject({ level: "info", msg: "hello", mcu: "mcu toolhead", pid: process.pid });
    expect(entry.time).toMatch(/^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$/);
    expect(new Date(entry.time as string).toISOString()).toBe(entry.time);
  });

  it("rotates at the size limit and keeps only the configured number of old files", async () => {
    const logger = createLogger({ dataDir, level: "info", rotateSize: "1K", keep: 3 });
    const filler = "x".repeat(200);
    for (let i = 0; i < 60; i++) logger.info({ i, filler }, "line");
    await closeLogger(logger);
    const files = (await readdir(join(dataDir, "logs"))).sort();
    expect(files).toEqual(["moonflash.log", "moonflash.log.1", "moonflash.log.2", "moonflash.log.3"]);
    // Rotation moves whole lines: oldest kept file to live file is one unbroken run ending with the last line.
    const kept: number[] = [];
    for (const file of ["moonflash.log.3", "moonflash.log.2", "moonflash.log.1", "moonflash.log"]) {
      const text = await readFile(join(dataDir, "logs", file), "utf8");
      for (const line of text.split("\n").filter(Boolean)) kept.push((JSON.parse(line) as { i: number }).i);
    }
    expect(kept[kept.length - 1]).toBe(59);
    expect(kept[0]).toBeGreaterThan(0);
    expect(kept).toEqual(kept.map((_, k) => kept[0]! + k));
  });

  it("writes no file when file is false", async () => {
    const logger = createLogger({ dataDir, level: "silent", file: false });
    logger.error("nowhere");
    await closeLogger(logger);
    await expect(readdir(dataDir)).resolves.toEqual([]);
  });
});
