// README.md must stay true: every error code, every config option and every remote method is documented there.

import { describe, expect, it } from "vitest";
import { readFileSync } from "node:fs";
import { resolve } from "node:path";
import pino from "pino";
import { ERROR_CODES } from "../../src/core/errors.js";
import { parseConfig } from "../../src/moonflash-conf.js";
import { buildMethodTable } from "../../src/agent/methods.js";
import { JobRunner } from "../../src/core/jobs.js";

const readme = readFileSync(resolve(import.meta.dirname, "../../README.md"), "utf8");

describe("README.md", () => {
  it("shows the two commands", () => {
    expect(readme).toContain("npm ci && npm run demo");
    expect(readme).toContain("npm test");
  });

  it.each(Object.keys(ERROR_CODES))("documents error code %s", (code) => {
    expect(readme).toContain(`| \`${code}\` | ${ERROR_CODES[code as keyof typeof ERROR_CODES].status} |`);
  });

  it("documents every configuration option", () => {
    const cfg = parseConfig("[mcu]\n", "/tmp/moonflash.conf", "/tmp/data");
    const options = [...Object.keys(cfg.moonflash), ...Object.keys(cfg.mcus.mcu!).filter((k) => k !== "section"), ...Object.keys(cfg.ota)];
    const missing = options.filter((o) => !readme.includes(`| \`${o}\` |`));
    expect(missing).toEqual([]);
  });

  it("documents every remote method", () => {
    const runner = new JobRunner({ dataDir: "/tmp/moonflash-readme-test", logger: pino({ level: "silent" }) });
    const names = buildMethodTable({ runner, flash: () => { throw new Error("not called"); }, info: () => ({}) }).map((m) => m.name);
    const missing = names.filter((n) => !readme.includes(`| \`${n}\` |`));
    expect(missing).toEqual([]);
  });
});
