// The [status_page] section of moonflash.conf: the read-only live status page (src/status/page-server.ts) that
// shows a flash while Klipper is stopped and Mainsail/Fluidd show nothing of moonflash. Validated like every
// section (src/core/config-values.ts): unknown options are errors, each value says what it expects.
//
//   [status_page]
//   enabled: True
//   port: 7180
//   bind: 0.0.0.0
//   webcam: True                              # shown as a Mainsail/Fluidd iframe webcam during jobs
//   public_url: http://printer.local/moonflash/   # when a proxy serves it; unset: http://<printer host>:<port>/

import * as z from "zod/mini";
import "../core/zod.js";
import { boolean, defaults, expected, integer, unset, value } from "../core/config-values.js";

export interface StatusPageConfig {
  enabled: boolean;
  port: number;
  /** Address to listen on: all of the printer's (0.0.0.0) by default, so the user's browser reaches it. */
  bind: string;
  /** Register the page as a Mainsail/Fluidd iframe webcam while a job runs. */
  webcam: boolean;
  /** The URL browsers should open (behind a proxy); null: http://<printer host>:<port>/. */
  public_url: string | null;
}

const bindAddress = value((raw): string => {
  if (/^(?:\d{1,3}\.){3}\d{1,3}$/.test(raw) || /^[0-9A-Fa-f:]+$/.test(raw) || raw === "localhost") return raw;
  throw expected("an IP address to listen on, such as 0.0.0.0 (every address) or 127.0.0.1", raw);
});

// Every browser that shows the webcam gets this URL, so a password in it would be handed to all of them.
const publicUrl = value((raw): string => {
  let parsed: URL;
  try {
    parsed = new URL(raw);
  } catch {
    throw expected("an http:// or https:// URL such as http://printer.local:7180/", raw);
  }
  if (parsed.protocol !== "http:" && parsed.protocol !== "https:") throw expected("an http:// or https:// URL such as http://printer.local:7180/", raw);
  if (parsed.username !== "" || parsed.password !== "") throw expected("a URL without user:password@ (every browser that shows the page sees it)", raw);
  return raw;
});

/** The [status_page] section's schema, for src/moonflash-conf.ts. */
export const statusPageSchema = z.strictObject({
  enabled: z._default(boolean, true),
  port: z._default(integer(1, 65535), 7180),
  bind: z._default(bindAddress, "0.0.0.0"),
  webcam: z._default(boolean, true),
  public_url: unset(publicUrl),
});

export const STATUS_PAGE_DEFAULTS: StatusPageConfig = defaults(statusPageSchema);
