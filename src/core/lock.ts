// Cross-process job lock: one flash or OTA job at a time, whether started by the service or a CLI run.
// The lock file holds the owner's JSON; a lock whose pid is gone (or whose file is garbage) is stale.

import { link, mkdir, open, readFile, rm } from "node:fs/promises";
import { dirname, join, basename } from "node:path";
import { MoonflashError, toMoonflashError } from "./errors.js";
import { fsyncDir, removeDurable } from "./durable.js";
import type { JobKind } from "./events.js";
// node:crypto is loaded on first use (process.getBuiltinModule), not when the agent starts: idle memory.

export interface JobLockInfo {
  jobId: string;
  kind: JobKind;
  target: string;
  pid: number;
  /** ISO 8601. */
  startedAt: string;
}

export interface JobLock {
  readonly path: string;
  readonly info: JobLockInfo;
  /** Removes the lock file (durably) if it is still ours. Safe to call twice. */
  release(): Promise<void>;
}

function parseLockInfo(text: string): JobLockInfo | null {
  try {
    const data = JSON.parse(text) as Partial<JobLockInfo> | null;
    if (
      data &&
      typeof data.jobId === "string" &&
      (data.kind === "flash" || data.kind === "ota") &&
      typeof data.target === "string" &&
      Number.isSafeInteger(data.pid) &&
      (data.pid as number) > 0 &&
      typeof data.startedAt === "string"
    ) {
      return { jobId: data.jobId, kind: data.kind, target: data.target, pid: data.pid as number, startedAt: data.startedAt };
    }
  } catch {
    // Falls through: garbage is reported as null like any other unusable content.
  }
  return null;
}

/** Whether a process exists; EPERM means it exists but belongs to another user. */
export function isProcessAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

/** The lock's owner, or null when there is no lock or its content is unusable. */
export async function readJobLock(path: string): Promise<JobLockInfo | null> {
  try {
    return parseLockInfo(await readFile(path, "utf8"));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return null;
    throw toMoonflashError(err);
  }
}

/** Removes a lock whose owner process is gone (a job killed with the agent); returns what it held, or null. */
export async function clearStaleJobLock(path: string): Promise<JobLockInfo | null> {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return null;
    throw toMoonflashError(err);
  }
  const owner = parseLockInfo(text);
  if (owner && (owner.pid === process.pid || isProcessAlive(owner.pid))) return null;
  // Only what was judged: a lock a new job took meanwhile survives.
  if ((await readFile(path, "utf8").catch(() => null)) !== text) return null;
  await removeDurable(path);
  return owner;
}

export function busyError(info: JobLockInfo): MoonflashError {
  return new MoonflashError(
    "BUSY",
    // The job id stays in details (and logs): a console reader knows the job by what it acts on.
    `${info.kind === "ota" ? "An OTA" : "A flash"} job on ${info.target} is running (pid ${info.pid}, since ${info.startedAt}); wait for it or cancel it`,
    { ...info },
  );
}

/**
 * Creates the lock file atomically. The JSON is written and fsynced to a private temp file first and then
 * hard-linked into place (link fails with EEXIST like open "wx"), so no other process can ever read a
 * half-written lock and mistake it for garbage.
 */
async function tryCreate(path: string, info: JobLockInfo): Promise<boolean> {
  const dir = dirname(path);
  const tmp = join(dir, `.${basename(path)}.${process.pid}.${process.getBuiltinModule("node:crypto").randomBytes(4).toString("hex")}.tmp`);
  const handle = await open(tmp, "wx", 0o644);
  try {
    await handle.writeFile(JSON.stringify(info) + "\n");
    await handle.sync();
  } finally {
    await handle.close();
  }
  try {
    await link(tmp, path);
    await fsyncDir(dir);
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "EEXIST") return false;
    throw err;
  } finally {
    await rm(tmp, { force: true });
  }
}

/** Takes the job lock or throws BUSY naming the running job. A stale lock is removed and taken once. */
export async function acquireJobLock(path: string, info: JobLockInfo): Promise<JobLock> {
  try {
    await mkdir(dirname(path), { recursive: true });
    for (let attempt = 0; attempt < 2; attempt++) {
      if (await tryCreate(path, info)) return makeLock(path, info);
      let text: string;
      try {
        text = await readFile(path, "utf8");
      } catch (err) {
        // Released between our link and our read: simply try again.
        if ((err as NodeJS.ErrnoException).code === "ENOENT") continue;
        throw err;
      }
      const owner = parseLockInfo(text);
      if (owner && isProcessAlive(owner.pid)) throw busyError(owner);
      // Stale. Remove it only if it still holds what we judged, so a fresh lock taken meanwhile survives.
      const again = await readFile(path, "utf8").catch(() => null);
      if (again === text) await removeDurable(path);
    }
    const owner = await readJobLock(path);
    if (owner) throw busyError(owner);
    throw new MoonflashError(
      "INTERNAL",
      `Could not take the job lock ${path}: it keeps reappearing with unreadable content. Stop other moonflash processes, then delete it.`,
      { path },
    );
  } catch (err) {
    throw toMoonflashError(err);
  }
}

function makeLock(path: string, info: JobLockInfo): JobLock {
  let released = false;
  return {
    path,
    info,
    async release() {
      if (released) return;
      released = true;
      // Only our own lock is removed; a lock someone else took after ours was judged stale stays.
      const owner = await readJobLock(path).catch(() => null);
      if (owner && owner.jobId === info.jobId && owner.pid === info.pid) await removeDurable(path);
    },
  };
}
