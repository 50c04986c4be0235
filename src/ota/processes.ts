// Stopping a process a package names (manifest `process`: a pidfile or an exact name), for processes that are not
// a service Moonraker manages. SIGTERM, up to 10 s for it to exit, then SIGKILL; "exited" is judged through /proc:
// the pid is gone, a zombie, or now belongs to another process. A pid is identified by its start time
// (/proc/<pid>/stat field 22, in clock ticks since boot), captured before any signal, so a pid the kernel handed
// to a new process meanwhile is neither signalled nor mistaken for the one that would not stop.
//
// There is no start here: the manifest's process entry has no start command, so processes are restarted by
// whatever supervises them (or not at all); services go through Moonraker (engine.ts).
//
// Messages do not say what the update did: a stop can fail after earlier modules were deployed. The engine adds
// that (its rollback appends "The update was rolled back; ...").

import { readdir, readFile } from "node:fs/promises";
import { basename } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { MoonflashError } from "../core/errors.js";
import type { ProcessRef } from "./manifest.js";

export interface ProcessInfo {
  pid: number;
  /** /proc/<pid>/stat field 22: clock ticks after boot when it started; with the pid, the process's identity. */
  startTime: string;
  /** /proc/<pid>/comm (the kernel truncates it to 15 characters). */
  comm: string;
  /** /proc/<pid>/cmdline split on NUL; empty for kernel threads. */
  argv: string[];
}

export interface StopOptions {
  /** How long SIGTERM gets before SIGKILL. Default 10 000 ms. */
  termTimeoutMs?: number;
  /** How long the process may take to vanish after SIGKILL before PROCESS_STOP_FAILED. Default 5000 ms. */
  killTimeoutMs?: number;
  /** How often /proc is looked at. Default 50 ms. */
  pollMs?: number;
  /** /proc, for tests. */
  procRoot?: string;
}

export interface StopResult {
  pid: number;
  comm: string;
  /** How it ended: it had already gone (or its pid was reused), SIGTERM sufficed, or SIGKILL was needed. */
  outcome: "already-gone" | "terminated" | "killed";
  durationMs: number;
}

export const STOP_DEFAULTS = { termTimeoutMs: 10_000, killTimeoutMs: 5_000, pollMs: 50 } as const;

/** The fields of /proc/<pid>/stat after "(comm)": field 3 (state) is index 0, field 22 (starttime) index 19. */
function statFields(text: string): string[] | null {
  // comm may hold spaces and parentheses: it ends at the last ')'.
  const close = text.lastIndexOf(")");
  if (close < 0) return null;
  return text.slice(close + 2).trim().split(" ");
}

/** The process with this pid now, or null when there is none (or only a zombie left). */
export async function readProcess(pid: number, procRoot = "/proc"): Promise<ProcessInfo | null> {
  let stat: string;
  let comm: string;
  let cmdline: string;
  try {
    [stat, comm, cmdline] = await Promise.all([
      readFile(`${procRoot}/${pid}/stat`, "utf8"),
      readFile(`${procRoot}/${pid}/comm`, "utf8"),
      readFile(`${procRoot}/${pid}/cmdline`, "utf8"),
    ]);
  } catch (err) {
    const errno = (err as NodeJS.ErrnoException).code;
    if (errno === "ENOENT" || errno === "ESRCH") return null;
    throw err;
  }
  const fields = statFields(stat);
  const state = fields?.[0];
  const startTime = fields?.[19];
  if (!state || !startTime) return null;
  // A zombie has exited; only its parent's wait() is missing. X: dead.
  if (state === "Z" || state === "X") return null;
  return { pid, startTime, comm: comm.replace(/\n$/, ""), argv: cmdline.split("\0").filter((arg, i, all) => arg !== "" || i < all.length - 1) };
}

/** Whether `info`'s process still runs: same pid and same start time, not a zombie. */
export async function isRunning(info: Pick<ProcessInfo, "pid" | "startTime">, procRoot = "/proc"): Promise<boolean> {
  const now = await readProcess(info.pid, procRoot);
  return now !== null && now.startTime === info.startTime;
}

/** Whether a process is `name`: its comm, or the base name of its argv[0] (comm is cut at 15 characters). */
function hasName(info: ProcessInfo, name: string): boolean {
  const argv0 = info.argv[0];
  return info.comm === name || (argv0 !== undefined && basename(argv0) === name);
}

/**
 * The running processes a manifest's process entry names: the pid in the pidfile (none when the file is missing,
 * empty or names a pid that is not running: a stale pidfile), or every process of that exact name. Kernel threads
 * and this process never match.
 */
export async function findProcesses(ref: ProcessRef, procRoot = "/proc"): Promise<ProcessInfo[]> {
  if ("pidfile" in ref) {
    let text: string;
    try {
      text = await readFile(ref.pidfile, "utf8");
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return [];
      throw new MoonflashError("PERMISSION_DENIED", `moonflash cannot read the pidfile ${ref.pidfile}: ${(err as Error).message}.`, { pidfile: ref.pidfile }, { cause: err });
    }
    const pid = /^\s*(\d{1,10})\s*$/.exec(text)?.[1];
    if (pid === undefined || Number(pid) <= 0 || Number(pid) === process.pid) return [];
    const info = await readProcess(Number(pid), procRoot);
    return info ? [info] : [];
  }
  const found: ProcessInfo[] = [];
  for (const entry of await readdir(procRoot)) {
    if (!/^\d+$/.test(entry)) continue;
    const pid = Number(entry);
    if (pid === process.pid) continue;
    let info: ProcessInfo | null;
    try {
      info = await readProcess(pid, procRoot);
    } catch {
      continue; // another user's process we may not read, or one that just went away
    }
    if (info && info.argv.length > 0 && hasName(info, ref.name)) found.push(info);
  }
  return found;
}

/** A short name for a process reference, for messages: "pidfile /run/x.pid" or "process 'x'". */
export function describeRef(ref: ProcessRef): string {
  return "pidfile" in ref ? `the process in ${ref.pidfile}` : `process '${ref.name}'`;
}

function signal(info: ProcessInfo, sig: NodeJS.Signals): void {
  try {
    process.kill(info.pid, sig);
  } catch (err) {
    const errno = (err as NodeJS.ErrnoException).code;
    if (errno === "ESRCH") return; // gone between the check and the signal
    throw new MoonflashError(
      "PROCESS_STOP_FAILED",
      `moonflash may not signal ${info.comm} (pid ${info.pid}): ${errno ?? String(err)}. It runs as another user; stop it by hand or run moonflash as its user, then install the update again.`,
      { pid: info.pid, comm: info.comm, signal: sig, errno },
      { cause: err },
    );
  }
}

/** Polls until the process is gone (or its pid reused) or `ms` pass; true when gone. */
async function waitGone(info: ProcessInfo, ms: number, pollMs: number, procRoot: string): Promise<boolean> {
  const deadline = Date.now() + ms;
  for (;;) {
    if (!(await isRunning(info, procRoot))) return true;
    if (Date.now() >= deadline) return false;
    await sleep(Math.min(pollMs, Math.max(1, deadline - Date.now())));
  }
}

/**
 * Stops one process: SIGTERM, then SIGKILL after termTimeoutMs. Never signals a pid whose start time differs from
 * `info`'s (the process ended and the pid was reused). PROCESS_STOP_FAILED when it survives SIGKILL or may not be
 * signalled.
 */
export async function stopProcess(info: ProcessInfo, opts: StopOptions = {}): Promise<StopResult> {
  const termTimeoutMs = opts.termTimeoutMs ?? STOP_DEFAULTS.termTimeoutMs;
  const killTimeoutMs = opts.killTimeoutMs ?? STOP_DEFAULTS.killTimeoutMs;
  const pollMs = opts.pollMs ?? STOP_DEFAULTS.pollMs;
  const procRoot = opts.procRoot ?? "/proc";
  const started = Date.now();
  const result = (outcome: StopResult["outcome"]): StopResult => ({ pid: info.pid, comm: info.comm, outcome, durationMs: Date.now() - started });

  if (!(await isRunning(info, procRoot))) return result("already-gone");
  signal(info, "SIGTERM");
  if (await waitGone(info, termTimeoutMs, pollMs, procRoot)) return result("terminated");
  // Checked again right before: between the last look and now the pid may have been reused.
  if (!(await isRunning(info, procRoot))) return result("terminated");
  signal(info, "SIGKILL");
  if (await waitGone(info, killTimeoutMs, pollMs, procRoot)) return result("killed");
  throw new MoonflashError(
    "PROCESS_STOP_FAILED",
    `${info.comm} (pid ${info.pid}) did not stop after SIGTERM and, ${Math.round(termTimeoutMs / 100) / 10} s later, SIGKILL ` +
      "(it may hang in the kernel, e.g. on a device or a network mount). Stop it by hand, then install the update again.",
    { pid: info.pid, comm: info.comm, startTime: info.startTime, termTimeoutMs, killTimeoutMs },
  );
}

/** Stops every process `ref` names (none running is fine: nothing to stop). */
export async function stopProcesses(ref: ProcessRef, opts: StopOptions = {}): Promise<StopResult[]> {
  const found = await findProcesses(ref, opts.procRoot);
  return Promise.all(found.map((info) => stopProcess(info, opts)));
}
