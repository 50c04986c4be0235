// What both benchmark files need: where the bundle is, the environment of a systemd service, and a process's memory.

import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

export const root = join(dirname(fileURLToPath(import.meta.url)), "..");
export const bundle = join(root, "dist", "moonflash.mjs");
/** Target of an idle `serve` over an empty node process on the same machine, in the same run. */
export const IDLE_TARGET_KIB = 8 * 1024;

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/**
 * The environment of a systemd service (PATH and HOME only), for every node process measured: `npm run` adds
 * variables such as NODE_EXTRA_CA_CERTS, which makes node load OpenSSL and the CA bundle at start (+4 MiB RSS).
 */
export const SERVICE_ENV = { extendEnv: false, env: { PATH: process.env.PATH ?? "/usr/bin:/bin", HOME: process.env.HOME ?? "/" } } as const;

export interface Memory {
  rss: number;
  anon: number;
  file: number;
  hwm: number;
}

/** KiB figures from /proc/<pid>/status; RssFile is mostly the node binary's own pages. */
export function memoryKiB(pid: number): Memory {
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  const field = (name: string): number => Number(new RegExp(`${name}:\\s+(\\d+) kB`).exec(status)?.[1] ?? NaN);
  return { rss: field("VmRSS"), anon: field("RssAnon"), file: field("RssFile"), hwm: field("VmHWM") };
}
