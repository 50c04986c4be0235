// Parameter validation for remote methods and CLI verbs: zod issues become one INVALID_PARAMS error that names
// the field and what was expected.

import * as z from "zod/mini";
import "../core/zod.js";
import { MoonflashError } from "../core/errors.js";

/** Klipper macros pass Jinja values: `dry_run=1`, `dry_run="true"`; clients pass booleans. Accept all of them. */
export const flag = z.pipe(
  z.transform((value: unknown) => {
  if (typeof value === "number") return value === 0 ? false : value === 1 ? true : value;
  if (typeof value === "string") {
    const lower = value.trim().toLowerCase();
    if (["1", "true", "yes", "on"].includes(lower)) return true;
    if (["0", "false", "no", "off"].includes(lower)) return false;
  }
    return value;
  }),
  z.boolean({ error: "expected true/false (or 1/0)" }),
);

/**
 * How a caller names a method and its parameters: clients use the remote method's own names (flash.mcu, dry_run),
 * a macro user types the macro's (FLASH_MCU, DRY_RUN=), so errors speak the caller's dialect.
 */
export interface ParamDialect {
  method: string;
  param(key: string): string;
}

export const clientDialect = (method: string): ParamDialect => ({ method, param: (key) => key });

export function parseParams<S extends z.ZodMiniType>(method: string, schema: S, raw: unknown, dialect: ParamDialect = clientDialect(method)): z.infer<S> {
  const result = schema.safeParse(raw ?? {});
  if (result.success) return result.data;
  const problems = result.error.issues.map((issue) => {
    const field = issue.path.length ? dialect.param(issue.path.join(".")) : "params";
    if (issue.code === "unrecognized_keys") {
      return `unknown parameter(s) ${issue.keys.map((k) => `'${dialect.param(k)}'${didYouMean(k, knownKeys(schema), dialect)}`).join(", ")}`;
    }
    return `${field}: ${issue.message}`;
  });
  throw new MoonflashError("INVALID_PARAMS", `${dialect.method}: ${problems.join("; ")}`, {
    method,
    issues: result.error.issues.map((i) => ({ path: i.path.map(String), code: i.code, message: i.message })),
  });
}

function knownKeys(schema: z.ZodMiniType): string[] {
  const shape = (schema as { _zod?: { def?: { shape?: Record<string, unknown> } } })._zod?.def?.shape;
  return shape ? Object.keys(shape) : [];
}

/** A hint for a renamed or mistyped key: `method` → `flash_method`, `dryrun` → `dry_run`. */
function didYouMean(key: string, known: string[], dialect: ParamDialect): string {
  const squash = (k: string): string => k.toLowerCase().replace(/_/g, "");
  const match = known.find((k) => squash(k) === squash(key)) ?? known.find((k) => k.endsWith(`_${key.toLowerCase()}`));
  return match === undefined || dialect.param(match) === dialect.param(key) ? "" : ` (did you mean '${dialect.param(match)}'?)`;
}
