// HTTP range headers for resumable downloads, as pure functions: build the Range/If-Range request, parse
// Content-Range (RFC 9110 §14.4) and decide whether a 206 answer continues exactly the bytes we hold.
// No I/O here, so every malformed header a server can send is a table row in the tests.

/** Largest offset we accept in a header: beyond 2^53 numbers lose precision, and no package is that big. */
const MAX_DIGITS = 15;

/** A parsed `Content-Range` value. */
export type ContentRange =
  | { kind: "range"; start: number; end: number; total: number | null }
  /** `bytes *\/total`: the answer to a range the server cannot satisfy (416). */
  | { kind: "unsatisfied"; total: number };

// `bytes first-last/total` or `bytes */total`; the unit is case-insensitive (RFC 9110 §14.1), nothing else is
// tolerated: a list of ranges, a sign, a space inside the numbers or anything after them is a malformed answer.
const RANGE_RESP = new RegExp(`^bytes (\\d{1,${MAX_DIGITS}})-(\\d{1,${MAX_DIGITS}})/(\\d{1,${MAX_DIGITS}}|\\*)$`, "i");
const UNSATISFIED = new RegExp(`^bytes \\*/(\\d{1,${MAX_DIGITS}})$`, "i");

/** Parses a Content-Range header value; null when it is missing or breaks the grammar or its own arithmetic. */
export function parseContentRange(value: string | undefined): ContentRange | null {
  if (value === undefined) return null;
  const text = value.trim();
  const unsatisfied = UNSATISFIED.exec(text);
  if (unsatisfied) return { kind: "unsatisfied", total: Number(unsatisfied[1]) };
  const match = RANGE_RESP.exec(text);
  if (!match) return null;
  const start = Number(match[1]);
  const end = Number(match[2]);
  const total = match[3] === "*" ? null : Number(match[3]);
  if (end < start) return null;
  if (total !== null && end >= total) return null;
  return { kind: "range", start, end, total };
}

/** What the client knows of the file it resumes. */
export interface ResumePoint {
  /** Bytes already held: the request asked for `bytes=<offset>-`. */
  offset: number;
  /** The file's full size, when known from an earlier answer or from the caller. */
  total: number | null;
}

export type PartialCheck = { ok: true; total: number } | { ok: false; reason: string };

/**
 * Checks a 206 answer to `Range: bytes=<offset>-`: exactly one range, starting at offset, running to the last byte
 * of the file, of the total we know; a Content-Length, when sent, must be that range's length. A total of `*` is
 * legal (RFC 9110 §14.4) and accepted only when we already know the total and the range ends on its last byte.
 */
export function checkPartialResponse(point: ResumePoint, contentRange: string | undefined, contentLength: string | undefined): PartialCheck {
  if (contentRange === undefined) return { ok: false, reason: "206 without Content-Range" };
  const range = parseContentRange(contentRange);
  if (range === null) return { ok: false, reason: `malformed Content-Range "${contentRange}"` };
  if (range.kind === "unsatisfied") return { ok: false, reason: `206 with an unsatisfied Content-Range "${contentRange}"` };
  if (range.start !== point.offset) return { ok: false, reason: `Content-Range starts at ${range.start}, we asked for ${point.offset}` };
  const total = range.total ?? point.total;
  if (total === null) return { ok: false, reason: `Content-Range "${contentRange}" gives no total and none is known` };
  if (point.total !== null && total !== point.total) return { ok: false, reason: `the file's size changed from ${point.total} to ${total}` };
  if (range.end !== total - 1) return { ok: false, reason: `Content-Range ends at ${range.end}, not at the last byte ${total - 1}` };
  if (contentLength !== undefined) {
    const length = parseContentLength(contentLength);
    if (length !== range.end - range.start + 1) return { ok: false, reason: `Content-Length ${contentLength} does not match Content-Range "${contentRange}"` };
  }
  return { ok: true, total };
}

/** Parses a Content-Length value; null when it is not a plain decimal number. */
export function parseContentLength(value: string | undefined): number | null {
  if (value === undefined) return null;
  const text = value.trim();
  return new RegExp(`^\\d{1,${MAX_DIGITS}}$`).test(text) ? Number(text) : null;
}

/** Validators of a representation, as the server sent them. */
export interface Validators {
  etag: string | null;
  lastModified: string | null;
}

/**
 * The If-Range value for a resume, or null when none may be sent. A weak ETag (`W/…`) must not be used in If-Range
 * and a date only when there is no entity tag at all (RFC 9110 §13.1.5); without If-Range the answer's validators
 * are compared instead, and the final hash stays the real guard.
 */
export function ifRangeValue(validators: Validators): string | null {
  if (validators.etag !== null) return validators.etag.startsWith("W/") ? null : validators.etag;
  return validators.lastModified;
}

/** True when an answer's validators show another representation than the one the held bytes came from. */
export function validatorsChanged(held: Validators, answer: Validators): boolean {
  if (held.etag !== null && answer.etag !== null) return held.etag !== answer.etag;
  if (held.etag === null && held.lastModified !== null && answer.lastModified !== null) return held.lastModified !== answer.lastModified;
  return false;
}

/** Milliseconds a Retry-After header asks for (seconds or an HTTP date), or null when absent or unreadable. */
export function retryAfterMs(value: string | undefined, now = Date.now()): number | null {
  if (value === undefined) return null;
  const text = value.trim();
  if (/^\d{1,9}$/.test(text)) return Number(text) * 1000;
  const date = Date.parse(text);
  return Number.isNaN(date) ? null : Math.max(0, date - now);
}
