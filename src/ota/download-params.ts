// The params of a package download, as zod checks them: ota.download (src/agent/methods.ts), the CLI's `ota download`
// and the vendor HTTP API's POST /download (src/ota/http-api.ts) all take the same {url, md5, sha256?, size?}.

import * as z from "zod/mini";
import "../core/zod.js";

const HEX = (digits: number, what: string) =>
  z
    .string({ error: (issue) => (issue.input === undefined ? `required: ${what}, ${digits} hex digits` : `expected ${digits} hex digits (${what})`) })
    .check(z.regex(new RegExp(`^[0-9A-Fa-f]{${digits}}$`), `expected ${digits} hex digits (${what})`));

/** A byte count: a whole number, also as a string of digits (a macro's SIZE= without |int). */
const byteCount = z.pipe(
  z.transform((value: unknown) => (typeof value === "string" && /^\s*\d+\s*$/.test(value) ? Number(value) : value)),
  z.int({ error: "expected the package's size in bytes, a whole number" }).check(z.nonnegative("expected the package's size in bytes, a whole number")),
);

/** ota.download's params; the CLI's `ota download` checks its arguments with it too, before it connects. */
export const otaDownloadParams = z.strictObject({
  url: z.string({ error: "required: the package's http:// or https:// URL" }).check(
    z.regex(/^https?:\/\/\S+$/i, "expected the package's http:// or https:// URL"),
  ),
  md5: HEX(32, "the package's MD5"),
  sha256: z.optional(HEX(64, "the package's SHA-256")),
  size: z.optional(byteCount),
});
