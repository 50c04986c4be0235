// Making an OTA package: fills in each file's SHA-256 and size, checks the manifest and the sizes as a printer would
// (its default limits unless told others), signs it when given a private key, writes the zip (manifest.json first,
// then manifest.sig, then the files) to a temp file, reads that back with the printer's reader and only then
// renames it over `out`. So a vendor needs no other tool, and a refused package never replaces a good one.
//
// yazl is loaded on first use (dynamic import) and node:crypto through process.getBuiltinModule: idle memory.

import { createReadStream, createWriteStream } from "node:fs";
import { rename, rm, stat } from "node:fs/promises";
import { basename, dirname, join, resolve } from "node:path";
import type { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import { commonJsModule } from "../core/commonjs.js";
import { fsyncDir } from "../core/durable.js";
import { MoonflashError, toMoonflashError } from "../core/errors.js";
import { MANIFEST_FILE, SIGNATURE_FILE, parseManifest, payloadsOf, type Manifest, type ProcessRef } from "./manifest.js";
import { DEFAULT_LIMITS, readPackage, type PackageLimits } from "./package.js";
import { publicKeyOf, sign } from "./signing.js";

/** A manifest file as a vendor writes it: sha256 and size are computed when left out, and checked when given. */
export interface ManifestFileInput {
  src: string;
  dst: string;
  sha256?: string;
  size?: number;
  /** A number (420) or an octal string ("0644"); 0644 when left out. */
  mode?: number | string;
}

export interface ManifestModuleInput {
  id: string;
  type?: "files" | "firmware";
  depends?: string[];
  files?: ManifestFileInput[];
  service?: string;
  process?: ProcessRef;
  mcu?: string;
  image?: { src: string; sha256?: string; size?: number };
}

export interface ManifestInput {
  name: string;
  version: string;
  min_version?: string;
  modules: ManifestModuleInput[];
}

export interface PackOptions {
  manifest: ManifestInput;
  /** Every `src` of the manifest (files and firmware images) → the absolute path of the file to put there. */
  files: ReadonlyMap<string, string>;
  /** The zip to write; replaced atomically. */
  out: string;
  /** PKCS#8 PEM; when given, manifest.sig is written. */
  privateKey?: string;
  /** Overrides of the printer's default limits (DEFAULT_LIMITS), for printers whose [ota] limits differ. */
  limits?: Partial<PackageLimits>;
}

export interface PackResult {
  out: string;
  manifest: Manifest;
  manifestBytes: Buffer;
  /** manifest.sig's content, or null when unsigned. */
  signature: string | null;
}

// A fixed timestamp for every entry, so the same inputs make the same zip.
const ENTRY_MTIME = new Date("2020-01-01T00:00:00Z");
const S_IFREG = 0o100000;

/** Writes a package from a manifest and the files it names. See the file comment. */
export async function packPackage(opts: PackOptions): Promise<PackResult> {
  const out = resolve(opts.out);
  const manifestInput = await completeManifest(opts.manifest, opts.files);
  const manifestBytes = Buffer.from(`${JSON.stringify(manifestInput, null, 2)}\n`, "utf8");
  // The reader's own checks, so a package that a printer would refuse is never written.
  const manifest = parseManifest(manifestBytes);
  const signature = opts.privateKey ? sign(manifestBytes, opts.privateKey) : null;
  const limits: PackageLimits = { ...DEFAULT_LIMITS, ...opts.limits };
  checkLimits(manifest, manifestBytes.length, signature, limits);

  const { ZipFile } = commonJsModule(await import("yazl"));
  const zip = new ZipFile();
  zip.addBuffer(manifestBytes, MANIFEST_FILE, { mtime: ENTRY_MTIME, mode: S_IFREG | 0o644 });
  if (signature !== null) zip.addBuffer(Buffer.from(`${signature}\n`), SIGNATURE_FILE, { mtime: ENTRY_MTIME, mode: S_IFREG | 0o644, compress: false });
  for (const payload of payloadsOf(manifest)) {
    zip.addFile(sourceOf(opts.files, payload.src), payload.src, { mtime: ENTRY_MTIME, mode: S_IFREG | payload.mode });
  }
  // yazl reports a source file it cannot read on the ZipFile, not on its output: end the output with that error.
  zip.on("error", (err: Error) => (zip.outputStream as Readable).destroy(err));
  zip.end();

  const tmp = join(dirname(out), `.${basename(out)}.${process.pid}.tmp`);
  try {
    // flush: the data is fsynced before the stream closes, then the rename is made durable.
    await pipeline(zip.outputStream, createWriteStream(tmp, { flush: true, mode: 0o644 }));
    // A file changed between hashing and zipping, or a compression ratio over the limit, shows here, not on the printer.
    await readPackage(tmp, { limits, verifyContents: true, publicKey: opts.privateKey ? publicKeyOf(opts.privateKey) : null });
    await rename(tmp, out);
    await fsyncDir(dirname(out));
  } catch (err) {
    await rm(tmp, { force: true });
    throw toMoonflashError(err);
  }
  return { out, manifest, manifestBytes, signature };
}

/**
 * The reader's limits that are known before compressing (entries, file, total and manifest size), with the
 * reader's codes, so nothing is written for a package a printer would refuse. The compression ratio is only known
 * once written: the read-back checks it.
 */
function checkLimits(manifest: Manifest, manifestSize: number, signature: string | null, limits: PackageLimits): void {
  const refuse = (code: "INVALID_PACKAGE" | "INVALID_MANIFEST", what: string, details: Record<string, unknown>) =>
    new MoonflashError(code, `${what}, so a printer would refuse the package. Nothing was written.`, details);
  if (manifestSize > limits.maxManifestBytes) {
    throw refuse("INVALID_MANIFEST", `${MANIFEST_FILE} is ${manifestSize} bytes, over the limit of ${limits.maxManifestBytes} (manifest_size)`, {
      size: manifestSize, limit: limits.maxManifestBytes, limitName: "manifest_size",
    });
  }
  const payloads = payloadsOf(manifest);
  const entries = payloads.length + 1 + (signature === null ? 0 : 1);
  if (entries > limits.maxEntries) {
    throw refuse("INVALID_PACKAGE", `The package would have ${entries} entries, over the limit of ${limits.maxEntries} (entries)`, { entries, limit: limits.maxEntries, limitName: "entries" });
  }
  let total = manifestSize + (signature === null ? 0 : signature.length + 1);
  for (const payload of payloads) {
    if (payload.size > limits.maxFileBytes) {
      throw refuse("INVALID_PACKAGE", `'${payload.src}' is ${payload.size} bytes, over the limit of ${limits.maxFileBytes} per file (file_size)`, {
        entry: payload.src, size: payload.size, limit: limits.maxFileBytes, limitName: "file_size",
      });
    }
    total += payload.size;
  }
  if (total > limits.maxTotalBytes) {
    throw refuse("INVALID_PACKAGE", `The package's entries add up to ${total} bytes uncompressed, over the limit of ${limits.maxTotalBytes} (total_size)`, { total, limit: limits.maxTotalBytes, limitName: "total_size" });
  }
}

/** The manifest with every sha256 and size filled in from the files, and the files map checked against it. */
async function completeManifest(input: ManifestInput, files: ReadonlyMap<string, string>): Promise<ManifestInput> {
  const used = new Set<string>();
  const complete = async <T extends { src: string; sha256?: string; size?: number }>(entry: T, module: string): Promise<T> => {
    const path = sourceOf(files, entry.src);
    used.add(entry.src);
    const actual = await hashFile(path);
    if (entry.size !== undefined && entry.size !== actual.size) {
      throw new MoonflashError("INVALID_MANIFEST", `${MANIFEST_FILE}: module '${module}': '${entry.src}' is ${actual.size} bytes (${path}), but the manifest says ${entry.size}.`, {
        src: entry.src,
        path,
      });
    }
    if (entry.sha256 !== undefined && entry.sha256.toLowerCase() !== actual.sha256) {
      throw new MoonflashError("SHA256_MISMATCH", `'${entry.src}' (${path}) differs from the SHA-256 the manifest gives for it.`, {
        src: entry.src,
        path,
        expected: entry.sha256,
        actual: actual.sha256,
      });
    }
    return { ...entry, sha256: actual.sha256, size: actual.size };
  };
  const modules: ManifestModuleInput[] = [];
  for (const module of input.modules) {
    const completed: ManifestModuleInput = { ...module };
    if (module.files) {
      completed.files = [];
      for (const file of module.files) completed.files.push(await complete(file, module.id));
    }
    if (module.image) completed.image = await complete(module.image, module.id);
    modules.push(completed);
  }
  const unused = [...files.keys()].filter((src) => !used.has(src));
  if (unused.length > 0) {
    throw new MoonflashError("INVALID_PARAMS", `Files given for ${unused.map((s) => `'${s}'`).join(", ")}, which the manifest does not list.`, { unused });
  }
  return { ...input, modules };
}

function sourceOf(files: ReadonlyMap<string, string>, src: string): string {
  const path = files.get(src);
  if (path === undefined) throw new MoonflashError("INVALID_PARAMS", `The manifest lists '${src}', but no file was given for it.`, { src });
  return path;
}

async function hashFile(path: string): Promise<{ sha256: string; size: number }> {
  try {
    if (!(await stat(path)).isFile()) throw new MoonflashError("INVALID_PARAMS", `${path} is not a regular file.`, { path });
    const hash = process.getBuiltinModule("node:crypto").createHash("sha256");
    let size = 0;
    for await (const chunk of createReadStream(path)) {
      hash.update(chunk as Buffer);
      size += (chunk as Buffer).length;
    }
    return { sha256: hash.digest("hex"), size };
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") {
      throw new MoonflashError("INVALID_PARAMS", `${path} does not exist.`, { path }, { cause: err });
    }
    throw toMoonflashError(err);
  }
}
