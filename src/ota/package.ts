// Reading an OTA package (a zip with manifest.json at its root) without trusting it. The central directory is
// checked entry by entry (names, link and device entries, duplicates, encryption, sizes, compression ratio), then
// the signature when a key is configured, then the manifest, then the manifest against the zip (no file missing,
// none extra, sizes equal), all before anything is written. Extraction streams each file into a staging directory,
// counting inflated bytes and hashing as it goes. resolveTargets maps the manifest's destinations onto the
// configured roots and checks each one on disk (inside its root after symlinks, writable).
//
// The zip's central directory is authoritative (yauzl); local headers are only used to find the data. yauzl does
// not check CRC-32: the SHA-256 of every file, from the (signed) manifest, is the integrity check.
//
// yauzl is loaded on first use (dynamic import) and node:crypto through process.getBuiltinModule: idle memory.

import { constants } from "node:fs";
import { access, lstat, mkdir, open, realpath, rename, rm, stat, type FileHandle } from "node:fs/promises";
import type { KeyObject } from "node:crypto";
import { basename, dirname, isAbsolute, join, relative, resolve, sep } from "node:path";
import type { Entry, ZipFile } from "yauzl";
import { commonJsModule } from "../core/commonjs.js";
import { fsyncDir } from "../core/durable.js";
import { GarbagePacer } from "../core/gc-pacer.js";
import { isMoonflashError, MoonflashError, toMoonflashError } from "../core/errors.js";
import {
  MANIFEST_FILE, SIGNATURE_FILE, parseManifest, pathProblem, payloadsOf, printable, splitDst,
  type Manifest, type ManifestFile, type ManifestModule, type Payload,
} from "./manifest.js";
import { parsePublicKey, verifyManifestSignature } from "./signing.js";

/** Bounds on what a package may hold; exceeding one is INVALID_PACKAGE. */
export interface PackageLimits {
  /** Largest uncompressed size of one file in the zip. */
  maxFileBytes: number;
  /** Largest sum of the uncompressed sizes of all entries. */
  maxTotalBytes: number;
  /** Largest uncompressed:compressed ratio of one entry over RATIO_CHECK_MIN_BYTES (deflate reaches ~1000:1). */
  maxCompressionRatio: number;
  /** Most entries in the central directory. */
  maxEntries: number;
  /** Largest manifest.json. */
  maxManifestBytes: number;
}

const MiB = 1024 * 1024;

export const DEFAULT_LIMITS: Readonly<PackageLimits> = Object.freeze({
  maxFileBytes: 256 * MiB,
  maxTotalBytes: 1024 * MiB,
  maxCompressionRatio: 100,
  maxEntries: 10_000,
  maxManifestBytes: 1 * MiB,
});

/** Entries smaller than this are not held to maxCompressionRatio: a small file of repeated text inflates harmlessly. */
export const RATIO_CHECK_MIN_BYTES = 1 * MiB;

/** manifest.sig is 88 characters of base64; anything much larger is not a signature. */
const MAX_SIGNATURE_BYTES = 1024;

export interface ReadPackageOptions {
  /** Overrides of DEFAULT_LIMITS. */
  limits?: Partial<PackageLimits>;
  /** `[ota] public_key` (PEM or raw base64): when set, manifest.sig must verify; when absent, it is not read. */
  publicKey?: string | KeyObject | null;
  /** Also inflate and hash every file, writing nothing: a bad file is SHA256_MISMATCH before anything is staged. */
  verifyContents?: boolean;
  /** Aborting stops the check or the extraction between two chunks with CANCELLED (a partial staging is removed). */
  signal?: AbortSignal;
}

/** One entry of the zip's central directory, as checked. */
export interface PackageEntry {
  /** Path in the zip, without a directory's trailing '/'. */
  name: string;
  kind: "file" | "directory";
  /** Uncompressed size as declared in the central directory (never more is accepted while inflating). */
  size: number;
  compressedSize: number;
  /** Unix permission bits from the external attributes, or null when the zip has none. */
  mode: number | null;
}

export interface PackageContents {
  manifest: Manifest;
  /** The exact bytes of manifest.json, as signed. */
  manifestBytes: Buffer;
  /** Whether manifest.sig was verified (only when a public key is configured). */
  signed: boolean;
  entries: PackageEntry[];
}

export interface StagedFile {
  module: string;
  kind: Payload["kind"];
  src: string;
  /** Absolute path of the extracted copy inside the staging directory. */
  path: string;
  sha256: string;
  size: number;
  mode: number;
}

export interface ExtractedPackage extends PackageContents {
  /** Absolute; holds every file of the manifest at its `src` path. */
  stagingDir: string;
  files: StagedFile[];
}

/** A manifest file with where it goes: `target` is absolute, its directories' symlinks resolved. */
export interface ResolvedTarget {
  module: ManifestModule;
  file: ManifestFile;
  alias: string;
  /** The root's real path. */
  root: string;
  target: string;
  /** Whether a file is there now (it will be replaced). */
  exists: boolean;
}

// --- reading ---

/** Checks a package completely without extracting it: see the file comment for the order of checks. */
export async function readPackage(zipPath: string, opts: ReadPackageOptions = {}): Promise<PackageContents> {
  const zip = await openZip(zipPath);
  try {
    const inspected = await inspect(zip, opts);
    return publicContents(inspected);
  } finally {
    zip.close();
  }
}

/**
 * Checks the package as readPackage does, then extracts every file of the manifest to `stagingDir` (which must not
 * exist). Files are streamed through a byte counter and SHA-256 into `<stagingDir>.partial`, each written to a
 * temp name, fsynced and renamed; the directory becomes `stagingDir` only when all are there, so a staging
 * directory is always complete. On any failure the partial directory is removed.
 */
export async function extractPackage(zipPath: string, stagingDir: string, opts: ReadPackageOptions = {}): Promise<ExtractedPackage> {
  const finalDir = resolve(stagingDir);
  const partialDir = `${finalDir}.partial`;
  if (await pathExists(finalDir)) {
    throw new MoonflashError("PATH_REJECTED", `The staging directory ${finalDir} already exists; remove it first.`, { path: finalDir });
  }
  const zip = await openZip(zipPath);
  try {
    const inspected = await inspect(zip, opts);
    // A partial directory left by a crash is ours (by its name): start over.
    await rm(partialDir, { recursive: true, force: true });
    await mkdir(dirname(finalDir), { recursive: true });
    await mkdir(partialDir);
    const dirs = new Set<string>([partialDir]);
    const files: StagedFile[] = [];
    for (const payload of payloadsOf(inspected.manifest)) {
      const info = inspected.entries.get(payload.src);
      if (!info) throw new MoonflashError("INTERNAL", `${payload.src} vanished from the checked entries`);
      const target = join(partialDir, ...payload.src.split("/"));
      // pathProblem already refused anything that could climb out; this is the belt to those braces.
      if (!isInside(partialDir, target)) throw invalidPackage(payload.src, "would be extracted outside the staging directory");
      for (let dir = dirname(target); isInside(partialDir, dir); dir = dirname(dir)) dirs.add(dir);
      await mkdir(dirname(target), { recursive: true });
      await streamToFile(zip, info, payload, target, opts.signal);
      files.push({
        module: payload.module.id, kind: payload.kind, src: payload.src, path: join(finalDir, ...payload.src.split("/")),
        sha256: payload.sha256, size: payload.size, mode: payload.mode,
      });
    }
    // Deepest first, so each directory's entries are durable before its parent's.
    for (const dir of [...dirs].sort((a, b) => b.length - a.length)) await fsyncDir(dir);
    await rename(partialDir, finalDir);
    await fsyncDir(dirname(finalDir));
    return { ...publicContents(inspected), stagingDir: finalDir, files };
  } catch (err) {
    await rm(partialDir, { recursive: true, force: true }).catch(() => undefined);
    throw fsFailure(err, finalDir);
  } finally {
    zip.close();
  }
}

interface CheckedEntry extends PackageEntry {
  entry: Entry;
}

interface Inspected {
  manifest: Manifest;
  manifestBytes: Buffer;
  signed: boolean;
  entries: Map<string, CheckedEntry>;
}

function publicContents(inspected: Inspected): PackageContents {
  const entries = [...inspected.entries.values()].map(({ entry: _entry, ...rest }) => rest);
  return { manifest: inspected.manifest, manifestBytes: inspected.manifestBytes, signed: inspected.signed, entries };
}

async function inspect(zip: ZipFile, opts: ReadPackageOptions): Promise<Inspected> {
  const limits = { ...DEFAULT_LIMITS, ...opts.limits };
  // A malformed key is a configuration error, reported as such before the package is looked at.
  const publicKey = opts.publicKey ? (typeof opts.publicKey === "string" ? parsePublicKey(opts.publicKey) : opts.publicKey) : null;
  const entries = await scanEntries(zip, limits);

  const manifestEntry = entries.get(MANIFEST_FILE);
  if (manifestEntry?.kind !== "file") {
    throw new MoonflashError("INVALID_MANIFEST", `The package has no ${MANIFEST_FILE} at the root of the zip.`, {});
  }
  if (manifestEntry.size > limits.maxManifestBytes) {
    throw new MoonflashError("INVALID_MANIFEST", `${MANIFEST_FILE} is ${manifestEntry.size} bytes, over the limit of ${limits.maxManifestBytes}.`, {
      size: manifestEntry.size,
      limit: limits.maxManifestBytes,
    });
  }
  const manifestBytes = await readSmallEntry(zip, manifestEntry);

  // The signature is checked before the manifest is parsed: with a key configured, unsigned JSON is not even read.
  let signed = false;
  if (publicKey) {
    const sigEntry = entries.get(SIGNATURE_FILE);
    let signature: Buffer | null = null;
    if (sigEntry?.kind === "file") {
      signature = sigEntry.size <= MAX_SIGNATURE_BYTES ? await readSmallEntry(zip, sigEntry) : Buffer.alloc(0);
    }
    verifyManifestSignature(manifestBytes, signature, publicKey);
    signed = true;
  }

  const manifest = parseManifest(manifestBytes);
  checkEntriesAgainstManifest(entries, manifest);
  throwIfCancelled(opts.signal);
  if (opts.verifyContents) {
    for (const payload of payloadsOf(manifest)) {
      const info = entries.get(payload.src);
      if (!info) continue; // cannot happen after checkEntriesAgainstManifest
      const { sha256 } = await pumpEntry(zip, info, () => undefined, opts.signal);
      if (sha256 !== payload.sha256) throw sha256Mismatch(payload, sha256);
    }
  }
  return { manifest, manifestBytes, signed, entries };
}

async function openZip(zipPath: string): Promise<ZipFile> {
  const { openPromise } = commonJsModule(await import("yauzl"));
  try {
    // decodeStrings: false, so names are decoded and checked here, strictly (yauzl would turn '\' into '/').
    return await openPromise(zipPath, { lazyEntries: true, autoClose: false, decodeStrings: false, validateEntrySizes: true, strictFileNames: true });
  } catch (err) {
    const errno = (err as NodeJS.ErrnoException).code;
    if (errno === "ENOENT") throw new MoonflashError("NO_PACKAGE", `There is no package at ${zipPath}.`, { path: zipPath }, { cause: err });
    if (errno === "EACCES" || errno === "EPERM") {
      throw new MoonflashError("PERMISSION_DENIED", `moonflash may not read the package ${zipPath}.`, { path: zipPath }, { cause: err });
    }
    throw new MoonflashError("INVALID_PACKAGE", `${zipPath} is not a readable zip file: ${(err as Error).message}.`, { path: zipPath }, { cause: err });
  }
}

// --- the central directory ---

const S_IFMT = 0o170000;
const S_IFREG = 0o100000;
const S_IFDIR = 0o040000;
const S_IFLNK = 0o120000;
const SPECIAL_TYPES: Record<number, string> = { 0o010000: "a FIFO", 0o020000: "a character device", 0o060000: "a block device", 0o140000: "a socket" };
const DOS_DIRECTORY = 0x10;
const DOS_REPARSE_POINT = 0x400; // Windows symlinks and junctions
const FLAG_ENCRYPTED = 0x1;
const FLAG_UTF8 = 0x800;
const EXTRA_PKWARE_UNIX = 0x000d; // atime, mtime, uid, gid (12 bytes), then the target of a hard or symbolic link
const EXTRA_UNICODE_PATH = 0x7075; // Info-ZIP: a second name, which other tools would extract to
const METHOD_STORED = 0;
const METHOD_DEFLATE = 8;

function invalidPackage(name: string, problem: string, details: Record<string, unknown> = {}): MoonflashError {
  return new MoonflashError("INVALID_PACKAGE", `The package is unsafe or malformed: '${printable(name)}' ${problem}. Nothing was touched.`, {
    entry: name,
    problem,
    ...details,
  });
}

async function scanEntries(zip: ZipFile, limits: PackageLimits): Promise<Map<string, CheckedEntry>> {
  if (zip.entryCount > limits.maxEntries) {
    throw new MoonflashError("INVALID_PACKAGE", `The package has ${zip.entryCount} entries, over the limit of ${limits.maxEntries}.`, {
      entries: zip.entryCount,
      limit: limits.maxEntries,
    });
  }
  const entries = new Map<string, CheckedEntry>();
  let total = 0;
  try {
    for await (const entry of zip.eachEntry()) {
      const checked = checkEntry(entry, limits);
      if (entries.has(checked.name)) throw invalidPackage(checked.name, "appears twice in the zip");
      total += checked.size;
      if (total > limits.maxTotalBytes) {
        throw invalidPackage(checked.name, `brings the uncompressed total over the limit of ${limits.maxTotalBytes} bytes`, { limit: limits.maxTotalBytes });
      }
      entries.set(checked.name, checked);
    }
  } catch (err) {
    if (isMoonflashError(err)) throw err;
    throw new MoonflashError("INVALID_PACKAGE", `The package is not a valid zip: ${(err as Error).message}.`, {}, { cause: err });
  }
  // "a" as a file and "a/b" cannot both be extracted.
  for (const name of entries.keys()) {
    for (let parent = parentOf(name); parent !== null; parent = parentOf(parent)) {
      if (entries.get(parent)?.kind === "file") throw invalidPackage(parent, `is a file, but '${printable(name)}' needs it as a directory`);
    }
  }
  return entries;
}

function parentOf(name: string): string | null {
  const slash = name.lastIndexOf("/");
  return slash > 0 ? name.slice(0, slash) : null;
}

/** One central-directory entry: name, type, method and sizes, or INVALID_PACKAGE naming what is wrong. */
function checkEntry(entry: Entry, limits: PackageLimits): CheckedEntry {
  const rawName = entryName(entry);
  const isDirectory = rawName.endsWith("/");
  const name = isDirectory ? rawName.slice(0, -1) : rawName;
  const problem = pathProblem(name);
  if (problem) throw invalidPackage(rawName, problem);

  const unixMode = entry.externalFileAttributes >>> 16;
  const type = unixMode & S_IFMT;
  const dosAttributes = entry.externalFileAttributes & 0xffff;
  if (type === S_IFLNK) throw invalidPackage(rawName, "is a symbolic link");
  const special = SPECIAL_TYPES[type];
  if (special) throw invalidPackage(rawName, `is ${special}`);
  if (type !== 0 && type !== S_IFREG && type !== S_IFDIR) throw invalidPackage(rawName, `has an unknown file type (mode 0${unixMode.toString(8)})`);
  if (dosAttributes & DOS_REPARSE_POINT) throw invalidPackage(rawName, "is a link (a Windows reparse point)");
  for (const extra of entry.extraFields) {
    if (extra.id === EXTRA_PKWARE_UNIX && extra.data.length > 12) throw invalidPackage(rawName, "is a hard or symbolic link (PKWARE Unix extra field)");
  }
  // A trailing '/' makes a directory (some packers set no type for them); the attributes may not say otherwise.
  if (isDirectory && type === S_IFREG) throw invalidPackage(rawName, "ends in '/' but is marked as a regular file");
  if (!isDirectory && (type === S_IFDIR || (type === 0 && (dosAttributes & DOS_DIRECTORY) !== 0))) {
    throw invalidPackage(rawName, "is marked as a directory but does not end in '/'");
  }

  if (entry.generalPurposeBitFlag & FLAG_ENCRYPTED) throw invalidPackage(rawName, "is encrypted");
  if (entry.compressionMethod !== METHOD_STORED && entry.compressionMethod !== METHOD_DEFLATE) {
    throw invalidPackage(rawName, `uses compression method ${entry.compressionMethod}; only stored (0) and deflate (8) are read`);
  }
  const size = entry.uncompressedSize;
  if (isDirectory && (size !== 0 || entry.compressedSize !== 0)) throw invalidPackage(rawName, "is a directory with data");
  if (size > limits.maxFileBytes) {
    throw invalidPackage(rawName, `is ${size} bytes, over the limit of ${limits.maxFileBytes} per file`, { size, limit: limits.maxFileBytes });
  }
  if (size >= RATIO_CHECK_MIN_BYTES && size > Math.max(entry.compressedSize, 1) * limits.maxCompressionRatio) {
    const ratio = Math.round(size / Math.max(entry.compressedSize, 1));
    throw invalidPackage(rawName, `inflates ${ratio}:1 (${entry.compressedSize} → ${size} bytes), over the limit of ${limits.maxCompressionRatio}:1; refused as a zip bomb`, {
      ratio,
      limit: limits.maxCompressionRatio,
    });
  }
  return {
    name,
    kind: isDirectory ? "directory" : "file",
    size,
    compressedSize: entry.compressedSize,
    mode: unixMode === 0 ? null : unixMode & 0o7777,
    entry,
  };
}

/** The entry's name as bytes say: UTF-8 when flagged, else ASCII only; one name, not a second in an extra field. */
function entryName(entry: Entry): string {
  // With decodeStrings: false, yauzl leaves the raw bytes in fileName.
  const raw = entry.fileNameRaw;
  const shown = raw.toString("latin1");
  let name: string;
  if (entry.generalPurposeBitFlag & FLAG_UTF8) {
    try {
      name = new TextDecoder("utf-8", { fatal: true }).decode(raw);
    } catch {
      throw invalidPackage(shown, "has a name that is not valid UTF-8");
    }
  } else if (raw.every((byte) => byte < 0x80)) {
    name = shown;
  } else {
    // CP437 names are legal zip, but no packer of ours writes them; refusing avoids guessing the encoding.
    throw invalidPackage(shown, "has a non-ASCII name without the zip's UTF-8 flag");
  }
  for (const extra of entry.extraFields) {
    if (extra.id !== EXTRA_UNICODE_PATH || extra.data.length < 5) continue;
    const other = extra.data.subarray(5).toString("utf8");
    if (other !== name) throw invalidPackage(name, `has a second name '${printable(other)}' in an Info-ZIP Unicode path field`);
  }
  return name;
}

function checkEntriesAgainstManifest(entries: Map<string, CheckedEntry>, manifest: Manifest): void {
  const payloads = payloadsOf(manifest);
  const wanted = new Set(payloads.map((payload) => payload.src));
  for (const [name, info] of entries) {
    if (info.kind === "file" && (name === MANIFEST_FILE || name === SIGNATURE_FILE)) continue;
    if (info.kind === "file" && !wanted.has(name)) throw invalidPackage(name, "is in the zip but not in the manifest");
    if (info.kind === "directory" && ![...wanted].some((src) => src.startsWith(`${name}/`))) {
      throw invalidPackage(`${name}/`, "is a directory in the zip that holds no file of the manifest");
    }
  }
  for (const payload of payloads) {
    const info = entries.get(payload.src);
    if (info?.kind !== "file") {
      throw invalidPackage(payload.src, `is listed by module '${payload.module.id}' but missing from the zip`, { module: payload.module.id });
    }
    if (info.size !== payload.size) {
      throw invalidPackage(payload.src, `is ${info.size} bytes in the zip but ${payload.size} in the manifest`, { module: payload.module.id });
    }
  }
}

// --- file data ---

/**
 * Checking and extracting a package reads hundreds of MB through fresh buffers, two per 16 KiB (the read and the
 * inflated chunk), so a minor collection per 256 KiB inflated; see gc-pacer.ts.
 */
const streamedGarbage = new GarbagePacer(256 * 1024);

/**
 * Inflates one entry chunk by chunk into `onChunk`, counting bytes and hashing. Never accepts more than the
 * declared size (a lying header is refused while inflating, not after), nor less.
 */
async function pumpEntry(zip: ZipFile, info: CheckedEntry, onChunk: (chunk: Buffer) => unknown, signal?: AbortSignal): Promise<{ sha256: string }> {
  const hash = process.getBuiltinModule("node:crypto").createHash("sha256");
  let stream: NodeJS.ReadableStream & { destroy(): void };
  try {
    stream = await zip.openReadStreamPromise(info.entry);
  } catch (err) {
    throw unreadable(info, err);
  }
  let bytes = 0;
  try {
    const chunks = stream[Symbol.asyncIterator]();
    while (true) {
      // Between chunks: a large package is checked or extracted for a while, and a cancel must not wait for it.
      throwIfCancelled(signal);
      let step: IteratorResult<string | Buffer>;
      try {
        step = await chunks.next();
      } catch (err) {
        throw unreadable(info, err);
      }
      if (step.done) break;
      const chunk = Buffer.isBuffer(step.value) ? step.value : Buffer.from(step.value);
      bytes += chunk.length;
      if (bytes > info.size) throw inflatesTooMuch(info);
      hash.update(chunk);
      await onChunk(chunk);
      streamedGarbage.add(chunk.length);
    }
  } finally {
    stream.destroy();
  }
  if (bytes !== info.size) throw invalidPackage(info.name, `has ${bytes} bytes of data but declares ${info.size}`);
  return { sha256: hash.digest("hex") };
}

function throwIfCancelled(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw new MoonflashError("CANCELLED", "Checking the package was cancelled; nothing was installed.", {});
}

function inflatesTooMuch(info: CheckedEntry): MoonflashError {
  return invalidPackage(info.name, `inflates to more than the ${info.size} bytes its header declares; refused as a zip bomb`, { size: info.size });
}

function unreadable(info: CheckedEntry, err: unknown): MoonflashError {
  const message = (err as Error)?.message ?? String(err);
  // yauzl's own byte count (validateEntrySizes) may notice the overrun before ours does: the same refusal.
  if (/too many bytes/.test(message)) return inflatesTooMuch(info);
  const error = invalidPackage(info.name, `cannot be read (${message})`);
  return new MoonflashError(error.code, error.message, error.details, { cause: err });
}

/** Reads a small entry (manifest, signature) whole: its size is bounded by the caller. */
async function readSmallEntry(zip: ZipFile, info: CheckedEntry): Promise<Buffer> {
  const chunks: Buffer[] = [];
  await pumpEntry(zip, info, (chunk) => chunks.push(chunk));
  return Buffer.concat(chunks);
}

function sha256Mismatch(payload: Payload, actual: string): MoonflashError {
  return new MoonflashError(
    "SHA256_MISMATCH",
    `'${payload.src}' (module '${payload.module.id}') differs from its SHA-256 in the manifest; the package is damaged or was changed. Nothing was installed.`,
    { src: payload.src, module: payload.module.id, expected: payload.sha256, actual },
  );
}

/** Streams one entry to `target` through a temp file: counted, hashed, chmod, fsync, rename. */
async function streamToFile(zip: ZipFile, info: CheckedEntry, payload: Payload, target: string, signal?: AbortSignal): Promise<void> {
  const tmp = join(dirname(target), `.${basename(target)}.tmp`);
  const handle = await open(tmp, "wx", 0o600);
  let complete = false;
  try {
    const { sha256 } = await pumpEntry(zip, info, (chunk) => writeAll(handle, chunk), signal);
    if (sha256 !== payload.sha256) throw sha256Mismatch(payload, sha256);
    await handle.chmod(payload.mode); // the open mode went through the umask
    await handle.sync();
    complete = true;
  } finally {
    await handle.close();
    if (!complete) await rm(tmp, { force: true });
  }
  await rename(tmp, target);
}

async function writeAll(handle: FileHandle, chunk: Buffer): Promise<void> {
  for (let offset = 0; offset < chunk.length; ) {
    const { bytesWritten } = await handle.write(chunk, offset, chunk.length - offset);
    offset += bytesWritten;
  }
}

// --- targets ---

/**
 * Where each manifest file goes, checked on disk before anything is written: the alias is configured
 * (INVALID_MANIFEST), the target stays inside its root once the symlinks of existing directories are resolved and
 * is not itself a link, directory or special file, and no directory on the way is a file (PATH_REJECTED), no two
 * files land on one path (INVALID_MANIFEST), and this user may write the deepest existing directory of every
 * target (PERMISSION_DENIED). `roots` maps alias → absolute directory, from `[ota] roots`.
 */
export async function resolveTargets(manifest: Manifest, roots: ReadonlyMap<string, string>): Promise<ResolvedTarget[]> {
  const realRoots = new Map<string, string>();
  const resolved: ResolvedTarget[] = [];
  const byTarget = new Map<string, string>();
  for (const module of manifest.modules) {
    for (const file of module.files) {
      const parts = splitDst(file.dst);
      const rootDir = parts ? roots.get(parts.alias) : undefined;
      if (!parts || rootDir === undefined) {
        const known = [...roots.keys()].join(", ") || "none";
        throw new MoonflashError(
          "INVALID_MANIFEST",
          `${MANIFEST_FILE}: module '${module.id}' writes '${file.dst}', but [ota] roots defines no root '${parts?.alias ?? file.dst}' (defined: ${known}).`,
          { module: module.id, dst: file.dst, alias: parts?.alias ?? null, known: [...roots.keys()] },
        );
      }
      if (!isAbsolute(rootDir)) {
        throw new MoonflashError("CONFIG_INVALID", `[ota] roots: '${parts.alias}' must be an absolute directory, got '${rootDir}'.`, { alias: parts.alias });
      }
      let root = realRoots.get(parts.alias);
      if (root === undefined) {
        root = (await resolveExisting(rootDir, file.dst)).real;
        realRoots.set(parts.alias, root);
      }
      const lexical = resolve(rootDir, ...parts.relative.split("/"));
      const parent = await resolveExisting(dirname(lexical), file.dst);
      const target = join(parent.real, basename(lexical));
      if (!isInside(root, target)) {
        throw new MoonflashError(
          "PATH_REJECTED",
          `${file.dst} would be written to ${target}, outside its root ${root}, through a symbolic link on the way. Nothing was changed.`,
          { module: module.id, dst: file.dst, target, root },
        );
      }
      const exists = parent.missing === 0 && (await checkExistingTarget(target, file.dst));
      await checkWritable(parent.existing, file.dst);
      const other = byTarget.get(target);
      if (other !== undefined) {
        throw new MoonflashError("INVALID_MANIFEST", `${MANIFEST_FILE}: '${other}' and '${file.dst}' both go to ${target}.`, { target, dst: [other, file.dst] });
      }
      byTarget.set(target, file.dst);
      resolved.push({ module, file, alias: parts.alias, root, target, exists });
    }
  }
  // One target inside another ("a" a file, "a/b" a file) cannot both be written, also across aliases.
  for (const [target, dst] of byTarget) {
    for (let dir = dirname(target); dir !== dirname(dir); dir = dirname(dir)) {
      const other = byTarget.get(dir);
      if (other !== undefined) {
        throw new MoonflashError("INVALID_MANIFEST", `${MANIFEST_FILE}: '${other}' is a file, but '${dst}' needs ${dir} as a directory.`, { dst: [other, dst] });
      }
    }
  }
  return resolved;
}

/** Whether `path` is strictly inside `root` (path.relative, never a string prefix: /opt/app vs /opt/app_evil). */
function isInside(root: string, path: string): boolean {
  const rel = relative(root, path);
  return rel !== "" && !isAbsolute(rel) && rel.split(sep)[0] !== "..";
}

/**
 * The real path of `path`: the deepest existing ancestor with its symlinks resolved, plus the missing rest.
 * `existing` is that ancestor (a directory), `missing` how many segments do not exist yet.
 */
async function resolveExisting(path: string, dst: string): Promise<{ real: string; existing: string; missing: number }> {
  const missing: string[] = [];
  for (let current = path; ; current = dirname(current)) {
    let real: string;
    try {
      real = await realpath(current);
    } catch (err) {
      const errno = (err as NodeJS.ErrnoException).code;
      if (errno === "ENOENT" && current !== dirname(current)) {
        // A dangling symlink also gives ENOENT: it is there, and creating through it would follow it.
        if (await pathExists(current)) throw pathRejected(dst, current, "is a symbolic link to nothing");
        missing.unshift(basename(current));
        continue;
      }
      if (errno === "ENOTDIR") throw pathRejected(dst, current, "goes through a file where a directory is needed");
      if (errno === "ELOOP") throw pathRejected(dst, current, "is a loop of symbolic links");
      if (errno === "EACCES") {
        throw new MoonflashError("PERMISSION_DENIED", `moonflash may not look into ${current} (needed for ${dst}).`, { dst, path: current }, { cause: err });
      }
      throw toMoonflashError(err);
    }
    if (!(await stat(real)).isDirectory()) throw pathRejected(dst, current, "is a file where a directory is needed");
    return { real: join(real, ...missing), existing: real, missing: missing.length };
  }
}

/** True when a regular file is at the target (it will be replaced); anything else there is PATH_REJECTED. */
async function checkExistingTarget(target: string, dst: string): Promise<boolean> {
  let info;
  try {
    info = await lstat(target);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return false;
    throw toMoonflashError(err);
  }
  if (info.isSymbolicLink()) throw pathRejected(dst, target, "is a symbolic link; moonflash replaces files, not links");
  if (info.isDirectory()) throw pathRejected(dst, target, "is a directory");
  if (!info.isFile()) throw pathRejected(dst, target, "is not a regular file");
  return true;
}

async function checkWritable(dir: string, dst: string): Promise<void> {
  try {
    // Creating or replacing an entry needs write and search permission on the directory.
    await access(dir, constants.W_OK | constants.X_OK);
  } catch (err) {
    const uid = process.getuid?.() ?? "?";
    throw new MoonflashError(
      "PERMISSION_DENIED",
      `moonflash (uid ${uid}) may not write in ${dir}, needed for ${dst}: fix its owner or mode. Nothing was changed.`,
      { dst, path: dir, errno: (err as NodeJS.ErrnoException).code },
      { cause: err },
    );
  }
}

function pathRejected(dst: string, path: string, problem: string): MoonflashError {
  return new MoonflashError("PATH_REJECTED", `${dst}: ${path} ${problem}. Nothing was changed.`, { dst, path, problem });
}

async function pathExists(path: string): Promise<boolean> {
  try {
    await lstat(path);
    return true;
  } catch {
    return false;
  }
}

/** An error while writing the staging directory, as the code a user can act on. */
function fsFailure(err: unknown, path: string): MoonflashError {
  if (isMoonflashError(err)) return err;
  const errno = (err as NodeJS.ErrnoException).code;
  if (errno === "ENOSPC" || errno === "EDQUOT") {
    return new MoonflashError("DISK_FULL", `No room to extract the package to ${path}; free some space and try again.`, { path }, { cause: err });
  }
  if (errno === "EACCES" || errno === "EPERM" || errno === "EROFS") {
    return new MoonflashError("PERMISSION_DENIED", `moonflash may not write the staging directory ${path}.`, { path }, { cause: err });
  }
  return toMoonflashError(err);
}
