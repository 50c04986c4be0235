// URLs as they may be shown or recorded: a download URL can carry user:password@ or a signed query, and it ends up
// in job targets, history, console lines and the status page.

/** Scheme, host and path only (no user:password@, query or fragment). */
export function safeUrl(raw: string): string {
  try {
    const url = new URL(raw);
    if (url.host === "") return raw.replace(/[?#].*$/, "");
    return `${url.protocol}//${url.host}${url.pathname}`;
  } catch {
    // Not parseable: still drop whatever stands before an @ in the authority, and any query.
    return raw.replace(/^([a-z][a-z0-9+.-]*:\/\/)[^/?#]*@/i, "$1").replace(/[?#].*$/, "");
  }
}
