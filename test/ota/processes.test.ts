// Stopping the processes a package names, with real child processes: SIGTERM that works, SIGTERM ignored (SIGKILL,
// reported), a pid the kernel gave to another process meanwhile (never signalled), pidfiles that are missing,
// stale or garbage, lookup by exact name, and the failures (a process that outlives SIGKILL as /proc tells, one of
// another user).

import { spawn, type ChildProcess } from "node:child_process";
import { once } from "node:events";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { execa } from "execa";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { isMoonflashError } from "../../src/core/errors.js";
import { findProcesses, isRunning, readProcess, stopProcess, stopProcesses } from "../../src/ota/processes.js";
import { REPO } from "./support/run-driver.js";

let dir: string;
const children: ChildProcess[] = [];

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), "moonflash-ota-proc-"));
});
afterEach(async () => {
  for (const child of children.splice(0)) if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
  await rm(dir, { recursive: true, force: true });
});

/** A node child that handles SIGTERM as told and says "ready" once the handler is installed. */
async function nodeChild(onTerm: "exit" | "ignore"): Promise<ChildProcess> {
  const script =
    onTerm === "exit"
      ? "process.on('SIGTERM', () => process.exit(0)); setInterval(() => {}, 1000); console.log('ready');"
      : "process.on('SIGTERM', () => console.log('ignored')); setInterval(() => {}, 1000); console.log('ready');";
  const child = spawn(process.execPath, ["-e", script], { stdio: ["ignore", "pipe", "inherit"] });
  children.push(child);
  await new Promise<void>((resolve, reject) => {
    child.stdout!.on("data", (chunk: Buffer) => chunk.toString().includes("ready") && resolve());
    child.once("exit", () => reject(new Error("child exited before it was ready")));
  });
  return child;
}

const exited = (child: ChildProcess) =>
  child.exitCode !== null || child.signalCode !== null ? Promise.resolve() : once(child, "exit").then(() => undefined);

describe("stopProcess", () => {
  it("stops a process that exits on SIGTERM: outcome terminated, no SIGKILL", async () => {
    const child = await nodeChild("exit");
    await writeFile(join(dir, "app.pid"), `${child.pid}\n`);
    const [info] = await findProcesses({ pidfile: join(dir, "app.pid") });
    expect(info).toMatchObject({ pid: child.pid, comm: "node" });
    const result = await stopProcess(info!, { termTimeoutMs: 5000 });
    expect(result.outcome).toBe("terminated");
    await exited(child);
    expect({ code: child.exitCode, signal: child.signalCode }).toEqual({ code: 0, signal: null });
    expect(await isRunning(info!)).toBe(false);
  });

  it("kills a process that ignores SIGTERM with SIGKILL after the grace time and reports it as killed", async () => {
    const child = await nodeChild("ignore");
    let sawTerm = false;
    child.stdout!.on("data", (chunk: Buffer) => (sawTerm ||= chunk.toString().includes("ignored")));
    const info = (await readProcess(child.pid!))!;
    const started = Date.now();
    const result = await stopProcess(info, { termTimeoutMs: 400 });
    expect(result).toMatchObject({ pid: child.pid, outcome: "killed" });
    expect(Date.now() - started).toBeGreaterThanOrEqual(400);
    await exited(child);
    expect(child.signalCode).toBe("SIGKILL");
    expect(sawTerm).toBe(true);
  });

  it("never signals a pid whose start time differs from the one captured (the process ended, the pid was reused)", async () => {
    const child = await nodeChild("exit");
    const info = (await readProcess(child.pid!))!;
    // The same pid, but as if captured from the process that had it before.
    const stale = { ...info, startTime: String(Number(info.startTime) - 1) };
    expect(await isRunning(stale)).toBe(false);
    expect((await stopProcess(stale, { termTimeoutMs: 200 })).outcome).toBe("already-gone");
    expect(child.exitCode).toBeNull();
    expect(await isRunning(info)).toBe(true);
  });

  it("tells a really reused pid apart: a new process that got the old pid (via ns_last_pid) is left alone", async () => {
    const first = spawn("sleep", ["30"]);
    const info = (await readProcess(first.pid!))!;
    first.kill("SIGKILL");
    await exited(first);
    // /proc's start time counts clock ticks (10 ms): a pid reused within the same tick looks the same, so the new
    // process starts a few ticks later, as any real reuse does (the pid space must wrap around first).
    await new Promise((resolve) => setTimeout(resolve, 50));
    // Ask the kernel for that pid again: the next process created gets ns_last_pid + 1 (other processes may race).
    let second: ChildProcess | null = null;
    for (let attempt = 0; attempt < 50 && !second; attempt++) {
      await writeFile("/proc/sys/kernel/ns_last_pid", String(info.pid - 1));
      const candidate = spawn("sleep", ["30"]);
      children.push(candidate);
      if (candidate.pid === info.pid) second = candidate;
      else candidate.kill("SIGKILL");
    }
    expect(second, "the kernel gave the pid to a new process").not.toBeNull();
    const now = (await readProcess(info.pid))!;
    expect(now.startTime).not.toBe(info.startTime);
    expect((await stopProcess(info, { termTimeoutMs: 200 })).outcome).toBe("already-gone");
    expect(second!.exitCode).toBeNull();
    expect(await isRunning(now)).toBe(true);
  });

  it("reads the start time from field 22 of /proc/<pid>/stat, even when the command name has spaces and parentheses", async () => {
    const fakeProc = join(dir, "proc");
    await mkdir(join(fakeProc, "4242"), { recursive: true });
    // Fields 3..22 after "(comm)": state R, then 18 numbers, the 20th after comm being the start time.
    const after = ["R", ...Array.from({ length: 18 }, (_, i) => String(i + 4)), "987654", "23", "24"];
    await writeFile(join(fakeProc, "4242", "stat"), `4242 (evil) (name ) ${after.join(" ")}\n`);
    await writeFile(join(fakeProc, "4242", "comm"), "evil) (name \n");
    await writeFile(join(fakeProc, "4242", "cmdline"), "/opt/evil\0--flag\0");
    expect(await readProcess(4242, fakeProc)).toEqual({ pid: 4242, startTime: "987654", comm: "evil) (name ", argv: ["/opt/evil", "--flag"] });
    await writeFile(join(fakeProc, "4242", "stat"), `4242 (zombie) Z ${after.slice(1).join(" ")}\n`);
    expect(await readProcess(4242, fakeProc)).toBeNull();
  });

  it("fails with PROCESS_STOP_FAILED when /proc still shows the process after SIGKILL (a /proc shim stands in for a process stuck in the kernel)", async () => {
    const child = await nodeChild("ignore");
    const info = (await readProcess(child.pid!))!;
    // A copy of its /proc entry that never changes: to stopProcess it looks as if the process outlived SIGKILL.
    const fakeProc = join(dir, "proc");
    await mkdir(join(fakeProc, String(info.pid)), { recursive: true });
    for (const name of ["stat", "comm", "cmdline"]) {
      await writeFile(join(fakeProc, String(info.pid), name), await readFile(`/proc/${info.pid}/${name}`));
    }
    const err = await stopProcess(info, { termTimeoutMs: 200, killTimeoutMs: 300, procRoot: fakeProc }).catch((e: unknown) => e);
    expect(isMoonflashError(err) && err.code).toBe("PROCESS_STOP_FAILED");
    expect((err as Error).message).toMatch(new RegExp(`node \\(pid ${info.pid}\\) did not stop after SIGTERM and, 0\\.2 s later, SIGKILL .*\\. Stop it by hand, then install the update again\\.$`));
    await exited(child);
    expect(child.signalCode).toBe("SIGKILL");
  });

  it("fails with PROCESS_STOP_FAILED when the process belongs to another user (moonflash runs as uid 65534 here)", async () => {
    const child = await nodeChild("ignore");
    const script = [
      `import { readProcess, stopProcess } from ${JSON.stringify(join(REPO, "src/ota/processes.ts"))};`,
      `const info = await readProcess(${child.pid});`,
      "try { await stopProcess(info, { termTimeoutMs: 100 }); console.log('stopped'); }",
      "catch (err) { console.log(JSON.stringify({ code: err.code, message: err.message })); }",
    ].join("\n");
    const run = await execa(process.execPath, ["--import", "tsx", "--input-type=module", "-e", script], {
      cwd: REPO, uid: 65534, gid: 65534, env: { HOME: "/tmp" }, reject: false, timeout: 20_000,
    });
    expect(JSON.parse(run.stdout.trim().split("\n").pop() ?? "{}")).toMatchObject({
      code: "PROCESS_STOP_FAILED",
      message: expect.stringMatching(/may not signal node \(pid \d+\): EPERM/) as unknown as string,
    });
    expect(child.exitCode).toBeNull();
    expect(child.signalCode).toBeNull();
  });
});

describe("findProcesses", () => {
  it("finds nothing to stop for a missing, empty or garbage pidfile", async () => {
    expect(await findProcesses({ pidfile: join(dir, "missing.pid") })).toEqual([]);
    await writeFile(join(dir, "empty.pid"), "");
    expect(await findProcesses({ pidfile: join(dir, "empty.pid") })).toEqual([]);
    await writeFile(join(dir, "garbage.pid"), "12ab\n");
    expect(await findProcesses({ pidfile: join(dir, "garbage.pid") })).toEqual([]);
    expect(await stopProcesses({ pidfile: join(dir, "missing.pid") })).toEqual([]);
  });

  it("treats a stale pidfile (its process has exited) as nothing running", async () => {
    const child = spawn("sleep", ["30"]);
    const pid = child.pid!;
    child.kill("SIGKILL");
    await exited(child);
    await writeFile(join(dir, "stale.pid"), String(pid));
    expect(await findProcesses({ pidfile: join(dir, "stale.pid") })).toEqual([]);
  });

  it("finds processes by exact name (argv[0]'s base name or comm), not by a prefix or a substring", async () => {
    const name = `mf-sleeper-${process.pid}`;
    const a = spawn("sleep", ["30"], { argv0: `/opt/bin/${name}` });
    const b = spawn("sleep", ["30"], { argv0: name });
    const other = spawn("sleep", ["30"], { argv0: `${name}-2` });
    children.push(a, b, other);
    await new Promise((r) => setTimeout(r, 100));
    const found = await findProcesses({ name });
    expect(found.map((p) => p.pid).sort()).toEqual([a.pid, b.pid].sort());
    const results = await stopProcesses({ name }, { termTimeoutMs: 2000 });
    expect(results.map((r) => r.outcome)).toEqual(["terminated", "terminated"]);
    await Promise.all([exited(a), exited(b)]);
    expect(other.exitCode).toBeNull();
    expect(other.signalCode).toBeNull();
  });
});
