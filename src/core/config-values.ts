// The building blocks of moonflash.conf's sections, for every component that owns one: value parsers that
// name what they expect, "did you mean" for typos, and validation of one INI section against a zod schema with
// errors that name file, line, section and option. The sections themselves live with their components.

import { isAbsolute, posix } from "node:path";
import * as z from "zod/mini";
import "./zod.js";
import { configError, type IniSection } from "./ini.js";
import { expandHome } from "./paths.js";
import type { MoonflashError } from "./errors.js";

// --- value parsers: each throws Invalid with the expectation, the schema turns it into a zod issue ---

/** Thrown by a value parser: the message says what was expected. */
export class Invalid extends Error {}

export function value<T>(parse: (raw: string) => T) {
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

export function expected(what: string, raw: string): Invalid {
  return new Invalid(`expected ${what}, got '${raw}'`);
}

export const integer = (min: number, max: number) =>
  value((raw) => {
    const n = /^\d+$/.test(raw) ? Number(raw) : NaN;
    if (!Number.isSafeInteger(n) || n < min || n > max) throw expected(`an integer from ${min} to ${max}`, raw);
    return n;
  });

export const positiveInteger = value((raw) => {
  const n = /^\d+$/.test(raw) ? Number(raw) : NaN;
  if (!Number.isSafeInteger(n) || n <= 0) throw expected("a positive integer", raw);
  return n;
});

/** Moonraker's and Klipper's spellings of a boolean (True/False), and yes/no. */
export const boolean = value((raw) => {
  const word = raw.toLowerCase();
  if (["true", "yes", "on", "1"].includes(word)) return true;
  if (["false", "no", "off", "0"].includes(word)) return false;
  throw expected("True or False", raw);
});

export const oneOf = <const T extends readonly string[]>(choices: T) =>
  value((raw) => {
    if (!choices.includes(raw)) throw expected(`one of ${choices.join(" | ")}`, raw);
    return raw as T[number];
  });

export const absolutePath = value((raw) => {
  const path = expandHome(raw);
  if (!isAbsolute(path)) throw expected("an absolute path (or one starting with ~/)", raw);
  return path;
});

export const directory = value((raw) => {
  const path = expandHome(raw);
  if (!isAbsolute(path)) throw expected("an absolute path (or one starting with ~/)", raw);
  return path.endsWith("/") ? path : `${path}/`;
});

// A bare program name is looked up on PATH by the runner; anything with a slash must be absolute.
export const program = value((raw) => {
  if (/^[\w.+-]+$/.test(raw)) return raw;
  const path = expandHome(raw);
  if (!isAbsolute(path)) throw expected("an absolute path or a program name", raw);
  return path;
});

export const url = (protocols: string[], what: string) =>
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

export const token = value((raw) => {
  if (!/^\S+$/.test(raw)) throw expected("a single word without spaces", raw);
  return raw;
});

// Only the form is checked here. Whether the path really is a device under /dev is decided by the flash engine on
// the resolved path before anything is stopped: a symlink (by-id, or a virtual board's pty link) may live anywhere.
export const serialDevice = value((raw) => {
  if (!raw.startsWith("/") && !raw.startsWith("~/")) throw expected("an absolute device path, e.g. /dev/serial/by-id/...", raw);
  return posix.normalize(expandHome(raw));
});

export const canbusUuid = value((raw) => {
  if (!/^[0-9a-fA-F]{12}$/.test(raw)) throw expected("12 hex digits (the canbus_uuid from Klipper's config)", raw);
  return raw.toLowerCase();
});

export const interfaceName = value((raw) => {
  // Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
  if (!/^[\w.-]{1,15}$/.test(raw)) throw expected("a network interface name such as can0", raw);
  return raw;
});

const SIZE_UNITS: Record<string, number> = { "": 1, k: 1024, m: 1024 * 1024 };

export const byteSize = value((raw) => {
  const match = /^(\d+)\s*(?:([kKmM])(?:i?B)?)?$/.exec(raw);
  const n = match ? Number(match[1]) * (SIZE_UNITS[(match[2] ?? "").toLowerCase()] ?? NaN) : NaN;
  if (!Number.isSafeInteger(n) || n <= 0) throw expected("a size in bytes such as 131072, 256K or 1M", raw);
  return n;
});

// Empty options are dropped before validation, so "not set" and "set to nothing" both mean the default.
export const unset = <T extends z.ZodMiniType>(schema: T) => z._default(z.nullable(schema), null);

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
export function suggest(name: string, known: readonly string[]): string | undefined {
  const lower = name.toLowerCase();
  let best: { name: string; distance: number } | undefined;
  for (const candidate of known) {
    const distance = editDistance(lower, candidate.toLowerCase());
    if (!best || distance < best.distance) best = { name: candidate, distance };
  }
  const limit = name.length <= 4 ? 1 : 2;
  return best && best.distance <= limit ? best.name : undefined;
}

// --- one section ---


export interface Located {
  line: number;
  error: MoonflashError;
}

export function validateSection<T extends z.ZodMiniType>(file: string, section: IniSection, schema: T, shape: readonly string[], errors: Located[]): z.output<T> | undefined {
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

export function defaults<T extends z.ZodMiniType>(schema: T): z.output<T> {
  return schema.parse({});
}

