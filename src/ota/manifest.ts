// The OTA package's manifest.json: its schema, and the checks a schema cannot express (paths that stay inside
// their root, unique files, dependencies that exist, have no cycle and come first). Pure: no I/O.
//
// A package is a zip with manifest.json at its root:
//   { "name": "acme-k1", "version": "1.4.0", "min_version": "1.2.0",
//     "modules": [
//       { "id": "klipper", "service": "klipper",
//         "files": [{ "src": "klipper/printer.cfg", "dst": "config/printer.cfg", "sha256": "…", "size": 1234,
//                     "mode": "0644" }] },
//       { "id": "toolhead", "type": "firmware", "depends": ["klipper"], "mcu": "toolhead",
//         "image": { "src": "fw/toolhead.bin", "sha256": "…", "size": 30000 } } ] }
// Modules are listed in dependency order. `dst` is "<root alias>/<relative path>"; the aliases come only from
// moonflash.conf ([ota] roots), never from the package. A firmware module's image is flashed by the flash engine
// after the module's files are in place.
//
// Error codes: the shape of the JSON, dependencies and duplicate destinations are INVALID_MANIFEST; a path that
// could leave its directory (`..`, absolute, drive letter, backslash, NUL, empty segment) is INVALID_PACKAGE, the
// same code as such a name inside the zip.

import * as z from "zod/mini";
import "../core/zod.js";
import { MoonflashError } from "../core/errors.js";

/** The manifest's name at the root of the zip. */
export const MANIFEST_FILE = "manifest.json";
/** The optional Ed25519 signature of manifest.json (format: see signing.ts). */
export const SIGNATURE_FILE = "manifest.sig";

/** One file a module installs. `mode` is the permission mode as a number (0o644). */
export interface ManifestFile {
  /** Path of the file inside the zip. */
  src: string;
  /** "<root alias>/<relative path>". */
  dst: string;
  /** Lowercase hex. */
  sha256: string;
  size: number;
  mode: number;
}

/** A firmware module's image: a file in the zip that is flashed, not installed. */
export interface FirmwareImage {
  src: string;
  sha256: string;
  size: number;
}

/** A process to stop before a module's files are written and to start again after: by pidfile or exact name. */
export type ProcessRef = { pidfile: string } | { name: string };

interface ModuleBase {
  id: string;
  /** Ids of modules that must be installed first; each comes earlier in `modules`. */
  depends: string[];
  files: ManifestFile[];
  /** A Moonraker-managed service to stop before and start after; exclusive with `process`. */
  service: string | null;
  process: ProcessRef | null;
}

export interface FilesModule extends ModuleBase {
  type: "files";
}

export interface FirmwareModule extends ModuleBase {
  type: "firmware";
  /** The MCU as a user names it: "mcu", "toolhead" (for [mcu toolhead]). */
  mcu: string;
  image: FirmwareImage;
}

export type ManifestModule = FilesModule | FirmwareModule;

export interface Manifest {
  name: string;
  version: string;
  /** The oldest installed version of this package it updates; null = any (ota.install enforces it: engine.ts). */
  min_version: string | null;
  modules: ManifestModule[];
}

/** A file the zip must hold for the manifest: an installed file or a firmware image. */
export interface Payload {
  module: ManifestModule;
  kind: "file" | "image";
  src: string;
  sha256: string;
  size: number;
  mode: number;
}

/** Every file the manifest needs from the zip, in manifest order. */
export function payloadsOf(manifest: Manifest): Payload[] {
  const payloads: Payload[] = [];
  for (const module of manifest.modules) {
    for (const file of module.files) {
      payloads.push({ module, kind: "file", src: file.src, sha256: file.sha256, size: file.size, mode: file.mode });
    }
    if (module.type === "firmware") {
      const { src, sha256, size } = module.image;
      payloads.push({ module, kind: "image", src, sha256, size, mode: 0o644 });
    }
  }
  return payloads;
}

// --- paths ---

/** Why a relative path inside a package (zip entry name, src, the part of dst after the alias) is unsafe, or null. */
export function pathProblem(path: string): string | null {
  if (path === "") return "is empty";
  if (path.includes("\0")) return "contains a NUL byte";
  if (path.includes("\\")) return "contains a backslash";
  // Control characters have no business in a file name and hide other tricks in logs.
  if ([...path].some(isControl)) return "contains a control character";
  if (path.startsWith("/")) return "is absolute";
  if (/^[A-Za-z]:/.test(path)) return "starts with a drive letter";
  if (path.length > 1024) return "is longer than 1024 characters";
  for (const segment of path.split("/")) {
    if (segment === "") return "has an empty segment ('//' or a trailing '/')";
    if (segment === "..") return "has a '..' segment";
    if (segment === ".") return "has a '.' segment";
  }
  return null;
}

const ALIAS = /^[A-Za-z0-9_-]{1,64}$/;

/** "config/macros/a.cfg" → { alias: "config", relative: "macros/a.cfg" }; null when there is no alias part. */
export function splitDst(dst: string): { alias: string; relative: string } | null {
  const slash = dst.indexOf("/");
  if (slash <= 0) return null;
  return { alias: dst.slice(0, slash), relative: dst.slice(slash + 1) };
}

/** Why a dst is unsafe or malformed, or null. */
function dstProblem(dst: string): string | null {
  // The whole dst is checked as a path first, so that '/etc/x' or 'C:\x' are reported as what they are.
  const problem = pathProblem(dst);
  if (problem) return problem;
  const parts = splitDst(dst);
  if (parts === null) return "is not '<root alias>/<relative path>'";
  if (!ALIAS.test(parts.alias)) return `has a root alias '${parts.alias}' that is not letters, digits, '_' or '-'`;
  return null;
}

// --- schema ---

const TOKEN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
const token = (what: string) =>
  z.string().check(z.regex(TOKEN, `expected ${what}: letters, digits, '.', '_' or '-', at most 64, starting with a letter or digit`));

const sha256 = z.pipe(
  z.string().check(z.regex(/^[0-9A-Fa-f]{64}$/, "expected 64 hex digits (SHA-256)")),
  z.transform((hex: string) => hex.toLowerCase()),
);
const size = z.int().check(z.nonnegative("expected a size in bytes (a whole number, 0 or more)"));

/**
 * A permission mode: a JSON number is the mode's value (420 = 0o644); a string is octal ("0644", "644", "0o644").
 * Only permission bits, and not world-writable: setuid, setgid and sticky bits have no place in an update, and a
 * world-writable file in a printer's config lets any local user change what Klipper runs. `"mode": 644` (a number)
 * is 0o1204 and is refused with a hint, which catches the common slip of writing octal digits as a number.
 */
const mode = z.pipe(
  z.union([z.int(), z.string()]),
  z.transform((raw: number | string, ctx) => {
    const fail = (message: string) => {
      ctx.issues.push({ code: "custom", message, input: raw });
      return z.NEVER;
    };
    let value: number;
    if (typeof raw === "string") {
      const match = /^(?:0o?)?([0-7]{3})$/.exec(raw);
      if (!match?.[1]) return fail(`expected an octal mode like "0644", got "${raw}"`);
      value = Number.parseInt(match[1], 8);
    } else {
      value = raw;
      if (value < 0 || value > 0o777) {
        const hint = /^[0-7]{3}$/.test(String(raw)) ? ` (did you mean "0${raw}"?)` : "";
        return fail(`expected a permission mode from 0 to 0777 (511), got ${raw}${hint}`);
      }
    }
    if (value & 0o002) return fail(`mode 0${value.toString(8)} is world-writable; use 0644 or 0755`);
    return value;
  }),
);

const fileSchema = z.strictObject({
  src: z.string(),
  dst: z.string(),
  sha256,
  size,
  mode: z._default(mode, 0o644),
});

const imageSchema = z.strictObject({ src: z.string(), sha256, size });

const processSchema = z.union([
  z.strictObject({ pidfile: z.string().check(z.regex(/^\/[^\0]*$/, "expected an absolute path")) }),
  z.strictObject({ name: z.string().check(z.regex(/^[^\0/]{1,255}$/, "expected a process name without '/'")) }),
]);

const moduleSchema = z.pipe(
  z
    .strictObject({
      id: token("a module id"),
      type: z._default(z.enum(["files", "firmware"]), "files"),
      depends: z._default(z.array(z.string()), []),
      files: z._default(z.array(fileSchema), []),
      service: z.optional(z.string().check(z.regex(/^[A-Za-z0-9][A-Za-z0-9@._-]{0,127}$/, "expected a service name like 'klipper'"))),
      process: z.optional(processSchema),
      mcu: z.optional(z.string().check(z.regex(/^[A-Za-z0-9_-]{1,64}$/, "expected an MCU name like 'mcu' or 'toolhead'"))),
      image: z.optional(imageSchema),
    })
    .check(
      z.superRefine((module, ctx) => {
        if (module.service !== undefined && module.process !== undefined) {
          ctx.addIssue({ code: "custom", path: ["process"], message: "give service or process, not both" });
        }
        if (module.type === "firmware") {
          if (module.mcu === undefined) ctx.addIssue({ code: "custom", path: ["mcu"], message: "a firmware module needs the mcu to flash" });
          if (module.image === undefined) ctx.addIssue({ code: "custom", path: ["image"], message: "a firmware module needs an image" });
        } else {
          if (module.mcu !== undefined) ctx.addIssue({ code: "custom", path: ["mcu"], message: 'only a module of type "firmware" names an mcu' });
          if (module.image !== undefined) ctx.addIssue({ code: "custom", path: ["image"], message: 'only a module of type "firmware" has an image' });
          if (module.files.length === 0) ctx.addIssue({ code: "custom", path: ["files"], message: "a module needs at least one file" });
        }
      }),
    ),
  z.transform((m): ManifestModule => {
    const base = { id: m.id, depends: m.depends, files: m.files, service: m.service ?? null, process: m.process ?? null };
    return m.type === "firmware" && m.mcu !== undefined && m.image !== undefined
      ? { ...base, type: "firmware", mcu: m.mcu, image: m.image }
      : { ...base, type: "files" };
  }),
);

const VERSION = /^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$/;
const version = z.string().check(z.regex(VERSION, "expected a version like 1.4.0 (letters, digits, '.', '+', '_', '-')"));

const manifestSchema = z.pipe(
  z.strictObject({
    name: token("a package name"),
    version,
    min_version: z.optional(version),
    modules: z.array(moduleSchema).check(z.minLength(1, "expected at least one module")),
  }),
  z.transform((m): Manifest => ({ name: m.name, version: m.version, min_version: m.min_version ?? null, modules: m.modules })),
);

// --- versions ---

/**
 * Orders two manifest versions (negative: a is older): semver-like. Build metadata after '+' is ignored; the part
 * before the first '-' is compared by its '.'-separated parts, numbers as numbers ("2.10" > "2.9"), missing parts
 * as 0 ("1.4" = "1.4.0"), a number below text; then a version with a pre-release ("1.4.0-rc.1", after '-') is
 * older than the one without, and two pre-releases are compared part by part the same way.
 */
export function compareVersions(a: string, b: string): number {
  const split = (v: string) => {
    const bare = v.split("+")[0]!;
    const dash = bare.indexOf("-");
    return dash < 0 ? { core: bare.split("."), pre: null } : { core: bare.slice(0, dash).split("."), pre: bare.slice(dash + 1).split(".") };
  };
  const x = split(a);
  const y = split(b);
  const core = compareParts(x.core, y.core, "0");
  if (core !== 0) return core;
  if (x.pre === null || y.pre === null) return x.pre === y.pre ? 0 : x.pre === null ? 1 : -1;
  return compareParts(x.pre, y.pre, null);
}

/** Part by part; a missing part is `missing`, or (null) sorts first, as semver's shorter pre-release does. */
function compareParts(x: string[], y: string[], missing: string | null): number {
  for (let i = 0; i < Math.max(x.length, y.length); i++) {
    const p = x[i] ?? missing;
    const q = y[i] ?? missing;
    if (p === null || q === null) return p === q ? 0 : p === null ? -1 : 1;
    const order = comparePart(p, q);
    if (order !== 0) return order;
  }
  return 0;
}

function comparePart(p: string, q: string): number {
  const numeric = /^\d+$/;
  const pn = numeric.test(p);
  const qn = numeric.test(q);
  if (pn && qn) {
    // As digit strings, so no part is too long for a number: fewer digits (without leading zeros) is smaller.
    const pd = p.replace(/^0+(?=\d)/, "");
    const qd = q.replace(/^0+(?=\d)/, "");
    return pd.length !== qd.length ? pd.length - qd.length : pd < qd ? -1 : pd > qd ? 1 : 0;
  }
  if (pn !== qn) return pn ? -1 : 1;
  return p < q ? -1 : p > q ? 1 : 0;
}

// --- parsing and checks ---

function invalidManifest(message: string, details: Record<string, unknown> = {}, cause?: unknown): MoonflashError {
  return new MoonflashError("INVALID_MANIFEST", `${MANIFEST_FILE}: ${message}`, details, cause === undefined ? undefined : { cause });
}

/** "modules[0].files[1].sha256" for a zod issue path. */
function issuePath(path: readonly PropertyKey[]): string {
  return path.map((key, i) => (typeof key === "number" ? `[${key}]` : i === 0 ? String(key) : `.${String(key)}`)).join("");
}

/**
 * Parses manifest.json's exact bytes into a checked Manifest. INVALID_MANIFEST for anything wrong with the JSON,
 * its shape or its dependencies; INVALID_PACKAGE for an unsafe path.
 */
export function parseManifest(bytes: Uint8Array): Manifest {
  let text: string;
  try {
    text = new TextDecoder("utf-8", { fatal: true, ignoreBOM: false }).decode(bytes);
  } catch (err) {
    throw invalidManifest("is not UTF-8 text", {}, err);
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw invalidManifest(`is not valid JSON (${(err as Error).message})`, {}, err);
  }
  const result = manifestSchema.safeParse(json);
  if (!result.success) {
    const issues = result.error.issues.map((issue) => {
      const where = issue.path.length > 0 ? issuePath(issue.path) : "manifest";
      return issue.code === "unrecognized_keys" ? `${where}: unknown key(s) ${issue.keys.map((k) => `'${k}'`).join(", ")}` : `${where}: ${issue.message}`;
    });
    throw invalidManifest(issues.join("; "), { issues });
  }
  checkManifest(result.data);
  return result.data;
}

/** The checks across fields: safe and unique paths, reserved names, module ids, dependencies. */
export function checkManifest(manifest: Manifest): void {
  checkPaths(manifest);
  checkDependencies(manifest.modules);
}

function checkPaths(manifest: Manifest): void {
  const srcSeen = new Map<string, string>();
  const dstSeen = new Map<string, string>();
  for (const payload of payloadsOf(manifest)) {
    const where = `module '${payload.module.id}'`;
    const problem = pathProblem(payload.src);
    if (problem) {
      throw new MoonflashError("INVALID_PACKAGE", `${MANIFEST_FILE}: ${where}: src '${printable(payload.src)}' ${problem}.`, {
        module: payload.module.id,
        src: payload.src,
        problem,
      });
    }
    if (payload.src === MANIFEST_FILE || payload.src === SIGNATURE_FILE) {
      throw invalidManifest(`${where}: src '${payload.src}' is reserved for the package itself`, { module: payload.module.id, src: payload.src });
    }
    const other = srcSeen.get(payload.src);
    if (other !== undefined) {
      throw invalidManifest(`src '${payload.src}' is listed twice (${other} and ${where}); every file in the zip is used once`, { src: payload.src });
    }
    srcSeen.set(payload.src, where);
  }
  for (const module of manifest.modules) {
    for (const file of module.files) {
      const where = `module '${module.id}'`;
      const problem = dstProblem(file.dst);
      if (problem) {
        throw new MoonflashError("INVALID_PACKAGE", `${MANIFEST_FILE}: ${where}: dst '${printable(file.dst)}' ${problem}.`, {
          module: module.id,
          dst: file.dst,
          problem,
        });
      }
      const other = dstSeen.get(file.dst);
      if (other !== undefined) {
        throw invalidManifest(`dst '${file.dst}' is written twice (${other} and ${where})`, { dst: file.dst });
      }
      dstSeen.set(file.dst, where);
    }
  }
  // A dst that is a directory of another ("config/a" and "config/a/b.cfg") cannot be both a file and a directory.
  for (const dst of dstSeen.keys()) {
    const segments = dst.split("/");
    for (let i = 2; i < segments.length; i++) {
      const parent = segments.slice(0, i).join("/");
      if (dstSeen.has(parent)) throw invalidManifest(`dst '${parent}' is a file, but '${dst}' needs it as a directory`, { dst });
    }
  }
}

function checkDependencies(modules: ManifestModule[]): void {
  const position = new Map<string, number>();
  modules.forEach((module, i) => {
    if (position.has(module.id)) throw invalidManifest(`module id '${module.id}' is used twice`, { module: module.id });
    position.set(module.id, i);
  });
  for (const module of modules) {
    for (const dep of module.depends) {
      if (!position.has(dep)) {
        throw invalidManifest(`module '${module.id}' depends on '${dep}', which the manifest does not define (modules: ${[...position.keys()].join(", ")})`, {
          module: module.id,
          dependency: dep,
        });
      }
    }
  }
  const cycle = findCycle(modules);
  if (cycle) throw invalidManifest(`modules depend on each other in a cycle: ${cycle.join(" → ")}`, { cycle });
  // Installation follows the list, so the list must already be in dependency order.
  modules.forEach((module, i) => {
    for (const dep of module.depends) {
      if ((position.get(dep) ?? -1) > i) {
        throw invalidManifest(`module '${module.id}' depends on '${dep}', which comes after it; list modules in dependency order`, {
          module: module.id,
          dependency: dep,
        });
      }
    }
  });
}

/** A dependency cycle as ids ["a", "b", "a"], or null. Depth-first with the path on a stack. */
function findCycle(modules: ManifestModule[]): string[] | null {
  const depends = new Map(modules.map((m) => [m.id, m.depends]));
  const done = new Set<string>();
  const onPath: string[] = [];
  const visit = (id: string): string[] | null => {
    const at = onPath.indexOf(id);
    if (at >= 0) return [...onPath.slice(at), id];
    if (done.has(id)) return null;
    onPath.push(id);
    for (const dep of depends.get(id) ?? []) {
      const cycle = visit(dep);
      if (cycle) return cycle;
    }
    onPath.pop();
    done.add(id);
    return null;
  };
  for (const module of modules) {
    const cycle = visit(module.id);
    if (cycle) return cycle;
  }
  return null;
}

function isControl(char: string): boolean {
  const code = char.charCodeAt(0);
  return code < 0x20 || code === 0x7f;
}

/** A path as it can be shown in a message: NUL and control characters escaped. */
export function printable(path: string): string {
  return [...path].map((c) => (isControl(c) ? `\\x${c.charCodeAt(0).toString(16).padStart(2, "0")}` : c)).join("");
}
