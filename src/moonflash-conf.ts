// moonflash.conf: Moonraker-style INI. Each section is validated by the component that owns it ([moonflash] here,
// [mcu ...] by the flash engine, [ota] by OTA, [status_page] by the status page); unknown sections and options are
// errors (usually typos) with a "did you mean" hint; every error names file, line, section and option.

import { readFile } from "node:fs/promises";
import * as z from "zod/mini";
import "./core/zod.js";
import {
  absolutePath, defaults, integer, oneOf, program, suggest, token, unset, url, validateSection, type Located,
} from "./core/config-values.js";
import { configError, parseIni } from "./core/ini.js";
import { dataPaths, expandHome } from "./core/paths.js";
import { MoonflashError } from "./core/errors.js";
import { mcuSchema, type McuConfig } from "./flash/config.js";
import { otaSchema, type OtaConfig } from "./ota/config.js";
import { statusPageSchema, type StatusPageConfig } from "./status/config.js";

export type { McuConfig } from "./flash/config.js";
export type { OtaConfig } from "./ota/config.js";
export type { StatusPageConfig } from "./status/config.js";

export type ConfigLogLevel = "debug" | "info" | "warn" | "error";

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
  /** The [ota] section, validated by OTA (src/ota/config.ts): roots, key, probation, backups, limits. */
  ota: OtaConfig;
  /** The [status_page] section, validated by the status page (src/status/config.ts): port, bind, webcam, URL. */
  status_page: StatusPageConfig;
}

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

const KNOWN_SECTIONS = ["moonflash", "mcu", "ota", "status_page"] as const;

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
    status_page: defaults(statusPageSchema),
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
    if (section.name === "status_page") {
      const parsed = validateSection(file, section, statusPageSchema, Object.keys(statusPageSchema.shape), errors);
      if (parsed) config.status_page = parsed;
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
          : "unknown section; moonflash.conf has [moonflash], [mcu], [mcu NAME], [ota] and [status_page]",
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
    ota: { ...structuredClone(cfg.ota), callback_url: cfg.ota.callback_url === null ? null : hideUrlCredentials(cfg.ota.callback_url) },
    status_page: { ...cfg.status_page },
  };
}
