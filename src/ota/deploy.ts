// The file side of an update: the checks before the first write (free space, readable targets), backups of every
// target with a manifest of what existed, the atomic replacement of one file, and the restore that undoes a deploy.
//
// Replacing a file: a temp file in the target's own directory (rename across filesystems is not atomic), data
// written and fsynced, mode applied, renamed over the target, the directory fsynced. Its name is fixed per update
// (.<name>.<update id>.tmp) so a restore finds and removes one a crash left behind.
//
// The backup of update <id> lives in <data>/moonflash/ota/backup/<id>/: files/<n> (copies of the targets that
// existed), firmware/<mcu>.bin (the image the MCU ran, when the flash port can say), manifest.json (written last,
// durably: without it nothing was deployed), outcome.json ("committed" once probation passed — the durable form of
// "probation passed" — or "rolled_back"). A restore is idempotent: every entry is put back as the manifest says,
// however far the deploy (or an earlier restore) got.

import { constants } from "node:fs";
import { access, chown, lstat, mkdir, open, readdir, readFile, rename, rm, rmdir, stat, statfs } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import * as z from "zod/mini";
import "../core/zod.js";
import { fsyncDir, writeFileDurable } from "../core/durable.js";
import { GarbagePacer } from "../core/gc-pacer.js";
import { MoonflashError, isMoonflashError, toMoonflashError } from "../core/errors.js";
import type { ResolvedTarget } from "./package.js";

const MiB = 1024 * 1024;

/** Room kept free on every filesystem an update writes to, beyond what it writes (logs, state). */
export const FREE_SPACE_MARGIN_BYTES = 16 * MiB;

/** Why a copy is made; a test's fs shim can fail one kind only. */
export type CopyPurpose = "backup" | "deploy" | "restore";

/** The filesystem operations of a deploy that tests may replace (an fs shim for ENOSPC). */
export interface DeployIo {
  /** Copies `src` to the new file `dest` (which must not exist) with `mode`, and fsyncs it. */
  copyFile(src: string, dest: string, mode: number, purpose: CopyPurpose): Promise<void>;
}

export type StatfsFn = (path: string) => Promise<{ bavail: number; bsize: number }>;

/** Copy buffer: a 1 MiB one outlived a file's copy (until V8 collected it) and the next file's took another. */
const COPY_BUFFER_BYTES = 256 * 1024;

/** Backups and deploys copy whole packages; see core/gc-pacer.ts. */
const copiedGarbage = new GarbagePacer();

/** Real copy: stream through one buffer, write all, chmod (the open mode passed the umask), fsync. */
async function copyFileDurable(src: string, dest: string, mode: number): Promise<void> {
  const input = await open(src, "r");
  try {
    const output = await open(dest, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, mode);
    try {
      const buffer = Buffer.allocUnsafe(Math.min(COPY_BUFFER_BYTES, Math.max((await input.stat()).size, 1)));
      for (;;) {
        const { bytesRead } = await input.read(buffer, 0, buffer.length, null);
        if (bytesRead === 0) break;
        for (let offset = 0; offset < bytesRead; ) {
          const { bytesWritten } = await output.write(buffer, offset, bytesRead - offset);
          offset += bytesWritten;
        }
        copiedGarbage.add(bytesRead);
      }
      await output.chmod(mode);
      await output.sync();
    } finally {
      await output.close();
    }
  } finally {
    await input.close();
  }
}

export const REAL_IO: DeployIo = { copyFile: (src, dest, mode) => copyFileDurable(src, dest, mode) };

/** An fs error as what a user can act on: DISK_FULL, PERMISSION_DENIED, or INTERNAL naming the path. */
export function fileError(err: unknown, what: string, path: string): MoonflashError {
  if (isMoonflashError(err)) return err;
  const errno = (err as NodeJS.ErrnoException | undefined)?.code;
  if (errno === "ENOSPC" || errno === "EDQUOT") {
    return new MoonflashError("DISK_FULL", `No room on the disk to ${what} (${path}); free some space and try again.`, { path, errno }, { cause: err });
  }
  if (errno === "EACCES" || errno === "EPERM" || errno === "EROFS") {
    return new MoonflashError("PERMISSION_DENIED", `moonflash may not ${what} (${path}): ${errno}; fix the owner or mode.`, { path, errno }, { cause: err });
  }
  const error = toMoonflashError(err);
  return new MoonflashError(error.code, `Could not ${what} (${path}): ${error.message}`, { ...error.details, path }, { cause: err });
}

// --- backup manifest ---

export interface BackupEntry {
  /** The manifest's dst ("config/printer.cfg"). */
  dst: string;
  module: string;
  /** Absolute target path, symlinks of its directories resolved. */
  target: string;
  existed: boolean;
  /** Path of the copy inside the backup directory (files/0001), null when the target did not exist. */
  backup: string | null;
  size: number;
  mode: number;
  uid: number;
  gid: number;
}

export interface FirmwareBackup {
  module: string;
  mcu: string;
  /** Path of the image the MCU ran, inside the backup directory (firmware/<mcu>.bin), or null when unknown. */
  image: string | null;
  sha256: string | null;
}

export interface BackupManifest {
  format: 1;
  updateId: string;
  name: string;
  version: string;
  createdAt: string;
  files: BackupEntry[];
  /** Directories the deploy creates (they did not exist), shallowest first: removed again by a restore. */
  createdDirs: string[];
  firmware: FirmwareBackup[];
  /** Services of the updated modules, in dependency order. */
  services: string[];
}

const int = z.int().check(z.nonnegative());
const backupManifestSchema = z.object({
  format: z.literal(1),
  updateId: z.string(),
  name: z.string(),
  version: z.string(),
  createdAt: z.string(),
  files: z.array(
    z.object({
      dst: z.string(),
      module: z.string(),
      target: z.string(),
      existed: z.boolean(),
      backup: z.nullable(z.string()),
      size: int,
      mode: int,
      uid: int,
      gid: int,
    }),
  ),
  createdDirs: z.array(z.string()),
  firmware: z.array(z.object({ module: z.string(), mcu: z.string(), image: z.nullable(z.string()), sha256: z.nullable(z.string()) })),
  services: z.array(z.string()),
});

export type BackupOutcome = "committed" | "rolled_back";

export const BACKUP_MANIFEST = "manifest.json";
const OUTCOME_FILE = "outcome.json";

/** The backup manifest of a backup directory, or null when there is none (the backup never finished). */
export async function readBackupManifest(dir: string): Promise<BackupManifest | null> {
  let text: string;
  try {
    text = await readFile(join(dir, BACKUP_MANIFEST), "utf8");
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return null;
    throw fileError(err, "read the backup manifest", join(dir, BACKUP_MANIFEST));
  }
  try {
    return backupManifestSchema.parse(JSON.parse(text)) as BackupManifest;
  } catch (err) {
    throw new MoonflashError(
      "INTERNAL",
      `The backup manifest ${join(dir, BACKUP_MANIFEST)} is damaged, so the files it lists cannot be restored automatically; the copies are in ${dir}.`,
      { path: join(dir, BACKUP_MANIFEST) },
      { cause: err },
    );
  }
}

export async function readOutcome(dir: string): Promise<BackupOutcome | null> {
  return (await readOutcomeRecord(dir))?.outcome ?? null;
}

async function readOutcomeRecord(dir: string): Promise<{ outcome: BackupOutcome; at: string } | null> {
  try {
    const data = JSON.parse(await readFile(join(dir, OUTCOME_FILE), "utf8")) as { outcome?: unknown; at?: unknown };
    if (data.outcome !== "committed" && data.outcome !== "rolled_back") return null;
    return { outcome: data.outcome, at: typeof data.at === "string" ? data.at : "" };
  } catch {
    return null;
  }
}

export async function writeOutcome(dir: string, outcome: BackupOutcome, at: Date): Promise<void> {
  await writeFileDurable(join(dir, OUTCOME_FILE), `${JSON.stringify({ outcome, at: at.toISOString() })}\n`);
}

export interface BackupInfo {
  updateId: string;
  dir: string;
  manifest: BackupManifest | null;
  outcome: BackupOutcome | null;
  /** When the outcome was written (ISO 8601), "" without one. */
  outcomeAt: string;
}

/** Every backup directory under `root`, oldest first: by outcome time (commit order), then update id (start time). */
export async function listBackups(root: string): Promise<BackupInfo[]> {
  let names: string[];
  try {
    names = (await readdir(root)).filter((n) => /^[A-Za-z0-9._-]+$/.test(n) && !n.startsWith(".")).sort();
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return [];
    throw fileError(err, "list the OTA backups", root);
  }
  const backups: BackupInfo[] = [];
  for (const updateId of names) {
    const dir = join(root, updateId);
    let manifest: BackupManifest | null = null;
    try {
      manifest = await readBackupManifest(dir);
    } catch {
      manifest = null;
    }
    const outcome = await readOutcomeRecord(dir);
    backups.push({ updateId, dir, manifest, outcome: outcome?.outcome ?? null, outcomeAt: outcome?.at ?? "" });
  }
  // Pending backups (no outcome) sort last: they are the newest.
  const key = (b: BackupInfo) => b.outcomeAt || "~";
  return backups.sort((a, b) => key(a).localeCompare(key(b)) || a.updateId.localeCompare(b.updateId));
}

// --- checks before the first write ---

/** Every target that exists must be readable (it is backed up). PERMISSION_DENIED naming the first that is not. */
export async function checkReadable(targets: ResolvedTarget[]): Promise<void> {
  for (const t of targets) {
    if (!t.exists) continue;
    try {
      await access(t.target, constants.R_OK);
    } catch (err) {
      throw new MoonflashError(
        "PERMISSION_DENIED",
        `moonflash (uid ${process.getuid?.() ?? "?"}) may not read ${t.target} (${t.file.dst}) to back it up: fix its owner or mode. Nothing was changed.`,
        { dst: t.file.dst, path: t.target },
        { cause: err },
      );
    }
  }
}

/** The deepest existing directory at or above `path`. */
async function existingAncestor(path: string): Promise<string> {
  for (let dir = path; ; dir = dirname(dir)) {
    try {
      if ((await stat(dir)).isDirectory()) return dir;
    } catch {
      // not there (yet)
    }
    if (dir === dirname(dir)) return dir;
  }
}

export interface SpaceNeed {
  /** A directory on the filesystem (it or its deepest existing ancestor is looked at). */
  path: string;
  bytes: number;
  what: string;
}

/**
 * DISK_FULL unless every filesystem has room for what goes on it plus `marginBytes`. Needs on the same filesystem
 * (same st_dev) add up: staged files written into the targets, backups of the existing targets.
 */
export async function checkFreeSpace(needs: SpaceNeed[], marginBytes: number, statfsFn: StatfsFn = statfs): Promise<void> {
  const byDevice = new Map<number, { path: string; bytes: number; what: string[] }>();
  for (const need of needs) {
    if (need.bytes <= 0) continue;
    const dir = await existingAncestor(need.path);
    const dev = (await stat(dir)).dev;
    const entry = byDevice.get(dev) ?? { path: dir, bytes: 0, what: [] };
    entry.bytes += need.bytes;
    if (!entry.what.includes(need.what)) entry.what.push(need.what);
    byDevice.set(dev, entry);
  }
  for (const { path, bytes, what } of byDevice.values()) {
    const fs = await statfsFn(path);
    const free = fs.bavail * fs.bsize;
    if (free < bytes + marginBytes) {
      const mib = (n: number) => `${(n / MiB).toFixed(1)} MiB`;
      throw new MoonflashError(
        "DISK_FULL",
        `Not enough room on the filesystem of ${path}: the update needs ${mib(bytes)} for ${what.join(" and ")} plus ${mib(marginBytes)} to spare, ` +
          `but ${mib(free)} are free. Free some space and install again; nothing was changed.`,
        { path, neededBytes: bytes, marginBytes, freeBytes: free },
      );
    }
  }
}

/** Directories between the root and each target that do not exist yet, shallowest first. */
export async function missingDirs(targets: ResolvedTarget[]): Promise<string[]> {
  const missing = new Set<string>();
  for (const t of targets) {
    const chain: string[] = [];
    for (let dir = dirname(t.target); dir !== t.root && dir !== dirname(dir); dir = dirname(dir)) chain.push(dir);
    for (const dir of chain) {
      try {
        await lstat(dir);
      } catch {
        missing.add(dir);
      }
    }
  }
  const depth = (dir: string) => dir.split("/").length;
  return [...missing].sort((a, b) => depth(a) - depth(b) || a.localeCompare(b));
}

// --- backup ---

/**
 * Copies every existing target into `dir`/files, durably, calling `onFile` after each copy. Returns the entries of
 * the backup manifest (the caller adds firmware and writes the manifest).
 */
export async function backupTargets(
  targets: ResolvedTarget[],
  dir: string,
  io: DeployIo,
  onFile: (entry: BackupEntry, index: number) => void,
): Promise<BackupEntry[]> {
  const filesDir = join(dir, "files");
  await mkdir(filesDir, { recursive: true }).catch((err: unknown) => {
    throw fileError(err, "create the backup directory", filesDir);
  });
  const entries: BackupEntry[] = [];
  let copied = 0;
  for (const [i, t] of targets.entries()) {
    let entry: BackupEntry = {
      dst: t.file.dst, module: t.module.id, target: t.target, existed: false, backup: null, size: 0, mode: 0, uid: 0, gid: 0,
    };
    if (t.exists) {
      const info = await stat(t.target).catch((err: unknown) => {
        throw fileError(err, "look at a file to back up", t.target);
      });
      const name = `files/${String(i + 1).padStart(4, "0")}`;
      const dest = join(dir, name);
      await rm(dest, { force: true });
      try {
        await io.copyFile(t.target, dest, 0o600, "backup");
      } catch (err) {
        throw fileError(err, "back up a file", t.target);
      }
      entry = { ...entry, existed: true, backup: name, size: info.size, mode: info.mode & 0o7777, uid: info.uid, gid: info.gid };
      copied++;
    }
    entries.push(entry);
    if (t.exists) onFile(entry, copied);
  }
  await fsyncDir(filesDir);
  await fsyncDir(dir);
  return entries;
}

export async function writeBackupManifest(dir: string, manifest: BackupManifest): Promise<void> {
  await writeFileDurable(join(dir, BACKUP_MANIFEST), `${JSON.stringify(manifest, null, 2)}\n`);
}

// --- replacing one file ---

/** The temp name of a target during update `updateId`, in the target's directory. */
export function tempPathFor(target: string, updateId: string): string {
  return join(dirname(target), `.${basename(target)}.${updateId}.tmp`);
}

export interface ReplaceHooks {
  /** After the temp file is written and fsynced, before the rename. */
  afterTemp?: () => void;
  /** After the rename and the directory fsync. */
  afterRename?: () => void;
}

/**
 * Puts `src` at `target` atomically: temp file in the target directory (created with `createDirs`), data + mode,
 * fsync, rename, fsync the directory. Owner `owner` is applied when moonflash runs as root (so a root agent keeps
 * the user's config files the user's).
 */
export async function replaceFile(
  src: string,
  target: string,
  opts: { mode: number; owner: { uid: number; gid: number } | null; updateId: string; io: DeployIo; purpose: CopyPurpose; hooks?: ReplaceHooks },
): Promise<void> {
  const dir = dirname(target);
  const tmp = tempPathFor(target, opts.updateId);
  const what = opts.purpose === "restore" ? "restore a file" : "write a file";
  try {
    await mkdir(dir, { recursive: true });
    await rm(tmp, { force: true });
    await opts.io.copyFile(src, tmp, opts.mode, opts.purpose);
    if (opts.owner && process.getuid?.() === 0) await chown(tmp, opts.owner.uid, opts.owner.gid);
  } catch (err) {
    await rm(tmp, { force: true }).catch(() => undefined);
    throw fileError(err, what, target);
  }
  opts.hooks?.afterTemp?.();
  try {
    await rename(tmp, target);
    await fsyncDir(dir);
  } catch (err) {
    await rm(tmp, { force: true }).catch(() => undefined);
    throw fileError(err, what, target);
  }
  opts.hooks?.afterRename?.();
}

/** Removes `target` (a file the update added) and makes that durable; a missing one is fine. */
export async function removeFile(target: string): Promise<void> {
  try {
    await rm(target, { force: true });
    await fsyncDir(dirname(target)).catch((err: unknown) => {
      if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
    });
  } catch (err) {
    throw fileError(err, "remove a file the update added", target);
  }
}

// --- restore ---

/**
 * Undoes a deploy from its backup: every target that existed gets its copy back (data, mode, owner), every target
 * that did not is removed, temp files of the update go, directories the update created are removed when empty.
 * `onFile` is called after each target.
 */
export async function restoreBackup(dir: string, manifest: BackupManifest, io: DeployIo, onFile: (entry: BackupEntry, index: number) => void): Promise<{ restored: number; removed: number }> {
  let restored = 0;
  let removed = 0;
  for (const [i, entry] of manifest.files.entries()) {
    if (entry.existed && entry.backup !== null) {
      await replaceFile(join(dir, entry.backup), entry.target, {
        mode: entry.mode,
        owner: { uid: entry.uid, gid: entry.gid },
        updateId: manifest.updateId,
        io,
        purpose: "restore",
      });
      restored++;
    } else {
      await removeFile(tempPathFor(entry.target, manifest.updateId));
      await removeFile(entry.target);
      removed++;
    }
    onFile(entry, i + 1);
  }
  for (const created of [...manifest.createdDirs].reverse()) {
    try {
      await rmdir(created);
      await fsyncDir(dirname(created));
    } catch (err) {
      const errno = (err as NodeJS.ErrnoException).code;
      // Someone put something of their own there meanwhile: it stays.
      if (errno !== "ENOENT" && errno !== "ENOTEMPTY" && errno !== "EEXIST") throw fileError(err, "remove a directory the update created", created);
    }
  }
  return { restored, removed };
}

/** Mode and owner of an existing target, kept when it is replaced. */
export async function ownerOf(path: string): Promise<{ uid: number; gid: number } | null> {
  try {
    const info = await stat(path);
    return { uid: info.uid, gid: info.gid };
  } catch {
    return null;
  }
}
