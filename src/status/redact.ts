// What the status page must never show, taken out of every text it passes on: the page has no login and listens on
// every address, while job targets, messages and Klipper's state can carry a download URL with user:password@ or a
// signed query, and file paths that tell where the data dir, the config and the firmware live.

import { safeUrl } from "../core/url.js";

const URL_IN_TEXT = /\b[a-z][a-z0-9+.-]*:\/\/[^\s"'<>`]+/gi;
// An absolute or ~/ path: starts after the text's start, a space, a quote, a bracket or "=" so that "1/2" and the
// path part of a URL (already handled) do not count.
const PATH_IN_TEXT = /(^|[\s"'`(=[,;])(~?\/[^\s"'`),;\]]*[^\s"'`),;\].:!?])/g;
// Device paths name the board the user asked about and give nothing away.
const SHOWN_PATHS = /^\/dev\//;

function hidePaths(text: string): string {
  return text.replace(PATH_IN_TEXT, (_match, lead: string, path: string) => {
    if (SHOWN_PATHS.test(path)) return `${lead}${path}`;
    const name = path.replace(/\/+$/, "").split("/").pop() ?? "";
    return `${lead}…/${name === "~" ? "" : name}`;
  });
}

/** `text` with URL credentials and queries removed and file paths (except /dev/…) cut to their last part. */
export function redactText(text: string): string {
  let out = "";
  let last = 0;
  for (const match of text.matchAll(URL_IN_TEXT)) {
    // Punctuation that ends the sentence is not part of the URL.
    const url = match[0].replace(/[.,;:!?)\]]+$/, "");
    out += hidePaths(text.slice(last, match.index)) + safeUrl(url);
    last = match.index + url.length;
  }
  return out + hidePaths(text.slice(last));
}

/** redactText, cut to `max` characters: a runaway tool line must not fill every viewer's screen. */
export function shownText(text: string, max = 500): string {
  const redacted = redactText(text);
  return redacted.length > max ? `${redacted.slice(0, max - 1)}…` : redacted;
}
