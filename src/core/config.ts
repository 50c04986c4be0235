// moonflash.conf: Moonraker-style INI checked against a zod schema. Unknown sections and options are errors
// (usually typos) with a "did you mean" hint; every error names file, line, section and option.

import { readFile } from "node:fs/promises";
import { isAbsolute, posix } from "node:path";
import * as z from "zod/mini";
import "./zod.js";
import { FLASH_METHODS, type BootloaderRequest, type FlashMethodName } from "../flash/types.js";
import { configError, parseIni, type IniSection } from "./ini.js";
import { dataPaths, expandHome } from "./paths.js";
import { MoonflashError } from "./errors.js";

export type ConfigLogLevel = "debug" | "info" | "warn" | "error";

export interface McuConfig {
  /** Section name as Klipper spells it: "mcu" or "mcu toolhead". */
  section: string;
  serial: string | null;
  canbus_uuid: string | null;
  canbus_interface: string;
  baud: number;
  /** Methods to try in order; null = auto ("katapult, make" for serial, "flashtool" for CAN). */
  method: FlashMethodName[] | null;
  /** Image to flash; null = the engine's default, <klipper_path>/out/klipper.bin. */
  firmware: string | null;
  kconfig: string | null;
  /** OUT for `make flash`, always ending in "/". */
  out_dir: string | null;
  mcu_type: string | null;
  /** Bytes available to the application. */
  flash_size: number | null;
  bootloader: BootloaderRequest;
  wchisp_transport: "usb" | "serial";
  /** Seconds per flash attempt. */
  timeout: number;
}

export interface MoonflashConfig {
  file: string;
  exists: boolean;
  dataDir: string;
  moonflash: {
    moonraker_socket: string;
    moonraker_url: string | null;
    api_key: string | null;
    klipper_path: string;
    katapult_path: string;
    python: string;
    wchisp_path: string | null;
    log_level: ConfigLogLevel;
    service_timeout: number;
  };
  /** Key = section name, "mcu" or "mcu toolhead". */
  mcus: Record<string, McuConfig>;
  ota: { manifest_url: string | null; channel: "stable" | "beta" };
}

// --- value parsers: each throws Invalid with the expectation, the schema turns it into a zod issue ---

class Invalid extends Error {}

function value<T>(parse: (raw: string) => T) {
  return z.pipe(
    z.string(),
    z.transform((raw: string, ctx) => {
      try {
        return parse(raw);
      } catch (err) {
        if (!(err instanceof Invalid)) throw err;
        ctx.issues.push({ code: "custom", message: err.message, input: raw });
        return z.NEVER;
      }
    }),
  );
}

function expected(what: string, raw: string): Invalid {
  return new Invalid(`expected ${what}, got '${raw}'`);
}

const integer = (min: number, max: number) =>
  value((raw) => {
    const n = /^\d+$/.test(raw) ? Number(raw) : NaN;
    if (!Number.isSafeInteger(n) || n < min || n > max) throw expected(`an integer from ${min} to ${max}`, raw);
    return n;
  });

const positiveInteger = value((raw) => {
  const n = /^\d+$/.test(raw) ? Number(raw) : NaN;
  if (!Number.isSafeInteger(n) || n <= 0) throw expected("a positive integer", raw);
  return n;
});

const oneOf = <const T extends readonly string[]>(choices: T) =>
  value((raw) => {
    if (!choices.includes(raw)) throw expected(`one of ${choices.join(" | ")}`, raw);
    return raw as T[number];
  });

const absolutePath = value((raw) => {
  const path = expandHome(raw);
  if (!isAbsolute(path)) throw expected("an absolute path (or one starting with ~/)", raw);
  return path;
});

const directory = value((raw) => {
  const path = expandHome(raw);
  if (!isAbsolute(path)) throw expected("an absolute path (or one starting with ~/)", raw);
  return path.endsWith("/") ? path : `${path}/`;
});

// A bare program name is looked up on PATH by the runner; anything with a slash must be absolute.
const program = value((raw) => {
  if (/^[\w.+-]+$/.test(raw)) return raw;
  const path = expandHome(raw);
  if (!isAbsolute(path)) throw expected("an absolute path or a program name", raw);
  return path;
});

const url = (protocols: string[], what: string) =>
  value((raw) => {
    let parsed: URL;
    try {
      parsed = new URL(raw);
    } catch {
      throw expected(what, raw);
    }
    if (!protocols.includes(parsed.protocol)) throw expected(what, raw);
    return raw;
  });

const token = value((raw) => {
  if (!/^\S+$/.test(raw)) throw expected("a single word without spaces", raw);
  return raw;
});

// Only the form is checked here. Whether the path really is a device under /dev is decided by the flash engine on
// the resolved path before anything is stopped: a symlink (by-id, or a virtual board's pty link) may live anywhere.
const serialDevice = value((raw) => {
  if (!raw.startsWith("/") && !raw.startsWith("~/")) throw expected("an absolute device path, e.g. /dev/serial/by-id/...", raw);
  return posix.normalize(expandHome(raw));
});

const canbusUuid = value((raw) => {
  if (!/^[0-9a-fA-F]{12}$/.test(raw)) throw expected("12 hex digits (the canbus_uuid from Klipper's config)", raw);
  return raw.toLowerCase();
});

const interfaceName = value((raw) => {
  // Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
  if (!/^[\w.-]{1,15}$/.test(raw)) throw expected("a network interface name such as can0", raw);
  return raw;
});

const methodList = value((raw): FlashMethodName[] | null => {
  if (raw === "auto") return null;
  const names = raw.split(",").map((name) => name.trim());
  const seen = new Set<string>();
  for (const name of names) {
    if (!(FLASH_METHODS as readonly string[]).includes(name)) {
      const hint = suggest(name, FLASH_METHODS);
      throw new Invalid(
        `unknown method '${name}'${hint ? ` (did you mean '${hint}'?)` : ""}; expected a comma list of ${FLASH_METHODS.join(", ")} or auto`,
      );
    }
    if (seen.has(name)) throw new Invalid(`method '${name}' is listed twice`);
    seen.add(name);
  }
  return names as FlashMethodName[];
});

const SIZE_UNITS: Record<string, number> = { "": 1, k: 1024, m: 1024 * 1024 };

const byteSize = value((raw) => {
  const match = /^(\d+)\s*(?:([kKmM])(?:i?B)?)?$/.exec(raw);
  const n = match ? Number(match[1]) * (SIZE_UNITS[(match[2] ?? "").toLowerCase()] ?? NaN) : NaN;
  if (!Number.isSafeInteger(n) || n <= 0) throw expected("a size in bytes such as 131072, 256K or 1M", raw);
  return n;
});

// Empty options are dropped before validation, so "not set" and "set to nothing" both mean the default.
const unset = <T extends z.ZodMiniType>(schema: T) => z._default(z.nullable(schema), null);

// --- section schemas ---

function moonflashSchema(dataDir: string) {
  return z.strictObject({
    moonraker_socket: z._default(absolutePath, dataPaths(dataDir).socket),
    moonraker_url: unset(url(["ws:", "wss:"], "a websocket URL such as ws://host:7125/websocket")),
    api_key: unset(token),
    klipper_path: z._default(absolutePath, expandHome("~/klipper")),
    katapult_path: z._default(absolutePath, expandHome("~/katapult")),
    python: z._default(program, "/usr/bin/python3"),
    wchisp_path: unset(absolutePath),
    log_level: z._default(oneOf(["debug", "info", "warn", "error"] as const), "info"),
    service_timeout: z._default(integer(5, 600), 90),
  });
}

const mcuSchema = z
  .strictObject({
    serial: unset(serialDevice),
    canbus_uuid: unset(canbusUuid),
    canbus_interface: z._default(interfaceName, "can0"),
    baud: z._default(positiveInteger, 250000),
    method: unset(methodList),
    firmware: unset(absolutePath),
    kconfig: unset(absolutePath),
    out_dir: unset(directory),
    mcu_type: unset(token),
    flash_size: unset(byteSize),
    bootloader: z._default(oneOf(["auto", "usb", "serial", "none"] as const), "auto"),
    wchisp_transport: z._default(oneOf(["usb", "serial"] as const), "usb"),
    timeout: z._default(integer(10, 3600), 300),
  })
  .check(
    z.superRefine((mcu, ctx) => {
      if (mcu.serial !== null && mcu.canbus_uuid !== null) {
        ctx.addIssue({
          code: "custom",
          path: ["canbus_uuid"],
          message: "serial and canbus_uuid are mutually exclusive; keep the one the board uses",
        });
      }
    }),
  );

const otaSchema = z.strictObject({
  manifest_url: unset(url(["https:"], "an https URL")),
  channel: z._default(oneOf(["stable", "beta"] as const), "stable"),
});

const KNOWN_SECTIONS = ["moonflash", "mcu", "ota"] as const;

// --- "did you mean" ---

/** Optimal string alignment distance: a swap of two letters counts as one edit. */
function editDistance(a: string, b: string): number {
  const d: number[][] = Array.from({ length: a.length + 1 }, (_, i) =>
    Array.from({ length: b.length + 1 }, (_, j) => (i === 0 ? j : j === 0 ? i : 0)),
  );
  for (let i = 1; i <= a.length; i++) {
    const row = d[i]!;
    const prev = d[i - 1]!;
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      row[j] = Math.min(prev[j]! + 1, row[j - 1]! + 1, prev[j - 1]! + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) {
        row[j] = Math.min(row[j]!, d[i - 2]![j - 2]! + 1);
      }
    }
  }
  return d[a.length]![b.length]!;
}

/** The closest known name when it is close enough to be a typo. */
function suggest(name: string, known: readonly string[]): string | undefined {
  const lower = name.toLowerCase();
  let best: { name: string; distance: number } | undefined;
  for (const candidate of known) {
    const distance = editDistance(lower, candidate.toLowerCase());
    if (!best || distance < best.distance) best = { name: candidate, distance };
  }
  const limit = name.length <= 4 ? 1 : 2;
  return best && best.distance <= limit ? best.name : undefined;
}

// --- assembly ---

interface Located {
  line: number;
  error: MoonflashError;
}

function validateSection<T extends z.ZodMiniType>(file: string, section: IniSection, schema: T, shape: readonly string[], errors: Located[]): z.output<T> | undefined {
  const input: Record<string, string> = {};
  for (const option of section.options.values()) {
    if (option.value !== "") input[option.name] = option.value;
  }
  // Unknown options are checked here, not by zod, so that empty unknown options are caught as well.
  for (const option of section.options.values()) {
    if (shape.includes(option.name)) continue;
    const hint = suggest(option.name, shape);
    errors.push({
      line: option.line,
      error: configError(
        { file, line: option.line, section: section.name, option: option.name },
        hint ? `unknown option; did you mean '${hint}'?` : `unknown option; [${section.name}] accepts ${shape.join(", ")}`,
        hint ? { suggestion: hint } : {},
      ),
    });
  }
  const result = schema.safeParse(input);
  if (result.success) return result.data;
  for (const issue of result.error.issues) {
    if (issue.code === "unrecognized_keys") continue;
    const name = String(issue.path[0]);
    const line = section.options.get(name)?.line ?? section.line;
    errors.push({ line, error: configError({ file, line, section: section.name, option: name }, issue.message) });
  }
  return undefined;
}

function defaults<T extends z.ZodMiniType>(schema: T): z.output<T> {
  return schema.parse({});
}

/** Validates moonflash.conf text (pure). Throws the first CONFIG_INVALID by line; details.errors lists all. */
export function parseConfig(text: string, file: string, dataDir: string): MoonflashConfig {
  const doc = parseIni(text, file);
  const errors: Located[] = [];
  const moonflash = moonflashSchema(dataDir);
  const config: MoonflashConfig = {
    file,
    exists: true,
    dataDir,
    moonflash: defaults(moonflash),
    mcus: {},
    ota: defaults(otaSchema),
  };
  const mcuLines = new Map<string, number>();

  for (const section of doc.sections.values()) {
    if (section.name === "moonflash") {
      const parsed = validateSection(file, section, moonflash, Object.keys(moonflash.shape), errors);
      if (parsed) config.moonflash = parsed;
      continue;
    }
    if (section.name === "ota") {
      const parsed = validateSection(file, section, otaSchema, Object.keys(otaSchema.shape), errors);
      if (parsed) config.ota = parsed;
      continue;
    }
    const mcu = /^mcu(?:\s+(\S.*))?$/.exec(section.name);
    if (mcu) {
      // Klipper splits section names on whitespace, so "[mcu  toolhead]" is "mcu toolhead".
      const key = mcu[1] === undefined ? "mcu" : `mcu ${mcu[1].split(/\s+/).join(" ")}`;
      const first = mcuLines.get(key);
      if (first !== undefined) {
        errors.push({
          line: section.line,
          error: configError({ file, line: section.line, section: section.name }, `duplicate of [${key}] at line ${first}; merge the two`),
        });
        continue;
      }
      mcuLines.set(key, section.line);
      const parsed = validateSection(file, section, mcuSchema, Object.keys(mcuSchema.shape), errors);
      if (parsed) config.mcus[key] = { section: key, ...parsed };
      continue;
    }
    const hint = suggest(section.name, KNOWN_SECTIONS);
    errors.push({
      line: section.line,
      error: configError(
        { file, line: section.line, section: section.name },
        hint
          ? `unknown section; did you mean [${hint}]?`
          : "unknown section; moonflash.conf has [moonflash], [mcu], [mcu NAME] and [ota]",
        hint ? { suggestion: hint } : {},
      ),
    });
  }

  if (errors.length > 0) {
    errors.sort((a, b) => a.line - b.line);
    const first = errors[0]!.error;
    if (errors.length > 1) first.details.errors = errors.map((e) => e.error.message);
    throw first;
  }
  return config;
}

/** Reads <data>/config/moonflash.conf (or `file`); a missing file means all defaults. */
export async function loadConfig(dataDir: string, file: string = dataPaths(dataDir).config): Promise<MoonflashConfig> {
  let text: string;
  try {
    text = await readFile(file, "utf8");
  } catch (err) {
    const errno = (err as NodeJS.ErrnoException).code;
    if (errno === "ENOENT") return { ...parseConfig("", file, dataDir), exists: false };
    throw new MoonflashError(
      "CONFIG_INVALID",
      `${file}: cannot read the config (${errno ?? String(err)}); check that it is a readable file`,
      { file, line: null, section: null, option: null },
      { cause: err },
    );
  }
  return parseConfig(text, file, dataDir);
}

function hideUrlCredentials(raw: string): string {
  const parsed = new URL(raw);
  if (parsed.username === "" && parsed.password === "") return raw;
  parsed.username = "";
  parsed.password = "";
  return parsed.toString();
}

/** The config as agent.info shows it: api_key and URL credentials hidden. */
export function configSummary(cfg: MoonflashConfig): Record<string, unknown> {
  const { moonflash } = cfg;
  return {
    file: cfg.file,
    exists: cfg.exists,
    dataDir: cfg.dataDir,
    moonflash: {
      ...moonflash,
      moonraker_url: moonflash.moonraker_url === null ? null : hideUrlCredentials(moonflash.moonraker_url),
      api_key: moonflash.api_key === null ? null : "(set, hidden)",
    },
    mcus: structuredClone(cfg.mcus),
    ota: { ...cfg.ota },
  };
}
