// Resumable, verified HTTP(S) download of an OTA package. Bytes stream to `<dest>.part` while MD5 and SHA-256 are
// computed on the way; `<dest>.part.json` records the URL, the server's validator and how many bytes are durably in
// the part file, so a dropped connection, a stall or a restart of the process resumes with Range/If-Range instead of
// starting over. Only a file whose hashes match is renamed to `<dest>`.
//
// Resume rules follow RFC 9110 (§13.1.5 If-Range, §14.4 Content-Range) and Mender's http_resumer: a 206 must continue
// exactly the bytes held, a 200 means "start over", anything else malformed discards the part. The end-to-end hash
// is the real guard; the range checks only save bandwidth.
//
// node:http, node:https and node:crypto are loaded on first use (process.getBuiltinModule), not when the agent
// starts: idle memory.

import type { Hash } from "node:crypto";
import type { FileHandle } from "node:fs/promises";
import { mkdir, open, readdir, readFile, rename, rm, stat, statfs } from "node:fs/promises";
import type { IncomingHttpHeaders, IncomingMessage } from "node:http";
import { basename, dirname, join } from "node:path";
import { Writable } from "node:stream";
import { setTimeout as sleepFor } from "node:timers/promises";
import type { Logger } from "pino";
import * as z from "zod/mini";
import "../core/zod.js";
import { fsyncDir, removeDurable, writeFileDurable } from "../core/durable.js";
import { GarbagePacer } from "../core/gc-pacer.js";
import { MoonflashError, isMoonflashError, toMoonflashError } from "../core/errors.js";
import { VERSION } from "../version.js";
import { checkPartialResponse, ifRangeValue, parseContentLength, parseContentRange, retryAfterMs, validatorsChanged, type Validators } from "./http-range.js";

const MiB = 1024 * 1024;

/** Defaults of the tunable options, in one place. */
export const DOWNLOAD_DEFAULTS = {
  /** Failed attempts in a row (none bringing new bytes) before giving up. */
  retries: 5,
  backoffMs: 1000,
  backoffMaxMs: 30_000,
  /** No byte (or no answer) for this long aborts the request; the next attempt resumes. */
  stallTimeoutMs: 30_000,
  /**
   * fsync the part file and record it in the sidecar after this many new bytes … (on a fast link, an fsync every
   * 8 MiB held the stream back by a third; on a slow one the 5 s below comes first)
   */
  checkpointBytes: 64 * MiB,
  /** … or after this long, whichever comes first. */
  checkpointMs: 5000,
  /** Free space kept on the disk beyond the download itself, so logs and state files can still be written. */
  freeSpaceMarginBytes: 16 * MiB,
  /** Without an expected size, a larger download is refused. */
  maxBytes: 4 * 1024 * MiB,
  /** At most one progress call per interval (the first and the last always come). */
  progressIntervalMs: 200,
} as const;

/** Redirects followed per request (GitHub release assets redirect once, to a signed URL). */
const MAX_REDIRECTS = 5;
/** Range answers discarded before the rest of this call downloads whole files only. */
const MAX_RANGE_REJECTIONS = 2;
/** Each of the sink's two buffers: one fills while the other is written. */
const SINK_BUFFER_BYTES = 256 * 1024;
/** Chunks the sink queues (while both buffers wait for the disk) before the body is paused. */
const SINK_QUEUE_BYTES = 128 * 1024;
/**
 * Collections while the body streams (core/gc-pacer.ts): a minor one every 512 KiB; with the body copied out at
 * once little is promoted, so a major one only every 64 MiB (each costs about 10 ms).
 */
const SINK_GC_MINOR_BYTES = 512 * 1024;
const SINK_GC_MAJOR_BYTES = 64 * MiB;
/** Chunk size for re-hashing a part file after a restart or checking an existing destination. */
const READ_BACK_BYTES = MiB;
const HEX32 = /^[0-9a-f]{32}$/i;
const HEX64 = /^[0-9a-f]{64}$/i;

export interface DownloadOptions {
  /** http: or https: URL of the package. */
  url: string;
  /** Final path. The download goes to `<dest>.part`, its state to `<dest>.part.json`, both beside it. */
  dest: string;
  /** Expected MD5, 32 hex digits; mandatory. */
  md5: string;
  /** Expected SHA-256, 64 hex digits. Always computed; checked when given. */
  sha256?: string;
  /** Expected size in bytes. A server announcing or sending another size fails at once, keeping nothing. */
  size?: number;
  /** Without `size`, the largest download accepted. Default 4 GiB. */
  maxBytes?: number;
  /** Aborting cancels with CANCELLED; the part file is kept for a later resume. */
  signal?: AbortSignal;
  /** Bytes of the file held so far, its size (null while unknown) and the recent transfer rate. */
  onProgress?: (done: number, total: number | null, bytesPerSecond: number) => void;
  /** Failed attempts in a row (none bringing new bytes) before DOWNLOAD_FAILED. Default 5. */
  retries?: number;
  /** Wait before the first retry, doubled per failure up to backoffMaxMs. Defaults 1000 and 30000. */
  backoffMs?: number;
  backoffMaxMs?: number;
  /** No byte (or no answer) for this long aborts the request and resumes. Default 30000. */
  stallTimeoutMs?: number;
  /** fsync + sidecar update after this many bytes or milliseconds. Defaults 64 MiB and 5000. */
  checkpointBytes?: number;
  checkpointMs?: number;
  /** Free space required beyond the rest of the download. Default 16 MiB. */
  freeSpaceMarginBytes?: number;
  /** Minimum interval between progress calls. Default 200. */
  progressIntervalMs?: number;
  logger?: Logger;
}

export interface DownloadResult {
  path: string;
  size: number;
  md5: string;
  sha256: string;
  /** Bytes already on disk (from an earlier call) when this call started. */
  resumedFrom: number;
  /** Bytes received over the network by this call, including any it had to discard. */
  bytesDownloaded: number;
  /** HTTP requests made (redirects not counted); 0 when `dest` already held the file. */
  attempts: number;
}

interface Settings {
  url: URL;
  dest: string;
  md5: string;
  sha256: string | null;
  size: number | null;
  maxBytes: number;
  signal: AbortSignal | undefined;
  onProgress: DownloadOptions["onProgress"];
  retries: number;
  backoffMs: number;
  backoffMaxMs: number;
  stallTimeoutMs: number;
  checkpointBytes: number;
  checkpointMs: number;
  freeSpaceMarginBytes: number;
  progressIntervalMs: number;
  logger: Logger | undefined;
}

/** Downloads `url` to `dest`, resuming a part left by an earlier call, and returns it only once its hashes match. */
export async function downloadPackage(opts: DownloadOptions): Promise<DownloadResult> {
  const settings = normalizeOptions(opts);
  if (settings.signal?.aborted) throw cancelled(settings, 0);
  try {
    await mkdir(dirname(settings.dest), { recursive: true });
  } catch (err) {
    throw fsError(err, `Cannot create the directory of ${settings.dest}`);
  }
  const existing = await alreadyDownloaded(settings);
  if (existing) return existing;
  const part = await PartFile.open(settings);
  try {
    return await new DownloadRun(settings, part).run();
  } finally {
    await part.close();
  }
}

function normalizeOptions(opts: DownloadOptions): Settings {
  let url: URL;
  try {
    url = new URL(opts.url);
  } catch {
    throw new MoonflashError("INVALID_PARAMS", `The package URL "${opts.url}" is not a valid URL; give an http:// or https:// URL.`, { url: opts.url });
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") {
    throw new MoonflashError("INVALID_PARAMS", `The package URL must use http:// or https://, not ${url.protocol}//.`, { url: opts.url });
  }
  if (typeof opts.dest !== "string" || opts.dest === "") throw new MoonflashError("INVALID_PARAMS", "The download needs a destination path (dest).", {});
  if (typeof opts.md5 !== "string" || !HEX32.test(opts.md5)) {
    throw new MoonflashError("INVALID_PARAMS", `The package MD5 must be 32 hex digits, got "${String(opts.md5)}".`, { md5: opts.md5 });
  }
  if (opts.sha256 !== undefined && (typeof opts.sha256 !== "string" || !HEX64.test(opts.sha256))) {
    throw new MoonflashError("INVALID_PARAMS", `The package SHA-256 must be 64 hex digits, got "${String(opts.sha256)}".`, { sha256: opts.sha256 });
  }
  const count = (name: keyof DownloadOptions, value: unknown, fallback: number, min: number): number => {
    if (value === undefined) return fallback;
    if (typeof value !== "number" || !Number.isSafeInteger(value) || value < min) {
      throw new MoonflashError("INVALID_PARAMS", `Download option ${name} must be a whole number of at least ${min}, got ${String(value)}.`, { [name]: value });
    }
    return value;
  };
  const d = DOWNLOAD_DEFAULTS;
  return {
    url,
    dest: opts.dest,
    md5: opts.md5.toLowerCase(),
    sha256: opts.sha256?.toLowerCase() ?? null,
    size: opts.size === undefined ? null : count("size", opts.size, 0, 0),
    maxBytes: count("maxBytes", opts.maxBytes, d.maxBytes, 1),
    signal: opts.signal,
    onProgress: opts.onProgress,
    retries: count("retries", opts.retries, d.retries, 0),
    backoffMs: count("backoffMs", opts.backoffMs, d.backoffMs, 0),
    backoffMaxMs: count("backoffMaxMs", opts.backoffMaxMs, d.backoffMaxMs, 0),
    stallTimeoutMs: count("stallTimeoutMs", opts.stallTimeoutMs, d.stallTimeoutMs, 1),
    checkpointBytes: count("checkpointBytes", opts.checkpointBytes, d.checkpointBytes, 1),
    checkpointMs: count("checkpointMs", opts.checkpointMs, d.checkpointMs, 1),
    freeSpaceMarginBytes: count("freeSpaceMarginBytes", opts.freeSpaceMarginBytes, d.freeSpaceMarginBytes, 0),
    progressIntervalMs: count("progressIntervalMs", opts.progressIntervalMs, d.progressIntervalMs, 0),
    logger: opts.logger,
  };
}

// ---------------------------------------------------------------------------------------------------------------
// Errors

/** What happens to the part file when an error ends the call. Unlisted errors leave it as the sidecar describes. */
const partFate = new WeakMap<MoonflashError, "discard" | "keep">();

function withFate(error: MoonflashError, fate: "discard" | "keep"): MoonflashError {
  partFate.set(error, fate);
  return error;
}

function cancelled(s: Settings, kept: number): MoonflashError {
  const message =
    kept > 0
      ? `The download of ${s.url.href} was cancelled; the ${kept} bytes received are kept and the next download resumes from there.`
      : `The download of ${s.url.href} was cancelled before any byte was received.`;
  return new MoonflashError("CANCELLED", message, { url: s.url.href, bytesKept: kept });
}

function fsError(err: unknown, what: string): MoonflashError {
  if ((err as NodeJS.ErrnoException | undefined)?.code === "ENOSPC") return toMoonflashError(err);
  const reason = err instanceof Error ? err.message : String(err);
  return new MoonflashError("DOWNLOAD_FAILED", `${what}: ${reason}. Check the directory's permissions and the disk.`, {}, { cause: err });
}

/** Short text for a network error: its code (ECONNREFUSED, ECONNRESET, …) and message. */
function describeError(err: unknown): string {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  const message = err instanceof Error ? err.message : String(err);
  return code && !message.includes(code) ? `${code}: ${message}` : message;
}

// ---------------------------------------------------------------------------------------------------------------
// Part file and sidecar

const sidecarSchema = z.object({
  format: z.literal(1),
  url: z.string(),
  md5: z.string(),
  etag: z.nullable(z.string()),
  last_modified: z.nullable(z.string()),
  total: z.nullable(z.number()),
  committed: z.number(),
});
type Sidecar = z.infer<typeof sidecarSchema>;

/** `<dest>.part` with its hashes and the sidecar that says how much of it is durable. */
class PartFile {
  /** Bytes written to the part file (and fed to the hashes). */
  position = 0;
  /** Bytes fsynced and recorded in the sidecar: never more than are durably in the part file. */
  committed = 0;
  validators: Validators = { etag: null, lastModified: null };
  /** Size of the whole file once an answer (or the caller) told it. */
  total: number | null;
  md5: Hash;
  sha256: Hash;
  private lastCheckpointAt = Date.now();
  /** A checkpoint running beside the stream, and the error of the last one, surfaced at the next write. */
  private checkpointing: Promise<void> | null = null;
  private checkpointError: unknown = null;
  private closed = false;

  private constructor(
    private readonly s: Settings,
    private handle: FileHandle,
    readonly path: string,
    readonly sidecarPath: string,
  ) {
    this.total = s.size;
    [this.md5, this.sha256] = newHashes();
  }

  /** Opens the part left by an earlier call when its sidecar matches this download, else starts an empty one. */
  static async open(s: Settings): Promise<PartFile> {
    const path = `${s.dest}.part`;
    const sidecarPath = `${path}.json`;
    await sweepSidecarTemps(sidecarPath);
    const saved = await readSidecar(sidecarPath, s.logger);
    const onDisk = await stat(path).then((st) => st.size, () => null);
    const usable =
      saved !== null &&
      onDisk !== null &&
      saved.url === s.url.href &&
      saved.md5 === s.md5 &&
      saved.committed > 0 &&
      onDisk >= saved.committed &&
      (saved.total === null || (saved.committed <= saved.total && (s.size === null || saved.total === s.size)));
    if (!usable) {
      if (saved !== null || (onDisk ?? 0) > 0) s.logger?.info({ part: path }, "download: starting over (no usable partial download)");
      try {
        // The sidecar goes first: a part emptied under a sidecar that still claims bytes would be "resumed".
        if (saved !== null) await removeDurable(sidecarPath);
        return new PartFile(s, await open(path, "w"), path, sidecarPath);
      } catch (err) {
        throw fsError(err, `Cannot write ${path}`);
      }
    }
    let handle: FileHandle;
    try {
      handle = await open(path, "r+");
      // Bytes past the last checkpoint were never fsynced: after a power cut they may be anything.
      if (onDisk > saved.committed) await handle.truncate(saved.committed);
    } catch (err) {
      throw fsError(err, `Cannot open ${path}`);
    }
    const part = new PartFile(s, handle, path, sidecarPath);
    part.validators = { etag: saved.etag, lastModified: saved.last_modified };
    part.total = saved.total ?? s.size;
    try {
      // Hash state cannot be saved, so the bytes held are read back once through the hashes.
      await readThroughHashes(handle, saved.committed, [part.md5, part.sha256], s, () => cancelled(s, saved.committed));
    } catch (err) {
      await part.close();
      throw isMoonflashError(err) ? err : fsError(err, `Cannot read ${path}`);
    }
    part.position = part.committed = saved.committed;
    s.logger?.info({ part: path, bytes: saved.committed, total: part.total }, "download: resuming a partial download");
    return part;
  }

  /** Writes the buffer at the current position; hashes follow the file byte for byte. */
  async append(buffer: Buffer): Promise<void> {
    this.md5.update(buffer);
    this.sha256.update(buffer);
    for (let at = 0; at < buffer.length; ) {
      const { bytesWritten } = await this.handle.write(buffer, at, buffer.length - at, this.position + at);
      // A short write is legal (e.g. at a quota); write the rest, unless nothing moved at all.
      if (bytesWritten === 0) throw Object.assign(new Error(`no progress writing ${this.path}`), { code: "EIO" });
      at += bytesWritten;
    }
    this.position += buffer.length;
  }

  /**
   * Starts a checkpoint in the background when enough bytes or time have passed: the stream goes on while the disk
   * syncs (an fsync on an SD card can take a while). Throws the error of an earlier background checkpoint.
   */
  checkpointWhenDue(): void {
    if (this.checkpointError !== null) {
      const error = this.checkpointError;
      this.checkpointError = null;
      throw error;
    }
    this.startCheckpointWhenDue();
  }

  private startCheckpointWhenDue(): void {
    if (this.checkpointing !== null || this.closed || this.checkpointError !== null || this.position === this.committed) return;
    if (this.position - this.committed < this.s.checkpointBytes && Date.now() - this.lastCheckpointAt < this.s.checkpointMs) return;
    this.checkpointing = this.commit(this.position)
      .catch((err: unknown) => {
        this.checkpointError = err;
      })
      .finally(() => {
        this.checkpointing = null;
        // Bytes written while this one ran (the sink writes them as they come) need not wait for the next write.
        this.startCheckpointWhenDue();
      });
  }

  /** Checkpoints now (before a wait, on cancel, on giving up), after any background one. */
  async checkpoint(): Promise<void> {
    await this.settleCheckpoint();
    if (this.position !== this.committed) await this.commit(this.position);
  }

  /** Empties the part for a new representation (a 200 answer, a changed file, a rejected range). */
  async restart(validators: Validators, total: number | null): Promise<void> {
    // A background checkpoint finishing later would record old bytes under the new validators.
    await this.settleCheckpoint();
    this.validators = validators;
    this.total = total;
    // Recorded before the truncation, so a crash in between leaves a sidecar claiming nothing.
    await this.writeSidecar(0);
    // A fresh part is already empty (and may be something ftruncate refuses, like a device).
    if (this.position > 0) await this.handle.truncate(0);
    this.position = this.committed = 0;
    [this.md5, this.sha256] = newHashes();
  }

  async sizeOnDisk(): Promise<number> {
    return (await this.handle.stat()).size;
  }

  /** fsync, rename to the destination, fsync the directory, then drop the sidecar: the durable-replace sequence. */
  async moveTo(dest: string): Promise<void> {
    await this.settleCheckpoint();
    await this.handle.sync();
    await this.close();
    await rename(this.path, dest);
    await fsyncDir(dirname(dest));
    await removeDurable(this.sidecarPath);
  }

  /** Removes the part and its sidecar (corrupt, oversize or a full disk: nothing worth resuming). */
  async discard(): Promise<void> {
    await this.close();
    await rm(this.path, { force: true });
    await removeDurable(this.sidecarPath);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    while (this.checkpointing !== null) await this.checkpointing;
    await this.handle.close();
  }

  /**
   * fsync first, then record: the sidecar never claims bytes that are not durably in the part file. `upTo` bytes
   * were all written before the fsync started, so it covers them whatever is written meanwhile.
   */
  private async commit(upTo: number): Promise<void> {
    this.lastCheckpointAt = Date.now();
    await this.handle.datasync();
    await this.writeSidecar(upTo);
    this.committed = upTo;
  }

  private async settleCheckpoint(): Promise<void> {
    while (this.checkpointing !== null) await this.checkpointing;
    if (this.checkpointError !== null) {
      const error = this.checkpointError;
      this.checkpointError = null;
      throw error;
    }
  }

  private async writeSidecar(committed: number): Promise<void> {
    const sidecar: Sidecar = {
      format: 1,
      url: this.s.url.href,
      md5: this.s.md5,
      etag: this.validators.etag,
      last_modified: this.validators.lastModified,
      total: this.total,
      committed,
    };
    await writeFileDurable(this.sidecarPath, `${JSON.stringify(sidecar)}\n`);
  }
}

async function readSidecar(path: string, logger: Logger | undefined): Promise<Sidecar | null> {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch {
    return null;
  }
  try {
    const parsed = sidecarSchema.safeParse(JSON.parse(text));
    if (parsed.success) return parsed.data;
  } catch {
    // not JSON: a torn or foreign file, handled as no sidecar
  }
  logger?.warn({ sidecar: path }, "download: ignoring an unreadable sidecar");
  return null;
}

/**
 * Removes temp files that writeFileDurable (core/durable.ts: `.<name>.<pid>.<random>.tmp`) left for the sidecar when
 * a process was killed mid-checkpoint. Files of a process still alive are left alone.
 */
async function sweepSidecarTemps(sidecarPath: string): Promise<void> {
  const prefix = `.${basename(sidecarPath)}.`;
  const names = await readdir(dirname(sidecarPath)).catch(() => []);
  for (const name of names) {
    if (!name.startsWith(prefix) || !name.endsWith(".tmp")) continue;
    const pid = Number(name.slice(prefix.length).split(".")[0]);
    if (Number.isSafeInteger(pid) && pid > 0 && processAlive(pid)) continue;
    await rm(join(dirname(sidecarPath), name), { force: true });
  }
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    // EPERM: it exists but belongs to another user.
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

function newHashes(): [Hash, Hash] {
  const { createHash } = process.getBuiltinModule("node:crypto");
  return [createHash("md5"), createHash("sha256")];
}

/** Feeds the first `length` bytes of a file to the hashes, in one reused buffer. */
async function readThroughHashes(handle: FileHandle, length: number, hashes: Hash[], s: Settings, onCancel: () => MoonflashError): Promise<void> {
  const buffer = Buffer.allocUnsafe(Math.min(READ_BACK_BYTES, Math.max(length, 1)));
  let at = 0;
  while (at < length) {
    if (s.signal?.aborted) throw onCancel();
    const { bytesRead } = await handle.read(buffer, 0, Math.min(buffer.length, length - at), at);
    if (bytesRead === 0) throw Object.assign(new Error(`unexpected end of file at byte ${at}`), { code: "EIO" });
    const view = buffer.subarray(0, bytesRead);
    for (const hash of hashes) hash.update(view);
    at += bytesRead;
  }
}

/** When `dest` already holds the expected file (e.g. a restart after the rename), returns it without a request. */
async function alreadyDownloaded(s: Settings): Promise<DownloadResult | null> {
  let handle: FileHandle;
  try {
    handle = await open(s.dest, "r");
  } catch {
    return null;
  }
  try {
    const { size } = await handle.stat();
    if (s.size !== null && size !== s.size) return null;
    const [md5, sha256] = newHashes();
    await readThroughHashes(handle, size, [md5, sha256], s, () => cancelled(s, 0));
    const result = { md5: md5.digest("hex"), sha256: sha256.digest("hex") };
    if (result.md5 !== s.md5 || (s.sha256 !== null && result.sha256 !== s.sha256)) return null;
    s.logger?.info({ path: s.dest }, "download: the destination already holds the package");
    await rm(`${s.dest}.part`, { force: true });
    await removeDurable(`${s.dest}.part.json`);
    return { path: s.dest, size, ...result, resumedFrom: size, bytesDownloaded: 0, attempts: 0 };
  } finally {
    await handle.close();
  }
}

// ---------------------------------------------------------------------------------------------------------------
// One call: attempts, retries, verification

type Outcome =
  /** The part holds the whole file. */
  | { kind: "complete" }
  /** Try again. `immediate`: a different request follows (no Range), so waiting gains nothing. */
  | { kind: "retry"; reason: string; status: number | null; waitMs?: number; immediate?: boolean; rangeRejected?: boolean };

class DownloadRun {
  private attempts = 0;
  private bytesDownloaded = 0;
  private freeSpaceChecked = false;
  private readonly progress: ProgressMeter;

  constructor(
    private readonly s: Settings,
    private readonly part: PartFile,
  ) {
    this.progress = new ProgressMeter(s.onProgress, s.progressIntervalMs);
  }

  async run(): Promise<DownloadResult> {
    const { s, part } = this;
    const resumedFrom = part.position;
    try {
      this.progress.report(part.position, part.total, 0, true);
      await this.ensureFreeSpace();
      let failuresInRow = 0;
      let highWater = part.position;
      let waitMs = s.backoffMs;
      let useRange = true;
      let rangeRejections = 0;
      while (!(part.position > 0 && part.position === part.total)) {
        if (s.signal?.aborted) throw withFate(cancelled(s, part.position), "keep");
        this.attempts++;
        const outcome = await this.attempt(useRange);
        if (outcome.kind === "complete") break;
        if (outcome.rangeRejected && ++rangeRejections >= MAX_RANGE_REJECTIONS) useRange = false;
        const progressed = part.position > highWater;
        if (progressed) {
          highWater = part.position;
          failuresInRow = 0;
          waitMs = s.backoffMs;
        } else {
          failuresInRow++;
        }
        if (failuresInRow > s.retries) throw withFate(this.gaveUp(outcome), "keep");
        // Durable before waiting: a process killed during the wait resumes from here.
        await part.checkpoint();
        const wait = progressed || outcome.immediate ? 0 : Math.min(Math.max(waitMs, outcome.waitMs ?? 0), s.backoffMaxMs);
        if (!progressed && !outcome.immediate) waitMs = Math.min(waitMs * 2, s.backoffMaxMs);
        s.logger?.info({ url: s.url.href, attempt: this.attempts, bytes: part.position, total: part.total, reason: outcome.reason, waitMs: wait }, "download: retrying");
        if (wait > 0) await this.sleep(wait);
      }
      return await this.finish(resumedFrom);
    } catch (err) {
      const error = toMoonflashError(err, "DOWNLOAD_FAILED");
      await this.settlePart(error);
      throw error;
    }
  }

  /** Leaves the part as the error asks: removed, checkpointed for a resume, or as the sidecar last described it. */
  private async settlePart(error: MoonflashError): Promise<void> {
    const fate = partFate.get(error) ?? (error.code === "DISK_FULL" ? "discard" : undefined);
    try {
      if (fate === "discard" || (fate === "keep" && this.part.position === 0)) await this.part.discard();
      else if (fate === "keep") await this.part.checkpoint();
    } catch (cleanupError) {
      this.s.logger?.warn({ err: cleanupError, part: this.part.path }, "download: could not clean up the partial download");
    }
  }

  private gaveUp(last: Extract<Outcome, { kind: "retry" }>): MoonflashError {
    const { s, part } = this;
    const lastText = last.status !== null ? `HTTP ${last.status}` : last.reason;
    const kept = part.position > 0 ? ` The ${part.position} bytes received are kept; the next try resumes from there.` : "";
    return new MoonflashError(
      "DOWNLOAD_FAILED",
      `Could not download ${s.url.href} after ${this.attempts} attempts (last: ${lastText}). Check the network and the server, then try again.${kept}`,
      { url: s.url.href, attempts: this.attempts, lastStatus: last.status, lastError: last.reason, bytesKept: part.position, total: part.total },
    );
  }

  private async finish(resumedFrom: number): Promise<DownloadResult> {
    const { s, part } = this;
    const size = part.position;
    // The hashes cover the bytes streamed; the file must hold exactly those, nothing left over from before.
    const onDisk = await part.sizeOnDisk();
    if (onDisk !== size) {
      throw withFate(
        new MoonflashError("DOWNLOAD_FAILED", `${part.path} holds ${onDisk} bytes where ${size} were written; it was discarded. Download again.`, { path: part.path, onDisk, size }),
        "discard",
      );
    }
    const md5 = part.md5.digest("hex");
    const sha256 = part.sha256.digest("hex");
    const details = { url: s.url.href, size, md5, sha256, expectedMd5: s.md5, expectedSha256: s.sha256 };
    if (md5 !== s.md5) {
      throw withFate(
        new MoonflashError("MD5_MISMATCH", `The download of ${s.url.href} has MD5 ${md5}, not the expected ${s.md5}; it was discarded. Download again, or check the MD5 given for the package.`, details),
        "discard",
      );
    }
    if (s.sha256 !== null && sha256 !== s.sha256) {
      throw withFate(
        new MoonflashError("SHA256_MISMATCH", `The download of ${s.url.href} has SHA-256 ${sha256}, not the expected ${s.sha256}; it was discarded. Download again, or check the SHA-256 given for the package.`, details),
        "discard",
      );
    }
    try {
      await part.moveTo(s.dest);
    } catch (err) {
      throw fsError(err, `Cannot move the download to ${s.dest}`);
    }
    this.progress.report(size, size, this.bytesDownloaded, true);
    s.logger?.info({ url: s.url.href, path: s.dest, size, resumedFrom, bytesDownloaded: this.bytesDownloaded, attempts: this.attempts }, "download: complete and verified");
    return { path: s.dest, size, md5, sha256, resumedFrom, bytesDownloaded: this.bytesDownloaded, attempts: this.attempts };
  }

  /** One request and its body. Network trouble comes back as a retry; what retrying cannot fix is thrown. */
  private async attempt(useRange: boolean): Promise<Outcome> {
    const { s, part } = this;
    const offset = part.position;
    const resuming = useRange && offset > 0;
    const controller = new AbortController();
    const onCancel = (): void => controller.abort();
    s.signal?.addEventListener("abort", onCancel, { once: true });
    const stall = new StallGuard(s.stallTimeoutMs, () => controller.abort());
    const headers: Record<string, string> = { "accept-encoding": "identity", "user-agent": `moonflash/${VERSION}` };
    if (resuming) {
      headers.range = `bytes=${offset}-`;
      const ifRange = ifRangeValue(part.validators);
      if (ifRange !== null) headers["if-range"] = ifRange;
    }
    let res: IncomingMessage | undefined;
    try {
      try {
        res = await this.request(headers, controller.signal);
      } catch (err) {
        if (isMoonflashError(err)) throw err;
        return this.interrupted(err, stall, null);
      }
      const response = res;
      controller.signal.addEventListener("abort", () => response.destroy(), { once: true });
      const status = res.statusCode ?? 0;
      const answer: Validators = { etag: header(res.headers, "etag") ?? null, lastModified: header(res.headers, "last-modified") ?? null };

      // Disk work to do before the body's first byte is written. The body is piped at once all the same: a
      // connection that closes meanwhile would otherwise take the bytes it already delivered with it.
      let prepare: () => Promise<void> = async () => {};
      let total: number | null;
      if (status === 200) {
        const length = parseContentLength(header(res.headers, "content-length"));
        this.refuseSize(length);
        if (offset > 0) s.logger?.info({ url: s.url.href, bytes: offset }, "download: the server sent the whole file; starting over");
        total = length ?? s.size;
        prepare = async () => {
          await part.restart(answer, total);
          await this.ensureFreeSpace();
        };
      } else if (status === 206) {
        if (!resuming) {
          res.destroy();
          return { kind: "retry", reason: "206 to a request without Range", status };
        }
        const check = checkPartialResponse({ offset, total: part.total }, header(res.headers, "content-range"), header(res.headers, "content-length"));
        const changed = check.ok && validatorsChanged(part.validators, answer);
        if (!check.ok || changed) {
          res.destroy();
          const reason = check.ok ? `the file on the server changed (ETag ${part.validators.etag ?? "-"} → ${answer.etag ?? "-"})` : check.reason;
          s.logger?.warn({ url: s.url.href, bytes: offset, reason }, "download: discarding the partial download");
          await stall.pausedWhile(() => part.restart({ etag: null, lastModified: null }, s.size));
          return { kind: "retry", reason, status, immediate: true, rangeRejected: true };
        }
        this.refuseSize(check.total);
        total = check.total;
        if (part.total === null) {
          part.total = check.total;
          prepare = () => this.ensureFreeSpace();
        }
      } else if (status === 416) {
        res.destroy();
        const range = parseContentRange(header(res.headers, "content-range"));
        // "bytes */N" with N = what we hold: the file was already complete.
        if (resuming && range?.kind === "unsatisfied" && range.total === offset && (part.total === null || part.total === offset)) {
          part.total = offset;
          return { kind: "complete" };
        }
        await stall.pausedWhile(() => part.restart({ etag: null, lastModified: null }, s.size));
        return { kind: "retry", reason: `416 for bytes=${offset}-`, status, immediate: true, rangeRejected: true };
      } else if (status === 408 || status === 425 || status === 429 || status >= 500) {
        res.destroy();
        return { kind: "retry", reason: `HTTP ${status}`, status, waitMs: retryAfterMs(header(res.headers, "retry-after")) ?? undefined };
      } else {
        res.destroy();
        throw withFate(
          new MoonflashError("DOWNLOAD_FAILED", `The server answered HTTP ${status} for ${s.url.href}. Check the package URL and that the server still offers it.`, {
            url: s.url.href,
            attempts: this.attempts,
            lastStatus: status,
          }),
          "keep",
        );
      }

      const limit = total ?? s.maxBytes;
      const ready = stall.pausedWhile(prepare);
      const sink = new PartSink(part, limit, ready, stall, (length) => this.written(length));
      let broken: unknown;
      try {
        broken = await drain(res, sink);
      } catch (err) {
        await sink.settled();
        await ready.catch(() => {});
        if (err instanceof SinkError) throw this.writeFailure(err, limit);
        throw err;
      }
      if (broken !== null) return this.interrupted(broken, stall, status);
      if (part.total === null) {
        // Neither a length nor a size: the end of the body is the end of the file, and the hash judges it.
        part.total = part.position;
        return { kind: "complete" };
      }
      if (part.position === part.total) return { kind: "complete" };
      return { kind: "retry", reason: `the connection closed after ${part.position} of ${part.total} bytes`, status };
    } finally {
      stall.stop();
      s.signal?.removeEventListener("abort", onCancel);
      // Frees the socket when a check threw; a body read to its end keeps its keep-alive socket.
      res?.destroy();
    }
  }

  /** Sends the request and follows redirects; each attempt starts again from the configured URL. */
  private async request(headers: Record<string, string>, signal: AbortSignal): Promise<IncomingMessage> {
    let url = this.s.url;
    for (let hop = 0; ; hop++) {
      const res = await send(url, headers, signal);
      const status = res.statusCode ?? 0;
      if (![301, 302, 303, 307, 308].includes(status)) return res;
      res.destroy();
      const location = header(res.headers, "location");
      let next: URL | null = null;
      try {
        next = location === undefined ? null : new URL(location, url);
      } catch {
        // handled below as a redirect without a usable target
      }
      const refuse = (why: string): MoonflashError =>
        withFate(new MoonflashError("DOWNLOAD_FAILED", `The server redirected ${this.s.url.href} ${why}. Check the package URL.`, { url: this.s.url.href, lastStatus: status, location }), "keep");
      if (next === null || (next.protocol !== "http:" && next.protocol !== "https:")) throw refuse(`to "${location ?? ""}", which is not an http(s) URL`);
      if (url.protocol === "https:" && next.protocol === "http:") throw refuse(`from https to plain http (${next.href})`);
      if (hop >= MAX_REDIRECTS) throw refuse(`more than ${MAX_REDIRECTS} times`);
      url = next;
    }
  }

  /** A request or body that ended early: cancel, stall or network error. */
  private interrupted(err: unknown, stall: StallGuard, status: number | null): Outcome {
    if (this.s.signal?.aborted) throw withFate(cancelled(this.s, this.part.position), "keep");
    const reason = stall.stalled ? `no data for ${this.s.stallTimeoutMs} ms` : describeError(err);
    return { kind: "retry", reason, status: stall.stalled ? null : status };
  }

  private writeFailure(err: SinkError, limit: number): MoonflashError {
    const { s } = this;
    // A failed preparation (a full disk, a sidecar that cannot be written) reaches us through the sink.
    if (isMoonflashError(err.cause)) return err.cause;
    if (err.oversize) {
      return withFate(
        new MoonflashError("DOWNLOAD_FAILED", `The server sent more than the ${limit} bytes expected for ${s.url.href}; the download was stopped and discarded. Check the package URL and size.`, {
          url: s.url.href,
          limit,
        }),
        "discard",
      );
    }
    if ((err.cause as NodeJS.ErrnoException | undefined)?.code === "ENOSPC") {
      return withFate(
        new MoonflashError("DISK_FULL", `The disk holding ${s.dest} is full; the partial download was removed. Free some space and try again.`, { path: this.part.path }, { cause: err.cause }),
        "discard",
      );
    }
    return fsError(err.cause, `Cannot write ${this.part.path}`);
  }

  /** Refuses an announced size that cannot be the package: another size than expected, or over the limit. */
  private refuseSize(length: number | null): void {
    const { s } = this;
    if (length === null) return;
    if (s.size !== null && length !== s.size) {
      const what = length > s.size ? "larger than" : "not";
      throw withFate(
        new MoonflashError("DOWNLOAD_FAILED", `The server's file at ${s.url.href} is ${length} bytes, ${what} the ${s.size} bytes expected; nothing is kept. Check the package URL and size.`, {
          url: s.url.href,
          announced: length,
          expected: s.size,
        }),
        "discard",
      );
    }
    if (length > s.maxBytes) {
      throw withFate(
        new MoonflashError("DOWNLOAD_FAILED", `The server's file at ${s.url.href} is ${length} bytes, over the limit of ${s.maxBytes}; nothing is kept. Check the package URL.`, {
          url: s.url.href,
          announced: length,
          limit: s.maxBytes,
        }),
        "discard",
      );
    }
  }

  /** Once the size is known: the rest of the download plus a margin must fit on the disk (statfs). */
  private async ensureFreeSpace(): Promise<void> {
    const { s, part } = this;
    if (this.freeSpaceChecked || part.total === null) return;
    this.freeSpaceChecked = true;
    const dir = dirname(s.dest);
    const fs = await statfs(dir);
    const free = fs.bavail * fs.bsize;
    const needed = part.total - part.position + s.freeSpaceMarginBytes;
    if (free < needed) {
      throw withFate(
        new MoonflashError("DISK_FULL", `Not enough free space in ${dir}: the download needs ${needed} bytes (with a margin of ${s.freeSpaceMarginBytes}), ${free} are free. Free some space and try again.`, {
          path: dir,
          needed,
          free,
        }),
        "keep",
      );
    }
  }

  /** After each write to disk: count, report, and checkpoint when due. */
  private written(length: number): void {
    this.bytesDownloaded += length;
    this.progress.report(this.part.position, this.part.total, this.bytesDownloaded, false);
    this.part.checkpointWhenDue();
  }

  private async sleep(ms: number): Promise<void> {
    try {
      await sleepFor(ms, undefined, { signal: this.s.signal });
    } catch {
      throw withFate(cancelled(this.s, this.part.position), "keep");
    }
  }
}

/** A header's value; undefined when absent or (for a header that may repeat) not a single string. */
function header(headers: IncomingHttpHeaders, name: string): string | undefined {
  const value = headers[name];
  return typeof value === "string" ? value : undefined;
}

function send(url: URL, headers: Record<string, string>, signal: AbortSignal): Promise<IncomingMessage> {
  const transport = url.protocol === "https:" ? process.getBuiltinModule("node:https") : process.getBuiltinModule("node:http");
  return new Promise((resolve, reject) => {
    const req = transport.get(url, { headers, signal }, (res) => {
      // Errors after the headers surface in drain(); this only keeps them from being unhandled meanwhile.
      res.on("error", () => {});
      resolve(res);
    });
    req.on("error", reject);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Streaming pieces

/**
 * Pipes a body into the sink with backpressure. Resolves with null when the body ended, or with the error that broke
 * it off once the bytes already received are on disk: unlike stream.pipeline, which destroys the sink and drops up to
 * its buffer, so the resume would fetch them again. Rejects with the sink's own (disk) error.
 */
function drain(res: IncomingMessage, sink: PartSink): Promise<unknown> {
  return new Promise((resolve, reject) => {
    let broken: unknown = null;
    const breakOff = (err: unknown): void => {
      broken ??= err;
      res.unpipe(sink);
      if (!sink.writableEnded && !sink.destroyed) sink.end();
    };
    const closedEarly = (): Error => res.errored ?? new Error("the response was closed before its end");
    res.on("error", breakOff);
    // A response destroyed without an error (our abort) ends with 'close' but no 'end'.
    res.on("close", () => {
      if (!res.readableEnded) breakOff(closedEarly());
    });
    sink.on("finish", () => resolve(broken));
    sink.on("error", (err) => {
      res.destroy();
      reject(err);
    });
    if (res.destroyed && !res.readableEnded) breakOff(closedEarly());
    else res.pipe(sink);
  });
}

/** Raised by the sink, so a disk problem is never mistaken for a network one. */
class SinkError extends Error {
  constructor(
    readonly oversize: boolean,
    cause?: unknown,
  ) {
    super(oversize ? "more bytes than expected" : describeError(cause), { cause });
  }
}

/**
 * Writes the body into the part file with backpressure. Each chunk is copied into one of two fixed buffers and
 * dropped at once: while one buffer is on the disk the other fills, and goes out as soon as the disk is free, so
 * nothing waits in memory for more data. A chunk kept queued until its write finished would often live through the
 * next minor collection and be promoted to V8's old generation, where its memory stays until a major collection;
 * copied, the socket's chunks die young (see core/gc-pacer.ts).
 */
class PartSink extends Writable {
  /** The buffer being filled, and the one free for the next fill (null while on the disk or not made yet). */
  private filling: Buffer | null = null;
  private spare: Buffer | null = null;
  private filled = 0;
  /** Bytes taken from the body: on the disk, being written or in `filling`. */
  private accepted = 0;
  /** The write in progress (never rejects: a failure is kept in `failure`, raised by the next write or the end). */
  private inflight: Promise<void> | null = null;
  private failure: { error: unknown } | null = null;
  private readonly pacer = new GarbagePacer(SINK_GC_MINOR_BYTES, undefined, SINK_GC_MAJOR_BYTES);

  /**
   * @param ready settles when the part may be written (emptied, free space checked); chunks queue until then.
   */
  constructor(
    private readonly part: PartFile,
    private readonly limit: number,
    private readonly ready: Promise<void>,
    private readonly stall: StallGuard,
    private readonly written: (length: number) => void,
  ) {
    super({ highWaterMark: SINK_QUEUE_BYTES });
    // Its failure surfaces through the first write or _final; this keeps it from counting as unhandled.
    ready.catch(() => {});
  }

  override _final(callback: (error?: Error | null) => void): void {
    // An empty body still needs the part prepared (and its failure reported).
    this.settle(this.finish(), callback);
  }

  override _write(chunk: Buffer, _encoding: BufferEncoding, callback: (error?: Error | null) => void): void {
    if (this.accepted + chunk.length > this.limit) {
      callback(new SinkError(true));
      return;
    }
    this.accepted += chunk.length;
    this.settle(this.take(chunk), callback);
  }

  /** Resolves once no write is in progress (a failed sink does not wait for the disk). */
  async settled(): Promise<void> {
    while (this.inflight !== null) await this.inflight;
  }

  private settle(work: Promise<void>, callback: (error?: Error | null) => void): void {
    // Time spent on the disk (a slow fsync on an SD card) is not a stalled server.
    this.stall.pause();
    work.then(
      () => {
        this.stall.resume();
        callback();
      },
      (err: unknown) => {
        this.stall.resume();
        callback(err instanceof SinkError ? err : new SinkError(false, err));
      },
    );
  }

  private async take(chunk: Buffer): Promise<void> {
    await this.ready;
    for (let at = 0; at < chunk.length; ) {
      this.filling ??= Buffer.allocUnsafeSlow(SINK_BUFFER_BYTES);
      const copied = chunk.copy(this.filling, this.filled, at);
      this.filled += copied;
      at += copied;
      // Both buffers taken: wait for the disk.
      while (this.filling !== null && this.filled === this.filling.length) {
        this.throwIfFailed();
        if (this.inflight === null) this.startWrite();
        else await this.inflight;
      }
    }
    this.throwIfFailed();
    this.startWrite();
    this.pacer.add(chunk.length);
  }

  /** Writes what `filling` holds when the disk is free; the other buffer takes the next bytes. */
  private startWrite(): void {
    if (this.inflight !== null || this.failure !== null || this.filled === 0) return;
    const full = this.filling!;
    const length = this.filled;
    this.filling = this.spare;
    this.spare = null;
    this.filled = 0;
    this.inflight = this.part.append(full.subarray(0, length)).then(
      () => {
        this.inflight = null;
        this.spare = full;
        this.written(length);
        this.startWrite();
      },
    ).catch((error: unknown) => {
      this.inflight = null;
      this.failure ??= { error };
    });
  }

  private throwIfFailed(): void {
    if (this.failure !== null) throw this.failure.error;
  }

  private async finish(): Promise<void> {
    await this.ready;
    this.startWrite();
    await this.settled();
    this.throwIfFailed();
    this.filling = this.spare = null;
  }
}

/** Fires when no byte arrived for `ms` while we were ready to take one. */
class StallGuard {
  stalled = false;
  private paused = false;
  private readonly timer: NodeJS.Timeout;

  constructor(ms: number, onStall: () => void) {
    this.timer = setTimeout(() => {
      if (this.paused) {
        this.timer.refresh();
        return;
      }
      this.stalled = true;
      onStall();
    }, ms);
  }

  pause(): void {
    this.paused = true;
  }

  resume(): void {
    this.paused = false;
    this.timer.refresh();
  }

  async pausedWhile<T>(work: () => Promise<T>): Promise<T> {
    this.pause();
    try {
      return await work();
    } finally {
      this.resume();
    }
  }

  stop(): void {
    clearTimeout(this.timer);
  }
}

/** Throttled progress. The rate is over the last window of at least a second (the first one: since the start). */
class ProgressMeter {
  private lastReportAt = 0;
  private windowStartAt = Date.now();
  private windowStartBytes = 0;
  private rate = 0;

  constructor(
    private readonly onProgress: DownloadOptions["onProgress"],
    private readonly intervalMs: number,
  ) {}

  /** `transferred`: bytes received by this call so far, for the rate. */
  report(done: number, total: number | null, transferred: number, force: boolean): void {
    if (!this.onProgress) return;
    const now = Date.now();
    const elapsed = now - this.windowStartAt;
    if (elapsed >= 1000) {
      this.rate = Math.round(((transferred - this.windowStartBytes) * 1000) / elapsed);
      this.windowStartAt = now;
      this.windowStartBytes = transferred;
    } else if (this.rate === 0 && elapsed > 0) {
      this.rate = Math.round(((transferred - this.windowStartBytes) * 1000) / elapsed);
    }
    if (!force && now - this.lastReportAt < this.intervalMs) return;
    this.lastReportAt = now;
    this.onProgress(done, total, this.rate);
  }
}
