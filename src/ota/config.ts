// The [ota] section of moonflash.conf: where packages may write (root aliases, only from here, never from a
// package), the key packages must be signed with, the probation time and how many backups are kept. Validated like
// every section (src/core/config-values.ts): unknown options are errors, each value says what it expects.
//
//   [ota]
//   roots:
//     config=~/printer_data/config
//     klipper=~/klipper
//   public_key: /home/pi/printer_data/config/ota-key.pem   # or the raw key in base64 (44 characters)
//   probation_timeout: 120
//   keep_backups: 2
//   limits:
//     file_size=256M
//     download_size=1G

import { isAbsolute } from "node:path";
import * as z from "zod/mini";
import "../core/zod.js";
import { Invalid, defaults, expected, integer, unset, url, value } from "../core/config-values.js";
import { expandHome } from "../core/paths.js";
import type { PackageLimits } from "./package.js";
import { isRawPublicKey } from "./signing.js";

/** Package and download limits from `[ota] limits`; unset ones keep the package reader's and downloader's defaults. */
export interface OtaLimits extends Partial<PackageLimits> {
  /** Largest package download accepted when the caller gives no size. */
  maxDownloadBytes?: number;
}

export interface OtaConfig {
  /** Root alias → absolute directory (no trailing slash). A manifest's `dst` is "<alias>/<relative path>". */
  roots: Record<string, string>;
  /**
   * Ed25519 key packages must be signed with: an absolute path to a PEM file, or the raw 32-byte key in base64.
   * null: signatures are not checked.
   */
  public_key: string | null;
  /** Port of the vendor HTTP API (src/ota/http-api.ts); null: off. */
  http_port: number | null;
  http_bind: string;
  /** Told about each OTA result (POST), for a vendor's dashboard; null: nobody. */
  callback_url: string | null;
  /** Seconds Klipper and the updated services get to come up after an update before it is rolled back. */
  probation_timeout: number;
  /** Backups of committed updates kept for ota.rollback (the newest is always kept). */
  keep_backups: number;
  limits: OtaLimits;
}

const ALIAS = /^[A-Za-z0-9_-]{1,64}$/;

/** "alias=value" lines (also "alias: value"); blank lines are skipped, a repeated key is an error. */
function keyValueLines(raw: string, what: string): Array<[string, string]> {
  const pairs: Array<[string, string]> = [];
  const seen = new Set<string>();
  for (const line of raw.split("\n").map((l) => l.trim()).filter((l) => l !== "")) {
    const at = line.search(/[=:]/);
    const key = at > 0 ? line.slice(0, at).trim() : "";
    const rest = at > 0 ? line.slice(at + 1).trim() : "";
    if (key === "" || rest === "") throw expected(`one ${what} per line`, line);
    if (seen.has(key)) throw new Invalid(`'${key}' is given twice`);
    seen.add(key);
    pairs.push([key, rest]);
  }
  return pairs;
}

const roots = value((raw): Record<string, string> => {
  const result: Record<string, string> = {};
  for (const [alias, dir] of keyValueLines(raw, "'alias=directory'")) {
    if (!ALIAS.test(alias)) throw new Invalid(`root alias '${alias}' must be letters, digits, '_' or '-' (at most 64)`);
    const path = expandHome(dir).replace(/(.)\/+$/, "$1");
    if (!isAbsolute(path)) throw expected(`an absolute directory (or one starting with ~/) for root '${alias}'`, dir);
    result[alias] = path;
  }
  return result;
});

const publicKey = value((raw): string => {
  if (isRawPublicKey(raw)) return raw;
  if (raw.startsWith("/") || raw.startsWith("~/")) return expandHome(raw);
  throw expected("the path of a PEM public key, or the raw 32-byte Ed25519 key in base64 (44 characters)", raw);
});

const bindAddress = value((raw): string => {
  if (/^(?:\d{1,3}\.){3}\d{1,3}$/.test(raw) || /^[0-9A-Fa-f:]+$/.test(raw) || raw === "localhost") return raw;
  throw expected("an IP address to listen on, such as 127.0.0.1", raw);
});

const SIZE_UNITS: Record<string, number> = { "": 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3 };

function sizeOf(raw: string): number {
  const match = /^(\d+)\s*([kKmMgG])?(?:i?B)?$/.exec(raw);
  const n = match ? Number(match[1]) * (SIZE_UNITS[(match[2] ?? "").toLowerCase()] ?? NaN) : NaN;
  if (!Number.isSafeInteger(n) || n <= 0) throw expected("a size such as 262144, 256K, 64M or 1G", raw);
  return n;
}

function countOf(raw: string, min: number): number {
  const n = /^\d+$/.test(raw) ? Number(raw) : NaN;
  if (!Number.isSafeInteger(n) || n < min) throw expected(`a whole number of at least ${min}`, raw);
  return n;
}

/** The keys of `limits:` and the PackageLimits field each sets. */
const LIMIT_KEYS = {
  file_size: (raw: string): OtaLimits => ({ maxFileBytes: sizeOf(raw) }),
  total_size: (raw: string): OtaLimits => ({ maxTotalBytes: sizeOf(raw) }),
  manifest_size: (raw: string): OtaLimits => ({ maxManifestBytes: sizeOf(raw) }),
  entries: (raw: string): OtaLimits => ({ maxEntries: countOf(raw, 1) }),
  compression_ratio: (raw: string): OtaLimits => ({ maxCompressionRatio: countOf(raw, 2) }),
  download_size: (raw: string): OtaLimits => ({ maxDownloadBytes: sizeOf(raw) }),
} as const;

const limits = value((raw): OtaLimits => {
  let result: OtaLimits = {};
  for (const [key, setting] of keyValueLines(raw, "'name=value'")) {
    const parse = (LIMIT_KEYS as Record<string, (raw: string) => OtaLimits>)[key];
    if (!parse) throw new Invalid(`unknown limit '${key}'; limits are ${Object.keys(LIMIT_KEYS).join(", ")}`);
    try {
      result = { ...result, ...parse(setting) };
    } catch (err) {
      if (err instanceof Invalid) throw new Invalid(`${key}: ${err.message}`);
      throw err;
    }
  }
  return result;
});

/** The [ota] section's schema, for src/moonflash-conf.ts. */
export const otaSchema = z.strictObject({
  roots: z._default(roots, {}),
  public_key: unset(publicKey),
  http_port: unset(integer(1, 65535)),
  http_bind: z._default(bindAddress, "127.0.0.1"),
  callback_url: unset(url(["http:", "https:"], "an http:// or https:// URL")),
  probation_timeout: z._default(integer(5, 3600), 120),
  keep_backups: z._default(integer(1, 20), 2),
  limits: z._default(limits, {}),
});

/** Every [ota] option's default: no roots (nothing can be installed until some are configured), no key. */
export const OTA_DEFAULTS: OtaConfig = defaults(otaSchema);

/** The roots as the package reader takes them. */
export function rootsMap(config: Pick<OtaConfig, "roots">): Map<string, string> {
  return new Map(Object.entries(config.roots));
}
