import { spawn, type ChildProcess } from "node:child_process";
import { once } from "node:events";
import { mkdtemp, readdir, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { pino } from "pino";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { acquireJobLock, readJobLock, type JobLockInfo } from "../../src/core/lock.js";
import { JobRunner } from "../../src/core/jobs.js";

const repoRoot = fileURLToPath(new URL("../../", import.meta.url));
const silent = pino({ level: "silent" });

function info(overrides: Partial<JobLockInfo> = {}): JobLockInfo {
  return { jobId: "flash-20261123T124500-ab12", kind: "flash", target: "mcu", pid: process.pid, startedAt: "2026-11-23T12:45:00.000Z", ...overrides };
}

/** A pid that surely belongs to no process: a child that has exited and been reaped. */
async function deadPid(): Promise<number> {
  const child = spawn(process.execPath, ["-e", ""], { stdio: "ignore" });
  await once(child, "exit");
  return child.pid!;
}

describe("acquireJobLock", () => {
  let dir: string;
  let lockPath: string;
  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), "moonflash-lock-"));
    lockPath = join(dir, "state", "job.lock");
  });
  afterEach(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it("writes the owner as JSON, leaves no temp files, and release removes it", async () => {
    const lock = await acquireJobLock(lockPath, info());
    await expect(readJobLock(lockPath)).resolves.toEqual(info());
    expect(await readdir(join(dir, "state"))).toEqual(["job.lock"]);
    await lock.release();
    await expect(readJobLock(lockPath)).resolves.toBeNull();
    await lock.release();
  });

  it("throws BUSY naming the holder while its process lives", async () => {
    const lock = await acquireJobLock(lockPath, info());
    await expect(acquireJobLock(lockPath, info({ jobId: "ota-20261123T130000-0000", kind: "ota", target: "klipper" }))).rejects.toMatchObject({
      code: "BUSY",
      message: `A flash job on mcu is running (pid ${process.pid}, since 2026-11-23T12:45:00.000Z); wait for it or cancel it`,
      details: info(),
    });
    await expect(readJobLock(lockPath)).resolves.toEqual(info());
    await lock.release();
  });

  it("takes over a lock whose process is dead", async () => {
    const pid = await deadPid();
    await acquireJobLock(lockPath, info({ pid, jobId: "flash-old" }));
    const lock = await acquireJobLock(lockPath, info());
    await expect(readJobLock(lockPath)).resolves.toEqual(info());
    await lock.release();
  });

  it.each([["garbage", "not json{"], ["empty", ""], ["wrong shape", JSON.stringify({ jobId: 1, pid: "x" })]])(
    "treats a %s lock file as stale",
    async (_name, content) => {
      await acquireJobLock(lockPath, info({ jobId: "setup" })).then((l) => l.release());
      await writeFile(lockPath, content);
      await expect(readJobLock(lockPath)).resolves.toBeNull();
      const lock = await acquireJobLock(lockPath, info());
      await expect(readJobLock(lockPath)).resolves.toEqual(info());
      await lock.release();
    },
  );

  it("release leaves a lock that another owner took meanwhile", async () => {
    const lock = await acquireJobLock(lockPath, info());
    const other = info({ jobId: "flash-other", pid: 1 });
    await writeFile(lockPath, JSON.stringify(other));
    await lock.release();
    await expect(readJobLock(lockPath)).resolves.toEqual(other);
  });
});

describe("job lock across processes", () => {
  let dataDir: string;
  let child: ChildProcess | undefined;
  beforeEach(async () => {
    dataDir = await mkdtemp(join(tmpdir(), "moonflash-xproc-"));
  });
  afterEach(async () => {
    if (child && child.exitCode === null && child.signalCode === null) {
      child.kill("SIGKILL");
      await once(child, "exit");
    }
    await rm(dataDir, { recursive: true, force: true });
  });

  it("gives BUSY naming the other process's job, then proceeds once that process is SIGKILLed", async () => {
    // The child is a second moonflash process (a CLI run) whose job never ends.
    const script = `
      const { JobRunner } = await import(${JSON.stringify(join(repoRoot, "src/core/jobs.ts"))});
      const { pino } = await import("pino");
      setInterval(() => {}, 60_000);
      const runner = new JobRunner({ dataDir: process.argv[1], logger: pino({ level: "silent" }) });
      await runner.run({ kind: "flash", target: "mcu toolhead" }, async (ctx) => {
        process.stdout.write("running " + ctx.jobId + "\\n");
        await new Promise(() => {});
      });
    `;
    child = spawn(process.execPath, ["--import", "tsx", "--input-type=module", "-e", script, dataDir], {
      cwd: repoRoot,
      stdio: ["ignore", "pipe", "inherit"],
    });
    const childJobId = await new Promise<string>((resolve, reject) => {
      let out = "";
      child!.stdout!.on("data", (chunk: Buffer) => {
        out += chunk.toString();
        const match = /running (\S+)\n/.exec(out);
        if (match) resolve(match[1]!);
      });
      child!.once("exit", (code) => reject(new Error(`child exited early (${code})`)));
    });

    const runner = new JobRunner({ dataDir, logger: silent });
    let ran = false;
    const work = async () => {
      ran = true;
      return "done";
    };
    await expect(runner.run({ kind: "ota", target: "klipper" }, work)).rejects.toMatchObject({
      code: "BUSY",
      message: expect.stringMatching(new RegExp(`^A flash job on mcu toolhead is running \\(pid ${child.pid}, since `)),
      details: { jobId: childJobId, pid: child.pid, kind: "flash", target: "mcu toolhead" },
    });
    expect(ran).toBe(false);
    expect(runner.current()).toBeNull();

    child.kill("SIGKILL");
    await once(child, "exit");
    await expect(runner.run({ kind: "ota", target: "klipper" }, work)).resolves.toBe("done");
    expect(ran).toBe(true);
    await expect(readJobLock(join(dataDir, "moonflash", "job.lock"))).resolves.toBeNull();
  });
});
