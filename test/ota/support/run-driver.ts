// Runs ota-driver.ts as a real child process, optionally with a crash point, as another user, and returns its JSON
// lines and how it ended. From source through tsx (node --import tsx), or from a bundle of the same source that
// bundleDriver() makes once: the crash matrix starts ~60 children, and tsx costs each of them ~0.5 s of CPU to load
// the engine's modules, against ~0.1 s for one bundled file.

import { build } from "esbuild";
import { execa } from "execa";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import type { DriverLine, DriverSpec } from "./ota-driver.js";

const here = dirname(fileURLToPath(import.meta.url));
export const REPO = join(here, "..", "..", "..");
const DRIVER = join(here, "ota-driver.ts");

export interface DriverRun {
  lines: DriverLine[];
  /** "SIGKILL" when a crash point fired. */
  signal: string | undefined;
  exitCode: number | undefined;
  stderr: string;
}

/** Bundles ota-driver.ts and what it imports (the engine, the session, their libraries) into `<dir>/ota-driver.mjs`. */
export async function bundleDriver(dir: string): Promise<string> {
  const outfile = join(dir, "ota-driver.mjs");
  await build({
    entryPoints: [DRIVER],
    absWorkingDir: REPO,
    bundle: true,
    platform: "node",
    format: "esm",
    target: "node20",
    outfile,
    define: { MOONFLASH_VERSION: JSON.stringify("0.0.0-test") },
    // Bundled CommonJS packages call require(), as in scripts/build.mjs.
    banner: { js: 'import { createRequire as __driverRequire } from "node:module"; const require = __driverRequire(import.meta.url);' },
    logLevel: "error",
  });
  return outfile;
}

export async function runDriver(
  spec: DriverSpec,
  opts: { crashAt?: string; crashAfter?: number; uid?: number; gid?: number; timeoutMs?: number; bundle?: string } = {},
): Promise<DriverRun> {
  const env: Record<string, string> = { NO_COLOR: "1" };
  if (opts.crashAt) env.MOONFLASH_OTA_CRASH_AT = opts.crashAt;
  if (opts.crashAfter) env.MOONFLASH_OTA_CRASH_AFTER = String(opts.crashAfter);
  if (opts.uid !== undefined) env.HOME = "/tmp";
  const args = opts.bundle ? [opts.bundle, JSON.stringify(spec)] : ["--import", "tsx", DRIVER, JSON.stringify(spec)];
  const child = await execa(process.execPath, args, {
    cwd: REPO,
    reject: false,
    timeout: opts.timeoutMs ?? 30_000,
    env,
    ...(opts.uid !== undefined ? { uid: opts.uid, gid: opts.gid ?? opts.uid } : {}),
  });
  const lines = String(child.stdout)
    .split("\n")
    .filter((l) => l.startsWith("{"))
    .map((l) => JSON.parse(l) as DriverLine);
  return { lines, signal: child.signal, exitCode: child.exitCode, stderr: String(child.stderr) };
}
