// The OTA engine's durable state: <data>/moonflash/ota/state.json, written with writeFileDurable (temp file, fsync,
// rename, fsync the directory) before every action it announces, so a restart always knows what was under way.
//
//   downloading → downloaded → verified → backing_up → deploying (module k/n, file i) → restarting → probation
//     → committed
//   any of backing_up … probation → rolling_back → rolled_back (also ota.rollback after a commit)
//
// How an update ends when it does not commit:
// - Refused before any change (printing, no room, min_version, a cancel in the preparation): stays `verified`
//   (`downloaded` when its check was cancelled or [ota] public_key was unreadable), with `error`; install again.
// - `failed`, nothing on the printer changed: the download failed or was cancelled, the package failed a check,
//   recovery gave up on a crash loop before the deploy began, or a damaged state file left nothing to restore.
//   Next: ota.download (a download's part is resumed).
// - `rolled_back`: a failure after the backup began, an interrupted install (recovery) or ota.rollback; the old
//   version is in place. Next: fix the cause in `error`, then download and install again.
// - A rollback that itself fails stays `rolling_back`; it is finished at the next start or by ota.rollback.
// - `failed` with `deployStarted`: recovery gave up on a crash loop mid-deploy; files may be mixed and services
//   stay stopped. ota.download and ota.install answer BUSY until ota.rollback restores the backup.
//
// A state file that cannot be read or breaks the schema is moved aside (state.json.corrupt-<time>) and recovery
// goes on from the backups (engine.ts). Every transition counts as a save of the update; recovery gives up on an
// update after a bounded number of them (Mender's kMaxStateDataStoreCount = 28), so a crash loop cannot run forever.
// Progress inside a state (the next file of a module) is saved too, but does not count.
//
// Crash points: MOONFLASH_OTA_CRASH_AT=<point> (and MOONFLASH_OTA_CRASH_AFTER=<n>, the n-th hit, default 1) makes
// the process SIGKILL itself at that point: right after the state it names was saved, or at the step it names. Only
// the crash-matrix tests set it.

import { readdir, readFile, rename, rm } from "node:fs/promises";
import { dirname, join } from "node:path";
import * as z from "zod/mini";
import "../core/zod.js";
import { fsyncDir, writeFileDurable, type DurableWriteSteps } from "../core/durable.js";
import { ERROR_CODES, MoonflashError, type ErrorCode } from "../core/errors.js";

/** The states of one update, in the order a successful one passes them. */
export const OTA_STATES = [
  "downloading",
  "downloaded",
  "verified",
  "backing_up",
  "deploying",
  "restarting",
  "probation",
  "committed",
  "rolling_back",
  "rolled_back",
  "failed",
] as const;
export type OtaStateName = (typeof OTA_STATES)[number];

/** States in which target files, services or firmware may differ from both the old and the new version. */
export const DEPLOY_STATES: ReadonlySet<OtaStateName> = new Set(["backing_up", "deploying", "restarting", "probation", "rolling_back"]);

/** Transition saves of one update before recovery stops retrying it (Mender's limit). */
export const DEFAULT_MAX_STATE_SAVES = 28;

/** A unit the engine stopped and has to start again (saved before it is stopped). */
export type StoppedUnit = { kind: "service"; name: string } | { kind: "process"; name: string; pids: number[] };

export interface FirmwareRecord {
  mcu: string;
  module: string;
  /** flashing: the flash was started (the board may hold either image); flashed: the port reported success. */
  status: "flashing" | "flashed" | "rolling-back" | "rolled-back";
}

export interface StateError {
  code: ErrorCode;
  message: string;
}

export interface OtaState {
  format: 1;
  /** ota-<UTC time>-<hex>: names the download, the staging and the backup directory of this update. */
  updateId: string;
  state: OtaStateName;
  /** Transition saves of this update (not progress saves). */
  saves: number;
  /** Every transition, oldest first (at most HISTORY_KEPT): the state chain the tests and `status` show. */
  history: Array<{ state: OtaStateName; at: string; pid: number }>;
  /** The job running this update, so that recovery can record it as INTERRUPTED. Cleared when a job ends. */
  job: { id: string; target: string; startedAt: string } | null;
  download: { url: string; md5: string; sha256: string | null; size: number | null } | null;
  package: {
    path: string;
    md5: string | null;
    sha256: string | null;
    size: number | null;
    name: string | null;
    version: string | null;
    modules: number | null;
    files: number | null;
  } | null;
  /** Where a deploy is: module k (1-based) of n, file i (1-based, 0 = before the first) of the module's m. */
  progress: { module: number; modules: number; moduleId: string; file: number; files: number; step: string } | null;
  /** Set (and saved) before the first target file is touched. */
  deployStarted: boolean;
  stopped: StoppedUnit[];
  firmware: FirmwareRecord[];
  /** Why the update is being (or was) rolled back. */
  rollbackReason: StateError | null;
  /** The last failure of this update (also kept after a rollback). */
  error: StateError | null;
  updatedAt: string;
}

const HISTORY_KEPT = 64;

const errorCode = z.string().check(
  z.refine((code) => Object.hasOwn(ERROR_CODES, code), "expected a moonflash error code"),
);
const stateError = z.nullable(z.object({ code: errorCode, message: z.string() }));
const int = z.int().check(z.nonnegative());

const stateSchema = z.object({
  format: z.literal(1),
  updateId: z.string().check(z.regex(/^[A-Za-z0-9._-]{1,100}$/)),
  state: z.enum(OTA_STATES),
  saves: int,
  history: z.array(z.object({ state: z.enum(OTA_STATES), at: z.string(), pid: int })),
  job: z.nullable(z.object({ id: z.string(), target: z.string(), startedAt: z.string() })),
  download: z.nullable(z.object({ url: z.string(), md5: z.string(), sha256: z.nullable(z.string()), size: z.nullable(int) })),
  package: z.nullable(
    z.object({
      path: z.string(),
      md5: z.nullable(z.string()),
      sha256: z.nullable(z.string()),
      size: z.nullable(int),
      name: z.nullable(z.string()),
      version: z.nullable(z.string()),
      modules: z.nullable(int),
      files: z.nullable(int),
    }),
  ),
  progress: z.nullable(
    z.object({ module: int, modules: int, moduleId: z.string(), file: int, files: int, step: z.string() }),
  ),
  deployStarted: z.boolean(),
  stopped: z.array(
    z.union([
      z.object({ kind: z.literal("service"), name: z.string() }),
      z.object({ kind: z.literal("process"), name: z.string(), pids: z.array(int) }),
    ]),
  ),
  firmware: z.array(
    z.object({ mcu: z.string(), module: z.string(), status: z.enum(["flashing", "flashed", "rolling-back", "rolled-back"]) }),
  ),
  rollbackReason: stateError,
  error: stateError,
  updatedAt: z.string(),
});

/** A fresh state record for a new update (not saved). */
export function newState(updateId: string, state: OtaStateName, now: Date): OtaState {
  return {
    format: 1,
    updateId,
    state,
    saves: 0,
    history: [],
    job: null,
    download: null,
    package: null,
    progress: null,
    deployStarted: false,
    stopped: [],
    firmware: [],
    rollbackReason: null,
    error: null,
    updatedAt: now.toISOString(),
  };
}

function compactUtc(date: Date): string {
  return date.toISOString().replace(/[-:]/g, "").replace(/\.\d+Z$/, "Z");
}

/** ota-20261123T124500123Z-ab12cd (UTC, milliseconds): sorts by start time. */
export function makeUpdateId(now: Date): string {
  const stamp = now.toISOString().replace(/[-:.]/g, "");
  return `ota-${stamp}-${process.getBuiltinModule("node:crypto").randomBytes(3).toString("hex")}`;
}

export interface LoadResult {
  state: OtaState | null;
  /** Where a damaged state file was moved, or null. */
  corrupt: string | null;
  /** Why it was judged damaged. */
  corruptReason: string | null;
}

/** state.json: load (moving a damaged one aside), and durable saves. Keeps the last loaded or saved state in memory. */
export class OtaStateStore {
  current: OtaState | null = null;
  private loaded = false;

  constructor(
    readonly path: string,
    private readonly now: () => Date = () => new Date(),
  ) {}

  get isLoaded(): boolean {
    return this.loaded;
  }

  /**
   * Reads state.json. A missing file is no update. An unreadable or invalid one is moved aside and reported
   * (recovery), or, with moveAside false, refused with INTERNAL (recovery at the next start deals with it).
   */
  async load(opts: { moveAside: boolean } = { moveAside: true }): Promise<LoadResult> {
    const damaged = (reason: string): Promise<LoadResult> => {
      if (opts.moveAside) return this.moveAside(reason);
      throw new MoonflashError("INTERNAL", `The OTA state file ${this.path} ${reason}; restart the agent, whose recovery moves it aside and restores what is needed.`, { path: this.path });
    };
    let text: string;
    try {
      text = await readFile(this.path, "utf8");
    } catch (err) {
      const errno = (err as NodeJS.ErrnoException).code;
      if (errno === "ENOENT") {
        this.current = null;
        this.loaded = true;
        return { state: null, corrupt: null, corruptReason: null };
      }
      if (errno === "EACCES" || errno === "EPERM") {
        throw new MoonflashError("PERMISSION_DENIED", `moonflash may not read its OTA state ${this.path}; fix its owner or mode.`, { path: this.path }, { cause: err });
      }
      return damaged(`cannot be read (${errno ?? String(err)})`);
    }
    let json: unknown;
    try {
      json = JSON.parse(text);
    } catch (err) {
      return damaged(`is not valid JSON (${(err as Error).message})`);
    }
    const parsed = stateSchema.safeParse(json);
    if (!parsed.success) {
      const issue = parsed.error.issues[0];
      return damaged(`breaks the state schema (${issue ? `${issue.path.join(".") || "state"}: ${issue.message}` : "unknown"})`);
    }
    this.current = parsed.data as OtaState;
    this.loaded = true;
    return { state: this.current, corrupt: null, corruptReason: null };
  }

  private async moveAside(reason: string): Promise<LoadResult> {
    const aside = `${this.path}.corrupt-${compactUtc(this.now())}`;
    await rename(this.path, aside);
    await fsyncDir(dirname(this.path));
    this.current = null;
    this.loaded = true;
    return { state: null, corrupt: aside, corruptReason: reason };
  }

  /** Enters `next`: counts the save, appends to the history, saves durably. */
  async transition(next: OtaStateName, patch: Partial<OtaState> = {}, base: OtaState | null = this.current): Promise<OtaState> {
    if (!base) throw new MoonflashError("INTERNAL", `OTA state transition to ${next} without an update`);
    const at = this.now();
    const history = [...base.history, { state: next, at: at.toISOString(), pid: process.pid }].slice(-HISTORY_KEPT);
    return this.write({ ...base, ...patch, state: next, saves: base.saves + 1, history, updatedAt: at.toISOString() }, TRANSITION_STEPS);
  }

  /** Saves a change within the current state (progress, a stopped unit, a firmware status). */
  async update(patch: Partial<OtaState>): Promise<OtaState> {
    if (!this.current) throw new MoonflashError("INTERNAL", "OTA state update without an update");
    return this.write({ ...this.current, ...patch, updatedAt: this.now().toISOString() });
  }

  private async write(state: OtaState, steps: DurableWriteSteps = {}): Promise<OtaState> {
    await writeFileDurable(this.path, `${JSON.stringify(state, null, 2)}\n`, 0o644, steps);
    this.current = state;
    this.loaded = true;
    return state;
  }

  /** Removes temp files a killed writeFileDurable left beside state.json. */
  async removeStaleTemps(): Promise<void> {
    const dir = dirname(this.path);
    let names: string[];
    try {
      names = await readdir(dir);
    } catch {
      return;
    }
    const prefix = `.${this.path.slice(dir.length + 1)}.`;
    await Promise.all(names.filter((n) => n.startsWith(prefix) && n.endsWith(".tmp")).map((n) => rm(join(dir, n), { force: true })));
  }
}

// --- crash points ---

/** Every place MOONFLASH_OTA_CRASH_AT may name: inside every transition's write, then in the order an update (then a rollback) reaches them. */
export const CRASH_POINTS = [
  /** A transition's state.json temp file was written and fsynced, before the rename (one hit per transition). */
  "state-temp-written",
  /** A transition's state.json was renamed into place, before its directory's fsync (one hit per transition). */
  "state-renamed",
  /** downloading saved, before the first request. */
  "download-started",
  /** Bytes of the package arrived (each progress report with bytes is a hit). */
  "download-partial",
  /** downloaded saved, before verification. */
  "downloaded",
  /** verified saved. */
  "verified",
  /** The package was extracted to the staging directory; nothing saved or touched yet. */
  "staged",
  /** backing_up saved, before the first copy. */
  "backing-up",
  /** One existing target was copied to the backup (one hit per file). */
  "backup-file",
  /** The backup manifest was written, before deploying is saved. */
  "backed-up",
  /** deploying saved for a module, before its service or process is stopped (one hit per module). */
  "deploying",
  /** A module's service or process was stopped (one hit per unit). */
  "service-stopped",
  /** A file's temp copy was written and fsynced in the target directory, before the rename (one hit per file). */
  "deploy-temp-written",
  /** A file was renamed into place and its directory fsynced, before the next save (one hit per file). */
  "deploy-renamed",
  /** The firmware flash was saved as started, before the flash port was called. */
  "firmware-flash",
  /** The flash port returned, before that was saved. */
  "firmware-flashed",
  /** restarting saved, before the first start. */
  "restarting",
  /** A service was started again (one hit per service). */
  "service-started",
  /** probation saved, before the health check. */
  "probation",
  /** The health check passed and the backup was marked committed, before committed is saved. */
  "probation-passed",
  /** committed saved, before the staging directory and old backups are removed. */
  "committed",
  /** rolling_back saved, before anything is restored. */
  "rolling-back",
  /** One target was restored or removed (one hit per file). */
  "rollback-file",
  /** A firmware module's old image was flashed back, before that was saved. */
  "rollback-firmware",
  /** A service was started again after the restore (one hit per service). */
  "rollback-service-started",
  /** rolled_back saved, before the staging directory is removed. */
  "rolled-back",
] as const;
export type CrashPoint = (typeof CRASH_POINTS)[number];

const crashHits = new Map<string, number>();

/** Inside the durable write of every transition (progress saves within a state are not hits). */
const TRANSITION_STEPS: DurableWriteSteps = { written: () => crashPoint("state-temp-written"), renamed: () => crashPoint("state-renamed") };

/** SIGKILLs this process when MOONFLASH_OTA_CRASH_AT names `point` and this is the MOONFLASH_OTA_CRASH_AFTER-th hit. */
export function crashPoint(point: CrashPoint): void {
  if (process.env.MOONFLASH_OTA_CRASH_AT !== point) return;
  const hits = (crashHits.get(point) ?? 0) + 1;
  crashHits.set(point, hits);
  const after = Number(process.env.MOONFLASH_OTA_CRASH_AFTER ?? "1");
  if (hits !== (Number.isSafeInteger(after) && after > 0 ? after : 1)) return;
  process.kill(process.pid, "SIGKILL");
  // SIGKILL to oneself is delivered on the way back from the kill() system call; never go on meanwhile.
  const blocker = new Int32Array(new SharedArrayBuffer(4));
  for (;;) Atomics.wait(blocker, 0, 0, 1000);
}
