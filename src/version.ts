// Injected by scripts/build.mjs for the bundle; read from package.json when running from source (tests, demo).
import { createRequire } from "node:module";

declare const MOONFLASH_VERSION: string | undefined;

function sourceVersion(): string {
  const require = createRequire(import.meta.url);
  return (require("../package.json") as { version: string }).version;
}

export const VERSION: string = typeof MOONFLASH_VERSION === "string" ? MOONFLASH_VERSION : sourceVersion();
export const AGENT_NAME = "moonflash";
export const PROJECT_URL = "https://github.com/moonflash/moonflash";
