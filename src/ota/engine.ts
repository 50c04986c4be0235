// The OTA engine: the one entry point of the updater. download → verify → install (backups, deploy module by
// module, firmware, restart, probation) → commit, or an automatic rollback; ota.rollback after a commit; and
// recover() at agent start, which brings every state an interrupted process can leave back to the old version or,
// past probation, to the new one. Never a mix: a deploy that had not passed probation is always rolled back.
//
// Every job runs under the JobRunner's one lock (kind "ota"), so an OTA job and a flash never overlap, also across
// processes. Every transition is saved in state.json (state.ts) before the action it announces. Progress goes out
// through the job context (stage, progress, log); status() answers from memory.
//
// Services are stopped and started through the PrinterPort (Moonraker); processes named by pidfile or name are
// stopped with signals (processes.ts) and, since the manifest has no start command for them, left to whatever
// supervises them. Firmware modules are flashed through a small port the agent builds from the flash engine.

import { access, mkdir, readdir, readFile, rm, stat } from "node:fs/promises";
import { constants } from "node:fs";
import { dirname, join } from "node:path";
import type { Logger } from "pino";
import { isMoonflashError, MoonflashError, toMoonflashError } from "../core/errors.js";
import type { JobContext } from "../core/events.js";
import type { CurrentJob, JobRunner } from "../core/jobs.js";
import type { PrinterPort } from "../core/printer.js";
import { rootsMap, type OtaConfig } from "./config.js";
import {
  FREE_SPACE_MARGIN_BYTES, REAL_IO, backupTargets, checkFreeSpace, checkReadable, fileError, listBackups, missingDirs,
  ownerOf, readBackupManifest, readOutcome, replaceFile, restoreBackup, writeBackupManifest, writeOutcome,
  type BackupManifest, type DeployIo, type FirmwareBackup, type SpaceNeed, type StatfsFn,
} from "./deploy.js";
import { DOWNLOAD_DEFAULTS, downloadPackage, type DownloadOptions } from "./download.js";
import { compareVersions, type Manifest, type ManifestModule } from "./manifest.js";
import { extractPackage, readPackage, resolveTargets, type ExtractedPackage, type PackageLimits, type ResolvedTarget } from "./package.js";
import { describeRef, findProcesses, stopProcess } from "./processes.js";
import { safeUrl } from "../core/url.js";
import { otaPaths } from "./paths.js";
import { isRawPublicKey } from "./signing.js";
import {
  DEFAULT_MAX_STATE_SAVES, DEPLOY_STATES, OtaStateStore, crashPoint, makeUpdateId, newState,
  type CrashPoint, type FirmwareRecord, type OtaState, type OtaStateName, type StateError, type StoppedUnit,
} from "./state.js";

/**
 * How the engine flashes an MCU. The agent builds it from the flash engine; tests use a small fake. `flash` and
 * `rollback` run inside the OTA job, which already holds the job lock and has stopped Klipper: an adapter must not
 * take the lock again (FlashEngine.flash does: use prepare + flashPrepared).
 */
export interface FirmwarePort {
  /** `purpose`: "rollback" when the image is the one the MCU ran before the update (the store says so). */
  flash(mcu: string, imagePath: string, job?: JobContext, purpose?: "update" | "rollback"): Promise<unknown>;
  /** Puts back the image the MCU had before (FlashEngine: its store's previous entry). Used only without currentImage. */
  rollback(mcu: string, job?: JobContext): Promise<unknown>;
  /**
   * The image the MCU runs now, as far as moonflash knows (FlashEngine: its firmware store's newest entry). When
   * given, a copy goes into the update's backup and a rollback flashes exactly that image again, which is
   * idempotent; without it a rollback calls `rollback` once.
   */
  currentImage?(mcu: string): Promise<{ path: string; sha256: string } | null>;
}

/** Download tuning passed on to downloadPackage (defaults: download.ts). */
export type DownloadTuning = Partial<
  Pick<DownloadOptions, "retries" | "backoffMs" | "backoffMaxMs" | "stallTimeoutMs" | "checkpointBytes" | "checkpointMs" | "freeSpaceMarginBytes" | "progressIntervalMs">
>;

export interface OtaEngineOptions {
  /** Klipper's data directory (~/printer_data); OTA keeps its files in <data>/moonflash/ota/. */
  dataDir: string;
  config: OtaConfig;
  printer: PrinterPort;
  runner: JobRunner;
  logger: Logger;
  /** Needed only for packages with firmware modules. */
  firmware?: FirmwarePort | null;
  /** Wait for a service to stop or start ([moonflash] service_timeout). Default 90 000 ms. */
  serviceTimeoutMs?: number;
  /** SIGTERM → SIGKILL grace for processes a package names. Default 10 000 ms. */
  processStopTimeoutMs?: number;
  /** Transition saves after which recovery stops retrying an update (crash loops). Default 28. */
  maxStateSaves?: number;
  /** How often Klipper's and the services' state is looked at while waiting. Default 250 ms. */
  pollMs?: number;
  download?: DownloadTuning;
  /** Free space kept on every filesystem an install writes to. Default 16 MiB. */
  freeSpaceMarginBytes?: number;
  /** statfs for the free-space check (tests give a tiny disk). */
  statfs?: StatfsFn;
  /** File copies of backup, deploy and restore (tests inject ENOSPC). */
  io?: Partial<DeployIo>;
  now?: () => Date;
}

export interface DownloadParams {
  url: string;
  /** 32 hex digits. */
  md5: string;
  /** 64 hex digits; checked when given. */
  sha256?: string;
  /** Expected size in bytes. */
  size?: number;
}

export interface PackageSummary {
  updateId: string;
  name: string;
  version: string;
  size: number;
  sha256: string;
  signed: boolean;
  modules: Array<{ id: string; type: "files" | "firmware"; files: number; service: string | null; process: string | null; mcu: string | null }>;
}

export interface InstallOutcome {
  updateId: string;
  name: string;
  version: string;
  /** The update installed before, when moonflash installed it. */
  previous: { updateId: string; name: string; version: string } | null;
  files: { written: number; replaced: number; added: number };
  firmware: string[];
  services: string[];
  /** Where the old files are kept, for ota.rollback. */
  backup: string;
  probationMs: number;
  elapsedMs: number;
}

export interface RollbackOutcome {
  updateId: string;
  name: string;
  version: string;
  restored: number;
  removed: number;
  firmware: string[];
  services: string[];
  /** What was rolled back: an automatic rollback names the failure, a requested one is null. */
  reason: StateError | null;
}

export interface RecoverOutcome {
  action: "none" | "resumed-download" | "verified" | "rolled-back" | "committed" | "cleaned" | "gave-up" | "busy";
  /** The state after recovery. */
  state: OtaStateName | "idle";
  updateId: string | null;
  /** Where a damaged state file was moved. */
  corrupt: string | null;
  error: StateError | null;
}

export interface OtaStatus {
  state: OtaStateName | "idle";
  /** The running OTA job's stage, or null. */
  stage: string | null;
  updateId: string | null;
  package: { name: string | null; version: string | null; size: number | null } | null;
  url: string | null;
  bytes: { done: number; total: number | null } | null;
  percent: number | null;
  /** Bytes per second of the download. */
  speed: number | null;
  /** Seconds left of the download. */
  eta: number | null;
  module: { index: number; count: number; id: string } | null;
  file: { index: number; count: number } | null;
  lastError: StateError | null;
  /** The newest update moonflash installed and committed (ota.rollback restores what was before it). */
  installed: { updateId: string; name: string; version: string } | null;
  /** The state chain of the current update. */
  history: OtaStateName[];
  job: CurrentJob | null;
}

/**
 * automatic: after a failure during install; recovery: an interrupted update at start; requested: ota.rollback;
 * unknown-state: at start with a damaged state file (which firmware was flashed is unknown).
 */
type RollbackMode = "automatic" | "recovery" | "requested" | "unknown-state";

const errOf = (e: MoonflashError): StateError => ({ code: e.code, message: e.message });

interface Live {
  bytes: { done: number; total: number | null } | null;
  speed: number | null;
  filesDone: number;
  filesTotal: number;
}

export class OtaEngine {
  readonly paths: ReturnType<typeof otaPaths>;
  private readonly config: OtaConfig;
  private readonly printer: PrinterPort;
  private readonly runner: JobRunner;
  private readonly logger: Logger;
  private readonly firmware: FirmwarePort | null;
  private readonly store: OtaStateStore;
  private readonly io: DeployIo;
  private readonly now: () => Date;
  private readonly serviceTimeoutMs: number;
  private readonly processStopTimeoutMs: number;
  private readonly maxSaves: number;
  private readonly pollMs: number;
  private readonly marginBytes: number;
  private readonly statfs: StatfsFn | undefined;
  private readonly tuning: DownloadTuning;
  private live: Live = { bytes: null, speed: null, filesDone: 0, filesTotal: 0 };
  private installed: OtaStatus["installed"] = null;

  constructor(opts: OtaEngineOptions) {
    this.paths = otaPaths(opts.dataDir);
    this.config = opts.config;
    this.printer = opts.printer;
    this.runner = opts.runner;
    this.logger = opts.logger.child({ ns: "ota" });
    this.firmware = opts.firmware ?? null;
    this.now = opts.now ?? (() => new Date());
    this.store = new OtaStateStore(this.paths.state, this.now);
    this.io = { ...REAL_IO, ...opts.io };
    this.serviceTimeoutMs = opts.serviceTimeoutMs ?? 90_000;
    this.processStopTimeoutMs = opts.processStopTimeoutMs ?? 10_000;
    this.maxSaves = opts.maxStateSaves ?? DEFAULT_MAX_STATE_SAVES;
    this.pollMs = opts.pollMs ?? 250;
    this.marginBytes = opts.freeSpaceMarginBytes ?? FREE_SPACE_MARGIN_BYTES;
    this.statfs = opts.statfs;
    this.tuning = opts.download ?? {};
  }

  // ---------------------------------------------------------------------------------------------------------------
  // Public API

  /** What OTA is doing, from memory: the state, the running job's stage, download bytes/speed/ETA, module k/n. */
  status(): OtaStatus {
    const st = this.store.current;
    const running = this.runner.current();
    const job = running?.kind === "ota" ? running : null;
    const { bytes, speed } = this.live;
    let percent: number | null = null;
    let eta: number | null = null;
    if (st?.state === "downloading" && bytes?.total) {
      percent = Math.min(100, Math.round((bytes.done / bytes.total) * 1000) / 10);
      if (speed && speed > 0) eta = Math.max(0, Math.round((bytes.total - bytes.done) / speed));
    } else if (st?.state === "deploying" && this.live.filesTotal > 0) {
      percent = Math.round((this.live.filesDone / this.live.filesTotal) * 1000) / 10;
    } else if (st?.state === "committed" || st?.state === "verified") {
      percent = 100;
    }
    const progress = st?.progress ?? null;
    return {
      state: st?.state ?? "idle",
      stage: job?.stage ?? null,
      updateId: st?.updateId ?? null,
      package: st?.package ? { name: st.package.name, version: st.package.version, size: st.package.size } : null,
      // Without query or credentials: a signed URL's token must not reach the console or status pages.
      url: st?.download?.url ? safeUrl(st.download.url) : null,
      bytes: st?.state === "downloading" ? bytes : st?.package?.size != null ? { done: st.package.size, total: st.package.size } : null,
      percent,
      speed: st?.state === "downloading" ? speed : null,
      eta,
      module: progress ? { index: progress.module, count: progress.modules, id: progress.moduleId } : null,
      file: progress && progress.files > 0 ? { index: progress.file, count: progress.files } : null,
      lastError: st?.error ?? null,
      installed: this.installed,
      history: st?.history.map((h) => h.state) ?? [],
      job,
    };
  }

  /** Reads state.json and the backups once, acting on nothing, so status() tells them before any job or recover(). */
  async load(): Promise<void> {
    await this.ensureLoaded();
  }

  /** Downloads and verifies a package (resuming a part left by an earlier call); the state ends `verified`. */
  async download(params: DownloadParams): Promise<PackageSummary> {
    checkDownloadParams(params);
    await this.ensureLoaded();
    await this.refuseWhileInterrupted();
    const target = `download ${safeUrl(params.url)}`;
    return this.runner.run({ kind: "ota", target, params: { url: safeUrl(params.url), md5: params.md5, sha256: params.sha256 ?? null, size: params.size ?? null } }, (ctx) =>
      this.downloadJob(ctx, params, null),
    );
  }

  /** Installs the verified package: backups, deploy, restart, probation, commit; rolls back by itself on failure. */
  async install(): Promise<InstallOutcome> {
    await this.ensureLoaded();
    await this.refuseWhileInterrupted();
    const st = this.requireInstallable();
    const target = st.package?.name ? `${st.package.name} ${st.package.version ?? ""}`.trim() : "package";
    return this.runner.run({ kind: "ota", target, params: { updateId: st.updateId } }, (ctx) => this.installJob(ctx));
  }

  /** Cancels the running OTA job while it may be cancelled (download, verify, extract; not once files are replaced). */
  cancel(): { id: string } {
    return this.runner.cancel("ota");
  }

  /** Restores what was installed before the last committed update (or finishes an interrupted one's rollback). */
  async rollback(): Promise<RollbackOutcome> {
    await this.ensureLoaded();
    return this.runner.run({ kind: "ota", target: "rollback" }, async (ctx) => {
      await this.store.load({ moveAside: false });
      if (this.printer.isPrinting()) throw printerBusy("roll back the update");
      const base = await this.rollbackTarget(this.store.current);
      return this.rollbackJob(ctx, null, "requested", { ...base, saves: 0 });
    });
  }

  /**
   * At agent start: brings an update that a dead process left half-way to a safe state. A half-done deploy is
   * rolled back (unless probation had passed: then it is committed), a rollback is finished, a download resumed, a
   * downloaded package verified; a damaged state file is moved aside and the newest unfinished backup restored.
   * Never throws for the update's own failures: they are in the outcome (and in status().lastError).
   */
  async recover(): Promise<RecoverOutcome> {
    const loaded = await this.store.load({ moveAside: true });
    await this.store.removeStaleTemps();
    await this.refreshInstalled();
    if (loaded.corrupt) {
      this.logger.warn({ aside: loaded.corrupt, reason: loaded.corruptReason }, "the OTA state file was damaged and was moved aside");
      return this.recoverFromCorrupt(loaded.corrupt, loaded.corruptReason ?? "damaged");
    }
    const st = loaded.state;
    if (!st) {
      await this.removeStagingExcept(null);
      return outcomeOf("none", null, null);
    }
    const needs = await this.recoveryNeeded(st);
    if (!needs) return outcomeOf("none", st, null);
    try {
      return await this.runner.run({ kind: "ota", target: `recovery ${st.updateId}`, params: { state: st.state } }, async (ctx) => {
        // Judged again under the lock: the state may have moved on while another process held it.
        await this.store.load({ moveAside: false });
        const current = this.store.current;
        if (!current) return outcomeOf("none", null, null);
        if (current.job) {
          await this.runner.interrupted({
            id: current.job.id,
            kind: "ota",
            target: current.job.target,
            startedAt: current.job.startedAt,
            message: `moonflash stopped during the update (state ${current.state}); ${DEPLOY_STATES.has(current.state) ? "it was rolled back on the next start unless probation had passed" : "it was resumed on the next start"}.`,
          });
          await this.store.update({ job: null });
        }
        return this.recoverState(ctx, current);
      });
    } catch (err) {
      const e = toMoonflashError(err);
      if (e.code === "BUSY") return { ...outcomeOf("busy", this.store.current, errOf(e)) };
      this.logger.error({ err: e }, `OTA recovery failed: ${e.message}`);
      return outcomeOf(this.store.current?.state === "failed" ? "gave-up" : "none", this.store.current, errOf(e));
    }
  }

  // ---------------------------------------------------------------------------------------------------------------
  // Download and verify

  private async downloadJob(ctx: JobContext, params: DownloadParams, resume: OtaState | null): Promise<PackageSummary> {
    const started = resume
      ? await this.store.transition("downloading", { job: this.jobRef(ctx), error: null }, resume)
      : await this.store.transition(
          "downloading",
          {
            job: this.jobRef(ctx),
            download: { url: params.url, md5: String(params.md5).toLowerCase(), sha256: params.sha256?.toLowerCase() ?? null, size: params.size ?? null },
          },
          newState(makeUpdateId(this.now()), "downloading", this.now()),
        );
    crashPoint("download-started");
    const download = started.download!;
    ctx.stage("download", `downloading ${safeUrl(download.url)}`);
    this.live = { bytes: { done: 0, total: download.size }, speed: null, filesDone: 0, filesTotal: 0 };
    let result;
    try {
      result = await downloadPackage({
        url: download.url,
        dest: this.paths.package,
        md5: download.md5,
        ...(download.sha256 ? { sha256: download.sha256 } : {}),
        ...(download.size !== null ? { size: download.size } : {}),
        ...(this.config.limits.maxDownloadBytes ? { maxBytes: this.config.limits.maxDownloadBytes } : {}),
        signal: ctx.signal,
        logger: this.logger,
        progressIntervalMs: DOWNLOAD_DEFAULTS.progressIntervalMs,
        ...this.tuning,
        onProgress: (done, total, bytesPerSecond) => {
          this.live.bytes = { done, total };
          this.live.speed = bytesPerSecond;
          if (total) ctx.progress(done, total, "bytes", "download");
          if (done > 0) crashPoint("download-partial");
        },
      });
    } catch (err) {
      const e = toMoonflashError(err);
      await this.store.transition("failed", { job: null, error: errOf(e) });
      throw e;
    }
    await this.store.transition("downloaded", {
      package: { path: result.path, md5: result.md5, sha256: result.sha256, size: result.size, name: null, version: null, modules: null, files: null },
    });
    crashPoint("downloaded");
    return this.verifyJob(ctx);
  }

  /**
   * Checks the downloaded package completely (signature, manifest, every file's SHA-256): `verified`, or `failed`
   * with the package deleted. A cancel or an unreadable [ota] public_key is not the package's fault: it stays
   * `downloaded`, to be checked again by ota.install, ota.download of the same URL or recovery.
   */
  private async verifyJob(ctx: JobContext): Promise<PackageSummary> {
    const st = this.store.current!;
    const pkg = st.package!;
    ctx.stage("verify", "checking the package: signature, manifest and the SHA-256 of every file");
    let contents;
    try {
      contents = await readPackage(pkg.path, { publicKey: await this.publicKey(), limits: this.packageLimits(), verifyContents: true, signal: ctx.signal });
    } catch (err) {
      let e = toMoonflashError(err);
      if (e.code === "CANCELLED" || e.code === "CONFIG_INVALID") {
        const kept = "The downloaded package is kept: ota.install (or ota.download of the same URL) checks it again without downloading it again.";
        e = new MoonflashError(
          e.code,
          e.code === "CANCELLED" ? `The check of the package was cancelled. ${kept}` : `${e.message} ${kept}`,
          e.details,
          { cause: e },
        );
        await this.store.update({ job: null, error: errOf(e) });
        throw e;
      }
      // A package that fails its checks can never be installed: it goes, so the next download starts clean.
      await rm(pkg.path, { force: true });
      await this.store.transition("failed", { job: null, error: errOf(e) });
      throw e;
    }
    const { manifest } = contents;
    const files = manifest.modules.reduce((n, m) => n + m.files.length, 0);
    const verified = await this.store.transition("verified", {
      job: null,
      error: null,
      package: { ...pkg, name: manifest.name, version: manifest.version, modules: manifest.modules.length, files },
    });
    crashPoint("verified");
    ctx.log("info", `package ${manifest.name} ${manifest.version} verified${contents.signed ? " (signature valid)" : ""}: ${manifest.modules.length} modules, ${files} files`);
    return summaryOf(verified, manifest, contents.signed);
  }

  // ---------------------------------------------------------------------------------------------------------------
  // Install

  private requireInstallable(): OtaState {
    const st = this.store.current;
    if (!st || (st.state !== "verified" && st.state !== "downloaded") || !st.package) {
      const now = st ? ` (the last update is ${st.state.replace("_", " ")})` : "";
      throw new MoonflashError("NO_PACKAGE", `There is no verified package to install${now}. Download one first with ota.download.`, { state: st?.state ?? "idle" });
    }
    return st;
  }

  private async installJob(ctx: JobContext): Promise<InstallOutcome> {
    const started = performance.now();
    await this.store.load({ moveAside: false });
    let st = this.requireInstallable();
    if (this.printer.isPrinting()) {
      const e = printerBusy("install an update");
      await this.store.update({ error: errOf(e) });
      throw e;
    }
    if (st.state === "downloaded") {
      await this.verifyJob(ctx);
      st = this.store.current!;
    }
    const updateId = st.updateId;
    const stagingDir = join(this.paths.staging, updateId);
    const backupDir = join(this.paths.backups, updateId);

    // Everything that can refuse the update comes before the first change, and leaves the state `verified`.
    let extracted: ExtractedPackage;
    let targets: ResolvedTarget[];
    let createdDirs: string[];
    try {
      ctx.stage("stage", "extracting the package");
      await this.removeStaging(updateId);
      extracted = await extractPackage(st.package!.path, stagingDir, { publicKey: await this.publicKey(), limits: this.packageLimits(), signal: ctx.signal });
      crashPoint("staged");
      await this.checkMinVersion(ctx, extracted.manifest);
      const mcus = extracted.manifest.modules.flatMap((m) => (m.type === "firmware" ? [m.mcu] : []));
      if (mcus.length > 0 && !this.firmware) {
        throw new MoonflashError("INVALID_PACKAGE", `The package flashes ${mcus.join(", ")}, but this moonflash runs OTA without the flash engine. Nothing was changed.`, { mcus });
      }
      ctx.stage("check", "checking targets, permissions and free space");
      targets = await resolveTargets(extracted.manifest, rootsMap(this.config));
      await checkReadable(targets);
      await this.checkStateDirWritable();
      createdDirs = await missingDirs(targets);
      await checkFreeSpace(await this.spaceNeeds(targets), this.marginBytes, this.statfs);
      if (this.printer.isPrinting()) throw printerBusy("install an update");
      if (ctx.signal.aborted) throw new MoonflashError("CANCELLED", "The update was cancelled before anything was changed.", {});
    } catch (err) {
      await this.removeStaging(updateId).catch(() => undefined);
      const cancelled = ctx.signal.aborted && (!isMoonflashError(err) || err.code === "CANCELLED");
      const e = cancelled ? new MoonflashError("CANCELLED", "The update was cancelled before anything was changed; the package stays verified for ota.install.", {}) : toMoonflashError(err);
      await this.store.update({ error: errOf(e) });
      throw e;
    }
    ctx.setCancellable(false, "the update is replacing files; if it fails it rolls itself back");
    const previous = this.installed;
    const manifest = extracted.manifest;
    this.live = { bytes: null, speed: null, filesDone: 0, filesTotal: targets.length };

    await this.store.transition("backing_up", { job: this.jobRef(ctx), deployStarted: false, stopped: [], firmware: [], progress: null, rollbackReason: null, error: null });
    crashPoint("backing-up");
    let probationMs = 0;
    try {
      const backup = await this.takeBackup(ctx, manifest, targets, createdDirs, backupDir, updateId);
      await this.deploy(ctx, manifest, extracted, targets, backup);

      await this.store.transition("restarting", { progress: null });
      crashPoint("restarting");
      ctx.stage("restart", "starting the stopped services again");
      try {
        await this.startStopped(ctx, "service-started");
      } catch (err) {
        throw healthFailure(`a service did not start again (${toMoonflashError(err).message})`, err);
      }

      const timeoutMs = this.config.probation_timeout * 1000;
      await this.store.transition("probation");
      crashPoint("probation");
      const services = moduleServices(manifest);
      ctx.stage("probation", `waiting up to ${this.config.probation_timeout} s for Klipper to be ready${services.length ? ` and ${services.join(", ")} to run` : ""}`);
      const probationStarted = performance.now();
      const problems = await this.waitHealthy(services, timeoutMs);
      probationMs = Math.round(performance.now() - probationStarted);
      if (problems.length > 0) {
        throw healthFailure(`within the probation time of ${this.config.probation_timeout} s, ${problems.join("; ")}`);
      }
      // The durable "probation passed": from here on a restart commits instead of rolling back.
      await writeOutcome(backupDir, "committed", this.now());
      crashPoint("probation-passed");
    } catch (err) {
      throw await this.failAndRollBack(ctx, toMoonflashError(err));
    }

    await this.store.transition("committed", { job: null, progress: null, stopped: [], error: null });
    crashPoint("committed");
    ctx.stage("commit", `${manifest.name} ${manifest.version} committed`);
    await this.afterCommit(updateId);
    const replaced = targets.filter((t) => t.exists).length;
    return {
      updateId,
      name: manifest.name,
      version: manifest.version,
      previous: previous && { ...previous },
      files: { written: targets.length, replaced, added: targets.length - replaced },
      firmware: manifest.modules.flatMap((m) => (m.type === "firmware" ? [m.mcu] : [])),
      services: moduleServices(manifest),
      backup: backupDir,
      probationMs,
      elapsedMs: Math.round(performance.now() - started),
    };
  }

  /**
   * min_version guards the vendor's upgrade path: refused when the installed version of this package (the newest
   * committed backup of that name) is older. With none on record (a first OTA install, or only other packages) it
   * cannot be checked and the install goes on: a first install must stay possible. Downgrades are not refused.
   */
  private async checkMinVersion(ctx: JobContext, manifest: Manifest): Promise<void> {
    if (!manifest.min_version) return;
    const installed = await this.installedOf(manifest.name);
    if (!installed) {
      ctx.log("info", `min_version ${manifest.min_version} not checked: moonflash has installed no ${manifest.name} yet (none is on record)`);
      return;
    }
    if (compareVersions(installed.version, manifest.min_version) >= 0) return;
    throw new MoonflashError(
      "VERSION_TOO_OLD",
      `${manifest.name} ${manifest.version} updates version ${manifest.min_version} or later (its min_version), but ${installed.version} is installed. ` +
        `Install the versions in between first, or ask the vendor for a package that updates ${installed.version}. Nothing was changed.`,
      { name: manifest.name, version: manifest.version, minVersion: manifest.min_version, installed: installed.version },
    );
  }

  /** Rolls back after a failure during install and returns the error to throw: the failure, or both. */
  private async failAndRollBack(ctx: JobContext, reason: MoonflashError): Promise<MoonflashError> {
    ctx.log("error", `${reason.message} Rolling back to the previous version.`);
    try {
      await this.rollbackJob(ctx, reason, "automatic", this.store.current!);
    } catch (err) {
      const e = toMoonflashError(err);
      const both = new MoonflashError(
        reason.code,
        `${reason.message} The rollback failed as well: ${e.message} The old files are in ${join(this.paths.backups, this.store.current?.updateId ?? "")}.`,
        { ...reason.details, rollbackError: e.toJSON() },
        { cause: reason },
      );
      // ota.status says why the update is stuck half rolled back, until the next start or ota.rollback finishes it.
      await this.store.update({ error: errOf(both) }).catch(() => undefined);
      return both;
    }
    const done = "The update was rolled back; the previous version is in place.";
    return new MoonflashError(reason.code, reason.message.endsWith(done) ? reason.message : `${reason.message} ${done}`, reason.details, { cause: reason.cause ?? reason });
  }

  /** What goes on which filesystem: each new file beside its target (temp + rename), the backups in the data dir. */
  private async spaceNeeds(targets: ResolvedTarget[]): Promise<SpaceNeed[]> {
    const needs: SpaceNeed[] = targets.map((t) => ({ path: dirname(t.target), bytes: t.file.size, what: "the new files" }));
    needs.push({ path: this.paths.backups, bytes: await sumSizes(targets.filter((t) => t.exists).map((t) => t.target)), what: "the backups" });
    return needs;
  }

  private async checkStateDirWritable(): Promise<void> {
    await mkdir(this.paths.backups, { recursive: true }).catch((err: unknown) => {
      throw fileError(err, "create the OTA backup directory", this.paths.backups);
    });
    try {
      await access(this.paths.backups, constants.W_OK | constants.X_OK);
    } catch (err) {
      throw new MoonflashError("PERMISSION_DENIED", `moonflash may not write its OTA backups in ${this.paths.backups}; fix its owner or mode. Nothing was changed.`, { path: this.paths.backups }, { cause: err });
    }
  }

  /** Copies every existing target (and each MCU's current image, when known) and writes the backup manifest. */
  private async takeBackup(
    ctx: JobContext,
    manifest: Manifest,
    targets: ResolvedTarget[],
    createdDirs: string[],
    backupDir: string,
    updateId: string,
  ): Promise<BackupManifest> {
    const existing = targets.filter((t) => t.exists);
    ctx.stage("backup", `backing up ${existing.length} file${existing.length === 1 ? "" : "s"} to ${backupDir}`);
    await rm(backupDir, { recursive: true, force: true });
    const files = await backupTargets(targets, backupDir, this.io, (_entry, n) => {
      ctx.progress(n, existing.length, "steps", "backup");
      crashPoint("backup-file");
    });
    const firmware: FirmwareBackup[] = [];
    for (const module of manifest.modules) {
      if (module.type !== "firmware") continue;
      const current = (await this.firmware?.currentImage?.(module.mcu)) ?? null;
      if (!current) {
        firmware.push({ module: module.id, mcu: module.mcu, image: null, sha256: null });
        continue;
      }
      const name = `firmware/${module.mcu}.bin`;
      await mkdir(join(backupDir, "firmware"), { recursive: true });
      try {
        await this.io.copyFile(current.path, join(backupDir, name), 0o600, "backup");
      } catch (err) {
        throw fileError(err, `back up the image ${module.mcu} runs`, current.path);
      }
      firmware.push({ module: module.id, mcu: module.mcu, image: name, sha256: current.sha256 });
    }
    const backup: BackupManifest = {
      format: 1,
      updateId,
      name: manifest.name,
      version: manifest.version,
      createdAt: this.now().toISOString(),
      files,
      createdDirs,
      firmware,
      services: moduleServices(manifest),
    };
    await writeBackupManifest(backupDir, backup);
    crashPoint("backed-up");
    return backup;
  }

  /** Module by module, in dependency order: stop its unit, replace its files, flash its firmware. */
  private async deploy(ctx: JobContext, manifest: Manifest, extracted: ExtractedPackage, targets: ResolvedTarget[], backup: BackupManifest): Promise<void> {
    const staged = new Map(extracted.files.map((f) => [f.src, f.path]));
    const byDst = new Map(targets.map((t) => [t.file.dst, t]));
    const entries = new Map(backup.files.map((e) => [e.dst, e]));
    const rootOwners = new Map<string, { uid: number; gid: number } | null>();
    const total = targets.length;
    for (const [k, module] of manifest.modules.entries()) {
      const progress = { module: k + 1, modules: manifest.modules.length, moduleId: module.id, file: 0, files: module.files.length, step: "stop" };
      if (this.store.current?.state === "deploying") await this.store.update({ progress });
      else await this.store.transition("deploying", { progress, deployStarted: true });
      crashPoint("deploying");
      ctx.stage("deploy", `module ${module.id} (${k + 1}/${manifest.modules.length})`);
      await this.stopUnit(ctx, module);
      for (const [i, file] of module.files.entries()) {
        await this.store.update({ progress: { ...progress, file: i + 1, step: "file" } });
        const target = byDst.get(file.dst);
        const source = staged.get(file.src);
        if (!target || !source) throw new MoonflashError("INTERNAL", `${file.dst} has no resolved target or staged file`, { dst: file.dst });
        const entry = entries.get(file.dst);
        let owner = entry?.existed ? { uid: entry.uid, gid: entry.gid } : undefined;
        if (!owner) {
          if (!rootOwners.has(target.root)) rootOwners.set(target.root, await ownerOf(target.root));
          owner = rootOwners.get(target.root) ?? undefined;
        }
        await replaceFile(source, target.target, {
          mode: file.mode,
          owner: owner ?? null,
          updateId: backup.updateId,
          io: this.io,
          purpose: "deploy",
          hooks: { afterTemp: () => crashPoint("deploy-temp-written"), afterRename: () => crashPoint("deploy-renamed") },
        });
        this.live.filesDone++;
        ctx.progress(this.live.filesDone, total, "steps", "deploy");
      }
      if (module.type === "firmware") {
        const image = staged.get(module.image.src);
        if (!image) throw new MoonflashError("INTERNAL", `the image of ${module.id} was not staged`, { module: module.id });
        await this.flashModule(ctx, module, image);
      }
    }
  }

  private async flashModule(ctx: JobContext, module: Extract<ManifestModule, { type: "firmware" }>, image: string): Promise<void> {
    const port = this.firmware!;
    // An MCU is flashed with Klipper stopped (it holds the serial port and would shut down mid-flash).
    await this.stopService(this.printer.state().klipperService);
    await this.setFirmware(module.mcu, module.id, "flashing");
    crashPoint("firmware-flash");
    ctx.stage("flash", `flashing ${module.mcu} (module ${module.id})`);
    await port.flash(module.mcu, image, ctx);
    crashPoint("firmware-flashed");
    await this.setFirmware(module.mcu, module.id, "flashed");
  }

  private async setFirmware(mcu: string, module: string, status: FirmwareRecord["status"]): Promise<void> {
    const others = (this.store.current?.firmware ?? []).filter((r) => r.mcu !== mcu);
    await this.store.update({ firmware: [...others, { mcu, module, status }] });
  }

  /** Stops a module's service or process, saving it as stopped first (so a restart starts it again). */
  private async stopUnit(ctx: JobContext, module: ManifestModule): Promise<void> {
    if (module.service) {
      await this.stopService(module.service);
      crashPoint("service-stopped");
    } else if (module.process) {
      const found = await findProcesses(module.process);
      await this.addStopped({ kind: "process", name: describeRef(module.process), pids: found.map((p) => p.pid) });
      for (const info of found) {
        const result = await stopProcess(info, { termTimeoutMs: this.processStopTimeoutMs });
        ctx.log(result.outcome === "killed" ? "warn" : "info", `${info.comm} (pid ${info.pid}) ${result.outcome === "killed" ? "ignored SIGTERM and was killed" : "stopped"}`);
      }
      if (found.length === 0) ctx.log("info", `${describeRef(module.process)} is not running; nothing to stop`);
      crashPoint("service-stopped");
    }
  }

  private async stopService(name: string): Promise<void> {
    if (name === this.printer.state().klipperService && this.printer.isPrinting()) throw printerBusy("stop Klipper");
    await this.addStopped({ kind: "service", name });
    await this.waitConnected();
    await this.printer.stopService(name, this.serviceTimeoutMs);
  }

  private async addStopped(unit: StoppedUnit): Promise<void> {
    const stopped = this.store.current?.stopped ?? [];
    if (stopped.some((u) => u.kind === unit.kind && u.name === unit.name)) return;
    await this.store.update({ stopped: [...stopped, unit] });
  }

  /**
   * Starts every unit saved as stopped: in the order they were stopped (an install stops in dependency order), or,
   * given `order` (a rollback stops in reverse), services in that order, any other first (Klipper, stopped for a flash).
   */
  private async startStopped(ctx: JobContext | null, point: CrashPoint, order: string[] = []): Promise<void> {
    const rank = (unit: StoppedUnit) => order.indexOf(unit.name);
    const units = [...(this.store.current?.stopped ?? [])].sort((a, b) => (order.length === 0 ? 0 : rank(a) - rank(b)));
    for (const unit of units) {
      if (unit.kind === "service") {
        await this.waitConnected();
        await this.printer.startService(unit.name, this.serviceTimeoutMs);
        ctx?.log("info", `${unit.name} started`);
        crashPoint(point);
      } else {
        ctx?.log("info", `${unit.name} is not started by moonflash (the package gives no start command); its supervisor starts it`);
      }
      await this.store.update({ stopped: (this.store.current?.stopped ?? []).filter((u) => !(u.kind === unit.kind && u.name === unit.name)) });
    }
  }

  /** Waits until Klipper is ready and every service runs; returns what is still wrong (empty: healthy). */
  private async waitHealthy(services: string[], timeoutMs: number): Promise<string[]> {
    const problems = (): string[] => {
      const state = this.printer.state();
      const found: string[] = [];
      if (state.klippyState !== "ready") {
        found.push(`Klipper is ${state.klippyState === "disconnected" ? "not connected" : `in state '${state.klippyState}'`}${state.stateMessage ? ` (${state.stateMessage.split("\n")[0]})` : ""}`);
      }
      for (const name of services) {
        const service = state.services[name];
        if (service?.active_state !== "active") found.push(`the service ${name} is ${service ? `${service.active_state}/${service.sub_state}` : "unknown to Moonraker"}`);
      }
      return found;
    };
    await this.waitFor(() => problems().length === 0, timeoutMs);
    return problems();
  }

  /** Cleanup once committed; a failure here costs disk space, not the update, so it is only logged. */
  private async afterCommit(updateId: string): Promise<void> {
    try {
      await this.removeStaging(updateId);
      await rm(this.paths.package, { force: true });
      await this.pruneBackups(updateId);
    } catch (err) {
      this.logger.warn({ err }, "could not remove the staging directory, the package or old backups");
    }
    await this.refreshInstalled();
  }

  /**
   * Keeps the newest keep_backups committed backups (always the current one); drops rolled-back ones. An unfinished
   * one (no outcome: recovery gave up on its update) is kept: it may be the only copy of the files it replaced.
   */
  private async pruneBackups(current: string): Promise<void> {
    const backups = await listBackups(this.paths.backups);
    const committed = backups.filter((b) => b.outcome === "committed" && b.manifest);
    const keep = new Set([current, ...committed.slice(-this.config.keep_backups).map((b) => b.updateId)]);
    for (const b of backups) {
      if (keep.has(b.updateId) || (b.manifest && b.outcome === null)) continue;
      await rm(b.dir, { recursive: true, force: true });
    }
  }

  // ---------------------------------------------------------------------------------------------------------------
  // Rollback

  /** The update a requested rollback undoes: the current one if it was deployed, else the newest committed backup. */
  private async rollbackTarget(st: OtaState | null): Promise<OtaState> {
    if (st && (DEPLOY_STATES.has(st.state) || st.state === "committed" || (st.state === "failed" && st.deployStarted))) {
      const dir = join(this.paths.backups, st.updateId);
      if ((await readBackupManifest(dir)) && (await readOutcome(dir)) !== "rolled_back") return st;
    }
    const newest = (await listBackups(this.paths.backups)).filter((b) => b.manifest && b.outcome === "committed").pop();
    if (!newest?.manifest) {
      throw new MoonflashError(
        "NO_PACKAGE",
        `There is no installed update to roll back: moonflash keeps the files an update replaced only for updates it installed (the last ${this.config.keep_backups}), and has none.`,
        {},
      );
    }
    return this.stateFromBackup(newest.updateId, newest.manifest, "committed");
  }

  private stateFromBackup(updateId: string, manifest: BackupManifest, state: OtaStateName): OtaState {
    const files = manifest.files.length;
    return {
      ...newState(updateId, state, this.now()),
      package: { path: this.paths.package, md5: null, sha256: null, size: null, name: manifest.name, version: manifest.version, modules: null, files },
      deployStarted: true,
    };
  }

  /**
   * Restores the backup of `base`'s update: stops the updated services, puts every file back, flashes the old
   * firmware, starts the services, marks the backup rolled back. Safe to run again from any point (recovery).
   */
  private async rollbackJob(ctx: JobContext, reason: MoonflashError | null, mode: RollbackMode, base: OtaState): Promise<RollbackOutcome> {
    ctx.setCancellable(false, "the rollback restores files; it must finish");
    const backupDir = join(this.paths.backups, base.updateId);
    const manifest = await readBackupManifest(backupDir);
    let st = await this.store.transition(
      "rolling_back",
      { job: this.jobRef(ctx), rollbackReason: reason ? errOf(reason) : mode === "requested" ? null : base.rollbackReason, progress: null },
      base,
    );
    crashPoint("rolling-back");
    const name = manifest?.name ?? st.package?.name ?? "the update";
    const version = manifest?.version ?? st.package?.version ?? "";
    ctx.stage("rollback", `rolling back ${name} ${version}`.trim());
    let restored = 0;
    let removed = 0;
    const firmware: string[] = [];
    if (manifest && (st.deployStarted || mode === "requested" || mode === "unknown-state")) {
      if (this.printer.isPrinting()) throw printerBusy("roll back the update");
      // The updated services are stopped, so they read the old files when they start again.
      for (const service of [...manifest.services].reverse()) await this.stopService(service);
      const result = await restoreBackup(backupDir, manifest, this.io, (_entry, i) => {
        ctx.progress(i, manifest.files.length, "steps", "rollback");
        crashPoint("rollback-file");
      });
      restored = result.restored;
      removed = result.removed;
      firmware.push(...(await this.rollbackFirmware(ctx, manifest, backupDir, mode)));
    } else {
      ctx.log("info", "nothing had been deployed yet: no file to restore");
    }
    let startError: MoonflashError | null = null;
    try {
      await this.startStopped(ctx, "rollback-service-started", manifest?.services ?? []);
    } catch (err) {
      startError = toMoonflashError(err);
    }
    if (manifest) await writeOutcome(backupDir, "rolled_back", this.now());
    st = await this.store.transition("rolled_back", {
      job: null,
      progress: null,
      error: reason ? errOf(reason) : mode === "requested" ? null : st.rollbackReason,
    });
    crashPoint("rolled-back");
    await this.removeStaging(st.updateId).catch((err: unknown) => this.logger.warn({ err }, "could not remove the staging directory"));
    await this.refreshInstalled();
    ctx.log("info", `rolled back ${name} ${version}: ${restored} files restored, ${removed} removed${firmware.length ? `, firmware of ${firmware.join(", ")} restored` : ""}`);
    if (startError) {
      throw new MoonflashError(
        startError.code,
        `The old files are back, but a service did not start again: ${startError.message}`,
        { ...startError.details, restored, removed },
        { cause: startError },
      );
    }
    return { updateId: st.updateId, name, version, restored, removed, firmware, services: manifest?.services ?? [], reason: st.error };
  }

  private async rollbackFirmware(ctx: JobContext, manifest: BackupManifest, backupDir: string, mode: RollbackMode): Promise<string[]> {
    const done: string[] = [];
    for (const fw of manifest.firmware) {
      const record = this.store.current?.firmware.find((r) => r.mcu === fw.mcu);
      // Only an MCU whose flash was started differs from before (a requested rollback undoes a committed flash;
      // after a damaged state file nobody knows).
      if (mode !== "requested" && mode !== "unknown-state" && !record) continue;
      if (record?.status === "rolled-back") continue;
      if (!fw.image && mode === "unknown-state") {
        ctx.log("warn", `the state file was damaged, so whether ${fw.mcu} was flashed is unknown; it is not flashed back blindly. Check it with FLASH_CHECK`);
        continue;
      }
      if (!this.firmware) throw new MoonflashError("INTERNAL", `${fw.mcu} was flashed by the update, but this moonflash has no flash engine to flash it back.`, { mcu: fw.mcu });
      await this.stopService(this.printer.state().klipperService);
      if (fw.image) {
        // Flashing the image it ran before is the same whether or not an earlier try got there.
        await this.setFirmware(fw.mcu, fw.module, "rolling-back");
        ctx.stage("rollback-flash", `flashing ${fw.mcu} back to the image it ran before`);
        await this.firmware.flash(fw.mcu, join(backupDir, fw.image), ctx, "rollback");
      } else if (record?.status === "rolling-back") {
        // Without the old image a second port rollback would go one image further back.
        ctx.log("warn", `the rollback of ${fw.mcu} was interrupted and is not repeated; check its version with FLASH_CHECK`);
      } else {
        await this.setFirmware(fw.mcu, fw.module, "rolling-back");
        ctx.stage("rollback-flash", `flashing ${fw.mcu} back to its previous image`);
        await this.firmware.rollback(fw.mcu, ctx);
      }
      crashPoint("rollback-firmware");
      await this.setFirmware(fw.mcu, fw.module, "rolled-back");
      done.push(fw.mcu);
    }
    return done;
  }

  // ---------------------------------------------------------------------------------------------------------------
  // Recovery

  /** Whether recovery must act (take the lock) for this state. */
  private async recoveryNeeded(st: OtaState): Promise<boolean> {
    if (st.state === "downloading" || st.state === "downloaded" || DEPLOY_STATES.has(st.state)) return true;
    if (st.job || (st.stopped.length > 0 && !(st.state === "failed" && st.deployStarted))) return true;
    const leftovers = await Promise.all([exists(join(this.paths.staging, st.updateId)), exists(`${join(this.paths.staging, st.updateId)}.partial`)]);
    if (leftovers.some(Boolean)) return true;
    return st.state === "committed" && (await exists(this.paths.package));
  }

  private async recoverState(ctx: JobContext, st: OtaState): Promise<RecoverOutcome> {
    const interrupted = (what: string) =>
      new MoonflashError("INTERRUPTED", `moonflash stopped while the update was ${what}; the previous version was restored on the next start. Install the update again.`, { state: st.state });
    switch (st.state) {
      case "downloading": {
        if (st.saves >= this.maxSaves) return this.giveUp(st, new MoonflashError("DOWNLOAD_FAILED", `The download was interrupted ${st.saves} times; moonflash gave up on it. Start it again with ota.download.`, { saves: st.saves }));
        if (!st.download) return this.giveUp(st, new MoonflashError("INTERNAL", "The interrupted download left no URL to resume; start it again with ota.download.", {}));
        try {
          await this.downloadJob(ctx, { url: st.download.url, md5: st.download.md5 }, st);
          return outcomeOf("resumed-download", this.store.current, null);
        } catch (err) {
          return outcomeOf("resumed-download", this.store.current, errOf(toMoonflashError(err)));
        }
      }
      case "downloaded":
        try {
          await this.verifyJob(ctx);
          return outcomeOf("verified", this.store.current, null);
        } catch (err) {
          return outcomeOf("verified", this.store.current, errOf(toMoonflashError(err)));
        }
      case "backing_up":
      case "deploying":
      case "restarting":
      case "probation":
      case "rolling_back": {
        const backupDir = join(this.paths.backups, st.updateId);
        if (st.state !== "rolling_back" && (await readOutcome(backupDir)) === "committed") {
          // Probation had passed: the new version stays.
          await this.store.transition("committed", { job: null, progress: null, error: null });
          await this.startStopped(ctx, "service-started").catch((err: unknown) => ctx.log("error", `a service did not start: ${toMoonflashError(err).message}`));
          await this.afterCommit(st.updateId);
          return outcomeOf("committed", this.store.current, null);
        }
        if (st.saves >= 2 * this.maxSaves) {
          return this.giveUp(
            st,
            new MoonflashError(
              "INTERNAL",
              `The update was interrupted ${st.saves} times, also while rolling back; moonflash stopped retrying. The old files are in ${backupDir}: run ota.rollback to restore them.`,
              { saves: st.saves, backup: backupDir },
            ),
          );
        }
        const reason = st.state === "rolling_back" ? null : interrupted(st.state.replace("_", " "));
        try {
          const result = await this.rollbackJob(ctx, reason, "recovery", st);
          return outcomeOf("rolled-back", this.store.current, result.reason);
        } catch (err) {
          return outcomeOf("rolled-back", this.store.current, errOf(toMoonflashError(err)));
        }
      }
      default: {
        // After recovery gave up on a deploy the installation may be mixed: its services stay stopped until
        // ota.rollback restores the old files.
        const consistent = st.state !== "failed" || !st.deployStarted;
        if (st.stopped.length > 0 && consistent) await this.startStopped(ctx, "service-started").catch((err: unknown) => ctx.log("error", toMoonflashError(err).message));
        if (st.state === "committed") await this.afterCommit(st.updateId);
        else await this.removeStaging(st.updateId);
        return outcomeOf("cleaned", this.store.current, null);
      }
    }
  }

  private async giveUp(st: OtaState, error: MoonflashError): Promise<RecoverOutcome> {
    this.logger.error({ updateId: st.updateId, saves: st.saves }, error.message);
    await this.store.transition("failed", { job: null, error: errOf(error) }, st);
    await this.removeStaging(st.updateId);
    return outcomeOf("gave-up", this.store.current, errOf(error));
  }

  /** A damaged state file: the newest backup that was neither committed nor rolled back is restored. */
  private async recoverFromCorrupt(aside: string, why: string): Promise<RecoverOutcome> {
    const backups = await listBackups(this.paths.backups);
    const pending = backups.filter((b) => b.manifest && b.outcome === null).pop();
    const message = `The OTA state file was damaged (it ${why}) and was moved to ${aside}.`;
    try {
      return await this.runner.run({ kind: "ota", target: "recovery" }, async (ctx) => {
        // Backups that never got their manifest: nothing was deployed from them.
        for (const b of backups) if (!b.manifest && b.updateId !== pending?.updateId) await rm(b.dir, { recursive: true, force: true });
        await this.removeStagingExcept(null);
        if (pending?.manifest) {
          ctx.log("warn", `${message} Restoring the backup of ${pending.manifest.name} ${pending.manifest.version}, which was being installed.`);
          const reason = new MoonflashError("INTERRUPTED", `${message} The update ${pending.manifest.name} ${pending.manifest.version} was being installed; the previous version was restored.`, { aside });
          const base = { ...this.stateFromBackup(pending.updateId, pending.manifest, "rolling_back"), rollbackReason: errOf(reason) };
          const result = await this.rollbackJob(ctx, reason, "unknown-state", base);
          return { ...outcomeOf("rolled-back", this.store.current, result.reason), corrupt: aside };
        }
        const error = new MoonflashError("INTERNAL", `${message} No update was being installed; nothing had to be restored.`, { aside });
        await this.store.transition("failed", { error: errOf(error) }, newState(makeUpdateId(this.now()), "failed", this.now()));
        return { ...outcomeOf("cleaned", this.store.current, errOf(error)), corrupt: aside };
      });
    } catch (err) {
      const e = toMoonflashError(err);
      return { ...outcomeOf(e.code === "BUSY" ? "busy" : "none", this.store.current, errOf(e)), corrupt: aside };
    }
  }

  // ---------------------------------------------------------------------------------------------------------------
  // Helpers

  private async ensureLoaded(): Promise<void> {
    if (this.store.isLoaded) return;
    await this.store.load({ moveAside: false });
    await this.refreshInstalled();
  }

  /**
   * An interrupted deploy must be recovered (or rolled back) before anything new starts; so must one recovery gave up
   * on (failed after its deploy began, its files possibly mixed): a new update would overwrite its state and its
   * backup would be all that is left of the old files.
   */
  private async refuseWhileInterrupted(): Promise<void> {
    const st = this.store.current;
    if (!st || this.runner.current()) return;
    if (DEPLOY_STATES.has(st.state)) {
      throw new MoonflashError(
        "BUSY",
        `The update ${st.package?.name ?? st.updateId} was interrupted (state ${st.state}); it is rolled back when the agent starts, or now with ota.rollback.`,
        { state: st.state, updateId: st.updateId },
      );
    }
    if (st.state === "failed" && st.deployStarted && (await readOutcome(join(this.paths.backups, st.updateId))) === null) {
      throw new MoonflashError(
        "BUSY",
        `The update ${st.package?.name ?? st.updateId} failed after its files began to change and was not rolled back; run ota.rollback (OTA_ROLLBACK) to restore the old files before another update.`,
        { state: st.state, updateId: st.updateId },
      );
    }
  }

  private jobRef(ctx: JobContext): OtaState["job"] {
    const current = this.runner.current();
    return { id: ctx.jobId, target: ctx.target, startedAt: current?.id === ctx.jobId ? current.startedAt : this.now().toISOString() };
  }

  private packageLimits(): Partial<PackageLimits> {
    const { maxDownloadBytes: _download, ...limits } = this.config.limits;
    return limits;
  }

  /** `[ota] public_key` as the package reader takes it: a PEM file's text, or the base64 key. */
  private async publicKey(): Promise<string | null> {
    const key = this.config.public_key;
    if (!key) return null;
    if (isRawPublicKey(key)) return key;
    try {
      return await readFile(key, "utf8");
    } catch (err) {
      throw new MoonflashError("CONFIG_INVALID", `[ota] public_key: cannot read ${key} (${(err as NodeJS.ErrnoException).code ?? String(err)}); give a readable PEM file or the key in base64.`, { path: key }, { cause: err });
    }
  }

  private async refreshInstalled(): Promise<void> {
    try {
      this.installed = await this.installedOf(null);
    } catch {
      this.installed = null;
    }
  }

  /** The newest update moonflash installed and committed (of package `name`, when given), from the backups. */
  private async installedOf(name: string | null): Promise<OtaStatus["installed"]> {
    const newest = (await listBackups(this.paths.backups)).filter((b) => b.manifest && b.outcome === "committed" && (name === null || b.manifest.name === name)).pop();
    return newest?.manifest ? { updateId: newest.updateId, name: newest.manifest.name, version: newest.manifest.version } : null;
  }

  private async removeStaging(updateId: string): Promise<void> {
    const dir = join(this.paths.staging, updateId);
    await rm(dir, { recursive: true, force: true });
    await rm(`${dir}.partial`, { recursive: true, force: true });
  }

  /** Removes every staging directory but `keep`'s (left by a crash; staging is never reused). */
  private async removeStagingExcept(keep: string | null): Promise<void> {
    let names: string[] = [];
    try {
      names = await readdir(this.paths.staging);
    } catch {
      return;
    }
    for (const name of names) {
      if (keep !== null && (name === keep || name === `${keep}.partial`)) continue;
      await rm(join(this.paths.staging, name), { recursive: true, force: true });
    }
  }

  private async waitConnected(): Promise<void> {
    if (await this.waitFor(() => this.printer.state().moonrakerConnected, this.serviceTimeoutMs)) return;
    throw new MoonflashError(
      "MOONRAKER_UNAVAILABLE",
      `moonflash has had no Moonraker connection for ${Math.round(this.serviceTimeoutMs / 1000)} s, so it cannot stop or start services. Check Moonraker; the update goes on (or rolls back) when the agent starts again.`,
      {},
    );
  }

  /** Resolves true as soon as `pred` holds (checked on every printer state change and every pollMs), false after `timeoutMs`. */
  private waitFor(pred: () => boolean, timeoutMs: number): Promise<boolean> {
    if (pred()) return Promise.resolve(true);
    return new Promise((resolve) => {
      let finished = false;
      const finish = (ok: boolean): void => {
        if (finished) return;
        finished = true;
        clearInterval(timer);
        clearTimeout(deadline);
        off();
        resolve(ok);
      };
      const check = (): void => {
        if (pred()) finish(true);
      };
      const off = this.printer.onStateChange(check);
      const timer = setInterval(check, this.pollMs);
      const deadline = setTimeout(() => finish(pred()), timeoutMs);
    });
  }
}

// --- small helpers ---

const HEX32 = /^[0-9a-f]{32}$/i;
const HEX64 = /^[0-9a-f]{64}$/i;

/** INVALID_PARAMS for a download request that could never succeed, before anything is saved. */
function checkDownloadParams(params: DownloadParams): void {
  const bad = (message: string, details: Record<string, unknown>) => new MoonflashError("INVALID_PARAMS", message, details);
  let url: URL | null = null;
  try {
    url = new URL(String(params?.url));
  } catch {
    url = null;
  }
  if (!url || (url.protocol !== "http:" && url.protocol !== "https:")) {
    throw bad(`url must be an http:// or https:// URL of the package, got "${String(params?.url).slice(0, 200)}".`, { url: params?.url ?? null });
  }
  if (typeof params.md5 !== "string" || !HEX32.test(params.md5)) throw bad(`md5 must be 32 hex digits, got "${String(params.md5)}".`, { md5: params.md5 ?? null });
  if (params.sha256 !== undefined && (typeof params.sha256 !== "string" || !HEX64.test(params.sha256))) {
    throw bad(`sha256 must be 64 hex digits, got "${String(params.sha256)}".`, { sha256: params.sha256 });
  }
  if (params.size !== undefined && (typeof params.size !== "number" || !Number.isSafeInteger(params.size) || params.size < 0)) {
    throw bad(`size must be the package's size in bytes, got ${String(params.size)}.`, { size: params.size });
  }
}

function outcomeOf(action: RecoverOutcome["action"], st: OtaState | null, error: StateError | null): RecoverOutcome {
  return { action, state: st?.state ?? "idle", updateId: st?.updateId ?? null, corrupt: null, error };
}

function summaryOf(st: OtaState, manifest: Manifest, signed: boolean): PackageSummary {
  return {
    updateId: st.updateId,
    name: manifest.name,
    version: manifest.version,
    size: st.package?.size ?? 0,
    sha256: st.package?.sha256 ?? "",
    signed,
    modules: manifest.modules.map((m) => ({
      id: m.id,
      type: m.type,
      files: m.files.length,
      service: m.service,
      process: m.process ? describeRef(m.process) : null,
      mcu: m.type === "firmware" ? m.mcu : null,
    })),
  };
}

/** The services of the updated modules, in dependency order, once each. */
function moduleServices(manifest: Manifest): string[] {
  return [...new Set(manifest.modules.flatMap((m) => (m.service ? [m.service] : [])))];
}

function printerBusy(what: string): MoonflashError {
  return new MoonflashError("PRINTER_BUSY", `The printer is printing or paused; moonflash does not ${what} now. Try again when the print has finished.`, {});
}

function healthFailure(why: string, cause?: unknown): MoonflashError {
  return new MoonflashError(
    "HEALTH_CHECK_FAILED",
    `The update did not pass probation: ${why}.`,
    { why },
    cause === undefined ? undefined : { cause },
  );
}

async function exists(path: string): Promise<boolean> {
  try {
    await access(path);
    return true;
  } catch {
    return false;
  }
}

async function sumSizes(paths: string[]): Promise<number> {
  let total = 0;
  for (const path of paths) total += (await stat(path).catch(() => ({ size: 0 }))).size;
  return total;
}
